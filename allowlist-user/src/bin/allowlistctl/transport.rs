//! How allowlistctl reaches the admin API: the Unix socket (operators, by
//! the socket's peer credentials), or HTTPS over TCP with a bearer token
//! (`--url`, `--token-file`, `--ca` | `--insecure`).

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use http_body_util::Full;
use hyper::{Uri, body::Bytes, client::conn::http1::SendRequest, http::request};
use hyper_util::rt::TokioIo;
use rustls::{
    ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{CryptoProvider, WebPkiSupportedAlgorithms},
    pki_types::{CertificateDer, ServerName, UnixTime, pem::PemObject},
};
use tokio_rustls::TlsConnector;

use crate::error::CtlError;

/// Connecting (TCP and the TLS handshake) gives up after this long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What the client trusts as the admin listener's certificate.
pub enum Trust {
    /// A PEM file of CA certificates or the server's own (self-signed)
    /// certificate.
    Ca(PathBuf),
    /// Any certificate. For tests and self-signed development setups only:
    /// anyone on the path can read the token.
    Insecure,
}

/// Where requests go.
pub enum Transport {
    /// The admin Unix socket.
    Unix(PathBuf),
    /// The admin API over TLS (`[admin] listen`).
    Tls(Box<TlsTarget>),
}

pub struct TlsTarget {
    /// The URL as given, for messages.
    url: String,
    /// `host:port`, for the Host header.
    authority: String,
    /// The host without IPv6 brackets, for connecting.
    host: String,
    port: u16,
    /// A path the URL carries ("" or like "/admin"), put before `/v1/...`.
    base_path: String,
    server_name: ServerName<'static>,
    connector: TlsConnector,
    /// The bearer token.
    token: String,
}

pub type Sender = SendRequest<Full<Bytes>>;

impl Transport {
    /// The admin API over TLS at `url` (`https://HOST:PORT`), with the token
    /// in `token_file`.
    pub fn tls(url: &str, token_file: &Path, trust: Trust) -> Result<Transport, CtlError> {
        let setup = |m: String| CtlError::Setup(m);
        let uri: Uri = url.parse().map_err(|e| {
            setup(format!(
                "--url {url:?} is not a URL ({e}); write it like https://127.0.0.1:9443"
            ))
        })?;
        if uri.scheme_str() != Some("https") {
            return Err(setup(format!(
                "--url {url:?} must start with https:// (the admin API over TCP is always TLS); \
                 without --url allowlistctl uses the admin socket"
            )));
        }
        let Some(authority) = uri.authority() else {
            return Err(setup(format!(
                "--url {url:?} names no host; write it like https://127.0.0.1:9443"
            )));
        };
        if uri.query().is_some() {
            return Err(setup(format!(
                "--url {url:?} must not carry a query string"
            )));
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = authority.port_u16().unwrap_or(443);
        let server_name = ServerName::try_from(host.clone()).map_err(|e| {
            setup(format!(
                "--url {url:?}: {host:?} is not a host name or address ({e})"
            ))
        })?;
        let token = read_token(token_file)?;
        let config = client_config(trust)?;
        Ok(Transport::Tls(Box::new(TlsTarget {
            url: url.to_string(),
            authority: authority.as_str().to_string(),
            host,
            port,
            base_path: uri.path().trim_end_matches('/').to_string(),
            server_name,
            connector: TlsConnector::from(Arc::new(config)),
            token,
        })))
    }

    /// The request URI for an admin API path (`/v1/...`).
    pub fn uri(&self, path: &str) -> String {
        match self {
            Transport::Unix(_) => path.to_string(),
            Transport::Tls(t) => format!("{}{path}", t.base_path),
        }
    }

    /// Adds what this transport needs to every request: the Host header
    /// and, over TCP, the bearer token.
    pub fn headers(&self, req: request::Builder) -> request::Builder {
        match self {
            Transport::Unix(_) => req.header("host", "allowlistd"),
            Transport::Tls(t) => req
                .header("host", &t.authority)
                .header("authorization", format!("Bearer {}", t.token)),
        }
    }

    /// Opens a connection and runs the HTTP/1.1 handshake on it.
    pub async fn connect(&self) -> Result<Sender, CtlError> {
        let protocol = |e: hyper::Error| CtlError::Protocol(e.to_string());
        match self {
            Transport::Unix(path) => {
                let stream = tokio::net::UnixStream::connect(path)
                    .await
                    .map_err(|source| CtlError::Connect {
                        path: path.clone(),
                        source,
                    })?;
                let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                    .await
                    .map_err(protocol)?;
                tokio::spawn(conn);
                Ok(sender)
            }
            Transport::Tls(t) => {
                let stream = tokio::time::timeout(CONNECT_TIMEOUT, t.open())
                    .await
                    .map_err(|_| CtlError::ConnectTcp {
                        url: t.url.clone(),
                        source: std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            format!("no answer within {}s", CONNECT_TIMEOUT.as_secs()),
                        ),
                    })??;
                let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                    .await
                    .map_err(protocol)?;
                tokio::spawn(conn);
                Ok(sender)
            }
        }
    }
}

impl TlsTarget {
    async fn open(
        &self,
    ) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, CtlError> {
        let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|source| CtlError::ConnectTcp {
                url: self.url.clone(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        self.connector
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|e| {
                let bad_cert = e
                    .get_ref()
                    .and_then(|i| i.downcast_ref::<rustls::Error>())
                    .is_some_and(|r| {
                        matches!(
                            r,
                            rustls::Error::InvalidCertificate(_)
                                | rustls::Error::NoCertificatesPresented
                        )
                    });
                CtlError::Tls {
                    url: self.url.clone(),
                    message: e.to_string(),
                    hint: if bad_cert {
                        "--ca FILE must name the certificate allowlistd's admin listener \
                         serves (admin-cert.pem next to its store when it generated one, \
                         else [admin] cert) or the CA that issued it"
                    } else {
                        "is that address allowlistd's [admin] listen?"
                    },
                }
            })
    }
}

/// Reads the bearer token: the file's text, surrounding whitespace
/// trimmed.
fn read_token(path: &Path) -> Result<String, CtlError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        CtlError::Setup(format!(
            "cannot read the token file {}: {e}",
            path.display()
        ))
    })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(CtlError::Setup(format!(
            "the token file {} is empty; put the token `allowlistctl tokens create` printed in it",
            path.display()
        )));
    }
    if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(CtlError::Setup(format!(
            "the token file {} holds more than one token (or spaces inside one); \
             it must hold exactly the token `allowlistctl tokens create` printed",
            path.display()
        )));
    }
    Ok(token.to_string())
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn client_config(trust: Trust) -> Result<ClientConfig, CtlError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| CtlError::Setup(format!("TLS: {e}")))?;
    let mut config = match trust {
        Trust::Ca(path) => builder
            .with_root_certificates(load_roots(&path)?)
            .with_no_client_auth(),
        Trust::Insecure => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate {
                algorithms: provider.signature_verification_algorithms,
            }))
            .with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// The certificates of a PEM file, as trust anchors.
fn load_roots(path: &Path) -> Result<RootCertStore, CtlError> {
    let bad = |m: String| {
        CtlError::Setup(format!(
            "--ca {}: {m}; it must be a PEM file with the admin listener's certificate \
             (admin-cert.pem next to allowlistd's store) or its CA",
            path.display()
        ))
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(e.to_string()))?;
    if certs.is_empty() {
        return Err(bad("no certificate found".into()));
    }
    let mut roots = RootCertStore::empty();
    for c in certs {
        roots.add(c).map_err(|e| bad(e.to_string()))?;
    }
    Ok(roots)
}

/// `--insecure`: accepts whatever certificate the server shows, for tests
/// and self-signed development setups. The handshake signatures are still
/// checked (the server holds the key of the certificate it showed), but
/// nothing ties that certificate to the server's name, so anyone on the
/// path can impersonate it and read the bearer token. Use `--ca` with the
/// server's certificate instead wherever that matters.
#[derive(Debug)]
struct AcceptAnyCertificate {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
