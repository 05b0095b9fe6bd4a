//! The edge against a client that tries to get past it: forged forwarding
//! headers, paths that climb out of a scope, probing of key ids, denied
//! addresses, bodies on refused HTTP/2 requests, and connections held open
//! for free. Real clients: curl (HTTP/1.1 and HTTP/2), nghttp, Python httpx
//! and raw HTTP/2 frames (Debian's python3-h2 / hyperframe).

use std::time::Duration;

use allowlist_tests::{
    net::{Pair, Reply, SERVER_V4, Upstream, curl, python, wait_for},
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

/// A client and a server namespace, an echoing upstream and a daemon (no
/// kernel) with the edge in front of it; the client has `addrs`.
struct Env {
    pair: Pair,
    setup: Setup,
    _up: Upstream,
    _d: allowlist_tests::proc::Daemon,
}

impl Env {
    fn start(addrs: &[&str], extra_proxy: &str) -> Env {
        let pair = Pair::new();
        for a in addrs {
            pair.client_addr(a);
        }
        let up = Upstream::start(&pair.server, UP);
        let setup = edge_setup(extra_proxy);
        let d = setup.start(Some(&pair.server), &["--no-kernel"]);
        Env {
            pair,
            setup,
            _up: up,
            _d: d,
        }
    }
}

fn url(path: &str) -> String {
    format!("https://{SERVER_V4}:{EDGE}{path}")
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

fn code(r: &Reply) -> (u16, String) {
    let c = serde_json::from_str::<serde_json::Value>(&r.body)
        .ok()
        .and_then(|v| v["error"]["code"].as_str().map(str::to_string))
        .unwrap_or_default();
    (r.status, c)
}

#[test]
fn forwarded_for_never_falls_back_to_the_proxy_and_upstream_hears_the_truth() {
    if !allowlist_tests::kernel_tests_enabled(
        "forwarded_for_never_falls_back_to_the_proxy_and_upstream_hears_the_truth",
    ) {
        return;
    }
    let env = Env::start(&["198.51.100.50", TRUSTED], "");
    let (pair, setup) = (&env.pair, &env.setup);
    let c = &pair.client;
    let (kid, k) = key(setup, &[]);
    let h = format!("api-key: {k}");

    // From the trusted balancer: an unparsable needed hop, or no client at
    // all, is a 400 — never the balancer's own address.
    for xff in [Some("x"), Some("203.0.113.7, unknown"), Some(" , "), None] {
        let mut args = vec!["-H", h.as_str()];
        let line;
        if let Some(x) = xff {
            line = format!("X-Forwarded-For: {x}");
            args.extend(["-H", line.as_str()]);
        }
        let r = curl(c, TRUSTED, &url("/"), &args);
        assert_eq!(
            code(&r),
            (400, "bad_request".into()),
            "XFF {xff:?}: {}",
            r.body
        );
    }
    // What real balancers send, and junk left of the client that is never
    // read. The upstream is told the verified client and nothing else.
    for (xff, client) in [
        ("garbage, 203.0.113.7", "203.0.113.7"),
        ("203.0.113.8:5000", "203.0.113.8"),
        ("[2001:db8::1]:443", "2001:db8::1"),
        ("6.6.6.6,  192.0.2.9 ", "192.0.2.9"),
    ] {
        let r = curl(
            c,
            TRUSTED,
            &url("/"),
            &[
                "-H",
                &h,
                "-H",
                &format!("X-Forwarded-For: {xff}"),
                "-H",
                "X-Real-IP: 6.6.6.6",
            ],
        );
        assert_eq!(r.status, 200, "XFF {xff}: {}", r.body);
        let seen = &r.json()["headers"];
        assert_eq!(seen["x-forwarded-for"], client, "{seen}");
        assert_eq!(seen["x-real-ip"], client, "{seen}");
    }
    // A PROXY v2 LOCAL header names no client: X-Forwarded-For, which
    // behind an L4 balancer is the client's own header, does not stand in.
    let script = format!(
        r#"
import socket, ssl
s = socket.socket(); s.settimeout(5); s.bind(("{TRUSTED}", 0)); s.connect(("{SERVER_V4}", {EDGE}))
s.sendall(b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x20, 0x00, 0x00, 0x00]))
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
t = ctx.wrap_socket(s)
t.sendall(b"GET / HTTP/1.1\r\nhost: x\r\napi-key: {k}\r\nx-forwarded-for: 203.0.113.7\r\nconnection: close\r\n\r\n")
print(t.recv(100).split(b"\r\n")[0].decode())
"#
    );
    assert_eq!(python(c, 10, &script), "HTTP/1.1 400 Bad Request");

    // Learning learned the clients' networks, never the balancer's.
    assert!(wait_for(Duration::from_secs(3), || {
        let v = setup.ctl_json(&["ips", "list"]);
        let nets: Vec<String> = v["authorized"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["cidr"].as_str().unwrap().to_string())
            .collect();
        nets.contains(&"203.0.113.0/24".to_string()) && nets.contains(&"2001:db8::/64".to_string())
    }));
    let v = setup.ctl_json(&["ips", "list"]);
    assert!(
        !v["authorized"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["cidr"] == "198.51.100.0/24"),
        "the balancer's /24 was learned: {v}"
    );

    // A direct client's forged forwarding and identity headers are
    // replaced; Host is passed on (HTTP/1.1 header, HTTP/2 :authority).
    let r = curl(
        c,
        "198.51.100.50",
        &url("/x"),
        &[
            "--http1.1",
            "-H",
            &h,
            "-H",
            "X-Forwarded-For: 6.6.6.6",
            "-H",
            "Forwarded: for=6.6.6.6",
            "-H",
            "X-Real-IP: 6.6.6.6",
            "-H",
            "X-Allowlist-Key-Id: someone-else",
            "-H",
            "X-Allowlist-Account: other",
            "-H",
            "Host: api.example",
        ],
    );
    assert_eq!(r.status, 200);
    let seen = &r.json()["headers"];
    assert_eq!(seen["x-forwarded-for"], "198.51.100.50", "{seen}");
    assert_eq!(seen["x-real-ip"], "198.51.100.50");
    assert_eq!(seen["x-forwarded-proto"], "https");
    assert_eq!(seen["x-allowlist-key-id"], kid.as_str());
    assert_eq!(seen["x-allowlist-account"], "default");
    assert!(seen.get("forwarded").is_none(), "{seen}");
    assert_eq!(seen["host"], "api.example");
    let r = curl(c, "198.51.100.50", &url("/x"), &["--http2", "-H", &h]);
    assert_eq!((r.status, r.http_version.as_str()), (200, "2"));
    assert_eq!(r.json()["headers"]["host"], format!("{SERVER_V4}:{EDGE}"));
}

#[test]
fn scope_is_decided_on_the_normalized_path_that_is_forwarded() {
    if !allowlist_tests::kernel_tests_enabled(
        "scope_is_decided_on_the_normalized_path_that_is_forwarded",
    ) {
        return;
    }
    let env = Env::start(&["198.51.100.50"], "");
    let (pair, setup) = (&env.pair, &env.setup);
    let (_, send) = key(setup, &["--scope", "send"]);
    let post = |path: &str| {
        curl(
            &pair.client,
            "198.51.100.50",
            &url(path),
            &[
                "--path-as-is",
                "-X",
                "POST",
                "-H",
                &format!("api-key: {send}"),
            ],
        )
    };
    for p in [
        "/emails/../admin",
        "/emails/%2e%2e/admin",
        "/emails/.%2E/admin",
        "//admin",
    ] {
        assert_eq!(code(&post(p)), (403, "permission_denied".into()), "{p}");
    }
    for p in [
        "/emails/..%2Fadmin",
        "/emails%2f..%2fadmin",
        "/emails%5C..%5Cadmin",
        "/emails/..\\admin",
        "/emails/..;/admin",
        "/emails/../../admin",
        "/emails/%00",
    ] {
        assert_eq!(code(&post(p)), (400, "bad_request".into()), "{p}");
    }
    // Allowed requests reach the upstream on the path that was checked.
    for (p, forwarded) in [
        ("//emails", "/emails"),
        ("/emails/./x", "/emails/x"),
        ("/emails/a/../b?q=%2F..", "/emails/b?q=%2F.."),
        ("/%65mails", "/emails"),
    ] {
        let r = post(p);
        assert_eq!(r.status, 200, "{p}: {}", r.body);
        assert_eq!(r.json()["path"], forwarded, "{p}");
    }
}

#[test]
fn a_401_tells_nothing_and_denied_addresses_stay_denied() {
    if !allowlist_tests::kernel_tests_enabled(
        "a_401_tells_nothing_and_denied_addresses_stay_denied",
    ) {
        return;
    }
    let env = Env::start(&["198.51.100.50", "198.51.100.51", "198.51.100.52"], "");
    let (pair, setup) = (&env.pair, &env.setup);
    let c = &pair.client;
    let get = |src: &str, k: &str| curl(c, src, &url("/"), &["-H", &format!("api-key: {k}")]);

    // Wrong secrets of a live, a rate-limited, a revoked and an unknown key:
    // one body, no rate headers.
    let (_, live) = key(setup, &[]);
    let (_, limited) = key(setup, &["--rate", "5/minute"]);
    let (revoked_id, revoked) = key(setup, &[]);
    setup.ctl_json(&["keys", "revoke", &revoked_id]);
    let wrong = |k: &str| {
        format!(
            "{}{}",
            &k[..k.len() - 1],
            if k.ends_with('0') { '1' } else { '0' }
        )
    };
    let bodies: Vec<(u16, String, Option<String>)> = [
        wrong(&live),
        wrong(&limited),
        wrong(&revoked),
        revoked.clone(),
        "alk_0123456789abcdef_00".to_string(),
    ]
    .iter()
    .map(|k| {
        let r = get("198.51.100.50", k);
        (
            r.status,
            r.body.clone(),
            r.header("x-ratelimit-limit").map(String::from),
        )
    })
    .collect();
    for b in &bodies {
        assert_eq!(b, &bodies[0], "every 401 alike");
    }
    assert_eq!((bodies[0].0, &bodies[0].2), (401, &None));

    // Deny: inside a learned /24, a denied address stays refused; a later
    // learned range does not re-admit it; an explicit authorization does.
    let (_, narrow) = key(setup, &["--allow", "198.51.100.50"]);
    assert_eq!(get("198.51.100.50", &live).status, 200);
    assert!(wait_for(Duration::from_secs(3), || {
        setup.ctl_json(&["ips", "list"])["authorized"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["cidr"] == "198.51.100.0/24")
    }));
    assert_eq!(get("198.51.100.51", &live).status, 200);
    assert_eq!(get("198.51.100.51", &narrow).status, 403);
    assert!(wait_for(Duration::from_secs(3), || {
        setup.ctl_json(&["ips", "unauthorized"])["unauthorized"]
            .as_array()
            .unwrap()
            .iter()
            .any(|u| u["addr"] == "198.51.100.51")
    }));
    let out = setup.ctl_json(&["ips", "deny", "198.51.100.51", "--rotate-key"]);
    let new_narrow = out["rotated"][0]["key"].as_str().unwrap().to_string();
    assert_eq!(
        code(&get("198.51.100.51", &live)),
        (403, "IP_NOT_ALLOWED".into())
    );
    assert_eq!(
        get("198.51.100.52", &live).status,
        200,
        "only .51 is denied"
    );
    // The presumed-stolen secret stopped at once; the new one works.
    assert_eq!(get("198.51.100.50", &narrow).status, 401);
    assert_eq!(get("198.51.100.50", &new_narrow).status, 200);
    // Relearning the range does not lift the denial.
    setup.ctl_json(&["ips", "remove", "198.51.100.0/24"]);
    assert_eq!(get("198.51.100.52", &live).status, 200);
    assert!(wait_for(Duration::from_secs(3), || {
        setup.ctl_json(&["ips", "list"])["authorized"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["cidr"] == "198.51.100.0/24")
    }));
    assert_eq!(
        get("198.51.100.51", &live).status,
        403,
        "a learned range re-admitted a denied address"
    );
    setup.ctl_json(&["ips", "authorize", "198.51.100.51"]);
    assert_eq!(
        get("198.51.100.51", &live).status,
        200,
        "explicit authorization lifts it"
    );
}

#[test]
fn refusals_with_a_body_reach_every_http2_client() {
    if !allowlist_tests::kernel_tests_enabled("refusals_with_a_body_reach_every_http2_client") {
        return;
    }
    let env = Env::start(&["198.51.100.50"], "");
    let (pair, setup) = (&env.pair, &env.setup);
    let c = &pair.client;
    let (_, read) = key(setup, &["--scope", "read"]);
    let h = format!("api-key: {read}");
    // curl 7.88 loses the status about half the time when the stream ends
    // before its body is sent: 40 tries catch that with near certainty.
    for i in 0..40 {
        let r = curl(
            c,
            "198.51.100.50",
            &url("/emails"),
            &["--http2", "-X", "POST", "-H", &h, "-d", "x"],
        );
        assert_eq!(
            code(&r),
            (403, "permission_denied".into()),
            "curl try {i}: {r:?}"
        );
        let r = curl(
            c,
            "198.51.100.50",
            &url("/emails"),
            &["--http1.1", "-X", "POST", "-H", &h, "-d", "x"],
        );
        assert_eq!(r.status, 403, "curl HTTP/1.1 try {i}");
    }
    // nghttp (nghttp2's client), uploading a body.
    let body = setup.dir.path().join("body");
    std::fs::write(&body, vec![b'x'; 20_000]).unwrap();
    for i in 0..10 {
        let out = std::process::Command::new("ip")
            .args([
                "netns", "exec", &c.name, "timeout", "10", "nghttp", "-v", "-d",
            ])
            .arg(&body)
            .args(["-H", &h, &url("/emails")])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(":status: 403"), "nghttp try {i}: {text}");
    }
    // Python httpx over HTTP/2.
    let script = format!(
        r#"
import httpx
ok = 0
with httpx.Client(http2=True, verify=False, timeout=10) as cl:
    for i in range(20):
        r = cl.post("{u}", headers={{"api-key": "{read}"}}, content=b"x" * 5000)
        assert r.http_version == "HTTP/2", r.http_version
        ok += r.status_code == 403
print(ok)
"#,
        u = url("/emails")
    );
    assert_eq!(python(c, 60, &script), "20");
}

#[test]
fn idle_connections_are_closed_and_cannot_exhaust_the_edge() {
    if !allowlist_tests::kernel_tests_enabled(
        "idle_connections_are_closed_and_cannot_exhaust_the_edge",
    ) {
        return;
    }
    let env = Env::start(
        &["198.51.100.50"],
        "header_timeout_secs = 2\nidle_timeout_secs = 3\nmax_connections = 20",
    );
    let (pair, setup) = (&env.pair, &env.setup);
    let c = &pair.client;
    let (_, k) = key(setup, &[]);

    // 20 connections (the cap) that finish TLS and then send nothing, half
    // HTTP/1.1, half HTTP/2 with the preface and SETTINGS; then one that
    // makes a request and idles. Each prints how long until the edge closed it.
    let script = format!(
        r#"
import socket, ssl, time, threading
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
def conn(alpn):
    c = ssl.create_default_context(); c.check_hostname = False; c.verify_mode = ssl.CERT_NONE
    c.set_alpn_protocols([alpn])
    s = socket.create_connection(("{SERVER_V4}", {EDGE}), timeout=15)
    return c.wrap_socket(s)
socks = []
for i in range(20):
    t = conn("h2" if i % 2 else "http/1.1")
    if i % 2:
        t.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0,0,0,4,0,0,0,0,0]))
    socks.append(t)
start = time.time()
# The cap is full: a 21st connection is refused at once.
try:
    extra = conn("http/1.1")
    extra.sendall(b"GET / HTTP/1.1\r\nhost: x\r\napi-key: {k}\r\n\r\n")
    full = "served" if extra.recv(20) else "closed"
except Exception:
    full = "closed"
times = []
def wait(t):
    try:
        while t.recv(4096):
            pass
    except Exception:
        pass
    times.append(time.time() - start)
th = [threading.Thread(target=wait, args=(t,)) for t in socks]
for x in th: x.start()
for x in th: x.join(20)
# Freed: a keep-alive request works, then idles and is closed after ~3 s.
t = conn("http/1.1")
t.sendall(b"GET / HTTP/1.1\r\nhost: x\r\napi-key: {k}\r\n\r\n")
first = t.recv(100).split(b"\r\n")[0].decode()
t0 = time.time()
try:
    while t.recv(4096):
        pass
except Exception:
    pass
print(full, len(times), round(max(times), 1), first, round(time.time() - t0, 1))
"#
    );
    let out = python(c, 60, &script);
    let f: Vec<&str> = out.split_whitespace().collect();
    assert_eq!(f.len(), 7, "{out}");
    assert_eq!(f[0], "closed", "the 21st connection over the cap: {out}");
    assert_eq!(f[1], "20", "{out}");
    let first_closed: f64 = f[2].parse().unwrap();
    assert!(
        first_closed <= 5.0,
        "idle connections closed after the 2 s header timeout: {out}"
    );
    assert_eq!(
        format!("{} {} {}", f[3], f[4], f[5]),
        "HTTP/1.1 200 OK",
        "{out}"
    );
    // HTTP/1.1 waits for a next request no longer than the header timeout
    // (hyper's header timer) nor the idle timeout, whichever ends first.
    let idle: f64 = f[6].parse().unwrap();
    assert!(
        (1.5..=6.0).contains(&idle),
        "keep-alive idle closed after 2-3 s: {out}"
    );
}

#[test]
fn http2_rapid_reset_and_continuation_floods_are_bounded() {
    if !allowlist_tests::kernel_tests_enabled(
        "http2_rapid_reset_and_continuation_floods_are_bounded",
    ) {
        return;
    }
    let env = Env::start(&["198.51.100.50"], "");
    let (pair, setup) = (&env.pair, &env.setup);
    let c = &pair.client;
    let (_, k) = key(setup, &[]);
    // Raw frames: rapid reset opens and cancels 5000 streams; the
    // CONTINUATION flood sends a header block that never ends. Each prints
    // what ended the connection and how many bytes it sent first.
    let script = format!(
        r#"
import socket, ssl, time
from hyperframe.frame import HeadersFrame, ContinuationFrame, RstStreamFrame, SettingsFrame, GoAwayFrame, Frame
import hpack
def conn():
    c = ssl.create_default_context(); c.check_hostname = False; c.verify_mode = ssl.CERT_NONE
    c.set_alpn_protocols(["h2"])
    t = c.wrap_socket(socket.create_connection(("{SERVER_V4}", {EDGE}), timeout=10))
    t.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + SettingsFrame(0).serialize())
    return t
enc = hpack.Encoder()
block = enc.encode([(":method", "GET"), (":scheme", "https"), (":path", "/"), (":authority", "x"), ("api-key", "{k}")])
def outcome(t, sent):
    end = "open"
    try:
        t.settimeout(5)
        buf = b""
        while True:
            d = t.recv(65536)
            if not d:
                end = "closed"; break
            buf += d
            if b"\x07\x00\x00\x00\x00\x00" in buf or any(True for _ in []):
                pass
            # A GOAWAY frame header: type 7 at offset 3 of some frame.
            i = 0
            while i + 9 <= len(buf):
                ln = int.from_bytes(buf[i:i+3], "big"); ty = buf[i+3]
                if ty == 7: end = "goaway"
                i += 9 + ln
            if end == "goaway": break
    except socket.timeout:
        end = "open"
    except Exception:
        end = "closed"
    return "%s:%d" % (end, sent)
t = conn(); sent = 0
try:
    for sid in range(1, 10001, 2):
        f = HeadersFrame(sid); f.data = block; f.flags.add("END_HEADERS"); f.flags.add("END_STREAM")
        r = RstStreamFrame(sid); r.error_code = 8
        t.sendall(f.serialize() + r.serialize()); sent += 1
except Exception:
    pass
print(outcome(t, sent))
t = conn(); sent = 0
try:
    f = HeadersFrame(1); f.data = block
    t.sendall(f.serialize())
    for i in range(20000):
        cf = ContinuationFrame(1); cf.data = enc.encode([("x-junk-%d" % i, "a" * 1000)])
        t.sendall(cf.serialize()); sent += 1
except Exception:
    pass
print(outcome(t, sent))
"#
    );
    let out = python(c, 90, &script);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    for (what, line, most) in [
        ("rapid reset", lines[0], 4999),
        ("CONTINUATION", lines[1], 19_999),
    ] {
        let (end, sent) = line.split_once(':').unwrap();
        let sent: usize = sent.trim().parse().unwrap();
        assert!(
            end == "goaway" || end == "closed" || sent < most,
            "{what}: the edge kept the connection open through the whole flood: {line}"
        );
    }
    // The edge still serves others.
    let r = curl(
        c,
        "198.51.100.50",
        &url("/"),
        &["--http2", "-H", &format!("api-key: {k}")],
    );
    assert_eq!(r.status, 200);
}

#[test]
fn a_sprayer_cannot_grow_the_unauthorized_list() {
    if !allowlist_tests::kernel_tests_enabled("a_sprayer_cannot_grow_the_unauthorized_list") {
        return;
    }
    let pair = Pair::new();
    pair.client_addr(TRUSTED);
    let _up = Upstream::start(&pair.server, UP);
    let setup = edge_setup("");
    let text = std::fs::read_to_string(&setup.config).unwrap();
    std::fs::write(
        &setup.config,
        format!("{text}\n[blocking]\nunauthorized_max = 5\n"),
    )
    .unwrap();
    let _d = setup.start(Some(&pair.server), &["--no-kernel"]);
    let (_, k) = key(&setup, &[]);
    setup.ctl_json(&["ips", "authorize", "192.0.2.0/24"]);
    setup.ctl_json(&["blocking", "api", "activate", "--force"]);
    // Through the trusted balancer: 1500 random addresses of one IPv6 /64,
    // then 20 distinct IPv4 addresses, all refused.
    let script = format!(
        r#"
import httpx, random
t = httpx.HTTPTransport(local_address="{TRUSTED}", verify=False)
codes = set()
with httpx.Client(transport=t, timeout=10) as cl:
    for i in range(1500):
        a = "2001:db8:7:7:%x:%x:%x:%x" % tuple(random.randrange(65536) for _ in range(4))
        codes.add(cl.get("{u}", headers={{"api-key": "{k}", "x-forwarded-for": a}}).status_code)
    for i in range(20):
        codes.add(cl.get("{u}", headers={{"api-key": "{k}", "x-forwarded-for": "203.0.113.%d" % (i + 1)}}).status_code)
print(sorted(codes))
"#,
        u = url("/")
    );
    assert_eq!(python(&pair.client, 120, &script), "[403]");
    let listed = || {
        setup.ctl_json(&["ips", "unauthorized"])["unauthorized"]
            .as_array()
            .unwrap()
            .clone()
    };
    assert!(wait_for(Duration::from_secs(3), || {
        setup.ctl_json(&["stats"])["unauthorized_evicted"]
            .as_u64()
            .unwrap_or(0)
            >= 16
    }));
    let rows = listed();
    assert!(rows.len() <= 5, "capped at 5: {rows:?}");
    // Recorded per /64, one row (evicted meanwhile by the newer IPv4 rows,
    // which count 1 each): run the /64 alone once more and look.
    let script = format!(
        r#"
import httpx, random
t = httpx.HTTPTransport(local_address="{TRUSTED}", verify=False)
with httpx.Client(transport=t, timeout=10) as cl:
    for i in range(300):
        a = "2001:db8:7:7:%x:%x:%x:%x" % tuple(random.randrange(65536) for _ in range(4))
        cl.get("{u}", headers={{"api-key": "{k}", "x-forwarded-for": a}})
print("done")
"#,
        u = url("/")
    );
    assert_eq!(python(&pair.client, 60, &script), "done");
    assert!(
        wait_for(Duration::from_secs(3), || {
            listed().iter().any(|u| {
                u["addr"] == "2001:db8:7:7::" && u["attempts"].as_i64().unwrap_or(0) >= 300
            })
        }),
        "{:?}",
        listed()
    );
    let v6_rows = listed()
        .iter()
        .filter(|u| u["addr"].as_str().unwrap().contains(':'))
        .count();
    assert_eq!(v6_rows, 1, "one row per /64");
}
