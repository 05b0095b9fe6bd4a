//! The browser harness itself, against a small HTTPS site with a
//! self-signed certificate (as the daemon's admin listener has) in a test
//! namespace: navigation, forms, the keyboard, cookies, downloads,
//! screenshots and axe, and that nothing is left running afterwards.

use std::{
    io::{Read, Write},
    net::TcpListener,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use allowlist_tests::{
    browser::{Browser, CHROMEDRIVER, CHROMIUM},
    net::{Netns, Pair, SERVER_V4},
    root_tests_enabled, tool_available,
};

const PORT: u16 = 8443;
const REPORT: &str = "id,name\n1,alpha\n2,beta\n";

const GOOD: &str = r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Harness</title></head>
<body><main>
<h1>Harness</h1>
<form id="f" action="/hello" method="get">
  <label for="who">Your name</label> <input id="who" name="who" type="text">
  <label for="color">Colour</label>
  <select id="color" name="color"><option value="red">Red</option><option value="blue">Blue</option></select>
  <button type="submit">Greet</button>
</form>
<p><a id="dl" href="/report.csv">Download the report</a></p>
</main></body></html>"#;

/// An unlabelled field and grey-on-white text: axe must report both (the
/// second shows that color-contrast really runs in headless Chromium).
const BAD: &str = r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Bad</title></head>
<body><main>
<h1>Bad</h1>
<input id="nolabel" name="x" type="text">
<p style="color:#bbbbbb;background:#ffffff">Hard to read</p>
</main></body></html>"#;

#[test]
fn browser_harness() {
    let test = "browser_harness";
    if !root_tests_enabled(test)
        || !tool_available(test, CHROMIUM, "chromium")
        || !tool_available(test, CHROMEDRIVER, "chromium-driver")
    {
        return;
    }
    let pair = Pair::new();
    pair.client_addr("198.51.100.2");
    let _site = Site::start(&pair.server);
    let artifacts = Path::new(env!("CARGO_TARGET_TMPDIR")).join(test);
    let _ = std::fs::remove_dir_all(&artifacts);
    let base = format!("https://{SERVER_V4}:{PORT}");

    let b = Browser::start(&pair.client, &artifacts);
    b.goto(&format!("{base}/"));
    assert_eq!(b.current_url(), format!("{base}/"));
    assert_eq!(b.text("h1"), "Harness");
    assert!(b.source().contains("Download the report"));
    assert_eq!(b.count("option"), 2);
    assert!(b.exists("#who") && !b.exists("#nothing-here"));
    assert_eq!(
        b.execute("return arguments[0] + 1;", vec![41.into()]),
        serde_json::json!(42)
    );
    assert_eq!(
        b.axe(),
        Vec::<String>::new(),
        "the good page has violations"
    );

    let mut cookies = b.cookies();
    cookies.sort();
    assert_eq!(
        cookies,
        vec![
            ("sid".into(), "s3cret".into(), true, true, "Strict".into()),
            ("theme".into(), "dark".into(), false, false, "Lax".into()),
        ]
    );
    b.delete_cookies();
    assert_eq!(b.cookies(), vec![]);

    // A keyboard user: Tab through the form to its button, Enter submits.
    b.press_tab(1);
    assert_eq!(
        b.active_element_description(),
        "input#who[name=who][type=text]"
    );
    b.press_tab(2);
    assert_eq!(
        b.active_element_description(),
        r#"button[type=submit] "Greet""#
    );
    b.press_enter();
    b.wait_for_text("#greeting", "Hello, (red)", Duration::from_secs(10));

    b.goto(&format!("{base}/"));
    b.fill("#who", "first");
    b.fill("#who", "Ada Lovelace");
    b.select("#color", "blue");
    b.submit_form("#f");
    b.wait_for_text(
        "#greeting",
        "Hello, Ada Lovelace (blue)",
        Duration::from_secs(10),
    );
    assert!(b.current_url().starts_with(&format!("{base}/hello?")));
    let shot = b.screenshot("greeting");
    assert_eq!(shot, artifacts.join("greeting.png"));
    let png = std::fs::read(&shot).expect("screenshot");
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");

    b.goto(&format!("{base}/"));
    b.click("#dl");
    let files = b.downloads(1, Duration::from_secs(20));
    assert_eq!(files.len(), 1, "{files:?}");
    assert_eq!(files[0].file_name().unwrap(), "report.csv");
    assert_eq!(std::fs::read_to_string(&files[0]).unwrap(), REPORT);

    b.goto(&format!("{base}/bad"));
    let violations = b.axe();
    eprintln!("axe on /bad: {violations:#?}");
    for id in ["label", "color-contrast"] {
        assert!(
            violations.iter().any(|v| v.starts_with(&format!("{id}: "))),
            "axe missed {id}: {violations:?}"
        );
    }
    assert!(
        violations.iter().any(|v| v.contains("#nolabel")),
        "{violations:?}"
    );

    // A failed step names the page it was on.
    // The expected panic would print a backtrace that reads like a failure.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| b.text("#missing")));
    std::panic::set_hook(hook);
    let err = caught.expect_err("text of a missing element must fail");
    let msg = err.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(
        msg.contains(&format!("{base}/bad")) && msg.contains("no element matches"),
        "{msg}"
    );

    drop(b);
    let pids = std::process::Command::new("ip")
        .args(["netns", "pids", &pair.client.name])
        .output()
        .expect("ip netns pids");
    let left = String::from_utf8_lossy(&pids.stdout).trim().to_string();
    assert!(
        left.is_empty(),
        "processes left in the browser's namespace: {left}"
    );
}

/// The test site: HTTPS with a self-signed certificate, one request per
/// connection, each on its own thread (Chromium opens several at once).
struct Site {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Site {
    fn start(ns: &Netns) -> Site {
        let ck = rcgen::generate_simple_self_signed(vec![SERVER_V4.to_string()]).expect("cert");
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![ck.cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into()),
            )
            .expect("server config");
        let cfg = Arc::new(cfg);
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = ns.spawn(move || {
            let listener = TcpListener::bind((SERVER_V4, PORT)).expect("bind site");
            listener.set_nonblocking(true).expect("nonblocking");
            tx.send(()).expect("ready");
            while !flag.load(Ordering::Relaxed) {
                let Ok((tcp, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                let cfg = cfg.clone();
                std::thread::spawn(move || serve(cfg, tcp));
            }
        });
        rx.recv_timeout(Duration::from_secs(5))
            .expect("site did not start");
        Site {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(cfg: Arc<rustls::ServerConfig>, tcp: std::net::TcpStream) {
    let _ = tcp.set_nonblocking(false);
    // Chromium also opens connections it never uses.
    let _ = tcp.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = tcp.set_write_timeout(Some(Duration::from_secs(5)));
    let Ok(conn) = rustls::ServerConnection::new(cfg) else {
        return;
    };
    let mut s = rustls::StreamOwned::new(conn, tcp);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 65536 {
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let target = head.split(' ').nth(1).unwrap_or("/");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let (status, headers, body): (&str, Vec<&str>, String) = match path {
        "/" => (
            "200 OK",
            vec![
                "content-type: text/html; charset=utf-8",
                "set-cookie: sid=s3cret; Path=/; Secure; HttpOnly; SameSite=Strict",
                "set-cookie: theme=dark; Path=/; SameSite=Lax",
            ],
            GOOD.to_string(),
        ),
        "/hello" => {
            let param = |name: &str| {
                query
                    .split('&')
                    .filter_map(|kv| kv.split_once('='))
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| form_decode(v))
                    .unwrap_or_default()
            };
            let greeting = html_escape(&format!("Hello, {} ({})", param("who"), param("color")));
            (
                "200 OK",
                vec!["content-type: text/html; charset=utf-8"],
                format!(
                    "<!doctype html><html lang=\"en\"><head><title>Hello</title></head>\
                     <body><main><h1>Hello</h1><p id=\"greeting\">{greeting}</p></main></body></html>"
                ),
            )
        }
        "/report.csv" => (
            "200 OK",
            vec![
                "content-type: text/csv",
                "content-disposition: attachment; filename=\"report.csv\"",
            ],
            REPORT.to_string(),
        ),
        "/bad" => (
            "200 OK",
            vec!["content-type: text/html; charset=utf-8"],
            BAD.to_string(),
        ),
        _ => (
            "404 Not Found",
            vec!["content-type: text/plain"],
            "no\n".into(),
        ),
    };
    let mut out = format!(
        "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n",
        body.len()
    );
    for h in headers {
        out.push_str(h);
        out.push_str("\r\n");
    }
    out.push_str("\r\n");
    out.push_str(&body);
    if s.write_all(out.as_bytes()).is_ok() {
        s.conn.send_close_notify();
        let _ = s.flush();
    }
}

/// `application/x-www-form-urlencoded` value: `+` is a space, `%XX` a byte.
fn form_decode(v: &str) -> String {
    let bytes = v.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                match std::str::from_utf8(&bytes[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
