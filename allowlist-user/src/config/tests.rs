use std::path::Path;

use super::*;

fn parse(s: &str) -> Result<Config, ConfigError> {
    Config::parse(s, Path::new("test.toml"))
}

#[test]
fn empty_file_is_all_defaults() {
    let c = parse("").unwrap();
    assert_eq!(c.proxy.listen.port(), 8443);
    assert_eq!(c.admin.socket, Path::new("/run/allowlist/admin.sock"));
    assert_eq!(c.kernel.smtp_ports, vec![25, 465, 587]);
    assert!(c.kernel.enabled && c.kernel.interfaces.is_empty());
    assert_eq!(c.blocking.learning_days, 30);
}

#[test]
fn spec_example_parses() {
    let c = parse(
        r#"
[proxy]
listen = "0.0.0.0:8443"
upstream = "http://127.0.0.1:8080"
trusted_proxies = ["10.0.0.0/8"]
[admin]
socket = "/run/allowlist/admin.sock"
[store]
url = "sqlite:///var/lib/allowlist/allowlist.db"
[kernel]
enabled = true
interfaces = ["eth0"]
smtp_ports = [25, 465, 587]
bpffs = "/sys/fs/bpf/allowlist"
[blocking]
learning_days = 30
[metrics]
listen = "127.0.0.1:9477"
[notify]
action_base_url = "https://127.0.0.1:8443"
[notify.smtp]
relay = "127.0.0.1:25"
from = "allowlist@localhost"
to = ["ops@localhost"]
[[notify.webhooks]]
url = "http://127.0.0.1:9000/hook"
secret = "0123456789abcdef0123"
"#,
    )
    .unwrap();
    assert_eq!(c.kernel.interfaces, vec!["eth0"]);
    assert_eq!(c.notify.webhooks.len(), 1);
}

#[test]
fn errors_name_the_key_and_the_fix() {
    let e = parse("[proxy]\ntrusted_proxies = [\"203.0.113.5/24\"]")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("[proxy] trusted_proxies") && e.contains("did you mean 203.0.113.0/24?"),
        "{e}"
    );
    let e = parse("[kernel]\nbpffs = \"relative\"")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("[kernel] bpffs") && e.contains("absolute"),
        "{e}"
    );
    let e = parse("[proxy]\nupstream = \"ftp://x\"")
        .unwrap_err()
        .to_string();
    assert!(e.contains("http://"), "{e}");
    let e = parse("[proxy]\nupstream = \"https://api.internal\"")
        .unwrap_err()
        .to_string();
    assert!(e.contains("plain HTTP/1.1"), "{e}");
    let e = parse("[kernel]\nxdp_mode = \"turbo\"")
        .unwrap_err()
        .to_string();
    assert!(e.contains("xdp_mode") || e.contains("turbo"), "{e}");
    let e = parse("[kernal]\nenabled = true").unwrap_err().to_string();
    assert!(e.contains("kernal"), "{e}");
    let e = parse("[store]\nurl = \"mysql://x\"")
        .unwrap_err()
        .to_string();
    assert!(e.contains("[store] url"), "{e}");
    let e = parse("[kernel]\nsmtp_ports = [0]").unwrap_err().to_string();
    assert!(e.contains("smtp_ports"), "{e}");
}
