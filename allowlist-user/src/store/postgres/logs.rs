//! The usage log shared by every edge on one server: one table partitioned
//! by day (retention drops whole partitions, never a `DELETE` over
//! millions of rows), written in array inserts, read through a portal a
//! few thousand rows at a time (an export of millions of rows holds one
//! page).

use std::collections::{BTreeMap, HashSet};

use super::PgStore;
use crate::logs::{LogQuery, LogRecord, LogRow, LogStore, LogSummary, SummaryFold, day_of_ms};

/// Rows per insert statement and per page read.
const CHUNK: usize = 5_000;

const FILTERS: &str = "account = $1 AND at_ms >= $2 AND at_ms <= $3 AND day >= $4 AND day <= $5
    AND ($6::text IS NULL OR key_id = $6) AND ($7::text IS NULL OR method = $7)
    AND ($8::int IS NULL OR status = $8) AND ($9::text IS NULL OR reason = $9)";

/// The partition of Unix day `day`: a number, so the name needs no quoting.
fn partition(day: i64) -> String {
    format!("usage_log_d{day}")
}

/// `q`'s filters as parameters `$1`..`$9` of [`FILTERS`].
struct Params {
    since: i64,
    until: i64,
    first_day: i64,
    last_day: i64,
    status: Option<i32>,
}

impl Params {
    fn of(q: &LogQuery) -> Params {
        let since = q.since_ms.unwrap_or(i64::MIN);
        let until = q.until_ms.unwrap_or(i64::MAX);
        Params {
            since,
            until,
            first_day: q.since_ms.map(day_of_ms).unwrap_or(i64::MIN),
            last_day: q.until_ms.map(day_of_ms).unwrap_or(i64::MAX),
            status: q.status.map(i32::from),
        }
    }
}

impl PgStore {
    /// Makes the partitions of `days` that do not exist yet. Edges making
    /// the same day at once take turns on an advisory lock.
    async fn ensure_days(
        &self,
        c: &mut deadpool_postgres::Client,
        days: &[i64],
    ) -> Result<(), tokio_postgres::Error> {
        let missing: Vec<i64> = {
            let made = self.log_days.lock().unwrap_or_else(|p| p.into_inner());
            days.iter().copied().filter(|d| !made.contains(d)).collect()
        };
        for day in missing {
            let tx = c.transaction().await?;
            tx.execute(
                "SELECT pg_advisory_xact_lock(hashtext('usage_log'), $1::int)",
                &[&(day as i32)],
            )
            .await?;
            tx.batch_execute(&format!(
                "CREATE TABLE IF NOT EXISTS {} PARTITION OF usage_log FOR VALUES IN ({day})",
                partition(day)
            ))
            .await?;
            tx.commit().await?;
            self.log_days
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(day);
        }
        Ok(())
    }
}

fn texts(r: &LogRecord) -> (String, String) {
    let rule = match &r.rule {
        Some(x) => x.to_string(),
        None => r.note.to_string(),
    };
    let client = r.client.map(|c| c.to_string()).unwrap_or_default();
    (rule, client)
}

impl LogStore for PgStore {
    fn write(&self, batch: &[LogRecord]) -> Result<(), String> {
        let mut days: Vec<i64> = batch.iter().map(|r| day_of_ms(r.at_ms)).collect();
        days.sort_unstable();
        days.dedup();
        self.with("writing usage logs", async |c| {
            self.ensure_days(c, &days).await?;
            let tx = c.transaction().await?;
            let stmt = tx
                .prepare(
                    "INSERT INTO usage_log(day, at_ms, account, key_id, client, method, path, status,
                       reason, rule, latency_us, bytes_in, bytes_out)
                     SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::text[], $5::text[],
                       $6::text[], $7::text[], $8::int[], $9::text[], $10::text[], $11::bigint[],
                       $12::bigint[], $13::bigint[])",
                )
                .await?;
            for chunk in batch.chunks(CHUNK) {
                let (rules, clients): (Vec<String>, Vec<String>) = chunk.iter().map(texts).unzip();
                let day: Vec<i64> = chunk.iter().map(|r| day_of_ms(r.at_ms)).collect();
                let at: Vec<i64> = chunk.iter().map(|r| r.at_ms).collect();
                let account: Vec<&str> = chunk.iter().map(|r| r.account.as_ref()).collect();
                let key: Vec<&str> = chunk.iter().map(|r| r.key_id.as_str()).collect();
                let method: Vec<&str> = chunk.iter().map(|r| r.method.as_ref()).collect();
                let path: Vec<&str> = chunk.iter().map(|r| r.path.as_str()).collect();
                let status: Vec<i32> = chunk.iter().map(|r| i32::from(r.status)).collect();
                let reason: Vec<&str> = chunk.iter().map(|r| r.reason).collect();
                let latency: Vec<i64> = chunk.iter().map(|r| r.latency_us as i64).collect();
                let bytes_in: Vec<i64> = chunk.iter().map(|r| r.bytes_in as i64).collect();
                let bytes_out: Vec<i64> = chunk.iter().map(|r| r.bytes_out as i64).collect();
                tx.execute(
                    &stmt,
                    &[
                        &day, &at, &account, &key, &clients, &method, &path, &status, &reason,
                        &rules, &latency, &bytes_in, &bytes_out,
                    ],
                )
                .await?;
            }
            tx.commit().await
        })
        .map_err(|e| e.to_string())
    }

    fn sweep(&self, today: i64, retention_days: u32) {
        let oldest_kept = today - i64::from(retention_days);
        let r = self.with("removing old usage logs", async |c| {
            let names: Vec<String> = c
                .query(
                    "SELECT child.relname::text FROM pg_inherits
                       JOIN pg_class child ON child.oid = pg_inherits.inhrelid
                       JOIN pg_class parent ON parent.oid = pg_inherits.inhparent
                      WHERE parent.relname = 'usage_log'",
                    &[],
                )
                .await?
                .iter()
                .map(|r| r.try_get(0))
                .collect::<Result<_, _>>()?;
            let mut dropped = Vec::new();
            for name in names {
                let Some(day) = name
                    .strip_prefix("usage_log_d")
                    .and_then(|d| d.parse::<i64>().ok())
                else {
                    continue;
                };
                if day <= oldest_kept {
                    // Several edges sweep: whichever comes first drops it.
                    c.batch_execute(&format!("DROP TABLE IF EXISTS {}", partition(day)))
                        .await?;
                    dropped.push(day);
                }
            }
            Ok(dropped)
        });
        match r {
            Ok(dropped) => {
                let mut made = self.log_days.lock().unwrap_or_else(|p| p.into_inner());
                for day in dropped {
                    made.remove(&day);
                    tracing::info!(partition = %partition(day), "usage-log day past retention removed");
                }
            }
            Err(e) => tracing::warn!(error = %e, "removing old usage-log days"),
        }
    }

    fn scan(&self, q: &LogQuery, each: &mut dyn FnMut(LogRow) -> bool) -> Result<(), String> {
        let p = Params::of(q);
        self.with("reading usage logs", async |c| {
            let tx = c.transaction().await?;
            let stmt = tx
                .prepare(&format!(
                    "SELECT at_ms, account, key_id, client, method, path, status, reason, rule,
                            latency_us, bytes_in, bytes_out
                       FROM usage_log WHERE {FILTERS}
                      ORDER BY at_ms DESC, id DESC"
                ))
                .await?;
            let portal = tx
                .bind(
                    &stmt,
                    &[
                        &q.account,
                        &p.since,
                        &p.until,
                        &p.first_day,
                        &p.last_day,
                        &q.key,
                        &q.method,
                        &p.status,
                        &q.reason,
                    ],
                )
                .await?;
            loop {
                let rows = tx.query_portal(&portal, CHUNK as i32).await?;
                if rows.is_empty() {
                    break;
                }
                for r in &rows {
                    let status: i32 = r.try_get(6)?;
                    let row = LogRow {
                        at_ms: r.try_get(0)?,
                        account: r.try_get(1)?,
                        key_id: r.try_get(2)?,
                        client: r.try_get(3)?,
                        method: r.try_get(4)?,
                        path: r.try_get(5)?,
                        status: u16::try_from(status).unwrap_or(0),
                        reason: r.try_get(7)?,
                        rule: r.try_get(8)?,
                        latency_us: r.try_get(9)?,
                        bytes_in: r.try_get(10)?,
                        bytes_out: r.try_get(11)?,
                    };
                    if !q.admits_client(&row.client) {
                        continue;
                    }
                    if !each(row) {
                        return Ok(());
                    }
                }
            }
            Ok(())
        })
        .map_err(|e| e.to_string())
    }

    fn summary(
        &self,
        q: &LogQuery,
        range: (i64, i64),
        buckets: usize,
    ) -> Result<LogSummary, String> {
        let mut fold = SummaryFold::new(q, range, buckets);
        let bq = fold.query(q);
        let p = Params::of(&bq);
        let client = if fold.needs_client() {
            "client"
        } else {
            "''::text"
        };
        let bucket_ms = fold.bucket_ms();
        let rows = self
            .with("summarizing usage logs", async |c| {
                c.query(
                    &format!(
                        "SELECT (at_ms - $2) / $10, status, reason, {client}, count(*)
                           FROM usage_log WHERE {FILTERS}
                          GROUP BY 1, 2, 3, 4"
                    ),
                    &[
                        &bq.account,
                        &p.since,
                        &p.until,
                        &p.first_day,
                        &p.last_day,
                        &bq.key,
                        &bq.method,
                        &p.status,
                        &bq.reason,
                        &bucket_ms,
                    ],
                )
                .await
            })
            .map_err(|e| e.to_string())?;
        // Grouped by bucket first, so buckets fold in order.
        let mut groups: BTreeMap<i64, Vec<(u16, String, String, u64)>> = BTreeMap::new();
        for r in &rows {
            let get = |e: tokio_postgres::Error| e.to_string();
            let bucket: i64 = r.try_get(0).map_err(get)?;
            let status: i32 = r.try_get(1).map_err(get)?;
            let n: i64 = r.try_get(4).map_err(get)?;
            groups.entry(bucket).or_default().push((
                u16::try_from(status).unwrap_or(0),
                r.try_get(2).map_err(get)?,
                r.try_get(3).map_err(get)?,
                n.max(0) as u64,
            ));
        }
        for (bucket, rows) in groups {
            for (status, reason, client, n) in rows {
                fold.add(bucket, status, reason, &client, n);
            }
        }
        Ok(fold.finish())
    }
}

/// Days whose partition this edge knows exists.
pub(super) type MadeDays = std::sync::Mutex<HashSet<i64>>;
