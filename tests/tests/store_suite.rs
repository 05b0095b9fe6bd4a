//! One store test suite, run on both backends: the SQLite file and a real
//! PostgreSQL server started for the test (Debian's `postgresql`). Each case
//! gets an empty store of its own; the same assertions hold on both. Then
//! what only several edges on one PostgreSQL can do: writers at once from
//! two handles, a server that is down, a schema newer than the binary.

use std::{
    net::IpAddr,
    sync::{Arc, Barrier},
};

use allowlist::{
    logs::{DayFiles, LogQuery, LogRecord, LogStore},
    policy::{ApiMode, KeyStatus, RateLimit, Role, Scope, SmtpMode},
    store::{
        AccountStore, ActionRecord, AllowRecord, AuditQuery, AuthorizedRecord, BlockingState,
        Claim, DropKind, DropRecord, KeyRecord, PgOptions, PgStore, SqliteStore, Store, StoreError,
        TokenRecord, UnauthorizedRecord, WebhookRecord,
    },
};
use allowlist_tests::postgres::{PASSWORD, PgServer, postgres_available};
use sha2::Digest;

type Case = (&'static str, fn(&dyn Fn() -> Box<dyn Store>));

/// Every case: `open` gives another handle on the case's one store (a
/// second edge, for the cases that write from two at once).
const CASES: &[Case] = &[
    ("drops_round_trip", drops_round_trip),
    ("accounts_and_blocking", accounts_and_blocking),
    ("removing_an_account_removes_what_it_owns", remove_account),
    ("keys_round_trip", keys_round_trip),
    ("key_numbers_are_never_given_twice", key_numbers),
    ("usage_counters_add_up", usage_counters_add_up),
    ("authorized_list", authorized_list),
    ("unauthorized_list_and_its_cap", unauthorized_list),
    ("tokens", tokens),
    ("webhooks_keep_their_secret_out_of_the_audit", webhooks),
    ("action_links_are_claimed_once", action_links),
    ("two_writers_count_every_use", two_writers_count_every_use),
    (
        "two_edges_learning_one_prefix_make_one_entry",
        two_edges_learn_once,
    ),
];

fn pg_options(url: String) -> PgOptions {
    PgOptions {
        url,
        ca: None,
        pool: 4,
    }
}

#[test]
fn store_suite_on_sqlite() {
    for (name, case) in CASES {
        eprintln!("sqlite: {name}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("allowlist.db");
        case(&|| Box::new(SqliteStore::open(&path).unwrap()));
    }
}

#[test]
fn store_suite_on_postgres() {
    if !postgres_available("store_suite_on_postgres") {
        return;
    }
    let server = PgServer::start();
    for (i, (name, case)) in CASES.iter().enumerate() {
        eprintln!("postgres: {name}");
        let url = server.create_db(&format!("case{i}"));
        case(&|| Box::new(PgStore::open(&pg_options(url.clone())).unwrap()));
    }
}

fn drop_rec(cidr: &str, expires_at: Option<i64>) -> DropRecord {
    DropRecord {
        cidr: cidr.parse().unwrap(),
        kind: DropKind::Manual,
        reason: "test".into(),
        created_at: 1,
        expires_at,
        created_by: "uid:0".into(),
    }
}

fn actions(s: &dyn Store, account: Option<&str>) -> Vec<String> {
    s.audit_log(&AuditQuery {
        account: account.map(str::to_string),
        limit: 100,
        ..Default::default()
    })
    .unwrap()
    .into_iter()
    .map(|a| a.action)
    .collect()
}

fn drops_round_trip(open: &dyn Fn() -> Box<dyn Store>) {
    {
        let s = open();
        assert!(
            s.put_drop(&drop_rec("192.0.2.0/24", None), "uid:0")
                .unwrap()
                .is_none()
        );
        assert!(
            s.put_drop(&drop_rec("2001:db8::/48", Some(100)), "uid:0")
                .unwrap()
                .is_none()
        );
        let prev = s
            .put_drop(&drop_rec("192.0.2.0/24", Some(50)), "uid:0")
            .unwrap();
        assert_eq!(prev.unwrap().expires_at, None);
        s.put_drops(
            &[
                drop_rec("198.51.100.0/24", None),
                drop_rec("198.51.100.0/24", None),
                drop_rec("203.0.113.9/32", None),
            ],
            "uid:0",
        )
        .unwrap();
    }
    // Reopened: it was durable.
    let s = open();
    let all: Vec<String> = s
        .list_drops()
        .unwrap()
        .iter()
        .map(|d| d.cidr.to_string())
        .collect();
    assert_eq!(
        all,
        [
            "192.0.2.0/24",
            "198.51.100.0/24",
            "2001:db8::/48",
            "203.0.113.9/32"
        ]
    );
    let expired = s.remove_expired_drops(60).unwrap();
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0].cidr.to_string(), "192.0.2.0/24");
    assert!(s.remove_expired_drops(60).unwrap().is_empty());
    let gone = s
        .remove_drop(&"2001:db8::/48".parse().unwrap(), "uid:0")
        .unwrap()
        .unwrap();
    assert_eq!(gone.expires_at, Some(100));
    assert!(
        s.remove_drop(&"2001:db8::/48".parse().unwrap(), "uid:0")
            .unwrap()
            .is_none()
    );
    assert_eq!(
        actions(&*s, None),
        [
            "drop.remove",
            "drop.expire",
            "drop.import",
            "drop.add",
            "drop.add",
            "drop.add"
        ]
    );
}

fn account(name: &str, parent: Option<&str>) -> allowlist::store::AccountRecord {
    allowlist::store::AccountRecord {
        idx: 0,
        name: name.into(),
        parent: parent.map(str::to_string),
        emails: vec![format!("ops@{name}.example")],
        enforce_blocking: false,
        created_at: 1_000,
        blocking: BlockingState {
            api: ApiMode::Learning,
            api_since: 1_000,
            smtp: SmtpMode::Inactive,
            smtp_since: 1_000,
        },
        last_learned_at: 1_000,
    }
}

fn accounts_and_blocking(open: &dyn Fn() -> Box<dyn Store>) {
    let s = open();
    let all = s.list_accounts().unwrap();
    assert_eq!(all.len(), 1, "a new store has the default account");
    assert_eq!(all[0].name, "default");
    assert_eq!(
        (all[0].blocking.api, all[0].blocking.smtp),
        (ApiMode::Learning, SmtpMode::Inactive)
    );
    let acme = s.create_account(&account("acme", None), "uid:0").unwrap();
    let sub = s
        .create_account(&account("acme-eu", Some("acme")), "uid:0")
        .unwrap();
    assert!(acme.idx > all[0].idx && sub.idx > acme.idx, "indexes grow");
    let dup = s.create_account(&account("acme", None), "uid:0");
    assert!(dup.is_err(), "a name is unique");

    let mut changed = acme.clone();
    changed.emails = vec!["a@acme.example".into(), "b@acme.example".into()];
    changed.enforce_blocking = true;
    s.update_account(
        &changed,
        "account.set",
        serde_json::json!({"emails": 2}),
        "uid:0",
    )
    .unwrap();
    s.set_blocking("acme", "api", "active", "token:t1", 2_000)
        .unwrap();
    s.set_blocking("acme", "smtp", "active", "token:t1", 2_001)
        .unwrap();
    let got = s
        .list_accounts()
        .unwrap()
        .into_iter()
        .find(|a| a.name == "acme")
        .unwrap();
    assert_eq!(got.emails, changed.emails);
    assert!(got.enforce_blocking);
    assert_eq!(got.blocking.api, ApiMode::Active);
    assert_eq!(got.blocking.api_since, 2_000);
    assert_eq!(got.blocking.smtp, SmtpMode::Active);
    assert_eq!(got.blocking.smtp_since, 2_001);
    assert_eq!(got.idx, acme.idx);
    assert_eq!(s.accounts_named(Some("acme")).unwrap(), vec![got.clone()]);
    assert!(s.accounts_named(Some("nobody")).unwrap().is_empty());
    assert_eq!(
        actions(&*s, Some("acme")),
        [
            "blocking.set",
            "blocking.set",
            "account.set",
            "account.create"
        ]
    );
    let by_actor = s
        .audit_log(&AuditQuery {
            actor: Some("token:t1".into()),
            limit: 1,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(by_actor.len(), 1);
    assert!(by_actor[0].detail.contains("smtp"), "{:?}", by_actor[0]);
}

fn key(id: &str, account: &str, allow: &[&str]) -> KeyRecord {
    KeyRecord {
        kid: 0,
        id: id.into(),
        account: account.into(),
        name: format!("{id} name"),
        description: "for the suite".into(),
        scopes: vec![Scope::Full],
        status: KeyStatus::Active,
        secret_hash: sha2::Sha256::digest(id.as_bytes()).into(),
        previous: None,
        rate: None,
        created_at: 5,
        last_used_ms: None,
        requests_day: 0,
        requests_today: 0,
        allow: allow
            .iter()
            .map(|c| AllowRecord {
                cidr: c.parse().unwrap(),
                label: format!("label {c}"),
            })
            .collect(),
    }
}

fn authorized(cidr: &str, source: &str, at: i64) -> AuthorizedRecord {
    AuthorizedRecord {
        cidr: cidr.parse().unwrap(),
        label: String::new(),
        source: source.into(),
        key_id: None,
        created_at: at,
        created_by: "uid:0".into(),
        shared: false,
    }
}

fn refusal(account: &str, addr: &str, key: &str, at: i64) -> UnauthorizedRecord {
    let mut r = UnauthorizedRecord::refused(
        account,
        addr.parse::<IpAddr>().unwrap(),
        "api",
        key.into(),
        0,
        at,
    );
    r.hit(at);
    r
}

fn token(id: &str, account: Option<&str>) -> TokenRecord {
    TokenRecord {
        id: id.into(),
        name: format!("{id} token"),
        account: account.map(str::to_string),
        role: if account.is_some() {
            Role::Owner
        } else {
            Role::Operator
        },
        hash: sha2::Sha256::digest(id.as_bytes()).into(),
        created_at: 10,
        expires_at: Some(10_000),
        revoked_at: None,
        created_by: "uid:0".into(),
    }
}

fn remove_account(open: &dyn Fn() -> Box<dyn Store>) {
    let s = open();
    s.create_account(&account("acme", None), "uid:0").unwrap();
    s.create_account(&account("other", None), "uid:0").unwrap();
    s.create_key(&key("k-acme", "acme", &["192.0.2.0/24"]), "uid:0")
        .unwrap();
    s.create_key(&key("k-other", "other", &[]), "uid:0")
        .unwrap();
    s.add_authorized("acme", &authorized("198.51.100.0/24", "manual", 1), "uid:0")
        .unwrap();
    s.add_authorized(
        "other",
        &authorized("198.51.100.0/24", "manual", 1),
        "uid:0",
    )
    .unwrap();
    s.record_unauthorized(&[refusal("acme", "203.0.113.5", "k-acme", 9)], 100)
        .unwrap();
    s.create_token(&token("t-acme", Some("acme")), "uid:0")
        .unwrap();
    s.remove_account("acme", "uid:0").unwrap();
    assert!(s.list_accounts().unwrap().iter().all(|a| a.name != "acme"));
    let keys: Vec<String> = s.list_keys().unwrap().into_iter().map(|k| k.id).collect();
    assert_eq!(keys, ["k-other"]);
    let auth: Vec<String> = s
        .list_authorized()
        .unwrap()
        .into_iter()
        .map(|(a, _)| a)
        .collect();
    assert_eq!(auth, ["other"]);
    assert!(s.list_unauthorized(Some("acme")).unwrap().is_empty());
    let t = s.list_tokens().unwrap();
    assert!(t[0].revoked_at.is_some(), "its tokens are revoked");
    let audit = s
        .audit_log(&AuditQuery {
            account: Some("acme".into()),
            limit: 1,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(audit[0].action, "account.remove");
    assert!(audit[0].detail.contains("k-acme"));
}

fn keys_round_trip(open: &dyn Fn() -> Box<dyn Store>) {
    let s = open();
    s.create_account(&account("acme", None), "uid:0").unwrap();
    let a = s
        .create_key(
            &key("k1", "acme", &["192.0.2.0/24", "2001:db8::/48"]),
            "uid:0",
        )
        .unwrap();
    let b = s.create_key(&key("k2", "acme", &[]), "uid:0").unwrap();
    assert!(a.kid > 0 && b.kid > a.kid, "kids grow: {} {}", a.kid, b.kid);
    assert!(
        s.create_key(&key("k1", "acme", &[]), "uid:0").is_err(),
        "an id is unique"
    );
    let listed = s.list_keys().unwrap();
    assert_eq!(listed, vec![a.clone(), b.clone()]);
    s.create_key(&key("k3", "default", &["198.51.100.0/24"]), "uid:0")
        .unwrap();
    assert_eq!(s.keys_of(Some("acme")).unwrap(), vec![a.clone(), b.clone()]);
    assert_eq!(s.keys_of(Some("default")).unwrap()[0].allow.len(), 1);
    assert!(s.keys_of(Some("nobody")).unwrap().is_empty());

    let mut rotated = a.clone();
    rotated.previous = Some((rotated.secret_hash, 123_456));
    rotated.secret_hash = [7; 32];
    rotated.status = KeyStatus::Rotating;
    rotated.scopes = vec![Scope::Read, Scope::Send];
    rotated.rate = Some(RateLimit::parse("100/min").unwrap());
    rotated.allow = vec![AllowRecord {
        cidr: "203.0.113.0/24".parse().unwrap(),
        label: "new office".into(),
    }];
    rotated.description = "rotated".into();
    s.update_key(&rotated, "key.rotate", serde_json::json!({}), "uid:0")
        .unwrap();
    let listed = s.list_keys().unwrap();
    assert_eq!(listed[0], rotated);
    assert_eq!(listed[1], b);
    let audit = s
        .audit_log(&AuditQuery {
            limit: 1,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(audit[0].action, "key.rotate");
    assert!(
        audit[0].detail.contains("\"k1\""),
        "the key id is added to the detail"
    );
}

fn key_numbers(open: &dyn Fn() -> Box<dyn Store>) {
    let s = open();
    s.create_account(&account("gone", None), "uid:0").unwrap();
    let mut k = key("k1", "gone", &[]);
    k.kid = s.next_kid().unwrap();
    let stored = s.create_key(&k, "uid:0").unwrap();
    assert_eq!(stored.kid, k.kid, "the key keeps the number it was given");
    assert_eq!(s.list_keys().unwrap()[0].kid, k.kid);
    // The key goes with its account; its number is not given again.
    s.remove_account("gone", "uid:0").unwrap();
    let next = s.next_kid().unwrap();
    assert!(next > k.kid, "{next} after {}", k.kid);
    // A key stored without a number gets one past it.
    let auto = s.create_key(&key("k2", "default", &[]), "uid:0").unwrap();
    assert!(auto.kid > k.kid);
}

fn usage_counters_add_up(open: &dyn Fn() -> Box<dyn Store>) {
    let s = open();
    let k = s.create_key(&key("k1", "default", &[]), "uid:0").unwrap();
    s.flush_usage(&[(k.kid, 1_000, 3)], 20).unwrap();
    s.flush_usage(&[(k.kid, 900, 2), (k.kid, 1_100, 1)], 20)
        .unwrap();
    let got = &s.list_keys().unwrap()[0];
    assert_eq!(
        (got.last_used_ms, got.requests_day, got.requests_today),
        (Some(1_100), 20, 6)
    );
    // A new day starts the count again.
    s.flush_usage(&[(k.kid, 2_000, 4)], 21).unwrap();
    let got = &s.list_keys().unwrap()[0];
    assert_eq!((got.requests_day, got.requests_today), (21, 4));
    s.flush_usage(&[], 21).unwrap();

    let net: ipnet::IpNet = "192.0.2.0/24".parse().unwrap();
    s.flush_entry_usage(&[("default".into(), net, 50, 2)])
        .unwrap();
    s.flush_entry_usage(&[
        ("default".into(), net, 40, 3),
        ("default".into(), net, 60, 1),
    ])
    .unwrap();
    assert_eq!(s.entry_usage("default").unwrap()[&net], (6, 60));
    assert!(s.entry_usage("other").unwrap().is_empty());
}

fn authorized_list(open: &dyn Fn() -> Box<dyn Store>) {
    let s = open();
    s.create_account(&account("org", None), "uid:0").unwrap();
    s.create_account(&account("org-sub", Some("org")), "uid:0")
        .unwrap();
    assert!(
        s.add_authorized("org", &authorized("192.0.2.0/24", "manual", 10), "uid:0")
            .unwrap()
    );
    assert!(
        !s.add_authorized("org", &authorized("192.0.2.0/24", "manual", 11), "uid:0")
            .unwrap(),
        "a listed prefix is not added twice"
    );
    let mut learned = authorized("198.51.100.0/24", "learned", 5_000);
    learned.key_id = Some("k1".into());
    learned.created_by = "learning".into();
    assert!(s.add_authorized("org", &learned, "learning").unwrap());
    let org = |s: &dyn Store| {
        s.list_accounts()
            .unwrap()
            .into_iter()
            .find(|a| a.name == "org")
            .unwrap()
    };
    assert_eq!(org(&*s).last_learned_at, 5_000, "the learning clock moved");
    // The clock never moves back.
    assert!(
        s.add_authorized(
            "org",
            &authorized("198.51.101.0/24", "learned", 4_000),
            "learning"
        )
        .unwrap()
    );
    assert!(org(&*s).last_learned_at >= 4_000);

    let many: Vec<AuthorizedRecord> = (0..300)
        .map(|i| authorized(&format!("10.{}.{}.0/24", i / 256, i % 256), "manual", 20))
        .chain([authorized("192.0.2.0/24", "manual", 20)])
        .collect();
    assert_eq!(s.add_authorized_many("org", &many, "uid:0").unwrap(), 300);

    let list = s.list_authorized().unwrap();
    assert_eq!(list.len(), 303);
    assert_eq!(s.authorized_of(Some("org")).unwrap(), list);
    assert!(s.authorized_of(Some("org-sub")).unwrap().is_empty());
    let got = list
        .iter()
        .find(|(_, r)| r.cidr.to_string() == "198.51.100.0/24")
        .unwrap();
    assert_eq!(got.1, learned);
    // Ordered by account, then creation time, then prefix.
    let order: Vec<(String, i64, String)> = list
        .iter()
        .map(|(a, r)| (a.clone(), r.created_at, r.cidr.to_string()))
        .collect();
    let mut sorted = order.clone();
    sorted.sort();
    assert_eq!(order, sorted);

    let net: ipnet::IpNet = "192.0.2.0/24".parse().unwrap();
    s.flush_entry_usage(&[("org".into(), net, 1, 1), ("org-sub".into(), net, 1, 1)])
        .unwrap();
    let removed = s.remove_authorized("org", &net, "uid:0").unwrap().unwrap();
    assert_eq!(removed.created_at, 10);
    assert!(s.remove_authorized("org", &net, "uid:0").unwrap().is_none());
    assert!(
        s.entry_usage("org-sub").unwrap().is_empty(),
        "a removed entry's hits go, in sub-accounts too"
    );
    let acts = actions(&*s, Some("org"));
    assert_eq!(acts[..2], ["ips.remove", "ips.import"]);
}

fn unauthorized_list(open: &dyn Fn() -> Box<dyn Store>) {
    let s = open();
    s.create_account(&account("acme", None), "uid:0").unwrap();
    let batch = [
        refusal("acme", "203.0.113.1", "k1", 100),
        refusal("acme", "203.0.113.1", "k1", 105),
        refusal("acme", "203.0.113.2", "k1", 101),
        refusal("acme", "2001:db8::9", "k2", 102),
    ];
    assert_eq!(s.record_unauthorized(&batch, 100).unwrap(), 0);
    s.record_unauthorized(&[refusal("acme", "203.0.113.1", "k1", 103)], 100)
        .unwrap();
    let list = s.list_unauthorized(Some("acme")).unwrap();
    assert_eq!(list.len(), 3);
    let one = list
        .iter()
        .find(|r| r.addr.to_string() == "203.0.113.1")
        .unwrap();
    assert_eq!((one.first_seen, one.last_seen, one.attempts), (100, 105, 3));
    assert_eq!(list[0].addr.to_string(), "203.0.113.1", "newest first");

    // Denied entries are never evicted by the cap.
    assert_eq!(
        s.set_unauthorized(
            "acme",
            "203.0.113.2".parse().unwrap(),
            Some("denied"),
            "uid:0"
        )
        .unwrap(),
        1
    );
    let evicted = s
        .record_unauthorized(&[refusal("acme", "203.0.113.50", "k1", 200)], 1)
        .unwrap();
    assert_eq!(evicted, 2);
    let mut left: Vec<(String, String)> = s
        .list_unauthorized(None)
        .unwrap()
        .into_iter()
        .map(|r| (r.addr.to_string(), r.status))
        .collect();
    left.sort();
    assert_eq!(
        left,
        [
            ("203.0.113.2".to_string(), "denied".to_string()),
            ("203.0.113.50".to_string(), "refused".to_string())
        ]
    );
    assert_eq!(
        s.set_unauthorized("acme", "203.0.113.50".parse().unwrap(), None, "uid:0")
            .unwrap(),
        1
    );
    assert!(s.list_unauthorized(Some("other")).unwrap().is_empty());
}

fn tokens(open: &dyn Fn() -> Box<dyn Store>) {
    let s = open();
    s.create_account(&account("acme", None), "uid:0").unwrap();
    s.create_token(&token("op1", None), "uid:0").unwrap();
    s.create_token(&token("own1", Some("acme")), "uid:0")
        .unwrap();
    assert!(
        s.create_token(&token("own1", Some("acme")), "uid:0")
            .is_err()
    );
    let list = s.list_tokens().unwrap();
    assert_eq!(list, vec![token("op1", None), token("own1", Some("acme"))]);
    assert!(s.revoke_token("own1", 50, "uid:0").unwrap());
    assert!(!s.revoke_token("own1", 60, "uid:0").unwrap(), "once");
    assert!(!s.revoke_token("nope", 60, "uid:0").unwrap());
    let t = s.list_tokens().unwrap();
    assert_eq!(t[1].revoked_at, Some(50));
    assert_eq!(actions(&*s, Some("acme"))[0], "token.revoke");
}

fn webhooks(open: &dyn Fn() -> Box<dyn Store>) {
    let s = open();
    let hook = WebhookRecord {
        account: "acme".into(),
        url: "https://hooks.example/x".into(),
        secret: "s3cr3t-s3cr3t-s3cr3t".into(),
        created_at: 1,
        created_by: "uid:0".into(),
    };
    assert!(!s.put_webhook(&hook, "uid:0").unwrap());
    assert!(s.put_webhook(&hook, "uid:0").unwrap(), "replaced");
    assert_eq!(s.list_webhooks(Some("acme")).unwrap(), vec![hook.clone()]);
    assert_eq!(s.list_webhooks(None).unwrap().len(), 1);
    assert!(s.list_webhooks(Some("other")).unwrap().is_empty());
    let audit = s
        .audit_log(&AuditQuery {
            account: Some("acme".into()),
            limit: 10,
            ..Default::default()
        })
        .unwrap();
    assert!(!format!("{audit:?}").contains("s3cr3t"));
    assert!(s.remove_webhook("acme", &hook.url, "uid:0").unwrap());
    assert!(!s.remove_webhook("acme", &hook.url, "uid:0").unwrap());
}

fn link(id: &str, group: &str, expires_at: i64) -> ActionRecord {
    ActionRecord {
        hash: sha2::Sha256::digest(id.as_bytes()).into(),
        id: id.into(),
        group: group.into(),
        account: "acme".into(),
        action: "authorize".into(),
        addr: "192.0.2.7".into(),
        key_id: "k1".into(),
        key_name: "ci".into(),
        nonce: format!("nonce-{id}"),
        created_at: 0,
        expires_at,
        used_at: None,
        used_by: None,
    }
}

fn action_links(open: &dyn Fn() -> Box<dyn Store>) {
    let s = open();
    let (a, b, other) = (
        link("a", "g", 100),
        link("b", "g", 100),
        link("c", "h", 100),
    );
    s.create_actions(&[a.clone(), b.clone(), other.clone()])
        .unwrap();
    assert_eq!(s.find_action(&a.hash).unwrap(), Some(a.clone()));
    assert_eq!(
        s.claim_action(&a.hash, "wrong", 10).unwrap(),
        Claim::BadNonce
    );
    assert!(matches!(
        s.claim_action(&a.hash, "nonce-a", 10).unwrap(),
        Claim::Claimed(r) if r.id == "a"
    ));
    assert!(matches!(
        s.claim_action(&a.hash, "nonce-a", 11).unwrap(),
        Claim::Used(r) if r.used_by.as_deref() == Some("a")
    ));
    assert!(matches!(
        s.claim_action(&b.hash, "nonce-b", 11).unwrap(),
        Claim::Used(_)
    ));
    assert!(matches!(
        s.claim_action(&other.hash, "nonce-c", 100).unwrap(),
        Claim::Expired(_)
    ));
    assert_eq!(s.claim_action(&[9; 32], "x", 10).unwrap(), Claim::Unknown);
    s.release_action("g").unwrap();
    assert!(matches!(
        s.claim_action(&b.hash, "nonce-b", 12).unwrap(),
        Claim::Claimed(_)
    ));
    assert_eq!(s.sweep_actions(101).unwrap(), 3);
    assert_eq!(s.find_action(&a.hash).unwrap(), None);

    // Two edges claiming the same fresh link at once: one wins.
    let d = link("d", "k", 1_000);
    let e = link("e", "k", 1_000);
    s.create_actions(&[d.clone(), e.clone()]).unwrap();
    let claims = at_once(open, 2, move |s, i| {
        let l = if i == 0 { &d } else { &e };
        s.claim_action(&l.hash, &l.nonce, 500).unwrap()
    });
    let won = claims
        .iter()
        .filter(|c| matches!(c, Claim::Claimed(_)))
        .count();
    assert_eq!(won, 1, "{claims:?}");
}

/// Runs `f` on `n` threads, each with its own handle on the store, all
/// released at once.
fn at_once<T: Send + 'static>(
    open: &dyn Fn() -> Box<dyn Store>,
    n: usize,
    f: impl Fn(&dyn Store, usize) -> T + Send + Sync + 'static + Clone,
) -> Vec<T> {
    let barrier = Arc::new(Barrier::new(n));
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let s = open();
            let barrier = barrier.clone();
            let f = f.clone();
            std::thread::spawn(move || {
                barrier.wait();
                f(&*s, i)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

fn two_writers_count_every_use(open: &dyn Fn() -> Box<dyn Store>) {
    let s = open();
    let k = s.create_key(&key("k1", "default", &[]), "uid:0").unwrap();
    let kid = k.kid;
    let net: ipnet::IpNet = "192.0.2.0/24".parse().unwrap();
    // Two edges flushing their counters and refusals 50 times each, at
    // the same moments.
    at_once(open, 2, move |s, i| {
        for n in 0..50i64 {
            s.flush_usage(&[(kid, 1_000 + n, 3)], 7).unwrap();
            s.flush_entry_usage(&[("default".into(), net, 2_000 + n, 2)])
                .unwrap();
            s.record_unauthorized(
                &[
                    refusal("default", "203.0.113.1", "k1", 100 + n),
                    refusal("default", &format!("203.0.113.{}", 2 + i), "k1", 100),
                ],
                1_000,
            )
            .unwrap();
        }
    });
    let got = &s.list_keys().unwrap()[0];
    assert_eq!(got.requests_today, 2 * 50 * 3);
    assert_eq!(got.last_used_ms, Some(1_049));
    assert_eq!(s.entry_usage("default").unwrap()[&net], (2 * 50 * 2, 2_049));
    let list = s.list_unauthorized(None).unwrap();
    assert_eq!(list.len(), 3, "one row per source: {list:?}");
    let shared = list
        .iter()
        .find(|r| r.addr.to_string() == "203.0.113.1")
        .unwrap();
    assert_eq!((shared.attempts, shared.last_seen), (100, 149));
}

fn two_edges_learn_once(open: &dyn Fn() -> Box<dyn Store>) {
    let s = open();
    for round in 0..20 {
        let cidr = format!("198.51.{round}.0/24");
        let added = at_once(open, 2, move |s, i| {
            let mut r = authorized(&cidr, "learned", 10_000 + i as i64);
            r.created_by = "learning".into();
            s.add_authorized("default", &r, "learning").unwrap()
        });
        assert_eq!(
            added.iter().filter(|a| **a).count(),
            1,
            "round {round}: {added:?}"
        );
    }
    assert_eq!(s.list_authorized().unwrap().len(), 20);
    let learned = s
        .audit_log(&AuditQuery {
            actor: Some("learning".into()),
            limit: 100,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(learned.len(), 20, "one audit row per entry");
}

#[test]
fn postgres_errors_say_what_is_wrong_and_never_show_the_password() {
    if !postgres_available("postgres_errors_say_what_is_wrong_and_never_show_the_password") {
        return;
    }
    let mut server = PgServer::start();
    let url = server.create_db("errors");
    let store = PgStore::open(&pg_options(url.clone())).unwrap();
    // Opening again (a second edge, a restart) migrates nothing twice.
    let again = PgStore::open(&pg_options(url.clone())).unwrap();
    assert_eq!(again.list_accounts().unwrap().len(), 1);

    // Two edges numbering keys at once never get the same number.
    let handles: Vec<_> = (0..2)
        .map(|_| {
            let s = PgStore::open(&pg_options(url.clone())).unwrap();
            std::thread::spawn(move || {
                (0..50)
                    .map(|_| allowlist::store::KeyStore::next_kid(&s).unwrap())
                    .collect::<Vec<u32>>()
            })
        })
        .collect();
    let mut nums: Vec<u32> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    nums.sort();
    nums.dedup();
    assert_eq!(nums.len(), 100);

    // A schema from a newer allowlistd.
    server.psql("errors", "UPDATE allowlist_schema SET version = 99");
    let e = PgStore::open(&pg_options(url.clone()))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("newer") && e.contains("99"), "{e}");
    assert!(!e.contains(PASSWORD), "{e}");
    server.psql("errors", "UPDATE allowlist_schema SET version = 1");

    // A wrong password.
    let wrong = url.replace(PASSWORD, "not-the-password");
    let e = PgStore::open(&pg_options(wrong)).err().unwrap().to_string();
    assert!(e.contains("password authentication failed"), "{e}");
    assert!(!e.contains("not-the-password"), "{e}");

    // The server stops: calls fail at once with "cannot reach", and an open
    // store works again once it is back.
    server.stop();
    let e = store.list_accounts().err().unwrap();
    assert!(matches!(e, StoreError::Unavailable { .. }), "{e:?}");
    let e = e.to_string();
    assert!(e.contains("127.0.0.1"), "{e}");
    assert!(!e.contains(PASSWORD), "{e}");
    let e = PgStore::open(&pg_options(url.clone()))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("cannot reach"), "{e}");
    assert!(!e.contains(PASSWORD), "{e}");
    server.resume();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        match store.list_accounts() {
            Ok(a) => {
                assert_eq!(a.len(), 1);
                break;
            }
            Err(e) if std::time::Instant::now() < deadline => {
                eprintln!("not yet: {e}");
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            Err(e) => panic!("the store did not come back: {e}"),
        }
    }

    // Not a URL at all.
    let e = PgStore::open(&pg_options("postgres://[::1".into()))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("not a PostgreSQL URL"), "{e}");
}

/// Checks what an import of 3 accounts, 30 keys and 60 entries wrote.
fn check_import(s: &dyn Store, done: allowlist::store::Imported) {
    assert_eq!((done.accounts, done.keys, done.authorized), (3, 30, 60));
    let keys = s.list_keys().unwrap();
    assert_eq!(keys.len(), 30);
    assert!(keys.iter().all(|k| k.allow.len() == 2));
    let mut kids: Vec<u32> = keys.iter().map(|k| k.kid).collect();
    kids.dedup();
    assert_eq!(kids.len(), 30, "distinct kids");
    assert!(s.next_kid().unwrap() > *kids.iter().max().unwrap());
    assert_eq!(s.keys_of(Some("imp-1")).unwrap().len(), 10);
    assert_eq!(s.list_authorized().unwrap().len(), 60);
    assert_eq!(s.list_accounts().unwrap().len(), 4);
}

fn import_fixture() -> (
    Vec<allowlist::store::AccountRecord>,
    Vec<KeyRecord>,
    Vec<(String, AuthorizedRecord)>,
) {
    let accounts: Vec<_> = (0..3).map(|i| account(&format!("imp-{i}"), None)).collect();
    let mut keys = Vec::new();
    let mut auth = Vec::new();
    for i in 0..3 {
        for k in 0..10 {
            keys.push(key(
                &format!("imp{i}k{k}"),
                &format!("imp-{i}"),
                &[
                    &format!("10.{i}.{k}.0/24"),
                    &format!("2001:db8:{i}:{k}::/64"),
                ],
            ));
        }
        for n in 0..20 {
            auth.push((
                format!("imp-{i}"),
                authorized(&format!("192.0.{n}.0/24"), "manual", 1),
            ));
        }
    }
    (accounts, keys, auth)
}

#[test]
fn a_whole_policy_imports_in_one_transaction_on_both_backends() {
    let (accounts, keys, auth) = import_fixture();
    let dir = tempfile::tempdir().unwrap();
    let s = SqliteStore::open(&dir.path().join("a.db")).unwrap();
    let done = s.import_policy(&accounts, &keys, &auth, "test").unwrap();
    check_import(&s, done);
    if !postgres_available("a_whole_policy_imports_in_one_transaction_on_both_backends") {
        return;
    }
    let server = PgServer::start();
    let url = server.create_db("import");
    let p = PgStore::open(&pg_options(url)).unwrap();
    let done = p.import_policy(&accounts, &keys, &auth, "test").unwrap();
    check_import(&p, done);
    // All or nothing: an import with a name already taken writes nothing.
    let again = p.import_policy(&accounts[..1], &[], &[], "test");
    assert!(again.is_err());
    assert_eq!(p.list_accounts().unwrap().len(), 4);
}

fn log_record(
    at_ms: i64,
    account: &str,
    client: &str,
    status: u16,
    reason: &'static str,
) -> LogRecord {
    LogRecord {
        at_ms,
        account: account.to_string().into(),
        key_id: "k1".into(),
        client: Some(client.parse().unwrap()),
        method: "GET".into(),
        path: "/v1/things".into(),
        status,
        reason,
        rule: None,
        note: "",
        latency_us: 120,
        bytes_in: 10,
        bytes_out: 20,
    }
}

/// The same usage-log behaviour from this edge's day files and from the
/// shared PostgreSQL table.
fn usage_log_case(logs: &dyn LogStore) {
    const DAY: i64 = 86_400_000;
    let t0 = 20_000 * DAY;
    let mut batch = Vec::new();
    for i in 0..3_000i64 {
        let (status, reason) = if i % 3 == 0 {
            (403, "ip_not_allowed")
        } else {
            (200, "ok")
        };
        // Two days, two accounts, two clients.
        let at = t0 + (i % 2) * DAY + i;
        let account = if i % 5 == 0 { "other" } else { "acme" };
        let client = if i % 4 == 0 {
            "198.51.100.7"
        } else {
            "2001:db8::7"
        };
        batch.push(log_record(at, account, client, status, reason));
    }
    logs.write(&batch).unwrap();
    let q = LogQuery {
        account: "acme".into(),
        ..Default::default()
    };
    let mut rows = Vec::new();
    logs.scan(&q, &mut |r| {
        rows.push(r);
        true
    })
    .unwrap();
    let acme = batch.iter().filter(|r| r.account == "acme").count();
    assert_eq!(rows.len(), acme);
    assert!(
        rows.windows(2).all(|w| w[0].at_ms >= w[1].at_ms),
        "newest first"
    );
    assert!(rows.iter().all(|r| r.account == "acme"));
    // Filters: status, address, time; a scan stops when told.
    let q403 = LogQuery {
        status: Some(403),
        ip: Some("198.51.100.0/24".parse().unwrap()),
        since_ms: Some(t0 + DAY),
        ..q.clone()
    };
    let mut n = 0;
    logs.scan(&q403, &mut |r| {
        assert_eq!(r.status, 403);
        assert_eq!(r.client, "198.51.100.7");
        assert!(r.at_ms >= t0 + DAY);
        n += 1;
        true
    })
    .unwrap();
    let want = batch
        .iter()
        .filter(|r| {
            r.account == "acme"
                && r.status == 403
                && r.client == Some("198.51.100.7".parse().unwrap())
                && r.at_ms >= t0 + DAY
        })
        .count();
    assert_eq!(n, want);
    let mut first = 0;
    logs.scan(&q, &mut |_| {
        first += 1;
        first < 10
    })
    .unwrap();
    assert_eq!(first, 10);
    // The summary counts what the scan reads.
    let s = logs.summary(&q, (t0, t0 + 2 * DAY), 48).unwrap();
    assert_eq!(s.total as usize, acme);
    let refused: u64 = s.refusals.iter().map(|r| r.count).sum();
    assert_eq!(
        refused as usize,
        batch
            .iter()
            .filter(|r| r.account == "acme" && r.status == 403)
            .count()
    );
    let in_buckets: u64 = s.buckets.iter().map(|b| b.s2xx + b.s4xx).sum();
    assert_eq!(in_buckets, s.total);
    // Retention removes whole days.
    logs.sweep(20_001, 1);
    let mut left = Vec::new();
    logs.scan(&q, &mut |r| {
        left.push(r.at_ms);
        true
    })
    .unwrap();
    assert!(!left.is_empty());
    assert!(left.iter().all(|at| *at >= t0 + DAY), "day 20000 is gone");
}

#[test]
fn usage_log_on_both_backends() {
    let dir = tempfile::tempdir().unwrap();
    usage_log_case(&DayFiles::new(dir.path().join("logs")).unwrap());
    if !postgres_available("usage_log_on_both_backends") {
        return;
    }
    let server = PgServer::start();
    let url = server.create_db("logs");
    usage_log_case(&PgStore::open(&pg_options(url)).unwrap());
}
