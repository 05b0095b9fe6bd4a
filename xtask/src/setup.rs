//! `cargo xtask setup`: nightly with rust-src (for `-Z build-std=core`) and
//! a bpf-linker built against nightly's own LLVM.

use std::{fs, io::ErrorKind, os::unix::fs::symlink, path::Path};

use anyhow::{Context, Result, anyhow, bail};

use crate::{Repo, cmd, fix, output, say, status};

const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn setup(repo: &Repo) -> Result<()> {
    let rustup = output(&mut cmd("rustup --version")).ok_or_else(|| {
        anyhow!(
            "rustup not found on PATH; install it by hand:\n    \
             curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh"
        )
    })?;
    say("setup", format_args!("rustup: {rustup}"));

    // RUSTUP_AUTO_INSTALL=0 so the probe itself does not install a toolchain
    // with the default (large) profile.
    let nightly = || output(cmd("rustc +nightly --version").env("RUSTUP_AUTO_INSTALL", "0"));
    let version = match nightly() {
        Some(v) => v,
        None => {
            say("setup", "nightly toolchain: missing, installing");
            fix(
                "installing the nightly toolchain",
                "rustup toolchain install nightly --profile minimal",
            )?;
            nightly().context("nightly still does not run after installing it")?
        }
    };
    say("setup", format_args!("nightly toolchain: {version}"));

    let installed = output(&mut cmd(
        "rustup component list --toolchain nightly --installed",
    ))
    .unwrap_or_default();
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        say("setup", "rust-src for nightly: present");
    } else {
        say("setup", "rust-src for nightly: missing, installing");
        fix(
            "adding rust-src to nightly",
            "rustup component add rust-src --toolchain nightly",
        )?;
    }

    let linker = repo.tools.join("bin/bpf-linker");
    if let Some(v) = linker_version(&linker) {
        say("setup", format_args!("bpf-linker: {v}"));
        return Ok(());
    }
    say(
        "setup",
        format_args!(
            "bpf-linker {BPF_LINKER_VERSION}: missing or broken in {}, building (1-2 minutes)",
            repo.tools.display()
        ),
    );
    install_bpf_linker(repo)?;
    let v = linker_version(&linker)
        .with_context(|| format!("{} was built but does not run", linker.display()))?;
    say("setup", format_args!("bpf-linker: {v}"));
    Ok(())
}

/// The version line of our bpf-linker, if it runs and is the pinned release.
/// It stops running when nightly's libLLVM changes name (a nightly update),
/// which is exactly when it has to be rebuilt.
fn linker_version(linker: &Path) -> Option<String> {
    let v = output(std::process::Command::new(linker).arg("--version"))?;
    v.contains(BPF_LINKER_VERSION).then_some(v)
}

fn install_bpf_linker(repo: &Repo) -> Result<()> {
    let sysroot = output(&mut cmd("rustc +nightly --print sysroot"))
        .context("`rustc +nightly --print sysroot` failed")?;
    let sys_lib = Path::new(&sysroot).join("lib");
    let mut names: Vec<String> = fs::read_dir(&sys_lib)
        .with_context(|| format!("cannot read {}", sys_lib.display()))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("libLLVM.so."))
        .collect();
    names.sort();
    let name = names
        .pop()
        .with_context(|| format!("no libLLVM.so.* in {}", sys_lib.display()))?;
    // "libLLVM.so.22.1-rust-..." -> 22, so the feature follows nightly's LLVM.
    let major: String = name["libLLVM.so.".len()..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    if major.is_empty() {
        bail!("cannot read the LLVM major version from {name}");
    }

    // bpf-linker's build looks for $LLVM_PREFIX/lib/libLLVM.so, but nightly
    // ships only the versioned name. The binary's rpath points at this
    // folder, so it must stay in place after the build.
    let prefix = repo.tools.join("llvm");
    let lib = prefix.join("lib");
    fs::create_dir_all(&lib).with_context(|| format!("cannot create {}", lib.display()))?;
    for link in ["libLLVM.so", name.as_str()] {
        let dst = lib.join(link);
        match fs::remove_file(&dst) {
            Err(e) if e.kind() != ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("cannot remove {}", dst.display()));
            }
            _ => {}
        }
        symlink(sys_lib.join(&name), &dst)
            .with_context(|| format!("cannot create symlink {}", dst.display()))?;
    }

    // --force: a binary that exists but does not run still counts as installed.
    let line = format!(
        "cargo install bpf-linker --version ={BPF_LINKER_VERSION} --locked \
         --no-default-features --features llvm-{major} --force --root"
    );
    let mut install = cmd(&line);
    install.arg(&repo.tools).env("LLVM_PREFIX", &prefix);
    status(&mut install).with_context(|| {
        format!(
            "building bpf-linker failed; run by hand:\n    LLVM_PREFIX={} {line} {}",
            prefix.display(),
            repo.tools.display()
        )
    })
}
