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
pub mod browser;
pub mod client;
pub mod net;
pub mod postgres;
pub mod proc;
pub mod receivers;
pub mod scrape;
pub mod web;

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
    if is_root() {
        net::sweep_leftovers();
        return true;
    }
    skip(test, "kernel tests need root (CAP_BPF, CAP_NET_ADMIN)");
    false
}

/// Like `kernel_tests_enabled`, without its sweep of leftovers, for tests
/// that only make namespaces (removed by their guards) and load nothing
/// into the kernel, such as the browser tests: the sweep deletes every
/// other run's namespaces, and these may run beside another run.
pub fn root_tests_enabled(test: &str) -> bool {
    if is_root() {
        return true;
    }
    skip(
        test,
        "it needs root to make network namespaces (CAP_NET_ADMIN)",
    );
    false
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Whether `program` can be run here (found on PATH, or a path that
/// exists). Without it the test is skipped with the Debian package to
/// install, except under CI (`CI=true`), where a skip is a failure.
pub fn tool_available(test: &str, program: &str, package: &str) -> bool {
    let found = if program.contains('/') {
        std::path::Path::new(program).exists()
    } else {
        std::env::var_os("PATH")
            .is_some_and(|path| std::env::split_paths(&path).any(|d| d.join(program).is_file()))
    };
    if !found {
        skip(
            test,
            &format!(
                "{program} is missing (apt-get install {package}; `cargo xtask test` installs it as root)"
            ),
        );
    }
    found
}

/// Reports `test` as skipped for `reason`, or fails it under CI.
fn skip(test: &str, reason: &str) {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test}: {reason}, and CI=true forbids skipping it");
    }
    eprintln!("SKIPPED {test}: {reason}");
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
}
