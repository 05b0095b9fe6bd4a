//! Following a store that other edges write too: each change they commit
//! is announced ([`StoreEvent`]), and this edge reloads from the store and
//! applies, as a change of its own, only the accounts that differ from what
//! it enforces, down to the kernel maps. A resync also follows every
//! (re)connection of the feed, since announcements made while it was away
//! are lost, and runs periodically as a safety net.

use std::{sync::Arc, time::Duration};

use tokio::sync::mpsc::UnboundedReceiver;

use crate::{
    state::AccountState,
    store::{KeyRecord, StoreEvent},
};

use super::{Daemon, DaemonError};

/// The policy a key carries (its usage counters are not: other edges move
/// them all the time, and they change nothing enforced).
fn same_key_policy(a: &KeyRecord, b: &KeyRecord) -> bool {
    a.kid == b.kid
        && a.account == b.account
        && a.name == b.name
        && a.description == b.description
        && a.scopes == b.scopes
        && a.status == b.status
        && a.secret_hash == b.secret_hash
        && a.previous == b.previous
        && a.rate == b.rate
        && a.allow == b.allow
}

fn same_policy(a: &AccountState, b: &AccountState) -> bool {
    a.record.idx == b.record.idx
        && a.record.parent == b.record.parent
        && a.record.enforce_blocking == b.record.enforce_blocking
        && a.record.blocking == b.record.blocking
        && a.authorized == b.authorized
        && a.denied == b.denied
        && a.keys.len() == b.keys.len()
        && a.keys
            .iter()
            .zip(&b.keys)
            .all(|((ia, ka), (ib, kb))| ia == ib && same_key_policy(ka, kb))
}

impl Daemon {
    /// Reloads the store and applies what other edges changed. Returns how
    /// many accounts changed in what this edge enforces.
    pub async fn resync(&self, drops: bool) -> Result<usize, DaemonError> {
        let _guard = self.changes.lock().await;
        self.load_tokens()?;
        let loaded = self.load_state()?;
        let mut new = self.with_state(crate::state::State::clone);
        let mut changed = 0;
        let gone: Vec<Arc<str>> = new
            .accounts
            .keys()
            .filter(|name| loaded.account(name).is_none())
            .cloned()
            .collect();
        for name in gone {
            new.accounts.remove(&name);
            changed += 1;
        }
        for (name, fresh) in &loaded.accounts {
            match new.account(name) {
                Some(mine) if same_policy(mine, fresh) => {
                    // Same policy: take the fresh counters and e-mails
                    // without a new revision (no piece is rebuilt).
                    let mut a = (**fresh).clone();
                    a.rev = mine.rev;
                    new.accounts.insert(name.clone(), Arc::new(a));
                }
                _ => {
                    new.insert_account((**fresh).clone());
                    changed += 1;
                }
            }
        }
        if changed > 0 {
            let old_snap = self.policy.load_full();
            let snap = self.snapshot_after(&old_snap, &new);
            self.sync_policy_delta(&old_snap, &snap)?;
            self.policy.store(Arc::new(snap));
        }
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = new;
        if changed > 0 {
            self.recheck_connections();
        }
        if drops {
            let records = self.store.list_drops()?;
            self.sync_kernel(&records)?;
        }
        Ok(changed)
    }

    /// Applies the changes other edges announce, until the feed ends.
    pub async fn follow_store(
        self: Arc<Self>,
        mut feed: UnboundedReceiver<StoreEvent>,
        every: Duration,
    ) {
        let mut tick = tokio::time::interval(every);
        tick.tick().await;
        loop {
            let drops = tokio::select! {
                ev = feed.recv() => match ev {
                    None => return,
                    Some(StoreEvent::Lost) => {
                        self.store_health.lost(self.clock.now_ms());
                        continue;
                    }
                    Some(StoreEvent::Listening) => {
                        self.store_health.up();
                        true
                    }
                    Some(StoreEvent::Changed { account, .. }) => account.is_empty(),
                },
                _ = tick.tick() => true,
            };
            // Announcements that arrived meanwhile are covered by this one
            // reload.
            let mut drops = drops;
            while let Ok(ev) = feed.try_recv() {
                match ev {
                    StoreEvent::Changed { account, .. } => drops |= account.is_empty(),
                    StoreEvent::Listening => {
                        self.store_health.up();
                        drops = true
                    }
                    StoreEvent::Lost => self.store_health.lost(self.clock.now_ms()),
                }
            }
            let r = self.resync(drops).await;
            if r.is_ok() {
                self.store_health
                    .last_resync_ms
                    .store(self.clock.now_ms(), std::sync::atomic::Ordering::Relaxed);
            }
            match r {
                Ok(0) => {}
                Ok(n) => tracing::info!(accounts = n, "applied changes from other edges"),
                Err(e) => {
                    tracing::warn!(error = %e, "resync from the store failed; enforcing the last policy known")
                }
            }
        }
    }
}
