//! Live cut-off: when a key is revoked, or its allowlist or its account's
//! list stops admitting a connection's peer, the connection is cut at
//! once — a streamed download and an idle keep-alive connection alike.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use allowlist_tests::{
    kernel_tests_enabled,
    net::{Pair, SERVER_V4, Upstream},
    proc::{Setup, Start, TestCgroup, cgroup_of},
};

const EDGE: u16 = 8443;
const UP: u16 = 8080;

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// A TLS client in the client namespace: `GET path` with `key`, printing
/// `chunk T` per read and `end REASON T` when the connection ends; with
/// `idle`, reads one whole response, then waits on the open connection.
fn client(
    pair: &Pair,
    src: &str,
    key: &str,
    path: &str,
    idle: bool,
) -> std::thread::JoinHandle<String> {
    let script = format!(
        r#"
import socket, ssl, time, sys
s = socket.socket(); s.settimeout(12); s.bind(("{src}", 0)); s.connect(("{SERVER_V4}", {EDGE}))
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
ctx.set_alpn_protocols(["http/1.1"])
t = ctx.wrap_socket(s)
t.sendall(b"GET {path} HTTP/1.1\r\nhost: x\r\napi-key: {key}\r\n\r\n")
idle = {idle}
buf = b""
try:
    while True:
        d = t.recv(65536)
        if not d:
            print("end closed", time.time()); break
        buf += d
        if idle and b"\r\n\r\n" in buf and buf.endswith(b"}}"):
            print("response", time.time()); sys.stdout.flush(); idle = False; continue
        print("chunk", time.time()); sys.stdout.flush()
except (ConnectionResetError, ssl.SSLError, OSError) as e:
    print("end", type(e).__name__, time.time())
"#,
        idle = if idle { "True" } else { "False" }
    );
    let name = pair.client.name.clone();
    std::thread::spawn(move || {
        let out = std::process::Command::new("ip")
            .args([
                "netns", "exec", &name, "timeout", "15", "python3", "-u", "-c", &script,
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    })
}

fn times(out: &str, what: &str) -> Vec<f64> {
    out.lines()
        .filter(|l| l.starts_with(what))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect()
}

#[test]
fn revoking_a_key_cuts_its_live_connections_at_once() {
    if !kernel_tests_enabled("revoking_a_key_cuts_its_live_connections_at_once") {
        return;
    }
    let pair = Pair::new();
    pair.client_addr("198.51.100.80");
    pair.client_addr("198.51.100.81");
    let _up = Upstream::start(&pair.server, UP);
    let setup = Setup::new(true, "");
    setup.proxy(&format!(
        "listen = \"0.0.0.0:{EDGE}\"\nupstream = \"http://127.0.0.1:{UP}\""
    ));
    let _d = setup.start(Some(&pair.server), &[]);
    let k = setup.ctl_json(&[
        "keys",
        "create",
        "--name",
        "stream",
        "--allow",
        "198.51.100.80",
        "--allow",
        "198.51.100.81",
    ]);
    let (id, key) = (
        k["id"].as_str().unwrap().to_string(),
        k["key"].as_str().unwrap().to_string(),
    );

    // A streamed download and an idle keep-alive connection with one key.
    let download = client(&pair, "198.51.100.80", &key, "/stream", false);
    let idle = client(&pair, "198.51.100.81", &key, "/idle", true);
    std::thread::sleep(Duration::from_millis(1500));

    // Removing .81 from the allowlist cuts the idle connection, not the
    // download from .80.
    // Timed from before the command: what an operator sees end to end.
    let t_disallow = now();
    setup.ctl_json(&["keys", "disallow", &id, "198.51.100.81"]);
    let idle_out = idle.join().unwrap();
    let ends = times(&idle_out, "end");
    assert_eq!(times(&idle_out, "response").len(), 1, "{idle_out}");
    assert!(
        !ends.is_empty() && ends[0] - t_disallow < 0.2,
        "idle connection not cut within 200 ms of the command: {idle_out} (disallowed at {t_disallow})"
    );

    std::thread::sleep(Duration::from_millis(300));
    let t_revoke = now();
    setup.ctl_json(&["keys", "revoke", &id]);
    let out = download.join().unwrap();
    let chunks = times(&out, "chunk");
    let ends = times(&out, "end");
    assert!(
        chunks.iter().filter(|t| **t < t_revoke).count() >= 20,
        "the download was running: {out}"
    );
    let last = chunks.iter().cloned().fold(0.0, f64::max);
    assert!(
        last - t_revoke < 0.2,
        "data kept flowing {:.3} s after the revoke command",
        last - t_revoke
    );
    assert!(
        !ends.is_empty() && ends[0] - t_revoke < 0.2,
        "download not cut within 200 ms of the command: {out}"
    );

    let s = setup.ctl_json(&["stats"]);
    eprintln!(
        "kernel cut counters: revoked {} allowlist {}",
        s["kernel"]["conn_cut_revoked"], s["kernel"]["conn_cut_allowlist"]
    );
}

#[test]
fn the_kernel_alone_stops_a_revoked_stream() {
    if !kernel_tests_enabled("the_kernel_alone_stops_a_revoked_stream") {
        return;
    }
    let pair = Pair::new();
    pair.client_addr("198.51.100.80");
    let _up = Upstream::start(&pair.server, UP);
    let setup = Setup::new(true, "");
    setup.proxy(&format!(
        "listen = \"0.0.0.0:{EDGE}\"\nupstream = \"http://127.0.0.1:{UP}\""
    ));
    // The userspace recheck is off (test builds only): if the connection
    // hooks did not drop the paired socket's packets, data would keep
    // flowing to the client.
    let _d = setup.start_env(
        Some(&pair.server),
        &[],
        &[("ALLOWLIST_TEST_KERNEL_CUT_ONLY", "1")],
    );
    revoke_cuts_the_stream(&setup, &pair, "with only the kernel hooks");
}

/// A key allowed from 198.51.100.80 downloads a slow stream; revoking the
/// key must stop its data within 0.2 s, and the kernel must count the cut.
/// (Run with the userspace recheck off: only the hooks can stop it.)
fn revoke_cuts_the_stream(setup: &Setup, pair: &Pair, what: &str) {
    let k = setup.ctl_json(&["keys", "create", "--name", "s", "--allow", "198.51.100.80"]);
    let (id, key) = (
        k["id"].as_str().unwrap().to_string(),
        k["key"].as_str().unwrap().to_string(),
    );
    let download = client(pair, "198.51.100.80", &key, "/stream", false);
    std::thread::sleep(Duration::from_millis(1500));
    let cuts = || {
        setup.ctl_json(&["stats"])["kernel"]["conn_cut_revoked"]
            .as_u64()
            .unwrap_or(0)
    };
    let before = cuts();
    let t_revoke = now();
    setup.ctl_json(&["keys", "revoke", &id]);
    let out = download.join().unwrap();
    let chunks = times(&out, "chunk");
    assert!(
        chunks.iter().filter(|t| **t < t_revoke).count() >= 20,
        "the download was running: {out}"
    );
    let last = chunks.iter().cloned().fold(0.0, f64::max);
    assert!(
        last - t_revoke < 0.2,
        "{what}: data kept flowing {:.3} s after the revoke command",
        last - t_revoke
    );
    let after = cuts();
    assert!(
        after > before,
        "the kernel counted no cut packet ({before} -> {after})"
    );
}

/// The account layer in the kernel: with API blocking active, removing the
/// authorized network a live stream comes from stops it through the
/// connection hooks alone (counted as an account cut), whether or not the
/// XDP guard is armed on the port.
#[test]
fn the_kernel_alone_stops_a_stream_the_account_list_no_longer_admits() {
    if !kernel_tests_enabled("the_kernel_alone_stops_a_stream_the_account_list_no_longer_admits") {
        return;
    }
    let pair = Pair::new();
    pair.client_addr("198.51.100.81");
    let _up = Upstream::start(&pair.server, UP);
    let setup = Setup::new(true, "");
    setup.proxy(&format!(
        "listen = \"0.0.0.0:{EDGE}\"\nupstream = \"http://127.0.0.1:{UP}\""
    ));
    let _d = setup.start_env(
        Some(&pair.server),
        &[],
        &[("ALLOWLIST_TEST_KERNEL_CUT_ONLY", "1")],
    );
    let k = setup.ctl_json(&["keys", "create", "--name", "a", "--allow", "198.51.100.81"]);
    let key = k["key"].as_str().unwrap().to_string();
    setup.ctl_json(&["ips", "authorize", "198.51.100.0/24"]);
    setup.ctl_json(&["blocking", "api", "activate"]);
    let download = client(&pair, "198.51.100.81", &key, "/stream", false);
    std::thread::sleep(Duration::from_millis(1500));
    let cuts = |what: &str| {
        setup.ctl_json(&["stats"])["kernel"][what]
            .as_u64()
            .unwrap_or(0)
    };
    let before = cuts("conn_cut_account");
    let t_remove = now();
    setup.ctl_json(&["ips", "remove", "198.51.100.0/24"]);
    let out = download.join().unwrap();
    let chunks = times(&out, "chunk");
    assert!(
        chunks.iter().filter(|t| **t < t_remove).count() >= 20,
        "the download was running: {out}"
    );
    let last = chunks.iter().cloned().fold(0.0, f64::max);
    assert!(
        last - t_remove < 0.2,
        "with only the kernel hooks, data kept flowing {:.3} s after the account list dropped \
         the client",
        last - t_remove
    );
    let after = cuts("conn_cut_account");
    assert!(
        after > before,
        "the kernel counted no account cut ({before} -> {after})"
    );
    assert_eq!(cuts("conn_cut_revoked"), 0);
}

/// The BPF programs attached directly to the cgroup folder `dir`, by name.
fn programs_on(dir: &std::path::Path) -> Vec<String> {
    let out = std::process::Command::new("bpftool")
        .args(["-j", "cgroup", "show"])
        .arg(dir)
        .output()
        .expect("run bpftool");
    assert!(
        out.status.success(),
        "bpftool cgroup show {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.stdout.iter().all(u8::is_ascii_whitespace) {
        return Vec::new();
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool JSON");
    let mut names: Vec<String> = v
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["name"].as_str().map(str::to_string))
        .collect();
    names.sort();
    names
}

const HOOKS: [&str; 3] = ["conn_egress", "conn_ingress", "conn_ops"];

/// The capabilities the shipped unit grants, as `setpriv --bounding-set`
/// spells them (`-all,+bpf,...`).
fn unit_bounding_set() -> String {
    let unit = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/allowlistd.service"),
    )
    .expect("read the shipped unit");
    let caps: Vec<String> = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("the unit sets CapabilityBoundingSet=")
        .split_whitespace()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    assert!(!caps.iter().any(|c| c == "+sys_admin"), "{caps:?}");
    format!("-all,{}", caps.join(","))
}

/// Whether `pid` holds CAP_SYS_ADMIN (bit 21) in its effective set.
fn has_sys_admin(pid: u32) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .unwrap()
        .trim();
    u64::from_str_radix(hex, 16).unwrap() & (1 << 21) != 0
}

/// Started by systemd (`INVOCATION_ID` set) in its unit's cgroup — here
/// a cgroup the test made — the daemon stays there and attaches the
/// connection hooks to it; with only the capabilities the shipped unit
/// grants (no CAP_SYS_ADMIN), the hooks alone still stop a revoked key's
/// stream.
#[test]
fn under_systemd_the_hooks_go_on_the_unit_cgroup_and_still_cut() {
    if !kernel_tests_enabled("under_systemd_the_hooks_go_on_the_unit_cgroup_and_still_cut") {
        return;
    }
    let pair = Pair::new();
    pair.client_addr("198.51.100.80");
    let _up = Upstream::start(&pair.server, UP);
    let unit = TestCgroup::new();
    let setup = Setup::new(true, "");
    setup.proxy(&format!(
        "listen = \"0.0.0.0:{EDGE}\"\nupstream = \"http://127.0.0.1:{UP}\""
    ));
    let bounding = unit_bounding_set();
    let d = setup.start_with(Start {
        ns: Some(&pair.server),
        wrapper: &[
            "setpriv",
            "--bounding-set",
            &bounding,
            "--inh-caps",
            "-all",
            "--no-new-privs",
            "--",
        ],
        cgroup: Some(&unit.dir),
        env: &[
            ("INVOCATION_ID", "0123456789abcdef0123456789abcdef"),
            ("ALLOWLIST_TEST_KERNEL_CUT_ONLY", "1"),
        ],
        ..Start::default()
    });
    let pid = d.pid().unwrap();
    assert!(!has_sys_admin(pid), "the daemon kept CAP_SYS_ADMIN");
    assert_eq!(cgroup_of(pid), unit.path, "{}", d.log_text());
    assert_eq!(programs_on(&unit.dir), HOOKS, "{}", d.log_text());
    assert!(
        d.log_plain().contains("connection hooks attached")
            && d.log_plain().contains("mode=\"self\""),
        "{}",
        d.log_plain()
    );

    revoke_cuts_the_stream(&setup, &pair, "hooks on the unit cgroup");
    // Still in the unit's cgroup after serving.
    assert_eq!(cgroup_of(pid), unit.path);
}

/// Started by hand (no systemd), the daemon leaves the cgroup it was
/// started in — shared, as a login session's is — for a child of it named
/// after its bpffs folder, and attaches the hooks there only.
#[test]
fn outside_systemd_the_daemon_moves_into_a_child_cgroup_of_its_own() {
    if !kernel_tests_enabled("outside_systemd_the_daemon_moves_into_a_child_cgroup_of_its_own") {
        return;
    }
    let session = TestCgroup::new();
    let setup = Setup::new(true, "");
    let d = setup.start_with(Start {
        cgroup: Some(&session.dir),
        ..Start::default()
    });
    let child =
        allowlist::kernel::child_cgroup_name(&setup.bpffs.file_name().unwrap().to_string_lossy());
    let pid = d.pid().unwrap();
    assert_eq!(
        cgroup_of(pid),
        session.path.join(&child),
        "{}",
        d.log_text()
    );
    assert_eq!(programs_on(&session.dir.join(&child)), HOOKS);
    assert!(programs_on(&session.dir).is_empty());
}
