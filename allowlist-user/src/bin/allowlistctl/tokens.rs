//! `allowlistctl tokens ...`: bearer tokens for the admin API over TLS.

use allowlist::{
    api::{Empty, NewToken, TokenList, TokenView},
    store::unix_now,
};
use clap::Subcommand;

use crate::{
    Output,
    client::{Client, CtlError, query_value},
};

#[derive(Subcommand, Debug)]
pub enum TokensCmd {
    /// Create a token. Its plaintext is shown once, here.
    Create {
        /// An operator token: every account and the installation-wide
        /// settings (operators only).
        #[arg(long, conflicts_with = "role", required_unless_present = "role")]
        operator: bool,
        /// A token of the account (--account): owner (everything in it),
        /// ips (the authorized and unauthorized lists, blocking) or viewer
        /// (reads only).
        #[arg(long, value_parser = ["owner", "ips", "viewer"])]
        role: Option<String>,
        /// What it is for, e.g. dashboard.
        #[arg(long)]
        name: Option<String>,
        /// Stop working after this long, e.g. 30d; default: until revoked.
        #[arg(long, value_name = "DURATION")]
        expires: Option<String>,
    },
    /// List tokens (never their secrets).
    List,
    /// Revoke a token at once.
    Revoke { id: String },
}

fn time(t: i64) -> String {
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(t.max(0) as u64);
    humantime::format_rfc3339_seconds(at).to_string()
}

fn status(t: &TokenView) -> String {
    match (t.revoked_at, t.expires_at) {
        (Some(at), _) => format!("revoked {}", time(at)),
        (None, Some(at)) if at <= unix_now() => format!("expired {}", time(at)),
        (None, Some(at)) => format!("active, expires {}", time(at)),
        (None, None) => "active".into(),
    }
}

fn line(t: &TokenView) -> String {
    let whose = match &t.account {
        Some(a) => format!("{} of {a}", t.role.as_str()),
        None => t.role.as_str().to_string(),
    };
    format!(
        "{:<18} {:<20} {:<32} {}  (by {})\n",
        t.id,
        if t.name.is_empty() { "-" } else { &t.name },
        whose,
        status(t),
        t.created_by
    )
}

pub async fn run(client: &Client, cmd: TokensCmd) -> Result<Output, CtlError> {
    match cmd {
        TokensCmd::Create {
            operator,
            role,
            name,
            expires,
        } => {
            let t: TokenView = client
                .post(
                    "/v1/tokens",
                    &NewToken {
                        operator,
                        role,
                        name,
                        expires,
                    },
                )
                .await?;
            let mut text = format!("created token {}", line(&t));
            if let Some(token) = &t.token {
                text.push_str(&format!(
                    "\n    token: {token}\n\n    This is the only time the token is shown. Store it now \
                     (a file for --token-file, readable only by you).\n"
                ));
            }
            Output::new(&t, text)
        }
        TokensCmd::List => {
            let list: TokenList = client.get("/v1/tokens").await?;
            let text = if list.tokens.is_empty() {
                "no tokens; create one with `allowlistctl tokens create --role viewer`\n".into()
            } else {
                list.tokens.iter().map(line).collect()
            };
            Output::new(&list, text)
        }
        TokensCmd::Revoke { id } => {
            let t: TokenView = client
                .post(
                    &format!("/v1/tokens/{}/revoke", query_value(&id)),
                    &Empty {},
                )
                .await?;
            let text = format!("revoked token {}\n", t.id);
            Output::new(&t, text)
        }
    }
}

/// `allowlistctl whoami`
pub async fn whoami(client: &Client) -> Result<Output, CtlError> {
    let w: allowlist::api::WhoAmI = client.get("/v1/whoami").await?;
    let text = format!(
        "{} ({}{})\n",
        w.actor,
        format!("{:?}", w.role).to_lowercase(),
        w.account
            .as_deref()
            .map(|a| format!(" of account {a}"))
            .unwrap_or_default()
    );
    Output::new(&w, text)
}
