//! `packaging/allowlist.toml`, the commented example configuration: it is
//! valid as shipped and with every optional line switched on, it sets each
//! option to its default, and it shows every option there is (a new field
//! in `Config` fails this test until the example documents it).

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
};

use allowlist::config::{Config, SmtpConfig, WebhookConfig};
use allowlist_tests::proc::bin;

fn example_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/allowlist.toml")
}

fn example() -> String {
    std::fs::read_to_string(example_path()).expect("read the example configuration")
}

/// `# [section]` and `# key = value` lines made live.
fn uncommented(text: &str) -> String {
    text.lines()
        .map(|l| match l.strip_prefix("# ") {
            Some(rest) if is_header(rest) || key_of(rest).is_some() => rest,
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn is_header(line: &str) -> bool {
    line.starts_with('[') && line.trim_end().ends_with(']')
}

/// The key a `key = value` line sets (prose in comments does not look
/// like one: its right side is no TOML value).
fn key_of(line: &str) -> Option<&str> {
    let (key, value) = line.split_once(" = ")?;
    let value_like = value.starts_with(['"', '[', '-'])
        || value.starts_with(|c: char| c.is_ascii_digit())
        || value == "true"
        || value == "false";
    (value_like && key.chars().all(|c| c.is_ascii_lowercase() || c == '_')).then_some(key)
}

fn check_config(path: &Path) {
    let out = Command::new(bin("allowlistd"))
        .arg("--config")
        .arg(path)
        .arg("--check-config")
        .output()
        .expect("run allowlistd --check-config");
    assert!(
        out.status.success(),
        "allowlistd --check-config {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_example_configuration_checks_as_shipped_and_with_every_option_on() {
    check_config(&example_path());
    let dir = tempfile::Builder::new()
        .prefix(allowlist_tests::PREFIX)
        .tempdir()
        .unwrap();
    let all = dir.path().join("allowlist.toml");
    std::fs::write(&all, uncommented(&example())).unwrap();
    check_config(&all);
}

#[test]
fn the_example_configuration_is_the_defaults() {
    let shipped = Config::parse(&example(), &example_path()).unwrap();
    assert_eq!(
        serde_json::to_value(&shipped).unwrap(),
        serde_json::to_value(Config::default()).unwrap(),
        "the example must set every option to its default"
    );
}

#[test]
fn the_example_configuration_shows_every_option() {
    // Keys (set or commented out) by section, as the example writes them.
    let mut shown: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut section = String::new();
    for line in example().lines() {
        let line = line.strip_prefix("# ").unwrap_or(line);
        if is_header(line) {
            section = line.trim_matches(|c| c == '[' || c == ']').to_string();
        } else if let Some(key) = key_of(line) {
            shown
                .entry(section.clone())
                .or_default()
                .insert(key.to_string());
        }
    }
    // Every option, the optional ones switched on so that they serialize.
    let mut all = Config::default();
    all.proxy.cert = Some("c".into());
    all.proxy.key = Some("k".into());
    all.admin.cert = Some("c".into());
    all.admin.key = Some("k".into());
    all.logs.dir = Some("d".into());
    all.notify.smtp = Some(SmtpConfig {
        relay: "r".into(),
        from: "f".into(),
        to: vec![],
        tls: Default::default(),
    });
    all.notify.webhooks = vec![WebhookConfig {
        url: "u".into(),
        secret: "s".into(),
    }];
    let value = serde_json::to_value(&all).unwrap();
    let mut missing = Vec::new();
    for (section, fields) in value.as_object().unwrap() {
        for (key, v) in fields.as_object().unwrap() {
            let table = match v {
                serde_json::Value::Object(o) => Some(o),
                serde_json::Value::Array(a) => a.first().and_then(|f| f.as_object()),
                _ => None,
            };
            match table {
                Some(t) => {
                    let sub = format!("{section}.{key}");
                    for k in t.keys() {
                        if !shown.get(&sub).is_some_and(|s| s.contains(k)) {
                            missing.push(format!("[{sub}] {k}"));
                        }
                    }
                }
                None => {
                    if !shown.get(section).is_some_and(|s| s.contains(key)) {
                        missing.push(format!("[{section}] {key}"));
                    }
                }
            }
        }
    }
    assert!(
        missing.is_empty(),
        "packaging/allowlist.toml does not show {missing:?}"
    );
}
