//! Drop events from the kernel's ring buffer: counted, kept for
//! `allowlistctl events`, logged without flooding the log, and fed to the
//! unauthorized list.

use std::sync::{Arc, atomic::Ordering};

use crate::{
    api,
    kernel::{self},
};

use super::*;

impl Daemon {
    pub fn recent_events(&self) -> api::Events {
        let recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        api::Events {
            events: recent.iter().cloned().collect(),
        }
    }

    fn record_event(&self, ev: &allowlist_common::DropEvent) {
        self.events_received.fetch_add(1, Ordering::Relaxed);
        let source = kernel::event_source(ev);
        let (verdict, reason) = match ev.verdict {
            allowlist_common::VERDICT_DROP_LIST => ("drop_list", kernel::reason_name(ev.reason)),
            _ => (
                "guard",
                if ev.reason == allowlist_common::SERVICE_SMTP {
                    "smtp"
                } else {
                    "api"
                },
            ),
        };
        let age_ns = crate::sys::monotonic_ns().saturating_sub(ev.ts_ns);
        let at = wall_now_ms() as f64 / 1000.0 - age_ns as f64 / 1e9;
        // A source the guard dropped is an unauthorized caller like one the
        // proxy refused: the owner must see it (written in batches).
        // SMTP ports belong to `[blocking] smtp_account`; any other drop
        // saw no key, so no account: it is the installation's (`default`).
        let account = if reason == "smtp" {
            self.config.blocking.smtp_account.as_str()
        } else {
            crate::policy::DEFAULT_ACCOUNT
        };
        if ev.verdict != allowlist_common::VERDICT_DROP_LIST {
            self.defense
                .guard_drop(account, source, reason, ev.dport, at as i64);
        }
        // Kernel drops are sampled into the usage log (the kernel already
        // sends at most one event per source per second, and a bounded
        // number in total).
        if let Some(sink) = self.logs.get() {
            sink.submit(crate::logs::LogRecord {
                at_ms: (at * 1000.0) as i64,
                account: account.to_string().into(),
                key_id: String::new(),
                client: Some(source),
                method: "".into(),
                path: String::new(),
                status: 0,
                reason: "kernel_drop",
                rule: None,
                // The drop list's reason (manual, denied, auto, import) or
                // the guarded service (api, smtp).
                note: reason,
                latency_us: 0,
                bytes_in: 0,
                bytes_out: 0,
            });
        }
        // One INFO line per source would let a spoofed-source flood write
        // the log: the first event of each 10 s window is logged, the rest
        // are summed into one line when the window closes.
        {
            let mut w = self.event_log.lock().unwrap_or_else(|p| p.into_inner());
            let now = std::time::Instant::now();
            match w.as_mut() {
                Some((start, n)) if now.duration_since(*start) < EVENT_LOG_WINDOW => {
                    *n += 1;
                    tracing::debug!(%source, verdict, reason, port = ev.dport, proto = ev.proto, "kernel_drop");
                }
                _ => {
                    if let Some((_, n)) = *w
                        && n > 0
                    {
                        tracing::info!(
                            events = n,
                            "kernel_drop: more events in the last window (see `allowlistctl events`)"
                        );
                    }
                    *w = Some((now, 0));
                    tracing::info!(%source, verdict, reason, port = ev.dport, proto = ev.proto, "kernel_drop");
                }
            }
        }
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        if recent.len() == RECENT_EVENTS {
            recent.pop_front();
        }
        recent.push_back(api::KernelEvent {
            at,
            source: source.to_string(),
            verdict: verdict.into(),
            reason: reason.into(),
            port: ev.dport,
            protocol: ev.proto,
        });
    }

    /// Reads drop events from the kernel ring buffer until the daemon stops.
    /// Drains in batches; the kernel already limits each source to one
    /// event a second.
    pub async fn read_events(self: Arc<Self>, ring: aya::maps::RingBuf<aya::maps::MapData>) {
        let mut fd = match crate::sys::async_fd(ring, tokio::io::Interest::READABLE) {
            Ok(fd) => fd,
            Err(e) => {
                tracing::error!(error = %e, "cannot poll the kernel event ring buffer; kernel drops will not be reported");
                return;
            }
        };
        loop {
            let mut guard = match fd.readable_mut().await {
                Ok(g) => g,
                Err(e) => {
                    tracing::error!(error = %e, "polling the kernel event ring buffer");
                    return;
                }
            };
            let ring = guard.get_inner_mut();
            while let Some(item) = ring.next() {
                if let Some(ev) = kernel::decode_event(&item) {
                    self.record_event(&ev);
                }
            }
            guard.clear_ready();
        }
    }
}
