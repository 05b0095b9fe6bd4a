//! The SQLite store: one file, WAL, `synchronous=FULL`; every change and
//! its audit record commit in one transaction before it is acknowledged.

use std::{
    path::{Path, PathBuf},
    sync::Mutex,
};

use ipnet::IpNet;
use rusqlite::{Connection, OptionalExtension, params};

use super::migrations::MIGRATIONS;
use super::*;
use crate::policy::{KeyStatus, RateLimit, Scope};

/// A `drops` row as read: cidr, kind, reason, created_at, expires_at,
/// created_by.
type DropRow = (String, String, String, i64, Option<i64>, String);

const DROP_COLUMNS: &str = "cidr, kind, reason, created_at, expires_at, created_by";

fn drop_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<DropRow> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
    ))
}

pub struct SqliteStore {
    path: PathBuf,
    conn: Mutex<Connection>,
}

impl SqliteStore {
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        if let Some(dir) = path.parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir).map_err(|e| StoreError::Open {
                path: path.to_path_buf(),
                message: format!("cannot create {}: {e}", dir.display()),
            })?;
        }
        let err = |op| {
            let path = path.to_path_buf();
            move |source| StoreError::Sqlite { path, op, source }
        };
        let mut conn = Connection::open(path).map_err(err("opening"))?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(err("setting busy timeout"))?;
        let mode: String = conn
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
            .map_err(err("enabling WAL"))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Open {
                path: path.to_path_buf(),
                message: format!(
                    "cannot enable WAL journaling (got {mode}); is the file on a network filesystem?"
                ),
            });
        }
        conn.execute_batch("PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON;")
            .map_err(err("setting pragmas"))?;
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(err("reading schema version"))?;
        if version as usize > MIGRATIONS.len() {
            return Err(StoreError::Open {
                path: path.to_path_buf(),
                message: format!(
                    "schema version {version} is newer than this allowlistd knows ({}); run the newer allowlistd",
                    MIGRATIONS.len()
                ),
            });
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let tx = conn.transaction().map_err(err("starting migration"))?;
            tx.execute_batch(sql).map_err(err("migrating"))?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)
                .map_err(err("migrating"))?;
            tx.commit().map_err(err("migrating"))?;
        }
        let store = SqliteStore {
            path: path.to_path_buf(),
            conn: Mutex::new(conn),
        };
        store.init_settings()?;
        Ok(store)
    }

    fn err(&self, op: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError + '_ {
        move |source| StoreError::Sqlite {
            path: self.path.clone(),
            op,
            source,
        }
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves SQLite itself consistent
        // (the transaction rolls back), so the poison can be ignored.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new installation starts in API learning mode, SMTP inactive.
    fn init_settings(&self) -> Result<(), StoreError> {
        let now = unix_now().to_string();
        let conn = self.conn();
        for (k, v) in [
            ("api_blocking", "learning"),
            ("api_since", now.as_str()),
            ("smtp_blocking", "inactive"),
            ("smtp_since", now.as_str()),
            ("last_learned_at", now.as_str()),
        ] {
            conn.execute(
                "INSERT OR IGNORE INTO settings(key, value) VALUES (?1, ?2)",
                params![k, v],
            )
            .map_err(self.err("initialising settings"))?;
        }
        Ok(())
    }

    fn row_to_drop(&self, row: DropRow) -> Result<DropRecord, StoreError> {
        let (cidr, kind, reason, created_at, expires_at, created_by) = row;
        let corrupt = |column, value: &str| StoreError::Corrupt {
            path: self.path.clone(),
            column,
            value: value.to_string(),
        };
        Ok(DropRecord {
            cidr: cidr.parse().map_err(|_| corrupt("drops.cidr", &cidr))?,
            kind: DropKind::parse(&kind).ok_or_else(|| corrupt("drops.kind", &kind))?,
            reason,
            created_at,
            expires_at,
            created_by,
        })
    }

    fn get_drop(conn: &Connection, cidr: &str) -> rusqlite::Result<Option<DropRow>> {
        conn.query_row(
            &format!("SELECT {DROP_COLUMNS} FROM drops WHERE cidr = ?1"),
            [cidr],
            drop_row,
        )
        .optional()
    }

    fn audit(
        tx: &Connection,
        actor: &str,
        action: &str,
        detail: &serde_json::Value,
    ) -> rusqlite::Result<()> {
        tx.execute(
            "INSERT INTO audit(at, actor, action, detail) VALUES (?1, ?2, ?3, ?4)",
            params![unix_now(), actor, action, detail.to_string()],
        )?;
        Ok(())
    }
}

fn status_str(s: KeyStatus) -> &'static str {
    match s {
        KeyStatus::Active => "active",
        KeyStatus::Rotating => "rotating",
        KeyStatus::Revoked => "revoked",
    }
}

fn parse_status(s: &str) -> Option<KeyStatus> {
    Some(match s {
        "active" => KeyStatus::Active,
        "rotating" => KeyStatus::Rotating,
        "revoked" => KeyStatus::Revoked,
        _ => return None,
    })
}

fn hash32(v: Vec<u8>) -> Option<[u8; 32]> {
    v.try_into().ok()
}

impl SqliteStore {
    fn corrupt(&self, column: &'static str, value: impl Into<String>) -> StoreError {
        StoreError::Corrupt {
            path: self.path.clone(),
            column,
            value: value.into(),
        }
    }

    fn write_key(tx: &Connection, key: &KeyRecord) -> rusqlite::Result<()> {
        let scopes: Vec<&str> = key.scopes.iter().map(|s| s.as_str()).collect();
        tx.execute(
            "UPDATE keys SET name = ?2, description = ?3, scopes = ?4, status = ?5, secret_hash = ?6,
               prev_hash = ?7, prev_expires_ms = ?8, rate = ?9 WHERE kid = ?1",
            params![
                key.kid,
                key.name,
                key.description,
                scopes.join(","),
                status_str(key.status),
                key.secret_hash.to_vec(),
                key.previous.map(|p| p.0.to_vec()),
                key.previous.map(|p| p.1),
                key.rate.map(|r| r.to_string()),
            ],
        )?;
        tx.execute("DELETE FROM key_allow WHERE kid = ?1", [key.kid])?;
        for a in &key.allow {
            tx.execute(
                "INSERT INTO key_allow(kid, cidr, label) VALUES (?1, ?2, ?3)",
                params![key.kid, a.cidr.to_string(), a.label],
            )?;
        }
        Ok(())
    }
}

impl Store for SqliteStore {
    fn create_key(&self, key: &KeyRecord, actor: &str) -> Result<KeyRecord, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(self.err("creating a key"))?;
        tx.execute(
            "INSERT INTO keys(id, name, scopes, status, secret_hash, created_at) VALUES (?1, ?2, '', 'active', ?3, ?4)",
            params![key.id, key.name, key.secret_hash.to_vec(), key.created_at],
        )
        .map_err(self.err("creating a key"))?;
        let mut stored = key.clone();
        stored.kid = tx.last_insert_rowid() as u32;
        Self::write_key(&tx, &stored).map_err(self.err("creating a key"))?;
        let allow: Vec<String> = stored.allow.iter().map(|a| a.cidr.to_string()).collect();
        Self::audit(
            &tx,
            actor,
            "key.create",
            &serde_json::json!({ "id": stored.id, "name": stored.name, "allow": allow }),
        )
        .map_err(self.err("auditing"))?;
        tx.commit().map_err(self.err("committing"))?;
        Ok(stored)
    }

    fn list_keys(&self) -> Result<Vec<KeyRecord>, StoreError> {
        let conn = self.conn();
        type Row = (
            u32,
            String,
            String,
            String,
            String,
            String,
            Vec<u8>,
            Option<Vec<u8>>,
            Option<i64>,
            Option<String>,
            i64,
            Option<i64>,
            i64,
            i64,
        );
        let rows: Vec<Row> = {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT kid, id, name, description, scopes, status, secret_hash, prev_hash, prev_expires_ms,
                            rate, created_at, last_used_ms, requests_day, requests_today FROM keys ORDER BY kid",
                )
                .map_err(self.err("listing keys"))?;
            let rows = stmt
                .query_map([], |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                        r.get(6)?,
                        r.get(7)?,
                        r.get(8)?,
                        r.get(9)?,
                        r.get(10)?,
                        r.get(11)?,
                        r.get(12)?,
                        r.get(13)?,
                    ))
                })
                .map_err(self.err("listing keys"))?;
            rows.collect::<Result<_, _>>()
                .map_err(self.err("listing keys"))?
        };
        let mut allow: std::collections::HashMap<u32, Vec<AllowRecord>> =
            std::collections::HashMap::new();
        {
            let mut stmt = conn
                .prepare_cached("SELECT kid, cidr, label FROM key_allow ORDER BY kid, cidr")
                .map_err(self.err("listing key allowlists"))?;
            let rows = stmt
                .query_map([], |r| {
                    Ok((
                        r.get::<_, u32>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                    ))
                })
                .map_err(self.err("listing key allowlists"))?;
            for row in rows {
                let (kid, cidr, label) = row.map_err(self.err("listing key allowlists"))?;
                let cidr = cidr
                    .parse()
                    .map_err(|_| self.corrupt("key_allow.cidr", cidr))?;
                allow
                    .entry(kid)
                    .or_default()
                    .push(AllowRecord { cidr, label });
            }
        }
        let mut out = Vec::with_capacity(rows.len());
        for (
            kid,
            id,
            name,
            description,
            scopes,
            status,
            hash,
            prev,
            prev_exp,
            rate,
            created_at,
            last_used_ms,
            day,
            today,
        ) in rows
        {
            let scopes = scopes
                .split(',')
                .filter(|s| !s.is_empty())
                .map(|s| Scope::parse(s).map_err(|_| self.corrupt("keys.scopes", s)))
                .collect::<Result<Vec<_>, _>>()?;
            let previous = match (prev, prev_exp) {
                (Some(h), Some(exp)) => Some((
                    hash32(h).ok_or_else(|| self.corrupt("keys.prev_hash", "wrong length"))?,
                    exp,
                )),
                _ => None,
            };
            out.push(KeyRecord {
                kid,
                scopes,
                status: parse_status(&status)
                    .ok_or_else(|| self.corrupt("keys.status", status.clone()))?,
                secret_hash: hash32(hash)
                    .ok_or_else(|| self.corrupt("keys.secret_hash", "wrong length"))?,
                previous,
                rate: match rate {
                    Some(r) => {
                        Some(RateLimit::parse(&r).map_err(|_| self.corrupt("keys.rate", r))?)
                    }
                    None => None,
                },
                created_at,
                last_used_ms,
                requests_day: day,
                requests_today: today,
                allow: allow.remove(&kid).unwrap_or_default(),
                id,
                name,
                description,
            });
        }
        Ok(out)
    }

    fn update_key(
        &self,
        key: &KeyRecord,
        action: &str,
        detail: serde_json::Value,
        actor: &str,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(self.err("updating a key"))?;
        Self::write_key(&tx, key).map_err(self.err("updating a key"))?;
        let mut detail = detail;
        if let serde_json::Value::Object(m) = &mut detail {
            m.insert("id".into(), key.id.clone().into());
        }
        Self::audit(&tx, actor, action, &detail).map_err(self.err("auditing"))?;
        tx.commit().map_err(self.err("committing"))
    }

    fn flush_usage(&self, usage: &[(u32, i64, u64)], today: i64) -> Result<(), StoreError> {
        if usage.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(self.err("flushing usage"))?;
        for &(kid, last, n) in usage {
            tx.execute(
                "UPDATE keys SET last_used_ms = max(coalesce(last_used_ms, 0), ?2),
                   requests_today = CASE WHEN requests_day = ?3 THEN requests_today + ?4 ELSE ?4 END,
                   requests_day = ?3
                 WHERE kid = ?1",
                params![kid, last, today, n as i64],
            )
            .map_err(self.err("flushing usage"))?;
        }
        tx.commit().map_err(self.err("committing"))
    }

    fn list_authorized(&self) -> Result<Vec<AuthorizedRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached("SELECT cidr, label, source, key_id, created_at FROM authorized ORDER BY created_at, cidr")
            .map_err(self.err("listing authorized"))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                ))
            })
            .map_err(self.err("listing authorized"))?;
        let mut out = Vec::new();
        for row in rows {
            let (cidr, label, source, key_id, created_at) =
                row.map_err(self.err("listing authorized"))?;
            out.push(AuthorizedRecord {
                cidr: cidr
                    .parse()
                    .map_err(|_| self.corrupt("authorized.cidr", cidr))?,
                label,
                source,
                key_id,
                created_at,
            });
        }
        Ok(out)
    }

    fn add_authorized(&self, rec: &AuthorizedRecord, actor: &str) -> Result<bool, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(self.err("authorizing"))?;
        let n = tx
            .execute(
                "INSERT OR IGNORE INTO authorized(cidr, label, source, key_id, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![rec.cidr.to_string(), rec.label, rec.source, rec.key_id, rec.created_at],
            )
            .map_err(self.err("authorizing"))?;
        if n == 0 {
            return Ok(false);
        }
        if rec.source == "learned" {
            tx.execute(
                "UPDATE settings SET value = ?1 WHERE key = 'last_learned_at'",
                [rec.created_at.to_string()],
            )
            .map_err(self.err("authorizing"))?;
        }
        Self::audit(
            &tx,
            actor,
            "ips.authorize",
            &serde_json::to_value(rec).unwrap_or_default(),
        )
        .map_err(self.err("auditing"))?;
        tx.commit().map_err(self.err("committing"))?;
        Ok(true)
    }

    fn remove_authorized(
        &self,
        cidr: &IpNet,
        actor: &str,
    ) -> Result<Option<AuthorizedRecord>, StoreError> {
        let mut conn = self.conn();
        let tx = conn
            .transaction()
            .map_err(self.err("removing authorized"))?;
        // Read and delete in one transaction: one row, never the table.
        let row: Option<(String, String, Option<String>, i64)> = tx
            .query_row(
                "SELECT label, source, key_id, created_at FROM authorized WHERE cidr = ?1",
                [cidr.to_string()],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()
            .map_err(self.err("removing authorized"))?;
        let Some((label, source, key_id, created_at)) = row else {
            return Ok(None);
        };
        let found = Some(AuthorizedRecord {
            cidr: *cidr,
            label,
            source,
            key_id,
            created_at,
        });
        tx.execute("DELETE FROM authorized WHERE cidr = ?1", [cidr.to_string()])
            .map_err(self.err("removing authorized"))?;
        Self::audit(
            &tx,
            actor,
            "ips.remove",
            &serde_json::json!({ "cidr": cidr.to_string() }),
        )
        .map_err(self.err("auditing"))?;
        tx.commit().map_err(self.err("committing"))?;
        Ok(found)
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
        let mut services: Vec<&str> = Vec::new();
        for h in hits {
            tx.execute(
                "INSERT INTO unauthorized(addr, service, key_id, port, first_seen, last_seen, attempts)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT(addr, service, key_id, port) DO UPDATE SET
                   last_seen = max(last_seen, excluded.last_seen), attempts = attempts + excluded.attempts",
                params![h.addr.to_string(), h.service, h.key_id, h.port, h.first_seen, h.last_seen, h.attempts],
            )
            .map_err(self.err("recording refusals"))?;
            if !services.contains(&h.service.as_str()) {
                services.push(&h.service);
            }
        }
        let mut evicted = 0u64;
        for service in services {
            evicted += tx
                .execute(
                    "DELETE FROM unauthorized WHERE rowid IN (
                       SELECT rowid FROM unauthorized WHERE service = ?1 AND status != 'denied'
                       ORDER BY last_seen DESC, rowid DESC LIMIT -1 OFFSET ?2)",
                    params![service, cap as i64],
                )
                .map_err(self.err("capping the unauthorized list"))? as u64;
        }
        tx.commit().map_err(self.err("committing"))?;
        Ok(evicted)
    }

    fn list_unauthorized(&self) -> Result<Vec<UnauthorizedRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(
                "SELECT addr, service, key_id, port, first_seen, last_seen, attempts, status FROM unauthorized
                 ORDER BY last_seen DESC, addr",
            )
            .map_err(self.err("listing unauthorized"))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                    r.get(7)?,
                ))
            })
            .map_err(self.err("listing unauthorized"))?;
        let mut out = Vec::new();
        for row in rows {
            let (addr, service, key_id, port, first_seen, last_seen, attempts, status) =
                row.map_err(self.err("listing unauthorized"))?;
            out.push(UnauthorizedRecord {
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
                "UPDATE unauthorized SET status = ?2 WHERE addr = ?1",
                params![addr.to_string(), st],
            ),
            None => tx.execute(
                "DELETE FROM unauthorized WHERE addr = ?1",
                [addr.to_string()],
            ),
        }
        .map_err(self.err("updating unauthorized"))?;
        Self::audit(
            &tx,
            actor,
            "ips.unauthorized",
            &serde_json::json!({ "addr": addr.to_string(), "status": status.unwrap_or("removed") }),
        )
        .map_err(self.err("auditing"))?;
        tx.commit().map_err(self.err("committing"))?;
        Ok(n)
    }

    fn set_blocking(
        &self,
        service: &str,
        mode: &str,
        actor: &str,
        now: i64,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(self.err("setting blocking"))?;
        tx.execute(
            "UPDATE settings SET value = ?2 WHERE key = ?1",
            params![format!("{service}_blocking"), mode],
        )
        .map_err(self.err("setting blocking"))?;
        tx.execute(
            "UPDATE settings SET value = ?2 WHERE key = ?1",
            params![format!("{service}_since"), now.to_string()],
        )
        .map_err(self.err("setting blocking"))?;
        Self::audit(
            &tx,
            actor,
            "blocking.set",
            &serde_json::json!({ "service": service, "mode": mode }),
        )
        .map_err(self.err("auditing"))?;
        tx.commit().map_err(self.err("committing"))
    }

    fn last_learned_at(&self) -> Result<i64, StoreError> {
        let conn = self.conn();
        let v: String = conn
            .query_row(
                "SELECT value FROM settings WHERE key = 'last_learned_at'",
                [],
                |r| r.get(0),
            )
            .map_err(self.err("reading settings"))?;
        v.parse()
            .map_err(|_| self.corrupt("settings.last_learned_at", v))
    }

    fn list_drops(&self) -> Result<Vec<DropRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(&format!("SELECT {DROP_COLUMNS} FROM drops ORDER BY cidr"))
            .map_err(self.err("listing drops"))?;
        let rows = stmt
            .query_map([], drop_row)
            .map_err(self.err("listing drops"))?;
        let mut out = Vec::new();
        for row in rows {
            out.push(self.row_to_drop(row.map_err(self.err("listing drops"))?)?);
        }
        Ok(out)
    }

    fn put_drop(&self, rec: &DropRecord, actor: &str) -> Result<Option<DropRecord>, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(self.err("adding a drop"))?;
        let cidr = rec.cidr.to_string();
        let prev = Self::get_drop(&tx, &cidr).map_err(self.err("adding a drop"))?;
        tx.execute(
            "INSERT INTO drops(cidr, kind, reason, created_at, expires_at, created_by)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT(cidr) DO UPDATE SET kind = excluded.kind, reason = excluded.reason,
               created_at = excluded.created_at, expires_at = excluded.expires_at,
               created_by = excluded.created_by",
            params![
                cidr,
                rec.kind.as_str(),
                rec.reason,
                rec.created_at,
                rec.expires_at,
                rec.created_by
            ],
        )
        .map_err(self.err("adding a drop"))?;
        Self::audit(
            &tx,
            actor,
            "drop.add",
            &serde_json::to_value(rec).unwrap_or_default(),
        )
        .map_err(self.err("auditing"))?;
        tx.commit().map_err(self.err("committing"))?;
        drop(conn);
        prev.map(|row| self.row_to_drop(row)).transpose()
    }

    fn remove_drop(&self, cidr: &IpNet, actor: &str) -> Result<Option<DropRecord>, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(self.err("removing a drop"))?;
        let key = cidr.to_string();
        let Some(prev) = Self::get_drop(&tx, &key).map_err(self.err("removing a drop"))? else {
            return Ok(None);
        };
        tx.execute("DELETE FROM drops WHERE cidr = ?1", [&key])
            .map_err(self.err("removing a drop"))?;
        Self::audit(
            &tx,
            actor,
            "drop.remove",
            &serde_json::json!({ "cidr": key }),
        )
        .map_err(self.err("auditing"))?;
        tx.commit().map_err(self.err("committing"))?;
        drop(conn);
        self.row_to_drop(prev).map(Some)
    }

    fn remove_expired_drops(&self, now: i64) -> Result<Vec<DropRecord>, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(self.err("expiring drops"))?;
        let rows: Vec<(String, String, String, i64, Option<i64>, String)> = {
            let mut stmt = tx
                .prepare_cached(
                    "SELECT cidr, kind, reason, created_at, expires_at, created_by FROM drops
                     WHERE expires_at IS NOT NULL AND expires_at <= ?1",
                )
                .map_err(self.err("expiring drops"))?;
            let rows = stmt
                .query_map([now], drop_row)
                .map_err(self.err("expiring drops"))?;
            rows.collect::<Result<_, _>>()
                .map_err(self.err("expiring drops"))?
        };
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        tx.execute(
            "DELETE FROM drops WHERE expires_at IS NOT NULL AND expires_at <= ?1",
            [now],
        )
        .map_err(self.err("expiring drops"))?;
        let cidrs: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
        Self::audit(
            &tx,
            "allowlistd",
            "drop.expire",
            &serde_json::json!({ "cidrs": cidrs }),
        )
        .map_err(self.err("auditing"))?;
        tx.commit().map_err(self.err("committing"))?;
        drop(conn);
        rows.into_iter().map(|row| self.row_to_drop(row)).collect()
    }

    fn blocking(&self) -> Result<BlockingState, StoreError> {
        let conn = self.conn();
        let get = |k: &str| -> Result<String, StoreError> {
            conn.query_row("SELECT value FROM settings WHERE key = ?1", [k], |r| {
                r.get(0)
            })
            .map_err(self.err("reading settings"))
        };
        let corrupt = |column, value: String| StoreError::Corrupt {
            path: self.path.clone(),
            column,
            value,
        };
        let api = get("api_blocking")?;
        let smtp = get("smtp_blocking")?;
        let api_since = get("api_since")?;
        let smtp_since = get("smtp_since")?;
        Ok(BlockingState {
            api: serde_json::from_value(serde_json::Value::String(api.clone()))
                .map_err(|_| corrupt("settings.api_blocking", api))?,
            api_since: api_since
                .parse()
                .map_err(|_| corrupt("settings.api_since", api_since))?,
            smtp: serde_json::from_value(serde_json::Value::String(smtp.clone()))
                .map_err(|_| corrupt("settings.smtp_blocking", smtp))?,
            smtp_since: smtp_since
                .parse()
                .map_err(|_| corrupt("settings.smtp_since", smtp_since))?,
        })
    }

    fn audit_log(&self, q: &AuditQuery) -> Result<Vec<AuditEntry>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(
                "SELECT at, actor, action, detail FROM audit
                 WHERE at >= ?1 AND (?2 IS NULL OR actor = ?2)
                 ORDER BY id DESC LIMIT ?3",
            )
            .map_err(self.err("reading the audit log"))?;
        let rows = stmt
            .query_map(
                params![q.since.unwrap_or(i64::MIN), q.actor, q.limit as i64],
                |r| {
                    Ok(AuditEntry {
                        at: r.get(0)?,
                        actor: r.get(1)?,
                        action: r.get(2)?,
                        detail: r.get(3)?,
                    })
                },
            )
            .map_err(self.err("reading the audit log"))?;
        rows.collect::<Result<_, _>>()
            .map_err(self.err("reading the audit log"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(cidr: &str, expires_at: Option<i64>) -> DropRecord {
        DropRecord {
            cidr: cidr.parse().unwrap(),
            kind: DropKind::Manual,
            reason: "test".into(),
            created_at: 1,
            expires_at,
            created_by: "uid:0".into(),
        }
    }

    #[test]
    fn drops_round_trip_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/allowlist.db");
        {
            let s = SqliteStore::open(&path).unwrap();
            assert!(
                s.put_drop(&rec("192.0.2.0/24", None), "uid:0")
                    .unwrap()
                    .is_none()
            );
            assert!(
                s.put_drop(&rec("2001:db8::/48", Some(100)), "uid:0")
                    .unwrap()
                    .is_none()
            );
            let prev = s.put_drop(&rec("192.0.2.0/24", Some(50)), "uid:0").unwrap();
            assert_eq!(prev.unwrap().expires_at, None);
        }
        let s = SqliteStore::open(&path).unwrap();
        let all = s.list_drops().unwrap();
        assert_eq!(all.len(), 2);
        let expired = s.remove_expired_drops(60).unwrap();
        assert_eq!(expired.len(), 1);
        assert_eq!(expired[0].cidr.to_string(), "192.0.2.0/24");
        assert!(
            s.remove_drop(&"2001:db8::/48".parse().unwrap(), "uid:0")
                .unwrap()
                .is_some()
        );
        assert!(
            s.remove_drop(&"2001:db8::/48".parse().unwrap(), "uid:0")
                .unwrap()
                .is_none()
        );
        let audit = s
            .audit_log(&AuditQuery {
                limit: 10,
                ..Default::default()
            })
            .unwrap();
        let actions: Vec<&str> = audit.iter().map(|a| a.action.as_str()).collect();
        assert_eq!(
            actions,
            [
                "drop.remove",
                "drop.expire",
                "drop.add",
                "drop.add",
                "drop.add"
            ]
        );
        let b = s.blocking().unwrap();
        assert_eq!((b.api, b.smtp), (ApiMode::Learning, SmtpMode::Inactive));
    }

    #[test]
    fn refuses_newer_schema_and_bad_urls() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.db");
        {
            let c = Connection::open(&path).unwrap();
            c.pragma_update(None, "user_version", 99).unwrap();
        }
        let e = SqliteStore::open(&path).err().unwrap().to_string();
        assert!(e.contains("newer"), "{e}");
        assert!(sqlite_path("sqlite://").is_err());
        assert!(
            sqlite_path("postgres://x")
                .unwrap_err()
                .contains("PostgreSQL")
        );
        assert_eq!(
            sqlite_path("sqlite:///var/a.db").unwrap(),
            PathBuf::from("/var/a.db")
        );
    }
}
