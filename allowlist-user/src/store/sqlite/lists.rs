//! The accounts' authorized and unauthorized lists.

use ipnet::IpNet;
use rusqlite::{Connection, OptionalExtension, params};

use super::SqliteStore;
use crate::store::{AuthorizedRecord, ListStore, StoreError, UnauthorizedRecord};

type AuthorizedRow = (
    String,
    String,
    String,
    String,
    Option<String>,
    i64,
    String,
    bool,
);

impl SqliteStore {
    /// Inserts an authorized entry unless the prefix is listed; returns
    /// the rows inserted (0 or 1).
    pub(super) fn insert_authorized(
        tx: &Connection,
        account: &str,
        rec: &AuthorizedRecord,
    ) -> rusqlite::Result<usize> {
        tx.execute(
            "INSERT OR IGNORE INTO authorized(account, cidr, label, source, key_id, created_at, created_by, shared)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                account,
                rec.cidr.to_string(),
                rec.label,
                rec.source,
                rec.key_id,
                rec.created_at,
                rec.created_by,
                rec.shared
            ],
        )
    }
}

impl ListStore for SqliteStore {
    fn authorized_of(
        &self,
        only: Option<&str>,
    ) -> Result<Vec<(String, AuthorizedRecord)>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(
                "SELECT account, cidr, label, source, key_id, created_at, created_by, shared
                 FROM authorized WHERE ?1 IS NULL OR account = ?1 ORDER BY account, created_at, cidr",
            )
            .map_err(self.err("listing authorized"))?;
        let rows = stmt
            .query_map([only], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                    r.get(7)?,
                ))
            })
            .map_err(self.err("listing authorized"))?;
        let mut out = Vec::new();
        for row in rows {
            let (account, cidr, label, source, key_id, created_at, created_by, shared): AuthorizedRow =
                row.map_err(self.err("listing authorized"))?;
            let cidr = cidr
                .parse()
                .map_err(|_| self.corrupt("authorized.cidr", cidr))?;
            out.push((
                account,
                AuthorizedRecord {
                    cidr,
                    label,
                    source,
                    key_id,
                    created_at,
                    created_by,
                    shared,
                },
            ));
        }
        Ok(out)
    }

    fn add_authorized(
        &self,
        account: &str,
        rec: &AuthorizedRecord,
        actor: &str,
    ) -> Result<bool, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(self.err("authorizing"))?;
        let n = Self::insert_authorized(&tx, account, rec).map_err(self.err("authorizing"))?;
        if n == 0 {
            return Ok(false);
        }
        if rec.source == "learned" {
            tx.execute(
                "UPDATE accounts SET last_learned_at = ?2 WHERE name = ?1",
                params![account, rec.created_at],
            )
            .map_err(self.err("authorizing"))?;
        }
        Self::audit(
            &tx,
            account,
            actor,
            "ips.authorize",
            &serde_json::to_value(rec).unwrap_or_default(),
        )
        .map_err(self.err("auditing"))?;
        tx.commit().map_err(self.err("committing"))?;
        Ok(true)
    }

    fn add_authorized_many(
        &self,
        account: &str,
        recs: &[AuthorizedRecord],
        actor: &str,
    ) -> Result<usize, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(self.err("importing"))?;
        let mut added = 0;
        for rec in recs {
            added += Self::insert_authorized(&tx, account, rec).map_err(self.err("importing"))?;
        }
        Self::audit(
            &tx,
            account,
            actor,
            "ips.import",
            &serde_json::json!({ "entries": recs.len(), "added": added }),
        )
        .map_err(self.err("auditing"))?;
        tx.commit().map_err(self.err("committing"))?;
        Ok(added)
    }

    fn flush_entry_usage(&self, usage: &[(String, IpNet, i64, u64)]) -> Result<(), StoreError> {
        if usage.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn();
        let tx = conn
            .transaction()
            .map_err(self.err("flushing entry usage"))?;
        {
            let mut stmt = tx
                .prepare_cached(
                    "INSERT INTO entry_usage(account, cidr, hits, last_seen_ms) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT(account, cidr) DO UPDATE SET
                       hits = hits + excluded.hits,
                       last_seen_ms = max(last_seen_ms, excluded.last_seen_ms)",
                )
                .map_err(self.err("flushing entry usage"))?;
            for (account, cidr, last, n) in usage {
                stmt.execute(params![account, cidr.to_string(), *n as i64, last])
                    .map_err(self.err("flushing entry usage"))?;
            }
        }
        tx.commit().map_err(self.err("committing"))
    }

    fn entry_usage(
        &self,
        account: &str,
    ) -> Result<std::collections::HashMap<IpNet, (u64, i64)>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached("SELECT cidr, hits, last_seen_ms FROM entry_usage WHERE account = ?1")
            .map_err(self.err("reading entry usage"))?;
        let rows = stmt
            .query_map([account], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                ))
            })
            .map_err(self.err("reading entry usage"))?;
        let mut out = std::collections::HashMap::new();
        for row in rows {
            let (cidr, hits, last) = row.map_err(self.err("reading entry usage"))?;
            if let Ok(net) = cidr.parse::<IpNet>() {
                out.insert(net, (hits.max(0) as u64, last));
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
        let mut conn = self.conn();
        let tx = conn
            .transaction()
            .map_err(self.err("removing authorized"))?;
        // Read and delete in one transaction: one row, never the table.
        type Row = (String, String, Option<String>, i64, String, bool);
        let row: Option<Row> = tx
            .query_row(
                "SELECT label, source, key_id, created_at, created_by, shared FROM authorized
                 WHERE account = ?1 AND cidr = ?2",
                params![account, cidr.to_string()],
                |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                    ))
                },
            )
            .optional()
            .map_err(self.err("removing authorized"))?;
        let Some((label, source, key_id, created_at, created_by, shared)) = row else {
            return Ok(None);
        };
        tx.execute(
            "DELETE FROM authorized WHERE account = ?1 AND cidr = ?2",
            params![account, cidr.to_string()],
        )
        .map_err(self.err("removing authorized"))?;
        // Its hits go with it (a shared entry's, in every sub-account), so
        // an entry authorized again starts from zero.
        tx.execute(
            "DELETE FROM entry_usage WHERE cidr = ?2
               AND (account = ?1 OR account IN (SELECT name FROM accounts WHERE parent = ?1))",
            params![account, cidr.to_string()],
        )
        .map_err(self.err("removing authorized"))?;
        Self::audit(
            &tx,
            account,
            actor,
            "ips.remove",
            &serde_json::json!({ "cidr": cidr.to_string() }),
        )
        .map_err(self.err("auditing"))?;
        tx.commit().map_err(self.err("committing"))?;
        Ok(Some(AuthorizedRecord {
            cidr: *cidr,
            label,
            source,
            key_id,
            created_at,
            created_by,
            shared,
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
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(self.err("recording refusals"))?;
        let mut groups: Vec<(&str, &str)> = Vec::new();
        for h in hits {
            tx.execute(
                "INSERT INTO unauthorized(account, addr, service, key_id, port, first_seen, last_seen, attempts)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                 ON CONFLICT(account, addr, service, key_id, port) DO UPDATE SET
                   last_seen = max(last_seen, excluded.last_seen), attempts = attempts + excluded.attempts",
                params![
                    h.account,
                    h.addr.to_string(),
                    h.service,
                    h.key_id,
                    h.port,
                    h.first_seen,
                    h.last_seen,
                    h.attempts
                ],
            )
            .map_err(self.err("recording refusals"))?;
            let g = (h.account.as_str(), h.service.as_str());
            if !groups.contains(&g) {
                groups.push(g);
            }
        }
        let mut evicted = 0u64;
        for (account, service) in groups {
            evicted += tx
                .execute(
                    "DELETE FROM unauthorized WHERE rowid IN (
                       SELECT rowid FROM unauthorized
                       WHERE account = ?1 AND service = ?2 AND status != 'denied'
                       ORDER BY last_seen DESC, rowid DESC LIMIT -1 OFFSET ?3)",
                    params![account, service, cap as i64],
                )
                .map_err(self.err("capping the unauthorized list"))? as u64;
        }
        tx.commit().map_err(self.err("committing"))?;
        Ok(evicted)
    }

    fn list_unauthorized(
        &self,
        account: Option<&str>,
    ) -> Result<Vec<UnauthorizedRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(
                "SELECT account, addr, service, key_id, port, first_seen, last_seen, attempts, status
                 FROM unauthorized WHERE ?1 IS NULL OR account = ?1
                 ORDER BY last_seen DESC, addr",
            )
            .map_err(self.err("listing unauthorized"))?;
        let rows = stmt
            .query_map([account], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                    r.get(7)?,
                    r.get(8)?,
                ))
            })
            .map_err(self.err("listing unauthorized"))?;
        let mut out = Vec::new();
        for row in rows {
            let (account, addr, service, key_id, port, first_seen, last_seen, attempts, status) =
                row.map_err(self.err("listing unauthorized"))?;
            out.push(UnauthorizedRecord {
                account,
                addr: addr
                    .parse()
                    .map_err(|_| self.corrupt("unauthorized.addr", addr))?,
                service,
                key_id,
                port,
                first_seen,
                last_seen,
                attempts,
                status,
            });
        }
        Ok(out)
    }

    fn set_unauthorized(
        &self,
        account: &str,
        addr: std::net::IpAddr,
        status: Option<&str>,
        actor: &str,
    ) -> Result<usize, StoreError> {
        let mut conn = self.conn();
        let tx = conn
            .transaction()
            .map_err(self.err("updating unauthorized"))?;
        let n = match status {
            Some(st) => tx.execute(
                "UPDATE unauthorized SET status = ?3 WHERE account = ?1 AND addr = ?2",
                params![account, addr.to_string(), st],
            ),
            None => tx.execute(
                "DELETE FROM unauthorized WHERE account = ?1 AND addr = ?2",
                params![account, addr.to_string()],
            ),
        }
        .map_err(self.err("updating unauthorized"))?;
        Self::audit(
            &tx,
            account,
            actor,
            "ips.unauthorized",
            &serde_json::json!({ "addr": addr.to_string(), "status": status.unwrap_or("removed") }),
        )
        .map_err(self.err("auditing"))?;
        tx.commit().map_err(self.err("committing"))?;
        Ok(n)
    }
}
