//! Counters the request path and the daemon bump, read by the metrics
//! exporter. The edge's are per worker (each worker thread writes only its
//! own cache lines, so counting costs no contention) and summed at scrape
//! time.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::policy::Reason;

/// How a request the edge answered ended: a decision's reason, or an
/// answer given before or after deciding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Decided(Reason),
    /// No usable client address or path (400).
    BadRequest,
    /// The upstream did not answer (502).
    UpstreamError,
    /// An action link's page, answered by the edge itself.
    Action,
}

/// Outcomes counted: every reason, then the two others.
pub const OUTCOMES: usize = Reason::ALL.len() + 3;

impl Outcome {
    fn index(self) -> usize {
        match self {
            Outcome::Decided(r) => r as usize,
            Outcome::BadRequest => Reason::ALL.len(),
            Outcome::UpstreamError => Reason::ALL.len() + 1,
            Outcome::Action => Reason::ALL.len() + 2,
        }
    }

    /// The reason code this outcome is logged and counted as.
    pub fn as_str(self) -> &'static str {
        Outcome::name(self.index())
    }

    /// The label value of outcome `i`.
    pub fn name(i: usize) -> &'static str {
        match Reason::ALL.get(i) {
            Some(r) => r.as_str(),
            None if i == Reason::ALL.len() => "bad_request",
            None if i == Reason::ALL.len() + 1 => "upstream_error",
            None => "action",
        }
    }
}

/// Status classes counted: 1xx to 5xx.
pub const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

fn class(status: u16) -> usize {
    (usize::from(status / 100)).clamp(1, 5) - 1
}

/// Upper bounds (seconds) of the decision latency histogram.
pub const DECIDE_BUCKETS: [f64; 10] = [
    0.25e-6, 0.5e-6, 1e-6, 2e-6, 5e-6, 10e-6, 20e-6, 50e-6, 100e-6, 1e-3,
];

/// Upper bounds (seconds) of the change-to-enforced histogram.
pub const CHANGE_BUCKETS: [f64; 10] = [
    100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 50e-3, 100e-3, 1.0,
];

/// A histogram of fixed buckets, written with relaxed atomics.
#[derive(Debug)]
pub struct Histogram<const N: usize> {
    bounds: &'static [f64; N],
    /// One more than the bounds: the last counts what is above them all.
    buckets: [AtomicU64; 11],
    sum_ns: AtomicU64,
}

impl<const N: usize> Histogram<N> {
    pub const fn new(bounds: &'static [f64; N]) -> Self {
        assert!(N < 11);
        Histogram {
            bounds,
            buckets: [const { AtomicU64::new(0) }; 11],
            sum_ns: AtomicU64::new(0),
        }
    }

    pub fn observe_ns(&self, ns: u64) {
        let secs = ns as f64 / 1e9;
        let i = self.bounds.iter().position(|b| secs <= *b).unwrap_or(N);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Adds this histogram into `into`: (sum seconds, per-bucket counts
    /// with the overflow last).
    pub fn add_to(&self, into: &mut HistogramSnapshot) {
        into.sum += self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        into.counts.resize(N + 1, 0);
        for (c, b) in into.counts.iter_mut().zip(&self.buckets) {
            *c += b.load(Ordering::Relaxed);
        }
    }

    pub fn bounds(&self) -> &'static [f64; N] {
        self.bounds
    }
}

/// A histogram read at scrape time.
#[derive(Clone, Debug, Default)]
pub struct HistogramSnapshot {
    pub sum: f64,
    pub counts: Vec<u64>,
}

/// One edge worker's counters, on cache lines of their own.
#[derive(Debug)]
#[repr(align(128))]
pub struct WorkerCounters {
    requests: [[AtomicU64; 5]; OUTCOMES],
    decide: Histogram<10>,
    /// Requests by account and status class, with `[metrics] per_account`
    /// only. The lock is the worker's own (uncontended).
    accounts: std::sync::Mutex<std::collections::HashMap<String, [u64; 5]>>,
}

impl Default for WorkerCounters {
    fn default() -> Self {
        WorkerCounters {
            requests: Default::default(),
            decide: Histogram::new(&DECIDE_BUCKETS),
            accounts: Default::default(),
        }
    }
}

/// Distinct accounts one worker counts; past it new ones go to `other`.
const MAX_ACCOUNTS: usize = 100_000;

impl WorkerCounters {
    pub fn request(&self, outcome: Outcome, status: u16) {
        self.requests[outcome.index()][class(status)].fetch_add(1, Ordering::Relaxed);
    }

    pub fn decided_in(&self, ns: u64) {
        self.decide.observe_ns(ns);
    }

    /// Counts a request for its account (`[metrics] per_account`).
    pub fn account_request(&self, account: &str, status: u16) {
        let mut m = self.accounts.lock().unwrap_or_else(|p| p.into_inner());
        let account = if account.is_empty() { "none" } else { account };
        if let Some(row) = m.get_mut(account) {
            row[class(status)] += 1;
            return;
        }
        let name = if m.len() >= MAX_ACCOUNTS {
            "other"
        } else {
            account
        };
        m.entry(name.to_string()).or_default()[class(status)] += 1;
    }
}

/// Workers that get a slot of their own; more share slots (still correct,
/// only no longer contention-free).
pub const WORKER_SLOTS: usize = 64;

/// The edge's counters, one slot per worker.
#[derive(Debug)]
pub struct EdgeCounters {
    workers: Box<[WorkerCounters]>,
    /// `[metrics] per_account`: count requests per account too (one
    /// series per account and status class: opt-in, to bound cardinality).
    pub per_account: std::sync::atomic::AtomicBool,
}

impl Default for EdgeCounters {
    fn default() -> Self {
        EdgeCounters {
            workers: (0..WORKER_SLOTS)
                .map(|_| WorkerCounters::default())
                .collect(),
            per_account: Default::default(),
        }
    }
}

impl EdgeCounters {
    /// Worker `i`'s slot.
    pub fn worker(&self, i: usize) -> &WorkerCounters {
        &self.workers[i % WORKER_SLOTS]
    }

    /// Requests by (outcome, status class), summed over workers.
    pub fn requests(&self) -> [[u64; 5]; OUTCOMES] {
        let mut out = [[0u64; 5]; OUTCOMES];
        for w in self.workers.iter() {
            for (o, row) in out.iter_mut().enumerate() {
                for (c, v) in row.iter_mut().enumerate() {
                    *v += w.requests[o][c].load(Ordering::Relaxed);
                }
            }
        }
        out
    }

    /// Requests by account and status class, summed over workers.
    pub fn accounts(&self) -> std::collections::BTreeMap<String, [u64; 5]> {
        let mut out: std::collections::BTreeMap<String, [u64; 5]> = Default::default();
        for w in self.workers.iter() {
            let m = w.accounts.lock().unwrap_or_else(|p| p.into_inner());
            for (a, row) in m.iter() {
                let o = out.entry(a.clone()).or_default();
                for (x, y) in o.iter_mut().zip(row) {
                    *x += y;
                }
            }
        }
        out
    }

    /// The decision latency histogram, summed over workers.
    pub fn decide(&self) -> HistogramSnapshot {
        let mut h = HistogramSnapshot::default();
        for w in self.workers.iter() {
            w.decide.add_to(&mut h);
        }
        h
    }
}

/// Store operations that failed (every caller that sees one counts it).
pub static STORE_ERRORS: AtomicU64 = AtomicU64::new(0);

/// Notification deliveries, per channel (`CHANNELS`): the counters the
/// notifier keeps and `/metrics` reads.
pub struct NotifyCounters {
    /// Delivered (a relay accepted the message; a webhook answered 2xx).
    pub sent: [AtomicU64; 2],
    /// Attempts that failed and were tried again later.
    pub retried: [AtomicU64; 2],
    /// Given up after the last attempt (logged at WARN each).
    pub failed: [AtomicU64; 2],
    /// Not queued: the delivery queue was full.
    pub dropped: [AtomicU64; 2],
    /// Deliveries queued or being tried.
    pub pending: AtomicU64,
    /// Notices not sent again inside their window (one per address and key).
    pub suppressed: AtomicU64,
    /// Action links used, and refused (unknown, used, expired, bad nonce).
    pub actions_used: AtomicU64,
    pub actions_refused: AtomicU64,
}

/// The delivery channels, in the order of [`NotifyCounters`]' arrays.
pub const CHANNELS: [&str; 2] = ["email", "webhook"];

#[allow(clippy::declare_interior_mutable_const)]
const ZERO: AtomicU64 = AtomicU64::new(0);

pub static NOTIFY: NotifyCounters = NotifyCounters {
    sent: [ZERO; 2],
    retried: [ZERO; 2],
    failed: [ZERO; 2],
    dropped: [ZERO; 2],
    pending: ZERO,
    suppressed: ZERO,
    actions_used: ZERO,
    actions_refused: ZERO,
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_sum_over_workers_and_buckets_hold_their_bounds() {
        let e = EdgeCounters::default();
        e.worker(0).request(Outcome::Decided(Reason::Ok), 200);
        e.worker(1).request(Outcome::Decided(Reason::Ok), 204);
        e.worker(65).request(Outcome::UpstreamError, 502);
        let r = e.requests();
        assert_eq!(r[Reason::Ok as usize][1], 2);
        assert_eq!(r[OUTCOMES - 2][4], 1);
        assert_eq!(Outcome::name(OUTCOMES - 2), "upstream_error");
        assert_eq!(Outcome::name(OUTCOMES - 1), "action");
        assert_eq!(Outcome::name(Reason::Denied as usize), "denied");
        e.worker(0).decided_in(900); // 0.9 µs: the 1 µs bucket
        e.worker(3).decided_in(5_000_000); // 5 ms: above every bound
        let h = e.decide();
        assert_eq!(h.counts[2], 1);
        assert_eq!(h.counts[10], 1);
        assert!((h.sum - 0.0050009).abs() < 1e-9);
    }
}
