//! `allowlistctl notify ...`: where an account's notifications go.

use std::path::PathBuf;

use allowlist::api::{NewWebhook, NotifySettings, SetEmails, WebhookView};
use clap::Subcommand;

use crate::{
    Output,
    client::{Client, CtlError, query_value},
};

#[derive(Subcommand, Debug)]
pub enum NotifyCmd {
    /// The account's recipients and webhooks.
    Show,
    /// Replace the account's e-mail recipients (none: no e-mail for it).
    Emails {
        #[arg(value_name = "ADDRESS")]
        emails: Vec<String>,
    },
    /// The account's own webhooks (signed JSON POSTs).
    #[command(subcommand)]
    Webhook(WebhookCmd),
}

#[derive(Subcommand, Debug)]
pub enum WebhookCmd {
    /// Add (or replace) a webhook. The secret keys the HMAC-SHA256 in
    /// X-Allowlist-Signature; it is read from a file so it stays out of
    /// the shell's history and the process list.
    Add {
        /// (Not `url`: that is the global --url of the admin API.)
        #[arg(id = "hook_url", value_name = "URL")]
        url: String,
        #[arg(long, value_name = "FILE")]
        secret_file: PathBuf,
    },
    Remove {
        #[arg(id = "hook_url", value_name = "URL")]
        url: String,
    },
}

fn render(s: &NotifySettings) -> String {
    let mut text = format!("account {}\n", s.account);
    if s.emails.is_empty() {
        text += "  e-mail:   none\n";
    } else {
        text += &format!("  e-mail:   {}\n", s.emails.join(", "));
    }
    if !s.smtp_configured {
        text += "            (no [notify.smtp] relay is configured: no e-mail is sent)\n";
    }
    if s.webhooks.is_empty() {
        text += "  webhooks: none\n";
    }
    for w in &s.webhooks {
        text += &format!("  webhook:  {}  (by {})\n", w.url, w.created_by);
    }
    if s.installation_webhooks > 0 {
        text += &format!(
            "  and {} installation-wide webhook(s) from [notify]\n",
            s.installation_webhooks
        );
    }
    text
}

pub async fn run(client: &Client, cmd: NotifyCmd) -> Result<Output, CtlError> {
    match cmd {
        NotifyCmd::Show => {
            let s: NotifySettings = client.get("/v1/notify").await?;
            let text = render(&s);
            Output::new(&s, text)
        }
        NotifyCmd::Emails { emails } => {
            let s: NotifySettings = client
                .put("/v1/notify/emails", &SetEmails { emails })
                .await?;
            let text = render(&s);
            Output::new(&s, text)
        }
        NotifyCmd::Webhook(WebhookCmd::Add { url, secret_file }) => {
            let secret = std::fs::read_to_string(&secret_file)
                .map_err(|e| {
                    CtlError::Setup(format!("--secret-file {}: {e}", secret_file.display()))
                })?
                .trim()
                .to_string();
            let w: WebhookView = client
                .post("/v1/notify/webhooks", &NewWebhook { url, secret })
                .await?;
            let text = format!("webhook {} added\n", w.url);
            Output::new(&w, text)
        }
        NotifyCmd::Webhook(WebhookCmd::Remove { url }) => {
            let s: NotifySettings = client
                .delete(&format!("/v1/notify/webhooks?url={}", query_value(&url)))
                .await?;
            let text = format!("webhook {url} removed\n") + &render(&s);
            Output::new(&s, text)
        }
    }
}
