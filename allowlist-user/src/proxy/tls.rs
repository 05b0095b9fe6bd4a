//! The edge's TLS: the certificate (configured PEM files or a generated
//! self-signed pair, swapped on SIGHUP), the server's suite preference and
//! the rustls server configuration. The admin listener serves its own
//! certificate through a [`CertStore`] too.

use std::{io, net::SocketAddr, path::Path, sync::Arc};

use arc_swap::ArcSwap;
use rustls::{
    ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("TLS certificate {path}: {message}")]
    Cert { path: String, message: String },
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error("generating a self-signed certificate: {0}")]
    SelfSigned(#[from] rcgen::Error),
    #[error("proxy listener {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// Serves the current certificate; SIGHUP swaps in a re-read one.
#[derive(Debug)]
pub struct CertStore {
    current: ArcSwap<CertifiedKey>,
    /// SHA-256 of the leaf certificate, hex.
    pub fingerprint: ArcSwap<String>,
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// A certificate chain and its key, ready to serve, with the leaf's
/// SHA-256 fingerprint (hex).
pub fn certified(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<(CertifiedKey, String), ProxyError> {
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    let signing = provider.key_provider.load_private_key(key)?;
    use sha2::Digest;
    let fp = chain
        .first()
        .map(|c| sha2::Sha256::digest(c.as_ref()))
        .unwrap_or_default();
    let hex = fp
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":");
    Ok((CertifiedKey::new(chain, signing), hex))
}

/// Loads `cert`/`key` (PEM), or makes a self-signed pair for `localhost`
/// and the listen address.
pub fn load_cert(
    cert: Option<&Path>,
    key: Option<&Path>,
    listen: SocketAddr,
) -> Result<(CertifiedKey, String), ProxyError> {
    match (cert, key) {
        (Some(cert), Some(key)) => {
            let err = |path: &Path, e: &dyn std::fmt::Display| ProxyError::Cert {
                path: path.display().to_string(),
                message: format!("{e}; it must be PEM"),
            };
            let chain = CertificateDer::pem_file_iter(cert)
                .map_err(|e| err(cert, &e))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| err(cert, &e))?;
            if chain.is_empty() {
                return Err(err(cert, &"no certificate found"));
            }
            let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| err(key, &e))?;
            certified(chain, key_der)
        }
        _ => {
            let mut names = vec!["localhost".to_string()];
            if !listen.ip().is_unspecified() {
                names.push(listen.ip().to_string());
            }
            let ck = rcgen::generate_simple_self_signed(names)?;
            let chain = vec![ck.cert.der().clone()];
            let key_der = PrivateKeyDer::try_from(ck.signing_key.serialize_der()).map_err(|e| {
                ProxyError::Cert {
                    path: "(generated)".into(),
                    message: e.to_string(),
                }
            })?;
            certified(chain, key_der)
        }
    }
}

impl CertStore {
    pub fn new(ck: CertifiedKey, fingerprint: String) -> Arc<CertStore> {
        Arc::new(CertStore {
            current: ArcSwap::from_pointee(ck),
            fingerprint: ArcSwap::from_pointee(fingerprint),
        })
    }

    pub fn replace(&self, ck: CertifiedKey, fingerprint: String) {
        self.current.store(Arc::new(ck));
        self.fingerprint.store(Arc::new(fingerprint));
    }
}

/// The server's cipher-suite preference, which it applies over the
/// client's: AES-128-GCM with SHA-256 first. OpenSSL clients list AES-256
/// with SHA-384 first, which costs more per record and, in the TLS 1.3 key
/// schedule, per handshake (SHA-256 runs on the SHA extensions of nearly
/// every server CPU; SHA-512 often has no hardware help). Every suite
/// offered is an AEAD with forward secrecy.
fn cipher_suites() -> Vec<rustls::SupportedCipherSuite> {
    use rustls::crypto::aws_lc_rs::cipher_suite::*;
    vec![
        TLS13_AES_128_GCM_SHA256,
        TLS13_CHACHA20_POLY1305_SHA256,
        TLS13_AES_256_GCM_SHA384,
        TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
        TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
    ]
}

pub fn tls_config(certs: Arc<CertStore>) -> Result<Arc<ServerConfig>, ProxyError> {
    let provider = rustls::crypto::CryptoProvider {
        cipher_suites: cipher_suites(),
        ..rustls::crypto::aws_lc_rs::default_provider()
    };
    let mut cfg = ServerConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(certs);
    cfg.ignore_client_order = true;
    // Stateless resumption tickets (AES-256 + HMAC, keys rotated every 6 h),
    // as nginx issues by default: the default stateful cache is one map
    // behind a mutex that every worker writes twice per handshake.
    cfg.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new()?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}
