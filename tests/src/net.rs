//! Network namespaces, veth pairs and sockets inside them.

use std::{
    fs::File,
    io::Write,
    net::{IpAddr, SocketAddr, TcpListener},
    os::fd::AsRawFd,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use socket2::{Domain, Protocol, Socket, Type};

use crate::PREFIX;

fn run(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("running {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Deletes namespaces and bpffs folders left by an earlier run that died
/// before its guards ran.
pub fn sweep_leftovers() {
    if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or("");
            if name.starts_with(PREFIX)
                && !name.contains(&format!("{PREFIX}{}", std::process::id() % 10000))
            {
                let _ = Command::new("ip").args(["netns", "del", name]).status();
            }
        }
    }
    // Daemons make their cgroup under the cgroup they start in (this
    // process's, or one a test made: `altest*`); older ones made it at the
    // top.
    if let Some(mount) = allowlist::sys::cgroup2_mount() {
        let mine = format!("{PREFIX}{}", std::process::id() % 10000);
        let stale = |name: &str| {
            let bare = name.strip_prefix("allowlistd-").unwrap_or(name);
            bare.starts_with(PREFIX) && !bare.starts_with(&mine)
        };
        let mut bases = vec![mount.clone()];
        if let Ok(own) = allowlist::kernel::own_cgroup()
            && own != std::path::Path::new("/")
        {
            bases.push(mount.join(own.strip_prefix("/").unwrap_or(&own)));
        }
        for base in bases {
            let Ok(dir) = std::fs::read_dir(&base) else {
                continue;
            };
            for e in dir.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if !stale(&name) {
                    continue;
                }
                // A test's cgroup may hold its daemon's child cgroup.
                if let Ok(inner) = std::fs::read_dir(e.path()) {
                    for i in inner.flatten() {
                        if i.file_name().to_string_lossy().starts_with("allowlistd-") {
                            let _ = std::fs::remove_dir(i.path());
                        }
                    }
                }
                let _ = std::fs::remove_dir(e.path());
            }
        }
    }
    if let Ok(dir) = std::fs::read_dir("/sys/fs/bpf") {
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(PREFIX)
                && !name.contains(&format!("{PREFIX}{}", std::process::id() % 10000))
            {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

/// A network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: String) -> Netns {
        run(&["ip", "netns", "add", &name]);
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn path(&self) -> String {
        format!("/var/run/netns/{}", self.name)
    }

    /// `ip -n NAME ...`
    pub fn ip(&self, args: &[&str]) {
        let mut full = vec!["ip", "-n", &self.name];
        full.extend_from_slice(args);
        run(&full);
    }

    /// The MAC address of `dev` in this namespace.
    pub fn mac(&self, dev: &str) -> String {
        let out = Command::new("ip")
            .args(["-n", &self.name, "-br", "link", "show", dev])
            .output()
            .expect("ip link show");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.split_whitespace()
            .nth(2)
            .unwrap_or_else(|| panic!("no MAC for {dev}: {text}"))
            .to_string()
    }

    /// Runs `f` on a thread that has entered this namespace.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.spawn(f).join().expect("thread in netns panicked")
    }

    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> JoinHandle<T> {
        let file = File::open(self.path()).expect("open netns");
        std::thread::spawn(move || {
            // SAFETY: setns on this thread only; the fd is a netns file.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Two namespaces joined by a veth pair: `client` (`vc`) and `server`
/// (`vs`). Both hold addresses in 198.51.100.0/24, 203.0.113.0/24 and
/// 2001:db8:1::/64; the server is `.1` / `::1`.
pub struct Pair {
    pub client: Netns,
    pub server: Netns,
}

pub const SERVER_V4: &str = "198.51.100.1";
pub const SERVER_V4_B: &str = "203.0.113.1";
pub const SERVER_V6: &str = "2001:db8:1::1";
/// Interface name of the server end.
pub const SERVER_IF: &str = "vs";

impl Pair {
    pub fn new() -> Pair {
        let client = Netns::new(crate::unique("c"));
        let server = Netns::new(crate::unique("s"));
        run(&[
            "ip",
            "-n",
            &client.name,
            "link",
            "add",
            "vc",
            "type",
            "veth",
            "peer",
            "name",
            "vs",
            "netns",
            &server.name,
        ]);
        for (ns, dev) in [(&client, "vc"), (&server, "vs")] {
            ns.ip(&["link", "set", dev, "up"]);
        }
        server.ip(&["addr", "add", "198.51.100.1/24", "dev", "vs"]);
        server.ip(&["addr", "add", "203.0.113.1/24", "dev", "vs"]);
        server.ip(&[
            "-6",
            "addr",
            "add",
            "2001:db8:1::1/64",
            "dev",
            "vs",
            "nodad",
        ]);
        Pair { client, server }
    }

    /// Gives the client another source address (v4 /24 or v6 /64 subnet).
    pub fn client_addr(&self, addr: &str) {
        let cidr = if addr.contains(':') {
            format!("{addr}/64")
        } else {
            format!("{addr}/24")
        };
        let mut args = vec!["addr", "add", cidr.as_str(), "dev", "vc"];
        if addr.contains(':') {
            args.push("nodad");
        }
        self.client.ip(&args);
    }
}

impl Default for Pair {
    fn default() -> Self {
        Pair::new()
    }
}

/// A TCP server in a namespace that accepts and answers "ok\n".
pub struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    pub fn start(ns: &Netns, port: u16) -> Server {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = ns.spawn(move || {
            let sock =
                Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP)).expect("socket");
            sock.set_only_v6(false).expect("dual stack");
            sock.set_reuse_address(true).expect("reuse");
            sock.bind(&SocketAddr::from(([0u16; 8], port)).into())
                .expect("bind");
            sock.listen(128).expect("listen");
            let listener: TcpListener = sock.into();
            listener.set_nonblocking(true).expect("nonblocking");
            tx.send(()).expect("ready");
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        let _ = s.set_nonblocking(false);
                        let _ = s.write_all(b"ok\n");
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(5))
            .expect("server did not start");
        Server {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Outcome of one TCP connection attempt.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum Connect {
    /// Handshake done (a test server's greeting, if any, is not awaited).
    Ok,
    /// No answer at all within the timeout (dropped).
    Silent,
    /// An RST or ICMP error came back.
    Refused,
}

/// Connects from `src` to `dst:port` inside `ns`, with `timeout`.
pub fn connect(ns: &Netns, src: &str, dst: &str, port: u16, timeout: Duration) -> Connect {
    let src: IpAddr = src.parse().expect("src");
    let dst: IpAddr = dst.parse().expect("dst");
    ns.run(move || {
        let domain = if dst.is_ipv4() {
            Domain::IPV4
        } else {
            Domain::IPV6
        };
        let sock = Socket::new(domain, Type::STREAM, Some(Protocol::TCP)).expect("socket");
        sock.bind(&SocketAddr::new(src, 0).into())
            .expect("bind source");
        match sock.connect_timeout(&SocketAddr::new(dst, port).into(), timeout) {
            Ok(()) => Connect::Ok,
            Err(e)
                if e.kind() == std::io::ErrorKind::TimedOut
                    || e.kind() == std::io::ErrorKind::WouldBlock =>
            {
                Connect::Silent
            }
            Err(_) => Connect::Refused,
        }
    })
}

/// Sends `count` UDP datagrams from `src` to `dst:port` inside `ns`.
pub fn udp_send(ns: &Netns, src: &str, dst: &str, port: u16, count: usize) {
    let src: IpAddr = src.parse().expect("src");
    let dst: IpAddr = dst.parse().expect("dst");
    ns.run(move || {
        let domain = if dst.is_ipv4() {
            Domain::IPV4
        } else {
            Domain::IPV6
        };
        let sock = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP)).expect("socket");
        sock.bind(&SocketAddr::new(src, 0).into()).expect("bind");
        let to = SocketAddr::new(dst, port).into();
        for _ in 0..count {
            sock.send_to(b"x", &to).expect("send");
        }
    });
}

/// Waits until `f` holds, polling every 20 ms, at most `limit`.
pub fn wait_for(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    f()
}

/// A minimal HTTP/1.1 upstream in a namespace: answers every request with
/// JSON describing what it received (`path`, `version`, and the request
/// headers it saw), one request per connection.
pub struct Upstream {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Upstream {
    pub fn start(ns: &Netns, port: u16) -> Upstream {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = ns.spawn(move || {
            let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind upstream");
            listener.set_nonblocking(true).expect("nonblocking");
            tx.send(()).expect("ready");
            while !flag.load(Ordering::Relaxed) {
                let Ok((mut s, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(2));
                    continue;
                };
                std::thread::spawn(move || {
                    use std::io::Read;
                    let _ = s.set_nonblocking(false);
                    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut chunk) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let text = String::from_utf8_lossy(&buf).into_owned();
                    let mut lines = text.split("\r\n");
                    let request = lines.next().unwrap_or("").to_string();
                    let mut parts = request.split(' ');
                    let (method, path, version) = (
                        parts.next().unwrap_or(""),
                        parts.next().unwrap_or(""),
                        parts.next().unwrap_or(""),
                    );
                    let headers: serde_json::Map<String, serde_json::Value> = lines
                        .take_while(|l| !l.is_empty())
                        .filter_map(|l| l.split_once(':'))
                        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().into()))
                        .collect();
                    if path.starts_with("/stream") {
                        // A long download: a chunk every 20 ms, at most 10 s.
                        let _ = write!(s, "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n");
                        for _ in 0..500 {
                            if write!(s, "6\r\nchunk\n\r\n").is_err() {
                                return;
                            }
                            std::thread::sleep(Duration::from_millis(20));
                        }
                        let _ = write!(s, "0\r\n\r\n");
                        return;
                    }
                    let body = serde_json::json!({ "method": method, "path": path, "version": version, "headers": headers })
                        .to_string();
                    let _ = write!(
                        s,
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                });
            }
        });
        rx.recv_timeout(Duration::from_secs(5))
            .expect("upstream did not start");
        Upstream {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What curl got.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub http_version: String,
    /// Lower-cased header lines of the (last) response.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|_| panic!("not JSON: {}", self.body))
    }
}

/// Runs curl in `ns` from source `src` (TLS verification off: the edge
/// uses a self-signed certificate here), bounded to 10 s.
pub fn curl(ns: &Netns, src: &str, url: &str, args: &[&str]) -> Reply {
    let dir = tempfile::tempdir().expect("tempdir");
    let hdr = dir.path().join("h");
    let out = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns.name,
            "curl",
            "-skS",
            "--max-time",
            "10",
            "--interface",
            src,
        ])
        .arg("-D")
        .arg(&hdr)
        .args(["-w", "\n%{http_code} %{http_version}"])
        .args(args)
        .arg(url)
        .output()
        .expect("curl must be installed");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, tail) = text.rsplit_once('\n').unwrap_or(("", &text));
    let mut it = tail.split_whitespace();
    let status = it.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let http_version = it.next().unwrap_or("").to_string();
    let raw = std::fs::read_to_string(&hdr).unwrap_or_default();
    let last = raw
        .rsplit("\r\n\r\n")
        .find(|b| b.starts_with("HTTP/"))
        .unwrap_or("");
    let headers = last
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Reply {
        status,
        http_version,
        headers,
        // A failed transfer says why instead.
        body: if status == 0 {
            format!(
                "curl exit {:?}: {}",
                out.status.code(),
                String::from_utf8_lossy(&out.stderr)
            )
        } else {
            body.to_string()
        },
    }
}

/// Runs a script with Debian's `/usr/bin/python3` (which has Debian's
/// httpx, h2, hyperframe and scapy) in `ns`, bounded to `secs`; returns
/// its trimmed stdout, with the exit status and stderr appended when it
/// failed.
pub fn python(ns: &Netns, secs: u32, script: &str) -> String {
    let out = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns.name,
            "timeout",
            &secs.to_string(),
            "/usr/bin/python3",
            "-c",
            script,
        ])
        .output()
        .expect("ip netns exec python3");
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if out.status.success() {
        stdout
    } else {
        format!(
            "{stdout} [exit {:?}: {}]",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        )
    }
}
