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
            let mut swept_day = i64::MIN;
            loop {
                let stopping = flag.load(Ordering::Relaxed);
                let today = day_of_ms(today());
                if today != swept_day || kept.changed.swap(false, Ordering::Acquire) {
                    store.sweep(today, kept.days());
                    swept_day = today;
                }
                let mut batch: Vec<LogRecord> = Vec::new();
                sink.drain(&mut batch, &mut spare);
                if !batch.is_empty() {
                    let n = batch.len() as u64;
                    match store.write(&batch) {
                        Ok(()) => {
                            sink.written.fetch_add(n, Ordering::Relaxed);
                        }
                        Err(e) => {
                            sink.failed.fetch_add(n, Ordering::Relaxed);
                            tracing::warn!(error = %e, rows = n, "writing usage logs");
                        }
                    }
                }
                if stopping {
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
