//! The policy maps the connection hooks and the guard read — per-key
//! allowlists and states, per-account lists and modes, guard unions,
//! guarded ports — written as planned diffs that are never half-applied.
//!
//! A change is first planned, purely: every write paired with the write
//! that undoes it (known from the record of what the maps hold), in an
//! order that never lets the kernel admit more than the old or the new
//! policy does, and the peak each map reaches while the writes run checked
//! against its capacity. Then the writes run; if one fails, the ones
//! already made are undone in reverse order.
//!
//! # Order of the per-key and per-account writes
//!
//! The connection hooks admit `(key, client)` when three layers all do:
//! the key's state (active), the key's trie (a match), and the account
//! layer of the key's account (the longest match in the account trie is
//! not denied; without one, the account's API blocking is not active).
//! Each layer changing on its own between the old and the new policy is
//! not enough: the new key trie beside the old account list could admit a
//! pair neither policy admits. So every write is classed by what it does
//! to its layer, whatever the rest of the trie holds:
//!
//! - narrowing: removing a key-trie entry, removing an authorized account
//!   entry, adding a denied one or flipping one to denied (the addresses
//!   it decides fall back to something no more open), activating API
//!   blocking, revoking or removing a key's state;
//! - widening: the converse of each.
//!
//! All narrowing writes run first: until they are done every layer only
//! shrank from the old policy, so nothing beyond the old is admitted. Then
//! keys that stay active but move to another account are switched, one
//! state write each (every layer is now inside both the old and the new
//! policy, so either account is safe). Then all widening writes: every
//! layer only grows towards the new policy, so nothing beyond the new is
//! admitted; keys turn active last, once their entries are all there.
//! Within each phase removals come before additions, which keeps the peak
//! of each map low. An undo replays the same states backwards.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    hash::Hash,
};

use allowlist_common::{
    ACCOUNT_ADMIT, ACCOUNT_API_ACTIVE, ACCOUNT_DENIED, ARMED_SLOT, KEY_ACTIVE, KEY_REVOKED,
    KeyState, PROTO_TCP, PROTO_UDP, guard_service, with_guard_service,
};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// One write to a policy map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyOp {
    /// Key id -> state and account; `None` removes it.
    KeyState(u32, Option<KeyState>),
    /// (key, prefix) present or not in the per-key allowlist tries.
    KeyAllow4(u32, Ipv4Net, bool),
    KeyAllow6(u32, Ipv6Net, bool),
    /// (account, prefix) -> `ACCOUNT_ADMIT` / `ACCOUNT_DENIED` in the
    /// per-account tries; `None` removes it.
    AccountAllow4(u32, Ipv4Net, Option<u8>),
    AccountAllow6(u32, Ipv6Net, Option<u8>),
    /// Account -> `ACCOUNT_*` bits; `None` removes it (no bit set).
    AccountMode(u32, Option<u32>),
    /// (service, prefix) present or not in the guard unions.
    Guard4(u32, Ipv4Net, bool),
    Guard6(u32, Ipv6Net, bool),
    /// A `GUARD_PORTS` slot's value.
    GuardPort(u16, u32),
}

impl PolicyOp {
    /// The map this op writes, and whether its entry exists after it.
    fn entry(&self) -> (&'static str, bool) {
        match *self {
            PolicyOp::KeyState(_, v) => ("KEY_STATE", v.is_some()),
            PolicyOp::KeyAllow4(_, _, on) => ("KEY_ALLOW4", on),
            PolicyOp::KeyAllow6(_, _, on) => ("KEY_ALLOW6", on),
            PolicyOp::AccountAllow4(_, _, v) => ("ACCOUNT_ALLOW4", v.is_some()),
            PolicyOp::AccountAllow6(_, _, v) => ("ACCOUNT_ALLOW6", v.is_some()),
            PolicyOp::AccountMode(_, v) => ("ACCOUNT_MODE", v.is_some()),
            PolicyOp::Guard4(_, _, on) => ("GUARD4", on),
            PolicyOp::Guard6(_, _, on) => ("GUARD6", on),
            PolicyOp::GuardPort(..) => ("GUARD_PORTS", true),
        }
    }
}

/// Where planned writes go: the pinned maps, or a model in tests.
pub trait PolicyMaps {
    type Error: std::error::Error + Send + Sync + 'static;
    fn apply(&mut self, op: &PolicyOp) -> Result<(), Self::Error>;
    /// A run of ops writing one map, all of them keeping or all removing
    /// their entries, in order. On failure some of them may have been
    /// written; the rest were not.
    fn apply_run(&mut self, ops: &[PolicyOp]) -> Result<(), Self::Error> {
        ops.iter().try_for_each(|op| self.apply(op))
    }
}

/// The per-key allowlists and states, and the per-account lists and
/// modes, as last written.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyRecord {
    pub v4: HashSet<(u32, Ipv4Net)>,
    pub v6: HashSet<(u32, Ipv6Net)>,
    pub state: BTreeMap<u32, KeyState>,
    pub accounts: AccountRecord,
}

/// The per-account tries and modes as last written.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AccountRecord {
    /// (account, prefix) -> `ACCOUNT_ADMIT` / `ACCOUNT_DENIED`.
    pub v4: HashMap<(u32, Ipv4Net), u8>,
    pub v6: HashMap<(u32, Ipv6Net), u8>,
    /// Account -> `ACCOUNT_*` bits (non-zero only).
    pub mode: BTreeMap<u32, u32>,
}

/// The guard unions (per service) and guarded ports as last written.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GuardRecord {
    pub v4: HashSet<(u32, Ipv4Net)>,
    pub v6: HashSet<(u32, Ipv6Net)>,
    /// Port -> `GUARD_PORTS` value (non-zero entries only).
    pub ports: BTreeMap<u16, u32>,
}

/// What the kernel needs of one key.
#[derive(Clone, Debug)]
pub struct KeySpec {
    pub kid: u32,
    pub revoked: bool,
    /// Empty = every address.
    pub allow: Vec<IpNet>,
    /// The account the key belongs to ([`AccountSpec::idx`]).
    pub account: u32,
}

/// What the kernel needs of one account (one spec per account index).
#[derive(Clone, Debug)]
pub struct AccountSpec {
    pub idx: u32,
    /// API blocking is active: an address without an entry is refused.
    pub api_active: bool,
    /// `true`: authorized; `false`: denied (refused whatever the mode,
    /// even inside a shorter authorized prefix). The caller guarantees no
    /// prefix appears twice; should one, denied wins.
    pub entries: Vec<(IpNet, bool)>,
}

/// A change that would not fit: nothing was written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TooMany {
    pub map: &'static str,
    /// Entries the map would hold at the peak of the change (old and new
    /// entries side by side, before the old ones go).
    pub peak: usize,
    pub capacity: usize,
}

/// A planned change: writes with their undo, and the record afterwards.
pub struct Plan<R> {
    pub ops: Vec<(PolicyOp, PolicyOp)>,
    pub record: R,
}

fn check(map: &'static str, peak: usize, capacity: usize) -> Result<(), TooMany> {
    if peak > capacity {
        return Err(TooMany {
            map,
            peak,
            capacity,
        });
    }
    Ok(())
}

fn peak<T: std::hash::Hash + Eq>(old: &HashSet<T>, new: &HashSet<T>) -> usize {
    old.len() + new.difference(old).count()
}

/// The most entries each map holds while `ops` run in order, starting
/// from `sizes` (entries each map holds before).
fn peaks(
    sizes: &[(&'static str, usize)],
    ops: &[(PolicyOp, PolicyOp)],
) -> BTreeMap<&'static str, usize> {
    let mut now: BTreeMap<&'static str, (usize, usize)> =
        sizes.iter().map(|&(m, n)| (m, (n, n))).collect();
    for (op, undo) in ops {
        // The undo puts back what was there: whether the entry existed.
        let (map, after) = op.entry();
        let (_, before) = undo.entry();
        let (n, peak) = now.entry(map).or_default();
        match (before, after) {
            (false, true) => *n += 1,
            (true, false) => *n = n.saturating_sub(1),
            _ => {}
        }
        *peak = (*peak).max(*n);
    }
    now.into_iter().map(|(m, (_, p))| (m, p)).collect()
}

/// The records `keys` and `accounts` mean.
fn wanted(keys: &[KeySpec], accounts: &[AccountSpec]) -> KeyRecord {
    let mut new = KeyRecord::default();
    for k in keys {
        let state = if k.revoked { KEY_REVOKED } else { KEY_ACTIVE };
        new.state.insert(
            k.kid,
            KeyState {
                state,
                account: k.account,
            },
        );
        if k.revoked {
            continue;
        }
        if k.allow.is_empty() {
            new.v4
                .insert((k.kid, Ipv4Net::new([0, 0, 0, 0].into(), 0).expect("valid")));
            new.v6
                .insert((k.kid, Ipv6Net::new(0u128.into(), 0).expect("valid")));
        }
        for n in &k.allow {
            match n.trunc() {
                IpNet::V4(n) => new.v4.insert((k.kid, n)),
                IpNet::V6(n) => new.v6.insert((k.kid, n)),
            };
        }
    }
    let acc = &mut new.accounts;
    for a in accounts {
        if a.api_active {
            *acc.mode.entry(a.idx).or_default() |= ACCOUNT_API_ACTIVE;
        }
        for (n, admit) in &a.entries {
            let v = if *admit {
                ACCOUNT_ADMIT
            } else {
                ACCOUNT_DENIED
            };
            // A prefix given twice: denied wins.
            let put = |e: &mut u8| *e = (*e).min(v);
            match n.trunc() {
                IpNet::V4(n) => put(acc.v4.entry((a.idx, n)).or_insert(v)),
                IpNet::V6(n) => put(acc.v6.entry((a.idx, n)).or_insert(v)),
            }
        }
    }
    new
}

type Ops = Vec<(PolicyOp, PolicyOp)>;

/// The writes taking one per-account trie from `old` to `new`: (narrowing,
/// widening), removals first in each.
fn account_trie<N: Copy + Eq + Hash>(
    old: &HashMap<(u32, N), u8>,
    new: &HashMap<(u32, N), u8>,
    op: fn(u32, N, Option<u8>) -> PolicyOp,
) -> (Ops, Ops) {
    let denied = |v: u8| v == ACCOUNT_DENIED;
    let (mut narrow, mut narrow_set, mut widen, mut widen_set) = (vec![], vec![], vec![], vec![]);
    for (&(acc, n), &was) in old {
        match new.get(&(acc, n)) {
            None => {
                let w = (op(acc, n, None), op(acc, n, Some(was)));
                if denied(was) {
                    widen.push(w);
                } else {
                    narrow.push(w);
                }
            }
            Some(&v) if v != was => {
                let w = (op(acc, n, Some(v)), op(acc, n, Some(was)));
                if denied(v) {
                    narrow_set.push(w);
                } else {
                    widen_set.push(w);
                }
            }
            Some(_) => {}
        }
    }
    for (&(acc, n), &v) in new {
        if !old.contains_key(&(acc, n)) {
            let w = (op(acc, n, Some(v)), op(acc, n, None));
            if denied(v) {
                narrow_set.push(w);
            } else {
                widen_set.push(w);
            }
        }
    }
    narrow.extend(narrow_set);
    widen.extend(widen_set);
    (narrow, widen)
}

/// Plans the per-key and per-account maps for `keys` and `accounts`, in
/// the order the module documentation explains: revocations first (a
/// revoked key stops at once), every other narrowing write, account
/// switches of active keys, widening writes, activations last.
pub fn plan_keys(
    old: &KeyRecord,
    keys: &[KeySpec],
    accounts: &[AccountSpec],
    capacity: usize,
) -> Result<Plan<KeyRecord>, TooMany> {
    let new = wanted(keys, accounts);
    let ops = plan_between(old, &new, old.sizes(), capacity)?;
    Ok(Plan { ops, record: new })
}

/// What a change to some keys and accounts replaces in the record: their
/// entries before and after.
#[derive(Debug)]
pub struct KeyDelta {
    pub before: KeyRecord,
    pub after: KeyRecord,
}

/// Plans the writes for the keys and accounts one change touched, and
/// nothing else: `old` and `new` are their specs before and after (whole
/// accounts, with all their keys; one in `old` only was removed, in `new`
/// only added). `record` is what the maps hold now, for their sizes; the
/// writes are those [`plan_keys`] would make for the whole policy, in the
/// same order, at the cost of the change rather than of the policy.
pub fn plan_keys_delta(
    record: &KeyRecord,
    old: (&[KeySpec], &[AccountSpec]),
    new: (&[KeySpec], &[AccountSpec]),
    capacity: usize,
) -> Result<Plan<KeyDelta>, TooMany> {
    let before = wanted(old.0, old.1);
    let after = wanted(new.0, new.1);
    let ops = plan_between(&before, &after, record.sizes(), capacity)?;
    Ok(Plan {
        ops,
        record: KeyDelta { before, after },
    })
}

impl KeyRecord {
    fn sizes(&self) -> [(&'static str, usize); 6] {
        [
            ("KEY_STATE", self.state.len()),
            ("KEY_ALLOW4", self.v4.len()),
            ("KEY_ALLOW6", self.v6.len()),
            ("ACCOUNT_ALLOW4", self.accounts.v4.len()),
            ("ACCOUNT_ALLOW6", self.accounts.v6.len()),
            ("ACCOUNT_MODE", self.accounts.mode.len()),
        ]
    }

    /// The record after a delta's writes: its entries before replaced by
    /// its entries after.
    pub fn apply(&mut self, delta: KeyDelta) {
        let KeyDelta { before, after } = delta;
        for e in &before.v4 {
            self.v4.remove(e);
        }
        for e in &before.v6 {
            self.v6.remove(e);
        }
        for k in before.state.keys() {
            self.state.remove(k);
        }
        for k in before.accounts.v4.keys() {
            self.accounts.v4.remove(k);
        }
        for k in before.accounts.v6.keys() {
            self.accounts.v6.remove(k);
        }
        for k in before.accounts.mode.keys() {
            self.accounts.mode.remove(k);
        }
        self.v4.extend(after.v4);
        self.v6.extend(after.v6);
        self.state.extend(after.state);
        self.accounts.v4.extend(after.accounts.v4);
        self.accounts.v6.extend(after.accounts.v6);
        self.accounts.mode.extend(after.accounts.mode);
    }
}

/// The writes taking the maps from `old` to `new` (both whole, or both the
/// same scope of a delta), checked against `capacity` from `sizes` (what
/// each map holds now).
fn plan_between(
    old: &KeyRecord,
    new: &KeyRecord,
    sizes: [(&'static str, usize); 6],
    capacity: usize,
) -> Result<Ops, TooMany> {
    let active = |s: Option<&KeyState>| s.is_some_and(|s| s.state == KEY_ACTIVE);
    let state_op = |kid: u32, st: Option<KeyState>| {
        (
            PolicyOp::KeyState(kid, st),
            PolicyOp::KeyState(kid, old.state.get(&kid).copied()),
        )
    };
    let (mut revoke, mut inserts, mut switch, mut activate) = (vec![], vec![], vec![], vec![]);
    for (kid, st) in &new.state {
        let was = old.state.get(kid);
        if was == Some(st) {
            continue;
        }
        let w = state_op(*kid, Some(*st));
        if st.state != KEY_ACTIVE {
            // Revoked (or a revoked key's account changed): narrowing.
            if was.is_some() {
                revoke.push(w)
            } else {
                inserts.push(w)
            }
        } else if active(was) {
            switch.push(w);
        } else {
            activate.push(w);
        }
    }
    for kid in old.state.keys() {
        if !new.state.contains_key(kid) {
            revoke.push(state_op(*kid, None));
        }
    }
    revoke.extend(inserts);

    let (acc4_narrow, acc4_widen) =
        account_trie(&old.accounts.v4, &new.accounts.v4, PolicyOp::AccountAllow4);
    let (acc6_narrow, acc6_widen) =
        account_trie(&old.accounts.v6, &new.accounts.v6, PolicyOp::AccountAllow6);
    let (mut mode_narrow, mut mode_widen) = (vec![], vec![]);
    let (old_mode, new_mode) = (&old.accounts.mode, &new.accounts.mode);
    let seen: BTreeSet<u32> = old_mode.keys().chain(new_mode.keys()).copied().collect();
    for acc in seen {
        let (was, now) = (old_mode.get(&acc).copied(), new_mode.get(&acc).copied());
        if was == now {
            continue;
        }
        let w = (
            PolicyOp::AccountMode(acc, now),
            PolicyOp::AccountMode(acc, was),
        );
        let blocking = |v: Option<u32>| v.is_some_and(|v| v & ACCOUNT_API_ACTIVE != 0);
        if blocking(now) && !blocking(was) {
            mode_narrow.push(w);
        } else {
            mode_widen.push(w);
        }
    }
    // Removals first.
    mode_widen.sort_by_key(|(op, _)| matches!(op, PolicyOp::AccountMode(_, Some(_))));

    let mut ops = revoke;
    for (kid, n) in old.v4.difference(&new.v4) {
        ops.push((
            PolicyOp::KeyAllow4(*kid, *n, false),
            PolicyOp::KeyAllow4(*kid, *n, true),
        ));
    }
    for (kid, n) in old.v6.difference(&new.v6) {
        ops.push((
            PolicyOp::KeyAllow6(*kid, *n, false),
            PolicyOp::KeyAllow6(*kid, *n, true),
        ));
    }
    ops.extend(acc4_narrow);
    ops.extend(acc6_narrow);
    ops.extend(mode_narrow);
    // Every layer is now inside both policies.
    ops.extend(switch);
    ops.extend(mode_widen);
    ops.extend(acc4_widen);
    ops.extend(acc6_widen);
    for (kid, n) in new.v4.difference(&old.v4) {
        ops.push((
            PolicyOp::KeyAllow4(*kid, *n, true),
            PolicyOp::KeyAllow4(*kid, *n, false),
        ));
    }
    for (kid, n) in new.v6.difference(&old.v6) {
        ops.push((
            PolicyOp::KeyAllow6(*kid, *n, true),
            PolicyOp::KeyAllow6(*kid, *n, false),
        ));
    }
    ops.extend(activate);

    for (map, peak) in peaks(&sizes, &ops) {
        check(map, peak, capacity)?;
    }
    Ok(ops)
}

/// A failed change.
#[derive(Debug, thiserror::Error)]
pub enum ExecError<E: std::error::Error + Send + Sync + 'static> {
    #[error("{0} (the change was undone: nothing was changed)")]
    Undone(#[source] E),
    #[error(
        "{write}; undoing the change failed too ({undo}). Restart allowlistd: it rewrites the \
         maps from the store"
    )]
    Inconsistent { write: E, undo: E },
}

/// Runs `ops` in order; on a failure, undoes the writes already made,
/// newest first.
pub fn execute<M: PolicyMaps>(
    maps: &mut M,
    ops: &[(PolicyOp, PolicyOp)],
) -> Result<(), ExecError<M::Error>> {
    // Consecutive ops on one map, all writing or all removing, go as one
    // run: the kernel writes them in the same order, so the plan's order
    // holds, at a fraction of the syscalls.
    let mut start = 0;
    while start < ops.len() {
        let kind = ops[start].0.entry();
        let end = ops[start..]
            .iter()
            .position(|(op, _)| op.entry() != kind)
            .map_or(ops.len(), |n| start + n);
        let run: Vec<PolicyOp> = ops[start..end].iter().map(|(op, _)| *op).collect();
        if let Err(write) = maps.apply_run(&run) {
            // Part of the run may have landed. Undoing an op that did not
            // land rewrites the value its entry still holds, so the whole
            // run is undone with everything before it, newest first.
            let mut undo_err = None;
            for (_, undo) in ops[..end].iter().rev() {
                if let Err(e) = maps.apply(undo)
                    && undo_err.is_none()
                {
                    undo_err = Some(e);
                }
            }
            return Err(match undo_err {
                None => ExecError::Undone(write),
                Some(undo) => ExecError::Inconsistent { write, undo },
            });
        }
        start = end;
    }
    Ok(())
}

mod guard;
pub use guard::{GuardChange, plan_guard, plan_guard_delta};

#[cfg(test)]
mod tests;
