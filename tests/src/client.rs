//! A Rust HTTPS client (hyper over tokio-rustls) that runs inside a
//! namespace from a chosen source address: the edge tests' second real
//! client beside curl.

use std::{net::SocketAddr, sync::Arc};

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::{
    DigitallySignedStruct, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    pki_types::{CertificateDer, ServerName, UnixTime},
};

use crate::net::Netns;

/// The edge's certificate is self-signed in tests: accept any.
#[derive(Debug)]
struct AnyCert(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// What the Rust client got: status, negotiated protocol ("h2" or
/// "http/1.1"), a header, and the body.
#[derive(Debug)]
pub struct RustReply {
    pub status: u16,
    pub alpn: String,
    pub ratelimit_remaining: Option<String>,
    pub body: String,
}

/// `GET path` from `src` to `dst` inside `ns`, offering `alpn`, with
/// `api-key: key` when given. Bounded to 10 s.
pub fn get(
    ns: &Netns,
    src: &str,
    dst: SocketAddr,
    path: &str,
    key: Option<&str>,
    alpn: &[&str],
) -> RustReply {
    let src: std::net::IpAddr = src.parse().expect("src");
    let path = path.to_string();
    let key = key.map(str::to_string);
    let alpn: Vec<Vec<u8>> = alpn.iter().map(|a| a.as_bytes().to_vec()).collect();
    ns.run(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            tokio::time::timeout(std::time::Duration::from_secs(10), async move {
                let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
                let mut cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
                    .with_safe_default_protocol_versions()
                    .expect("versions")
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
                    .with_no_client_auth();
                cfg.alpn_protocols = alpn;
                let sock = if dst.is_ipv4() {
                    tokio::net::TcpSocket::new_v4()
                } else {
                    tokio::net::TcpSocket::new_v6()
                }
                .expect("socket");
                sock.bind(SocketAddr::new(src, 0)).expect("bind source");
                let tcp = sock.connect(dst).await.expect("connect");
                let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
                    .connect(ServerName::try_from("localhost").expect("name"), tcp)
                    .await
                    .expect("TLS handshake");
                let alpn = tls
                    .get_ref()
                    .1
                    .alpn_protocol()
                    .map(|p| String::from_utf8_lossy(p).into_owned())
                    .unwrap_or_default();
                let mut req = hyper::Request::builder().uri(format!("https://{dst}{path}"));
                if let Some(k) = &key {
                    req = req.header("api-key", k);
                }
                let req = req.body(Empty::<Bytes>::new()).expect("request");
                let resp = if alpn == "h2" {
                    let (mut send, conn) = hyper::client::conn::http2::handshake(
                        TokioExecutor::new(),
                        TokioIo::new(tls),
                    )
                    .await
                    .expect("h2");
                    tokio::spawn(conn);
                    send.send_request(req).await.expect("send")
                } else {
                    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                        .await
                        .expect("h1");
                    tokio::spawn(conn);
                    send.send_request(req).await.expect("send")
                };
                let status = resp.status().as_u16();
                let ratelimit_remaining = resp
                    .headers()
                    .get("x-ratelimit-remaining")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                let body = resp.into_body().collect().await.expect("body").to_bytes();
                RustReply {
                    status,
                    alpn,
                    ratelimit_remaining,
                    body: String::from_utf8_lossy(&body).into_owned(),
                }
            })
            .await
            .expect("the Rust client timed out")
        })
    })
}
