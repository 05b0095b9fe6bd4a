//! "Check an address": which rule admits or refuses it, per layer, as the
//! policy in force decides now (the same snapshot the edge reads).

use std::net::IpAddr;

use ipnet::IpNet;

use crate::{
    api::{AddressCheck, Verdict},
    daemon::{Daemon, DaemonError, no_account},
    policy::{self, Admit, ApiMode, SmtpMode},
};

fn verdict(admitted: bool, rule: String) -> Verdict {
    Verdict { admitted, rule }
}

impl Daemon {
    pub fn check_address(
        &self,
        account: &str,
        addr: &str,
        key: Option<&str>,
    ) -> Result<AddressCheck, DaemonError> {
        let parsed: IpAddr = addr.trim().parse().map_err(|_| {
            DaemonError::Invalid(format!(
                "{addr:?} is not an IP address; write it like 203.0.113.7 or 2001:db8::7"
            ))
        })?;
        let addr = policy::normalize(parsed);
        let snap = self.policy.load();
        let a = snap
            .account_named(account)
            .ok_or_else(|| no_account(account))?;
        let listed = a.list.longest_match(addr);
        let entry_words = |net: IpNet| -> String {
            let (label, shared_by) = self.with_state(|st| {
                if let Some(e) = st.account(account).and_then(|s| s.authorized.get(&net)) {
                    return (e.label.clone(), None);
                }
                let org = st.parent_of(account);
                let shared = org.and_then(|o| o.shared().find(|e| e.cidr == net).cloned());
                (
                    shared.map(|e| e.label).unwrap_or_default(),
                    org.map(|o| o.record.name.clone()),
                )
            });
            let mut w = format!("authorized entry {net}");
            if !label.is_empty() {
                w.push_str(&format!(" ({label})"));
            }
            if let Some(org) = shared_by {
                w.push_str(&format!(", shared by {org}"));
            }
            w
        };
        let always = snap.always_allow.longest_match(addr);
        let denied = a.denied.contains(&policy::source_unit(addr));
        let api = if let Some(net) = always {
            verdict(true, format!("[blocking] always_allow {net}"))
        } else if denied {
            verdict(
                false,
                format!("{addr} was denied; authorizing it lifts the denial"),
            )
        } else {
            match (a.api, listed) {
                (_, Some(net)) => verdict(true, entry_words(net)),
                (ApiMode::Active, None) => verdict(
                    false,
                    format!("API blocking is active and no authorized entry covers {addr}"),
                ),
                (ApiMode::Learning, None) => verdict(
                    true,
                    format!(
                        "API blocking is learning: a keyed call from it would authorize {}",
                        policy::learned_network(addr)
                    ),
                ),
                (ApiMode::Inactive, None) => {
                    verdict(true, "API blocking is inactive: any address passes".into())
                }
            }
        };
        let smtp = if let Some(net) = always {
            verdict(true, format!("[blocking] always_allow {net}"))
        } else {
            match (a.smtp, listed) {
                (SmtpMode::Inactive, _) => {
                    verdict(true, "SMTP blocking is inactive: any address passes".into())
                }
                (SmtpMode::Active, Some(net)) => verdict(true, entry_words(net)),
                (SmtpMode::Active, None) => verdict(
                    false,
                    format!("SMTP blocking is active and no authorized entry covers {addr}"),
                ),
            }
        };
        let key = match key.map(str::trim).filter(|k| !k.is_empty()) {
            None => None,
            Some(id) => {
                let k = snap
                    .key(id)
                    .filter(|k| snap.account_of(k).is_some_and(|o| o.idx == a.idx))
                    .ok_or_else(|| {
                        DaemonError::NotFound(format!(
                            "no key {id:?} in account {account}; `allowlistctl keys list` shows them"
                        ))
                    })?;
                Some(if !k.usable() {
                    verdict(false, format!("key {id} is {:?}", k.status).to_lowercase())
                } else {
                    match k.admits(addr) {
                        Admit::Any => verdict(
                            true,
                            format!("key {id} has an empty allowlist: any address"),
                        ),
                        Admit::Entry(net) => {
                            let label = self.with_state(|st| {
                                st.account(account)
                                    .and_then(|s| s.keys.get(id))
                                    .and_then(|k| k.allow.iter().find(|e| e.cidr == net))
                                    .map(|e| e.label.clone())
                                    .unwrap_or_default()
                            });
                            let mut w = format!("key {id}'s allowlist entry {net}");
                            if !label.is_empty() {
                                w.push_str(&format!(" ({label})"));
                            }
                            verdict(true, w)
                        }
                        Admit::Refused => verdict(
                            false,
                            format!("no entry of key {id}'s allowlist covers {addr}"),
                        ),
                    }
                })
            }
        };
        Ok(AddressCheck {
            addr,
            account: account.to_string(),
            api,
            smtp,
            key,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::{
        api::NewKey,
        config::Config,
        daemon::{Authorize, Clock},
        store::{SqliteStore, Store},
    };

    /// A daemon on a fresh store (kernel off), `config` edited first.
    fn daemon(edit: impl FnOnce(&mut Config)) -> (tempfile::TempDir, Daemon) {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("a.db");
        let mut config = Config::default();
        config.store.url = format!("sqlite://{}", db.display());
        edit(&mut config);
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&db).unwrap());
        let d = Daemon::new(config, store, None, Clock::from_env()).unwrap();
        d.init_policy().unwrap();
        (dir, d)
    }

    /// Creates a key in `default` allowed from `allow`; returns (id, secret).
    async fn key(d: &Daemon, allow: &[&str]) -> (String, String) {
        let k = d
            .create_key(
                "default",
                NewKey {
                    name: "web".into(),
                    description: String::new(),
                    scopes: vec![],
                    allow: allow.iter().map(|a| a.to_string()).collect(),
                    rate: None,
                },
                "uid:0",
            )
            .await
            .unwrap();
        (k.id, k.key.unwrap())
    }

    async fn authorize(d: &Daemon, cidr: &str, label: Option<&str>) {
        let req = Authorize {
            cidr,
            label: label.map(String::from),
            source: "manual",
            key_id: None,
            share: false,
        };
        d.authorize("default", req, "uid:0").await.unwrap();
    }

    #[tokio::test]
    async fn each_layer_names_the_rule_that_decides() {
        let (_dir, d) = daemon(|c| c.blocking.always_allow = vec!["192.0.2.0/28".parse().unwrap()]);
        let (key, _) = key(&d, &["203.0.113.0/24=office"]).await;
        authorize(&d, "198.51.100.0/24", Some("branch")).await;
        let c = d
            .check_address("default", "198.51.100.9", Some(&key))
            .unwrap();
        assert!(c.api.admitted, "{c:?}");
        assert_eq!(c.api.rule, "authorized entry 198.51.100.0/24 (branch)");
        let k = c.key.unwrap();
        assert!(!k.admitted);
        assert!(k.rule.contains("no entry of key"), "{k:?}");
        let c = d
            .check_address("default", "203.0.113.5", Some(&key))
            .unwrap();
        assert!(c.key.as_ref().unwrap().admitted);
        assert!(c.key.unwrap().rule.ends_with("203.0.113.0/24 (office)"));
        // Learning (the default): admitted, and what it would learn.
        assert!(
            c.api.admitted && c.api.rule.contains("203.0.113.0/24"),
            "{:?}",
            c.api
        );
        d.set_api_blocking("default", ApiMode::Active, true, "uid:0")
            .await
            .unwrap();
        let c = d.check_address("default", "203.0.113.5", None).unwrap();
        assert!(!c.api.admitted);
        assert!(c.api.rule.contains("API blocking is active"), "{:?}", c.api);
        assert!(c.smtp.admitted, "SMTP blocking is inactive");
        let c = d.check_address("default", "192.0.2.3", None).unwrap();
        assert!(c.api.admitted && c.api.rule.contains("always_allow"));
        assert!(matches!(
            d.check_address("default", "not-an-ip", None),
            Err(DaemonError::Invalid(m)) if m.contains("not an IP address")
        ));
        assert!(matches!(
            d.check_address("default", "192.0.2.3", Some("0000000000000000")),
            Err(DaemonError::NotFound(_))
        ));
        assert!(matches!(
            d.check_address("nope", "192.0.2.3", None),
            Err(DaemonError::NotFound(_))
        ));
    }

    #[tokio::test]
    async fn an_entrys_hits_are_counted_flushed_and_forgotten_with_it() {
        let (_dir, d) = daemon(|_| {});
        let (_, secret) = key(&d, &[]).await;
        for cidr in ["198.51.100.0/24", "198.51.100.7"] {
            authorize(&d, cidr, None).await;
        }
        let call = |addr: &str, at: i64| {
            let dec = d
                .policy
                .load()
                .decide(Some(&secret), "GET", "/", addr.parse().unwrap(), at);
            assert!(dec.allowed(), "{:?}", dec.reason);
        };
        let hits = |cidr: &str| {
            let list = d.list_authorized("default").unwrap();
            let v = list
                .iter()
                .find(|v| v.entry.cidr.to_string() == cidr)
                .unwrap();
            (v.hits, v.last_seen_at)
        };
        call("198.51.100.9", 5_000);
        call("198.51.100.9", 7_000);
        // The longest entry admits: the /32, not the /24.
        call("198.51.100.7", 6_000);
        assert_eq!(hits("198.51.100.0/24"), (2, Some(7)));
        assert_eq!(hits("198.51.100.7/32"), (1, Some(6)));
        d.flush_usage().unwrap();
        call("198.51.100.10", 9_000);
        assert_eq!(hits("198.51.100.0/24"), (3, Some(9)), "flushed plus live");
        // Another change to the account keeps the counters.
        authorize(&d, "203.0.113.0/24", None).await;
        assert_eq!(hits("198.51.100.0/24"), (3, Some(9)));
        d.flush_usage().unwrap();
        d.unauthorize("default", "198.51.100.0/24", "uid:0")
            .await
            .unwrap();
        authorize(&d, "198.51.100.0/24", None).await;
        assert_eq!(
            hits("198.51.100.0/24"),
            (0, None),
            "authorized again: from zero"
        );
    }
}
