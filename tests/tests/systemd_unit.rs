//! The shipped unit, `packaging/allowlistd.service`, as systemd reads it:
//! `systemd-analyze verify` finds nothing to say about it, `systemd-analyze
//! security` scores its exposure low and sees no CAP_SYS_ADMIN, and the
//! real daemon, doing real work, makes no system call outside the unit's
//! `SystemCallFilter=` (seen with strace). These machines run no systemd
//! as PID 1; the cgroup, capability and bpffs side of running under it is
//! in edge_cut.rs (`under_systemd_...`).

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use allowlist_tests::{
    kernel_tests_enabled,
    net::{Pair, SERVER_IF, SERVER_V4, Upstream, curl, wait_for},
    proc::{Setup, Start, TestCgroup, bin},
    receivers::Receivers,
    tool_available,
};

/// The highest exposure `systemd-analyze security` may give the unit.
/// Measured: 2.4 with systemd 252 (Debian 12); 4.6 before the unit dropped
/// CAP_SYS_ADMIN and gained ProtectControlGroups=, PrivateMounts=,
/// ProtectProc=, UMask= and SystemCallFilter=. What is left is what an
/// edge proxy that loads BPF cannot drop: root, CAP_BPF/NET_ADMIN, the
/// host network, Internet sockets.
const MAX_EXPOSURE: f64 = 3.0;

fn unit_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/allowlistd.service")
}

fn unit_text() -> String {
    std::fs::read_to_string(unit_path()).expect("read the shipped unit")
}

/// Every value of `key=` in the unit, in order.
fn unit_values(key: &str) -> Vec<String> {
    let prefix = format!("{key}=");
    unit_text()
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix).map(str::to_string))
        .collect()
}

/// `systemd-analyze verify` on a copy of `text` named allowlistd.service
/// (the binaries it names must exist, so they point at the built ones);
/// returns (success, what it printed).
fn verify(text: &str) -> (bool, String) {
    let dir = tempfile::Builder::new()
        .prefix(allowlist_tests::PREFIX)
        .tempdir()
        .unwrap();
    let unit = dir.path().join("allowlistd.service");
    let daemon = bin("allowlistd");
    std::fs::write(
        &unit,
        text.replace("/usr/local/bin/allowlistd", &daemon.display().to_string()),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .expect("run systemd-analyze");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), said)
}

#[test]
fn the_shipped_unit_verifies_without_a_word() {
    let test = "the_shipped_unit_verifies_without_a_word";
    if !tool_available(test, "systemd-analyze", "systemd") {
        return;
    }
    let (ok, said) = verify(&unit_text());
    assert!(
        ok && said.trim().is_empty(),
        "systemd-analyze verify: {said}"
    );
    // The check is not blind: a misspelt setting is reported.
    let (_, said) = verify(&unit_text().replace("ProtectSystem=", "ProtectSytem="));
    assert!(
        said.contains("ProtectSytem"),
        "a typo went unnoticed: {said}"
    );
}

#[test]
fn the_shipped_unit_scores_a_low_exposure_without_cap_sys_admin() {
    let test = "the_shipped_unit_scores_a_low_exposure_without_cap_sys_admin";
    if !tool_available(test, "systemd-analyze", "systemd") {
        return;
    }
    for key in ["CapabilityBoundingSet", "AmbientCapabilities"] {
        for v in unit_values(key) {
            assert!(!v.contains("CAP_SYS_ADMIN"), "{key}={v}");
        }
    }
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(unit_path())
        .output()
        .expect("run systemd-analyze");
    let report = String::from_utf8_lossy(&out.stdout);
    let overall = report
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no overall exposure in:\n{report}"));
    let level: f64 = overall
        .split(':')
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no figure in {overall:?}"));
    eprintln!("systemd-analyze security: {}", overall.trim());
    assert!(
        level <= MAX_EXPOSURE,
        "exposure {level} is above {MAX_EXPOSURE}:\n{report}"
    );
    let sys_admin = report
        .lines()
        .find(|l| l.contains("CapabilityBoundingSet=~CAP_SYS_ADMIN"))
        .unwrap_or_else(|| panic!("no CAP_SYS_ADMIN line in:\n{report}"));
    assert!(
        sys_admin.trim_start().starts_with('✓'),
        "systemd sees CAP_SYS_ADMIN granted: {sys_admin}"
    );
}

/// systemd's system call groups (`@name`), from `systemd-analyze
/// syscall-filter`.
fn syscall_groups() -> BTreeMap<String, Vec<String>> {
    let out = Command::new("systemd-analyze")
        .arg("syscall-filter")
        .arg("--no-pager")
        .output()
        .expect("run systemd-analyze syscall-filter");
    let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut current = None;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if line.starts_with('@') {
            let name = line.trim().to_string();
            groups.insert(name.clone(), Vec::new());
            current = Some(name);
        } else if let Some(g) = &current {
            let item = line.trim();
            if !item.is_empty() && !item.starts_with('#') {
                groups.get_mut(g).unwrap().push(item.to_string());
            }
        }
    }
    groups
}

fn expand(
    name: &str,
    groups: &BTreeMap<String, Vec<String>>,
    seen: &mut BTreeSet<String>,
) -> BTreeSet<String> {
    if !name.starts_with('@') {
        return BTreeSet::from([name.to_string()]);
    }
    if !seen.insert(name.to_string()) {
        return BTreeSet::new();
    }
    let mut out = BTreeSet::new();
    for m in groups
        .get(name)
        .unwrap_or_else(|| panic!("no system call group {name}"))
    {
        out.extend(expand(m, groups, seen));
    }
    out
}

/// The system calls the unit's `SystemCallFilter=` lines allow (allow
/// lists only: the shipped unit has no `~` deny line).
fn allowed_syscalls() -> BTreeSet<String> {
    let groups = syscall_groups();
    let mut allowed = BTreeSet::new();
    let lines = unit_values("SystemCallFilter");
    assert!(!lines.is_empty(), "the unit sets no SystemCallFilter=");
    for line in lines {
        assert!(
            !line.starts_with('~'),
            "a deny list needs this test taught about it: {line}"
        );
        for item in line.split_whitespace() {
            allowed.extend(expand(item, &groups, &mut BTreeSet::new()));
        }
    }
    allowed
}

/// The system calls in an `strace -f` log.
fn syscalls_in(trace: &str) -> BTreeSet<String> {
    trace
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter_map(|call| call.split_once('(').map(|(name, _)| name))
        .filter(|name| {
            !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        })
        .map(str::to_string)
        .collect()
}

/// The daemon under strace, doing what it does in production — XDP on an
/// interface, the hooks on its unit's cgroup (`INVOCATION_ID`), the edge
/// over HTTP/1.1 and HTTP/2, the admin socket, a refusal told by e-mail
/// (STARTTLS offered or not, the relay decides) and by a signed webhook, a
/// SIGHUP reload and a SIGTERM stop — calls nothing the unit's filter
/// would refuse.
#[test]
fn the_daemon_stays_within_the_units_system_call_filter() {
    let test = "the_daemon_stays_within_the_units_system_call_filter";
    if !kernel_tests_enabled(test)
        || !tool_available(test, "systemd-analyze", "systemd")
        || !tool_available(test, "strace", "strace")
    {
        return;
    }
    let allowed = allowed_syscalls();
    let pair = Pair::new();
    pair.client_addr("198.51.100.80");
    pair.client_addr("198.51.100.81");
    let _up = Upstream::start(&pair.server, 8080);
    let unit = TestCgroup::new();
    let setup = Setup::new(
        true,
        &format!("interfaces = [\"{SERVER_IF}\"]\nxdp_mode = \"generic\""),
    );
    setup.proxy("listen = \"0.0.0.0:8443\"\nupstream = \"http://127.0.0.1:8080\"");
    let (smtp, hooks, secret) = (2525, 9000, "unit-filter-hook-secret-0123");
    let cfg = std::fs::read_to_string(&setup.config).unwrap();
    std::fs::write(
        &setup.config,
        format!(
            "{cfg}[notify]\naction_base_url = \"https://{SERVER_V4}:8443\"\n\
             [notify.smtp]\nrelay = \"127.0.0.1:{smtp}\"\nfrom = \"allowlist@edge.test\"\n\
             to = [\"ops@edge.test\"]\n\
             [[notify.webhooks]]\nurl = \"http://127.0.0.1:{hooks}/hook\"\nsecret = \"{secret}\"\n"
        ),
    )
    .unwrap();
    let rx = Receivers::start(
        &pair.server,
        setup.dir.path(),
        smtp,
        hooks,
        &[("/hook", secret)],
        &[],
    );
    let trace = setup.dir.path().join("strace.log");
    let trace_arg = trace.display().to_string();
    let mut d = setup.start_with(Start {
        ns: Some(&pair.server),
        wrapper: &["strace", "-f", "-qq", "-o", &trace_arg, "--"],
        cgroup: Some(&unit.dir),
        env: &[("INVOCATION_ID", "0123456789abcdef0123456789abcdef")],
        ..Start::default()
    });
    // The daemon is strace's child; signals go to it, not to strace.
    let strace = d.pid().unwrap();
    let daemon: i32 = std::fs::read_to_string(format!("/proc/{strace}/task/{strace}/children"))
        .unwrap()
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .expect("strace's child");

    let key = setup.ctl_json(&["keys", "create", "--name", "k"])["key"]
        .as_str()
        .unwrap()
        .to_string();
    let url = format!("https://{SERVER_V4}:8443/");
    let hk = format!("api-key: {key}");
    setup.ctl_json(&["ips", "authorize", "198.51.100.80"]);
    setup.ctl_json(&["blocking", "api", "activate", "--force"]);
    for http in ["--http1.1", "--http2"] {
        let r = curl(&pair.client, "198.51.100.80", &url, &[http, "-H", &hk]);
        assert_eq!(r.status, 200, "{http}: {r:?}");
    }
    // A refused caller, told by e-mail and webhook.
    let r = curl(&pair.client, "198.51.100.81", &url, &["-H", &hk]);
    assert_eq!(r.status, 403, "{r:?}");
    assert!(
        wait_for(Duration::from_secs(15), || !rx.mails().is_empty()
            && rx.hooks().iter().any(|h| h.status == 200)),
        "no notification arrived: {:?} {:?}\n{}",
        rx.mails(),
        rx.hooks(),
        d.log_plain()
    );
    setup.ctl_json(&["drop", "add", "203.0.113.0/24", "--ttl", "10m"]);
    setup.ctl_json(&["stats"]);
    // SAFETY: signalling the daemon this test started.
    unsafe { libc::kill(daemon, libc::SIGHUP) };
    assert!(wait_for(Duration::from_secs(10), || d
        .log_plain()
        .contains("SIGHUP: configuration reloaded")));
    // SAFETY: as above.
    unsafe { libc::kill(daemon, libc::SIGTERM) };
    assert!(
        wait_for(Duration::from_secs(15), || d
            .log_plain()
            .contains("stopping")),
        "{}",
        d.log_plain()
    );
    d.stop();

    let used = syscalls_in(&std::fs::read_to_string(&trace).unwrap());
    assert!(used.contains("bpf") && used.len() > 20, "{used:?}");
    eprintln!("system calls made ({}): {used:?}", used.len());
    let refused: Vec<&String> = used.difference(&allowed).collect();
    assert!(
        refused.is_empty(),
        "the unit's SystemCallFilter= would refuse {refused:?} (EPERM); allow them in \
         packaging/allowlistd.service or stop making them"
    );
}
