//! `allowlistctl accounts ...` (operators).

use allowlist::{
    api::{AccountList, AccountRemoved, AccountView, Enforce, NewAccount},
    policy::{ApiMode, SmtpMode},
};
use clap::Subcommand;

use crate::{
    Output,
    client::{Client, CtlError, query_value},
};

#[derive(Subcommand, Debug)]
pub enum AccountsCmd {
    /// Create an account (names: lowercase letters, digits and '-').
    Create {
        /// e.g. acme or acme-eu
        name: String,
        /// The organization it belongs to (one level deep).
        #[arg(long, value_name = "ORG")]
        parent: Option<String>,
        /// A notification recipient; repeatable.
        #[arg(long = "email", value_name = "ADDR")]
        emails: Vec<String>,
    },
    /// List the accounts.
    List,
    /// Show one account.
    Show { name: String },
    /// Remove an account: its keys are revoked (live connections cut) and
    /// its lists deleted.
    Remove {
        name: String,
        /// Remove it even though it has active keys (they are revoked).
        #[arg(long)]
        force: bool,
    },
    /// An organization enforces blocking on its sub-accounts (on), or stops
    /// (off).
    Enforce {
        name: String,
        #[arg(value_parser = ["on", "off"])]
        state: String,
    },
}

pub fn api_mode(m: ApiMode) -> &'static str {
    match m {
        ApiMode::Learning => "learning",
        ApiMode::Active => "active",
        ApiMode::Inactive => "inactive",
    }
}

pub fn smtp_mode(m: SmtpMode) -> &'static str {
    match m {
        SmtpMode::Active => "active",
        SmtpMode::Inactive => "inactive",
    }
}

fn line(a: &AccountView) -> String {
    format!(
        "{:<24} {:<16} {:>9} {:>10}  {:<8} {}\n",
        a.record.name,
        a.record.parent.as_deref().unwrap_or("-"),
        format!("{}/{}", a.active_keys, a.keys),
        a.authorized,
        api_mode(a.api_in_force),
        smtp_mode(a.smtp_in_force),
    )
}

fn describe(a: &AccountView) -> String {
    let r = &a.record;
    let mut t = format!("account {}\n", r.name);
    match &r.parent {
        Some(p) => t.push_str(&format!("  sub-account of: {p}\n")),
        None if a.sub_accounts.is_empty() => {}
        None => t.push_str(&format!(
            "  organization of: {}\n",
            a.sub_accounts.join(", ")
        )),
    }
    if r.enforce_blocking {
        t.push_str("  enforces blocking on its sub-accounts\n");
    }
    t.push_str(&format!(
        "  keys: {} ({} active)   authorized entries: {}\n",
        a.keys, a.active_keys, a.authorized
    ));
    let lifted = |set: &str, in_force: &str| {
        if set == in_force {
            set.to_string()
        } else {
            format!("{in_force} (its own setting: {set}; enforced by its organization)")
        }
    };
    t.push_str(&format!(
        "  api blocking: {}\n  smtp blocking: {}\n",
        lifted(api_mode(r.blocking.api), api_mode(a.api_in_force)),
        lifted(smtp_mode(r.blocking.smtp), smtp_mode(a.smtp_in_force)),
    ));
    t.push_str(&format!(
        "  notifications: {}\n",
        if r.emails.is_empty() {
            "none".to_string()
        } else {
            r.emails.join(", ")
        }
    ));
    t
}

pub async fn run(client: &Client, cmd: AccountsCmd) -> Result<Output, CtlError> {
    match cmd {
        AccountsCmd::Create {
            name,
            parent,
            emails,
        } => {
            let a: AccountView = client
                .post(
                    "/v1/accounts",
                    &NewAccount {
                        name,
                        parent,
                        emails,
                    },
                )
                .await?;
            let text = format!("created account {}\n{}", a.record.name, describe(&a));
            Output::new(&a, text)
        }
        AccountsCmd::List => {
            let list: AccountList = client.get("/v1/accounts").await?;
            // KEYS: active/all; API, SMTP: the blocking modes in force.
            let mut text = format!(
                "{:<24} {:<16} {:>9} {:>10}  {:<8} {}\n",
                "NAME", "ORGANIZATION", "KEYS", "AUTHORIZED", "API", "SMTP"
            );
            for a in &list.accounts {
                text.push_str(&line(a));
            }
            if list.accounts.is_empty() {
                text = "no accounts\n".into();
            }
            Output::new(&list, text)
        }
        AccountsCmd::Show { name } => {
            let a: AccountView = client
                .get(&format!("/v1/accounts/{}", query_value(&name)))
                .await?;
            let text = describe(&a);
            Output::new(&a, text)
        }
        AccountsCmd::Remove { name, force } => {
            let r: AccountRemoved = client
                .delete(&format!(
                    "/v1/accounts/{}?force={force}",
                    query_value(&name)
                ))
                .await?;
            let mut text = format!("removed account {}\n", r.name);
            if !r.keys_revoked.is_empty() {
                text.push_str(&format!(
                    "  revoked {} key(s) with it: {}\n",
                    r.keys_revoked.len(),
                    r.keys_revoked.join(", ")
                ));
            }
            Output::new(&r, text)
        }
        AccountsCmd::Enforce { name, state } => {
            let a: AccountView = client
                .post(
                    &format!("/v1/accounts/{}/enforce", query_value(&name)),
                    &Enforce {
                        enforce: state == "on",
                    },
                )
                .await?;
            let text = format!(
                "{} {} blocking on its sub-accounts\n",
                a.record.name,
                if a.record.enforce_blocking {
                    "enforces"
                } else {
                    "no longer enforces"
                }
            );
            Output::new(&a, text)
        }
    }
}
