//! This edge's own usage log: one SQLite file per day
//! (`requests-YYYY-MM-DD.db`), apart from the policy store and its lock.
//! Day files make retention a file deletion, never a `DELETE` over
//! millions of rows, and keep each file's index small.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Mutex,
    time::Duration,
};

use rusqlite::Connection;

use super::{
    LogQuery, LogRecord, LogRow, LogStore, LogSummary, day_file, day_of_ms, parse_day_file,
};

pub(super) const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS requests (
    at_ms INTEGER NOT NULL,
    account TEXT NOT NULL,
    key_id TEXT NOT NULL,
    client TEXT NOT NULL,
    method TEXT NOT NULL,
    path TEXT NOT NULL,
    status INTEGER NOT NULL,
    reason TEXT NOT NULL,
    rule TEXT NOT NULL,
    latency_us INTEGER NOT NULL,
    bytes_in INTEGER NOT NULL,
    bytes_out INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS requests_account_at ON requests(account, at_ms);";

/// Opens (creating) a day partition for writing. WAL with `synchronous =
/// NORMAL`: a usage log may lose its last batch on a power cut, never its
/// consistency, and is not the policy store.
pub(super) fn open_day(dir: &Path, day: i64) -> rusqlite::Result<Connection> {
    let conn = Connection::open(dir.join(day_file(day)))?;
    conn.busy_timeout(Duration::from_secs(5))?;
    conn.execute_batch("PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;")?;
    conn.execute_batch(SCHEMA)?;
    Ok(conn)
}

/// The day files in one folder.
pub struct DayFiles {
    dir: PathBuf,
    /// Open partitions (today's and yesterday's, kept between writes).
    open: Mutex<HashMap<i64, Connection>>,
}

impl DayFiles {
    /// The day files in `dir`, made if missing (for the writer).
    pub fn new(dir: PathBuf) -> std::io::Result<DayFiles> {
        std::fs::create_dir_all(&dir)?;
        Ok(DayFiles::at(dir))
    }

    /// The day files in `dir`, as they are (for reading: a missing folder
    /// reads as no rows).
    pub fn at(dir: PathBuf) -> DayFiles {
        DayFiles {
            dir,
            open: Mutex::new(HashMap::new()),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl LogStore for DayFiles {
    fn write(&self, batch: &[LogRecord]) -> Result<(), String> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        write(&self.dir, &mut open, batch)
    }

    fn sweep(&self, today: i64, retention_days: u32) {
        sweep(&self.dir, today, retention_days);
        self.open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|d, _| *d >= today - 1);
    }

    fn scan(&self, q: &LogQuery, each: &mut dyn FnMut(LogRow) -> bool) -> Result<(), String> {
        super::scan(&self.dir, q, each)
    }

    fn summary(
        &self,
        q: &LogQuery,
        range: (i64, i64),
        buckets: usize,
    ) -> Result<LogSummary, String> {
        super::summary(&self.dir, q, range, buckets)
    }
}

/// Deletes partitions older than the retention window (and their WAL).
fn sweep(dir: &Path, today: i64, retention_days: u32) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        let base = name
            .strip_suffix("-wal")
            .or_else(|| name.strip_suffix("-shm"))
            .unwrap_or(name);
        if let Some(day) = parse_day_file(base)
            && day <= today - i64::from(retention_days)
        {
            match std::fs::remove_file(e.path()) {
                Ok(()) => {
                    if base == name {
                        tracing::info!(file = name, "usage-log partition past retention removed");
                    }
                }
                Err(err) => {
                    tracing::warn!(file = name, error = %err, "removing an old usage-log partition")
                }
            }
        }
    }
}

/// Rows per multi-row INSERT: one statement step per 64 rows instead of
/// per row (12 x 64 parameters, far below SQLite's limit).
const CHUNK: usize = 64;

const COLUMNS: &str = "INSERT INTO requests(at_ms, account, key_id, client, method, path, status, reason, \
     rule, latency_us, bytes_in, bytes_out) VALUES ";

fn insert_sql(rows: usize) -> String {
    let one = "(?,?,?,?,?,?,?,?,?,?,?,?)";
    let mut sql = String::with_capacity(COLUMNS.len() + rows * (one.len() + 1));
    sql.push_str(COLUMNS);
    for i in 0..rows {
        if i > 0 {
            sql.push(',');
        }
        sql.push_str(one);
    }
    sql
}

/// Text columns formatted per row into buffers reused across rows (no
/// allocation per row once they have grown).
#[derive(Default)]
struct Texts {
    rule: Vec<String>,
    client: Vec<String>,
}

impl Texts {
    fn fill(&mut self, rows: &[LogRecord]) {
        use std::fmt::Write as _;
        if self.rule.len() < rows.len() {
            self.rule.resize(rows.len(), String::new());
            self.client.resize(rows.len(), String::new());
        }
        for (i, r) in rows.iter().enumerate() {
            let (rule, client) = (&mut self.rule[i], &mut self.client[i]);
            rule.clear();
            client.clear();
            let _ = match &r.rule {
                Some(x) => write!(rule, "{x}"),
                None => write!(rule, "{}", r.note),
            };
            if let Some(c) = r.client {
                let _ = write!(client, "{c}");
            }
        }
    }
}

/// Binds `rows` (and their formatted texts) to a statement of as many
/// rows, and runs it.
fn insert(
    stmt: &mut rusqlite::CachedStatement<'_>,
    rows: &[LogRecord],
    rule: &[String],
    client: &[String],
) -> rusqlite::Result<()> {
    let mut n = 0;
    let mut bind = |v: &dyn rusqlite::ToSql| {
        n += 1;
        stmt.raw_bind_parameter(n, v)
    };
    for (i, r) in rows.iter().enumerate() {
        bind(&r.at_ms)?;
        bind(&r.account.as_ref())?;
        bind(&r.key_id)?;
        bind(&client[i])?;
        bind(&r.method.as_ref())?;
        bind(&r.path)?;
        bind(&r.status)?;
        bind(&r.reason)?;
        bind(&rule[i])?;
        bind(&(r.latency_us as i64))?;
        bind(&(r.bytes_in as i64))?;
        bind(&(r.bytes_out as i64))?;
    }
    stmt.raw_execute().map(|_| ())
}

fn write(
    dir: &Path,
    open: &mut HashMap<i64, Connection>,
    batch: &[LogRecord],
) -> Result<(), String> {
    let mut by_day: HashMap<i64, Vec<&LogRecord>> = HashMap::new();
    for r in batch {
        by_day.entry(day_of_ms(r.at_ms)).or_default().push(r);
    }
    let mut texts = Texts::default();
    let mut failed = Vec::new();
    for (day, rows) in by_day {
        let rows: Vec<LogRecord> = rows.into_iter().cloned().collect();
        let result = (|| {
            let conn = match open.entry(day) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => e.insert(open_day(dir, day)?),
            };
            let tx = conn.transaction()?;
            for chunk in rows.chunks(CHUNK) {
                texts.fill(chunk);
                // Full chunks share one cached statement; the remainder
                // goes row by row, so at most two statements are cached.
                if chunk.len() == CHUNK {
                    let mut stmt = tx.prepare_cached(&insert_sql(CHUNK))?;
                    insert(&mut stmt, chunk, &texts.rule, &texts.client)?;
                } else {
                    let mut stmt = tx.prepare_cached(&insert_sql(1))?;
                    for (i, r) in chunk.iter().enumerate() {
                        insert(
                            &mut stmt,
                            std::slice::from_ref(r),
                            &texts.rule[i..=i],
                            &texts.client[i..=i],
                        )?;
                    }
                }
            }
            tx.commit()
        })();
        if let Err(e) = result {
            open.remove(&day);
            failed.push(format!("{}: {e}", day_file(day)));
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(failed.join("; "))
    }
}
