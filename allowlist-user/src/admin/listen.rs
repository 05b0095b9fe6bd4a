//! The admin API over TLS on `[admin] listen`, for bearer tokens.
//!
//! With no `[admin] cert`/`key`, a self-signed certificate is generated
//! once and kept next to the store (`admin-cert.pem`, and `admin-key.pem`
//! with mode 0600), so clients can trust exactly it (`allowlistctl --ca`)
//! across restarts. The certificate is served from a [`CertStore`], so a
//! SIGHUP swaps in a renewed one without a restart.

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
    service::TowerToHyperService,
};
use rustls::{
    ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    sign::CertifiedKey,
};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::{config::Config, proxy::CertStore};

/// Where the generated admin certificate is kept: next to the store.
pub fn admin_cert_path(config: &Config) -> Option<PathBuf> {
    beside_store(config, "admin-cert.pem")
}

fn beside_store(config: &Config, name: &str) -> Option<PathBuf> {
    Some(config.state_dir().join(name))
}

type Pair = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

fn load_pem(cert: &std::path::Path, key: &std::path::Path, what: &str) -> anyhow::Result<Pair> {
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| anyhow::anyhow!("{what} cert {}: {e}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("{what} cert {}: {e}", cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| anyhow::anyhow!("{what} key {}: {e}", key.display()))?;
    Ok((chain, key))
}

/// The generated pair, made once: a certificate that changed at every
/// restart would break every client that trusts it.
fn generated(config: &Config, addr: SocketAddr) -> anyhow::Result<Pair> {
    let (cert_path, key_path) = (
        admin_cert_path(config),
        beside_store(config, "admin-key.pem"),
    );
    if let (Some(c), Some(k)) = (&cert_path, &key_path)
        && c.exists()
        && k.exists()
    {
        return load_pem(c, k, "generated admin");
    }
    let mut names = vec!["localhost".to_string()];
    if !addr.ip().is_unspecified() {
        names.push(addr.ip().to_string());
    }
    let ck = rcgen::generate_simple_self_signed(names)?;
    if let (Some(c), Some(k)) = (&cert_path, &key_path) {
        use std::{io::Write, os::unix::fs::OpenOptionsExt};
        let staged = k.with_extension("pem.new");
        let _ = std::fs::remove_file(&staged);
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&staged)
            .and_then(|mut f| {
                f.write_all(ck.signing_key.serialize_pem().as_bytes())?;
                f.sync_all()
            })
            .and_then(|()| std::fs::rename(&staged, k))
            .map_err(|e| anyhow::anyhow!("writing the admin key to {}: {e}", k.display()))?;
        std::fs::write(c, ck.cert.pem()).map_err(|e| {
            anyhow::anyhow!("writing the admin certificate to {}: {e}", c.display())
        })?;
        tracing::info!(path = %c.display(), "generated a self-signed admin certificate");
    }
    let key = PrivateKeyDer::try_from(ck.signing_key.serialize_der())
        .map_err(|e| anyhow::anyhow!("generated admin key: {e}"))?;
    Ok((vec![ck.cert.der().clone()], key))
}

/// The admin listener's certificate (`[admin] cert`/`key`, or the
/// generated pair) and its SHA-256 fingerprint, read now: at start, and
/// again at each SIGHUP.
pub fn load_admin_cert(
    config: &Config,
    addr: SocketAddr,
) -> anyhow::Result<(CertifiedKey, String)> {
    let (chain, key) = match (&config.admin.cert, &config.admin.key) {
        (Some(cert), Some(key)) => load_pem(cert, key, "[admin]")?,
        _ => generated(config, addr)?,
    };
    Ok(crate::proxy::certified(chain, key)?)
}

fn server_config(certs: Arc<CertStore>) -> Arc<ServerConfig> {
    let mut cfg = ServerConfig::builder()
        .with_no_client_auth()
        .with_cert_resolver(certs);
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(cfg)
}

/// Binds `[admin] listen` and serves `app` (the token router, and the
/// console beside it) with the certificate `certs` holds until `stop`
/// fires. Errors at bind time are returned (the daemon refuses to start);
/// each connection's errors are its own.
pub async fn serve_tls(
    app: axum::Router,
    addr: SocketAddr,
    certs: Arc<CertStore>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let tls = TlsAcceptor::from(server_config(certs));
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("[admin] listen {addr}: {e}"))?;
    tracing::info!(%addr, "admin API listening (TLS, bearer tokens)");
    Ok(tokio::spawn(async move {
        loop {
            let (tcp, _) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "admin listener accept");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = stop.changed() => break,
            };
            let tls = tls.clone();
            let app = app.clone();
            tokio::spawn(async move {
                // A handshake that stalls must not hold a task forever.
                let handshake =
                    tokio::time::timeout(std::time::Duration::from_secs(10), tls.accept(tcp)).await;
                let Ok(Ok(stream)) = handshake else {
                    return;
                };
                let service = TowerToHyperService::new(app);
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    }))
}
