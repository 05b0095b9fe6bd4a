//! Blocking modes enforced in the kernel through the daemon: the SMTP guard
//! on the SMTP ports, the API guard on the proxy's port, and the per-key
//! allowlist maps.

use std::time::Duration;

use allowlist_tests::{
    kernel_tests_enabled,
    net::{Connect, Pair, SERVER_IF, SERVER_V4, Server, connect},
    proc::Setup,
};

const T: Duration = Duration::from_millis(700);
const SMTP: u16 = 2525;
const API: u16 = 8443;

fn setup() -> Setup {
    let s = Setup::new(
        true,
        // `on`: these tests check the unions themselves, armed with blocking.
        &format!(
            "interfaces = [\"{SERVER_IF}\"]\nxdp_mode = \"generic\"\nsmtp_ports = [{SMTP}]\napi_guard = \"on\""
        ),
    );
    // The API guard protects the daemon's own TLS edge.
    s.proxy(&format!("listen = \"0.0.0.0:{API}\""));
    s
}

fn bpftool_entries(path: &std::path::Path) -> usize {
    let out = std::process::Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(path)
        .output()
        .expect("bpftool must be installed");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .unwrap()
        .as_array()
        .map_or(0, |a| a.len())
}

#[test]
fn smtp_guard_admits_authorized_senders_only() {
    if !kernel_tests_enabled("smtp_guard_admits_authorized_senders_only") {
        return;
    }
    let pair = Pair::new();
    for a in ["198.51.100.30", "198.51.100.31"] {
        pair.client_addr(a);
    }
    let _smtp = Server::start(&pair.server, SMTP);
    let setup = setup();
    let _d = setup.start(Some(&pair.server), &[]);
    let c = &pair.client;

    assert_eq!(
        connect(c, "198.51.100.31", SERVER_V4, SMTP, T),
        Connect::Ok,
        "inactive: open"
    );
    setup.ctl_json(&[
        "ips",
        "authorize",
        "198.51.100.30/32",
        "--label",
        "mail relay",
    ]);
    setup.ctl_json(&["blocking", "smtp", "activate"]);
    assert_eq!(connect(c, "198.51.100.30", SERVER_V4, SMTP, T), Connect::Ok);
    assert_eq!(
        connect(c, "198.51.100.31", SERVER_V4, SMTP, T),
        Connect::Silent
    );
    let s = setup.ctl_json(&["stats"]);
    assert!(
        s["kernel"]["guard_dropped_smtp"].as_u64().unwrap() >= 1,
        "{s}"
    );

    // Authorizing lets it in at once; deactivating opens the port.
    setup.ctl_json(&["ips", "authorize", "198.51.100.31/32"]);
    assert_eq!(connect(c, "198.51.100.31", SERVER_V4, SMTP, T), Connect::Ok);
    setup.ctl_json(&["ips", "remove", "198.51.100.31/32"]);
    assert_eq!(
        connect(c, "198.51.100.31", SERVER_V4, SMTP, T),
        Connect::Silent
    );
    setup.ctl_json(&["blocking", "smtp", "deactivate"]);
    assert_eq!(connect(c, "198.51.100.31", SERVER_V4, SMTP, T), Connect::Ok);
}

#[test]
fn api_guard_is_the_account_list_narrowed_by_the_keys() {
    if !kernel_tests_enabled("api_guard_is_the_account_list_narrowed_by_the_keys") {
        return;
    }
    let pair = Pair::new();
    for a in ["198.51.100.40", "198.51.100.41", "203.0.113.40"] {
        pair.client_addr(a);
    }
    let _smtp = Server::start(&pair.server, SMTP);
    let setup = setup();
    let _d = setup.start(Some(&pair.server), &[]);
    let c = &pair.client;

    let k = setup.ctl_json(&[
        "keys",
        "create",
        "--name",
        "edge",
        "--allow",
        "198.51.100.40",
        "--allow",
        "203.0.113.0/24",
    ]);
    let id = k["id"].as_str().unwrap().to_string();
    setup.ctl_json(&["ips", "authorize", "198.51.100.0/24"]);
    setup.ctl_json(&["blocking", "api", "activate"]);
    // Allowed by both layers: through. Only one layer: dropped at XDP.
    assert_eq!(connect(c, "198.51.100.40", SERVER_V4, API, T), Connect::Ok);
    assert_eq!(
        connect(c, "198.51.100.41", SERVER_V4, API, T),
        Connect::Silent,
        "not in any key's allowlist"
    );
    assert_eq!(
        connect(c, "203.0.113.40", "203.0.113.1", API, T),
        Connect::Silent,
        "not on the account list"
    );
    // Other ports are untouched by the API guard.
    assert_eq!(connect(c, "198.51.100.41", SERVER_V4, SMTP, T), Connect::Ok);

    // The per-key tries hold the key's two entries; revoking empties them,
    // and with no usable key nothing but always_allow passes the guard.
    let maps = setup.bpffs.join("maps");
    assert_eq!(bpftool_entries(&maps.join("KEY_ALLOW4")), 2);
    setup.ctl_json(&["keys", "revoke", &id]);
    assert_eq!(bpftool_entries(&maps.join("KEY_ALLOW4")), 0);
    assert_eq!(
        connect(c, "198.51.100.40", SERVER_V4, API, T),
        Connect::Silent
    );

    // A key with an empty allowlist admits the whole account list.
    setup.ctl_json(&["keys", "create", "--name", "open"]);
    assert_eq!(connect(c, "198.51.100.41", SERVER_V4, API, T), Connect::Ok);
    setup.ctl_json(&["blocking", "api", "deactivate"]);
    assert_eq!(
        connect(c, "203.0.113.40", "203.0.113.1", API, T),
        Connect::Ok
    );
}

#[test]
fn smtp_ports_belong_to_the_smtp_account() {
    if !kernel_tests_enabled("smtp_ports_belong_to_the_smtp_account") {
        return;
    }
    let pair = Pair::new();
    for a in ["198.51.100.30", "198.51.100.31"] {
        pair.client_addr(a);
    }
    let _smtp = Server::start(&pair.server, SMTP);
    let setup = Setup::new(
        true,
        &format!(
            "interfaces = [\"{SERVER_IF}\"]\nxdp_mode = \"generic\"\nsmtp_ports = [{SMTP}]\n\
             [blocking]\nsmtp_account = \"mail\""
        ),
    );
    let _d = setup.start(Some(&pair.server), &[]);
    let c = &pair.client;

    // default's SMTP mode and list do not guard the ports: they are mail's.
    setup.ctl_json(&["ips", "authorize", "198.51.100.30/32"]);
    setup.ctl_json(&["blocking", "smtp", "activate"]);
    assert_eq!(
        connect(c, "198.51.100.31", SERVER_V4, SMTP, T),
        Connect::Ok,
        "default's SMTP blocking guards nothing here"
    );
    setup.ctl_json(&["accounts", "create", "mail"]);
    setup.ctl_json(&["--account", "mail", "ips", "authorize", "198.51.100.31/32"]);
    setup.ctl_json(&["--account", "mail", "blocking", "smtp", "activate"]);
    assert_eq!(connect(c, "198.51.100.31", SERVER_V4, SMTP, T), Connect::Ok);
    assert_eq!(
        connect(c, "198.51.100.30", SERVER_V4, SMTP, T),
        Connect::Silent,
        "authorized for default only"
    );
    // Its drops are recorded in mail's unauthorized list.
    let recorded = || {
        setup.ctl_json(&["--account", "mail", "ips", "unauthorized"])["unauthorized"]
            .as_array()
            .unwrap()
            .iter()
            .any(|u| u["addr"] == "198.51.100.30" && u["service"] == "smtp")
    };
    assert!(allowlist_tests::net::wait_for(
        Duration::from_secs(3),
        recorded
    ));
    setup.refused(&["accounts", "remove", "mail", "--force"], "smtp_account");
}
