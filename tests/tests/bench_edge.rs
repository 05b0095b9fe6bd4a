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
/// The same allowlistd with its usage log off.
const EDGE_NOLOG: u16 = 18445;
/// nginx with a buffered access log, as the usage log's fair rival.
const NGINX_LOG: u16 = 18446;
const ROUNDS: usize = 5;
const SECS: u32 = 6;

struct Run {
    rps: f64,
    p99_ms: f64,
    /// CPU time (user + system) the proxy's processes spent per request.
    cpu_us: f64,
}

/// User + system CPU of `root` and its child processes, in microseconds.
fn cpu_us(root: u32) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let mut ticks = 0u64;
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // Fields after the parenthesised command name: state, ppid, ...;
        // utime and stime are the 12th and 13th of them.
        let Some((head, rest)) = stat.rsplit_once(") ") else {
            continue;
        };
        let pid: u32 = head
            .split(' ')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        let f: Vec<&str> = rest.split(' ').collect();
        let ppid: u32 = f.get(1).and_then(|p| p.parse().ok()).unwrap_or(0);
        if pid == root || ppid == root {
            ticks += f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            ticks += f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        }
    }
    ticks as f64 * 1e6 / hz
}

fn wrk(port: u16, key: &str, close: bool, proxy_pid: u32) -> Run {
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
    let cpu0 = cpu_us(proxy_pid);
    let out = cmd
        .arg(format!("https://127.0.0.1:{port}/"))
        .output()
        .expect("wrk must be installed");
    let cpu = cpu_us(proxy_pid) - cpu0;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (rps, p99_ms) = allowlist_tests::bench::parse_wrk(&text);
    assert!(rps > 0.0, "wrk output: {text}");
    let non2xx = text.lines().any(|l| l.contains("Non-2xx"));
    assert!(!non2xx, "port {port} answered non-2xx: {text}");
    let requests: f64 = text
        .lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(f64::NAN);
    Run {
        rps,
        p99_ms,
        cpu_us: cpu / requests,
    }
}

/// Full TLS handshakes without a request: two `openssl s_time -new`
/// clients, which never resume a session, for `SECS` seconds.
fn s_time(port: u16, proxy_pid: u32) -> Run {
    let cpu0 = cpu_us(proxy_pid);
    let start = std::time::Instant::now();
    let clients: Vec<Child> = (0..2)
        .map(|_| {
            Command::new("openssl")
                .args(["s_time", "-new", "-connect", &format!("127.0.0.1:{port}")])
                .args(["-time", &SECS.to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .expect("openssl must be installed")
        })
        .collect();
    let mut handshakes = 0.0;
    for c in clients {
        let out = c.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        // "6021 connections in 5 real seconds, ..."
        let n: f64 = text
            .lines()
            .find(|l| l.contains("connections in") && l.contains("real seconds"))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("openssl s_time on {port}: {text}"));
        assert!(n > 0.0, "no handshake completed on {port}: {text}");
        handshakes += n;
    }
    let secs = start.elapsed().as_secs_f64();
    Run {
        rps: handshakes / secs,
        p99_ms: f64::NAN,
        cpu_us: (cpu_us(proxy_pid) - cpu0) / handshakes,
    }
}

/// The TLS version and suite a fresh OpenSSL client negotiates on `port`:
/// the comparison is only fair if both proxies answer alike.
fn negotiated(port: u16) -> (String, String) {
    let out = Command::new("openssl")
        .args([
            "s_client",
            "-brief",
            "-connect",
            &format!("127.0.0.1:{port}"),
        ])
        .stdin(Stdio::null())
        .output()
        .expect("openssl must be installed");
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| panic!("no {name:?} from openssl s_client on {port}: {text}"))
    };
    (field("Protocol version:"), field("Ciphersuite:"))
}

/// Starts an nginx whose `http` block is `servers`, with its own pid file,
/// logs and temp paths under `dir/name`, and waits for `port`.
fn nginx(dir: &Path, name: &str, port: u16, servers: &str) -> Child {
    let root = dir.join(name);
    for sub in ["body", "proxy", "fcgi", "uwsgi", "scgi"] {
        std::fs::create_dir_all(root.join(sub)).unwrap();
    }
    let conf = root.join("nginx.conf");
    let d = root.display();
    std::fs::write(
        &conf,
        format!(
            r#"
daemon off;
worker_processes auto;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {d}/body; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fcgi;
  uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
  {servers}
}}
"#
        ),
    )
    .unwrap();
    let child = Command::new("nginx")
        .arg("-c")
        .arg(&conf)
        .arg("-p")
        .arg(&root)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nginx must be installed");
    assert!(
        wait_for(Duration::from_secs(10), || std::net::TcpStream::connect((
            "127.0.0.1",
            port
        ))
        .is_ok()),
        "nginx {name} did not start: {}",
        std::fs::read_to_string(root.join("error.log")).unwrap_or_default()
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
    // The upstream is a process of its own, as in production, so both
    // proxies pay the same wake-ups to reach it.
    let mut up = nginx(
        dir,
        "upstream",
        UPSTREAM,
        &format!(
            "server {{ listen 127.0.0.1:{UPSTREAM}; location / {{ return 200 \"ok\\n\"; }} }}"
        ),
    );
    // The same TLS 1.3 suite allowlistd prefers (AES-128-GCM-SHA256), so
    // both do the same cryptography per handshake and per record. nginx
    // 1.22's built-in default is TLS 1.0-1.2 (Debian's packaged nginx.conf
    // turns 1.3 on): without `ssl_protocols` nginx resumed TLS 1.2 sessions,
    // which skip the key exchange a TLS 1.3 resumption still does.
    let d = dir.display();
    let mut ng = nginx(
        dir,
        "proxy",
        NGINX,
        &format!(
            "upstream up {{ server 127.0.0.1:{UPSTREAM}; keepalive 128; }}
  server {{
    listen 127.0.0.1:{NGINX} ssl;
    ssl_certificate {d}/cert.pem; ssl_certificate_key {d}/key.pem;
    ssl_session_cache shared:SSL:10m;
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_prefer_server_ciphers on;
    ssl_conf_command Ciphersuites TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384;
    location / {{ proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection \"\"; }}
  }}"
        ),
    );

    let mut ng_log = nginx(
        dir,
        "proxy-logged",
        NGINX_LOG,
        &format!(
            "upstream up {{ server 127.0.0.1:{UPSTREAM}; keepalive 128; }}
  server {{
    listen 127.0.0.1:{NGINX_LOG} ssl;
    access_log {d}/access.log combined buffer=64k flush=1s;
    ssl_certificate {d}/cert.pem; ssl_certificate_key {d}/key.pem;
    ssl_session_cache shared:SSL:10m;
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_prefer_server_ciphers on;
    ssl_conf_command Ciphersuites TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384;
    location / {{ proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection \"\"; }}
  }}"
        ),
    );

    // allowlistd with the same certificate and upstream, every check on.
    setup.proxy(&format!(
            "listen = \"127.0.0.1:{EDGE}\"\nupstream = \"http://127.0.0.1:{UPSTREAM}\"\ncert = \"{0}/cert.pem\"\nkey = \"{0}/key.pem\"",
            dir.display()
        ));
    let daemon = setup.start(None, &[]);
    let (edge_pid, nginx_pid) = (daemon.pid().expect("allowlistd runs"), ng.id());
    // The same again with the usage log off (kernel hooks on too).
    let nolog = Setup::new(true, "");
    nolog.proxy(&format!(
            "listen = \"127.0.0.1:{EDGE_NOLOG}\"\nupstream = \"http://127.0.0.1:{UPSTREAM}\"\ncert = \"{0}/cert.pem\"\nkey = \"{0}/key.pem\"",
            dir.display()
        ));
    let cfg = std::fs::read_to_string(&nolog.config).unwrap();
    std::fs::write(&nolog.config, format!("{cfg}[logs]\nenabled = false\n")).unwrap();
    let daemon_nolog = nolog.start(None, &[]);
    let nolog_pid = daemon_nolog.pid().expect("allowlistd runs");
    let ng_log_pid = ng_log.id();
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
    let key_nolog = nolog.ctl_json(&[
        "keys",
        "create",
        "--name",
        "bench",
        "--allow",
        "127.0.0.1",
        "--rate",
        "1000000/second",
    ])["key"]
        .as_str()
        .unwrap()
        .to_string();
    nolog.ctl_json(&["ips", "authorize", "127.0.0.0/9"]);
    nolog.ctl_json(&["blocking", "api", "activate", "--force"]);
    let tls = negotiated(EDGE);
    assert_eq!(
        negotiated(NGINX),
        tls,
        "nginx and allowlistd must negotiate the same TLS version and suite"
    );
    // Warm up both.
    wrk(NGINX, &key, false, nginx_pid);
    wrk(EDGE, &key, false, edge_pid);
    wrk(EDGE_NOLOG, &key_nolog, false, nolog_pid);
    wrk(NGINX_LOG, &key, false, ng_log_pid);

    // Per measure: (nginx runs, allowlistd runs), alternating rounds.
    let (mut ka, mut hs, mut full) = ((vec![], vec![]), (vec![], vec![]), (vec![], vec![]));
    // Keep-alive with the usage log: (allowlistd logging off, nginx with a
    // buffered access log).
    let (mut ka_nolog, mut ka_nglog) = (vec![], vec![]);
    for _ in 0..ROUNDS {
        ka_nolog.push(wrk(EDGE_NOLOG, &key_nolog, false, nolog_pid));
        ka_nglog.push(wrk(NGINX_LOG, &key, false, ng_log_pid));
        ka.0.push(wrk(NGINX, &key, false, nginx_pid));
        ka.1.push(wrk(EDGE, &key, false, edge_pid));
        hs.0.push(wrk(NGINX, &key, true, nginx_pid));
        hs.1.push(wrk(EDGE, &key, true, edge_pid));
        full.0.push(s_time(NGINX, nginx_pid));
        full.1.push(s_time(EDGE, edge_pid));
    }
    drop(daemon_nolog);
    for p in [&mut ng, &mut ng_log, &mut up] {
        // SIGTERM, not SIGKILL: the master must stop its workers, or they
        // keep the ports.
        // SAFETY: plain kill(2) of our own child.
        unsafe { libc::kill(p.id() as libc::pid_t, libc::SIGTERM) };
        let _ = p.wait();
    }
    let stats = setup.ctl_json(&["stats"]);
    let m = |runs: &[Run], f: fn(&Run) -> f64| median(runs.iter().map(f).collect());
    type Measure = fn(&Run) -> f64;
    let (rps, p99, cpu): (Measure, Measure, Measure) = (|r| r.rps, |r| r.p99_ms, |r| r.cpu_us);

    let mut md = String::new();
    writeln!(md, "## Edge (`cargo xtask bench edge`)\n").unwrap();
    writeln!(
        md,
        "Loopback, {} CPUs shared by the load generator, the proxy and the upstream. `wrk -t2 -c64 -d{SECS}s` HTTPS GETs of a 3-byte body \
         to a 3-byte upstream answer, median of {ROUNDS} alternating rounds. allowlistd: every check on — key \
         (SHA-256, constant-time), scope, key allowlist, account list with API blocking active, a rate limit — and its kernel \
         connection hooks loaded. nginx 1.22: `proxy_pass` with upstream keep-alive, no checks, TLS 1.3 on as in Debian's packaged nginx.conf (1.22's built-in default stops at 1.2). The upstream is a separate nginx \
         (`return 200`), the same for both. Same ECDSA P-256 certificate and the same TLS version and suite ({} {}, checked with `openssl s_client` against both); wrk \
         resumes TLS sessions with both (a TLS 1.3 resumption still does an X25519 exchange); the full-handshake rows use `openssl s_time -new`, \
         which never resumes and sends no request. Proxy CPU is user + system time of the proxy's processes (allowlistd; nginx master and \
         workers) over the run, per request.\n",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        tls.0,
        tls.1,
    )
    .unwrap();
    writeln!(
        md,
        "| measure | nginx (no checks) | allowlistd (all checks) | allowlistd ÷ nginx | target |"
    )
    .unwrap();
    writeln!(md, "|---|---:|---:|---:|---:|").unwrap();
    let mut row = |name: &str,
                   runs: &(Vec<Run>, Vec<Run>),
                   f: fn(&Run) -> f64,
                   digits: usize,
                   target: &str| {
        let (n, e) = (m(&runs.0, f), m(&runs.1, f));
        writeln!(
            md,
            "| {name} | {n:.digits$} | {e:.digits$} | {:.2}× | {target} |",
            e / n
        )
        .unwrap();
    };
    row("keep-alive requests/s", &ka, rps, 0, "≥ 1.0×");
    row("keep-alive p99 latency, ms", &ka, p99, 2, "");
    row("keep-alive proxy CPU per request, µs", &ka, cpu, 1, "");
    row(
        "new TLS handshakes/s (`Connection: close`)",
        &hs,
        rps,
        0,
        "≥ 1.0×",
    );
    row("handshake p99 latency, ms", &hs, p99, 2, "");
    row("proxy CPU per handshake + request, µs", &hs, cpu, 1, "");
    row(
        "full TLS handshakes/s, no resumption (`openssl s_time -new`, 2 clients)",
        &full,
        rps,
        0,
        "",
    );
    row("proxy CPU per full handshake, µs", &full, cpu, 1, "");
    writeln!(md).unwrap();
    let (on, off, nglog) = (m(&ka.1, rps), m(&ka_nolog, rps), m(&ka_nglog, rps));
    writeln!(
        md,
        "The usage log (every request written by allowlistd's batched writer) against the same allowlistd with `[logs] enabled = false`, \
         and against nginx with a buffered access log (`access_log ... buffer=64k flush=1s`), keep-alive, same rounds:\n"
    )
    .unwrap();
    writeln!(md, "| measure | requests/s | ratio | target |").unwrap();
    writeln!(md, "|---|---:|---:|---:|").unwrap();
    writeln!(md, "| allowlistd, usage log on | {on:.0} | | |").unwrap();
    writeln!(
        md,
        "| allowlistd, usage log off | {off:.0} | on ÷ off {:.2}× | ≥ 0.95× |",
        on / off
    )
    .unwrap();
    writeln!(
        md,
        "| nginx, buffered access log | {nglog:.0} | allowlistd (log on) ÷ nginx (log on) {:.2}× | ≥ 1.0× |",
        on / nglog
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
    // `on`: the guard's own effect is measured, not auto's arming delay.
    let setup = Setup::new(
        true,
        &format!("interfaces = [\"{SERVER_IF}\"]\nxdp_mode = \"generic\"\napi_guard = \"on\""),
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
        Run {
            rps,
            p99_ms,
            cpu_us: f64::NAN,
        }
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
