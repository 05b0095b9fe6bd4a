//! `[kernel] api_guard`: the seeds' loop (an unknown caller gets a clear
//! 403, enters the unauthorized list, the owner is told) must hold with the
//! kernel on; the XDP guard covers the API port only under a connection
//! flood (`auto`), always (`on`) or never (`off`). Guard drops are recorded
//! in the unauthorized list, and sources that keep failing are promoted to
//! the drop list with an expiry that doubles when they come back.

use std::time::Duration;

use allowlist_tests::{
    kernel_tests_enabled,
    net::{Connect, Pair, SERVER_IF, SERVER_V4, Server, Upstream, connect, curl, python, wait_for},
    proc::Setup,
};

const EDGE: u16 = 8443;
const UP: u16 = 8080;
const SMTP: u16 = 2525;
const KNOWN: &str = "198.51.100.50";
const UNKNOWN: &str = "198.51.100.51";
const OFFENDER: &str = "198.51.100.52";
const T: Duration = Duration::from_millis(700);

fn setup(kernel: &str) -> Setup {
    let s = Setup::new(
        true,
        &format!(
            "interfaces = [\"{SERVER_IF}\"]\nxdp_mode = \"generic\"\nsmtp_ports = [{SMTP}]\n{kernel}"
        ),
    );
    s.proxy(&format!(
        "listen = \"0.0.0.0:{EDGE}\"\nupstream = \"http://127.0.0.1:{UP}\""
    ));
    s
}

fn url() -> String {
    format!("https://{SERVER_V4}:{EDGE}/")
}

fn guard(setup: &Setup) -> serde_json::Value {
    setup.ctl_json(&["stats"])["api_guard"].clone()
}

fn unauthorized(setup: &Setup) -> Vec<serde_json::Value> {
    setup.ctl_json(&["ips", "unauthorized"])["unauthorized"]
        .as_array()
        .unwrap()
        .clone()
}

/// `n` requests with `key` from `src` on one keep-alive connection; prints
/// the set of statuses.
fn requests(pair: &Pair, src: &str, key: &str, n: u32) -> String {
    let script = format!(
        r#"
import httpx
t = httpx.HTTPTransport(local_address="{src}", verify=False)
codes = set()
with httpx.Client(transport=t, timeout=3) as cl:
    for i in range({n}):
        try:
            codes.add(cl.get("{u}", headers={{"api-key": "{key}"}}).status_code)
        except Exception:
            # Promoted mid-way: XDP now drops every packet of this source.
            codes.add(0)
            break
print(sorted(codes))
"#,
        u = url()
    );
    python(&pair.client, 30, &script)
}

#[test]
fn unknown_callers_get_a_403_unless_the_edge_is_flooded() {
    if !kernel_tests_enabled("unknown_callers_get_a_403_unless_the_edge_is_flooded") {
        return;
    }
    let pair = Pair::new();
    for a in [KNOWN, UNKNOWN, OFFENDER] {
        pair.client_addr(a);
    }
    let _up = Upstream::start(&pair.server, UP);
    let _smtp = Server::start(&pair.server, SMTP);
    let setup = setup(
        "api_guard = \"auto\"\nflood_threshold = 30\nflood_calm_secs = 4\n\
         promote_after = 20\npromote_window_secs = 60\npromote_ttl_secs = 3",
    );
    let _d = setup.start(Some(&pair.server), &[]);
    let c = &pair.client;
    let key = setup.ctl_json(&["keys", "create", "--name", "k"])["key"]
        .as_str()
        .unwrap()
        .to_string();
    setup.ctl_json(&["ips", "authorize", KNOWN]);
    setup.ctl_json(&["blocking", "api", "activate", "--force"]);
    let g = guard(&setup);
    assert_eq!(
        (g["mode"].as_str(), g["armed"].as_bool()),
        (Some("auto"), Some(false)),
        "{g}"
    );

    // Not flooded: the unknown caller is answered, clearly, and recorded.
    let r = curl(c, UNKNOWN, &url(), &["-H", &format!("api-key: {key}")]);
    assert_eq!(r.status, 403, "{r:?}");
    assert!(r.body.contains("IP_NOT_ALLOWED"));
    assert!(wait_for(Duration::from_secs(3), || unauthorized(&setup)
        .iter()
        .any(|u| u["addr"] == UNKNOWN && u["service"] == "api")));

    // A connection flood from a known source arms the guard...
    let flood = format!(
        r#"
import socket, time
end = time.time() + 2.5; n = 0
while time.time() < end and n < 2000:
    s = socket.socket(); s.settimeout(2); s.bind(("{KNOWN}", 0))
    try:
        s.connect(("{SERVER_V4}", {EDGE})); n += 1
    except Exception:
        pass
    s.close()
print(n)
"#
    );
    let out = std::process::Command::new("ip")
        .args([
            "netns", "exec", &c.name, "timeout", "20", "python3", "-c", &flood,
        ])
        .output()
        .unwrap();
    let opened: u32 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    assert!(opened > 100, "the flood opened {opened} connections");
    assert!(
        wait_for(Duration::from_secs(3), || guard(&setup)["armed"] == true),
        "{}",
        guard(&setup)
    );
    assert!(guard(&setup)["reason"].as_str().unwrap().contains("flood"));
    // ...the unknown source is now dropped at XDP, and that is recorded.
    assert_eq!(connect(c, UNKNOWN, SERVER_V4, EDGE, T), Connect::Silent);
    assert!(wait_for(Duration::from_secs(3), || unauthorized(&setup)
        .iter()
        .any(|u| u["addr"] == UNKNOWN
            && u["service"] == "api"
            && u["port"] == EDGE)));
    assert_eq!(connect(c, KNOWN, SERVER_V4, EDGE, T), Connect::Ok);
    // Calm for 4 s: disarmed, and the unknown caller gets its 403 again.
    assert!(
        wait_for(Duration::from_secs(10), || guard(&setup)["armed"] == false),
        "{}",
        guard(&setup)
    );
    assert_eq!(
        curl(c, UNKNOWN, &url(), &["-H", &format!("api-key: {key}")]).status,
        403
    );

    // A source that keeps failing is promoted to the drop list; when it
    // returns after the expiry, its next promotion lasts twice as long.
    let promoted = |setup: &Setup| -> Option<i64> {
        setup.ctl_json(&["drop", "list"])["drops"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["cidr"].as_str().is_some_and(|c| c.starts_with(OFFENDER)))
            .and_then(|d| d["expires_in"].as_i64())
    };
    assert!(requests(&pair, OFFENDER, &key, 25).contains("403"));
    assert!(wait_for(Duration::from_secs(3), || promoted(&setup).is_some()));
    let first = promoted(&setup).unwrap();
    assert!(
        (1..=3).contains(&first),
        "first promotion expires in {first} s"
    );
    assert_eq!(connect(c, OFFENDER, SERVER_V4, EDGE, T), Connect::Silent);
    assert!(wait_for(Duration::from_secs(6), || promoted(&setup).is_none()));
    assert!(requests(&pair, OFFENDER, &key, 25).contains("403"));
    assert!(wait_for(Duration::from_secs(3), || promoted(&setup).is_some()));
    let second = promoted(&setup).unwrap();
    assert!(
        (4..=6).contains(&second),
        "second promotion expires in {second} s"
    );

    // SMTP: the kernel is the only enforcement; its drops are recorded too.
    setup.ctl_json(&["blocking", "smtp", "activate"]);
    assert_eq!(connect(c, UNKNOWN, SERVER_V4, SMTP, T), Connect::Silent);
    assert_eq!(connect(c, KNOWN, SERVER_V4, SMTP, T), Connect::Ok);
    assert!(wait_for(Duration::from_secs(3), || unauthorized(&setup)
        .iter()
        .any(|u| u["addr"] == UNKNOWN
            && u["service"] == "smtp"
            && u["port"] == SMTP)));
}

#[test]
fn api_guard_on_arms_with_blocking_and_off_never_arms() {
    if !kernel_tests_enabled("api_guard_on_arms_with_blocking_and_off_never_arms") {
        return;
    }
    let pair = Pair::new();
    for a in [KNOWN, UNKNOWN] {
        pair.client_addr(a);
    }
    let _up = Upstream::start(&pair.server, UP);
    for (mode, unknown) in [("on", Connect::Silent), ("off", Connect::Ok)] {
        let setup = setup(&format!("api_guard = \"{mode}\"\nflood_threshold = 1"));
        let _d = setup.start(Some(&pair.server), &[]);
        setup.ctl_json(&["keys", "create", "--name", "k"]);
        setup.ctl_json(&["ips", "authorize", KNOWN]);
        assert_eq!(
            guard(&setup)["armed"],
            false,
            "{mode}: API blocking is learning"
        );
        setup.ctl_json(&["blocking", "api", "activate", "--force"]);
        assert_eq!(
            guard(&setup)["armed"],
            mode == "on",
            "{mode}: {}",
            guard(&setup)
        );
        // With `off`, a burst of connections (over a threshold of 1/s)
        // arms nothing either.
        for _ in 0..5 {
            let _ = connect(&pair.client, KNOWN, SERVER_V4, EDGE, T);
        }
        assert_eq!(
            connect(&pair.client, UNKNOWN, SERVER_V4, EDGE, T),
            unknown,
            "{mode}"
        );
        assert_eq!(
            connect(&pair.client, KNOWN, SERVER_V4, EDGE, T),
            Connect::Ok
        );
    }
}
