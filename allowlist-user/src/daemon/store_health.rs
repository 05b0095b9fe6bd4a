//! Whether the store can be reached, and what waits for it. With a shared
//! PostgreSQL an edge outlives its server: it keeps enforcing the last
//! policy it knew, holds refusals it could not record in a bounded queue
//! (usage counters wait in their own in-memory counters), and says so in
//! `allowlistctl stats` and `/metrics`.

use std::sync::{
    Mutex,
    atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering},
};

use crate::{api, store::UnauthorizedRecord};

/// Most refusals held while the store is away; more are counted, not kept.
pub const QUEUE_MAX: usize = 50_000;

#[derive(Default)]
pub struct StoreHealth {
    /// "sqlite" or "postgres".
    pub backend: &'static str,
    down: AtomicBool,
    /// Unix ms the store was first found unreachable (0 = reachable).
    down_since_ms: AtomicI64,
    /// Unix ms of the last resync from the store (shared stores).
    pub last_resync_ms: AtomicI64,
    queue: Mutex<Vec<UnauthorizedRecord>>,
    queued: AtomicUsize,
    /// Refusals not kept because the queue was full.
    pub queue_dropped: AtomicU64,
    /// The drop list's size when last read (shown while the store is away).
    pub drop_entries: AtomicUsize,
    /// Unix ms of the last write tried while the store was away.
    last_try_ms: AtomicI64,
}

/// How often held writes are tried while the store is away.
const RETRY_MS: i64 = 2_000;

impl StoreHealth {
    pub fn new(backend: &'static str) -> StoreHealth {
        StoreHealth {
            backend,
            ..Default::default()
        }
    }

    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::Relaxed)
    }

    /// The store answered.
    pub fn up(&self) {
        if self.down.swap(false, Ordering::Relaxed) {
            tracing::info!(backend = self.backend, "the store is reachable again");
        }
        self.down_since_ms.store(0, Ordering::Relaxed);
    }

    /// The store could not be reached at `now_ms`.
    pub fn lost(&self, now_ms: i64) {
        if !self.down.swap(true, Ordering::Relaxed) {
            self.down_since_ms.store(now_ms, Ordering::Relaxed);
            tracing::warn!(
                backend = self.backend,
                "the store cannot be reached: enforcing the last policy known, admin changes are refused"
            );
        }
    }

    /// Refusals to write: the ones held back first, then `batch`.
    pub fn take_queued(&self, batch: Vec<UnauthorizedRecord>) -> Vec<UnauthorizedRecord> {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        if q.is_empty() {
            return batch;
        }
        let mut all = std::mem::take(&mut *q);
        self.queued.store(0, Ordering::Relaxed);
        all.extend(batch);
        all
    }

    /// Holds refusals the store did not take, up to [`QUEUE_MAX`].
    pub fn requeue(&self, batch: Vec<UnauthorizedRecord>) {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        let room = QUEUE_MAX.saturating_sub(q.len());
        let dropped = batch.len().saturating_sub(room);
        q.extend(batch.into_iter().take(room));
        self.queued.store(q.len(), Ordering::Relaxed);
        if dropped > 0 {
            self.queue_dropped
                .fetch_add(dropped as u64, Ordering::Relaxed);
        }
    }

    /// Whether a held write should be tried at `now_ms`: at once while the
    /// store answers, every [`RETRY_MS`] while it is away.
    pub fn retry_due(&self, now_ms: i64) -> bool {
        let last = self.last_try_ms.load(Ordering::Relaxed);
        if self.is_down() && now_ms.saturating_sub(last) < RETRY_MS {
            return false;
        }
        self.last_try_ms.store(now_ms, Ordering::Relaxed);
        true
    }

    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    pub fn status(&self) -> api::StoreStatus {
        let since = self.down_since_ms.load(Ordering::Relaxed);
        let resync = self.last_resync_ms.load(Ordering::Relaxed);
        api::StoreStatus {
            backend: self.backend.to_string(),
            reachable: !self.is_down(),
            down_since_ms: (since != 0).then_some(since),
            queued_refusals: self.queued(),
            queue_dropped: self.queue_dropped.load(Ordering::Relaxed),
            last_resync_ms: (resync != 0).then_some(resync),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_queue_is_bounded_and_counts_what_it_drops() {
        let h = StoreHealth::new("postgres");
        let r =
            UnauthorizedRecord::refused("a", "192.0.2.1".parse().unwrap(), "api", "k".into(), 0, 1);
        h.requeue(vec![r.clone(); QUEUE_MAX - 1]);
        h.requeue(vec![r.clone(); 3]);
        assert_eq!(h.queued(), QUEUE_MAX);
        assert_eq!(h.queue_dropped.load(Ordering::Relaxed), 2);
        let all = h.take_queued(vec![r.clone()]);
        assert_eq!(all.len(), QUEUE_MAX + 1);
        assert_eq!(h.queued(), 0);
        assert!(h.take_queued(Vec::new()).is_empty());
        h.lost(5_000);
        assert!(h.is_down());
        assert!(h.retry_due(5_010));
        assert!(!h.retry_due(6_000), "not again before RETRY_MS");
        assert!(h.retry_due(7_020));
        assert_eq!(h.status().down_since_ms, Some(5_000));
        h.up();
        assert!(h.status().reachable);
        assert_eq!(h.status().down_since_ms, None);
    }
}
