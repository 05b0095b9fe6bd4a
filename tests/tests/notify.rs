//! The owner's loop through real receivers: a refused call is told by
//! e-mail (a real SMTP server, aiosmtpd) and by a signed webhook (a
//! receiver that fails twice first); a flood sends one message; the
//! message's links, followed with curl against the real edge: GET changes
//! nothing, POST with the page's nonce acts once, siblings are void,
//! forged and expired links are refused, and every use is audited with
//! the link as actor.

use std::time::Duration;

use allowlist_tests::{
    kernel_tests_enabled,
    net::{Pair, SERVER_V4, Upstream, curl, wait_for},
    proc::Setup,
    receivers::{Mail, Receivers},
    scrape::{get, scrape},
};

const EDGE: u16 = 8443;
const UP: u16 = 8080;
const SMTP: u16 = 2525;
const HOOKS: u16 = 9000;
/// Authorized from the start.
const A: &str = "198.51.100.70";
/// Refused, then authorized by link.
const B: &str = "198.51.100.71";
/// Refused, then denied with the key rotated by link.
const C: &str = "198.51.100.72";
/// Refused; its link is left to expire.
const D: &str = "198.51.100.73";
const HOOK_SECRET: &str = "installation-hook-secret-0123456789";
const ACCOUNT_HOOK_SECRET: &str = "account-hook-secret-9876543210";
const METRICS: &str = "127.0.0.1:9477";

fn config(setup: &Setup) {
    setup.metrics(METRICS);
    setup.proxy(&format!(
        "listen = \"0.0.0.0:{EDGE}\"\nupstream = \"http://127.0.0.1:{UP}\""
    ));
    let cfg = std::fs::read_to_string(&setup.config).unwrap();
    std::fs::write(
        &setup.config,
        format!(
            // Learning never ends by itself here: the clock jump below
            // must not raise a notice of its own.
            "{cfg}[blocking]\nlearning_days = 3650\n[notify]\naction_base_url = \"https://{SERVER_V4}:{EDGE}\"\nretry_secs = 0.2\n\
             [notify.smtp]\nrelay = \"127.0.0.1:{SMTP}\"\nfrom = \"allowlist@edge.test\"\n\
             to = [\"ops@edge.test\"]\ntls = \"opportunistic\"\n\
             [[notify.webhooks]]\nurl = \"http://127.0.0.1:{HOOKS}/flaky\"\nsecret = \"{HOOK_SECRET}\"\n"
        ),
    )
    .unwrap();
}

/// The stage every test here starts from: the namespaces with the client
/// addresses, the upstream, a configuration with `[notify]`, and the
/// receivers. Fields drop in order: the receivers before the namespaces.
struct Stage {
    rx: Receivers,
    setup: Setup,
    _up: Upstream,
    pair: Pair,
}

fn stage(clients: &[&str], secrets: &[(&str, &str)], failures: &[(&str, u32)]) -> Stage {
    let pair = Pair::new();
    for a in clients {
        pair.client_addr(a);
    }
    let up = Upstream::start(&pair.server, UP);
    let setup = Setup::new(false, "");
    config(&setup);
    let rx = Receivers::start(
        &pair.server,
        setup.dir.path(),
        SMTP,
        HOOKS,
        secrets,
        failures,
    );
    Stage {
        rx,
        setup,
        _up: up,
        pair,
    }
}

/// The nonce on a confirmation page.
fn nonce(page: &str) -> String {
    let at = page
        .find("name=\"nonce\" value=\"")
        .unwrap_or_else(|| panic!("no nonce in {page}"));
    let rest = &page[at + "name=\"nonce\" value=\"".len()..];
    rest[..rest.find('"').unwrap()].to_string()
}

fn link<'a>(mail: &'a Mail, action: &str) -> &'a str {
    // Each link follows its label line; the labels are the buttons' words.
    let lines: Vec<&str> = mail.body.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.starts_with(action))
        .unwrap_or_else(|| panic!("no {action:?} link in:\n{}", mail.body));
    lines[at + 1].trim()
}

#[test]
fn a_refusal_is_told_once_and_its_links_act_once() {
    if !kernel_tests_enabled("a_refusal_is_told_once_and_its_links_act_once") {
        return;
    }
    let Stage {
        rx, setup, pair, ..
    } = &stage(
        &[A, B, C, D],
        &[("/flaky", HOOK_SECRET), ("/acme", ACCOUNT_HOOK_SECRET)],
        &[("/flaky", 2)],
    );
    let offset = setup.dir.path().join("clock-offset");
    std::fs::write(&offset, "0").unwrap();
    let _d = setup.start_env(
        Some(&pair.server),
        &["--no-kernel"],
        &[("ALLOWLIST_CLOCK_OFFSET_FILE", offset.to_str().unwrap())],
    );
    setup.ctl_json(&["accounts", "create", "acme", "--email", "owner@acme.test"]);
    let acme = |args: &[&str]| {
        let mut full = vec!["--account", "acme"];
        full.extend_from_slice(args);
        setup.ctl_json(&full)
    };
    // The account's own webhook, next to the installation's.
    let secret_file = setup.dir.path().join("hook-secret");
    std::fs::write(&secret_file, ACCOUNT_HOOK_SECRET).unwrap();
    acme(&[
        "notify",
        "webhook",
        "add",
        &format!("http://127.0.0.1:{HOOKS}/acme"),
        "--secret-file",
        secret_file.to_str().unwrap(),
    ]);
    let shown = acme(&["notify", "show"]);
    assert_eq!(shown["emails"][0], "owner@acme.test");
    assert!(!shown.to_string().contains(ACCOUNT_HOOK_SECRET), "{shown}");

    let k = acme(&["keys", "create", "--name", "billing <prod>"]);
    let (id, key) = (
        k["id"].as_str().unwrap().to_string(),
        k["key"].as_str().unwrap().to_string(),
    );
    acme(&["ips", "authorize", A]);
    acme(&["blocking", "api", "activate", "--force"]);
    let url = |p: &str| format!("https://{SERVER_V4}:{EDGE}{p}");
    let hk = format!("api-key: {key}");
    let c = &pair.client;
    assert_eq!(curl(c, A, &url("/v1/things"), &["-H", &hk]).status, 200);

    // A flood of refusals from B: one message to the owner.
    for _ in 0..30 {
        assert_eq!(curl(c, B, &url("/v1/things"), &["-H", &hk]).status, 403);
    }
    assert!(
        wait_for(Duration::from_secs(15), || {
            rx.mails_to("owner@acme.test").len() == 1 && rx.mails_to("ops@edge.test").len() == 1
        }),
        "one message each: {:?}",
        rx.mails()
    );
    // More refusals inside the window, and time for a late duplicate.
    for _ in 0..5 {
        curl(c, B, &url("/v1/things"), &["-H", &hk]);
    }
    std::thread::sleep(Duration::from_secs(2));
    let owner = rx.mails_to("owner@acme.test");
    assert_eq!(owner.len(), 1, "a flood sends one message: {owner:?}");
    let mail = owner[0].clone();
    assert!(
        !mail.to.contains("ops@"),
        "the installation's recipients are not shown to the owner: {}",
        mail.to
    );
    assert!(
        mail.subject.contains("acme") && mail.subject.contains(B),
        "{}",
        mail.subject
    );
    for fact in ["acme", B, &id, "billing <prod>"] {
        assert!(mail.body.contains(fact), "{fact} in:\n{}", mail.body);
    }
    assert!(!mail.raw.contains(&key), "never the secret");
    assert_eq!(mail.links().len(), 3, "{}", mail.body);

    // Webhooks: the flaky one failed twice, then took the event once, signed.
    assert!(
        wait_for(Duration::from_secs(15), || {
            let h = rx.hooks();
            h.iter().any(|h| h.path == "/flaky" && h.status == 200)
                && h.iter().any(|h| h.path == "/acme" && h.status == 200)
        }),
        "{:?}",
        rx.hooks()
    );
    std::thread::sleep(Duration::from_secs(1));
    let hooks = rx.hooks();
    let flaky: Vec<_> = hooks.iter().filter(|h| h.path == "/flaky").collect();
    assert_eq!(
        flaky.iter().map(|h| h.status).collect::<Vec<_>>(),
        [500, 500, 200],
        "{flaky:?}"
    );
    assert!(
        flaky.iter().all(|h| h.valid),
        "every attempt is signed: {flaky:?}"
    );
    let event = &flaky[2].body;
    assert_eq!(event["event"], "address_blocked");
    assert_eq!(flaky[2].event, "address_blocked");
    assert_eq!(event["account"], "acme");
    assert_eq!(event["address"], B);
    assert_eq!(event["key_id"], id.as_str());
    assert_eq!(event["key_name"], "billing <prod>");
    assert_eq!(event["actions"].as_array().unwrap().len(), 3);
    assert!(!flaky[2].body.to_string().contains(&key));
    let acme_hooks: Vec<_> = hooks.iter().filter(|h| h.path == "/acme").collect();
    assert_eq!(acme_hooks.len(), 1, "{acme_hooks:?}");
    assert!(acme_hooks[0].valid, "signed with the account's secret");

    // GET changes nothing, twice; HEAD is refused.
    let authorize = link(&mail, &format!("Authorize {B}"));
    let deny = link(&mail, &format!("Deny {B}"));
    for _ in 0..2 {
        let page = curl(c, A, authorize, &[]);
        assert_eq!(page.status, 200, "{}", page.body);
        assert!(page.body.contains("acme") && page.body.contains(B) && page.body.contains(&id));
        assert!(
            page.body.contains("billing &lt;prod&gt;"),
            "escaped: {}",
            page.body
        );
        assert_eq!(page.header("cache-control"), Some("no-store"));
        assert_eq!(page.header("referrer-policy"), Some("no-referrer"));
    }
    assert_eq!(curl(c, A, authorize, &["-I"]).status, 405);
    assert_eq!(curl(c, B, &url("/v1/things"), &["-H", &hk]).status, 403);
    let listed = acme(&["ips", "list"]).to_string();
    assert!(!listed.contains(B), "GET authorized nothing: {listed}");

    // A forged token, and a POST without the page's nonce, are refused.
    let forged = format!("{}/_allowlist/actions/{}", url(""), "A".repeat(43));
    assert_eq!(curl(c, A, &forged, &["-d", "nonce=x"]).status, 404);
    assert_eq!(curl(c, A, authorize, &["-d", "nonce=wrong"]).status, 403);
    assert_eq!(curl(c, B, &url("/v1/things"), &["-H", &hk]).status, 403);

    // POST with the nonce acts once; again, or a sibling, is refused.
    let deny_nonce = nonce(&curl(c, A, deny, &[]).body);
    let auth_nonce = nonce(&curl(c, A, authorize, &[]).body);
    let done = curl(c, A, authorize, &["-d", &format!("nonce={auth_nonce}")]);
    assert_eq!(done.status, 200, "{}", done.body);
    assert_eq!(curl(c, B, &url("/v1/things"), &["-H", &hk]).status, 200);
    assert_eq!(
        curl(c, A, authorize, &["-d", &format!("nonce={auth_nonce}")]).status,
        410
    );
    assert_eq!(
        curl(c, A, deny, &["-d", &format!("nonce={deny_nonce}")]).status,
        410,
        "a sibling of a used link is void"
    );
    assert_eq!(curl(c, A, authorize, &[]).status, 410);
    assert_eq!(curl(c, B, &url("/v1/things"), &["-H", &hk]).status, 200);
    let audit = acme(&["audit"]);
    let entries = audit["entries"].as_array().unwrap();
    let by_link: Vec<_> = entries
        .iter()
        .filter(|e| e["actor"].as_str().unwrap().starts_with("action:"))
        .collect();
    assert!(
        by_link
            .iter()
            .any(|e| e["action"] == "ips.authorize" && e["detail"].as_str().unwrap().contains(B)),
        "{audit}"
    );
    let actors: std::collections::BTreeSet<&str> = by_link
        .iter()
        .map(|e| e["actor"].as_str().unwrap())
        .collect();
    assert_eq!(actors.len(), 1, "one link acted: {audit}");
    // The usage log (which viewers read) has the clicks, not the tokens.
    let token = |link: &str| link.rsplit('/').next().unwrap().to_string();
    let clicks = allowlist_tests::net::wait_for(Duration::from_secs(5), || {
        setup
            .ctl_json(&["logs", "--limit", "1000"])
            .to_string()
            .contains("/_allowlist/actions/(token)")
    });
    assert!(clicks, "the clicks are logged");
    let logged = setup.ctl_json(&["logs", "--limit", "1000"]).to_string();
    for l in mail.links() {
        assert!(
            !logged.contains(&token(&l)),
            "a token in the usage log: {logged}"
        );
    }

    // C: deny and rotate by link. The old secret stops at once; the new
    // one, shown once on the answer, works (from an authorized address).
    assert_eq!(curl(c, C, &url("/v1/things"), &["-H", &hk]).status, 403);
    assert!(
        wait_for(Duration::from_secs(15), || rx
            .mails_to("owner@acme.test")
            .len()
            == 2),
        "{:?}",
        rx.mails()
    );
    let mail_c = rx.mails_to("owner@acme.test")[1].clone();
    assert!(mail_c.body.contains(C));
    let deny_c = link(&mail_c, &format!("Deny {C}"));
    let n = nonce(&curl(c, A, deny_c, &[]).body);
    let done = curl(c, A, deny_c, &["-d", &format!("nonce={n}")]);
    assert_eq!(done.status, 200, "{}", done.body);
    let new_key = done
        .body
        .split(|ch: char| ch == '<' || ch == '>' || ch.is_whitespace())
        .find(|w| w.starts_with("alk_"))
        .unwrap_or_else(|| panic!("the new secret on the page: {}", done.body))
        .to_string();
    assert_ne!(new_key, key);
    assert_eq!(curl(c, A, &url("/v1/things"), &["-H", &hk]).status, 401);
    let new_hk = format!("api-key: {new_key}");
    assert_eq!(curl(c, A, &url("/v1/things"), &["-H", &new_hk]).status, 200);
    assert_eq!(curl(c, C, &url("/v1/things"), &["-H", &new_hk]).status, 403);

    // D: its link expires (72 h by default).
    assert_eq!(curl(c, D, &url("/v1/things"), &["-H", &new_hk]).status, 403);
    assert!(
        wait_for(Duration::from_secs(15), || rx
            .mails_to("owner@acme.test")
            .len()
            == 3),
        "{:?}",
        rx.mails()
    );
    let mail_d = rx.mails_to("owner@acme.test")[2].clone();
    let auth_d = link(&mail_d, &format!("Authorize {D}"));
    let n = nonce(&curl(c, A, auth_d, &[]).body);
    std::fs::write(&offset, (73 * 3600).to_string()).unwrap();
    assert_eq!(curl(c, A, auth_d, &[]).status, 410);
    assert_eq!(
        curl(c, A, auth_d, &["-d", &format!("nonce={n}")]).status,
        410
    );
    assert_eq!(curl(c, D, &url("/v1/things"), &["-H", &new_hk]).status, 403);

    // 73 h later the window is long over: D's refusal is told again.
    assert!(
        wait_for(Duration::from_secs(15), || rx
            .mails_to("owner@acme.test")
            .len()
            == 4),
        "{:?}",
        rx.mails()
    );

    // What /metrics says of it all, once every delivery is done.
    let mut s = scrape(pair, METRICS);
    assert!(
        wait_for(Duration::from_secs(15), || {
            s = scrape(pair, METRICS);
            get(&s, "allowlist_notify_queue", &[]) == 0.0
        }),
        "deliveries still queued"
    );
    let webhook = [("channel", "webhook")];
    assert_eq!(get(&s, "allowlist_notify_retried_total", &webhook), 2.0);
    assert_eq!(get(&s, "allowlist_notify_failed_total", &webhook), 0.0);
    // Four notices, each to the flaky and the account's webhook.
    assert_eq!(get(&s, "allowlist_notify_sent_total", &webhook), 8.0);
    // Four to the owner and four to the installation's recipients.
    assert_eq!(
        get(&s, "allowlist_notify_sent_total", &[("channel", "email")]),
        8.0
    );
    assert!(get(&s, "allowlist_notices_suppressed_total", &[]) >= 1.0);
    assert_eq!(get(&s, "allowlist_actions_used_total", &[]), 2.0);
    // Forged, no nonce, used twice, the void sibling, expired.
    assert_eq!(get(&s, "allowlist_actions_refused_total", &[]), 5.0);
}

#[test]
fn rate_limits_and_ending_graces_are_told() {
    if !kernel_tests_enabled("rate_limits_and_ending_graces_are_told") {
        return;
    }
    let Stage {
        rx, setup, pair, ..
    } = &stage(&[A, B], &[("/flaky", HOOK_SECRET)], &[]);
    let _d = setup.start(Some(&pair.server), &["--no-kernel"]);
    let k = setup.ctl_json(&["keys", "create", "--name", "batch", "--rate", "10/minute"]);
    let (id, key) = (k["id"].as_str().unwrap(), k["key"].as_str().unwrap());
    let hk = format!("api-key: {key}");
    let url = format!("https://{SERVER_V4}:{EDGE}/v1/things");
    let statuses: Vec<u16> = (0..12)
        .map(|_| curl(&pair.client, A, &url, &["-H", &hk]).status)
        .collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        2,
        "{statuses:?}"
    );
    // A rotation whose grace ends within the warning period.
    setup.ctl_json(&["keys", "rotate", id, "--grace", "30m"]);
    let events = |name: &str| -> Vec<serde_json::Value> {
        rx.hooks()
            .into_iter()
            .filter(|h| h.valid && h.status == 200 && h.body["event"] == name)
            .map(|h| h.body)
            .collect()
    };
    assert!(
        wait_for(Duration::from_secs(20), || {
            events("rate_limit").len() == 2 && events("rotation_grace_ending").len() == 1
        }),
        "{:?}",
        rx.hooks()
    );
    let mut pct: Vec<i64> = events("rate_limit")
        .iter()
        .map(|e| e["percent"].as_i64().unwrap())
        .collect();
    pct.sort();
    assert_eq!(pct, [80, 100]);
    let grace = &events("rotation_grace_ending")[0];
    assert_eq!(grace["key_id"], id);
    assert_eq!(grace["key_name"], "batch");
    assert!(grace["actions"].as_array().unwrap().is_empty());
    // The default account has no recipients: the installation's get them.
    let ops = rx.mails_to("ops@edge.test");
    assert!(
        ops.iter().any(|m| m.subject.contains("rate limit")),
        "{ops:?}"
    );
    for m in &ops {
        assert!(!m.raw.contains(key), "never the secret");
    }

    // A refusal by the key's own allowlist: its link allows the address
    // on that key (authorizing it for the account would not admit it).
    let narrow = setup.ctl_json(&["keys", "create", "--name", "narrow", "--allow", A]);
    let (nid, nkey) = (
        narrow["id"].as_str().unwrap(),
        narrow["key"].as_str().unwrap(),
    );
    let nhk = format!("api-key: {nkey}");
    assert_eq!(curl(&pair.client, B, &url, &["-H", &nhk]).status, 403);
    let told = |rx: &Receivers| {
        rx.mails_to("ops@edge.test")
            .into_iter()
            .find(|m| m.subject.contains(B))
    };
    assert!(
        wait_for(Duration::from_secs(15), || told(rx).is_some()),
        "{:?}",
        rx.mails()
    );
    let mail = told(rx).unwrap();
    assert!(mail.body.contains("own allowlist"), "{}", mail.body);
    assert_eq!(
        mail.links().len(),
        2,
        "allow on the key, deny and rotate: {}",
        mail.body
    );
    let allow = link(&mail, &format!("Allow {B} on key {nid}"));
    let n = nonce(&curl(&pair.client, A, allow, &[]).body);
    let done = curl(&pair.client, A, allow, &["-d", &format!("nonce={n}")]);
    assert_eq!(done.status, 200, "{}", done.body);
    assert_eq!(curl(&pair.client, B, &url, &["-H", &nhk]).status, 200);
    let shown = setup.ctl_json(&["keys", "show", nid]).to_string();
    assert!(shown.contains(&format!("{B}/32")), "{shown}");
    assert!(
        wait_for(Duration::from_secs(15), || rx
            .hooks()
            .iter()
            .any(
                |h| h.body["refused_by"] == "key_allowlist" && h.body["address"] == B
            )),
        "{:?}",
        rx.hooks()
    );
}

#[test]
fn a_reload_sends_the_next_notice_to_the_new_webhook() {
    if !kernel_tests_enabled("a_reload_sends_the_next_notice_to_the_new_webhook") {
        return;
    }
    let Stage {
        rx, setup, pair, ..
    } = &stage(
        &[A, B],
        &[("/flaky", HOOK_SECRET), ("/after", HOOK_SECRET)],
        &[],
    );
    let d = setup.start(Some(&pair.server), &["--no-kernel"]);
    let k = setup.ctl_json(&["keys", "create", "--name", "w", "--allow", A]);
    let hk = format!("api-key: {}", k["key"].as_str().unwrap());
    let url = format!("https://{SERVER_V4}:{EDGE}/v1/things");
    // The webhook moves to /after; nothing else changes.
    let cfg = std::fs::read_to_string(&setup.config)
        .unwrap()
        .replace(&format!("{HOOKS}/flaky"), &format!("{HOOKS}/after"));
    std::fs::write(&setup.config, cfg).unwrap();
    d.hup();
    assert!(
        wait_for(Duration::from_secs(10), || d
            .log_plain()
            .contains("SIGHUP: configuration reloaded")),
        "{}",
        d.log_plain()
    );
    let line = d
        .log_plain()
        .lines()
        .find(|l| l.contains("SIGHUP: configuration reloaded"))
        .unwrap()
        .to_string();
    assert!(line.contains("applied=[notify] webhooks"), "{line}");
    assert!(line.contains("restart_needed=none"), "{line}");
    assert_eq!(curl(&pair.client, B, &url, &["-H", &hk]).status, 403);
    assert!(
        wait_for(Duration::from_secs(15), || rx.hooks().iter().any(|h| h
            .path
            == "/after"
            && h.valid
            && h.status == 200)),
        "{:?}",
        rx.hooks()
    );
    assert!(
        rx.hooks().iter().all(|h| h.path == "/after"),
        "{:?}",
        rx.hooks()
    );
}
