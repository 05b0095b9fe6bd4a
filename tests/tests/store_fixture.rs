//! A store written by an earlier release opens with everything in it: the
//! committed fixture (`tests/fixtures/store-before-accounts.db`) was made by
//! the release before accounts — three keys (one rotating, one revoked,
//! allowlists with labels, a rate limit), manual and learned authorized
//! entries, a denied address, API blocking active, two drop entries — and
//! is the store every later migration must carry forward. Since accounts,
//! all of it is the account `default`'s, and the old audit log is too.

use allowlist_tests::proc::Setup;

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/fixtures/store-before-accounts.db"
);

#[test]
fn a_store_from_the_release_before_accounts_opens_whole() {
    let setup = Setup::new(false, "");
    // A copy: the committed file is never written.
    std::fs::copy(FIXTURE, setup.dir.path().join("allowlist.db")).unwrap();
    let _d = setup.start(None, &["--no-kernel"]);

    let keys = setup.ctl_json(&["keys", "list"]);
    let by_id = |id: &str| {
        keys["keys"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["id"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("key {id} missing: {keys}"))
    };
    let web = by_id("730fcbbfb74773ce");
    assert_eq!(web["name"], "production-web-app");
    assert_eq!(web["status"], "rotating");
    assert_eq!(web["rate"], "100/minute");
    assert!(web["previous_secret_expires_at"].as_i64().is_some());
    let allow: Vec<(String, String)> = web["allow"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["cidr"].as_str().unwrap().to_string(),
                a["label"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(
        allow.contains(&("203.0.113.0/24".into(), "office".into())),
        "{allow:?}"
    );
    assert!(
        allow.iter().any(|(c, _)| c == "2001:db8:1::/48"),
        "{allow:?}"
    );
    let reporting = by_id("ce0486e28f19170c");
    assert_eq!(reporting["scopes"], serde_json::json!(["read"]));
    assert_eq!(reporting["description"], "nightly reports");
    assert_eq!(by_id("1200b7750e70e6d6")["status"], "revoked");

    let ips = setup.ctl_json(&["ips", "list"]);
    let listed: Vec<(String, String)> = ips["authorized"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["cidr"].as_str().unwrap().to_string(),
                a["source"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    for want in [
        ("198.51.100.0/24", "manual"),
        ("2001:db8:2::/64", "manual"),
        ("127.0.0.0/24", "learned"),
    ] {
        assert!(
            listed.contains(&(want.0.into(), want.1.into())),
            "{want:?} in {listed:?}"
        );
    }
    let un = setup.ctl_json(&["ips", "unauthorized"]);
    assert!(
        un["unauthorized"]
            .as_array()
            .unwrap()
            .iter()
            .any(|u| u["addr"] == "127.0.0.1" && u["status"] == "denied"),
        "{un}"
    );
    assert_eq!(setup.ctl_json(&["blocking", "show"])["api"], "active");
    let drops = setup.ctl_json(&["drop", "list"]);
    let reasons: Vec<&str> = drops["drops"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["reason"].as_str().unwrap())
        .collect();
    assert!(
        reasons.contains(&"scanner") && reasons.contains(&"bad network"),
        "{drops}"
    );
    // Everything is `default`'s: the account exists, owns the keys, and
    // another account sees none of it.
    let accounts = setup.ctl_json(&["accounts", "list"]);
    let names: Vec<&str> = accounts["accounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["default"], "{accounts}");
    assert_eq!(accounts["accounts"][0]["blocking"]["api"], "active");
    assert_eq!(web["account"], "default");
    setup.ctl_json(&["accounts", "create", "acme"]);
    let acme_keys = setup.ctl_json(&["--account", "acme", "keys", "list"]);
    assert_eq!(
        acme_keys["keys"].as_array().unwrap().len(),
        0,
        "{acme_keys}"
    );
    let acme_ips = setup.ctl_json(&["--account", "acme", "ips", "list"]);
    assert_eq!(
        acme_ips["authorized"].as_array().unwrap().len(),
        0,
        "{acme_ips}"
    );
    assert_eq!(
        setup.ctl_json(&["--account", "acme", "blocking", "show"])["api"],
        "learning"
    );
    // The audit log written before accounts belongs to default.
    let audit = setup.ctl_json(&["--account", "default", "audit"]);
    assert!(
        audit["entries"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "key.create" && e["account"] == "default"),
        "{audit}"
    );
}
