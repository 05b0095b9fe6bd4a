//! The kernel drop list.

use ipnet::IpNet;
use rusqlite::params;

use super::{DROP_COLUMNS, SqliteStore, drop_row};
use crate::store::{DropRecord, DropStore, StoreError};

impl SqliteStore {
    fn upsert_drop(tx: &rusqlite::Connection, rec: &DropRecord) -> rusqlite::Result<usize> {
        tx.execute(
            "INSERT INTO drops(cidr, kind, reason, created_at, expires_at, created_by)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT(cidr) DO UPDATE SET kind = excluded.kind, reason = excluded.reason,
               created_at = excluded.created_at, expires_at = excluded.expires_at,
               created_by = excluded.created_by",
            params![
                rec.cidr.to_string(),
                rec.kind.as_str(),
                rec.reason,
                rec.created_at,
                rec.expires_at,
                rec.created_by
            ],
        )
    }
}

impl DropStore for SqliteStore {
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

    fn put_drops(&self, recs: &[DropRecord], actor: &str) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(self.err("importing drops"))?;
        for rec in recs {
            Self::upsert_drop(&tx, rec).map_err(self.err("importing drops"))?;
        }
        Self::audit(
            &tx,
            "",
            actor,
            "drop.import",
            &serde_json::json!({ "entries": recs.len() }),
        )
        .map_err(self.err("auditing"))?;
        tx.commit().map_err(self.err("committing"))
    }

    fn put_drop(&self, rec: &DropRecord, actor: &str) -> Result<Option<DropRecord>, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(self.err("adding a drop"))?;
        let cidr = rec.cidr.to_string();
        let prev = Self::get_drop(&tx, &cidr).map_err(self.err("adding a drop"))?;
        Self::upsert_drop(&tx, rec).map_err(self.err("adding a drop"))?;
        Self::audit(
            &tx,
            "",
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
            "",
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
            "",
            "allowlistd",
            "drop.expire",
            &serde_json::json!({ "cidrs": cidrs }),
        )
        .map_err(self.err("auditing"))?;
        tx.commit().map_err(self.err("committing"))?;
        drop(conn);
        rows.into_iter().map(|row| self.row_to_drop(row)).collect()
    }
}
