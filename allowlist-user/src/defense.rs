//! The daemon's memory for answering attacks: whether the API guard is
//! armed and why, the guard drops waiting to enter the unauthorized list,
//! and which sources keep failing (promoted to the drop list with an
//! expiry that doubles each time a source comes back).
//!
//! State and bookkeeping only; the daemon acts on what it returns (a change
//! to the kernel, a store write, a drop-list entry).

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use crate::{policy::source_unit, store::UnauthorizedRecord};

/// Sources tracked for promotion at once; past it the oldest windows are
/// forgotten (a sprayer of distinct sources is the unauthorized list's
/// cap's business, not promotion's).
const MAX_TRACKED: usize = 65_536;
/// Longest expiry a doubled promotion reaches.
const MAX_PROMOTION_SECS: u64 = 30 * 86_400;

#[derive(Debug, Default)]
pub struct Defense {
    armed: AtomicBool,
    reason: Mutex<String>,
    /// Guard drops not yet written: (source, service, port) -> record.
    pending: Mutex<HashMap<(IpAddr, String, u16), UnauthorizedRecord>>,
    /// Source -> (start of its window, refusals in it), Unix seconds.
    failing: Mutex<HashMap<IpAddr, (i64, u64)>>,
    /// Source -> (duration of its last promotion in seconds, when that
    /// promotion expires, Unix seconds).
    promoted: Mutex<HashMap<IpAddr, (u64, i64)>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Defense {
    pub fn api_armed(&self) -> bool {
        self.armed.load(Ordering::Relaxed)
    }

    pub fn reason(&self) -> String {
        lock(&self.reason).clone()
    }

    /// Records the guard's new state; true when it changed.
    pub fn set_api_armed(&self, armed: bool, why: String) -> bool {
        *lock(&self.reason) = why;
        self.armed.swap(armed, Ordering::Relaxed) != armed
    }

    /// A source the XDP guard dropped (from a ring-buffer event).
    pub fn guard_drop(&self, account: &str, source: IpAddr, service: &str, port: u16, at: i64) {
        let addr = source_unit(source);
        let mut p = lock(&self.pending);
        if p.len() >= MAX_TRACKED && !p.contains_key(&(addr, service.to_string(), port)) {
            return;
        }
        p.entry((addr, service.to_string(), port))
            .or_insert_with(|| {
                UnauthorizedRecord::refused(account, addr, service, String::new(), port, at)
            })
            .hit(at);
    }

    /// The guard drops to write now.
    pub fn take_guard_drops(&self) -> Vec<UnauthorizedRecord> {
        lock(&self.pending).drain().map(|(_, v)| v).collect()
    }

    /// Counts refusals of each source in `refused` (source, attempts) at
    /// `now`; returns the sources that crossed `after` refusals within
    /// `window` seconds, each with the duration (seconds) its promotion
    /// should have: `ttl` the first time, twice the previous one when it
    /// comes back after that one expired. A source whose promotion is
    /// still in force is not promoted again (behind a balancer XDP sees
    /// the balancer, so its refusals keep coming). Nothing is remembered
    /// as promoted until [`Defense::promoted`] says it was.
    pub fn failures(
        &self,
        refused: &[(IpAddr, u64)],
        now: i64,
        after: u32,
        window: u64,
        ttl: u64,
    ) -> Vec<(IpAddr, u64)> {
        if after == 0 {
            return Vec::new();
        }
        let mut failing = lock(&self.failing);
        if failing.len() > MAX_TRACKED {
            failing.retain(|_, (start, _)| now - *start < window as i64);
            if failing.len() > MAX_TRACKED {
                failing.clear();
            }
        }
        let promoted = lock(&self.promoted);
        let mut out = Vec::new();
        for &(source, n) in refused {
            let source = source_unit(source);
            let e = failing.entry(source).or_insert((now, 0));
            if now - e.0 >= window as i64 {
                *e = (now, 0);
            }
            e.1 += n;
            if e.1 >= u64::from(after) {
                failing.remove(&source);
                let secs = match promoted.get(&source) {
                    Some((_, until)) if now < *until => continue,
                    Some((prev, _)) => (prev * 2).min(MAX_PROMOTION_SECS),
                    None => ttl,
                };
                out.push((source, secs));
            }
        }
        out
    }

    /// Records that `source` was put on the drop list for `secs` at `now`.
    pub fn promoted(&self, source: IpAddr, secs: u64, now: i64) {
        let mut promoted = lock(&self.promoted);
        if promoted.len() >= MAX_TRACKED {
            // Forget those whose doubling no longer matters: expired longer
            // ago than any promotion lasts.
            promoted.retain(|_, (_, until)| now - *until < MAX_PROMOTION_SECS as i64);
            if promoted.len() >= MAX_TRACKED {
                promoted.clear();
            }
        }
        promoted.insert(source_unit(source), (secs, now + secs as i64));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeat_offenders_are_promoted_with_doubling_expiries() {
        let d = Defense::default();
        let a: IpAddr = "203.0.113.9".parse().unwrap();
        let promote = |at: i64, n: u64| {
            let out = d.failures(&[(a, n)], at, 100, 60, 600);
            for (s, secs) in &out {
                d.promoted(*s, *secs, at);
            }
            out
        };
        assert!(promote(0, 60).is_empty());
        // Outside the window the count starts over.
        assert!(promote(61, 60).is_empty());
        assert_eq!(promote(62, 40), [(a, 600)]);
        // Still in force (until 662): not promoted again, not doubled.
        assert!(promote(100, 500).is_empty());
        assert!(promote(600, 500).is_empty());
        // Back after it expired: twice as long, then twice again.
        assert_eq!(promote(2000, 100), [(a, 1200)]);
        assert_eq!(promote(4000, 100), [(a, 2400)]);
        // A promotion that did not happen (refused drop entry) is not
        // remembered: the next one is not doubled for it.
        let b: IpAddr = "198.51.100.9".parse().unwrap();
        assert_eq!(d.failures(&[(b, 100)], 0, 100, 60, 600), [(b, 600)]);
        assert_eq!(d.failures(&[(b, 100)], 10, 100, 60, 600), [(b, 600)]);
        // IPv6 per /64.
        let c: IpAddr = "2001:db8:5:5::1".parse().unwrap();
        let e: IpAddr = "2001:db8:5:5::2".parse().unwrap();
        assert!(d.failures(&[(c, 50)], 0, 100, 60, 600).is_empty());
        assert_eq!(
            d.failures(&[(e, 50)], 1, 100, 60, 600),
            [("2001:db8:5:5::".parse().unwrap(), 600)]
        );
        assert!(
            d.failures(&[(a, 1000)], 0, 0, 60, 600).is_empty(),
            "0 = never"
        );
    }

    #[test]
    fn guard_drops_are_summed_per_source_and_port() {
        let d = Defense::default();
        let a: IpAddr = "198.51.100.9".parse().unwrap();
        d.guard_drop("default", a, "smtp", 25, 10);
        d.guard_drop("default", a, "smtp", 25, 12);
        d.guard_drop("default", a, "api", 8443, 12);
        let mut v = d.take_guard_drops();
        v.sort_by_key(|r| r.port);
        assert_eq!(v.len(), 2);
        assert_eq!(
            (v[0].port, v[0].attempts, v[0].first_seen, v[0].last_seen),
            (25, 2, 10, 12)
        );
        assert!(d.take_guard_drops().is_empty());
    }
}
