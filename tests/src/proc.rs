//! Running the real `allowlistd` and `allowlistctl`.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::Duration,
};

use crate::net::{Netns, wait_for};

/// Folder holding the built binaries: `ALLOWLIST_BIN_DIR`, else the
/// workspace's target/debug.
pub fn bin_dir() -> PathBuf {
    match std::env::var_os("ALLOWLIST_BIN_DIR") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug"),
    }
}

pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: build it first (`cargo xtask build`)",
        p.display()
    );
    p
}

/// A test's own state: config, store, socket and bpffs folder. The bpffs
/// folder is removed on drop (links, programs, maps).
pub struct Setup {
    pub dir: tempfile::TempDir,
    pub bpffs: PathBuf,
    pub config: PathBuf,
}

impl Setup {
    /// Writes a configuration; `extra_kernel` goes into `[kernel]`.
    pub fn new(kernel: bool, extra_kernel: &str) -> Setup {
        let dir = tempfile::Builder::new()
            .prefix(crate::PREFIX)
            .tempdir()
            .expect("tempdir");
        let bpffs = PathBuf::from("/sys/fs/bpf").join(crate::unique("bpf"));
        let config = dir.path().join("allowlist.toml");
        std::fs::write(
            &config,
            format!(
                "[proxy]\nlisten = \"127.0.0.1:0\"\n[admin]\nsocket = \"{sock}\"\n[store]\nurl = \"sqlite://{db}\"\n[metrics]\nlisten = \"127.0.0.1:0\"\n[kernel]\nenabled = {kernel}\nbpffs = \"{bpffs}\"\n{extra_kernel}\n",
                sock = dir.path().join("admin.sock").display(),
                db = dir.path().join("allowlist.db").display(),
                bpffs = bpffs.display(),
            ),
        )
        .expect("write config");
        Setup { dir, bpffs, config }
    }

    /// Replaces the `[proxy]` listener the test config starts with by
    /// `lines` (a `listen = ...` line and any other `[proxy]` keys).
    pub fn proxy(&self, lines: &str) {
        let text = std::fs::read_to_string(&self.config).expect("read config");
        // The first listener in the file is [proxy]'s.
        let text = text.replacen("listen = \"127.0.0.1:0\"", lines, 1);
        std::fs::write(&self.config, text).expect("write config");
    }

    /// Serves `/metrics` on `addr` (tests otherwise get a free port).
    pub fn metrics(&self, addr: &str) {
        let text = std::fs::read_to_string(&self.config).expect("read config");
        let text = text.replace(
            "[metrics]\nlisten = \"127.0.0.1:0\"",
            &format!("[metrics]\nlisten = \"{addr}\""),
        );
        std::fs::write(&self.config, text).expect("write config");
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("admin.sock")
    }

    /// Runs `allowlistctl --socket ... ARGS`.
    pub fn ctl(&self, args: &[&str]) -> Output {
        Command::new(bin("allowlistctl"))
            .arg("--socket")
            .arg(self.socket())
            .args(args)
            .output()
            .expect("run allowlistctl")
    }

    /// Runs `allowlistctl ARGS` and asserts it was refused (exit 1) with a
    /// message containing `needle`.
    pub fn refused(&self, args: &[&str], needle: &str) {
        let out = self.ctl(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(1),
            "allowlistctl {args:?} should be refused: {err}"
        );
        assert!(
            err.contains(needle),
            "allowlistctl {args:?}: {err:?} should mention {needle:?}"
        );
    }

    /// Runs `allowlistctl --json ARGS`, asserts success, parses stdout.
    pub fn ctl_json(&self, args: &[&str]) -> serde_json::Value {
        let mut full = vec!["--json"];
        full.extend_from_slice(args);
        let out = self.ctl(&full);
        assert!(
            out.status.success(),
            "allowlistctl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("allowlistctl --json printed JSON")
    }

    /// Starts `allowlistd` (inside `ns` when given, keeping pins on the
    /// host's bpffs) and waits until its admin API answers.
    pub fn start(&self, ns: Option<&Netns>, extra: &[&str]) -> Daemon {
        self.start_env(ns, extra, &[])
    }

    /// `start` with extra environment variables.
    pub fn start_env(&self, ns: Option<&Netns>, extra: &[&str], env: &[(&str, &str)]) -> Daemon {
        self.start_bin("allowlistd", ns, extra, env)
    }

    /// `start_env` with another build of the daemon: `allowlistd-release`
    /// is the one without test hooks (`cargo xtask test` builds both).
    pub fn start_bin(
        &self,
        daemon: &str,
        ns: Option<&Netns>,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Daemon {
        self.start_with(Start {
            daemon,
            ns,
            extra,
            env,
            ..Start::default()
        })
    }

    /// Starts the daemon as `how` says and waits until its admin API
    /// answers.
    pub fn start_with(&self, how: Start<'_>) -> Daemon {
        let log = self
            .dir
            .path()
            .join(format!("daemon-{}.log", crate::unique("")));
        let logf = std::fs::File::create(&log).expect("log file");
        let mut argv: Vec<std::ffi::OsString> = Vec::new();
        if let Some(ns) = how.ns {
            argv.push("nsenter".into());
            argv.push(format!("--net={}", ns.path()).into());
        }
        argv.extend(how.wrapper.iter().map(Into::into));
        argv.push(bin(how.daemon).into());
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .arg("--config")
            .arg(&self.config)
            .args(how.extra)
            // A test runner started by systemd passes these on; a daemon
            // that saw them would take itself for a systemd unit.
            .env_remove("INVOCATION_ID")
            .env_remove("NOTIFY_SOCKET")
            .envs(how.env.iter().copied())
            .stdin(Stdio::null())
            .stdout(logf.try_clone().expect("dup"))
            .stderr(logf);
        if let Some(cg) = how.cgroup {
            join_cgroup_at_exec(&mut cmd, cg);
        }
        let child = cmd.spawn().expect("spawn allowlistd");
        let mut d = Daemon {
            child: Some(child),
            log,
        };
        let up = wait_for(Duration::from_secs(30), || {
            if let Some(c) = d.child.as_mut()
                && let Ok(Some(_)) = c.try_wait()
            {
                return true;
            }
            self.ctl(&["stats"]).status.success()
        });
        let exited = d.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
        assert!(
            up && exited.is_none(),
            "allowlistd did not start:\n{}",
            d.log_text()
        );
        d
    }
}

/// How [`Setup::start_with`] runs the daemon.
pub struct Start<'a> {
    /// `allowlistd`, or `allowlistd-release` (no test hooks).
    pub daemon: &'a str,
    /// The network namespace it runs in (its pins stay on the host's bpffs).
    pub ns: Option<&'a Netns>,
    pub extra: &'a [&'a str],
    pub env: &'a [(&'a str, &'a str)],
    /// A command the daemon is run through, e.g. `["setpriv", ..., "--"]`.
    pub wrapper: &'a [&'a str],
    /// A cgroup folder (under the cgroup2 mount) the daemon starts in.
    pub cgroup: Option<&'a Path>,
}

impl Default for Start<'_> {
    fn default() -> Self {
        Start {
            daemon: "allowlistd",
            ns: None,
            extra: &[],
            env: &[],
            wrapper: &[],
            cgroup: None,
        }
    }
}

/// Moves the child into `cgroup` between fork and exec, so the daemon
/// starts there as a unit's main process does.
fn join_cgroup_at_exec(cmd: &mut Command, cgroup: &Path) {
    use std::os::unix::{ffi::OsStrExt, process::CommandExt};
    let procs = std::ffi::CString::new(cgroup.join("cgroup.procs").as_os_str().as_bytes())
        .expect("no NUL in a cgroup path");
    // SAFETY: between fork and exec only async-signal-safe calls are made
    // (open, write, close), on a path prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // "0" is the writing process itself.
            let n = libc::write(fd, b"0".as_ptr().cast(), 1);
            let err = std::io::Error::last_os_error();
            libc::close(fd);
            if n != 1 {
                return Err(err);
            }
            Ok(())
        });
    }
}

/// A cgroup made for one test under the cgroup2 mount (a unit's cgroup, as
/// far as the daemon can tell); removed on drop with the child cgroup a
/// daemon may have made in it.
pub struct TestCgroup {
    pub dir: PathBuf,
    /// Relative to the mount, starting with `/`, as /proc/PID/cgroup shows it.
    pub path: PathBuf,
}

impl TestCgroup {
    pub fn new() -> TestCgroup {
        let mount = allowlist::sys::cgroup2_mount().expect("a cgroup2 mount");
        let name = crate::unique("cg");
        let dir = mount.join(&name);
        std::fs::create_dir(&dir).expect("creating a test cgroup");
        TestCgroup {
            dir,
            path: Path::new("/").join(name),
        }
    }
}

impl Default for TestCgroup {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        if let Ok(inner) = std::fs::read_dir(&self.dir) {
            for i in inner.flatten() {
                if i.file_name().to_string_lossy().starts_with("allowlistd-") {
                    let _ = std::fs::remove_dir(i.path());
                }
            }
        }
        // A stopped daemon leaves the cgroup a moment after it exits.
        wait_for(Duration::from_secs(5), || {
            std::fs::remove_dir(&self.dir).is_ok() || !self.dir.exists()
        });
    }
}

/// `text` without ANSI escape sequences (`ESC [ ... letter`).
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for e in chars.by_ref() {
                if e.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The cgroup (v2) process `pid` is in, as /proc/PID/cgroup says.
pub fn cgroup_of(pid: u32) -> PathBuf {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("read cgroup");
    let path = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .expect("a cgroup v2 line");
    PathBuf::from(path.trim())
}

impl Drop for Setup {
    fn drop(&mut self) {
        if self.bpffs.exists() {
            let _ = std::fs::remove_dir_all(&self.bpffs);
        }
        // The child cgroup a daemon started from here made (empty once
        // it has stopped): under this process's own cgroup.
        if let (Some(mount), Some(name), Ok(own)) = (
            allowlist::sys::cgroup2_mount(),
            self.bpffs.file_name(),
            allowlist::kernel::own_cgroup(),
        ) {
            let child = own.join(allowlist::kernel::child_cgroup_name(
                &name.to_string_lossy(),
            ));
            let _ = std::fs::remove_dir(mount.join(child.strip_prefix("/").unwrap_or(&child)));
        }
    }
}

/// A running daemon; stopped with SIGTERM on drop.
pub struct Daemon {
    child: Option<Child>,
    log: PathBuf,
}

impl Daemon {
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The log without its terminal colours, for matching `field=value`.
    pub fn log_plain(&self) -> String {
        strip_ansi(&self.log_text())
    }

    /// SIGHUP: the daemon reads its configuration again.
    pub fn hup(&self) {
        if let Some(c) = &self.child {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGHUP) };
        }
    }

    /// SIGKILL: no cleanup of any kind.
    pub fn kill9(mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait (bounded).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let done = wait_for(Duration::from_secs(10), || {
                matches!(c.try_wait(), Ok(Some(_)))
            });
            if !done {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}
