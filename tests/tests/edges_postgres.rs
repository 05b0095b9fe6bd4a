//! Two edges on one PostgreSQL, each in its own network namespace with the
//! kernel on: what is changed through one edge's admin API is enforced by
//! the other; while the server is down both keep enforcing the last policy
//! they knew and refuse admin changes, and both catch up when it returns.

use std::time::{Duration, Instant};

use allowlist_tests::{
    kernel_tests_enabled,
    net::{Pair, SERVER_V4, Upstream, curl, wait_for},
    postgres::{PASSWORD, PgServer, postgres_available},
    proc::{Daemon, Setup},
};

const EDGE: u16 = 8443;
const UP: u16 = 8080;
const SRC: &str = "198.51.100.80";
const OTHER: &str = "198.51.100.81";
/// Never authorized: its calls are refused.
const STRANGER: &str = "198.51.100.82";
/// What a change on one edge may take to be enforced on the other, in
/// this test (generous: the benchmark reports the real figure).
const BOUND: Duration = Duration::from_secs(5);

struct Edge {
    pair: Pair,
    setup: Setup,
    _up: Upstream,
    daemon: Option<Daemon>,
}

impl Edge {
    fn new(url: &str) -> Edge {
        let pair = Pair::new();
        pair.client_addr(SRC);
        pair.client_addr(OTHER);
        pair.client_addr(STRANGER);
        let up = Upstream::start(&pair.server, UP);
        let setup = Setup::new(true, "");
        setup.proxy(&format!(
            "listen = \"0.0.0.0:{EDGE}\"\nupstream = \"http://127.0.0.1:{UP}\""
        ));
        let text = std::fs::read_to_string(&setup.config).unwrap();
        let sqlite_line = text
            .lines()
            .find(|l| l.starts_with("url = \"sqlite://"))
            .unwrap()
            .to_string();
        let text = text.replace(
            &sqlite_line,
            &format!(
                "url = \"{url}\"\nstate_dir = \"{}\"\nresync_secs = 600",
                setup.dir.path().display()
            ),
        );
        std::fs::write(&setup.config, text).unwrap();
        let daemon = Some(setup.start(Some(&pair.server), &[]));
        Edge {
            pair,
            setup,
            _up: up,
            daemon,
        }
    }

    fn call(&self, src: &str, key: &str) -> u16 {
        self.call_path(src, key, "/v1/things")
    }

    fn call_path(&self, src: &str, key: &str, path: &str) -> u16 {
        curl(
            &self.pair.client,
            src,
            &format!("https://{SERVER_V4}:{EDGE}{path}"),
            &["-H", &format!("api-key: {key}"), "--max-time", "5"],
        )
        .status
    }

    /// How long until a call from `src` with `key` gets `status`, or panics
    /// after `BOUND`.
    fn until(&self, src: &str, key: &str, status: u16) -> Duration {
        let start = Instant::now();
        let mut last = 0;
        while start.elapsed() < BOUND {
            last = self.call(src, key);
            if last == status {
                return start.elapsed();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "the other edge did not enforce the change within {BOUND:?} (last status {last}):\n{}",
            self.daemon.as_ref().unwrap().log_text()
        );
    }
}

#[test]
fn a_change_on_one_edge_is_enforced_on_the_other_and_an_outage_fails_closed() {
    let name = "a_change_on_one_edge_is_enforced_on_the_other_and_an_outage_fails_closed";
    if !kernel_tests_enabled(name) || !postgres_available(name) {
        return;
    }
    let mut pg = PgServer::start();
    pg.create_db("edges");
    let url = pg.unix_url("edges");
    let a = Edge::new(&url);
    let b = Edge::new(&url);

    // An account made on A, with blocking active and SRC authorized, and
    // a key whose own list has SRC and OTHER.
    a.setup.ctl_json(&["accounts", "create", "acme"]);
    a.setup.ctl_json(&[
        "--account",
        "acme",
        "blocking",
        "api",
        "activate",
        "--force",
    ]);
    a.setup.ctl_json(&[
        "--account",
        "acme",
        "ips",
        "authorize",
        &format!("{SRC}/32"),
    ]);
    let created = a.setup.ctl_json(&[
        "--account",
        "acme",
        "keys",
        "create",
        "--name",
        "web",
        "--allow",
        &format!("{SRC}/32"),
        "--allow",
        &format!("{OTHER}/32"),
    ]);
    let key = created["key"].as_str().unwrap().to_string();
    let id = created["id"].as_str().unwrap().to_string();
    let took = b.until(SRC, &key, 200);
    eprintln!("key created on A, served by B after {took:?}");
    assert_eq!(b.call(OTHER, &key), 403, "B enforces the account's list");
    assert_eq!(a.call(SRC, &key), 200);

    // OTHER authorized on A reaches B.
    a.setup.ctl_json(&[
        "--account",
        "acme",
        "ips",
        "authorize",
        &format!("{OTHER}/32"),
    ]);
    let took = b.until(OTHER, &key, 200);
    eprintln!("address authorized on A, admitted by B after {took:?}");

    // B's own view: the key and its list, read from the store.
    let keys = b.setup.ctl_json(&["--account", "acme", "keys", "list"]);
    assert!(keys.to_string().contains(&id), "{keys}");

    // The server stops: both edges keep enforcing what they knew, and
    // admin changes are refused with a clear message.
    pg.stop();
    for e in [&a, &b] {
        assert_eq!(e.call(SRC, &key), 200);
        assert_eq!(e.call(SRC, "al_0000000000000000_nope"), 401);
        assert_eq!(e.call(STRANGER, &key), 403);
        // Logged while the server is away: held, written when it is back.
        assert_eq!(e.call_path(SRC, &key, "/v1/during-outage"), 200);
    }
    // The outage shows in stats and /metrics once the edge notices.
    assert!(
        wait_for(Duration::from_secs(10), || {
            a.setup.ctl_json(&["stats"])["store"]["reachable"] == false
        }),
        "A's stats never showed the outage"
    );
    let text = String::from_utf8_lossy(&a.setup.ctl(&["stats"]).stdout).into_owned();
    assert!(
        text.contains("store (postgres): UNREACHABLE since"),
        "{text}"
    );
    let out = a.setup.ctl(&["--account", "acme", "keys", "revoke", &id]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a change during the outage: {err}");
    assert!(
        err.contains("cannot reach the PostgreSQL server") && err.contains("Nothing was changed"),
        "{err}"
    );
    assert!(!err.contains(PASSWORD), "{err}");
    // Nothing was half-applied: the key still works on A.
    assert_eq!(a.call(SRC, &key), 200);

    // Back: a change on B is enforced on A (A's feed reconnected).
    pg.resume();
    assert!(
        wait_for(Duration::from_secs(20), || {
            b.setup
                .ctl(&["--account", "acme", "keys", "revoke", &id])
                .status
                .success()
        }),
        "B takes changes again once the server is back:\n{}",
        b.daemon.as_ref().unwrap().log_text()
    );
    let took = a.until(SRC, &key, 401);
    eprintln!("key revoked on B after the outage, refused by A after {took:?}");
    assert_eq!(b.call(SRC, &key), 401);
    // The refusals held during the outage were written once it was back.
    assert!(
        wait_for(Duration::from_secs(15), || {
            pg.psql(
                "edges",
                &format!("SELECT count(*) FROM unauthorized WHERE addr = '{STRANGER}'"),
            )
            .trim()
                == "1"
        }),
        "the refusals from the outage were not recorded"
    );
    assert_eq!(a.setup.ctl_json(&["stats"])["store"]["reachable"], true);
    // The usage-log rows of the outage reached the shared log.
    assert!(
        wait_for(Duration::from_secs(15), || {
            pg.psql(
                "edges",
                "SELECT count(*) FROM usage_log WHERE path = '/v1/during-outage'",
            )
            .trim()
                == "2"
        }),
        "the outage's log rows were not written"
    );
    // The outage was logged, without the URL's password.
    for e in [&a, &b] {
        let log = e.daemon.as_ref().unwrap().log_plain();
        assert!(log.contains("cannot be reached"), "{log}");
        assert!(!log.contains(PASSWORD), "the password is in a log");
    }
    drop(a);
    drop(b);
}

#[test]
fn two_edges_learn_one_prefix_once_and_their_counters_add_up() {
    let name = "two_edges_learn_one_prefix_once_and_their_counters_add_up";
    if !kernel_tests_enabled(name) || !postgres_available(name) {
        return;
    }
    let pg = PgServer::start();
    pg.create_db("edges");
    let url = pg.unix_url("edges");
    let a = Edge::new(&url);
    let b = Edge::new(&url);
    // An account in learning mode (the default) and a key with no list.
    a.setup.ctl_json(&["accounts", "create", "learner"]);
    let key = a
        .setup
        .ctl_json(&["--account", "learner", "keys", "create", "--name", "web"])["key"]
        .as_str()
        .unwrap()
        .to_string();
    let id = key.split('_').nth(1).unwrap().to_string();
    b.until(SRC, &key, 200);
    // Both edges see a first call from SRC at the same moment: each learns
    // SRC's /24, and the store keeps one entry.
    let (ka, kb) = (key.clone(), key.clone());
    let (ea, eb) = (&a, &b);
    let served = std::thread::scope(|s| {
        let ta = s.spawn(move || {
            (0..10)
                .map(|_| ea.call(SRC, &ka))
                .filter(|c| *c == 200)
                .count()
        });
        let tb = s.spawn(move || {
            (0..10)
                .map(|_| eb.call(SRC, &kb))
                .filter(|c| *c == 200)
                .count()
        });
        ta.join().unwrap() + tb.join().unwrap()
    });
    assert_eq!(served, 20);
    let learned = || {
        pg.psql(
            "edges",
            "SELECT cidr FROM authorized WHERE account = 'learner' ORDER BY cidr",
        )
    };
    assert!(
        wait_for(Duration::from_secs(10), || learned().trim()
            == "198.51.100.0/24"),
        "one learned entry: {:?}",
        learned()
    );
    // Every call counted, from both edges: the one in `until` and 20.
    let count = || {
        pg.psql(
            "edges",
            &format!("SELECT requests_today FROM keys WHERE id = '{id}'"),
        )
    };
    let total = 1 + served;
    assert!(
        wait_for(Duration::from_secs(15), || count().trim()
            == total.to_string()),
        "requests_today {:?}, expected {total}",
        count()
    );
}
