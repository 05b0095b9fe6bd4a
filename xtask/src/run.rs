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
    fn kernel_enabled_only_in_kernel_table() {
        assert!(!kernel_enabled("[proxy]\nenabled = true\n[kernel]\n"));
        assert!(kernel_enabled("[kernel]\n  enabled=true # on\n"));
        assert!(!kernel_enabled("[kernel]\nenabled = false\n"));
    }
}
