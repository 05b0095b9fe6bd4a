//! Reading and checking a configuration: the TOML parse, then every value
//! that the types alone do not rule out, each refused with what is wrong and
//! what to write instead.

use std::path::{Path, PathBuf};

use super::*;

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
