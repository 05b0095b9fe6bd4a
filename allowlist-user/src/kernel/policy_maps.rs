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

    let sizes = [
        ("KEY_STATE", old.state.len()),
        ("KEY_ALLOW4", old.v4.len()),
        ("KEY_ALLOW6", old.v6.len()),
        ("ACCOUNT_ALLOW4", old.accounts.v4.len()),
        ("ACCOUNT_ALLOW6", old.accounts.v6.len()),
        ("ACCOUNT_MODE", old.accounts.mode.len()),
    ];
    for (map, peak) in peaks(&sizes, &ops) {
        check(map, peak, capacity)?;
    }
    Ok(Plan { ops, record: new })
}

/// Plans the guard: unions grown, ports narrowed to what old and new
/// agree on, unions shrunk, new ports armed — so no packet is ever judged
/// at a port armed against a union that is not yet complete.
pub fn plan_guard(
    old: &GuardRecord,
    unions: &[(u32, Vec<IpNet>)],
    ports: &[(u8, u16, u32)],
    capacity: usize,
) -> Result<Plan<GuardRecord>, TooMany> {
    let mut new = GuardRecord::default();
    for (service, union) in unions {
        for n in union {
            match n.trunc() {
                IpNet::V4(n) => new.v4.insert((*service, n)),
                IpNet::V6(n) => new.v6.insert((*service, n)),
            };
        }
    }
    check("GUARD4", peak(&old.v4, &new.v4), capacity)?;
    check("GUARD6", peak(&old.v6, &new.v6), capacity)?;
    let mut armed = 0u32;
    for &(proto, port, service) in ports {
        let v = new.ports.entry(port).or_default();
        *v = with_guard_service(*v, proto, service);
        armed |= 1 << service;
    }
    if armed != 0 {
        new.ports.insert(ARMED_SLOT, armed);
    }

    let mut ops = Vec::new();
    for (svc, n) in new.v4.difference(&old.v4) {
        ops.push((
            PolicyOp::Guard4(*svc, *n, true),
            PolicyOp::Guard4(*svc, *n, false),
        ));
    }
    for (svc, n) in new.v6.difference(&old.v6) {
        ops.push((
            PolicyOp::Guard6(*svc, *n, true),
            PolicyOp::Guard6(*svc, *n, false),
        ));
    }
    // Ports whose service changes keep only what old and new agree on
    // while the unions shrink.
    let mut now: BTreeMap<u16, u32> = old.ports.clone();
    for (port, old_v) in &old.ports {
        let new_v = new.ports.get(port).copied().unwrap_or(0);
        let both = if *port == ARMED_SLOT {
            // A mask: the services armed before and after stay armed
            // throughout (never 0 in between, which would let
            // unclassifiable packets through for them).
            old_v & new_v
        } else {
            [PROTO_TCP, PROTO_UDP].into_iter().fold(0, |acc, proto| {
                let (o, n) = (guard_service(*old_v, proto), guard_service(new_v, proto));
                with_guard_service(acc, proto, if o == n { o } else { 0 })
            })
        };
        if both != *old_v {
            ops.push((
                PolicyOp::GuardPort(*port, both),
                PolicyOp::GuardPort(*port, *old_v),
            ));
            now.insert(*port, both);
        }
    }
    for (svc, n) in old.v4.difference(&new.v4) {
        ops.push((
            PolicyOp::Guard4(*svc, *n, false),
            PolicyOp::Guard4(*svc, *n, true),
        ));
    }
    for (svc, n) in old.v6.difference(&new.v6) {
        ops.push((
            PolicyOp::Guard6(*svc, *n, false),
            PolicyOp::Guard6(*svc, *n, true),
        ));
    }
    for (port, v) in &new.ports {
        let was = now.get(port).copied().unwrap_or(0);
        if *v != was {
            ops.push((
                PolicyOp::GuardPort(*port, *v),
                PolicyOp::GuardPort(*port, was),
            ));
        }
    }
    Ok(Plan { ops, record: new })
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
    for (i, (op, _)) in ops.iter().enumerate() {
        if let Err(write) = maps.apply(op) {
            let mut undo_err = None;
            for (_, undo) in ops[..i].iter().rev() {
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
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;
    use proptest::prelude::*;

    /// The maps as sets, as the kernel would hold them.
    #[derive(Clone, Debug, Default, PartialEq, Eq)]
    struct Model {
        state: BTreeMap<u32, KeyState>,
        allow4: HashSet<(u32, Ipv4Net)>,
        allow6: HashSet<(u32, Ipv6Net)>,
        acct4: HashMap<(u32, Ipv4Net), u8>,
        acct6: HashMap<(u32, Ipv6Net), u8>,
        mode: BTreeMap<u32, u32>,
        guard4: HashSet<(u32, Ipv4Net)>,
        guard6: HashSet<(u32, Ipv6Net)>,
        ports: BTreeMap<u16, u32>,
    }

    /// Addresses the admission check is probed at: inside, at the edges
    /// of and outside the prefixes `net()` draws.
    fn probes() -> Vec<IpAddr> {
        let mut out: Vec<IpAddr> = [
            0, 1, 31, 32, 63, 64, 65, 96, 127, 128, 129, 160, 191, 192, 224, 255,
        ]
        .iter()
        .map(|x| format!("198.51.100.{x}").parse().unwrap())
        .collect();
        out.push("203.0.113.1".parse().unwrap());
        for a in 0..4 {
            out.push(format!("2001:db8:{a:x}::").parse().unwrap());
            for g in ["0", "1", "8000", "ffff"] {
                out.push(format!("2001:db8:{a:x}:{g}::1").parse().unwrap());
            }
        }
        out.push("2001:db8:99::1".parse().unwrap());
        out
    }

    /// The longest match of `addr` among `account`'s entries.
    fn lpm<N: Copy>(
        t: &HashMap<(u32, N), u8>,
        account: u32,
        contains: impl Fn(&N) -> bool,
        len: impl Fn(&N) -> u8,
    ) -> Option<u8> {
        t.iter()
            .filter(|((a, n), _)| *a == account && contains(n))
            .max_by_key(|((_, n), _)| len(n))
            .map(|(_, v)| *v)
    }

    impl Model {
        /// What `conn_verdict` decides for a peer (not behind XFF).
        fn admits(&self, kid: u32, addr: IpAddr) -> bool {
            let Some(st) = self.state.get(&kid) else {
                return false;
            };
            if st.state != KEY_ACTIVE {
                return false;
            }
            let (key, account) = match addr {
                IpAddr::V4(a) => (
                    self.allow4.iter().any(|(k, n)| *k == kid && n.contains(&a)),
                    lpm(
                        &self.acct4,
                        st.account,
                        |n| n.contains(&a),
                        |n| n.prefix_len(),
                    ),
                ),
                IpAddr::V6(a) => (
                    self.allow6.iter().any(|(k, n)| *k == kid && n.contains(&a)),
                    lpm(
                        &self.acct6,
                        st.account,
                        |n| n.contains(&a),
                        |n| n.prefix_len(),
                    ),
                ),
            };
            key && match account {
                Some(v) => v != ACCOUNT_DENIED,
                None => self
                    .mode
                    .get(&st.account)
                    .is_none_or(|m| m & ACCOUNT_API_ACTIVE == 0),
            }
        }

        fn admitted(&self, kids: &BTreeSet<u32>, probes: &[IpAddr]) -> BTreeSet<(u32, IpAddr)> {
            let mut out = BTreeSet::new();
            for &kid in kids {
                for &p in probes {
                    if self.admits(kid, p) {
                        out.insert((kid, p));
                    }
                }
            }
            out
        }
    }

    #[derive(Debug, thiserror::Error)]
    #[error("injected failure")]
    struct Injected;

    /// What every state a change passes through must stay within.
    struct Bound {
        kids: BTreeSet<u32>,
        probes: Vec<IpAddr>,
        /// Admitted by the old or the new policy.
        either: BTreeSet<(u32, IpAddr)>,
        violations: Vec<String>,
    }

    /// Fails its `fail_at`-th write; checks each state against `bound`.
    struct Failing<'a> {
        model: &'a mut Model,
        fail_at: usize,
        seen: usize,
        bound: Option<&'a mut Bound>,
    }

    impl<'a> Failing<'a> {
        fn new(model: &'a mut Model, fail_at: usize) -> Self {
            Failing {
                model,
                fail_at,
                seen: 0,
                bound: None,
            }
        }
    }

    impl PolicyMaps for Failing<'_> {
        type Error = Injected;
        fn apply(&mut self, op: &PolicyOp) -> Result<(), Injected> {
            self.seen += 1;
            if self.seen == self.fail_at {
                return Err(Injected);
            }
            let m = &mut *self.model;
            fn set<T: std::hash::Hash + Eq>(s: &mut HashSet<T>, v: T, on: bool) {
                if on {
                    s.insert(v);
                } else {
                    s.remove(&v);
                }
            }
            fn put<K: std::hash::Hash + Eq, V>(m: &mut HashMap<K, V>, k: K, v: Option<V>) {
                match v {
                    Some(v) => m.insert(k, v),
                    None => m.remove(&k),
                };
            }
            match *op {
                PolicyOp::KeyState(k, Some(v)) => {
                    m.state.insert(k, v);
                }
                PolicyOp::KeyState(k, None) => {
                    m.state.remove(&k);
                }
                PolicyOp::KeyAllow4(k, n, on) => set(&mut m.allow4, (k, n), on),
                PolicyOp::KeyAllow6(k, n, on) => set(&mut m.allow6, (k, n), on),
                PolicyOp::AccountAllow4(a, n, v) => put(&mut m.acct4, (a, n), v),
                PolicyOp::AccountAllow6(a, n, v) => put(&mut m.acct6, (a, n), v),
                PolicyOp::AccountMode(a, Some(v)) => {
                    m.mode.insert(a, v);
                }
                PolicyOp::AccountMode(a, None) => {
                    m.mode.remove(&a);
                }
                PolicyOp::Guard4(s, n, on) => set(&mut m.guard4, (s, n), on),
                PolicyOp::Guard6(s, n, on) => set(&mut m.guard6, (s, n), on),
                PolicyOp::GuardPort(p, 0) => {
                    m.ports.remove(&p);
                }
                PolicyOp::GuardPort(p, v) => {
                    m.ports.insert(p, v);
                }
            }
            if let Some(b) = self.bound.as_deref_mut() {
                let now = m.admitted(&b.kids, &b.probes);
                let extra: Vec<_> = now.difference(&b.either).collect();
                if !extra.is_empty() {
                    b.violations
                        .push(format!("after write {} ({op:?}): {extra:?}", self.seen));
                }
            }
            Ok(())
        }
    }

    fn net() -> impl Strategy<Value = IpNet> {
        prop_oneof![
            (0u8..4, 24u8..=32).prop_map(|(a, l)| format!("198.51.100.{}/{l}", a * 64)
                .parse::<IpNet>()
                .unwrap()
                .trunc()),
            (0u16..4, 48u8..=64).prop_map(|(a, l)| format!("2001:db8:{a:x}::/{l}")
                .parse::<IpNet>()
                .unwrap()
                .trunc()),
        ]
    }

    fn keys() -> impl Strategy<Value = Vec<KeySpec>> {
        proptest::collection::vec(
            (
                1u32..6,
                any::<bool>(),
                proptest::collection::vec(net(), 0..3),
                0u32..3,
            ),
            0..5,
        )
        .prop_map(|v| {
            v.into_iter()
                .map(|(kid, revoked, allow, account)| KeySpec {
                    kid,
                    revoked,
                    allow,
                    account,
                })
                .collect()
        })
    }

    /// One spec per account, no prefix twice within one.
    fn accounts() -> impl Strategy<Value = Vec<AccountSpec>> {
        proptest::collection::btree_map(
            0u32..3,
            (
                any::<bool>(),
                proptest::collection::btree_map(net(), any::<bool>(), 0..6),
            ),
            0..3,
        )
        .prop_map(|m| {
            m.into_iter()
                .map(|(idx, (api_active, entries))| AccountSpec {
                    idx,
                    api_active,
                    entries: entries.into_iter().collect(),
                })
                .collect()
        })
    }

    /// Unions per service and (proto, port, service) triples.
    type GuardCase = (Vec<(u32, Vec<IpNet>)>, Vec<(u8, u16, u32)>);

    fn guard() -> impl Strategy<Value = GuardCase> {
        (
            proptest::collection::vec(net(), 0..4),
            proptest::collection::vec(net(), 0..4),
            proptest::collection::vec((prop_oneof![Just(6u8), Just(17u8)], 1u16..4, 1u32..3), 0..3),
        )
            .prop_map(|(api, smtp, ports)| (vec![(1, api), (2, smtp)], ports))
    }

    fn model_of(k: &KeyRecord, g: &GuardRecord) -> Model {
        Model {
            state: k.state.clone(),
            allow4: k.v4.clone(),
            allow6: k.v6.clone(),
            acct4: k.accounts.v4.clone(),
            acct6: k.accounts.v6.clone(),
            mode: k.accounts.mode.clone(),
            guard4: g.v4.clone(),
            guard6: g.v6.clone(),
            ports: g.ports.clone(),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// A failure at any one write of a change leaves every map as it
        /// was; without one, the maps equal the new record. No state the
        /// change passes through, forwards or undoing, admits a (key,
        /// address) that neither the old nor the new policy admits.
        #[test]
        fn a_failed_write_at_any_point_changes_nothing(
            k1 in keys(), a1 in accounts(), k2 in keys(), a2 in accounts(),
            g1 in guard(), g2 in guard(),
        ) {
            let mut model = Model::default();
            let mut ok = Failing::new(&mut model, 0);
            let pk = plan_keys(&KeyRecord::default(), &k1, &a1, 1000).unwrap();
            let pg = plan_guard(&GuardRecord::default(), &g1.0, &g1.1, 1000).unwrap();
            execute(&mut ok, &pk.ops).unwrap();
            execute(&mut ok, &pg.ops).unwrap();
            prop_assert_eq!(&model, &model_of(&pk.record, &pg.record));
            let before = model.clone();

            let nk = plan_keys(&pk.record, &k2, &a2, 1000).unwrap();
            let ng = plan_guard(&pg.record, &g2.0, &g2.1, 1000).unwrap();
            let after = model_of(&nk.record, &ng.record);
            let kids: BTreeSet<u32> = k1.iter().chain(&k2).map(|k| k.kid).collect();
            let probes = probes();
            let mut bound = Bound {
                either: before
                    .admitted(&kids, &probes)
                    .union(&after.admitted(&kids, &probes))
                    .copied()
                    .collect(),
                kids,
                probes,
                violations: Vec::new(),
            };
            for ops in [&nk.ops, &ng.ops] {
                for n in 1..=ops.len() {
                    let mut f = Failing::new(&mut model, n);
                    f.bound = Some(&mut bound);
                    prop_assert!(matches!(execute(&mut f, ops), Err(ExecError::Undone(_))));
                    prop_assert_eq!(&model, &before, "a failure at write {} left a trace", n);
                }
            }
            let mut ok = Failing::new(&mut model, 0);
            ok.bound = Some(&mut bound);
            execute(&mut ok, &nk.ops).unwrap();
            execute(&mut ok, &ng.ops).unwrap();
            prop_assert!(bound.violations.is_empty(), "admitted beyond both policies: {:?}", bound.violations);
            prop_assert_eq!(&model, &after);
        }
    }

    fn key(kid: u32, net: &str) -> KeySpec {
        KeySpec {
            kid,
            revoked: false,
            allow: vec![net.parse().unwrap()],
            account: 0,
        }
    }

    fn account(idx: u32, api_active: bool, entries: &[(&str, bool)]) -> AccountSpec {
        AccountSpec {
            idx,
            api_active,
            entries: entries
                .iter()
                .map(|(n, admit)| (n.parse().unwrap(), *admit))
                .collect(),
        }
    }

    #[test]
    fn the_armed_mask_never_drops_a_service_armed_before_and_after() {
        let union = vec![(2u32, vec!["198.51.100.0/24".parse().unwrap()])];
        let smtp = plan_guard(&GuardRecord::default(), &union, &[(6, 25, 2)], 100).unwrap();
        assert_eq!(smtp.record.ports[&ARMED_SLOT], 1 << 2);
        let both = plan_guard(&smtp.record, &union, &[(6, 25, 2), (6, 8443, 1)], 100).unwrap();
        for (op, _) in &both.ops {
            if let PolicyOp::GuardPort(ARMED_SLOT, v) = op {
                assert!(
                    v & (1 << 2) != 0,
                    "SMTP unarmed in between: {both:?}",
                    both = both.ops
                );
            }
        }
        assert_eq!(both.record.ports[&ARMED_SLOT], (1 << 2) | (1 << 1));
    }

    #[test]
    fn capacity_is_checked_at_the_peak_of_a_change() {
        let one = plan_keys(&KeyRecord::default(), &[key(1, "198.51.100.0/24")], &[], 2).unwrap();
        let two = plan_keys(
            &one.record,
            &[key(1, "198.51.100.0/24"), key(2, "203.0.113.0/24")],
            &[],
            2,
        )
        .unwrap();
        // Replacing both keys' entries: the old ones go first (narrowing),
        // so the tries never hold more than two.
        plan_keys(
            &two.record,
            &[key(3, "192.0.2.0/24"), key(4, "192.0.2.0/25")],
            &[],
            2,
        )
        .unwrap();
        // A denied entry replaced by another: the new one is written
        // first (narrowing), the old one goes last (widening), so the trie
        // holds both for a moment.
        let denied = plan_keys(
            &KeyRecord::default(),
            &[],
            &[account(0, false, &[("198.51.100.7/32", false)])],
            1,
        )
        .unwrap();
        let err = plan_keys(
            &denied.record,
            &[],
            &[account(0, false, &[("198.51.100.8/32", false)])],
            1,
        )
        .err()
        .unwrap();
        assert_eq!((err.map, err.peak, err.capacity), ("ACCOUNT_ALLOW4", 2, 1));
    }

    #[test]
    fn a_key_moving_accounts_switches_after_narrowing_and_before_widening() {
        let mut k = key(1, "198.51.100.0/24");
        let old = plan_keys(
            &KeyRecord::default(),
            std::slice::from_ref(&k),
            &[
                account(0, true, &[("198.51.100.0/24", true)]),
                account(1, true, &[]),
            ],
            10,
        )
        .unwrap();
        k.account = 1;
        let new = plan_keys(
            &old.record,
            &[k],
            &[
                account(0, true, &[]),
                account(1, true, &[("198.51.100.0/24", true)]),
            ],
            10,
        )
        .unwrap();
        let at = |want: &dyn Fn(&PolicyOp) -> bool| new.ops.iter().position(|(op, _)| want(op));
        let removal = at(&|op| matches!(op, PolicyOp::AccountAllow4(0, _, None))).unwrap();
        let switch =
            at(&|op| matches!(op, PolicyOp::KeyState(1, Some(s)) if s.account == 1)).unwrap();
        let addition = at(&|op| matches!(op, PolicyOp::AccountAllow4(1, _, Some(_)))).unwrap();
        assert!(removal < switch && switch < addition, "{:?}", new.ops);
    }

    #[test]
    fn a_prefix_given_twice_is_denied() {
        let p = plan_keys(
            &KeyRecord::default(),
            &[],
            &[account(
                7,
                false,
                &[("198.51.100.0/24", true), ("198.51.100.9/24", false)],
            )],
            10,
        )
        .unwrap();
        let n: Ipv4Net = "198.51.100.0/24".parse().unwrap();
        assert_eq!(p.record.accounts.v4[&(7, n)], ACCOUNT_DENIED);
        assert_eq!(p.record.accounts.v4.len(), 1);
    }
}
