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
