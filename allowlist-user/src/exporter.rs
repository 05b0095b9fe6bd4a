//! Prometheus metrics (OpenMetrics text) at `[metrics] listen` `/metrics`,
//! through `prometheus-client`: one collector reads, at scrape time, the
//! edge's per-worker counters, the daemon's counters and the kernel's, so
//! nothing on the request path knows the exporter exists.

use std::{fmt, net::SocketAddr, sync::Arc, sync::atomic::Ordering};

use axum::{Router, http::header, response::IntoResponse, routing::get};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};

use crate::{
    daemon::Daemon,
    proxy::EdgeStats,
    telemetry::{self, HistogramSnapshot, Outcome, STATUS_CLASSES},
};

/// A map at or above this fill level is flagged (`allowlist_map_fill_warning`)
/// and logged at each scrape.
pub const FILL_WARNING: f64 = 0.8;

struct Metrics {
    daemon: Arc<Daemon>,
    edge: Arc<EdgeStats>,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Metrics")
    }
}

fn counter(enc: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> fmt::Result {
    let m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    ConstCounter::new(v).encode(m)
}

fn gauge(enc: &mut DescriptorEncoder, name: &str, help: &str, v: f64) -> fmt::Result {
    let m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    ConstGauge::new(v).encode(m)
}

fn histogram(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    bounds: &[f64],
    h: &HistogramSnapshot,
) -> fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Histogram)?;
    let mut buckets: Vec<(f64, u64)> = bounds
        .iter()
        .copied()
        .zip(h.counts.iter().copied())
        .collect();
    // The encoder names f64::MAX "+Inf".
    buckets.push((f64::MAX, h.counts.get(bounds.len()).copied().unwrap_or(0)));
    let count = h.counts.iter().sum();
    m.encode_histogram::<NoLabelSet>(h.sum, count, &buckets, None)
}

/// Notices, deliveries per channel and action links.
fn notify_metrics(enc: &mut DescriptorEncoder, daemon: &Daemon) -> fmt::Result {
    let n = &telemetry::NOTIFY;
    let per_channel = [
        (
            "allowlist_notify_sent",
            "Notifications delivered (relay accepted; webhook answered 2xx), by channel",
            &n.sent,
        ),
        (
            "allowlist_notify_retried",
            "Notification attempts that failed and were retried with backoff, by channel",
            &n.retried,
        ),
        (
            "allowlist_notify_failed",
            "Notifications given up after the last attempt (each logged), by channel",
            &n.failed,
        ),
        (
            "allowlist_notify_dropped",
            "Notifications not queued because the delivery queue was full, by channel",
            &n.dropped,
        ),
    ];
    for (name, help, values) in per_channel {
        let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
        for (channel, v) in telemetry::CHANNELS.iter().zip(values) {
            ConstCounter::new(v.load(Ordering::Relaxed))
                .encode(m.encode_family(&[("channel", *channel)])?)?;
        }
    }
    gauge(
        enc,
        "allowlist_notify_queue",
        "Notices waiting for the notifier plus deliveries queued or being tried",
        (daemon.notices.depth() as u64 + n.pending.load(Ordering::Relaxed)) as f64,
    )?;
    counter(
        enc,
        "allowlist_notices_dropped",
        "Notices dropped because the notifier's queue was full",
        daemon.notices.dropped.load(Ordering::Relaxed),
    )?;
    counter(
        enc,
        "allowlist_notices_suppressed",
        "Notices not sent again within their window (one message per address and key)",
        n.suppressed.load(Ordering::Relaxed),
    )?;
    counter(
        enc,
        "allowlist_actions_used",
        "One-click action links used",
        n.actions_used.load(Ordering::Relaxed),
    )?;
    counter(
        enc,
        "allowlist_actions_refused",
        "One-click action POSTs refused (unknown, used, expired or without the page's nonce)",
        n.actions_refused.load(Ordering::Relaxed),
    )
}

impl Collector for Metrics {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let edge = &self.edge;
        {
            let mut m = enc.encode_descriptor(
                "allowlist_requests",
                "Requests the edge answered, by outcome (the usage log's reason code) and status class",
                None,
                MetricType::Counter,
            )?;
            for (o, row) in edge.counters.requests().iter().enumerate() {
                for (c, v) in row.iter().enumerate() {
                    let labels = [("reason", Outcome::name(o)), ("status", STATUS_CLASSES[c])];
                    ConstCounter::new(*v).encode(m.encode_family(&labels)?)?;
                }
            }
        }
        if edge.counters.per_account.load(Ordering::Relaxed) {
            let mut m = enc.encode_descriptor(
                "allowlist_account_requests",
                "Requests the edge answered, by account and status class ([metrics] per_account)",
                None,
                MetricType::Counter,
            )?;
            for (account, row) in edge.counters.accounts() {
                for (c, v) in row.iter().enumerate() {
                    let labels = [("account", account.as_str()), ("status", STATUS_CLASSES[c])];
                    ConstCounter::new(*v).encode(m.encode_family(&labels)?)?;
                }
            }
        }
        histogram(
            &mut enc,
            "allowlist_decision_seconds",
            "Time of one policy decision (authentication, scope, both address layers, rate)",
            &telemetry::DECIDE_BUCKETS,
            &edge.counters.decide(),
        )?;
        let mut change = HistogramSnapshot::default();
        self.daemon.change_latency.add_to(&mut change);
        histogram(
            &mut enc,
            "allowlist_change_seconds",
            "Change-to-enforced: from an accepted change to its kernel maps, store commit and snapshot",
            &telemetry::CHANGE_BUCKETS,
            &change,
        )?;
        counter(
            &mut enc,
            "allowlist_upstream_errors",
            "Requests the upstream did not answer",
            edge.upstream_errors.load(Ordering::Relaxed),
        )?;
        counter(
            &mut enc,
            "allowlist_side_effects_dropped",
            "Side effects (learning, refusals to record) dropped because the edge's queue was full",
            edge.queue_dropped.load(Ordering::Relaxed),
        )?;
        counter(
            &mut enc,
            "allowlist_store_errors",
            "Store operations that failed",
            telemetry::STORE_ERRORS.load(Ordering::Relaxed),
        )?;
        let health = &self.daemon.store_health;
        gauge(
            &mut enc,
            "allowlist_store_up",
            "1 while the store answers; 0 while it cannot be reached (the edge enforces the last policy it knew)",
            if health.is_down() { 0.0 } else { 1.0 },
        )?;
        gauge(
            &mut enc,
            "allowlist_store_queued_refusals",
            "Refusals waiting for the store to come back",
            health.queued() as f64,
        )?;
        counter(
            &mut enc,
            "allowlist_store_queue_dropped",
            "Refusals not kept while the store was away (the queue was full)",
            health.queue_dropped.load(Ordering::Relaxed),
        )?;
        notify_metrics(&mut enc, &self.daemon)?;
        if let Some(sink) = self.daemon.logs.get() {
            counter(
                &mut enc,
                "allowlist_log_written",
                "Usage-log records written",
                sink.written.load(Ordering::Relaxed),
            )?;
            gauge(
                &mut enc,
                "allowlist_log_queue",
                "Usage-log records waiting for the writer",
                sink.depth() as f64,
            )?;
            counter(
                &mut enc,
                "allowlist_log_dropped",
                "Usage-log records dropped because the writer's buffer ([logs] buffer) was full",
                sink.dropped.load(Ordering::Relaxed),
            )?;
            counter(
                &mut enc,
                "allowlist_log_failed",
                "Usage-log records lost: the store refused them for longer than the writer could hold them (see the daemon's log)",
                sink.failed.load(Ordering::Relaxed),
            )?;
            gauge(
                &mut enc,
                "allowlist_log_held",
                "Usage-log records a failed write left, held for the next try (the store is away)",
                sink.held.load(Ordering::Relaxed) as f64,
            )?;
        }
        let stats = match self.daemon.stats() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "reading counters for /metrics");
                return Ok(());
            }
        };
        counter(
            &mut enc,
            "allowlist_refusals_unrecorded",
            "Refusals not recorded in the unauthorized list: too many distinct sources between two writes",
            stats.refusals_dropped,
        )?;
        counter(
            &mut enc,
            "allowlist_unauthorized_evicted",
            "Unauthorized-list entries evicted to keep each list within [blocking] unauthorized_max",
            stats.unauthorized_evicted,
        )?;
        counter(
            &mut enc,
            "allowlist_kernel_events",
            "Drop events read from the kernel's ring buffer",
            stats.events_received,
        )?;
        gauge(
            &mut enc,
            "allowlist_api_guard_armed",
            "Whether the XDP guard covers the API port (see allowlistctl stats for why)",
            if stats.api_guard.armed { 1.0 } else { 0.0 },
        )?;
        let snap = self.daemon.policy.load();
        gauge(
            &mut enc,
            "allowlist_accounts",
            "Accounts",
            snap.accounts.len() as f64,
        )?;
        gauge(
            &mut enc,
            "allowlist_keys",
            "API keys (every status)",
            snap.keys().count() as f64,
        )?;
        if let Some(k) = &stats.kernel {
            let mut m = enc.encode_descriptor(
                "allowlist_kernel_drops",
                "Packets the kernel dropped, by reason (drop-list reasons, guard_api, guard_smtp, unclassified)",
                None,
                MetricType::Counter,
            )?;
            let rows = k.dropped.iter().map(|(r, v)| (r.as_str(), *v)).chain([
                ("guard_api", k.guard_dropped_api),
                ("guard_smtp", k.guard_dropped_smtp),
                ("unclassified", k.guard_dropped_unclassified),
            ]);
            for (reason, v) in rows {
                ConstCounter::new(v).encode(m.encode_family(&[("reason", reason)])?)?;
            }
            let mut m = enc.encode_descriptor(
                "allowlist_kernel_conn_cuts",
                "Packets of live connections the connection hooks dropped, by why",
                None,
                MetricType::Counter,
            )?;
            for (why, v) in [
                ("revoked", k.conn_cut_revoked),
                ("key_allowlist", k.conn_cut_allowlist),
                ("account_list", k.conn_cut_account),
            ] {
                ConstCounter::new(v).encode(m.encode_family(&[("why", why)])?)?;
            }
        }
        if let Some(f) = &stats.maps {
            let guard = f.guard_capacity as usize;
            let maps = [
                ("drop_rules", f.drop_rules, f.drop_capacity as usize),
                ("guard_v4", f.guard_v4, 2 * guard),
                ("guard_v6", f.guard_v6, 2 * guard),
                ("key_allow_v4", f.key_entries_v4, guard),
                ("key_allow_v6", f.key_entries_v6, guard),
                ("account_allow_v4", f.account_entries_v4, guard),
                ("account_allow_v6", f.account_entries_v6, guard),
                ("account_mode", f.account_modes, guard),
            ];
            for (name, help, pick) in [
                (
                    "allowlist_map_entries",
                    "Entries a kernel map holds",
                    0usize,
                ),
                ("allowlist_map_capacity", "Entries a kernel map can hold", 1),
                (
                    "allowlist_map_fill_ratio",
                    "Entries over capacity, per kernel map",
                    2,
                ),
                (
                    "allowlist_map_fill_warning",
                    "1 when a kernel map is at or above the warning level (0.8)",
                    3,
                ),
            ] {
                let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
                for (map, used, cap) in maps {
                    let ratio = used as f64 / cap.max(1) as f64;
                    let v = match pick {
                        0 => used as f64,
                        1 => cap as f64,
                        2 => ratio,
                        _ => f64::from(u8::from(ratio >= FILL_WARNING)),
                    };
                    if pick == 3 && ratio >= FILL_WARNING {
                        tracing::warn!(map, used, capacity = cap, "kernel map nearly full");
                    }
                    ConstGauge::new(v).encode(m.encode_family(&[("map", map)])?)?;
                }
            }
        }
        Ok(())
    }
}

/// The metrics registry of this daemon.
pub fn registry(daemon: Arc<Daemon>, edge: Arc<EdgeStats>) -> Registry {
    let mut r = Registry::default();
    r.register_collector(Box::new(Metrics { daemon, edge }));
    r
}

/// Renders the registry as OpenMetrics text.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, registry) {
        tracing::warn!(error = %e, "encoding /metrics");
    }
    out
}

/// Binds `[metrics] listen` (the daemon refuses to start when it cannot)
/// and serves `/metrics` until `stop` fires.
pub async fn serve(
    registry: Registry,
    addr: SocketAddr,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("[metrics] listen {addr}: {e}"))?;
    tracing::info!(addr = %listener.local_addr()?, "metrics at /metrics");
    let registry = Arc::new(registry);
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let r = registry.clone();
            async move {
                (
                    [(
                        header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    render(&r),
                )
                    .into_response()
            }
        }),
    );
    Ok(tokio::spawn(async move {
        let shutdown = async move {
            let _ = stop.changed().await;
        };
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::warn!(error = %e, "metrics listener");
        }
    }))
}
