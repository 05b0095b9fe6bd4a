//! The daemon's shared state and the operations the admin API exposes.

use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use ipnet::IpNet;
use tokio::io::unix::AsyncFd;

use crate::{
    api,
    config::Config,
    kernel::{self, DropSpec, Kernel, KernelError},
    store::{DropKind, DropRecord, Store, StoreError, unix_now},
};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Capacity(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("kernel: {0}")]
    Kernel(KernelError),
}

impl From<KernelError> for DaemonError {
    fn from(e: KernelError) -> Self {
        match e {
            KernelError::DropList(ref d @ kernel::DropListError::Full { .. }) => {
                DaemonError::Capacity(d.to_string())
            }
            KernelError::DropList(ref d @ kernel::DropListError::TooWide { .. }) => {
                DaemonError::Invalid(d.to_string())
            }
            KernelError::GuardFull { .. } => DaemonError::Capacity(e.to_string()),
            e => DaemonError::Kernel(e),
        }
    }
}

const RECENT_EVENTS: usize = 256;
const EVENT_LOG_WINDOW: std::time::Duration = std::time::Duration::from_secs(10);

/// The daemon's clock. In builds with the `test-hooks` feature (the
/// binaries the tests drive, never a release),
/// `ALLOWLIST_CLOCK_OFFSET_FILE` names a file holding seconds to add to the
/// real time, so tests can move time forward (the 30-day learning switch,
/// rotation grace) without waiting. A release binary has no such hook:
/// whoever could write that file would control every expiry.
#[derive(Debug, Default)]
pub struct Clock {
    #[cfg(feature = "test-hooks")]
    offset_file: Option<std::path::PathBuf>,
}

impl Clock {
    pub fn from_env() -> Clock {
        Clock {
            #[cfg(feature = "test-hooks")]
            offset_file: std::env::var_os("ALLOWLIST_CLOCK_OFFSET_FILE").map(Into::into),
        }
    }

    /// Unix milliseconds.
    pub fn now_ms(&self) -> i64 {
        #[cfg(feature = "test-hooks")]
        {
            let offset_s: i64 = self
                .offset_file
                .as_ref()
                .and_then(|p| std::fs::read_to_string(p).ok())
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0);
            wall_now_ms() + offset_s * 1000
        }
        #[cfg(not(feature = "test-hooks"))]
        wall_now_ms()
    }
}

pub struct Daemon {
    pub config: Config,
    pub(crate) store: Arc<dyn Store>,
    kernel: Option<Mutex<Kernel>>,
    /// Serialises changes so store, kernel and snapshot move in step.
    pub(crate) changes: tokio::sync::Mutex<()>,
    events_received: AtomicU64,
    /// Start of the current event-log window and events not logged in it.
    event_log: Mutex<Option<(std::time::Instant, u64)>>,
    /// The API guard's arming, guard drops to record, repeat offenders.
    pub defense: crate::defense::Defense,
    /// Unauthorized-list entries evicted by the per-service cap, and
    /// refusals not recorded because too many distinct sources were pending.
    pub unauthorized_evicted: AtomicU64,
    pub refusals_dropped: AtomicU64,
    recent: Mutex<VecDeque<api::KernelEvent>>,
    /// The policy the proxy reads, swapped whole on every change.
    pub policy: arc_swap::ArcSwap<crate::policy::Snapshot>,
    pub(crate) state: Mutex<crate::state::State>,
    pub(crate) runtimes: Mutex<std::collections::HashMap<String, Arc<crate::policy::KeyRuntime>>>,
    /// (source, key id) -> last successful call (Unix ms), for the impact
    /// of activating blocking.
    pub(crate) recent_successes: Mutex<std::collections::HashMap<(std::net::IpAddr, String), i64>>,
    pub clock: Clock,
    /// The kernel's connection/key pairing, when the hooks are loaded.
    pub conns: Option<crate::kernel::ConnTable>,
    /// Live proxy connections that presented a key, for the cut-off.
    pub live: Mutex<std::collections::HashMap<u64, Arc<crate::live::LiveConn>>>,
}

/// Parses a CIDR or a single address (as /32 or /128), refusing host bits
/// with the network that was probably meant.
pub fn parse_cidr(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    if let Ok(addr) = s.parse::<std::net::IpAddr>() {
        return Ok(IpNet::from(addr));
    }
    let net: IpNet = s.parse().map_err(|_| {
        format!("{s:?} is not an IP address or CIDR; write it like 203.0.113.0/24 or 2001:db8::/48")
    })?;
    if net.trunc() != net {
        return Err(format!(
            "{s} has host bits set; did you mean {}?",
            net.trunc()
        ));
    }
    Ok(net)
}

/// Parses a TTL like "90s", "10m", "24h", "7d", "1h30m".
pub fn parse_ttl(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s.trim()).map_err(|e| {
        format!("TTL {s:?} is not a duration ({e}); write it like 90s, 10m, 24h or 7d")
    })?;
    if d < Duration::from_secs(1) {
        return Err(format!("TTL {s:?} is shorter than one second"));
    }
    if d > Duration::from_secs(10 * 365 * 86400) {
        return Err(format!(
            "TTL {s:?} is longer than ten years; leave the TTL out for an entry that stays until removed"
        ));
    }
    Ok(d)
}

/// The kernel's view of a stored entry, or `None` when it has expired.
fn to_spec(rec: &DropRecord, wall_now_ms: i64, mono_now: u64) -> Option<DropSpec> {
    let expires_ns = match rec.expires_at {
        None => 0,
        Some(at) => {
            let left_ms = at * 1000 - wall_now_ms;
            if left_ms <= 0 {
                return None;
            }
            mono_now + left_ms as u64 * 1_000_000
        }
    };
    Some(DropSpec {
        net: rec.cidr,
        reason: rec.kind.code(),
        expires_ns,
    })
}

fn wall_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn view(record: DropRecord) -> api::DropView {
    let expires_in = record.expires_at.map(|at| (at - unix_now()).max(0));
    api::DropView { record, expires_in }
}

impl Daemon {
    pub fn new(
        config: Config,
        store: Arc<dyn Store>,
        kernel: Option<Kernel>,
        clock: Clock,
    ) -> Result<Daemon, DaemonError> {
        let blocking = store.blocking()?;
        Ok(Daemon {
            config,
            store,
            kernel: kernel.map(Mutex::new),
            changes: tokio::sync::Mutex::new(()),
            events_received: AtomicU64::new(0),
            event_log: Mutex::new(None),
            defense: Default::default(),
            unauthorized_evicted: AtomicU64::new(0),
            refusals_dropped: AtomicU64::new(0),
            recent: Mutex::new(VecDeque::new()),
            policy: arc_swap::ArcSwap::from_pointee(crate::policy::Snapshot::default()),
            state: Mutex::new(crate::state::State {
                keys: Default::default(),
                authorized: Default::default(),
                blocking,
                denied: Default::default(),
            }),
            runtimes: Mutex::new(Default::default()),
            recent_successes: Mutex::new(Default::default()),
            clock,
            conns: None,
            live: Mutex::new(Default::default()),
        })
    }

    /// Notes a successful keyed call (the proxy reports them in batches).
    pub fn record_success(&self, addr: std::net::IpAddr, key_id: &str, at_ms: i64) {
        let mut r = self
            .recent_successes
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        r.insert((crate::policy::normalize(addr), key_id.to_string()), at_ms);
    }

    pub fn kernel_enabled(&self) -> bool {
        self.kernel.is_some()
    }

    pub(crate) fn kernel(&self) -> Option<std::sync::MutexGuard<'_, Kernel>> {
        self.kernel
            .as_ref()
            .map(|k| k.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Writes the stored drop list into the kernel maps (as a diff).
    pub fn sync_kernel(&self, records: &[DropRecord]) -> Result<(), KernelError> {
        let Some(mut k) = self.kernel() else {
            return Ok(());
        };
        let (wall, mono) = (wall_now_ms(), kernel::sys::monotonic_ns());
        let always = &self.config.blocking.always_allow;
        let specs: Vec<DropSpec> = records
            .iter()
            // Lockout protection holds for entries stored before the
            // configuration named the network too.
            .filter(|r| {
                let overlap = always
                    .iter()
                    .find(|a| a.contains(&r.cidr) || r.cidr.contains(*a));
                if let Some(a) = overlap {
                    tracing::warn!(cidr = %r.cidr, always_allow = %a, "drop entry not enforced: it overlaps [blocking] always_allow");
                }
                overlap.is_none()
            })
            .filter_map(|r| to_spec(r, wall, mono))
            .collect();
        k.sync_drops(&specs)
    }

    pub fn list_drops(&self) -> Result<api::DropList, DaemonError> {
        let drops = self.store.list_drops()?.into_iter().map(view).collect();
        Ok(api::DropList { drops })
    }

    pub async fn add_drop(
        &self,
        req: api::AddDrop,
        actor: &str,
    ) -> Result<api::DropView, DaemonError> {
        self.add_drop_kind(req, DropKind::Manual, actor).await
    }

    pub async fn add_drop_kind(
        &self,
        req: api::AddDrop,
        kind: DropKind,
        actor: &str,
    ) -> Result<api::DropView, DaemonError> {
        let cidr = parse_cidr(&req.cidr).map_err(DaemonError::Invalid)?;
        kernel::droplist::validate(&cidr).map_err(|e| DaemonError::Invalid(e.to_string()))?;
        if let Some(allowed) = self
            .config
            .blocking
            .always_allow
            .iter()
            .find(|a| a.contains(&cidr) || cidr.contains(*a))
        {
            return Err(DaemonError::Invalid(format!(
                "{cidr} overlaps {allowed} in [blocking] always_allow, which is never dropped (lockout protection); \
                 drop a narrower prefix outside it, or change the configuration"
            )));
        }
        let now = unix_now();
        let expires_at = match &req.ttl {
            Some(t) => Some(now + parse_ttl(t).map_err(DaemonError::Invalid)?.as_secs() as i64),
            None => None,
        };
        let reason = req.reason.unwrap_or_default();
        if reason.len() > 500 {
            return Err(DaemonError::Invalid(
                "--reason is longer than 500 characters".into(),
            ));
        }
        let rec = DropRecord {
            cidr,
            kind,
            reason,
            created_at: now,
            expires_at,
            created_by: actor.to_string(),
        };
        let _guard = self.changes.lock().await;
        let mut all = self.store.list_drops()?;
        let old = all.clone();
        all.retain(|r| r.cidr != cidr);
        all.push(rec.clone());
        // Kernel first: a change that does not fit is refused before
        // anything is stored. If storing then fails, the kernel goes back.
        self.sync_kernel(&all)?;
        if let Err(e) = self.store.put_drop(&rec, actor) {
            if let Err(k) = self.sync_kernel(&old) {
                tracing::error!(error = %k, "restoring the kernel drop list after a store failure");
            }
            return Err(e.into());
        }
        tracing::info!(%cidr, ttl = ?req.ttl, actor, "drop list: added");
        Ok(view(rec))
    }

    pub async fn remove_drop(&self, cidr: &str, actor: &str) -> Result<api::DropView, DaemonError> {
        let cidr = parse_cidr(cidr).map_err(DaemonError::Invalid)?;
        let _guard = self.changes.lock().await;
        let Some(prev) = self.store.remove_drop(&cidr, actor)? else {
            return Err(DaemonError::NotFound(format!(
                "{cidr} is not on the drop list; `allowlistctl drop list` shows what is"
            )));
        };
        let all = self.store.list_drops()?;
        self.sync_kernel(&all)?;
        tracing::info!(%cidr, actor, "drop list: removed");
        Ok(view(prev))
    }

    /// Deletes expired entries from the store and the maps. The kernel
    /// already ignores them at their expiry; this reclaims the space.
    pub async fn sweep(&self) -> Result<usize, DaemonError> {
        let _guard = self.changes.lock().await;
        let expired = self.store.remove_expired_drops(unix_now())?;
        if !expired.is_empty() {
            let all = self.store.list_drops()?;
            self.sync_kernel(&all)?;
            for r in &expired {
                tracing::info!(cidr = %r.cidr, "drop list: expired");
            }
        }
        Ok(expired.len())
    }

    pub fn stats(&self) -> Result<api::Stats, DaemonError> {
        let mut out = api::Stats {
            kernel_enabled: self.kernel.is_some(),
            events_received: self.events_received.load(Ordering::Relaxed),
            drop_entries: self.store.list_drops()?.len(),
            unauthorized_evicted: self.unauthorized_evicted.load(Ordering::Relaxed),
            api_guard: self.api_guard_state(),
            refusals_dropped: self.refusals_dropped.load(Ordering::Relaxed),
            ..Default::default()
        };
        if let Some(k) = self.kernel() {
            out.kernel = Some(k.stats()?);
            out.maps = Some(k.fill_levels());
            out.interfaces = k
                .attached
                .iter()
                .map(|(i, m)| (i.clone(), m.to_string()))
                .collect();
        }
        Ok(out)
    }

    pub fn blocking(&self) -> Result<api::Blocking, DaemonError> {
        Ok(api::Blocking {
            state: self.store.blocking()?,
            always_allow: self
                .config
                .blocking
                .always_allow
                .iter()
                .map(|n| n.to_string())
                .collect(),
            learning_days: self.config.blocking.learning_days,
            smtp_ports: self.config.kernel.smtp_ports.clone(),
        })
    }

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
        let age_ns = kernel::sys::monotonic_ns().saturating_sub(ev.ts_ns);
        let at = wall_now_ms() as f64 / 1000.0 - age_ns as f64 / 1e9;
        // A source the guard dropped is an unauthorized caller like one the
        // proxy refused: the owner must see it (written in batches).
        if ev.verdict != allowlist_common::VERDICT_DROP_LIST {
            self.defense.guard_drop(source, reason, ev.dport, at as i64);
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
        // SAFETY: the RingBuf owns its map fd for as long as the AsyncFd
        // owns the RingBuf, and always reports that same fd.
        let mut fd = match unsafe {
            AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE)
        } {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_parsing() {
        assert_eq!(parse_cidr("192.0.2.7").unwrap().to_string(), "192.0.2.7/32");
        assert_eq!(
            parse_cidr("2001:db8::1").unwrap().to_string(),
            "2001:db8::1/128"
        );
        assert_eq!(
            parse_cidr("198.51.100.0/24").unwrap().to_string(),
            "198.51.100.0/24"
        );
        let e = parse_cidr("203.0.113.5/24").unwrap_err();
        assert!(e.contains("did you mean 203.0.113.0/24?"), "{e}");
        let e = parse_cidr("2001:db8::1/32").unwrap_err();
        assert!(e.contains("did you mean 2001:db8::/32?"), "{e}");
        assert!(
            parse_cidr("300.1.1.1")
                .unwrap_err()
                .contains("not an IP address")
        );
        assert!(parse_cidr("1.2.3.4/33").is_err());
    }

    #[test]
    fn ttl_parsing() {
        assert_eq!(parse_ttl("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_ttl("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_ttl("7d").unwrap(), Duration::from_secs(7 * 86400));
        assert!(parse_ttl("soon").unwrap_err().contains("like 90s"));
        assert!(parse_ttl("0s").is_err());
    }

    #[test]
    fn expired_records_are_not_enforced() {
        let mut r = DropRecord {
            cidr: "192.0.2.0/24".parse().unwrap(),
            kind: DropKind::Manual,
            reason: String::new(),
            created_at: 0,
            expires_at: Some(100),
            created_by: "t".into(),
        };
        assert!(to_spec(&r, 100_000, 5).is_none());
        let s = to_spec(&r, 99_000, 5).unwrap();
        assert_eq!(s.expires_ns, 5 + 1_000_000_000);
        r.expires_at = None;
        assert_eq!(to_spec(&r, 99_000, 5).unwrap().expires_ns, 0);
    }
}
