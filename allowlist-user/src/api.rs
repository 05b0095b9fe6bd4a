//! The admin API's request and response bodies, shared by the daemon and
//! `allowlistctl`, and the one JSON error shape.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::kernel::{FillLevels, KernelStats};
use crate::policy::{KeyStatus, Role, Scope};
use crate::store::{
    AccountRecord, AllowRecord, AuthorizedRecord, BlockingState, DropRecord, UnauthorizedRecord,
};

/// `{"error":{"code":"...","message":"..."}}`
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
}

/// Request bodies refuse unknown fields: a misspelt field must not
/// silently change what a request means.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddDrop {
    pub cidr: String,
    /// Like "90s", "10m", "24h", "7d"; none = until removed.
    #[serde(default)]
    pub ttl: Option<String>,
    #[serde(default)]
    pub reason: Option<String>,
}

/// `POST /v1/drop/import`: many drop entries in one change.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportDrops {
    pub entries: Vec<AddDrop>,
}

/// What a drop import did.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DropImportOutcome {
    /// Entries written (new ones, and existing ones replaced).
    pub written: usize,
    /// Entries on the drop list afterwards.
    pub total: usize,
}

/// `DELETE ...?cidr=` (query string).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CidrQuery {
    pub cidr: String,
}

/// `POST /v1/keys/{id}/rotate`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RotateKey {
    /// Like "1h"; none = the default 24 h, "0" = none.
    #[serde(default)]
    pub grace: Option<String>,
}

/// `POST /v1/keys/{id}/allow` and `POST /v1/ips`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AllowEntry {
    pub cidr: String,
    #[serde(default)]
    pub label: Option<String>,
}

/// `POST /v1/ips/deny`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Deny {
    pub addr: String,
    #[serde(default)]
    pub drop: bool,
    #[serde(default)]
    pub ttl: Option<String>,
    #[serde(default)]
    pub rotate_key: bool,
}

/// `POST /v1/blocking/api` and `/v1/blocking/smtp`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetMode {
    pub mode: String,
    #[serde(default)]
    pub force: bool,
}

/// `GET /v1/audit?since=&actor=&limit=`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    /// Unix seconds, an RFC 3339 time (`2026-11-30T09:00:00Z`) or a
    /// duration back from now (`24h`, `7d`).
    #[serde(default)]
    pub since: Option<String>,
    #[serde(default)]
    pub actor: Option<String>,
    /// At most this many entries (default 100, at most 10000).
    #[serde(default)]
    pub limit: Option<usize>,
}

/// The audit log, newest first.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Audit {
    pub entries: Vec<crate::store::AuditEntry>,
}

/// A body that carries nothing (`POST /v1/keys/{id}/revoke`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Empty {}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DropView {
    #[serde(flatten)]
    pub record: DropRecord,
    /// Seconds left, for entries with an expiry.
    pub expires_in: Option<i64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DropList {
    pub drops: Vec<DropView>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Stats {
    pub kernel_enabled: bool,
    /// Interface -> XDP mode in use ("driver", "generic", "adopted").
    pub interfaces: BTreeMap<String, String>,
    pub kernel: Option<KernelStats>,
    pub maps: Option<FillLevels>,
    /// Drop events read from the ring buffer since this daemon started.
    pub events_received: u64,
    pub drop_entries: usize,
    /// Unauthorized-list entries evicted (least recent first) to keep each
    /// service's list within `[blocking] unauthorized_max`.
    #[serde(default)]
    pub unauthorized_evicted: u64,
    /// Refusals not recorded: more distinct sources pending than the
    /// recorder holds between two writes.
    #[serde(default)]
    pub refusals_dropped: u64,
    #[serde(default)]
    pub api_guard: ApiGuardState,
    #[serde(default)]
    pub store: StoreStatus,
}

/// The store as this edge sees it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StoreStatus {
    /// "sqlite" or "postgres".
    pub backend: String,
    pub reachable: bool,
    /// Unix ms since when it cannot be reached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub down_since_ms: Option<i64>,
    /// Refusals waiting to be recorded.
    pub queued_refusals: usize,
    /// Refusals not kept while it was away (the queue was full).
    pub queue_dropped: u64,
    /// Unix ms of the last resync from a shared store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_resync_ms: Option<i64>,
}

/// Whether the XDP guard covers the API port, and why.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ApiGuardState {
    /// `[kernel] api_guard`: auto, on, off.
    pub mode: String,
    pub armed: bool,
    pub reason: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Blocking {
    pub account: String,
    #[serde(flatten)]
    pub state: BlockingState,
    /// The modes in force, when an organization enforces blocking.
    pub api_in_force: crate::policy::ApiMode,
    pub smtp_in_force: crate::policy::SmtpMode,
    /// The organization enforcing blocking on this account, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enforced_by: Option<String>,
    /// When learning: days until blocking activates by itself if no new
    /// address is learned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activates_in_days: Option<i64>,
    /// `[blocking] always_allow`: never blocked or dropped.
    pub always_allow: Vec<String>,
    pub learning_days: u32,
    pub smtp_ports: Vec<u16>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KernelEvent {
    /// Unix seconds (converted from the kernel's monotonic time).
    pub at: f64,
    pub source: String,
    pub verdict: String,
    pub reason: String,
    pub port: u16,
    pub protocol: u8,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Events {
    pub events: Vec<KernelEvent>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewKey {
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub scopes: Vec<String>,
    /// `CIDR` or `CIDR=LABEL`.
    #[serde(default)]
    pub allow: Vec<String>,
    #[serde(default)]
    pub rate: Option<String>,
}

/// A key as the admin API shows it (never the secret, except `key` once).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KeyView {
    pub id: String,
    pub account: String,
    pub name: String,
    pub description: String,
    pub scopes: Vec<Scope>,
    pub status: KeyStatus,
    pub rate: Option<String>,
    pub allow: Vec<AllowRecord>,
    pub created_at: i64,
    pub last_used_at: Option<i64>,
    pub requests_today: i64,
    /// Unix seconds when the previous secret stops working, while rotating.
    pub previous_secret_expires_at: Option<i64>,
    /// The plaintext key: only in the answer to `create` and `rotate`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KeyList {
    pub keys: Vec<KeyView>,
}

/// An authorized-list entry as an account sees it: its own, or one its
/// organization shares (removable only there).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AuthorizedView {
    #[serde(flatten)]
    pub entry: AuthorizedRecord,
    /// The organization that shares this entry, when it is not the
    /// account's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared_by: Option<String>,
    /// Unix seconds of the latest keyed API call this entry admitted.
    #[serde(default)]
    pub last_seen_at: Option<i64>,
    /// Keyed API calls this entry admitted (for this account).
    #[serde(default)]
    pub hits: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AuthorizedList {
    pub authorized: Vec<AuthorizedView>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct UnauthorizedList {
    pub unauthorized: Vec<UnauthorizedRecord>,
}

/// `POST /v1/ips`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Authorize {
    pub cidr: String,
    #[serde(default)]
    pub label: Option<String>,
    /// An organization's entry, in force in every sub-account.
    #[serde(default)]
    pub share: bool,
}

/// `POST /v1/ips/import`: many entries authorized in one change.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportEntries {
    pub entries: Vec<AllowEntry>,
    #[serde(default)]
    pub share: bool,
}

/// What an import did.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ImportOutcome {
    pub account: String,
    pub added: usize,
    /// Entries that were already on the list (or given twice).
    pub already_listed: usize,
}

/// What `ips deny` did.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DenyOutcome {
    pub addr: std::net::IpAddr,
    /// Unauthorized-list entries marked denied.
    pub entries: usize,
    /// The drop-list entry made with `--drop`.
    pub dropped: Option<crate::api::DropView>,
    /// Keys rotated with `--rotate-key` (with their new plaintext key).
    pub rotated: Vec<KeyView>,
}

/// One source activating blocking would cut.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ImpactEntry {
    pub addr: std::net::IpAddr,
    pub key_id: String,
}

/// `GET /v1/blocking/impact`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Impact {
    pub would_refuse: Vec<ImpactEntry>,
}

/// `POST /v1/accounts`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewAccount {
    pub name: String,
    /// The organization it belongs to.
    #[serde(default)]
    pub parent: Option<String>,
    #[serde(default)]
    pub emails: Vec<String>,
}

/// `POST /v1/accounts/{name}/enforce`: an organization enforces (or
/// stops enforcing) blocking on its sub-accounts.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Enforce {
    pub enforce: bool,
}

/// `DELETE /v1/accounts/{name}?force=`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoveQuery {
    #[serde(default)]
    pub force: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AccountView {
    #[serde(flatten)]
    pub record: AccountRecord,
    /// The modes in force (an enforcing organization lifts them).
    pub api_in_force: crate::policy::ApiMode,
    pub smtp_in_force: crate::policy::SmtpMode,
    pub keys: usize,
    pub active_keys: usize,
    pub authorized: usize,
    pub sub_accounts: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AccountList {
    pub accounts: Vec<AccountView>,
}

/// What removing an account did.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AccountRemoved {
    pub name: String,
    /// Keys revoked with it (their live connections were cut).
    pub keys_revoked: Vec<String>,
}

/// `POST /v1/tokens`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewToken {
    /// An operator token (installation-wide); otherwise `role` for the
    /// account the request names.
    #[serde(default)]
    pub operator: bool,
    #[serde(default)]
    pub role: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    /// Like "30d"; none = until revoked.
    #[serde(default)]
    pub expires: Option<String>,
}

/// A token as the admin API shows it (the secret only once, at creation).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TokenView {
    pub id: String,
    pub name: String,
    pub account: Option<String>,
    pub role: Role,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub revoked_at: Option<i64>,
    pub created_by: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TokenList {
    pub tokens: Vec<TokenView>,
}

/// `GET /v1/logs` and `GET /v1/logs/csv`: the usage log, newest first.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogsQuery {
    /// Key id.
    #[serde(default)]
    pub key: Option<String>,
    #[serde(default)]
    pub method: Option<String>,
    #[serde(default)]
    pub status: Option<u16>,
    /// Reason code (`ok`, `key_allowlist`, `kernel_drop` ...).
    #[serde(default)]
    pub reason: Option<String>,
    /// Client address or CIDR.
    #[serde(default)]
    pub ip: Option<String>,
    /// Like `--since` of `audit`: Unix seconds, RFC 3339, or a duration
    /// back from now.
    #[serde(default)]
    pub since: Option<String>,
    #[serde(default)]
    pub until: Option<String>,
    /// JSON only: at most this many rows (default 100, at most 10000). The
    /// CSV export streams every row.
    #[serde(default)]
    pub limit: Option<usize>,
    /// JSON only: skip this many matching rows first (paging; give a fixed
    /// `until` so new rows do not shift the pages).
    #[serde(default)]
    pub offset: Option<usize>,
    /// `/v1/logs/summary` only: how many time buckets (default 24).
    #[serde(default)]
    pub buckets: Option<usize>,
}

pub use crate::logs::{LogBucket, LogSummary, ReasonCount};

/// `GET /v1/whoami`: the caller as the admin API sees it (what the
/// console shows and offers).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WhoAmI {
    /// What the audit log records for this caller (`token:ID`, `uid:N`).
    pub actor: String,
    pub role: Role,
    /// The account an account token belongs to; none for operators.
    pub account: Option<String>,
}

/// `GET /v1/ips/check?addr=&key=`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckQuery {
    pub addr: String,
    /// Also check this key's own allowlist.
    #[serde(default)]
    pub key: Option<String>,
}

/// Which rule admits or refuses an address, per layer, as the policy in
/// force decides it now.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AddressCheck {
    pub addr: std::net::IpAddr,
    pub account: String,
    /// The account's layer for keyed API calls (authorized list, blocking
    /// mode, denied addresses, `always_allow`).
    pub api: Verdict,
    /// The account's SMTP blocking (the kernel enforces it on the SMTP
    /// ports of `[blocking] smtp_account`).
    pub smtp: Verdict,
    /// The key's own allowlist, when a key was named.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<Verdict>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    pub admitted: bool,
    /// The rule, in words: "authorized entry 203.0.113.0/24 (office)".
    pub rule: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LogList {
    pub entries: Vec<crate::logs::LogRow>,
}

/// `GET /v1/notify`: where an account's notifications go.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NotifySettings {
    pub account: String,
    pub emails: Vec<String>,
    /// The account's own webhooks (their secrets are never shown).
    pub webhooks: Vec<WebhookView>,
    /// Whether the installation sends e-mail at all (`[notify.smtp]`).
    pub smtp_configured: bool,
    /// Installation-wide webhooks, which also receive this account's.
    pub installation_webhooks: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WebhookView {
    pub url: String,
    pub created_at: i64,
    pub created_by: String,
}

/// `PUT /v1/notify/emails`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetEmails {
    pub emails: Vec<String>,
}

/// `POST /v1/notify/webhooks`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewWebhook {
    pub url: String,
    pub secret: String,
}

/// `DELETE /v1/notify/webhooks?url=`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookQuery {
    pub url: String,
}
