//! Accounts with their blocking modes, admin API tokens, the audit log.

use rusqlite::{Connection, OptionalExtension, params};

use super::SqliteStore;
use crate::policy::Role;
use crate::store::codec::mode_str;
use crate::store::{
    AccessStore, AccountRecord, AccountStore, AuditEntry, AuditQuery, BlockingState, StoreError,
    TokenRecord,
};

const ACCOUNT_COLUMNS: &str = "idx, name, parent, emails, enforce_blocking, created_at, api_mode, api_since, \
     smtp_mode, smtp_since, last_learned_at";

type AccountRow = (
    u32,
    String,
    Option<String>,
    String,
    bool,
    i64,
    String,
    i64,
    String,
    i64,
    i64,
);

fn account_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<AccountRow> {
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
    ))
}

impl SqliteStore {
    fn to_account(&self, row: AccountRow) -> Result<AccountRecord, StoreError> {
        let (
            idx,
            name,
            parent,
            emails,
            enforce,
            created_at,
            api,
            api_since,
            smtp,
            smtp_since,
            learned,
        ) = row;
        fn mode<T: serde::de::DeserializeOwned>(
            s: &SqliteStore,
            column: &'static str,
            v: String,
        ) -> Result<T, StoreError> {
            serde_json::from_value(serde_json::Value::String(v.clone()))
                .map_err(|_| s.corrupt(column, v))
        }
        Ok(AccountRecord {
            idx,
            emails: serde_json::from_str(&emails)
                .map_err(|_| self.corrupt("accounts.emails", emails))?,
            parent,
            enforce_blocking: enforce,
            created_at,
            blocking: BlockingState {
                api: mode(self, "accounts.api_mode", api)?,
                api_since,
                smtp: mode(self, "accounts.smtp_mode", smtp)?,
                smtp_since,
            },
            last_learned_at: learned,
            name,
        })
    }
}

impl SqliteStore {
    /// Inserts an account; returns its index.
    pub(super) fn insert_account(tx: &Connection, rec: &AccountRecord) -> rusqlite::Result<u32> {
        tx.execute(
            "INSERT INTO accounts(name, parent, emails, enforce_blocking, created_at, api_mode, api_since,
               smtp_mode, smtp_since, last_learned_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            params![
                rec.name,
                rec.parent,
                serde_json::to_string(&rec.emails).unwrap_or_else(|_| "[]".into()),
                rec.enforce_blocking,
                rec.created_at,
                mode_str(rec.blocking.api),
                rec.blocking.api_since,
                mode_str(rec.blocking.smtp),
                rec.blocking.smtp_since,
                rec.last_learned_at,
            ],
        )?;
        Ok(tx.last_insert_rowid() as u32)
    }
}

impl AccountStore for SqliteStore {
    fn accounts_named(&self, name: Option<&str>) -> Result<Vec<AccountRecord>, StoreError> {
        let rows: Vec<AccountRow> = {
            let conn = self.conn();
            let mut stmt = conn
                .prepare_cached(&format!(
                    "SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE ?1 IS NULL OR name = ?1 ORDER BY idx"
                ))
                .map_err(self.err("listing accounts"))?;
            let rows = stmt
                .query_map([name], account_row)
                .map_err(self.err("listing accounts"))?;
            rows.collect::<Result<_, _>>()
                .map_err(self.err("listing accounts"))?
        };
        rows.into_iter().map(|r| self.to_account(r)).collect()
    }

    fn create_account(
        &self,
        rec: &AccountRecord,
        actor: &str,
    ) -> Result<AccountRecord, StoreError> {
        let mut conn = self.conn();
        let tx = conn
            .transaction()
            .map_err(self.err("creating an account"))?;
        let mut stored = rec.clone();
        stored.idx = Self::insert_account(&tx, rec).map_err(self.err("creating an account"))?;
        Self::audit(
            &tx,
            &rec.name,
            actor,
            "account.create",
            &serde_json::json!({ "parent": rec.parent, "emails": rec.emails }),
        )
        .map_err(self.err("auditing"))?;
        tx.commit().map_err(self.err("committing"))?;
        Ok(stored)
    }

    fn update_account(
        &self,
        rec: &AccountRecord,
        action: &str,
        detail: serde_json::Value,
        actor: &str,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn
            .transaction()
            .map_err(self.err("updating an account"))?;
        tx.execute(
            "UPDATE accounts SET emails = ?2, enforce_blocking = ?3 WHERE name = ?1",
            params![
                rec.name,
                serde_json::to_string(&rec.emails).unwrap_or_else(|_| "[]".into()),
                rec.enforce_blocking
            ],
        )
        .map_err(self.err("updating an account"))?;
        Self::audit(&tx, &rec.name, actor, action, &detail).map_err(self.err("auditing"))?;
        tx.commit().map_err(self.err("committing"))
    }

    fn remove_account(&self, name: &str, actor: &str) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn
            .transaction()
            .map_err(self.err("removing an account"))?;
        let keys: Vec<String> = {
            let mut stmt = tx
                .prepare_cached("SELECT id FROM keys WHERE account = ?1 ORDER BY kid")
                .map_err(self.err("removing an account"))?;
            let rows = stmt
                .query_map([name], |r| r.get(0))
                .map_err(self.err("removing an account"))?;
            rows.collect::<Result<_, _>>()
                .map_err(self.err("removing an account"))?
        };
        for sql in [
            "DELETE FROM keys WHERE account = ?1",
            "DELETE FROM authorized WHERE account = ?1",
            "DELETE FROM entry_usage WHERE account = ?1",
            "DELETE FROM unauthorized WHERE account = ?1",
            "UPDATE tokens SET revoked_at = CAST(strftime('%s', 'now') AS INTEGER)
               WHERE account = ?1 AND revoked_at IS NULL",
            "DELETE FROM accounts WHERE name = ?1",
        ] {
            tx.execute(sql, [name])
                .map_err(self.err("removing an account"))?;
        }
        Self::audit(
            &tx,
            name,
            actor,
            "account.remove",
            &serde_json::json!({ "keys_revoked": keys }),
        )
        .map_err(self.err("auditing"))?;
        tx.commit().map_err(self.err("committing"))
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
            "api" => "UPDATE accounts SET api_mode = ?2, api_since = ?3 WHERE name = ?1",
            _ => "UPDATE accounts SET smtp_mode = ?2, smtp_since = ?3 WHERE name = ?1",
        };
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(self.err("setting blocking"))?;
        tx.execute(sql, params![account, mode, now])
            .map_err(self.err("setting blocking"))?;
        Self::audit(
            &tx,
            account,
            actor,
            "blocking.set",
            &serde_json::json!({ "service": service, "mode": mode }),
        )
        .map_err(self.err("auditing"))?;
        tx.commit().map_err(self.err("committing"))
    }
}

type TokenRow = (
    String,
    String,
    Option<String>,
    String,
    Vec<u8>,
    i64,
    Option<i64>,
    Option<i64>,
    String,
);

impl AccessStore for SqliteStore {
    fn create_token(&self, rec: &TokenRecord, actor: &str) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(self.err("creating a token"))?;
        tx.execute(
            "INSERT INTO tokens(id, name, account, role, hash, created_at, expires_at, created_by)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                rec.id,
                rec.name,
                rec.account,
                rec.role.as_str(),
                rec.hash.to_vec(),
                rec.created_at,
                rec.expires_at,
                rec.created_by
            ],
        )
        .map_err(self.err("creating a token"))?;
        Self::audit(
            &tx,
            rec.account.as_deref().unwrap_or(""),
            actor,
            "token.create",
            &serde_json::json!({ "id": rec.id, "name": rec.name, "role": rec.role.as_str(),
                                 "expires_at": rec.expires_at }),
        )
        .map_err(self.err("auditing"))?;
        tx.commit().map_err(self.err("committing"))
    }

    fn list_tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        let rows: Vec<TokenRow> = {
            let conn = self.conn();
            let mut stmt = conn
                .prepare_cached(
                    "SELECT id, name, account, role, hash, created_at, expires_at, revoked_at, created_by
                     FROM tokens ORDER BY created_at, id",
                )
                .map_err(self.err("listing tokens"))?;
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
                    ))
                })
                .map_err(self.err("listing tokens"))?;
            rows.collect::<Result<_, _>>()
                .map_err(self.err("listing tokens"))?
        };
        rows.into_iter()
            .map(
                |(
                    id,
                    name,
                    account,
                    role,
                    hash,
                    created_at,
                    expires_at,
                    revoked_at,
                    created_by,
                )| {
                    Ok(TokenRecord {
                        role: Role::parse(&role).map_err(|_| self.corrupt("tokens.role", role))?,
                        hash: hash
                            .try_into()
                            .map_err(|_| self.corrupt("tokens.hash", "wrong length"))?,
                        id,
                        name,
                        account,
                        created_at,
                        expires_at,
                        revoked_at,
                        created_by,
                    })
                },
            )
            .collect()
    }

    fn revoke_token(&self, id: &str, now: i64, actor: &str) -> Result<bool, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(self.err("revoking a token"))?;
        let account: Option<Option<String>> = tx
            .query_row(
                "SELECT account FROM tokens WHERE id = ?1 AND revoked_at IS NULL",
                [id],
                |r| r.get(0),
            )
            .optional()
            .map_err(self.err("revoking a token"))?;
        let Some(account) = account else {
            return Ok(false);
        };
        tx.execute(
            "UPDATE tokens SET revoked_at = ?2 WHERE id = ?1",
            params![id, now],
        )
        .map_err(self.err("revoking a token"))?;
        Self::audit(
            &tx,
            account.as_deref().unwrap_or(""),
            actor,
            "token.revoke",
            &serde_json::json!({ "id": id }),
        )
        .map_err(self.err("auditing"))?;
        tx.commit().map_err(self.err("committing"))?;
        Ok(true)
    }

    fn audit_log(&self, q: &AuditQuery) -> Result<Vec<AuditEntry>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(
                "SELECT at, account, actor, action, detail FROM audit
                 WHERE at >= ?1 AND (?2 IS NULL OR actor = ?2) AND (?3 IS NULL OR account = ?3)
                 ORDER BY id DESC LIMIT ?4",
            )
            .map_err(self.err("reading the audit log"))?;
        let rows = stmt
            .query_map(
                params![
                    q.since.unwrap_or(i64::MIN),
                    q.actor,
                    q.account,
                    q.limit as i64
                ],
                |r| {
                    Ok(AuditEntry {
                        at: r.get(0)?,
                        account: r.get(1)?,
                        actor: r.get(2)?,
                        action: r.get(3)?,
                        detail: r.get(4)?,
                    })
                },
            )
            .map_err(self.err("reading the audit log"))?;
        rows.collect::<Result<_, _>>()
            .map_err(self.err("reading the audit log"))
    }
}
