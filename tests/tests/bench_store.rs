//! `cargo xtask bench store`: two edges on one PostgreSQL holding the
//! policy benchmark's installation (10,000 accounts × 10 keys × 20 entries,
//! 1M authorized entries), kernel maps on. How long a change made through
//! one edge's admin API takes to be enforced by the other (its snapshot
//! and kernel maps), against the same change's time on the edge that made
//! it, and how long an edge takes to load the whole policy from the server
//! cold.

use std::{
    fmt::Write as _,
    path::Path,
    time::{Duration, Instant},
};

use allowlist::store::{PgOptions, PgStore};
use allowlist_tests::{
    bench::{ACCOUNTS, KEYS, Rng, admin, pct, publish, records, state},
    kernel_tests_enabled,
    net::wait_for,
    postgres::{PgServer, postgres_available},
    proc::{Daemon, Setup},
};

const CHANGES: usize = 100;

/// An edge on `url`, started, with the time it took to be ready.
fn edge(url: &str) -> (Setup, Daemon, f64) {
    let setup = Setup::new(true, "guard_capacity = 4194304");
    let text = std::fs::read_to_string(&setup.config).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with("url = \"sqlite://"))
        .unwrap()
        .to_string();
    let text = text.replace(
        &line,
        &format!(
            "url = \"{url}\"\nstate_dir = \"{}\"",
            setup.dir.path().display()
        ),
    );
    std::fs::write(&setup.config, text).unwrap();
    let t = Instant::now();
    let d = setup.start(None, &[]);
    let sock = setup.socket();
    assert!(
        wait_for(Duration::from_secs(300), || admin(
            &sock, "GET", "/ready", ""
        )
        .0 == 200),
        "an edge with {KEYS} keys never came up"
    );
    let secs = t.elapsed().as_secs_f64();
    (setup, d, secs)
}

/// Polls `sock` with `path` until the body contains `needle`; the time
/// from `since`, in µs.
fn seen(sock: &Path, path: &str, needle: &str, since: Instant) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, body) = admin(sock, "GET", path, "");
        if body.contains(needle) {
            return since.elapsed().as_micros() as u64;
        }
        assert!(
            Instant::now() < deadline,
            "{path}: never showed {needle:?}: {body}"
        );
    }
}

#[test]
#[ignore = "benchmark: run with `cargo xtask bench store`"]
fn bench_store() {
    if !kernel_tests_enabled("bench_store") || !postgres_available("bench_store") {
        return;
    }
    let mut rng = Rng(0xB0B);
    let (st, _) = state(&mut rng);
    let (accounts, keys, authorized) = records(&st);

    let pg = PgServer::start();
    pg.create_db("bench");
    let url = pg.unix_url("bench");
    let t = Instant::now();
    let store = PgStore::open(&PgOptions {
        url: url.clone(),
        ca: None,
        pool: 2,
    })
    .unwrap();
    let done = store
        .import_policy(&accounts, &keys, &authorized, "bench")
        .unwrap();
    let import_s = t.elapsed().as_secs_f64();
    assert_eq!(done.keys, KEYS);
    drop(store);

    let (a, _da, start_a) = edge(&url);
    let (b, _db, start_b) = edge(&url);
    let (sa, sb) = (a.socket(), b.socket());

    // `ips authorize` on A; enforced on A when its call returns, on B when
    // B's policy in force admits the address.
    let mut local = Vec::new();
    let mut remote = Vec::new();
    for i in 0..CHANGES {
        let account = format!("acct-{}", rng.next_u64() % ACCOUNTS as u64);
        let cidr = format!("10.200.{i}.0/24");
        let t = Instant::now();
        let (code, body) = admin(
            &sa,
            "POST",
            &format!("/v1/ips?account={account}"),
            &format!("{{\"cidr\":\"{cidr}\"}}"),
        );
        assert_eq!(code, 201, "{body}");
        local.push(t.elapsed().as_micros() as u64);
        remote.push(seen(
            &sb,
            &format!("/v1/ips/check?addr=10.200.{i}.1&account={account}"),
            &cidr,
            t,
        ));
    }
    // `keys revoke` on A; enforced on B when B shows the key revoked.
    let mut revoke_local = Vec::new();
    let mut revoke_remote = Vec::new();
    let mut picked = std::collections::BTreeSet::new();
    while picked.len() < CHANGES {
        picked.insert((rng.next_u64() % KEYS as u64) as usize);
    }
    for i in picked {
        let k = &keys[i];
        let t = Instant::now();
        let (code, body) = admin(
            &sa,
            "POST",
            &format!("/v1/keys/{}/revoke?account={}", k.id, k.account),
            "",
        );
        assert_eq!(code, 200, "{body}");
        revoke_local.push(t.elapsed().as_micros() as u64);
        revoke_remote.push(seen(
            &sb,
            &format!("/v1/keys/{}?account={}", k.id, k.account),
            "\"revoked\"",
            t,
        ));
    }
    for v in [
        &mut local,
        &mut remote,
        &mut revoke_local,
        &mut revoke_remote,
    ] {
        v.sort_unstable();
    }

    let mut md = String::new();
    writeln!(md, "## Store (`cargo xtask bench store`)\n").unwrap();
    writeln!(md, "Two `allowlistd` on one PostgreSQL 15 server (private, on this machine, over its Unix socket), each with its kernel maps on, holding the policy benchmark's installation: {ACCOUNTS} accounts, {KEYS} keys × 20 entries, {} authorized entries. {CHANGES} changes of each kind made through edge A's admin socket; \"on B\" is from the start of A's call until B's policy in force shows it (`/v1/ips/check` names the new entry; `/v1/keys/ID` shows the key revoked), polled over B's admin socket. Every figure from the same run.\n", authorized.len()).unwrap();
    writeln!(md, "| measure | p50 | p99 | target |").unwrap();
    writeln!(md, "|---|---:|---:|---:|").unwrap();
    for (name, l, r) in [
        ("ips authorize", &local, &remote),
        ("keys revoke", &revoke_local, &revoke_remote),
    ] {
        writeln!(
            md,
            "| `{name}` enforced on A (the edge that made it), ms | {:.1} | {:.1} | |",
            pct(l, 0.5) as f64 / 1e3,
            pct(l, 0.99) as f64 / 1e3
        )
        .unwrap();
        writeln!(
            md,
            "| `{name}` enforced on B (the other edge), ms | {:.1} | {:.1} | ≤ 1000 (stretch ≤ 100) |",
            pct(r, 0.5) as f64 / 1e3,
            pct(r, 0.99) as f64 / 1e3
        )
        .unwrap();
        writeln!(
            md,
            "| on B ÷ on A | {:.1}× | {:.1}× | |",
            pct(r, 0.5) as f64 / pct(l, 0.5).max(1) as f64,
            pct(r, 0.99) as f64 / pct(l, 0.99).max(1) as f64
        )
        .unwrap();
    }
    writeln!(md, "\n| measure | value |").unwrap();
    writeln!(md, "|---|---:|").unwrap();
    writeln!(
        md,
        "| import of the installation into PostgreSQL, one transaction (array inserts) | {import_s:.1} s |"
    )
    .unwrap();
    writeln!(
        md,
        "| cold start of edge A from PostgreSQL: {KEYS} keys read, snapshot built, every kernel map written | {start_a:.1} s |"
    )
    .unwrap();
    writeln!(
        md,
        "| cold start of edge B, the same, with A running | {start_b:.1} s |"
    )
    .unwrap();
    print!("{md}");
    // Where the time on B went: its resyncs, as it logged them.
    for line in _db.log_plain().lines().filter(|l| l.contains("resync")) {
        eprintln!("B: {line}");
    }
    publish("## Store (`cargo xtask bench store`)", &md);
}
