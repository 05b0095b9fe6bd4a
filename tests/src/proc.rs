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
        let log = self
            .dir
            .path()
            .join(format!("daemon-{}.log", crate::unique("")));
        let logf = std::fs::File::create(&log).expect("log file");
        let mut cmd = match ns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net={}", ns.path())).arg(bin(daemon));
                c
            }
            None => Command::new(bin(daemon)),
        };
        let child = cmd
            .arg("--config")
            .arg(&self.config)
            .args(extra)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(logf.try_clone().expect("dup"))
            .stderr(logf)
            .spawn()
            .expect("spawn allowlistd");
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

impl Drop for Setup {
    fn drop(&mut self) {
        if self.bpffs.exists() {
            let _ = std::fs::remove_dir_all(&self.bpffs);
        }
        // The daemon's cgroup (empty once its daemon has stopped).
        if let (Some(mount), Some(name)) = (allowlist::sys::cgroup2_mount(), self.bpffs.file_name())
        {
            let _ = std::fs::remove_dir(
                mount.join(allowlist::kernel::cgroup_name(&name.to_string_lossy())),
            );
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
