//! `cargo xtask bench writes`: bulk kernel map writes, with the kernel's
//! batch map commands and with one syscall per entry, in the same run.
//!
//! The drop list: 1M random IPv4 prefixes (/16–/32) and 1M random IPv6 prefixes
//! (/32–/128), each loaded three ways through `Kernel::sync_drops`, with the
//! kernel's batch map commands and with one syscall per entry (the baseline),
//! in the same run: into fresh maps (the journaled path a new daemon takes),
//! after a restart that adopts the pinned maps, and a change that replaces
//! a tenth of the list. The drop compiler alone, writing into in-memory
//! maps, is the floor no map writing can go below.
//!
//! The policy maps of 10,000 accounts × 10 keys × 20 random IPv4 entries
//! and 100 authorized /24s per account (the shape of `bench policy`):
//! `Kernel::sync_keys` into fresh maps, as a daemon's start writes them.
//!
//! Writes the table into BENCHMARKS.md (`ALLOWLIST_BENCH_OUT`).

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    time::Instant,
};

use allowlist::kernel::{
    AccountSpec, AttachMode, DropSpec, Kernel, KernelOptions, KeySpec,
    droplist::{DropList, ModelMaps},
};
use allowlist_tests::{bench::Rng, kernel_tests_enabled};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

const N: usize = 1_000_000;
const CAPACITY: u32 = 1 << 21;
const ACCOUNTS: u32 = 10_000;
const KEYS_PER_ACCOUNT: u32 = 10;
const ENTRIES_PER_KEY: usize = 20;
const AUTHORIZED_PER_ACCOUNT: usize = 100;

fn specs(rng: &mut Rng, v6: bool, n: usize, reason: u32) -> Vec<DropSpec> {
    (0..n)
        .map(|_| {
            let net = if v6 {
                let a = (u128::from(rng.next_u64()) << 64) | u128::from(rng.next_u64());
                let len = rng.range(32, 128) as u8;
                IpNet::V6(Ipv6Net::new(Ipv6Addr::from(a), len).unwrap().trunc())
            } else {
                let len = rng.range(16, 32) as u8;
                let a = Ipv4Addr::from(rng.next_u64() as u32);
                IpNet::V4(Ipv4Net::new(a, len).unwrap().trunc())
            };
            DropSpec {
                net,
                reason,
                expires_ns: 0,
            }
        })
        .collect()
}

fn load(bpffs: &Path, batch_writes: bool) -> Kernel {
    Kernel::load(KernelOptions {
        bpffs: bpffs.to_path_buf(),
        interfaces: vec![],
        mode: AttachMode::Generic,
        drop_capacity: CAPACITY,
        guard_capacity: CAPACITY,
        cgroup: None,
        batch_writes,
    })
    .expect("load the programs")
}

fn policy(rng: &mut Rng) -> (Vec<KeySpec>, Vec<AccountSpec>) {
    let mut keys = Vec::new();
    let mut accounts = Vec::new();
    for idx in 1..=ACCOUNTS {
        for k in 0..KEYS_PER_ACCOUNT {
            let allow = (0..ENTRIES_PER_KEY)
                .map(|_| {
                    let len = rng.range(16, 32) as u8;
                    let a = Ipv4Addr::from(rng.next_u64() as u32);
                    IpNet::V4(Ipv4Net::new(a, len).unwrap().trunc())
                })
                .collect::<std::collections::HashSet<_>>()
                .into_iter()
                .collect();
            keys.push(KeySpec {
                kid: idx * KEYS_PER_ACCOUNT + k,
                revoked: false,
                allow,
                account: idx,
            });
        }
        let entries = (0..AUTHORIZED_PER_ACCOUNT)
            .map(|_| {
                let a = Ipv4Addr::from(rng.next_u64() as u32);
                IpNet::V4(Ipv4Net::new(a, 24).unwrap().trunc())
            })
            .collect::<std::collections::HashSet<_>>()
            .into_iter()
            .map(|n| (n, true))
            .collect();
        accounts.push(AccountSpec {
            idx,
            api_active: true,
            entries,
        });
    }
    (keys, accounts)
}

/// Seconds for `sync_keys` into fresh maps, and for a restarted daemon's
/// load, which reads the pinned policy maps back.
fn policy_run(keys: &[KeySpec], accounts: &[AccountSpec], batch_writes: bool) -> [f64; 2] {
    let bpffs = PathBuf::from("/sys/fs/bpf").join(allowlist_tests::unique("bpol"));
    let mut k = load(&bpffs, batch_writes);
    let t = Instant::now();
    k.sync_keys(keys, accounts).expect("policy write");
    let fresh = secs(t);
    drop(k);
    let t = Instant::now();
    let k = load(&bpffs, batch_writes);
    let reload = secs(t);
    drop(k);
    allowlist::kernel::unload(&bpffs).expect("unload");
    [fresh, reload]
}

fn secs(t: Instant) -> f64 {
    t.elapsed().as_secs_f64()
}

/// Seconds for: a fresh load, an adopting load after a restart, and a
/// change replacing a tenth of the list.
fn kernel_run(list: &[DropSpec], changed: &[DropSpec], batch_writes: bool) -> [f64; 3] {
    let bpffs = PathBuf::from("/sys/fs/bpf").join(allowlist_tests::unique("bdrop"));
    let mut k = load(&bpffs, batch_writes);
    let t = Instant::now();
    k.sync_drops(list).expect("fresh load");
    let fresh = secs(t);
    drop(k);
    let mut k = load(&bpffs, batch_writes);
    let t = Instant::now();
    k.sync_drops(list).expect("adopting load");
    let adopt = secs(t);
    let t = Instant::now();
    k.sync_drops(changed).expect("change");
    let change = secs(t);
    drop(k);
    allowlist::kernel::unload(&bpffs).expect("unload");
    [fresh, adopt, change]
}

/// The compiler alone: the same three steps into in-memory maps (the
/// restart is a new compiler adopting the maps the first one filled).
fn compiler_run(list: &[DropSpec], changed: &[DropSpec]) -> [f64; 3] {
    let mut maps = ModelMaps::default();
    let t = Instant::now();
    DropList::new(CAPACITY as usize)
        .apply(&mut maps, list)
        .unwrap();
    let fresh = secs(t);
    let mut d = DropList::new(CAPACITY as usize);
    let t = Instant::now();
    d.adopt(&mut maps, list).unwrap();
    let adopt = secs(t);
    let t = Instant::now();
    d.apply(&mut maps, changed).unwrap();
    [fresh, adopt, secs(t)]
}

#[test]
#[ignore = "benchmark: run with `cargo xtask bench writes`"]
fn bench_writes() {
    assert!(
        kernel_tests_enabled("bench_writes"),
        "the kernel-write benchmark needs root"
    );
    let mut md = String::new();
    writeln!(
        md,
        "## Bulk kernel map writes (`cargo xtask bench writes`)\n\n\
         ### Drop list\n\n\
         {N} random prefixes per family through `Kernel::sync_drops`, kernel maps pinned in a \
         private bpffs folder, every figure from the same run. *Batched*: the kernel's batch map \
         commands (8192 entries per syscall); *one per entry*: the same code writing one entry \
         per syscall, as before. *Compiler only*: the same steps into in-memory maps, the floor \
         no map writing goes below. *Change*: a tenth of the list replaced by new prefixes.\n\n\
         | family | step | compiler only (s) | one per entry (s) | batched (s) | batched ÷ one per entry |\n\
         |---|---|---:|---:|---:|---:|"
    )
    .unwrap();
    for v6 in [false, true] {
        let mut rng = Rng(if v6 { 0xd6_0001 } else { 0xd4_0001 });
        let list = specs(&mut rng, v6, N, 1);
        let mut changed: Vec<DropSpec> = list[N / 10..].to_vec();
        changed.extend(specs(&mut rng, v6, N / 10, 2));
        let floor = compiler_run(&list, &changed);
        let single = kernel_run(&list, &changed, false);
        let batched = kernel_run(&list, &changed, true);
        let family = if v6 {
            "IPv6 /32–/128"
        } else {
            "IPv4 /16–/32"
        };
        for (i, step) in [
            "fresh load",
            "load after a restart (adopting the pins)",
            "change",
        ]
        .iter()
        .enumerate()
        {
            let line = format!(
                "| {family} | {step} | {:.2} | {:.2} | {:.2} | {:.2}× |",
                floor[i],
                single[i],
                batched[i],
                batched[i] / single[i]
            );
            println!("{line}");
            writeln!(md, "{line}").unwrap();
        }
    }
    let mut rng = Rng(0x901_0001);
    let (keys, accounts) = policy(&mut rng);
    let entries: usize = keys.iter().map(|k| k.allow.len()).sum::<usize>()
        + accounts.iter().map(|a| a.entries.len()).sum::<usize>();
    let single = policy_run(&keys, &accounts, false);
    let batched = policy_run(&keys, &accounts, true);
    writeln!(
        md,
        "\n### Policy maps\n\n\
         {} keys and {ACCOUNTS} accounts: {entries} trie entries (per-key allowlists and \
         per-account lists, LPM tries), plus key states and account modes, written by \
         `Kernel::sync_keys` as one plan.\n\n\
         | step | one per entry (s) | batched (s) | batched ÷ one per entry |\n\
         |---|---:|---:|---:|",
        keys.len()
    )
    .unwrap();
    for (i, step) in [
        "write into fresh maps (a daemon's start)",
        "load after a restart (reads the pinned maps back)",
    ]
    .iter()
    .enumerate()
    {
        let line = format!(
            "| {step} | {:.2} | {:.2} | {:.2}× |",
            single[i],
            batched[i],
            batched[i] / single[i]
        );
        println!("{line}");
        writeln!(md, "{line}").unwrap();
    }
    allowlist_tests::bench::publish("## Bulk kernel map writes (", &md);
}
