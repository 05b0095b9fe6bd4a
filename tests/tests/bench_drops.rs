//! `cargo xtask bench drops`: bulk loads of the kernel drop list.
//!
//! 1M random IPv4 prefixes (/16–/32) and 1M random IPv6 prefixes
//! (/32–/128), each loaded three ways through `Kernel::sync_drops`, with the
//! kernel's batch map commands and with one syscall per entry (the baseline),
//! in the same run: into fresh maps (the journaled path a new daemon takes),
//! after a restart that adopts the pinned maps, and a change that replaces
//! a tenth of the list. The drop compiler alone, writing into in-memory
//! maps, is the floor no map writing can go below.
//!
//! Writes the table into BENCHMARKS.md (`ALLOWLIST_BENCH_OUT`).

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    time::Instant,
};

use allowlist::kernel::{
    AttachMode, DropSpec, Kernel, KernelOptions,
    droplist::{DropList, ModelMaps},
};
use allowlist_tests::{bench::Rng, kernel_tests_enabled};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

const N: usize = 1_000_000;
const CAPACITY: u32 = 1 << 21;

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
        guard_capacity: 1024,
        cgroup: None,
        batch_writes,
    })
    .expect("load the programs")
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
#[ignore = "benchmark: run with `cargo xtask bench drops`"]
fn bench_drops() {
    assert!(
        kernel_tests_enabled("bench_drops"),
        "the drop-list benchmark needs root"
    );
    let mut md = String::new();
    writeln!(
        md,
        "## Drop-list bulk loads (`cargo xtask bench drops`)\n\n\
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
    allowlist_tests::bench::publish("## Drop-list bulk loads (", &md);
}
