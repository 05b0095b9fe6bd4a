//! Persistence. One source of truth for the daemon: everything the kernel
//! maps and the policy snapshot hold is rebuilt from here.
//!
//! [`Store`] is the one interface callers use; [`SqliteStore`] implements it
//! on one SQLite file in WAL mode with `synchronous=FULL`, so a change is on
//! disk before it is acknowledged and survives `kill -9` or a power cut.
//! Every change and its audit record commit in one transaction.

use std::{
    path::{Path, PathBuf},
    sync::Mutex,
    time::{SystemTime, UNIX_EPOCH},
};

use ipnet::IpNet;
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};

/// Current time in Unix seconds.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {path}: {op}: {source}")]
    Sqlite {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: rusqlite::Error,
    },
    #[error("store {path}: {message}")]
    Open { path: PathBuf, message: String },
    #[error(
        "store {path}: stored value {value:?} in {column} is not valid; the file was changed outside allowlistd"
    )]
    Corrupt {
        path: PathBuf,
        column: &'static str,
        value: String,
    },
}

/// Why a prefix is on the drop list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DropKind {
    /// `drop add` by an operator.
    Manual,
    /// `ips deny --drop`.
    Denied,
    /// Promoted automatically after repeated refusals.
    Auto,
    /// From an imported block list.
    Import,
}

impl DropKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DropKind::Manual => "manual",
            DropKind::Denied => "denied",
            DropKind::Auto => "auto",
            DropKind::Import => "import",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "manual" => DropKind::Manual,
            "denied" => DropKind::Denied,
            "auto" => DropKind::Auto,
            "import" => DropKind::Import,
            _ => return None,
        })
    }

    /// The kernel's reason code.
    pub fn code(self) -> u32 {
        use allowlist_common::*;
        match self {
            DropKind::Manual => REASON_MANUAL,
            DropKind::Denied => REASON_DENIED,
            DropKind::Auto => REASON_AUTO,
            DropKind::Import => REASON_IMPORT,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DropRecord {
    pub cidr: IpNet,
    pub kind: DropKind,
    /// Free text from the operator (`--reason`).
    pub reason: String,
    pub created_at: i64,
    /// Unix seconds; `None` = until removed.
    pub expires_at: Option<i64>,
    pub created_by: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ApiBlocking {
    Learning,
    Active,
    Inactive,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SmtpBlocking {
    Inactive,
    Active,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockingState {
    pub api: ApiBlocking,
    /// Unix seconds when the API mode last changed (installation time at
    /// first).
    pub api_since: i64,
    pub smtp: SmtpBlocking,
    pub smtp_since: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub at: i64,
    pub actor: String,
    pub action: String,
    pub detail: String,
}

/// The store interface; a PostgreSQL implementation can sit beside the
/// SQLite one without touching callers.
pub trait Store: Send + Sync {
    fn list_drops(&self) -> Result<Vec<DropRecord>, StoreError>;
    /// Inserts or replaces the entry for `rec.cidr`; returns the previous one.
    fn put_drop(&self, rec: &DropRecord, actor: &str) -> Result<Option<DropRecord>, StoreError>;
    fn remove_drop(&self, cidr: &IpNet, actor: &str) -> Result<Option<DropRecord>, StoreError>;
    /// Deletes entries whose expiry is at or before `now`, returning them.
    fn remove_expired_drops(&self, now: i64) -> Result<Vec<DropRecord>, StoreError>;
    fn blocking(&self) -> Result<BlockingState, StoreError>;
    fn audit_log(&self, limit: usize) -> Result<Vec<AuditEntry>, StoreError>;
}

/// Parses a `sqlite://` URL into a file path.
pub fn sqlite_path(url: &str) -> Result<PathBuf, String> {
    let Some(rest) = url.strip_prefix("sqlite://") else {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Err(format!(
                "{url:?}: the PostgreSQL store is not part of this build yet; use \
                 \"sqlite:///var/lib/allowlist/allowlist.db\""
            ));
        }
        return Err(format!(
            "{url:?} must start with sqlite://, like \"sqlite:///var/lib/allowlist/allowlist.db\""
        ));
    };
    if rest.is_empty() {
        return Err(format!(
            "{url:?} names no file, like \"sqlite:///var/lib/allowlist/allowlist.db\""
        ));
    }
    Ok(PathBuf::from(rest))
}

/// Schema migrations, applied in order; `PRAGMA user_version` records how
/// many have run. Append only.
const MIGRATIONS: &[&str] = &[
    // 1: drop list, blocking state, audit log.
    "CREATE TABLE drops (
        cidr TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        reason TEXT NOT NULL DEFAULT '',
        created_at INTEGER NOT NULL,
        expires_at INTEGER,
        created_by TEXT NOT NULL
    );
    CREATE INDEX drops_expires ON drops(expires_at) WHERE expires_at IS NOT NULL;
    CREATE TABLE settings (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    CREATE TABLE audit (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at INTEGER NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        detail TEXT NOT NULL
    );",
];

/// A `drops` row as read: cidr, kind, reason, created_at, expires_at,
/// created_by.
type DropRow = (String, String, String, i64, Option<i64>, String);

const DROP_COLUMNS: &str = "cidr, kind, reason, created_at, expires_at, created_by";

fn drop_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<DropRow> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
    ))
}

pub struct SqliteStore {
    path: PathBuf,
    conn: Mutex<Connection>,
}

impl SqliteStore {
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        if let Some(dir) = path.parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir).map_err(|e| StoreError::Open {
                path: path.to_path_buf(),
                message: format!("cannot create {}: {e}", dir.display()),
            })?;
        }
        let err = |op| {
            let path = path.to_path_buf();
            move |source| StoreError::Sqlite { path, op, source }
        };
        let mut conn = Connection::open(path).map_err(err("opening"))?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(err("setting busy timeout"))?;
        let mode: String = conn
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
            .map_err(err("enabling WAL"))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Open {
                path: path.to_path_buf(),
                message: format!(
                    "cannot enable WAL journaling (got {mode}); is the file on a network filesystem?"
                ),
            });
        }
        conn.execute_batch("PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON;")
            .map_err(err("setting pragmas"))?;
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(err("reading schema version"))?;
        if version as usize > MIGRATIONS.len() {
            return Err(StoreError::Open {
                path: path.to_path_buf(),
                message: format!(
                    "schema version {version} is newer than this allowlistd knows ({}); run the newer allowlistd",
                    MIGRATIONS.len()
                ),
            });
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let tx = conn.transaction().map_err(err("starting migration"))?;
            tx.execute_batch(sql).map_err(err("migrating"))?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)
                .map_err(err("migrating"))?;
            tx.commit().map_err(err("migrating"))?;
        }
        let store = SqliteStore {
            path: path.to_path_buf(),
            conn: Mutex::new(conn),
        };
        store.init_settings()?;
        Ok(store)
    }

    fn err(&self, op: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError + '_ {
        move |source| StoreError::Sqlite {
            path: self.path.clone(),
            op,
            source,
        }
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves SQLite itself consistent
        // (the transaction rolls back), so the poison can be ignored.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new installation starts in API learning mode, SMTP inactive.
    fn init_settings(&self) -> Result<(), StoreError> {
        let now = unix_now().to_string();
        let conn = self.conn();
        for (k, v) in [
            ("api_blocking", "learning"),
            ("api_since", now.as_str()),
            ("smtp_blocking", "inactive"),
            ("smtp_since", now.as_str()),
        ] {
            conn.execute(
                "INSERT OR IGNORE INTO settings(key, value) VALUES (?1, ?2)",
                params![k, v],
            )
            .map_err(self.err("initialising settings"))?;
        }
        Ok(())
    }

    fn row_to_drop(&self, row: DropRow) -> Result<DropRecord, StoreError> {
        let (cidr, kind, reason, created_at, expires_at, created_by) = row;
        let corrupt = |column, value: &str| StoreError::Corrupt {
            path: self.path.clone(),
            column,
            value: value.to_string(),
        };
        Ok(DropRecord {
            cidr: cidr.parse().map_err(|_| corrupt("drops.cidr", &cidr))?,
            kind: DropKind::parse(&kind).ok_or_else(|| corrupt("drops.kind", &kind))?,
            reason,
            created_at,
            expires_at,
            created_by,
        })
    }

    fn get_drop(conn: &Connection, cidr: &str) -> rusqlite::Result<Option<DropRow>> {
        conn.query_row(
            &format!("SELECT {DROP_COLUMNS} FROM drops WHERE cidr = ?1"),
            [cidr],
            drop_row,
        )
        .optional()
    }

    fn audit(
        tx: &Connection,
        actor: &str,
        action: &str,
        detail: &serde_json::Value,
    ) -> rusqlite::Result<()> {
        tx.execute(
            "INSERT INTO audit(at, actor, action, detail) VALUES (?1, ?2, ?3, ?4)",
            params![unix_now(), actor, action, detail.to_string()],
        )?;
        Ok(())
    }
}

impl Store for SqliteStore {
    fn list_drops(&self) -> Result<Vec<DropRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(&format!("SELECT {DROP_COLUMNS} FROM drops ORDER BY cidr"))
            .map_err(self.err("listing drops"))?;
        let rows = stmt
            .query_map([], drop_row)
            .map_err(self.err("listing drops"))?;
        let mut out = Vec::new();
        for row in rows {
            out.push(self.row_to_drop(row.map_err(self.err("listing drops"))?)?);
        }
        Ok(out)
    }

    fn put_drop(&self, rec: &DropRecord, actor: &str) -> Result<Option<DropRecord>, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(self.err("adding a drop"))?;
        let cidr = rec.cidr.to_string();
        let prev = Self::get_drop(&tx, &cidr).map_err(self.err("adding a drop"))?;
        tx.execute(
            "INSERT INTO drops(cidr, kind, reason, created_at, expires_at, created_by)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT(cidr) DO UPDATE SET kind = excluded.kind, reason = excluded.reason,
               created_at = excluded.created_at, expires_at = excluded.expires_at,
               created_by = excluded.created_by",
            params![
                cidr,
                rec.kind.as_str(),
                rec.reason,
                rec.created_at,
                rec.expires_at,
                rec.created_by
            ],
        )
        .map_err(self.err("adding a drop"))?;
        Self::audit(
            &tx,
            actor,
            "drop.add",
            &serde_json::to_value(rec).unwrap_or_default(),
        )
        .map_err(self.err("auditing"))?;
        tx.commit().map_err(self.err("committing"))?;
        drop(conn);
        prev.map(|row| self.row_to_drop(row)).transpose()
    }

    fn remove_drop(&self, cidr: &IpNet, actor: &str) -> Result<Option<DropRecord>, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(self.err("removing a drop"))?;
        let key = cidr.to_string();
        let Some(prev) = Self::get_drop(&tx, &key).map_err(self.err("removing a drop"))? else {
            return Ok(None);
        };
        tx.execute("DELETE FROM drops WHERE cidr = ?1", [&key])
            .map_err(self.err("removing a drop"))?;
        Self::audit(
            &tx,
            actor,
            "drop.remove",
            &serde_json::json!({ "cidr": key }),
        )
        .map_err(self.err("auditing"))?;
        tx.commit().map_err(self.err("committing"))?;
        drop(conn);
        self.row_to_drop(prev).map(Some)
    }

    fn remove_expired_drops(&self, now: i64) -> Result<Vec<DropRecord>, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(self.err("expiring drops"))?;
        let rows: Vec<(String, String, String, i64, Option<i64>, String)> = {
            let mut stmt = tx
                .prepare_cached(
                    "SELECT cidr, kind, reason, created_at, expires_at, created_by FROM drops
                     WHERE expires_at IS NOT NULL AND expires_at <= ?1",
                )
                .map_err(self.err("expiring drops"))?;
            let rows = stmt
                .query_map([now], drop_row)
                .map_err(self.err("expiring drops"))?;
            rows.collect::<Result<_, _>>()
                .map_err(self.err("expiring drops"))?
        };
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        tx.execute(
            "DELETE FROM drops WHERE expires_at IS NOT NULL AND expires_at <= ?1",
            [now],
        )
        .map_err(self.err("expiring drops"))?;
        let cidrs: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
        Self::audit(
            &tx,
            "allowlistd",
            "drop.expire",
            &serde_json::json!({ "cidrs": cidrs }),
        )
        .map_err(self.err("auditing"))?;
        tx.commit().map_err(self.err("committing"))?;
        drop(conn);
        rows.into_iter().map(|row| self.row_to_drop(row)).collect()
    }

    fn blocking(&self) -> Result<BlockingState, StoreError> {
        let conn = self.conn();
        let get = |k: &str| -> Result<String, StoreError> {
            conn.query_row("SELECT value FROM settings WHERE key = ?1", [k], |r| {
                r.get(0)
            })
            .map_err(self.err("reading settings"))
        };
        let corrupt = |column, value: String| StoreError::Corrupt {
            path: self.path.clone(),
            column,
            value,
        };
        let api = get("api_blocking")?;
        let smtp = get("smtp_blocking")?;
        let api_since = get("api_since")?;
        let smtp_since = get("smtp_since")?;
        Ok(BlockingState {
            api: serde_json::from_value(serde_json::Value::String(api.clone()))
                .map_err(|_| corrupt("settings.api_blocking", api))?,
            api_since: api_since
                .parse()
                .map_err(|_| corrupt("settings.api_since", api_since))?,
            smtp: serde_json::from_value(serde_json::Value::String(smtp.clone()))
                .map_err(|_| corrupt("settings.smtp_blocking", smtp))?,
            smtp_since: smtp_since
                .parse()
                .map_err(|_| corrupt("settings.smtp_since", smtp_since))?,
        })
    }

    fn audit_log(&self, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached("SELECT at, actor, action, detail FROM audit ORDER BY id DESC LIMIT ?1")
            .map_err(self.err("reading the audit log"))?;
        let rows = stmt
            .query_map([limit as i64], |r| {
                Ok(AuditEntry {
                    at: r.get(0)?,
                    actor: r.get(1)?,
                    action: r.get(2)?,
                    detail: r.get(3)?,
                })
            })
            .map_err(self.err("reading the audit log"))?;
        rows.collect::<Result<_, _>>()
            .map_err(self.err("reading the audit log"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(cidr: &str, expires_at: Option<i64>) -> DropRecord {
        DropRecord {
            cidr: cidr.parse().unwrap(),
            kind: DropKind::Manual,
            reason: "test".into(),
            created_at: 1,
            expires_at,
            created_by: "uid:0".into(),
        }
    }

    #[test]
    fn drops_round_trip_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/allowlist.db");
        {
            let s = SqliteStore::open(&path).unwrap();
            assert!(
                s.put_drop(&rec("192.0.2.0/24", None), "uid:0")
                    .unwrap()
                    .is_none()
            );
            assert!(
                s.put_drop(&rec("2001:db8::/48", Some(100)), "uid:0")
                    .unwrap()
                    .is_none()
            );
            let prev = s.put_drop(&rec("192.0.2.0/24", Some(50)), "uid:0").unwrap();
            assert_eq!(prev.unwrap().expires_at, None);
        }
        let s = SqliteStore::open(&path).unwrap();
        let all = s.list_drops().unwrap();
        assert_eq!(all.len(), 2);
        let expired = s.remove_expired_drops(60).unwrap();
        assert_eq!(expired.len(), 1);
        assert_eq!(expired[0].cidr.to_string(), "192.0.2.0/24");
        assert!(
            s.remove_drop(&"2001:db8::/48".parse().unwrap(), "uid:0")
                .unwrap()
                .is_some()
        );
        assert!(
            s.remove_drop(&"2001:db8::/48".parse().unwrap(), "uid:0")
                .unwrap()
                .is_none()
        );
        let audit = s.audit_log(10).unwrap();
        let actions: Vec<&str> = audit.iter().map(|a| a.action.as_str()).collect();
        assert_eq!(
            actions,
            [
                "drop.remove",
                "drop.expire",
                "drop.add",
                "drop.add",
                "drop.add"
            ]
        );
        let b = s.blocking().unwrap();
        assert_eq!(
            (b.api, b.smtp),
            (ApiBlocking::Learning, SmtpBlocking::Inactive)
        );
    }

    #[test]
    fn refuses_newer_schema_and_bad_urls() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.db");
        {
            let c = Connection::open(&path).unwrap();
            c.pragma_update(None, "user_version", 99).unwrap();
        }
        let e = SqliteStore::open(&path).err().unwrap().to_string();
        assert!(e.contains("newer"), "{e}");
        assert!(sqlite_path("sqlite://").is_err());
        assert!(
            sqlite_path("postgres://x")
                .unwrap_err()
                .contains("PostgreSQL")
        );
        assert_eq!(
            sqlite_path("sqlite:///var/a.db").unwrap(),
            PathBuf::from("/var/a.db")
        );
    }
}
