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

use crate::policy::{ApiMode, KeyStatus, RateLimit, Role, Scope, SmtpMode};

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
    #[error("store {target}: {op}: {message}")]
    Postgres {
        target: String,
        op: &'static str,
        message: String,
    },
    /// The server cannot be reached, or cannot be used (schema newer than
    /// this binary, bad URL): nothing was written.
    #[error("store {target}: {message}")]
    Unavailable { target: String, message: String },
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

    pub(crate) fn parse(s: &str) -> Option<Self> {
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
    /// The account the change concerned; empty for installation-wide
    /// changes (the drop list, operator tokens).
    #[serde(default)]
    pub account: String,
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
    /// Only this account's entries; `None` = every entry.
    pub account: Option<String>,
    pub limit: usize,
}

/// One entry of a key's own allowlist.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllowRecord {
    pub cidr: IpNet,
    #[serde(default)]
    pub label: String,
}

/// An account: a customer of the edge, owning its keys, lists and modes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountRecord {
    /// Numeric index, used in kernel maps; assigned by the store, never
    /// reused.
    pub idx: u32,
    pub name: String,
    /// The organization this account belongs to (one level).
    pub parent: Option<String>,
    /// Notification recipients.
    pub emails: Vec<String>,
    /// An organization that enforces blocking on its sub-accounts: while
    /// its own blocking is active, theirs is too and cannot be lowered.
    pub enforce_blocking: bool,
    pub created_at: i64,
    pub blocking: BlockingState,
    /// Unix seconds of the latest learned address (creation time at first):
    /// the learning clock.
    pub last_learned_at: i64,
}

/// An API key as stored (the secret only as its hash).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyRecord {
    /// Numeric id, used in kernel maps; assigned by the store.
    pub kid: u32,
    /// Public id, shown everywhere; unique across accounts.
    pub id: String,
    /// The account the key belongs to.
    pub account: String,
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

/// An entry of an account's authorized list.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthorizedRecord {
    pub cidr: IpNet,
    pub label: String,
    /// "manual", "learned" or "unauthorized" (authorized from that list).
    pub source: String,
    /// The key whose call caused a learned entry.
    pub key_id: Option<String>,
    pub created_at: i64,
    /// Who added it (an actor: `uid:N`, `token:ID`, `learning`).
    #[serde(default)]
    pub created_by: String,
    /// An organization's entry in force in every sub-account.
    #[serde(default)]
    pub shared: bool,
}

/// A refused source.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnauthorizedRecord {
    /// The account whose key (API) or SMTP service refused it.
    #[serde(default)]
    pub account: String,
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
        account: &str,
        addr: std::net::IpAddr,
        service: &str,
        key_id: String,
        port: u16,
        at: i64,
    ) -> Self {
        UnauthorizedRecord {
            account: account.into(),
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

/// An admin API bearer token (only the hash of its secret is stored).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenRecord {
    /// Public id (what the audit log names as `token:ID`).
    pub id: String,
    pub name: String,
    /// `None` for an operator token.
    pub account: Option<String>,
    pub role: Role,
    pub hash: [u8; 32],
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub revoked_at: Option<i64>,
    pub created_by: String,
}

/// Accounts and their blocking modes.
pub trait AccountStore {
    /// Every account, or the one named.
    fn accounts_named(&self, name: Option<&str>) -> Result<Vec<AccountRecord>, StoreError>;
    fn list_accounts(&self) -> Result<Vec<AccountRecord>, StoreError> {
        self.accounts_named(None)
    }
    /// Inserts an account (its `idx` is assigned here) and returns it.
    fn create_account(&self, rec: &AccountRecord, actor: &str)
    -> Result<AccountRecord, StoreError>;
    /// Replaces an account's row (e-mails, enforcement); `action` names it
    /// in the audit log.
    fn update_account(
        &self,
        rec: &AccountRecord,
        action: &str,
        detail: serde_json::Value,
        actor: &str,
    ) -> Result<(), StoreError>;
    /// Deletes an account with its keys and lists, in one transaction.
    fn remove_account(&self, name: &str, actor: &str) -> Result<(), StoreError>;
    /// Sets an account's API or SMTP blocking mode ("api"/"smtp",
    /// serialized mode).
    fn set_blocking(
        &self,
        account: &str,
        service: &str,
        mode: &str,
        actor: &str,
        now: i64,
    ) -> Result<(), StoreError>;
}

/// API keys and their usage counters.
pub trait KeyStore {
    /// A key number no key has had, from the store: with several edges on
    /// one store, each asks the store, so two never pick the same one.
    fn next_kid(&self) -> Result<u32, StoreError>;
    /// Inserts a key with its `kid` (from [`KeyStore::next_kid`]; 0 = the
    /// store picks one) and returns it.
    fn create_key(&self, key: &KeyRecord, actor: &str) -> Result<KeyRecord, StoreError>;
    /// Every key, or one account's, by kid.
    fn keys_of(&self, account: Option<&str>) -> Result<Vec<KeyRecord>, StoreError>;
    fn list_keys(&self) -> Result<Vec<KeyRecord>, StoreError> {
        self.keys_of(None)
    }
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
}

/// The accounts' authorized and unauthorized lists.
pub trait ListStore {
    /// Every account's authorized entries, as `(account, entry)`.
    /// Every account's authorized entries, or one account's, as
    /// `(account, entry)`.
    fn authorized_of(
        &self,
        account: Option<&str>,
    ) -> Result<Vec<(String, AuthorizedRecord)>, StoreError>;
    fn list_authorized(&self) -> Result<Vec<(String, AuthorizedRecord)>, StoreError> {
        self.authorized_of(None)
    }
    /// Adds an entry; false when the prefix is already listed.
    fn add_authorized(
        &self,
        account: &str,
        rec: &AuthorizedRecord,
        actor: &str,
    ) -> Result<bool, StoreError>;
    fn remove_authorized(
        &self,
        account: &str,
        cidr: &IpNet,
        actor: &str,
    ) -> Result<Option<AuthorizedRecord>, StoreError>;
    /// Adds many entries in one transaction with one audit row; prefixes
    /// already listed are skipped. Returns how many were added.
    fn add_authorized_many(
        &self,
        account: &str,
        recs: &[AuthorizedRecord],
        actor: &str,
    ) -> Result<usize, StoreError>;
    /// Adds hits counted in memory: `(account, entry, last seen ms, hits)`.
    fn flush_entry_usage(&self, usage: &[(String, IpNet, i64, u64)]) -> Result<(), StoreError>;
    /// An account's entries' hits and last use (Unix ms), as flushed.
    fn entry_usage(
        &self,
        account: &str,
    ) -> Result<std::collections::HashMap<IpNet, (u64, i64)>, StoreError>;
    /// Records refusals (one upsert per account/source/key/port), batched,
    /// then keeps at most `cap` entries per account and service by evicting
    /// the least recent (denied entries are never evicted: they are
    /// enforced). Returns how many were evicted.
    fn record_unauthorized(
        &self,
        hits: &[UnauthorizedRecord],
        cap: usize,
    ) -> Result<u64, StoreError>;
    /// One account's unauthorized list, or every account's.
    fn list_unauthorized(
        &self,
        account: Option<&str>,
    ) -> Result<Vec<UnauthorizedRecord>, StoreError>;
    /// Marks (or, with `None`, removes) every unauthorized entry of `addr`
    /// in `account`.
    fn set_unauthorized(
        &self,
        account: &str,
        addr: std::net::IpAddr,
        status: Option<&str>,
        actor: &str,
    ) -> Result<usize, StoreError>;
}

/// The kernel drop list (installation-wide).
pub trait DropStore {
    fn list_drops(&self) -> Result<Vec<DropRecord>, StoreError>;
    /// Inserts or replaces the entry for `rec.cidr`; returns the previous one.
    fn put_drop(&self, rec: &DropRecord, actor: &str) -> Result<Option<DropRecord>, StoreError>;
    /// Inserts or replaces many entries in one transaction with one audit
    /// row.
    fn put_drops(&self, recs: &[DropRecord], actor: &str) -> Result<(), StoreError>;
    fn remove_drop(&self, cidr: &IpNet, actor: &str) -> Result<Option<DropRecord>, StoreError>;
    /// Deletes entries whose expiry is at or before `now`, returning them.
    fn remove_expired_drops(&self, now: i64) -> Result<Vec<DropRecord>, StoreError>;
}

/// Admin API tokens and the audit log.
pub trait AccessStore {
    fn create_token(&self, rec: &TokenRecord, actor: &str) -> Result<(), StoreError>;
    fn list_tokens(&self) -> Result<Vec<TokenRecord>, StoreError>;
    /// Marks a token revoked at `now`; false when there is no such token.
    fn revoke_token(&self, id: &str, now: i64, actor: &str) -> Result<bool, StoreError>;
    /// Audit entries, newest first, filtered by `q`.
    fn audit_log(&self, q: &AuditQuery) -> Result<Vec<AuditEntry>, StoreError>;
}

/// A webhook an account registered for its own notifications.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebhookRecord {
    pub account: String,
    pub url: String,
    /// Keys the HMAC signature; never shown after it is set.
    pub secret: String,
    pub created_at: i64,
    pub created_by: String,
}

/// A one-click action link sent with a notification. Only the hash of its
/// token is stored; the links of one notification share a `group`, and
/// using one voids the others.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ActionRecord {
    pub hash: [u8; 32],
    /// Public id, the actor in the audit log (`action:ID`).
    pub id: String,
    pub group: String,
    pub account: String,
    /// "authorize", "deny_rotate" or "deactivate".
    pub action: String,
    pub addr: String,
    pub key_id: String,
    pub key_name: String,
    /// Shown on the confirmation page and required by the POST, so only a
    /// rendered page can act.
    pub nonce: String,
    pub created_at: i64,
    pub expires_at: i64,
    pub used_at: Option<i64>,
    /// The id of the link of this group that was used.
    pub used_by: Option<String>,
}

/// The outcome of claiming an action link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// Claimed now: its siblings are void.
    Claimed(ActionRecord),
    /// No link has this token.
    Unknown,
    /// It, or a sibling, was used already.
    Used(ActionRecord),
    Expired(ActionRecord),
    /// The nonce is not the one its page showed.
    BadNonce,
}

/// Notification settings an account keeps in the store, and action links.
pub trait NotifyStore {
    /// One account's webhooks, or every account's.
    fn list_webhooks(&self, account: Option<&str>) -> Result<Vec<WebhookRecord>, StoreError>;
    /// Adds or replaces (same account and URL) a webhook; true if replaced.
    fn put_webhook(&self, rec: &WebhookRecord, actor: &str) -> Result<bool, StoreError>;
    /// False when the account has no webhook at this URL.
    fn remove_webhook(&self, account: &str, url: &str, actor: &str) -> Result<bool, StoreError>;
    fn create_actions(&self, recs: &[ActionRecord]) -> Result<(), StoreError>;
    fn find_action(&self, hash: &[u8; 32]) -> Result<Option<ActionRecord>, StoreError>;
    /// In one transaction: checks that the link exists, that `nonce` is
    /// its page's, that neither it nor a sibling was used and that it has
    /// not expired at `now`, then marks the whole group used by it.
    fn claim_action(&self, hash: &[u8; 32], nonce: &str, now: i64) -> Result<Claim, StoreError>;
    /// Undoes a claim whose action then failed, so the link can be tried again.
    fn release_action(&self, group: &str) -> Result<(), StoreError>;
    /// Deletes links that expired before `before`; returns how many.
    fn sweep_actions(&self, before: i64) -> Result<usize, StoreError>;
}

/// What a shared store says about changes other edges made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreEvent {
    /// The feed is (again) listening; changes made while it was not were
    /// missed, so the edge must resync.
    Listening,
    /// A change was committed: its audit sequence number and account
    /// (empty for installation-wide changes: the drop list, operator
    /// tokens).
    Changed { seq: i64, account: String },
    /// The feed lost its connection; it keeps trying.
    Lost,
}

/// Changes made by other edges on the same store.
pub trait ChangeFeed {
    /// "sqlite" or "postgres".
    fn backend(&self) -> &'static str;
    /// The sequence number of the latest committed change (0 for a store
    /// no one else writes): an edge that has applied it has missed
    /// nothing.
    fn change_seq(&self) -> Result<i64, StoreError> {
        Ok(0)
    }
    /// Starts the feed; `None` when no one else writes this store (the
    /// SQLite file belongs to one edge).
    fn subscribe(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<StoreEvent>> {
        None
    }
}

impl ChangeFeed for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }
}

impl ChangeFeed for PgStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }
    fn change_seq(&self) -> Result<i64, StoreError> {
        self.latest_seq()
    }

    fn subscribe(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<StoreEvent>> {
        Some(self.start_feed())
    }
}

/// The store interface, one trait per room, implemented by the SQLite file
/// and by PostgreSQL.
pub trait Store:
    AccountStore
    + KeyStore
    + ListStore
    + DropStore
    + AccessStore
    + NotifyStore
    + ChangeFeed
    + Send
    + Sync
{
}

impl<T> Store for T where
    T: AccountStore
        + KeyStore
        + ListStore
        + DropStore
        + AccessStore
        + NotifyStore
        + ChangeFeed
        + Send
        + Sync
{
}

mod codec;
mod migrations;
mod postgres;
mod sqlite;

pub use postgres::{CHANGES_CHANNEL, PgOptions, PgStore};
pub use sqlite::{Imported, SqliteStore};

/// Which backend `[store] url` names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreUrl {
    /// The SQLite file.
    Sqlite(PathBuf),
    /// A PostgreSQL server (the URL as written, password included: never
    /// shown).
    Postgres(String),
}

const URL_EXAMPLES: &str = "\"sqlite:///var/lib/allowlist/allowlist.db\" or \
     \"postgres://allowlist:PASSWORD@db.internal:5432/allowlist?sslmode=require\"";

/// Parses `[store] url`. Errors never repeat a PostgreSQL URL (it may hold
/// a password).
pub fn parse_url(url: &str) -> Result<StoreUrl, String> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return match url.parse::<tokio_postgres::Config>() {
            Ok(_) => Ok(StoreUrl::Postgres(url.to_string())),
            Err(e) => Err(format!(
                "the postgres:// URL is not valid ({e}); write it like {URL_EXAMPLES}"
            )),
        };
    }
    let Some(rest) = url.strip_prefix("sqlite://") else {
        return Err(format!(
            "{url:?} must start with sqlite:// or postgres://, like {URL_EXAMPLES}"
        ));
    };
    if rest.is_empty() {
        return Err(format!("{url:?} names no file, like {URL_EXAMPLES}"));
    }
    Ok(StoreUrl::Sqlite(PathBuf::from(rest)))
}

/// The SQLite file a `sqlite://` URL names.
pub fn sqlite_path(url: &str) -> Result<PathBuf, String> {
    match parse_url(url)? {
        StoreUrl::Sqlite(p) => Ok(p),
        StoreUrl::Postgres(_) => Err("[store] url names a PostgreSQL server, not a file".into()),
    }
}
