//! The kernel drop list.

use ipnet::IpNet;
use tokio_postgres::Row;

use super::{PgStore, Tx};
use crate::store::{DropKind, DropRecord, DropStore, StoreError};

const DROP_COLUMNS: &str = "cidr, kind, reason, created_at, expires_at, created_by";

impl PgStore {
    fn to_drop(&self, r: &Row) -> Result<DropRecord, StoreError> {
        let get = |e| self.pg_err("reading the drop list")(e);
        let cidr: String = r.try_get(0).map_err(get)?;
        let kind: String = r.try_get(1).map_err(get)?;
        Ok(DropRecord {
            cidr: cidr.parse().map_err(|_| self.corrupt("drops.cidr", cidr))?,
            kind: DropKind::parse(&kind).ok_or_else(|| self.corrupt("drops.kind", kind))?,
            reason: r.try_get(2).map_err(get)?,
            created_at: r.try_get(3).map_err(get)?,
            expires_at: r.try_get(4).map_err(get)?,
            created_by: r.try_get(5).map_err(get)?,
        })
    }

    async fn upsert_drops(tx: &Tx<'_>, recs: &[DropRecord]) -> Result<(), tokio_postgres::Error> {
        // Sorted and unique: one statement may touch a row only once.
        let mut recs: Vec<&DropRecord> = recs.iter().collect();
        recs.sort_by_key(|r| r.cidr);
        recs.dedup_by_key(|r| r.cidr);
        for chunk in recs.chunks(10_000) {
            let cidrs: Vec<String> = chunk.iter().map(|r| r.cidr.to_string()).collect();
            let kinds: Vec<&str> = chunk.iter().map(|r| r.kind.as_str()).collect();
            let reasons: Vec<&str> = chunk.iter().map(|r| r.reason.as_str()).collect();
            let created: Vec<i64> = chunk.iter().map(|r| r.created_at).collect();
            let expires: Vec<Option<i64>> = chunk.iter().map(|r| r.expires_at).collect();
            let by: Vec<&str> = chunk.iter().map(|r| r.created_by.as_str()).collect();
            tx.execute(
                "INSERT INTO drops(cidr, kind, reason, created_at, expires_at, created_by)
                 SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::bigint[], $6::text[])
                 ON CONFLICT (cidr) DO UPDATE SET kind = excluded.kind, reason = excluded.reason,
                   created_at = excluded.created_at, expires_at = excluded.expires_at,
                   created_by = excluded.created_by",
                &[&cidrs, &kinds, &reasons, &created, &expires, &by],
            )
            .await?;
        }
        Ok(())
    }
}

impl DropStore for PgStore {
    fn list_drops(&self) -> Result<Vec<DropRecord>, StoreError> {
        let rows = self.with("listing drops", async |c| {
            c.query(
                &format!("SELECT {DROP_COLUMNS} FROM drops ORDER BY cidr"),
                &[],
            )
            .await
        })?;
        rows.iter().map(|r| self.to_drop(r)).collect()
    }

    fn put_drop(&self, rec: &DropRecord, actor: &str) -> Result<Option<DropRecord>, StoreError> {
        let cidr = rec.cidr.to_string();
        let prev = self.tx("adding a drop", async |tx| {
            let prev = tx
                .query_opt(
                    &format!("SELECT {DROP_COLUMNS} FROM drops WHERE cidr = $1 FOR UPDATE"),
                    &[&cidr],
                )
                .await?;
            Self::upsert_drops(tx, std::slice::from_ref(rec)).await?;
            Self::audit(
                tx,
                "",
                actor,
                "drop.add",
                &serde_json::to_value(rec).unwrap_or_default(),
            )
            .await?;
            Ok(prev)
        })?;
        prev.map(|r| self.to_drop(&r)).transpose()
    }

    fn put_drops(&self, recs: &[DropRecord], actor: &str) -> Result<(), StoreError> {
        self.tx("importing drops", async |tx| {
            Self::upsert_drops(tx, recs).await?;
            Self::audit(
                tx,
                "",
                actor,
                "drop.import",
                &serde_json::json!({ "entries": recs.len() }),
            )
            .await
        })
    }

    fn remove_drop(&self, cidr: &IpNet, actor: &str) -> Result<Option<DropRecord>, StoreError> {
        let key = cidr.to_string();
        let prev = self.tx("removing a drop", async |tx| {
            let Some(prev) = tx
                .query_opt(
                    &format!("DELETE FROM drops WHERE cidr = $1 RETURNING {DROP_COLUMNS}"),
                    &[&key],
                )
                .await?
            else {
                return Ok(None);
            };
            Self::audit(
                tx,
                "",
                actor,
                "drop.remove",
                &serde_json::json!({ "cidr": key }),
            )
            .await?;
            Ok(Some(prev))
        })?;
        prev.map(|r| self.to_drop(&r)).transpose()
    }

    fn remove_expired_drops(&self, now: i64) -> Result<Vec<DropRecord>, StoreError> {
        let rows = self.tx("expiring drops", async |tx| {
            // Of several edges sweeping at once, each row is returned (and
            // audited) by one of them.
            let rows = tx
                .query(
                    &format!(
                        "DELETE FROM drops WHERE expires_at IS NOT NULL AND expires_at <= $1
                         RETURNING {DROP_COLUMNS}"
                    ),
                    &[&now],
                )
                .await?;
            if rows.is_empty() {
                return Ok(rows);
            }
            let mut cidrs: Vec<String> = rows
                .iter()
                .map(|r| r.try_get(0))
                .collect::<Result<_, _>>()?;
            cidrs.sort();
            Self::audit(
                tx,
                "",
                "allowlistd",
                "drop.expire",
                &serde_json::json!({ "cidrs": cidrs }),
            )
            .await?;
            Ok(rows)
        })?;
        let mut out: Vec<DropRecord> = rows
            .iter()
            .map(|r| self.to_drop(r))
            .collect::<Result<_, _>>()?;
        out.sort_by_key(|d| d.cidr.to_string());
        Ok(out)
    }
}
