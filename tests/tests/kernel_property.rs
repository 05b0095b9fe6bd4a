//! The real eBPF program against the policy, on random rules and random
//! packets: random accounts (API mode, authorized list) with random keys
//! (allowlists, revoked or not),
//! `always_allow` and a drop list go through the same code the daemon uses
//! (`Snapshot::api_guard_union`, `Kernel::sync_guard`, `Kernel::sync_drops`),
//! then `BPF_PROG_TEST_RUN` judges SYNs from random sources. A SYN must be
//! dropped exactly when the drop list covers its source or no usable key
//! could be used from it (`Snapshot::decide`'s address layers).

use std::{
    net::IpAddr,
    sync::{Arc, Mutex},
};

use allowlist::{
    kernel::{AttachMode, Kernel, KernelOptions, droplist::DropSpec},
    policy::{AccountPolicy, ApiMode, KeyPolicy, KeyStatus, Scope, ScopeSet, SmtpMode, Snapshot},
};
use allowlist_common::{PROTO_TCP, SERVICE_API};
use allowlist_tests::{bpf, kernel_tests_enabled, proc::Setup};
use ipnet::IpNet;
use proptest::{prelude::*, test_runner::TestRunner};

const PORT: u16 = 8443;

/// Prefixes and addresses from a small space, so rules nest and collide.
fn net() -> impl Strategy<Value = IpNet> {
    prop_oneof![
        (0u32..1024, 20u8..=32).prop_map(|(a, len)| {
            IpNet::new(IpAddr::from(std::net::Ipv4Addr::from(0xC633_6400 | a)), len)
                .unwrap()
                .trunc()
        }),
        (0u32..1024, 40u8..=128).prop_map(|(a, len)| {
            let v = (0x2001_0db8u128 << 96) | (u128::from(a) << 80) | u128::from(a);
            IpNet::new(IpAddr::from(std::net::Ipv6Addr::from(v)), len)
                .unwrap()
                .trunc()
        }),
    ]
}

fn addr() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        (0u32..1024).prop_map(|a| IpAddr::from(std::net::Ipv4Addr::from(0xC633_6400 | a))),
        (0u32..1024, 0u32..4).prop_map(|(a, b)| {
            let v = (0x2001_0db8u128 << 96) | (u128::from(a) << 80) | u128::from(a ^ b);
            IpAddr::from(std::net::Ipv6Addr::from(v))
        }),
    ]
}

/// One account: its API mode (0 active, 1 learning, 2 inactive), its
/// authorized list and its keys (revoked?, allowlist).
type AccountCase = (u8, Vec<IpNet>, Vec<(bool, Vec<IpNet>)>);

#[derive(Clone, Debug)]
struct Case {
    accounts: Vec<AccountCase>,
    always: Vec<IpNet>,
    drops: Vec<IpNet>,
    probes: Vec<IpAddr>,
}

fn case() -> impl Strategy<Value = Case> {
    (
        proptest::collection::vec(
            (
                // Mostly active: that is where the guard has work to do.
                prop_oneof![4 => Just(0u8), 1 => Just(1u8), 1 => Just(2u8)],
                proptest::collection::vec(net(), 0..6),
                proptest::collection::vec(
                    (any::<bool>(), proptest::collection::vec(net(), 0..4)),
                    0..4,
                ),
            ),
            1..4,
        ),
        proptest::collection::vec(net(), 0..2),
        proptest::collection::vec(net(), 0..4),
        proptest::collection::vec(addr(), 40),
    )
        .prop_map(|(accounts, always, drops, probes)| Case {
            accounts,
            always,
            drops,
            probes,
        })
}

fn snapshot(c: &Case) -> Snapshot {
    let mut kid = 0u32;
    let pieces = c
        .accounts
        .iter()
        .enumerate()
        .map(|(ai, (mode, list, keys))| {
            let keys = keys
                .iter()
                .map(|(revoked, allow)| {
                    kid += 1;
                    let id = format!("{kid:016x}");
                    Arc::new(KeyPolicy {
                        id: id.clone(),
                        kid,
                        account: ai as u32 + 1,
                        name: id,
                        status: if *revoked {
                            KeyStatus::Revoked
                        } else {
                            KeyStatus::Active
                        },
                        scopes: ScopeSet::of(&[Scope::Full]),
                        secret_hash: [0; 32],
                        previous: None,
                        allow: allow.clone(),
                        rate: None,
                        runtime: Default::default(),
                    })
                })
                .collect();
            let mut list = list.clone();
            list.sort_by_key(|n| (n.addr(), n.prefix_len()));
            list.dedup();
            Arc::new(AccountPolicy::new(
                format!("a{ai}"),
                ai as u32 + 1,
                (0, 0),
                (
                    [ApiMode::Active, ApiMode::Learning, ApiMode::Inactive][*mode as usize],
                    SmtpMode::Inactive,
                ),
                list,
                Default::default(),
                keys,
            ))
        })
        .collect();
    let base = Snapshot::with_settings(c.always.clone(), Vec::new(), "default");
    Snapshot::build(base, pieces)
}

/// The drop entries the daemon enforces: none that overlaps
/// `always_allow` (lockout protection).
fn enforced_drops(c: &Case) -> Vec<IpNet> {
    c.drops
        .iter()
        .filter(|d| !c.always.iter().any(|a| a.contains(*d) || d.contains(a)))
        .copied()
        .collect()
}

/// What the policy says of a SYN from `a`: dropped by the drop list, or by
/// the guard because no usable key could be used from it — never when
/// `always_allow` holds it.
fn expected(s: &Snapshot, c: &Case, a: IpAddr) -> u32 {
    let listed = enforced_drops(c).iter().any(|d| d.contains(&a));
    let always = c.always.iter().any(|n| n.contains(&a));
    // Some usable key of some account may be used from it (both address
    // layers: the key's allowlist, its account's list and mode).
    let some_key = s.keys().any(|k| s.admits(k, a));
    if listed || !(always || some_key) {
        bpf::XDP_DROP
    } else {
        bpf::XDP_PASS
    }
}

#[test]
fn the_real_program_agrees_with_the_policy_on_random_rules_and_packets() {
    if !kernel_tests_enabled("the_real_program_agrees_with_the_policy_on_random_rules_and_packets")
    {
        return;
    }
    let setup = Setup::new(true, "");
    let kernel = Mutex::new(
        Kernel::load(KernelOptions {
            bpffs: setup.bpffs.clone(),
            interfaces: Vec::new(),
            mode: AttachMode::Generic,
            drop_capacity: 4096,
            guard_capacity: 4096,
            cgroup: None,
            batch_writes: true,
        })
        .expect("load"),
    );
    let prog = bpf::edge_filter(&setup.bpffs);
    let dst: IpAddr = "192.0.2.1".parse().unwrap();
    let dst6: IpAddr = "2001:db8:ffff::1".parse().unwrap();
    let mut runner = TestRunner::new(ProptestConfig {
        cases: 48,
        ..ProptestConfig::default()
    });
    runner
        .run(&case(), |c| {
            let s = snapshot(&c);
            let mut k = kernel.lock().unwrap();
            k.sync_guard(
                &[(SERVICE_API, s.api_guard_union())],
                &[(PROTO_TCP, PORT, SERVICE_API)],
            )
            .unwrap();
            let specs: Vec<DropSpec> = enforced_drops(&c)
                .iter()
                .map(|n| DropSpec {
                    net: *n,
                    reason: allowlist_common::REASON_MANUAL,
                    expires_ns: 0,
                })
                .collect();
            k.sync_drops(&specs).unwrap();
            let probes = c
                .probes
                .iter()
                .copied()
                .chain(
                    c.accounts
                        .iter()
                        .flat_map(|(_, l, _)| l.iter().map(|n| n.network())),
                )
                .chain(c.accounts.iter().flat_map(|(_, _, keys)| {
                    keys.iter()
                        .flat_map(|(_, a)| a.iter().map(|n| n.broadcast()))
                }));
            for a in probes {
                let to = if a.is_ipv4() { dst } else { dst6 };
                let (got, _) = bpf::test_run(&prog, &bpf::syn(a, to, PORT, None), 1).unwrap();
                prop_assert_eq!(got, expected(&s, &c, a), "SYN from {}", a);
            }
            Ok(())
        })
        .unwrap();
}
