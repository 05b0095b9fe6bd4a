//! The policy maps the connection hooks and the guard read — per-key
//! allowlists and states, guard unions, guarded ports — written as planned
//! diffs that are never half-applied.
//!
//! A change is first planned, purely: every write paired with the write
//! that undoes it (known from the record of what the maps hold), and the
//! peak each map reaches while the writes run (adds come before removes,
//! so the guard never drops a source both the old and the new policy
//! admit) checked against its capacity. Then the writes run; if one fails,
//! the ones already made are undone in reverse order.

use std::collections::{BTreeMap, HashSet};

use allowlist_common::{
    ARMED_SLOT, KEY_ACTIVE, KEY_REVOKED, PROTO_TCP, PROTO_UDP, guard_service, with_guard_service,
};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// One write to a policy map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyOp {
    /// Key id -> state; `None` removes it.
    KeyState(u32, Option<u32>),
    /// (key, prefix) present or not in the per-key allowlist tries.
    KeyAllow4(u32, Ipv4Net, bool),
    KeyAllow6(u32, Ipv6Net, bool),
    /// (service, prefix) present or not in the guard unions.
    Guard4(u32, Ipv4Net, bool),
    Guard6(u32, Ipv6Net, bool),
    /// A `GUARD_PORTS` slot's value.
    GuardPort(u16, u32),
}

/// Where planned writes go: the pinned maps, or a model in tests.
pub trait PolicyMaps {
    type Error: std::error::Error + Send + Sync + 'static;
    fn apply(&mut self, op: &PolicyOp) -> Result<(), Self::Error>;
}

/// The per-key allowlists and states as last written.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyRecord {
    pub v4: HashSet<(u32, Ipv4Net)>,
    pub v6: HashSet<(u32, Ipv6Net)>,
    pub state: BTreeMap<u32, u32>,
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

/// Plans the per-key maps for `keys`: revocations first (a revoked key
/// stops at once), then new allowlist entries, removals, new states.
pub fn plan_keys(
    old: &KeyRecord,
    keys: &[KeySpec],
    capacity: usize,
) -> Result<Plan<KeyRecord>, TooMany> {
    let mut new = KeyRecord::default();
    for k in keys {
        new.state
            .insert(k.kid, if k.revoked { KEY_REVOKED } else { KEY_ACTIVE });
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
    let state_peak = old.state.len()
        + new
            .state
            .keys()
            .filter(|k| !old.state.contains_key(k))
            .count();
    check("KEY_ALLOW4", peak(&old.v4, &new.v4), capacity)?;
    check("KEY_ALLOW6", peak(&old.v6, &new.v6), capacity)?;
    check("KEY_STATE", state_peak, capacity)?;

    let mut ops = Vec::new();
    let state_op = |kid: u32, st: u32| {
        (
            PolicyOp::KeyState(kid, Some(st)),
            PolicyOp::KeyState(kid, old.state.get(&kid).copied()),
        )
    };
    for (kid, st) in &new.state {
        if *st == KEY_REVOKED && old.state.get(kid) != Some(st) {
            ops.push(state_op(*kid, *st));
        }
    }
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
    for (kid, st) in &new.state {
        if *st != KEY_REVOKED && old.state.get(kid) != Some(st) {
            ops.push(state_op(*kid, *st));
        }
    }
    for (kid, st) in &old.state {
        if !new.state.contains_key(kid) {
            ops.push((
                PolicyOp::KeyState(*kid, None),
                PolicyOp::KeyState(*kid, Some(*st)),
            ));
        }
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
    use super::*;
    use proptest::prelude::*;

    /// The maps as sets, as the kernel would hold them.
    #[derive(Clone, Debug, Default, PartialEq, Eq)]
    struct Model {
        state: BTreeMap<u32, u32>,
        allow4: HashSet<(u32, Ipv4Net)>,
        allow6: HashSet<(u32, Ipv6Net)>,
        guard4: HashSet<(u32, Ipv4Net)>,
        guard6: HashSet<(u32, Ipv6Net)>,
        ports: BTreeMap<u16, u32>,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("injected failure")]
    struct Injected;

    /// Fails its `fail_at`-th write.
    struct Failing<'a> {
        model: &'a mut Model,
        fail_at: usize,
        seen: usize,
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
            match *op {
                PolicyOp::KeyState(k, Some(v)) => {
                    m.state.insert(k, v);
                }
                PolicyOp::KeyState(k, None) => {
                    m.state.remove(&k);
                }
                PolicyOp::KeyAllow4(k, n, on) => set(&mut m.allow4, (k, n), on),
                PolicyOp::KeyAllow6(k, n, on) => set(&mut m.allow6, (k, n), on),
                PolicyOp::Guard4(s, n, on) => set(&mut m.guard4, (s, n), on),
                PolicyOp::Guard6(s, n, on) => set(&mut m.guard6, (s, n), on),
                PolicyOp::GuardPort(p, 0) => {
                    m.ports.remove(&p);
                }
                PolicyOp::GuardPort(p, v) => {
                    m.ports.insert(p, v);
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
            ),
            0..5,
        )
        .prop_map(|v| {
            v.into_iter()
                .map(|(kid, revoked, allow)| KeySpec {
                    kid,
                    revoked,
                    allow,
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
            guard4: g.v4.clone(),
            guard6: g.v6.clone(),
            ports: g.ports.clone(),
        }
    }

    proptest! {
        /// A failure at any one write of a change leaves every map as it
        /// was; without one, the maps equal the new record.
        #[test]
        fn a_failed_write_at_any_point_changes_nothing(
            k1 in keys(), k2 in keys(), g1 in guard(), g2 in guard(),
        ) {
            let mut model = Model::default();
            let mut ok = Failing { model: &mut model, fail_at: 0, seen: 0 };
            let pk = plan_keys(&KeyRecord::default(), &k1, 1000).unwrap();
            let pg = plan_guard(&GuardRecord::default(), &g1.0, &g1.1, 1000).unwrap();
            execute(&mut ok, &pk.ops).unwrap();
            execute(&mut ok, &pg.ops).unwrap();
            prop_assert_eq!(&model, &model_of(&pk.record, &pg.record));
            let before = model.clone();

            let nk = plan_keys(&pk.record, &k2, 1000).unwrap();
            let ng = plan_guard(&pg.record, &g2.0, &g2.1, 1000).unwrap();
            for ops in [&nk.ops, &ng.ops] {
                for n in 1..=ops.len() {
                    let mut f = Failing { model: &mut model, fail_at: n, seen: 0 };
                    prop_assert!(matches!(execute(&mut f, ops), Err(ExecError::Undone(_))));
                    prop_assert_eq!(&model, &before, "a failure at write {} left a trace", n);
                }
            }
            let mut ok = Failing { model: &mut model, fail_at: 0, seen: 0 };
            execute(&mut ok, &nk.ops).unwrap();
            execute(&mut ok, &ng.ops).unwrap();
            prop_assert_eq!(&model, &model_of(&nk.record, &ng.record));
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
        let key = |kid, net: &str| KeySpec {
            kid,
            revoked: false,
            allow: vec![net.parse().unwrap()],
        };
        let one = plan_keys(&KeyRecord::default(), &[key(1, "198.51.100.0/24")], 2).unwrap();
        // Replacing both keys' entries by two others holds four for a
        // moment (adds before removes): refused against a capacity of 3.
        let two = plan_keys(
            &one.record,
            &[key(1, "198.51.100.0/24"), key(2, "203.0.113.0/24")],
            2,
        )
        .unwrap();
        let err = plan_keys(
            &two.record,
            &[key(3, "192.0.2.0/24"), key(4, "192.0.2.0/25")],
            3,
        )
        .err()
        .unwrap();
        assert_eq!((err.map, err.peak, err.capacity), ("KEY_ALLOW4", 4, 3));
    }
}
