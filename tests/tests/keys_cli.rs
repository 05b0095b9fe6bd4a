//! Keys, allowlists, the account list and blocking through allowlistctl and
//! a real allowlistd (SQLite file, no kernel).

use std::process::Command;

use allowlist_tests::{net::wait_for, proc::Setup};

fn strs(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn keys_are_created_shown_once_and_checked_with_clear_refusals() {
    let setup = Setup::new(false, "");
    let d = setup.start(None, &["--no-kernel"]);

    let k = setup.ctl_json(&["keys", "create", "--name", "production-web-app"]);
    let id = k["id"].as_str().unwrap().to_string();
    let key = k["key"].as_str().unwrap().to_string();
    assert!(key.starts_with(&format!("alk_{id}_")), "{key}");
    let secret = key.rsplit('_').next().unwrap();
    assert_eq!(secret.len(), 64, "256-bit secret in hex");
    assert_eq!(strs(&k["scopes"]), ["full"]);
    assert!(k["allow"].as_array().unwrap().is_empty());
    assert_eq!(k["status"], "active");

    let k2 = setup.ctl_json(&[
        "keys",
        "create",
        "--name",
        "reporting",
        "--scope",
        "read",
        "--scope",
        "contacts",
        "--allow",
        "198.51.100.0/24=office",
        "--allow",
        "2001:db8:1::7",
        "--allow",
        "192.168.0.0/16",
        "--rate",
        "100/minute",
    ]);
    let id2 = k2["id"].as_str().unwrap().to_string();
    assert_eq!(strs(&k2["scopes"]), ["read", "contacts"]);
    assert_eq!(k2["rate"], "100/minute");
    assert_eq!(k2["allow"][0]["cidr"], "198.51.100.0/24");
    assert_eq!(k2["allow"][0]["label"], "office");
    assert_eq!(k2["allow"][1]["cidr"], "2001:db8:1::7/128");

    // The plaintext is shown once: never again, not in the log, not stored.
    let shown = setup.ctl_json(&["keys", "show", &id]);
    assert!(shown.get("key").is_none());
    let list = setup.ctl_json(&["keys", "list"]);
    assert_eq!(list["keys"].as_array().unwrap().len(), 2);
    assert!(!list.to_string().contains(secret));
    assert!(!d.log_text().contains(secret), "a secret reached the log");
    let db = std::fs::read(setup.dir.path().join("allowlist.db")).unwrap_or_default();
    let wal = std::fs::read(setup.dir.path().join("allowlist.db-wal")).unwrap_or_default();
    for bytes in [&db, &wal] {
        assert!(
            !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "a secret reached the store"
        );
    }

    // Refusals, each with what was wrong.
    let many: Vec<String> = (0..21)
        .flat_map(|i| ["--allow".to_string(), format!("203.0.113.{i}")])
        .collect();
    let mut args = vec!["keys", "create", "--name", "x"];
    args.extend(many.iter().map(String::as_str));
    setup.refused(&args, "at most 20");
    setup.refused(
        &["keys", "create", "--name", "x", "--allow", "10.0.0.0/8"],
        "/9 or longer",
    );
    setup.refused(
        &["keys", "create", "--name", "x", "--allow", "2001:db8::/32"],
        "/33 or longer",
    );
    setup.refused(
        &["keys", "create", "--name", "x", "--allow", "203.0.113.5/24"],
        "did you mean 203.0.113.0/24?",
    );
    setup.refused(
        &[
            "keys",
            "create",
            "--name",
            "x",
            "--allow",
            "192.0.2.1",
            "--allow",
            "192.0.2.1/32",
        ],
        "listed twice",
    );
    setup.refused(
        &["keys", "create", "--name", "x", "--rate", "lots"],
        "100/minute",
    );
    setup.refused(
        &["keys", "create", "--name", "x", "--scope", "admin"],
        "unknown scope",
    );
    setup.refused(&["keys", "create", "--name", ""], "--name");
    setup.refused(&["keys", "show", "nope"], "no key with id");
    setup.refused(
        &["keys", "allow", &id2, "198.51.100.0/24"],
        "already in key",
    );
    setup.refused(&["keys", "disallow", &id2, "192.0.2.0/24"], "is not in key");
    setup.refused(&["keys", "rotate", &id, "--grace", "72h"], "48");
    assert_eq!(
        setup.ctl_json(&["keys", "list"])["keys"]
            .as_array()
            .unwrap()
            .len(),
        2,
        "refusals changed nothing"
    );

    // Allowlist edits.
    let v = setup.ctl_json(&["keys", "allow", &id, "::ffff:203.0.113.9", "--label", "vpn"]);
    assert_eq!(v["allow"][0]["cidr"], "203.0.113.9/32");
    let v = setup.ctl_json(&["keys", "disallow", &id, "203.0.113.9"]);
    assert!(v["allow"].as_array().unwrap().is_empty());

    // Rotation: a new secret for the same id, the old one in grace.
    let r = setup.ctl_json(&["keys", "rotate", &id, "--grace", "1h"]);
    assert_eq!(r["id"], id.as_str());
    assert_ne!(r["key"], key.as_str());
    assert_eq!(r["status"], "rotating");
    assert!(r["previous_secret_expires_at"].as_i64().is_some());

    // Revocation.
    let v = setup.ctl_json(&["keys", "revoke", &id2]);
    assert_eq!(v["status"], "revoked");
    setup.refused(&["keys", "revoke", &id2], "already revoked");
    setup.refused(&["keys", "rotate", &id2], "revoked");
}

#[test]
fn account_list_and_blocking_modes() {
    let setup = Setup::new(false, "");
    let _d = setup.start(None, &["--no-kernel"]);
    let b = setup.ctl_json(&["blocking", "show"]);
    assert_eq!(b["api"], "learning", "a new installation learns");
    assert_eq!(b["smtp"], "inactive");

    // SMTP activation is refused while the authorized list is empty.
    setup.refused(
        &["blocking", "smtp", "activate"],
        "authorized list is empty",
    );
    let v = setup.ctl_json(&["blocking", "smtp", "activate", "--force"]);
    assert_eq!(v["smtp"], "active");
    setup.ctl_json(&["blocking", "smtp", "deactivate"]);

    let a = setup.ctl_json(&["ips", "authorize", "198.51.100.0/24", "--label", "office"]);
    assert_eq!(a["cidr"], "198.51.100.0/24");
    assert_eq!(a["source"], "manual");
    setup.refused(
        &["ips", "authorize", "198.51.100.0/24"],
        "already authorized",
    );
    setup.refused(
        &["ips", "authorize", "198.51.100.7/24"],
        "did you mean 198.51.100.0/24?",
    );
    setup.refused(&["ips", "authorize", "10.0.0.0/8"], "/9 or longer");
    setup.ctl_json(&["ips", "authorize", "2001:db8:1::/48"]);
    let list = setup.ctl_json(&["ips", "list"]);
    assert_eq!(list["authorized"].as_array().unwrap().len(), 2);
    setup.ctl_json(&["ips", "remove", "2001:db8:1::/48"]);
    setup.refused(
        &["ips", "remove", "2001:db8:1::/48"],
        "not on the authorized list",
    );
    assert!(
        setup.ctl_json(&["ips", "unauthorized"])["unauthorized"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    setup.refused(
        &["ips", "deny", "203.0.113.9"],
        "not on the unauthorized list",
    );
    let denied = setup.ctl_json(&["ips", "deny", "203.0.113.9", "--drop", "--ttl", "1h"]);
    assert_eq!(denied["dropped"]["cidr"], "203.0.113.9/32");
    assert_eq!(denied["dropped"]["kind"], "denied");

    for (mode, want) in [
        ("activate", "active"),
        ("deactivate", "inactive"),
        ("learning", "learning"),
    ] {
        assert_eq!(setup.ctl_json(&["blocking", "api", mode])["api"], want);
    }
    assert_eq!(
        setup.ctl(&["blocking", "api", "sideways"]).status.code(),
        Some(2)
    );
}

#[test]
fn api_blocking_turns_active_after_the_quiet_period() {
    let setup = Setup::new(false, "");
    let offset = setup.dir.path().join("clock-offset");
    std::fs::write(&offset, "0").unwrap();
    let _d = setup.start_env(
        None,
        &["--no-kernel"],
        &[("ALLOWLIST_CLOCK_OFFSET_FILE", offset.to_str().unwrap())],
    );
    std::thread::sleep(std::time::Duration::from_millis(2500));
    assert_eq!(setup.ctl_json(&["blocking", "show"])["api"], "learning");
    // 29 days on: still learning. 30 days on: active by itself.
    std::fs::write(&offset, (29 * 86400).to_string()).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(2500));
    assert_eq!(setup.ctl_json(&["blocking", "show"])["api"], "learning");
    std::fs::write(&offset, (30 * 86400 + 5).to_string()).unwrap();
    assert!(wait_for(std::time::Duration::from_secs(6), || setup
        .ctl_json(&["blocking", "show"])["api"]
        == "active"));
}

#[test]
fn keys_and_lists_survive_sigkill_with_an_audit_trail() {
    let setup = Setup::new(false, "");
    let d = setup.start(None, &["--no-kernel"]);
    let k = setup.ctl_json(&[
        "keys",
        "create",
        "--name",
        "a",
        "--allow",
        "198.51.100.0/24",
    ]);
    let id = k["id"].as_str().unwrap().to_string();
    setup.ctl_json(&["keys", "rotate", &id, "--grace", "2h"]);
    setup.ctl_json(&["ips", "authorize", "203.0.113.0/24"]);
    setup.ctl_json(&["blocking", "api", "activate", "--force"]);
    d.kill9();
    let _d = setup.start(None, &["--no-kernel"]);
    let shown = setup.ctl_json(&["keys", "show", &id]);
    assert_eq!(shown["status"], "rotating");
    assert_eq!(shown["allow"][0]["cidr"], "198.51.100.0/24");
    assert_eq!(
        setup.ctl_json(&["ips", "list"])["authorized"][0]["cidr"],
        "203.0.113.0/24"
    );
    assert_eq!(setup.ctl_json(&["blocking", "show"])["api"], "active");
    let out = Command::new("sqlite3")
        .arg(setup.dir.path().join("allowlist.db"))
        .arg("SELECT group_concat(action, ' ') FROM (SELECT action FROM audit ORDER BY id)")
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "key.create key.rotate ips.authorize blocking.set"
    );
}

#[test]
fn the_release_build_ignores_the_test_clock() {
    // The same setup as above with the daemon built as a release is (no
    // `test-hooks` feature): 31 days on by the file, and nothing moves.
    let setup = Setup::new(false, "");
    let offset = setup.dir.path().join("clock-offset");
    std::fs::write(&offset, (31 * 86400).to_string()).unwrap();
    let env = [("ALLOWLIST_CLOCK_OFFSET_FILE", offset.to_str().unwrap())];
    let mut d = setup.start_bin("allowlistd-release", None, &["--no-kernel"], &env);
    std::thread::sleep(std::time::Duration::from_millis(4500));
    assert_eq!(
        setup.ctl_json(&["blocking", "show"])["api"],
        "learning",
        "the release binary read ALLOWLIST_CLOCK_OFFSET_FILE"
    );
    d.stop();
    // The test build on the same store does move: the check above can fail.
    let _d = setup.start_env(None, &["--no-kernel"], &env);
    assert!(wait_for(std::time::Duration::from_secs(6), || setup
        .ctl_json(&["blocking", "show"])["api"]
        == "active"));
}

#[test]
fn admin_request_bodies_with_unknown_fields_are_refused() {
    let setup = Setup::new(false, "");
    let _d = setup.start(None, &["--no-kernel"]);
    let post = |path: &str, body: &str| {
        let out = Command::new("curl")
            .args(["-s", "--max-time", "5", "--unix-socket"])
            .arg(setup.socket())
            .args([
                "-H",
                "content-type: application/json",
                "-w",
                "\n%{http_code}",
                "-d",
                body,
            ])
            .arg(format!("http://admin{path}"))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, status) = text.rsplit_once('\n').unwrap();
        (status.to_string(), body.to_string())
    };
    // "scope" for "scopes": must not create a full-scope key.
    let (status, body) = post("/v1/keys", r#"{"name":"x","scope":["read"]}"#);
    assert_eq!(status, "400", "{body}");
    assert!(body.contains("unknown field `scope`"), "{body}");
    assert_eq!(
        setup.ctl_json(&["keys", "list"])["keys"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
    let (status, body) = post("/v1/drop", r#"{"cidr":"203.0.113.0/24","tll":"1h"}"#);
    assert_eq!(status, "400", "{body}");
    assert!(body.contains("unknown field `tll`"), "{body}");
    let (status, body) = post(
        "/v1/ips/deny",
        r#"{"addr":"203.0.113.9","drop":true,"rotate":true}"#,
    );
    assert_eq!(status, "400", "{body}");
    // The right spelling works.
    let (status, body) = post("/v1/keys", r#"{"name":"x","scopes":["read"]}"#);
    assert_eq!(status, "201", "{body}");
}

#[test]
fn the_audit_log_says_who_changed_what_newest_first() {
    let setup = Setup::new(false, "");
    let _d = setup.start(None, &["--no-kernel"]);
    setup.ctl_json(&["keys", "create", "--name", "a"]);
    setup.ctl_json(&["ips", "authorize", "198.51.100.0/24", "--label", "office"]);
    setup.ctl_json(&["blocking", "api", "activate", "--force"]);
    let v = setup.ctl_json(&["audit"]);
    let actions: Vec<&str> = v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["blocking.set", "ips.authorize", "key.create"]);
    // SAFETY: geteuid has no preconditions.
    let me = format!("uid:{}", unsafe { libc::geteuid() });
    assert!(
        v["entries"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["actor"] == me.as_str())
    );
    assert!(
        v["entries"][1]["detail"]
            .as_str()
            .unwrap()
            .contains("198.51.100.0/24")
    );
    assert_eq!(
        setup.ctl_json(&["audit", "--limit", "1"])["entries"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        setup.ctl_json(&["audit", "--since", "1h"])["entries"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
    assert_eq!(
        setup.ctl_json(&["audit", "--since", "2099-01-01T00:00:00Z"])["entries"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
    assert_eq!(
        setup.ctl_json(&["audit", "--actor", "learning"])["entries"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
    // Text output names the action; a bad --since is refused with what to write.
    let out = setup.ctl(&["audit"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("ips.authorize"));
    setup.refused(
        &["audit", "--since", "whenever"],
        "a duration back from now like 24h",
    );
}
