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
    net::SocketAddr,
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use http_body_util::{Either, Full};
use hyper::{
    HeaderMap, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header::{HeaderName, HeaderValue},
    http::uri::PathAndQuery,
};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use rustls::ServerConfig;
use tokio::{
    io::{Interest, unix::AsyncFd},
    net::TcpStream,
    sync::{Semaphore, mpsc},
};
use tokio_rustls::TlsAcceptor;

mod actions;
mod client_addr;
mod forward;
mod idle;
mod tls;
mod upstream;
mod usage;

pub use client_addr::{
    ForwardedError, forwarded_chain, forwarded_for, parse_hop, parse_proxy_header,
};
pub use tls::{CertStore, ProxyError, certified, load_cert, tls_config};

/// Where a connection's client address comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ClientSource {
    /// The TCP peer, or the client its PROXY header named.
    Peer,
    /// Per request, X-Forwarded-For from a trusted proxy.
    Forwarded,
    /// A PROXY header that named no client: every request is refused.
    Missing,
}

use crate::{
    config::ProxyConfig,
    edge_host::{EdgeHost, SideEffect},
    logs::LogRecord,
    policy::{self, Decision, RateInfo, Reason, normalize, normalize_path},
    telemetry::Outcome,
};
use crate::{kernel::ConnClientKind, live::Activity};
use client_addr::{ProxyHeader, read_proxy_header};
use forward::{API_KEY, Caller, strip_hop_by_hop, upstream_headers};
use idle::Tracked;

/// Limits that keep one client from starving the others.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const PROXY_HEADER_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_HEADER_BYTES: usize = 64 * 1024;
/// HTTP/2 streams a client may reset before they are served, and streams
/// the edge may reset for a client's protocol errors, before the connection
/// is closed.
const MAX_PENDING_RESETS: usize = 20;
const MAX_ERROR_RESETS: usize = 64;
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// A refused request's body is read (and discarded) up to this much before
/// the answer, so every client sees the refusal: HTTP/2 clients that are
/// still sending a body when the stream ends can lose the status (curl
/// 7.88 reports exit 92). Past it the refusal goes out anyway.
const REFUSED_BODY_LIMIT: usize = 1 << 20;
const REFUSED_BODY_TIMEOUT: Duration = Duration::from_secs(2);
/// Side effects a worker holds before it drops more.
const QUEUE: usize = 65_536;
const EFFECT_BATCH_DELAY: Duration = Duration::from_millis(5);
/// How long a worker with more connections than the others leaves a new
/// connection to them before taking it itself.
const BALANCE_DEFER: Duration = Duration::from_millis(1);

static NEXT_CONN: AtomicU64 = AtomicU64::new(0);

pub use crate::live::LiveConn;

/// Counters of the edge.
#[derive(Debug, Default)]
pub struct EdgeStats {
    pub requests: AtomicU64,
    pub allowed: AtomicU64,
    pub refused: AtomicU64,
    pub upstream_errors: AtomicU64,
    /// Side effects dropped because the queue was full.
    pub queue_dropped: AtomicU64,
    /// Connections accepted (the flood detector's rate).
    pub accepted: AtomicU64,
    /// Requests by outcome and status, decision latency: per worker.
    pub counters: crate::telemetry::EdgeCounters,
}

/// One worker's view of the edge: the shared state and its own upstream
/// connection pool.
struct Edge {
    shared: Arc<Shared>,
    pool: Arc<upstream::Pool>,
    /// Side effects not yet handed to the background task.
    pending: std::sync::Mutex<Vec<SideEffect>>,
    /// This worker's index (its slot of the edge counters).
    slot: usize,
}

/// The upstream's streamed body, or one the edge wrote itself; no
/// allocation to box either.
type Inner = Either<upstream::PooledBody, Full<Bytes>>;
/// Either, keeping its request in flight until it is sent.
type Body = Tracked<Inner>;

fn full(bytes: impl Into<Bytes>) -> Inner {
    Either::Right(Full::new(bytes.into()))
}

/// Reads and discards a refused request's body, bounded in size and time.
async fn drain(body: Incoming) {
    use http_body_util::BodyExt;
    use hyper::body::Body as _;
    if body.is_end_stream() {
        return;
    }
    let mut body = body;
    let mut read = 0usize;
    let _ = tokio::time::timeout(REFUSED_BODY_TIMEOUT, async {
        while let Some(Ok(frame)) = body.frame().await {
            read += frame.data_ref().map_or(0, |d| d.len());
            if read > REFUSED_BODY_LIMIT {
                break;
            }
        }
    })
    .await;
}

fn rate_headers(h: &mut HeaderMap, info: &RateInfo) {
    const LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
    const REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
    const RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");
    h.insert(LIMIT, HeaderValue::from(info.limit));
    h.insert(REMAINING, HeaderValue::from(info.remaining));
    h.insert(RESET, HeaderValue::from(info.reset));
    if let Some(after) = info.retry_after {
        h.insert(hyper::header::RETRY_AFTER, HeaderValue::from(after));
    }
}

fn error_response(reason: Reason) -> Response<Inner> {
    json_error(
        StatusCode::from_u16(reason.status()).unwrap_or(StatusCode::FORBIDDEN),
        reason.code(),
        reason.message(),
    )
}

/// The one JSON error shape of SPEC.md.
fn json_error(status: StatusCode, code: &str, message: &str) -> Response<Inner> {
    let body = serde_json::json!({ "error": { "code": code, "message": message } });
    let mut resp = Response::new(full(body.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// The key from `api-key`, else `Authorization: Bearer`; and whether it
/// came from Authorization (which is then stripped too).
pub fn credential(h: &HeaderMap) -> Option<(&str, bool)> {
    if let Some(v) = h.get(&API_KEY).and_then(|v| v.to_str().ok()) {
        return Some((v.trim(), false));
    }
    let auth = h.get(hyper::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = auth.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| (token.trim(), true))
}

impl Edge {
    /// Queues a side effect in this worker. The first one of a batch
    /// schedules its hand-over a few milliseconds later, so the background
    /// task (on another thread) is woken once per batch, not per request or
    /// per new connection.
    fn effect(self: &Arc<Self>, e: SideEffect) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        if pending.len() >= QUEUE {
            self.shared
                .stats
                .queue_dropped
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
        pending.push(e);
        if pending.len() == 1 {
            let edge = self.clone();
            tokio::spawn(async move {
                tokio::time::sleep(EFFECT_BATCH_DELAY).await;
                edge.flush_effects();
            });
        }
    }

    fn flush_effects(&self) {
        let batch = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()));
        let n = batch.len() as u64;
        if n > 0 && self.shared.effects.try_send(batch).is_err() {
            self.shared
                .stats
                .queue_dropped
                .fetch_add(n, Ordering::Relaxed);
        }
    }

    async fn handle(
        self: &Arc<Self>,
        req: Request<Incoming>,
        conn: &LiveConn,
        source: ClientSource,
    ) -> Result<Response<Body>, Infallible> {
        let active = conn.activity.start();
        let started = std::time::Instant::now();
        let logs = self.shared.host.logs();
        // What the log needs of the request, before it is consumed.
        let (at_ms, method, bytes_in) = match logs {
            Some(_) => (
                self.shared.host.now_ms(),
                req.method().as_str().to_string(),
                req.headers()
                    .get(hyper::header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok()?.parse().ok())
                    .unwrap_or(0),
            ),
            None => (0, String::new(), 0),
        };
        let mut note = Note::default();
        let resp = self.respond(req, conn, source, &mut note).await;
        let status = resp.status().as_u16();
        let counters = &self.shared.stats.counters;
        counters.worker(self.slot).request(note.outcome, status);
        if counters.per_account.load(Ordering::Relaxed) {
            counters
                .worker(self.slot)
                .account_request(&note.account, status);
        }
        let done = logs.map(|sink| usage::Done {
            record: LogRecord {
                at_ms,
                account: note.account,
                key_id: note.key_id,
                client: Some(note.client.unwrap_or(conn.client)),
                method,
                path: note.path,
                status,
                reason: note.outcome.as_str(),
                rule: note.rule,
                note: "",
                latency_us: 0,
                bytes_in,
                bytes_out: 0,
            },
            started,
            sink,
        });
        Ok(resp.map(|inner| Tracked {
            inner,
            active: Some(active),
            done,
            sent: 0,
        }))
    }

    /// A refusal, once the request's body has been read (bounded).
    async fn refuse(&self, req: Request<Incoming>, resp: Response<Inner>) -> Response<Inner> {
        self.shared.stats.refused.fetch_add(1, Ordering::Relaxed);
        drain(req.into_body()).await;
        resp
    }

    /// Answers one request; `note` says how it ended (for the counters and
    /// the usage log).
    async fn respond(
        self: &Arc<Self>,
        mut req: Request<Incoming>,
        conn: &LiveConn,
        source: ClientSource,
        note: &mut Note,
    ) -> Response<Inner> {
        self.shared.stats.requests.fetch_add(1, Ordering::Relaxed);
        note.path = bounded(req.uri().path());
        let via_xff = source == ClientSource::Forwarded;
        let (client, chain) = match source {
            ClientSource::Peer => (conn.client, None),
            ClientSource::Forwarded => {
                let forwarded = {
                    let snap = self.shared.host.snapshot();
                    // A reload that stopped trusting this peer makes it a
                    // plain client from its next request on: its header is
                    // no longer believed.
                    if snap.trusted.longest_match(conn.client).is_none() {
                        Ok((conn.client, None))
                    } else {
                        forwarded_chain(req.headers(), &snap.trusted).map(|(a, c)| (a, Some(c)))
                    }
                };
                match forwarded {
                    Ok(found) => found,
                    Err(e) => {
                        tracing::debug!(peer = %conn.client, error = ?e, "no usable client address");
                        let resp = json_error(StatusCode::BAD_REQUEST, "bad_request", &e.message());
                        return self.refuse(req, resp).await;
                    }
                }
            }
            ClientSource::Missing => {
                let resp = json_error(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    &ForwardedError::ProxyNoClient.message(),
                );
                return self.refuse(req, resp).await;
            }
        };
        // Scope is decided on the path the upstream will act on.
        let normal = match normalize_path(req.uri().path()) {
            Ok(n) => n,
            Err(e) => {
                let resp = json_error(StatusCode::BAD_REQUEST, "bad_request", e.message());
                return self.refuse(req, resp).await;
            }
        };
        let path = normal.as_deref().unwrap_or_else(|| req.uri().path());
        note.client = Some(client);
        note.path = bounded(path);
        if path.starts_with(actions::PREFIX) {
            // The edge's own pages: no key, never forwarded.
            note.outcome = Outcome::Action;
            let path = path.to_string();
            return actions::answer(self.shared.host.actions(), req, &path, client).await;
        }
        let now_ms = self.shared.host.now_ms();
        let (d, bearer): (Decision, bool) = {
            let cred = credential(req.headers());
            let snap = self.shared.host.snapshot();
            let started = std::time::Instant::now();
            let d = snap.decide(
                cred.map(|c| c.0),
                req.method().as_str(),
                path,
                client,
                now_ms,
            );
            self.shared
                .stats
                .counters
                .worker(self.slot)
                .decided_in(started.elapsed().as_nanos() as u64);
            (d, cred.is_some_and(|c| c.1))
        };
        note.outcome = Outcome::Decided(d.reason);
        note.rule = Some(d.rule);
        if let Some(k) = &d.key {
            note.key_id = k.id.clone();
        }
        if let Some(a) = d.account_name() {
            note.account = a.to_string();
        }
        let key_id = || d.key.as_ref().map(|k| k.id.clone()).unwrap_or_default();
        // Rate headers on every keyed response when the key has a limit —
        // but never on a 401, which must not say whether the key exists.
        let rate = if d.reason.status() == 401 {
            None
        } else {
            d.rate.or_else(|| {
                let k = d.key.as_ref()?;
                k.rate.map(|limit| k.runtime.limiter.peek(&limit, now_ms))
            })
        };
        if let (Some(k), Some(info)) = (&d.key, &rate) {
            // 80 %: a fifth or less of the budget left.
            let level = if d.reason == Reason::RateLimited {
                Some(1)
            } else if u64::from(info.remaining) * 5 <= u64::from(info.limit) {
                Some(0)
            } else {
                None
            };
            if let Some(level) = level
                && k.runtime.tell_rate(level, now_ms)
            {
                self.effect(SideEffect::RateLimit {
                    account: d.account_name().unwrap_or_default().to_string(),
                    key_id: k.id.clone(),
                    percent: if level == 1 { 100 } else { 80 },
                });
            }
        }
        if !d.allowed() {
            tracing::debug!(%client, key = %key_id(), reason = ?d.reason, rule = %d.rule, "refused");
            if matches!(
                d.reason,
                Reason::KeyAllowlist | Reason::AccountList | Reason::Denied
            ) {
                self.effect(SideEffect::Refused {
                    account: d.account_name().unwrap_or_default().to_string(),
                    addr: policy::source_unit(client),
                    key_id: key_id(),
                    at: now_ms / 1000,
                });
            }
            let mut resp = error_response(d.reason);
            if let Some(info) = &rate {
                rate_headers(resp.headers_mut(), info);
            }
            return self.refuse(req, resp).await;
        }
        self.shared.stats.allowed.fetch_add(1, Ordering::Relaxed);
        if via_xff {
            *conn.forwarded.lock().unwrap_or_else(|p| p.into_inner()) = Some(client);
        }
        let mut new_key = false;
        if let Some(k) = &d.key
            && conn.set_key(&k.id, k.kid)
        {
            new_key = true;
            if let Some(cookie) = conn.cookie {
                // From now on the kernel checks every packet of this
                // connection against this key's policy.
                self.shared.host.pair(cookie, k.kid, conn.binding);
            }
        }
        if let Some(net) = d.learn {
            self.effect(SideEffect::Learn {
                account: d.account_name().unwrap_or_default().to_string(),
                net,
                key_id: key_id(),
            });
        }
        if new_key || via_xff || now_ms - conn.reported_ms.load(Ordering::Relaxed) >= 60_000 {
            conn.reported_ms.store(now_ms, Ordering::Relaxed);
            self.effect(SideEffect::Success {
                addr: client,
                key_id: key_id(),
                at_ms: now_ms,
            });
        }

        // Forward: same method, the normalized path with the query as it
        // came, headers and body; what only the edge may say set by it.
        let up = &self.shared.upstream;
        let pq = match normal {
            None => up.path_and_query(req.uri().path_and_query()),
            Some(p) => {
                let joined = match req.uri().query() {
                    Some(q) => format!("{p}?{q}"),
                    None => p,
                };
                joined
                    .parse::<PathAndQuery>()
                    .ok()
                    .and_then(|pq| up.path_and_query(Some(&pq)))
            }
        };
        let Some(pq) = pq else {
            note.outcome = Outcome::BadRequest;
            return json_error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "The request path cannot be forwarded to the upstream",
            );
        };
        // HTTP/2 clients name the host in :authority, not in a header.
        let authority = req
            .uri()
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok());
        *req.uri_mut() = hyper::Uri::from(pq);
        *req.version_mut() = hyper::Version::HTTP_11;
        let key_id = key_id();
        let h = req.headers_mut();
        upstream_headers(
            h,
            &Caller {
                client,
                chain: chain.as_deref(),
                key_id: &key_id,
                account: d.account_name().unwrap_or_default(),
            },
            bearer,
        );
        if !self.shared.preserve_host {
            h.insert(hyper::header::HOST, up.host.clone());
        } else if !h.contains_key(hyper::header::HOST) {
            h.insert(
                hyper::header::HOST,
                authority.unwrap_or_else(|| up.host.clone()),
            );
        }
        match self.pool.send(req).await {
            Ok(resp) => {
                let (mut parts, body) = resp.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                if let Some(info) = &rate {
                    rate_headers(&mut parts.headers, info);
                }
                Response::from_parts(parts, Either::Left(body))
            }
            Err(e) => {
                note.outcome = Outcome::UpstreamError;
                self.shared
                    .stats
                    .upstream_errors
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "upstream request failed");
                json_error(
                    StatusCode::BAD_GATEWAY,
                    "bad_gateway",
                    "The upstream API did not answer",
                )
            }
        }
    }
}

/// How one request ended, filled in as `respond` learns it.
struct Note {
    outcome: Outcome,
    account: String,
    key_id: String,
    /// The client the checks judged (a forwarded one behind a balancer).
    client: Option<std::net::IpAddr>,
    path: String,
    rule: Option<policy::Rule>,
}

impl Default for Note {
    fn default() -> Self {
        Note {
            // Until a decision is made, an answer is a refusal of the
            // request itself; a request no key ties to an account is the
            // installation's (`default`'s).
            outcome: Outcome::BadRequest,
            account: policy::DEFAULT_ACCOUNT.to_string(),
            key_id: String::new(),
            client: None,
            path: String::new(),
            rule: None,
        }
    }
}

/// A path as the log keeps it: at most 2 KiB (a client chooses its length).
fn bounded(path: &str) -> String {
    let mut end = path.len().min(2048);
    while !path.is_char_boundary(end) {
        end -= 1;
    }
    path[..end].to_string()
}

/// Binds the edge listener. It is returned unregistered: each edge worker
/// registers its own duplicate with its own runtime.
pub fn bind(addr: SocketAddr) -> Result<std::net::TcpListener, ProxyError> {
    let listen = || {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        // A deeper accept queue than the usual 128 rides out bursts of new
        // connections (the kernel caps it at net.core.somaxconn).
        socket.listen(4096)?.into_std()
    };
    listen().map_err(|source| ProxyError::Bind { addr, source })
}

/// Accepts and serves connections until `shutdown` turns true, then drains
/// in-flight requests (bounded).
///
/// The edge runs one single-threaded runtime per CPU, each accepting from
/// its own duplicate of the listening socket, the way nginx runs one worker
/// per CPU: a connection, its requests and its upstream connections then
/// live on one thread, with no work-stealing handoffs or cross-thread
/// wake-ups on the per-request path. Every worker is woken for a new
/// connection; one that holds clearly more connections than another
/// leaves it to the others for a moment (`Shared::busier`), so long-lived
/// keep-alive connections spread evenly instead of by who won the race.
/// (Per-worker SO_REUSEPORT sockets were tried: they spare the wake-up of
/// the worker that loses the accept race, but hashing pins connections to
/// a busy worker while the other idles, and p99 doubled.)
///
/// The edge knows the application only through `host` (the policy
/// snapshot, the clock, kernel pairing, the live-connection table) and
/// hands side effects over `effects`, in batches; when every worker has
/// stopped, that sender is dropped, so the consumer flushes and ends.
pub async fn serve(
    host: Arc<dyn EdgeHost>,
    cfg: ProxyConfig,
    effects: mpsc::Sender<Vec<SideEffect>>,
    listener: std::net::TcpListener,
    tls: Arc<ServerConfig>,
    stats: Arc<EdgeStats>,
    shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let shared = Arc::new(Shared {
        upstream: Upstream::parse(&cfg.upstream),
        acceptor: TlsAcceptor::from(tls),
        slots: Arc::new(Semaphore::new(cfg.max_connections)),
        load: (0..workers).map(|_| AtomicUsize::new(0)).collect(),
        preserve_host: cfg.preserve_host,
        first_request: Duration::from_secs(cfg.header_timeout_secs),
        idle: Duration::from_secs(cfg.idle_timeout_secs),
        host,
        effects,
        stats,
        cfg,
    });
    let mut done = Vec::with_capacity(workers);
    for i in 0..workers {
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        let spawned = listener.try_clone().and_then(|l| {
            let (shared, shutdown) = (shared.clone(), shutdown.clone());
            std::thread::Builder::new()
                .name(format!("edge-{i}"))
                .spawn(move || {
                    match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt.block_on(async move {
                            match crate::sys::async_fd(l, Interest::READABLE) {
                                Ok(l) => worker(shared, i, l, shutdown).await,
                                Err(e) => tracing::error!(error = %e, "edge worker listener"),
                            }
                        }),
                        Err(e) => tracing::error!(error = %e, "edge worker runtime"),
                    }
                    drop(done_tx);
                })
        });
        match spawned {
            Ok(_) => done.push(done_rx),
            Err(e) => tracing::error!(error = %e, worker = i, "starting an edge worker"),
        }
    }
    drop((listener, shared));
    for d in done {
        let _ = d.await;
    }
}

/// Where requests go: the scheme and authority of `[proxy] upstream`
/// (config validation has checked it parses); the request's own path and
/// query are appended.
struct Upstream {
    /// `host:port` to connect to.
    addr: String,
    /// The Host header for requests that arrive without one (HTTP/2).
    host: HeaderValue,
    /// A path the upstream URL itself carries ("/api"), without the
    /// trailing slash; usually empty.
    prefix: String,
}

impl Upstream {
    fn parse(url: &str) -> Upstream {
        let uri: hyper::Uri = url.parse().unwrap_or_default();
        let host = uri.host().unwrap_or("127.0.0.1");
        let port = uri.port_u16().unwrap_or(80);
        let addr = if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        let authority = uri.authority().map_or(addr.as_str(), |a| a.as_str());
        Upstream {
            host: HeaderValue::from_str(authority)
                .unwrap_or_else(|_| HeaderValue::from_static("localhost")),
            addr,
            prefix: uri.path().trim_end_matches('/').to_string(),
        }
    }

    /// The upstream's path and query for a request's.
    fn path_and_query(&self, req: Option<&PathAndQuery>) -> Option<PathAndQuery> {
        if self.prefix.is_empty() {
            return Some(
                req.cloned()
                    .unwrap_or_else(|| PathAndQuery::from_static("/")),
            );
        }
        let pq = req.map_or("/", |p| p.as_str());
        format!("{}{pq}", self.prefix).parse().ok()
    }
}

/// What every edge worker shares.
struct Shared {
    host: Arc<dyn EdgeHost>,
    cfg: ProxyConfig,
    upstream: Upstream,
    acceptor: TlsAcceptor,
    slots: Arc<Semaphore>,
    /// Open connections per worker.
    load: Box<[AtomicUsize]>,
    effects: mpsc::Sender<Vec<SideEffect>>,
    stats: Arc<EdgeStats>,
    /// `[proxy] preserve_host`: pass the client's Host on.
    preserve_host: bool,
    /// Longest wait for a connection's first request, and between requests.
    first_request: Duration,
    idle: Duration,
}

impl Shared {
    fn busier(&self, me: usize) -> bool {
        busier(self.load.iter().map(|l| l.load(Ordering::Relaxed)), me)
    }
}

/// Whether worker `me` holds clearly more connections than some other
/// worker (`load`: each worker's count). The slack grows with the total so
/// that the churn of short connections does not trigger it.
fn busier(load: impl Iterator<Item = usize>, me: usize) -> bool {
    let (mut mine, mut least, mut total) = (0, None::<usize>, 0);
    for (i, l) in load.enumerate() {
        total += l;
        if i == me {
            mine = l;
        } else {
            least = Some(least.map_or(l, |m| m.min(l)));
        }
    }
    least.is_some_and(|least| mine > least + 2 + total / 32)
}

/// A worker's share of a connection, given back when the connection ends.
struct Held {
    shared: Arc<Shared>,
    worker: usize,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.shared.load[self.worker].fetch_sub(1, Ordering::Relaxed);
    }
}

/// One edge worker: its own accept loop, connections and upstream pool.
async fn worker(
    shared: Arc<Shared>,
    me: usize,
    listener: AsyncFd<std::net::TcpListener>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let cfg = &shared.cfg;
    let edge = Arc::new(Edge {
        pool: upstream::Pool::new(shared.upstream.addr.clone()),
        shared: shared.clone(),
        pending: Default::default(),
        slot: me,
    });
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
        .max_concurrent_streams(cfg.max_streams)
        // Rapid reset (CVE-2023-44487): a client that opens and cancels
        // streams faster than they are served gets a GOAWAY.
        .max_pending_accept_reset_streams(Some(MAX_PENDING_RESETS))
        .max_local_error_reset_streams(Some(MAX_ERROR_RESETS))
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    let builder = Arc::new(builder);
    loop {
        let mut ready = tokio::select! {
            r = listener.readable() => match r {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(error = %e, "edge listener");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.wait_for(|s| *s) => break,
        };
        if shared.busier(me) {
            // The other workers were woken for this connection too; if none
            // takes it within BALANCE_DEFER (all busy), this one does.
            tokio::time::sleep(BALANCE_DEFER).await;
        }
        let (stream, peer) = match ready.try_io(|l| crate::sys::accept_nonblocking(l.as_raw_fd())) {
            Ok(Ok(x)) => x,
            // Another worker took it (readiness is now cleared).
            Err(_would_block) => continue,
            Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionAborted => continue,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "accept");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        drop(ready);
        shared.stats.accepted.fetch_add(1, Ordering::Relaxed);
        let Ok(permit) = shared.slots.clone().try_acquire_owned() else {
            // Over the connection limit: refuse at once rather than queue.
            drop(stream);
            continue;
        };
        let mut stream = match TcpStream::from_std(stream) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "registering a connection");
                continue;
            }
        };
        shared.load[me].fetch_add(1, Ordering::Relaxed);
        let held = Held {
            shared: shared.clone(),
            worker: me,
        };
        let _ = stream.set_nodelay(true);
        let edge = edge.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let _permit = (permit, held);
            let shared = &edge.shared;
            let peer_ip = normalize(peer.ip());
            let mut client_ip = peer_ip;
            // `[proxy] trusted_proxies` as of now: a reload swaps it.
            let trusted = shared
                .host
                .snapshot()
                .trusted
                .longest_match(peer_ip)
                .is_some();
            // From a trusted proxy the client is named by its PROXY header,
            // or else per request by X-Forwarded-For; never the proxy itself.
            let mut source = ClientSource::Peer;
            if trusted {
                match tokio::time::timeout(PROXY_HEADER_TIMEOUT, read_proxy_header(&mut stream))
                    .await
                {
                    Ok(Ok(ProxyHeader::Client(a))) => client_ip = normalize(a),
                    Ok(Ok(ProxyHeader::Absent)) => source = ClientSource::Forwarded,
                    Ok(Ok(ProxyHeader::NoClient)) => source = ClientSource::Missing,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "bad PROXY header");
                        return;
                    }
                    Err(_) => return,
                }
            }
            let fd = stream.as_raw_fd();
            let cookie = crate::sys::socket_cookie(fd).ok();
            let tls =
                match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, shared.acceptor.accept(stream))
                    .await
                {
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
                activity: Activity::new(),
                forwarded: Default::default(),
                binding: if source == ClientSource::Forwarded {
                    ConnClientKind::Forwarded
                } else if client_ip != peer_ip {
                    ConnClientKind::Proxy(client_ip)
                } else {
                    ConnClientKind::Peer
                },
            });
            let id = NEXT_CONN.fetch_add(1, Ordering::Relaxed);
            shared.host.register(id, live.clone());
            let conn_edge = edge.clone();
            let conn_live = live.clone();
            let service = hyper::service::service_fn(move |req| {
                let edge = conn_edge.clone();
                let live = conn_live.clone();
                // Boxed: the request's future is large, and hyper moves it
                // into place per request; a pointer is cheaper to move.
                Box::pin(async move { edge.handle(req, &live, source).await })
            });
            let conn = builder
                .serve_connection(TokioIo::new(tls), service)
                .into_owned();
            let mut conn = Box::pin(watcher.watch(conn));
            let cut = tokio::select! {
                _ = &mut conn => false,
                _ = live.kill.notified() => true,
                // No request for too long: closed, a plain close (nothing is
                // in flight to lose).
                _ = live.activity.idle(shared.first_request, shared.idle) => false,
            };
            if cut {
                // `conn` still owns the socket: make its close an RST.
                crate::sys::abortive_close(live.fd);
            }
            drop(conn);
            // The kernel forgets the socket's CONNS entry itself when it
            // closes (conn_ops), which spares a syscall per connection here.
            shared.host.unregister(id);
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => tracing::debug!("edge worker drained"),
        _ = tokio::time::sleep(DRAIN_TIMEOUT) => tracing::warn!("edge drain timed out; closing remaining connections"),
    }
    edge.flush_effects();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_address_host_and_path_prefix() {
        let u = Upstream::parse("http://127.0.0.1:8080");
        assert_eq!((u.addr.as_str(), u.prefix.as_str()), ("127.0.0.1:8080", ""));
        assert_eq!(u.host, "127.0.0.1:8080");
        let pq: PathAndQuery = "/v1/x?y=1".parse().unwrap();
        assert_eq!(u.path_and_query(Some(&pq)).unwrap(), "/v1/x?y=1");
        assert_eq!(u.path_and_query(None).unwrap(), "/");

        let u = Upstream::parse("http://[::1]:9000/api/");
        assert_eq!((u.addr.as_str(), u.prefix.as_str()), ("[::1]:9000", "/api"));
        assert_eq!(u.path_and_query(Some(&pq)).unwrap(), "/api/v1/x?y=1");

        let u = Upstream::parse("http://backend.internal");
        assert_eq!(u.addr, "backend.internal:80");
        assert_eq!(u.host, "backend.internal");
    }

    #[test]
    fn a_worker_with_clearly_more_connections_defers() {
        assert!(!busier([5].into_iter(), 0), "a lone worker always accepts");
        assert!(!busier([0, 0].into_iter(), 0));
        assert!(
            !busier([3, 1].into_iter(), 0),
            "small differences are churn"
        );
        assert!(busier([4, 1].into_iter(), 0));
        assert!(!busier([4, 1].into_iter(), 1));
        // 64 keep-alive connections end up at most 34 / 30.
        assert!(!busier([34, 30].into_iter(), 0));
        assert!(busier([35, 30].into_iter(), 0));
        assert!(
            busier([9, 20, 3].into_iter(), 0),
            "compared with the least loaded"
        );
    }
}
