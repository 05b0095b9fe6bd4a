//! Accounts' webhooks and the one-click action links of notifications.

use tokio_postgres::Row;

use super::PgStore;
use crate::store::{ActionRecord, Claim, NotifyStore, StoreError, WebhookRecord};

const ACTION_COLUMNS: &str = "hash, id, grp, account, action, addr, key_id, key_name, nonce, \
     created_at, expires_at, used_at, used_by";

fn action_row(r: &Row) -> Result<ActionRecord, tokio_postgres::Error> {
    let hash: Vec<u8> = r.try_get(0)?;
    Ok(ActionRecord {
        // A stored hash of another length cannot match any token; zeroes
        // keep the row readable (it is found by hash, so never served).
        hash: hash.try_into().unwrap_or([0; 32]),
        id: r.try_get(1)?,
        group: r.try_get(2)?,
        account: r.try_get(3)?,
        action: r.try_get(4)?,
        addr: r.try_get(5)?,
        key_id: r.try_get(6)?,
        key_name: r.try_get(7)?,
        nonce: r.try_get(8)?,
        created_at: r.try_get(9)?,
        expires_at: r.try_get(10)?,
        used_at: r.try_get(11)?,
        used_by: r.try_get(12)?,
    })
}

impl NotifyStore for PgStore {
    fn list_webhooks(&self, account: Option<&str>) -> Result<Vec<WebhookRecord>, StoreError> {
        self.with("listing webhooks", async |c| {
            c.query(
                "SELECT account, url, secret, created_at, created_by FROM webhooks
                 WHERE $1::text IS NULL OR account = $1 ORDER BY account, url",
                &[&account],
            )
            .await?
            .iter()
            .map(|r| {
                Ok(WebhookRecord {
                    account: r.try_get(0)?,
                    url: r.try_get(1)?,
                    secret: r.try_get(2)?,
                    created_at: r.try_get(3)?,
                    created_by: r.try_get(4)?,
                })
            })
            .collect()
        })
    }

    fn put_webhook(&self, rec: &WebhookRecord, actor: &str) -> Result<bool, StoreError> {
        self.tx("adding a webhook", async |tx| {
            let replaced = tx
                .execute(
                    "DELETE FROM webhooks WHERE account = $1 AND url = $2",
                    &[&rec.account, &rec.url],
                )
                .await?
                > 0;
            tx.execute(
                "INSERT INTO webhooks(account, url, secret, created_at, created_by)
                 VALUES ($1, $2, $3, $4, $5)",
                &[
                    &rec.account,
                    &rec.url,
                    &rec.secret,
                    &rec.created_at,
                    &rec.created_by,
                ],
            )
            .await?;
            // The secret stays out of the audit log.
            Self::audit(
                tx,
                &rec.account,
                actor,
                "webhook.add",
                &serde_json::json!({ "url": rec.url, "replaced": replaced }),
            )
            .await?;
            Ok(replaced)
        })
    }

    fn remove_webhook(&self, account: &str, url: &str, actor: &str) -> Result<bool, StoreError> {
        self.tx("removing a webhook", async |tx| {
            let n = tx
                .execute(
                    "DELETE FROM webhooks WHERE account = $1 AND url = $2",
                    &[&account, &url],
                )
                .await?;
            if n > 0 {
                Self::audit(
                    tx,
                    account,
                    actor,
                    "webhook.remove",
                    &serde_json::json!({ "url": url }),
                )
                .await?;
            }
            Ok(n > 0)
        })
    }

    fn create_actions(&self, recs: &[ActionRecord]) -> Result<(), StoreError> {
        self.tx("storing action links", async |tx| {
            let stmt = tx
                .prepare(&format!(
                    "INSERT INTO actions({ACTION_COLUMNS})
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, NULL, NULL)"
                ))
                .await?;
            for a in recs {
                tx.execute(
                    &stmt,
                    &[
                        &&a.hash[..],
                        &a.id,
                        &a.group,
                        &a.account,
                        &a.action,
                        &a.addr,
                        &a.key_id,
                        &a.key_name,
                        &a.nonce,
                        &a.created_at,
                        &a.expires_at,
                    ],
                )
                .await?;
            }
            Ok(())
        })
    }

    fn find_action(&self, hash: &[u8; 32]) -> Result<Option<ActionRecord>, StoreError> {
        self.with("reading an action link", async |c| {
            c.query_opt(
                &format!("SELECT {ACTION_COLUMNS} FROM actions WHERE hash = $1"),
                &[&&hash[..]],
            )
            .await?
            .map(|r| action_row(&r))
            .transpose()
        })
    }

    fn claim_action(&self, hash: &[u8; 32], nonce: &str, now: i64) -> Result<Claim, StoreError> {
        self.tx("claiming an action link", async |tx| {
            let Some(rec) = tx
                .query_opt(
                    &format!("SELECT {ACTION_COLUMNS} FROM actions WHERE hash = $1"),
                    &[&&hash[..]],
                )
                .await?
                .map(|r| action_row(&r))
                .transpose()?
            else {
                return Ok(Claim::Unknown);
            };
            // Lock the whole group: two edges claiming the same link, or
            // two of its siblings, must not both read "unused".
            let group = tx
                .query(
                    &format!("SELECT {ACTION_COLUMNS} FROM actions WHERE grp = $1 ORDER BY hash FOR UPDATE"),
                    &[&rec.group],
                )
                .await?;
            for r in &group {
                let a = action_row(r)?;
                if a.used_at.is_some() {
                    return Ok(Claim::Used(a));
                }
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
                "UPDATE actions SET used_at = $1, used_by = $2 WHERE grp = $3",
                &[&now, &rec.id, &rec.group],
            )
            .await?;
            Ok(Claim::Claimed(ActionRecord {
                used_at: Some(now),
                used_by: Some(rec.id.clone()),
                ..rec
            }))
        })
    }

    fn release_action(&self, group: &str) -> Result<(), StoreError> {
        self.with("releasing an action link", async |c| {
            c.execute(
                "UPDATE actions SET used_at = NULL, used_by = NULL WHERE grp = $1",
                &[&group],
            )
            .await
        })?;
        Ok(())
    }

    fn sweep_actions(&self, before: i64) -> Result<usize, StoreError> {
        let n = self.with("removing expired action links", async |c| {
            c.execute("DELETE FROM actions WHERE expires_at < $1", &[&before])
                .await
        })?;
        Ok(n as usize)
    }
}
