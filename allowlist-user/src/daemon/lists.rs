//! An account's authorized list, its unauthorized list, learning and deny.

use std::net::IpAddr;

use ipnet::IpNet;

use crate::{
    api::{AuthorizedView, DenyOutcome},
    daemon::{Daemon, DaemonError, no_account},
    policy::ApiMode,
    policy::{self, parse_allow_entry},
    store::{AuthorizedRecord, UnauthorizedRecord},
};

/// Entries one import may hold.
pub const MAX_IMPORT: usize = 200_000;
/// The longest label of an authorized entry, in characters.
pub const MAX_LABEL: usize = 200;

fn check_label(label: &str) -> Result<(), DaemonError> {
    let n = label.chars().count();
    if n > MAX_LABEL {
        return Err(DaemonError::Invalid(format!(
            "a label holds at most {MAX_LABEL} characters ({n} given)"
        )));
    }
    if label.chars().any(char::is_control) {
        return Err(DaemonError::Invalid(
            "a label may not hold control characters (newlines, tabs)".into(),
        ));
    }
    Ok(())
}

/// What authorizing adds.
pub struct Authorize<'a> {
    pub cidr: &'a str,
    pub label: Option<String>,
    /// "manual", "learned" or "unauthorized".
    pub source: &'a str,
    pub key_id: Option<String>,
    /// An organization's entry for every sub-account.
    pub share: bool,
}

impl Daemon {
    pub fn list_authorized(&self, account: &str) -> Result<Vec<AuthorizedView>, DaemonError> {
        let mut out = self.with_state(|st| {
            let a = st.account(account).ok_or_else(|| no_account(account))?;
            let mut out: Vec<AuthorizedView> = a
                .authorized
                .values()
                .map(|e| AuthorizedView {
                    entry: e.clone(),
                    shared_by: None,
                    last_seen_at: None,
                    hits: 0,
                })
                .collect();
            if let Some(org) = st.parent_of(account) {
                out.extend(org.shared().map(|e| AuthorizedView {
                    entry: e.clone(),
                    shared_by: Some(org.record.name.clone()),
                    last_seen_at: None,
                    hits: 0,
                }));
            }
            Ok::<_, DaemonError>(out)
        })?;
        let hits = self.entry_hits(account)?;
        for v in &mut out {
            if let Some(&(h, last)) = hits.get(&v.entry.cidr) {
                v.hits = h;
                v.last_seen_at = last;
            }
        }
        Ok(out)
    }

    pub async fn authorize(
        &self,
        account: &str,
        req: Authorize<'_>,
        actor: &str,
    ) -> Result<AuthorizedRecord, DaemonError> {
        let net = parse_allow_entry(req.cidr).map_err(DaemonError::Invalid)?;
        check_label(req.label.as_deref().unwrap_or(""))?;
        if req.share && self.with_state(|st| st.parent_of(account).is_some()) {
            return Err(DaemonError::Invalid(format!(
                "--share is for organizations; {account} is a sub-account (organizations are one level deep)"
            )));
        }
        let rec = AuthorizedRecord {
            cidr: net,
            label: req.label.unwrap_or_default(),
            source: req.source.to_string(),
            key_id: req.key_id,
            created_at: self.clock.now_ms() / 1000,
            created_by: actor.to_string(),
            shared: req.share,
        };
        let r = rec.clone();
        // An explicit authorization lifts a denial inside it; a learned one
        // never does (a learned /24 must not re-admit a denied address).
        let explicit = req.source != "learned";
        let lifted: Vec<IpAddr> = if explicit {
            self.with_state(|st| {
                st.account(account)
                    .map(|a| {
                        a.denied
                            .iter()
                            .filter(|d| net.contains(*d))
                            .copied()
                            .collect()
                    })
                    .unwrap_or_default()
            })
        } else {
            Vec::new()
        };
        self.change(
            |st| {
                let a = st.account_mut(account).ok_or_else(|| no_account(account))?;
                if a.authorized.contains_key(&net) {
                    return Err(DaemonError::Invalid(format!("{net} is already authorized")));
                }
                if r.source == "learned" {
                    a.record.last_learned_at = r.created_at;
                }
                a.authorized.insert(net, r);
                for d in &lifted {
                    a.denied.remove(d);
                }
                Ok(())
            },
            |_| {
                let added = self.store.add_authorized(account, &rec, actor)?;
                for d in &lifted {
                    self.store.set_unauthorized(account, *d, None, actor)?;
                }
                Ok(added)
            },
        )
        .await?;
        // Authorizing a refused address takes it off the unauthorized list.
        if explicit {
            for u in self.store.list_unauthorized(Some(account))? {
                if net.contains(&u.addr) {
                    self.store.set_unauthorized(account, u.addr, None, actor)?;
                }
            }
        }
        tracing::info!(account, cidr = %net, source = req.source, actor, "authorized");
        Ok(rec)
    }

    /// Authorizes many entries in one change: all of them checked first
    /// (one bad entry refuses the whole import, naming it), then one
    /// kernel write of the account's entries, one store transaction, one
    /// snapshot swap. Entries already listed are counted and left alone.
    pub async fn authorize_many(
        &self,
        account: &str,
        entries: Vec<(String, Option<String>)>,
        share: bool,
        actor: &str,
    ) -> Result<crate::api::ImportOutcome, DaemonError> {
        if entries.is_empty() {
            return Err(DaemonError::Invalid("the import holds no entry".into()));
        }
        if entries.len() > MAX_IMPORT {
            return Err(DaemonError::Invalid(format!(
                "the import holds {} entries, more than {MAX_IMPORT}; split the file",
                entries.len()
            )));
        }
        if share && self.with_state(|st| st.parent_of(account).is_some()) {
            return Err(DaemonError::Invalid(format!(
                "--share is for organizations; {account} is a sub-account (organizations are one level deep)"
            )));
        }
        let now = self.clock.now_ms() / 1000;
        let mut bad = super::BadEntries::default();
        let mut recs: std::collections::BTreeMap<IpNet, AuthorizedRecord> = Default::default();
        let given = entries.len();
        for (i, (cidr, label)) in entries.into_iter().enumerate() {
            let checked = parse_allow_entry(&cidr).and_then(|net| {
                check_label(label.as_deref().unwrap_or(""))
                    .map(|()| net)
                    .map_err(|e| e.to_string())
            });
            match checked {
                Ok(net) => {
                    recs.entry(net).or_insert(AuthorizedRecord {
                        cidr: net,
                        label: label.unwrap_or_default(),
                        source: "manual".into(),
                        key_id: None,
                        created_at: now,
                        created_by: actor.to_string(),
                        shared: share,
                    });
                }
                Err(m) => bad.push(i, &cidr, m),
            }
        }
        bad.check(given)?;
        let (fresh, lifted): (Vec<AuthorizedRecord>, Vec<IpAddr>) = self.with_state(|st| {
            let a = st.account(account).ok_or_else(|| no_account(account))?;
            let fresh: Vec<AuthorizedRecord> = recs
                .values()
                .filter(|r| !a.authorized.contains_key(&r.cidr))
                .cloned()
                .collect();
            let set = policy::PrefixSet::new(fresh.iter().map(|r| r.cidr));
            let lifted = a
                .denied
                .iter()
                .filter(|d| set.longest_match(**d).is_some())
                .copied()
                .collect();
            Ok::<_, DaemonError>((fresh, lifted))
        })?;
        let already_listed = given - fresh.len();
        if !fresh.is_empty() {
            self.change(
                |st| {
                    let a = st.account_mut(account).ok_or_else(|| no_account(account))?;
                    for r in &fresh {
                        a.authorized.entry(r.cidr).or_insert_with(|| r.clone());
                    }
                    for d in &lifted {
                        a.denied.remove(d);
                    }
                    Ok(())
                },
                |_| {
                    self.store.add_authorized_many(account, &fresh, actor)?;
                    for d in &lifted {
                        self.store.set_unauthorized(account, *d, None, actor)?;
                    }
                    Ok(())
                },
            )
            .await?;
            let set = policy::PrefixSet::new(fresh.iter().map(|r| r.cidr));
            for u in self.store.list_unauthorized(Some(account))? {
                if set.longest_match(u.addr).is_some() {
                    self.store.set_unauthorized(account, u.addr, None, actor)?;
                }
            }
        }
        tracing::info!(
            account,
            added = fresh.len(),
            already_listed,
            actor,
            "authorized an import"
        );
        Ok(crate::api::ImportOutcome {
            account: account.to_string(),
            added: fresh.len(),
            already_listed,
        })
    }

    pub async fn unauthorize(
        &self,
        account: &str,
        cidr: &str,
        actor: &str,
    ) -> Result<AuthorizedRecord, DaemonError> {
        let net = parse_allow_entry(cidr).map_err(DaemonError::Invalid)?;
        let removed = self
            .change(
                |st| {
                    let shared_by = st
                        .parent_of(account)
                        .filter(|org| org.shared().any(|e| e.cidr == net))
                        .map(|org| org.record.name.clone());
                    let a = st.account_mut(account).ok_or_else(|| no_account(account))?;
                    if a.authorized.remove(&net).is_some() {
                        return Ok(());
                    }
                    Err(match shared_by {
                        Some(org) => DaemonError::Invalid(format!(
                            "{net} is shared by the organization {org}; only {org} can remove it"
                        )),
                        None => DaemonError::NotFound(format!(
                            "{net} is not on the authorized list; `allowlistctl ips list` shows it"
                        )),
                    })
                },
                |_| Ok(self.store.remove_authorized(account, &net, actor)?),
            )
            .await?;
        removed.ok_or_else(|| DaemonError::NotFound(format!("{net} is not on the authorized list")))
    }

    pub fn list_unauthorized(&self, account: &str) -> Result<Vec<UnauthorizedRecord>, DaemonError> {
        if self.with_state(|st| st.account(account).is_none()) {
            return Err(no_account(account));
        }
        Ok(self.store.list_unauthorized(Some(account))?)
    }

    /// Learning: authorizes the /24 or /64 of a successful caller, once.
    /// Called off the request path (the proxy queues it).
    pub async fn learn(
        &self,
        account: &str,
        net: IpNet,
        key_id: &str,
    ) -> Result<bool, DaemonError> {
        let known = self.with_state(|st| {
            let Some(a) = st.account(account) else {
                return true;
            };
            Self::modes_in_force(st, a).0 != ApiMode::Learning
                || a.authorized
                    .keys()
                    .any(|e| e.contains(&net.network()) && e.prefix_len() <= net.prefix_len())
        });
        if known {
            return Ok(false);
        }
        let req = Authorize {
            cidr: &net.to_string(),
            label: Some(format!("learned from key {key_id}")),
            source: "learned",
            key_id: Some(key_id.to_string()),
            share: false,
        };
        match self.authorize(account, req, "learning").await {
            Ok(_) => Ok(true),
            Err(DaemonError::Invalid(m)) if m.contains("already authorized") => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// What `ips deny` is asked to do.
pub struct DenyRequest {
    pub addr: String,
    /// Also drop it at XDP (installation-wide: operators only, checked by
    /// the caller).
    pub drop: bool,
    pub ttl: Option<String>,
    pub rotate_key: bool,
}

impl Daemon {
    /// Denies a refused address for `account`: it stays refused (even
    /// inside an authorized or learned range) until authorized explicitly;
    /// with `drop` it is also dropped at XDP (for `ttl`); with `rotate_key`
    /// every key of the account it used is rotated with no grace, so the
    /// old secret stops at once.
    pub async fn deny(
        &self,
        account: &str,
        req: DenyRequest,
        actor: &str,
    ) -> Result<DenyOutcome, DaemonError> {
        let DenyRequest {
            addr,
            drop,
            ttl,
            rotate_key,
        } = req;
        let addr: IpAddr = addr.trim().parse().map(policy::source_unit).map_err(|_| {
            DaemonError::Invalid(format!(
                "{addr:?} is not an IP address; `allowlistctl ips unauthorized` lists them"
            ))
        })?;
        let entries: Vec<UnauthorizedRecord> = self
            .list_unauthorized(account)?
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
        let placeholder = UnauthorizedRecord::refused(
            account,
            addr,
            "api",
            String::new(),
            0,
            self.clock.now_ms() / 1000,
        );
        let n = self
            .change(
                |st| {
                    st.account_mut(account)
                        .ok_or_else(|| no_account(account))?
                        .denied
                        .insert(addr);
                    Ok(())
                },
                |_| {
                    if entries.is_empty() {
                        self.store.record_unauthorized(
                            std::slice::from_ref(&placeholder),
                            self.config.blocking.unauthorized_max,
                        )?;
                    }
                    Ok(self
                        .store
                        .set_unauthorized(account, addr, Some("denied"), actor)?)
                },
            )
            .await?;
        let dropped = if drop {
            let req = crate::api::AddDrop {
                cidr: addr.to_string(),
                ttl,
                reason: Some(format!("denied from {account}'s unauthorized list")),
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
                rotated.push(self.rotate_key(account, &id, Some("0"), actor).await?);
            }
        }
        tracing::info!(account, %addr, drop, rotate_key, actor, "denied");
        Ok(DenyOutcome {
            addr,
            entries: n,
            dropped,
            rotated,
        })
    }
}
