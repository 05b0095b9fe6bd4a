//! Key usage counters (last used, requests today), flushed in batches.

use std::sync::atomic::Ordering;

use crate::daemon::{Daemon, DaemonError};

impl Daemon {
    /// Writes usage counted in memory (last used, requests today) to the
    /// store: one transaction per flush, never one write per request.
    pub fn flush_usage(&self) -> Result<(), DaemonError> {
        let runtimes = self
            .runtimes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        // (key id, kid, last used, requests) of every key used since the last flush.
        let snap = self.policy.load();
        let used: Vec<(&String, u32, i64, u64)> = runtimes
            .iter()
            .filter_map(|(id, rt)| {
                let kid = snap.key(id)?.kid;
                let n = rt.requests.swap(0, Ordering::Relaxed);
                (n > 0).then(|| (id, kid, rt.last_used_ms.load(Ordering::Relaxed), n))
            })
            .collect();
        let usage: Vec<(u32, i64, u64)> = used
            .iter()
            .map(|&(_, kid, last, n)| (kid, last, n))
            .collect();
        if let Err(e) = self.store.flush_usage(&usage, self.today()) {
            // Put the counts back so the next flush carries them.
            for (id, _, _, n) in used {
                runtimes[id].requests.fetch_add(n, Ordering::Relaxed);
            }
            return Err(e.into());
        }
        Ok(())
    }
}
