//! The one writer: every flush interval, what the queue holds goes to
//! the log store in one write; days past retention are removed whole.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::Duration,
};

use super::{LogRecord, LogSink, LogStore, day_of_ms};

/// The running writer: stop it to write what is still queued.
pub struct LogWriter {
    stop: Arc<AtomicBool>,
    retention: Arc<Retention>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// `[logs] retention_days` in force. A configuration reload changes it;
/// the writer then sweeps at its next flush instead of waiting for the
/// next day.
#[derive(Debug)]
pub struct Retention {
    days: AtomicU32,
    changed: AtomicBool,
}

impl Retention {
    pub fn days(&self) -> u32 {
        self.days.load(Ordering::Relaxed)
    }

    pub fn set(&self, days: u32) {
        self.days.store(days, Ordering::Relaxed);
        self.changed.store(true, Ordering::Release);
    }
}

impl LogWriter {
    /// The retention the writer applies, for a reload to change.
    pub fn retention(&self) -> Arc<Retention> {
        self.retention.clone()
    }

    /// Writes what is queued and ends the thread.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Starts the writer of `sink` into `store`, keeping `retention_days`
/// days. `today` is the daemon's clock (Unix ms).
pub fn start(
    sink: &'static LogSink,
    store: Arc<dyn LogStore>,
    retention_days: u32,
    flush: Duration,
    today: impl Fn() -> i64 + Send + 'static,
) -> std::io::Result<LogWriter> {
    if !sink.claim() {
        return Err(std::io::Error::other(
            "the usage-log writer is already running",
        ));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let retention = Arc::new(Retention {
        days: AtomicU32::new(retention_days),
        changed: AtomicBool::new(false),
    });
    let kept = retention.clone();
    let thread = std::thread::Builder::new()
        .name("usage-log".into())
        .spawn(move || {
            let mut spare: Vec<Vec<LogRecord>> = Vec::new();
            let mut held: Vec<LogRecord> = Vec::new();
            let mut failing = false;
            let mut swept_day = i64::MIN;
            loop {
                let stopping = flag.load(Ordering::Relaxed);
                let today = day_of_ms(today());
                if today != swept_day || kept.changed.swap(false, Ordering::Acquire) {
                    store.sweep(today, kept.days());
                    swept_day = today;
                }
                // Rows a failed write left behind go first.
                let mut batch: Vec<LogRecord> = std::mem::take(&mut held);
                sink.drain(&mut batch, &mut spare);
                if !batch.is_empty() {
                    let n = batch.len() as u64;
                    match store.write(&batch) {
                        Ok(()) => {
                            sink.written.fetch_add(n, Ordering::Relaxed);
                            if failing {
                                tracing::info!(rows = n, "usage logs written again");
                                failing = false;
                            }
                        }
                        Err(e) => {
                            // Held for the next flush (a shared store that
                            // is away comes back), at most one queue's
                            // worth: the oldest beyond it are counted lost.
                            let over = batch.len().saturating_sub(sink.capacity);
                            sink.failed.fetch_add(over as u64, Ordering::Relaxed);
                            batch.drain(..over);
                            held = batch;
                            sink.held.store(held.len(), Ordering::Relaxed);
                            if !failing {
                                tracing::warn!(error = %e, rows = n, "writing usage logs; holding them to try again");
                                failing = true;
                            }
                        }
                    }
                    if !failing {
                        sink.held.store(0, Ordering::Relaxed);
                    }
                }
                if stopping {
                    // Nothing will try again: what is held is lost.
                    sink.failed.fetch_add(held.len() as u64, Ordering::Relaxed);
                    break;
                }
                std::thread::sleep(flush);
            }
        })?;
    Ok(LogWriter {
        stop,
        retention,
        thread: Some(thread),
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::logs::{LogQuery, LogRow, LogSummary};

    /// A store that refuses the first `fail` writes (a server that is
    /// away), then keeps what it is given.
    struct Flaky {
        fail: AtomicU32,
        rows: Mutex<Vec<i64>>,
    }

    impl LogStore for Flaky {
        fn write(&self, batch: &[LogRecord]) -> Result<(), String> {
            if self
                .fail
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok()
            {
                return Err("the server is away".into());
            }
            self.rows
                .lock()
                .unwrap()
                .extend(batch.iter().map(|r| r.at_ms));
            Ok(())
        }
        fn sweep(&self, _: i64, _: u32) {}
        fn scan(&self, _: &LogQuery, _: &mut dyn FnMut(LogRow) -> bool) -> Result<(), String> {
            Ok(())
        }
        fn summary(&self, _: &LogQuery, _: (i64, i64), _: usize) -> Result<LogSummary, String> {
            Ok(LogSummary::default())
        }
    }

    fn record(at_ms: i64) -> LogRecord {
        LogRecord {
            at_ms,
            account: "default".into(),
            key_id: String::new(),
            client: None,
            method: "GET".into(),
            path: "/".into(),
            status: 200,
            reason: "ok",
            rule: None,
            note: "",
            latency_us: 0,
            bytes_in: 0,
            bytes_out: 0,
        }
    }

    fn wait(mut f: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(std::time::Instant::now() < deadline, "timed out");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn rows_a_failed_write_left_are_written_when_the_store_answers() {
        let sink: &'static LogSink = Box::leak(Box::new(LogSink::new(100)));
        let store = Arc::new(Flaky {
            fail: AtomicU32::new(3),
            rows: Mutex::new(Vec::new()),
        });
        let w = start(sink, store.clone(), 30, Duration::from_millis(5), || 0).unwrap();
        for i in 0..5 {
            sink.submit(record(i));
        }
        wait(|| store.rows.lock().unwrap().len() == 5);
        // Later rows come after the held ones, each once.
        sink.submit(record(5));
        wait(|| store.rows.lock().unwrap().len() == 6);
        w.stop();
        assert_eq!(*store.rows.lock().unwrap(), vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(sink.failed.load(Ordering::Relaxed), 0);
        assert_eq!(sink.written.load(Ordering::Relaxed), 6);
        assert_eq!(sink.held.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn the_writer_holds_at_most_one_queue_and_counts_the_rest() {
        let sink: &'static LogSink = Box::leak(Box::new(LogSink::new(4)));
        let store = Arc::new(Flaky {
            fail: AtomicU32::new(u32::MAX),
            rows: Mutex::new(Vec::new()),
        });
        let w = start(sink, store.clone(), 30, Duration::from_millis(5), || 0).unwrap();
        for round in 0..3 {
            for i in 0..4 {
                sink.submit(record(round * 4 + i));
            }
            wait(|| sink.depth() == 0);
        }
        wait(|| sink.failed.load(Ordering::Relaxed) == 8);
        assert_eq!(sink.held.load(Ordering::Relaxed), 4);
        w.stop();
        // Stopping loses what was held, and counts it.
        assert_eq!(sink.failed.load(Ordering::Relaxed), 12);
        assert!(store.rows.lock().unwrap().is_empty());
    }
}
