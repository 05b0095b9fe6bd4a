//! allowlistctl: the command-line client of allowlistd's admin API.
//!
//! Exit status: 0 on success, 1 when the daemon refused the request (or
//! could not be reached), 2 on usage errors.
#![forbid(unsafe_code)]

mod accounts;
mod audit;
mod blocking;
mod client;
mod drop;
mod error;
mod import_file;
mod ips;
mod keys;
mod logs;
mod notify;
mod stats;
mod tokens;
mod transport;

use std::{path::PathBuf, process::ExitCode};

use clap::{CommandFactory, Parser, Subcommand, error::ErrorKind};
use serde::Serialize;

use crate::{
    client::CtlError,
    transport::{Transport, Trust},
};

#[derive(Parser, Debug)]
#[command(
    name = "allowlistctl",
    version,
    about = "Command-line client for allowlistd's admin API"
)]
struct Cli {
    /// Admin socket of allowlistd (operators: root and members of
    /// [admin] group).
    #[arg(
        long,
        global = true,
        env = "ALLOWLIST_SOCKET",
        default_value = "/run/allowlist/admin.sock"
    )]
    socket: PathBuf,
    /// The account to act on; default: the caller's own (`default` for
    /// operators).
    #[arg(long, global = true, env = "ALLOWLIST_ACCOUNT", value_name = "NAME")]
    account: Option<String>,
    /// The admin API over TLS instead of the socket, like
    /// https://127.0.0.1:9443 (`[admin] listen`); needs --token-file.
    #[arg(long, global = true, value_name = "https://HOST:PORT")]
    url: Option<String>,
    /// With --url: a file holding the bearer token (`tokens create`).
    #[arg(long, global = true, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// With --url: the PEM certificate (or CA) to trust, e.g. the
    /// admin-cert.pem allowlistd writes next to its store.
    #[arg(long, global = true, value_name = "FILE")]
    ca: Option<PathBuf>,
    /// With --url: accept any certificate. Only for tests and self-signed
    /// development setups: anyone on the path could read the token.
    #[arg(long, global = true)]
    insecure: bool,
    /// Machine output: one JSON document on stdout.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Accounts (operators): create, list, show, remove, enforce.
    #[command(subcommand)]
    Accounts(accounts::AccountsCmd),
    /// Admin API tokens: create, list, revoke.
    #[command(subcommand)]
    Tokens(tokens::TokensCmd),
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
    /// The usage log: every request the edge answered, newest first.
    Logs(logs::LogsArgs),
    /// Where the account's notifications go: e-mail recipients and webhooks.
    #[command(subcommand)]
    Notify(notify::NotifyCmd),
    /// Who the admin API takes this caller for: actor, role, account.
    Whoami,
}

/// What a command prints: JSON for `--json`, text otherwise.
pub struct Output {
    json: String,
    text: String,
}

impl Output {
    /// `value` as the JSON document, `text` for people.
    pub fn new<T: Serialize>(value: &T, text: String) -> Result<Output, CtlError> {
        let json = serde_json::to_string_pretty(value)
            .map_err(|e| CtlError::Protocol(format!("rendering the answer: {e}")))?;
        Ok(Output { json, text })
    }

    /// Nothing more to print (the command wrote its output itself).
    pub fn empty() -> Output {
        Output {
            json: String::new(),
            text: String::new(),
        }
    }
}

/// Exits with status 2 and clap's usage text.
fn usage(kind: ErrorKind, message: &str) -> ! {
    Cli::command().error(kind, message).exit()
}

/// The transport the flags ask for; usage errors exit here.
fn transport(cli: &Cli) -> Result<Transport, CtlError> {
    let Some(url) = &cli.url else {
        for (given, flag) in [
            (cli.token_file.is_some(), "--token-file"),
            (cli.ca.is_some(), "--ca"),
            (cli.insecure, "--insecure"),
        ] {
            if given {
                usage(
                    ErrorKind::MissingRequiredArgument,
                    &format!("{flag} applies only with --url https://HOST:PORT"),
                );
            }
        }
        return Ok(Transport::Unix(cli.socket.clone()));
    };
    let Some(token_file) = &cli.token_file else {
        usage(
            ErrorKind::MissingRequiredArgument,
            "--url needs --token-file FILE: a file holding a token from `allowlistctl tokens create`",
        );
    };
    let trust = match (&cli.ca, cli.insecure) {
        (Some(ca), false) => Trust::Ca(ca.clone()),
        (None, true) => Trust::Insecure,
        (Some(_), true) => usage(
            ErrorKind::ArgumentConflict,
            "give either --ca FILE or --insecure, not both",
        ),
        (None, false) => usage(
            ErrorKind::MissingRequiredArgument,
            "--url needs --ca FILE (the admin listener's certificate, e.g. admin-cert.pem next to \
             allowlistd's store) or --insecure (accept any certificate: tests and development \
             only); allowlistctl has no system trust store",
        ),
    };
    Transport::tls(url, token_file, trust)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let account = cli.account.clone().filter(|a| !a.trim().is_empty());
    let client = match transport(&cli) {
        Ok(t) => client::Client::new(t, account),
        Err(e) => {
            eprintln!("allowlistctl: {e}");
            return ExitCode::from(e.exit_code());
        }
    };
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
            Command::Accounts(cmd) => accounts::run(&client, cmd).await,
            Command::Tokens(cmd) => tokens::run(&client, cmd).await,
            Command::Keys(cmd) => keys::run(&client, cmd).await,
            Command::Ips(cmd) => ips::run(&client, cmd).await,
            Command::Drop(cmd) => drop::run(&client, cmd).await,
            Command::Stats => stats::run(&client).await,
            Command::Blocking(cmd) => blocking::run(&client, cmd).await,
            Command::Events => stats::events(&client).await,
            Command::Audit(args) => audit::run(&client, args).await,
            Command::Logs(args) => logs::run(&client, args).await,
            Command::Notify(cmd) => notify::run(&client, cmd).await,
            Command::Whoami => tokens::whoami(&client).await,
        }
    });
    match result {
        Ok(out) => {
            if cli.json && !out.json.is_empty() {
                println!("{}", out.json);
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
