//! `allowlistctl blocking ...`

use allowlist::{
    api::{Blocking, Impact, SetMode},
    store::BlockingState,
};
use clap::Subcommand;

use crate::{
    Output,
    accounts::{api_mode, smtp_mode},
    client::{Client, CtlError},
};

#[derive(Subcommand, Debug)]
pub enum BlockingCmd {
    /// Show the blocking state of the API and SMTP services.
    Show,
    /// API blocking: learning, activate or deactivate.
    Api {
        #[arg(value_parser = ["learning", "activate", "deactivate"])]
        mode: String,
        /// Activate even if recent callers would be refused.
        #[arg(long)]
        force: bool,
    },
    /// SMTP blocking: activate or deactivate (by source address, in the kernel).
    Smtp {
        #[arg(value_parser = ["activate", "deactivate"])]
        mode: String,
        /// Activate even with an empty authorized list.
        #[arg(long)]
        force: bool,
    },
    /// Who activating API blocking would cut: recent callers from
    /// addresses not on the authorized list.
    Impact,
}

fn since(t: i64) -> String {
    let ago = (allowlist::store::unix_now() - t).max(0) as u64;
    format!(
        "{} ago",
        humantime::format_duration(std::time::Duration::from_secs(ago))
    )
}

pub async fn run(client: &Client, cmd: BlockingCmd) -> Result<Output, CtlError> {
    match cmd {
        BlockingCmd::Api { mode, force } => {
            let b: BlockingState = client
                .post("/v1/blocking/api", &SetMode { mode, force })
                .await?;
            Output::new(&b, format!("api blocking: {}\n", api_mode(b.api)))
        }
        BlockingCmd::Smtp { mode, force } => {
            let b: BlockingState = client
                .post("/v1/blocking/smtp", &SetMode { mode, force })
                .await?;
            Output::new(&b, format!("smtp blocking: {}\n", smtp_mode(b.smtp)))
        }
        BlockingCmd::Impact => {
            let i: Impact = client.get("/v1/blocking/impact").await?;
            let mut text = String::new();
            for e in &i.would_refuse {
                text.push_str(&format!("{:<39} key {}\n", e.addr.to_string(), e.key_id));
            }
            if i.would_refuse.is_empty() {
                text.push_str("activating API blocking would refuse no recent caller\n");
            } else {
                text.insert_str(
                    0,
                    &format!(
                        "activating API blocking would refuse {} recent caller(s):\n",
                        i.would_refuse.len()
                    ),
                );
            }
            Output::new(&i, text)
        }
        BlockingCmd::Show => {
            let b: Blocking = client.get("/v1/blocking").await?;
            let s = &b.state;
            let mut text = format!("account: {}\n", b.account);
            text.push_str(&format!(
                "api:  {} (since {})",
                api_mode(s.api),
                since(s.api_since)
            ));
            if s.api == allowlist::policy::ApiMode::Learning {
                match b.activates_in_days {
                    Some(n) => text.push_str(&format!(
                        "; blocking activates in {n} quiet days (after {} days without a new address)",
                        b.learning_days
                    )),
                    None => text.push_str(&format!(
                        "; learning turns active after {} days without a new address",
                        b.learning_days
                    )),
                }
            }
            if b.api_in_force != s.api {
                text.push_str(&format!("; in force: {}", api_mode(b.api_in_force)));
            }
            text.push('\n');
            text.push_str(&format!(
                "smtp: {} (since {}; ports {:?})",
                smtp_mode(s.smtp),
                since(s.smtp_since),
                b.smtp_ports
            ));
            if b.smtp_in_force != s.smtp {
                text.push_str(&format!("; in force: {}", smtp_mode(b.smtp_in_force)));
            }
            text.push('\n');
            if let Some(org) = &b.enforced_by {
                text.push_str(&format!(
                    "enforced by {org}: while its blocking is active, this account's is too and cannot be lowered\n"
                ));
            }
            if !b.always_allow.is_empty() {
                text.push_str(&format!("always allowed: {}\n", b.always_allow.join(", ")));
            }
            Output::new(&b, text)
        }
    }
}
