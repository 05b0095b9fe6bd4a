//! The SQLite store: one file, WAL, `synchronous=FULL`; every change and
//! its audit record commit in one transaction before it is acknowledged.

use std::{
    path::{Path, PathBuf},
    sync::Mutex,
};

use rusqlite::{Connection, OptionalExtension, params};

use super::migrations::MIGRATIONS;
use super::*;

mod accounts;
mod drops;
mod import;
mod keys;
mod lists;
pub use import::Imported;
mod notify;

/// A `drops` row as read: cidr, kind, reason, created_at, expires_at,
/// created_by.
pub(super) type DropRow = (String, String, String, i64, Option<i64>, String);

pub(super) const DROP_COLUMNS: &str = "cidr, kind, reason, created_at, expires_at, created_by";

pub(super) fn drop_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<DropRow> {
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
        Ok(store)
    }

    pub(super) fn err(&self, op: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError + '_ {
        move |source| StoreError::Sqlite {
            path: self.path.clone(),
            op,
            source,
        }
    }

    pub(super) fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves SQLite itself consistent
        // (the transaction rolls back), so the poison can be ignored.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn row_to_drop(&self, row: DropRow) -> Result<DropRecord, StoreError> {
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

    pub(super) fn get_drop(conn: &Connection, cidr: &str) -> rusqlite::Result<Option<DropRow>> {
        conn.query_row(
            &format!("SELECT {DROP_COLUMNS} FROM drops WHERE cidr = ?1"),
            [cidr],
            drop_row,
        )
        .optional()
    }

    /// Writes an audit record in the change's own transaction; `account`
    /// is empty for installation-wide changes.
    pub(super) fn audit(
        tx: &Connection,
        account: &str,
        actor: &str,
        action: &str,
        detail: &serde_json::Value,
    ) -> rusqlite::Result<()> {
        tx.execute(
            "INSERT INTO audit(at, account, actor, action, detail) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![unix_now(), account, actor, action, detail.to_string()],
        )?;
        Ok(())
    }
}

impl SqliteStore {
    pub(super) fn corrupt(&self, column: &'static str, value: impl Into<String>) -> StoreError {
        StoreError::Corrupt {
            path: self.path.clone(),
            column,
            value: value.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            parse_url("postgres://u:p@db:5432/a").unwrap(),
            StoreUrl::Postgres("postgres://u:p@db:5432/a".into())
        );
        let e = parse_url("postgres://u:hunter2@db:notaport/a").unwrap_err();
        assert!(!e.contains("hunter2"), "{e}");
        assert!(parse_url("mysql://x").unwrap_err().contains("postgres://"));
        assert_eq!(
            sqlite_path("sqlite:///var/a.db").unwrap(),
            PathBuf::from("/var/a.db")
        );
    }
}
