//! `cargo xtask run`: the daemon in the foreground with a dev config kept in
//! `.run/`, cleaned up (pins removed) when the user stops it.

use std::{
    ffi::OsString,
    fs,
    os::unix::process::{CommandExt, ExitStatusExt},
    path::Path,
    process::{Command, ExitStatus},
};

use anyhow::{Context, Result, bail};

use crate::{Repo, build, is_root, say, status};

pub fn run(repo: &Repo, release: bool, extra: &[OsString]) -> Result<()> {
    build(repo, release)?;
    let run_dir = repo.root.join(".run");
    fs::create_dir_all(&run_dir).with_context(|| format!("cannot create {}", run_dir.display()))?;
    let config_path = run_dir.join("allowlist.toml");
    let root = is_root();
    if !config_path.exists() {
        fs::write(&config_path, dev_config(&run_dir, root)?)
            .with_context(|| format!("cannot write {}", config_path.display()))?;
        say("run", format_args!("wrote {}", config_path.display()));
    }
    let config = fs::read_to_string(&config_path)
        .with_context(|| format!("cannot read {}", config_path.display()))?;
    let kernel = root && kernel_enabled(&config);

    say(
        "run",
        match (root, kernel) {
            (false, _) => "kernel layer: off (not root, passing --no-kernel)",
            (true, false) => "kernel layer: off (disabled in .run/allowlist.toml)",
            (true, true) => "kernel layer: on (removed again with --unload on exit)",
        },
    );
    say(
        "run",
        format_args!("from another terminal in {}, try:", repo.root.display()),
    );
    let profile = if release { "release" } else { "debug" };
    for sub in [
        "keys create --name demo --allow 127.0.0.1 --rate 100/minute",
        "keys list",
        "blocking show",
        "drop add 203.0.113.0/24 --ttl 10m",
        "stats",
    ] {
        eprintln!("    target/{profile}/allowlistctl --socket .run/admin.sock {sub}");
    }
    eprintln!(
        "    curl -k https://127.0.0.1:8443/ -H 'api-key: <the key printed by keys create>'   \
         # 502 until an upstream listens on 127.0.0.1:8080"
    );
    say("run", "starting allowlistd; Ctrl-C stops it");

    let daemon = repo.bin_dir(release).join("allowlistd");
    let mut cmd = daemon_cmd(&daemon, &config_path, repo);
    if !root {
        cmd.arg("--no-kernel");
    }
    cmd.args(extra);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start {}", daemon.display()))?;
    let ctl = repo.bin_dir(release).join("allowlistctl");
    let console = console_url(&config);
    let (dir, ctl_path) = (run_dir.clone(), ctl.clone());
    std::thread::spawn(move || match console {
        Some(url) => match console_token(&dir, &ctl_path) {
            Ok(file) => say(
                "run",
                format_args!(
                    "web console: open {url} and sign in with the token in {} \
                     (the certificate is self-signed: accept it once)",
                    file.display()
                ),
            ),
            Err(e) => say("run", format_args!("no console token: {e:#}")),
        },
        None => say(
            "run",
            "web console: off; set [admin] listen in .run/allowlist.toml \
             (or delete the file to regenerate it with the console on)",
        ),
    });
    // The terminal sends Ctrl-C to the whole foreground process group, so the
    // daemon gets it directly; xtask only has to survive it to clean up.
    // SAFETY: installing SIG_IGN has no preconditions.
    unsafe { libc::signal(libc::SIGINT, libc::SIG_IGN) };
    let st = child.wait().context("waiting for allowlistd")?;

    let unloaded = if kernel {
        say("run", "removing the dev run's pins: allowlistd --unload");
        status(daemon_cmd(&daemon, &config_path, repo).arg("--unload"))
    } else {
        Ok(())
    };
    if !stopped_by_user(st) {
        bail!("allowlistd exited with {st}");
    }
    unloaded
}

fn daemon_cmd(daemon: &Path, config: &Path, repo: &Repo) -> Command {
    let mut cmd = Command::new(daemon);
    cmd.arg("--config").arg(config).current_dir(&repo.root);
    // A terminal started by a systemd user service passes these on; a dev
    // run is no unit, and must take a child cgroup of its own rather than
    // hook the terminal's.
    cmd.env_remove("INVOCATION_ID").env_remove("NOTIFY_SOCKET");
    // The child would inherit xtask's ignored SIGINT across exec, and the
    // daemon must see the terminal's Ctrl-C.
    // SAFETY: signal() is async-signal-safe, so it may run between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            Ok(())
        });
    }
    cmd
}

/// A daemon stopped with Ctrl-C exits 0, or dies of SIGINT if it had not yet
/// installed its handler; neither is a failure of the run.
fn stopped_by_user(st: ExitStatus) -> bool {
    st.success() || st.signal() == Some(libc::SIGINT) || st.code() == Some(130)
}

/// Laptop-safe defaults: loopback only, state inside the checkout, and the
/// kernel layer only when we could load it anyway.
fn dev_config(run_dir: &Path, kernel: bool) -> Result<String> {
    let dir = run_dir
        .to_str()
        .context("the repository path is not UTF-8; the dev config cannot name it")?;
    Ok(format!(
        "# Written by `cargo xtask run`; edit freely, delete to regenerate.\n\
         [proxy]\n\
         listen = \"127.0.0.1:8443\"\n\
         upstream = \"http://127.0.0.1:8080\"\n\
         [admin]\n\
         socket = {socket}\n\
         listen = \"127.0.0.1:9443\"\n\
         [store]\n\
         url = {store}\n\
         [kernel]\n\
         enabled = {kernel}\n\
         interfaces = []\n\
         bpffs = \"/sys/fs/bpf/allowlist-dev\"\n\
         [metrics]\n\
         listen = \"127.0.0.1:9477\"\n",
        socket = toml_str(&format!("{dir}/admin.sock")),
        store = toml_str(&format!("sqlite://{dir}/allowlist.db")),
    ))
}

/// The console's address when the config's `[admin]` table has a
/// `listen` (a line scan, as for `[kernel] enabled`).
fn console_url(config: &str) -> Option<String> {
    let mut in_admin = false;
    for line in config.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.starts_with('[') {
            in_admin = line == "[admin]";
        } else if in_admin
            && let Some((k, v)) = line.split_once('=')
            && k.trim() == "listen"
        {
            let addr = v.trim().trim_matches('"');
            return (!addr.is_empty()).then(|| format!("https://{addr}/console/"));
        }
    }
    None
}

/// An operator token for the dev console, made once over the admin socket
/// and kept in `.run/console.token` (mode 0600); made again when the store
/// no longer knows it (the dev store was deleted, or it was revoked).
fn console_token(run_dir: &Path, ctl: &Path) -> Result<std::path::PathBuf> {
    use std::os::unix::fs::OpenOptionsExt;
    let socket = run_dir.join("admin.sock");
    let file = run_dir.join("console.token");
    let ctl_json = |args: &[&str]| -> Result<serde_json::Value> {
        let out = Command::new(ctl)
            .arg("--socket")
            .arg(&socket)
            .arg("--json")
            .args(args)
            .output()
            .with_context(|| format!("running {}", ctl.display()))?;
        if !out.status.success() {
            bail!("{}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    };
    // The daemon opens its socket within a few seconds of starting.
    let mut tokens = None;
    for _ in 0..100 {
        if let Ok(t) = ctl_json(&["tokens", "list"]) {
            tokens = Some(t);
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(150));
    }
    let tokens = tokens.context("the daemon's admin socket did not answer within 15 s")?;
    if let Ok(kept) = fs::read_to_string(&file) {
        let id = kept.trim().split('_').nth(1).unwrap_or("");
        let live = tokens["tokens"].as_array().is_some_and(|list| {
            list.iter()
                .any(|t| t["id"] == id && t["revoked_at"].is_null())
        });
        if live {
            return Ok(file);
        }
    }
    let made = ctl_json(&[
        "tokens",
        "create",
        "--operator",
        "--name",
        "dev console (cargo xtask run)",
    ])?;
    let token = made["token"]
        .as_str()
        .context("tokens create gave no token")?;
    let _ = fs::remove_file(&file);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&file)
        .with_context(|| format!("cannot write {}", file.display()))?;
    std::io::Write::write_all(&mut f, format!("{token}\n").as_bytes())?;
    Ok(file)
}

/// Quotes a string as a TOML basic string.
fn toml_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Whether the config's [kernel] table says `enabled = true`. A line scan is
/// enough for the dev config and keeps a TOML parser out of xtask.
fn kernel_enabled(config: &str) -> bool {
    let mut in_kernel = false;
    for line in config.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.starts_with('[') {
            in_kernel = line == "[kernel]";
        } else if in_kernel
            && let Some((k, v)) = line.split_once('=')
            && k.trim() == "enabled"
        {
            return v.trim() == "true";
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_config_kernel_flag_reads_back() {
        for kernel in [true, false] {
            let text = dev_config(Path::new("/tmp/a \"b\"/.run"), kernel).unwrap();
            assert_eq!(kernel_enabled(&text), kernel);
            assert!(text.contains(r#"socket = "/tmp/a \"b\"/.run/admin.sock""#));
        }
    }

    #[test]
    fn the_console_url_comes_from_admin_listen() {
        let text = dev_config(Path::new("/tmp/x/.run"), false).unwrap();
        assert_eq!(
            console_url(&text).as_deref(),
            Some("https://127.0.0.1:9443/console/")
        );
        assert_eq!(
            console_url("[proxy]\nlisten = \"1.2.3.4:1\"\n[admin]\n"),
            None
        );
    }

    #[test]
    fn kernel_enabled_only_in_kernel_table() {
        assert!(!kernel_enabled("[proxy]\nenabled = true\n[kernel]\n"));
        assert!(kernel_enabled("[kernel]\n  enabled=true # on\n"));
        assert!(!kernel_enabled("[kernel]\nenabled = false\n"));
    }
}
