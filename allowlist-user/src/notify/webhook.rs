//! Webhook deliveries: one JSON POST, signed with HMAC-SHA256 of the body
//! in `X-Allowlist-Signature: sha256=<hex>`, over HTTP or HTTPS (the host's
//! trust store).

use std::{sync::Arc, time::Duration};

use hmac::{Hmac, Mac};
use http_body_util::{BodyExt, Full};
use hyper::{Request, Uri, body::Bytes};
use hyper_util::rt::TokioIo;
use sha2::Sha256;

/// The signature header's value for `body`.
pub fn signature(secret: &str, body: &[u8]) -> String {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(body);
    let sum = mac.finalize().into_bytes();
    let hex: String = sum.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256={hex}")
}

/// The TLS client for https webhooks: the host's trust store.
pub fn tls_client() -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    let found = rustls_native_certs::load_native_certs();
    for cert in found.certs {
        let _ = roots.add(cert);
    }
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("the provider supports TLS 1.2 and 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth(),
    )
}

trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// POSTs `body` to `url`; Ok on a 2xx answer within 15 s.
pub async fn post(
    url: &str,
    secret: &str,
    body: Bytes,
    event: &str,
    delivery: &str,
    tls: &Arc<rustls::ClientConfig>,
) -> Result<(), String> {
    let attempt = async {
        let uri: Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
        let https = uri.scheme_str() == Some("https");
        let host = uri
            .host()
            .ok_or_else(|| format!("{url}: no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| format!("{url}: connecting: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let io: Box<dyn Io> = if https {
            let name = rustls::pki_types::ServerName::try_from(host.clone())
                .map_err(|e| format!("{url}: {e}"))?;
            let stream = tokio_rustls::TlsConnector::from(tls.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| format!("{url}: TLS: {e}"))?;
            Box::new(stream)
        } else {
            Box::new(tcp)
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        let conn = tokio::spawn(conn);
        let authority = uri
            .authority()
            .map(|a| a.as_str().to_string())
            .unwrap_or(host);
        let path = uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/")
            .to_string();
        let req = Request::post(path)
            .header("host", authority)
            .header("content-type", "application/json")
            .header(
                "user-agent",
                concat!("allowlist/", env!("CARGO_PKG_VERSION")),
            )
            .header("x-allowlist-event", event)
            .header("x-allowlist-delivery", delivery)
            .header("x-allowlist-signature", signature(secret, &body))
            .body(Full::new(body))
            .map_err(|e| format!("{url}: {e}"))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        let status = resp.status();
        // Read (a bounded amount of) the answer so the connection ends cleanly.
        let _ = http_body_util::Limited::new(resp.into_body(), 64 * 1024)
            .collect()
            .await;
        conn.abort();
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("{url}: answered {status}"))
        }
    };
    tokio::time::timeout(Duration::from_secs(15), attempt)
        .await
        .map_err(|_| format!("{url}: no answer within 15 s"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_rfc_4231_hmac_sha256() {
        // RFC 4231, test case 2.
        assert_eq!(
            signature("Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
