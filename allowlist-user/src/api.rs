//! The admin API's request and response bodies, shared by the daemon and
//! `allowlistctl`, and the one JSON error shape.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::kernel::{FillLevels, KernelStats};
use crate::store::{BlockingState, DropRecord};

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
    #[serde(flatten)]
    pub state: BlockingState,
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
