//! Bulk kernel map writes through the kernel's batch map commands, against
//! the real maps: what they leave must be exactly what one write per entry
//! leaves (loading, changing, and adopting after a restart), for the drop
//! list and the policy maps; and a change that fails partway through a
//! batch — a hash map filling up — must leave the maps as they were. The
//! maps are read back with aya, not with the code under test.

use std::{
    collections::{BTreeMap, HashMap},
    net::{Ipv4Addr, Ipv6Addr},
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use allowlist::kernel::{AccountSpec, AttachMode, DropSpec, Kernel, KernelOptions, KeySpec};
use allowlist_common::{DropRule, V4_L1_SLOTS, V4LongKey, V6L1Value, V6LongKey};
use allowlist_tests::{bench::Rng, kernel_tests_enabled};
use aya::maps::{Array, HashMap as BpfHashMap, LpmTrie, Map, MapData};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// A private bpffs folder, unloaded however the test ends.
struct Pins(PathBuf);

impl Pins {
    fn new() -> Self {
        Pins(PathBuf::from("/sys/fs/bpf").join(allowlist_tests::unique("batch")))
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = allowlist::kernel::unload(&self.0);
    }
}

fn load(bpffs: &Path, capacity: u32, batch_writes: bool) -> Kernel {
    Kernel::load(KernelOptions {
        bpffs: bpffs.to_path_buf(),
        interfaces: vec![],
        mode: AttachMode::Generic,
        drop_capacity: capacity,
        guard_capacity: 1 << 16,
        cgroup: None,
        batch_writes,
    })
    .expect("load the programs")
}

fn specs(rng: &mut Rng, n4: usize, n6: usize, reason: u32) -> Vec<DropSpec> {
    let mut out = Vec::new();
    for _ in 0..n4 {
        let len = rng.range(16, 32) as u8;
        let net = Ipv4Net::new(Ipv4Addr::from(rng.next_u64() as u32), len).unwrap();
        out.push(DropSpec {
            net: IpNet::V4(net.trunc()),
            reason,
            expires_ns: 0,
        });
    }
    for _ in 0..n6 {
        // Under a few /32s, so that first-level entries are shared.
        let top = 0x2001_0db8_0000u128 | u128::from(rng.range(0, 16) as u32);
        let a = (top << 80) | (u128::from(rng.next_u64()) << 16);
        let len = rng.range(33, 128) as u8;
        let net = Ipv6Net::new(Ipv6Addr::from(a), len).unwrap();
        out.push(DropSpec {
            net: IpNet::V6(net.trunc()),
            reason,
            expires_ns: 0,
        });
    }
    out
}

fn map(bpffs: &Path, name: &str) -> MapData {
    MapData::from_pin(bpffs.join("maps").join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// What the drop maps mean, with rule numbers replaced by the rules they
/// name (two loads may number rules differently): every long-prefix entry,
/// every first-level v6 entry, every non-zero v4 slot, and how many rules
/// are in use.
#[derive(Debug, PartialEq, Eq)]
struct Meaning {
    v4_long: HashMap<V4LongKey, (u32, u64)>,
    v6_long: HashMap<V6LongKey, (u32, u64)>,
    v6_l1: HashMap<u32, (u32, u64, (u32, u64))>,
    v4_l1: BTreeMap<u32, (u32, (u32, u64))>,
    rules_in_use: usize,
}

fn meaning(bpffs: &Path) -> Meaning {
    let rules: Array<MapData, DropRule> =
        Array::try_from(Map::Array(map(bpffs, "DROP_RULES"))).unwrap();
    let rule = |i: u32| -> (u32, u64) {
        let r = rules.get(&i, 0).unwrap();
        (r.reason, r.expires_ns)
    };
    let v4_long: BpfHashMap<MapData, V4LongKey, u32> =
        BpfHashMap::try_from(Map::HashMap(map(bpffs, "DROP4_LONG"))).unwrap();
    let v6_long: BpfHashMap<MapData, V6LongKey, u32> =
        BpfHashMap::try_from(Map::HashMap(map(bpffs, "DROP6_LONG"))).unwrap();
    let v6_l1: BpfHashMap<MapData, u32, V6L1Value> =
        BpfHashMap::try_from(Map::HashMap(map(bpffs, "DROP6_L1"))).unwrap();
    let l1_data = map(bpffs, "DROP4_L1");
    let slots = allowlist::sys::MmapU32::new(l1_data.fd().as_fd(), V4_L1_SLOTS as usize).unwrap();
    let mut used = std::collections::HashSet::new();
    let mut v4_l1 = BTreeMap::new();
    for slot in 0..V4_L1_SLOTS {
        let v = slots.get(slot);
        if v != 0 {
            let index = v >> allowlist_common::V4_L1_LEN_BITS;
            used.insert(index);
            v4_l1.insert(slot, (v & 0xff, rule(index)));
        }
    }
    // A long-prefix hash with each rule number resolved (and counted).
    fn resolved<K: aya::Pod + Eq + std::hash::Hash>(
        hash: &BpfHashMap<MapData, K, u32>,
        used: &mut std::collections::HashSet<u32>,
        rule: &impl Fn(u32) -> (u32, u64),
    ) -> HashMap<K, (u32, u64)> {
        hash.iter()
            .map(|e| {
                let (k, i) = e.unwrap();
                used.insert(i);
                (k, rule(i))
            })
            .collect()
    }
    let v4_long = resolved(&v4_long, &mut used, &rule);
    let v6_long = resolved(&v6_long, &mut used, &rule);
    let v6_l1: HashMap<_, _> = v6_l1
        .iter()
        .map(|e| {
            let (k, v) = e.unwrap();
            used.insert(v.rule);
            (k, (v.bits_33_64, v.bits_65_128, rule(v.rule)))
        })
        .collect();
    used.remove(&0);
    Meaning {
        v4_long,
        v6_long,
        v6_l1,
        v4_l1,
        rules_in_use: used.len(),
    }
}

#[test]
fn batched_writes_leave_what_single_writes_leave() {
    if !kernel_tests_enabled("batched_writes_leave_what_single_writes_leave") {
        return;
    }
    // More entries per map than one batch call takes (8192), so chunking
    // is crossed; a third replaced, new reasons on some, then a restart
    // that adopts the pinned maps and loads another list.
    let mut rng = Rng(0xba7c_0001);
    let first = specs(&mut rng, 12_000, 12_000, 1);
    let mut second: Vec<DropSpec> = first
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 3 != 0)
        .map(|(i, s)| DropSpec {
            reason: if i % 5 == 0 { 2 } else { s.reason },
            ..*s
        })
        .collect();
    second.extend(specs(&mut rng, 5_000, 5_000, 3));
    let third: Vec<DropSpec> = second
        .iter()
        .step_by(2)
        .copied()
        .chain(specs(&mut rng, 3_000, 3_000, 4))
        .collect();

    let mut seen: Vec<Vec<Meaning>> = Vec::new();
    for batch_writes in [true, false] {
        let pins = Pins::new();
        let mut steps = Vec::new();
        let mut k = load(&pins.0, 1 << 16, batch_writes);
        k.sync_drops(&first).expect("first list");
        steps.push(meaning(&pins.0));
        k.sync_drops(&second).expect("second list");
        steps.push(meaning(&pins.0));
        drop(k);
        let mut k = load(&pins.0, 1 << 16, batch_writes);
        k.sync_drops(&third)
            .expect("third list, adopting the pinned maps");
        steps.push(meaning(&pins.0));
        seen.push(steps);
    }
    for (step, (batched, single)) in seen[0].iter().zip(&seen[1]).enumerate() {
        assert!(
            batched == single,
            "step {step}: the batched maps differ from the one-write-per-entry maps"
        );
    }
    // And the maps hold the list: every long prefix under its own reason.
    let last = &seen[0][2];
    let mut want4 = HashMap::new();
    let mut want6 = HashMap::new();
    for s in &third {
        match s.net {
            IpNet::V4(n) if n.prefix_len() > 24 => {
                want4.insert(allowlist::kernel::droplist::v4_long_key(&n), s.reason);
            }
            IpNet::V6(n) if n.prefix_len() > 32 => {
                want6.insert(allowlist::kernel::droplist::v6_long_key(&n), s.reason);
            }
            _ => {}
        }
    }
    let got4: HashMap<_, _> = last.v4_long.iter().map(|(k, r)| (*k, r.0)).collect();
    let got6: HashMap<_, _> = last.v6_long.iter().map(|(k, r)| (*k, r.0)).collect();
    assert_eq!(got4, want4);
    assert_eq!(got6, want6);
    let distinct: std::collections::HashSet<IpNet> = third.iter().map(|s| s.net).collect();
    assert_eq!(last.rules_in_use, distinct.len(), "one rule per prefix");
}

#[test]
fn a_change_that_fills_a_map_partway_through_a_batch_is_undone() {
    if !kernel_tests_enabled("a_change_that_fills_a_map_partway_through_a_batch_is_undone") {
        return;
    }
    const CAPACITY: u32 = 1 << 14;
    for batch_writes in [true, false] {
        let pins = Pins::new();
        let mut k = load(&pins.0, CAPACITY, batch_writes);
        let mut rng = Rng(0xba7c_0002);
        // 12,000 long IPv6 prefixes; then a list that keeps half of them
        // and adds 10,000 (16,000 in all: within the capacity). New long
        // prefixes are written before removed ones are deleted, so the
        // hash holds 12,000 + 4,384 when it fills: partway through the
        // first batch of 8,192.
        let before = specs(&mut rng, 0, 12_000, 1);
        k.sync_drops(&before).expect("first list");
        let held = meaning(&pins.0);
        let mut next: Vec<DropSpec> = before.iter().step_by(2).copied().collect();
        next.extend(specs(&mut rng, 0, 10_000, 2));
        let err = k
            .sync_drops(&next)
            .expect_err("the change cannot fit while old and new prefixes coexist");
        let msg = err.to_string();
        assert!(
            msg.contains("DROP6_LONG") && msg.contains("nothing was changed"),
            "{msg}"
        );
        assert!(
            meaning(&pins.0) == held,
            "batch_writes={batch_writes}: the maps changed after a failed change: {msg}"
        );
        // The compiler's record was restored too: the old list is a no-op
        // and a smaller change lands.
        k.sync_drops(&before).expect("the old list again");
        assert!(meaning(&pins.0) == held);
        let smaller: Vec<DropSpec> = before.iter().step_by(3).copied().collect();
        k.sync_drops(&smaller).expect("a change that fits");
        let distinct: std::collections::HashSet<IpNet> = smaller.iter().map(|s| s.net).collect();
        assert_eq!(meaning(&pins.0).v6_long.len(), distinct.len());
    }
}

/// Random keys (10 per account) with IPv4 and IPv6 allowlists, and
/// accounts with authorized and denied entries.
fn policy(rng: &mut Rng, accounts: u32) -> (Vec<KeySpec>, Vec<AccountSpec>) {
    let net = |rng: &mut Rng| -> IpNet {
        if rng.range(0, 3) == 0 {
            let a = (0x2001_0db8u128 << 96) | (u128::from(rng.next_u64()) << 32);
            IpNet::V6(
                Ipv6Net::new(Ipv6Addr::from(a), rng.range(32, 128) as u8)
                    .unwrap()
                    .trunc(),
            )
        } else {
            let a = Ipv4Addr::from(rng.next_u64() as u32);
            IpNet::V4(Ipv4Net::new(a, rng.range(8, 32) as u8).unwrap().trunc())
        }
    };
    let mut keys = Vec::new();
    let mut specs = Vec::new();
    for idx in 1..=accounts {
        for k in 0..10 {
            let allow: std::collections::HashSet<IpNet> =
                (0..rng.range(0, 12)).map(|_| net(rng)).collect();
            keys.push(KeySpec {
                kid: idx * 10 + k,
                revoked: rng.range(0, 9) == 0,
                allow: allow.into_iter().collect(),
                account: idx,
            });
        }
        let entries: std::collections::HashMap<IpNet, bool> = (0..rng.range(0, 20))
            .map(|_| (net(rng), rng.range(0, 4) != 0))
            .collect();
        specs.push(AccountSpec {
            idx,
            api_active: rng.range(0, 1) == 0,
            entries: entries.into_iter().collect(),
        });
    }
    (keys, specs)
}

/// Every entry of every policy map (LPM tries as raw keys).
type PolicyMeaning = (
    Vec<(u32, Vec<u8>, u8)>,
    Vec<(u32, allowlist_common::KeyState)>,
    Vec<(u32, u32)>,
);

fn policy_meaning(bpffs: &Path) -> PolicyMeaning {
    fn trie<const N: usize>(bpffs: &Path, name: &str, tag: u32, out: &mut Vec<(u32, Vec<u8>, u8)>) {
        let t: LpmTrie<MapData, [u8; N], u8> =
            LpmTrie::try_from(Map::LpmTrie(map(bpffs, name))).unwrap();
        for e in t.iter() {
            let (k, v) = e.unwrap();
            let mut raw = k.prefix_len().to_ne_bytes().to_vec();
            raw.extend_from_slice(&k.data());
            out.push((tag, raw, v));
        }
    }
    let mut tries = Vec::new();
    trie::<8>(bpffs, "KEY_ALLOW4", 0, &mut tries);
    trie::<20>(bpffs, "KEY_ALLOW6", 1, &mut tries);
    trie::<8>(bpffs, "ACCOUNT_ALLOW4", 2, &mut tries);
    trie::<20>(bpffs, "ACCOUNT_ALLOW6", 3, &mut tries);
    tries.sort();
    let states: BpfHashMap<MapData, u32, allowlist_common::KeyState> =
        BpfHashMap::try_from(Map::HashMap(map(bpffs, "KEY_STATE"))).unwrap();
    let mut states: Vec<_> = states.iter().map(Result::unwrap).collect();
    states.sort_by_key(|(k, _)| *k);
    let modes: BpfHashMap<MapData, u32, u32> =
        BpfHashMap::try_from(Map::HashMap(map(bpffs, "ACCOUNT_MODE"))).unwrap();
    let mut modes: Vec<_> = modes.iter().map(Result::unwrap).collect();
    modes.sort();
    (tries, states, modes)
}

#[test]
fn policy_maps_batched_and_read_back_after_a_restart_match_single_writes() {
    if !kernel_tests_enabled(
        "policy_maps_batched_and_read_back_after_a_restart_match_single_writes",
    ) {
        return;
    }
    // 1,500 accounts, 15,000 keys: runs longer than one batch (8192).
    let mut rng = Rng(0xba7c_0003);
    let first = policy(&mut rng, 1_500);
    let second = policy(&mut rng, 1_200);
    let mut seen = Vec::new();
    for batch_writes in [true, false] {
        let pins = Pins::new();
        let mut k = load(&pins.0, 1 << 16, batch_writes);
        k.sync_keys(&first.0, &first.1).expect("first policy");
        let a = policy_meaning(&pins.0);
        drop(k);
        // A restarted daemon reads the maps back, then writes only the
        // difference: if it missed an entry, that entry would stay.
        let mut k = load(&pins.0, 1 << 16, batch_writes);
        k.sync_keys(&second.0, &second.1)
            .expect("second policy, after a restart");
        let b = policy_meaning(&pins.0);
        // The same policy into fresh maps must give the same maps.
        let fresh = Pins::new();
        let mut f = load(&fresh.0, 1 << 16, batch_writes);
        f.sync_keys(&second.0, &second.1)
            .expect("second policy, fresh");
        assert!(
            policy_meaning(&fresh.0) == b,
            "batch_writes={batch_writes}: the restarted daemon's maps differ from fresh ones"
        );
        seen.push((a, b));
    }
    assert!(
        seen[0] == seen[1],
        "batched and single writes left different policy maps"
    );
    assert!(!seen[0].0.0.is_empty() && !seen[0].1.1.is_empty());
}
