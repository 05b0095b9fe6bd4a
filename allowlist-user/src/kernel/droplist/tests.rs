use super::*;
use proptest::prelude::*;
use std::net::IpAddr;

/// The meaning the layout must have: among unexpired entries covering
/// the address, the longest decides.
fn reference(specs: &[DropSpec], addr: IpAddr, now: u64) -> Option<u32> {
    let mut by_net: HashMap<IpNet, &DropSpec> = HashMap::new();
    for s in specs {
        by_net.insert(s.net.trunc(), s);
    }
    by_net
        .values()
        .filter(|s| s.net.contains(&addr) && (s.expires_ns == 0 || s.expires_ns > now))
        .max_by_key(|s| s.net.prefix_len())
        .map(|s| s.reason)
}

/// Whether the longest entry covering `addr` is itself unexpired.
fn longest_unexpired(specs: &[DropSpec], addr: IpAddr, now: u64) -> bool {
    let mut by_net: HashMap<IpNet, &DropSpec> = HashMap::new();
    for s in specs {
        by_net.insert(s.net.trunc(), s);
    }
    by_net
        .values()
        .filter(|s| s.net.contains(&addr))
        .max_by_key(|s| s.net.prefix_len())
        .is_none_or(|s| s.expires_ns == 0 || s.expires_ns > now)
}

fn lookup(m: &ModelMaps, addr: IpAddr, now: u64) -> Option<u32> {
    match addr {
        IpAddr::V4(a) => m.lookup_v4(a, now),
        IpAddr::V6(a) => m.lookup_v6(a, now),
    }
}

// Addresses are drawn from a small space so prefixes nest and collide.
fn spec4() -> impl Strategy<Value = DropSpec> {
    (
        0u32..4096,
        20u8..=32,
        1u32..4,
        prop_oneof![Just(0u64), 1u64..100],
    )
        .prop_map(|(a, len, reason, exp)| DropSpec {
            net: IpNet::V4(
                Ipv4Net::new(Ipv4Addr::from(0xC000_0000 | (a << 4)), len)
                    .unwrap()
                    .trunc(),
            ),
            reason,
            expires_ns: exp,
        })
}

fn spec6() -> impl Strategy<Value = DropSpec> {
    (
        0u32..64,
        0u64..256,
        24u8..=128,
        1u32..4,
        prop_oneof![Just(0u64), 1u64..100],
    )
        .prop_map(|(top, low, len, reason, exp)| {
            let a = (0x2001_0db8u128 << 96)
                | ((top as u128) << 90)
                | ((low as u128) << 60)
                | low as u128;
            DropSpec {
                net: IpNet::V6(Ipv6Net::new(Ipv6Addr::from(a), len).unwrap().trunc()),
                reason,
                expires_ns: exp,
            }
        })
}

fn probes(specs: &[DropSpec]) -> Vec<IpAddr> {
    let mut out = Vec::new();
    for s in specs {
        out.push(s.net.network());
        out.push(s.net.broadcast());
        match s.net {
            IpNet::V4(n) => {
                let a = u32::from(n.network());
                out.push(IpAddr::V4(Ipv4Addr::from(a.wrapping_sub(1))));
                out.push(IpAddr::V4(Ipv4Addr::from(
                    u32::from(n.broadcast()).wrapping_add(1),
                )));
                out.push(IpAddr::V4(Ipv4Addr::from(a | 0x55)));
            }
            IpNet::V6(n) => {
                let a = u128::from(n.network());
                out.push(IpAddr::V6(Ipv6Addr::from(a.wrapping_sub(1))));
                out.push(IpAddr::V6(Ipv6Addr::from(
                    u128::from(n.broadcast()).wrapping_add(1),
                )));
            }
        }
    }
    out
}

/// Half of the current set, permanent, in a new order: a different
/// set for the adopter to converge to.
fn probes_specs_rev(list: &DropList) -> Vec<DropSpec> {
    let mut out: Vec<DropSpec> = list
        .v4
        .keys()
        .map(|n| IpNet::V4(*n))
        .chain(list.v6.keys().map(|n| IpNet::V6(*n)))
        .step_by(2)
        .map(|net| DropSpec {
            net,
            reason: 3,
            expires_ns: 0,
        })
        .collect();
    out.reverse();
    out
}

#[derive(Debug, thiserror::Error)]
#[error("injected failure")]
struct Injected;

/// Model maps whose `n`-th entry written fails. A write of several
/// entries that reaches it makes the ones before it, as the kernel's batch
/// commands do.
struct FailAt<'a> {
    maps: &'a mut ModelMaps,
    n: usize,
    seen: usize,
}

impl FailAt<'_> {
    /// How many of the next `len` entries go through, and whether the
    /// write fails after them.
    fn admit(&mut self, len: usize) -> (usize, Result<(), Injected>) {
        let start = self.seen;
        self.seen += len;
        if self.n > start && self.n <= start + len {
            (self.n - start - 1, Err(Injected))
        } else {
            (len, Ok(()))
        }
    }
}

impl DropMaps for FailAt<'_> {
    type Error = Injected;
    fn set_rules(&mut self, rules: &[(u32, DropRule)]) -> Result<(), Injected> {
        let (k, r) = self.admit(rules.len());
        let _ = self.maps.set_rules(&rules[..k]);
        r
    }
    fn v4_slot(&self, slot: u32) -> u32 {
        self.maps.v4_slot(slot)
    }
    fn set_v4_slot(&mut self, slot: u32, value: u32) -> Result<(), Injected> {
        let (k, r) = self.admit(1);
        if k == 1 {
            let _ = self.maps.set_v4_slot(slot, value);
        }
        r
    }
    fn set_v4_long(&mut self, entries: &[(V4LongKey, u32)]) -> Result<(), Injected> {
        let (k, r) = self.admit(entries.len());
        let _ = self.maps.set_v4_long(&entries[..k]);
        r
    }
    fn del_v4_long(&mut self, keys: &[V4LongKey]) -> Result<(), Injected> {
        let (k, r) = self.admit(keys.len());
        let _ = self.maps.del_v4_long(&keys[..k]);
        r
    }
    fn set_v6_l1(&mut self, entries: &[(u32, V6L1Value)]) -> Result<(), Injected> {
        let (k, r) = self.admit(entries.len());
        let _ = self.maps.set_v6_l1(&entries[..k]);
        r
    }
    fn del_v6_l1(&mut self, tops: &[u32]) -> Result<(), Injected> {
        let (k, r) = self.admit(tops.len());
        let _ = self.maps.del_v6_l1(&tops[..k]);
        r
    }
    fn set_v6_long(&mut self, entries: &[(V6LongKey, u32)]) -> Result<(), Injected> {
        let (k, r) = self.admit(entries.len());
        let _ = self.maps.set_v6_long(&entries[..k]);
        r
    }
    fn del_v6_long(&mut self, keys: &[V6LongKey]) -> Result<(), Injected> {
        let (k, r) = self.admit(keys.len());
        let _ = self.maps.del_v6_long(&keys[..k]);
        r
    }
    fn rules(&self, indices: &[u32]) -> Result<Vec<DropRule>, Injected> {
        Ok(self.maps.rules(indices).unwrap())
    }
    fn v4_long(&self, keys: &[V4LongKey]) -> Result<Vec<Option<u32>>, Injected> {
        Ok(self.maps.v4_long(keys).unwrap())
    }
    fn v6_l1(&self, tops: &[u32]) -> Result<Vec<Option<V6L1Value>>, Injected> {
        Ok(self.maps.v6_l1(tops).unwrap())
    }
    fn v6_long(&self, keys: &[V6LongKey]) -> Result<Vec<Option<u32>>, Injected> {
        Ok(self.maps.v6_long(keys).unwrap())
    }
}

/// What the model holds, in the part of the v4 table the specs reach
/// (0xC0000000/16), with zeroed rules counted as absent.
type Held = (
    HashMap<u32, DropRule>,
    Vec<u32>,
    HashMap<V4LongKey, u32>,
    HashMap<u32, V6L1Value>,
    HashMap<V6LongKey, u32>,
);

fn held(m: &ModelMaps) -> Held {
    (
        m.rules
            .iter()
            .filter(|(_, r)| **r != DropRule::default())
            .map(|(i, r)| (*i, *r))
            .collect(),
        m.v4_l1[0xC0_0000..0xC0_0100].to_vec(),
        m.v4_long.clone(),
        m.v6_l1.clone(),
        m.v6_long.clone(),
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// A failure at any one map write of a change leaves the maps and
    /// the compiler's record exactly as they were; without a failure
    /// the change lands and matches the reference.
    #[test]
    fn a_failed_write_at_any_point_changes_nothing(
        a in proptest::collection::vec(prop_oneof![spec4(), spec6()], 0..10),
        b in proptest::collection::vec(prop_oneof![spec4(), spec6()], 0..10),
    ) {
        let mut list = DropList::new(4096);
        let mut model = ModelMaps::default();
        list.apply(&mut model, &a).unwrap();
        let (list_before, maps_before) = (list.clone(), held(&model));
        let mut landed = false;
        for n in 1..100_000 {
            let mut failing = FailAt { maps: &mut model, n, seen: 0 };
            match list.apply(&mut failing, &b) {
                Err(DropListError::Maps(_)) => {
                    prop_assert!(list == list_before, "record changed after a failure at write {}", n);
                    prop_assert!(held(&model) == maps_before, "maps changed after a failure at write {}", n);
                }
                Err(e) => prop_assert!(false, "{}", e),
                Ok(()) => {
                    landed = true;
                    break;
                }
            }
        }
        prop_assert!(landed);
        for addr in probes(&b).into_iter().chain(probes(&a)) {
            for now in [0u64, 50, 200] {
                let (got, want) = (lookup(&model, addr, now), reference(&b, addr, now));
                prop_assert_eq!(got.is_some(), want.is_some(), "{} at {}", addr, now);
                if longest_unexpired(&b, addr, now) {
                    prop_assert_eq!(got, want, "{} at {}", addr, now);
                }
            }
        }
    }
}

#[test]
fn an_ipv6_prefix_counts_every_first_level_entry_it_takes() {
    let mut list = DropList::new(300);
    let mut model = ModelMaps::default();
    let slash24 = |i: u8| DropSpec {
        net: format!("2001:{i:x}00::/24").parse().unwrap(),
        reason: 1,
        expires_ns: 0,
    };
    // One /24 is 256 first-level entries: fits in 300; two do not.
    list.apply(&mut model, &[slash24(1)]).unwrap();
    let err = list
        .apply(&mut model, &[slash24(1), slash24(2)])
        .unwrap_err();
    assert!(
        matches!(
            err,
            DropListError::V6FirstLevelFull {
                wanted: 512,
                capacity: 300
            }
        ),
        "{err}"
    );
    assert_eq!(
        model.v6_l1.len(),
        256,
        "nothing written for the refused change"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// After any sequence of whole-set changes, every probe address gets
    /// the reference LPM verdict, at several points in time.
    #[test]
    fn layout_equals_lpm(
        steps in prop::collection::vec(
            (prop::collection::vec(spec4(), 0..40), prop::collection::vec(spec6(), 0..40)),
            1..4,
        ),
    ) {
        let mut maps = ModelMaps::default();
        let mut list = DropList::new(10_000);
        for (v4, v6) in steps {
            let specs: Vec<DropSpec> = v4.into_iter().chain(v6).collect();
            list.apply(&mut maps, &specs).unwrap();
            for addr in probes(&specs) {
                for now in [0u64, 50, 150] {
                    let got = lookup(&maps, addr, now);
                    let want = reference(&specs, addr, now);
                    // Whether it drops is exact. The reason is exact too,
                    // except that an expired entry nested in a live one
                    // keeps its own reason until the sweeper removes it.
                    prop_assert_eq!(got.is_some(), want.is_some(), "{} at {}", addr, now);
                    if longest_unexpired(&specs, addr, now) {
                        prop_assert_eq!(got, want, "{} at {}", addr, now);
                    }
                }
            }
        }
        // A new daemon adopting these maps with another set ends up
        // with exactly that set, and nothing stale.
        let mut adopter = DropList::new(10_000);
        let last: Vec<DropSpec> = probes_specs_rev(&list);
        adopter.adopt(&mut maps, &last).unwrap();
        for s in &last {
            for addr in [s.net.network(), s.net.broadcast()] {
                prop_assert_eq!(lookup(&maps, addr, 0), reference(&last, addr, 0));
            }
        }
        let mut list = adopter;
        // Removing everything leaves nothing behind.
        list.apply(&mut maps, &[]).unwrap();
        prop_assert!(maps.rules.values().all(|r| *r == DropRule::default()));
        prop_assert!(maps.v4_l1.iter().all(|&s| s == 0));
        prop_assert!(maps.v4_long.is_empty() && maps.v6_l1.is_empty() && maps.v6_long.is_empty());
    }
}

#[test]
fn a_change_touching_many_slots_repaints_the_whole_table() {
    let mut maps = ModelMaps::default();
    let mut list = DropList::new(100);
    let mut specs: Vec<DropSpec> = (10..30u8)
        .map(|a| DropSpec {
            net: format!("{a}.0.0.0/8").parse().unwrap(),
            reason: 1,
            expires_ns: 0,
        })
        .collect();
    specs.push(DropSpec {
        net: "12.34.0.0/16".parse().unwrap(),
        reason: 2,
        expires_ns: 0,
    });
    specs.push(DropSpec {
        net: "12.34.56.78/32".parse().unwrap(),
        reason: 3,
        expires_ns: 0,
    });
    list.apply(&mut maps, &specs).unwrap();
    let check = |maps: &ModelMaps, specs: &[DropSpec]| {
        for addr in [
            "9.255.255.255",
            "10.0.0.0",
            "12.34.56.77",
            "12.34.56.78",
            "12.35.0.1",
            "29.1.2.3",
            "30.0.0.0",
        ] {
            let a: IpAddr = addr.parse().unwrap();
            assert_eq!(lookup(maps, a, 0), reference(specs, a, 0), "{addr}");
        }
    };
    check(&maps, &specs);
    // Removing most of them again goes through the repaint too.
    specs.drain(0..18);
    list.apply(&mut maps, &specs).unwrap();
    check(&maps, &specs);
    // 28.0.0.0/8 and 29.0.0.0/8, plus 12.34.0.0/16 now that 12/8 is gone.
    assert_eq!(
        maps.v4_l1.iter().filter(|&&s| s != 0).count(),
        2 * 65536 + 256
    );
}

#[test]
fn slash24_covers_exactly_its_addresses() {
    let mut maps = ModelMaps::default();
    let mut list = DropList::new(10);
    let net: IpNet = "198.51.100.0/24".parse().unwrap();
    list.apply(
        &mut maps,
        &[DropSpec {
            net,
            reason: 1,
            expires_ns: 0,
        }],
    )
    .unwrap();
    for a in 0..=u32::MAX >> 20 {
        let addr = Ipv4Addr::from(0xC633_6000u32.wrapping_sub(2048) + a);
        let want = net.contains(&IpAddr::V4(addr)).then_some(1);
        assert_eq!(maps.lookup_v4(addr, 0), want, "{addr}");
    }
}

#[test]
fn refuses_too_wide_and_over_capacity_without_writing() {
    let mut maps = ModelMaps::default();
    let mut list = DropList::new(2);
    let wide = DropSpec {
        net: "10.0.0.0/7".parse().unwrap(),
        reason: 1,
        expires_ns: 0,
    };
    let err = list.apply(&mut maps, &[wide]).unwrap_err();
    assert!(err.to_string().contains("10.0.0.0/7 is too wide"), "{err}");
    let specs: Vec<DropSpec> = (0..3)
        .map(|i| DropSpec {
            net: format!("192.0.2.{i}/32").parse().unwrap(),
            reason: 1,
            expires_ns: 0,
        })
        .collect();
    let err = list.apply(&mut maps, &specs).unwrap_err();
    assert!(
        matches!(
            err,
            DropListError::Full {
                wanted: 3,
                capacity: 2
            }
        ),
        "{err}"
    );
    assert!(maps.rules.is_empty() && maps.v4_long.is_empty());
}
