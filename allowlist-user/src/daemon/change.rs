//! The one way a policy change is made: edit a copy of the state in
//! memory, write the kernel maps, commit the store, swap the snapshot, then
//! recheck live connections. A failure at any step puts the earlier ones
//! back.

use std::{collections::BTreeMap, sync::Arc, time::Instant};

use ipnet::IpNet;

use crate::{
    daemon::{Daemon, DaemonError},
    policy::{self, AccountPolicy, ApiMode, KeyPolicy, SmtpMode, Snapshot},
    state::AccountState,
};

use super::State;

impl Daemon {
    pub(crate) fn load_state(&self) -> Result<State, DaemonError> {
        let mut accounts: BTreeMap<String, AccountState> = self
            .store
            .list_accounts()?
            .into_iter()
            .map(|a| (a.name.clone(), AccountState::new(a)))
            .collect();
        for k in self.store.list_keys()? {
            if let Some(a) = accounts.get_mut(&k.account) {
                a.keys.insert(k.id.clone(), k);
            }
        }
        for (account, rec) in self.store.list_authorized()? {
            if let Some(a) = accounts.get_mut(&account) {
                a.authorized.insert(rec.cidr, rec);
            }
        }
        for u in self.store.list_unauthorized(None)? {
            if u.status == "denied"
                && let Some(a) = accounts.get_mut(&u.account)
            {
                a.denied.insert(u.addr);
            }
        }
        let mut state = State::default();
        for (_, a) in accounts {
            state.insert_account(a);
        }
        Ok(state)
    }

    /// The modes in force for `account`: an organization that enforces
    /// blocking lifts its sub-accounts' modes to its own active ones.
    pub(crate) fn modes_in_force(state: &State, account: &AccountState) -> (ApiMode, SmtpMode) {
        let b = &account.record.blocking;
        match state.parent_of(&account.record.name) {
            Some(org) if org.record.enforce_blocking => (
                if org.record.blocking.api == ApiMode::Active {
                    ApiMode::Active
                } else {
                    b.api
                },
                if org.record.blocking.smtp == SmtpMode::Active {
                    SmtpMode::Active
                } else {
                    b.smtp
                },
            ),
            _ => (b.api, b.smtp),
        }
    }

    /// Builds one account's piece of the snapshot.
    fn account_policy(&self, state: &State, account: &AccountState) -> AccountPolicy {
        let parent = state.parent_of(&account.record.name);
        let mut runtimes = self.runtimes.lock().unwrap_or_else(|p| p.into_inner());
        let keys: Vec<Arc<KeyPolicy>> = account
            .keys
            .values()
            .map(|k| {
                let runtime = runtimes.entry(k.id.clone()).or_default().clone();
                Arc::new(KeyPolicy {
                    id: k.id.clone(),
                    kid: k.kid,
                    account: account.record.idx,
                    name: k.name.clone(),
                    status: k.status,
                    scopes: policy::ScopeSet::of(&k.scopes),
                    secret_hash: k.secret_hash,
                    previous: k.previous,
                    allow: k.allow.iter().map(|a| a.cidr).collect(),
                    rate: k.rate,
                    runtime,
                })
            })
            .collect();
        drop(runtimes);
        let mut list: Vec<IpNet> = account.authorized.keys().copied().collect();
        if let Some(org) = parent {
            list.extend(org.shared().map(|a| a.cidr));
            list.sort_by_key(|n| (n.addr(), n.prefix_len()));
            list.dedup();
        }
        let idx = account.record.idx;
        let mut usage = self.entry_usage.lock().unwrap_or_else(|p| p.into_inner());
        AccountPolicy::new(
            account.record.name.clone(),
            idx,
            (account.rev, parent.map_or(0, |p| p.rev)),
            Self::modes_in_force(state, account),
            list,
            account.denied.iter().copied().collect(),
            keys,
        )
        .with_usage(|net| usage.entry((idx, net)).or_default().clone())
    }

    /// The installation-wide part of a snapshot: the one in force, which
    /// a configuration reload may have changed since the start.
    fn snapshot_base(&self) -> Snapshot {
        let current = self.policy.load();
        Snapshot::with_settings(
            current.always_allow_list.clone(),
            current.trusted_list.clone(),
            &current.smtp_account,
        )
    }

    /// Builds the policy snapshot of `state` from scratch.
    pub fn snapshot_of(&self, state: &State) -> Snapshot {
        let pieces = state
            .accounts
            .values()
            .map(|a| Arc::new(self.account_policy(state, a)))
            .collect();
        let ids: std::collections::HashSet<&str> = state
            .accounts
            .values()
            .flat_map(|a| a.keys.keys().map(String::as_str))
            .collect();
        let mut runtimes = self.runtimes.lock().unwrap_or_else(|p| p.into_inner());
        runtimes.retain(|id, _| ids.contains(id.as_str()));
        drop(runtimes);
        let pieces: Vec<Arc<AccountPolicy>> = pieces;
        let live: std::collections::HashSet<(u32, IpNet)> = pieces
            .iter()
            .flat_map(|p| p.list_entries.iter().map(|n| (p.idx, *n)))
            .collect();
        // Unflushed hits of entries that left are lost with them: the
        // store deletes their counts too.
        self.entry_usage
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|k, _| live.contains(k));
        Snapshot::build(self.snapshot_base(), pieces)
    }

    /// The snapshot of `state`, reusing every piece of `prev` whose account
    /// (and organization) did not change: a change to one account rebuilds
    /// that account's piece and the key shards its keys fall in.
    pub fn snapshot_after(&self, prev: &Snapshot, state: &State) -> Snapshot {
        let mut changed = Vec::new();
        let mut kept = 0;
        for a in state.accounts.values() {
            let parent_rev = match &a.record.parent {
                None => 0,
                Some(p) => state.account(p).map_or(0, |p| p.rev),
            };
            match prev.accounts.get(&a.record.idx) {
                Some(p) if p.rev == a.rev && p.parent_rev == parent_rev => kept += 1,
                Some(_) => {
                    kept += 1;
                    changed.push(Arc::new(self.account_policy(state, a)));
                }
                None => changed.push(Arc::new(self.account_policy(state, a))),
            }
        }
        // Every account of `prev` still here is counted in `kept`; look for
        // the ones that left only when some did.
        let removed: Vec<u32> = if kept == prev.accounts.len() {
            Vec::new()
        } else {
            let live: std::collections::HashSet<u32> =
                state.accounts.values().map(|a| a.record.idx).collect();
            prev.accounts
                .keys()
                .filter(|idx| !live.contains(idx))
                .copied()
                .collect()
        };
        // Runtimes of keys that left a rebuilt or removed account.
        let mut runtimes = self.runtimes.lock().unwrap_or_else(|p| p.into_inner());
        for piece in &changed {
            if let Some(old) = prev.accounts.get(&piece.idx) {
                let kept: std::collections::HashSet<&str> =
                    piece.keys.iter().map(|k| k.id.as_str()).collect();
                for k in &old.keys {
                    if !kept.contains(k.id.as_str()) {
                        runtimes.remove(&k.id);
                    }
                }
            }
        }
        for idx in &removed {
            for k in prev.accounts.get(idx).map(|a| &a.keys[..]).unwrap_or(&[]) {
                runtimes.remove(&k.id);
            }
        }
        drop(runtimes);
        let mut usage = self.entry_usage.lock().unwrap_or_else(|p| p.into_inner());
        for piece in &changed {
            if let Some(old) = prev.accounts.get(&piece.idx) {
                for n in &old.list_entries {
                    if piece.list_entries.binary_search(n).is_err() {
                        usage.remove(&(piece.idx, *n));
                    }
                }
            }
        }
        for idx in &removed {
            usage.retain(|(i, _), _| i != idx);
        }
        drop(usage);
        prev.with_accounts(changed, &removed)
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
        let old_snap = self.policy.load_full();
        let snap = self.snapshot_after(&old_snap, &new);
        // Only what the change touched reaches the kernel (its accounts'
        // entries, the union prefixes whose count crossed zero); a failed
        // write has already undone itself.
        self.sync_policy_delta(&old_snap, &snap)?;
        let out = match persist(&new) {
            Ok(out) => out,
            Err(e) => {
                if let Err(k) = self.sync_policy_delta(&snap, &old_snap) {
                    tracing::error!(error = %k, "restoring the kernel maps after a store failure");
                }
                return Err(e);
            }
        };
        self.policy.store(Arc::new(snap));
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = new;
        self.recheck_connections();
        let elapsed = started.elapsed();
        self.change_latency.observe_ns(elapsed.as_nanos() as u64);
        tracing::debug!(
            elapsed_us = elapsed.as_micros() as u64,
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
        self.load_tokens()?;
        let state = self.load_state()?;
        let snap = self.snapshot_of(&state);
        self.sync_policy_kernel(&snap)?;
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
