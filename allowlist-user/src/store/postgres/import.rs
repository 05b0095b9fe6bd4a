//! Loading a whole policy at once into PostgreSQL, for fixtures and
//! offline loads: accounts, keys with their allowlists and authorized
//! entries in one transaction, as a few array inserts per 10,000 rows
//! rather than statements per record.

use super::{PgStore, Tx};
use crate::store::codec::{mode_str, status_str};
use crate::store::{AccountRecord, AuthorizedRecord, Imported, KeyRecord, StoreError};

const CHUNK: usize = 10_000;

impl PgStore {
    /// As [`SqliteStore::import_policy`](crate::store::SqliteStore::import_policy):
    /// all of it or nothing, with one audit entry. Keys are numbered here.
    pub fn import_policy(
        &self,
        accounts: &[AccountRecord],
        keys: &[KeyRecord],
        authorized: &[(String, AuthorizedRecord)],
        actor: &str,
    ) -> Result<Imported, StoreError> {
        let done = self.tx("importing", async |tx| {
            let mut done = Imported::default();
            for chunk in accounts.chunks(CHUNK) {
                done.accounts += insert_accounts(tx, chunk).await? as usize;
            }
            for chunk in keys.chunks(CHUNK) {
                done.keys += insert_keys(tx, chunk).await?;
            }
            let mut by_account: std::collections::BTreeMap<&str, Vec<&AuthorizedRecord>> =
                Default::default();
            for (a, r) in authorized {
                by_account.entry(a.as_str()).or_default().push(r);
            }
            for (account, recs) in by_account {
                for chunk in recs.chunks(CHUNK) {
                    done.authorized += Self::insert_authorized(tx, account, chunk).await? as usize;
                }
            }
            Self::audit(
                tx,
                "",
                actor,
                "import",
                &serde_json::json!({
                    "accounts": done.accounts, "keys": done.keys, "authorized": done.authorized
                }),
            )
            .await?;
            Ok(done)
        })?;
        // Fresh statistics: until autovacuum gets to it, the planner would
        // guess at a million new rows and may scan whole tables for one
        // account's reload.
        self.with("analyzing after an import", async |c| {
            c.batch_execute("ANALYZE accounts, keys, key_allow, authorized")
                .await
        })?;
        Ok(done)
    }
}

async fn insert_accounts(
    tx: &Tx<'_>,
    recs: &[AccountRecord],
) -> Result<u64, tokio_postgres::Error> {
    let col = |f: fn(&AccountRecord) -> String| recs.iter().map(f).collect::<Vec<String>>();
    let names = col(|a| a.name.clone());
    let parents: Vec<Option<&str>> = recs.iter().map(|a| a.parent.as_deref()).collect();
    let emails = col(|a| serde_json::to_string(&a.emails).unwrap_or_else(|_| "[]".into()));
    let enforce: Vec<bool> = recs.iter().map(|a| a.enforce_blocking).collect();
    let created: Vec<i64> = recs.iter().map(|a| a.created_at).collect();
    let api = col(|a| mode_str(a.blocking.api));
    let api_since: Vec<i64> = recs.iter().map(|a| a.blocking.api_since).collect();
    let smtp = col(|a| mode_str(a.blocking.smtp));
    let smtp_since: Vec<i64> = recs.iter().map(|a| a.blocking.smtp_since).collect();
    let learned: Vec<i64> = recs.iter().map(|a| a.last_learned_at).collect();
    tx.execute(
        "INSERT INTO accounts(name, parent, emails, enforce_blocking, created_at, api_mode, api_since,
           smtp_mode, smtp_since, last_learned_at)
         SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bool[], $5::bigint[], $6::text[],
                              $7::bigint[], $8::text[], $9::bigint[], $10::bigint[])",
        &[
            &names, &parents, &emails, &enforce, &created, &api, &api_since, &smtp, &smtp_since,
            &learned,
        ],
    )
    .await
}

async fn insert_keys(tx: &Tx<'_>, recs: &[KeyRecord]) -> Result<usize, tokio_postgres::Error> {
    let kids: Vec<i64> = tx
        .query(
            "SELECT nextval(pg_get_serial_sequence('keys', 'kid')) FROM generate_series(1, $1::bigint)",
            &[&(recs.len() as i64)],
        )
        .await?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<Result<_, _>>()?;
    let ids: Vec<&str> = recs.iter().map(|k| k.id.as_str()).collect();
    let accounts: Vec<&str> = recs.iter().map(|k| k.account.as_str()).collect();
    let names: Vec<&str> = recs.iter().map(|k| k.name.as_str()).collect();
    let descs: Vec<&str> = recs.iter().map(|k| k.description.as_str()).collect();
    let scopes: Vec<String> = recs
        .iter()
        .map(|k| {
            k.scopes
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(",")
        })
        .collect();
    let status: Vec<&str> = recs.iter().map(|k| status_str(k.status)).collect();
    let prev: Vec<Option<&[u8]>> = recs
        .iter()
        .map(|k| k.previous.as_ref().map(|p| &p.0[..]))
        .collect();
    let prev_exp: Vec<Option<i64>> = recs.iter().map(|k| k.previous.map(|p| p.1)).collect();
    let hashes: Vec<&[u8]> = recs.iter().map(|k| &k.secret_hash[..]).collect();
    let rates: Vec<Option<String>> = recs.iter().map(|k| k.rate.map(|r| r.to_string())).collect();
    let created: Vec<i64> = recs.iter().map(|k| k.created_at).collect();
    tx.execute(
        "INSERT INTO keys(kid, id, account, name, description, scopes, status, secret_hash, rate, created_at,
                          prev_hash, prev_expires_ms)
         SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                              $7::text[], $8::bytea[], $9::text[], $10::bigint[], $11::bytea[], $12::bigint[])",
        &[
            &kids, &ids, &accounts, &names, &descs, &scopes, &status, &hashes, &rates, &created,
            &prev, &prev_exp,
        ],
    )
    .await?;
    let mut allow_kids = Vec::new();
    let mut cidrs = Vec::new();
    let mut labels = Vec::new();
    for (k, kid) in recs.iter().zip(&kids) {
        for a in &k.allow {
            allow_kids.push(*kid);
            cidrs.push(a.cidr.to_string());
            labels.push(a.label.as_str());
        }
    }
    tx.execute(
        "INSERT INTO key_allow(kid, cidr, label)
         SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[])",
        &[&allow_kids, &cidrs, &labels],
    )
    .await?;
    Ok(recs.len())
}
