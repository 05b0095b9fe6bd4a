//! API keys: rows, their allowlists, usage counters.

use std::collections::{BTreeMap, HashMap};

use super::{PgStore, Tx, by_account};
use crate::store::codec::{decode_key, status_str};
use crate::store::{AllowRecord, KeyRecord, KeyStore, StoreError};

impl PgStore {
    /// Inserts a key with its allowlist; returns it with its kid.
    pub(super) async fn insert_key(
        tx: &Tx<'_>,
        key: &KeyRecord,
    ) -> Result<KeyRecord, tokio_postgres::Error> {
        let row = tx
            .query_one(
                "INSERT INTO keys(kid, id, account, name, scopes, status, secret_hash, created_at)
                 VALUES (coalesce($6, nextval(pg_get_serial_sequence('keys', 'kid'))),
                         $1, $2, $3, '', 'active', $4, $5)
                 RETURNING kid",
                &[
                    &key.id,
                    &key.account,
                    &key.name,
                    &&key.secret_hash[..],
                    &key.created_at,
                    &(key.kid != 0).then_some(i64::from(key.kid)),
                ],
            )
            .await?;
        let kid: i64 = row.try_get(0)?;
        let mut stored = key.clone();
        stored.kid = kid as u32;
        Self::write_key(tx, &stored).await?;
        Ok(stored)
    }

    async fn write_key(tx: &Tx<'_>, key: &KeyRecord) -> Result<(), tokio_postgres::Error> {
        let scopes: Vec<&str> = key.scopes.iter().map(|s| s.as_str()).collect();
        let kid = i64::from(key.kid);
        tx.execute(
            "UPDATE keys SET name = $2, description = $3, scopes = $4, status = $5, secret_hash = $6,
               prev_hash = $7, prev_expires_ms = $8, rate = $9 WHERE kid = $1",
            &[
                &kid,
                &key.name,
                &key.description,
                &scopes.join(","),
                &status_str(key.status),
                &&key.secret_hash[..],
                &key.previous.map(|p| p.0.to_vec()),
                &key.previous.map(|p| p.1),
                &key.rate.map(|r| r.to_string()),
            ],
        )
        .await?;
        tx.execute("DELETE FROM key_allow WHERE kid = $1", &[&kid])
            .await?;
        if !key.allow.is_empty() {
            let cidrs: Vec<String> = key.allow.iter().map(|a| a.cidr.to_string()).collect();
            let labels: Vec<&str> = key.allow.iter().map(|a| a.label.as_str()).collect();
            tx.execute(
                "INSERT INTO key_allow(kid, cidr, label)
                 SELECT $1, c, l FROM unnest($2::text[], $3::text[]) AS u(c, l)",
                &[&kid, &cidrs, &labels],
            )
            .await?;
        }
        Ok(())
    }
}

impl KeyStore for PgStore {
    fn next_kid(&self) -> Result<u32, StoreError> {
        let kid = self.with("numbering a key", async |c| {
            c.query_one("SELECT nextval(pg_get_serial_sequence('keys', 'kid'))", &[])
                .await?
                .try_get::<_, i64>(0)
        })?;
        u32::try_from(kid).map_err(|_| self.corrupt("keys.kid", kid.to_string()))
    }

    fn create_key(&self, key: &KeyRecord, actor: &str) -> Result<KeyRecord, StoreError> {
        self.tx("creating a key", async |tx| {
            let stored = Self::insert_key(tx, key).await?;
            let allow: Vec<String> = stored.allow.iter().map(|a| a.cidr.to_string()).collect();
            Self::audit(
                tx,
                &stored.account,
                actor,
                "key.create",
                &serde_json::json!({ "id": stored.id, "name": stored.name, "allow": allow }),
            )
            .await?;
            Ok(stored)
        })
    }

    fn keys_of(&self, only: Option<&str>) -> Result<Vec<KeyRecord>, StoreError> {
        // One snapshot for both reads, so a key and its allowlist agree.
        let (rows, allow_rows) = self.with("listing keys", async |c| {
            let tx = c
                .build_transaction()
                .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await?;
            let rows = tx
                .query(
                    &format!(
                        "SELECT kid, id, name, description, scopes, status, secret_hash, prev_hash,
                                prev_expires_ms, rate, created_at, last_used_ms, requests_day,
                                requests_today, account
                         FROM keys WHERE {} ORDER BY kid",
                        by_account(only, "account = $1")
                    ),
                    &[&only],
                )
                .await?;
            let allow = tx
                .query(
                    &format!(
                        "SELECT kid, cidr, label FROM key_allow WHERE {} ORDER BY kid, cidr",
                        by_account(only, "kid IN (SELECT kid FROM keys WHERE account = $1)")
                    ),
                    &[&only],
                )
                .await?;
            tx.commit().await?;
            Ok((rows, allow))
        })?;
        let get = |e| self.pg_err("listing keys")(e);
        let mut allow: HashMap<i64, Vec<AllowRecord>> = HashMap::new();
        for r in &allow_rows {
            let kid: i64 = r.try_get(0).map_err(get)?;
            let cidr: String = r.try_get(1).map_err(get)?;
            let cidr = cidr
                .parse()
                .map_err(|_| self.corrupt("key_allow.cidr", cidr))?;
            allow.entry(kid).or_default().push(AllowRecord {
                cidr,
                label: r.try_get(2).map_err(get)?,
            });
        }
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            let kid: i64 = r.try_get(0).map_err(get)?;
            let scopes: String = r.try_get(4).map_err(get)?;
            let status: String = r.try_get(5).map_err(get)?;
            let hash: Vec<u8> = r.try_get(6).map_err(get)?;
            let prev: Option<Vec<u8>> = r.try_get(7).map_err(get)?;
            let prev_exp: Option<i64> = r.try_get(8).map_err(get)?;
            let rate: Option<String> = r.try_get(9).map_err(get)?;
            let k = decode_key(
                &scopes,
                &status,
                hash,
                (prev, prev_exp),
                rate,
                |column, value| self.corrupt(column, value),
            )?;
            out.push(KeyRecord {
                kid: u32::try_from(kid).map_err(|_| self.corrupt("keys.kid", kid.to_string()))?,
                id: r.try_get(1).map_err(get)?,
                account: r.try_get(14).map_err(get)?,
                name: r.try_get(2).map_err(get)?,
                description: r.try_get(3).map_err(get)?,
                scopes: k.scopes,
                status: k.status,
                secret_hash: k.secret_hash,
                previous: k.previous,
                rate: k.rate,
                created_at: r.try_get(10).map_err(get)?,
                last_used_ms: r.try_get(11).map_err(get)?,
                requests_day: r.try_get(12).map_err(get)?,
                requests_today: r.try_get(13).map_err(get)?,
                allow: allow.remove(&kid).unwrap_or_default(),
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
        let mut detail = detail;
        if let serde_json::Value::Object(m) = &mut detail {
            m.insert("id".into(), key.id.clone().into());
        }
        self.tx("updating a key", async |tx| {
            Self::write_key(tx, key).await?;
            Self::audit(tx, &key.account, actor, action, &detail).await
        })
    }

    fn flush_usage(&self, usage: &[(u32, i64, u64)], today: i64) -> Result<(), StoreError> {
        if usage.is_empty() {
            return Ok(());
        }
        // One row per key, in key order: one UPDATE can touch a row once,
        // and edges that lock rows in the same order cannot deadlock.
        let mut merged: BTreeMap<i64, (i64, i64)> = BTreeMap::new();
        for &(kid, last, n) in usage {
            let e = merged.entry(i64::from(kid)).or_insert((0, 0));
            e.0 = e.0.max(last);
            e.1 = e.1.saturating_add(n as i64);
        }
        let kids: Vec<i64> = merged.keys().copied().collect();
        let lasts: Vec<i64> = merged.values().map(|v| v.0).collect();
        let counts: Vec<i64> = merged.values().map(|v| v.1).collect();
        // Each edge adds its own count to the row in one statement, so
        // counts from several edges add up; a flush from a day already
        // over (an edge whose clock is behind) is not counted into today.
        self.with("flushing usage", async |c| {
            c.execute(
                "UPDATE keys k SET last_used_ms = greatest(coalesce(k.last_used_ms, 0), u.last),
                   requests_today = CASE WHEN k.requests_day = $4 THEN k.requests_today + u.n
                                         WHEN k.requests_day > $4 THEN k.requests_today
                                         ELSE u.n END,
                   requests_day = greatest(k.requests_day, $4)
                 FROM unnest($1::bigint[], $2::bigint[], $3::bigint[]) AS u(kid, last, n)
                 WHERE k.kid = u.kid",
                &[&kids, &lasts, &counts, &today],
            )
            .await
        })?;
        Ok(())
    }
}
