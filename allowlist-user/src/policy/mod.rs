//! Pure decisions: (credential, method, path, client address, now) ->
//! verdict and why. No I/O, no kernel, no clock of its own: time is passed
//! in, so every rule (grace periods, learning, rate limits) is testable
//! without waiting.
//!
//! The daemon compiles the store into one immutable [`Snapshot`] and swaps
//! it atomically; readers never lock. Per-key runtime state (rate limiter,
//! usage counters) lives in [`KeyRuntime`]s that survive snapshot swaps.

use std::{
    collections::HashSet,
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicI64, AtomicU64},
    },
};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

pub mod access;
pub mod path;
mod prefix;
mod rate;
pub use access::{DEFAULT_ACCOUNT, Need, Role, check_account_name};
pub use path::{PathError, normalize_path};
pub use prefix::{PrefixSet, normalize};
pub use rate::{Gcra, Period, RateInfo, RateLimit};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// At most this many entries in one key's allowlist.
pub const MAX_ALLOW_ENTRIES: usize = 20;
/// Shortest prefixes a key allowlist or the account list accepts.
pub const MIN_V4_PREFIX: u8 = 9;
pub const MIN_V6_PREFIX: u8 = 33;
/// Prefix a learned address is authorized as.
pub const LEARN_V4_PREFIX: u8 = 24;
pub const LEARN_V6_PREFIX: u8 = 64;
/// The readable prefix of every key.
pub const KEY_PREFIX: &str = "alk";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Full,
    Read,
    Send,
    Contacts,
}

impl Scope {
    pub fn parse(s: &str) -> Result<Scope, String> {
        Ok(match s {
            "full" => Scope::Full,
            "read" => Scope::Read,
            "send" => Scope::Send,
            "contacts" => Scope::Contacts,
            _ => {
                return Err(format!(
                    "unknown scope {s:?}; use full, read, send or contacts"
                ));
            }
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Full => "full",
            Scope::Read => "read",
            Scope::Send => "send",
            Scope::Contacts => "contacts",
        }
    }
}

/// A set of scopes as bits: read on every request without a pointer chase.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScopeSet(u8);

impl ScopeSet {
    pub fn of(scopes: &[Scope]) -> ScopeSet {
        ScopeSet(scopes.iter().fold(0, |acc, s| acc | (1 << *s as u8)))
    }

    pub fn contains(self, s: Scope) -> bool {
        self.0 & (1 << s as u8) != 0
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyStatus {
    Active,
    Rotating,
    Revoked,
}

/// Parses an allowlist entry (key allowlist or account list): a single
/// address (stored as /32 or /128) or a CIDR. IPv4-mapped IPv6 becomes IPv4;
/// host bits, and prefixes shorter than /9 (IPv4) or /33 (IPv6), are refused
/// with what to write instead.
pub fn parse_allow_entry(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    let net: IpNet = if let Ok(addr) = s.parse::<IpAddr>() {
        IpNet::from(normalize(addr))
    } else {
        let net: IpNet = s.parse().map_err(|_| {
            format!(
                "{s:?} is not an IP address or CIDR; write it like 203.0.113.0/24 or 2001:db8::/48"
            )
        })?;
        if net.trunc() != net {
            return Err(format!(
                "{s} has host bits set; did you mean {}?",
                net.trunc()
            ));
        }
        match net {
            IpNet::V6(n) if n.prefix_len() >= 96 && n.network().to_ipv4_mapped().is_some() => {
                let v4 = n.network().to_ipv4_mapped().expect("checked");
                IpNet::V4(Ipv4Net::new(v4, n.prefix_len() - 96).expect("<= 32"))
            }
            n => n,
        }
    };
    match net {
        IpNet::V4(n) if n.prefix_len() < MIN_V4_PREFIX => Err(format!(
            "{net} is too wide: IPv4 entries must be /{MIN_V4_PREFIX} or longer; list narrower networks"
        )),
        IpNet::V6(n) if n.prefix_len() < MIN_V6_PREFIX => Err(format!(
            "{net} is too wide: IPv6 entries must be /{MIN_V6_PREFIX} or longer; list narrower networks"
        )),
        _ => Ok(net),
    }
}

/// Checks a whole key allowlist: size and duplicates.
pub fn check_allowlist(entries: &[IpNet]) -> Result<(), String> {
    if entries.len() > MAX_ALLOW_ENTRIES {
        return Err(format!(
            "a key's allowlist holds at most {MAX_ALLOW_ENTRIES} entries ({} given); use wider networks, \
             or the account's authorized list",
            entries.len()
        ));
    }
    let mut seen = HashSet::new();
    for e in entries {
        if !seen.insert(*e) {
            return Err(format!("{e} is listed twice"));
        }
    }
    Ok(())
}

/// The network a learned address is authorized as: its /24 or /64.
pub fn learned_network(addr: IpAddr) -> IpNet {
    match normalize(addr) {
        IpAddr::V4(a) => IpNet::V4(Ipv4Net::new(a, LEARN_V4_PREFIX).expect("valid").trunc()),
        IpAddr::V6(a) => IpNet::V6(Ipv6Net::new(a, LEARN_V6_PREFIX).expect("valid").trunc()),
    }
}

/// The unit a refused or denied source is recorded and judged as: an IPv4
/// address itself, an IPv6 address as its /64's network address (the size
/// of one site, which one client can fill with addresses at will).
pub fn source_unit(addr: IpAddr) -> IpAddr {
    match normalize(addr) {
        IpAddr::V6(a) => IpAddr::V6(std::net::Ipv6Addr::from(
            u128::from(a) & (u128::MAX << (128 - LEARN_V6_PREFIX)),
        )),
        v4 => v4,
    }
}

/// SHA-256 of a key's secret part. Secrets carry 256 random bits, so a
/// fast hash is the right one: there is nothing to brute-force.
pub fn hash_secret(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// Splits `alk_<id>_<secret>`.
pub fn parse_credential(credential: &str) -> Option<(&str, &str)> {
    let rest = credential.strip_prefix(KEY_PREFIX)?.strip_prefix('_')?;
    let (id, secret) = rest.split_once('_')?;
    (!id.is_empty() && !secret.is_empty()).then_some((id, secret))
}

/// Which scope a request needs: configured path prefixes for `send` and
/// `contacts`; anything else needs `read` for GET/HEAD and `full` otherwise.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RouteScopes {
    pub send: Vec<String>,
    pub contacts: Vec<String>,
}

impl Default for RouteScopes {
    fn default() -> Self {
        RouteScopes {
            send: vec!["/emails".into(), "/send".into()],
            contacts: vec!["/contacts".into(), "/audiences".into()],
        }
    }
}

fn path_under(path: &str, prefix: &str) -> bool {
    path.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/') || rest.starts_with('?'))
}

impl RouteScopes {
    /// Whether `scopes` allow `method` on `path`.
    pub fn allows(&self, scopes: ScopeSet, method: &str, path: &str) -> bool {
        if scopes.contains(Scope::Full) {
            return true;
        }
        let read = matches!(method, "GET" | "HEAD");
        if read && scopes.contains(Scope::Read) {
            return true;
        }
        if scopes.contains(Scope::Send) && self.send.iter().any(|p| path_under(path, p)) {
            return true;
        }
        scopes.contains(Scope::Contacts) && self.contacts.iter().any(|p| path_under(path, p))
    }
}

/// Per-key state that outlives snapshots: the limiter and usage counters
/// (flushed to the store periodically, never per request).
#[derive(Debug, Default)]
pub struct KeyRuntime {
    pub limiter: Gcra,
    pub last_used_ms: AtomicI64,
    /// Requests since the last flush.
    pub requests: AtomicU64,
    /// When a rate-limit notice was last raised at 80 % and at 100 %
    /// (Unix ms): a key held at its limit raises one a minute, not one per
    /// request.
    pub rate_told: [AtomicI64; 2],
}

impl KeyRuntime {
    /// Whether to raise the rate-limit notice of `level` (0: 80 %, 1:
    /// 100 %) now; true at most once a minute per level.
    pub fn tell_rate(&self, level: usize, now_ms: i64) -> bool {
        let Some(slot) = self.rate_told.get(level) else {
            return false;
        };
        let last = slot.load(std::sync::atomic::Ordering::Relaxed);
        now_ms - last >= 60_000
            && slot
                .compare_exchange(
                    last,
                    now_ms,
                    std::sync::atomic::Ordering::Relaxed,
                    std::sync::atomic::Ordering::Relaxed,
                )
                .is_ok()
    }
}

/// Keyed API calls one authorized entry admitted for one account, counted
/// by the edge and flushed to the store with the key counters. Lives
/// across snapshot swaps, like [`KeyRuntime`].
#[derive(Debug, Default)]
pub struct EntryUsage {
    /// Hits since the last flush.
    pub hits: AtomicU64,
    /// Unix ms of the latest hit.
    pub last_ms: AtomicI64,
}

/// A key allowlist's answer for one address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    /// The allowlist is empty: every address passes this layer.
    Any,
    /// The longest entry holding the address.
    Entry(IpNet),
    Refused,
}

/// One key as the snapshot holds it. Laid out in declaration order from a
/// cache-line boundary: what every decision reads (the secret's hash, the
/// allowlist, state, scopes, account) fills the first line, so a cold
/// request misses once for it rather than once per field.
#[derive(Debug)]
#[repr(C, align(64))]
pub struct KeyPolicy {
    pub secret_hash: [u8; 32],
    /// Empty = every address passes this layer.
    pub allow: Vec<IpNet>,
    pub status: KeyStatus,
    pub scopes: ScopeSet,
    /// The index of the account the key belongs to.
    pub account: u32,
    pub runtime: Arc<KeyRuntime>,
    pub rate: Option<RateLimit>,
    /// The previous secret during a rotation grace period, and when it
    /// stops working (Unix ms).
    pub previous: Option<([u8; 32], i64)>,
    /// Numeric id used in kernel maps.
    pub kid: u32,
    /// Public key id (what logs, metrics and the CLI show).
    pub id: String,
    pub name: String,
}

// The fields every decision reads stay within the first cache line.
const _: () = assert!(std::mem::offset_of!(KeyPolicy, account) + 4 <= 64);

impl KeyPolicy {
    /// What the key's own allowlist says of `addr`.
    pub fn admits(&self, addr: IpAddr) -> Admit {
        if self.allow.is_empty() {
            return Admit::Any;
        }
        let addr = normalize(addr);
        self.allow
            .iter()
            .filter(|n| n.contains(&addr))
            .max_by_key(|n| n.prefix_len())
            .map_or(Admit::Refused, |n| Admit::Entry(*n))
    }

    /// Whether the key can be used at all (not revoked).
    pub fn usable(&self) -> bool {
        self.status != KeyStatus::Revoked
    }
}

/// API blocking mode (the store keeps it, the policy decides by it: one
/// type).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ApiMode {
    Learning,
    Active,
    Inactive,
}

/// SMTP blocking mode: no learning; the kernel enforces it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SmtpMode {
    Inactive,
    Active,
}

/// Why a request got its answer (the usage log's reason code).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    Ok,
    MissingKey,
    MalformedKey,
    UnknownKey,
    BadSecret,
    Revoked,
    ExpiredSecret,
    Scope,
    KeyAllowlist,
    AccountList,
    /// The account denied this address (`ips deny`).
    Denied,
    RateLimited,
}

impl Reason {
    /// Every reason, in declaration order (`reason as usize` indexes it).
    pub const ALL: [Reason; 12] = [
        Reason::Ok,
        Reason::MissingKey,
        Reason::MalformedKey,
        Reason::UnknownKey,
        Reason::BadSecret,
        Reason::Revoked,
        Reason::ExpiredSecret,
        Reason::Scope,
        Reason::KeyAllowlist,
        Reason::AccountList,
        Reason::Denied,
        Reason::RateLimited,
    ];

    /// The reason code as logs and metrics name it.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Ok => "ok",
            Reason::MissingKey => "missing_key",
            Reason::MalformedKey => "malformed_key",
            Reason::UnknownKey => "unknown_key",
            Reason::BadSecret => "bad_secret",
            Reason::Revoked => "revoked",
            Reason::ExpiredSecret => "expired_secret",
            Reason::Scope => "scope",
            Reason::KeyAllowlist => "key_allowlist",
            Reason::AccountList => "account_list",
            Reason::Denied => "denied",
            Reason::RateLimited => "rate_limited",
        }
    }

    pub fn status(self) -> u16 {
        match self {
            Reason::Ok => 200,
            Reason::MissingKey
            | Reason::MalformedKey
            | Reason::UnknownKey
            | Reason::BadSecret
            | Reason::Revoked
            | Reason::ExpiredSecret => 401,
            Reason::Scope | Reason::KeyAllowlist | Reason::AccountList | Reason::Denied => 403,
            Reason::RateLimited => 429,
        }
    }

    /// The error code of the one JSON error shape.
    pub fn code(self) -> &'static str {
        match self.status() {
            401 => "unauthorized",
            403 if self == Reason::Scope => "permission_denied",
            403 => "IP_NOT_ALLOWED",
            429 => "too_many_requests",
            _ => "ok",
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            Reason::Ok => "ok",
            Reason::MissingKey => {
                "Missing API key: send it in the api-key header or as Authorization: Bearer"
            }
            // One body for every cause after "missing": a caller who knows
            // a key id must not learn whether it exists, is revoked or was
            // rotated.
            Reason::MalformedKey
            | Reason::UnknownKey
            | Reason::BadSecret
            | Reason::Revoked
            | Reason::ExpiredSecret => "Invalid API key",
            Reason::Scope => "This API key does not have permission for this request",
            Reason::KeyAllowlist | Reason::AccountList | Reason::Denied => {
                "Request IP address is not in the API key's allowlist"
            }
            Reason::RateLimited => "Too many requests for this API key; retry later",
        }
    }
}

/// How the account layer answered for an allowed request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccountMatch {
    AlwaysAllow(IpNet),
    Listed(IpNet),
    /// Not listed, learning mode: allowed and to be learned.
    Learning,
    /// Not listed, blocking inactive.
    Inactive,
}

/// The rule that decided, for the usage log. A plain value: formatting
/// happens only when the log line is written, never on the request path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rule {
    /// Authentication failed, and why.
    Auth(&'static str),
    Scope,
    KeyNoMatch,
    AccountNoMatch,
    Denied,
    Rate(RateLimit),
    Allowed {
        key: Admit,
        account: AccountMatch,
    },
}

impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rule::Auth(why) => f.write_str(why),
            Rule::Scope => f.write_str("scope"),
            Rule::KeyNoMatch => f.write_str("key allowlist: no entry matched"),
            Rule::AccountNoMatch => f.write_str("account list: no entry matched"),
            Rule::Denied => f.write_str("account list: address denied"),
            Rule::Rate(r) => write!(f, "rate {r}"),
            Rule::Allowed { key, account } => {
                match key {
                    Admit::Entry(n) => write!(f, "key allowlist {n}")?,
                    _ => f.write_str("key allowlist empty")?,
                }
                match account {
                    AccountMatch::AlwaysAllow(n) => write!(f, "; always_allow {n}"),
                    AccountMatch::Listed(n) => write!(f, "; account list {n}"),
                    AccountMatch::Learning => f.write_str("; account list: learning"),
                    AccountMatch::Inactive => f.write_str("; account list: blocking inactive"),
                }
            }
        }
    }
}

mod snapshot;
pub use snapshot::{AccountPolicy, Decision, KEY_SHARDS, Snapshot, id_key};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_entries_are_validated_with_helpful_messages() {
        assert_eq!(
            parse_allow_entry("192.0.2.7").unwrap().to_string(),
            "192.0.2.7/32"
        );
        assert_eq!(
            parse_allow_entry("2001:db8::7").unwrap().to_string(),
            "2001:db8::7/128"
        );
        assert_eq!(
            parse_allow_entry("::ffff:192.0.2.7").unwrap().to_string(),
            "192.0.2.7/32"
        );
        assert_eq!(
            parse_allow_entry("::ffff:192.0.2.0/120")
                .unwrap()
                .to_string(),
            "192.0.2.0/24"
        );
        assert!(
            parse_allow_entry("203.0.113.5/24")
                .unwrap_err()
                .contains("did you mean 203.0.113.0/24?")
        );
        assert!(
            parse_allow_entry("10.0.0.0/8")
                .unwrap_err()
                .contains("/9 or longer")
        );
        assert!(parse_allow_entry("10.0.0.0/9").is_ok());
        assert!(
            parse_allow_entry("2001:db8::/32")
                .unwrap_err()
                .contains("/33 or longer")
        );
        assert!(
            parse_allow_entry("192.168.0.0/16").is_ok(),
            "private ranges are valid"
        );
        let many: Vec<IpNet> = (0..21)
            .map(|i| format!("192.0.2.{i}/32").parse().unwrap())
            .collect();
        assert!(check_allowlist(&many).unwrap_err().contains("at most 20"));
        let dup: Vec<IpNet> = vec!["192.0.2.0/24".parse().unwrap(); 2];
        assert!(check_allowlist(&dup).unwrap_err().contains("listed twice"));
        assert!(RateLimit::parse("100/minute").is_ok());
        assert!(RateLimit::parse("1000000/second").is_ok());
        assert!(
            RateLimit::parse("1000001/second")
                .unwrap_err()
                .contains("1000000/second")
        );
        // A limit at the highest rate still answers (no zero interval).
        let g = Gcra::new();
        let top = RateLimit::parse("1000000/second").unwrap();
        assert!(g.check(&top, 1).0 && g.peek(&top, 1).limit == 1_000_000);
        assert!(RateLimit::parse("0/minute").is_err());
        assert!(RateLimit::parse("lots").unwrap_err().contains("100/minute"));
    }

    #[test]
    fn scopes_map_routes() {
        let r = RouteScopes::default();
        let s = |x: Scope| ScopeSet::of(&[x]);
        assert!(r.allows(s(Scope::Send), "POST", "/emails"));
        assert!(r.allows(s(Scope::Send), "POST", "/emails/batch"));
        assert!(!r.allows(s(Scope::Send), "POST", "/emailsX"));
        assert!(!r.allows(s(Scope::Send), "POST", "/contacts"));
        assert!(r.allows(s(Scope::Contacts), "DELETE", "/contacts/1"));
        assert!(r.allows(s(Scope::Read), "HEAD", "/anything"));
        assert!(!r.allows(s(Scope::Read), "POST", "/anything"));
        assert!(r.allows(s(Scope::Full), "DELETE", "/anything"));
        assert!(!ScopeSet::of(&[Scope::Read, Scope::Send]).contains(Scope::Full));
    }
}
