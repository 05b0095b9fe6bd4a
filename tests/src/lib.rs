//! Harness for the end-to-end tests: network namespaces with a veth pair
//! between them, sockets opened inside a namespace, the real `allowlistd`
//! and `allowlistctl` binaries, and `BPF_PROG_TEST_RUN` on the real loaded
//! program.
//!
//! Rules (TOOLCHAIN.md): both ends of every veth live in namespaces made
//! here; addresses come from the documentation ranges; every loop is bounded;
//! everything made is removed by a guard's `Drop`, and leftovers from an
//! earlier crashed run are swept by name prefix.

pub mod bench;
pub mod bpf;
pub mod client;
pub mod net;
pub mod proc;
pub mod receivers;
pub mod scrape;

use std::sync::atomic::{AtomicU32, Ordering};

/// Prefix of every namespace, bpffs folder and temp file the tests make.
pub const PREFIX: &str = "altest";

/// A name unique within this run: `altest-<pid>-<n>`.
pub fn unique(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{PREFIX}{}{}{tag}",
        std::process::id() % 10000,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Whether kernel tests can run here. Without root they are skipped with the
/// reason, except under CI (`CI=true`), where a skip is a failure.
pub fn kernel_tests_enabled(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        net::sweep_leftovers();
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!(
            "{test}: kernel tests need root (CAP_BPF, CAP_NET_ADMIN), and CI=true forbids skipping them"
        );
    }
    eprintln!("SKIPPED {test}: kernel tests need root (CAP_BPF, CAP_NET_ADMIN)");
    // libtest has no runtime skip: `cargo xtask test` reads this log and
    // reports these as skipped, not passed.
    if let Some(log) = std::env::var_os("ALLOWLIST_SKIP_LOG") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
        {
            let _ = writeln!(f, "{test}");
        }
    }
    false
}
