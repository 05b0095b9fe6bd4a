//! Accounts with their blocking modes, admin API tokens, the audit log.

use tokio_postgres::Row;

use super::{PgStore, Tx, by_account, mode};
use crate::policy::Role;
use crate::store::codec::{hash32, mode_str};
use crate::store::{
    AccessStore, AccountRecord, AccountStore, AuditEntry, AuditQuery, BlockingState, StoreError,
    TokenRecord, unix_now,
};

const ACCOUNT_COLUMNS: &str = "idx, name, parent, emails, enforce_blocking, created_at, api_mode, api_since, \
     smtp_mode, smtp_since, last_learned_at";

impl PgStore {
    fn to_account(&self, r: &Row) -> Result<AccountRecord, StoreError> {
        let get = |e| self.pg_err("reading an account")(e);
        let idx: i64 = r.try_get(0).map_err(get)?;
        let emails: String = r.try_get(3).map_err(get)?;
        let api: String = r.try_get(6).map_err(get)?;
        let smtp: String = r.try_get(8).map_err(get)?;
        Ok(AccountRecord {
            idx: u32::try_from(idx).map_err(|_| self.corrupt("accounts.idx", idx.to_string()))?,
            name: r.try_get(1).map_err(get)?,
            parent: r.try_get(2).map_err(get)?,
            emails: serde_json::from_str(&emails)
                .map_err(|_| self.corrupt("accounts.emails", emails))?,
            enforce_blocking: r.try_get(4).map_err(get)?,
            created_at: r.try_get(5).map_err(get)?,
            blocking: BlockingState {
                api: mode(self, "accounts.api_mode", api)?,
                api_since: r.try_get(7).map_err(get)?,
                smtp: mode(self, "accounts.smtp_mode", smtp)?,
                smtp_since: r.try_get(9).map_err(get)?,
            },
            last_learned_at: r.try_get(10).map_err(get)?,
        })
    }

    /// Inserts an account; returns its index.
    pub(super) async fn insert_account(
        tx: &Tx<'_>,
        rec: &AccountRecord,
    ) -> Result<u32, tokio_postgres::Error> {
        let row = tx
            .query_one(
                "INSERT INTO accounts(name, parent, emails, enforce_blocking, created_at, api_mode, api_since,
                   smtp_mode, smtp_since, last_learned_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING idx",
                &[
                    &rec.name,
                    &rec.parent,
                    &serde_json::to_string(&rec.emails).unwrap_or_else(|_| "[]".into()),
                    &rec.enforce_blocking,
                    &rec.created_at,
                    &mode_str(rec.blocking.api),
                    &rec.blocking.api_since,
                    &mode_str(rec.blocking.smtp),
                    &rec.blocking.smtp_since,
                    &rec.last_learned_at,
                ],
            )
            .await?;
        let idx: i64 = row.try_get(0)?;
        Ok(idx as u32)
    }
}

impl AccountStore for PgStore {
    fn accounts_named(&self, name: Option<&str>) -> Result<Vec<AccountRecord>, StoreError> {
        let rows = self.with("listing accounts", async |c| {
            c.query(
                &format!(
                    "SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE {} ORDER BY idx",
                    by_account(name, "name = $1")
                ),
                &[&name],
            )
            .await
        })?;
        rows.iter().map(|r| self.to_account(r)).collect()
    }

    fn create_account(
        &self,
        rec: &AccountRecord,
        actor: &str,
    ) -> Result<AccountRecord, StoreError> {
        let idx = self.tx("creating an account", async |tx| {
            let idx = Self::insert_account(tx, rec).await?;
            Self::audit(
                tx,
                &rec.name,
                actor,
                "account.create",
                &serde_json::json!({ "parent": rec.parent, "emails": rec.emails }),
            )
            .await?;
            Ok(idx)
        })?;
        Ok(AccountRecord { idx, ..rec.clone() })
    }

    fn update_account(
        &self,
        rec: &AccountRecord,
        action: &str,
        detail: serde_json::Value,
        actor: &str,
    ) -> Result<(), StoreError> {
        self.tx("updating an account", async |tx| {
            tx.execute(
                "UPDATE accounts SET emails = $2, enforce_blocking = $3 WHERE name = $1",
                &[
                    &rec.name,
                    &serde_json::to_string(&rec.emails).unwrap_or_else(|_| "[]".into()),
                    &rec.enforce_blocking,
                ],
            )
            .await?;
            Self::audit(tx, &rec.name, actor, action, &detail).await
        })
    }

    fn remove_account(&self, name: &str, actor: &str) -> Result<(), StoreError> {
        self.tx("removing an account", async |tx| {
            let keys: Vec<String> = tx
                .query(
                    "SELECT id FROM keys WHERE account = $1 ORDER BY kid",
                    &[&name],
                )
                .await?
                .iter()
                .map(|r| r.try_get(0))
                .collect::<Result<_, _>>()?;
            for sql in [
                "DELETE FROM keys WHERE account = $1",
                "DELETE FROM authorized WHERE account = $1",
                "DELETE FROM entry_usage WHERE account = $1",
                "DELETE FROM unauthorized WHERE account = $1",
                "DELETE FROM accounts WHERE name = $1",
            ] {
                tx.execute(sql, &[&name]).await?;
            }
            tx.execute(
                "UPDATE tokens SET revoked_at = $2 WHERE account = $1 AND revoked_at IS NULL",
                &[&name, &unix_now()],
            )
            .await?;
            Self::audit(
                tx,
                name,
                actor,
                "account.remove",
                &serde_json::json!({ "keys_revoked": keys }),
            )
            .await
        })
    }

    fn set_blocking(
        &self,
        account: &str,
        service: &str,
        mode: &str,
        actor: &str,
        now: i64,
    ) -> Result<(), StoreError> {
        let sql = match service {
            "api" => "UPDATE accounts SET api_mode = $2, api_since = $3 WHERE name = $1",
            _ => "UPDATE accounts SET smtp_mode = $2, smtp_since = $3 WHERE name = $1",
        };
        self.tx("setting blocking", async |tx| {
            tx.execute(sql, &[&account, &mode, &now]).await?;
            Self::audit(
                tx,
                account,
                actor,
                "blocking.set",
                &serde_json::json!({ "service": service, "mode": mode }),
            )
            .await
        })
    }
}

impl AccessStore for PgStore {
    fn create_token(&self, rec: &TokenRecord, actor: &str) -> Result<(), StoreError> {
        self.tx("creating a token", async |tx| {
            tx.execute(
                "INSERT INTO tokens(id, name, account, role, hash, created_at, expires_at, created_by)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                &[
                    &rec.id,
                    &rec.name,
                    &rec.account,
                    &rec.role.as_str(),
                    &&rec.hash[..],
                    &rec.created_at,
                    &rec.expires_at,
                    &rec.created_by,
                ],
            )
            .await?;
            Self::audit(
                tx,
                rec.account.as_deref().unwrap_or(""),
                actor,
                "token.create",
                &serde_json::json!({ "id": rec.id, "name": rec.name, "role": rec.role.as_str(),
                                     "expires_at": rec.expires_at }),
            )
            .await
        })
    }

    fn list_tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        let rows = self.with("listing tokens", async |c| {
            c.query(
                "SELECT id, name, account, role, hash, created_at, expires_at, revoked_at, created_by
                 FROM tokens ORDER BY created_at, id",
                &[],
            )
            .await
        })?;
        let get = |e| self.pg_err("listing tokens")(e);
        rows.iter()
            .map(|r| {
                let role: String = r.try_get(3).map_err(get)?;
                let hash: Vec<u8> = r.try_get(4).map_err(get)?;
                Ok(TokenRecord {
                    id: r.try_get(0).map_err(get)?,
                    name: r.try_get(1).map_err(get)?,
                    account: r.try_get(2).map_err(get)?,
                    role: Role::parse(&role).map_err(|_| self.corrupt("tokens.role", role))?,
                    hash: hash32(hash)
                        .ok_or_else(|| self.corrupt("tokens.hash", "wrong length"))?,
                    created_at: r.try_get(5).map_err(get)?,
                    expires_at: r.try_get(6).map_err(get)?,
                    revoked_at: r.try_get(7).map_err(get)?,
                    created_by: r.try_get(8).map_err(get)?,
                })
            })
            .collect()
    }

    fn revoke_token(&self, id: &str, now: i64, actor: &str) -> Result<bool, StoreError> {
        self.tx("revoking a token", async |tx| {
            // Revoked once: of two edges revoking together, one audits it.
            let Some(row) = tx
                .query_opt(
                    "UPDATE tokens SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL
                     RETURNING account",
                    &[&id, &now],
                )
                .await?
            else {
                return Ok(false);
            };
            let account: Option<String> = row.try_get(0)?;
            Self::audit(
                tx,
                account.as_deref().unwrap_or(""),
                actor,
                "token.revoke",
                &serde_json::json!({ "id": id }),
            )
            .await?;
            Ok(true)
        })
    }

    fn audit_log(&self, q: &AuditQuery) -> Result<Vec<AuditEntry>, StoreError> {
        let rows = self.with("reading the audit log", async |c| {
            c.query(
                "SELECT at, account, actor, action, detail FROM audit
                 WHERE at >= $1 AND ($2::text IS NULL OR actor = $2) AND ($3::text IS NULL OR account = $3)
                 ORDER BY id DESC LIMIT $4",
                &[
                    &q.since.unwrap_or(i64::MIN),
                    &q.actor,
                    &q.account,
                    &(q.limit as i64),
                ],
            )
            .await
        })?;
        let get = |e| self.pg_err("reading the audit log")(e);
        rows.iter()
            .map(|r| {
                Ok(AuditEntry {
                    at: r.try_get(0).map_err(get)?,
                    account: r.try_get(1).map_err(get)?,
                    actor: r.try_get(2).map_err(get)?,
                    action: r.try_get(3).map_err(get)?,
                    detail: r.try_get(4).map_err(get)?,
                })
            })
            .collect()
    }
}
