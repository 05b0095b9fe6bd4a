//! `cargo xtask bench kernel`: the drop list's cost per packet.
//!
//! 1. BPF_PROG_TEST_RUN (same packet repeated, so caches are warm): mean ns
//!    per packet of `edge_filter` with 10 .. 1M random drop prefixes, beside
//!    a bare `XDP_PASS` program and the plain kernel LPM trie holding the
//!    same prefixes, all in this run. Sources that miss and sources that hit
//!    are timed separately. Before timing, `edge_filter`'s verdict is checked
//!    against the LPM trie's on random sources: the fast layout must mean
//!    exactly what the trie means.
//! 2. A bounded SYN flood (trafgen, fixed packet count) across a veth pair
//!    into generic-mode XDP `edge_filter` versus an nftables set drop in
//!    prerouting, holding the same prefixes: CPU time (system + softirq, all
//!    CPUs, from /proc/stat) per dropped packet, and packets/s.
//!
//! Writes the tables into BENCHMARKS.md (`ALLOWLIST_BENCH_OUT`).

use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::AsFd,
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use allowlist::kernel::{AttachMode, BENCH_OBJECT, DropSpec, Kernel, KernelOptions};
use allowlist_common::REASON_MANUAL;
use allowlist_tests::{bench::Rng, bpf, kernel_tests_enabled, net::Pair};
use aya::{
    EbpfLoader,
    maps::{LpmTrie, lpm_trie::Key},
    programs::Xdp,
};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

const SIZES: [usize; 4] = [10, 10_000, 100_000, 1_000_000];
const REPEAT: u32 = 300_000;
const SAMPLES: usize = 16;

fn random_prefixes(rng: &mut Rng, v6: bool, n: usize) -> Vec<IpNet> {
    (0..n)
        .map(|_| {
            if v6 {
                let a = ((rng.next_u64() as u128) << 64) | rng.next_u64() as u128;
                let len = rng.range(32, 128) as u8;
                IpNet::V6(Ipv6Net::new(Ipv6Addr::from(a), len).unwrap().trunc())
            } else {
                let len = rng.range(16, 32) as u8;
                IpNet::V4(
                    Ipv4Net::new(Ipv4Addr::from(rng.next_u64() as u32), len)
                        .unwrap()
                        .trunc(),
                )
            }
        })
        .collect()
}

fn random_inside(rng: &mut Rng, net: &IpNet) -> IpAddr {
    match net {
        IpNet::V4(n) => {
            let host = (rng.next_u64() as u32) & !u32::from(n.netmask());
            IpAddr::V4(Ipv4Addr::from(u32::from(n.network()) | host))
        }
        IpNet::V6(n) => {
            let r = ((rng.next_u64() as u128) << 64) | rng.next_u64() as u128;
            IpAddr::V6(Ipv6Addr::from(
                u128::from(n.network()) | (r & !u128::from(n.netmask())),
            ))
        }
    }
}

fn random_addr(rng: &mut Rng, v6: bool) -> IpAddr {
    if v6 {
        IpAddr::V6(Ipv6Addr::from(
            ((rng.next_u64() as u128) << 64) | rng.next_u64() as u128,
        ))
    } else {
        IpAddr::V4(Ipv4Addr::from(rng.next_u64() as u32))
    }
}

fn dst(v6: bool) -> IpAddr {
    if v6 {
        "2001:db8:1::1".parse().unwrap()
    } else {
        "198.51.100.1".parse().unwrap()
    }
}

struct Row {
    family: &'static str,
    prefixes: usize,
    update_ms: u128,
    bare: f64,
    lpm_miss: f64,
    lpm_hit: f64,
    edge_miss: f64,
    edge_hit: f64,
}

/// Mean over `packets` of each program's ns per run. The programs are
/// timed interleaved, packet by packet, and each (program, packet) keeps the
/// best of `ROUNDS`, so drift on a noisy VM hits all of them alike.
fn mean_ns(progs: &[&std::os::fd::OwnedFd], packets: &[Vec<u8>]) -> Vec<f64> {
    const ROUNDS: usize = 3;
    let mut best = vec![vec![u32::MAX; packets.len()]; progs.len()];
    for _ in 0..ROUNDS {
        for (j, p) in packets.iter().enumerate() {
            for (i, prog) in progs.iter().enumerate() {
                let ns = bpf::test_run(prog, p, REPEAT).expect("test_run").1;
                best[i][j] = best[i][j].min(ns);
            }
        }
    }
    best.iter()
        .map(|b| b.iter().map(|&x| f64::from(x)).sum::<f64>() / packets.len() as f64)
        .collect()
}

fn test_run_table(bpffs: PathBuf) -> (Vec<Row>, String) {
    let mut ebpf = EbpfLoader::new()
        .load(BENCH_OBJECT)
        .expect("load bench object");
    for name in ["bench_pass", "bench_lpm"] {
        let p: &mut Xdp = ebpf.program_mut(name).unwrap().try_into().unwrap();
        p.load().unwrap();
    }
    let pass_fd = {
        let p: &Xdp = ebpf.program("bench_pass").unwrap().try_into().unwrap();
        p.fd().unwrap().as_fd().try_clone_to_owned().unwrap()
    };
    let lpm_fd = {
        let p: &Xdp = ebpf.program("bench_lpm").unwrap().try_into().unwrap();
        p.fd().unwrap().as_fd().try_clone_to_owned().unwrap()
    };
    let mut lpm4: LpmTrie<_, [u8; 4], u32> =
        LpmTrie::try_from(ebpf.take_map("BENCH_LPM4").unwrap()).unwrap();
    let mut lpm6: LpmTrie<_, [u8; 16], u32> =
        LpmTrie::try_from(ebpf.take_map("BENCH_LPM6").unwrap()).unwrap();

    let mut kernel = Kernel::load(KernelOptions {
        bpffs: bpffs.clone(),
        interfaces: vec![],
        mode: AttachMode::Generic,
        drop_capacity: 1 << 20,
        guard_capacity: 1024,
        cgroup: None,
        batch_writes: true,
    })
    .expect("load edge_filter");
    let edge_fd = bpf::edge_filter(&bpffs);

    let mut rows = Vec::new();
    let mut checked = 0usize;
    for v6 in [false, true] {
        let mut rng = Rng(if v6 { 0x6666_0001 } else { 0x4444_0001 });
        let mut prefixes: Vec<IpNet> = Vec::new();
        for &n in &SIZES {
            let more = random_prefixes(&mut rng, v6, n - prefixes.len());
            for p in &more {
                match p {
                    IpNet::V4(n) => lpm4
                        .insert(&Key::new(n.prefix_len().into(), n.network().octets()), 1, 0)
                        .unwrap(),
                    IpNet::V6(n) => lpm6
                        .insert(&Key::new(n.prefix_len().into(), n.network().octets()), 1, 0)
                        .unwrap(),
                }
            }
            prefixes.extend(more);
            let specs: Vec<DropSpec> = prefixes
                .iter()
                .map(|net| DropSpec {
                    net: *net,
                    reason: REASON_MANUAL,
                    expires_ns: 0,
                })
                .collect();
            let t = Instant::now();
            kernel.sync_drops(&specs).expect("sync drops");
            let update_ms = t.elapsed().as_millis();

            // Equivalence on random sources and on sources inside prefixes,
            // then the timing samples.
            let mut hits = Vec::new();
            let mut misses = Vec::new();
            for i in 0..4000 {
                let src = if i % 2 == 0 {
                    let p = prefixes[(rng.next_u64() % prefixes.len() as u64) as usize];
                    random_inside(&mut rng, &p)
                } else {
                    random_addr(&mut rng, v6)
                };
                let pkt = bpf::syn(src, dst(v6), 8443, None);
                let lpm = bpf::test_run(&lpm_fd, &pkt, 1).unwrap().0;
                let edge = bpf::test_run(&edge_fd, &pkt, 1).unwrap().0;
                assert_eq!(
                    edge, lpm,
                    "edge_filter and the LPM trie disagree on {src} with {n} prefixes"
                );
                checked += 1;
                match lpm {
                    bpf::XDP_DROP if hits.len() < SAMPLES => hits.push(pkt),
                    bpf::XDP_PASS if misses.len() < SAMPLES => misses.push(pkt),
                    _ => {}
                }
            }
            assert!(
                hits.len() == SAMPLES && !misses.is_empty(),
                "not enough samples"
            );
            let progs = [&pass_fd, &lpm_fd, &edge_fd];
            let miss = mean_ns(&progs, &misses);
            let hit = mean_ns(&progs, &hits);
            let row = Row {
                family: if v6 {
                    "IPv6 /32–/128"
                } else {
                    "IPv4 /16–/32"
                },
                prefixes: n,
                update_ms,
                bare: (miss[0] + hit[0]) / 2.0,
                lpm_miss: miss[1],
                lpm_hit: hit[1],
                edge_miss: miss[2],
                edge_hit: hit[2],
            };
            eprintln!(
                "{} {:>9}: bare {:.1} ns, lpm {:.1}/{:.1}, edge_filter {:.1}/{:.1} (miss/hit), update {} ms",
                row.family,
                n,
                row.bare,
                row.lpm_miss,
                row.lpm_hit,
                row.edge_miss,
                row.edge_hit,
                update_ms
            );
            rows.push(row);
        }
        // Empty the list before the other family (capacity is shared).
        kernel.sync_drops(&[]).unwrap();
    }
    let mut md = String::new();
    writeln!(md, "| family | prefixes | bare XDP_PASS ns | LPM trie ns (miss / hit) | edge_filter ns (miss / hit) | edge_filter ÷ bare (miss / hit) | LPM ÷ bare (miss / hit) | edge_filter update (ms) |").unwrap();
    writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|").unwrap();
    for r in &rows {
        writeln!(
            md,
            "| {} | {} | {:.1} | {:.1} / {:.1} | {:.1} / {:.1} | {:.2}× / {:.2}× | {:.2}× / {:.2}× | {} |",
            r.family, r.prefixes, r.bare, r.lpm_miss, r.lpm_hit, r.edge_miss, r.edge_hit,
            r.edge_miss / r.bare, r.edge_hit / r.bare, r.lpm_miss / r.bare, r.lpm_hit / r.bare, r.update_ms
        )
        .unwrap();
    }
    writeln!(md, "\nVerdicts of edge_filter and the LPM trie compared on {checked} random sources (half inside a listed prefix): all equal.").unwrap();
    drop(kernel);
    (rows, md)
}

/// The CPU that receives: RPS steers the server veth's receive processing
/// (generic XDP, the IP stack, nftables) there, away from the sender.
const RX_CPU: usize = 1;

/// System + softirq + irq jiffies of `RX_CPU`.
fn kernel_cpu_jiffies() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap();
    let line = stat
        .lines()
        .find(|l| l.starts_with(&format!("cpu{RX_CPU} ")))
        .expect("a second CPU");
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap())
        .collect();
    // user nice system idle iowait irq softirq
    f[2] + f[5] + f[6]
}

fn ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as f64 }
}

struct Flood {
    dropped: u64,
    secs: f64,
    cpu_secs: f64,
}

const FLOOD_PACKETS: u64 = 4_000_000;
const FLOOD_SOURCE: &str = "198.51.100.9";

fn flood(pair: &Pair, conf: &std::path::Path, count_dropped: impl Fn() -> u64) -> Flood {
    let before = count_dropped();
    let cpu0 = kernel_cpu_jiffies();
    let t = Instant::now();
    let out = Command::new("timeout")
        .args([
            "60",
            "ip",
            "netns",
            "exec",
            &pair.client.name,
            "taskset",
            "-c",
            "0",
            "trafgen",
        ])
        .args(["--dev", "vc", "--conf"])
        .arg(conf)
        .args([
            "--num",
            &FLOOD_PACKETS.to_string(),
            "--cpus",
            "1",
            "--no-sock-mem",
            "--notouch-irq",
            "--no-cpu-stats",
            // Paced: unpaced, the TX ring overruns (EAGAIN) once the
            // receive side runs on another CPU.
            "--rate",
            "1000000pps",
        ])
        .output()
        .expect("trafgen (netsniff-ng) must be installed");
    assert!(
        out.status.success(),
        "trafgen failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Let the receive side drain its backlog before reading the counters.
    std::thread::sleep(Duration::from_millis(300));
    let secs = t.elapsed().as_secs_f64() - 0.3;
    let cpu_secs = (kernel_cpu_jiffies() - cpu0) as f64 / ticks_per_sec();
    Flood {
        dropped: count_dropped() - before,
        secs,
        cpu_secs,
    }
}

fn flood_table(bpffs: PathBuf, dir: &std::path::Path) -> String {
    let pair = Pair::new();
    // Receive processing of the server's veth on RX_CPU, the sender on CPU
    // 0: the rx CPU's time is then what receiving and filtering cost.
    let rps = Command::new("ip")
        .args(["netns", "exec", &pair.server.name, "sh", "-c"])
        .arg(format!(
            "echo {:x} > /sys/class/net/vs/queues/rx-0/rps_cpus",
            1 << RX_CPU
        ))
        .status()
        .unwrap();
    assert!(rps.success(), "setting RPS on the test veth");
    let mac = pair.server.mac("vs");
    let conf = dir.join("syn.trafgen");
    std::fs::write(
        &conf,
        format!("{{ eth(da={mac}), ipv4(sa={FLOOD_SOURCE}, da=198.51.100.1), tcp(sp=drnd(), dp=8443, syn) }}\n"),
    )
    .unwrap();
    // Baseline: a bare XDP_DROP on the same veth, so that what the sender
    // and the veth itself cost can be told apart from what a filter costs.
    let base = {
        let link = pair.server.run(move || {
            let mut ebpf = EbpfLoader::new()
                .load(BENCH_OBJECT)
                .expect("load bench object");
            let p: &mut Xdp = ebpf.program_mut("bench_drop").unwrap().try_into().unwrap();
            p.load().unwrap();
            p.attach("vs", aya::programs::XdpMode::Skb).unwrap();
            ebpf
        });
        // A bare drop keeps no counter: every packet sent is dropped.
        let f = flood(&pair, &conf, || 0);
        drop(link);
        Flood {
            dropped: FLOOD_PACKETS,
            ..f
        }
    };
    let per = |f: &Flood| f.cpu_secs * 1e9 / f.dropped.max(1) as f64;
    let mut md = String::new();
    writeln!(
        md,
        "Baseline, bare `XDP_DROP` (generic) on the same veth: {:.0} ns of kernel CPU per packet, {:.2} Mpps — \
         receiving a packet at all costs this much on the rx CPU, and every row below includes it.\n",
        per(&base),
        base.dropped as f64 / base.secs / 1e6
    )
    .unwrap();
    writeln!(md, "| prefixes | filter | packets dropped | Mpps | kernel CPU ns / packet | ÷ nftables | above bare drop, ns / packet | ÷ nftables |").unwrap();
    writeln!(md, "|---:|---|---:|---:|---:|---:|---:|---:|").unwrap();
    for n in [10_000usize, 100_000] {
        let mut rng = Rng(0xF100_D000 + n as u64);
        let mut prefixes = random_prefixes(&mut rng, false, n);
        prefixes.push(format!("{FLOOD_SOURCE}/32").parse().unwrap());

        // edge_filter, generic mode on the server's veth.
        let b = bpffs.clone();
        let specs: Vec<DropSpec> = prefixes
            .iter()
            .map(|net| DropSpec {
                net: *net,
                reason: REASON_MANUAL,
                expires_ns: 0,
            })
            .collect();
        let kernel = pair.server.run(move || {
            let mut k = Kernel::load(KernelOptions {
                bpffs: b,
                interfaces: vec!["vs".into()],
                mode: AttachMode::Generic,
                drop_capacity: 1 << 20,
                guard_capacity: 1024,
                cgroup: None,
                batch_writes: true,
            })
            .unwrap();
            k.sync_drops(&specs).unwrap();
            k
        });
        let xdp = flood(&pair, &conf, || kernel.stats().unwrap().dropped["manual"]);
        drop(kernel);
        allowlist::kernel::unload(&bpffs).unwrap();

        // nftables: a set of the same prefixes, dropped in prerouting.
        let nft_file = dir.join("bench.nft");
        let mut rules = String::from(
            "table inet albench {\n set drop4 { type ipv4_addr; flags interval; auto-merge; elements = { ",
        );
        rules.push_str(
            &prefixes
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join(", "),
        );
        rules.push_str(" } }\n chain pre { type filter hook prerouting priority -300; ip saddr @drop4 counter drop; }\n}\n");
        std::fs::write(&nft_file, rules).unwrap();
        let out = Command::new("ip")
            .args(["netns", "exec", &pair.server.name, "nft", "-f"])
            .arg(&nft_file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "nft: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ns = pair.server.name.clone();
        let nft_count = move || {
            let out = Command::new("ip")
                .args([
                    "netns", "exec", &ns, "nft", "list", "chain", "inet", "albench", "pre",
                ])
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            text.split("packets ")
                .nth(1)
                .and_then(|s| s.split_whitespace().next())
                .and_then(|s| s.parse().ok())
                .unwrap_or(0)
        };
        let nft = flood(&pair, &conf, &nft_count);
        let _ = Command::new("ip")
            .args([
                "netns",
                "exec",
                &pair.server.name,
                "nft",
                "delete",
                "table",
                "inet",
                "albench",
            ])
            .status();

        let above = |f: &Flood| (per(f) - per(&base)).max(0.0);
        for (name, f) in [
            ("edge_filter (XDP, generic)", &xdp),
            ("nftables set, prerouting", &nft),
        ] {
            eprintln!(
                "flood {n}: {name}: {} dropped in {:.2}s, {:.1} ns CPU/packet",
                f.dropped,
                f.secs,
                per(f)
            );
            writeln!(
                md,
                "| {n} | {name} | {} | {:.2} | {:.0} | {:.2}× | {:.0} | {} |",
                f.dropped,
                f.dropped as f64 / f.secs / 1e6,
                per(f),
                per(f) / per(&nft),
                above(f),
                if above(&nft) >= 1.0 {
                    format!("{:.2}×", above(f) / above(&nft))
                } else {
                    "–".into()
                }
            )
            .unwrap();
        }
    }
    md
}

#[test]
#[ignore = "benchmark: run with `cargo xtask bench kernel`"]
fn bench_kernel() {
    assert!(
        kernel_tests_enabled("bench_kernel"),
        "the kernel benchmark needs root"
    );
    let dir = tempfile::Builder::new()
        .prefix(allowlist_tests::PREFIX)
        .tempdir()
        .unwrap();
    let bpffs = PathBuf::from("/sys/fs/bpf").join(allowlist_tests::unique("bench"));
    let (_rows, micro) = test_run_table(bpffs.clone());
    let _ = allowlist::kernel::unload(&bpffs);
    let flood = flood_table(bpffs.clone(), dir.path());
    let _ = allowlist::kernel::unload(&bpffs);

    let kernel =
        String::from_utf8(Command::new("uname").arg("-r").output().unwrap().stdout).unwrap();
    let section = format!(
        "## Kernel data plane (`cargo xtask bench kernel`)\n\n\
         Machine: {} CPUs, kernel {}. Every figure in a table comes from the same run.\n\n\
         ### BPF_PROG_TEST_RUN, mean ns per packet\n\n\
         Each cell: {SAMPLES} source addresses × {REPEAT} runs of one TCP SYN (the same packet \
         repeated, so caches are warm). Prefixes are random, lengths uniform in the range shown; \
         \"miss\" sources match no prefix, \"hit\" sources do. `edge_filter`'s hit path includes \
         its per-CPU counter and the per-source event rate limiter (a per-CPU cache in front of an LRU map).\n\n{micro}\n\
         ### SYN flood across a veth pair\n\n\
         trafgen sends {FLOOD_PACKETS} SYNs from {FLOOD_SOURCE} (pinned to CPU 0, paced at 1 Mpps) into the server \
         namespace, whose drop set holds the listed number of random IPv4 prefixes plus the \
         source. RPS on the server's veth moves its receive processing (generic XDP, the IP \
         stack, nftables) to CPU {RX_CPU}; the CPU column is that CPU's system + softirq + irq \
         time from /proc/stat over the flood, per dropped packet. Mpps is bounded by the \
         sender.\n\n{flood}\n",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        kernel.trim(),
    );
    eprintln!("\n{section}");
    allowlist_tests::bench::publish("## Kernel data plane", &section);
}
