//! `cargo xtask fuzz [TARGET] [--seconds N]`: the cargo-fuzz targets in
//! `fuzz/` (libFuzzer, on the nightly the project already installs), each
//! run for a bounded time, with a closing table of executions per target.

use anyhow::{Context, Result, bail};

use crate::{Repo, describe, output, say, setup::setup};

/// Every target, in the order they run.
pub const TARGETS: &[&str] = &[
    "proxy_header",
    "forwarded_for",
    "allow_entry",
    "credential",
    "path",
    "admin_bodies",
    "config",
];

pub fn fuzz(repo: &Repo, target: Option<&str>, seconds: u64) -> Result<()> {
    setup(repo)?;
    ensure_cargo_fuzz(repo)?;
    let targets: Vec<&str> = match target {
        Some(t) if TARGETS.contains(&t) => vec![t],
        Some(t) => bail!(
            "no fuzz target {t:?}; the targets are: {}",
            TARGETS.join(", ")
        ),
        None => TARGETS.to_vec(),
    };
    let mut rows = Vec::new();
    for t in targets {
        let corpus = repo.root.join("target").join("fuzz-corpus").join(t);
        std::fs::create_dir_all(&corpus)
            .with_context(|| format!("creating {}", corpus.display()))?;
        let mut cmd = repo.cargo(&format!("+nightly fuzz run --fuzz-dir fuzz {t}"))?;
        cmd.arg(&corpus)
            .args([
                "--",
                &format!("-max_total_time={seconds}"),
                "-print_final_stats=1",
            ])
            // The fuzz targets need the parsers, not the eBPF object.
            .env("AYA_BUILD_SKIP", "1")
            .stderr(std::process::Stdio::piped());
        say("fuzz", describe(&cmd));
        let out = cmd
            .output()
            .with_context(|| format!("cannot start `{}`", describe(&cmd)))?;
        let err = String::from_utf8_lossy(&out.stderr);
        let runs = err
            .lines()
            .find_map(|l| l.strip_prefix("stat::number_of_executed_units:"))
            .and_then(|n| n.trim().parse::<u64>().ok());
        if !out.status.success() {
            let tail: Vec<&str> = err.lines().rev().take(60).collect();
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
            bail!(
                "fuzz target {t} failed ({}); the crashing input is saved under fuzz/artifacts/{t}/",
                out.status
            );
        }
        let runs =
            runs.with_context(|| format!("fuzz target {t}: libFuzzer printed no run count"))?;
        say(
            "fuzz",
            format_args!("{t}: {runs} executions in {seconds} s, clean"),
        );
        rows.push((t, runs));
    }
    println!("| target | executions | seconds | result |");
    println!("|---|---:|---:|---|");
    for (t, runs) in &rows {
        println!("| {t} | {runs} | {seconds} | clean |");
    }
    Ok(())
}

/// cargo-fuzz into the project's tools folder, from crates.io.
fn ensure_cargo_fuzz(repo: &Repo) -> Result<()> {
    let mut probe = repo.cargo("fuzz --version")?;
    if output(&mut probe).is_some() {
        return Ok(());
    }
    let root = repo.tools.display().to_string();
    say("fuzz", format_args!("installing cargo-fuzz into {root}"));
    let mut cmd = repo.cargo(&format!("install cargo-fuzz --locked --root {root}"))?;
    crate::status(&mut cmd)
        .context("installing cargo-fuzz failed; run by hand: cargo install cargo-fuzz --locked")
}
