//! API keys: create, show, revoke, rotate, and their own allowlists.

use std::sync::atomic::Ordering;

use ipnet::IpNet;

use crate::{
    api::{KeyView, NewKey},
    daemon::{Daemon, DaemonError, parse_ttl},
    policy::{self, KeyRuntime, KeyStatus, RateLimit, Scope, check_allowlist, parse_allow_entry},
    store::{AllowRecord, KeyRecord},
};

use super::State;

/// Default grace period of a rotation, and its bounds.
pub const DEFAULT_GRACE_SECS: i64 = 24 * 3600;
pub const MAX_GRACE_SECS: i64 = 48 * 3600;

fn key_view(k: &KeyRecord, runtime: Option<&KeyRuntime>, today: i64) -> KeyView {
    let mut last_used_ms = k.last_used_ms;
    let mut requests_today = if k.requests_day == today {
        k.requests_today
    } else {
        0
    };
    if let Some(rt) = runtime {
        let live = rt.last_used_ms.load(Ordering::Relaxed);
        if live > 0 {
            last_used_ms = Some(last_used_ms.unwrap_or(0).max(live));
        }
        requests_today += rt.requests.load(Ordering::Relaxed) as i64;
    }
    KeyView {
        id: k.id.clone(),
        account: k.account.clone(),
        name: k.name.clone(),
        description: k.description.clone(),
        scopes: k.scopes.clone(),
        status: k.status,
        rate: k.rate.map(|r| r.to_string()),
        allow: k.allow.clone(),
        created_at: k.created_at,
        last_used_at: last_used_ms.map(|ms| ms / 1000),
        requests_today,
        previous_secret_expires_at: k.previous.map(|(_, ms)| ms / 1000),
        key: None,
    }
}

pub(super) fn random_hex(bytes: usize) -> Result<String, DaemonError> {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf)
        .map_err(|e| DaemonError::Invalid(format!("no randomness available: {e}")))?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// A new key id (64 bits, hex) and secret (256 bits, hex).
fn new_key_material() -> Result<(String, String), DaemonError> {
    Ok((random_hex(8)?, random_hex(32)?))
}

fn parse_allow_arg(s: &str) -> Result<AllowRecord, String> {
    let (cidr, label) = match s.split_once('=') {
        Some((c, l)) => (c, l.trim().to_string()),
        None => (s, String::new()),
    };
    if label.len() > 200 {
        return Err(format!("label of {cidr} is longer than 200 characters"));
    }
    Ok(AllowRecord {
        cidr: parse_allow_entry(cidr)?,
        label,
    })
}

fn check_key_allow(allow: &[AllowRecord]) -> Result<(), DaemonError> {
    let nets: Vec<IpNet> = allow.iter().map(|a| a.cidr).collect();
    check_allowlist(&nets).map_err(DaemonError::Invalid)
}

impl Daemon {
    /// Key `id` of `account`. Another account's key is "no key", exactly
    /// like one that does not exist.
    fn find_key(&self, state: &State, account: &str, id: &str) -> Result<KeyRecord, DaemonError> {
        state
            .account(account)
            .ok_or_else(|| super::no_account(account))?
            .keys
            .get(id)
            .cloned()
            .ok_or_else(|| {
                DaemonError::NotFound(format!(
                    "no key with id {id:?}; `allowlistctl keys list` shows the ids"
                ))
            })
    }

    pub(super) fn today(&self) -> i64 {
        self.clock.now_ms() / 86_400_000
    }

    fn view(&self, k: &KeyRecord) -> KeyView {
        let runtimes = self.runtimes.lock().unwrap_or_else(|p| p.into_inner());
        key_view(k, runtimes.get(&k.id).map(|r| r.as_ref()), self.today())
    }

    pub async fn create_key(
        &self,
        account: &str,
        req: NewKey,
        actor: &str,
    ) -> Result<KeyView, DaemonError> {
        let name = req.name.trim().to_string();
        if name.is_empty() || name.len() > 100 {
            return Err(DaemonError::Invalid(
                "--name must be 1 to 100 characters, e.g. production-web-app".into(),
            ));
        }
        let mut scopes = req
            .scopes
            .iter()
            .map(|s| Scope::parse(s.trim()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(DaemonError::Invalid)?;
        if scopes.is_empty() {
            scopes.push(Scope::Full);
        }
        scopes.sort();
        scopes.dedup();
        let allow = req
            .allow
            .iter()
            .map(|a| parse_allow_arg(a))
            .collect::<Result<Vec<_>, _>>()
            .map_err(DaemonError::Invalid)?;
        check_key_allow(&allow)?;
        let rate = req
            .rate
            .as_deref()
            .map(RateLimit::parse)
            .transpose()
            .map_err(DaemonError::Invalid)?;
        let (mut id, secret) = new_key_material()?;
        // Ids are unique across accounts; 64 random bits rarely collide.
        while self.policy.load().key(&id).is_some() {
            id = random_hex(8)?;
        }
        let now = self.clock.now_ms();
        let mut record = KeyRecord {
            kid: 0,
            id: id.clone(),
            account: account.to_string(),
            name,
            description: req.description,
            scopes,
            status: KeyStatus::Active,
            secret_hash: policy::hash_secret(&secret),
            previous: None,
            rate,
            created_at: now / 1000,
            last_used_ms: None,
            requests_day: 0,
            requests_today: 0,
            allow,
        };
        let created = self
            .change(
                |st| {
                    // The store numbers keys: the kernel maps and the usage
                    // counters use the number the store keeps, and edges
                    // sharing a store never pick the same one.
                    record.kid = self.store.next_kid()?;
                    let a = st
                        .account_mut(account)
                        .ok_or_else(|| super::no_account(account))?;
                    a.keys.insert(id.clone(), record.clone());
                    Ok(())
                },
                |st| {
                    let stored = &st
                        .account(account)
                        .ok_or_else(|| super::no_account(account))?
                        .keys[&id];
                    Ok(self.store.create_key(stored, actor)?)
                },
            )
            .await?;
        tracing::info!(key = %created.id, name = %created.name, actor, "key created");
        let mut view = self.view(&created);
        view.key = Some(format!("{}_{}_{}", policy::KEY_PREFIX, id, secret));
        Ok(view)
    }

    pub fn list_keys(&self, account: &str) -> Result<Vec<KeyView>, DaemonError> {
        self.with_state(|st| {
            let a = st
                .account(account)
                .ok_or_else(|| super::no_account(account))?;
            Ok(a.keys.values().map(|k| self.view(k)).collect())
        })
    }

    pub fn show_key(&self, account: &str, id: &str) -> Result<KeyView, DaemonError> {
        self.with_state(|st| Ok(self.view(&self.find_key(st, account, id)?)))
    }

    /// Runs `edit` on one key and commits it with `action` in the audit log.
    async fn edit_key(
        &self,
        account: &str,
        id: &str,
        action: &str,
        detail: serde_json::Value,
        actor: &str,
        edit: impl FnOnce(&mut KeyRecord) -> Result<(), DaemonError>,
    ) -> Result<KeyRecord, DaemonError> {
        let current = self.with_state(|st| self.find_key(st, account, id))?;
        let mut edited = current.clone();
        edit(&mut edited)?;
        let id = id.to_string();
        let rec = edited.clone();
        self.change(
            |st| {
                st.account_mut(account)
                    .ok_or_else(|| super::no_account(account))?
                    .keys
                    .insert(id.clone(), rec);
                Ok(())
            },
            |_| Ok(self.store.update_key(&edited, action, detail, actor)?),
        )
        .await?;
        Ok(edited)
    }

    pub async fn revoke_key(
        &self,
        account: &str,
        id: &str,
        actor: &str,
    ) -> Result<KeyView, DaemonError> {
        let k = self
            .edit_key(
                account,
                id,
                "key.revoke",
                serde_json::json!({}),
                actor,
                |k| {
                    if k.status == KeyStatus::Revoked {
                        return Err(DaemonError::Invalid(format!(
                            "key {} is already revoked",
                            k.id
                        )));
                    }
                    k.status = KeyStatus::Revoked;
                    k.previous = None;
                    Ok(())
                },
            )
            .await?;
        tracing::info!(key = %k.id, actor, "key revoked");
        Ok(self.view(&k))
    }

    pub async fn rotate_key(
        &self,
        account: &str,
        id: &str,
        grace: Option<&str>,
        actor: &str,
    ) -> Result<KeyView, DaemonError> {
        let grace_secs = match grace {
            None => DEFAULT_GRACE_SECS,
            Some(g) if g.trim() == "0" || g.trim() == "0s" => 0,
            Some(g) => parse_ttl(g)
                .map_err(|e| DaemonError::Invalid(e.replace("TTL", "grace")))?
                .as_secs() as i64,
        };
        if grace_secs > MAX_GRACE_SECS {
            return Err(DaemonError::Invalid(format!(
                "--grace {} is longer than 48h; the old secret can keep working for 0 to 48 hours",
                grace.unwrap_or_default()
            )));
        }
        let (_, secret) = new_key_material()?;
        let now = self.clock.now_ms();
        let k = self
            .edit_key(
                account,
                id,
                "key.rotate",
                serde_json::json!({ "grace_secs": grace_secs }),
                actor,
                |k| {
                    if k.status == KeyStatus::Revoked {
                        return Err(DaemonError::Invalid(format!(
                            "key {} is revoked; create a new key instead",
                            k.id
                        )));
                    }
                    k.previous =
                        (grace_secs > 0).then_some((k.secret_hash, now + grace_secs * 1000));
                    k.secret_hash = policy::hash_secret(&secret);
                    k.status = if grace_secs > 0 {
                        KeyStatus::Rotating
                    } else {
                        KeyStatus::Active
                    };
                    Ok(())
                },
            )
            .await?;
        tracing::info!(key = %k.id, grace_secs, actor, "key rotated");
        let mut view = self.view(&k);
        view.key = Some(format!("{}_{}_{}", policy::KEY_PREFIX, k.id, secret));
        Ok(view)
    }

    pub async fn key_allow(
        &self,
        account: &str,
        id: &str,
        cidr: &str,
        label: Option<String>,
        actor: &str,
    ) -> Result<KeyView, DaemonError> {
        let entry = parse_allow_arg(cidr).map_err(DaemonError::Invalid)?;
        let entry = AllowRecord {
            label: label.unwrap_or(entry.label),
            ..entry
        };
        let detail = serde_json::json!({ "cidr": entry.cidr.to_string(), "label": entry.label });
        let k = self
            .edit_key(account, id, "key.allow", detail, actor, |k| {
                if k.allow.iter().any(|a| a.cidr == entry.cidr) {
                    return Err(DaemonError::Invalid(format!(
                        "{} is already in key {}'s allowlist",
                        entry.cidr, k.id
                    )));
                }
                k.allow.push(entry);
                check_key_allow(&k.allow)
            })
            .await?;
        Ok(self.view(&k))
    }

    pub async fn key_disallow(
        &self,
        account: &str,
        id: &str,
        cidr: &str,
        actor: &str,
    ) -> Result<KeyView, DaemonError> {
        let net = parse_allow_entry(cidr).map_err(DaemonError::Invalid)?;
        let k = self
            .edit_key(
                account,
                id,
                "key.disallow",
                serde_json::json!({ "cidr": net.to_string() }),
                actor,
                |k| {
                    let before = k.allow.len();
                    k.allow.retain(|a| a.cidr != net);
                    if k.allow.len() == before {
                        return Err(DaemonError::NotFound(format!(
                            "{net} is not in key {}'s allowlist",
                            k.id
                        )));
                    }
                    Ok(())
                },
            )
            .await?;
        Ok(self.view(&k))
    }
}
