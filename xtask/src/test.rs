//! `cargo xtask test` and `cargo xtask bench`.

use std::{
    ffi::OsString,
    io::{BufRead, BufReader, IsTerminal},
    process::{ExitCode, Stdio},
};

use anyhow::{Context, Result, bail};
use clap::ValueEnum;

use crate::{Repo, build, cmd, describe, ensure_bpffs, fix, output, say, setup::setup, status};

#[derive(Clone, Copy, ValueEnum)]
pub enum Suite {
    Kernel,
    /// Bulk kernel map writes (the drop list, the policy maps): batch map
    /// commands against one syscall per entry.
    Writes,
    Policy,
    Edge,
    /// The usage log: writer rows/s, CSV export rows/s and memory.
    Logs,
    /// Two edges on one PostgreSQL: change-to-enforced on the other edge,
    /// cold start from the server.
    Store,
}

pub fn test(repo: &Repo, quick: bool, extra: &[OsString]) -> Result<()> {
    setup(repo)?;
    if !quick {
        for (name, line) in [
            ("fmt", "fmt --all --check"),
            (
                "clippy (workspace)",
                "clippy --workspace --exclude allowlist-ebpf --all-targets -- -D warnings",
            ),
        ] {
            let mut cmd = repo.cargo(line)?;
            say("test", format_args!("{name}: {}", describe(&cmd)));
            status(&mut cmd).with_context(|| format!("test step '{name}' failed"))?;
        }
        clippy_ebpf(repo).context("test step 'clippy (eBPF)' failed")?;
    }

    // The daemon without test hooks, as a release has it, for the test
    // that checks they are absent; then the binaries the tests drive.
    let mut plain = repo.cargo("build -p allowlist-user --bin allowlistd")?;
    say("test", format_args!("build: {}", describe(&plain)));
    status(&mut plain).context("test step 'build' failed")?;
    let bins = repo.bin_dir(false);
    std::fs::copy(bins.join("allowlistd"), bins.join("allowlistd-release"))
        .context("copying allowlistd to allowlistd-release")?;
    let mut build = repo.cargo("build -p allowlist-user --bins --features test-hooks")?;
    say("test", format_args!("build: {}", describe(&build)));
    status(&mut build).context("test step 'build' failed")?;

    if crate::is_root() {
        ensure_tools("test", TEST_TOOLS).context("test step 'tools' failed")?;
    }
    ensure_bpffs().context("test step 'mount bpffs' failed")?;
    let axe = crate::axe::ensure_axe(repo).context("test step 'axe-core' failed")?;

    // Before a further `--`: cargo's own arguments (a filter, -p, --test);
    // after it: the test binaries' arguments.
    let (cargo_args, bin_args) = match extra.iter().position(|a| a == "--") {
        Some(i) => (&extra[..i], &extra[i + 1..]),
        None => (extra, &[][..]),
    };
    // cargo ignores -p when --workspace is given, so a package the user
    // picks replaces the workspace-wide selection.
    let picks_package = cargo_args
        .iter()
        .any(|a| a == "-p" || a == "--package" || a.to_string_lossy().starts_with("--package="));
    let mut cmd = repo.cargo("test --no-fail-fast")?;
    if !picks_package {
        cmd.args(["--workspace", "--exclude", "allowlist-ebpf"]);
    }
    // One thread: kernel tests share the kernel (maps, pins, namespaces).
    cmd.args(cargo_args)
        .args(["--", "--test-threads=1"])
        .args(bin_args)
        .env("ALLOWLIST_BIN_DIR", repo.bin_dir(false))
        .env("ALLOWLIST_AXE", &axe);
    // Tests that cannot run here (not root) write their names to this
    // file; libtest can only count them as passed, so they are moved to
    // "skipped" below.
    let skip_log = repo.root.join("target").join("skipped-tests.txt");
    let _ = std::fs::remove_file(&skip_log);
    cmd.env("ALLOWLIST_SKIP_LOG", &skip_log);
    say("test", format_args!("tests: {}", describe(&cmd)));
    let (mut passed, failed, mut skipped, result) = run_counting(&mut cmd);
    let skips: Vec<String> = std::fs::read_to_string(&skip_log)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect();
    if !skips.is_empty() {
        say(
            "test",
            format_args!(
                "SKIPPED (not root, or a tool missing; each test printed why): {}",
                skips.join(", ")
            ),
        );
        passed = passed.saturating_sub(skips.len() as u64);
        skipped += skips.len() as u64;
    }
    if result.is_ok() {
        say("test", "all steps passed");
    }
    // One plain closing line over every test binary (cargo's own last line
    // is the doc-tests', usually "0 passed").
    println!("summary: {passed} passed, {failed} failed, {skipped} skipped");
    result.context("test step 'tests' failed")
}

/// Runs `cmd`, echoing its stdout, and adds up cargo's `test result:`
/// lines: (passed, failed, ignored, exit status).
fn run_counting(cmd: &mut std::process::Command) -> (u64, u64, u64, Result<()>) {
    use std::io::{BufRead, BufReader};
    let mut child = match cmd.stdout(std::process::Stdio::piped()).spawn() {
        Ok(c) => c,
        Err(e) => {
            return (
                0,
                0,
                0,
                Err(anyhow::anyhow!("spawning {}: {e}", describe(cmd))),
            );
        }
    };
    let (mut passed, mut failed, mut ignored) = (0, 0, 0);
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            println!("{line}");
            if let Some(rest) = line.strip_prefix("test result: ") {
                for part in rest.split(';') {
                    let mut words = part.split_whitespace().rev();
                    let (Some(what), Some(n)) = (words.next(), words.next()) else {
                        continue;
                    };
                    let n: u64 = n.parse().unwrap_or(0);
                    match what {
                        "passed" => passed += n,
                        "failed" => failed += n,
                        "ignored" => ignored += n,
                        _ => {}
                    }
                }
            }
        }
    }
    let result = match child.wait() {
        Ok(st) if st.success() => Ok(()),
        Ok(st) => Err(anyhow::anyhow!("`{}` failed ({st})", describe(cmd))),
        Err(e) => Err(anyhow::anyhow!("waiting for {}: {e}", describe(cmd))),
    };
    (passed, failed, ignored, result)
}

/// Lints the eBPF crate for its real target: in the workspace run, feature
/// unification would give it std through allowlist-common's `user` feature.
/// A nightly whose clippy is missing or crashes gets a warning rather than a
/// failure, since nightly breakage is outside this project's control; lint
/// errors still fail.
fn clippy_ebpf(repo: &Repo) -> Result<()> {
    let has_clippy = || output(&mut cmd("cargo +nightly clippy --version")).is_some();
    if !has_clippy() {
        say("test", "clippy for nightly: missing, installing");
        let added = fix(
            "adding clippy to nightly",
            "rustup component add clippy --toolchain nightly",
        );
        if added.is_err() || !has_clippy() {
            say(
                "test",
                "WARNING: no clippy for nightly, so the eBPF crate was NOT linted \
                 (fix: rustup component add clippy --toolchain nightly)",
            );
            return Ok(());
        }
    }
    let mut cmd = repo.cargo(
        "+nightly clippy -p allowlist-ebpf --target bpfel-unknown-none \
         -Z build-std=core --release",
    )?;
    // Its stderr goes through a pipe (to spot a compiler crash), which would
    // otherwise turn cargo's colours off.
    if std::io::stderr().is_terminal() {
        cmd.arg("--color=always");
    }
    cmd.args(["--", "-D", "warnings"]);
    say("test", format_args!("clippy (eBPF): {}", describe(&cmd)));
    let mut child = cmd
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start `{}`", describe(&cmd)))?;
    let mut crashed = false;
    if let Some(err) = child.stderr.take() {
        for line in BufReader::new(err).lines() {
            let line = line.context("reading clippy's output")?;
            crashed |= line.contains("internal compiler error")
                || line.contains("the compiler unexpectedly panicked");
            eprintln!("{line}");
        }
    }
    let st = child.wait().context("waiting for clippy")?;
    if st.success() {
        Ok(())
    } else if crashed {
        say(
            "test",
            "WARNING: clippy crashed on the eBPF target with this nightly, so \
             the eBPF crate was NOT linted; continuing",
        );
        Ok(())
    } else {
        bail!("`{}` failed ({st})", describe(&cmd))
    }
}

pub fn bench(repo: &Repo, suite: Suite) -> Result<ExitCode> {
    let name = match suite {
        Suite::Kernel => "kernel",
        Suite::Writes => "writes",
        Suite::Policy => "policy",
        Suite::Edge => "edge",
        Suite::Logs => "logs",
        Suite::Store => "store",
    };
    build(repo, true)?;
    ensure_bpffs()?;
    bench_tools(suite)?;
    let mut cmd = repo.cargo(&format!(
        "test --release -p allowlist-tests --test bench_{name} \
         -- --ignored --nocapture --test-threads=1"
    ))?;
    cmd.env("ALLOWLIST_BIN_DIR", repo.bin_dir(true))
        .env("ALLOWLIST_BENCH_OUT", repo.root.join("BENCHMARKS.md"));
    say("bench", describe(&cmd));
    status(&mut cmd).with_context(|| format!("bench {name} failed"))?;
    Ok(ExitCode::SUCCESS)
}

/// Installs (Debian packages, as root) the programs a benchmark drives but
/// the tests do not, or says what to install.
fn bench_tools(suite: Suite) -> Result<()> {
    // (command, Debian package)
    let tools: &[(&str, &str)] = match suite {
        Suite::Kernel => &[("trafgen", "netsniff-ng"), ("nft", "nftables")],
        Suite::Policy | Suite::Writes => &[],
        Suite::Logs => &[("ls /usr/lib/postgresql/*/bin/postgres", "postgresql")],
        Suite::Store => &[("ls /usr/lib/postgresql/*/bin/postgres", "postgresql")],
        Suite::Edge => &[
            ("nginx", "nginx"),
            ("wrk", "wrk"),
            ("openssl", "openssl"),
            ("trafgen", "netsniff-ng"),
        ],
    };
    ensure_tools("bench", tools)
}

/// The programs the tests drive: namespaces and veth (iproute2), nsenter
/// and setpriv, bpftool, trafgen, nft, a real balancer (HAProxy), real HTTP
/// clients (curl, nghttp, Python httpx with HTTP/2), crafted packets
/// (scapy), and for the shipped systemd unit `systemd-analyze` (verify,
/// security, syscall-filter) and strace (the daemon's system calls against
/// the unit's filter), and a headless Chromium with chromedriver for the
/// web console.
/// Debian's Python packages belong to /usr/bin/python3, which the tests
/// call by that path.
const TEST_TOOLS: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("ping", "iputils-ping"),
    ("nsenter", "util-linux"),
    ("bpftool", "bpftool"),
    ("trafgen", "netsniff-ng"),
    ("nft", "nftables"),
    ("curl", "curl"),
    ("sqlite3", "sqlite3"),
    ("ethtool", "ethtool"),
    ("nghttp", "nghttp2-client"),
    (
        "/usr/bin/python3 -c 'import httpx, h2'",
        "python3-httpx python3-h2",
    ),
    ("/usr/bin/python3 -c 'import scapy'", "python3-scapy"),
    // The metrics test parses /metrics with Prometheus' own parser.
    (
        "/usr/bin/python3 -c 'import prometheus_client'",
        "python3-prometheus-client",
    ),
    ("haproxy", "haproxy"),
    // The notification tests receive e-mail with a real SMTP server.
    ("/usr/bin/python3 -c 'import aiosmtpd'", "python3-aiosmtpd"),
    ("setpriv", "util-linux"),
    ("systemd-analyze", "systemd"),
    ("strace", "strace"),
    // The web console's tests drive a headless Chromium through chromedriver.
    ("/usr/bin/chromium", "chromium"),
    ("/usr/bin/chromedriver", "chromium-driver"),
    // The store suite and the two-edge tests start private PostgreSQL
    // servers (initdb, pg_ctl) on loopback.
    ("ls /usr/lib/postgresql/*/bin/postgres", "postgresql"),
];

/// Checks every command in `tools` (a command line that must succeed, or a
/// program name), installs the Debian packages of those missing when root,
/// and otherwise says exactly what to run.
pub fn ensure_tools(who: &str, tools: &[(&str, &str)]) -> Result<()> {
    let present = |check: &str| {
        let probe = if check.contains(' ') {
            format!("{check} >/dev/null 2>&1")
        } else {
            format!("command -v {check}")
        };
        output(std::process::Command::new("sh").args(["-c", &probe])).is_some()
    };
    let mut missing: Vec<&str> = tools
        .iter()
        .filter(|(check, _)| !present(check))
        .flat_map(|&(_, package)| package.split_whitespace())
        .collect();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    let line = format!(
        "apt-get install -y --no-install-recommends {}",
        missing.join(" ")
    );
    if !crate::is_root() {
        bail!(
            "{who} needs {}; install them: sudo apt-get update && sudo {line}",
            missing.join(", ")
        );
    }
    say(who, format!("installing {}", missing.join(" ")));
    fix("apt-get update", "apt-get update -q")?;
    let mut install = cmd(&line);
    install.env("DEBIAN_FRONTEND", "noninteractive");
    status(&mut install).with_context(|| format!("installing failed; run by hand: {line}"))?;
    let still: Vec<&str> = tools
        .iter()
        .filter(|(check, _)| !present(check))
        .map(|&(check, _)| check)
        .collect();
    if !still.is_empty() {
        bail!("still missing after installing: {}", still.join(", "));
    }
    Ok(())
}
