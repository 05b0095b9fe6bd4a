//! Organizations: entries an organization shares are in force in every
//! sub-account (and removable only at the organization), and an
//! organization that enforces blocking holds its sub-accounts' blocking
//! active. Driven through the daemon's operations on a real SQLite store;
//! decisions read from the snapshot the edge reads.

use std::{net::IpAddr, sync::Arc};

use allowlist::{
    api::{NewAccount, NewKey},
    config::Config,
    daemon::{Authorize, Clock, Daemon, DaemonError},
    policy::{ApiMode, Reason},
    store::{SqliteStore, Store},
};

async fn daemon(dir: &std::path::Path) -> Arc<Daemon> {
    let db = dir.join("a.db");
    let mut config = Config::default();
    config.store.url = format!("sqlite://{}", db.display());
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&db).unwrap());
    let d = Arc::new(Daemon::new(config, store, None, Clock::from_env()).unwrap());
    d.init_policy().unwrap();
    d
}

async fn account(d: &Daemon, name: &str, parent: Option<&str>) {
    d.create_account(
        NewAccount {
            name: name.into(),
            parent: parent.map(Into::into),
            emails: vec!["ops@example.com".into()],
        },
        "uid:0",
    )
    .await
    .unwrap();
}

async fn key(d: &Daemon, account: &str) -> String {
    d.create_key(
        account,
        NewKey {
            name: "k".into(),
            description: String::new(),
            scopes: vec![],
            allow: vec![],
            rate: None,
        },
        "uid:0",
    )
    .await
    .unwrap()
    .key
    .unwrap()
}

fn decide(d: &Daemon, key: &str, src: &str) -> Reason {
    let src: IpAddr = src.parse().unwrap();
    d.policy.load().decide(Some(key), "GET", "/", src, 0).reason
}

fn authorize<'a>(cidr: &'a str, share: bool) -> Authorize<'a> {
    Authorize {
        cidr,
        label: Some("office".into()),
        source: "manual",
        key_id: None,
        share,
    }
}

#[tokio::test]
async fn shared_entries_are_in_force_in_every_sub_account() {
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(dir.path()).await;
    account(&d, "org", None).await;
    account(&d, "sub1", Some("org")).await;
    account(&d, "sub2", Some("org")).await;
    account(&d, "outsider", None).await;
    let (k1, k2, ko) = (
        key(&d, "sub1").await,
        key(&d, "sub2").await,
        key(&d, "outsider").await,
    );
    for a in ["sub1", "sub2", "outsider"] {
        d.set_api_blocking(a, ApiMode::Active, true, "uid:0")
            .await
            .unwrap();
    }
    assert_eq!(decide(&d, &k1, "192.0.2.7"), Reason::AccountList);
    d.authorize("org", authorize("192.0.2.0/24", true), "uid:0")
        .await
        .unwrap();
    assert_eq!(decide(&d, &k1, "192.0.2.7"), Reason::Ok);
    assert_eq!(decide(&d, &k2, "192.0.2.7"), Reason::Ok);
    assert_eq!(
        decide(&d, &ko, "192.0.2.7"),
        Reason::AccountList,
        "not in an account outside the organization"
    );
    // Shown in the sub-account as shared, removable only at the org.
    let list = d.list_authorized("sub1").unwrap();
    let shared = list
        .iter()
        .find(|e| e.entry.cidr.to_string() == "192.0.2.0/24");
    assert_eq!(
        shared.and_then(|e| e.shared_by.as_deref()),
        Some("org"),
        "{list:?}"
    );
    let e = d
        .unauthorize("sub1", "192.0.2.0/24", "uid:0")
        .await
        .unwrap_err();
    assert!(e.to_string().contains("only org can remove it"), "{e}");
    // An unshared org entry stays the org's own.
    d.authorize("org", authorize("198.51.100.0/24", false), "uid:0")
        .await
        .unwrap();
    assert_eq!(decide(&d, &k1, "198.51.100.1"), Reason::AccountList);
    // A sub-account cannot share (one level).
    let e = d
        .authorize("sub1", authorize("203.0.113.0/24", true), "uid:0")
        .await
        .unwrap_err();
    assert!(matches!(e, DaemonError::Invalid(_)), "{e}");
    // Removed at the org: gone everywhere.
    d.unauthorize("org", "192.0.2.0/24", "uid:0").await.unwrap();
    assert_eq!(decide(&d, &k1, "192.0.2.7"), Reason::AccountList);
    assert_eq!(decide(&d, &k2, "192.0.2.7"), Reason::AccountList);
    // Organizations are one level deep; an org with sub-accounts stays.
    account(&d, "x", None).await;
    let e = d
        .create_account(
            NewAccount {
                name: "deep".into(),
                parent: Some("sub1".into()),
                emails: vec![],
            },
            "uid:0",
        )
        .await
        .unwrap_err();
    assert!(e.to_string().contains("one level"), "{e}");
    let e = d.remove_account("org", true, "uid:0").await.unwrap_err();
    assert!(e.to_string().contains("sub1"), "{e}");
}

#[tokio::test]
async fn an_organization_can_enforce_blocking_on_its_sub_accounts() {
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(dir.path()).await;
    account(&d, "org", None).await;
    account(&d, "sub", Some("org")).await;
    let k = key(&d, "sub").await;
    // The sub-account is learning: anything passes (and is learned).
    assert_eq!(decide(&d, &k, "203.0.113.9"), Reason::Ok);
    d.set_api_blocking("org", ApiMode::Active, true, "uid:0")
        .await
        .unwrap();
    d.set_enforce("org", true, "uid:0").await.unwrap();
    let v = d.show_account("sub").unwrap();
    assert_eq!(v.api_in_force, ApiMode::Active);
    assert_eq!(
        v.record.blocking.api,
        ApiMode::Learning,
        "its own mode is kept"
    );
    assert_eq!(decide(&d, &k, "203.0.113.9"), Reason::AccountList);
    let e = d
        .set_api_blocking("sub", ApiMode::Inactive, false, "uid:0")
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("enforced by its organization org"),
        "{e}"
    );
    assert_eq!(
        d.blocking("sub").unwrap().enforced_by.as_deref(),
        Some("org")
    );
    // A sub-account cannot enforce anything itself.
    assert!(d.set_enforce("sub", true, "uid:0").await.is_err());
    // Enforcement lifted: the sub-account's own mode is back in force.
    d.set_enforce("org", false, "uid:0").await.unwrap();
    assert_eq!(decide(&d, &k, "203.0.113.9"), Reason::Ok);
}
