//! Keys, the account's authorized list, the unauthorized list and blocking
//! modes: the operations behind `allowlistctl keys|ips|blocking`.
//!
//! Every change follows one path: compute the new state in memory, build a
//! policy snapshot from it, write the kernel maps (a change that does not
//! fit is refused here, before anything is stored), commit to the store,
//! then swap the snapshot in. If the commit fails the kernel goes back to
//! the old state. Readers (the proxy) only ever see whole snapshots.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, atomic::Ordering},
    time::Instant,
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::{
    daemon::{Daemon, DaemonError, parse_ttl},
    flood::ApiGuardMode,
    kernel::KeySpec,
    policy::{
        self, ApiMode, KeyPolicy, KeyRuntime, KeyStatus, PrefixSet, RateLimit, Scope, Snapshot,
        check_allowlist, parse_allow_entry,
    },
    store::{
        AllowRecord, ApiBlocking, AuthorizedRecord, BlockingState, KeyRecord, SmtpBlocking,
        UnauthorizedRecord,
    },
};

pub use crate::state::State;

/// Default grace period of a rotation, and its bounds.
pub const DEFAULT_GRACE_SECS: i64 = 24 * 3600;
pub const MAX_GRACE_SECS: i64 = 48 * 3600;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewKey {
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub scopes: Vec<String>,
    /// `CIDR` or `CIDR=LABEL`.
    #[serde(default)]
    pub allow: Vec<String>,
    #[serde(default)]
    pub rate: Option<String>,
}

/// A key as the admin API shows it (never the secret, except `key` once).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KeyView {
    pub id: String,
    pub name: String,
    pub description: String,
    pub scopes: Vec<Scope>,
    pub status: KeyStatus,
    pub rate: Option<String>,
    pub allow: Vec<AllowRecord>,
    pub created_at: i64,
    pub last_used_at: Option<i64>,
    pub requests_today: i64,
    /// Unix seconds when the previous secret stops working, while rotating.
    pub previous_secret_expires_at: Option<i64>,
    /// The plaintext key: only in the answer to `create` and `rotate`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

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

fn random_hex(bytes: usize) -> Result<String, DaemonError> {
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
    pub(crate) fn load_state(&self) -> Result<State, DaemonError> {
        Ok(State {
            keys: self
                .store
                .list_keys()?
                .into_iter()
                .map(|k| (k.id.clone(), k))
                .collect(),
            authorized: self
                .store
                .list_authorized()?
                .into_iter()
                .map(|a| (a.cidr, a))
                .collect(),
            blocking: self.store.blocking()?,
            denied: self
                .store
                .list_unauthorized()?
                .into_iter()
                .filter(|u| u.status == "denied")
                .map(|u| u.addr)
                .collect(),
        })
    }

    /// Builds the policy snapshot of `state`.
    pub fn snapshot_of(&self, state: &State) -> Snapshot {
        let mut runtimes = self.runtimes.lock().unwrap_or_else(|p| p.into_inner());
        let mut keys = HashMap::with_capacity(state.keys.len());
        for k in state.keys.values() {
            let runtime = runtimes.entry(k.id.clone()).or_default().clone();
            keys.insert(
                policy::id_key(&k.id),
                Arc::new(KeyPolicy {
                    id: k.id.clone(),
                    kid: k.kid,
                    name: k.name.clone(),
                    status: k.status,
                    scopes: policy::ScopeSet::of(&k.scopes),
                    secret_hash: k.secret_hash,
                    previous: k.previous,
                    allow: k.allow.iter().map(|a| a.cidr).collect(),
                    rate: k.rate,
                    runtime,
                }),
            );
        }
        runtimes.retain(|id, _| state.keys.contains_key(id));
        let account_list: Vec<IpNet> = state.authorized.keys().copied().collect();
        Snapshot {
            keys,
            api: Some(match state.blocking.api {
                ApiBlocking::Learning => ApiMode::Learning,
                ApiBlocking::Active => ApiMode::Active,
                ApiBlocking::Inactive => ApiMode::Inactive,
            }),
            account: PrefixSet::new(account_list.iter().copied()),
            account_list,
            always_allow: PrefixSet::new(self.config.blocking.always_allow.iter().copied()),
            always_allow_list: self.config.blocking.always_allow.clone(),
            denied: state.denied.iter().copied().collect(),
            trusted_list: self.config.proxy.trusted_proxies.clone(),
            routes: policy::RouteScopes::default(),
        }
    }

    /// Writes what `snap` and `state` mean for the kernel: per-key
    /// allowlists and, for services whose blocking is active, the guard.
    pub(crate) fn sync_policy_kernel(
        &self,
        state: &State,
        snap: &Snapshot,
    ) -> Result<(), DaemonError> {
        let Some(mut k) = self.kernel() else {
            return Ok(());
        };
        let specs: Vec<KeySpec> = state
            .keys
            .values()
            .map(|key| KeySpec {
                kid: key.kid,
                revoked: key.status == KeyStatus::Revoked,
                allow: key.allow.iter().map(|a| a.cidr).collect(),
            })
            .collect();
        k.sync_keys(&specs)?;
        let mut ports = Vec::new();
        if state.blocking.api == ApiBlocking::Active && self.api_guard_wanted() {
            ports.push((
                allowlist_common::PROTO_TCP,
                self.config.proxy.listen.port(),
                allowlist_common::SERVICE_API,
            ));
        }
        if state.blocking.smtp == SmtpBlocking::Active {
            for p in &self.config.kernel.smtp_ports {
                ports.push((
                    allowlist_common::PROTO_TCP,
                    *p,
                    allowlist_common::SERVICE_SMTP,
                ));
            }
        }
        let unions = [
            (allowlist_common::SERVICE_API, snap.api_guard_union()),
            (allowlist_common::SERVICE_SMTP, snap.smtp_guard_union()),
        ];
        k.sync_guard(&unions, &ports)?;
        Ok(())
    }

    /// Applies a change: `edit` computes the new state, `persist` commits it.
    /// Returns what `persist` returned.
    pub(crate) async fn change<T>(
        &self,
        edit: impl FnOnce(&mut State) -> Result<(), DaemonError>,
        persist: impl FnOnce(&State) -> Result<T, DaemonError>,
    ) -> Result<T, DaemonError> {
        let _guard = self.changes.lock().await;
        let started = Instant::now();
        // One copy: the current state stays in place until the swap below,
        // which is where a rollback reads it.
        let mut new = self.with_state(State::clone);
        edit(&mut new)?;
        let snap = self.snapshot_of(&new);
        if let Err(e) = self.sync_policy_kernel(&new, &snap) {
            // Each map family undoes its own failed write; one family may
            // have landed before another failed, so put the old policy
            // back whole.
            let restored = self.with_state(|old| {
                let old_snap = self.snapshot_of(old);
                self.sync_policy_kernel(old, &old_snap)
            });
            if let Err(k) = restored {
                tracing::error!(error = %k, "restoring the kernel maps after a failed change");
            }
            return Err(e);
        }
        let out = match persist(&new) {
            Ok(out) => out,
            Err(e) => {
                let restored = self.with_state(|old| {
                    let old_snap = self.snapshot_of(old);
                    self.sync_policy_kernel(old, &old_snap)
                });
                if let Err(k) = restored {
                    tracing::error!(error = %k, "restoring the kernel maps after a store failure");
                }
                return Err(e);
            }
        };
        self.policy.store(Arc::new(snap));
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = new;
        self.recheck_connections();
        tracing::debug!(
            elapsed_us = started.elapsed().as_micros() as u64,
            "policy change enforced"
        );
        Ok(out)
    }

    /// Closes (with an RST) every live proxy connection whose key the
    /// current policy no longer admits from that peer. The kernel already
    /// stops its packets; this releases the socket at once.
    pub fn recheck_connections(&self) {
        // Test builds only: show that the kernel alone stops the packets.
        #[cfg(feature = "test-hooks")]
        if std::env::var_os("ALLOWLIST_TEST_KERNEL_CUT_ONLY").is_some() {
            return;
        }
        let snap = self.policy.load();
        let live: Vec<Arc<crate::live::LiveConn>> = self
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        for conn in live {
            let Some(key_id) = conn.key_id() else {
                continue;
            };
            // Behind an L7 balancer: the client of the connection's latest
            // request, not the balancer.
            let client = conn.checked_client();
            let admitted = snap.key(&key_id).is_some_and(|k| snap.admits(k, client));
            if !admitted {
                tracing::info!(%client, key = %key_id, "cutting a live connection: the policy no longer admits it");
                conn.cut();
            }
        }
    }

    /// Whether `[kernel] api_guard` wants the API port guarded now (API
    /// blocking active is checked by the caller).
    fn api_guard_wanted(&self) -> bool {
        match self.config.kernel.api_guard {
            ApiGuardMode::On => true,
            ApiGuardMode::Off => false,
            ApiGuardMode::Auto => self.defense.api_armed(),
        }
    }

    /// What `stats` says about the API guard.
    pub fn api_guard_state(&self) -> crate::api::ApiGuardState {
        let mode = self.config.kernel.api_guard;
        let active = self.with_state(|st| st.blocking.api == ApiBlocking::Active);
        let (armed, reason) = match (self.kernel().is_some(), active, mode) {
            (false, _, _) => (false, "kernel enforcement is off".to_string()),
            (_, false, _) => (false, "API blocking is not active".to_string()),
            (_, true, ApiGuardMode::Off) => (false, "api_guard = off".to_string()),
            (_, true, ApiGuardMode::On) => (
                true,
                "api_guard = on and API blocking is active".to_string(),
            ),
            (_, true, ApiGuardMode::Auto) => {
                let why = self.defense.reason();
                let armed = self.defense.api_armed();
                let why = if why.is_empty() {
                    "api_guard = auto: no connection flood seen".to_string()
                } else {
                    format!("api_guard = auto: {why}")
                };
                (armed, why)
            }
        };
        crate::api::ApiGuardState {
            mode: mode.as_str().into(),
            armed,
            reason,
        }
    }

    /// Arms or disarms the API guard (`auto` mode) and writes the guard
    /// ports to the kernel when that changes.
    pub async fn set_api_guard(&self, armed: bool, why: String) -> Result<(), DaemonError> {
        if !self.defense.set_api_armed(armed, why.clone()) {
            return Ok(());
        }
        tracing::info!(armed, reason = %why, "API guard");
        let _guard = self.changes.lock().await;
        let snap = self.policy.load();
        self.with_state(|st| self.sync_policy_kernel(st, &snap))
    }

    /// Writes the guard drops gathered from kernel events to the
    /// unauthorized list (API while armed, SMTP always).
    pub fn flush_guard_drops(&self) -> Result<(), DaemonError> {
        let batch = self.defense.take_guard_drops();
        if batch.is_empty() {
            return Ok(());
        }
        let evicted = self
            .store
            .record_unauthorized(&batch, self.config.blocking.unauthorized_max)?;
        self.unauthorized_evicted
            .fetch_add(evicted, Ordering::Relaxed);
        Ok(())
    }

    /// Counts refusals per source and promotes those that keep failing to
    /// the drop list, with an expiry that doubles each time one returns.
    pub async fn note_refusals(&self, refused: &[(IpAddr, u64)]) {
        let k = &self.config.kernel;
        let now = self.clock.now_ms() / 1000;
        let promote = self.defense.failures(
            refused,
            now,
            k.promote_after,
            k.promote_window_secs,
            k.promote_ttl_secs,
        );
        for (source, secs) in promote {
            let cidr = match source {
                IpAddr::V4(a) => a.to_string(),
                IpAddr::V6(a) => format!("{a}/64"),
            };
            let req = crate::api::AddDrop {
                cidr: cidr.clone(),
                ttl: Some(format!("{secs}s")),
                reason: Some(format!(
                    "promoted: {} refusals within {} s",
                    k.promote_after, k.promote_window_secs
                )),
            };
            match self
                .add_drop_kind(req, crate::store::DropKind::Auto, "promotion")
                .await
            {
                Ok(_) => {
                    tracing::info!(%cidr, ttl_secs = secs, "promoted a source that keeps failing to the drop list")
                }
                Err(e) => tracing::warn!(%cidr, error = %e, "promoting a source to the drop list"),
            }
        }
    }

    /// Loads the store into memory, the snapshot and the kernel (at start).
    pub fn init_policy(&self) -> Result<(), DaemonError> {
        let state = self.load_state()?;
        let snap = self.snapshot_of(&state);
        self.sync_policy_kernel(&state, &snap)?;
        self.policy.store(Arc::new(snap));
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = state;
        Ok(())
    }

    /// Reads the in-memory state in place (never copies it: at 100k keys a
    /// copy is tens of milliseconds).
    pub(crate) fn with_state<R>(&self, f: impl FnOnce(&State) -> R) -> R {
        f(&self.state.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn find_key(&self, state: &State, id: &str) -> Result<KeyRecord, DaemonError> {
        state.keys.get(id).cloned().ok_or_else(|| {
            DaemonError::NotFound(format!(
                "no key with id {id:?}; `allowlistctl keys list` shows the ids"
            ))
        })
    }

    fn today(&self) -> i64 {
        self.clock.now_ms() / 86_400_000
    }

    fn view(&self, k: &KeyRecord) -> KeyView {
        let runtimes = self.runtimes.lock().unwrap_or_else(|p| p.into_inner());
        key_view(k, runtimes.get(&k.id).map(|r| r.as_ref()), self.today())
    }

    pub async fn create_key(&self, req: NewKey, actor: &str) -> Result<KeyView, DaemonError> {
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
        let (id, secret) = new_key_material()?;
        let now = self.clock.now_ms();
        let mut record = KeyRecord {
            kid: 0,
            id: id.clone(),
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
                    record.kid = st.keys.values().map(|k| k.kid).max().unwrap_or(0) + 1;
                    st.keys.insert(id.clone(), record.clone());
                    Ok(())
                },
                |st| Ok(self.store.create_key(&st.keys[&id], actor)?),
            )
            .await?;
        tracing::info!(key = %created.id, name = %created.name, actor, "key created");
        let mut view = self.view(&created);
        view.key = Some(format!("{}_{}_{}", policy::KEY_PREFIX, id, secret));
        Ok(view)
    }

    pub fn list_keys(&self) -> Vec<KeyView> {
        self.with_state(|st| st.keys.values().map(|k| self.view(k)).collect())
    }

    pub fn show_key(&self, id: &str) -> Result<KeyView, DaemonError> {
        self.with_state(|st| Ok(self.view(&self.find_key(st, id)?)))
    }

    /// Runs `edit` on one key and commits it with `action` in the audit log.
    async fn edit_key(
        &self,
        id: &str,
        action: &str,
        detail: serde_json::Value,
        actor: &str,
        edit: impl FnOnce(&mut KeyRecord) -> Result<(), DaemonError>,
    ) -> Result<KeyRecord, DaemonError> {
        let current = self.with_state(|st| self.find_key(st, id))?;
        let mut edited = current.clone();
        edit(&mut edited)?;
        let id = id.to_string();
        let rec = edited.clone();
        self.change(
            |st| {
                st.keys.insert(id.clone(), rec);
                Ok(())
            },
            |st| {
                Ok(self
                    .store
                    .update_key(&st.keys[&id], action, detail, actor)?)
            },
        )
        .await?;
        Ok(edited)
    }

    pub async fn revoke_key(&self, id: &str, actor: &str) -> Result<KeyView, DaemonError> {
        let k = self
            .edit_key(id, "key.revoke", serde_json::json!({}), actor, |k| {
                if k.status == KeyStatus::Revoked {
                    return Err(DaemonError::Invalid(format!(
                        "key {} is already revoked",
                        k.id
                    )));
                }
                k.status = KeyStatus::Revoked;
                k.previous = None;
                Ok(())
            })
            .await?;
        tracing::info!(key = %k.id, actor, "key revoked");
        Ok(self.view(&k))
    }

    pub async fn rotate_key(
        &self,
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
            .edit_key(id, "key.allow", detail, actor, |k| {
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
        id: &str,
        cidr: &str,
        actor: &str,
    ) -> Result<KeyView, DaemonError> {
        let net = parse_allow_entry(cidr).map_err(DaemonError::Invalid)?;
        let k = self
            .edit_key(
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

    pub fn list_authorized(&self) -> Vec<AuthorizedRecord> {
        self.with_state(|st| st.authorized.values().cloned().collect())
    }

    pub async fn authorize(
        &self,
        cidr: &str,
        label: Option<String>,
        source: &str,
        key_id: Option<String>,
        actor: &str,
    ) -> Result<AuthorizedRecord, DaemonError> {
        let net = parse_allow_entry(cidr).map_err(DaemonError::Invalid)?;
        let rec = AuthorizedRecord {
            cidr: net,
            label: label.unwrap_or_default(),
            source: source.to_string(),
            key_id,
            created_at: self.clock.now_ms() / 1000,
        };
        let r = rec.clone();
        // An explicit authorization lifts a denial inside it; a learned one
        // never does (a learned /24 must not re-admit a denied address).
        let explicit = source != "learned";
        let lifted: Vec<IpAddr> = if explicit {
            self.with_state(|st| {
                st.denied
                    .iter()
                    .filter(|a| net.contains(*a))
                    .copied()
                    .collect()
            })
        } else {
            Vec::new()
        };
        self.change(
            |st| {
                if st.authorized.contains_key(&net) {
                    return Err(DaemonError::Invalid(format!("{net} is already authorized")));
                }
                st.authorized.insert(net, r);
                for a in &lifted {
                    st.denied.remove(a);
                }
                Ok(())
            },
            |_| {
                let added = self.store.add_authorized(&rec, actor)?;
                for a in &lifted {
                    self.store.set_unauthorized(*a, None, actor)?;
                }
                Ok(added)
            },
        )
        .await?;
        // Authorizing a refused address takes it off the unauthorized list.
        if explicit {
            for u in self.store.list_unauthorized()? {
                if net.contains(&u.addr) {
                    self.store.set_unauthorized(u.addr, None, actor)?;
                }
            }
        }
        tracing::info!(cidr = %net, source, actor, "authorized");
        Ok(rec)
    }

    pub async fn unauthorize(
        &self,
        cidr: &str,
        actor: &str,
    ) -> Result<AuthorizedRecord, DaemonError> {
        let net = parse_allow_entry(cidr).map_err(DaemonError::Invalid)?;
        let removed = self
            .change(
                |st| {
                    st.authorized.remove(&net).map(|_| ()).ok_or_else(|| {
                        DaemonError::NotFound(format!(
                            "{net} is not on the authorized list; `allowlistctl ips list` shows it"
                        ))
                    })
                },
                |_| Ok(self.store.remove_authorized(&net, actor)?),
            )
            .await?;
        removed.ok_or_else(|| DaemonError::NotFound(format!("{net} is not on the authorized list")))
    }

    pub fn list_unauthorized(&self) -> Result<Vec<UnauthorizedRecord>, DaemonError> {
        Ok(self.store.list_unauthorized()?)
    }

    /// Learning: authorizes the /24 or /64 of a successful caller, once.
    /// Called off the request path (the proxy queues it).
    pub async fn learn(&self, net: IpNet, key_id: &str) -> Result<bool, DaemonError> {
        let known = self.with_state(|st| {
            st.blocking.api != ApiBlocking::Learning
                || st
                    .authorized
                    .keys()
                    .any(|a| a.contains(&net.network()) && a.prefix_len() <= net.prefix_len())
        });
        if known {
            return Ok(false);
        }
        let label = format!("learned from key {key_id}");
        match self
            .authorize(
                &net.to_string(),
                Some(label),
                "learned",
                Some(key_id.to_string()),
                "learning",
            )
            .await
        {
            Ok(_) => Ok(true),
            Err(DaemonError::Invalid(m)) if m.contains("already authorized") => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Sets API blocking. Activation by hand that would refuse sources
    /// that called successfully within `learning_days` needs `force`.
    pub async fn set_api_blocking(
        &self,
        mode: ApiBlocking,
        force: bool,
        actor: &str,
    ) -> Result<BlockingState, DaemonError> {
        if mode == ApiBlocking::Active && !force {
            let cut = self.activation_impact()?;
            if !cut.is_empty() {
                let list: Vec<String> = cut
                    .iter()
                    .take(10)
                    .map(|(addr, key)| format!("{addr} (key {key})"))
                    .collect();
                return Err(DaemonError::Invalid(format!(
                    "activating would refuse {} source(s) that called successfully in the last {} days: {}{}; \
                     authorize them first (`allowlistctl ips authorize CIDR`), or pass --force",
                    cut.len(),
                    self.config.blocking.learning_days,
                    list.join(", "),
                    if cut.len() > 10 { ", ..." } else { "" }
                )));
            }
        }
        self.set_blocking_mode(
            "api",
            serde_json::to_value(mode).unwrap_or_default(),
            actor,
            move |b| b.api = mode,
        )
        .await
    }

    pub async fn set_smtp_blocking(
        &self,
        mode: SmtpBlocking,
        force: bool,
        actor: &str,
    ) -> Result<BlockingState, DaemonError> {
        if mode == SmtpBlocking::Active && !force && self.with_state(|st| st.authorized.is_empty())
        {
            return Err(DaemonError::Invalid(
                "the authorized list is empty, so activating SMTP blocking would cut all SMTP traffic at once; \
                 authorize your senders first (`allowlistctl ips authorize CIDR`), or pass --force"
                    .into(),
            ));
        }
        self.set_blocking_mode(
            "smtp",
            serde_json::to_value(mode).unwrap_or_default(),
            actor,
            move |b| b.smtp = mode,
        )
        .await
    }

    async fn set_blocking_mode(
        &self,
        service: &'static str,
        mode: serde_json::Value,
        actor: &str,
        set: impl FnOnce(&mut BlockingState),
    ) -> Result<BlockingState, DaemonError> {
        let now = self.clock.now_ms() / 1000;
        let mode = mode.as_str().unwrap_or_default().to_string();
        self.change(
            |st| {
                set(&mut st.blocking);
                match service {
                    "api" => st.blocking.api_since = now,
                    _ => st.blocking.smtp_since = now,
                }
                Ok(())
            },
            |_| Ok(self.store.set_blocking(service, &mode, actor, now)?),
        )
        .await?;
        tracing::info!(service, %mode, actor, "blocking mode changed");
        Ok(self.with_state(|st| st.blocking.clone()))
    }

    /// Sources that called successfully within the learning window and
    /// that the authorized list (with `always_allow`) would now refuse.
    pub fn activation_impact(&self) -> Result<Vec<(IpAddr, String)>, DaemonError> {
        let authorized: Vec<IpNet> = self.with_state(|st| st.authorized.keys().copied().collect());
        let since_ms =
            self.clock.now_ms() - i64::from(self.config.blocking.learning_days) * 86_400_000;
        let recent = self
            .recent_successes
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let account = PrefixSet::new(
            authorized
                .into_iter()
                .chain(self.config.blocking.always_allow.iter().copied()),
        );
        let mut out: Vec<(IpAddr, String)> = recent
            .iter()
            .filter(|(_, at)| **at >= since_ms)
            .filter(|((addr, _), _)| account.longest_match(*addr).is_none())
            .map(|((addr, key), _)| (*addr, key.clone()))
            .collect();
        out.sort();
        Ok(out)
    }

    /// After `learning_days` without a newly learned address, API blocking
    /// turns active by itself (it cannot cut anything: every caller of that
    /// period was learned). Returns whether it switched.
    pub async fn auto_activate(&self) -> Result<bool, DaemonError> {
        if self.with_state(|st| st.blocking.api) != ApiBlocking::Learning {
            return Ok(false);
        }
        let last = self.store.last_learned_at()?;
        let quiet = i64::from(self.config.blocking.learning_days) * 86_400;
        if self.clock.now_ms() / 1000 - last < quiet {
            return Ok(false);
        }
        self.set_blocking_mode("api", "active".into(), "allowlistd", |b| {
            b.api = ApiBlocking::Active
        })
        .await?;
        tracing::warn!(
            days = self.config.blocking.learning_days,
            "API blocking switched to active by itself: no new address was learned in the quiet period"
        );
        Ok(true)
    }

    /// Writes usage counted in memory (last used, requests today) to the
    /// store: one transaction per flush, never one write per request.
    pub fn flush_usage(&self) -> Result<(), DaemonError> {
        let runtimes = self
            .runtimes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        // (key id, kid, last used, requests) of every key used since the last flush.
        let used: Vec<(&String, u32, i64, u64)> = self.with_state(|st| {
            runtimes
                .iter()
                .filter_map(|(id, rt)| {
                    let kid = st.keys.get(id)?.kid;
                    let n = rt.requests.swap(0, Ordering::Relaxed);
                    (n > 0).then(|| (id, kid, rt.last_used_ms.load(Ordering::Relaxed), n))
                })
                .collect()
        });
        let usage: Vec<(u32, i64, u64)> = used
            .iter()
            .map(|&(_, kid, last, n)| (kid, last, n))
            .collect();
        if let Err(e) = self.store.flush_usage(&usage, self.today()) {
            // Put the counts back so the next flush carries them.
            for (id, _, _, n) in used {
                runtimes[id].requests.fetch_add(n, Ordering::Relaxed);
            }
            return Err(e.into());
        }
        Ok(())
    }
}

/// What `ips deny` did.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DenyOutcome {
    pub addr: IpAddr,
    /// Unauthorized-list entries marked denied.
    pub entries: usize,
    /// The drop-list entry made with `--drop`.
    pub dropped: Option<crate::api::DropView>,
    /// Keys rotated with `--rotate-key` (with their new plaintext key).
    pub rotated: Vec<KeyView>,
}

impl Daemon {
    /// Denies a refused address: it stays refused (even inside an authorized
    /// or learned range) until authorized explicitly; with `drop` it is also
    /// dropped at XDP (for `ttl`); with `rotate_key` every key it used is
    /// rotated with no grace, so the old secret stops at once.
    pub async fn deny(
        &self,
        addr: &str,
        drop: bool,
        ttl: Option<String>,
        rotate_key: bool,
        actor: &str,
    ) -> Result<DenyOutcome, DaemonError> {
        let addr: IpAddr = addr.trim().parse().map(policy::source_unit).map_err(|_| {
            DaemonError::Invalid(format!(
                "{addr:?} is not an IP address; `allowlistctl ips unauthorized` lists them"
            ))
        })?;
        let entries: Vec<UnauthorizedRecord> = self
            .store
            .list_unauthorized()?
            .into_iter()
            .filter(|u| u.addr == addr)
            .collect();
        if entries.is_empty() && !drop {
            return Err(DaemonError::NotFound(format!(
                "{addr} is not on the unauthorized list; use --drop to drop it in the kernel anyway"
            )));
        }
        if ttl.is_some() && !drop {
            return Err(DaemonError::Invalid("--ttl goes with --drop".into()));
        }
        // In force at once, in the snapshot, through the one change path;
        // a denial of an address never refused gets its own row, so it
        // persists like any other.
        let placeholder = UnauthorizedRecord {
            addr,
            service: "api".into(),
            key_id: String::new(),
            port: 0,
            first_seen: self.clock.now_ms() / 1000,
            last_seen: self.clock.now_ms() / 1000,
            attempts: 0,
            status: "refused".into(),
        };
        let n = self
            .change(
                |st| {
                    st.denied.insert(addr);
                    Ok(())
                },
                |_| {
                    if entries.is_empty() {
                        self.store.record_unauthorized(
                            std::slice::from_ref(&placeholder),
                            self.config.blocking.unauthorized_max,
                        )?;
                    }
                    Ok(self.store.set_unauthorized(addr, Some("denied"), actor)?)
                },
            )
            .await?;
        let dropped = if drop {
            let req = crate::api::AddDrop {
                cidr: addr.to_string(),
                ttl,
                reason: Some("denied from the unauthorized list".into()),
            };
            Some(
                self.add_drop_kind(req, crate::store::DropKind::Denied, actor)
                    .await?,
            )
        } else {
            None
        };
        let mut rotated = Vec::new();
        if rotate_key {
            let mut ids: Vec<String> = entries
                .iter()
                .filter(|e| !e.key_id.is_empty())
                .map(|e| e.key_id.clone())
                .collect();
            ids.sort();
            ids.dedup();
            for id in ids {
                // The secret is presumed stolen: no grace period.
                rotated.push(self.rotate_key(&id, Some("0"), actor).await?);
            }
        }
        tracing::info!(%addr, drop, rotate_key, actor, "denied");
        Ok(DenyOutcome {
            addr,
            entries: n,
            dropped,
            rotated,
        })
    }
}
