//! Live edge connections: what the cut-off needs to find and close one
//! (its client, key and socket), and when it last had a request (for
//! closing idle ones). Shared by the proxy, which fills it, and the daemon,
//! which rechecks it after every change; neither imports the other for it.

use std::{
    sync::{
        Arc,
        atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use std::net::IpAddr;

/// A live connection that may carry a key: what the cut-off needs.
#[derive(Debug)]
pub struct LiveConn {
    /// The client address the checks used.
    pub client: IpAddr,
    /// The socket's fd, used only by the connection's own task while that
    /// task still owns the socket (so it can never name a reused fd).
    pub(crate) fd: std::os::fd::RawFd,
    pub(crate) cookie: Option<u64>,
    /// (public id, kernel id) of the key last allowed on this connection.
    pub(crate) key: std::sync::Mutex<Option<(String, u32)>>,
    /// When this connection last reported a success (Unix ms): once a
    /// minute per connection is plenty for the activation-impact check, and
    /// keeps the channel off the per-request path.
    pub(crate) reported_ms: AtomicI64,
    pub(crate) kill: tokio::sync::Notify,
    /// Behind an L7 balancer (X-Forwarded-For), the client of the latest
    /// allowed request; the recheck after a change uses it.
    pub(crate) forwarded: std::sync::Mutex<Option<IpAddr>>,
    /// Who the kernel checks this connection's packets against once paired.
    pub(crate) binding: crate::kernel::ConnClientKind,
    /// Requests in flight, for closing idle connections.
    pub(crate) activity: Arc<Activity>,
}

impl LiveConn {
    /// The client a recheck judges: the latest forwarded client, else the
    /// connection's own.
    pub fn checked_client(&self) -> IpAddr {
        self.forwarded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .unwrap_or(self.client)
    }

    pub fn key_id(&self) -> Option<String> {
        self.key
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|k| k.0.clone())
    }

    /// Has the connection's task close it with an RST. (The kernel hooks
    /// already drop its packets; this frees the socket and tells the
    /// client.)
    pub fn cut(&self) {
        self.kill.notify_one();
    }

    /// Records the key allowed on this connection; true when it changed.
    pub(crate) fn set_key(&self, id: &str, kid: u32) -> bool {
        let mut k = self.key.lock().unwrap_or_else(|p| p.into_inner());
        if k.as_ref().is_some_and(|(_, old)| *old == kid) {
            return false;
        }
        *k = Some((id.to_string(), kid));
        true
    }
}

/// Requests in flight on one connection, and when it last had one.
#[derive(Debug)]
pub struct Activity {
    epoch: Instant,
    in_flight: AtomicU32,
    /// Milliseconds since `epoch` of the last request start or end;
    /// `u64::MAX` before the first request.
    last_ms: AtomicU64,
}

impl Activity {
    pub fn new() -> Arc<Activity> {
        Arc::new(Activity {
            epoch: Instant::now(),
            in_flight: AtomicU32::new(0),
            last_ms: AtomicU64::new(u64::MAX),
        })
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Marks a request as started; it stays in flight until the guard (or
    /// the response body holding it) is dropped.
    pub fn start(self: &Arc<Self>) -> Active {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.last_ms.store(self.now_ms(), Ordering::Relaxed);
        Active(self.clone())
    }

    /// How long until the connection counts as idle (zero: it is idle now),
    /// or `None` while a request is in flight.
    fn idle_in(&self, first: Duration, between: Duration) -> Option<Duration> {
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return None;
        }
        let (since, limit) = match self.last_ms.load(Ordering::Relaxed) {
            u64::MAX => (0, first),
            last => (last, between),
        };
        let idle = Duration::from_millis(self.now_ms().saturating_sub(since));
        Some(limit.saturating_sub(idle))
    }

    /// Resolves once the connection has been idle for its limit: `first`
    /// before any request, `between` after one.
    pub async fn idle(&self, first: Duration, between: Duration) {
        loop {
            match self.idle_in(first, between) {
                Some(d) if d.is_zero() => return,
                Some(d) => tokio::time::sleep(d).await,
                // A request in flight: look again later. Its end moves the
                // deadline anyway.
                None => tokio::time::sleep(between.min(first)).await,
            }
        }
    }
}

/// One request in flight.
#[derive(Debug)]
pub struct Active(Arc<Activity>);

impl Drop for Active {
    fn drop(&mut self) {
        self.0.last_ms.store(self.0.now_ms(), Ordering::Relaxed);
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_only_without_requests_in_flight() {
        let a = Activity::new();
        let (first, between) = (Duration::from_secs(10), Duration::from_secs(60));
        assert!(a.idle_in(first, between).unwrap() <= first);
        let g = a.start();
        assert_eq!(a.idle_in(first, between), None);
        drop(g);
        let left = a.idle_in(first, between).unwrap();
        assert!(left > first && left <= between, "{left:?}");
        assert_eq!(
            a.idle_in(Duration::ZERO, Duration::ZERO),
            Some(Duration::ZERO)
        );
    }
}
