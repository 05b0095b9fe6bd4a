//! How values are spelled in the stores' columns, shared by both backends
//! so a row written by one reads the same through the other.

use crate::policy::{KeyStatus, RateLimit, Scope};

use super::StoreError;

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

/// A key row's policy columns, decoded.
pub(super) struct KeyColumns {
    pub scopes: Vec<Scope>,
    pub status: KeyStatus,
    pub secret_hash: [u8; 32],
    pub previous: Option<([u8; 32], i64)>,
    pub rate: Option<RateLimit>,
}

/// Decodes a key row's policy columns as both backends store them;
/// `corrupt(column, value)` is the backend's error for a bad one.
pub(super) fn decode_key(
    scopes: &str,
    status: &str,
    hash: Vec<u8>,
    (prev, prev_exp): (Option<Vec<u8>>, Option<i64>),
    rate: Option<String>,
    corrupt: impl Fn(&'static str, String) -> StoreError,
) -> Result<KeyColumns, StoreError> {
    let scopes = scopes
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| Scope::parse(s).map_err(|_| corrupt("keys.scopes", s.into())))
        .collect::<Result<Vec<_>, _>>()?;
    let previous = match (prev, prev_exp) {
        (Some(h), Some(exp)) => Some((
            hash32(h).ok_or_else(|| corrupt("keys.prev_hash", "wrong length".into()))?,
            exp,
        )),
        _ => None,
    };
    Ok(KeyColumns {
        scopes,
        status: parse_status(status).ok_or_else(|| corrupt("keys.status", status.into()))?,
        secret_hash: hash32(hash)
            .ok_or_else(|| corrupt("keys.secret_hash", "wrong length".into()))?,
        previous,
        rate: match rate {
            Some(r) => Some(RateLimit::parse(&r).map_err(|_| corrupt("keys.rate", r))?),
            None => None,
        },
    })
}
