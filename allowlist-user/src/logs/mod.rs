//! Usage logs: every request the edge answers (refused ones included) and
//! samples of kernel drops, per account.
//!
//! The request path hands a [`LogRecord`] to a [`LogSink`]: a bounded
//! queue it never waits on (when full, the record is counted and dropped).
//! One writer thread takes what the queue holds every flush interval and
//! inserts it in one transaction per day into that day's own SQLite file
//! (`requests-YYYY-MM-DD.db`), apart from the policy store and its lock.
//! Day files make retention a file deletion, never a `DELETE` over
//! millions of rows, and keep each file's index small; queries read the
//! days their time range covers, newest first, streaming rows.
//!
//! This room knows nothing above `policy`: the edge and the daemon (for
//! kernel drops) both write to it, and the admin API reads it.

mod day;
mod query;
mod writer;

pub use day::{day_file, day_of_ms, parse_day_file};
pub use query::{CSV_HEADER, LogQuery, LogRow, scan};
pub use writer::{LogWriter, Retention, start};

use std::{
    net::IpAddr,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
        mpsc::{Receiver, SyncSender, TrySendError},
    },
};

use crate::policy::Rule;

/// One answered request (or a sampled kernel drop, `reason =
/// "kernel_drop"`).
#[derive(Clone, Debug)]
pub struct LogRecord {
    /// Unix milliseconds when the request arrived.
    pub at_ms: i64,
    pub account: String,
    pub key_id: String,
    pub client: Option<IpAddr>,
    pub method: String,
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

/// Where records go: a bounded queue the writer drains.
#[derive(Debug)]
pub struct LogSink {
    tx: SyncSender<LogRecord>,
    rx: Mutex<Option<Receiver<LogRecord>>>,
    /// Records dropped because the queue was full.
    pub dropped: AtomicU64,
    /// Records written.
    pub written: AtomicU64,
    /// Batches the writer could not write (their records are lost and
    /// counted here too).
    pub failed: AtomicU64,
}

impl LogSink {
    /// A sink holding at most `buffer` records between two writes.
    pub fn new(buffer: usize) -> LogSink {
        let (tx, rx) = std::sync::mpsc::sync_channel(buffer);
        LogSink {
            tx,
            rx: Mutex::new(Some(rx)),
            dropped: AtomicU64::new(0),
            written: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        }
    }

    /// Queues a record; never blocks.
    pub fn submit(&self, r: LogRecord) {
        match self.tx.try_send(r) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// The receiving end, once (for the writer).
    fn take_receiver(&self) -> Option<Receiver<LogRecord>> {
        self.rx.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}
