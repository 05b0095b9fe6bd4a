//! A headless Chromium for the web console's tests, driven through
//! chromedriver, behind a blocking API.
//!
//! Both chromedriver and Chromium run inside a test namespace (`ip netns
//! exec`), so the browser reaches only what the test put there and nothing
//! on the host's network. fantoccini is async and its connection to
//! chromedriver is a socket opened in that namespace too, so one worker
//! thread enters the namespace, owns a current-thread runtime and the
//! WebDriver client, and runs each command it is sent; every command has a
//! time limit on the worker and a longer one on the caller's side.

use std::{
    fs,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread::JoinHandle,
    time::{Duration, Instant},
};

use fantoccini::{
    Client, ClientBuilder, Locator,
    actions::{InputSource, KeyAction, KeyActions},
    error::CmdError,
    key::Key,
};
use serde_json::{Value, json};
use tokio::runtime::Runtime;

use crate::net::Netns;

pub const CHROMIUM: &str = "/usr/bin/chromium";
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// Limit for one WebDriver command (a page load, an axe run) on the worker.
const STEP: Duration = Duration::from_secs(40);
/// What the caller waits beyond a command's own limit before deciding the
/// worker itself is stuck.
const SLACK: Duration = Duration::from_secs(10);
/// Page loads and scripts time out inside Chromium before `STEP` does, so a
/// slow page is reported by WebDriver with its reason rather than by us.
const PAGE_LOAD_MS: u64 = 30_000;
const SCRIPT_MS: u64 = 30_000;

type Job = Box<dyn FnOnce(&Runtime, &Client) + Send>;

/// One browser session. Dropping it ends the session and kills chromedriver
/// and every Chromium process it started.
pub struct Browser {
    jobs: Option<mpsc::Sender<Job>>,
    worker: Option<JoinHandle<()>>,
    driver: Child,
    artifacts: PathBuf,
    downloads: PathBuf,
    /// Profile, downloads and HOME of this browser; its path also marks
    /// this browser's processes (see `kill_leftovers`).
    scratch: tempfile::TempDir,
    failures: std::cell::Cell<u32>,
}

impl Browser {
    /// Starts chromedriver and a headless Chromium inside `ns`. Screenshots
    /// and chromedriver's log go to `artifacts`.
    ///
    /// `ns` needs an address on an interface that is up besides loopback
    /// (`Pair::client_addr`): without one Chromium believes it is offline
    /// and refuses every navigation with `ERR_INTERNET_DISCONNECTED`.
    pub fn start(ns: &Netns, artifacts: &Path) -> Browser {
        fs::create_dir_all(artifacts)
            .unwrap_or_else(|e| panic!("creating {}: {e}", artifacts.display()));
        let scratch = tempfile::Builder::new()
            .prefix(&format!("{}-browser-", crate::PREFIX))
            .tempdir()
            .expect("browser tempdir");
        let profile = scratch.path().join("profile");
        let downloads = scratch.path().join("downloads");
        let home = scratch.path().join("home");
        for d in [&profile, &downloads, &home] {
            fs::create_dir_all(d).unwrap_or_else(|e| panic!("creating {}: {e}", d.display()));
        }

        // A port free in the namespace: nothing else listens there but what
        // the test started, and the listener is gone before chromedriver
        // binds.
        let port = ns.run(|| {
            std::net::TcpListener::bind(("127.0.0.1", 0))
                .and_then(|l| l.local_addr())
                .expect("probe a free port in the namespace")
                .port()
        });
        let log = artifacts.join(format!("chromedriver-{port}.log"));
        let driver = Command::new("ip")
            .args(["netns", "exec", &ns.name, CHROMEDRIVER])
            .arg(format!("--port={port}"))
            .arg(format!("--log-path={}", log.display()))
            // Chromium keeps its crash database and caches under HOME; a
            // private one keeps them out of root's and lets Drop find every
            // helper process by this path.
            .env("HOME", &home)
            .env("XDG_CONFIG_HOME", home.join(".config"))
            .env("XDG_CACHE_HOME", home.join(".cache"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group, which Chromium's processes join, so
            // Drop can kill them all at once.
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {CHROMEDRIVER} in {}: {e}", ns.name));

        let caps = json!({
            "browserName": "chrome",
            // The admin listener's certificate is self-signed.
            "acceptInsecureCerts": true,
            "timeouts": {"implicit": 0, "pageLoad": PAGE_LOAD_MS, "script": SCRIPT_MS},
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless=new",
                    // Root cannot use Chromium's sandbox.
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-quic",
                    "--no-first-run",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--disable-dev-shm-usage",
                    format!("--user-data-dir={}", profile.display()),
                    "--window-size=1280,1000",
                ],
                // Checked in headless mode by the browser_harness test:
                // with these prefs a download lands without a prompt.
                "prefs": {
                    "download": {
                        "default_directory": downloads.display().to_string(),
                        "prompt_for_download": false,
                        "directory_upgrade": true,
                    },
                },
            },
        });
        let Value::Object(caps) = caps else {
            unreachable!("capabilities are an object")
        };

        let (jobs, queue) = mpsc::channel::<Job>();
        let (ready_tx, ready) = mpsc::channel::<Result<(), String>>();
        let url = format!("http://127.0.0.1:{port}");
        let worker = ns.spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(format!("tokio runtime: {e}")));
                    return;
                }
            };
            let client = rt.block_on(async {
                // chromedriver takes a moment to listen; 20 s at most.
                let mut up = false;
                for _ in 0..200 {
                    if tokio::net::TcpStream::connect(("127.0.0.1", port))
                        .await
                        .is_ok()
                    {
                        up = true;
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                if !up {
                    return Err(format!("chromedriver never listened on {url}"));
                }
                let connector = hyper_util::client::legacy::connect::HttpConnector::new();
                match tokio::time::timeout(
                    Duration::from_secs(60),
                    ClientBuilder::new(connector)
                        .capabilities(caps)
                        .connect(&url),
                )
                .await
                {
                    Ok(Ok(c)) => Ok(c),
                    Ok(Err(e)) => Err(format!("new session: {e}")),
                    Err(_) => Err("new session: no answer in 60 s".into()),
                }
            });
            let client = match client {
                Ok(c) => {
                    let _ = ready_tx.send(Ok(()));
                    c
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            // Ends when Browser drops its sender.
            while let Ok(job) = queue.recv() {
                job(&rt, &client);
            }
            let _ = rt.block_on(async {
                tokio::time::timeout(Duration::from_secs(10), client.close()).await
            });
        });

        let mut browser = Browser {
            jobs: Some(jobs),
            worker: Some(worker),
            driver,
            artifacts: artifacts.to_path_buf(),
            downloads,
            scratch,
            failures: std::cell::Cell::new(0),
        };
        let outcome = ready
            .recv_timeout(Duration::from_secs(90))
            .unwrap_or_else(|e| Err(format!("the worker gave no answer: {e}")));
        if let Err(e) = outcome {
            let exited = browser.driver.try_wait().ok().flatten();
            let tail = fs::read_to_string(&log)
                .map(|t| {
                    let lines: Vec<&str> = t.lines().collect();
                    lines[lines.len().saturating_sub(20)..].join("\n")
                })
                .unwrap_or_default();
            drop(browser);
            panic!(
                "browser did not start in {}: {e} (chromedriver exit: {exited:?}); \
                 chromedriver log {}:\n{tail}",
                ns.name,
                log.display()
            );
        }
        browser
    }

    /// Runs `f` on the worker with `limit`, or says why it failed.
    fn try_run<T: Send + 'static>(
        &self,
        limit: Duration,
        f: impl AsyncFnOnce(&Client) -> Result<T, CmdError> + Send + 'static,
    ) -> Result<T, String> {
        let (tx, rx) = mpsc::channel();
        let job: Job = Box::new(move |rt, client| {
            let out = rt.block_on(async { tokio::time::timeout(limit, f(client)).await });
            let _ = tx.send(match out {
                Ok(Ok(v)) => Ok(v),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!("no answer within {limit:?}")),
            });
        });
        self.jobs
            .as_ref()
            .expect("jobs sender lives until drop")
            .send(job)
            .map_err(|_| "the browser worker has stopped".to_string())?;
        rx.recv_timeout(limit + SLACK)
            .map_err(|e| format!("the browser worker is stuck or gone: {e}"))?
    }

    /// `try_run` with the default limit, panicking with where the browser
    /// was on failure.
    fn run<T: Send + 'static>(
        &self,
        what: &str,
        f: impl AsyncFnOnce(&Client) -> Result<T, CmdError> + Send + 'static,
    ) -> T {
        match self.try_run(STEP, f) {
            Ok(v) => v,
            Err(e) => self.fail(what, &e),
        }
    }

    /// Panics naming the command, the current URL and a screenshot of the
    /// moment, which is usually what explains a failed step.
    fn fail(&self, what: &str, why: &str) -> ! {
        let url = self
            .try_run(Duration::from_secs(5), async |c| c.current_url().await)
            .map(|u| u.to_string())
            .unwrap_or_else(|e| format!("<unknown: {e}>"));
        let n = self.failures.get() + 1;
        self.failures.set(n);
        let shot = self
            .try_run(Duration::from_secs(10), async |c| c.screenshot().await)
            .ok()
            .and_then(|png| {
                let path = self.artifacts.join(format!("failure-{n}.png"));
                fs::write(&path, png).ok().map(|()| path)
            })
            .map(|p| format!(" (screenshot {})", p.display()))
            .unwrap_or_default();
        panic!("browser: {what} failed at {url}: {why}{shot}");
    }

    pub fn goto(&self, url: &str) {
        let target = url.to_string();
        self.run(&format!("goto {url}"), async move |c| c.goto(&target).await)
    }

    pub fn current_url(&self) -> String {
        self.run("current_url", async |c| c.current_url().await)
            .to_string()
    }

    /// The DOM serialized now (not the bytes the server sent).
    pub fn source(&self) -> String {
        self.run("source", async |c| c.source().await)
    }

    /// `innerText` of the first element matching `css`.
    pub fn text(&self, css: &str) -> String {
        match self.inner_text(css) {
            Some(t) => t,
            None => self.fail(&format!("text({css})"), "no element matches"),
        }
    }

    fn inner_text(&self, css: &str) -> Option<String> {
        let v = self.execute(
            "const e = document.querySelector(arguments[0]); return e ? e.innerText : null;",
            vec![json!(css)],
        );
        v.as_str().map(str::to_string)
    }

    pub fn exists(&self, css: &str) -> bool {
        self.count(css) > 0
    }

    pub fn count(&self, css: &str) -> usize {
        let sel = css.to_string();
        self.run(&format!("count({css})"), async move |c| {
            c.find_all(Locator::Css(&sel)).await.map(|v| v.len())
        })
    }

    /// Clears the field, then types `value` into it as keystrokes.
    pub fn fill(&self, css: &str, value: &str) {
        let (sel, value) = (css.to_string(), value.to_string());
        self.run(&format!("fill({css})"), async move |c| {
            let e = c.find(Locator::Css(&sel)).await?;
            e.clear().await?;
            e.send_keys(&value).await
        })
    }

    /// Picks the `<option>` with `option_value` in the `<select>` at `css`.
    pub fn select(&self, css: &str, option_value: &str) {
        let (sel, value) = (css.to_string(), option_value.to_string());
        self.run(&format!("select({css}, {option_value})"), async move |c| {
            c.find(Locator::Css(&sel))
                .await?
                .select_by_value(&value)
                .await
        })
    }

    pub fn click(&self, css: &str) {
        let sel = css.to_string();
        self.run(&format!("click({css})"), async move |c| {
            c.find(Locator::Css(&sel)).await?.click().await
        })
    }

    /// Submits the form at `css` as its default button would: constraint
    /// validation and submit handlers run (`requestSubmit`).
    pub fn submit_form(&self, css: &str) {
        let sel = css.to_string();
        self.run(&format!("submit_form({css})"), async move |c| {
            let form = c.find(Locator::Css(&sel)).await?;
            c.execute(
                "arguments[0].requestSubmit();",
                vec![serde_json::to_value(form)?],
            )
            .await
            .map(drop)
        })
    }

    /// Runs `js` as a function body with `arguments`; its return value.
    pub fn execute(&self, js: &str, args: Vec<Value>) -> Value {
        let js = js.to_string();
        self.run("execute", async move |c| c.execute(&js, args).await)
    }

    /// Runs `js` with a callback as its last argument; what it passes to it.
    pub fn execute_async(&self, js: &str, args: Vec<Value>) -> Value {
        let js = js.to_string();
        self.run("execute_async", async move |c| {
            c.execute_async(&js, args).await
        })
    }

    /// Waits until the first element matching `css` shows `needle` in its
    /// text, polling every 100 ms; panics with what it showed last.
    pub fn wait_for_text(&self, css: &str, needle: &str, timeout: Duration) {
        let start = Instant::now();
        let mut last;
        loop {
            last = self.inner_text(css);
            if last.as_deref().is_some_and(|t| t.contains(needle)) {
                return;
            }
            if start.elapsed() >= timeout {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let seen = match last {
            Some(t) => format!("it shows {t:?}"),
            None => "no element matches".to_string(),
        };
        self.fail(
            &format!("wait_for_text({css}, {needle:?})"),
            &format!("not there after {timeout:?}; {seen}"),
        )
    }

    /// Saves the viewport as `<artifacts>/<name>.png`.
    pub fn screenshot(&self, name: &str) -> PathBuf {
        let png = self.run(&format!("screenshot({name})"), async |c| {
            c.screenshot().await
        });
        let path = self.artifacts.join(format!("{name}.png"));
        fs::write(&path, png).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        path
    }

    /// This browser's download folder (empty at start).
    pub fn download_dir(&self) -> &Path {
        &self.downloads
    }

    /// Waits until at least `wait_for_count` downloads have completed, then
    /// returns all of them, sorted.
    pub fn downloads(&self, wait_for_count: usize, timeout: Duration) -> Vec<PathBuf> {
        let start = Instant::now();
        loop {
            let done = self.finished_downloads();
            if done.len() >= wait_for_count {
                return done;
            }
            if start.elapsed() >= timeout {
                let all: Vec<String> = fs::read_dir(&self.downloads)
                    .map(|d| {
                        d.flatten()
                            .map(|e| e.file_name().to_string_lossy().into_owned())
                            .collect()
                    })
                    .unwrap_or_default();
                self.fail(
                    &format!("downloads({wait_for_count})"),
                    &format!(
                        "only {} finished after {timeout:?}; {} holds {all:?}",
                        done.len(),
                        self.downloads.display()
                    ),
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn finished_downloads(&self) -> Vec<PathBuf> {
        let Ok(dir) = fs::read_dir(&self.downloads) else {
            return Vec::new();
        };
        // Chromium writes `<name>.crdownload` (or a hidden temporary) and
        // renames it when the download is complete.
        let mut done: Vec<PathBuf> = dir
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                let name = p.file_name().unwrap_or_default().to_string_lossy();
                p.is_file() && !name.starts_with('.') && !name.ends_with(".crdownload")
            })
            .collect();
        done.sort();
        done
    }

    fn press(&self, key: Key, times: usize, what: &str) {
        self.run(what, async move |c| {
            let mut keys = KeyActions::new("keyboard".into());
            for _ in 0..times {
                keys = keys
                    .then(KeyAction::Down { value: key.into() })
                    .then(KeyAction::Up { value: key.into() });
            }
            c.perform_actions(keys).await
        })
    }

    /// Presses Tab `n` times, as a keyboard user moves focus.
    pub fn press_tab(&self, n: usize) {
        self.press(Key::Tab, n, &format!("press_tab({n})"))
    }

    pub fn press_enter(&self) {
        self.press(Key::Enter, 1, "press_enter")
    }

    /// The focused element as `tag#id[name=..][type=..] "text"`, the text
    /// being its label-like content (inner text, value or aria-label).
    pub fn active_element_description(&self) -> String {
        let v = self.execute(
            r##"const e = document.activeElement;
            if (!e) return "none";
            let d = e.tagName.toLowerCase();
            if (e.id) d += "#" + e.id;
            for (const a of ["name", "type"]) {
                const v = e.getAttribute(a);
                if (v) d += "[" + a + "=" + v + "]";
            }
            const t = (e.innerText || e.value || e.getAttribute("aria-label") || "")
                .trim().replace(/\s+/g, " ").slice(0, 80);
            if (t) d += " " + JSON.stringify(t);
            return d;"##,
            vec![],
        );
        v.as_str().unwrap_or_default().to_string()
    }

    /// Every cookie the browser would send to the current page:
    /// `(name, value, http_only, secure, same_site)`, `same_site` being
    /// `Strict`, `Lax`, `None`, or empty when unset.
    pub fn cookies(&self) -> Vec<(String, String, bool, bool, String)> {
        let all = self.run("cookies", async |c| c.get_all_cookies().await);
        all.iter()
            .map(|k| {
                (
                    k.name().to_string(),
                    k.value().to_string(),
                    k.http_only().unwrap_or(false),
                    k.secure().unwrap_or(false),
                    k.same_site().map(|s| s.to_string()).unwrap_or_default(),
                )
            })
            .collect()
    }

    pub fn delete_cookies(&self) {
        self.run("delete_cookies", async |c| c.delete_all_cookies().await)
    }

    /// Runs axe-core on the current page against WCAG 2.0/2.1 A and AA;
    /// one line per violation, `id: help (N nodes: targets…)`. Empty means
    /// the page passed.
    pub fn axe(&self) -> Vec<String> {
        let present = "return typeof axe === 'object' && typeof axe.run === 'function';";
        // chromedriver logs every script it is sent, and axe is 600 kB: a
        // page checked twice gets it once.
        if self.execute(present, vec![]) != json!(true) {
            let path = axe_path();
            let source = fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("reading axe-core at {}: {e}", path.display()));
            // Injected into the page itself (not an isolated world), as
            // axe's own WebDriver integrations do; it sets `window.axe`.
            let loaded = self.execute(&format!("{source}\n;{present}"), vec![]);
            if loaded != json!(true) {
                self.fail(
                    "axe",
                    &format!("axe-core did not load from {}", path.display()),
                );
            }
        }
        let out = self.execute_async(
            r#"const done = arguments[arguments.length - 1];
            axe.run(document, {
                runOnly: {type: "tag", values: ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa"]},
            }).then(
                r => done({violations: r.violations.map(v => ({
                    id: v.id,
                    help: v.help,
                    targets: v.nodes.map(n => n.target.join(" ")),
                }))}),
                e => done({error: String(e)}),
            );"#,
            vec![],
        );
        if let Some(e) = out.get("error") {
            self.fail("axe", &format!("axe.run: {e}"));
        }
        let Some(violations) = out.get("violations").and_then(Value::as_array) else {
            self.fail("axe", &format!("unexpected result: {out}"));
        };
        violations
            .iter()
            .map(|v| {
                let targets: Vec<&str> = v["targets"]
                    .as_array()
                    .map(|t| t.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                format!(
                    "{}: {} ({} nodes: {})",
                    v["id"].as_str().unwrap_or("?"),
                    v["help"].as_str().unwrap_or("?"),
                    targets.len(),
                    targets.join(", ")
                )
            })
            .collect()
    }

    /// Kills, by pid, every process whose command line names this browser's
    /// scratch folder: Chromium's helpers that left the process group
    /// (crashpad handlers start their own session).
    fn kill_leftovers(&self) -> usize {
        let mark = self.scratch.path().to_string_lossy().into_owned();
        let me = std::process::id();
        let mut killed = 0;
        let Ok(procs) = fs::read_dir("/proc") else {
            return 0;
        };
        for p in procs.flatten() {
            let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            if pid as u32 == me {
                continue;
            }
            let Ok(cmdline) = fs::read(p.path().join("cmdline")) else {
                continue;
            };
            if String::from_utf8_lossy(&cmdline).contains(&mark) {
                // SAFETY: kill has no memory preconditions; the pid is one
                // of this browser's processes.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                killed += 1;
            }
        }
        killed
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Closing the queue makes the worker end the session (bounded) and
        // return.
        self.jobs.take();
        if let Some(worker) = self.worker.take() {
            let start = Instant::now();
            while !worker.is_finished() && start.elapsed() < Duration::from_secs(15) {
                std::thread::sleep(Duration::from_millis(20));
            }
            // A worker stuck past its limits is left behind rather than
            // hanging the test; killing chromedriver below ends its request.
            if worker.is_finished() {
                let _ = worker.join();
            }
        }
        let group = self.driver.id() as i32;
        // SAFETY: kill has no memory preconditions; the group is the one
        // chromedriver was started in.
        unsafe { libc::kill(-group, libc::SIGTERM) };
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(3) {
            if matches!(self.driver.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // SAFETY: as above; also reaches Chromium processes that outlived
        // chromedriver in its group.
        unsafe { libc::kill(-group, libc::SIGKILL) };
        let _ = self.driver.wait();
        for _ in 0..3 {
            if self.kill_leftovers() == 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// axe-core's `axe.min.js`: `ALLOWLIST_AXE`, or the copy `cargo xtask test`
/// keeps in the workspace's `.tools`.
pub fn axe_path() -> PathBuf {
    let path = std::env::var_os("ALLOWLIST_AXE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/axe-core/axe.min.js")
        });
    assert!(
        path.is_file(),
        "axe-core is missing at {}: run `cargo xtask test` once (it downloads the pinned \
         version), or set ALLOWLIST_AXE to an axe.min.js",
        path.display()
    );
    path
}
