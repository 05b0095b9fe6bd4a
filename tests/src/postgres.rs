//! A private PostgreSQL server for one test: its own data folder under
//! /tmp, owned by the `postgres` user (the server refuses to run as root),
//! listening on 127.0.0.1 at a free port and on a socket in that folder.
//! It can be stopped and started again (the outage tests), and is stopped
//! and removed by `Drop`.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

/// Where Debian's `postgresql` package puts the server's programs.
fn bin_dir() -> Option<PathBuf> {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("postgres").is_file() && p.join("initdb").is_file())
        .collect();
    versions.sort();
    versions.pop()
}

/// Whether a server can be started here; without one the test is skipped
/// (a failure under `CI=true`).
pub fn postgres_available(test: &str) -> bool {
    let server = bin_dir()
        .map(|b| b.join("postgres").display().to_string())
        .unwrap_or_else(|| "/usr/lib/postgresql/15/bin/postgres".into());
    crate::tool_available(test, &server, "postgresql")
        && crate::tool_available(test, "runuser", "util-linux")
}

pub const USER: &str = "allowlist";
/// The test server's password: the URL carries it, and the tests check it
/// never appears in an error.
pub const PASSWORD: &str = "pg-test-secret-5d1c";

pub struct PgServer {
    dir: tempfile::TempDir,
    bin: PathBuf,
    pub port: u16,
    running: bool,
}

fn run_as_postgres(bin: &Path, prog: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(bin.join(prog))
        .args(args)
        .output()
        .map_err(|e| format!("{prog}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{prog} {args:?}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

impl PgServer {
    /// initdb and start; panics with the server's own message on failure.
    pub fn start() -> PgServer {
        let bin = bin_dir().expect("postgresql is installed (postgres_available)");
        let dir = tempfile::Builder::new()
            .prefix(&format!("{}-pg-", crate::PREFIX))
            .tempdir_in("/tmp")
            .expect("temp dir");
        let chown = |p: &Path| {
            let st = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(p)
                .status()
                .expect("chown");
            assert!(st.success(), "chown {}", p.display());
        };
        std::fs::write(dir.path().join("pwfile"), PASSWORD).unwrap();
        chown(dir.path());
        let data = dir.path().join("data");
        let pwfile = dir.path().join("pwfile");
        run_as_postgres(
            &bin,
            "initdb",
            &[
                "-D",
                data.to_str().unwrap(),
                "-U",
                USER,
                "--pwfile",
                pwfile.to_str().unwrap(),
                "--auth-host=scram-sha-256",
                "--auth-local=trust",
                "--encoding=UTF8",
                "--locale=C.UTF-8",
                "--no-sync",
            ],
        )
        .expect("initdb");
        let mut server = PgServer {
            dir,
            bin,
            port: free_port(),
            running: false,
        };
        server.resume();
        server
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Starts the server (again), on the same port, and waits until it
    /// takes connections.
    pub fn resume(&mut self) {
        let opts = format!(
            "-c listen_addresses=127.0.0.1 -c port={} -c unix_socket_directories={} -c max_connections=100",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("server.log");
        run_as_postgres(
            &self.bin,
            "pg_ctl",
            &[
                "-D",
                self.data().to_str().unwrap(),
                "-l",
                log.to_str().unwrap(),
                "-o",
                &opts,
                "-w",
                "-t",
                "30",
                "start",
            ],
        )
        .unwrap_or_else(|e| {
            panic!(
                "{e}\nserver log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        });
        self.running = true;
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("PostgreSQL did not listen on 127.0.0.1:{}", self.port);
    }

    /// Stops the server at once (connections are cut, as in an outage).
    pub fn stop(&mut self) {
        if !self.running {
            return;
        }
        let _ = run_as_postgres(
            &self.bin,
            "pg_ctl",
            &[
                "-D",
                self.data().to_str().unwrap(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        );
        self.running = false;
    }

    /// Runs SQL as the superuser over the server's socket.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let sock = self.dir.path().display().to_string();
        let port = self.port.to_string();
        run_as_postgres(
            &self.bin,
            "psql",
            &[
                "-h",
                &sock,
                "-p",
                &port,
                "-U",
                USER,
                "-d",
                db,
                "-XAtq",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                sql,
            ],
        )
        .unwrap_or_else(|e| panic!("{e}"))
    }

    /// A new, empty database; returns its URL (TCP, password, no TLS).
    pub fn create_db(&self, name: &str) -> String {
        self.psql("postgres", &format!("CREATE DATABASE \"{name}\""));
        self.url(name)
    }

    /// The URL over the server's Unix socket: reachable from any network
    /// namespace (a socket file is not in one), so edges in their own
    /// namespaces share the server.
    pub fn unix_url(&self, db: &str) -> String {
        let sock = self.dir.path().display().to_string().replace('/', "%2F");
        format!(
            "postgres://{USER}:{PASSWORD}@{sock}:{}/{db}?sslmode=disable",
            self.port
        )
    }

    pub fn url(&self, db: &str) -> String {
        format!(
            "postgres://{USER}:{PASSWORD}@127.0.0.1:{}/{db}?sslmode=disable",
            self.port
        )
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.stop();
    }
}
