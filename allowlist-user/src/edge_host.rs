//! The edge's contract with the application. The proxy reads the policy,
//! the clock and the live-connection table through [`EdgeHost`] and hands
//! what a request leaves behind (learning, successes, refusals) to the
//! application as [`SideEffect`] batches over a bounded channel; it never
//! sees the daemon itself, and the daemon never reaches into the proxy.

use std::{net::IpAddr, sync::Arc};

use ipnet::IpNet;

use crate::{kernel::ConnClientKind, live::LiveConn, logs::LogSink, policy::Snapshot};

/// What the request path hands to the application, off the request path.
#[derive(Debug)]
pub enum SideEffect {
    /// Learning mode: authorize this network (the caller's /24 or /64).
    Learn {
        account: String,
        net: IpNet,
        key_id: String,
    },
    /// A successful call (for the impact of activating blocking).
    Success {
        addr: IpAddr,
        key_id: String,
        at_ms: i64,
    },
    /// A key reached 80 % or 100 % of its rate limit (at most once a
    /// minute per key and level).
    RateLimit {
        account: String,
        key_id: String,
        percent: u8,
    },
    /// A refusal for the source address (for the unauthorized list).
    Refused {
        account: String,
        addr: IpAddr,
        key_id: String,
        at: i64,
        /// Refused by the key's own allowlist (not the account's list).
        by_key: bool,
    },
}

/// Batches of side effects in flight from the edge's workers to the
/// application; past it a worker counts and drops (never blocks).
const BATCHES: usize = 1024;

/// The bounded channel the edge hands side effects over.
pub fn effects_channel() -> (
    tokio::sync::mpsc::Sender<Vec<SideEffect>>,
    tokio::sync::mpsc::Receiver<Vec<SideEffect>>,
) {
    tokio::sync::mpsc::channel(BATCHES)
}

/// An action link's request, as the edge hands it over.
pub struct ActionRequest {
    pub method: ActionMethod,
    /// The last path segment of `/_allowlist/actions/{token}`.
    pub token: String,
    /// The body of a POST (a small form; bounded by the edge).
    pub form: Vec<u8>,
    /// Who clicked (for the log).
    pub client: IpAddr,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActionMethod {
    Get,
    Post,
    /// HEAD and the rest: 405.
    Other,
}

/// The page the edge sends back.
pub struct ActionReply {
    pub status: u16,
    pub html: String,
}

/// Serves the one-click action links of notifications (`notify`).
pub trait ActionHandler: Send + Sync + 'static {
    fn handle(
        &self,
        req: ActionRequest,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ActionReply> + Send + '_>>;
}

/// What the edge needs of the application.
pub trait EdgeHost: Send + Sync + 'static {
    /// The current policy, loaded without a lock.
    fn snapshot(&self) -> arc_swap::Guard<Arc<Snapshot>>;
    /// Unix milliseconds, on the application's clock.
    fn now_ms(&self) -> i64;
    /// Pairs a socket with the key it presented (and who its client is) so
    /// the kernel checks its packets; nothing without kernel enforcement.
    fn pair(&self, cookie: u64, kid: u32, client: ConnClientKind);
    /// A connection that may carry a key, for the recheck after a change.
    fn register(&self, id: u64, conn: Arc<LiveConn>);
    fn unregister(&self, id: u64);
    /// Where usage-log records go (set once at start; `None` before).
    fn logs(&self) -> Option<&'static LogSink>;
    /// The action links' handler, when notifications are set up.
    fn actions(&self) -> Option<&Arc<dyn ActionHandler>>;
}
