//! What the edge's requests leave behind, applied off the request path in
//! batches: learning, recent successes (for the impact of activating
//! blocking), the unauthorized list and promotion of repeat offenders.

use std::{
    net::IpAddr,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use tokio::sync::mpsc;

use super::Daemon;
use crate::{
    edge_host::{EdgeHost, SideEffect},
    kernel::ConnClientKind,
    live::LiveConn,
    policy::Snapshot,
    store::UnauthorizedRecord,
};

/// Distinct refused sources held between two writes of the unauthorized
/// list (every 250 ms).
const MAX_PENDING_REFUSALS: usize = 4096;

impl EdgeHost for Daemon {
    fn snapshot(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.policy.load()
    }

    fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    fn pair(&self, cookie: u64, kid: u32, client: ConnClientKind) {
        if let Some(table) = &self.conns {
            table.pair(cookie, kid, client);
        }
    }

    fn register(&self, id: u64, conn: Arc<LiveConn>) {
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, conn);
    }

    fn unregister(&self, id: u64) {
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    }

    fn logs(&self) -> Option<&'static crate::logs::LogSink> {
        self.logs.get().copied()
    }

    fn actions(&self) -> Option<&Arc<dyn crate::edge_host::ActionHandler>> {
        self.actions.get()
    }
}

impl Daemon {
    /// Applies side effects in batches: learning, recent successes (for the
    /// impact of activating blocking) and the unauthorized list.
    pub async fn apply_effects(self: Arc<Self>, mut rx: mpsc::Receiver<Vec<SideEffect>>) {
        let daemon = self;
        let mut refused: std::collections::HashMap<(IpAddr, String), (UnauthorizedRecord, bool)> =
            Default::default();
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            let batch = tokio::select! {
                b = rx.recv() => match b {
                    None => break,
                    Some(b) => b,
                },
                _ = tick.tick() => {
                    let sources = flush_refused(&daemon, &mut refused);
                    daemon.note_refusals(&sources).await;
                    continue;
                }
            };
            for e in batch {
                match e {
                    SideEffect::Learn {
                        account,
                        net,
                        key_id,
                    } => {
                        if let Err(err) = daemon.learn(&account, net, &key_id).await {
                            tracing::warn!(error = %err, %net, "learning an address");
                        }
                    }
                    SideEffect::RateLimit {
                        account,
                        key_id,
                        percent,
                    } => daemon.notices.raise(super::Notice::RateLimit {
                        account,
                        key_id,
                        percent,
                    }),
                    SideEffect::Success {
                        addr,
                        key_id,
                        at_ms,
                    } => daemon.record_success(addr, &key_id, at_ms),
                    SideEffect::Refused {
                        account,
                        addr,
                        key_id,
                        at,
                        by_key,
                    } => {
                        // Bounded: a spray of distinct sources between two
                        // writes is counted, not held.
                        if refused.len() >= MAX_PENDING_REFUSALS
                            && !refused.contains_key(&(addr, key_id.clone()))
                        {
                            daemon.refusals_dropped.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        let e = refused.entry((addr, key_id.clone())).or_insert_with(|| {
                            (
                                UnauthorizedRecord::refused(&account, addr, "api", key_id, 0, at),
                                by_key,
                            )
                        });
                        e.0.hit(at);
                        e.1 = by_key;
                    }
                }
            }
        }
        let refused_sources = flush_refused(&daemon, &mut refused);
        daemon.note_refusals(&refused_sources).await;
    }
}

/// Writes the refusals gathered since the last write; returns each source
/// with its refusals, for promotion.
fn flush_refused(
    daemon: &Daemon,
    refused: &mut std::collections::HashMap<(IpAddr, String), (UnauthorizedRecord, bool)>,
) -> Vec<(IpAddr, u64)> {
    if refused.is_empty() {
        // Refusals held while the store was away: written once it answers.
        if daemon.store_health.queued() > 0 && daemon.store_health.retry_due(daemon.clock.now_ms())
        {
            write_refused(daemon, Vec::new());
        }
        return Vec::new();
    }
    let (batch, by_key): (Vec<UnauthorizedRecord>, Vec<bool>) =
        refused.drain().map(|(_, v)| v).unzip();
    // The notifier keeps one message per address and key per window.
    for (r, by_key) in batch.iter().zip(by_key) {
        daemon.notices.raise(super::Notice::Blocked {
            account: r.account.clone(),
            addr: r.addr,
            key_id: r.key_id.clone(),
            service: "api",
            by_key,
        });
    }
    let mut sources: std::collections::HashMap<IpAddr, u64> = Default::default();
    for r in &batch {
        *sources.entry(r.addr).or_default() += r.attempts.max(0) as u64;
    }
    // One line per write, not per source: a spray must not flood the log.
    let attempts: i64 = batch.iter().map(|r| r.attempts).sum();
    if let [one] = &batch[..] {
        tracing::info!(source = %one.addr, key = %one.key_id, attempts, "refused: IP_NOT_ALLOWED");
    } else {
        tracing::info!(sources = batch.len(), attempts, "refused: IP_NOT_ALLOWED");
    }
    write_refused(daemon, batch);
    sources.into_iter().collect()
}

/// Records refusals, with those held while the store was away first; holds
/// them (bounded) when the store cannot be reached, and while it is known
/// to be away tries again only now and then, so a dead server's connect
/// timeout does not stall learning and notices.
fn write_refused(daemon: &Daemon, batch: Vec<UnauthorizedRecord>) {
    if daemon.store_health.is_down() && !daemon.store_health.retry_due(daemon.clock.now_ms()) {
        daemon.store_health.requeue(batch);
        return;
    }
    let batch = daemon.store_health.take_queued(batch);
    match daemon
        .store
        .record_unauthorized(&batch, daemon.config.blocking.unauthorized_max)
    {
        Ok(evicted) => {
            daemon.store_health.up();
            daemon
                .unauthorized_evicted
                .fetch_add(evicted, Ordering::Relaxed);
        }
        Err(e) => {
            crate::telemetry::STORE_ERRORS.fetch_add(1, Ordering::Relaxed);
            if matches!(e, crate::store::StoreError::Unavailable { .. }) {
                // Kept (bounded) and written when the store is back.
                daemon.store_health.lost(daemon.clock.now_ms());
                daemon.store_health.requeue(batch);
            }
            tracing::warn!(error = %e, "recording refused sources");
        }
    }
}
