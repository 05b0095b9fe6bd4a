//! Build orchestration for the allowlist workspace: toolchain set-up, builds,
//! a local dev run, the test suite and benchmarks. The eBPF object itself is
//! compiled by `aya-build` from allowlist-user's build script; this tool only
//! makes sure that build can find what it needs.

mod axe;
mod fuzz;
mod run;
mod setup;
mod test;

use std::{
    env,
    ffi::{OsStr, OsString},
    fs,
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

/// Lets the bpf-linker build path be exercised in a scratch folder without
/// touching the project's own `.tools`.
const TOOLS_DIR_ENV: &str = "ALLOWLIST_TOOLS_DIR";

/// Development tasks for the allowlist workspace.
#[derive(Parser)]
#[command(name = "xtask", bin_name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Check and install the toolchain: nightly, its rust-src, and bpf-linker in .tools/.
    Setup,
    /// Set up, then build allowlistd and allowlistctl into target/{debug,release}/.
    Build {
        /// Build with the release profile.
        #[arg(long)]
        release: bool,
    },
    /// Build, then run allowlistd in the foreground with a dev config in .run/.
    Run {
        /// Build and run the release binaries.
        #[arg(long)]
        release: bool,
        /// Extra arguments for allowlistd.
        #[arg(last = true)]
        args: Vec<OsString>,
    },
    /// Set up, check formatting and lints, build, then run every test.
    Test {
        /// Skip the fmt and clippy steps.
        #[arg(long)]
        quick: bool,
        /// Extra arguments for `cargo test` (e.g. a test-name filter); anything
        /// after a further `--` goes to the test binaries.
        #[arg(last = true)]
        args: Vec<OsString>,
    },
    /// Run the cargo-fuzz targets (all, or one), each for a bounded time.
    Fuzz {
        /// One target (proxy_header, forwarded_for, allow_entry, credential,
        /// path, admin_bodies, config); all when omitted.
        target: Option<String>,
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// Build release binaries and run a benchmark suite.
    Bench {
        /// Which suite to run.
        suite: test::Suite,
    },
}

/// Paths every task needs.
pub struct Repo {
    root: PathBuf,
    tools: PathBuf,
}

impl Repo {
    fn new() -> Result<Self> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .context("xtask's manifest dir has no parent")?
            .to_path_buf();
        let tools = env::var_os(TOOLS_DIR_ENV)
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join(".tools"));
        Ok(Self { root, tools })
    }

    /// PATH with .tools/bin first, so aya-build finds our bpf-linker rather
    /// than one built against a different LLVM.
    fn path_env(&self) -> Result<OsString> {
        let rest = env::var_os("PATH").unwrap_or_default();
        env::join_paths(std::iter::once(self.tools.join("bin")).chain(env::split_paths(&rest)))
            .context("cannot build PATH: the tools folder contains a ':'")
    }

    /// `cargo <line>` in the repository root, with our tools on PATH.
    fn cargo(&self, line: &str) -> Result<Command> {
        let mut cmd = Command::new("cargo");
        cmd.args(line.split_whitespace())
            .current_dir(&self.root)
            .env("PATH", self.path_env()?);
        Ok(cmd)
    }

    fn bin_dir(&self, release: bool) -> PathBuf {
        let profile = if release { "release" } else { "debug" };
        self.root.join("target").join(profile)
    }
}

fn main() -> ExitCode {
    match dispatch(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(cli: Cli) -> Result<ExitCode> {
    let repo = Repo::new()?;
    match cli.cmd {
        Cmd::Setup => setup::setup(&repo)?,
        Cmd::Build { release } => build(&repo, release)?,
        Cmd::Run { release, args } => run::run(&repo, release, &args)?,
        Cmd::Test { quick, args } => test::test(&repo, quick, &args)?,
        Cmd::Fuzz { target, seconds } => fuzz::fuzz(&repo, target.as_deref(), seconds)?,
        Cmd::Bench { suite } => return test::bench(&repo, suite),
    }
    Ok(ExitCode::SUCCESS)
}

fn build(repo: &Repo, release: bool) -> Result<()> {
    setup::setup(repo)?;
    let mut cmd = repo.cargo("build -p allowlist-user --bins")?;
    if release {
        cmd.arg("--release");
    }
    say("build", describe(&cmd));
    status(&mut cmd)
}

/// A command from a whitespace-separated line (none of ours needs quoting).
fn cmd(line: &str) -> Command {
    let mut words = line.split_whitespace();
    let mut cmd = Command::new(words.next().unwrap_or_default());
    cmd.args(words);
    cmd
}

fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(OsStr::to_string_lossy)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs a command with inherited stdio; fails with the command line in the
/// message so the user can rerun it by hand.
fn status(cmd: &mut Command) -> Result<()> {
    let st = cmd
        .status()
        .with_context(|| format!("cannot start `{}`", describe(cmd)))?;
    if !st.success() {
        bail!("`{}` failed ({st})", describe(cmd));
    }
    Ok(())
}

/// Runs a command and returns its stdout, or None if it is missing or fails.
fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.stdin(Stdio::null()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Runs a set-up command line; on failure says what to run by hand.
fn fix(what: &str, line: &str) -> Result<()> {
    status(&mut cmd(line)).with_context(|| format!("{what} failed; run by hand: {line}"))
}

fn say(tag: &str, msg: impl std::fmt::Display) {
    eprintln!("[{tag}] {msg}");
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Mounts bpffs if it is not already there; kernel tests pin under it.
fn ensure_bpffs() -> Result<()> {
    if !is_root() {
        return Ok(());
    }
    let mounts =
        fs::read_to_string("/proc/self/mounts").context("cannot read /proc/self/mounts")?;
    let mounted = mounts.lines().any(|l| {
        let mut f = l.split_whitespace().skip(1);
        f.next() == Some("/sys/fs/bpf") && f.next() == Some("bpf")
    });
    if !mounted {
        say("bpffs", "mounting bpffs at /sys/fs/bpf");
        fix("mounting bpffs", "mount -t bpf bpf /sys/fs/bpf")?;
    }
    Ok(())
}
