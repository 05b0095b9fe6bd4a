//! The account's authorized list, the unauthorized list, learning and deny.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::{
    daemon::{Daemon, DaemonError},
    policy::ApiMode,
    policy::{self, parse_allow_entry},
    store::{AuthorizedRecord, UnauthorizedRecord},
};

use super::KeyView;

impl Daemon {
    pub fn list_authorized(&self) -> Vec<AuthorizedRecord> {
        self.with_state(|st| st.authorized.values().cloned().collect())
    }

    pub async fn authorize(
        &self,
        cidr: &str,
        label: Option<String>,
        source: &str,
        key_id: Option<String>,
        actor: &str,
    ) -> Result<AuthorizedRecord, DaemonError> {
        let net = parse_allow_entry(cidr).map_err(DaemonError::Invalid)?;
        let rec = AuthorizedRecord {
            cidr: net,
            label: label.unwrap_or_default(),
            source: source.to_string(),
            key_id,
            created_at: self.clock.now_ms() / 1000,
        };
        let r = rec.clone();
        // An explicit authorization lifts a denial inside it; a learned one
        // never does (a learned /24 must not re-admit a denied address).
        let explicit = source != "learned";
        let lifted: Vec<IpAddr> = if explicit {
            self.with_state(|st| {
                st.denied
                    .iter()
                    .filter(|a| net.contains(*a))
                    .copied()
                    .collect()
            })
        } else {
            Vec::new()
        };
        self.change(
            |st| {
                if st.authorized.contains_key(&net) {
                    return Err(DaemonError::Invalid(format!("{net} is already authorized")));
                }
                st.authorized.insert(net, r);
                for a in &lifted {
                    st.denied.remove(a);
                }
                Ok(())
            },
            |_| {
                let added = self.store.add_authorized(&rec, actor)?;
                for a in &lifted {
                    self.store.set_unauthorized(*a, None, actor)?;
                }
                Ok(added)
            },
        )
        .await?;
        // Authorizing a refused address takes it off the unauthorized list.
        if explicit {
            for u in self.store.list_unauthorized()? {
                if net.contains(&u.addr) {
                    self.store.set_unauthorized(u.addr, None, actor)?;
                }
            }
        }
        tracing::info!(cidr = %net, source, actor, "authorized");
        Ok(rec)
    }

    pub async fn unauthorize(
        &self,
        cidr: &str,
        actor: &str,
    ) -> Result<AuthorizedRecord, DaemonError> {
        let net = parse_allow_entry(cidr).map_err(DaemonError::Invalid)?;
        let removed = self
            .change(
                |st| {
                    st.authorized.remove(&net).map(|_| ()).ok_or_else(|| {
                        DaemonError::NotFound(format!(
                            "{net} is not on the authorized list; `allowlistctl ips list` shows it"
                        ))
                    })
                },
                |_| Ok(self.store.remove_authorized(&net, actor)?),
            )
            .await?;
        removed.ok_or_else(|| DaemonError::NotFound(format!("{net} is not on the authorized list")))
    }

    pub fn list_unauthorized(&self) -> Result<Vec<UnauthorizedRecord>, DaemonError> {
        Ok(self.store.list_unauthorized()?)
    }

    /// Learning: authorizes the /24 or /64 of a successful caller, once.
    /// Called off the request path (the proxy queues it).
    pub async fn learn(&self, net: IpNet, key_id: &str) -> Result<bool, DaemonError> {
        let known = self.with_state(|st| {
            st.blocking.api != ApiMode::Learning
                || st
                    .authorized
                    .keys()
                    .any(|a| a.contains(&net.network()) && a.prefix_len() <= net.prefix_len())
        });
        if known {
            return Ok(false);
        }
        let label = format!("learned from key {key_id}");
        match self
            .authorize(
                &net.to_string(),
                Some(label),
                "learned",
                Some(key_id.to_string()),
                "learning",
            )
            .await
        {
            Ok(_) => Ok(true),
            Err(DaemonError::Invalid(m)) if m.contains("already authorized") => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// What `ips deny` did.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DenyOutcome {
    pub addr: IpAddr,
    /// Unauthorized-list entries marked denied.
    pub entries: usize,
    /// The drop-list entry made with `--drop`.
    pub dropped: Option<crate::api::DropView>,
    /// Keys rotated with `--rotate-key` (with their new plaintext key).
    pub rotated: Vec<KeyView>,
}

impl Daemon {
    /// Denies a refused address: it stays refused (even inside an authorized
    /// or learned range) until authorized explicitly; with `drop` it is also
    /// dropped at XDP (for `ttl`); with `rotate_key` every key it used is
    /// rotated with no grace, so the old secret stops at once.
    pub async fn deny(
        &self,
        addr: &str,
        drop: bool,
        ttl: Option<String>,
        rotate_key: bool,
        actor: &str,
    ) -> Result<DenyOutcome, DaemonError> {
        let addr: IpAddr = addr.trim().parse().map(policy::source_unit).map_err(|_| {
            DaemonError::Invalid(format!(
                "{addr:?} is not an IP address; `allowlistctl ips unauthorized` lists them"
            ))
        })?;
        let entries: Vec<UnauthorizedRecord> = self
            .store
            .list_unauthorized()?
            .into_iter()
            .filter(|u| u.addr == addr)
            .collect();
        if entries.is_empty() && !drop {
            return Err(DaemonError::NotFound(format!(
                "{addr} is not on the unauthorized list; use --drop to drop it in the kernel anyway"
            )));
        }
        if ttl.is_some() && !drop {
            return Err(DaemonError::Invalid("--ttl goes with --drop".into()));
        }
        // In force at once, in the snapshot, through the one change path;
        // a denial of an address never refused gets its own row, so it
        // persists like any other.
        let placeholder =
            UnauthorizedRecord::refused(addr, "api", String::new(), 0, self.clock.now_ms() / 1000);
        let n = self
            .change(
                |st| {
                    st.denied.insert(addr);
                    Ok(())
                },
                |_| {
                    if entries.is_empty() {
                        self.store.record_unauthorized(
                            std::slice::from_ref(&placeholder),
                            self.config.blocking.unauthorized_max,
                        )?;
                    }
                    Ok(self.store.set_unauthorized(addr, Some("denied"), actor)?)
                },
            )
            .await?;
        let dropped = if drop {
            let req = crate::api::AddDrop {
                cidr: addr.to_string(),
                ttl,
                reason: Some("denied from the unauthorized list".into()),
            };
            Some(
                self.add_drop_kind(req, crate::store::DropKind::Denied, actor)
                    .await?,
            )
        } else {
            None
        };
        let mut rotated = Vec::new();
        if rotate_key {
            let mut ids: Vec<String> = entries
                .iter()
                .filter(|e| !e.key_id.is_empty())
                .map(|e| e.key_id.clone())
                .collect();
            ids.sort();
            ids.dedup();
            for id in ids {
                // The secret is presumed stolen: no grace period.
                rotated.push(self.rotate_key(&id, Some("0"), actor).await?);
            }
        }
        tracing::info!(%addr, drop, rotate_key, actor, "denied");
        Ok(DenyOutcome {
            addr,
            entries: n,
            dropped,
            rotated,
        })
    }
}
