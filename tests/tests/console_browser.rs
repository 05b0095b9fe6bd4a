//! The web console in headless Chromium (chromedriver, WebDriver) against a
//! real daemon with the kernel on, in the test's namespaces: an owner signs
//! in, authorizes an address and sees a keyed call from it succeed,
//! activates blocking after its impact warning, sees a refused caller in
//! Unauthorized IPs and authorizes it there, creates a key and uses the
//! secret shown, revokes it, filters the logs and downloads the CSV; a
//! viewer is offered no change and its forged post is refused; another
//! account's key is unreachable; a form without its CSRF token is refused;
//! an operator's pages. Every page is checked with axe-core and has its
//! screenshot saved; the sign-in works from the keyboard alone.

use std::{path::PathBuf, time::Duration};

use allowlist_tests::{
    browser::{Browser, CHROMEDRIVER, CHROMIUM},
    kernel_tests_enabled,
    net::{Pair, SERVER_IF, SERVER_V4, Upstream, curl, wait_for},
    proc::Setup,
    tool_available,
};
use serde_json::json;

const EDGE: u16 = 8443;
const UP: u16 = 8080;
const ADMIN: u16 = 9443;
/// Authorized through the console.
const A: &str = "198.51.100.60";
/// A recent caller activation would cut; then refused, then authorized
/// from the Unauthorized IPs page.
const B: &str = "203.0.113.61";

fn artifacts() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/console-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn console(path: &str) -> String {
    format!("https://{SERVER_V4}:{ADMIN}{path}")
}

fn edge() -> String {
    format!("https://{SERVER_V4}:{EDGE}/v1/things")
}

/// Checks the page with axe (WCAG 2.1 A and AA) and saves its screenshot.
fn look(b: &Browser, name: &str, failures: &mut Vec<String>) {
    b.screenshot(name);
    for v in b.axe() {
        failures.push(format!("{name}: {v}"));
    }
}

fn token(setup: &Setup, args: &[&str]) -> String {
    setup.ctl_json(args)["token"].as_str().unwrap().to_string()
}

fn sign_in(b: &Browser, token: &str) {
    b.delete_cookies();
    b.goto(&console("/console/signin"));
    b.fill("#token", token);
    b.click("form[action=\"/console/signin\"] button[type=submit]");
    b.wait_for_text("h1", "Authorized IPs", Duration::from_secs(10));
}

/// Reloads `path` until `css` holds `needle` (the daemon records refusals
/// and log rows in batches).
fn reload_until(b: &Browser, path: &str, css: &str, needle: &str) {
    let ok = wait_for(Duration::from_secs(15), || {
        b.goto(&console(path));
        b.exists(css) && b.text(css).contains(needle)
    });
    assert!(
        ok,
        "{needle:?} never showed in {css} of {path}:\n{}",
        b.source()
    );
}

fn call(pair: &Pair, src: &str, key: &str) -> u16 {
    curl(
        &pair.client,
        src,
        &edge(),
        &["-H", &format!("api-key: {key}")],
    )
    .status
}

#[test]
fn an_owner_and_an_operator_work_through_the_console() {
    let test = "an_owner_and_an_operator_work_through_the_console";
    if !kernel_tests_enabled(test)
        || !tool_available(test, CHROMIUM, "chromium")
        || !tool_available(test, CHROMEDRIVER, "chromium-driver")
    {
        return;
    }
    let pair = Pair::new();
    // The browser's own address comes first: Chromium needs one.
    for a in ["198.51.100.2", A, B] {
        pair.client_addr(a);
    }
    let _up = Upstream::start(&pair.server, UP);
    let setup = Setup::new(
        true,
        &format!("interfaces = [\"{SERVER_IF}\"]\nxdp_mode = \"generic\""),
    );
    setup.proxy(&format!(
        "listen = \"0.0.0.0:{EDGE}\"\nupstream = \"http://127.0.0.1:{UP}\""
    ));
    let cfg = std::fs::read_to_string(&setup.config).unwrap();
    std::fs::write(
        &setup.config,
        cfg.replacen(
            "[admin]\n",
            &format!("[admin]\nlisten = \"0.0.0.0:{ADMIN}\"\n"),
            1,
        ),
    )
    .unwrap();
    let d = setup.start(Some(&pair.server), &[]);
    setup.ctl_json(&["accounts", "create", "acme"]);
    setup.ctl_json(&["accounts", "create", "other"]);
    let owner = token(
        &setup,
        &["--account", "acme", "tokens", "create", "--role", "owner"],
    );
    let viewer = token(
        &setup,
        &["--account", "acme", "tokens", "create", "--role", "viewer"],
    );
    let operator = token(&setup, &["tokens", "create", "--operator"]);
    let k0 = setup.ctl_json(&["--account", "acme", "keys", "create", "--name", "first"]);
    let (k0_id, k0) = (
        k0["id"].as_str().unwrap().to_string(),
        k0["key"].as_str().unwrap().to_string(),
    );
    let theirs = setup.ctl_json(&["--account", "other", "keys", "create", "--name", "theirs"]);
    let theirs = theirs["id"].as_str().unwrap();
    let listening = wait_for(Duration::from_secs(15), || {
        curl(
            &pair.client,
            "198.51.100.2",
            &console("/console/signin"),
            &[],
        )
        .status
            == 200
    });
    assert!(listening, "the console never answered:\n{}", d.log_text());

    let b = Browser::start(&pair.client, &artifacts());
    let mut axe = Vec::new();

    // Chromium may still be settling into the namespace's network (its
    // first navigation can meet ERR_NETWORK_CHANGED while the veth's
    // link-local address comes up); try the first page a few times.
    let reached = wait_for(Duration::from_secs(15), || {
        b.goto(&console("/console/"));
        b.current_url().ends_with("/console/signin")
    });
    assert!(reached, "the sign-in page never loaded: {}", b.source());

    // Sign in from the keyboard alone: Tab to the token field, type, Tab
    // to the button, Enter.
    b.goto(&console("/console/"));
    assert!(
        b.current_url().ends_with("/console/signin"),
        "{}: {}",
        b.current_url(),
        b.source()
    );
    look(&b, "01-signin", &mut axe);
    let reached = (0..6).any(|_| {
        b.press_tab(1);
        b.active_element_description().contains("#token")
    });
    assert!(
        reached,
        "Tab never reached the token field: {}",
        b.active_element_description()
    );
    b.fill("#token", &owner);
    b.press_tab(1);
    assert!(
        b.active_element_description().starts_with("button"),
        "{}",
        b.active_element_description()
    );
    b.press_enter();
    let settled = wait_for(Duration::from_secs(10), || {
        b.exists("h1") && !b.text("h1").contains("Sign in")
    });
    if !settled || !b.text("h1").contains("Authorized IPs") {
        panic!("{:?}\n{}", b.cookies(), d.log_plain());
    }
    let session = b
        .cookies()
        .into_iter()
        .find(|c| c.0 == "__Host-allowlist-session")
        .expect("a session cookie");
    assert!(
        session.2 && session.3 && session.4 == "Strict",
        "{session:?}"
    );
    assert!(!b.source().contains(&owner), "the token is on the page");

    // Authorize A (an IPv4 address); a keyed call from it succeeds.
    b.select("#kind", "ipv4");
    b.fill("#address", A);
    b.fill("#label", "office <b>bold</b>");
    b.click("form[action=\"/console/ips/add\"] button[type=submit]");
    b.wait_for_text(
        "main",
        &format!("Authorized {A}/32"),
        Duration::from_secs(10),
    );
    assert!(
        b.text("table").contains("office <b>bold</b>"),
        "the label is shown as text"
    );
    assert_eq!(
        b.count("main table b"),
        0,
        "the label's markup was rendered"
    );
    // A range with host bits gets the CLI's message.
    b.select("#kind", "ipv4-range");
    b.fill("#address", "198.51.100.7");
    b.fill("#prefix", "24");
    b.click("form[action=\"/console/ips/add\"] button[type=submit]");
    b.wait_for_text(
        "main",
        "did you mean 198.51.100.0/24?",
        Duration::from_secs(10),
    );
    assert_eq!(call(&pair, A, &k0), 200);

    // Blocking: leave learning (so B's calls are not learned), let B call,
    // then activate: the impact warning names B and its key.
    b.click("a[href=\"/console/blocking/api?mode=inactive\"]");
    b.click("form[action=\"/console/blocking/api\"] button[type=submit]");
    b.wait_for_text(
        "main",
        "API blocking is now inactive",
        Duration::from_secs(10),
    );
    assert_eq!(call(&pair, B, &k0), 200);
    b.click("a[href=\"/console/blocking/api?mode=active\"]");
    b.wait_for_text("#impact", B, Duration::from_secs(10));
    assert!(b.text("#impact").contains(&k0_id), "{}", b.text("#impact"));
    look(&b, "03-activate-impact", &mut axe);
    b.click("form[action=\"/console/blocking/api\"] button[type=submit]");
    b.wait_for_text(
        "main",
        "API blocking is now active",
        Duration::from_secs(10),
    );
    look(&b, "02-authorized-ips", &mut axe);

    // "Check an address": which rule decides.
    b.fill("#check", B);
    b.click("form[action=\"/console/ips\"] button[type=submit]");
    b.wait_for_text(
        "#check-result",
        "API blocking is active",
        Duration::from_secs(10),
    );

    // B is refused now, shows in Unauthorized IPs, and is authorized there.
    assert_eq!(call(&pair, B, &k0), 403);
    reload_until(&b, "/console/unauthorized", "main", B);
    look(&b, "04-unauthorized", &mut axe);
    b.click(&format!("button[aria-label=\"Authorize {B}\"]"));
    b.wait_for_text(
        "main",
        &format!("Authorized {B}/32"),
        Duration::from_secs(10),
    );
    assert_eq!(call(&pair, B, &k0), 200);

    // Create a key with an allowlist entry and a rate; use the secret shown.
    b.goto(&console("/console/keys/new"));
    look(&b, "05-key-new", &mut axe);
    b.fill("#name", "from the console");
    b.fill("#description", "made in a browser");
    b.fill("#allow", &format!("{A} office"));
    b.fill("#rate", "100/minute");
    b.click("form[action=\"/console/keys\"] button[type=submit]");
    b.wait_for_text("main", "Created key", Duration::from_secs(10));
    look(&b, "06-key-created", &mut axe);
    let secret = b
        .execute("return document.getElementById('secret-new').value", vec![])
        .as_str()
        .unwrap()
        .to_string();
    assert!(secret.starts_with("alk_"), "{secret}");
    b.click("button.copy");
    assert_eq!(call(&pair, A, &secret), 200);
    assert_eq!(
        call(&pair, B, &secret),
        403,
        "B is not on the key's allowlist"
    );
    let new_id = secret.split('_').nth(1).unwrap().to_string();
    b.goto(&console(&format!("/console/keys/{new_id}")));
    assert!(
        b.text("main").contains(&format!("{A}/32")),
        "{}",
        b.text("main")
    );
    look(&b, "07-key", &mut axe);
    b.click("a.button.danger");
    look(&b, "08-key-revoke", &mut axe);
    b.click("form button.danger");
    b.wait_for_text("main", "Revoked key", Duration::from_secs(10));
    assert_eq!(call(&pair, A, &secret), 401);
    look(&b, "09-keys", &mut axe);

    // The logs: filter on 403, only 403s are shown; the CSV of the view.
    reload_until(&b, "/console/logs?status=403", "main", "key_allowlist");
    b.goto(&console("/console/logs"));
    b.fill("#f-status", "403");
    b.click("form[action=\"/console/logs\"] button[type=submit]");
    // The unfiltered page says the same words: wait for the filtered one.
    assert!(
        wait_for(Duration::from_secs(10), || b
            .current_url()
            .contains("status=403")),
        "the filter never applied: {}",
        b.current_url()
    );
    b.wait_for_text("main", "Requests, newest first", Duration::from_secs(10));
    let statuses = b.execute(
        "return [...document.querySelectorAll('table.logs tbody tr td:nth-child(6)')].map(td => td.innerText)",
        vec![],
    );
    let statuses: Vec<&str> = statuses
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(
        !statuses.is_empty() && statuses.iter().all(|s| *s == "403"),
        "{statuses:?}"
    );
    assert!(b.exists("svg.chart"), "no chart");
    look(&b, "10-logs", &mut axe);
    b.click("a[download]");
    let files = b.downloads(1, Duration::from_secs(15));
    let csv = std::fs::read_to_string(&files[0]).unwrap();
    let mut lines = csv.lines();
    assert!(
        lines
            .next()
            .unwrap()
            .starts_with("time,account,key_id,client"),
        "{csv}"
    );
    let rows: Vec<&str> = lines.collect();
    assert_eq!(rows.len(), statuses.len(), "{csv}");
    assert!(rows.iter().all(|r| r.contains(",403,")), "{csv}");

    // Another account's key is unreachable.
    b.goto(&console(&format!("/console/keys/{theirs}")));
    assert!(b.text("main").contains("no key"), "{}", b.text("main"));
    // A form without its CSRF token is refused, and nothing changes.
    b.goto(&console("/console/ips"));
    b.execute(
        "document.querySelector('form[action=\"/console/ips/add\"] input[name=csrf]').remove()",
        vec![],
    );
    b.select("#kind", "ipv4");
    b.fill("#address", "192.0.2.77");
    b.click("form[action=\"/console/ips/add\"] button[type=submit]");
    b.wait_for_text("main", "security token", Duration::from_secs(10));
    let listed = setup
        .ctl_json(&["--account", "acme", "ips", "list"])
        .to_string();
    assert!(!listed.contains("192.0.2.77"), "{listed}");
    look(&b, "11-refused", &mut axe);

    // A viewer: no button or form that changes anything; a forged post
    // (with the viewer's own CSRF token) is refused by the API.
    sign_in(&b, &viewer);
    for path in [
        "/console/ips",
        "/console/unauthorized",
        "/console/keys",
        "/console/logs",
    ] {
        b.goto(&console(path));
        let posts = b.execute(
            "return [...document.querySelectorAll('form[method=post]')].map(f => f.getAttribute('action'))",
            vec![],
        );
        assert_eq!(posts, json!(["/console/signout"]), "{path}");
        assert_eq!(
            b.count("main a.button:not([download])"),
            0,
            "{path}: {}",
            b.source()
        );
    }
    look(&b, "12-viewer", &mut axe);
    let forged = b.execute_async(
        "const done = arguments[arguments.length - 1];
         const csrf = document.querySelector('input[name=csrf]').value;
         fetch('/console/ips/add', {method: 'POST',
             body: new URLSearchParams({csrf, kind: 'ipv4', address: '192.0.2.88'})})
           .then(r => r.text()).then(done, e => done('error: ' + e));",
        vec![],
    );
    assert!(forged.as_str().unwrap().contains("needs"), "{forged}");
    let listed = setup
        .ctl_json(&["--account", "acme", "ips", "list"])
        .to_string();
    assert!(!listed.contains("192.0.2.88"), "{listed}");

    // An operator: accounts, tokens, the drop list (add with a TTL, then
    // remove), counters.
    sign_in(&b, &operator);
    b.goto(&console("/console/accounts"));
    assert!(b.text("main").contains("acme") && b.text("main").contains("other"));
    look(&b, "13-accounts", &mut axe);
    b.goto(&console("/console/tokens"));
    look(&b, "14-tokens", &mut axe);
    b.goto(&console("/console/drops"));
    b.fill("#d-cidr", "192.0.2.0/24");
    b.fill("#d-ttl", "10m");
    b.fill("#d-reason", "console test");
    b.click("form[action=\"/console/drops\"] button[type=submit]");
    b.wait_for_text("main", "Dropping 192.0.2.0/24", Duration::from_secs(10));
    let drops = setup.ctl_json(&["drop", "list"]).to_string();
    assert!(
        drops.contains("192.0.2.0/24") && drops.contains("console test"),
        "{drops}"
    );
    look(&b, "15-drops", &mut axe);
    b.click("button[aria-label=\"Remove 192.0.2.0/24\"]");
    b.wait_for_text("main", "No longer dropping", Duration::from_secs(10));
    b.goto(&console("/console/counters"));
    assert!(
        b.text("main").contains("Map fill levels"),
        "{}",
        b.text("main")
    );
    look(&b, "16-counters", &mut axe);

    assert!(
        axe.is_empty(),
        "accessibility violations:\n{}",
        axe.join("\n")
    );
    drop(b);
    drop(d);
}
