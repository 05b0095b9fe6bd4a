//! The PostgreSQL store, for several edges sharing one state: the same
//! [`Store`](super::Store) behaviour as the SQLite file, on a pool of
//! connections to one server.
//!
//! The store interface is synchronous (SQLite is), so each call runs its
//! queries to completion on this store's own small runtime: connections and
//! their I/O live there, and a caller on the daemon's runtime blocks on the
//! answer just as it blocks on SQLite's fsync. Every change and its audit
//! row commit in one transaction, and the commit carries a notification on
//! [`CHANGES_CHANNEL`] naming the audit row (the change sequence) and the
//! account, for the other edges.

use std::{path::PathBuf, time::Duration};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::config::SslMode;

use super::StoreError;

mod accounts;
mod drops;
mod import;
mod keys;
mod listen;
mod lists;
mod logs;
mod notify;
mod schema;

use schema::MIGRATIONS;

/// The channel every committed change is announced on, with the payload
/// `SEQ:ACCOUNT` (the audit row's id; the account is empty for
/// installation-wide changes).
pub const CHANGES_CHANNEL: &str = "allowlist_changes";

/// Serializes migrations across edges starting at once.
const MIGRATION_LOCK: i64 = 0x616c_6c6f_776c_6973;

/// How the store reaches its server, from `[store]`.
#[derive(Clone, Debug)]
pub struct PgOptions {
    /// `postgres://user:password@host:port/db?sslmode=...`
    pub url: String,
    /// PEM file of the CA that signs the server's certificate; the host's
    /// trust store when `None`.
    pub ca: Option<PathBuf>,
    /// Most connections this edge opens.
    pub pool: usize,
}

type Tx<'a> = deadpool_postgres::Transaction<'a>;

pub struct PgStore {
    /// The URL without its password: what errors and logs name.
    target: String,
    pool: Pool,
    rt: tokio::runtime::Runtime,
    /// For the change feed's own connection.
    cfg: tokio_postgres::Config,
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
    /// Usage-log days whose partition exists.
    log_days: logs::MadeDays,
}

/// A URL's host, port and database, without user or password.
fn redact(cfg: &tokio_postgres::Config) -> String {
    let host = cfg
        .get_hosts()
        .first()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(s) => s.clone(),
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .unwrap_or_default();
    let port = cfg.get_ports().first().copied().unwrap_or(5432);
    let db = cfg.get_dbname().unwrap_or("");
    format!("postgres://{host}:{port}/{db}")
}

fn tls_config(ca: Option<&std::path::Path>) -> Result<rustls::ClientConfig, String> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| format!("[store] ca {}: {e}", path.display()))?;
            for c in certs {
                let c = c.map_err(|e| format!("[store] ca {}: {e}", path.display()))?;
                roots
                    .add(c)
                    .map_err(|e| format!("[store] ca {}: {e}", path.display()))?;
            }
        }
        None => {
            for c in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(c);
            }
        }
    }
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

impl PgStore {
    /// Connects, checks the schema and brings it up to date. Fails with a
    /// message naming the server (never the password) when it cannot be
    /// reached or its schema is newer than this binary.
    pub fn open(opts: &PgOptions) -> Result<PgStore, StoreError> {
        let mut cfg: tokio_postgres::Config =
            opts.url.parse().map_err(|e| StoreError::Unavailable {
                target: "[store] url".into(),
                message: format!(
                    "not a PostgreSQL URL ({e}); write it like \
                     \"postgres://allowlist:PASSWORD@db.internal:5432/allowlist?sslmode=require\""
                ),
            })?;
        let target = redact(&cfg);
        if cfg.get_connect_timeout().is_none() {
            cfg.connect_timeout(Duration::from_secs(5));
        }
        cfg.keepalives_idle(Duration::from_secs(30));
        if cfg.get_application_name().is_none() {
            cfg.application_name("allowlistd");
        }
        let mgr_cfg = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let tls = if cfg.get_ssl_mode() == SslMode::Disable {
            None
        } else {
            let tls =
                tls_config(opts.ca.as_deref()).map_err(|message| StoreError::Unavailable {
                    target: target.clone(),
                    message,
                })?;
            Some(tokio_postgres_rustls::MakeRustlsConnect::new(tls))
        };
        let mgr = match &tls {
            None => Manager::from_config(cfg.clone(), tokio_postgres::NoTls, mgr_cfg),
            Some(t) => Manager::from_config(cfg.clone(), t.clone(), mgr_cfg),
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("allowlist-pg")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Unavailable {
                target: target.clone(),
                message: format!("cannot start the store's runtime: {e}"),
            })?;
        let pool = Pool::builder(mgr)
            .max_size(opts.pool.max(1))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_secs(10)))
            .create_timeout(Some(Duration::from_secs(6)))
            .recycle_timeout(Some(Duration::from_secs(5)))
            .build()
            .map_err(|e| StoreError::Unavailable {
                target: target.clone(),
                message: format!("cannot build the connection pool: {e}"),
            })?;
        let store = PgStore {
            target,
            pool,
            rt,
            cfg,
            tls,
            log_days: Default::default(),
        };
        store.migrate()?;
        Ok(store)
    }

    /// What errors and logs name: the server and database, no password.
    pub fn target(&self) -> &str {
        &self.target
    }

    fn migrate(&self) -> Result<(), StoreError> {
        let version = self.tx("migrating", async |tx| {
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
                .await?;
            tx.batch_execute(
                "CREATE TABLE IF NOT EXISTS allowlist_schema (version BIGINT NOT NULL)",
            )
            .await?;
            let row = tx
                .query_opt("SELECT version FROM allowlist_schema", &[])
                .await?;
            let version: i64 = match row {
                Some(r) => r.try_get(0)?,
                None => {
                    tx.execute("INSERT INTO allowlist_schema(version) VALUES (0)", &[])
                        .await?;
                    0
                }
            };
            if version as usize > MIGRATIONS.len() {
                return Ok(version);
            }
            for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
                tx.batch_execute(sql).await?;
                tx.execute(
                    "UPDATE allowlist_schema SET version = $1",
                    &[&((i + 1) as i64)],
                )
                .await?;
            }
            Ok(MIGRATIONS.len() as i64)
        })?;
        if version as usize > MIGRATIONS.len() {
            return Err(StoreError::Unavailable {
                target: self.target.clone(),
                message: format!(
                    "schema version {version} is newer than this allowlistd knows ({}); run the newer allowlistd",
                    MIGRATIONS.len()
                ),
            });
        }
        Ok(())
    }

    fn pg_err(&self, op: &'static str) -> impl FnOnce(tokio_postgres::Error) -> StoreError + '_ {
        move |source| {
            if source.is_closed() || source.as_db_error().is_none() && is_io(&source) {
                StoreError::Unavailable {
                    target: self.target.clone(),
                    message: format!(
                        "{op}: the connection to the server was lost ({})",
                        describe(&source)
                    ),
                }
            } else {
                StoreError::Postgres {
                    target: self.target.clone(),
                    op,
                    message: describe(&source),
                }
            }
        }
    }

    pub(super) fn corrupt(&self, column: &'static str, value: impl Into<String>) -> StoreError {
        StoreError::Corrupt {
            path: PathBuf::from(&self.target),
            column,
            value: value.into(),
        }
    }

    /// Runs `f` on a pooled connection, to completion, on the store's
    /// runtime.
    fn with<T>(
        &self,
        op: &'static str,
        f: impl AsyncFnOnce(&mut deadpool_postgres::Client) -> Result<T, tokio_postgres::Error>,
    ) -> Result<T, StoreError> {
        let _rt = self.rt.enter();
        futures_executor::block_on(async {
            let mut client = self.pool.get().await.map_err(|e| {
                let detail = match &e {
                    deadpool_postgres::PoolError::Backend(e) => describe(e),
                    e => e.to_string(),
                };
                StoreError::Unavailable {
                    target: self.target.clone(),
                    message: format!(
                        "{op}: cannot reach the PostgreSQL server ({detail}); is it running, and do \
                         [store] url's host, port, user and password match it?"
                    ),
                }
            })?;
            f(&mut client).await.map_err(self.pg_err(op))
        })
    }

    /// Runs `f` in one transaction, committed when it returns `Ok`.
    fn tx<T>(
        &self,
        op: &'static str,
        f: impl AsyncFnOnce(&Tx<'_>) -> Result<T, tokio_postgres::Error>,
    ) -> Result<T, StoreError> {
        self.with(op, async |c| {
            let tx = c.transaction().await?;
            let out = f(&tx).await?;
            tx.commit().await?;
            Ok(out)
        })
    }

    /// Writes an audit record in the change's own transaction and
    /// announces the change on commit; `account` is empty for
    /// installation-wide changes.
    async fn audit(
        tx: &Tx<'_>,
        account: &str,
        actor: &str,
        action: &str,
        detail: &serde_json::Value,
    ) -> Result<(), tokio_postgres::Error> {
        let row = tx
            .query_one(
                "INSERT INTO audit(at, account, actor, action, detail) VALUES ($1, $2, $3, $4, $5)
                 RETURNING id",
                &[
                    &super::unix_now(),
                    &account,
                    &actor,
                    &action,
                    &detail.to_string(),
                ],
            )
            .await?;
        let seq: i64 = row.try_get(0)?;
        tx.execute(
            "SELECT pg_notify($1, $2)",
            &[&CHANGES_CHANNEL, &format!("{seq}:{account}")],
        )
        .await?;
        Ok(())
    }
}

/// An error with what the server or the socket said: tokio-postgres'
/// own text is only its kind ("db error").
fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return match db.detail() {
            Some(d) => format!("{} ({d}) [{}]", db.message(), db.code().code()),
            None => format!("{} [{}]", db.message(), db.code().code()),
        };
    }
    let mut out = e.to_string();
    let mut src: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = src {
        out.push_str(": ");
        out.push_str(&s.to_string());
        src = s.source();
    }
    out
}

/// The condition selecting one account's rows (`cond`, on `$1`), or every
/// row. Two statements rather than `$1 IS NULL OR cond`, which the planner
/// answers with a scan of the whole table: an edge reloading one account
/// must read only that account's rows.
fn by_account(only: Option<&str>, cond: &'static str) -> &'static str {
    match only {
        Some(_) => cond,
        None => "$1::text IS NULL",
    }
}

fn is_io(e: &tokio_postgres::Error) -> bool {
    let mut src: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = src {
        if s.is::<std::io::Error>() {
            return true;
        }
        src = s.source();
    }
    false
}

/// Parses a stored mode string into its enum.
fn mode<T: serde::de::DeserializeOwned>(
    s: &PgStore,
    column: &'static str,
    v: String,
) -> Result<T, StoreError> {
    serde_json::from_value(serde_json::Value::String(v.clone())).map_err(|_| s.corrupt(column, v))
}
