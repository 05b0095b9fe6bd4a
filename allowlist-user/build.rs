use std::{env, fs, path::PathBuf};

use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

/// Builds the eBPF object (allowlist-ebpf, for bpfel-unknown-none) into
/// OUT_DIR, where the daemon embeds it.
///
/// With `AYA_BUILD_SKIP=1` it writes an empty object instead, so `cargo
/// check`, clippy and unit tests work without nightly or bpf-linker; the
/// daemon then refuses kernel mode with a message saying so.
fn main() -> anyhow::Result<()> {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").ok_or_else(|| anyhow!("OUT_DIR not set"))?);
    let skip = env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
        for object in ["allowlist", "bench"] {
            fs::write(out_dir.join(object), []).context("writing the empty eBPF stub")?;
        }
        return Ok(());
    }
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?)
        .parent()
        .ok_or_else(|| anyhow!("no workspace root"))?
        .join("allowlist-ebpf");
    let root = root
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", root.display()))?;
    aya_build::build_ebpf(
        [Package {
            name: "allowlist-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        Toolchain::default(),
    )
    .context(
        "building the eBPF object failed; run `cargo xtask setup` (nightly rust-src and \
         bpf-linker), or set AYA_BUILD_SKIP=1 to build without kernel support",
    )
}
