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
    /// Source -> expiry of its last promotion, in seconds.
    promoted: Mutex<HashMap<IpAddr, u64>>,
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
    pub fn guard_drop(&self, source: IpAddr, service: &str, port: u16, at: i64) {
        let addr = source_unit(source);
        let mut p = lock(&self.pending);
        if p.len() >= MAX_TRACKED && !p.contains_key(&(addr, service.to_string(), port)) {
            return;
        }
        let r = p
            .entry((addr, service.to_string(), port))
            .or_insert_with(|| UnauthorizedRecord {
                addr,
                service: service.into(),
                key_id: String::new(),
                port,
                first_seen: at,
                last_seen: at,
                attempts: 0,
                status: "refused".into(),
            });
        r.last_seen = at;
        r.attempts += 1;
    }

    /// The guard drops to write now.
    pub fn take_guard_drops(&self) -> Vec<UnauthorizedRecord> {
        lock(&self.pending).drain().map(|(_, v)| v).collect()
    }

    /// Counts refusals of each source in `refused` (source, attempts) at
    /// `now`; returns the sources that crossed `after` refusals within
    /// `window` seconds, each with the expiry (seconds) of its promotion:
    /// `ttl` the first time, twice the previous one after that.
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
                let mut promoted = lock(&self.promoted);
                let secs = promoted
                    .get(&source)
                    .map_or(ttl, |prev| (prev * 2).min(MAX_PROMOTION_SECS));
                promoted.insert(source, secs);
                out.push((source, secs));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeat_offenders_are_promoted_with_doubling_expiries() {
        let d = Defense::default();
        let a: IpAddr = "203.0.113.9".parse().unwrap();
        assert!(d.failures(&[(a, 60)], 0, 100, 60, 600).is_empty());
        // Outside the window the count starts over.
        assert!(d.failures(&[(a, 60)], 61, 100, 60, 600).is_empty());
        assert_eq!(d.failures(&[(a, 40)], 62, 100, 60, 600), [(a, 600)]);
        assert_eq!(d.failures(&[(a, 100)], 2000, 100, 60, 600), [(a, 1200)]);
        assert_eq!(d.failures(&[(a, 100)], 4000, 100, 60, 600), [(a, 2400)]);
        // IPv6 per /64.
        let b: IpAddr = "2001:db8:5:5::1".parse().unwrap();
        let c: IpAddr = "2001:db8:5:5::2".parse().unwrap();
        assert!(d.failures(&[(b, 50)], 0, 100, 60, 600).is_empty());
        assert_eq!(
            d.failures(&[(c, 50)], 1, 100, 60, 600),
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
        d.guard_drop(a, "smtp", 25, 10);
        d.guard_drop(a, "smtp", 25, 12);
        d.guard_drop(a, "api", 8443, 12);
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
