//! API keys: rows, their allowlists, usage counters.

use rusqlite::{Connection, params};

use super::SqliteStore;
use crate::store::codec::{decode_key, status_str};
use crate::store::{AllowRecord, KeyRecord, KeyStore, StoreError};

impl SqliteStore {
    /// Inserts a key with its allowlist; returns it with its kid.
    pub(super) fn insert_key(tx: &Connection, key: &KeyRecord) -> rusqlite::Result<KeyRecord> {
        tx.execute(
            "INSERT INTO keys(kid, id, account, name, scopes, status, secret_hash, created_at)
             VALUES (?6, ?1, ?2, ?3, '', 'active', ?4, ?5)",
            params![
                key.id,
                key.account,
                key.name,
                key.secret_hash.to_vec(),
                key.created_at,
                (key.kid != 0).then_some(key.kid),
            ],
        )?;
        let mut stored = key.clone();
        stored.kid = tx.last_insert_rowid() as u32;
        Self::write_key(tx, &stored)?;
        Ok(stored)
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

impl KeyStore for SqliteStore {
    fn next_kid(&self) -> Result<u32, StoreError> {
        // AUTOINCREMENT's counter: past every kid ever used, including
        // those of removed keys, so a number is never given twice.
        self.conn()
            .query_row(
                "SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'keys'), 0),
                            coalesce((SELECT max(kid) FROM keys), 0)) + 1",
                [],
                |r| r.get(0),
            )
            .map_err(self.err("numbering a key"))
    }

    fn create_key(&self, key: &KeyRecord, actor: &str) -> Result<KeyRecord, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(self.err("creating a key"))?;
        let stored = Self::insert_key(&tx, key).map_err(self.err("creating a key"))?;
        let allow: Vec<String> = stored.allow.iter().map(|a| a.cidr.to_string()).collect();
        Self::audit(
            &tx,
            &stored.account,
            actor,
            "key.create",
            &serde_json::json!({ "id": stored.id, "name": stored.name, "allow": allow }),
        )
        .map_err(self.err("auditing"))?;
        tx.commit().map_err(self.err("committing"))?;
        Ok(stored)
    }

    fn keys_of(&self, only: Option<&str>) -> Result<Vec<KeyRecord>, StoreError> {
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
            String,
        );
        let rows: Vec<Row> = {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT kid, id, name, description, scopes, status, secret_hash, prev_hash, prev_expires_ms,
                            rate, created_at, last_used_ms, requests_day, requests_today, account FROM keys
                     WHERE ?1 IS NULL OR account = ?1 ORDER BY kid",
                )
                .map_err(self.err("listing keys"))?;
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
                        r.get(8)?,
                        r.get(9)?,
                        r.get(10)?,
                        r.get(11)?,
                        r.get(12)?,
                        r.get(13)?,
                        r.get(14)?,
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
                .prepare_cached(
                    "SELECT kid, cidr, label FROM key_allow
                     WHERE ?1 IS NULL OR kid IN (SELECT kid FROM keys WHERE account = ?1)
                     ORDER BY kid, cidr",
                )
                .map_err(self.err("listing key allowlists"))?;
            let rows = stmt
                .query_map([only], |r| {
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
            account,
        ) in rows
        {
            let k = decode_key(
                &scopes,
                &status,
                hash,
                (prev, prev_exp),
                rate,
                |column, value| self.corrupt(column, value),
            )?;
            out.push(KeyRecord {
                kid,
                scopes: k.scopes,
                status: k.status,
                secret_hash: k.secret_hash,
                previous: k.previous,
                rate: k.rate,
                created_at,
                last_used_ms,
                requests_day: day,
                requests_today: today,
                allow: allow.remove(&kid).unwrap_or_default(),
                id,
                account,
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
        Self::audit(&tx, &key.account, actor, action, &detail).map_err(self.err("auditing"))?;
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
}
