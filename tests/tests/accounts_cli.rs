//! Accounts, `--account` scoping, admin tokens and the admin API over TLS
//! with bearer tokens, through allowlistctl and a real allowlistd (SQLite
//! file, no kernel).

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use allowlist_tests::{
    net::wait_for,
    proc::{Setup, bin},
};

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Asserts `out` exited with `code` and said something containing each of
/// `needles` on stderr.
#[track_caller]
fn exits(out: &Output, code: i32, needles: &[&str], what: &str) {
    let err = stderr(out);
    assert_eq!(
        out.status.code(),
        Some(code),
        "{what}: exit status; stderr: {err}; stdout: {}",
        stdout(out)
    );
    for n in needles {
        assert!(err.contains(n), "{what}: {err:?} should mention {n:?}");
    }
}

/// `--json` stdout of a successful run.
#[track_caller]
fn json(out: &Output, what: &str) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{what} failed ({:?}): {}",
        out.status.code(),
        stderr(out)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {}", stdout(out)))
}

fn ids(v: &serde_json::Value, list: &str, field: &str) -> Vec<String> {
    v[list]
        .as_array()
        .unwrap_or_else(|| panic!("no {list} in {v}"))
        .iter()
        .map(|x| x[field].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn accounts_are_created_listed_shown_and_removed() {
    let setup = Setup::new(false, "");
    let _d = setup.start(None, &["--no-kernel"]);

    let acme = setup.ctl_json(&["accounts", "create", "acme", "--email", "ops@acme.example"]);
    assert_eq!(acme["name"], "acme");
    assert!(acme["parent"].is_null());
    assert_eq!(acme["emails"][0], "ops@acme.example");
    let eu = setup.ctl_json(&["accounts", "create", "acme-eu", "--parent", "acme"]);
    assert_eq!(eu["parent"], "acme");

    // Refusals name the rule.
    setup.refused(&["accounts", "create", "Acme"], "lowercase letters");
    setup.refused(
        &["accounts", "create", "acme_eu"],
        "lowercase letters, digits and '-'",
    );
    setup.refused(
        &["accounts", "create", "--", "-acme"],
        "not starting with '-'",
    );
    setup.refused(&["accounts", "create", "acme"], "already exists");
    setup.refused(
        &["accounts", "create", "x", "--parent", "nope"],
        "no account named \"nope\"",
    );
    setup.refused(
        &["accounts", "create", "y", "--parent", "acme-eu"],
        "one level deep",
    );
    setup.refused(
        &["accounts", "create", "z", "--email", "not-an-address"],
        "not an e-mail address",
    );
    assert_eq!(setup.ctl(&["accounts", "create"]).status.code(), Some(2));

    let mut names = ids(&setup.ctl_json(&["accounts", "list"]), "accounts", "name");
    names.sort();
    assert_eq!(
        names,
        ["acme", "acme-eu", "default"],
        "refusals made nothing"
    );
    let shown = setup.ctl_json(&["accounts", "show", "acme"]);
    assert_eq!(shown["sub_accounts"], serde_json::json!(["acme-eu"]));
    let text = stdout(&setup.ctl(&["accounts", "show", "acme"]));
    assert!(text.contains("organization of: acme-eu"), "{text}");
    let text = stdout(&setup.ctl(&["accounts", "list"]));
    assert!(
        text.contains("acme-eu") && text.contains("default"),
        "{text}"
    );
    setup.refused(&["accounts", "show", "nope"], "no account named");

    // --account scopes every command; a key of acme-eu is not default's.
    let k = setup.ctl_json(&["--account", "acme-eu", "keys", "create", "--name", "eu-web"]);
    let kid = k["id"].as_str().unwrap().to_string();
    assert_eq!(k["account"], "acme-eu");
    let own = setup.ctl_json(&["keys", "create", "--name", "default-web"]);
    assert_eq!(own["account"], "default");
    let default_keys = ids(&setup.ctl_json(&["keys", "list"]), "keys", "id");
    assert_eq!(default_keys, [own["id"].as_str().unwrap()]);
    setup.refused(&["keys", "show", &kid], "no key");
    setup.refused(&["keys", "revoke", &kid], "no key");
    // The flag goes after the subcommand too, and $ALLOWLIST_ACCOUNT works.
    assert_eq!(
        ids(
            &setup.ctl_json(&["keys", "list", "--account", "acme-eu"]),
            "keys",
            "id"
        ),
        [kid.as_str()]
    );
    let out = Command::new(bin("allowlistctl"))
        .arg("--socket")
        .arg(setup.socket())
        .args(["--json", "keys", "show", &kid])
        .env("ALLOWLIST_ACCOUNT", "acme-eu")
        .output()
        .unwrap();
    assert_eq!(
        json(&out, "keys show with $ALLOWLIST_ACCOUNT")["id"],
        kid.as_str()
    );
    setup.refused(&["--account", "nope", "keys", "list"], "no account named");

    // An organization's shared entry is in force, and shown, in its
    // sub-accounts.
    let shared = setup.ctl_json(&[
        "--account",
        "acme",
        "ips",
        "authorize",
        "198.51.100.0/24",
        "--label",
        "hq",
        "--share",
    ]);
    assert_eq!(shared["shared"], true);
    let list = setup.ctl_json(&["--account", "acme-eu", "ips", "list"]);
    assert_eq!(list["authorized"][0]["cidr"], "198.51.100.0/24");
    assert_eq!(list["authorized"][0]["shared_by"], "acme");
    let text = stdout(&setup.ctl(&["--account", "acme-eu", "ips", "list"]));
    assert!(text.contains("shared by acme"), "{text}");
    assert!(
        setup.ctl_json(&["ips", "list"])["authorized"]
            .as_array()
            .unwrap()
            .is_empty(),
        "default is not a sub-account of acme"
    );

    // Blocking: the learning clock, and an organization's enforcement.
    let text = stdout(&setup.ctl(&["--account", "acme-eu", "blocking", "show"]));
    assert!(text.contains("account: acme-eu"), "{text}");
    assert!(
        text.contains("blocking activates in 30 quiet days"),
        "{text}"
    );
    let v = setup.ctl_json(&["accounts", "enforce", "acme", "on"]);
    assert_eq!(v["enforce_blocking"], true);
    let b = setup.ctl_json(&["--account", "acme-eu", "blocking", "show"]);
    assert_eq!(b["enforced_by"], "acme");
    let text = stdout(&setup.ctl(&["--account", "acme-eu", "blocking", "show"]));
    assert!(text.contains("enforced by acme"), "{text}");
    setup.refused(&["accounts", "enforce", "acme-eu", "on"], "sub-account");
    assert_eq!(
        setup
            .ctl(&["accounts", "enforce", "acme", "maybe"])
            .status
            .code(),
        Some(2)
    );

    // The audit log names the account of each change.
    let audit = setup.ctl_json(&["audit"]);
    let key_entry = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["action"] == "key.create" && e["detail"].to_string().contains(&kid))
        .unwrap_or_else(|| panic!("no key.create for {kid} in {audit}"));
    assert_eq!(key_entry["account"], "acme-eu");
    let text = stdout(&setup.ctl(&["audit"]));
    assert!(
        text.lines()
            .any(|l| l.contains("acme-eu") && l.contains("key.create")),
        "{text}"
    );

    // Removal: refused with sub-accounts, with active keys unless forced,
    // and for default.
    setup.refused(
        &["accounts", "remove", "acme"],
        "remove those accounts first",
    );
    setup.refused(&["accounts", "remove", "acme-eu"], "--force");
    let gone = setup.ctl_json(&["accounts", "remove", "acme-eu", "--force"]);
    assert_eq!(gone["name"], "acme-eu");
    assert_eq!(gone["keys_revoked"], serde_json::json!([kid]));
    setup.refused(
        &["--account", "acme-eu", "keys", "show", &kid],
        "no account",
    );
    let out = setup.ctl(&["accounts", "remove", "acme"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("removed account acme"),
        "{}",
        stdout(&out)
    );
    setup.refused(&["accounts", "remove", "default"], "cannot be removed");
    setup.refused(&["accounts", "remove", "acme"], "no account named");
    assert_eq!(
        ids(&setup.ctl_json(&["accounts", "list"]), "accounts", "name"),
        ["default"]
    );
    assert_eq!(
        ids(&setup.ctl_json(&["keys", "list"]), "keys", "id"),
        [own["id"].as_str().unwrap()],
        "default's key is untouched"
    );
}

#[test]
fn tokens_are_shown_once_listed_and_revoked() {
    let setup = Setup::new(false, "");
    let d = setup.start(None, &["--no-kernel"]);
    setup.ctl_json(&["accounts", "create", "acme"]);

    let owner = setup.ctl_json(&[
        "--account",
        "acme",
        "tokens",
        "create",
        "--role",
        "owner",
        "--name",
        "dashboard",
    ]);
    let oid = owner["id"].as_str().unwrap().to_string();
    let secret = owner["token"].as_str().unwrap().to_string();
    assert!(secret.starts_with(&format!("alt_{oid}_")), "{secret}");
    assert_eq!(owner["role"], "owner");
    assert_eq!(owner["account"], "acme");
    assert_eq!(owner["name"], "dashboard");
    assert!(owner["revoked_at"].is_null());

    let op = setup.ctl_json(&["tokens", "create", "--operator", "--expires", "30d"]);
    let opid = op["id"].as_str().unwrap().to_string();
    assert_eq!(op["role"], "operator");
    assert!(op["account"].is_null());
    assert!(op["expires_at"].as_i64().is_some());

    // Human output shows the token once, prominently.
    let out = setup.ctl(&["--account", "acme", "tokens", "create", "--role", "viewer"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("token: alt_") && text.contains("only time the token is shown"),
        "{text}"
    );

    // Usage errors: exit 2.
    for args in [
        &["tokens", "create"][..],
        &["tokens", "create", "--operator", "--role", "owner"],
        &["tokens", "create", "--role", "admin"],
        &["tokens", "revoke"],
    ] {
        assert_eq!(setup.ctl(args).status.code(), Some(2), "{args:?}");
    }
    setup.refused(
        &["tokens", "create", "--role", "viewer", "--expires", "soon"],
        "--expires",
    );
    setup.refused(
        &["--account", "nope", "tokens", "create", "--role", "viewer"],
        "no account named",
    );

    // Listed without secrets; --account narrows an operator's list.
    let all = setup.ctl_json(&["tokens", "list"]);
    let all_ids = ids(&all, "tokens", "id");
    assert_eq!(all_ids.len(), 3, "{all}");
    assert!(all_ids.contains(&oid) && all_ids.contains(&opid));
    assert!(
        all["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t.get("token").is_none())
    );
    let the_secret = secret.rsplit('_').next().unwrap();
    assert!(!all.to_string().contains(the_secret));
    assert!(
        !d.log_text().contains(the_secret),
        "a token reached the log"
    );
    let acme = setup.ctl_json(&["--account", "acme", "tokens", "list"]);
    assert_eq!(acme["tokens"].as_array().unwrap().len(), 2);
    assert!(
        acme["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["account"] == "acme")
    );
    let text = stdout(&setup.ctl(&["tokens", "list"]));
    assert!(
        text.contains(&oid) && text.contains("owner of acme"),
        "{text}"
    );

    // Revocation.
    let r = setup.ctl_json(&["tokens", "revoke", &oid]);
    assert_eq!(r["id"], oid.as_str());
    assert!(r["revoked_at"].as_i64().is_some());
    assert!(r.get("token").is_none());
    setup.refused(&["tokens", "revoke", &oid], "already revoked");
    setup.refused(&["tokens", "revoke", "nope"], "no token");
    let text = stdout(&setup.ctl(&["tokens", "list"]));
    assert!(
        text.lines()
            .any(|l| l.contains(&oid) && l.contains("revoked")),
        "{text}"
    );
}

/// A free TCP port on 127.0.0.1 (bound and released: another process could
/// take it in between, which a test run does not).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs `allowlistctl` with exactly `args` (no `--socket`).
fn ctl(args: &[&str]) -> Output {
    Command::new(bin("allowlistctl"))
        .args(args)
        .output()
        .expect("run allowlistctl")
}

/// The arguments to reach `url` with the token in `token` and trust `ca`.
fn over_tls<'a>(url: &'a str, token: &'a Path, ca: &'a Path) -> Vec<&'a str> {
    vec![
        "--url",
        url,
        "--token-file",
        token.to_str().unwrap(),
        "--ca",
        ca.to_str().unwrap(),
    ]
}

/// Creates a token through the socket and writes it to a file.
fn token_file(setup: &Setup, name: &str, args: &[&str]) -> (String, PathBuf) {
    let mut full = args.to_vec();
    full.extend(["--name", name]);
    let t = setup.ctl_json(&full);
    let path = setup.dir.path().join(format!("{name}.token"));
    // Surrounding whitespace (an editor's newline) is trimmed.
    std::fs::write(&path, format!("  {}\n\n", t["token"].as_str().unwrap())).unwrap();
    (t["id"].as_str().unwrap().to_string(), path)
}

#[test]
fn the_admin_api_over_tls_takes_bearer_tokens() {
    let setup = Setup::new(false, "");
    let port = free_port();
    let config = std::fs::read_to_string(&setup.config).unwrap();
    std::fs::write(
        &setup.config,
        config.replacen(
            "[admin]\n",
            &format!("[admin]\nlisten = \"127.0.0.1:{port}\"\n"),
            1,
        ),
    )
    .unwrap();
    let d = setup.start(None, &["--no-kernel"]);
    let url = format!("https://127.0.0.1:{port}");
    let cert = setup.dir.path().join("admin-cert.pem");
    assert!(
        wait_for(Duration::from_secs(10), || cert.exists()),
        "allowlistd wrote no admin-cert.pem next to its store:\n{}",
        d.log_text()
    );

    setup.ctl_json(&["accounts", "create", "acme"]);
    let default_key = setup.ctl_json(&["keys", "create", "--name", "default-web"]);
    let (owner_id, owner) = token_file(
        &setup,
        "owner",
        &["--account", "acme", "tokens", "create", "--role", "owner"],
    );
    let (_, viewer) = token_file(
        &setup,
        "viewer",
        &["--account", "acme", "tokens", "create", "--role", "viewer"],
    );
    let (_, operator) = token_file(&setup, "operator", &["tokens", "create", "--operator"]);

    // The listener may come up just after the socket.
    let tls = |token: &Path, rest: &[&str]| {
        let mut args = over_tls(&url, token, &cert);
        args.extend_from_slice(rest);
        ctl(&args)
    };
    assert!(
        wait_for(Duration::from_secs(10), || tls(&owner, &["keys", "list"])
            .status
            .success()),
        "the admin API over TLS never answered: {}\n{}",
        stderr(&tls(&owner, &["keys", "list"])),
        d.log_text()
    );

    // An owner token acts on its account, and only there.
    let k = json(
        &tls(&owner, &["--json", "keys", "create", "--name", "tls-web"]),
        "keys create over TLS",
    );
    let kid = k["id"].as_str().unwrap().to_string();
    assert_eq!(k["account"], "acme");
    assert!(k["key"].as_str().unwrap().starts_with("alk_"));
    let listed = json(
        &tls(&owner, &["--json", "keys", "list"]),
        "keys list over TLS",
    );
    assert_eq!(ids(&listed, "keys", "id"), [kid.as_str()]);
    exits(
        &tls(&owner, &["--account", "default", "keys", "list"]),
        1,
        &["no account"],
        "an owner token naming another account",
    );
    exits(
        &tls(
            &owner,
            &["keys", "show", default_key["id"].as_str().unwrap()],
        ),
        1,
        &["no key"],
        "an owner token showing default's key",
    );
    exits(
        &tls(&owner, &["accounts", "list"]),
        1,
        &["permission_denied", "operator"],
        "an owner token listing accounts",
    );
    // The change is audited with the token as its actor.
    let audit = setup.ctl_json(&["--account", "acme", "audit"]);
    assert!(
        audit["entries"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "key.create" && e["actor"] == format!("token:{owner_id}")),
        "{audit}"
    );

    // A viewer reads, and may not change keys.
    exits(
        &tls(&viewer, &["keys", "create", "--name", "nope"]),
        1,
        &["permission_denied", "owner"],
        "a viewer token creating a key",
    );
    exits(
        &tls(&viewer, &["ips", "authorize", "203.0.113.0/24"]),
        1,
        &["permission_denied", "ips"],
        "a viewer token authorizing an address",
    );
    let out = tls(&viewer, &["keys", "list"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains(&kid), "{}", stdout(&out));

    // An operator token reaches every account.
    let accounts = json(
        &tls(&operator, &["--json", "accounts", "list"]),
        "accounts list with an operator token",
    );
    let mut names = ids(&accounts, "accounts", "name");
    names.sort();
    assert_eq!(names, ["acme", "default"]);
    let acme_keys = json(
        &tls(&operator, &["--json", "--account", "acme", "keys", "list"]),
        "an operator token naming acme",
    );
    assert_eq!(ids(&acme_keys, "keys", "id"), [kid.as_str()]);

    // --insecure accepts the self-signed certificate without --ca.
    let out = ctl(&[
        "--url",
        &url,
        "--token-file",
        viewer.to_str().unwrap(),
        "--insecure",
        "--json",
        "keys",
        "list",
    ]);
    assert_eq!(ids(&json(&out, "--insecure"), "keys", "id"), [kid.as_str()]);

    // A revoked token is refused (401).
    setup.ctl_json(&["tokens", "revoke", &owner_id]);
    exits(
        &tls(&owner, &["keys", "list"]),
        1,
        &["HTTP 401", "unauthorized"],
        "a revoked token",
    );

    // Usage errors (exit 2) and local problems (exit 1), each saying what to
    // do.
    let v = viewer.to_str().unwrap();
    exits(
        &ctl(&["--url", &url, "--token-file", v, "keys", "list"]),
        2,
        &["--ca", "--insecure"],
        "neither --ca nor --insecure",
    );
    exits(
        &ctl(&[
            "--url",
            &url,
            "--token-file",
            v,
            "--insecure",
            "--ca",
            cert.to_str().unwrap(),
            "keys",
            "list",
        ]),
        2,
        &["either --ca FILE or --insecure"],
        "both --ca and --insecure",
    );
    exits(
        &ctl(&["--url", &url, "--insecure", "keys", "list"]),
        2,
        &["--token-file"],
        "--url without --token-file",
    );
    exits(
        &ctl(&["--token-file", v, "keys", "list"]),
        2,
        &["only with --url"],
        "--token-file without --url",
    );
    let empty = setup.dir.path().join("empty.token");
    std::fs::write(&empty, " \n").unwrap();
    let mut args = over_tls(&url, &empty, &cert);
    args.extend(["keys", "list"]);
    exits(&ctl(&args), 1, &["is empty"], "an empty token file");
    let missing = setup.dir.path().join("missing.token");
    let mut args = over_tls(&url, &missing, &cert);
    args.extend(["keys", "list"]);
    exits(
        &ctl(&args),
        1,
        &["cannot read the token file"],
        "a missing token file",
    );
    let mut args = over_tls(&url, &viewer, &setup.config);
    args.extend(["keys", "list"]);
    exits(
        &ctl(&args),
        1,
        &["no certificate found"],
        "--ca with no PEM",
    );
    let plain = format!("http://127.0.0.1:{port}");
    let mut args = over_tls(&plain, &viewer, &cert);
    args.extend(["keys", "list"]);
    exits(&ctl(&args), 1, &["https://"], "an http:// URL");
    let closed = format!("https://127.0.0.1:{}", free_port());
    let mut args = over_tls(&closed, &viewer, &cert);
    args.extend(["keys", "list"]);
    exits(
        &ctl(&args),
        1,
        &["cannot reach the admin API", "[admin] listen"],
        "nothing listening",
    );
    // A certificate that is not the server's fails the check, with what to
    // do.
    let other_cert = setup.dir.path().join("other-cert.pem");
    let other_key = setup.dir.path().join("other-key.pem");
    let made = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-days", "1", "-subj", "/CN=other"])
        .args(["-addext", "subjectAltName=IP:127.0.0.1"])
        .arg("-keyout")
        .arg(&other_key)
        .arg("-out")
        .arg(&other_cert)
        .output()
        .expect("openssl must be installed");
    assert!(made.status.success(), "{}", stderr(&made));
    let mut args = over_tls(&url, &viewer, &other_cert);
    args.extend(["keys", "list"]);
    exits(
        &ctl(&args),
        1,
        &[
            "TLS handshake",
            "invalid peer certificate",
            "--ca FILE must name",
        ],
        "a CA that did not issue the server's certificate",
    );
}
