//! `allowlistctl ips ...`

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

pub async fn run(client: &Client, cmd: IpsCmd) -> Result<Output, CtlError> {
    let (v, text): (serde_json::Value, String) = match cmd {
        IpsCmd::List => {
            let v: serde_json::Value = client.get("/v1/ips").await?;
            let mut text = String::new();
            for a in v["authorized"].as_array().into_iter().flatten() {
                text.push_str(&format!(
                    "{:<43} {:<8} {}\n",
                    a["cidr"].as_str().unwrap_or(""),
                    a["source"].as_str().unwrap_or(""),
                    a["label"].as_str().unwrap_or("")
                ));
            }
            if text.is_empty() {
                text = "the authorized list is empty\n".into();
            }
            (v, text)
        }
        IpsCmd::Authorize { cidr, label } => {
            let v: serde_json::Value = client
                .post("/v1/ips", &allowlist::api::AllowEntry { cidr, label })
                .await?;
            let text = format!("authorized {}\n", v["cidr"].as_str().unwrap_or(""));
            (v, text)
        }
        IpsCmd::Remove { cidr } => {
            let v: serde_json::Value = client
                .delete(&format!("/v1/ips?cidr={}", query_value(&cidr)))
                .await?;
            let text = format!(
                "removed {} from the authorized list\n",
                v["cidr"].as_str().unwrap_or("")
            );
            (v, text)
        }
        IpsCmd::Unauthorized => {
            let v: serde_json::Value = client.get("/v1/ips/unauthorized").await?;
            let mut text = String::new();
            for u in v["unauthorized"].as_array().into_iter().flatten() {
                text.push_str(&format!(
                    "{:<39} {:<4} key {:<16} port {:<5} attempts {:<6} first {} last {} {}\n",
                    u["addr"].as_str().unwrap_or(""),
                    u["service"].as_str().unwrap_or(""),
                    u["key_id"].as_str().unwrap_or("-"),
                    u["port"],
                    u["attempts"],
                    u["first_seen"],
                    u["last_seen"],
                    u["status"].as_str().unwrap_or("")
                ));
            }
            if text.is_empty() {
                text = "no refused addresses\n".into();
            }
            (v, text)
        }
        IpsCmd::Deny {
            addr,
            drop,
            ttl,
            rotate_key,
        } => {
            let v: serde_json::Value = client
                .post(
                    "/v1/ips/deny",
                    &allowlist::api::Deny {
                        addr,
                        drop,
                        ttl,
                        rotate_key,
                    },
                )
                .await?;
            let mut text = format!("denied {}\n", v["addr"].as_str().unwrap_or(""));
            if !v["dropped"].is_null() {
                text.push_str("  dropped in the kernel at XDP\n");
            }
            for k in v["rotated"].as_array().into_iter().flatten() {
                text.push_str(&format!(
                    "  rotated key {}: new key {}\n  (shown once; store it now)\n",
                    k["id"].as_str().unwrap_or(""),
                    k["key"].as_str().unwrap_or("")
                ));
            }
            (v, text)
        }
    };
    Ok(Output { json: v, text })
}
