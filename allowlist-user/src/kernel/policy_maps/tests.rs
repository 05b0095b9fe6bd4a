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

/// A policy as whole accounts: index -> (API blocking active, entries,
/// keys as (revoked, allowlist)); key ids are unique per account.
type Policy = BTreeMap<u32, (bool, BTreeMap<IpNet, bool>, Vec<(bool, Vec<IpNet>)>)>;

fn policy() -> impl Strategy<Value = Policy> {
    proptest::collection::btree_map(
        0u32..4,
        (
            any::<bool>(),
            proptest::collection::btree_map(net(), any::<bool>(), 0..4),
            proptest::collection::vec(
                (any::<bool>(), proptest::collection::vec(net(), 0..3)),
                0..3,
            ),
        ),
        0..4,
    )
}

fn specs_of<'a>(p: &Policy, only: impl Fn(u32) -> bool + 'a) -> (Vec<KeySpec>, Vec<AccountSpec>) {
    let (mut keys, mut accounts) = (Vec::new(), Vec::new());
    for (idx, (api_active, entries, ks)) in p {
        if !only(*idx) {
            continue;
        }
        accounts.push(AccountSpec {
            idx: *idx,
            api_active: *api_active,
            entries: entries.iter().map(|(n, a)| (*n, *a)).collect(),
        });
        for (j, (revoked, allow)) in ks.iter().enumerate() {
            keys.push(KeySpec {
                kid: idx * 10 + j as u32 + 1,
                revoked: *revoked,
                allow: allow.clone(),
                account: *idx,
            });
        }
    }
    (keys, accounts)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// A change planned from the accounts it touched alone writes the
    /// maps to what planning the whole policy would, never admits beyond
    /// both policies on the way, and leaves the same record; likewise the
    /// guard planned from the prefixes entering and leaving it.
    #[test]
    fn a_delta_plan_ends_where_the_whole_plan_does(
        old in policy(), mut new in policy(), keep in proptest::collection::btree_set(0u32..4, 0..4),
        g1 in guard(), g2 in guard(),
    ) {
        // Accounts in `keep` are untouched by the change.
        for idx in &keep {
            match old.get(idx) {
                Some(a) => { new.insert(*idx, a.clone()); }
                None => { new.remove(idx); }
            }
        }
        let touched = |idx: u32| old.get(&idx) != new.get(&idx);
        let (k1, a1) = specs_of(&old, |_| true);
        let (k2, a2) = specs_of(&new, |_| true);
        let mut model = Model::default();
        let mut ok = Failing::new(&mut model, 0);
        let full_old = plan_keys(&KeyRecord::default(), &k1, &a1, 1000).unwrap();
        let guard_old = plan_guard(&GuardRecord::default(), &g1.0, &g1.1, 1000).unwrap();
        execute(&mut ok, &full_old.ops).unwrap();
        execute(&mut ok, &guard_old.ops).unwrap();
        let before = model.clone();

        let old_part = specs_of(&old, touched);
        let new_part = specs_of(&new, touched);
        let delta = plan_keys_delta(
            &full_old.record,
            (&old_part.0, &old_part.1),
            (&new_part.0, &new_part.1),
            1000,
        )
        .unwrap();
        let whole = plan_keys(&full_old.record, &k2, &a2, 1000).unwrap();
        let union = |g: &GuardCase| -> BTreeSet<(u32, IpNet)> {
            g.0.iter().flat_map(|(s, ns)| ns.iter().map(|n| (*s, n.trunc()))).collect()
        };
        let (u1, u2) = (union(&g1), union(&g2));
        let add: Vec<(u32, IpNet)> = u2.difference(&u1).copied().collect();
        let remove: Vec<(u32, IpNet)> = u1.difference(&u2).copied().collect();
        let gdelta = plan_guard_delta(&guard_old.record, &add, &remove, &g2.1, 1000).unwrap();
        let gwhole = plan_guard(&guard_old.record, &g2.0, &g2.1, 1000).unwrap();

        let kids: BTreeSet<u32> = k1.iter().chain(&k2).map(|k| k.kid).collect();
        let probes = probes();
        let after = model_of(&whole.record, &gwhole.record);
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
        let mut ok = Failing::new(&mut model, 0);
        ok.bound = Some(&mut bound);
        execute(&mut ok, &delta.ops).unwrap();
        execute(&mut ok, &gdelta.ops).unwrap();
        prop_assert!(bound.violations.is_empty(), "admitted beyond both policies: {:?}", bound.violations);
        prop_assert_eq!(&model, &after);
        let mut record = full_old.record.clone();
        record.apply(delta.record);
        prop_assert_eq!(&record, &whole.record);
        let mut grecord = guard_old.record.clone();
        grecord.apply(gdelta.record);
        prop_assert_eq!(&grecord, &gwhole.record);
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
    let switch = at(&|op| matches!(op, PolicyOp::KeyState(1, Some(s)) if s.account == 1)).unwrap();
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
