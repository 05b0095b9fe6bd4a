//! Two accounts on one edge, end to end with the kernel on: each account's
//! keys are judged by its own list, mode and denials, and the connection
//! hooks cut one account's live connection without touching another's
//! from the same address.

use std::time::Duration;

use allowlist_tests::{
    kernel_tests_enabled,
    net::{Pair, SERVER_V4, Upstream, curl},
    proc::Setup,
};

const EDGE: u16 = 8443;
const UP: u16 = 8080;
const A_SRC: &str = "198.51.100.80";
const B_SRC: &str = "198.51.100.81";

fn edge(pair: &Pair, src: &str, key: &str) -> u16 {
    curl(
        &pair.client,
        src,
        &format!("https://{SERVER_V4}:{EDGE}/v1/things"),
        &["-H", &format!("api-key: {key}")],
    )
    .status
}

/// A keep-alive TLS connection from `src`: one request, then (after
/// `pause` seconds, in which the test changes the policy) a second on the
/// same connection. Prints `r1 STATUS` and `r2 STATUS` or `r2 none`
/// (nothing came back: the kernel dropped the connection's packets) or
/// `r2 end` (closed).
fn keepalive(pair: &Pair, src: &str, key: &str, pause: f64) -> std::thread::JoinHandle<String> {
    let script = format!(
        r#"
import socket, ssl, time
s = socket.socket(); s.settimeout(3); s.bind(("{src}", 0)); s.connect(("{SERVER_V4}", {EDGE}))
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
ctx.set_alpn_protocols(["http/1.1"])
t = ctx.wrap_socket(s)
req = b"GET /v1/things HTTP/1.1\r\nhost: x\r\napi-key: {key}\r\n\r\n"
def one(tag):
    t.sendall(req)
    buf = b""
    while b"\r\n\r\n" not in buf or not buf.endswith(b"}}"):
        d = t.recv(65536)
        if not d:
            print(tag, "end"); return False
        buf += d
    print(tag, buf.split(b" ")[1].decode()); return True
one("r1")
time.sleep({pause})
try:
    one("r2")
except socket.timeout:
    print("r2 none")
except (ConnectionResetError, ssl.SSLError, OSError) as e:
    print("r2 end", type(e).__name__)
"#
    );
    let name = pair.client.name.clone();
    std::thread::spawn(move || {
        let out = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &name,
                "timeout",
                "15",
                "/usr/bin/python3",
                "-c",
                &script,
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    })
}

fn cut_account(setup: &Setup) -> u64 {
    setup.ctl_json(&["stats"])["kernel"]["conn_cut_account"]
        .as_u64()
        .unwrap_or(0)
}

#[test]
fn two_accounts_are_judged_and_cut_apart() {
    if !kernel_tests_enabled("two_accounts_are_judged_and_cut_apart") {
        return;
    }
    let pair = Pair::new();
    pair.client_addr(A_SRC);
    pair.client_addr(B_SRC);
    let _up = Upstream::start(&pair.server, UP);
    let setup = Setup::new(true, "");
    setup.proxy(&format!(
        "listen = \"0.0.0.0:{EDGE}\"\nupstream = \"http://127.0.0.1:{UP}\""
    ));
    // The userspace recheck is off (test builds only): what cuts here is
    // the kernel's account trie.
    let _d = setup.start_env(
        Some(&pair.server),
        &[],
        &[("ALLOWLIST_TEST_KERNEL_CUT_ONLY", "1")],
    );
    for name in ["acme", "beta"] {
        setup.ctl_json(&["accounts", "create", name]);
    }
    let key = |account: &str| {
        setup.ctl_json(&["--account", account, "keys", "create", "--name", "web"])["key"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let (a, b) = (key("acme"), key("beta"));
    // A: active with one address; B: learning (the default).
    setup.ctl_json(&[
        "--account",
        "acme",
        "ips",
        "authorize",
        &format!("{A_SRC}/32"),
    ]);
    setup.ctl_json(&[
        "--account",
        "acme",
        "blocking",
        "api",
        "activate",
        "--force",
    ]);

    // A's key is refused from outside A's list; B's key from the same
    // address is served and learned for B only.
    assert_eq!(edge(&pair, B_SRC, &a), 403);
    let served = curl(
        &pair.client,
        B_SRC,
        &format!("https://{SERVER_V4}:{EDGE}/v1/things"),
        &[
            "-H",
            &format!("api-key: {b}"),
            "-H",
            "x-allowlist-account: acme",
        ],
    );
    assert_eq!(served.status, 200);
    // The upstream is told whose key called, and nothing a client made up.
    assert_eq!(served.json()["headers"]["x-allowlist-account"], "beta");
    let learned = |account: &str| {
        setup.ctl_json(&["--account", account, "ips", "list"])["authorized"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["cidr"] == "198.51.100.0/24" && e["source"] == "learned")
    };
    assert!(
        allowlist_tests::net::wait_for(Duration::from_secs(3), || learned("beta")),
        "B learned its caller's /24"
    );
    assert!(!learned("acme"), "B's learning never admits anything for A");
    assert_eq!(edge(&pair, B_SRC, &a), 403, "still refused for A");
    // A's refusal is on A's unauthorized list only.
    let refused = |account: &str| {
        setup.ctl_json(&["--account", account, "ips", "unauthorized"])["unauthorized"]
            .as_array()
            .unwrap()
            .iter()
            .any(|u| u["addr"] == B_SRC)
    };
    assert!(allowlist_tests::net::wait_for(
        Duration::from_secs(3),
        || refused("acme")
    ));
    assert!(!refused("beta"));
    // A's deny does not touch B.
    setup.ctl_json(&["--account", "acme", "ips", "deny", B_SRC]);
    assert_eq!(edge(&pair, B_SRC, &b), 200);

    // Live connections from A_SRC with A's key and B's key: removing A's
    // entry cuts A's, in the kernel; B's stays up.
    let ca = keepalive(&pair, A_SRC, &a, 2.0);
    let cb = keepalive(&pair, A_SRC, &b, 2.0);
    std::thread::sleep(Duration::from_millis(800));
    let before = cut_account(&setup);
    setup.ctl_json(&["--account", "acme", "ips", "remove", &format!("{A_SRC}/32")]);
    let (oa, ob) = (ca.join().unwrap(), cb.join().unwrap());
    assert!(oa.contains("r1 200"), "{oa}");
    assert!(
        oa.contains("r2 none") || oa.contains("r2 end"),
        "A's connection was not cut: {oa}"
    );
    assert!(
        ob.contains("r1 200") && ob.contains("r2 200"),
        "B's connection must stay up: {ob}"
    );
    let after = cut_account(&setup);
    assert!(
        after > before,
        "the kernel counted no account cut ({before} -> {after})"
    );
}

#[test]
fn removing_an_account_revokes_its_keys_and_cuts_their_connections() {
    if !kernel_tests_enabled("removing_an_account_revokes_its_keys_and_cuts_their_connections") {
        return;
    }
    let pair = Pair::new();
    pair.client_addr(A_SRC);
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
    setup.ctl_json(&["accounts", "create", "gone"]);
    let key = setup.ctl_json(&["--account", "gone", "keys", "create", "--name", "w"])["key"]
        .as_str()
        .unwrap()
        .to_string();
    let stay = setup.ctl_json(&["keys", "create", "--name", "stays"])["key"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(edge(&pair, A_SRC, &key), 200);
    let c = keepalive(&pair, A_SRC, &key, 2.0);
    let s = keepalive(&pair, A_SRC, &stay, 2.0);
    std::thread::sleep(Duration::from_millis(800));
    setup.refused(&["accounts", "remove", "gone"], "--force");
    let before = setup.ctl_json(&["stats"])["kernel"]["conn_cut_revoked"]
        .as_u64()
        .unwrap_or(0);
    let removed = setup.ctl_json(&["accounts", "remove", "gone", "--force"]);
    assert_eq!(
        removed["keys_revoked"].as_array().unwrap().len(),
        1,
        "{removed}"
    );
    let (oc, os) = (c.join().unwrap(), s.join().unwrap());
    assert!(
        oc.contains("r1 200") && (oc.contains("r2 none") || oc.contains("r2 end")),
        "the removed account's connection was not cut: {oc}"
    );
    assert!(
        os.contains("r2 200"),
        "another account's connection stays: {os}"
    );
    let after = setup.ctl_json(&["stats"])["kernel"]["conn_cut_revoked"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        after > before,
        "the kernel counted no cut ({before} -> {after})"
    );
    assert_eq!(edge(&pair, A_SRC, &key), 401, "its key is gone");
    setup.refused(&["--account", "gone", "keys", "list"], "no account");
}
