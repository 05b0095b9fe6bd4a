//! Accounts' webhooks and the one-click action links of notifications.

use rusqlite::{OptionalExtension, params};

use super::SqliteStore;
use crate::store::{ActionRecord, Claim, NotifyStore, StoreError, WebhookRecord};

const ACTION_COLUMNS: &str = "hash, id, grp, account, action, addr, key_id, key_name, nonce, \
     created_at, expires_at, used_at, used_by";

fn action_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ActionRecord> {
    let hash: Vec<u8> = r.get(0)?;
    Ok(ActionRecord {
        // A stored hash of another length cannot match any token; zeroes
        // keep the row readable (it is found by hash, so never served).
        hash: hash.try_into().unwrap_or([0; 32]),
        id: r.get(1)?,
        group: r.get(2)?,
        account: r.get(3)?,
        action: r.get(4)?,
        addr: r.get(5)?,
        key_id: r.get(6)?,
        key_name: r.get(7)?,
        nonce: r.get(8)?,
        created_at: r.get(9)?,
        expires_at: r.get(10)?,
        used_at: r.get(11)?,
        used_by: r.get(12)?,
    })
}

impl NotifyStore for SqliteStore {
    fn list_webhooks(&self, account: Option<&str>) -> Result<Vec<WebhookRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(
                "SELECT account, url, secret, created_at, created_by FROM webhooks
                 WHERE ?1 IS NULL OR account = ?1 ORDER BY account, url",
            )
            .map_err(self.err("listing webhooks"))?;
        let rows = stmt
            .query_map(params![account], |r| {
                Ok(WebhookRecord {
                    account: r.get(0)?,
                    url: r.get(1)?,
                    secret: r.get(2)?,
                    created_at: r.get(3)?,
                    created_by: r.get(4)?,
                })
            })
            .map_err(self.err("listing webhooks"))?;
        rows.collect::<Result<_, _>>()
            .map_err(self.err("listing webhooks"))
    }

    fn put_webhook(&self, rec: &WebhookRecord, actor: &str) -> Result<bool, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(self.err("adding a webhook"))?;
        let replaced = tx
            .execute(
                "DELETE FROM webhooks WHERE account = ?1 AND url = ?2",
                params![rec.account, rec.url],
            )
            .map_err(self.err("adding a webhook"))?
            > 0;
        tx.execute(
            "INSERT INTO webhooks(account, url, secret, created_at, created_by)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                rec.account,
                rec.url,
                rec.secret,
                rec.created_at,
                rec.created_by
            ],
        )
        .map_err(self.err("adding a webhook"))?;
        // The secret stays out of the audit log.
        Self::audit(
            &tx,
            &rec.account,
            actor,
            "webhook.add",
            &serde_json::json!({ "url": rec.url, "replaced": replaced }),
        )
        .map_err(self.err("adding a webhook"))?;
        tx.commit().map_err(self.err("adding a webhook"))?;
        Ok(replaced)
    }

    fn remove_webhook(&self, account: &str, url: &str, actor: &str) -> Result<bool, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(self.err("removing a webhook"))?;
        let n = tx
            .execute(
                "DELETE FROM webhooks WHERE account = ?1 AND url = ?2",
                params![account, url],
            )
            .map_err(self.err("removing a webhook"))?;
        if n > 0 {
            Self::audit(
                &tx,
                account,
                actor,
                "webhook.remove",
                &serde_json::json!({ "url": url }),
            )
            .map_err(self.err("removing a webhook"))?;
        }
        tx.commit().map_err(self.err("removing a webhook"))?;
        Ok(n > 0)
    }

    fn create_actions(&self, recs: &[ActionRecord]) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn
            .transaction()
            .map_err(self.err("storing action links"))?;
        {
            let mut stmt = tx
                .prepare_cached(&format!(
                    "INSERT INTO actions({ACTION_COLUMNS})
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, NULL, NULL)"
                ))
                .map_err(self.err("storing action links"))?;
            for a in recs {
                stmt.execute(params![
                    &a.hash[..],
                    a.id,
                    a.group,
                    a.account,
                    a.action,
                    a.addr,
                    a.key_id,
                    a.key_name,
                    a.nonce,
                    a.created_at,
                    a.expires_at,
                ])
                .map_err(self.err("storing action links"))?;
            }
        }
        tx.commit().map_err(self.err("storing action links"))
    }

    fn find_action(&self, hash: &[u8; 32]) -> Result<Option<ActionRecord>, StoreError> {
        let conn = self.conn();
        conn.query_row(
            &format!("SELECT {ACTION_COLUMNS} FROM actions WHERE hash = ?1"),
            params![&hash[..]],
            action_row,
        )
        .optional()
        .map_err(self.err("reading an action link"))
    }

    fn claim_action(&self, hash: &[u8; 32], nonce: &str, now: i64) -> Result<Claim, StoreError> {
        let mut conn = self.conn();
        // IMMEDIATE: two POSTs of the same link (or of siblings) from two
        // connections must not both read "unused".
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(self.err("claiming an action link"))?;
        let Some(rec) = tx
            .query_row(
                &format!("SELECT {ACTION_COLUMNS} FROM actions WHERE hash = ?1"),
                params![&hash[..]],
                action_row,
            )
            .optional()
            .map_err(self.err("claiming an action link"))?
        else {
            return Ok(Claim::Unknown);
        };
        let used: Option<ActionRecord> = tx
            .query_row(
                &format!(
                    "SELECT {ACTION_COLUMNS} FROM actions WHERE grp = ?1 AND used_at IS NOT NULL LIMIT 1"
                ),
                params![rec.group],
                action_row,
            )
            .optional()
            .map_err(self.err("claiming an action link"))?;
        if let Some(u) = used {
            return Ok(Claim::Used(u));
        }
        if rec.expires_at <= now {
            return Ok(Claim::Expired(rec));
        }
        if !bool::from(subtle::ConstantTimeEq::ct_eq(
            rec.nonce.as_bytes(),
            nonce.as_bytes(),
        )) {
            return Ok(Claim::BadNonce);
        }
        tx.execute(
            "UPDATE actions SET used_at = ?1, used_by = ?2 WHERE grp = ?3",
            params![now, rec.id, rec.group],
        )
        .map_err(self.err("claiming an action link"))?;
        tx.commit().map_err(self.err("claiming an action link"))?;
        Ok(Claim::Claimed(ActionRecord {
            used_at: Some(now),
            used_by: Some(rec.id.clone()),
            ..rec
        }))
    }

    fn release_action(&self, group: &str) -> Result<(), StoreError> {
        self.conn()
            .execute(
                "UPDATE actions SET used_at = NULL, used_by = NULL WHERE grp = ?1",
                params![group],
            )
            .map_err(self.err("releasing an action link"))?;
        Ok(())
    }

    fn sweep_actions(&self, before: i64) -> Result<usize, StoreError> {
        self.conn()
            .execute("DELETE FROM actions WHERE expires_at < ?1", params![before])
            .map_err(self.err("removing expired action links"))
    }
}
