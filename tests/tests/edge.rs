//! The TLS edge against real clients (curl over HTTP/1.1 and HTTP/2,
//! Python's ssl for PROXY protocol v2), from several source addresses in a
//! namespace, with a real upstream behind it.

use std::time::Duration;

use allowlist_tests::{
    net::{Pair, SERVER_V4, SERVER_V4_B, Upstream, curl, python, wait_for},
    proc::Setup,
};

const EDGE: u16 = 8443;
const UP: u16 = 8080;
const TRUSTED: &str = "198.51.100.70";

fn edge_setup(extra_proxy: &str) -> Setup {
    let s = Setup::new(false, "");
    s.proxy(&format!(
            "listen = \"0.0.0.0:{EDGE}\"\nupstream = \"http://127.0.0.1:{UP}\"\ntrusted_proxies = [\"{TRUSTED}/32\"]\n{extra_proxy}"
        ));
    s
}

fn url(host: &str, path: &str) -> String {
    format!("https://{host}:{EDGE}{path}")
}

fn key(setup: &Setup, args: &[&str]) -> (String, String) {
    let mut full = vec!["keys", "create", "--name", "t"];
    full.extend_from_slice(args);
    let v = setup.ctl_json(&full);
    (
        v["id"].as_str().unwrap().into(),
        v["key"].as_str().unwrap().into(),
    )
}

#[test]
fn every_check_in_the_spec_order_over_http1_and_http2() {
    if !allowlist_tests::kernel_tests_enabled("every_check_in_the_spec_order_over_http1_and_http2")
    {
        return;
    }
    let pair = Pair::new();
    for a in ["198.51.100.50", "198.51.100.51", "203.0.113.60", TRUSTED] {
        pair.client_addr(a);
    }
    let _up = Upstream::start(&pair.server, UP);
    let setup = edge_setup("");
    let d = setup.start(Some(&pair.server), &["--no-kernel"]);
    let c = &pair.client;
    let (k1_id, k1) = key(
        &setup,
        &["--allow", "198.51.100.50", "--allow", "203.0.113.77"],
    );
    let (_, k_read) = key(&setup, &["--scope", "read", "--allow", "198.51.100.0/24"]);
    let (_, k_rate) = key(&setup, &["--rate", "2/minute"]);
    let h = |k: &str| format!("api-key: {k}");

    // 401: no key, an unknown key, a wrong secret — whatever the address.
    let r = curl(c, "198.51.100.50", &url(SERVER_V4, "/emails"), &[]);
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"]["code"], "unauthorized");
    // The same key with its last secret digit changed (always to another one).
    let last = if k1.ends_with('0') { '1' } else { '0' };
    let bad = format!("{}{last}", &k1[..k1.len() - 1]);
    for src in ["198.51.100.50", "198.51.100.51"] {
        let r = curl(c, src, &url(SERVER_V4, "/emails"), &["-H", &h(&bad)]);
        assert_eq!(
            (r.status, r.json()["error"]["code"].as_str()),
            (401, Some("unauthorized")),
            "from {src}"
        );
    }
    // 403 permission_denied: a read key may not POST.
    let r = curl(
        c,
        "198.51.100.50",
        &url(SERVER_V4, "/emails"),
        &["-X", "POST", "-H", &h(&k_read)],
    );
    assert_eq!(
        (r.status, r.json()["error"]["code"].as_str()),
        (403, Some("permission_denied"))
    );
    // 403 IP_NOT_ALLOWED, the exact body of SPEC.md.
    let r = curl(
        c,
        "198.51.100.51",
        &url(SERVER_V4, "/emails"),
        &["-H", &h(&k1)],
    );
    assert_eq!(r.status, 403);
    assert_eq!(
        r.body,
        r#"{"error":{"code":"IP_NOT_ALLOWED","message":"Request IP address is not in the API key's allowlist"}}"#
    );
    // Allowed, HTTP/1.1: forwarded unchanged, the key header stripped.
    let r = curl(
        c,
        "198.51.100.50",
        &url(SERVER_V4, "/emails?x=1"),
        &["--http1.1", "-H", &h(&k1), "-H", "x-custom: 7"],
    );
    assert_eq!((r.status, r.http_version.as_str()), (200, "1.1"), "{r:?}");
    let seen = r.json();
    assert_eq!(seen["path"], "/emails?x=1");
    assert_eq!(seen["headers"]["x-custom"], "7");
    assert!(
        seen["headers"].get("api-key").is_none(),
        "the key reached the upstream"
    );
    // Allowed, HTTP/2 with Authorization: Bearer (stripped too).
    let r = curl(
        c,
        "198.51.100.50",
        &url(SERVER_V4, "/emails"),
        &["--http2", "-H", &format!("Authorization: Bearer {k1}")],
    );
    assert_eq!((r.status, r.http_version.as_str()), (200, "2"), "{r:?}");
    assert!(r.json()["headers"].get("authorization").is_none());

    // 429 with Retry-After; X-RateLimit-* on every keyed response.
    for left in ["1", "0"] {
        let r = curl(
            c,
            "198.51.100.51",
            &url(SERVER_V4, "/x"),
            &["-H", &h(&k_rate)],
        );
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-ratelimit-limit"), Some("2"));
        assert_eq!(r.header("x-ratelimit-remaining"), Some(left));
        assert!(
            r.header("x-ratelimit-reset")
                .unwrap()
                .parse::<i64>()
                .unwrap()
                > 1_700_000_000
        );
    }
    let r = curl(
        c,
        "198.51.100.51",
        &url(SERVER_V4, "/x"),
        &["-H", &h(&k_rate)],
    );
    assert_eq!(
        (r.status, r.json()["error"]["code"].as_str()),
        (429, Some("too_many_requests"))
    );
    assert!(r.header("retry-after").unwrap().parse::<u64>().unwrap() >= 1);
    assert_eq!(r.header("x-ratelimit-remaining"), Some("0"));

    // Learning: the callers' /24s were authorized, labelled with the key.
    assert!(wait_for(Duration::from_secs(3), || {
        let v = setup.ctl_json(&["ips", "list"]);
        v["authorized"].as_array().unwrap().iter().any(|a| {
            a["cidr"] == "198.51.100.0/24"
                && a["source"] == "learned"
                && a["key_id"] == k1_id.as_str()
        })
    }));

    // Blocking active: an address outside the authorized list is refused
    // and recorded.
    setup.ctl_json(&["blocking", "api", "activate", "--force"]);
    let (_, k_open) = key(&setup, &[]);
    let r = curl(
        c,
        "203.0.113.60",
        &url(SERVER_V4_B, "/emails"),
        &["-H", &h(&k_open)],
    );
    assert_eq!(
        (r.status, r.json()["error"]["code"].as_str()),
        (403, Some("IP_NOT_ALLOWED"))
    );
    assert!(wait_for(Duration::from_secs(3), || {
        setup.ctl_json(&["ips", "unauthorized"])["unauthorized"]
            .as_array()
            .unwrap()
            .iter()
            .any(|u| u["addr"] == "203.0.113.60" && u["attempts"] == 1)
    }));
    let r = curl(
        c,
        "198.51.100.51",
        &url(SERVER_V4, "/emails"),
        &["-H", &h(&k_open)],
    );
    assert_eq!(r.status, 200, "a learned network passes");

    // X-Forwarded-For counts from a trusted proxy only (rightmost untrusted hop).
    setup.ctl_json(&["ips", "authorize", "203.0.113.0/24"]);
    let r = curl(
        c,
        TRUSTED,
        &url(SERVER_V4, "/"),
        &[
            "-H",
            &h(&k1),
            "-H",
            "X-Forwarded-For: 192.0.2.1, 203.0.113.77",
        ],
    );
    assert_eq!(r.status, 200, "client taken from X-Forwarded-For");
    let r = curl(
        c,
        "198.51.100.51",
        &url(SERVER_V4, "/"),
        &["-H", &h(&k1), "-H", "X-Forwarded-For: 198.51.100.50"],
    );
    assert_eq!(
        r.status, 403,
        "X-Forwarded-For from an untrusted peer is ignored"
    );

    // PROXY protocol v2: sets the client address from a trusted peer; from
    // an untrusted peer the bytes are not TLS and the connection fails.
    let proxied = |src: &str, claimed: &str| -> String {
        let script = format!(
            r#"
import socket, ssl, struct, ipaddress
s = socket.socket(); s.settimeout(5); s.bind(("{src}", 0)); s.connect(("{SERVER_V4}", {EDGE}))
body = ipaddress.IPv4Address("{claimed}").packed + ipaddress.IPv4Address("{SERVER_V4}").packed + struct.pack("!HH", 40000, {EDGE})
s.sendall(b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x11]) + struct.pack("!H", len(body)) + body)
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
try:
    t = ctx.wrap_socket(s)
    t.sendall(b"GET / HTTP/1.1\r\nhost: x\r\napi-key: {k1}\r\nconnection: close\r\n\r\n")
    print(t.recv(100).split(b"\r\n")[0].decode())
except Exception as e:
    print("failed", type(e).__name__)
"#
        );
        let out = std::process::Command::new("ip")
            .args([
                "netns", "exec", &c.name, "timeout", "10", "python3", "-c", &script,
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(proxied(TRUSTED, "203.0.113.77"), "HTTP/1.1 200 OK");
    assert_eq!(
        proxied(TRUSTED, "203.0.113.78"),
        "HTTP/1.1 403 Forbidden",
        "k1 does not allow .78"
    );
    assert!(
        proxied("198.51.100.50", "203.0.113.77").starts_with("failed"),
        "PROXY from an untrusted peer"
    );

    // The same checks from a Rust client (hyper over rustls), both protocols.
    let dst: std::net::SocketAddr = format!("{SERVER_V4}:{EDGE}").parse().unwrap();
    for alpn in [&["h2"][..], &["http/1.1"][..]] {
        let r = allowlist_tests::client::get(c, "198.51.100.50", dst, "/emails", Some(&k1), alpn);
        assert_eq!((r.status, r.alpn.as_str()), (200, alpn[0]), "{r:?}");
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&r.body).unwrap()["path"],
            "/emails"
        );
        let r = allowlist_tests::client::get(c, "198.51.100.51", dst, "/emails", Some(&k1), alpn);
        assert_eq!(r.status, 403, "{r:?}");
        assert!(r.body.contains("IP_NOT_ALLOWED"));
        let r = allowlist_tests::client::get(c, "198.51.100.51", dst, "/emails", None, alpn);
        assert_eq!(r.status, 401);
    }

    // No secret in the log.
    let secret = k1.rsplit('_').next().unwrap();
    assert!(!d.log_text().contains(secret));
}

#[test]
fn rotation_grace_ends_on_time() {
    if !allowlist_tests::kernel_tests_enabled("rotation_grace_ends_on_time") {
        return;
    }
    let pair = Pair::new();
    pair.client_addr("198.51.100.50");
    let _up = Upstream::start(&pair.server, UP);
    let setup = edge_setup("");
    let offset = setup.dir.path().join("clock");
    std::fs::write(&offset, "0").unwrap();
    let _d = setup.start_env(
        Some(&pair.server),
        &["--no-kernel"],
        &[("ALLOWLIST_CLOCK_OFFSET_FILE", offset.to_str().unwrap())],
    );
    let c = &pair.client;
    let (id, old) = key(&setup, &[]);
    let new = setup.ctl_json(&["keys", "rotate", &id, "--grace", "1h"])["key"]
        .as_str()
        .unwrap()
        .to_string();
    let get = |k: &str| {
        curl(
            c,
            "198.51.100.50",
            &url(SERVER_V4, "/"),
            &["-H", &format!("api-key: {k}")],
        )
        .status
    };
    assert_eq!(
        (get(&old), get(&new)),
        (200, 200),
        "both work during the grace period"
    );
    std::fs::write(&offset, "3601").unwrap();
    assert_eq!(
        (get(&old), get(&new)),
        (401, 200),
        "the old secret stops after the grace period"
    );
}

#[test]
fn slow_and_oversized_requests_are_refused_without_harming_others() {
    if !allowlist_tests::kernel_tests_enabled(
        "slow_and_oversized_requests_are_refused_without_harming_others",
    ) {
        return;
    }
    let pair = Pair::new();
    pair.client_addr("198.51.100.50");
    let _up = Upstream::start(&pair.server, UP);
    let setup = edge_setup("header_timeout_secs = 2");
    let _d = setup.start(Some(&pair.server), &["--no-kernel"]);
    let c = &pair.client;
    let (_, k) = key(&setup, &[]);
    // Slowloris: a TLS client that sends a header line every second and
    // never finishes; the edge closes it after the header timeout, and a
    // normal client is served meanwhile.
    let script = format!(
        r#"
import socket, ssl, time
s = socket.create_connection(("{SERVER_V4}", {EDGE}), timeout=10)
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
ctx.set_alpn_protocols(["http/1.1"])
t = ctx.wrap_socket(s)
t.sendall(b"GET / HTTP/1.1\r\nhost: x\r\n")
start = time.time()
try:
    for i in range(8):
        time.sleep(1)
        t.sendall(b"x-slow-%d: 1\r\n" % i)
    data = t.recv(100)
    print("closed" if not data else data.split(b"\r\n")[0].decode(), round(time.time() - start))
except Exception as e:
    print("closed", round(time.time() - start))
"#
    );
    let slow = {
        let name = c.name.clone();
        std::thread::spawn(move || {
            let out = std::process::Command::new("ip")
                .args([
                    "netns", "exec", &name, "timeout", "20", "python3", "-c", &script,
                ])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let r = curl(
        c,
        "198.51.100.50",
        &url(SERVER_V4, "/"),
        &["-H", &format!("api-key: {k}")],
    );
    assert_eq!(
        r.status, 200,
        "others are served while a slow client holds a connection"
    );
    let verdict = slow.join().unwrap();
    let secs: u64 = verdict.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(
        verdict.starts_with("closed") || verdict.contains("408"),
        "{verdict}"
    );
    assert!(
        secs <= 5,
        "the slow client was cut after the 2 s header timeout, not left open: {verdict}"
    );

    // Oversized headers: refused (431 or the connection closed), others fine.
    let big = format!("x-big: {}", "a".repeat(100 * 1024));
    let r = curl(
        c,
        "198.51.100.50",
        &url(SERVER_V4, "/"),
        &["--http1.1", "-H", &format!("api-key: {k}"), "-H", &big],
    );
    assert!(
        r.status == 431 || r.status == 0 || r.status == 400,
        "{:?}",
        r.status
    );
    let r = curl(
        c,
        "198.51.100.50",
        &url(SERVER_V4, "/"),
        &["-H", &format!("api-key: {k}")],
    );
    assert_eq!(r.status, 200);
}

/// A keep-alive upstream in `ns` that counts its connections. Paths
/// starting with `/once` are answered and then the connection is closed
/// 100 ms later without notice, as an upstream's idle timeout does.
fn keepalive_upstream(
    pair: &Pair,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<()> {
    use std::{
        io::{Read, Write},
        sync::atomic::Ordering,
    };
    let (tx, rx) = std::sync::mpsc::channel();
    let h = pair.server.spawn(move || {
        let l = std::net::TcpListener::bind(("127.0.0.1", UP)).expect("bind upstream");
        l.set_nonblocking(true).unwrap();
        tx.send(()).unwrap();
        let until = std::time::Instant::now() + Duration::from_secs(60);
        while !stop.load(Ordering::Relaxed) && std::time::Instant::now() < until {
            let Ok((mut s, _)) = l.accept() else {
                std::thread::sleep(Duration::from_millis(2));
                continue;
            };
            accepted.fetch_add(1, Ordering::Relaxed);
            std::thread::spawn(move || {
                let _ = s.set_nonblocking(false);
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                for _ in 0..100 {
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut chunk) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let once = buf.starts_with(b"GET /once");
                    let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                    buf.drain(..end);
                    if s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n")
                        .is_err()
                    {
                        return;
                    }
                    if once {
                        std::thread::sleep(Duration::from_millis(100));
                        return;
                    }
                }
            });
        }
    });
    rx.recv_timeout(Duration::from_secs(5))
        .expect("upstream started");
    h
}

#[test]
fn upstream_failures_and_keepalive_reuse() {
    use std::sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    };
    if !allowlist_tests::kernel_tests_enabled("upstream_failures_and_keepalive_reuse") {
        return;
    }
    let pair = Pair::new();
    pair.client_addr("198.51.100.50");
    let setup = edge_setup("");
    let _d = setup.start(Some(&pair.server), &["--no-kernel"]);
    let (_, k) = key(&setup, &["--allow", "198.51.100.50"]);
    let h = format!("api-key: {k}");
    let get = |path: &str| {
        curl(
            &pair.client,
            "198.51.100.50",
            &url(SERVER_V4, path),
            &["-H", &h],
        )
    };

    // Nothing listens upstream: a 502 in the one error shape.
    let r = get("/x");
    assert_eq!(
        (r.status, r.json()["error"]["code"].as_str()),
        (502, Some("bad_gateway")),
        "{}",
        r.body
    );

    let accepted = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let up = keepalive_upstream(&pair, accepted.clone(), stop.clone());
    // Six requests on one client connection (so on one edge worker) reuse
    // one pooled upstream connection: exactly one is opened.
    let script = format!(
        r#"
import httpx
t = httpx.HTTPTransport(local_address="198.51.100.50", verify=False)
with httpx.Client(transport=t, timeout=10) as cl:
    print(" ".join(cl.get("{u}/keep/%d" % i, headers={{"api-key": "{k}"}}).text.strip() for i in range(6)))
"#,
        u = url(SERVER_V4, "")
    );
    let out = python(&pair.client, 30, &script);
    assert_eq!(out, "ok ok ok ok ok ok");
    let reused = accepted.load(Ordering::Relaxed);
    assert_eq!(
        reused, 1,
        "6 requests on one connection opened {reused} upstream connections"
    );
    // The upstream closes each connection after one answer, while it sits
    // idle in the pool: every next request still gets through.
    for i in 0..4 {
        let r = get(&format!("/once/{i}"));
        assert_eq!((r.status, r.body.as_str()), (200, "ok\n"), "request {i}");
        std::thread::sleep(Duration::from_millis(250));
    }
    stop.store(true, Ordering::Relaxed);
    let _ = up.join();
}
