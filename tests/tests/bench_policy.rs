//! `cargo xtask bench policy`: decision latency at 10,000 accounts × 10
//! keys × 20 entries (100 authorized entries per account), the time of one
//! account's change (its piece rebuilt) against a full rebuild, memory per
//! account, and change-to-enforced latency through a real daemon with its
//! kernel maps.

use std::{
    fmt::Write as _,
    hint::black_box,
    net::{IpAddr, Ipv4Addr},
    os::unix::net::UnixStream,
    sync::Arc,
    time::Instant,
};

use allowlist::{
    config::Config,
    daemon::{Clock, Daemon},
    store::{AuthorizedRecord, KeyRecord, SqliteStore},
};
use allowlist_tests::{
    bench::{
        ACCOUNTS, AUTHORIZED_PER_ACCOUNT, ENTRIES, KEYS, KEYS_PER_ACCOUNT, Rng, admin, pct,
        records, state,
    },
    kernel_tests_enabled,
    proc::Setup,
};
use ipnet::IpNet;

const DECISIONS: usize = 200_000;

fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = s.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4
}

#[test]
#[ignore = "benchmark: run with `cargo xtask bench policy`"]
fn bench_policy() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(&dir.path().join("a.db")).unwrap());
    let daemon = Daemon::new(Config::default(), store, None, Clock::default()).unwrap();
    let mut rng = Rng(0xB0B);

    let rss0 = rss_kib();
    let (st, nets_of) = state(&mut rng);
    let rss_state = rss_kib();
    let t = Instant::now();
    let snap = daemon.snapshot_of(&st);
    let rebuild_ms = t.elapsed().as_secs_f64() * 1e3;
    let rss_snap = rss_kib();
    let t = Instant::now();
    let union = snap.api_guard_union();
    let union_ms = t.elapsed().as_secs_f64() * 1e3;

    // One account changes (an authorized entry added): its piece and the
    // key shards its keys fall in are rebuilt, the rest shared. Timed from
    // a copy of the state (the change protocol's copy) to the new snapshot.
    let mut one = Vec::new();
    let mut copy = Vec::new();
    for i in 0..50 {
        let t = Instant::now();
        let mut next = st.clone();
        copy.push(t.elapsed().as_micros() as u64);
        let name = format!("acct-{}", (rng.next_u64() % ACCOUNTS as u64));
        let net: IpNet = format!("10.{}.{}.0/24", i / 256, i % 256).parse().unwrap();
        let a = next.account_mut(&name).unwrap();
        a.authorized.insert(
            net,
            AuthorizedRecord {
                cidr: net,
                label: String::new(),
                source: "manual".into(),
                key_id: None,
                created_at: 0,
                created_by: String::new(),
                shared: false,
            },
        );
        let s2 = daemon.snapshot_after(&snap, &next);
        one.push(t.elapsed().as_micros() as u64);
        black_box(s2);
    }
    one.sort_unstable();
    copy.sort_unstable();

    // Requests: a random key with its right secret, from an address inside
    // one of its entries (half) or anywhere (half).
    let all: Vec<&KeyRecord> = st.accounts.values().flat_map(|a| a.keys.values()).collect();
    let mut reqs = Vec::with_capacity(DECISIONS);
    for i in 0..DECISIONS {
        let k = all[(rng.next_u64() % KEYS as u64) as usize];
        let cred = format!("alk_{}_secret-{}", k.id, k.kid);
        let n = (k.kid as usize - 1) % KEYS_PER_ACCOUNT;
        let addr = if i % 4 == 0 {
            // Inside the key's allowlist and its account's list: allowed.
            let net = nets_of[(k.kid as usize - 1) / KEYS_PER_ACCOUNT][n];
            IpAddr::V4(Ipv4Addr::from(
                u32::from(net.network()) | (rng.next_u64() as u32 & 0xff),
            ))
        } else if i % 4 == 1 {
            // Inside one of the key's entries, mostly not the account's list.
            let e = k.allow[(rng.next_u64() % ENTRIES as u64) as usize].cidr;
            let IpNet::V4(n) = e else { unreachable!() };
            IpAddr::V4(Ipv4Addr::from(
                u32::from(n.network()) | (rng.next_u64() as u32 & !u32::from(n.netmask())),
            ))
        } else {
            IpAddr::V4(Ipv4Addr::from(rng.next_u64() as u32))
        };
        reqs.push((cred, addr));
    }
    let mut decide = Vec::with_capacity(DECISIONS);
    let mut lookup = Vec::with_capacity(DECISIONS);
    let mut timer = Vec::with_capacity(DECISIONS);
    let mut allowed = 0usize;
    for (cred, addr) in &reqs {
        let t = Instant::now();
        let d = snap.decide(Some(cred), "GET", "/emails", *addr, 1_000);
        decide.push(t.elapsed().as_nanos() as u64);
        allowed += usize::from(d.allowed());
        // Baseline 1: the key-id lookup alone.
        let id = &cred[4..20];
        let t = Instant::now();
        black_box(snap.key(black_box(id)));
        lookup.push(t.elapsed().as_nanos() as u64);
        // Baseline 2: the timer itself.
        let t = Instant::now();
        timer.push(black_box(t).elapsed().as_nanos() as u64);
    }
    // The same request repeated: the decision's compute cost with warm
    // caches, beside the cold random-key figure above (memory latency).
    let mut hot = Vec::with_capacity(DECISIONS / 4);
    let (cred, addr) = &reqs[0];
    for _ in 0..DECISIONS / 4 {
        let t = Instant::now();
        black_box(snap.decide(Some(cred), "GET", "/emails", *addr, 1_000));
        hot.push(t.elapsed().as_nanos() as u64);
    }
    for v in [&mut decide, &mut lookup, &mut timer, &mut hot] {
        v.sort_unstable();
    }
    let (p50, p99) = (pct(&decide, 0.5), pct(&decide, 0.99));

    // Change-to-enforced through a real daemon holding the same 100k keys
    // (imported into its store in one transaction), kernel maps on: the
    // admin call returns only after the kernel maps, the store and the
    // snapshot hold the change.
    let mut changes: Vec<(&str, Vec<u64>)> = Vec::new();
    let mut sustained = None;
    let mut import_s = None;
    let mut start_ms = 0.0;
    let mut kernel_note = "kernel maps off (no root)".to_string();
    if kernel_tests_enabled("bench_policy (change-to-enforced)") {
        let setup = Setup::new(true, "guard_capacity = 4194304");
        let store = SqliteStore::open(&setup.dir.path().join("allowlist.db")).unwrap();
        let (accounts, keys, authorized) = records(&st);
        store
            .import_policy(&accounts, &keys, &authorized, "bench")
            .unwrap();
        drop(store);
        let t = Instant::now();
        let _d = setup.start(None, &[]);
        let sock = setup.socket();
        let ready = allowlist_tests::net::wait_for(std::time::Duration::from_secs(300), || {
            UnixStream::connect(&sock).is_ok() && admin(&sock, "GET", "/ready", "").0 == 200
        });
        assert!(ready, "the daemon with {KEYS} keys never came up");
        start_ms = t.elapsed().as_secs_f64() * 1e3;
        let mut time = |name: &'static str, calls: Vec<(String, String, String, u16)>| {
            let mut v = Vec::new();
            for (method, path, body, want) in calls {
                let t = Instant::now();
                let (st, got) = admin(&sock, &method, &path, &body);
                v.push(t.elapsed().as_micros() as u64);
                assert_eq!(st, want, "{name}: {method} {path}: {got}");
            }
            v.sort_unstable();
            changes.push((name, v));
        };
        // 100 distinct keys.
        let mut chosen = std::collections::BTreeSet::new();
        while chosen.len() < 100 {
            chosen.insert((rng.next_u64() % KEYS as u64) as usize);
        }
        let picks: Vec<&KeyRecord> = chosen.iter().map(|i| all[*i]).collect();
        // Keys hold 20 entries (the most): one leaves, then comes back.
        let last = |k: &KeyRecord| k.allow[ENTRIES - 1].cidr.to_string();
        time(
            "keys disallow",
            picks
                .iter()
                .map(|k| {
                    (
                        "DELETE".into(),
                        format!(
                            "/v1/keys/{}/allow?cidr={}&account={}",
                            k.id,
                            last(k).replace('/', "%2F"),
                            k.account
                        ),
                        String::new(),
                        200,
                    )
                })
                .collect(),
        );
        time(
            "keys allow",
            picks
                .iter()
                .map(|k| {
                    (
                        "POST".into(),
                        format!("/v1/keys/{}/allow?account={}", k.id, k.account),
                        format!("{{\"cidr\":\"{}\"}}", last(k)),
                        200,
                    )
                })
                .collect(),
        );
        time(
            "ips authorize",
            (0..100)
                .map(|i| {
                    (
                        "POST".into(),
                        format!("/v1/ips?account=acct-{}", rng.next_u64() % ACCOUNTS as u64),
                        format!("{{\"cidr\":\"10.200.{i}.0/24\"}}"),
                        201,
                    )
                })
                .collect(),
        );
        time(
            "keys revoke",
            picks
                .iter()
                .map(|k| {
                    (
                        "POST".into(),
                        format!("/v1/keys/{}/revoke?account={}", k.id, k.account),
                        String::new(),
                        200,
                    )
                })
                .collect(),
        );
        // Sustained: authorizations one after another for 5 s.
        let t = Instant::now();
        let mut n = 0u32;
        while t.elapsed().as_secs() < 5 && n < 20_000 {
            let (st, body) = admin(
                &sock,
                "POST",
                &format!("/v1/ips?account=acct-{}", rng.next_u64() % ACCOUNTS as u64),
                &format!("{{\"cidr\":\"10.{}.{}.0/24\"}}", 100 + n / 256, n % 256),
            );
            assert_eq!(st, 201, "{body}");
            n += 1;
        }
        sustained = Some(f64::from(n) / t.elapsed().as_secs_f64());
        // A bulk import: 100k /32s into one account, one change, through
        // allowlistctl (file read, one admin call, kernel + store + swap).
        let file = setup.dir.path().join("import.txt");
        let mut text = String::new();
        for i in 0..100_000u32 {
            let a = Ipv4Addr::from(0x6400_0000 | i);
            writeln!(text, "{a} imported {i}").unwrap();
        }
        std::fs::write(&file, text).unwrap();
        let t = Instant::now();
        let out = setup.ctl_json(&[
            "--account",
            "acct-7",
            "ips",
            "authorize",
            "--file",
            file.to_str().unwrap(),
        ]);
        import_s = Some(t.elapsed().as_secs_f64());
        assert_eq!(out["added"], 100_000, "{out}");
        kernel_note = format!(
            "kernel maps on, {KEYS} keys × {ENTRIES} entries and {} authorized entries in the maps",
            authorized.len()
        );
    }

    let mut md = String::new();
    writeln!(md, "## Policy (`cargo xtask bench policy`)\n").unwrap();
    writeln!(md, "{ACCOUNTS} accounts × {KEYS_PER_ACCOUNT} keys × {ENTRIES} random IPv4 entries each ({KEYS} keys), {AUTHORIZED_PER_ACCOUNT} /24s on each account's authorized list, API blocking active. Each of {DECISIONS} decisions picks a random key of a random account (cold caches: the figure is mostly memory latency on this VM). Every figure from the same run.\n").unwrap();
    writeln!(md, "| measure | p50 | p99 | target |").unwrap();
    writeln!(md, "|---|---:|---:|---:|").unwrap();
    writeln!(md, "| `Snapshot::decide` (auth + scope + key allowlist + account list), ns | {p50} | {p99} | p99 ≤ 2000 |").unwrap();
    writeln!(
        md,
        "| `Snapshot::decide`, one request repeated (warm caches), ns | {} | {} | |",
        pct(&hot, 0.5),
        pct(&hot, 0.99)
    )
    .unwrap();
    writeln!(
        md,
        "| baseline: key-id hash lookup alone, ns | {} | {} | |",
        pct(&lookup, 0.5),
        pct(&lookup, 0.99)
    )
    .unwrap();
    writeln!(
        md,
        "| baseline: timer overhead, ns | {} | {} | |",
        pct(&timer, 0.5),
        pct(&timer, 0.99)
    )
    .unwrap();
    writeln!(
        md,
        "| decide ÷ key lookup | {:.1}× | {:.1}× | |",
        p50 as f64 / pct(&lookup, 0.5).max(1) as f64,
        p99 as f64 / pct(&lookup, 0.99).max(1) as f64
    )
    .unwrap();
    for (name, v) in &changes {
        writeln!(md, "| change-to-enforced: `{name}` admin call → kernel + store + snapshot, µs ({kernel_note}) | {} | {} | ≤ 100,000 (stretch ≤ 10,000) |", pct(v, 0.5), pct(v, 0.99)).unwrap();
    }
    writeln!(
        md,
        "\n{allowed} of {DECISIONS} decisions allowed (a check that the workload is mixed).\n"
    )
    .unwrap();
    // A workload of nothing but refusals would time the cheapest path.
    assert!(
        allowed > DECISIONS / 8 && allowed < DECISIONS * 7 / 8,
        "the workload is not mixed: {allowed} of {DECISIONS} allowed"
    );
    writeln!(md, "| measure | value |").unwrap();
    writeln!(md, "|---|---:|").unwrap();
    writeln!(
        md,
        "| full snapshot build from memory, {ACCOUNTS} accounts, {KEYS} keys | {rebuild_ms:.0} ms |"
    )
    .unwrap();
    writeln!(
        md,
        "| one account's change (state copy + its piece + its key shards), p50 / p99 | {:.2} / {:.2} ms (target ≤ 5 ms; {:.0}× faster than the full build) |",
        pct(&one, 0.5) as f64 / 1e3,
        pct(&one, 0.99) as f64 / 1e3,
        rebuild_ms * 1e3 / pct(&one, 0.5).max(1) as f64
    )
    .unwrap();
    writeln!(
        md,
        "| of which the state copy (pointers per account), p50 | {:.2} ms |",
        pct(&copy, 0.5) as f64 / 1e3
    )
    .unwrap();
    writeln!(
        md,
        "| API guard union (account list ∩ key allowlists), {} prefixes | {union_ms:.0} ms |",
        union.len()
    )
    .unwrap();
    writeln!(
        md,
        "| resident memory of the in-memory state, per account | {:.1} KiB |",
        (rss_state - rss0) as f64 / ACCOUNTS as f64
    )
    .unwrap();
    writeln!(
        md,
        "| resident memory of the snapshot, per account | {:.1} KiB |",
        (rss_snap - rss_state) as f64 / ACCOUNTS as f64
    )
    .unwrap();
    if let Some(rate) = sustained {
        writeln!(
            md,
            "| sustained changes (`ips authorize` one after another through the admin socket, 5 s) | {rate:.0} /s |"
        )
        .unwrap();
        writeln!(
            md,
            "| daemon start with {KEYS} keys: store read, snapshot, every kernel map written | {:.1} s |",
            start_ms / 1e3
        )
        .unwrap();
    }
    if let Some(secs) = import_s {
        writeln!(
            md,
            "| bulk import: 100,000 /32s into one account (`ips authorize --file`, one change) | {secs:.1} s |"
        )
        .unwrap();
    }
    writeln!(md).unwrap();
    eprintln!("\n{md}");
    allowlist_tests::bench::publish("## Policy (", &md);
}
