//! Reading the usage logs: newest first, filtered, streamed row by row
//! (a 10-million-row export holds one row at a time).

use std::path::Path;

use ipnet::IpNet;
use rusqlite::{Connection, OpenFlags, params};
use serde::{Deserialize, Serialize};

use super::{day_of_ms, parse_day_file};

/// Which rows to read. `account` is always set (a caller reads its own).
#[derive(Clone, Debug, Default)]
pub struct LogQuery {
    pub account: String,
    pub key: Option<String>,
    pub method: Option<String>,
    pub status: Option<u16>,
    pub reason: Option<String>,
    pub ip: Option<IpNet>,
    /// Unix ms, inclusive.
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
}

impl LogQuery {
    /// Whether a row's client passes the address filter (applied after
    /// the store's own filters: the client is stored as text).
    pub fn admits_client(&self, client: &str) -> bool {
        match &self.ip {
            None => true,
            Some(net) => client
                .parse::<std::net::IpAddr>()
                .is_ok_and(|a| net.contains(&crate::policy::normalize(a))),
        }
    }
}

/// One row as read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogRow {
    pub at_ms: i64,
    pub account: String,
    pub key_id: String,
    pub client: String,
    pub method: String,
    pub path: String,
    pub status: u16,
    pub reason: String,
    pub rule: String,
    pub latency_us: i64,
    pub bytes_in: i64,
    pub bytes_out: i64,
}

/// The CSV header, in the order of [`LogRow::csv`].
pub const CSV_HEADER: &str =
    "time,account,key_id,client,method,path,status,reason,rule,latency_us,bytes_in,bytes_out\r\n";

/// One RFC 4180 field: quoted when it holds a comma, quote, CR or LF.
fn field(out: &mut String, v: &str) {
    // A field a spreadsheet would run as a formula (a client chooses its
    // method and path) gets a leading quote.
    let formula = v.starts_with(['=', '+', '-', '@', '\t', '\r']);
    if formula || v.contains([',', '"', '\r', '\n']) {
        out.push('"');
        if formula {
            out.push('\'');
        }
        out.push_str(&v.replace('"', "\"\""));
        out.push('"');
    } else {
        out.push_str(v);
    }
}

impl LogRow {
    /// The row as one RFC 4180 record (CRLF-terminated); the time in RFC
    /// 3339 with milliseconds, UTC.
    pub fn csv(&self, out: &mut String) {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(self.at_ms.max(0) as u64);
        out.push_str(&humantime::format_rfc3339_millis(t).to_string());
        for v in [
            &self.account,
            &self.key_id,
            &self.client,
            &self.method,
            &self.path,
        ] {
            out.push(',');
            field(out, v);
        }
        out.push_str(&format!(",{},", self.status));
        field(out, &self.reason);
        out.push(',');
        field(out, &self.rule);
        out.push_str(&format!(
            ",{},{},{}\r\n",
            self.latency_us, self.bytes_in, self.bytes_out
        ));
    }
}

/// `GET /v1/logs/summary`: requests over time by status class, and
/// refusals by reason, for the rows a `LogsQuery` selects.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LogSummary {
    /// Unix ms: the range the buckets cover (`since` .. `until`).
    pub since_ms: i64,
    pub until_ms: i64,
    pub bucket_ms: i64,
    pub buckets: Vec<LogBucket>,
    /// Refused requests by reason, most first.
    pub refusals: Vec<ReasonCount>,
    pub total: u64,
}

/// Requests in one time bucket by status class.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogBucket {
    /// Unix ms of the bucket's start.
    pub at_ms: i64,
    pub s2xx: u64,
    pub s3xx: u64,
    pub s4xx: u64,
    pub s5xx: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReasonCount {
    pub reason: String,
    pub count: u64,
}

/// Folds grouped counts `(bucket, status, reason, client, n)` into a
/// [`LogSummary`]: shared by both log stores, which differ only in where
/// the groups come from.
pub struct SummaryFold {
    out: LogSummary,
    refusals: std::collections::HashMap<String, u64>,
    ip: Option<IpNet>,
}

impl SummaryFold {
    /// `buckets` equal slices of `since_ms..=until_ms` (both ends
    /// inclusive: a row at `until_ms` has a bucket).
    pub fn new(q: &LogQuery, (since_ms, until_ms): (i64, i64), buckets: usize) -> SummaryFold {
        let buckets = buckets.clamp(1, 500);
        let span = (until_ms - since_ms + 1).max(1);
        let bucket_ms = (span + buckets as i64 - 1) / buckets as i64;
        SummaryFold {
            out: LogSummary {
                since_ms,
                until_ms,
                bucket_ms,
                buckets: (0..buckets)
                    .map(|i| LogBucket {
                        at_ms: since_ms + i as i64 * bucket_ms,
                        ..LogBucket::default()
                    })
                    .collect(),
                ..LogSummary::default()
            },
            refusals: Default::default(),
            ip: q.ip,
        }
    }

    /// The query a store runs for the groups: `q` bounded to the range.
    pub fn query(&self, q: &LogQuery) -> LogQuery {
        LogQuery {
            since_ms: Some(self.out.since_ms),
            until_ms: Some(self.out.until_ms),
            ..q.clone()
        }
    }

    pub fn bucket_ms(&self) -> i64 {
        self.out.bucket_ms
    }

    /// The client is grouped on only when an address filter must see it.
    pub fn needs_client(&self) -> bool {
        self.ip.is_some()
    }

    pub fn add(&mut self, bucket: i64, status: u16, reason: String, client: &str, n: u64) {
        if let Some(net) = &self.ip
            && !client
                .parse::<std::net::IpAddr>()
                .is_ok_and(|a| net.contains(&crate::policy::normalize(a)))
        {
            return;
        }
        self.out.total += n;
        if let Some(b) = usize::try_from(bucket)
            .ok()
            .and_then(|i| self.out.buckets.get_mut(i))
        {
            match status / 100 {
                2 => b.s2xx += n,
                3 => b.s3xx += n,
                4 => b.s4xx += n,
                _ => b.s5xx += n,
            }
        }
        if reason != "ok" {
            *self.refusals.entry(reason).or_default() += n;
        }
    }

    pub fn finish(mut self) -> LogSummary {
        self.out.refusals = self
            .refusals
            .into_iter()
            .map(|(reason, count)| ReasonCount { reason, count })
            .collect();
        self.out
            .refusals
            .sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.reason.cmp(&b.reason)));
        self.out
    }
}

/// Counts what `q` selects in `buckets` equal slices of
/// `since_ms..=until_ms` by status class, and refusals by reason, with one
/// grouped query per day partition (the rows are never read one by one
/// unless an address filter asks for it).
pub fn summary(
    dir: &Path,
    q: &LogQuery,
    range: (i64, i64),
    buckets: usize,
) -> Result<LogSummary, String> {
    let mut fold = SummaryFold::new(q, range, buckets);
    let q = fold.query(q);
    let (since_ms, until_ms) = range;
    let bucket_ms = fold.bucket_ms();
    for path in partitions(dir, &q)? {
        let conn = open_partition(&path)?;
        let client = if fold.needs_client() { "client" } else { "''" };
        let sql = format!(
            "SELECT (at_ms - ?8) / ?9, status, reason, {client}, count(*)
               FROM requests
              WHERE account = ?1 AND at_ms >= ?2 AND at_ms <= ?3
                AND (?4 IS NULL OR key_id = ?4) AND (?5 IS NULL OR method = ?5)
                AND (?6 IS NULL OR status = ?6) AND (?7 IS NULL OR reason = ?7)
              GROUP BY 1, 2, 3, 4"
        );
        let mut stmt = match conn.prepare(&sql) {
            Ok(s) => s,
            Err(e) if e.to_string().contains("no such table") => continue,
            Err(e) => return Err(format!("reading {}: {e}", path.display())),
        };
        let rows = stmt
            .query_map(
                params![
                    q.account, since_ms, until_ms, q.key, q.method, q.status, q.reason, since_ms,
                    bucket_ms
                ],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, u16>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, String>(3)?,
                        r.get::<_, i64>(4)?,
                    ))
                },
            )
            .map_err(|e| format!("reading {}: {e}", path.display()))?;
        for row in rows {
            let (bucket, status, reason, client, n) =
                row.map_err(|e| format!("reading {}: {e}", path.display()))?;
            fold.add(bucket, status, reason, &client, n.max(0) as u64);
        }
    }
    Ok(fold.finish())
}

/// The day partitions `q`'s time range covers, newest first.
fn partitions(dir: &Path, q: &LogQuery) -> Result<Vec<std::path::PathBuf>, String> {
    let mut days: Vec<i64> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .flatten()
            .filter_map(|e| parse_day_file(e.file_name().to_str()?))
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(format!("reading {}: {e}", dir.display())),
    };
    let first = q.since_ms.map(day_of_ms).unwrap_or(i64::MIN);
    let last = q.until_ms.map(day_of_ms).unwrap_or(i64::MAX);
    days.retain(|d| (first..=last).contains(d));
    days.sort_unstable_by(|a, b| b.cmp(a));
    Ok(days
        .into_iter()
        .map(|d| dir.join(super::day_file(d)))
        .collect())
}

fn open_partition(path: &Path) -> Result<Connection, String> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| format!("opening {}: {e}", path.display()))?;
    let _ = conn.busy_timeout(std::time::Duration::from_secs(5));
    Ok(conn)
}

/// Calls `each` with every row `q` selects, newest first, until it returns
/// false. Reads only the day partitions the time range covers.
pub fn scan(dir: &Path, q: &LogQuery, mut each: impl FnMut(LogRow) -> bool) -> Result<(), String> {
    for path in partitions(dir, q)? {
        let conn = open_partition(&path)?;
        let stmt = conn.prepare(
            "SELECT at_ms, account, key_id, client, method, path, status, reason, rule,
                        latency_us, bytes_in, bytes_out
                 FROM requests
                 WHERE account = ?1 AND at_ms >= ?2 AND at_ms <= ?3
                   AND (?4 IS NULL OR key_id = ?4) AND (?5 IS NULL OR method = ?5)
                   AND (?6 IS NULL OR status = ?6) AND (?7 IS NULL OR reason = ?7)
                 ORDER BY at_ms DESC, rowid DESC",
        );
        let mut stmt = match stmt {
            Ok(s) => s,
            // The writer has just created today's file and not yet its
            // table: nothing to read there yet.
            Err(e) if e.to_string().contains("no such table") => continue,
            Err(e) => return Err(format!("reading {}: {e}", path.display())),
        };
        let rows = stmt
            .query_map(
                params![
                    q.account,
                    q.since_ms.unwrap_or(i64::MIN),
                    q.until_ms.unwrap_or(i64::MAX),
                    q.key,
                    q.method,
                    q.status,
                    q.reason
                ],
                |r| {
                    Ok(LogRow {
                        at_ms: r.get(0)?,
                        account: r.get(1)?,
                        key_id: r.get(2)?,
                        client: r.get(3)?,
                        method: r.get(4)?,
                        path: r.get(5)?,
                        status: r.get(6)?,
                        reason: r.get(7)?,
                        rule: r.get(8)?,
                        latency_us: r.get(9)?,
                        bytes_in: r.get(10)?,
                        bytes_out: r.get(11)?,
                    })
                },
            )
            .map_err(|e| format!("reading {}: {e}", path.display()))?;
        for row in rows {
            let row = row.map_err(|e| format!("reading {}: {e}", path.display()))?;
            if !q.admits_client(&row.client) {
                continue;
            }
            if !each(row) {
                return Ok(());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_quotes_what_needs_quoting() {
        let row = LogRow {
            at_ms: 1_764_460_800_123,
            account: "acme".into(),
            key_id: "k".into(),
            client: "192.0.2.1".into(),
            method: "GET".into(),
            path: "/a,\"b\"".into(),
            status: 403,
            reason: "key_allowlist".into(),
            rule: "key allowlist: no entry matched".into(),
            latency_us: 12,
            bytes_in: 0,
            bytes_out: 99,
        };
        let mut s = String::new();
        let mut formula = row.clone();
        formula.method = "=1+1".into();
        formula.path = "-2+3".into();
        formula.csv(&mut s);
        assert!(s.contains(",\"'=1+1\",\"'-2+3\","), "{s}");
        s.clear();
        row.csv(&mut s);
        assert_eq!(
            s,
            "2025-11-30T00:00:00.123Z,acme,k,192.0.2.1,GET,\"/a,\"\"b\"\"\",403,key_allowlist,key allowlist: no entry matched,12,0,99\r\n"
        );
    }

    #[test]
    fn a_partition_the_writer_has_not_filled_yet_reads_as_empty() {
        let dir = tempfile::tempdir().unwrap();
        // Created, no table yet: what a reader can meet at midnight.
        std::fs::write(dir.path().join(crate::logs::day_file(20_000)), b"").unwrap();
        let mut n = 0;
        scan(dir.path(), &LogQuery::default(), |_| {
            n += 1;
            true
        })
        .unwrap();
        assert_eq!(n, 0);
    }

    #[test]
    fn the_summary_counts_by_bucket_class_and_reason() {
        let dir = tempfile::tempdir().unwrap();
        let day = 20_000;
        let base = day * 86_400_000;
        let conn = Connection::open(dir.path().join(crate::logs::day_file(day))).unwrap();
        conn.execute_batch(crate::logs::day_files::SCHEMA).unwrap();
        let rows = [
            (0, "acme", "192.0.2.1", 200, "ok"),
            (10, "acme", "192.0.2.1", 200, "ok"),
            (999, "acme", "192.0.2.2", 403, "key_allowlist"),
            (1_000, "acme", "198.51.100.1", 403, "key_allowlist"),
            (1_500, "acme", "198.51.100.1", 429, "rate_limited"),
            (1_999, "acme", "198.51.100.1", 502, "ok"),
            (1_000, "other", "192.0.2.1", 200, "ok"),
            // Past `until`: left out.
            (2_001, "acme", "192.0.2.1", 200, "ok"),
        ];
        for (at, account, client, status, reason) in rows {
            conn.execute(
                "INSERT INTO requests VALUES (?1, ?2, 'k', ?3, 'GET', '/', ?4, ?5, '', 1, 0, 0)",
                params![base + at, account, client, status, reason],
            )
            .unwrap();
        }
        let q = LogQuery {
            account: "acme".into(),
            ..LogQuery::default()
        };
        let s = summary(dir.path(), &q, (base, base + 1_999), 2).unwrap();
        assert_eq!(s.bucket_ms, 1_000);
        assert_eq!(s.total, 6);
        let classes: Vec<[u64; 4]> = s
            .buckets
            .iter()
            .map(|b| [b.s2xx, b.s3xx, b.s4xx, b.s5xx])
            .collect();
        assert_eq!(classes, [[2, 0, 1, 0], [0, 0, 2, 1]]);
        assert_eq!(
            s.refusals,
            [
                ReasonCount {
                    reason: "key_allowlist".into(),
                    count: 2
                },
                ReasonCount {
                    reason: "rate_limited".into(),
                    count: 1
                },
            ]
        );
        // An address filter sees the client of every row.
        let q = LogQuery {
            ip: Some("198.51.100.0/24".parse().unwrap()),
            ..q
        };
        let s = summary(dir.path(), &q, (base, base + 1_999), 2).unwrap();
        assert_eq!(s.total, 3);
        assert_eq!(
            s.buckets[0],
            LogBucket {
                at_ms: base,
                ..LogBucket::default()
            }
        );
    }
}
