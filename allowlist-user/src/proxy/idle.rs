//! Connections held for free. A client that completes the TLS handshake
//! and then sends nothing — or keeps a connection open between requests
//! forever — holds one of `max_connections` without presenting a key.
//! hyper's own timers do not cover it: HTTP/1's header timer starts with
//! the first byte of a request, and HTTP/2 keep-alive pings are answered by
//! any live client. So each connection counts its requests in flight (until
//! the response body is finished) and a watchdog closes it once it has had
//! none for the header timeout (before its first request) or the idle
//! timeout (after).

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use hyper::body::{Body, Frame, SizeHint};

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

/// A response body that keeps its request in flight until it is finished
/// (a long download is not an idle connection).
pub struct Tracked<B> {
    pub inner: B,
    pub active: Option<Active>,
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let out = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(out, Poll::Ready(None) | Poll::Ready(Some(Err(_))))
            || self.inner.is_end_stream()
        {
            self.active = None;
        }
        out
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
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
