//! `allowlistctl ips ...`

use allowlist::{
    api::{Authorize, AuthorizedList, AuthorizedView, Deny, DenyOutcome, UnauthorizedList},
    store::AuthorizedRecord,
};
use clap::Subcommand;

use crate::{
    Output,
    client::{Client, CtlError, query_value},
};

#[derive(Subcommand, Debug)]
pub enum IpsCmd {
    /// The account's authorized list.
    List,
    /// Authorize a network for every key (and SMTP).
    Authorize {
        cidr: String,
        #[arg(long)]
        label: Option<String>,
        /// An organization's entry, in force in every sub-account (and
        /// removable only by the organization).
        #[arg(long)]
        share: bool,
    },
    /// Remove a network from the authorized list.
    Remove { cidr: String },
    /// Refused addresses.
    Unauthorized,
    /// Deny a refused address: it stays refused.
    Deny {
        addr: String,
        /// Also drop it in the kernel at XDP.
        #[arg(long)]
        drop: bool,
        /// With --drop: for how long (e.g. 24h); default until removed.
        #[arg(long, requires = "drop")]
        ttl: Option<String>,
        /// Also rotate every key it used.
        #[arg(long)]
        rotate_key: bool,
    },
}

fn entry(v: &AuthorizedView) -> String {
    let e = &v.entry;
    let whose = match &v.shared_by {
        Some(org) => format!("  (shared by {org})"),
        None if e.shared => "  (shared with the sub-accounts)".into(),
        None => String::new(),
    };
    format!(
        "{:<43} {:<12} {}{whose}\n",
        e.cidr.to_string(),
        e.source,
        e.label
    )
}

pub async fn run(client: &Client, cmd: IpsCmd) -> Result<Output, CtlError> {
    match cmd {
        IpsCmd::List => {
            let list: AuthorizedList = client.get("/v1/ips").await?;
            let text = if list.authorized.is_empty() {
                "the authorized list is empty\n".into()
            } else {
                list.authorized.iter().map(entry).collect()
            };
            Output::new(&list, text)
        }
        IpsCmd::Authorize { cidr, label, share } => {
            let r: AuthorizedRecord = client
                .post("/v1/ips", &Authorize { cidr, label, share })
                .await?;
            let text = format!(
                "authorized {}{}\n",
                r.cidr,
                if r.shared {
                    " (shared with the sub-accounts)"
                } else {
                    ""
                }
            );
            Output::new(&r, text)
        }
        IpsCmd::Remove { cidr } => {
            let r: AuthorizedRecord = client
                .delete(&format!("/v1/ips?cidr={}", query_value(&cidr)))
                .await?;
            let text = format!("removed {} from the authorized list\n", r.cidr);
            Output::new(&r, text)
        }
        IpsCmd::Unauthorized => {
            let list: UnauthorizedList = client.get("/v1/ips/unauthorized").await?;
            let mut text = String::new();
            for u in &list.unauthorized {
                text.push_str(&format!(
                    "{:<39} {:<4} key {:<16} port {:<5} attempts {:<6} first {} last {} {}\n",
                    u.addr.to_string(),
                    u.service,
                    if u.key_id.is_empty() { "-" } else { &u.key_id },
                    u.port,
                    u.attempts,
                    u.first_seen,
                    u.last_seen,
                    u.status
                ));
            }
            if text.is_empty() {
                text = "no refused addresses\n".into();
            }
            Output::new(&list, text)
        }
        IpsCmd::Deny {
            addr,
            drop,
            ttl,
            rotate_key,
        } => {
            let d: DenyOutcome = client
                .post(
                    "/v1/ips/deny",
                    &Deny {
                        addr,
                        drop,
                        ttl,
                        rotate_key,
                    },
                )
                .await?;
            let mut text = format!("denied {}\n", d.addr);
            if d.dropped.is_some() {
                text.push_str("  dropped in the kernel at XDP\n");
            }
            for k in &d.rotated {
                text.push_str(&format!(
                    "  rotated key {}: new key {}\n  (shown once; store it now)\n",
                    k.id,
                    k.key.as_deref().unwrap_or("")
                ));
            }
            Output::new(&d, text)
        }
    }
}
