//! The usage log through the real edge: every request answered (refused
//! ones included) with its fields, every filter, the CSV export read back
//! by Python's csv module, retention by whole day partitions, and a burst
//! larger than the writer's buffer that keeps being served while the loss
//! is counted.

use std::{process::Stdio, time::Duration};

use allowlist_tests::{
    kernel_tests_enabled,
    net::{Pair, SERVER_V4, Upstream, curl, python, wait_for},
    proc::Setup,
};

const EDGE: u16 = 8443;
const UP: u16 = 8080;
const A: &str = "198.51.100.60";
const B: &str = "198.51.100.61";

fn setup(pair: &Pair, logs: &str) -> Setup {
    let setup = Setup::new(false, "");
    setup.proxy(&format!(
        "listen = \"0.0.0.0:{EDGE}\"\nupstream = \"http://127.0.0.1:{UP}\""
    ));
    let cfg = std::fs::read_to_string(&setup.config).unwrap();
    std::fs::write(&setup.config, format!("{cfg}[logs]\n{logs}\n")).unwrap();
    let _ = pair;
    setup
}

fn rows(setup: &Setup, args: &[&str]) -> Vec<serde_json::Value> {
    let mut full = vec!["logs"];
    full.extend_from_slice(args);
    setup.ctl_json(&full)["entries"].as_array().unwrap().clone()
}

#[test]
fn every_request_is_logged_and_filtered_and_exported() {
    if !kernel_tests_enabled("every_request_is_logged_and_filtered_and_exported") {
        return;
    }
    let pair = Pair::new();
    pair.client_addr(A);
    pair.client_addr(B);
    let _up = Upstream::start(&pair.server, UP);
    let setup = setup(&pair, "retention_days = 30");
    // A partition from long ago: past retention, deleted whole at start.
    let dir = setup.dir.path().join("logs");
    std::fs::create_dir_all(&dir).unwrap();
    let old = dir.join("requests-2000-01-01.db");
    std::fs::write(&old, b"").unwrap();
    let _d = setup.start(Some(&pair.server), &["--no-kernel"]);
    setup.ctl_json(&["accounts", "create", "beta"]);
    let k = setup.ctl_json(&["keys", "create", "--name", "w", "--allow", A]);
    let (id, key) = (k["id"].as_str().unwrap(), k["key"].as_str().unwrap());
    let url = |p: &str| format!("https://{SERVER_V4}:{EDGE}{p}");
    let hk = format!("api-key: {key}");
    let c = &pair.client;
    for _ in 0..2 {
        assert_eq!(curl(c, A, &url("/v1/things"), &["-H", &hk]).status, 200);
    }
    let posted = curl(
        c,
        A,
        &url("/emails"),
        &["-H", &hk, "-X", "POST", "--data-binary", "hello"],
    );
    assert_eq!(posted.status, 200);
    let wrong = format!("api-key: alk_{id}_{}", "0".repeat(64));
    assert_eq!(curl(c, A, &url("/v1/things"), &["-H", &wrong]).status, 401);
    assert_eq!(curl(c, B, &url("/v1/things"), &["-H", &hk]).status, 403);
    assert_eq!(curl(c, A, &url("/a%2Fb"), &["-H", &hk]).status, 400);

    assert!(
        wait_for(Duration::from_secs(5), || rows(&setup, &[]).len() == 6),
        "six rows: {:?}",
        rows(&setup, &[])
    );
    assert!(!old.exists(), "the partition past retention is gone");
    let all = rows(&setup, &[]);
    // Newest first: the 400 was the last request.
    let reasons: Vec<&str> = all.iter().map(|r| r["reason"].as_str().unwrap()).collect();
    assert_eq!(
        reasons,
        [
            "bad_request",
            "key_allowlist",
            "bad_secret",
            "ok",
            "ok",
            "ok"
        ]
    );
    let times: Vec<i64> = all.iter().map(|r| r["at_ms"].as_i64().unwrap()).collect();
    assert!(times.windows(2).all(|w| w[0] >= w[1]), "{times:?}");
    let post = &all[3];
    assert_eq!(post["method"], "POST");
    assert_eq!(post["path"], "/emails");
    assert_eq!(post["status"], 200);
    assert_eq!(post["client"], A);
    assert_eq!(post["key_id"], id);
    assert_eq!(post["account"], "default");
    assert_eq!(post["bytes_in"], 5);
    assert!(post["bytes_out"].as_i64().unwrap() > 0, "{post}");
    assert!(
        post["rule"]
            .as_str()
            .unwrap()
            .contains(&format!("key allowlist {A}/32")),
        "{post}"
    );
    let refused = &all[1];
    assert_eq!(
        (refused["status"].as_i64(), refused["client"].as_str()),
        (Some(403), Some(B))
    );
    assert_eq!(refused["rule"], "key allowlist: no entry matched");
    assert_eq!(all[0]["status"], 400);
    assert_eq!(all[0]["path"], "/a%2Fb");

    // Every filter alone, and combined.
    let n = |args: &[&str]| rows(&setup, args).len();
    assert_eq!(n(&["--status", "403"]), 1);
    assert_eq!(
        n(&["--key", id]),
        5,
        "every keyed request, refused ones too"
    );
    assert_eq!(n(&["--method", "post"]), 1);
    assert_eq!(n(&["--reason", "key_allowlist"]), 1);
    assert_eq!(n(&["--ip", &format!("{B}/32")]), 1);
    assert_eq!(n(&["--ip", "198.51.100.0/24"]), 6);
    assert_eq!(n(&["--method", "GET", "--status", "200"]), 2);
    assert_eq!(n(&["--ip", A, "--reason", "bad_secret"]), 1);
    assert_eq!(n(&["--limit", "2"]), 2);
    assert_eq!(n(&["--since", "1h"]), 6);
    assert_eq!(n(&["--until", "2000-01-01T00:00:00Z"]), 0);
    // Another account sees none of it.
    assert_eq!(n(&["--account", "beta"]), 0);
    setup.refused(&["logs", "--status", "999"], "not an HTTP status");
    setup.refused(
        &["logs", "--ip", "203.0.113.5/24"],
        "did you mean 203.0.113.0/24?",
    );

    // The CSV export, read back by Python's csv module.
    let export = setup.ctl(&["logs", "--csv"]);
    assert!(
        export.status.success(),
        "{}",
        String::from_utf8_lossy(&export.stderr)
    );
    let mut py = std::process::Command::new("/usr/bin/python3")
        .args([
            "-c",
            "import csv, json, sys; print(json.dumps(list(csv.DictReader(sys.stdin))))",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    py.stdin.take().unwrap().write_all(&export.stdout).unwrap();
    let parsed: Vec<serde_json::Value> =
        serde_json::from_slice(&py.wait_with_output().unwrap().stdout).unwrap();
    assert_eq!(parsed.len(), all.len());
    for (csv_row, json_row) in parsed.iter().zip(&all) {
        for f in [
            "account", "key_id", "client", "method", "path", "reason", "rule",
        ] {
            assert_eq!(csv_row[f], json_row[f], "{f}");
        }
        assert_eq!(csv_row["status"], json_row["status"].to_string());
        assert_eq!(csv_row["bytes_in"], json_row["bytes_in"].to_string());
    }
    let filtered = setup.ctl(&["logs", "--csv", "--reason", "ok"]);
    let text = String::from_utf8_lossy(&filtered.stdout);
    assert_eq!(text.lines().count(), 4, "a header and three rows: {text}");
    assert!(text.starts_with("time,account,key_id,client,method,path,status,reason,rule,"));
}

#[test]
fn a_burst_larger_than_the_buffer_is_served_and_its_loss_counted() {
    if !kernel_tests_enabled("a_burst_larger_than_the_buffer_is_served_and_its_loss_counted") {
        return;
    }
    let pair = Pair::new();
    pair.client_addr(A);
    let _up = Upstream::start(&pair.server, UP);
    let setup = setup(&pair, "buffer = 16");
    setup.metrics("127.0.0.1:9477");
    let _d = setup.start(Some(&pair.server), &["--no-kernel"]);
    let key = setup.ctl_json(&["keys", "create", "--name", "b"])["key"]
        .as_str()
        .unwrap()
        .to_string();
    // 300 requests at once over HTTP/2: far more than 16 records arrive
    // within one write interval.
    let out = python(
        &pair.client,
        60,
        &format!(
            r#"
import asyncio, httpx
async def main():
    async with httpx.AsyncClient(http2=True, verify=False, timeout=30,
                                 transport=httpx.AsyncHTTPTransport(http2=True, verify=False, local_address="{A}")) as c:
        rs = await asyncio.gather(*[c.get("https://{SERVER_V4}:{EDGE}/v1/things", headers={{"api-key": "{key}"}}) for _ in range(300)])
        print(sum(1 for r in rs if r.status_code == 200))
asyncio.run(main())
"#
        ),
    );
    assert_eq!(
        out.trim(),
        "300",
        "every request of the burst is served: {out}"
    );
    let scrape = || {
        python(
            &pair.server,
            15,
            r#"
import urllib.request
from prometheus_client.openmetrics.parser import text_string_to_metric_families
text = urllib.request.urlopen("http://127.0.0.1:9477/metrics", timeout=5).read().decode()
v = {}
for fam in text_string_to_metric_families(text):
    for s in fam.samples:
        if s.name.startswith("allowlist_log_"):
            v[s.name] = int(s.value)
print(v.get("allowlist_log_written_total", 0), v.get("allowlist_log_dropped_total", 0), v.get("allowlist_log_failed_total", 0))
"#,
        )
    };
    let mut last = String::new();
    let settled = wait_for(Duration::from_secs(5), || {
        last = scrape();
        let v: Vec<u64> = last
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        v.len() == 3 && v[0] + v[1] == 300
    });
    assert!(settled, "written + dropped = 300: {last}");
    let v: Vec<u64> = last
        .split_whitespace()
        .map(|x| x.parse().unwrap())
        .collect();
    assert!(
        v[1] > 0,
        "the burst overflowed the buffer and the loss is counted: {last}"
    );
    assert_eq!(v[2], 0, "{last}");
}
