//! `cargo xtask bench edge`: allowlistd's TLS edge (every check on) against
//! nginx as a plain TLS reverse proxy (no checks) in front of the same
//! upstream, same machine, same run, loopback only: keep-alive requests/s
//! and p99 latency, and new TLS handshakes/s.

use std::{
    fmt::Write as _,
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

use allowlist_tests::{kernel_tests_enabled, net::wait_for, proc::Setup};

const UPSTREAM: u16 = 18080;
const NGINX: u16 = 18444;
const EDGE: u16 = 18443;
const ROUNDS: usize = 3;
const SECS: u32 = 6;

struct Run {
    rps: f64,
    p99_ms: f64,
}

fn wrk(port: u16, key: &str, close: bool) -> Run {
    let mut cmd = Command::new("wrk");
    cmd.args([
        "-t2",
        "-c64",
        &format!("-d{SECS}s"),
        "--latency",
        "-H",
        &format!("api-key: {key}"),
    ]);
    if close {
        cmd.args(["-H", "Connection: close"]);
    }
    let out = cmd
        .arg(format!("https://127.0.0.1:{port}/"))
        .output()
        .expect("wrk must be installed");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (rps, p99_ms) = allowlist_tests::bench::parse_wrk(&text);
    assert!(rps > 0.0, "wrk output: {text}");
    let non2xx = text.lines().any(|l| l.contains("Non-2xx"));
    assert!(!non2xx, "port {port} answered non-2xx: {text}");
    Run { rps, p99_ms }
}

fn nginx(dir: &Path) -> Child {
    let conf = dir.join("nginx.conf");
    let d = dir.display();
    std::fs::write(
        &conf,
        format!(
            r#"
daemon off;
worker_processes auto;
pid {d}/nginx.pid;
error_log {d}/nginx-error.log;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {d}/body; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fcgi;
  uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
  upstream up {{ server 127.0.0.1:{UPSTREAM}; keepalive 128; }}
  server {{ listen 127.0.0.1:{UPSTREAM}; location / {{ return 200 "ok\n"; }} }}
  server {{
    listen 127.0.0.1:{NGINX} ssl;
    ssl_certificate {d}/cert.pem; ssl_certificate_key {d}/key.pem;
    ssl_session_cache shared:SSL:10m;
    location / {{ proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection ""; }}
  }}
}}
"#
        ),
    )
    .unwrap();
    let child = Command::new("nginx")
        .arg("-c")
        .arg(&conf)
        .arg("-p")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nginx must be installed");
    assert!(
        wait_for(Duration::from_secs(10), || std::net::TcpStream::connect((
            "127.0.0.1",
            NGINX
        ))
        .is_ok()),
        "nginx did not start: {}",
        std::fs::read_to_string(dir.join("nginx-error.log")).unwrap_or_default()
    );
    child
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

#[test]
#[ignore = "benchmark: run with `cargo xtask bench edge`"]
fn bench_edge() {
    assert!(
        kernel_tests_enabled("bench_edge"),
        "the edge benchmark loads the kernel hooks: needs root"
    );
    let setup = Setup::new(true, "");
    let dir = setup.dir.path();
    let keygen = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
        ])
        .arg("-keyout")
        .arg(dir.join("key.pem"))
        .arg("-out")
        .arg(dir.join("cert.pem"))
        .output()
        .unwrap();
    assert!(
        keygen.status.success(),
        "{}",
        String::from_utf8_lossy(&keygen.stderr)
    );
    let mut ng = nginx(dir);

    // allowlistd with the same certificate and upstream, every check on.
    setup.proxy(&format!(
            "listen = \"127.0.0.1:{EDGE}\"\nupstream = \"http://127.0.0.1:{UPSTREAM}\"\ncert = \"{0}/cert.pem\"\nkey = \"{0}/key.pem\"",
            dir.display()
        ));
    let _d = setup.start(None, &[]);
    let k = setup.ctl_json(&[
        "keys",
        "create",
        "--name",
        "bench",
        "--allow",
        "127.0.0.1",
        "--rate",
        "1000000/second",
    ]);
    let key = k["key"].as_str().unwrap().to_string();
    setup.ctl_json(&["ips", "authorize", "127.0.0.0/9"]);
    setup.ctl_json(&["blocking", "api", "activate", "--force"]);
    // Warm up both.
    wrk(NGINX, &key, false);
    wrk(EDGE, &key, false);

    let (mut n_rps, mut n_p99, mut e_rps, mut e_p99, mut n_hs, mut e_hs) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    for _ in 0..ROUNDS {
        let n = wrk(NGINX, &key, false);
        let e = wrk(EDGE, &key, false);
        n_rps.push(n.rps);
        n_p99.push(n.p99_ms);
        e_rps.push(e.rps);
        e_p99.push(e.p99_ms);
        n_hs.push(wrk(NGINX, &key, true).rps);
        e_hs.push(wrk(EDGE, &key, true).rps);
    }
    let _ = ng.kill();
    let _ = ng.wait();
    let stats = setup.ctl_json(&["stats"]);

    let (nr, er, np, ep, nh, eh) = (
        median(n_rps),
        median(e_rps),
        median(n_p99),
        median(e_p99),
        median(n_hs),
        median(e_hs),
    );
    let mut md = String::new();
    writeln!(md, "## Edge (`cargo xtask bench edge`)\n").unwrap();
    writeln!(
        md,
        "Loopback, {} CPUs shared by the load generator, the proxy and the upstream. `wrk -t2 -c64 -d{SECS}s` HTTPS GETs of a 3-byte body \
         (nginx `return 200` as the upstream of both), median of {ROUNDS} alternating rounds. allowlistd: every check on — key \
         (SHA-256, constant-time), scope, key allowlist, account list with API blocking active, a rate limit — and its kernel \
         connection hooks loaded. nginx 1.22: `proxy_pass` with upstream keep-alive, no checks. Same ECDSA P-256 certificate.\n",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    )
    .unwrap();
    writeln!(
        md,
        "| measure | nginx (no checks) | allowlistd (all checks) | allowlistd ÷ nginx | target |"
    )
    .unwrap();
    writeln!(md, "|---|---:|---:|---:|---:|").unwrap();
    writeln!(
        md,
        "| keep-alive requests/s | {nr:.0} | {er:.0} | {:.2}× | ≥ 1.0× |",
        er / nr
    )
    .unwrap();
    writeln!(
        md,
        "| keep-alive p99 latency, ms | {np:.2} | {ep:.2} | {:.2}× | |",
        ep / np
    )
    .unwrap();
    writeln!(
        md,
        "| new TLS handshakes/s (`Connection: close`) | {nh:.0} | {eh:.0} | {:.2}× | ≥ 1.0× |",
        eh / nh
    )
    .unwrap();
    writeln!(md).unwrap();
    eprintln!("\n{md}\nedge stats: {stats}");
    allowlist_tests::bench::publish("## Edge (", &md);
}

/// p99 of a legitimate client's keyed requests (wrk in the client
/// namespace) while trafgen floods SYNs at the edge's port from an
/// unauthorized source, with the XDP guard armed (API blocking active) or
/// not (blocking inactive), and without a flood as the baseline.
#[test]
#[ignore = "benchmark: run with `cargo xtask bench edge`"]
fn bench_edge_under_syn_flood() {
    use allowlist_tests::net::{Pair, SERVER_IF, SERVER_V4, Upstream};
    assert!(
        kernel_tests_enabled("bench_edge_under_syn_flood"),
        "needs root"
    );
    const PORT: u16 = 8443;
    const FLOOD: u64 = 3_000_000;
    let pair = Pair::new();
    pair.client_addr("198.51.100.90");
    let _up = Upstream::start(&pair.server, 8080);
    let setup = Setup::new(
        true,
        &format!("interfaces = [\"{SERVER_IF}\"]\nxdp_mode = \"generic\""),
    );
    setup.proxy(&format!(
        "listen = \"0.0.0.0:{PORT}\"\nupstream = \"http://127.0.0.1:8080\""
    ));
    let _d = setup.start(Some(&pair.server), &[]);
    let k = setup.ctl_json(&[
        "keys",
        "create",
        "--name",
        "legit",
        "--allow",
        "198.51.100.90",
    ]);
    let key = k["key"].as_str().unwrap().to_string();
    setup.ctl_json(&["ips", "authorize", "198.51.100.0/24"]);

    let mac = pair.server.mac(SERVER_IF);
    let conf = setup.dir.path().join("flood.trafgen");
    std::fs::write(
        &conf,
        format!("{{ eth(da={mac}), ipv4(sa=203.0.113.9, da={SERVER_V4}), tcp(sp=drnd(), dp={PORT}, syn) }}\n"),
    )
    .unwrap();

    let measure = |flood: bool| -> Run {
        let flooder = flood.then(|| {
            let (ns, conf) = (pair.client.name.clone(), conf.clone());
            std::thread::spawn(move || {
                Command::new("timeout")
                    .args([
                        "30", "ip", "netns", "exec", &ns, "taskset", "-c", "0", "trafgen", "--dev",
                        "vc", "--conf",
                    ])
                    .arg(&conf)
                    .args([
                        "--num",
                        &FLOOD.to_string(),
                        "--cpus",
                        "1",
                        "--no-sock-mem",
                        "--notouch-irq",
                        "--no-cpu-stats",
                        "--rate",
                        "500000pps",
                    ])
                    .output()
                    .unwrap()
            })
        });
        std::thread::sleep(Duration::from_millis(300));
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &pair.client.name,
                "wrk",
                "-t1",
                "-c8",
                "-d4s",
                "--latency",
                "-H",
                &format!("api-key: {key}"),
            ])
            .arg(format!("https://{SERVER_V4}:{PORT}/"))
            .output()
            .unwrap();
        if let Some(f) = flooder {
            let _ = f.join();
        }
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (rps, p99_ms) = allowlist_tests::bench::parse_wrk(&text);
        Run { rps, p99_ms }
    };

    setup.ctl_json(&["blocking", "api", "deactivate"]);
    let calm = measure(false);
    let off = measure(true);
    setup.ctl_json(&["blocking", "api", "activate", "--force"]);
    let on = measure(true);
    let dropped = setup.ctl_json(&["stats"])["kernel"]["guard_dropped_api"]
        .as_u64()
        .unwrap_or(0);

    let mut md = String::new();
    writeln!(md, "## Edge under a SYN flood (`cargo xtask bench edge`)\n").unwrap();
    writeln!(
        md,
        "A legitimate client (wrk -t1 -c8, keyed HTTPS GETs, in its own namespace) while trafgen sends {FLOOD} SYNs at 0.5 Mpps \
         from an unauthorized source to the edge's port across the veth pair; the XDP guard (generic mode) is armed when \
         API blocking is active. Same run for all three rows; the upstream is the tests' simple thread-per-connection server.\n"
    )
    .unwrap();
    writeln!(md, "| scenario | requests/s | p99 latency, ms |").unwrap();
    writeln!(md, "|---|---:|---:|").unwrap();
    writeln!(md, "| no flood | {:.0} | {:.2} |", calm.rps, calm.p99_ms).unwrap();
    writeln!(
        md,
        "| flood, XDP guard off (blocking inactive) | {:.0} | {:.2} |",
        off.rps, off.p99_ms
    )
    .unwrap();
    writeln!(
        md,
        "| flood, XDP guard on (blocking active) | {:.0} | {:.2} |",
        on.rps, on.p99_ms
    )
    .unwrap();
    writeln!(md, "\nGuard on ÷ guard off: p99 {:.2}×, requests/s {:.2}×; the guard dropped {dropped} SYNs.\n", on.p99_ms / off.p99_ms, on.rps / off.rps).unwrap();
    eprintln!("\n{md}");
    allowlist_tests::bench::publish("## Edge under a SYN flood (", &md);
}
