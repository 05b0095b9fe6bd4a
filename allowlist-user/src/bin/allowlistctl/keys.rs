//! `allowlistctl keys ...`

use allowlist::api::{AllowEntry, Empty, KeyList, KeyView, NewKey, RotateKey};
use clap::Subcommand;

use crate::{
    Output,
    client::{Client, CtlError, query_value},
};

#[derive(Subcommand, Debug)]
pub enum KeysCmd {
    /// Create a key. Its plaintext is shown once, here.
    Create {
        /// e.g. production-web-app
        #[arg(long)]
        name: String,
        #[arg(long, default_value = "")]
        description: String,
        /// full (default), read, send or contacts; repeatable.
        #[arg(long = "scope")]
        scopes: Vec<String>,
        /// CIDR or address, optionally CIDR=LABEL; repeatable (at most 20).
        #[arg(long = "allow")]
        allow: Vec<String>,
        /// N/second|minute|hour|day, e.g. 100/minute.
        #[arg(long)]
        rate: Option<String>,
    },
    /// List keys.
    List,
    /// Show one key.
    Show { id: String },
    /// Revoke a key at once (live connections using it are cut).
    Revoke { id: String },
    /// Issue a new secret; the old one keeps working for the grace period.
    Rotate {
        id: String,
        /// 0 to 48h (default 24h).
        #[arg(long)]
        grace: Option<String>,
    },
    /// Add an entry to a key's allowlist.
    Allow {
        id: String,
        cidr: String,
        #[arg(long)]
        label: Option<String>,
    },
    /// Remove an entry from a key's allowlist.
    Disallow { id: String, cidr: String },
}

fn describe(k: &KeyView) -> String {
    let scopes: Vec<&str> = k.scopes.iter().map(|s| s.as_str()).collect();
    let mut t = format!(
        "{}  {}  [{}]  {:?}{}  (account {})\n",
        k.id,
        k.name,
        scopes.join(","),
        k.status,
        k.rate
            .as_ref()
            .map(|r| format!("  rate {r}"))
            .unwrap_or_default(),
        k.account
    );
    if k.allow.is_empty() {
        t.push_str("    allowlist: empty (every address passes this layer)\n");
    }
    for a in &k.allow {
        t.push_str(&format!(
            "    allow {}{}\n",
            a.cidr,
            if a.label.is_empty() {
                String::new()
            } else {
                format!("  ({})", a.label)
            }
        ));
    }
    t.push_str(&format!(
        "    last used: {}   requests today: {}\n",
        k.last_used_at
            .map(|t| t.to_string())
            .unwrap_or_else(|| "never".into()),
        k.requests_today
    ));
    if let Some(exp) = k.previous_secret_expires_at {
        t.push_str(&format!(
            "    previous secret works until {exp} (Unix time)\n"
        ));
    }
    t
}

fn with_secret(k: &KeyView) -> String {
    let mut t = describe(k);
    if let Some(key) = &k.key {
        t.push_str(&format!(
            "\n    key: {key}\n\n    This is the only time the key is shown. Store it now.\n"
        ));
    }
    t
}

pub async fn run(client: &Client, cmd: KeysCmd) -> Result<Output, CtlError> {
    match cmd {
        KeysCmd::Create {
            name,
            description,
            scopes,
            allow,
            rate,
        } => {
            let k: KeyView = client
                .post(
                    "/v1/keys",
                    &NewKey {
                        name,
                        description,
                        scopes,
                        allow,
                        rate,
                    },
                )
                .await?;
            Output::new(&k, with_secret(&k))
        }
        KeysCmd::List => {
            let list: KeyList = client.get("/v1/keys").await?;
            let text = if list.keys.is_empty() {
                "no keys; create one with `allowlistctl keys create --name NAME`\n".into()
            } else {
                list.keys.iter().map(describe).collect()
            };
            Output::new(&list, text)
        }
        KeysCmd::Show { id } => {
            let k: KeyView = client
                .get(&format!("/v1/keys/{}", query_value(&id)))
                .await?;
            Output::new(&k, describe(&k))
        }
        KeysCmd::Revoke { id } => {
            let k: KeyView = client
                .post(&format!("/v1/keys/{}/revoke", query_value(&id)), &Empty {})
                .await?;
            Output::new(&k, format!("revoked {}\n", k.id))
        }
        KeysCmd::Rotate { id, grace } => {
            let k: KeyView = client
                .post(
                    &format!("/v1/keys/{}/rotate", query_value(&id)),
                    &RotateKey { grace },
                )
                .await?;
            Output::new(&k, with_secret(&k))
        }
        KeysCmd::Allow { id, cidr, label } => {
            let k: KeyView = client
                .post(
                    &format!("/v1/keys/{}/allow", query_value(&id)),
                    &AllowEntry { cidr, label },
                )
                .await?;
            Output::new(&k, describe(&k))
        }
        KeysCmd::Disallow { id, cidr } => {
            let k: KeyView = client
                .delete(&format!(
                    "/v1/keys/{}/allow?cidr={}",
                    query_value(&id),
                    query_value(&cidr)
                ))
                .await?;
            Output::new(&k, describe(&k))
        }
    }
}
