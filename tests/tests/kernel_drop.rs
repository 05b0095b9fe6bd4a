//! The XDP drop list and guard against real traffic between namespaces, and
//! against the real program through BPF_PROG_TEST_RUN.

use std::{net::IpAddr, time::Duration};

use allowlist_tests::{
    bpf, kernel_tests_enabled,
    net::{
        Connect, Pair, SERVER_IF, SERVER_V4, SERVER_V4_B, SERVER_V6, Server, connect, udp_send,
        wait_for,
    },
    proc::Setup,
};

const PORT: u16 = 8080;
/// Long enough for a handshake on a veth, short enough to keep the suite fast.
const T: Duration = Duration::from_millis(700);

fn kernel_setup() -> Setup {
    Setup::new(
        true,
        &format!("interfaces = [\"{SERVER_IF}\"]\nxdp_mode = \"generic\""),
    )
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn drop_list_stops_handshakes_v4_and_v6_and_spares_neighbours() {
    if !kernel_tests_enabled("drop_list_stops_handshakes_v4_and_v6_and_spares_neighbours") {
        return;
    }
    let pair = Pair::new();
    for a in [
        "198.51.100.10",
        "198.51.100.11",
        "203.0.113.7",
        "2001:db8:1::10",
        "2001:db8:1::11",
    ] {
        pair.client_addr(a);
    }
    let _srv = Server::start(&pair.server, PORT);
    let setup = kernel_setup();
    let _d = setup.start(Some(&pair.server), &[]);

    assert_eq!(
        connect(&pair.client, "198.51.100.10", SERVER_V4, PORT, T),
        Connect::Ok
    );
    assert_eq!(
        connect(&pair.client, "2001:db8:1::10", SERVER_V6, PORT, T),
        Connect::Ok
    );

    setup.ctl_json(&["drop", "add", "198.51.100.10", "--reason", "test"]);
    setup.ctl_json(&["drop", "add", "2001:db8:1::10/128"]);

    // No handshake and no reply of any kind: the connection attempt times out.
    assert_eq!(
        connect(&pair.client, "198.51.100.10", SERVER_V4, PORT, T),
        Connect::Silent
    );
    assert_eq!(
        connect(&pair.client, "2001:db8:1::10", SERVER_V6, PORT, T),
        Connect::Silent
    );
    // The neighbours right next to them are untouched.
    assert_eq!(
        connect(&pair.client, "198.51.100.11", SERVER_V4, PORT, T),
        Connect::Ok
    );
    assert_eq!(
        connect(&pair.client, "2001:db8:1::11", SERVER_V6, PORT, T),
        Connect::Ok
    );
    // Not even ICMP is answered.
    let ping = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &pair.client.name,
            "ping",
            "-c",
            "1",
            "-W",
            "1",
            "-I",
            "198.51.100.10",
            SERVER_V4,
        ])
        .output()
        .expect("ping (iputils-ping) must be installed");
    assert!(
        !ping.status.success(),
        "a dropped source got an ICMP echo reply"
    );

    // A /24 covers exactly its 256 addresses: every one of them, checked on
    // the real program with its real maps, and the addresses just outside.
    setup.ctl_json(&["drop", "add", "203.0.113.0/24"]);
    assert_eq!(
        connect(&pair.client, "203.0.113.7", SERVER_V4_B, PORT, T),
        Connect::Silent
    );
    let prog = bpf::edge_filter(&setup.bpffs);
    let dst = ip(SERVER_V4);
    for last in 0..=255u8 {
        let src = IpAddr::from([203, 0, 113, last]);
        let (verdict, _) = bpf::test_run(&prog, &bpf::syn(src, dst, PORT, None), 1).unwrap();
        assert_eq!(verdict, bpf::XDP_DROP, "{src} is inside 203.0.113.0/24");
    }
    for src in ["203.0.112.255", "203.0.114.0"] {
        let (verdict, _) = bpf::test_run(&prog, &bpf::syn(ip(src), dst, PORT, None), 1).unwrap();
        assert_eq!(verdict, bpf::XDP_PASS, "{src} is outside 203.0.113.0/24");
    }
    // The same verdicts behind an 802.1Q tag.
    let tagged = bpf::syn(ip("203.0.113.9"), dst, PORT, Some(100));
    assert_eq!(bpf::test_run(&prog, &tagged, 1).unwrap().0, bpf::XDP_DROP);
    let tagged = bpf::syn(ip("203.0.114.9"), dst, PORT, Some(100));
    assert_eq!(bpf::test_run(&prog, &tagged, 1).unwrap().0, bpf::XDP_PASS);

    // Removing the entry lets the source in again at once.
    setup.ctl_json(&["drop", "remove", "198.51.100.10"]);
    assert_eq!(
        connect(&pair.client, "198.51.100.10", SERVER_V4, PORT, T),
        Connect::Ok
    );
}

#[test]
fn an_entry_with_a_ttl_stops_dropping_when_it_expires() {
    if !kernel_tests_enabled("an_entry_with_a_ttl_stops_dropping_when_it_expires") {
        return;
    }
    let pair = Pair::new();
    pair.client_addr("198.51.100.12");
    let _srv = Server::start(&pair.server, PORT);
    let setup = kernel_setup();
    let _d = setup.start(Some(&pair.server), &[]);

    let v = setup.ctl_json(&["drop", "add", "198.51.100.12", "--ttl", "2s"]);
    assert_eq!(v["expires_in"], 2);
    assert_eq!(
        connect(&pair.client, "198.51.100.12", SERVER_V4, PORT, T),
        Connect::Silent
    );
    std::thread::sleep(Duration::from_millis(2600));
    assert_eq!(
        connect(&pair.client, "198.51.100.12", SERVER_V4, PORT, T),
        Connect::Ok
    );
    // The sweeper removes it from the store too.
    assert!(wait_for(Duration::from_secs(3), || {
        setup.ctl_json(&["drop", "list"])["drops"]
            .as_array()
            .is_some_and(|a| a.is_empty())
    }));
}

#[test]
fn drops_survive_sigkill_and_a_new_daemon_adopts_the_pinned_maps() {
    if !kernel_tests_enabled("drops_survive_sigkill_and_a_new_daemon_adopts_the_pinned_maps") {
        return;
    }
    let pair = Pair::new();
    pair.client_addr("198.51.100.13");
    pair.client_addr("2001:db8:1::13");
    let _srv = Server::start(&pair.server, PORT);
    let setup = kernel_setup();
    let d = setup.start(Some(&pair.server), &[]);
    setup.ctl_json(&["drop", "add", "198.51.100.13"]);
    setup.ctl_json(&["drop", "add", "2001:db8:1::13"]);
    d.kill9();

    // Nobody is running, and enforcement goes on from the pinned state.
    assert!(!setup.ctl(&["stats"]).status.success());
    assert_eq!(
        connect(&pair.client, "198.51.100.13", SERVER_V4, PORT, T),
        Connect::Silent
    );
    assert_eq!(
        connect(&pair.client, "2001:db8:1::13", SERVER_V6, PORT, T),
        Connect::Silent
    );

    let d2 = setup.start(Some(&pair.server), &[]);
    assert!(
        d2.log_text().contains("adopted pinned XDP link"),
        "{}",
        d2.log_text()
    );
    assert_eq!(
        connect(&pair.client, "198.51.100.13", SERVER_V4, PORT, T),
        Connect::Silent
    );
    setup.ctl_json(&["drop", "remove", "198.51.100.13"]);
    assert_eq!(
        connect(&pair.client, "198.51.100.13", SERVER_V4, PORT, T),
        Connect::Ok
    );
    assert_eq!(
        connect(&pair.client, "2001:db8:1::13", SERVER_V6, PORT, T),
        Connect::Silent
    );
}

#[test]
fn counters_and_events_match_the_packets_sent() {
    if !kernel_tests_enabled("counters_and_events_match_the_packets_sent") {
        return;
    }
    let pair = Pair::new();
    pair.client_addr("198.51.100.14");
    pair.client_addr("198.51.100.15");
    let setup = kernel_setup();
    let _d = setup.start(Some(&pair.server), &[]);
    setup.ctl_json(&["drop", "add", "198.51.100.14"]);
    setup.ctl_json(&["drop", "add", "198.51.100.15"]);

    // UDP: exactly the datagrams sent reach XDP (no retransmits).
    udp_send(&pair.client, "198.51.100.14", SERVER_V4, 9999, 50);
    let stats = |s: &Setup| s.ctl_json(&["stats"]);
    assert!(wait_for(Duration::from_secs(3), || stats(&setup)["kernel"]
        ["dropped"]["manual"]
        == 50));
    let s = stats(&setup);
    // One event for the burst; the other 49 suppressed by the per-source limit.
    assert_eq!(s["kernel"]["events_sent"], 1, "{s}");
    assert_eq!(s["kernel"]["events_rate_limited"], 49, "{s}");
    assert!(wait_for(
        Duration::from_secs(3),
        || stats(&setup)["events_received"] == 1
    ));
    let ev = setup.ctl_json(&["events"]);
    let first = &ev["events"][0];
    assert_eq!(first["source"], "198.51.100.14");
    assert_eq!(first["verdict"], "drop_list");
    assert_eq!(first["reason"], "manual");
    assert_eq!(first["port"], 9999);

    // A second source gets its own event; the first gets another one after
    // its second is over.
    std::thread::sleep(Duration::from_millis(1100));
    udp_send(&pair.client, "198.51.100.14", SERVER_V4, 9999, 5);
    udp_send(&pair.client, "198.51.100.15", SERVER_V4, 9999, 5);
    assert!(wait_for(Duration::from_secs(3), || stats(&setup)["kernel"]
        ["dropped"]["manual"]
        == 60));
    let s = stats(&setup);
    assert_eq!(s["kernel"]["events_sent"], 3, "{s}");
    assert_eq!(s["kernel"]["events_rate_limited"], 57, "{s}");
    assert!(wait_for(
        Duration::from_secs(3),
        || stats(&setup)["events_received"] == 3
    ));
}

#[test]
fn guard_drops_syns_from_outside_the_union_on_guarded_ports_only() {
    if !kernel_tests_enabled("guard_drops_syns_from_outside_the_union_on_guarded_ports_only") {
        return;
    }
    use allowlist::kernel::{AttachMode, Kernel, KernelOptions};
    use allowlist_common::{PROTO_TCP, PROTO_UDP, SERVICE_API, SERVICE_SMTP};
    let pair = Pair::new();
    for a in [
        "198.51.100.20",
        "198.51.100.21",
        "2001:db8:1::20",
        "2001:db8:1::21",
    ] {
        pair.client_addr(a);
    }
    let _guarded = Server::start(&pair.server, 8443);
    let _open = Server::start(&pair.server, PORT);
    let setup = kernel_setup();
    let bpffs = setup.bpffs.clone();
    // The library in-process: the guard is fed by the policy (keys and the
    // account list), which the daemon wires up separately.
    let kernel = pair.server.run(move || {
        let mut k = Kernel::load(KernelOptions {
            bpffs,
            interfaces: vec![SERVER_IF.into()],
            mode: AttachMode::Generic,
            drop_capacity: 1024,
            guard_capacity: 1024,
            cgroup: None,
            batch_writes: true,
        })
        .expect("load");
        let union = vec![
            "198.51.100.20/32".parse().unwrap(),
            "2001:db8:1::20/128".parse().unwrap(),
        ];
        k.sync_guard(&[(SERVICE_API, union)], &[(PROTO_TCP, 8443, SERVICE_API)])
            .expect("guard");
        k
    });
    let c = &pair.client;
    assert_eq!(connect(c, "198.51.100.20", SERVER_V4, 8443, T), Connect::Ok);
    assert_eq!(
        connect(c, "198.51.100.21", SERVER_V4, 8443, T),
        Connect::Silent
    );
    assert_eq!(connect(c, "198.51.100.21", SERVER_V4, PORT, T), Connect::Ok);
    assert_eq!(
        connect(c, "2001:db8:1::20", SERVER_V6, 8443, T),
        Connect::Ok
    );
    assert_eq!(
        connect(c, "2001:db8:1::21", SERVER_V6, 8443, T),
        Connect::Silent
    );
    assert_eq!(
        connect(c, "2001:db8:1::21", SERVER_V6, PORT, T),
        Connect::Ok
    );
    // Only connection-opening packets are guarded: a TCP segment without
    // SYN passes (it belongs to no connection here, the stack answers it),
    // any UDP datagram to a UDP-guarded port does not.
    let prog = bpf::edge_filter(&setup.bpffs);
    let outside = ip("198.51.100.21");
    let mut ack = bpf::syn(outside, ip(SERVER_V4), 8443, None);
    let flags = ack.len() - 20 + 13;
    ack[flags] = 0x10;
    assert_eq!(bpf::test_run(&prog, &ack, 1).unwrap().0, bpf::XDP_PASS);
    let dgram = bpf::udp(outside, ip(SERVER_V4), 8443);
    assert_eq!(
        bpf::test_run(&prog, &dgram, 1).unwrap().0,
        bpf::XDP_PASS,
        "8443 is guarded for TCP only"
    );
    let stats = kernel.stats().unwrap();
    assert!(stats.guard_dropped_api >= 2, "{stats:?}");
    assert_eq!(stats.guard_dropped_smtp, 0);
    // Widening the union lets the source in; the union is per service, so
    // SMTP's (empty) union guards UDP 8443 against everyone; disarming the
    // ports opens them.
    let mut kernel = kernel;
    let api = vec!["198.51.100.0/24".parse().unwrap()];
    let unions = [(SERVICE_API, api.clone()), (SERVICE_SMTP, vec![])];
    kernel
        .sync_guard(&unions, &[(PROTO_TCP, 8443, SERVICE_API)])
        .unwrap();
    assert_eq!(connect(c, "198.51.100.21", SERVER_V4, 8443, T), Connect::Ok);
    assert_eq!(
        connect(c, "2001:db8:1::21", SERVER_V6, 8443, T),
        Connect::Silent
    );
    kernel
        .sync_guard(
            &unions,
            &[
                (PROTO_TCP, 8443, SERVICE_API),
                (PROTO_UDP, 8443, SERVICE_SMTP),
            ],
        )
        .unwrap();
    let inside = bpf::udp(ip("198.51.100.21"), ip(SERVER_V4), 8443);
    assert_eq!(
        bpf::test_run(&prog, &inside, 1).unwrap().0,
        bpf::XDP_DROP,
        "not in SMTP's union"
    );
    assert_eq!(kernel.stats().unwrap().guard_dropped_smtp, 1);
    let unions = [(SERVICE_API, api.clone()), (SERVICE_SMTP, api)];
    kernel
        .sync_guard(
            &unions,
            &[
                (PROTO_TCP, 8443, SERVICE_API),
                (PROTO_UDP, 8443, SERVICE_SMTP),
            ],
        )
        .unwrap();
    assert_eq!(bpf::test_run(&prog, &inside, 1).unwrap().0, bpf::XDP_PASS);
    kernel.sync_guard(&unions, &[]).unwrap();
    assert_eq!(
        connect(c, "2001:db8:1::21", SERVER_V6, 8443, T),
        Connect::Ok
    );
}

#[test]
fn unload_removes_every_program_link_and_pin() {
    if !kernel_tests_enabled("unload_removes_every_program_link_and_pin") {
        return;
    }
    let pair = Pair::new();
    let setup = kernel_setup();
    let mut d = setup.start(Some(&pair.server), &[]);
    setup.ctl_json(&["drop", "add", "198.51.100.99"]);
    d.stop();
    // A normal stop leaves enforcement in place.
    assert!(setup.bpffs.join("links/xdp-vs").exists());
    let link = std::process::Command::new("ip")
        .args(["-n", &pair.server.name, "link", "show", SERVER_IF])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&link.stdout).contains("xdp"),
        "XDP should stay attached"
    );

    let out = std::process::Command::new("nsenter")
        .arg(format!("--net={}", pair.server.path()))
        .arg(allowlist_tests::proc::bin("allowlistd"))
        .arg("--config")
        .arg(&setup.config)
        .arg("--unload")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!setup.bpffs.exists(), "the bpffs folder is gone");
    let link = std::process::Command::new("ip")
        .args(["-n", &pair.server.name, "link", "show", SERVER_IF])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&link.stdout).contains("xdp"),
        "XDP detached"
    );
}

#[test]
fn always_allow_holds_for_drop_entries_stored_before_it() {
    if !kernel_tests_enabled("always_allow_holds_for_drop_entries_stored_before_it") {
        return;
    }
    let pair = Pair::new();
    pair.client_addr("198.51.100.30");
    let _open = Server::start(&pair.server, PORT);
    let setup = kernel_setup();
    let mut d = setup.start(Some(&pair.server), &[]);
    setup.ctl_json(&["drop", "add", "198.51.100.0/24", "--reason", "old entry"]);
    assert_eq!(
        connect(&pair.client, "198.51.100.30", SERVER_V4, PORT, T),
        Connect::Silent
    );
    d.stop();
    // The operator adds a management address to always_allow; the stored
    // /24 that covers it must no longer drop it after the restart.
    let text = std::fs::read_to_string(&setup.config).unwrap();
    std::fs::write(
        &setup.config,
        format!("{text}\n[blocking]\nalways_allow = [\"198.51.100.30/32\"]\n"),
    )
    .unwrap();
    let d = setup.start(Some(&pair.server), &[]);
    assert_eq!(
        connect(&pair.client, "198.51.100.30", SERVER_V4, PORT, T),
        Connect::Ok
    );
    assert!(d.log_text().contains("overlaps [blocking] always_allow"));
}
