//! Usage logs: every request the edge answers (refused ones included) and
//! samples of kernel drops, per account.
//!
//! The request path hands a [`LogRecord`] to a [`LogSink`]: bounded
//! per-thread queues it never waits on (when full, the record is counted
//! and dropped).
//! One writer thread takes what the queue holds every flush interval and
//! hands it to the [`LogStore`]: this edge's day files ([`DayFiles`], one
//! SQLite file per day apart from the policy store and its lock), or, with
//! a PostgreSQL store, the one table every edge writes (partitioned by
//! day). Either way retention removes whole days, never a `DELETE` over
//! millions of rows, and queries read the days their time range covers,
//! newest first, streaming rows.
//!
//! This room knows nothing above `policy`: the edge and the daemon (for
//! kernel drops) both write to it, and the admin API reads it.

mod day;
mod day_files;
mod query;
mod writer;

pub use day::{day_file, day_of_ms, parse_day_file};
pub use day_files::DayFiles;
pub use query::{
    CSV_HEADER, LogBucket, LogQuery, LogRow, LogSummary, ReasonCount, SummaryFold, scan, summary,
};
pub use writer::{LogWriter, Retention, start};

/// Where the usage log is kept: this edge's day files ([`DayFiles`]), or a
/// table shared by every edge on one PostgreSQL.
pub trait LogStore: Send + Sync {
    /// Writes a batch in as few transactions as it can; on error the batch
    /// is lost (the writer counts it).
    fn write(&self, batch: &[LogRecord]) -> Result<(), String>;
    /// Removes whole days at or before `today - retention_days`.
    fn sweep(&self, today: i64, retention_days: u32);
    /// Calls `each` with every row `q` selects, newest first, until it
    /// returns false.
    fn scan(&self, q: &LogQuery, each: &mut dyn FnMut(LogRow) -> bool) -> Result<(), String>;
    /// Requests per time bucket by status class, refusals by reason.
    fn summary(
        &self,
        q: &LogQuery,
        range: (i64, i64),
        buckets: usize,
    ) -> Result<LogSummary, String>;
}

use std::{
    borrow::Cow,
    net::IpAddr,
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
};

use crate::policy::Rule;

/// One answered request (or a sampled kernel drop, `reason =
/// "kernel_drop"`).
#[derive(Clone, Debug)]
pub struct LogRecord {
    /// Unix milliseconds when the request arrived.
    pub at_ms: i64,
    /// Borrowed when static (`default`, the common methods): no
    /// allocation on the request path, no free on the writer's.
    pub account: Cow<'static, str>,
    pub key_id: String,
    pub client: Option<IpAddr>,
    pub method: Cow<'static, str>,
    /// The normalized path (what scope was decided on).
    pub path: String,
    pub status: u16,
    /// The reason code (`ok`, `key_allowlist`, `bad_request` ...).
    pub reason: &'static str,
    /// Which rule decided; formatted by the writer, off the request path.
    pub rule: Option<Rule>,
    /// Free text in place of a rule (kernel drops: the drop reason).
    pub note: &'static str,
    pub latency_us: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

/// Queues the edge's threads write to; each thread keeps to one, so a
/// record costs an uncontended lock and a push, not a shared channel slot.
const SHARDS: usize = 16;

#[derive(Debug, Default)]
#[repr(align(128))]
struct Shard(Mutex<Vec<LogRecord>>);

/// Where records go: bounded per-thread queues the writer drains.
#[derive(Debug)]
pub struct LogSink {
    shards: Box<[Shard]>,
    /// Records queued and not yet taken by the writer (the bound).
    queued: AtomicUsize,
    capacity: usize,
    /// Whether the writer has started (a second one is refused).
    taken: AtomicBool,
    /// Records dropped because the queue was full.
    pub dropped: AtomicU64,
    /// Records written.
    pub written: AtomicU64,
    /// Records lost because the store refused them for longer than the
    /// writer could hold them (one queue's worth).
    pub failed: AtomicU64,
    /// Records a failed write left, held for the next try.
    pub held: AtomicUsize,
}

impl LogSink {
    /// A sink holding at most `buffer` records between two writes.
    pub fn new(buffer: usize) -> LogSink {
        LogSink {
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
            queued: AtomicUsize::new(0),
            capacity: buffer,
            taken: AtomicBool::new(false),
            dropped: AtomicU64::new(0),
            written: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            held: AtomicUsize::new(0),
        }
    }

    /// Queues a record; never blocks (beyond a lock only this thread and,
    /// every flush, the writer take).
    pub fn submit(&self, r: LogRecord) {
        if self.queued.fetch_add(1, Ordering::Relaxed) >= self.capacity {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let shard = &self.shards[shard_of_thread()];
        shard.0.lock().unwrap_or_else(|p| p.into_inner()).push(r);
    }

    /// Records waiting for the writer.
    pub fn depth(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// Moves everything queued into `into` (the writer's batch); `spare`
    /// vectors are swapped in so the edge's threads do not regrow theirs.
    fn drain(&self, into: &mut Vec<LogRecord>, spare: &mut Vec<Vec<LogRecord>>) {
        for shard in self.shards.iter() {
            let mut q = shard.0.lock().unwrap_or_else(|p| p.into_inner());
            if q.is_empty() {
                continue;
            }
            let fresh = spare.pop().unwrap_or_default();
            let taken = std::mem::replace(&mut *q, fresh);
            drop(q);
            self.queued.fetch_sub(taken.len(), Ordering::Relaxed);
            let mut taken = taken;
            into.append(&mut taken);
            spare.push(taken);
        }
    }

    /// Claims the sink for its one writer.
    fn claim(&self) -> bool {
        !self.taken.swap(true, Ordering::Relaxed)
    }
}

/// This thread's queue: threads are spread over the shards in turn.
fn shard_of_thread() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SHARD: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
    }
    SHARD.with(|s| *s)
}
