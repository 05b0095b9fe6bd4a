//! The accounts' authorized and unauthorized lists. Several edges write
//! learned entries, refusals and hit counters at once, so every write here
//! is an idempotent upsert or an addition made in the statement itself.

use std::collections::{BTreeMap, HashMap};

use ipnet::IpNet;

use super::{PgStore, Tx, by_account};
use crate::store::{AuthorizedRecord, ListStore, StoreError, UnauthorizedRecord};

impl PgStore {
    /// Inserts authorized entries, skipping prefixes already listed;
    /// returns how many were inserted.
    pub(super) async fn insert_authorized(
        tx: &Tx<'_>,
        account: &str,
        recs: &[&AuthorizedRecord],
    ) -> Result<u64, tokio_postgres::Error> {
        if recs.is_empty() {
            return Ok(0);
        }
        let cidrs: Vec<String> = recs.iter().map(|r| r.cidr.to_string()).collect();
        let labels: Vec<&str> = recs.iter().map(|r| r.label.as_str()).collect();
        let sources: Vec<&str> = recs.iter().map(|r| r.source.as_str()).collect();
        let key_ids: Vec<Option<&str>> = recs.iter().map(|r| r.key_id.as_deref()).collect();
        let created: Vec<i64> = recs.iter().map(|r| r.created_at).collect();
        let by: Vec<&str> = recs.iter().map(|r| r.created_by.as_str()).collect();
        let shared: Vec<bool> = recs.iter().map(|r| r.shared).collect();
        tx.execute(
            "INSERT INTO authorized(account, cidr, label, source, key_id, created_at, created_by, shared)
             SELECT $1, c, l, s, k, t, b, sh
             FROM unnest($2::text[], $3::text[], $4::text[], $5::text[], $6::bigint[], $7::text[], $8::bool[])
               AS u(c, l, s, k, t, b, sh)
             ON CONFLICT (account, cidr) DO NOTHING",
            &[
                &account, &cidrs, &labels, &sources, &key_ids, &created, &by, &shared,
            ],
        )
        .await
    }
}

impl ListStore for PgStore {
    fn authorized_of(
        &self,
        only: Option<&str>,
    ) -> Result<Vec<(String, AuthorizedRecord)>, StoreError> {
        let rows = self.with("listing authorized", async |c| {
            c.query(
                &format!(
                    "SELECT account, cidr, label, source, key_id, created_at, created_by, shared
                     FROM authorized WHERE {} ORDER BY account, created_at, cidr",
                    by_account(only, "account = $1")
                ),
                &[&only],
            )
            .await
        })?;
        let get = |e| self.pg_err("listing authorized")(e);
        rows.iter()
            .map(|r| {
                let cidr: String = r.try_get(1).map_err(get)?;
                Ok((
                    r.try_get(0).map_err(get)?,
                    AuthorizedRecord {
                        cidr: cidr
                            .parse()
                            .map_err(|_| self.corrupt("authorized.cidr", cidr))?,
                        label: r.try_get(2).map_err(get)?,
                        source: r.try_get(3).map_err(get)?,
                        key_id: r.try_get(4).map_err(get)?,
                        created_at: r.try_get(5).map_err(get)?,
                        created_by: r.try_get(6).map_err(get)?,
                        shared: r.try_get(7).map_err(get)?,
                    },
                ))
            })
            .collect()
    }

    fn add_authorized(
        &self,
        account: &str,
        rec: &AuthorizedRecord,
        actor: &str,
    ) -> Result<bool, StoreError> {
        self.tx("authorizing", async |tx| {
            // Two edges learning the same prefix at once: one inserts it,
            // the other finds it listed and writes nothing.
            if Self::insert_authorized(tx, account, &[rec]).await? == 0 {
                return Ok(false);
            }
            if rec.source == "learned" {
                // The learning clock only moves forward, whichever edge
                // learned last.
                tx.execute(
                    "UPDATE accounts SET last_learned_at = greatest(last_learned_at, $2) WHERE name = $1",
                    &[&account, &rec.created_at],
                )
                .await?;
            }
            Self::audit(
                tx,
                account,
                actor,
                "ips.authorize",
                &serde_json::to_value(rec).unwrap_or_default(),
            )
            .await?;
            Ok(true)
        })
    }

    fn add_authorized_many(
        &self,
        account: &str,
        recs: &[AuthorizedRecord],
        actor: &str,
    ) -> Result<usize, StoreError> {
        self.tx("importing", async |tx| {
            let mut added = 0;
            for chunk in recs.chunks(10_000) {
                let refs: Vec<&AuthorizedRecord> = chunk.iter().collect();
                added += Self::insert_authorized(tx, account, &refs).await?;
            }
            Self::audit(
                tx,
                account,
                actor,
                "ips.import",
                &serde_json::json!({ "entries": recs.len(), "added": added }),
            )
            .await?;
            Ok(added as usize)
        })
    }

    fn flush_entry_usage(&self, usage: &[(String, IpNet, i64, u64)]) -> Result<(), StoreError> {
        if usage.is_empty() {
            return Ok(());
        }
        // One row per entry, in key order (see `flush_usage`).
        let mut merged: BTreeMap<(&str, String), (i64, i64)> = BTreeMap::new();
        for (account, cidr, last, n) in usage {
            let e = merged
                .entry((account.as_str(), cidr.to_string()))
                .or_insert((0, 0));
            e.0 = e.0.max(*last);
            e.1 = e.1.saturating_add(*n as i64);
        }
        let accounts: Vec<&str> = merged.keys().map(|k| k.0).collect();
        let cidrs: Vec<&str> = merged.keys().map(|k| k.1.as_str()).collect();
        let hits: Vec<i64> = merged.values().map(|v| v.1).collect();
        let lasts: Vec<i64> = merged.values().map(|v| v.0).collect();
        self.with("flushing entry usage", async |c| {
            c.execute(
                "INSERT INTO entry_usage(account, cidr, hits, last_seen_ms)
                 SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[])
                 ON CONFLICT (account, cidr) DO UPDATE SET
                   hits = entry_usage.hits + excluded.hits,
                   last_seen_ms = greatest(entry_usage.last_seen_ms, excluded.last_seen_ms)",
                &[&accounts, &cidrs, &hits, &lasts],
            )
            .await
        })?;
        Ok(())
    }

    fn entry_usage(&self, account: &str) -> Result<HashMap<IpNet, (u64, i64)>, StoreError> {
        let rows = self.with("reading entry usage", async |c| {
            c.query(
                "SELECT cidr, hits, last_seen_ms FROM entry_usage WHERE account = $1",
                &[&account],
            )
            .await
        })?;
        let get = |e| self.pg_err("reading entry usage")(e);
        let mut out = HashMap::new();
        for r in &rows {
            let cidr: String = r.try_get(0).map_err(get)?;
            let hits: i64 = r.try_get(1).map_err(get)?;
            if let Ok(net) = cidr.parse::<IpNet>() {
                out.insert(net, (hits.max(0) as u64, r.try_get(2).map_err(get)?));
            }
        }
        Ok(out)
    }

    fn remove_authorized(
        &self,
        account: &str,
        cidr: &IpNet,
        actor: &str,
    ) -> Result<Option<AuthorizedRecord>, StoreError> {
        let key = cidr.to_string();
        let row = self.tx("removing authorized", async |tx| {
            let Some(row) = tx
                .query_opt(
                    "DELETE FROM authorized WHERE account = $1 AND cidr = $2
                     RETURNING label, source, key_id, created_at, created_by, shared",
                    &[&account, &key],
                )
                .await?
            else {
                return Ok(None);
            };
            // Its hits go with it (a shared entry's, in every sub-account),
            // so an entry authorized again starts from zero.
            tx.execute(
                "DELETE FROM entry_usage WHERE cidr = $2
                   AND (account = $1 OR account IN (SELECT name FROM accounts WHERE parent = $1))",
                &[&account, &key],
            )
            .await?;
            Self::audit(
                tx,
                account,
                actor,
                "ips.remove",
                &serde_json::json!({ "cidr": key }),
            )
            .await?;
            Ok(Some(row))
        })?;
        let Some(r) = row else {
            return Ok(None);
        };
        let get = |e| self.pg_err("removing authorized")(e);
        Ok(Some(AuthorizedRecord {
            cidr: *cidr,
            label: r.try_get(0).map_err(get)?,
            source: r.try_get(1).map_err(get)?,
            key_id: r.try_get(2).map_err(get)?,
            created_at: r.try_get(3).map_err(get)?,
            created_by: r.try_get(4).map_err(get)?,
            shared: r.try_get(5).map_err(get)?,
        }))
    }

    fn record_unauthorized(
        &self,
        hits: &[UnauthorizedRecord],
        cap: usize,
    ) -> Result<u64, StoreError> {
        if hits.is_empty() {
            return Ok(0);
        }
        // One row per source in key order (see `flush_usage`).
        type Key<'a> = (&'a str, String, &'a str, &'a str, i64);
        let mut merged: BTreeMap<Key<'_>, (i64, i64, i64)> = BTreeMap::new();
        for h in hits {
            let e = merged
                .entry((
                    h.account.as_str(),
                    h.addr.to_string(),
                    h.service.as_str(),
                    h.key_id.as_str(),
                    i64::from(h.port),
                ))
                .or_insert((h.first_seen, h.last_seen, 0));
            e.0 = e.0.min(h.first_seen);
            e.1 = e.1.max(h.last_seen);
            e.2 = e.2.saturating_add(h.attempts);
        }
        let col = |f: fn(&Key<'_>) -> String| merged.keys().map(f).collect::<Vec<String>>();
        let accounts = col(|k| k.0.to_string());
        let addrs = col(|k| k.1.clone());
        let services = col(|k| k.2.to_string());
        let key_ids = col(|k| k.3.to_string());
        let ports: Vec<i64> = merged.keys().map(|k| k.4).collect();
        let firsts: Vec<i64> = merged.values().map(|v| v.0).collect();
        let lasts: Vec<i64> = merged.values().map(|v| v.1).collect();
        let attempts: Vec<i64> = merged.values().map(|v| v.2).collect();
        let mut groups: Vec<(String, String)> = merged
            .keys()
            .map(|k| (k.0.to_string(), k.2.to_string()))
            .collect();
        groups.sort();
        groups.dedup();
        let cap = cap as i64;
        self.tx("recording refusals", async |tx| {
            tx.execute(
                "INSERT INTO unauthorized(account, addr, service, key_id, port, first_seen, last_seen, attempts)
                 SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[],
                                      $6::bigint[], $7::bigint[], $8::bigint[])
                 ON CONFLICT (account, addr, service, key_id, port) DO UPDATE SET
                   first_seen = least(unauthorized.first_seen, excluded.first_seen),
                   last_seen = greatest(unauthorized.last_seen, excluded.last_seen),
                   attempts = unauthorized.attempts + excluded.attempts",
                &[
                    &accounts, &addrs, &services, &key_ids, &ports, &firsts, &lasts, &attempts,
                ],
            )
            .await?;
            let mut evicted = 0u64;
            for (account, service) in &groups {
                evicted += tx
                    .execute(
                        "DELETE FROM unauthorized WHERE ctid IN (
                           SELECT ctid FROM unauthorized
                           WHERE account = $1 AND service = $2 AND status != 'denied'
                           ORDER BY last_seen DESC, addr DESC, key_id DESC, port DESC OFFSET $3)",
                        &[account, service, &cap],
                    )
                    .await?;
            }
            Ok(evicted)
        })
    }

    fn list_unauthorized(
        &self,
        account: Option<&str>,
    ) -> Result<Vec<UnauthorizedRecord>, StoreError> {
        let rows = self.with("listing unauthorized", async |c| {
            c.query(
                &format!(
                    "SELECT account, addr, service, key_id, port, first_seen, last_seen, attempts, status
                     FROM unauthorized WHERE {} ORDER BY last_seen DESC, addr",
                    by_account(account, "account = $1")
                ),
                &[&account],
            )
            .await
        })?;
        let get = |e| self.pg_err("listing unauthorized")(e);
        rows.iter()
            .map(|r| {
                let addr: String = r.try_get(1).map_err(get)?;
                let port: i64 = r.try_get(4).map_err(get)?;
                Ok(UnauthorizedRecord {
                    account: r.try_get(0).map_err(get)?,
                    addr: addr
                        .parse()
                        .map_err(|_| self.corrupt("unauthorized.addr", addr))?,
                    service: r.try_get(2).map_err(get)?,
                    key_id: r.try_get(3).map_err(get)?,
                    port: u16::try_from(port)
                        .map_err(|_| self.corrupt("unauthorized.port", port.to_string()))?,
                    first_seen: r.try_get(5).map_err(get)?,
                    last_seen: r.try_get(6).map_err(get)?,
                    attempts: r.try_get(7).map_err(get)?,
                    status: r.try_get(8).map_err(get)?,
                })
            })
            .collect()
    }

    fn set_unauthorized(
        &self,
        account: &str,
        addr: std::net::IpAddr,
        status: Option<&str>,
        actor: &str,
    ) -> Result<usize, StoreError> {
        let a = addr.to_string();
        self.tx("updating unauthorized", async |tx| {
            let n = match status {
                Some(st) => {
                    tx.execute(
                        "UPDATE unauthorized SET status = $3 WHERE account = $1 AND addr = $2",
                        &[&account, &a, &st],
                    )
                    .await?
                }
                None => {
                    tx.execute(
                        "DELETE FROM unauthorized WHERE account = $1 AND addr = $2",
                        &[&account, &a],
                    )
                    .await?
                }
            };
            Self::audit(
                tx,
                account,
                actor,
                "ips.unauthorized",
                &serde_json::json!({ "addr": a, "status": status.unwrap_or("removed") }),
            )
            .await?;
            Ok(n as usize)
        })
    }
}
