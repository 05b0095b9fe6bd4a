//! allowlistctl: the command-line client of allowlistd's admin API.
//!
//! Exit status: 0 on success, 1 when the daemon refused the request (or
//! could not be reached), 2 on usage errors.
#![forbid(unsafe_code)]

mod audit;
mod blocking;
mod client;
mod drop;
mod ips;
mod keys;
mod stats;

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(version, about = "Command-line client for allowlistd's admin API")]
struct Cli {
    /// Admin socket of allowlistd.
    #[arg(
        long,
        global = true,
        env = "ALLOWLIST_SOCKET",
        default_value = "/run/allowlist/admin.sock"
    )]
    socket: PathBuf,
    /// Machine output: one JSON document on stdout.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// API keys: create, list, show, revoke, rotate, allow, disallow.
    #[command(subcommand)]
    Keys(keys::KeysCmd),
    /// The account's authorized list and the refused addresses.
    #[command(subcommand)]
    Ips(ips::IpsCmd),
    /// The kernel drop list (dropped at XDP before any TCP or TLS work).
    #[command(subcommand)]
    Drop(drop::DropCmd),
    /// Counters: kernel drops by reason, events, map fill levels.
    Stats,
    /// Blocking of unknown addresses, per service.
    #[command(subcommand)]
    Blocking(blocking::BlockingCmd),
    /// Recent kernel drop events (at most one per source per second).
    Events,
    /// The audit log: who changed what, newest first.
    Audit(audit::AuditArgs),
}

/// What a command prints: JSON for `--json`, text otherwise.
pub struct Output {
    pub json: serde_json::Value,
    pub text: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let client = client::Client::new(cli.socket.clone());
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("allowlistctl: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Keys(cmd) => keys::run(&client, cmd).await,
            Command::Ips(cmd) => ips::run(&client, cmd).await,
            Command::Drop(cmd) => drop::run(&client, cmd).await,
            Command::Stats => stats::run(&client).await,
            Command::Blocking(cmd) => blocking::run(&client, cmd).await,
            Command::Events => stats::events(&client).await,
            Command::Audit(args) => audit::run(&client, args).await,
        }
    });
    match result {
        Ok(out) => {
            if cli.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&out.json).unwrap_or_default()
                );
            } else if !out.text.is_empty() {
                print!("{}", out.text);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("allowlistctl: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
