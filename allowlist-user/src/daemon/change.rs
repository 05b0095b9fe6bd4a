//! The one way a policy change is made: edit a copy of the state in
//! memory, write the kernel maps, commit the store, swap the snapshot, then
//! recheck live connections. A failure at any step puts the earlier ones
//! back.

use std::{collections::HashMap, sync::Arc, time::Instant};

use ipnet::IpNet;

use crate::{
    daemon::{Daemon, DaemonError},
    kernel::{AccountSpec, KeySpec},
    policy::SmtpMode,
    policy::{self, ApiMode, KeyPolicy, KeyStatus, PrefixSet, Snapshot},
};

use super::State;

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
            api: Some(state.blocking.api),
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
                account: 0,
            })
            .collect();
        k.sync_keys(&specs, &[single_account(state, snap)])?;
        let mut ports = Vec::new();
        if state.blocking.api == ApiMode::Active && self.api_guard_wanted() {
            ports.push((
                allowlist_common::PROTO_TCP,
                self.config.proxy.listen.port(),
                allowlist_common::SERVICE_API,
            ));
        }
        if state.blocking.smtp == SmtpMode::Active {
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
}

/// The one account of a single-account store, as the kernel's account
/// layer (index 0): the authorized list and `[blocking] always_allow`
/// admit; denied addresses (an IPv4 address, an IPv6 /64) are denied
/// unless `always_allow` covers them, and an authorized prefix inside a
/// denied one is left out (the denial wins there). Blocking is active with
/// API blocking.
fn single_account(state: &State, snap: &Snapshot) -> AccountSpec {
    let denied: Vec<IpNet> = state
        .denied
        .iter()
        .map(|a| {
            let len = if a.is_ipv4() {
                32
            } else {
                policy::LEARN_V6_PREFIX
            };
            IpNet::new(*a, len).expect("valid").trunc()
        })
        .filter(|n| !snap.always_allow.covers(n))
        .collect();
    let denied_set = PrefixSet::new(denied.iter().copied());
    let mut entries: std::collections::BTreeMap<IpNet, bool> = state
        .authorized
        .keys()
        .map(|n| n.trunc())
        .filter(|n| !denied_set.covers(n))
        .chain(snap.always_allow_list.iter().map(IpNet::trunc))
        .map(|n| (n, true))
        .collect();
    entries.extend(denied.into_iter().map(|n| (n, false)));
    AccountSpec {
        idx: 0,
        api_active: state.blocking.api == ApiMode::Active,
        entries: entries.into_iter().collect(),
    }
}
