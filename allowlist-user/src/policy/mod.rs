//! Pure decisions: (credential, method, path, client address, now) ->
//! verdict and why. No I/O, no kernel, no clock of its own: time is passed
//! in, so every rule (grace periods, learning, rate limits) is testable
//! without waiting.
//!
//! The daemon compiles the store into one immutable [`Snapshot`] and swaps
//! it atomically; readers never lock. Per-key runtime state (rate limiter,
//! usage counters) lives in [`KeyRuntime`]s that survive snapshot swaps.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicI64, AtomicU64, Ordering},
    },
};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

pub mod path;
mod prefix;
mod rate;
pub use path::{PathError, normalize_path};
pub use prefix::{PrefixSet, normalize};
pub use rate::{Gcra, Period, RateInfo, RateLimit};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

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

/// One key as the snapshot holds it.
#[derive(Debug)]
pub struct KeyPolicy {
    /// Public key id (what logs, metrics and the CLI show).
    pub id: String,
    /// Numeric id used in kernel maps.
    pub kid: u32,
    pub name: String,
    pub status: KeyStatus,
    pub scopes: ScopeSet,
    pub secret_hash: [u8; 32],
    /// The previous secret during a rotation grace period, and when it
    /// stops working (Unix ms).
    pub previous: Option<([u8; 32], i64)>,
    /// Empty = every address passes this layer.
    pub allow: Vec<IpNet>,
    pub rate: Option<RateLimit>,
    pub runtime: Arc<KeyRuntime>,
}

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

/// A decision and everything the caller needs to act on and log it.
#[derive(Clone, Debug)]
pub struct Decision {
    pub reason: Reason,
    pub key: Option<Arc<KeyPolicy>>,
    /// Which list and prefix decided (for the usage log).
    pub rule: Rule,
    pub rate: Option<RateInfo>,
    /// In learning mode: the network to authorize after this success.
    pub learn: Option<IpNet>,
}

impl Decision {
    fn deny(reason: Reason, key: Option<Arc<KeyPolicy>>, rule: Rule) -> Decision {
        Decision {
            reason,
            key,
            rule,
            rate: None,
            learn: None,
        }
    }

    pub fn allowed(&self) -> bool {
        self.reason == Reason::Ok
    }
}

/// Everything a decision needs, immutable once built.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Keyed by [`id_key`] of the public id.
    pub keys: HashMap<u64, Arc<KeyPolicy>>,
    pub api: Option<ApiMode>,
    /// The account's authorized list.
    pub account: PrefixSet,
    pub account_list: Vec<IpNet>,
    /// `[blocking] always_allow`.
    pub always_allow: PrefixSet,
    pub always_allow_list: Vec<IpNet>,
    /// Addresses the account denied: refused even inside an authorized or
    /// learned range, until authorized explicitly.
    pub denied: HashSet<IpAddr>,
    /// `[proxy] trusted_proxies`: balancers connect from these, so the XDP
    /// guard always admits them (their clients are checked by the proxy
    /// and the connection hooks).
    pub trusted_list: Vec<IpNet>,
    pub routes: RouteScopes,
}

/// The map key of a public key id: its value when it is the canonical 16
/// hex digits (every id this daemon issues), else a hash of the text.
pub fn id_key(id: &str) -> u64 {
    if id.len() == 16
        && let Ok(v) = u64::from_str_radix(id, 16)
    {
        return v;
    }
    // FNV-1a, with the top bit set so it never equals a canonical id's
    // value of the same text; `Snapshot::key` checks the text anyway.
    let h = id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    h | (1 << 63)
}

fn canonical(id: &str) -> bool {
    id.len() == 16
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl Snapshot {
    /// The key with public id `id`.
    pub fn key(&self, id: &str) -> Option<&Arc<KeyPolicy>> {
        let key = self.keys.get(&id_key(id))?;
        // A canonical id maps to its key one to one; anything else could
        // collide, so compare the text.
        (canonical(id) || key.id == id).then_some(key)
    }

    /// Whether the account layer admits `addr` now.
    pub fn account_admits(&self, addr: IpAddr) -> bool {
        let addr = normalize(addr);
        if self.always_allow.longest_match(addr).is_some() {
            return true;
        }
        !self.denied.contains(&source_unit(addr))
            && (self.api_mode() != ApiMode::Active || self.account.longest_match(addr).is_some())
    }

    /// Whether `key` may be used from `addr` now (both address layers and
    /// the key's state): what a live connection is rechecked against.
    pub fn admits(&self, key: &KeyPolicy, addr: IpAddr) -> bool {
        key.usable() && key.admits(addr) != Admit::Refused && self.account_admits(addr)
    }

    pub fn api_mode(&self) -> ApiMode {
        self.api.unwrap_or(ApiMode::Learning)
    }

    /// The checks of SPEC.md in order: authentication (401), scope (403
    /// permission_denied), source (403 IP_NOT_ALLOWED), rate (429).
    pub fn decide(
        &self,
        credential: Option<&str>,
        method: &str,
        path: &str,
        client: IpAddr,
        now_ms: i64,
    ) -> Decision {
        let client = normalize(client);
        let Some(credential) = credential else {
            return Decision::deny(Reason::MissingKey, None, Rule::Auth("no key"));
        };
        let Some((id, secret)) = parse_credential(credential) else {
            return Decision::deny(Reason::MalformedKey, None, Rule::Auth("malformed key"));
        };
        // Hashed before the lookup, so an unknown id costs what a known one
        // does.
        let hash = hash_secret(secret);
        let Some(key) = self.key(id) else {
            return Decision::deny(Reason::UnknownKey, None, Rule::Auth("unknown key id"));
        };
        let key = key.clone();
        let current: bool = hash.ct_eq(&key.secret_hash).into();
        // The secret is checked before the key's state: only a caller who
        // holds the secret may learn that a key is revoked (and even then
        // the body is the one every 401 has).
        if !current {
            match key.previous {
                Some((prev, until)) if bool::from(hash.ct_eq(&prev)) => {
                    if now_ms >= until {
                        return Decision::deny(
                            Reason::ExpiredSecret,
                            Some(key),
                            Rule::Auth("previous secret expired"),
                        );
                    }
                }
                _ => {
                    return Decision::deny(
                        Reason::BadSecret,
                        Some(key),
                        Rule::Auth("wrong secret"),
                    );
                }
            }
        }
        if key.status == KeyStatus::Revoked {
            return Decision::deny(Reason::Revoked, Some(key), Rule::Auth("key revoked"));
        }
        if !self.routes.allows(key.scopes, method, path) {
            return Decision::deny(Reason::Scope, Some(key), Rule::Scope);
        }
        let key_rule = key.admits(client);
        if key_rule == Admit::Refused {
            return Decision::deny(Reason::KeyAllowlist, Some(key), Rule::KeyNoMatch);
        }
        let mut learn = None;
        let account_rule = if let Some(net) = self.always_allow.longest_match(client) {
            AccountMatch::AlwaysAllow(net)
        } else if self.denied.contains(&source_unit(client)) {
            return Decision::deny(Reason::Denied, Some(key), Rule::Denied);
        } else {
            match (self.api_mode(), self.account.longest_match(client)) {
                (_, Some(net)) => AccountMatch::Listed(net),
                (ApiMode::Active, None) => {
                    return Decision::deny(Reason::AccountList, Some(key), Rule::AccountNoMatch);
                }
                (ApiMode::Learning, None) => {
                    learn = Some(learned_network(client));
                    AccountMatch::Learning
                }
                (ApiMode::Inactive, None) => AccountMatch::Inactive,
            }
        };
        let mut rate = None;
        if let Some(limit) = key.rate {
            let (ok, info) = key.runtime.limiter.check(&limit, now_ms);
            if !ok {
                let mut d = Decision::deny(Reason::RateLimited, Some(key), Rule::Rate(limit));
                d.rate = Some(info);
                return d;
            }
            rate = Some(info);
        }
        key.runtime.last_used_ms.store(now_ms, Ordering::Relaxed);
        key.runtime.requests.fetch_add(1, Ordering::Relaxed);
        Decision {
            reason: Reason::Ok,
            key: Some(key),
            rule: Rule::Allowed {
                key: key_rule,
                account: account_rule,
            },
            rate,
            learn,
        }
    }

    /// Every source some request could be allowed from while API blocking
    /// is active: `always_allow`, plus the account list narrowed to what
    /// some usable key's allowlist admits (an empty allowlist admits all).
    /// Exact: an address outside it is refused by `decide` whatever key it
    /// presents, so XDP may drop it.
    pub fn api_guard_union(&self) -> Vec<IpNet> {
        let usable: Vec<&Arc<KeyPolicy>> = self.keys.values().filter(|k| k.usable()).collect();
        let mut out: Vec<IpNet> = self.always_allow_list.clone();
        out.extend(self.trusted_list.iter().copied());
        if usable.iter().any(|k| k.allow.is_empty()) {
            out.extend(self.account_list.iter().copied());
        } else {
            let keys_set = PrefixSet::new(usable.iter().flat_map(|k| k.allow.iter().copied()));
            // Two prefixes overlap only if one holds the other; their
            // intersection is then the longer one.
            for a in &self.account_list {
                if keys_set.covers(a) {
                    out.push(*a);
                }
            }
            for k in &usable {
                for n in &k.allow {
                    if self.account.covers(n) {
                        out.push(*n);
                    }
                }
            }
        }
        out.sort_by_key(|n| (n.addr(), n.prefix_len()));
        out.dedup();
        out
    }

    /// SMTP is guarded by the account list alone (and `always_allow`).
    pub fn smtp_guard_union(&self) -> Vec<IpNet> {
        let mut out = self.always_allow_list.clone();
        out.extend(self.trusted_list.iter().copied());
        out.extend(self.account_list.iter().copied());
        out.sort_by_key(|n| (n.addr(), n.prefix_len()));
        out.dedup();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(id: &str, secret: &str, allow: &[&str], scopes: &[Scope]) -> Arc<KeyPolicy> {
        Arc::new(KeyPolicy {
            id: id.into(),
            kid: 1,
            name: id.into(),
            status: KeyStatus::Active,
            scopes: ScopeSet::of(scopes),
            secret_hash: hash_secret(secret),
            previous: None,
            allow: allow.iter().map(|a| a.parse().unwrap()).collect(),
            rate: None,
            runtime: Arc::default(),
        })
    }

    fn snap(keys: Vec<Arc<KeyPolicy>>, mode: ApiMode, account: &[&str]) -> Snapshot {
        let account: Vec<IpNet> = account.iter().map(|a| a.parse().unwrap()).collect();
        Snapshot {
            keys: keys.into_iter().map(|k| (id_key(&k.id), k)).collect(),
            api: Some(mode),
            account: PrefixSet::new(account.clone()),
            account_list: account,
            ..Default::default()
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn checks_run_in_the_spec_order() {
        let s = snap(
            vec![key("k1", "s3cret", &["198.51.100.0/24"], &[Scope::Read])],
            ApiMode::Active,
            &["198.51.100.0/24"],
        );
        let d = |cred: Option<&str>, m: &str, src: &str| {
            s.decide(cred, m, "/emails", ip(src), 0).reason
        };
        assert_eq!(d(None, "GET", "198.51.100.7"), Reason::MissingKey);
        assert_eq!(d(Some("nope"), "GET", "198.51.100.7"), Reason::MalformedKey);
        assert_eq!(
            d(Some("alk_zz_s3cret"), "GET", "198.51.100.7"),
            Reason::UnknownKey
        );
        // A bad key from a disallowed address is 401, never 403.
        assert_eq!(
            d(Some("alk_k1_wrong"), "GET", "203.0.113.9"),
            Reason::BadSecret
        );
        assert_eq!(
            d(Some("alk_k1_s3cret"), "POST", "203.0.113.9"),
            Reason::Scope
        );
        assert_eq!(
            d(Some("alk_k1_s3cret"), "GET", "203.0.113.9"),
            Reason::KeyAllowlist
        );
        assert_eq!(d(Some("alk_k1_s3cret"), "GET", "198.51.100.7"), Reason::Ok);
        assert_eq!(
            d(Some("alk_k1_s3cret"), "GET", "::ffff:198.51.100.7"),
            Reason::Ok
        );
        assert_eq!(Reason::BadSecret.status(), 401);
        assert_eq!(Reason::Scope.code(), "permission_denied");
        assert_eq!(Reason::KeyAllowlist.code(), "IP_NOT_ALLOWED");
    }

    #[test]
    fn a_401_says_nothing_about_the_key_behind_it() {
        let mut revoked = key("k1", "s3cret", &[], &[Scope::Full]);
        Arc::get_mut(&mut revoked).expect("sole owner").status = KeyStatus::Revoked;
        let s = snap(vec![revoked], ApiMode::Inactive, &[]);
        let d = |cred: &str| s.decide(Some(cred), "GET", "/", ip("198.51.100.7"), 0);
        // Without the secret, a revoked key looks like any wrong secret.
        assert_eq!(d("alk_k1_wrong").reason, Reason::BadSecret);
        assert_eq!(d("alk_k1_s3cret").reason, Reason::Revoked);
        let bodies: HashSet<(u16, &str, &str)> = [
            Reason::MalformedKey,
            Reason::UnknownKey,
            Reason::BadSecret,
            Reason::Revoked,
            Reason::ExpiredSecret,
        ]
        .into_iter()
        .map(|r| (r.status(), r.code(), r.message()))
        .collect();
        assert_eq!(bodies.len(), 1, "{bodies:?}");
    }

    #[test]
    fn a_denied_address_stays_refused_inside_an_authorized_range() {
        for mode in [ApiMode::Active, ApiMode::Learning, ApiMode::Inactive] {
            let mut s = snap(
                vec![key("k1", "s", &[], &[Scope::Full])],
                mode,
                &["198.51.100.0/24"],
            );
            s.denied.insert(ip("198.51.100.7"));
            let d = s.decide(Some("alk_k1_s"), "GET", "/", ip("198.51.100.7"), 0);
            assert_eq!((d.reason, d.learn), (Reason::Denied, None), "{mode:?}");
            assert_eq!(d.reason.code(), "IP_NOT_ALLOWED");
            assert!(!s.account_admits(ip("198.51.100.7")));
            // Mapped IPv6 is the same address.
            assert!(!s.account_admits(ip("::ffff:198.51.100.7")));
            // IPv6 is denied per /64.
            s.denied.insert(source_unit(ip("2001:db8:1:2::99")));
            assert!(!s.account_admits(ip("2001:db8:1:2:ffff::1")));
            assert!(s.account_admits(ip("2001:db8:1:3::1")) || mode == ApiMode::Active);
            assert!(
                s.decide(Some("alk_k1_s"), "GET", "/", ip("198.51.100.8"), 0)
                    .allowed()
            );
            // always_allow wins over everything.
            s.always_allow = PrefixSet::new(["198.51.100.7/32".parse().unwrap()]);
            assert!(
                s.decide(Some("alk_k1_s"), "GET", "/", ip("198.51.100.7"), 0)
                    .allowed()
            );
        }
    }

    #[test]
    fn account_list_applies_only_when_active_and_learning_learns() {
        let k = key("k1", "s", &[], &[Scope::Full]);
        let active = snap(vec![k.clone()], ApiMode::Active, &["192.0.2.0/24"]);
        assert_eq!(
            active
                .decide(Some("alk_k1_s"), "POST", "/x", ip("198.51.100.1"), 0)
                .reason,
            Reason::AccountList
        );
        assert!(
            active
                .decide(Some("alk_k1_s"), "POST", "/x", ip("192.0.2.77"), 0)
                .allowed()
        );
        let inactive = snap(vec![k.clone()], ApiMode::Inactive, &["192.0.2.0/24"]);
        let d = inactive.decide(Some("alk_k1_s"), "POST", "/x", ip("198.51.100.1"), 0);
        assert!(d.allowed() && d.learn.is_none());
        let learning = snap(vec![k], ApiMode::Learning, &["192.0.2.0/24"]);
        let d = learning.decide(Some("alk_k1_s"), "POST", "/x", ip("192.168.1.25"), 0);
        assert_eq!(d.learn, Some("192.168.1.0/24".parse().unwrap()));
        let d = learning.decide(Some("alk_k1_s"), "POST", "/x", ip("2001:db8:1:2:3::9"), 0);
        assert_eq!(d.learn, Some("2001:db8:1:2::/64".parse().unwrap()));
        let d = learning.decide(Some("alk_k1_s"), "POST", "/x", ip("192.0.2.5"), 0);
        assert_eq!(d.learn, None, "already authorized");
    }

    #[test]
    fn previous_secret_works_until_the_grace_ends() {
        let mut k = Arc::try_unwrap(key("k1", "new", &[], &[Scope::Full])).unwrap();
        k.status = KeyStatus::Rotating;
        k.previous = Some((hash_secret("old"), 1_000));
        let s = snap(vec![Arc::new(k)], ApiMode::Inactive, &[]);
        assert!(
            s.decide(Some("alk_k1_old"), "GET", "/", ip("192.0.2.1"), 999)
                .allowed()
        );
        assert_eq!(
            s.decide(Some("alk_k1_old"), "GET", "/", ip("192.0.2.1"), 1_000)
                .reason,
            Reason::ExpiredSecret
        );
        assert!(
            s.decide(Some("alk_k1_new"), "GET", "/", ip("192.0.2.1"), 5_000)
                .allowed()
        );
    }

    #[test]
    fn rate_limit_is_a_burst_then_a_steady_rate() {
        let mut k = Arc::try_unwrap(key("k1", "s", &[], &[Scope::Full])).unwrap();
        k.rate = Some(RateLimit::parse("3/second").unwrap());
        let s = snap(vec![Arc::new(k)], ApiMode::Inactive, &[]);
        let go = |t| s.decide(Some("alk_k1_s"), "GET", "/", ip("192.0.2.1"), t);
        let first = go(10_000);
        assert_eq!(first.rate.unwrap().remaining, 2);
        assert!(go(10_000).allowed() && go(10_000).allowed());
        let refused = go(10_000);
        assert_eq!(refused.reason, Reason::RateLimited);
        assert_eq!(refused.rate.unwrap().retry_after, Some(1));
        assert!(go(10_334).allowed(), "one interval later, one more");
        assert!(!go(10_334).allowed());
    }

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

    fn arb_net() -> impl Strategy<Value = IpNet> {
        prop_oneof![
            (0u32..64, 9u8..=32).prop_map(|(a, l)| IpNet::V4(
                Ipv4Net::new((0xC633_6400 | (a << 2)).into(), l)
                    .unwrap()
                    .trunc()
            )),
            (0u64..64, 33u8..=128).prop_map(|(a, l)| {
                let addr = (0x2001_0db8u128 << 96) | ((a as u128) << 70) | a as u128;
                IpNet::V6(Ipv6Net::new(addr.into(), l).unwrap().trunc())
            }),
        ]
    }

    fn arb_addr() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            (0u32..1024).prop_map(|a| IpAddr::V4((0xC633_6400 | a).into())),
            (0u64..64, 0u64..4).prop_map(|(a, b)| IpAddr::V6(
                ((0x2001_0db8u128 << 96) | ((a as u128) << 70) | (a + b) as u128).into()
            )),
        ]
    }

    proptest! {
        /// The XDP guard must never drop a source that some key could use:
        /// every address `decide` allows (with any key) is in the union.
        #[test]
        fn guard_union_never_excludes_an_allowed_source(
            keys in prop::collection::vec((prop::collection::vec(arb_net(), 0..4), any::<bool>()), 1..5),
            account in prop::collection::vec(arb_net(), 0..6),
            always in prop::collection::vec(arb_net(), 0..2),
            addrs in prop::collection::vec(arb_addr(), 1..40),
        ) {
            let mut policies = Vec::new();
            for (i, (allow, revoked)) in keys.iter().enumerate() {
                let mut allow = allow.clone();
                allow.sort_by_key(|n| (n.addr(), n.prefix_len()));
                allow.dedup();
                policies.push(Arc::new(KeyPolicy {
                    id: format!("k{i}"),
                    kid: i as u32,
                    name: String::new(),
                    status: if *revoked { KeyStatus::Revoked } else { KeyStatus::Active },
                    scopes: ScopeSet::of(&[Scope::Full]),
                    secret_hash: hash_secret("s"),
                    previous: None,
                    allow,
                    rate: None,
                    runtime: Arc::default(),
                }));
            }
            let s = Snapshot {
                keys: policies.iter().map(|k| (id_key(&k.id), k.clone())).collect(),
                api: Some(ApiMode::Active),
                account: PrefixSet::new(account.clone()),
                account_list: account,
                always_allow: PrefixSet::new(always.clone()),
                always_allow_list: always,
                denied: Default::default(),
                trusted_list: Vec::new(),
                routes: RouteScopes::default(),
            };
            let union = PrefixSet::new(s.api_guard_union());
            for addr in addrs {
                let allowed = policies.iter().any(|k| s.decide(Some(&format!("alk_{}_s", k.id)), "GET", "/", addr, 0).allowed());
                let in_union = union.longest_match(addr).is_some();
                // Never drops what some key could use ...
                prop_assert!(!allowed || in_union, "{} allowed but not in the guard union", addr);
                // ... and is exact: what it lets through, some key could use
                // (always_allow is let through regardless: lockout protection).
                let always = s.always_allow.longest_match(addr).is_some();
                prop_assert!(!in_union || allowed || always, "{} in the guard union but no key is allowed from it", addr);
            }
        }
    }
}
