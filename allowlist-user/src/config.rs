//! The TOML configuration (`/etc/allowlist/allowlist.toml`). Every field has
//! a default, so an empty file is a valid configuration.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

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

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the configuration {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {key}: {message}")]
    Invalid {
        path: PathBuf,
        key: &'static str,
        message: String,
    },
}

impl Config {
    /// Reads and validates `path`. A missing file at the default path means
    /// "all defaults"; a missing file named explicitly is an error.
    pub fn load(path: &Path, explicit: bool) -> Result<Config, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => String::new(),
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        Config::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
        config.validate(path)?;
        Ok(config)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |key: &'static str, message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            key,
            message,
        };
        let uri: hyper::Uri = self.proxy.upstream.parse().map_err(|e| {
            invalid(
                "[proxy] upstream",
                format!(
                    "{:?} is not a URL ({e}); write it like \"http://127.0.0.1:8080\"",
                    self.proxy.upstream
                ),
            )
        })?;
        if uri.scheme_str() != Some("http") || uri.host().is_none() {
            return Err(invalid(
                "[proxy] upstream",
                format!(
                    "{:?} must be an http:// URL with a host, like \"http://127.0.0.1:8080\" \
                     (the edge terminates TLS and speaks plain HTTP/1.1 to the upstream, \
                     which is expected on the same host or a private network)",
                    self.proxy.upstream
                ),
            ));
        }
        for net in self
            .proxy
            .trusted_proxies
            .iter()
            .chain(&self.blocking.always_allow)
        {
            if net.trunc() != *net {
                let key = if self.proxy.trusted_proxies.contains(net) {
                    "[proxy] trusted_proxies"
                } else {
                    "[blocking] always_allow"
                };
                return Err(invalid(
                    key,
                    format!("{net} has host bits set; did you mean {}?", net.trunc()),
                ));
            }
        }
        if !(1..=300).contains(&self.proxy.header_timeout_secs) {
            return Err(invalid(
                "[proxy] header_timeout_secs",
                format!("{} is out of range 1..=300", self.proxy.header_timeout_secs),
            ));
        }
        crate::policy::check_account_name(&self.blocking.smtp_account)
            .map_err(|m| invalid("[blocking] smtp_account", m))?;
        self.admin
            .listen_addr()
            .map_err(|m| invalid("[admin] listen", m))?;
        if self.admin.cert.is_some() != self.admin.key.is_some() {
            return Err(invalid(
                "[admin] cert",
                "give both cert and key, or neither for a generated self-signed pair".into(),
            ));
        }
        if !(1..=1440).contains(&self.admin.console_idle_mins) {
            return Err(invalid(
                "[admin] console_idle_mins",
                format!("{} is out of range 1..=1440", self.admin.console_idle_mins),
            ));
        }
        if !(1..=720).contains(&self.admin.console_session_hours) {
            return Err(invalid(
                "[admin] console_session_hours",
                format!(
                    "{} is out of range 1..=720",
                    self.admin.console_session_hours
                ),
            ));
        }
        if !(1..=3650).contains(&self.logs.retention_days) {
            return Err(invalid(
                "[logs] retention_days",
                format!("{} is out of range 1..=3650", self.logs.retention_days),
            ));
        }
        if !(16..=16_777_216).contains(&self.logs.buffer) {
            return Err(invalid(
                "[logs] buffer",
                format!("{} is out of range 16..=16777216", self.logs.buffer),
            ));
        }
        if !(1..=10_000_000).contains(&self.blocking.unauthorized_max) {
            return Err(invalid(
                "[blocking] unauthorized_max",
                format!(
                    "{} is out of range 1..=10000000",
                    self.blocking.unauthorized_max
                ),
            ));
        }
        if !(1..=3600).contains(&self.kernel.flood_calm_secs) {
            return Err(invalid(
                "[kernel] flood_calm_secs",
                format!("{} is out of range 1..=3600", self.kernel.flood_calm_secs),
            ));
        }
        if !(1..=86_400).contains(&self.kernel.promote_window_secs)
            || !(1..=30 * 86_400).contains(&self.kernel.promote_ttl_secs)
        {
            return Err(invalid(
                "[kernel] promote_window_secs / promote_ttl_secs",
                "the window is 1..=86400 s and the first expiry 1..=2592000 s".into(),
            ));
        }
        if !(1..=3600).contains(&self.proxy.idle_timeout_secs) {
            return Err(invalid(
                "[proxy] idle_timeout_secs",
                format!("{} is out of range 1..=3600", self.proxy.idle_timeout_secs),
            ));
        }
        if !(1..=10_000).contains(&self.proxy.max_streams) {
            return Err(invalid(
                "[proxy] max_streams",
                format!("{} is out of range 1..=10000", self.proxy.max_streams),
            ));
        }
        if !(1..=1_000_000).contains(&self.proxy.max_connections) {
            return Err(invalid(
                "[proxy] max_connections",
                format!("{} is out of range 1..=1000000", self.proxy.max_connections),
            ));
        }
        if self.proxy.cert.is_some() != self.proxy.key.is_some() {
            return Err(invalid(
                "[proxy] cert/key",
                "set both cert and key, or neither (a self-signed pair is generated)".into(),
            ));
        }
        if !self.admin.group.is_empty() && crate::sys::group_gid(&self.admin.group).is_none() {
            return Err(invalid(
                "[admin] group",
                format!(
                    "no group named {:?} on this host; create it (groupadd) or leave group empty for root only",
                    self.admin.group
                ),
            ));
        }
        if self.admin.socket.as_os_str().is_empty() {
            return Err(invalid(
                "[admin] socket",
                "must be a path, like \"/run/allowlist/admin.sock\"".into(),
            ));
        }
        crate::store::parse_url(&self.store.url)
            .map_err(|message| invalid("[store] url", message))?;
        if !(1..=1000).contains(&self.store.pool) {
            return Err(invalid(
                "[store] pool",
                format!("{} must be 1 to 1000 connections", self.store.pool),
            ));
        }
        if !(1..=86_400).contains(&self.store.resync_secs) {
            return Err(invalid(
                "[store] resync_secs",
                format!("{} must be 1 to 86400 seconds", self.store.resync_secs),
            ));
        }
        if !self.kernel.bpffs.is_absolute() {
            return Err(invalid(
                "[kernel] bpffs",
                format!(
                    "{} must be an absolute path on bpffs, like \"/sys/fs/bpf/allowlist\"",
                    self.kernel.bpffs.display()
                ),
            ));
        }
        for i in &self.kernel.interfaces {
            if i.is_empty() || i.len() > 15 || i.contains('/') || i.contains(char::is_whitespace) {
                return Err(invalid(
                    "[kernel] interfaces",
                    format!(
                        "{i:?} is not an interface name (at most 15 characters, no '/' or spaces)"
                    ),
                ));
            }
        }
        if self.kernel.smtp_ports.contains(&0) {
            return Err(invalid(
                "[kernel] smtp_ports",
                "port 0 is not a port; list ports 1-65535".into(),
            ));
        }
        if !(1..=(1 << 23)).contains(&self.kernel.drop_capacity) {
            return Err(invalid(
                "[kernel] drop_capacity",
                format!("{} is out of range 1..=8388608", self.kernel.drop_capacity),
            ));
        }
        if !(1..=(1 << 24)).contains(&self.kernel.guard_capacity) {
            return Err(invalid(
                "[kernel] guard_capacity",
                format!(
                    "{} is out of range 1..=16777216",
                    self.kernel.guard_capacity
                ),
            ));
        }
        if !(1..=3650).contains(&self.blocking.learning_days) {
            return Err(invalid(
                "[blocking] learning_days",
                format!("{} is out of range 1..=3650", self.blocking.learning_days),
            ));
        }
        self.check_notify(path)?;
        for hook in &self.notify.webhooks {
            let ok = hook
                .url
                .parse::<hyper::Uri>()
                .is_ok_and(|u| matches!(u.scheme_str(), Some("http" | "https")));
            if !ok {
                return Err(invalid(
                    "[[notify.webhooks]] url",
                    format!("{:?} must be an http:// or https:// URL", hook.url),
                ));
            }
            if hook.secret.len() < 16 {
                return Err(invalid(
                    "[[notify.webhooks]] secret",
                    "must be at least 16 characters (it keys the HMAC signature)".into(),
                ));
            }
        }
        Ok(())
    }
}

impl Config {
    fn check_notify(&self, path: &std::path::Path) -> Result<(), ConfigError> {
        let invalid = |key: &'static str, message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            key,
            message,
        };
        let n = &self.notify;
        let base = n.action_base_url.trim_end_matches('/');
        let ok = base
            .parse::<hyper::Uri>()
            .is_ok_and(|u| matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some());
        if !ok {
            return Err(invalid(
                "[notify] action_base_url",
                format!(
                    "{:?} must be an http:// or https:// URL of the edge, like \"https://api.example.com\"",
                    n.action_base_url
                ),
            ));
        }
        let ranges: [(&'static str, u64, u64, u64); 3] = [
            ("[notify] window_secs", n.window_secs, 1, 30 * 86_400),
            (
                "[notify] action_ttl_secs",
                n.action_ttl_secs,
                60,
                30 * 86_400,
            ),
            (
                "[notify] grace_warning_secs",
                n.grace_warning_secs,
                60,
                2 * 86_400,
            ),
        ];
        for (what, v, lo, hi) in ranges {
            if !(lo..=hi).contains(&v) {
                return Err(invalid(what, format!("{v} is out of range {lo}..={hi}")));
            }
        }
        if !(1..=20).contains(&n.attempts) {
            return Err(invalid(
                "[notify] attempts",
                format!("{} is out of range 1..=20", n.attempts),
            ));
        }
        if !(n.retry_secs >= 0.01 && n.retry_secs <= 600.0) {
            return Err(invalid(
                "[notify] retry_secs",
                format!("{} is out of range 0.01..=600", n.retry_secs),
            ));
        }
        if !(1..=1_000_000).contains(&n.queue) {
            return Err(invalid(
                "[notify] queue",
                format!("{} is out of range 1..=1000000", n.queue),
            ));
        }
        if let Some(smtp) = &n.smtp {
            let port_ok = smtp
                .relay
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
            if !port_ok {
                return Err(invalid(
                    "[notify.smtp] relay",
                    format!("{:?} must be host:port, like \"127.0.0.1:25\"", smtp.relay),
                ));
            }
            for (what, addr) in std::iter::once(("[notify.smtp] from", &smtp.from))
                .chain(smtp.to.iter().map(|t| ("[notify.smtp] to", t)))
            {
                check_mailbox(addr).map_err(|m| invalid(what, m))?;
            }
        }
        Ok(())
    }
}

/// An e-mail address as notifications need it: one `local@domain`, no
/// display name, no spaces or line breaks (they would reach the headers).
pub fn check_mailbox(addr: &str) -> Result<(), String> {
    let bad = || format!("{addr:?} is not an e-mail address like ops@example.com");
    let (local, domain) = addr.rsplit_once('@').ok_or_else(bad)?;
    if local.is_empty()
        || domain.is_empty()
        || addr.len() > 254
        || addr.chars().any(|c| {
            c.is_whitespace() || c.is_control() || matches!(c, '<' | '>' | ',' | ';' | '"')
        })
    {
        return Err(bad());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Config, ConfigError> {
        Config::parse(s, Path::new("test.toml"))
    }

    #[test]
    fn empty_file_is_all_defaults() {
        let c = parse("").unwrap();
        assert_eq!(c.proxy.listen.port(), 8443);
        assert_eq!(c.admin.socket, Path::new("/run/allowlist/admin.sock"));
        assert_eq!(c.kernel.smtp_ports, vec![25, 465, 587]);
        assert!(c.kernel.enabled && c.kernel.interfaces.is_empty());
        assert_eq!(c.blocking.learning_days, 30);
    }

    #[test]
    fn spec_example_parses() {
        let c = parse(
            r#"
[proxy]
listen = "0.0.0.0:8443"
upstream = "http://127.0.0.1:8080"
trusted_proxies = ["10.0.0.0/8"]
[admin]
socket = "/run/allowlist/admin.sock"
[store]
url = "sqlite:///var/lib/allowlist/allowlist.db"
[kernel]
enabled = true
interfaces = ["eth0"]
smtp_ports = [25, 465, 587]
bpffs = "/sys/fs/bpf/allowlist"
[blocking]
learning_days = 30
[metrics]
listen = "127.0.0.1:9477"
[notify]
action_base_url = "https://127.0.0.1:8443"
[notify.smtp]
relay = "127.0.0.1:25"
from = "allowlist@localhost"
to = ["ops@localhost"]
[[notify.webhooks]]
url = "http://127.0.0.1:9000/hook"
secret = "0123456789abcdef0123"
"#,
        )
        .unwrap();
        assert_eq!(c.kernel.interfaces, vec!["eth0"]);
        assert_eq!(c.notify.webhooks.len(), 1);
    }

    #[test]
    fn errors_name_the_key_and_the_fix() {
        let e = parse("[proxy]\ntrusted_proxies = [\"203.0.113.5/24\"]")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("[proxy] trusted_proxies") && e.contains("did you mean 203.0.113.0/24?"),
            "{e}"
        );
        let e = parse("[kernel]\nbpffs = \"relative\"")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("[kernel] bpffs") && e.contains("absolute"),
            "{e}"
        );
        let e = parse("[proxy]\nupstream = \"ftp://x\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("http://"), "{e}");
        let e = parse("[proxy]\nupstream = \"https://api.internal\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("plain HTTP/1.1"), "{e}");
        let e = parse("[kernel]\nxdp_mode = \"turbo\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("xdp_mode") || e.contains("turbo"), "{e}");
        let e = parse("[kernal]\nenabled = true").unwrap_err().to_string();
        assert!(e.contains("kernal"), "{e}");
        let e = parse("[store]\nurl = \"mysql://x\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("[store] url"), "{e}");
        let e = parse("[kernel]\nsmtp_ports = [0]").unwrap_err().to_string();
        assert!(e.contains("smtp_ports"), "{e}");
    }
}
