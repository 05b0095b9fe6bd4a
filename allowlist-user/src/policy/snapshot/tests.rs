use std::{collections::HashSet, net::IpAddr, sync::Arc};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use proptest::prelude::*;

use super::*;
use crate::policy::{RateLimit, Scope, ScopeSet};

fn key(id: &str, secret: &str, allow: &[&str], scopes: &[Scope]) -> Arc<KeyPolicy> {
    key_in(0, id, secret, allow, scopes)
}

fn key_in(
    account: u32,
    id: &str,
    secret: &str,
    allow: &[&str],
    scopes: &[Scope],
) -> Arc<KeyPolicy> {
    Arc::new(KeyPolicy {
        id: id.into(),
        kid: 1,
        account,
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

fn account(
    idx: u32,
    keys: Vec<Arc<KeyPolicy>>,
    mode: ApiMode,
    list: &[&str],
    denied: &[IpAddr],
) -> Arc<AccountPolicy> {
    Arc::new(AccountPolicy::new(
        format!("a{idx}"),
        idx,
        (0, 0),
        (mode, SmtpMode::Inactive),
        list.iter().map(|a| a.parse().unwrap()).collect(),
        denied.iter().map(|a| source_unit(*a)).collect(),
        keys,
    ))
}

fn snap(keys: Vec<Arc<KeyPolicy>>, mode: ApiMode, list: &[&str]) -> Snapshot {
    snap_denied(keys, mode, list, &[], &[])
}

fn snap_denied(
    keys: Vec<Arc<KeyPolicy>>,
    mode: ApiMode,
    list: &[&str],
    denied: &[IpAddr],
    always: &[&str],
) -> Snapshot {
    let always: Vec<IpNet> = always.iter().map(|a| a.parse().unwrap()).collect();
    let base = Snapshot {
        always_allow: PrefixSet::new(always.iter().copied()),
        always_allow_list: always,
        ..Default::default()
    };
    Snapshot::build(base, vec![account(0, keys, mode, list, denied)])
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
    let d =
        |cred: Option<&str>, m: &str, src: &str| s.decide(cred, m, "/emails", ip(src), 0).reason;
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
        let keys = || vec![key("k1", "s", &[], &[Scope::Full])];
        let denied = [ip("198.51.100.7"), ip("2001:db8:1:2::99")];
        let s = snap_denied(keys(), mode, &["198.51.100.0/24"], &denied, &[]);
        let d = s.decide(Some("alk_k1_s"), "GET", "/", ip("198.51.100.7"), 0);
        assert_eq!((d.reason, d.learn), (Reason::Denied, None), "{mode:?}");
        assert_eq!(d.reason.code(), "IP_NOT_ALLOWED");
        let k = s.key("k1").unwrap().clone();
        assert!(!s.admits(&k, ip("198.51.100.7")));
        // Mapped IPv6 is the same address.
        assert!(!s.admits(&k, ip("::ffff:198.51.100.7")));
        // IPv6 is denied per /64.
        assert!(!s.admits(&k, ip("2001:db8:1:2:ffff::1")));
        assert!(s.admits(&k, ip("2001:db8:1:3::1")) || mode == ApiMode::Active);
        assert!(
            s.decide(Some("alk_k1_s"), "GET", "/", ip("198.51.100.8"), 0)
                .allowed()
        );
        // always_allow wins over everything.
        let s = snap_denied(
            keys(),
            mode,
            &["198.51.100.0/24"],
            &denied,
            &["198.51.100.7/32"],
        );
        assert!(
            s.decide(Some("alk_k1_s"), "GET", "/", ip("198.51.100.7"), 0)
                .allowed()
        );
    }
}

#[test]
fn each_account_is_judged_by_its_own_list_and_mode() {
    let a = account(
        1,
        vec![key_in(1, "ka", "s", &[], &[Scope::Full])],
        ApiMode::Active,
        &["192.0.2.0/24"],
        &[ip("192.0.2.9")],
    );
    let b = account(
        2,
        vec![key_in(2, "kb", "s", &[], &[Scope::Full])],
        ApiMode::Learning,
        &[],
        &[],
    );
    let s = Snapshot::build(Snapshot::default(), vec![a, b.clone()]);
    let d = |k: &str, src: &str| s.decide(Some(&format!("alk_{k}_s")), "GET", "/", ip(src), 0);
    // A's list does not admit 198.51.100.1; B learns it.
    assert_eq!(d("ka", "198.51.100.1").reason, Reason::AccountList);
    let learned = d("kb", "198.51.100.1");
    assert!(learned.allowed());
    assert_eq!(learned.account_name(), Some("a2"));
    assert_eq!(learned.learn, Some("198.51.100.0/24".parse().unwrap()));
    // A's deny does not touch B.
    assert_eq!(d("ka", "192.0.2.9").reason, Reason::Denied);
    assert!(d("kb", "192.0.2.9").allowed());
    // Replacing one account's piece shares the other's.
    let b2 = account(
        2,
        vec![key_in(2, "kb", "s", &[], &[Scope::Full])],
        ApiMode::Active,
        &["198.51.100.0/24"],
        &[],
    );
    let s2 = s.with_accounts(vec![b2], &[]);
    assert!(Arc::ptr_eq(&s.accounts[&1], &s2.accounts[&1]));
    assert!(!Arc::ptr_eq(&b, &s2.accounts[&2]));
    let d2 = |k: &str, src: &str| s2.decide(Some(&format!("alk_{k}_s")), "GET", "/", ip(src), 0);
    assert!(d2("kb", "198.51.100.1").allowed());
    assert_eq!(d2("kb", "203.0.113.1").reason, Reason::AccountList);
    // Removing an account removes its keys.
    let s3 = s2.with_accounts(Vec::new(), &[1]);
    assert_eq!(
        s3.decide(Some("alk_ka_s"), "GET", "/", ip("192.0.2.1"), 0)
            .reason,
        Reason::UnknownKey
    );
    assert!(s3.key("kb").is_some());
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
    /// The XDP guard must never drop a source that some key of some account
    /// could use, and lets through nothing no key could use (besides
    /// always_allow): every address `decide` allows (with any key) is in
    /// the union, and every address in it is allowed for some key.
    #[test]
    fn guard_union_is_exact_across_accounts(
        accounts in prop::collection::vec((
            prop::collection::vec((prop::collection::vec(arb_net(), 0..4), any::<bool>()), 0..4),
            prop::collection::vec(arb_net(), 0..6),
            0u8..3,
        ), 1..4),
        always in prop::collection::vec(arb_net(), 0..2),
        addrs in prop::collection::vec(arb_addr(), 1..40),
    ) {
        let mut pieces = Vec::new();
        let mut all_keys = Vec::new();
        for (ai, (keys, list, mode)) in accounts.iter().enumerate() {
            let mut policies = Vec::new();
            for (i, (allow, revoked)) in keys.iter().enumerate() {
                let mut allow = allow.clone();
                allow.sort_by_key(|n| (n.addr(), n.prefix_len()));
                allow.dedup();
                let k = Arc::new(KeyPolicy {
                    id: format!("k{ai}x{i}"),
                    kid: (ai * 10 + i) as u32,
                    account: ai as u32,
                    name: String::new(),
                    status: if *revoked { KeyStatus::Revoked } else { KeyStatus::Active },
                    scopes: ScopeSet::of(&[Scope::Full]),
                    secret_hash: hash_secret("s"),
                    previous: None,
                    allow,
                    rate: None,
                    runtime: Arc::default(),
                });
                all_keys.push(k.clone());
                policies.push(k);
            }
            let mode = [ApiMode::Active, ApiMode::Learning, ApiMode::Inactive][*mode as usize];
            let mut list = list.clone();
            list.sort_by_key(|n| (n.addr(), n.prefix_len()));
            list.dedup();
            pieces.push(Arc::new(AccountPolicy::new(
                format!("a{ai}"), ai as u32, (0, 0), (mode, SmtpMode::Inactive),
                list, HashSet::new(), policies,
            )));
        }
        let base = Snapshot {
            always_allow: PrefixSet::new(always.iter().copied()),
            always_allow_list: always,
            ..Default::default()
        };
        let s = Snapshot::build(base, pieces);
        let union = PrefixSet::new(s.api_guard_union());
        for addr in addrs {
            let allowed = all_keys.iter().any(|k| s.decide(Some(&format!("alk_{}_s", k.id)), "GET", "/", addr, 0).allowed());
            let in_union = union.longest_match(addr).is_some();
            prop_assert!(!allowed || in_union, "{} allowed but not in the guard union", addr);
            let always = s.always_allow.longest_match(addr).is_some();
            prop_assert!(!in_union || allowed || always, "{} in the guard union but no key is allowed from it", addr);
        }
    }
}

/// A reload's new trusted proxies reach the edge's lookups and both guard
/// unions together, and nothing else of the snapshot changes.
#[test]
fn other_trusted_proxies_change_trust_and_the_unions_only() {
    let s = snap(
        vec![key("0123456789abcdef", "s", &["203.0.113.0/24"], &[])],
        ApiMode::Active,
        &["203.0.113.0/24"],
    );
    let balancer: IpNet = "198.51.100.70/32".parse().unwrap();
    assert!(s.trusted.longest_match(ip("198.51.100.70")).is_none());
    let t = s.with_trusted(vec![balancer]);
    assert!(t.trusted.longest_match(ip("198.51.100.70")).is_some());
    assert!(t.api_guard_union().contains(&balancer));
    assert!(t.smtp_guard_union().contains(&balancer));
    assert!(!s.api_guard_union().contains(&balancer));
    assert!(t.key("0123456789abcdef").is_some());
    assert_eq!(t.accounts.len(), s.accounts.len());
    // And back.
    let u = t.with_trusted(Vec::new());
    assert!(u.trusted.longest_match(ip("198.51.100.70")).is_none());
    assert_eq!(u.api_guard_union(), s.api_guard_union());
}
