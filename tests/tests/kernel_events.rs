//! Event storms: a flood of spoofed sources inside one dropped prefix must
//! not flood the ring buffer, the daemon or its log. Every packet here has
//! its own source, so the per-source limit alone would let each through.

use std::{net::IpAddr, time::Duration};

use allowlist_tests::{bpf, kernel_tests_enabled, net::wait_for, proc::Setup};

#[test]
fn spoofed_source_floods_are_bounded_by_a_total_event_budget() {
    if !kernel_tests_enabled("spoofed_source_floods_are_bounded_by_a_total_event_budget") {
        return;
    }
    let setup = Setup::new(true, "");
    let d = setup.start(None, &[]);
    setup.ctl_json(&["drop", "add", "2001:db8:ff00::/40", "--reason", "flood"]);
    let prog = bpf::edge_filter(&setup.bpffs);
    const PACKETS: u32 = 5000;
    // Pinned to one CPU, so the per-CPU budget is the whole budget here.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let started = std::time::Instant::now();
    for i in 0..PACKETS {
        let src: IpAddr = format!("2001:db8:ff00:{:x}::{:x}", i / 256, i % 256 + 1)
            .parse()
            .unwrap();
        let frame = bpf::syn(src, "2001:db8:1::1".parse().unwrap(), 443, None);
        assert_eq!(bpf::test_run(&prog, &frame, 1).unwrap().0, bpf::XDP_DROP);
    }
    let seconds = started.elapsed().as_secs() + 1;
    let stats = || setup.ctl_json(&["stats"]);
    assert!(wait_for(Duration::from_secs(3), || {
        let s = stats();
        s["kernel"]["events_sent"].as_u64().unwrap()
            + s["kernel"]["events_rate_limited"].as_u64().unwrap()
            == u64::from(PACKETS)
    }));
    let s = stats();
    let sent = s["kernel"]["events_sent"].as_u64().unwrap();
    let budget = allowlist_common::EVENTS_PER_CPU_PER_SEC * cpus * (seconds + 1);
    assert!(
        sent <= budget && sent < u64::from(PACKETS),
        "{sent} events for {PACKETS} distinct sources in {seconds} s (budget {budget}): {s}"
    );
    assert!(wait_for(
        Duration::from_secs(3),
        || stats()["events_received"].as_u64().unwrap() == sent
    ));
    // The daemon logs a window's first event and sums the rest.
    let lines = d
        .log_text()
        .lines()
        .filter(|l| l.contains("kernel_drop") && l.contains("INFO"))
        .count();
    assert!(
        lines <= 2 * (seconds as usize + 1),
        "{lines} INFO lines for {sent} events"
    );
    // Every event the daemon received is sampled into the usage log as a
    // kernel drop of its source (the drop-list reason as the rule), and no
    // more than that.
    let logged = || {
        setup.ctl_json(&["logs", "--reason", "kernel_drop", "--limit", "10000"])["entries"]
            .as_array()
            .unwrap()
            .clone()
    };
    assert!(
        wait_for(Duration::from_secs(3), || logged().len() as u64 == sent),
        "{} kernel_drop rows for {sent} events",
        logged().len()
    );
    let row = &logged()[0];
    assert!(
        row["client"]
            .as_str()
            .unwrap()
            .starts_with("2001:db8:ff00:"),
        "{row}"
    );
    assert_eq!(row["rule"], "manual", "{row}");
    assert_eq!(
        setup.ctl_json(&[
            "logs",
            "--reason",
            "kernel_drop",
            "--ip",
            "2001:db8:ff00::/40",
            "--limit",
            "1"
        ])["entries"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}
