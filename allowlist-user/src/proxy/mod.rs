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

mod accept;
mod actions;
mod client_addr;
mod forward;
mod idle;
mod request;
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
pub use accept::{bind, serve};
use client_addr::{ProxyHeader, read_proxy_header};
use forward::{API_KEY, Caller, strip_hop_by_hop, upstream_headers};
use idle::Tracked;
pub use request::credential;
use request::{Inner, full};

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
