//! `allowlistctl audit`: who changed what, newest first (the account's;
//! an operator naming no account sees every account's).

use allowlist::api::Audit;
use clap::Args;

use crate::{
    Output,
    client::{Client, CtlError, query_value},
};

#[derive(Args, Debug)]
pub struct AuditArgs {
    /// Only entries since T: Unix seconds, 2026-11-30T09:00:00Z, or a
    /// duration back from now like 24h.
    #[arg(long)]
    since: Option<String>,
    /// Only this actor (uid:0, learning, promotion ...).
    #[arg(long)]
    actor: Option<String>,
    /// At most this many entries.
    #[arg(long, default_value_t = 100)]
    limit: usize,
}

pub async fn run(client: &Client, args: AuditArgs) -> Result<Output, CtlError> {
    let mut path = format!("/v1/audit?limit={}", args.limit);
    if let Some(s) = &args.since {
        path.push_str(&format!("&since={}", query_value(s)));
    }
    if let Some(a) = &args.actor {
        path.push_str(&format!("&actor={}", query_value(a)));
    }
    let audit: Audit = client.get(&path).await?;
    let mut text = String::new();
    for e in &audit.entries {
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(e.at.max(0) as u64);
        text.push_str(&format!(
            "{}  {:<16} {:<18} {:<16} {}\n",
            humantime::format_rfc3339_seconds(at),
            if e.account.is_empty() {
                "-"
            } else {
                &e.account
            },
            e.actor,
            e.action,
            e.detail
        ));
    }
    if audit.entries.is_empty() {
        text.push_str("no audit entries match\n");
    }
    Output::new(&audit, text)
}
