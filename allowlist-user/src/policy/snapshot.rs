//! The immutable policy the edge decides by, built from per-account pieces.
//!
//! Each account is one [`AccountPolicy`] behind an `Arc`; keys are indexed
//! in [`KEY_SHARDS`] shards by their public id. A change to one account
//! builds that account's piece and the shards its keys fall in, and shares
//! every other piece with the previous snapshot (see
//! [`Snapshot::with_accounts`]).

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    sync::{Arc, atomic::Ordering},
};

use ipnet::IpNet;
use subtle::ConstantTimeEq;

use super::{
    AccountMatch, Admit, ApiMode, EntryUsage, KeyPolicy, KeyStatus, PrefixSet, Reason, RouteScopes,
    Rule, SmtpMode, hash_secret, learned_network, normalize, parse_credential, source_unit,
};

/// Shards of the key index: a change rebuilds only the shards its keys
/// fall in (at 100k keys, ~400 entries each).
pub const KEY_SHARDS: usize = 256;

/// One account as the snapshot holds it; what a decision reads comes
/// first, from a cache-line boundary (see [`KeyPolicy`]).
#[derive(Debug)]
#[repr(C, align(64))]
pub struct AccountPolicy {
    /// In force: an organization enforcing blocking lifts its
    /// sub-accounts' modes to its own.
    pub api: ApiMode,
    pub smtp: SmtpMode,
    /// Numeric index used in kernel maps.
    pub idx: u32,
    /// The authorized list in force: the account's own entries and those
    /// its organization shares.
    pub list: PrefixSet,
    /// Addresses the account denied: refused even inside an authorized or
    /// learned range, until authorized explicitly.
    pub denied: HashSet<IpAddr>,
    pub name: String,
    /// The revision of the stored account (and of its organization) this
    /// piece was built from: the builder reuses a piece whose revisions
    /// have not moved.
    pub rev: u64,
    pub parent_rev: u64,
    /// The list's entries, sorted.
    pub list_entries: Vec<IpNet>,
    /// Each entry's hits, in the order of `list_entries`.
    pub usage: Vec<Arc<EntryUsage>>,
    pub keys: Vec<Arc<KeyPolicy>>,
    /// Every source some usable key of this account may call from (see
    /// [`AccountPolicy::api_sources`]), computed once per piece.
    pub api_sources: Vec<IpNet>,
}

impl AccountPolicy {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: String,
        idx: u32,
        (rev, parent_rev): (u64, u64),
        (api, smtp): (ApiMode, SmtpMode),
        mut list_entries: Vec<IpNet>,
        denied: HashSet<IpAddr>,
        keys: Vec<Arc<KeyPolicy>>,
    ) -> AccountPolicy {
        list_entries.sort_unstable();
        list_entries.dedup();
        let list = PrefixSet::new(list_entries.iter().copied());
        let usage = list_entries.iter().map(|_| Arc::default()).collect();
        let mut a = AccountPolicy {
            name,
            idx,
            rev,
            parent_rev,
            api,
            smtp,
            list,
            list_entries,
            usage,
            denied,
            keys,
            api_sources: Vec::new(),
        };
        a.api_sources = a.compute_api_sources();
        a
    }

    /// Takes each entry's counters from `usage_of` (the daemon keeps them
    /// across snapshots) instead of fresh ones.
    pub fn with_usage(mut self, mut usage_of: impl FnMut(IpNet) -> Arc<EntryUsage>) -> Self {
        self.usage = self.list_entries.iter().map(|n| usage_of(*n)).collect();
        self
    }

    /// Counts a keyed call `net` admitted.
    pub fn count_hit(&self, net: IpNet, now_ms: i64) {
        if let Ok(i) = self.list_entries.binary_search(&net) {
            let u = &self.usage[i];
            u.hits.fetch_add(1, Ordering::Relaxed);
            u.last_ms.fetch_max(now_ms, Ordering::Relaxed);
        }
    }

    /// Whether the account layer admits `addr` now (`always_allow` is the
    /// installation's).
    pub fn admits(&self, addr: IpAddr, always_allow: &PrefixSet) -> bool {
        let addr = normalize(addr);
        if always_allow.longest_match(addr).is_some() {
            return true;
        }
        !self.denied.contains(&source_unit(addr))
            && (self.api != ApiMode::Active || self.list.longest_match(addr).is_some())
    }

    /// Sources some usable key of this account may call from: with API
    /// blocking active, the list narrowed to what some key's allowlist
    /// admits (an empty allowlist admits all); otherwise every key's
    /// allowlist (an unrestricted key: everything). Exact, so the union of
    /// every account's is what the XDP guard may let through.
    fn compute_api_sources(&self) -> Vec<IpNet> {
        let usable: Vec<&Arc<KeyPolicy>> = self.keys.iter().filter(|k| k.usable()).collect();
        if usable.is_empty() {
            return Vec::new();
        }
        let unrestricted = usable.iter().any(|k| k.allow.is_empty());
        let mut out = Vec::new();
        if self.api != ApiMode::Active {
            if unrestricted {
                out.push("0.0.0.0/0".parse().expect("valid"));
                out.push("::/0".parse().expect("valid"));
            } else {
                out.extend(usable.iter().flat_map(|k| k.allow.iter().copied()));
            }
        } else if unrestricted {
            out.extend(self.list_entries.iter().copied());
        } else {
            let keys_set = PrefixSet::new(usable.iter().flat_map(|k| k.allow.iter().copied()));
            // Two prefixes overlap only if one holds the other; their
            // intersection is then the longer one.
            for a in &self.list_entries {
                if keys_set.covers(a) {
                    out.push(*a);
                }
            }
            for k in &usable {
                for n in &k.allow {
                    if self.list.covers(n) {
                        out.push(*n);
                    }
                }
            }
        }
        out.sort_by_key(|n| (n.addr(), n.prefix_len()));
        out.dedup();
        out
    }
}

/// A decision and everything the caller needs to act on and log it.
#[derive(Clone, Debug)]
pub struct Decision {
    pub reason: Reason,
    pub key: Option<Arc<KeyPolicy>>,
    /// The key's account, once the key is known.
    pub account: Option<Arc<AccountPolicy>>,
    /// Which list and prefix decided (for the usage log).
    pub rule: Rule,
    pub rate: Option<super::RateInfo>,
    /// In learning mode: the network to authorize after this success.
    pub learn: Option<IpNet>,
}

impl Decision {
    fn deny(reason: Reason, key: Option<Arc<KeyPolicy>>, rule: Rule) -> Decision {
        Decision {
            reason,
            key,
            account: None,
            rule,
            rate: None,
            learn: None,
        }
    }

    pub fn allowed(&self) -> bool {
        self.reason == Reason::Ok
    }

    /// The account's name, once the key is known.
    pub fn account_name(&self) -> Option<&str> {
        self.account.as_deref().map(|a| a.name.as_str())
    }
}

/// A key with its account's piece: the decision reaches both through one
/// lookup (at 10k accounts, a second map lookup is two more cache misses
/// on a cold request).
type Entry = (Arc<KeyPolicy>, Arc<AccountPolicy>);
type Shard = Arc<HashMap<u64, Entry>>;

/// Everything a decision needs, immutable once built.
#[derive(Debug)]
pub struct Snapshot {
    /// Keys by [`id_key`] of the public id, in [`KEY_SHARDS`] shards.
    pub(crate) shards: Vec<Shard>,
    /// Accounts by index.
    pub accounts: HashMap<u32, Arc<AccountPolicy>>,
    /// `[blocking] always_allow`.
    pub always_allow: PrefixSet,
    pub always_allow_list: Vec<IpNet>,
    /// `[proxy] trusted_proxies`: balancers connect from these, so the XDP
    /// guard always admits them (their clients are checked by the proxy
    /// and the connection hooks).
    pub trusted_list: Vec<IpNet>,
    /// The same, for the edge's lookups: it lives in the snapshot so that a
    /// reload changes whom the edge trusts and what the guard admits in
    /// one swap.
    pub trusted: PrefixSet,
    /// `[blocking] smtp_account`: whose list and SMTP mode the kernel
    /// enforces on the SMTP ports.
    pub smtp_account: String,
    pub routes: RouteScopes,
}

impl Default for Snapshot {
    fn default() -> Self {
        Snapshot {
            shards: vec![Arc::default(); KEY_SHARDS],
            accounts: HashMap::new(),
            always_allow: PrefixSet::default(),
            always_allow_list: Vec::new(),
            trusted_list: Vec::new(),
            trusted: PrefixSet::default(),
            smtp_account: super::DEFAULT_ACCOUNT.into(),
            routes: RouteScopes::default(),
        }
    }
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

fn shard_of(k: u64) -> usize {
    (k as usize) % KEY_SHARDS
}

fn canonical(id: &str) -> bool {
    id.len() == 16
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl Snapshot {
    /// An empty snapshot with the installation-wide settings.
    pub fn with_settings(
        always_allow: Vec<IpNet>,
        trusted: Vec<IpNet>,
        smtp_account: &str,
    ) -> Snapshot {
        Snapshot {
            always_allow: PrefixSet::new(always_allow.iter().copied()),
            always_allow_list: always_allow,
            trusted: PrefixSet::new(trusted.iter().copied()),
            trusted_list: trusted,
            smtp_account: smtp_account.to_string(),
            ..Snapshot::default()
        }
    }

    /// A snapshot of `accounts` (and the installation-wide settings of
    /// `base`), indexing every key.
    pub fn build(base: Snapshot, accounts: Vec<Arc<AccountPolicy>>) -> Snapshot {
        let mut shards: Vec<HashMap<u64, Entry>> = vec![HashMap::new(); KEY_SHARDS];
        for a in &accounts {
            for k in &a.keys {
                let id = id_key(&k.id);
                shards[shard_of(id)].insert(id, (k.clone(), a.clone()));
            }
        }
        Snapshot {
            shards: shards.into_iter().map(Arc::new).collect(),
            accounts: accounts.into_iter().map(|a| (a.idx, a)).collect(),
            ..base
        }
    }

    /// A snapshot equal to this one except for the `changed` account pieces
    /// (added or replaced) and the `removed` account indices. Only the key
    /// shards those accounts' keys fall in are rebuilt.
    pub fn with_accounts(&self, changed: Vec<Arc<AccountPolicy>>, removed: &[u32]) -> Snapshot {
        let mut accounts = self.accounts.clone();
        let mut shards = self.shards.clone();
        let mut touched: HashMap<usize, HashMap<u64, Entry>> = HashMap::new();
        // A shard is copied once per change, however many keys land in it.
        fn shard<'a>(
            touched: &'a mut HashMap<usize, HashMap<u64, Entry>>,
            shards: &[Shard],
            i: usize,
        ) -> &'a mut HashMap<u64, Entry> {
            touched.entry(i).or_insert_with(|| (*shards[i]).clone())
        }
        let gone = removed
            .iter()
            .filter_map(|idx| accounts.remove(idx))
            .collect::<Vec<_>>();
        for a in gone {
            for k in &a.keys {
                let id = id_key(&k.id);
                shard(&mut touched, &shards, shard_of(id)).remove(&id);
            }
        }
        for a in changed {
            if let Some(old) = accounts.get(&a.idx) {
                for k in &old.keys {
                    let id = id_key(&k.id);
                    shard(&mut touched, &shards, shard_of(id)).remove(&id);
                }
            }
            for k in &a.keys {
                let id = id_key(&k.id);
                shard(&mut touched, &shards, shard_of(id)).insert(id, (k.clone(), a.clone()));
            }
            accounts.insert(a.idx, a);
        }
        for (i, m) in touched {
            shards[i] = Arc::new(m);
        }
        Snapshot {
            shards,
            accounts,
            always_allow: self.always_allow.clone(),
            always_allow_list: self.always_allow_list.clone(),
            trusted_list: self.trusted_list.clone(),
            trusted: self.trusted.clone(),
            smtp_account: self.smtp_account.clone(),
            routes: self.routes.clone(),
        }
    }

    /// This snapshot with other trusted proxies (a configuration reload);
    /// the account pieces and key shards are shared, not copied.
    pub fn with_trusted(&self, trusted: Vec<IpNet>) -> Snapshot {
        Snapshot {
            shards: self.shards.clone(),
            accounts: self.accounts.clone(),
            always_allow: self.always_allow.clone(),
            always_allow_list: self.always_allow_list.clone(),
            trusted: PrefixSet::new(trusted.iter().copied()),
            trusted_list: trusted,
            smtp_account: self.smtp_account.clone(),
            routes: self.routes.clone(),
        }
    }

    /// The key with public id `id`.
    pub fn key(&self, id: &str) -> Option<&Arc<KeyPolicy>> {
        self.entry(id).map(|(k, _)| k)
    }

    /// The key with public id `id` and its account.
    fn entry(&self, id: &str) -> Option<&Entry> {
        let k = id_key(id);
        let entry = self.shards[shard_of(k)].get(&k)?;
        // A canonical id maps to its key one to one; anything else could
        // collide, so compare the text.
        (canonical(id) || entry.0.id == id).then_some(entry)
    }

    /// Every key, in no particular order.
    pub fn keys(&self) -> impl Iterator<Item = &Arc<KeyPolicy>> {
        self.shards.iter().flat_map(|s| s.values().map(|(k, _)| k))
    }

    pub fn account_of(&self, key: &KeyPolicy) -> Option<&Arc<AccountPolicy>> {
        self.accounts.get(&key.account)
    }

    pub fn account_named(&self, name: &str) -> Option<&Arc<AccountPolicy>> {
        self.accounts.values().find(|a| a.name == name)
    }

    /// Whether `key` may be used from `addr` now (both address layers and
    /// the key's state): what a live connection is rechecked against.
    pub fn admits(&self, key: &KeyPolicy, addr: IpAddr) -> bool {
        key.usable()
            && key.admits(addr) != Admit::Refused
            && self
                .account_of(key)
                .is_some_and(|a| a.admits(addr, &self.always_allow))
    }

    /// The checks of SPEC.md in order: authentication (401), scope (403
    /// permission_denied), source (403 IP_NOT_ALLOWED), rate (429). The
    /// source check is the key's allowlist, then its account's.
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
        // Looked up first, and the memory the checks below will read is
        // touched now: on a cold request those loads (the key, its
        // allowlist, its account and list, its counters) miss the cache,
        // and issued here they overlap each other and the hashing below
        // instead of following one another. The secret is hashed whether
        // or not the id exists, so an unknown id is not answered markedly
        // faster (and ids are 64 random bits: not a space to search).
        let entry = self.entry(id);
        if let Some((k, a)) = entry {
            std::hint::black_box((
                k.allow.first().map(IpNet::prefix_len),
                k.runtime.requests.load(Ordering::Relaxed),
                a.list.warm(),
                a.denied.len(),
            ));
        }
        let hash = hash_secret(secret);
        let Some((key, account)) = entry else {
            return Decision::deny(Reason::UnknownKey, None, Rule::Auth("unknown key id"));
        };
        let key = key.clone();
        let account = account.clone();
        // Every refusal past this point belongs to the key's account (its
        // usage log shows the failed attempts on its keys).
        let deny = |reason, key, rule| Decision {
            account: Some(account.clone()),
            ..Decision::deny(reason, Some(key), rule)
        };
        let current: bool = hash.ct_eq(&key.secret_hash).into();
        // The secret is checked before the key's state: only a caller who
        // holds the secret may learn that a key is revoked (and even then
        // the body is the one every 401 has).
        if !current {
            match key.previous {
                Some((prev, until)) if bool::from(hash.ct_eq(&prev)) => {
                    if now_ms >= until {
                        return deny(
                            Reason::ExpiredSecret,
                            key,
                            Rule::Auth("previous secret expired"),
                        );
                    }
                }
                _ => {
                    return deny(Reason::BadSecret, key, Rule::Auth("wrong secret"));
                }
            }
        }
        if key.status == KeyStatus::Revoked {
            return deny(Reason::Revoked, key, Rule::Auth("key revoked"));
        }
        if !self.routes.allows(key.scopes, method, path) {
            return deny(Reason::Scope, key, Rule::Scope);
        }
        let key_rule = key.admits(client);
        if key_rule == Admit::Refused {
            return deny(Reason::KeyAllowlist, key, Rule::KeyNoMatch);
        }
        let mut learn = None;
        let account_rule = if let Some(net) = self.always_allow.longest_match(client) {
            AccountMatch::AlwaysAllow(net)
        } else if account.denied.contains(&source_unit(client)) {
            return deny(Reason::Denied, key, Rule::Denied);
        } else {
            match (account.api, account.list.longest_match(client)) {
                (_, Some(net)) => AccountMatch::Listed(net),
                (ApiMode::Active, None) => {
                    return deny(Reason::AccountList, key, Rule::AccountNoMatch);
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
                let mut d = deny(Reason::RateLimited, key, Rule::Rate(limit));
                d.rate = Some(info);
                return d;
            }
            rate = Some(info);
        }
        key.runtime.last_used_ms.store(now_ms, Ordering::Relaxed);
        key.runtime.requests.fetch_add(1, Ordering::Relaxed);
        if let AccountMatch::Listed(net) = &account_rule {
            account.count_hit(*net, now_ms);
        }
        Decision {
            reason: Reason::Ok,
            key: Some(key),
            account: Some(account),
            rule: Rule::Allowed {
                key: key_rule,
                account: account_rule,
            },
            rate,
            learn,
        }
    }

    /// Whether some account's API blocking is active (the API guard can
    /// only be armed then).
    pub fn api_blocking_active(&self) -> bool {
        self.accounts.values().any(|a| a.api == ApiMode::Active)
    }

    /// Every source some request could be allowed from: `always_allow`,
    /// trusted proxies, and each account's [`AccountPolicy::api_sources`].
    /// Exact: an address outside it is refused by `decide` whatever key it
    /// presents, so XDP may drop it.
    pub fn api_guard_union(&self) -> Vec<IpNet> {
        let mut out: Vec<IpNet> = self.always_allow_list.clone();
        out.extend(self.trusted_list.iter().copied());
        for a in self.accounts.values() {
            out.extend(a.api_sources.iter().copied());
        }
        out.sort_by_key(|n| (n.addr(), n.prefix_len()));
        out.dedup();
        out
    }

    /// The account `[blocking] smtp_account` names, if it exists.
    pub fn smtp(&self) -> Option<&Arc<AccountPolicy>> {
        self.account_named(&self.smtp_account)
    }

    /// SMTP is guarded by the SMTP account's list alone (and
    /// `always_allow`, trusted proxies).
    pub fn smtp_guard_union(&self) -> Vec<IpNet> {
        let mut out = self.always_allow_list.clone();
        out.extend(self.trusted_list.iter().copied());
        if let Some(a) = self.smtp() {
            out.extend(a.list_entries.iter().copied());
        }
        out.sort_by_key(|n| (n.addr(), n.prefix_len()));
        out.dedup();
        out
    }
}

#[cfg(test)]
mod tests;
