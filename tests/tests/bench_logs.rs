//! `cargo xtask bench logs`: the usage log's writer (rows/s it sustains
//! into day partitions) and its CSV export of 10 million rows through the
//! real daemon and `allowlistctl logs --csv` (rows/s, and peak memory of
//! both, which must not grow with the export).

use std::{
    fmt::Write as _,
    net::IpAddr,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use allowlist::{
    logs::{self, LogRecord, LogSink},
    policy::{Reason, Rule},
};
use allowlist_tests::proc::Setup;

const ROWS: u64 = 10_000_000;
/// Rows per round of submissions (the queue holds one round).
const ROUND: u64 = 500_000;

fn record(i: u64, at_ms: i64) -> LogRecord {
    LogRecord {
        at_ms,
        account: "default".into(),
        key_id: format!("{:016x}", i % 1000),
        client: Some(IpAddr::from([198, 51, (i >> 8) as u8, i as u8])),
        method: if i.is_multiple_of(5) { "POST" } else { "GET" }.into(),
        path: "/v1/things".into(),
        status: if i.is_multiple_of(7) { 403 } else { 200 },
        reason: if i.is_multiple_of(7) {
            Reason::KeyAllowlist.as_str()
        } else {
            Reason::Ok.as_str()
        },
        rule: Some(Rule::KeyNoMatch),
        note: "",
        latency_us: 150 + i % 100,
        bytes_in: 0,
        bytes_out: 300,
    }
}

/// Peak resident memory (KiB) of `pid` since its counter was last reset.
fn hwm_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Resets `pid`'s peak-RSS counter (Linux: clear_refs 5).
fn reset_hwm(pid: u32) {
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
}

/// Feeds `rows` records through the daemon's writer into `store`; the
/// seconds until all were written.
fn feed(
    sink: &'static LogSink,
    store: std::sync::Arc<dyn logs::LogStore>,
    rows: u64,
    now: i64,
) -> f64 {
    let writer = logs::start(sink, store, 30, Duration::from_millis(200), move || now).unwrap();
    let started = Instant::now();
    let mut submitted = 0u64;
    while submitted < rows {
        // One round at a time, so nothing is dropped: the figure is the
        // writer's, not the queue's.
        for i in submitted..(submitted + ROUND).min(rows) {
            // Spread over the last hour, newest last.
            sink.submit(record(i, now - 3_600_000 + (i * 3_600_000 / rows) as i64));
        }
        submitted = (submitted + ROUND).min(rows);
        while sink.written.load(Ordering::Relaxed)
            + sink.dropped.load(Ordering::Relaxed)
            + sink.failed.load(Ordering::Relaxed)
            < submitted
        {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let secs = started.elapsed().as_secs_f64();
    writer.stop();
    assert_eq!(sink.dropped.load(Ordering::Relaxed), 0);
    assert_eq!(sink.failed.load(Ordering::Relaxed), 0);
    assert_eq!(sink.written.load(Ordering::Relaxed), rows);
    secs
}

/// Rows written into the shared PostgreSQL log (fewer than into the day
/// files: the figure is a rate).
const PG_ROWS: u64 = 2_000_000;

#[test]
#[ignore = "benchmark: run with `cargo xtask bench logs`"]
fn bench_logs() {
    let setup = Setup::new(false, "");
    let dir = setup.dir.path().join("logs");
    // The writer, as the daemon runs it, fed as fast as one thread can.
    let sink: &'static LogSink = Box::leak(Box::new(LogSink::new(ROUND as usize)));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let write_s = feed(
        sink,
        std::sync::Arc::new(logs::DayFiles::new(dir.clone()).unwrap()),
        ROWS,
        now,
    );
    let bytes: u64 = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
        .sum();

    // The same writer into the shared PostgreSQL log, when a server can
    // be started here.
    let pg_rate =
        allowlist_tests::postgres::postgres_available("bench_logs (PostgreSQL)").then(|| {
            let server = allowlist_tests::postgres::PgServer::start();
            let url = server.create_db("logs");
            let store = allowlist::store::PgStore::open(&allowlist::store::PgOptions {
                url,
                ca: None,
                pool: 2,
            })
            .unwrap();
            let sink: &'static LogSink = Box::leak(Box::new(LogSink::new(ROUND as usize)));
            PG_ROWS as f64 / feed(sink, std::sync::Arc::new(store), PG_ROWS, now)
        });

    // The export through the daemon and the CLI, to /dev/null.
    let d = setup.start(None, &["--no-kernel"]);
    let pid = d.pid().unwrap();
    reset_hwm(pid);
    let daemon_before = hwm_kib(pid);
    let started = Instant::now();
    let mut child = std::process::Command::new(allowlist_tests::proc::bin("allowlistctl"))
        .arg("--socket")
        .arg(setup.socket())
        .args(["logs", "--csv"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut lines = 0u64;
    let mut buf = vec![0u8; 1 << 16];
    let mut ctl_hwm = 0;
    let mut reads = 0u64;
    loop {
        use std::io::Read;
        let n = out.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        lines += buf[..n].iter().filter(|b| **b == b'\n').count() as u64;
        reads += 1;
        if reads.is_multiple_of(256) {
            ctl_hwm = ctl_hwm.max(hwm_kib(child.id()));
        }
    }
    assert!(child.wait().unwrap().success());
    let export_s = started.elapsed().as_secs_f64();
    let daemon_after = hwm_kib(pid);
    assert_eq!(lines, ROWS + 1, "a header and every row");

    let mut md = String::new();
    writeln!(md, "## Usage log (`cargo xtask bench logs`)\n").unwrap();
    writeln!(
        md,
        "{ROWS} rows over one day partition, written by the daemon's writer (one transaction per 200 ms batch, WAL, \
         `synchronous=NORMAL`), fed {ROUND} rows at a time by one thread; then exported whole with \
         `allowlistctl logs --csv` through the daemon's admin socket (streamed), read by this test. Every figure from the same run.\n"
    )
    .unwrap();
    writeln!(md, "| measure | value |").unwrap();
    writeln!(md, "|---|---:|").unwrap();
    writeln!(
        md,
        "| writer, sustained rows/s | {:.0} |",
        ROWS as f64 / write_s
    )
    .unwrap();
    if let Some(rate) = pg_rate {
        writeln!(
            md,
            "| writer into the shared PostgreSQL log ({PG_ROWS} rows, one local server, array inserts of 5,000 rows, one transaction per batch), sustained rows/s | {rate:.0} ({:.2}× the day files) |",
            rate * write_s / ROWS as f64
        )
        .unwrap();
    }
    writeln!(
        md,
        "| partition size per row | {:.0} bytes |",
        bytes as f64 / ROWS as f64
    )
    .unwrap();
    writeln!(
        md,
        "| CSV export, rows/s (daemon → allowlistctl → pipe) | {:.0} |",
        ROWS as f64 / export_s
    )
    .unwrap();
    writeln!(
        md,
        "| daemon peak RSS during the export (from its level before) | {} MiB (from {} MiB) |",
        daemon_after / 1024,
        daemon_before / 1024
    )
    .unwrap();
    writeln!(md, "| allowlistctl peak RSS | {} MiB |", ctl_hwm / 1024).unwrap();
    writeln!(md).unwrap();
    eprintln!("\n{md}");
    allowlist_tests::bench::publish("## Usage log (", &md);
}
