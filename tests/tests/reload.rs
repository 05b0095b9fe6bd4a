//! SIGHUP re-reads the configuration file: trusted proxies (whom the edge
//! believes about the client, and whom the XDP guard admits), the edge and
//! admin certificates and the usage-log retention change at once; other
//! changes are named as needing a restart; a file that is invalid, or
//! names a certificate that does not load, changes nothing.

use std::{path::Path, time::Duration};

use allowlist_tests::{
    kernel_tests_enabled,
    net::{Connect, Pair, Reply, SERVER_IF, SERVER_V4, Upstream, connect, curl, python, wait_for},
    proc::{Daemon, Setup},
};

const EDGE: u16 = 8443;
const UP: u16 = 8080;
const ADMIN: u16 = 9443;
const BALANCER: &str = "198.51.100.70";
/// A direct client, for looking at the edge's certificate.
const OTHER: &str = "198.51.100.71";
const CLIENT: &str = "203.0.113.7";

/// The test's whole configuration: `proxy` and `logs` lines vary.
fn write_config(setup: &Setup, proxy: &str, logs: &str) {
    let dir = setup.dir.path();
    std::fs::write(
        &setup.config,
        format!(
            "[proxy]\nlisten = \"0.0.0.0:{EDGE}\"\n{proxy}\n\
             [admin]\nsocket = \"{sock}\"\nlisten = \"127.0.0.1:{ADMIN}\"\n\
             [store]\nurl = \"sqlite://{db}\"\n\
             [metrics]\nlisten = \"127.0.0.1:0\"\n\
             [kernel]\nenabled = true\nbpffs = \"{bpffs}\"\ninterfaces = [\"{SERVER_IF}\"]\n\
             xdp_mode = \"generic\"\napi_guard = \"on\"\n\
             [logs]\n{logs}\n",
            sock = setup.socket().display(),
            db = dir.join("allowlist.db").display(),
            bpffs = setup.bpffs.display(),
        ),
    )
    .unwrap();
}

/// Sends SIGHUP and waits for the daemon's verdict on it (the `n`th);
/// returns that log line.
fn reload(d: &Daemon, n: usize) -> String {
    d.hup();
    let done = wait_for(Duration::from_secs(10), || {
        d.log_plain().matches("SIGHUP: configuration").count() >= n
    });
    assert!(done, "no verdict on SIGHUP #{n}:\n{}", d.log_plain());
    d.log_plain()
        .lines()
        .filter(|l| l.contains("SIGHUP: configuration"))
        .nth(n - 1)
        .unwrap()
        .to_string()
}

/// A request from the balancer naming `CLIENT` in X-Forwarded-For.
fn via_balancer(pair: &Pair, key: &str) -> Reply {
    curl(
        &pair.client,
        BALANCER,
        &format!("https://{SERVER_V4}:{EDGE}/"),
        &[
            "-H",
            &format!("api-key: {key}"),
            "-H",
            &format!("X-Forwarded-For: {CLIENT}"),
        ],
    )
}

/// SHA-256 of the certificate the server at `addr:port` in `ns` presents,
/// and of the PEM file `pem`, as Python's ssl module reads them.
fn fingerprints(
    ns: &allowlist_tests::net::Netns,
    src: &str,
    addr: &str,
    port: u16,
    pem: &Path,
) -> (String, String) {
    let script = format!(
        r#"
import hashlib, socket, ssl
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
s = socket.create_connection(("{addr}", {port}), timeout=5, source_address=("{src}", 0))
t = ctx.wrap_socket(s)
print(hashlib.sha256(t.getpeercert(binary_form=True)).hexdigest())
print(hashlib.sha256(ssl.PEM_cert_to_DER_cert(open("{pem}").read())).hexdigest())
"#,
        pem = pem.display()
    );
    let out = python(ns, 10, &script);
    let mut lines = out.lines();
    (
        lines.next().unwrap_or_default().to_string(),
        lines.next().unwrap_or_default().to_string(),
    )
}

#[test]
fn sighup_applies_what_can_change_live_and_keeps_the_old_config_on_a_bad_file() {
    if !kernel_tests_enabled(
        "sighup_applies_what_can_change_live_and_keeps_the_old_config_on_a_bad_file",
    ) {
        return;
    }
    let pair = Pair::new();
    pair.client_addr(BALANCER);
    pair.client_addr(OTHER);
    let _up = Upstream::start(&pair.server, UP);
    let setup = Setup::new(true, "");
    let upstream = format!("upstream = \"http://127.0.0.1:{UP}\"");
    write_config(&setup, &upstream, "retention_days = 30");
    let d = setup.start(Some(&pair.server), &[]);
    let key =
        setup.ctl_json(&["keys", "create", "--name", "k", "--allow", "203.0.113.0/24"])["key"]
            .as_str()
            .unwrap()
            .to_string();

    // Not trusted yet: the balancer itself is the client, and the key's
    // allowlist does not admit it.
    let r = via_balancer(&pair, &key);
    assert_eq!(r.status, 403, "{r:?}");

    // A usage-log partition ten days old, kept under 30 days' retention.
    let logs = setup.dir.path().join("logs");
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let old = logs.join(allowlist::logs::day_file(
        allowlist::logs::day_of_ms(now_ms) - 10,
    ));
    std::fs::create_dir_all(&logs).unwrap();
    std::fs::write(&old, b"").unwrap();

    // The edge takes the admin listener's generated pair; the admin
    // listener, its files gone, makes and serves a new one.
    let dir = setup.dir.path();
    let (edge_cert, edge_key) = (dir.join("edge-cert.pem"), dir.join("edge-key.pem"));
    std::fs::copy(dir.join("admin-cert.pem"), &edge_cert).unwrap();
    std::fs::copy(dir.join("admin-key.pem"), &edge_key).unwrap();
    std::fs::remove_file(dir.join("admin-cert.pem")).unwrap();
    std::fs::remove_file(dir.join("admin-key.pem")).unwrap();
    let certs = format!(
        "cert = \"{}\"\nkey = \"{}\"",
        edge_cert.display(),
        edge_key.display()
    );
    let trusted = format!("trusted_proxies = [\"{BALANCER}/32\"]");
    // The upstream changes too, which needs a restart.
    write_config(
        &setup,
        &format!(
            "upstream = \"http://127.0.0.1:{}\"\n{trusted}\n{certs}",
            UP + 1
        ),
        "retention_days = 5",
    );
    let line = reload(&d, 1);
    assert!(line.contains("SIGHUP: configuration reloaded"), "{line}");
    for applied in [
        "[proxy] cert",
        "[proxy] trusted_proxies",
        "[admin] cert",
        "[logs] retention_days (30 -> 5)",
    ] {
        assert!(line.contains(applied), "{applied} not applied: {line}");
    }
    assert!(
        line.contains("restart_needed=[proxy] upstream"),
        "upstream should need a restart: {line}"
    );

    // The balancer is believed now; the upstream is still the one it was.
    let r = via_balancer(&pair, &key);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["headers"]["x-forwarded-for"], CLIENT);
    let (served, file) = fingerprints(&pair.client, OTHER, SERVER_V4, EDGE, &edge_cert);
    assert!(
        !served.is_empty() && served == file,
        "edge serves {served}, file holds {file}"
    );
    let (served, file) = fingerprints(
        &pair.server,
        "127.0.0.1",
        "127.0.0.1",
        ADMIN,
        &dir.join("admin-cert.pem"),
    );
    assert!(
        !served.is_empty() && served == file,
        "admin serves {served}, file holds {file}"
    );
    assert!(
        wait_for(Duration::from_secs(5), || !old.exists()),
        "the 10-day-old partition outlived a 5-day retention"
    );

    // With API blocking active and the guard armed, the trusted balancer
    // is admitted by XDP. (Learning authorized the client's /24 from the
    // request above.)
    setup.ctl_json(&["blocking", "api", "activate", "--force"]);
    assert_eq!(via_balancer(&pair, &key).status, 200);

    // Invalid files change nothing: a prefix with host bits, then a
    // certificate that is not there.
    write_config(
        &setup,
        &format!("{upstream}\ntrusted_proxies = [\"{BALANCER}/24\"]\n{certs}"),
        "retention_days = 5",
    );
    let line = reload(&d, 2);
    assert!(
        line.contains("configuration not reloaded") && line.contains("did you mean"),
        "{line}"
    );
    write_config(
        &setup,
        &format!(
            "{upstream}\ncert = \"{}\"\nkey = \"{}\"",
            dir.join("missing.pem").display(),
            edge_key.display()
        ),
        "retention_days = 5",
    );
    let line = reload(&d, 3);
    assert!(
        line.contains("configuration not reloaded") && line.contains("missing.pem"),
        "{line}"
    );
    let r = via_balancer(&pair, &key);
    assert_eq!(r.status, 200, "the old trusted proxies must stay: {r:?}");
    assert_eq!(r.json()["headers"]["x-forwarded-for"], CLIENT);

    // No longer trusted: the guard union loses the balancer in the same
    // step, so its connections are dropped at XDP.
    write_config(
        &setup,
        &format!("{upstream}\n{certs}"),
        "retention_days = 5",
    );
    let line = reload(&d, 4);
    assert!(
        line.contains("applied=[proxy] cert, [proxy] trusted_proxies, [admin] cert")
            && line.contains("restart_needed=none"),
        "{line}"
    );
    assert_eq!(
        connect(
            &pair.client,
            BALANCER,
            SERVER_V4,
            EDGE,
            Duration::from_millis(700)
        ),
        Connect::Silent
    );
}
