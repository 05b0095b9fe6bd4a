//! Every route x every caller -> the exact status, through the real
//! router with a real SQLite store (kernel off). Each cell gets a fresh
//! daemon, so one cell's change cannot decide another's status.

use std::{collections::HashMap, sync::Arc};

use axum::{
    body::Body,
    extract::connect_info::ConnectInfo,
    http::{Request, StatusCode},
};
use tower::ServiceExt;

use super::{Peer, router, token_router};
use crate::{
    api::{NewAccount, NewKey, NewToken},
    config::Config,
    daemon::{Authorize, Caller, Clock, Daemon},
    policy::{Need, Role},
    store::{SqliteStore, Store, TokenRecord, UnauthorizedRecord},
};

struct Fixture {
    daemon: Arc<Daemon>,
    tokens: HashMap<&'static str, String>,
    key: String,
    _dir: tempfile::TempDir,
}

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("a.db");
    let mut config = Config::default();
    config.store.url = format!("sqlite://{}", db.display());
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&db).unwrap());
    let d = Arc::new(Daemon::new(config, store.clone(), None, Clock::from_env()).unwrap());
    d.init_policy().unwrap();
    let op = Caller::operator("uid:0".into());
    for name in ["acme", "other"] {
        d.create_account(
            NewAccount {
                name: name.into(),
                parent: None,
                emails: vec![],
            },
            "uid:0",
        )
        .await
        .unwrap();
    }
    let key = d
        .create_key(
            "acme",
            NewKey {
                name: "web".into(),
                description: String::new(),
                scopes: vec![],
                allow: vec!["198.51.100.0/24".into()],
                rate: None,
            },
            "uid:0",
        )
        .await
        .unwrap()
        .id;
    let req = Authorize {
        cidr: "192.0.2.0/24",
        label: None,
        source: "manual",
        key_id: None,
        share: false,
    };
    d.authorize("acme", req, "uid:0").await.unwrap();
    store
        .record_unauthorized(
            &[UnauthorizedRecord::refused(
                "acme",
                "198.51.100.9".parse().unwrap(),
                "api",
                key.clone(),
                0,
                1,
            )],
            100,
        )
        .unwrap();
    let mut tokens = HashMap::new();
    let make = async |account: &str, req: NewToken| {
        d.create_token(&op, account, req)
            .await
            .unwrap()
            .token
            .unwrap()
    };
    let role = |r: &str| NewToken {
        role: Some(r.into()),
        ..Default::default()
    };
    tokens.insert(
        "operator",
        make(
            "default",
            NewToken {
                operator: true,
                ..Default::default()
            },
        )
        .await,
    );
    tokens.insert("owner", make("acme", role("owner")).await);
    tokens.insert("ips", make("acme", role("ips")).await);
    tokens.insert("viewer", make("acme", role("viewer")).await);
    tokens.insert("other", make("other", role("owner")).await);
    let revoked = make("acme", role("owner")).await;
    let id = revoked.split('_').nth(1).unwrap().to_string();
    d.revoke_token(&op, &id).await.unwrap();
    tokens.insert("revoked", revoked);
    // Expired an hour ago (written as the store would hold it).
    let secret = "e".repeat(64);
    store
        .create_token(
            &TokenRecord {
                id: "00000000000000ee".into(),
                name: String::new(),
                account: Some("acme".into()),
                role: Role::Owner,
                hash: crate::policy::hash_secret(&secret),
                created_at: 0,
                expires_at: Some(crate::store::unix_now() - 3600),
                revoked_at: None,
                created_by: "uid:0".into(),
            },
            "uid:0",
        )
        .unwrap();
    d.load_tokens().unwrap();
    tokens.insert("expired", format!("alt_00000000000000ee_{secret}"));
    tokens.insert("none", String::new());
    Fixture {
        daemon: d,
        tokens,
        key,
        _dir: dir,
    }
}

/// A route: method, path (`{K}` = acme's key), body, what it needs, its
/// success status, and whether it names acme's objects (another account's
/// token then gets 404 rather than 403).
struct Route {
    method: &'static str,
    path: &'static str,
    body: &'static str,
    need: Need,
    ok: u16,
    acme: bool,
}

const fn r(
    method: &'static str,
    path: &'static str,
    body: &'static str,
    need: Need,
    ok: u16,
    acme: bool,
) -> Route {
    Route {
        method,
        path,
        body,
        need,
        ok,
        acme,
    }
}

const ROUTES: &[Route] = &[
    r("GET", "/v1/keys?account=acme", "", Need::Read, 200, true),
    r(
        "POST",
        "/v1/keys?account=acme",
        r#"{"name":"x"}"#,
        Need::Keys,
        201,
        true,
    ),
    r(
        "GET",
        "/v1/keys/{K}?account=acme",
        "",
        Need::Read,
        200,
        true,
    ),
    r(
        "POST",
        "/v1/keys/{K}/revoke?account=acme",
        "",
        Need::Keys,
        200,
        true,
    ),
    r(
        "POST",
        "/v1/keys/{K}/rotate?account=acme",
        "{}",
        Need::Keys,
        200,
        true,
    ),
    r(
        "POST",
        "/v1/keys/{K}/allow?account=acme",
        r#"{"cidr":"192.0.2.0/24"}"#,
        Need::Keys,
        200,
        true,
    ),
    r(
        "DELETE",
        "/v1/keys/{K}/allow?account=acme&cidr=198.51.100.0%2F24",
        "",
        Need::Keys,
        200,
        true,
    ),
    r("GET", "/v1/ips?account=acme", "", Need::Read, 200, true),
    r(
        "POST",
        "/v1/ips?account=acme",
        r#"{"cidr":"203.0.113.0/24"}"#,
        Need::Lists,
        201,
        true,
    ),
    r(
        "DELETE",
        "/v1/ips?account=acme&cidr=192.0.2.0%2F24",
        "",
        Need::Lists,
        200,
        true,
    ),
    r(
        "GET",
        "/v1/ips/unauthorized?account=acme",
        "",
        Need::Read,
        200,
        true,
    ),
    r(
        "POST",
        "/v1/ips/deny?account=acme",
        r#"{"addr":"198.51.100.9"}"#,
        Need::Lists,
        200,
        true,
    ),
    r(
        "POST",
        "/v1/ips/deny?account=acme",
        r#"{"addr":"198.51.100.9","drop":true}"#,
        Need::Operator,
        200,
        true,
    ),
    r(
        "GET",
        "/v1/blocking?account=acme",
        "",
        Need::Read,
        200,
        true,
    ),
    r(
        "POST",
        "/v1/blocking/api?account=acme",
        r#"{"mode":"deactivate"}"#,
        Need::Lists,
        200,
        true,
    ),
    r(
        "POST",
        "/v1/blocking/smtp?account=acme",
        r#"{"mode":"deactivate"}"#,
        Need::Lists,
        200,
        true,
    ),
    r(
        "GET",
        "/v1/blocking/impact?account=acme",
        "",
        Need::Read,
        200,
        true,
    ),
    r("GET", "/v1/audit?account=acme", "", Need::Read, 200, true),
    r("GET", "/v1/logs?account=acme", "", Need::Read, 200, true),
    r(
        "GET",
        "/v1/logs/csv?account=acme",
        "",
        Need::Read,
        200,
        true,
    ),
    r(
        "GET",
        "/v1/logs/summary?account=acme",
        "",
        Need::Read,
        200,
        true,
    ),
    r("GET", "/v1/whoami", "", Need::Read, 200, false),
    r(
        "POST",
        "/v1/drop/import",
        r#"{"entries":[{"cidr":"192.0.2.0/28","ttl":"1h"},{"cidr":"2001:db8:9::/48","reason":"x"}]}"#,
        Need::Operator,
        200,
        false,
    ),
    r(
        "POST",
        "/v1/ips/import?account=acme",
        r#"{"entries":[{"cidr":"203.0.113.0/24"},{"cidr":"192.0.2.0/24","label":"x"}]}"#,
        Need::Lists,
        200,
        true,
    ),
    r(
        "GET",
        "/v1/ips/check?addr=198.51.100.9&key={K}&account=acme",
        "",
        Need::Read,
        200,
        true,
    ),
    r("GET", "/v1/accounts/acme", "", Need::Read, 200, true),
    r("GET", "/v1/notify?account=acme", "", Need::Read, 200, true),
    r(
        "PUT",
        "/v1/notify/emails?account=acme",
        r#"{"emails":["owner@example.com"]}"#,
        Need::Keys,
        200,
        true,
    ),
    r(
        "POST",
        "/v1/notify/webhooks?account=acme",
        r#"{"url":"https://hooks.example.com/a","secret":"0123456789abcdef"}"#,
        Need::Keys,
        201,
        true,
    ),
    r(
        "POST",
        "/v1/accounts/acme/enforce",
        r#"{"enforce":true}"#,
        Need::Lists,
        200,
        true,
    ),
    r("GET", "/v1/tokens?account=acme", "", Need::Keys, 200, true),
    r(
        "POST",
        "/v1/tokens?account=acme",
        r#"{"role":"viewer"}"#,
        Need::Keys,
        201,
        true,
    ),
    r("GET", "/v1/accounts", "", Need::Operator, 200, false),
    r(
        "POST",
        "/v1/accounts",
        r#"{"name":"new"}"#,
        Need::Operator,
        201,
        false,
    ),
    r(
        "DELETE",
        "/v1/accounts/acme?force=true",
        "",
        Need::Operator,
        200,
        false,
    ),
    r(
        "POST",
        "/v1/tokens",
        r#"{"operator":true}"#,
        Need::Operator,
        201,
        false,
    ),
    r("GET", "/v1/drop", "", Need::Operator, 200, false),
    r(
        "POST",
        "/v1/drop",
        r#"{"cidr":"192.0.2.77"}"#,
        Need::Operator,
        201,
        false,
    ),
    r("GET", "/v1/stats", "", Need::Operator, 200, false),
    r("GET", "/v1/events", "", Need::Operator, 200, false),
];

const CALLERS: &[&str] = &[
    "operator", "owner", "ips", "viewer", "other", "revoked", "expired", "none",
];

fn expected(route: &Route, caller: &str) -> u16 {
    let role = match caller {
        "operator" => Role::Operator,
        "owner" => Role::Owner,
        "ips" => Role::Ips,
        "viewer" => Role::Viewer,
        "other" if route.acme => return 404,
        "other" => Role::Owner,
        _ => return 401,
    };
    if role.may(route.need) { route.ok } else { 403 }
}

fn request(route: &Route, key: &str, token: &str) -> Request<Body> {
    let mut b = Request::builder()
        .method(route.method)
        .uri(route.path.replace("{K}", key))
        .header("content-type", "application/json");
    if !token.is_empty() {
        b = b.header("authorization", format!("Bearer {token}"));
    }
    let body = if route.body.is_empty() && route.method == "POST" {
        "{}"
    } else {
        route.body
    };
    b.body(Body::from(body)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_for_every_caller() {
    let mut failures = Vec::new();
    for route in ROUTES {
        for &caller in CALLERS {
            let f = fixture().await;
            let req = request(route, &f.key, &f.tokens[caller]);
            let resp = token_router(f.daemon.clone()).oneshot(req).await.unwrap();
            let status = resp.status().as_u16();
            let want = expected(route, caller);
            let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
                .await
                .unwrap();
            let text = String::from_utf8_lossy(&body).to_string();
            if status != want {
                failures.push(format!(
                    "{} {} as {caller}: {status}, want {want}: {text}",
                    route.method, route.path
                ));
            }
            if status == 403 {
                assert!(text.contains("permission_denied"), "{text}");
                let least = route.need.least_role().as_str();
                assert!(text.contains(least), "a 403 names the role needed: {text}");
            }
            if status == 404 && caller == "other" {
                // Nothing about acme leaks into the answer.
                assert!(!text.contains(&f.key), "{text}");
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test]
async fn the_socket_is_for_operators_only() {
    let f = fixture().await;
    for (uid, want) in [(0, StatusCode::OK), (65534, StatusCode::FORBIDDEN)] {
        let mut req = Request::builder()
            .uri("/v1/keys?account=acme")
            .body(Body::empty())
            .unwrap();
        req.extensions_mut()
            .insert(ConnectInfo(Peer { uid: Some(uid) }));
        let resp = router(f.daemon.clone()).oneshot(req).await.unwrap();
        assert_eq!(resp.status(), want, "uid {uid}");
    }
}

#[tokio::test]
async fn bodies_refuse_unknown_fields() {
    let f = fixture().await;
    // A misspelt field must not silently give a full-scope key.
    let req = Request::builder()
        .method("POST")
        .uri("/v1/keys?account=acme")
        .header("authorization", format!("Bearer {}", f.tokens["owner"]))
        .header("content-type", "application/json")
        .body(Body::from(r#"{"name":"x","scope":["read"]}"#))
        .unwrap();
    let resp = token_router(f.daemon.clone()).oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert_eq!(f.daemon.list_keys("acme").unwrap().len(), 1);
}

#[tokio::test]
async fn every_change_is_audited_with_its_actor() {
    let f = fixture().await;
    let token = &f.tokens["ips"];
    let id = token.split('_').nth(1).unwrap();
    let req = Request::builder()
        .method("POST")
        .uri("/v1/ips")
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/json")
        .body(Body::from(r#"{"cidr":"203.0.113.0/24"}"#))
        .unwrap();
    let resp = token_router(f.daemon.clone()).oneshot(req).await.unwrap();
    assert_eq!(
        resp.status(),
        StatusCode::CREATED,
        "no ?account: the token's own"
    );
    let audit = f
        .daemon
        .audit(Some("acme"), &Default::default())
        .unwrap()
        .entries;
    assert!(
        audit
            .iter()
            .any(|e| e.actor == format!("token:{id}") && e.action == "ips.authorize"),
        "{audit:?}"
    );
    assert!(
        f.daemon
            .audit(Some("other"), &Default::default())
            .unwrap()
            .entries
            .iter()
            .all(|e| e.account == "other")
    );
}

#[tokio::test]
async fn a_removed_accounts_tokens_die_with_it() {
    let f = fixture().await;
    f.daemon
        .remove_account("acme", true, "uid:0")
        .await
        .unwrap();
    f.daemon
        .create_account(
            NewAccount {
                name: "acme".into(),
                parent: None,
                emails: vec![],
            },
            "uid:0",
        )
        .await
        .unwrap();
    let req = Request::builder()
        .uri("/v1/keys")
        .header("authorization", format!("Bearer {}", f.tokens["owner"]))
        .body(Body::empty())
        .unwrap();
    let resp = token_router(f.daemon.clone()).oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
}
