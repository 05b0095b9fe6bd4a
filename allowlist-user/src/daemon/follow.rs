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

/// What to reload from the store.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resync {
    /// Everything (after a reconnection, and periodically).
    pub all: bool,
    /// Only these accounts (each change names its account).
    pub accounts: std::collections::BTreeSet<String>,
    /// The drop list (installation-wide changes).
    pub drops: bool,
    /// The latest change sequence number this covers.
    pub seq: i64,
}

impl Resync {
    fn everything() -> Resync {
        Resync {
            all: true,
            drops: true,
            ..Default::default()
        }
    }

    fn add(&mut self, ev: StoreEvent) {
        match ev {
            StoreEvent::Listening => *self = Resync::everything(),
            StoreEvent::Changed { account, seq } => {
                self.seq = self.seq.max(seq);
                if account.is_empty() {
                    self.drops = true;
                } else {
                    self.accounts.insert(account);
                }
            }
            StoreEvent::Lost => {}
        }
    }
}

impl Daemon {
    /// One account as stored, or `None` when it is gone.
    fn load_account(&self, name: &str) -> Result<Option<AccountState>, DaemonError> {
        let Some(rec) = self.store.accounts_named(Some(name))?.pop() else {
            return Ok(None);
        };
        let mut a = AccountState::new(rec);
        for k in self.store.keys_of(Some(name))? {
            a.keys.insert(k.id.clone(), k);
        }
        for (_, r) in self.store.authorized_of(Some(name))? {
            a.authorized.insert(r.cidr, r);
        }
        for u in self.store.list_unauthorized(Some(name))? {
            if u.status == "denied" {
                a.denied.insert(u.addr);
            }
        }
        Ok(Some(a))
    }

    /// Reloads what `what` names from the store and applies what other
    /// edges changed. Returns how many accounts changed in what this edge
    /// enforces.
    pub async fn resync(&self, what: &Resync) -> Result<usize, DaemonError> {
        let waited = std::time::Instant::now();
        let _guard = self.changes.lock().await;
        let started = std::time::Instant::now();
        // Tokens are few, and an account's token changes name the account.
        self.load_tokens()?;
        let fresh: Vec<(Arc<str>, Option<AccountState>)> = if what.all {
            let loaded = self.load_state()?;
            let mut out: Vec<(Arc<str>, Option<AccountState>)> = self.with_state(|st| {
                st.accounts
                    .keys()
                    .filter(|n| loaded.account(n).is_none())
                    .map(|n| (n.clone(), None))
                    .collect()
            });
            out.extend(
                loaded
                    .accounts
                    .iter()
                    .map(|(n, a)| (n.clone(), Some((**a).clone()))),
            );
            out
        } else {
            let mut out = Vec::with_capacity(what.accounts.len());
            for name in &what.accounts {
                out.push((Arc::from(name.as_str()), self.load_account(name)?));
            }
            out
        };
        let mut new = self.with_state(crate::state::State::clone);
        let mut changed = 0;
        for (name, fresh) in fresh {
            match (new.account(&name), fresh) {
                (None, None) => {}
                (Some(_), None) => {
                    new.accounts.remove(&name);
                    changed += 1;
                }
                (Some(mine), Some(mut fresh)) if same_policy(mine, &fresh) => {
                    // Same policy: take the fresh counters and e-mails
                    // without a new revision (no piece is rebuilt).
                    fresh.rev = mine.rev;
                    new.accounts.insert(name, Arc::new(fresh));
                }
                (_, Some(fresh)) => {
                    new.insert_account(fresh);
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
        if what.drops {
            let records = self.store.list_drops()?;
            self.sync_kernel(&records)?;
        }
        let (waited_ms, took_ms) = (
            (started - waited).as_millis() as u64,
            started.elapsed().as_millis() as u64,
        );
        if what.all || took_ms >= 100 {
            tracing::info!(
                all = what.all,
                accounts = what.accounts.len(),
                changed,
                waited_ms,
                took_ms,
                "resync from the store"
            );
        } else {
            tracing::debug!(
                accounts = what.accounts.len(),
                changed,
                waited_ms,
                took_ms,
                "resync from the store"
            );
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
        // What a failed resync still owes, tried again shortly.
        let mut owed: Option<Resync> = None;
        // The latest change applied: a periodic resync that finds the store
        // no further along has nothing to do (at 100k keys a whole reload
        // holds changes back for seconds).
        let mut applied: i64 = self.store.change_seq().unwrap_or(0);
        // Ticks since the last whole reload: every tenth reloads anyway.
        let mut idle_ticks = 0u32;
        loop {
            let retrying = owed.is_some();
            let mut what = owed.take().unwrap_or_default();
            tokio::select! {
                ev = feed.recv() => match ev {
                    None => return,
                    Some(StoreEvent::Lost) => {
                        self.store_health.lost(self.clock.now_ms());
                        continue;
                    }
                    Some(StoreEvent::Listening) => {
                        self.store_health.up();
                        what.add(StoreEvent::Listening);
                    }
                    Some(ev) => what.add(ev),
                },
                _ = tick.tick() => {
                    idle_ticks += 1;
                    match self.store.change_seq() {
                        Ok(seq) if seq <= applied && idle_ticks < 10 => continue,
                        _ => what = Resync::everything(),
                    }
                }
                _ = tokio::time::sleep(Duration::from_secs(1)), if retrying => {}
            };
            // Announcements that arrived meanwhile are covered by this one
            // reload.
            while let Ok(ev) = feed.try_recv() {
                match ev {
                    StoreEvent::Lost => self.store_health.lost(self.clock.now_ms()),
                    StoreEvent::Listening => {
                        self.store_health.up();
                        what.add(ev);
                    }
                    ev => what.add(ev),
                }
            }
            if what.all {
                // Read before the reload: whatever committed after it
                // comes with its own announcement.
                if let Ok(seq) = self.store.change_seq() {
                    what.seq = what.seq.max(seq);
                }
            }
            let r = self.resync(&what).await;
            if r.is_ok() {
                applied = applied.max(what.seq);
                if what.all {
                    idle_ticks = 0;
                }
            }
            if r.is_ok() && what.all {
                self.store_health
                    .last_resync_ms
                    .store(self.clock.now_ms(), std::sync::atomic::Ordering::Relaxed);
            }
            match r {
                Ok(0) => {}
                Ok(n) => tracing::info!(accounts = n, "applied changes from other edges"),
                Err(e) => {
                    tracing::warn!(error = %e, "resync from the store failed; enforcing the last policy known");
                    owed = Some(what);
                }
            }
        }
    }
}
