//! allowlistd and allowlistctl without the kernel: the contract's exit
//! codes, messages, JSON output and durability.

use std::process::Command;

use allowlist_tests::proc::{Setup, bin};

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn check_config_accepts_good_and_names_whats_wrong_in_bad() {
    let setup = Setup::new(false, "");
    let ok = Command::new(bin("allowlistd"))
        .arg("--config")
        .arg(&setup.config)
        .arg("--check-config")
        .output()
        .unwrap();
    assert!(ok.status.success(), "{}", stderr(&ok));

    let bad = setup.dir.path().join("bad.toml");
    std::fs::write(&bad, "[proxy]\ntrusted_proxies = [\"203.0.113.5/24\"]\n").unwrap();
    let out = Command::new(bin("allowlistd"))
        .arg("--config")
        .arg(&bad)
        .arg("--check-config")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let e = stderr(&out);
    assert!(
        e.contains("[proxy] trusted_proxies") && e.contains("did you mean 203.0.113.0/24?"),
        "{e}"
    );

    let missing = setup.dir.path().join("nope.toml");
    let out = Command::new(bin("allowlistd"))
        .arg("--config")
        .arg(&missing)
        .arg("--check-config")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("cannot read the configuration"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn drop_commands_round_trip_with_json_and_exit_codes() {
    let setup = Setup::new(false, "");
    let _d = setup.start(None, &["--no-kernel"]);

    let v = setup.ctl_json(&[
        "drop",
        "add",
        "192.0.2.0/24",
        "--ttl",
        "1h",
        "--reason",
        "scanner",
    ]);
    assert_eq!(v["cidr"], "192.0.2.0/24");
    assert_eq!(v["kind"], "manual");
    assert_eq!(v["reason"], "scanner");
    assert_eq!(v["expires_in"], 3600);
    setup.ctl_json(&["drop", "add", "2001:db8::1"]);
    let list = setup.ctl_json(&["drop", "list"]);
    let cidrs: Vec<&str> = list["drops"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["cidr"].as_str().unwrap())
        .collect();
    assert_eq!(cidrs, ["192.0.2.0/24", "2001:db8::1/128"]);

    // Refusals: exit 1, the reason on stderr, nothing changed.
    let out = setup.ctl(&["drop", "add", "192.0.2.5/24"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("did you mean 192.0.2.0/24?"),
        "{}",
        stderr(&out)
    );
    let out = setup.ctl(&["drop", "add", "192.0.2.0/24", "--ttl", "soon"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("like 90s"), "{}", stderr(&out));
    let out = setup.ctl(&["drop", "remove", "198.51.100.0/24"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("not on the drop list"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        setup.ctl_json(&["drop", "list"])["drops"]
            .as_array()
            .unwrap()
            .len(),
        2
    );

    // Usage errors: exit 2.
    assert_eq!(setup.ctl(&["drop", "frobnicate"]).status.code(), Some(2));
    // An unreachable daemon: exit 1 and a hint.
    let out = Command::new(bin("allowlistctl"))
        .args(["--socket", "/nonexistent/admin.sock", "stats"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("Is it running?"), "{}", stderr(&out));

    let removed = setup.ctl_json(&["drop", "remove", "192.0.2.0/24"]);
    assert_eq!(removed["cidr"], "192.0.2.0/24");
    let b = setup.ctl_json(&["blocking", "show"]);
    assert_eq!(b["api"], "learning");
    assert_eq!(b["smtp"], "inactive");
    let s = setup.ctl_json(&["stats"]);
    assert_eq!(s["kernel_enabled"], false);
    assert_eq!(s["drop_entries"], 1);
}

#[test]
fn acknowledged_changes_survive_sigkill() {
    let setup = Setup::new(false, "");
    let d = setup.start(None, &["--no-kernel"]);
    for i in 0..20 {
        setup.ctl_json(&["drop", "add", &format!("198.51.100.{i}")]);
    }
    d.kill9();
    let _d = setup.start(None, &["--no-kernel"]);
    let list = setup.ctl_json(&["drop", "list"]);
    assert_eq!(list["drops"].as_array().unwrap().len(), 20);
    // The audit log recorded who did it.
    let db = setup.dir.path().join("allowlist.db");
    let out = Command::new("sqlite3")
        .arg(&db)
        .arg("SELECT count(*), min(actor) FROM audit WHERE action = 'drop.add'")
        .output()
        .unwrap();
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("20|uid:{uid}"),
        "the caller's own uid, whoever runs the tests"
    );
}

#[test]
fn admin_socket_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let setup = Setup::new(false, "");
    let _d = setup.start(None, &["--no-kernel"]);
    let mode = std::fs::metadata(setup.socket())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
}

/// A system group and two users made for one test, removed on drop.
struct Accounts {
    group: String,
    users: Vec<String>,
}

impl Drop for Accounts {
    fn drop(&mut self) {
        for u in &self.users {
            let _ = Command::new("userdel").arg(u).output();
        }
        let _ = Command::new("groupdel").arg(&self.group).output();
    }
}

#[test]
fn operators_are_root_and_members_of_the_admin_group() {
    // Making users and a group needs root, as the kernel tests do.
    if !allowlist_tests::kernel_tests_enabled("operators_are_root_and_members_of_the_admin_group") {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let tag = std::process::id() % 100_000;
    let acc = Accounts {
        group: format!("altops{tag}"),
        users: vec![format!("altop{tag}"), format!("altno{tag}")],
    };
    let run = |args: &[&str]| {
        let o = Command::new(args[0]).args(&args[1..]).output().unwrap();
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    };
    run(&["groupadd", "--system", &acc.group]);
    for u in &acc.users {
        run(&[
            "useradd",
            "--system",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            u,
        ]);
    }
    run(&["gpasswd", "-a", &acc.users[0], &acc.group]);

    let setup = Setup::new(false, "");
    // Others must reach the socket's folder to try it at all.
    std::fs::set_permissions(setup.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let text = std::fs::read_to_string(&setup.config).unwrap();
    let text = text.replace(
        "[admin]\n",
        &format!("[admin]\ngroup = \"{}\"\n", acc.group),
    );
    std::fs::write(&setup.config, text).unwrap();
    let _d = setup.start(None, &["--no-kernel"]);
    let meta = std::fs::metadata(setup.socket()).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);

    let as_user = |user: &str| {
        Command::new("runuser")
            .args(["-u", user, "--"])
            .arg(bin("allowlistctl"))
            .arg("--socket")
            .arg(setup.socket())
            .args(["--json", "keys", "list"])
            .output()
            .unwrap()
    };
    let member = as_user(&acc.users[0]);
    assert!(
        member.status.success(),
        "a group member is an operator: {}",
        stderr(&member)
    );
    let other = as_user(&acc.users[1]);
    assert_eq!(other.status.code(), Some(1), "{}", stderr(&other));
    assert!(
        stderr(&other).to_lowercase().contains("permission denied"),
        "{}",
        stderr(&other)
    );

    // --check-config names a group that does not exist.
    let bad = setup.dir.path().join("bad.toml");
    std::fs::write(&bad, "[admin]\ngroup = \"no-such-group-here\"\n").unwrap();
    let out = Command::new(bin("allowlistd"))
        .arg("--config")
        .arg(&bad)
        .arg("--check-config")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("[admin] group"), "{}", stderr(&out));
}
