//! The console at the HTTP level, with curl as the client (what a browser
//! sends, and what an attacker's script could send instead): the session
//! cookie's attributes, CSRF and cross-site posts refused with nothing
//! changed, a viewer's forged post refused by the API, another account's
//! objects unreachable, sign-out, idle expiry and a revoked token ending
//! their sessions, every page's security headers, and free text escaped.

use std::{process::Command, time::Duration};

use allowlist_tests::{
    net::wait_for,
    proc::{Setup, bin},
    web::Web,
};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Site {
    setup: Setup,
    _daemon: allowlist_tests::proc::Daemon,
    base: String,
    offset: std::path::PathBuf,
}

fn site(extra_admin: &str) -> Site {
    let setup = Setup::new(false, "");
    let port = free_port();
    let config = std::fs::read_to_string(&setup.config).unwrap();
    std::fs::write(
        &setup.config,
        config.replacen(
            "[admin]\n",
            &format!("[admin]\nlisten = \"127.0.0.1:{port}\"\n{extra_admin}"),
            1,
        ),
    )
    .unwrap();
    let offset = setup.dir.path().join("clock-offset");
    std::fs::write(&offset, "0").unwrap();
    let offset_s = offset.to_str().unwrap().to_string();
    let daemon = setup.start_env(
        None,
        &["--no-kernel"],
        &[("ALLOWLIST_CLOCK_OFFSET_FILE", offset_s.as_str())],
    );
    let base = format!("https://127.0.0.1:{port}");
    let up = wait_for(Duration::from_secs(15), || {
        Command::new("curl")
            .args(["-sk", "-o", "/dev/null", "-w", "%{http_code}"])
            .arg(format!("{base}/console/signin"))
            .output()
            .is_ok_and(|o| !o.stdout.is_empty() && !o.stdout.starts_with(b"000"))
    });
    assert!(
        up,
        "the admin listener never answered:\n{}",
        daemon.log_text()
    );
    Site {
        setup,
        _daemon: daemon,
        base,
        offset,
    }
}

fn token(setup: &Setup, args: &[&str]) -> String {
    setup.ctl_json(args)["token"].as_str().unwrap().to_string()
}

#[test]
fn the_console_refuses_forged_posts_and_ends_sessions() {
    let Site {
        setup,
        base,
        offset,
        ..
    } = &site("");
    setup.ctl_json(&["accounts", "create", "acme"]);
    setup.ctl_json(&["accounts", "create", "other"]);
    let owner = token(
        setup,
        &["--account", "acme", "tokens", "create", "--role", "owner"],
    );
    let viewer = token(
        setup,
        &["--account", "acme", "tokens", "create", "--role", "viewer"],
    );
    let other_key = setup.ctl_json(&["--account", "other", "keys", "create", "--name", "theirs"]);
    let other_id = other_key["id"].as_str().unwrap();

    // Not signed in: every page sends to the sign-in page.
    let web = Web::new(base);
    let p = web.get("/console/ips");
    assert_eq!(p.status, 303);
    assert_eq!(p.header("location").as_deref(), Some("/console/signin"));

    // A sign-in post without the form's cookie (a login CSRF) is refused.
    let bare = Web::new(base);
    let p = bare.post("/console/signin", &[("csrf", "00"), ("token", &owner)], &[]);
    assert_eq!(p.status, 403, "{p:?}");
    assert!(
        p.set_cookies()
            .iter()
            .all(|c| !c.starts_with("__Host-allowlist-session"))
    );

    // A wrong token: no session, and a message saying what to do.
    let p = web.sign_in("alt_0000000000000000_nope");
    assert_eq!(p.status, 200);
    assert!(p.body.contains("not valid"), "{}", p.body);

    let p = web.sign_in(&owner);
    assert_eq!(p.status, 303, "{p:?}");
    let cookie = p
        .set_cookies()
        .into_iter()
        .find(|c| c.starts_with("__Host-allowlist-session="))
        .expect("a session cookie");
    for attr in ["HttpOnly", "Secure", "SameSite=Strict", "Path=/"] {
        assert!(cookie.contains(attr), "{attr} missing from {cookie}");
    }
    assert!(!cookie.contains("Domain"), "{cookie}");
    // No token in any header or body the console sends back.
    let page = web.get("/console/ips");
    assert_eq!(page.status, 200);
    assert!(!page.body.contains(&owner) && !page.headers.contains(&owner));
    for (h, want) in [
        (
            "content-security-policy",
            "default-src 'none'; script-src 'self'",
        ),
        ("x-frame-options", "DENY"),
        ("cache-control", "no-store"),
        ("referrer-policy", "no-referrer"),
        ("x-content-type-options", "nosniff"),
    ] {
        let got = page.header(h).unwrap_or_default();
        assert!(got.contains(want), "{h}: {got:?}");
    }
    let csrf = page.csrf();

    // A post without the CSRF token, with a wrong one, or from another
    // site: refused, and nothing changed.
    let add = |fields: &[(&str, &str)], extra: &[&str]| web.post("/console/ips/add", fields, extra);
    let entry = [("kind", "ipv4"), ("address", "203.0.113.7"), ("label", "x")];
    let p = add(&entry, &[]);
    assert_eq!(p.status, 403, "no CSRF token: {p:?}");
    let mut wrong = entry.to_vec();
    wrong.push(("csrf", "0123"));
    assert_eq!(add(&wrong, &[]).status, 403);
    let mut right = entry.to_vec();
    right.push(("csrf", &csrf));
    assert_eq!(
        add(&right, &["-H", "Origin: https://evil.example"]).status,
        403
    );
    assert_eq!(
        add(&right, &["-H", "Sec-Fetch-Site: cross-site"]).status,
        403
    );
    let listed = setup.ctl_json(&["--account", "acme", "ips", "list"]);
    assert_eq!(
        listed["authorized"].as_array().unwrap().len(),
        0,
        "{listed}"
    );
    // The same post, from the console's own page, goes through.
    let origin = format!("Origin: {base}");
    let p = add(
        &right,
        &["-H", &origin, "-H", "Sec-Fetch-Site: same-origin"],
    );
    assert_eq!(p.status, 303, "{p:?}");
    let listed = setup.ctl_json(&["--account", "acme", "ips", "list"]);
    assert_eq!(
        listed["authorized"][0]["cidr"], "203.0.113.7/32",
        "{listed}"
    );

    // Free text comes back escaped.
    let xss = "<script>alert(1)</script><img src=x onerror=alert(2)>";
    right.retain(|(k, _)| *k != "label" && *k != "address");
    right.push(("address", "203.0.113.8"));
    right.push(("label", xss));
    assert_eq!(add(&right, &[]).status, 303);
    let page = web.get("/console/ips");
    assert!(!page.body.contains(xss), "unescaped label");
    assert!(page.body.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));

    // A confirmation page's form posts only where it says: a service
    // spelled as a path is not one.
    let p = web.get("/console/blocking/..%2Fkeys%2F0000000000000001%2Frevoke?mode=inactive");
    assert_eq!(p.status, 404, "{}", p.body);
    assert!(!p.body.contains("/console/keys/"), "{}", p.body);
    let p = web.get("/console/blocking/api?mode=active");
    assert!(
        p.body.contains("action=\"/console/blocking/api\""),
        "{}",
        p.body
    );
    // A token with a control character is not a token (and no panic).
    let odd = Web::new(base);
    let p = odd.sign_in("alt_1\nInjected: x");
    assert_eq!(p.status, 200);
    assert!(p.body.contains("not valid"), "{}", p.body);

    // Another account's objects: unreachable by id, and not revocable.
    let p = web.get(&format!("/console/keys/{other_id}"));
    assert_eq!(p.status, 404, "{}", p.body);
    let p = web.post(
        &format!("/console/keys/{other_id}/revoke"),
        &[("csrf", &csrf)],
        &[],
    );
    assert_eq!(p.status, 303);
    let follow = web.get("/console/keys");
    assert!(follow.body.contains("no key"), "{}", follow.body);
    let theirs = setup.ctl_json(&["--account", "other", "keys", "show", other_id]);
    assert_eq!(theirs["status"], "active");
    // An account token cannot switch account.
    let p = web.post(
        "/console/account",
        &[("csrf", &csrf), ("account", "other")],
        &[],
    );
    assert_eq!(p.status, 403);

    // A viewer: no form that changes anything is offered, and a forged
    // post (with the viewer's own valid CSRF token) is refused by the API.
    let vweb = Web::new(base);
    assert_eq!(vweb.sign_in(&viewer).status, 303);
    for path in ["/console/ips", "/console/unauthorized", "/console/keys"] {
        let page = vweb.get(path);
        assert_eq!(page.status, 200, "{path}");
        let posts: Vec<&str> = page
            .body
            .match_indices("method=\"post\" action=\"")
            .map(|(i, _)| {
                let rest = &page.body[i + 22..];
                &rest[..rest.find('"').unwrap()]
            })
            .collect();
        assert!(
            posts.iter().all(|a| *a == "/console/signout"),
            "{path} offers a viewer {posts:?}"
        );
        assert!(
            !page.body.contains("class=\"button"),
            "{path}: {}",
            page.body
        );
    }
    let vcsrf = vweb.get("/console/ips").csrf();
    let p = vweb.post(
        "/console/ips/add",
        &[
            ("csrf", &vcsrf),
            ("kind", "ipv4"),
            ("address", "198.51.100.9"),
        ],
        &[],
    );
    assert_eq!(p.status, 303);
    let after = vweb.get("/console/ips");
    assert!(after.body.contains("needs"), "{}", after.body);
    let listed = setup.ctl_json(&["--account", "acme", "ips", "list"]);
    assert_eq!(listed["authorized"].as_array().unwrap().len(), 2);

    // Sign-out ends the session: the old cookie is dead.
    let jar_copy = Web::new(base);
    let p = jar_copy.sign_in(&owner);
    let sid = p
        .set_cookies()
        .into_iter()
        .find(|c| c.starts_with("__Host-allowlist-session="))
        .unwrap();
    let sid = sid.split(';').next().unwrap().to_string();
    let csrf2 = jar_copy.get("/console/ips").csrf();
    assert_eq!(
        jar_copy
            .post("/console/signout", &[("csrf", &csrf2)], &[])
            .status,
        303
    );
    let replay = Web::new(base).fetch("/console/ips", &["-H", &format!("Cookie: {sid}")]);
    assert_eq!(replay.status, 303, "a signed-out cookie still works");

    // Idle past [admin] console_idle_mins (30): signed out.
    assert_eq!(web.get("/console/ips").status, 200);
    std::fs::write(offset, (31 * 60).to_string()).unwrap();
    let p = web.get("/console/ips");
    assert_eq!(p.status, 303, "an idle session outlived its limit");

    // A revoked token ends its sessions at their next request.
    let again = Web::new(base);
    assert_eq!(again.sign_in(&owner).status, 303);
    assert_eq!(again.get("/console/keys").status, 200);
    let id = owner.split('_').nth(1).unwrap();
    setup.ctl_json(&["tokens", "revoke", id]);
    let p = again.get("/console/keys");
    assert_eq!(p.status, 303, "{p:?}");
    assert!(p.header("location").unwrap().contains("/console/signin"));
}

#[test]
fn the_console_can_be_turned_off() {
    let Site { setup, base, .. } = &site("console = false\n");
    let operator = token(setup, &["tokens", "create", "--operator"]);
    let web = Web::new(base);
    let p = web.get("/console/signin");
    assert_eq!(p.status, 401, "{p:?}");
    // The API is still there.
    let out = Command::new("curl")
        .args(["-sk", "-H"])
        .arg(format!("Authorization: Bearer {operator}"))
        .arg(format!("{base}/v1/whoami"))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"role\":\"operator\""));
    let _ = bin("allowlistctl");
}
