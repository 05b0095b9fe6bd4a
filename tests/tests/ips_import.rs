//! `allowlistctl ips authorize --file`: every entry of a file in one
//! change; one bad line refuses the whole file and names it, with nothing
//! imported; entries already listed are counted, not duplicated.

use allowlist_tests::proc::Setup;

#[test]
fn a_file_of_entries_is_authorized_whole_or_not_at_all() {
    let setup = Setup::new(false, "");
    let _d = setup.start(None, &["--no-kernel"]);
    setup.ctl_json(&["accounts", "create", "acme"]);
    setup.ctl_json(&["--account", "acme", "ips", "authorize", "192.0.2.0/24"]);
    let good = setup.dir.path().join("good.txt");
    std::fs::write(
        &good,
        "# offices\n198.51.100.0/24 head office\n\n203.0.113.7\n2001:db8:5::/48 lab, floor 2\n192.0.2.0/24 again\n198.51.100.0/24 twice\n",
    )
    .unwrap();
    let r = setup.ctl_json(&[
        "--account",
        "acme",
        "ips",
        "authorize",
        "--file",
        good.to_str().unwrap(),
    ]);
    assert_eq!(r["added"], 3, "{r}");
    assert_eq!(r["already_listed"], 2, "{r}");
    let list = setup.ctl_json(&["--account", "acme", "ips", "list"]);
    let entries: Vec<(String, String)> = list["authorized"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["cidr"].as_str().unwrap().to_string(),
                e["label"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    for want in [
        ("198.51.100.0/24", "head office"),
        ("203.0.113.7/32", ""),
        ("2001:db8:5::/48", "lab, floor 2"),
        ("192.0.2.0/24", ""),
    ] {
        assert!(
            entries.contains(&(want.0.to_string(), want.1.to_string())),
            "{want:?} not in {entries:?}"
        );
    }
    assert_eq!(entries.len(), 4);
    // One import is one audit entry.
    let audit = setup.ctl_json(&["--account", "acme", "audit"]);
    let imports = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "ips.import")
        .count();
    assert_eq!(imports, 1, "{audit}");

    // A bad line: refused, named, nothing imported.
    let bad = setup.dir.path().join("bad.txt");
    std::fs::write(&bad, "10.1.0.0/16\n10.2.0.1/16 host bits\n10.3.0.0/16\n").unwrap();
    setup.refused(
        &[
            "--account",
            "acme",
            "ips",
            "authorize",
            "--file",
            bad.to_str().unwrap(),
        ],
        "entry 2 (\"10.2.0.1/16\")",
    );
    let list = setup.ctl_json(&["--account", "acme", "ips", "list"]);
    assert_eq!(list["authorized"].as_array().unwrap().len(), 4, "{list}");
    // An address and a file at once is a usage error.
    let out = setup.ctl(&[
        "--account",
        "acme",
        "ips",
        "authorize",
        "10.9.0.0/16",
        "--file",
        good.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));

    // A long file, with --progress while stderr is a pipe: what was read
    // (every 100,000 lines, then the entries), what is sent, the answer's
    // time; the result alone on stdout, still JSON.
    let long = setup.dir.path().join("long.txt");
    let mut text = "# filler\n".repeat(100_000);
    text.push_str("10.20.0.0/16 a\n10.21.0.0/16\n");
    std::fs::write(&long, text).unwrap();
    let out = setup.ctl(&[
        "--json",
        "--account",
        "acme",
        "ips",
        "authorize",
        "--file",
        long.to_str().unwrap(),
        "--progress",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    assert_eq!(r["added"], 2, "{r}");
    for want in [
        "read 100000 lines of ",
        "read 2 entries from ",
        "authorizing 2 entries in one change...",
        "answered in ",
    ] {
        assert!(err.contains(want), "{want:?} not in the progress: {err}");
    }
    // Without --progress, a pipe gets no progress at all.
    let quiet = setup.ctl(&[
        "--account",
        "acme",
        "ips",
        "authorize",
        "--file",
        good.to_str().unwrap(),
    ]);
    assert!(quiet.status.success());
    assert!(
        quiet.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&quiet.stderr)
    );
}

/// `allowlistctl drop add --file`: every line in one change, written to
/// the kernel's drop maps (kernel on); one bad line refuses the file.
#[test]
fn a_file_of_drops_is_added_in_one_change() {
    if !allowlist_tests::kernel_tests_enabled("a_file_of_drops_is_added_in_one_change") {
        return;
    }
    let setup = Setup::new(true, "");
    let _d = setup.start(None, &[]);
    let file = setup.dir.path().join("drops.txt");
    let mut text = String::from("# scanners\n");
    for i in 0..2000u32 {
        text.push_str(&format!("2001:db8:{:x}::/48 scanner {i}\n", 0x100 + i));
    }
    text.push_str("192.0.2.0/24\n");
    std::fs::write(&file, text).unwrap();
    let r = setup.ctl_json(&[
        "drop",
        "add",
        "--file",
        file.to_str().unwrap(),
        "--ttl",
        "1h",
        "--reason",
        "bulk",
    ]);
    assert_eq!(r["written"], 2001, "{r}");
    assert_eq!(r["total"], 2001, "{r}");
    let list = setup.ctl_json(&["drop", "list"]);
    let drops = list["drops"].as_array().unwrap();
    assert_eq!(drops.len(), 2001);
    let v4 = drops.iter().find(|d| d["cidr"] == "192.0.2.0/24").unwrap();
    assert_eq!(
        v4["reason"], "bulk",
        "a line without a reason takes --reason"
    );
    assert!(v4["expires_in"].as_i64().unwrap() > 3500);
    let stats = setup.ctl_json(&["stats"]);
    assert_eq!(stats["drop_entries"], 2001, "{stats}");
    assert!(
        stats["maps"]["drop_rules"].as_u64().unwrap() >= 2001,
        "the kernel holds them: {stats}"
    );
    let audit = setup.ctl_json(&["audit"]);
    let imports = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "drop.import")
        .count();
    assert_eq!(imports, 1);

    let bad = setup.dir.path().join("bad.txt");
    std::fs::write(&bad, "198.51.100.0/24\n198.51.100.1/24\n").unwrap();
    setup.refused(
        &["drop", "add", "--file", bad.to_str().unwrap()],
        "entry 2 (\"198.51.100.1/24\")",
    );
    assert_eq!(
        setup.ctl_json(&["drop", "list"])["drops"]
            .as_array()
            .unwrap()
            .len(),
        2001
    );
}
