//! `allowlistctl drop ...`

use allowlist::api::{AddDrop, DropImportOutcome, DropList, DropView, ImportDrops};
use clap::Subcommand;

use crate::{
    Output,
    client::{Client, CtlError, query_value},
    import_file::Progress,
};

#[derive(Subcommand, Debug)]
pub enum DropCmd {
    /// List the drop list.
    List,
    /// Drop a source prefix at XDP (IPv4 /8 or longer, IPv6 /24 or longer).
    Add {
        /// Address or CIDR, e.g. 203.0.113.0/24 or 2001:db8::/48.
        #[arg(required_unless_present = "file")]
        cidr: Option<String>,
        /// One entry per line: an address or CIDR, then an optional reason
        /// (else --reason); blank lines and `#` comments are skipped.
        /// Every entry in one change: all of it or nothing.
        #[arg(long, conflicts_with = "cidr")]
        file: Option<std::path::PathBuf>,
        /// Remove the entry after this long, e.g. 90s, 10m, 24h, 7d.
        #[arg(long)]
        ttl: Option<String>,
        /// Why (shown in `drop list` and the audit log).
        #[arg(long)]
        reason: Option<String>,
        /// Report the import's progress on stderr even when it is not a
        /// terminal (on a terminal it always is).
        #[arg(long, requires = "file")]
        progress: bool,
    },
    /// Remove a prefix from the drop list.
    Remove { cidr: String },
}

fn line(v: &DropView) -> String {
    let r = &v.record;
    let expires = match v.expires_in {
        Some(s) => format!(
            "in {}",
            humantime::format_duration(std::time::Duration::from_secs(s.max(0) as u64))
        ),
        None => "never".into(),
    };
    format!(
        "{:<43} {:<8} {:<22} {}\n",
        r.cidr.to_string(),
        r.kind.as_str(),
        expires,
        r.reason
    )
}

pub async fn run(client: &Client, cmd: DropCmd) -> Result<Output, CtlError> {
    match cmd {
        DropCmd::List => {
            let list: DropList = client.get("/v1/drop").await?;
            let mut text = format!(
                "{:<43} {:<8} {:<22} {}\n",
                "CIDR", "KIND", "EXPIRES", "REASON"
            );
            for v in &list.drops {
                text.push_str(&line(v));
            }
            if list.drops.is_empty() {
                text = "the drop list is empty\n".into();
            }
            Output::new(&list, text)
        }
        DropCmd::Add {
            file: Some(file),
            ttl,
            reason,
            progress,
            ..
        } => {
            let progress = Progress::new(progress);
            let entries: Vec<AddDrop> = progress
                .read(&file)?
                .into_iter()
                .map(|l| AddDrop {
                    cidr: l.cidr,
                    ttl: ttl.clone(),
                    reason: l.rest.or_else(|| reason.clone()),
                })
                .collect();
            let doing = format!("adding {} drop entries", entries.len());
            let r: DropImportOutcome = progress
                .wait(
                    &doing,
                    client.post("/v1/drop/import", &ImportDrops { entries }),
                )
                .await?;
            let text = format!(
                "wrote {} drop entries; the drop list holds {}\n",
                r.written, r.total
            );
            Output::new(&r, text)
        }
        DropCmd::Add {
            cidr, ttl, reason, ..
        } => {
            let cidr = cidr.unwrap_or_default();
            let v: DropView = client
                .post("/v1/drop", &AddDrop { cidr, ttl, reason })
                .await?;
            Output::new(&v, format!("dropping {}\n", v.record.cidr))
        }
        DropCmd::Remove { cidr } => {
            let v: DropView = client
                .delete(&format!("/v1/drop?cidr={}", query_value(&cidr)))
                .await?;
            Output::new(
                &v,
                format!("removed {} from the drop list\n", v.record.cidr),
            )
        }
    }
}
