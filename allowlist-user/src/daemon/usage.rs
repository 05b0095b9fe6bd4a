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
        self.flush_entry_usage()
    }

    /// Writes the authorized entries' hits counted since the last flush.
    fn flush_entry_usage(&self) -> Result<(), DaemonError> {
        let counters: Vec<(
            (u32, ipnet::IpNet),
            std::sync::Arc<crate::policy::EntryUsage>,
        )> = self
            .entry_usage
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (*k, v.clone()))
            .collect();
        let snap = self.policy.load();
        let mut taken = Vec::new();
        let mut rows = Vec::new();
        for ((idx, net), u) in counters {
            let Some(account) = snap.accounts.get(&idx) else {
                continue;
            };
            let n = u.hits.swap(0, Ordering::Relaxed);
            if n > 0 {
                rows.push((
                    account.name.clone(),
                    net,
                    u.last_ms.load(Ordering::Relaxed),
                    n,
                ));
                taken.push((u, n));
            }
        }
        if let Err(e) = self.store.flush_entry_usage(&rows) {
            for (u, n) in taken {
                u.hits.fetch_add(n, Ordering::Relaxed);
            }
            return Err(e.into());
        }
        Ok(())
    }

    /// An account's entries' hits and last use (Unix seconds): flushed
    /// counts plus those not yet flushed.
    pub(crate) fn entry_hits(
        &self,
        account: &str,
    ) -> Result<std::collections::HashMap<ipnet::IpNet, (u64, Option<i64>)>, DaemonError> {
        let stored = self.store.entry_usage(account)?;
        let snap = self.policy.load();
        let mut out: std::collections::HashMap<ipnet::IpNet, (u64, Option<i64>)> = stored
            .into_iter()
            .map(|(net, (hits, last))| (net, (hits, (last > 0).then_some(last))))
            .collect();
        if let Some(a) = snap.account_named(account) {
            for (net, u) in a.list_entries.iter().zip(&a.usage) {
                let live = u.hits.load(Ordering::Relaxed);
                let last = u.last_ms.load(Ordering::Relaxed);
                let e = out.entry(*net).or_insert((0, None));
                e.0 += live;
                if last > 0 {
                    e.1 = Some(e.1.unwrap_or(0).max(last));
                }
            }
        }
        Ok(out
            .into_iter()
            .map(|(n, (h, l))| (n, (h, l.map(|ms| ms / 1000))))
            .collect())
    }
}
