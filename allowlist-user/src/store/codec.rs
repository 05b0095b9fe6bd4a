//! How values are spelled in the stores' columns, shared by both backends
//! so a row written by one reads the same through the other.

use crate::policy::KeyStatus;

/// A mode enum as its serde name (`"learning"`, `"active"` ...).
pub(super) fn mode_str<T: serde::Serialize>(m: T) -> String {
    serde_json::to_value(m)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

pub(super) fn status_str(s: KeyStatus) -> &'static str {
    match s {
        KeyStatus::Active => "active",
        KeyStatus::Rotating => "rotating",
        KeyStatus::Revoked => "revoked",
    }
}

pub(super) fn parse_status(s: &str) -> Option<KeyStatus> {
    Some(match s {
        "active" => KeyStatus::Active,
        "rotating" => KeyStatus::Rotating,
        "revoked" => KeyStatus::Revoked,
        _ => return None,
    })
}

pub(super) fn hash32(v: Vec<u8>) -> Option<[u8; 32]> {
    v.try_into().ok()
}
