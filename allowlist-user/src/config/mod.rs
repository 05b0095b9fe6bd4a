//! The TOML configuration (`/etc/allowlist/allowlist.toml`). Every field has
//! a default, so an empty file is a valid configuration.

use std::{net::SocketAddr, path::PathBuf};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::kernel::{AttachMode, CgroupMode};

pub const DEFAULT_PATH: &str = "/etc/allowlist/allowlist.toml";

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub proxy: ProxyConfig,
    pub admin: AdminConfig,
    pub store: StoreConfig,
    pub kernel: KernelConfig,
    pub blocking: BlockingConfig,
    pub metrics: MetricsConfig,
    pub notify: NotifyConfig,
    pub logs: LogsConfig,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogsConfig {
    /// Whether requests are logged at all.
    pub enabled: bool,
    /// Usage-log partitions (one SQLite file per day); empty = `logs/`
    /// next to the store.
    pub dir: Option<PathBuf>,
    /// Days of usage logs kept; older partitions are deleted whole.
    pub retention_days: u32,
    /// Log records held between two writes; past it records are counted
    /// and dropped, never waited for.
    pub buffer: usize,
}

impl Default for LogsConfig {
    fn default() -> Self {
        LogsConfig {
            enabled: true,
            dir: None,
            retention_days: 30,
            buffer: 65_536,
        }
    }
}

impl Config {
    /// Where the usage-log partitions live.
    pub fn logs_dir(&self) -> PathBuf {
        if let Some(d) = &self.logs.dir {
            return d.clone();
        }
        self.state_dir().join("logs")
    }

    /// Where this edge keeps its own files: `[store] state_dir`, else the
    /// SQLite file's folder, else `/var/lib/allowlist`.
    pub fn state_dir(&self) -> PathBuf {
        if let Some(d) = &self.store.state_dir {
            return d.clone();
        }
        match crate::store::parse_url(&self.store.url) {
            Ok(crate::store::StoreUrl::Sqlite(p)) => p
                .parent()
                .map(|d| d.to_path_buf())
                .unwrap_or_else(|| PathBuf::from(".")),
            _ => PathBuf::from("/var/lib/allowlist"),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProxyConfig {
    /// TLS listener of the API edge.
    pub listen: SocketAddr,
    /// Where allowed requests are forwarded.
    pub upstream: String,
    /// Peers allowed to set the client address (PROXY protocol,
    /// X-Forwarded-For).
    pub trusted_proxies: Vec<IpNet>,
    /// PEM certificate chain and key; a self-signed pair is generated when
    /// unset.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Seconds a client may take to send a request's headers (and the
    /// longest a keep-alive connection may sit idle): slowloris protection.
    pub header_timeout_secs: u64,
    /// Seconds a connection may sit with no request in flight after its
    /// first request (HTTP/1.1 keep-alive and HTTP/2 alike).
    pub idle_timeout_secs: u64,
    /// Connections served at once; more are closed at accept.
    pub max_connections: usize,
    /// Concurrent HTTP/2 streams per connection.
    pub max_streams: u32,
    /// Pass the client's Host header on to the upstream (else the
    /// upstream's own authority is sent).
    pub preserve_host: bool,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            listen: "0.0.0.0:8443".parse().expect("valid"),
            upstream: "http://127.0.0.1:8080".into(),
            trusted_proxies: Vec::new(),
            cert: None,
            key: None,
            header_timeout_secs: 10,
            idle_timeout_secs: 60,
            max_connections: 10_000,
            max_streams: 100,
            preserve_host: true,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Unix socket of the admin API (mode 0600; 0660 with `group`).
    pub socket: PathBuf,
    /// A group whose members may use the socket as operators, besides
    /// root; empty = root only.
    pub group: String,
    /// The admin API (and web console) over TLS with bearer tokens, e.g.
    /// "127.0.0.1:9443"; empty = off.
    pub listen: String,
    /// Certificate and key (PEM) of the admin listener; empty = a
    /// self-signed pair generated at start (clients then need `--ca` with
    /// the certificate written next to the store, or `--insecure`).
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// The web console at `/console/` on `listen`; false = the API only.
    pub console: bool,
    /// A console session ends after this many minutes without a request,
    /// and after `console_session_hours` in any case (signing in again
    /// needs the token).
    pub console_idle_mins: u32,
    pub console_session_hours: u32,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            socket: "/run/allowlist/admin.sock".into(),
            group: String::new(),
            listen: String::new(),
            cert: None,
            key: None,
            console: true,
            console_idle_mins: 30,
            console_session_hours: 12,
        }
    }
}

impl AdminConfig {
    /// The TCP listener's address, if one is configured.
    pub fn listen_addr(&self) -> Result<Option<std::net::SocketAddr>, String> {
        let l = self.listen.trim();
        if l.is_empty() {
            return Ok(None);
        }
        l.parse()
            .map(Some)
            .map_err(|_| format!("{l:?} is not an address:port; write it like \"127.0.0.1:9443\""))
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// `sqlite:///absolute/path.db`, `sqlite://relative/path.db`, or
    /// `postgres://user:password@host:port/db?sslmode=require` for several
    /// edges sharing one state.
    pub url: String,
    /// PostgreSQL: PEM file of the CA that signs the server's certificate
    /// (the host's trust store when unset). With `sslmode=require` the
    /// certificate and name are always verified.
    pub ca: Option<PathBuf>,
    /// PostgreSQL: most connections this edge opens.
    pub pool: usize,
    /// PostgreSQL: a whole resync from the store this often (seconds), as
    /// a safety net beside the change notifications.
    pub resync_secs: u64,
    /// Where this edge keeps its own files (usage-log partitions, the
    /// generated admin certificate): the SQLite file's folder by default,
    /// `/var/lib/allowlist` with PostgreSQL.
    pub state_dir: Option<PathBuf>,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            url: "sqlite:///var/lib/allowlist/allowlist.db".into(),
            ca: None,
            pool: 8,
            resync_secs: 60,
            state_dir: None,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct KernelConfig {
    pub enabled: bool,
    /// Interfaces `edge_filter` attaches to; none by default.
    pub interfaces: Vec<String>,
    /// `auto` (generic on virtual devices such as veth, driver on NICs),
    /// `driver` or `generic`.
    pub xdp_mode: AttachMode,
    pub smtp_ports: Vec<u16>,
    /// Folder on bpffs where programs, links and maps are pinned.
    pub bpffs: PathBuf,
    /// Where the connection hooks attach: `auto` (the unit's own cgroup
    /// under systemd, else a child cgroup the daemon moves into), `self`
    /// or `child`.
    pub cgroup: CgroupMode,
    /// Drop-list prefixes the kernel maps hold.
    pub drop_capacity: u32,
    /// Prefixes per family the guard union holds.
    pub guard_capacity: u32,
    /// When the XDP guard covers the API port: `auto` (only under a
    /// connection flood), `on` (whenever API blocking is active), `off`.
    pub api_guard: crate::flood::ApiGuardMode,
    /// New connections per second above which `auto` arms the API guard.
    pub flood_threshold: u64,
    /// Seconds without a flood before `auto` disarms it again.
    pub flood_calm_secs: u64,
    /// Refusals of one source within `promote_window_secs` after which it
    /// is promoted to the drop list (0: never).
    pub promote_after: u32,
    pub promote_window_secs: u64,
    /// Expiry of a first promotion; each later one of the same source
    /// doubles it (at most 30 days).
    pub promote_ttl_secs: u64,
}

impl Default for KernelConfig {
    fn default() -> Self {
        KernelConfig {
            enabled: true,
            interfaces: Vec::new(),
            xdp_mode: AttachMode::Auto,
            smtp_ports: vec![25, 465, 587],
            bpffs: "/sys/fs/bpf/allowlist".into(),
            cgroup: CgroupMode::Auto,
            drop_capacity: 1 << 20,
            guard_capacity: 1 << 18,
            api_guard: crate::flood::ApiGuardMode::Auto,
            flood_threshold: 2000,
            flood_calm_secs: 30,
            promote_after: 100,
            promote_window_secs: 60,
            promote_ttl_secs: 600,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct BlockingConfig {
    /// Days without a newly learned address after which API blocking turns
    /// active by itself.
    pub learning_days: u32,
    /// Management networks that are never blocked or dropped.
    pub always_allow: Vec<IpNet>,
    /// Entries the unauthorized list keeps per service; the least recent
    /// are evicted (and counted in `stats`) beyond it.
    pub unauthorized_max: usize,
    /// The account whose SMTP mode and authorized list the kernel enforces
    /// on the SMTP ports.
    pub smtp_account: String,
}

impl Default for BlockingConfig {
    fn default() -> Self {
        BlockingConfig {
            learning_days: 30,
            always_allow: Vec::new(),
            unauthorized_max: 10_000,
            smtp_account: crate::policy::DEFAULT_ACCOUNT.into(),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Prometheus text at /metrics.
    pub listen: Option<SocketAddr>,
    /// Also count requests per account (one series per account and status
    /// class): off by default, since accounts can be many.
    pub per_account: bool,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: Some("127.0.0.1:9477".parse().expect("valid")),
            per_account: false,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct NotifyConfig {
    /// Where action links point: the edge as the account owners reach it.
    pub action_base_url: String,
    /// An address refused with a key is told once per this many seconds.
    pub window_secs: u64,
    /// Action links expire after this many seconds.
    pub action_ttl_secs: u64,
    /// A rotation's grace is announced this many seconds before it ends.
    pub grace_warning_secs: u64,
    /// Attempts per delivery (e-mail or webhook), with exponential backoff
    /// from `retry_secs`, before it is given up and logged.
    pub attempts: u32,
    pub retry_secs: f64,
    /// Deliveries queued or being tried; past it one is counted and dropped.
    pub queue: usize,
    pub smtp: Option<SmtpConfig>,
    pub webhooks: Vec<WebhookConfig>,
}

impl Default for NotifyConfig {
    fn default() -> Self {
        NotifyConfig {
            action_base_url: "https://127.0.0.1:8443".into(),
            window_secs: 3600,
            action_ttl_secs: 72 * 3600,
            grace_warning_secs: 3600,
            attempts: 6,
            retry_secs: 1.0,
            queue: 1024,
            smtp: None,
            webhooks: Vec::new(),
        }
    }
}

/// How the SMTP connection is protected.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SmtpTls {
    /// STARTTLS when the relay offers it, plain otherwise.
    #[default]
    Opportunistic,
    /// STARTTLS or fail.
    Required,
    /// Plain SMTP (a relay on loopback).
    None,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SmtpConfig {
    /// host:port of the relay.
    pub relay: String,
    pub from: String,
    /// The installation's recipients: every account's notices, besides
    /// the account's own recipients.
    #[serde(default)]
    pub to: Vec<String>,
    #[serde(default)]
    pub tls: SmtpTls,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    pub url: String,
    pub secret: String,
}

mod check;
pub use check::{ConfigError, check_mailbox};

#[cfg(test)]
mod tests;
