//! The edge behind a real balancer (Debian's HAProxy) with the kernel on:
//! once as a TCP balancer sending PROXY protocol v2, once as an L7
//! balancer adding X-Forwarded-For. Keys with allowlists must work (the
//! kernel checks the client the balancer named, not the balancer), the
//! XDP guard must admit the balancer, refusals must name the real client,
//! and revoking a key must cut a stream running through the balancer.

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use allowlist_tests::{
    kernel_tests_enabled,
    net::{Pair, SERVER_IF, SERVER_V4, Upstream, curl, wait_for},
    proc::Setup,
};

const EDGE: u16 = 8443;
const UP: u16 = 8080;
const BALANCER: &str = "198.51.100.70";
const TCP_PORT: u16 = 9443;
const HTTP_PORT: u16 = 9080;
const ALLOWED: &str = "198.51.100.50";
const OTHER: &str = "198.51.100.51";

/// HAProxy in the client namespace on the balancer's address, stopped on
/// drop.
struct Haproxy(Child);

impl Haproxy {
    fn start(ns: &str, dir: &std::path::Path) -> Haproxy {
        let cfg = dir.join("haproxy.cfg");
        std::fs::write(
            &cfg,
            format!(
                "global\n  maxconn 200\n\
                 defaults\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
                 frontend tcp_in\n  mode tcp\n  bind {BALANCER}:{TCP_PORT}\n  default_backend edge_tcp\n\
                 backend edge_tcp\n  mode tcp\n  server edge {SERVER_V4}:{EDGE} source {BALANCER} send-proxy-v2\n\
                 frontend http_in\n  mode http\n  bind {BALANCER}:{HTTP_PORT}\n  option forwardfor\n  default_backend edge_http\n\
                 backend edge_http\n  mode http\n  server edge {SERVER_V4}:{EDGE} source {BALANCER} ssl verify none\n"
            ),
        )
        .unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", ns, "haproxy", "-db", "-f"])
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("haproxy (Debian package haproxy)");
        let h = Haproxy(child);
        let ready = wait_for(Duration::from_secs(5), || {
            Command::new("ip")
                .args(["netns", "exec", ns, "ss", "-ltn"])
                .output()
                .map(|o| {
                    String::from_utf8_lossy(&o.stdout).contains(&format!("{BALANCER}:{HTTP_PORT}"))
                })
                .unwrap_or(false)
        });
        assert!(ready, "haproxy did not start");
        h
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Streams `/stream` through the balancer from `src` (TLS through the TCP
/// frontend, plain HTTP through the L7 one); prints the bytes received, the
/// time of the last read, how the stream ended and when. (The upstream
/// sends for 10 s; HAProxy may coalesce its chunks.)
fn stream(ns: &str, src: &str, key: &str, tls: bool) -> std::thread::JoinHandle<String> {
    let (port, wrap) = if tls {
        (
            TCP_PORT,
            "ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE\nctx.set_alpn_protocols(['http/1.1'])\ns = ctx.wrap_socket(s)",
        )
    } else {
        (HTTP_PORT, "")
    };
    let script = format!(
        r#"
import socket, ssl, time
s = socket.socket(); s.settimeout(12); s.bind(("{src}", 0)); s.connect(("{BALANCER}", {port}))
{wrap}
s.sendall(b"GET /stream HTTP/1.1\r\nhost: x\r\napi-key: {key}\r\n\r\n")
last = 0; n = 0; how = "timeout"
try:
    while True:
        d = s.recv(65536)
        if not d:
            how = "closed"; break
        n += len(d); last = time.time()
except socket.timeout:
    how = "timeout"
except Exception as e:
    how = type(e).__name__
print(n, last, how, time.time())
"#
    );
    let ns = ns.to_string();
    std::thread::spawn(move || {
        let out = Command::new("ip")
            .args([
                "netns", "exec", &ns, "timeout", "20", "python3", "-c", &script,
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    })
}

#[test]
fn keys_with_allowlists_work_behind_haproxy_with_the_kernel_on() {
    if !kernel_tests_enabled("keys_with_allowlists_work_behind_haproxy_with_the_kernel_on") {
        return;
    }
    let pair = Pair::new();
    for a in [ALLOWED, OTHER, BALANCER] {
        pair.client_addr(a);
    }
    let _up = Upstream::start(&pair.server, UP);
    let setup = Setup::new(
        true,
        &format!("interfaces = [\"{SERVER_IF}\"]\nxdp_mode = \"generic\""),
    );
    setup.proxy(&format!(
        "listen = \"0.0.0.0:{EDGE}\"\nupstream = \"http://127.0.0.1:{UP}\"\ntrusted_proxies = [\"{BALANCER}/32\"]"
    ));
    let _d = setup.start(Some(&pair.server), &[]);
    let c = &pair.client;
    let _lb = Haproxy::start(&c.name, setup.dir.path());
    // API blocking active with only the allowed client authorized: the XDP
    // guard is armed, and must admit the balancer itself.
    setup.ctl_json(&["ips", "authorize", ALLOWED]);
    setup.ctl_json(&["blocking", "api", "activate", "--force"]);
    let k = setup.ctl_json(&["keys", "create", "--name", "lb", "--allow", ALLOWED]);
    let (id, key) = (
        k["id"].as_str().unwrap().to_string(),
        k["key"].as_str().unwrap().to_string(),
    );
    let h = format!("api-key: {key}");
    let via_tcp = |src: &str| {
        curl(
            c,
            src,
            &format!("https://{BALANCER}:{TCP_PORT}/x"),
            &["--http1.1", "-H", &h],
        )
    };
    let via_http = |src: &str| {
        curl(
            c,
            src,
            &format!("http://{BALANCER}:{HTTP_PORT}/x"),
            &["-H", &h],
        )
    };

    for (what, get) in [
        ("PROXY v2", &via_tcp as &dyn Fn(&str) -> _),
        ("X-Forwarded-For", &via_http),
    ] {
        let r = get(ALLOWED);
        assert_eq!(r.status, 200, "{what}, allowed client: {r:?}");
        assert_eq!(r.json()["headers"]["x-real-ip"], ALLOWED, "{what}");
        let r = get(OTHER);
        assert_eq!(r.status, 403, "{what}, other client: {r:?}");
        assert!(r.body.contains("IP_NOT_ALLOWED"), "{what}");
    }
    // Refusals name the real client, never the balancer.
    assert!(wait_for(Duration::from_secs(3), || {
        setup.ctl_json(&["ips", "unauthorized"])["unauthorized"]
            .as_array()
            .unwrap()
            .iter()
            .any(|u| u["addr"] == OTHER)
    }));
    let listed = setup.ctl_json(&["ips", "unauthorized"]);
    assert!(
        !listed["unauthorized"]
            .as_array()
            .unwrap()
            .iter()
            .any(|u| u["addr"] == BALANCER),
        "{listed}"
    );

    // Revoking the key cuts streams running through either frontend.
    let tcp = stream(&c.name, ALLOWED, &key, true);
    let http = stream(&c.name, ALLOWED, &key, false);
    std::thread::sleep(Duration::from_millis(1500));
    let t = now();
    setup.ctl_json(&["keys", "revoke", &id]);
    for (what, out) in [
        ("PROXY v2", tcp.join().unwrap()),
        ("X-Forwarded-For", http.join().unwrap()),
    ] {
        let f: Vec<&str> = out.split_whitespace().collect();
        assert_eq!(f.len(), 4, "{what}: {out}");
        let bytes: u32 = f[0].parse().unwrap();
        let last: f64 = f[1].parse().unwrap();
        let ended: f64 = f[3].parse().unwrap();
        assert!(
            bytes > 0 && ended >= t,
            "{what}: the stream was running until the revoke (at {t}): {out}"
        );
        assert!(
            last - t < 0.5,
            "{what}: data kept flowing {:.3} s after the revoke: {out}",
            last - t
        );
        assert!(
            f[2] != "timeout" && ended - t < 1.0,
            "{what}: the stream was not cut through the balancer: {out}"
        );
    }
}
