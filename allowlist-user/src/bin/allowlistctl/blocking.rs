//! `allowlistctl blocking ...`

use allowlist::api::Blocking;
use clap::Subcommand;

use crate::{
    Output,
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
            let v: serde_json::Value = client
                .post("/v1/blocking/api", &allowlist::api::SetMode { mode, force })
                .await?;
            let text = format!("api blocking: {}\n", v["api"].as_str().unwrap_or("?"));
            Ok(Output { json: v, text })
        }
        BlockingCmd::Smtp { mode, force } => {
            let v: serde_json::Value = client
                .post(
                    "/v1/blocking/smtp",
                    &allowlist::api::SetMode { mode, force },
                )
                .await?;
            let text = format!("smtp blocking: {}\n", v["smtp"].as_str().unwrap_or("?"));
            Ok(Output { json: v, text })
        }
        BlockingCmd::Show => {
            let b: Blocking = client.get("/v1/blocking").await?;
            let api = serde_json::to_value(b.state.api).unwrap_or_default();
            let smtp = serde_json::to_value(b.state.smtp).unwrap_or_default();
            let mut text = format!(
                "api:  {} (since {}; learning turns active after {} days without a new address)\n",
                api.as_str().unwrap_or("?"),
                since(b.state.api_since),
                b.learning_days
            );
            text.push_str(&format!(
                "smtp: {} (since {}; ports {:?})\n",
                smtp.as_str().unwrap_or("?"),
                since(b.state.smtp_since),
                b.smtp_ports
            ));
            if !b.always_allow.is_empty() {
                text.push_str(&format!("always allowed: {}\n", b.always_allow.join(", ")));
            }
            Ok(Output {
                json: serde_json::to_value(&b).unwrap_or_default(),
                text,
            })
        }
    }
}
