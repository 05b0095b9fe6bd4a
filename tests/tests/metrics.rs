//! `/metrics` scraped and parsed by Prometheus' own OpenMetrics parser
//! (Debian's python3-prometheus-client), its values checked against the
//! traffic this test made through the real edge.

use allowlist_tests::{
    kernel_tests_enabled,
    net::{Pair, SERVER_V4, Upstream, curl},
    proc::Setup,
    scrape::{get, scrape},
};

const EDGE: u16 = 8443;
const UP: u16 = 8080;
const METRICS: &str = "127.0.0.1:9477";

#[test]
fn metrics_count_what_the_edge_answered() {
    if !kernel_tests_enabled("metrics_count_what_the_edge_answered") {
        return;
    }
    let pair = Pair::new();
    for a in ["198.51.100.60", "198.51.100.61"] {
        pair.client_addr(a);
    }
    let _up = Upstream::start(&pair.server, UP);
    let setup = Setup::new(true, "");
    setup.proxy(&format!(
        "listen = \"0.0.0.0:{EDGE}\"\nupstream = \"http://127.0.0.1:{UP}\""
    ));
    setup.metrics(METRICS);
    // The opt-in series per account.
    let cfg = std::fs::read_to_string(&setup.config).unwrap().replace(
        &format!("listen = \"{METRICS}\""),
        &format!("listen = \"{METRICS}\"\nper_account = true"),
    );
    std::fs::write(&setup.config, cfg).unwrap();
    let _d = setup.start(Some(&pair.server), &[]);
    let k = setup.ctl_json(&[
        "keys",
        "create",
        "--name",
        "m",
        "--allow",
        "198.51.100.60",
        "--allow",
        "192.0.2.0/24",
    ]);
    let (id, key) = (k["id"].as_str().unwrap(), k["key"].as_str().unwrap());
    let call = |src: &str, path: &str, key: &str| {
        curl(
            &pair.client,
            src,
            &format!("https://{SERVER_V4}:{EDGE}{path}"),
            &["-H", &format!("api-key: {key}")],
        )
        .status
    };
    for _ in 0..3 {
        assert_eq!(call("198.51.100.60", "/v1/things", key), 200);
    }
    let wrong = format!("alk_{id}_{}", "0".repeat(64));
    for _ in 0..2 {
        assert_eq!(call("198.51.100.60", "/v1/things", &wrong), 401);
    }
    assert_eq!(call("198.51.100.61", "/v1/things", key), 403);
    assert_eq!(call("198.51.100.60", "/a%2Fb", key), 400);

    let s = scrape(&pair, METRICS);
    let req = |reason: &str, status: &str| {
        get(
            &s,
            "allowlist_requests_total",
            &[("reason", reason), ("status", status)],
        )
    };
    assert_eq!(req("ok", "2xx"), 3.0);
    assert_eq!(req("bad_secret", "4xx"), 2.0);
    assert_eq!(req("key_allowlist", "4xx"), 1.0);
    assert_eq!(req("bad_request", "4xx"), 1.0);
    assert_eq!(req("ok", "5xx"), 0.0);
    // Every decision timed (the 400 was answered before deciding).
    assert_eq!(get(&s, "allowlist_decision_seconds_count", &[]), 6.0);
    assert_eq!(
        get(&s, "allowlist_decision_seconds_bucket", &[("le", "+Inf")]),
        6.0
    );
    assert!(get(&s, "allowlist_decision_seconds_sum", &[]) > 0.0);
    // The key's creation went through the change protocol.
    assert!(get(&s, "allowlist_change_seconds_count", &[]) >= 1.0);
    assert_eq!(get(&s, "allowlist_keys", &[]), 1.0);
    assert_eq!(get(&s, "allowlist_accounts", &[]), 1.0);
    // The kernel's maps: the key's two entries, nothing near full.
    assert_eq!(
        get(&s, "allowlist_map_entries", &[("map", "key_allow_v4")]),
        2.0
    );
    assert_eq!(
        get(&s, "allowlist_map_fill_warning", &[("map", "key_allow_v4")]),
        0.0
    );
    assert_eq!(get(&s, "allowlist_api_guard_armed", &[]), 0.0);
    assert_eq!(
        get(
            &s,
            "allowlist_account_requests_total",
            &[("account", "default"), ("status", "2xx")]
        ),
        3.0
    );
    let per_account_4xx: f64 = s
        .iter()
        .filter(|((n, l), _)| {
            n == "allowlist_account_requests_total"
                && l.iter().any(|(k, v)| k == "status" && v == "4xx")
        })
        .map(|(_, v)| v)
        .sum();
    assert_eq!(
        per_account_4xx, 4.0,
        "every refusal is counted under some account"
    );
    assert_eq!(get(&s, "allowlist_store_errors_total", &[]), 0.0);
    assert_eq!(
        get(
            &s,
            "allowlist_kernel_drops_total",
            &[("reason", "guard_api")]
        ),
        0.0
    );
}
