//! SIGHUP: the configuration file is read again and what can change while
//! the daemon runs is applied, section by section; whatever else changed is
//! named in the log as needing a restart. An unreadable or invalid file,
//! or a certificate that does not load, changes nothing.
//!
//! This sits above the daemon, the edge and the admin listener (it swaps
//! their certificates and the daemon's settings), at the level of the
//! binary's wiring.
//!
//! A section becomes reloadable by listing its keys in [`LIVE`] and
//! applying them in a step of [`Reloader::apply`] that takes the old and
//! new configuration and records what it did in the [`Report`].

use std::{collections::BTreeSet, net::SocketAddr, path::PathBuf, sync::Arc};

use rustls::sign::CertifiedKey;

use crate::{config::Config, daemon::Daemon, logs::Retention, proxy::CertStore};

/// The keys a reload applies while the daemon runs, by section. Every
/// other key that changed needs a restart.
pub const LIVE: &[(&str, &[&str])] = &[
    ("proxy", &["cert", "key", "trusted_proxies"]),
    ("admin", &["cert", "key"]),
    ("logs", &["retention_days"]),
    (
        "notify",
        &[
            "action_base_url",
            "window_secs",
            "action_ttl_secs",
            "grace_warning_secs",
            "attempts",
            "retry_secs",
            "queue",
            "smtp",
            "webhooks",
        ],
    ),
];

fn is_live(section: &str, key: &str) -> bool {
    LIVE.iter()
        .any(|(s, keys)| *s == section && keys.contains(&key))
}

/// What one reload did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// What was applied, like `[proxy] trusted_proxies`.
    pub applied: Vec<String>,
    /// Keys whose new value takes effect only after a restart, like
    /// `[proxy] listen`.
    pub restart: Vec<String>,
    /// Live settings that could not be applied (the old value stays), with
    /// the reason.
    pub failed: Vec<String>,
    /// SHA-256 of the certificates now served, when they were (re)loaded.
    pub edge_sha256: Option<String>,
    pub admin_sha256: Option<String>,
}

/// What a reload changes, handed over by the binary once everything runs.
pub struct Reloader {
    /// The configuration file, and whether it was named explicitly (a
    /// missing default file means all defaults).
    pub path: PathBuf,
    pub explicit: bool,
    pub daemon: Arc<Daemon>,
    /// The edge's certificate.
    pub edge_certs: Arc<CertStore>,
    /// The admin TLS listener's certificate and address, when it listens.
    pub admin_certs: Option<(Arc<CertStore>, SocketAddr)>,
    /// The usage-log writer's retention, when it runs.
    pub log_retention: Option<Arc<Retention>>,
}

/// Certificates read before anything changes.
struct Loaded {
    edge: Option<(CertifiedKey, String)>,
    admin: Option<(CertifiedKey, String)>,
}

impl Reloader {
    /// Reads the file again and applies it over `running` (the
    /// configuration in force); returns the one in force afterwards, and
    /// logs what happened in one line.
    pub async fn reload(&self, running: &Config) -> Config {
        let new = match Config::load(&self.path, self.explicit) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(
                    error = %e,
                    "SIGHUP: configuration not reloaded; the one in force stays"
                );
                return running.clone();
            }
        };
        match self.apply(running, &new).await {
            Ok((in_force, report)) => {
                for f in &report.failed {
                    tracing::error!(
                        "SIGHUP: {f}; the value in force stays (fix it and send SIGHUP again)"
                    );
                }
                tracing::info!(
                    path = %self.path.display(),
                    applied = %list(&report.applied),
                    restart_needed = %list(&report.restart),
                    edge_sha256 = report.edge_sha256.as_deref().unwrap_or("unchanged"),
                    admin_sha256 = report.admin_sha256.as_deref().unwrap_or("unchanged"),
                    "SIGHUP: configuration reloaded"
                );
                in_force
            }
            Err(e) => {
                tracing::error!(
                    error = %e,
                    "SIGHUP: configuration not reloaded; the one in force stays"
                );
                running.clone()
            }
        }
    }

    /// Applies `new` over `old`, section by section. Returns the
    /// configuration now in force: `old` with what was applied replaced.
    pub async fn apply(&self, old: &Config, new: &Config) -> Result<(Config, Report), String> {
        let loaded = self.load_certificates(old, new)?;
        let mut in_force = old.clone();
        let mut report = Report::default();
        self.proxy(old, new, loaded.edge, &mut in_force, &mut report)
            .await;
        self.admin(new, loaded.admin, &mut in_force, &mut report);
        self.logs(old, new, &mut in_force, &mut report);
        self.notify(old, new, &mut in_force, &mut report);
        report.restart = changed_keys(&in_force, new)
            .into_iter()
            .filter(|(s, k)| !is_live(s, k))
            .map(|(s, k)| format!("[{s}] {k}"))
            .collect();
        Ok((in_force, report))
    }

    /// Reads every certificate `new` names, so that one that does not load
    /// refuses the whole reload before anything has changed. Configured
    /// files are read again even when their paths did not change: that is
    /// how a renewed certificate is picked up.
    fn load_certificates(&self, old: &Config, new: &Config) -> Result<Loaded, String> {
        let edge = match (&new.proxy.cert, &new.proxy.key) {
            (None, None) if old.proxy.cert.is_none() => None,
            // Still on the listener it was bound to: `listen` needs a restart.
            (cert, key) => Some(
                crate::proxy::load_cert(cert.as_deref(), key.as_deref(), old.proxy.listen)
                    .map_err(|e| e.to_string())?,
            ),
        };
        let admin = match &self.admin_certs {
            Some((_, addr)) => {
                let mut view = old.clone();
                view.admin.cert = new.admin.cert.clone();
                view.admin.key = new.admin.key.clone();
                Some(crate::admin::load_admin_cert(&view, *addr).map_err(|e| format!("{e:#}"))?)
            }
            None => None,
        };
        Ok(Loaded { edge, admin })
    }

    /// `[proxy]`: the edge certificate and the trusted proxies.
    async fn proxy(
        &self,
        old: &Config,
        new: &Config,
        cert: Option<(CertifiedKey, String)>,
        in_force: &mut Config,
        report: &mut Report,
    ) {
        if let Some((ck, fingerprint)) = cert {
            self.edge_certs.replace(ck, fingerprint.clone());
            report.edge_sha256 = Some(fingerprint);
            in_force.proxy.cert = new.proxy.cert.clone();
            in_force.proxy.key = new.proxy.key.clone();
            report.applied.push("[proxy] cert".into());
        }
        if new.proxy.trusted_proxies != old.proxy.trusted_proxies {
            match self
                .daemon
                .set_trusted_proxies(new.proxy.trusted_proxies.clone())
                .await
            {
                Ok(()) => {
                    in_force.proxy.trusted_proxies = new.proxy.trusted_proxies.clone();
                    report.applied.push("[proxy] trusted_proxies".into());
                }
                Err(e) => report
                    .failed
                    .push(format!("[proxy] trusted_proxies not applied: {e}")),
            }
        }
    }

    /// `[admin]`: the TLS listener's certificate.
    fn admin(
        &self,
        new: &Config,
        cert: Option<(CertifiedKey, String)>,
        in_force: &mut Config,
        report: &mut Report,
    ) {
        // Not listening: the files are only read at the next start.
        in_force.admin.cert = new.admin.cert.clone();
        in_force.admin.key = new.admin.key.clone();
        if let (Some((certs, _)), Some((ck, fingerprint))) = (&self.admin_certs, cert) {
            certs.replace(ck, fingerprint.clone());
            report.admin_sha256 = Some(fingerprint);
            report.applied.push("[admin] cert".into());
        }
    }

    /// `[logs]`: how many days of usage logs are kept.
    fn logs(&self, old: &Config, new: &Config, in_force: &mut Config, report: &mut Report) {
        if new.logs.retention_days == old.logs.retention_days {
            return;
        }
        in_force.logs.retention_days = new.logs.retention_days;
        if let Some(r) = &self.log_retention {
            r.set(new.logs.retention_days);
            report.applied.push(format!(
                "[logs] retention_days ({} -> {})",
                old.logs.retention_days, new.logs.retention_days
            ));
        }
    }
}

impl Reloader {
    /// `[notify]`: relay, recipients, webhooks, windows and retries, for
    /// every notice from now on (deliveries in flight keep theirs).
    fn notify(&self, old: &Config, new: &Config, in_force: &mut Config, report: &mut Report) {
        let changed: Vec<String> = changed_keys(old, new)
            .into_iter()
            .filter(|(s, _)| s == "notify")
            .map(|(_, k)| format!("[notify] {k}"))
            .collect();
        if changed.is_empty() {
            return;
        }
        in_force.notify = new.notify.clone();
        self.daemon
            .notify_config
            .store(Arc::new(new.notify.clone()));
        report.applied.extend(changed);
    }
}

fn list(items: &[String]) -> String {
    if items.is_empty() {
        "none".into()
    } else {
        items.join(", ")
    }
}

/// The (section, key) pairs whose values differ between `a` and `b`, in
/// order. A nested table (`[notify.smtp]`) counts as one key of its
/// section.
pub fn changed_keys(a: &Config, b: &Config) -> Vec<(String, String)> {
    let (Ok(a), Ok(b)) = (toml::Table::try_from(a), toml::Table::try_from(b)) else {
        // Every field serializes; should that ever break, say so rather
        // than report nothing changed.
        return vec![("configuration".into(), "(could not be compared)".into())];
    };
    let empty = toml::Table::new();
    let table = |t: &toml::Table, s: &str| -> toml::Table {
        t.get(s)
            .and_then(toml::Value::as_table)
            .cloned()
            .unwrap_or_else(|| empty.clone())
    };
    let sections: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    let mut out = Vec::new();
    for s in sections {
        let (ta, tb) = (table(&a, s), table(&b, s));
        let keys: BTreeSet<&String> = ta.keys().chain(tb.keys()).collect();
        for k in keys {
            if ta.get(k) != tb.get(k) {
                out.push((s.clone(), k.clone()));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn parse(s: &str) -> Config {
        Config::parse(s, Path::new("test.toml")).unwrap()
    }

    #[test]
    fn changed_keys_name_the_section_and_the_key() {
        let a = parse("[proxy]\nlisten = \"127.0.0.1:8443\"\n");
        let b = parse(
            "[proxy]\nlisten = \"127.0.0.1:9443\"\ntrusted_proxies = [\"10.0.0.0/8\"]\n\
             [logs]\nretention_days = 7\n[notify.smtp]\nrelay = \"127.0.0.1:25\"\n\
             from = \"a@b\"\nto = [\"c@d\"]\n",
        );
        assert_eq!(
            changed_keys(&a, &b),
            [
                ("logs", "retention_days"),
                ("notify", "smtp"),
                ("proxy", "listen"),
                ("proxy", "trusted_proxies"),
            ]
            .map(|(s, k)| (s.to_string(), k.to_string()))
        );
        assert!(changed_keys(&a, &a.clone()).is_empty());
        // An optional key set in one and absent in the other.
        let c = parse("[metrics]\n");
        let mut d = c.clone();
        d.metrics.listen = None;
        assert_eq!(
            changed_keys(&c, &d),
            [("metrics".to_string(), "listen".to_string())]
        );
    }

    #[test]
    fn only_the_listed_keys_are_live() {
        assert!(is_live("proxy", "trusted_proxies"));
        assert!(is_live("logs", "retention_days"));
        assert!(!is_live("proxy", "listen"));
        assert!(!is_live("logs", "dir"));
        assert!(!is_live("kernel", "interfaces"));
    }
}
