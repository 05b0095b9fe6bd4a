//! The API edge: TLS termination, the request checks of SPEC.md, and
//! forwarding to the upstream.
//!
//! Per connection: the client address (the TCP peer, or — from a trusted
//! proxy — PROXY protocol v1/v2 or the rightmost untrusted X-Forwarded-For
//! hop), then TLS (HTTP/1.1 and HTTP/2 by ALPN). Per request: one lock-free
//! load of the policy snapshot and `Snapshot::decide`; a refusal answers in
//! the one JSON error shape, an allowed request is streamed to the upstream
//! through a pooled client with the key header stripped. Side effects
//! (learning, the unauthorized list) go through a bounded queue to a
//! background task, never on the request path.

use std::{
    convert::Infallible,
    io,
    net::{IpAddr, SocketAddr},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicI64, AtomicU64, Ordering},
    },
    time::Duration,
};

use arc_swap::ArcSwap;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::{
    HeaderMap, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header::HeaderValue,
};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use ipnet::IpNet;
use rustls::{
    ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use tokio::{
    io::AsyncReadExt,
    net::{TcpListener, TcpStream},
    sync::{Semaphore, mpsc},
};
use tokio_rustls::TlsAcceptor;

use crate::{
    daemon::Daemon,
    policy::{Decision, PrefixSet, RateInfo, Reason, normalize},
    store::UnauthorizedRecord,
};

/// Limits that keep one client from starving the others.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const PROXY_HEADER_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_HEADER_BYTES: usize = 64 * 1024;
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
const QUEUE: usize = 65_536;

static NEXT_CONN: AtomicU64 = AtomicU64::new(0);

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

fn certified(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<(CertifiedKey, String), ProxyError> {
    let provider = rustls::crypto::ring::default_provider();
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

pub fn tls_config(certs: Arc<CertStore>) -> Result<Arc<ServerConfig>, ProxyError> {
    let mut cfg =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(certs);
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// A live connection that may carry a key: what the cut-off needs.
#[derive(Debug)]
pub struct LiveConn {
    /// The client address the checks used.
    pub client: IpAddr,
    /// A duplicate of the socket's fd: `cut` acts on this very socket even
    /// if the connection task has already let go of its own fd.
    fd: std::os::fd::OwnedFd,
    cookie: Option<u64>,
    /// (public id, kernel id) of the key last allowed on this connection.
    key: std::sync::Mutex<Option<(String, u32)>>,
    /// When this connection last reported a success (Unix ms): once a
    /// minute per connection is plenty for the activation-impact check, and
    /// keeps the channel off the per-request path.
    reported_ms: AtomicI64,
    kill: tokio::sync::Notify,
}

impl LiveConn {
    pub fn key_id(&self) -> Option<String> {
        self.key
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|k| k.0.clone())
    }

    /// Closes the connection with an RST, now.
    pub fn cut(&self) {
        use std::os::fd::AsRawFd;
        crate::kernel::sys::abortive_close(self.fd.as_raw_fd());
        // SAFETY: our own open fd; shutdown wakes every reader and writer
        // of the socket at once.
        unsafe { libc::shutdown(self.fd.as_raw_fd(), libc::SHUT_RDWR) };
        self.kill.notify_one();
    }

    /// Records the key allowed on this connection; true when it changed.
    fn set_key(&self, id: &str, kid: u32) -> bool {
        let mut k = self.key.lock().unwrap_or_else(|p| p.into_inner());
        if k.as_ref().is_some_and(|(_, old)| *old == kid) {
            return false;
        }
        *k = Some((id.to_string(), kid));
        true
    }
}

/// What the request path hands to the background task.
#[derive(Debug)]
enum SideEffect {
    Learn {
        net: IpNet,
        key_id: String,
    },
    Success {
        addr: IpAddr,
        key_id: String,
        at_ms: i64,
    },
    Refused {
        addr: IpAddr,
        key_id: String,
        at: i64,
    },
}

/// Counters of the edge.
#[derive(Debug, Default)]
pub struct EdgeStats {
    pub requests: AtomicU64,
    pub allowed: AtomicU64,
    pub refused: AtomicU64,
    pub upstream_errors: AtomicU64,
    /// Side effects dropped because the queue was full.
    pub queue_dropped: AtomicU64,
}

struct Edge {
    daemon: Arc<Daemon>,
    upstream_base: String,
    client: Client<HttpConnector, Incoming>,
    trusted: PrefixSet,
    effects: mpsc::Sender<SideEffect>,
    stats: Arc<EdgeStats>,
}

type Body = BoxBody<Bytes, hyper::Error>;

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

fn rate_headers(h: &mut HeaderMap, info: &RateInfo) {
    h.insert("x-ratelimit-limit", HeaderValue::from(info.limit));
    h.insert("x-ratelimit-remaining", HeaderValue::from(info.remaining));
    h.insert("x-ratelimit-reset", HeaderValue::from(info.reset));
    if let Some(after) = info.retry_after {
        h.insert(hyper::header::RETRY_AFTER, HeaderValue::from(after));
    }
}

fn error_response(reason: Reason) -> Response<Body> {
    let body =
        serde_json::json!({ "error": { "code": reason.code(), "message": reason.message() } });
    let mut resp = Response::new(full(body.to_string()));
    *resp.status_mut() = StatusCode::from_u16(reason.status()).unwrap_or(StatusCode::FORBIDDEN);
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// The key from `api-key`, else `Authorization: Bearer`; and whether it
/// came from Authorization (which is then stripped too).
fn credential(h: &HeaderMap) -> Option<(String, bool)> {
    if let Some(v) = h.get("api-key").and_then(|v| v.to_str().ok()) {
        return Some((v.trim().to_string(), false));
    }
    let auth = h.get(hyper::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = auth.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| (token.trim().to_string(), true))
}

/// The rightmost X-Forwarded-For hop that is not a trusted proxy.
fn forwarded_for(h: &HeaderMap, trusted: &PrefixSet) -> Option<IpAddr> {
    let mut hops: Vec<IpAddr> = Vec::new();
    for v in h.get_all("x-forwarded-for") {
        for part in v.to_str().ok()?.split(',') {
            hops.push(part.trim().parse().ok()?);
        }
    }
    hops.into_iter()
        .rev()
        .map(normalize)
        .find(|a| trusted.longest_match(*a).is_none())
}

const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "api-key",
];

impl Edge {
    fn effect(&self, e: SideEffect) {
        if self.effects.try_send(e).is_err() {
            self.stats.queue_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    async fn handle(
        &self,
        mut req: Request<Incoming>,
        conn: &LiveConn,
        via_trusted: bool,
    ) -> Result<Response<Body>, Infallible> {
        let peer = conn.client;
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let client = if via_trusted {
            forwarded_for(req.headers(), &self.trusted).unwrap_or(peer)
        } else {
            peer
        };
        let cred = credential(req.headers());
        let now_ms = self.daemon.clock.now_ms();
        let snap = self.daemon.policy.load();
        let path = req.uri().path().to_string();
        let d: Decision = snap.decide(
            cred.as_ref().map(|c| c.0.as_str()),
            req.method().as_str(),
            &path,
            client,
            now_ms,
        );
        let key_id = || d.key.as_ref().map(|k| k.id.clone()).unwrap_or_default();
        // Rate headers on every keyed response when the key has a limit.
        let rate = d.rate.or_else(|| {
            let k = d.key.as_ref()?;
            k.rate.map(|limit| k.runtime.limiter.peek(&limit, now_ms))
        });
        if !d.allowed() {
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%client, key = %key_id(), reason = ?d.reason, rule = %d.rule, "refused");
            if matches!(d.reason, Reason::KeyAllowlist | Reason::AccountList) {
                self.effect(SideEffect::Refused {
                    addr: client,
                    key_id: key_id(),
                    at: now_ms / 1000,
                });
            }
            let mut resp = error_response(d.reason);
            if let Some(info) = &rate {
                rate_headers(resp.headers_mut(), info);
            }
            return Ok(resp);
        }
        self.stats.allowed.fetch_add(1, Ordering::Relaxed);
        let mut new_key = false;
        if let Some(k) = &d.key
            && conn.set_key(&k.id, k.kid)
        {
            new_key = true;
            if let (Some(table), Some(cookie)) = (&self.daemon.conns, conn.cookie) {
                // From now on the kernel checks every packet of this
                // connection against this key's policy.
                table.pair(cookie, k.kid);
            }
        }
        if let Some(net) = d.learn {
            self.effect(SideEffect::Learn {
                net,
                key_id: key_id(),
            });
        }
        if new_key || via_trusted || now_ms - conn.reported_ms.load(Ordering::Relaxed) >= 60_000 {
            conn.reported_ms.store(now_ms, Ordering::Relaxed);
            self.effect(SideEffect::Success {
                addr: client,
                key_id: key_id(),
                at_ms: now_ms,
            });
        }

        // Forward: same method, path, headers and body; the key header (and
        // hop-by-hop headers) stripped.
        let pq = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "/".into());
        let uri: hyper::Uri = match format!("{}{}", self.upstream_base, pq).parse() {
            Ok(u) => u,
            Err(_) => return Ok(error_response(Reason::Ok).map(|_| full("bad request path"))),
        };
        *req.uri_mut() = uri;
        *req.version_mut() = hyper::Version::HTTP_11;
        let h = req.headers_mut();
        for name in HOP_BY_HOP {
            h.remove(name);
        }
        if cred.as_ref().is_some_and(|c| c.1) {
            h.remove(hyper::header::AUTHORIZATION);
        }
        match self.client.request(req).await {
            Ok(resp) => {
                let (mut parts, body) = resp.into_parts();
                for name in HOP_BY_HOP {
                    parts.headers.remove(name);
                }
                if let Some(info) = &rate {
                    rate_headers(&mut parts.headers, info);
                }
                Ok(Response::from_parts(parts, body.boxed()))
            }
            Err(e) => {
                self.stats.upstream_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "upstream request failed");
                let mut resp = Response::new(full(
                    serde_json::json!({ "error": { "code": "bad_gateway", "message": "The upstream API did not answer" } })
                        .to_string(),
                ));
                *resp.status_mut() = StatusCode::BAD_GATEWAY;
                Ok(resp)
            }
        }
    }
}

/// Reads a PROXY protocol v1 or v2 header from a trusted peer, consuming
/// exactly its bytes. `Ok(None)`: no header (the stream starts with TLS).
async fn read_proxy_header(stream: &mut TcpStream) -> io::Result<Option<IpAddr>> {
    const V2_SIG: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
    let mut buf = [0u8; 536];
    let bad = |m: &str| io::Error::new(io::ErrorKind::InvalidData, m.to_string());
    let n = loop {
        let n = stream.peek(&mut buf).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        // A TLS record starts with 0x16: no PROXY header.
        if buf[0] == 0x16 {
            return Ok(None);
        }
        let need = if buf[..n].starts_with(b"PROXY ") {
            buf[..n]
                .windows(2)
                .position(|w| w == b"\r\n")
                .map(|p| p + 2)
        } else if n >= 16 && buf[..12] == *V2_SIG {
            Some(16 + u16::from_be_bytes([buf[14], buf[15]]) as usize)
        } else if n >= 12
            || !(V2_SIG.starts_with(&buf[..n]) || b"PROXY ".starts_with(&buf[..n.min(6)]))
        {
            return Err(bad("neither TLS nor a PROXY protocol header"));
        } else {
            None
        };
        match need {
            Some(need) if need <= n => break need,
            Some(need) if need > buf.len() => return Err(bad("PROXY header too long")),
            _ if n == buf.len() => return Err(bad("PROXY header too long")),
            _ => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    };
    let mut header = vec![0u8; n];
    stream.read_exact(&mut header).await?;
    let addr = if header.starts_with(b"PROXY ") {
        let text = std::str::from_utf8(&header).map_err(|_| bad("PROXY v1 header is not text"))?;
        match ppp::v1::Header::try_from(text)
            .map_err(|e| bad(&format!("PROXY v1: {e}")))?
            .addresses
        {
            ppp::v1::Addresses::Tcp4(a) => Some(IpAddr::V4(a.source_address)),
            ppp::v1::Addresses::Tcp6(a) => Some(IpAddr::V6(a.source_address)),
            ppp::v1::Addresses::Unknown => None,
        }
    } else {
        match ppp::v2::Header::try_from(&header[..])
            .map_err(|e| bad(&format!("PROXY v2: {e}")))?
            .addresses
        {
            ppp::v2::Addresses::IPv4(a) => Some(IpAddr::V4(a.source_address)),
            ppp::v2::Addresses::IPv6(a) => Some(IpAddr::V6(a.source_address)),
            _ => None,
        }
    };
    Ok(addr)
}

/// Applies side effects in batches: learning, recent successes (for the
/// impact of activating blocking) and the unauthorized list.
async fn side_effects(daemon: Arc<Daemon>, mut rx: mpsc::Receiver<SideEffect>) {
    let mut refused: std::collections::HashMap<(IpAddr, String), UnauthorizedRecord> =
        Default::default();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            e = rx.recv() => match e {
                None => break,
                Some(SideEffect::Learn { net, key_id }) => {
                    if let Err(err) = daemon.learn(net, &key_id).await {
                        tracing::warn!(error = %err, %net, "learning an address");
                    }
                }
                Some(SideEffect::Success { addr, key_id, at_ms }) => daemon.record_success(addr, &key_id, at_ms),
                Some(SideEffect::Refused { addr, key_id, at }) => {
                    let r = refused.entry((addr, key_id.clone())).or_insert_with(|| UnauthorizedRecord {
                        addr,
                        service: "api".into(),
                        key_id,
                        port: 0,
                        first_seen: at,
                        last_seen: at,
                        attempts: 0,
                        status: "refused".into(),
                    });
                    r.last_seen = at;
                    r.attempts += 1;
                }
            },
            _ = tick.tick() => {
                if !refused.is_empty() {
                    let batch: Vec<UnauthorizedRecord> = refused.drain().map(|(_, v)| v).collect();
                    for r in &batch {
                        tracing::info!(source = %r.addr, key = %r.key_id, attempts = r.attempts, "refused: IP_NOT_ALLOWED");
                    }
                    if let Err(e) = daemon.store.record_unauthorized(&batch) {
                        tracing::warn!(error = %e, "recording refused sources");
                    }
                }
            }
        }
    }
}

/// Binds the edge listener.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, ProxyError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ProxyError::Bind { addr, source })
}

/// Accepts and serves connections until `shutdown` resolves, then drains
/// in-flight requests (bounded).
pub async fn serve(
    daemon: Arc<Daemon>,
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    stats: Arc<EdgeStats>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let cfg = &daemon.config.proxy;
    let upstream_base = cfg.upstream.trim_end_matches('/').to_string();
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(256)
        .build(connector);
    let (tx, rx) = mpsc::channel(QUEUE);
    tokio::spawn(side_effects(daemon.clone(), rx));
    let edge = Arc::new(Edge {
        trusted: PrefixSet::new(cfg.trusted_proxies.iter().copied()),
        daemon: daemon.clone(),
        upstream_base,
        client,
        effects: tx,
        stats,
    });
    let acceptor = TlsAcceptor::from(tls);
    let slots = Arc::new(Semaphore::new(cfg.max_connections));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(cfg.header_timeout_secs))
        .max_buf_size(MAX_HEADER_BYTES);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEADER_BYTES as u32)
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    let builder = Arc::new(builder);
    tokio::pin!(shutdown);
    loop {
        let (mut stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            // Over the connection limit: refuse at once rather than queue.
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let edge = edge.clone();
        let acceptor = acceptor.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let _permit = permit;
            let peer_ip = normalize(peer.ip());
            let mut client_ip = peer_ip;
            let trusted = edge.trusted.longest_match(peer_ip).is_some();
            if trusted {
                match tokio::time::timeout(PROXY_HEADER_TIMEOUT, read_proxy_header(&mut stream))
                    .await
                {
                    Ok(Ok(Some(a))) => client_ip = normalize(a),
                    Ok(Ok(None)) => {}
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "bad PROXY header");
                        return;
                    }
                    Err(_) => return,
                }
            }
            let Ok(fd) = std::os::fd::AsFd::as_fd(&stream).try_clone_to_owned() else {
                return;
            };
            let cookie =
                crate::kernel::sys::socket_cookie(std::os::fd::AsRawFd::as_raw_fd(&fd)).ok();
            let tls =
                match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => tls,
                    _ => return,
                };
            let live = Arc::new(LiveConn {
                client: client_ip,
                fd,
                cookie,
                key: Default::default(),
                reported_ms: AtomicI64::new(0),
                kill: tokio::sync::Notify::new(),
            });
            let id = NEXT_CONN.fetch_add(1, Ordering::Relaxed);
            edge.daemon
                .live
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id, live.clone());
            // X-Forwarded-For only counts when no PROXY header named the client.
            let use_xff = trusted && client_ip == peer_ip;
            let conn_edge = edge.clone();
            let conn_live = live.clone();
            let service = hyper::service::service_fn(move |req| {
                let edge = conn_edge.clone();
                let live = conn_live.clone();
                async move { edge.handle(req, &live, use_xff).await }
            });
            let conn = builder.serve_connection(TokioIo::new(tls), service);
            tokio::select! {
                _ = watcher.watch(conn.into_owned()) => {}
                _ = live.kill.notified() => {}
            }
            edge.daemon
                .live
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
            if let (Some(table), Some(cookie)) = (&edge.daemon.conns, cookie) {
                table.unpair(cookie);
            }
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => tracing::info!("edge drained"),
        _ = tokio::time::sleep(DRAIN_TIMEOUT) => tracing::warn!("edge drain timed out; closing remaining connections"),
    }
}
