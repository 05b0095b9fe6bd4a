//! Persistence. One source of truth for the daemon: everything the kernel
//! maps and the policy snapshot hold is rebuilt from here.
//!
//! [`Store`] is the one interface callers use; [`SqliteStore`] implements it
//! on one SQLite file in WAL mode with `synchronous=FULL`, so a change is on
//! disk before it is acknowledged and survives `kill -9` or a power cut.
//! Every change and its audit record commit in one transaction.

use std::{
    path::PathBuf,
    time::{SystemTime, UNIX_EPOCH},
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::policy::{ApiMode, KeyStatus, RateLimit, Scope, SmtpMode};

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

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockingState {
    pub api: ApiMode,
    /// Unix seconds when the API mode last changed (installation time at
    /// first).
    pub api_since: i64,
    pub smtp: SmtpMode,
    pub smtp_since: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub at: i64,
    pub actor: String,
    pub action: String,
    pub detail: String,
}

/// Which audit entries to read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuditQuery {
    /// Unix seconds: entries at or after.
    pub since: Option<i64>,
    /// Exactly this actor (`uid:0`, `learning`, `promotion` ...).
    pub actor: Option<String>,
    pub limit: usize,
}

/// One entry of a key's own allowlist.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllowRecord {
    pub cidr: IpNet,
    #[serde(default)]
    pub label: String,
}

/// An API key as stored (the secret only as its hash).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyRecord {
    /// Numeric id, used in kernel maps; assigned by the store.
    pub kid: u32,
    /// Public id, shown everywhere.
    pub id: String,
    pub name: String,
    pub description: String,
    pub scopes: Vec<Scope>,
    pub status: KeyStatus,
    pub secret_hash: [u8; 32],
    /// The previous secret's hash and when it stops working (Unix ms).
    pub previous: Option<([u8; 32], i64)>,
    pub rate: Option<RateLimit>,
    pub created_at: i64,
    pub last_used_ms: Option<i64>,
    /// Unix day the `requests_today` count belongs to.
    pub requests_day: i64,
    pub requests_today: i64,
    pub allow: Vec<AllowRecord>,
}

/// An entry of the account's authorized list.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthorizedRecord {
    pub cidr: IpNet,
    pub label: String,
    /// "manual", "learned" or "unauthorized" (authorized from that list).
    pub source: String,
    /// The key whose call caused a learned entry.
    pub key_id: Option<String>,
    pub created_at: i64,
}

/// A refused source.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnauthorizedRecord {
    pub addr: std::net::IpAddr,
    /// "api" or "smtp".
    pub service: String,
    /// The key used (API); empty for SMTP.
    pub key_id: String,
    /// The port (SMTP); 0 for API.
    pub port: u16,
    pub first_seen: i64,
    pub last_seen: i64,
    pub attempts: i64,
    /// "refused" or "denied".
    pub status: String,
}

impl UnauthorizedRecord {
    /// A source refused for the first time at `at` (no attempt counted
    /// yet: see [`UnauthorizedRecord::hit`]).
    pub fn refused(
        addr: std::net::IpAddr,
        service: &str,
        key_id: String,
        port: u16,
        at: i64,
    ) -> Self {
        UnauthorizedRecord {
            addr,
            service: service.into(),
            key_id,
            port,
            first_seen: at,
            last_seen: at,
            attempts: 0,
            status: "refused".into(),
        }
    }

    /// One more refusal at `at`.
    pub fn hit(&mut self, at: i64) {
        self.last_seen = self.last_seen.max(at);
        self.attempts += 1;
    }
}

/// The store interface; a PostgreSQL implementation can sit beside the
/// SQLite one without touching callers.
pub trait Store: Send + Sync {
    /// Inserts a key (its `kid` is assigned here) and returns it.
    fn create_key(&self, key: &KeyRecord, actor: &str) -> Result<KeyRecord, StoreError>;
    fn list_keys(&self) -> Result<Vec<KeyRecord>, StoreError>;
    /// Replaces a key's row and allowlist; `action` names it in the audit log.
    fn update_key(
        &self,
        key: &KeyRecord,
        action: &str,
        detail: serde_json::Value,
        actor: &str,
    ) -> Result<(), StoreError>;
    /// Adds usage counted in memory: `(kid, last used ms, requests)`.
    fn flush_usage(&self, usage: &[(u32, i64, u64)], today: i64) -> Result<(), StoreError>;
    fn list_authorized(&self) -> Result<Vec<AuthorizedRecord>, StoreError>;
    /// Adds an entry; false when the prefix is already listed.
    fn add_authorized(&self, rec: &AuthorizedRecord, actor: &str) -> Result<bool, StoreError>;
    fn remove_authorized(
        &self,
        cidr: &IpNet,
        actor: &str,
    ) -> Result<Option<AuthorizedRecord>, StoreError>;
    /// Records refusals (one upsert per source/key/port), batched, then
    /// keeps at most `cap` entries per service by evicting the least recent
    /// (denied entries are never evicted: they are enforced). Returns how
    /// many were evicted.
    fn record_unauthorized(
        &self,
        hits: &[UnauthorizedRecord],
        cap: usize,
    ) -> Result<u64, StoreError>;
    fn list_unauthorized(&self) -> Result<Vec<UnauthorizedRecord>, StoreError>;
    /// Marks (or, with `None`, removes) every unauthorized entry of `addr`.
    fn set_unauthorized(
        &self,
        addr: std::net::IpAddr,
        status: Option<&str>,
        actor: &str,
    ) -> Result<usize, StoreError>;
    /// Sets the API or SMTP blocking mode ("api"/"smtp", serialized mode).
    fn set_blocking(
        &self,
        service: &str,
        mode: &str,
        actor: &str,
        now: i64,
    ) -> Result<(), StoreError>;
    /// Unix seconds of the latest learned address (installation time at first).
    fn last_learned_at(&self) -> Result<i64, StoreError>;

    fn list_drops(&self) -> Result<Vec<DropRecord>, StoreError>;
    /// Inserts or replaces the entry for `rec.cidr`; returns the previous one.
    fn put_drop(&self, rec: &DropRecord, actor: &str) -> Result<Option<DropRecord>, StoreError>;
    fn remove_drop(&self, cidr: &IpNet, actor: &str) -> Result<Option<DropRecord>, StoreError>;
    /// Deletes entries whose expiry is at or before `now`, returning them.
    fn remove_expired_drops(&self, now: i64) -> Result<Vec<DropRecord>, StoreError>;
    fn blocking(&self) -> Result<BlockingState, StoreError>;
    /// Audit entries, newest first, filtered by `q`.
    fn audit_log(&self, q: &AuditQuery) -> Result<Vec<AuditEntry>, StoreError>;
}

mod migrations;
mod sqlite;

pub use sqlite::SqliteStore;

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
