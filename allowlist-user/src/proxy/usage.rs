//! A request's usage-log record, finished when its response body is: the
//! latency and the bytes sent are known only then (a download is not done
//! when its headers are).

use std::time::Instant;

use crate::logs::{LogRecord, LogSink};

/// The record of one request, waiting for its response to finish.
pub struct Done {
    pub record: LogRecord,
    pub started: Instant,
    pub sink: &'static LogSink,
}

impl Done {
    /// Completes the record and queues it (never blocks).
    pub fn finish(mut self, bytes_out: u64) {
        self.record.latency_us = self.started.elapsed().as_micros() as u64;
        self.record.bytes_out = bytes_out;
        self.sink.submit(self.record);
    }
}
