//! `allowlistctl ips ...`

use allowlist::{
    api::{
        AddressCheck, AllowEntry, Authorize, AuthorizedList, AuthorizedView, Deny, DenyOutcome,
        ImportEntries, ImportOutcome, UnauthorizedList, Verdict,
    },
    store::AuthorizedRecord,
};
use clap::Subcommand;

use crate::{
    Output,
    client::{Client, CtlError, query_value},
    import_file::Progress,
};

#[derive(Subcommand, Debug)]
pub enum IpsCmd {
    /// The account's authorized list.
    List,
    /// Authorize a network for every key (and SMTP); with --file, every
    /// entry of a file in one change.
    Authorize {
        #[arg(required_unless_present = "file")]
        cidr: Option<String>,
        #[arg(long, conflicts_with = "file")]
        label: Option<String>,
        /// One entry per line: an address or CIDR, then an optional label;
        /// blank lines and `#` comments are skipped. All of it or nothing.
        #[arg(long, conflicts_with = "cidr")]
        file: Option<std::path::PathBuf>,
        /// An organization's entry, in force in every sub-account (and
        /// removable only by the organization).
        #[arg(long)]
        share: bool,
        /// Report the import's progress on stderr even when it is not a
        /// terminal (on a terminal it always is).
        #[arg(long, requires = "file")]
        progress: bool,
    },
    /// Remove a network from the authorized list.
    Remove { cidr: String },
    /// Refused addresses.
    Unauthorized,
    /// Which rule admits or refuses an address now, per layer (the
    /// account's API and SMTP blocking; a key's allowlist with --key).
    Check {
        addr: String,
        /// Also check this key's own allowlist.
        #[arg(long)]
        key: Option<String>,
    },
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
    let last = v
        .last_seen_at
        .map(|t| {
            humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + std::time::Duration::from_secs(t.max(0) as u64),
            )
            .to_string()
        })
        .unwrap_or_else(|| "-".into());
    format!(
        "{:<43} {:<12} {:>8} hits  last {:<20} {}{whose}\n",
        e.cidr.to_string(),
        e.source,
        v.hits,
        last,
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
        IpsCmd::Authorize {
            file: Some(file),
            share,
            progress,
            ..
        } => import(client, &file, share, Progress::new(progress)).await,
        IpsCmd::Authorize {
            cidr, label, share, ..
        } => {
            let cidr = cidr.unwrap_or_default();
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
        IpsCmd::Check { addr, key } => {
            let mut path = format!("/v1/ips/check?addr={}", query_value(&addr));
            if let Some(k) = &key {
                path.push_str(&format!("&key={}", query_value(k)));
            }
            let c: AddressCheck = client.get(&path).await?;
            let line = |layer: &str, v: &Verdict| {
                format!(
                    "{layer:<14} {:<9} {}\n",
                    if v.admitted { "admitted" } else { "refused" },
                    v.rule
                )
            };
            let mut text = String::new();
            if let Some(k) = &c.key {
                text.push_str(&line("key allowlist", k));
            }
            text.push_str(&line("api", &c.api));
            text.push_str(&line("smtp", &c.smtp));
            Output::new(&c, text)
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

async fn import(
    client: &Client,
    file: &std::path::Path,
    share: bool,
    progress: Progress,
) -> Result<Output, CtlError> {
    let entries: Vec<AllowEntry> = progress
        .read(file)?
        .into_iter()
        .map(|l| AllowEntry {
            cidr: l.cidr,
            label: l.rest,
        })
        .collect();
    let doing = format!("authorizing {} entries", entries.len());
    let r: ImportOutcome = progress
        .wait(
            &doing,
            client.post("/v1/ips/import", &ImportEntries { entries, share }),
        )
        .await?;
    let text = format!(
        "authorized {} new entries in account {} ({} already listed)\n",
        r.added, r.account, r.already_listed
    );
    Output::new(&r, text)
}
