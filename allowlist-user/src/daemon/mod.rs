//! The application: the daemon's shared state and every operation the
//! admin API exposes, one file per domain, all changes through `change`.

mod accounts;
mod blocking;
mod change;
mod check;
mod drops;
mod effects;
mod events;
mod follow;
mod guard;
mod kernel_sync;
mod keys;
mod lists;
mod logs;
mod notices;
mod recipients;
mod settings;
pub mod store_health;
mod tokens;
mod usage;

pub use crate::state::State;
pub use keys::{DEFAULT_GRACE_SECS, MAX_GRACE_SECS};
pub use lists::{Authorize, DenyRequest};
pub use notices::{Notice, Notices};
pub use tokens::{Caller, TOKEN_PREFIX};

use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use ipnet::IpNet;

use crate::{
    api,
    config::Config,
    kernel::{self, DropSpec, Kernel, KernelError},
    store::{DropRecord, Store, StoreError, unix_now},
};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    /// The caller's role may not do this (403 `permission_denied`).
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    Capacity(String),
    #[error(transparent)]
    Store(StoreError),
    #[error("kernel: {0}")]
    Kernel(KernelError),
}

impl From<StoreError> for DaemonError {
    fn from(e: StoreError) -> Self {
        crate::telemetry::STORE_ERRORS.fetch_add(1, Ordering::Relaxed);
        DaemonError::Store(e)
    }
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
    /// The configuration as read at start. What a SIGHUP reload changes
    /// at run time is held where it is used (the snapshot's trusted
    /// proxies, the certificate stores, the log writer), not here.
    pub config: Config,
    pub(crate) store: Arc<dyn Store>,
    kernel: Option<Mutex<Kernel>>,
    /// Serialises changes so store, kernel and snapshot move in step.
    pub(crate) changes: tokio::sync::Mutex<()>,
    /// Whether the store answers, and the refusals waiting for it.
    pub store_health: store_health::StoreHealth,
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
    /// How many sources put each prefix in the API guard union, as the
    /// kernel holds it (see `kernel_sync`).
    pub(crate) union_counts: Mutex<kernel_sync::UnionCounts>,
    /// (account index, authorized entry) -> its hits, across snapshots.
    pub(crate) entry_usage: Mutex<EntryUsageMap>,
    /// (source, key id) -> last successful call (Unix ms), for the impact
    /// of activating blocking.
    pub(crate) recent_successes: Mutex<std::collections::HashMap<(std::net::IpAddr, String), i64>>,
    pub clock: Clock,
    /// The kernel's connection/key pairing, when the hooks are loaded.
    pub conns: Option<crate::kernel::ConnTable>,
    /// The usage log's queue, once started (lives as long as the process).
    pub logs: std::sync::OnceLock<&'static crate::logs::LogSink>,
    /// Where the usage log is kept (set at start; this edge's day files
    /// until then).
    pub log_store: std::sync::OnceLock<Arc<dyn crate::logs::LogStore>>,
    /// Change-to-enforced latency (kernel maps, store and snapshot).
    pub change_latency: crate::telemetry::Histogram<10>,
    /// Admin API tokens by id (hash of the secret only).
    pub(crate) tokens: Mutex<std::collections::HashMap<String, crate::store::TokenRecord>>,
    /// What owners must be told about, for the notifier.
    pub notices: Notices,
    /// `[notify]` as in force (SIGHUP replaces it).
    pub notify_config: arc_swap::ArcSwap<crate::config::NotifyConfig>,
    /// Serves action links on the edge (set once the notifier starts).
    pub actions: std::sync::OnceLock<Arc<dyn crate::edge_host::ActionHandler>>,
    /// Live proxy connections that presented a key, for the cut-off.
    pub live: Mutex<std::collections::HashMap<u64, Arc<crate::live::LiveConn>>>,
}

/// The bad entries of an import: each named by its place and text, at most
/// five in the message, all counted. One bad entry refuses the import.
#[derive(Default)]
pub(crate) struct BadEntries {
    shown: Vec<String>,
    count: usize,
}

impl BadEntries {
    pub(crate) fn push(&mut self, index: usize, entry: &str, why: impl std::fmt::Display) {
        if self.shown.len() < 5 {
            self.shown
                .push(format!("entry {} ({entry:?}): {why}", index + 1));
        }
        self.count += 1;
    }

    /// Refuses the import of `given` entries if any was bad.
    pub(crate) fn check(self, given: usize) -> Result<(), DaemonError> {
        if self.count == 0 {
            return Ok(());
        }
        Err(DaemonError::Invalid(format!(
            "{} of {given} entries are not valid, so nothing was imported: {}",
            self.count,
            self.shown.join("; ")
        )))
    }
}

pub(crate) type EntryUsageMap =
    std::collections::HashMap<(u32, IpNet), Arc<crate::policy::EntryUsage>>;

/// The error for an account that does not exist (or that the caller may
/// not know of: the same answer).
pub(crate) fn no_account(name: &str) -> DaemonError {
    DaemonError::NotFound(format!(
        "no account named {name:?}; `allowlistctl accounts list` shows them"
    ))
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
/// `--since`: Unix seconds, an RFC 3339 time, or a duration back from
/// `now` (`24h`).
pub fn parse_since(t: &str, now: i64) -> Result<i64, String> {
    // Clamped to 1970..=9999, so every later millisecond and range sum
    // fits an i64.
    parse_time(t, now).map(|s| s.clamp(0, 253_402_300_799))
}

fn parse_time(t: &str, now: i64) -> Result<i64, String> {
    if let Ok(secs) = t.parse::<i64>() {
        return Ok(secs);
    }
    if let Ok(at) = humantime::parse_rfc3339_weak(t) {
        return at
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .map_err(|_| format!("{t:?} is before 1970"));
    }
    match humantime::parse_duration(t) {
        Ok(d) => Ok(now.saturating_sub(i64::try_from(d.as_secs()).unwrap_or(i64::MAX))),
        Err(_) => Err(format!(
            "--since {t:?}: give Unix seconds, a time like 2026-11-30T09:00:00Z, or a duration back from now like 24h"
        )),
    }
}

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
    view_at(record, unix_now())
}

/// The entry as seen at `now` (Unix seconds).
fn view_at(record: DropRecord, now: i64) -> api::DropView {
    let expires_in = record.expires_at.map(|at| (at - now).max(0));
    api::DropView { record, expires_in }
}
impl Daemon {
    pub fn new(
        config: Config,
        store: Arc<dyn Store>,
        kernel: Option<Kernel>,
        clock: Clock,
    ) -> Result<Daemon, DaemonError> {
        // The installation-wide settings live in the snapshot from the
        // start: a reload replaces them there (`settings.rs`).
        let settings = crate::policy::Snapshot::with_settings(
            config.blocking.always_allow.clone(),
            config.proxy.trusted_proxies.clone(),
            &config.blocking.smtp_account,
        );
        let notify_config = arc_swap::ArcSwap::from_pointee(config.notify.clone());
        Ok(Daemon {
            config,
            store_health: store_health::StoreHealth::new(store.backend()),
            store,
            kernel: kernel.map(Mutex::new),
            changes: tokio::sync::Mutex::new(()),
            events_received: AtomicU64::new(0),
            event_log: Mutex::new(None),
            defense: Default::default(),
            unauthorized_evicted: AtomicU64::new(0),
            refusals_dropped: AtomicU64::new(0),
            recent: Mutex::new(VecDeque::new()),
            policy: arc_swap::ArcSwap::from_pointee(settings),
            state: Mutex::new(crate::state::State::default()),
            runtimes: Mutex::new(Default::default()),
            entry_usage: Mutex::new(Default::default()),
            union_counts: Mutex::new(Default::default()),
            recent_successes: Mutex::new(Default::default()),
            clock,
            conns: None,
            tokens: Mutex::new(Default::default()),
            logs: std::sync::OnceLock::new(),
            log_store: std::sync::OnceLock::new(),
            change_latency: crate::telemetry::Histogram::new(&crate::telemetry::CHANGE_BUCKETS),
            notices: Notices::default(),
            notify_config,
            actions: std::sync::OnceLock::new(),
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

    pub fn stats(&self) -> Result<api::Stats, DaemonError> {
        let mut out = api::Stats {
            kernel_enabled: self.kernel.is_some(),
            events_received: self.events_received.load(Ordering::Relaxed),
            // While the store is away: the size last read.
            drop_entries: match self.store.list_drops() {
                Ok(d) => {
                    self.store_health
                        .drop_entries
                        .store(d.len(), Ordering::Relaxed);
                    d.len()
                }
                Err(_) => self.store_health.drop_entries.load(Ordering::Relaxed),
            },
            store: self.store_health.status(),
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

    /// The audit log, newest first: who changed what, when; `account`
    /// `None` is every account's and the installation's (operators).
    pub fn audit(
        &self,
        account: Option<&str>,
        q: &api::AuditQuery,
    ) -> Result<api::Audit, DaemonError> {
        let since = match q.since.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(t) => Some(parse_since(t, unix_now()).map_err(DaemonError::Invalid)?),
        };
        let limit = q.limit.unwrap_or(100);
        if !(1..=10_000).contains(&limit) {
            return Err(DaemonError::Invalid(format!(
                "limit {limit} is out of range 1..=10000"
            )));
        }
        let entries = self.store.audit_log(&crate::store::AuditQuery {
            since,
            actor: q.actor.clone().filter(|a| !a.is_empty()),
            account: account.map(str::to_string),
            limit,
        })?;
        Ok(api::Audit { entries })
    }

    pub fn blocking(&self, account: &str) -> Result<api::Blocking, DaemonError> {
        let now = self.clock.now_ms() / 1000;
        let days = i64::from(self.config.blocking.learning_days);
        let (state, (api_in_force, smtp_in_force), enforced_by, activates_in_days) = self
            .with_state(|st| {
                let a = st.account(account).ok_or_else(|| no_account(account))?;
                let r = &a.record;
                let enforced_by = st
                    .parent_of(account)
                    .filter(|o| o.record.enforce_blocking)
                    .map(|o| o.record.name.clone());
                let learning = (r.blocking.api == crate::policy::ApiMode::Learning).then(|| {
                    let quiet_since = r.last_learned_at.max(r.blocking.api_since);
                    (days - (now - quiet_since) / 86_400).max(0)
                });
                Ok::<_, DaemonError>((
                    r.blocking.clone(),
                    Self::modes_in_force(st, a),
                    enforced_by,
                    learning,
                ))
            })?;
        Ok(api::Blocking {
            account: account.to_string(),
            state,
            api_in_force,
            smtp_in_force,
            enforced_by,
            activates_in_days,
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
}
