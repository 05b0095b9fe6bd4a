//! Real receivers of notifications, started inside a test's namespace: an
//! SMTP server (Python's `aiosmtpd`, not ours) that keeps every message it
//! accepts, and an HTTP webhook receiver that checks each request's
//! HMAC-SHA256 signature and can be told to fail a path's first attempts.
//! Messages are parsed back with Python's `email` package.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use crate::net::{Netns, wait_for};

const SCRIPT: &str = r#"
import hashlib, hmac, json, os, sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from aiosmtpd.controller import Controller

out, smtp_port, http_port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
secrets = json.loads(sys.argv[4])   # path -> secret
failures = json.loads(sys.argv[5])  # path -> how many first attempts fail
lock = threading.Lock()
seq = [0]

def save(kind, data, ext):
    with lock:
        seq[0] += 1
        n = seq[0]
    tmp = os.path.join(out, f".{kind}-{n:05d}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.rename(tmp, os.path.join(out, f"{kind}-{n:05d}.{ext}"))

class Mail:
    async def handle_DATA(self, server, session, envelope):
        save("mail", json.dumps({"rcpt": envelope.rcpt_tos,
                                 "from": envelope.mail_from}).encode(), "env")
        save("mail", envelope.original_content or envelope.content, "eml")
        return "250 OK"

seen = {}
class Hook(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        with lock:
            seen[self.path] = seen.get(self.path, 0) + 1
            attempt = seen[self.path]
        secret = secrets.get(self.path, "").encode()
        want = "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()
        got = self.headers.get("X-Allowlist-Signature", "")
        valid = hmac.compare_digest(want, got)
        status = 500 if attempt <= failures.get(self.path, 0) else (200 if valid else 401)
        save("hook", json.dumps({"path": self.path, "attempt": attempt, "status": status,
                                 "valid": valid, "event": self.headers.get("X-Allowlist-Event"),
                                 "body": body.decode("utf-8", "replace")}).encode(), "json")
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *a):
        pass

c = Controller(Mail(), hostname="127.0.0.1", port=smtp_port)
c.start()
srv = ThreadingHTTPServer(("127.0.0.1", http_port), Hook)
threading.Thread(target=srv.serve_forever, daemon=True).start()
open(os.path.join(out, "ready"), "w").close()
time.sleep(600)
"#;

const PARSE: &str = r#"
import email, email.policy, json, sys
m = email.message_from_bytes(open(sys.argv[1], "rb").read(), policy=email.policy.default)
body = m.get_body(preferencelist=("plain",))
print(json.dumps({"subject": str(m["subject"]), "to": str(m["to"]), "from": str(m["from"]),
                  "body": body.get_content() if body else ""}))
"#;

/// One e-mail as the SMTP server received it, parsed.
#[derive(Debug, Clone)]
pub struct Mail {
    pub rcpt: Vec<String>,
    pub subject: String,
    pub to: String,
    pub body: String,
    /// The message as it went over the wire.
    pub raw: String,
}

impl Mail {
    /// The action links in the body: (path token, full URL), in order.
    pub fn links(&self) -> Vec<String> {
        self.body
            .split_whitespace()
            .filter(|w| w.contains("/_allowlist/actions/"))
            .map(str::to_string)
            .collect()
    }
}

/// One webhook request as the receiver saw it.
#[derive(Debug, Clone)]
pub struct Hook {
    pub path: String,
    pub attempt: u64,
    pub status: u16,
    /// Whether the signature matched the body under the path's secret.
    pub valid: bool,
    pub event: String,
    pub body: serde_json::Value,
}

pub struct Receivers {
    child: Child,
    dir: PathBuf,
}

impl Receivers {
    /// Starts both inside `ns` on loopback: SMTP on `smtp_port`, webhooks
    /// on `http_port`. `secrets` keys each webhook path's HMAC; `failures`
    /// says how many first attempts of a path get a 500.
    pub fn start(
        ns: &Netns,
        dir: &Path,
        smtp_port: u16,
        http_port: u16,
        secrets: &[(&str, &str)],
        failures: &[(&str, u32)],
    ) -> Receivers {
        let dir = dir.join("received");
        std::fs::create_dir_all(&dir).unwrap();
        let secrets: serde_json::Map<String, serde_json::Value> = secrets
            .iter()
            .map(|(p, s)| (p.to_string(), (*s).into()))
            .collect();
        let failures: serde_json::Map<String, serde_json::Value> = failures
            .iter()
            .map(|(p, n)| (p.to_string(), (*n).into()))
            .collect();
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns.name,
                "timeout",
                "600",
                "/usr/bin/python3",
                "-c",
            ])
            .arg(SCRIPT)
            .arg(&dir)
            .arg(smtp_port.to_string())
            .arg(http_port.to_string())
            .arg(serde_json::Value::Object(secrets).to_string())
            .arg(serde_json::Value::Object(failures).to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("stderr")).unwrap())
            .spawn()
            .expect("python3 receivers");
        let r = Receivers { child, dir };
        assert!(
            wait_for(Duration::from_secs(15), || r.dir.join("ready").exists()),
            "the SMTP and webhook receivers did not start: {}",
            std::fs::read_to_string(r.dir.join("stderr")).unwrap_or_default()
        );
        r
    }

    fn files(&self, prefix: &str, ext: &str) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(&self.dir)
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                let n = p.file_name().unwrap().to_string_lossy().to_string();
                n.starts_with(prefix) && n.ends_with(ext)
            })
            .collect();
        v.sort();
        v
    }

    /// Every message received so far, in order.
    pub fn mails(&self) -> Vec<Mail> {
        let envs = self.files("mail-", ".env");
        let emls = self.files("mail-", ".eml");
        envs.iter()
            .zip(emls.iter())
            .map(|(env, eml)| {
                let env: serde_json::Value =
                    serde_json::from_slice(&std::fs::read(env).unwrap()).unwrap();
                let out = Command::new("/usr/bin/python3")
                    .args(["-c", PARSE])
                    .arg(eml)
                    .output()
                    .expect("python3 email parser");
                assert!(
                    out.status.success(),
                    "{}",
                    String::from_utf8_lossy(&out.stderr)
                );
                let m: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
                Mail {
                    rcpt: env["rcpt"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|r| r.as_str().unwrap().to_string())
                        .collect(),
                    subject: m["subject"].as_str().unwrap().to_string(),
                    to: m["to"].as_str().unwrap().to_string(),
                    body: m["body"].as_str().unwrap().to_string(),
                    raw: String::from_utf8_lossy(&std::fs::read(eml).unwrap()).into_owned(),
                }
            })
            .collect()
    }

    /// Messages that went to `rcpt`.
    pub fn mails_to(&self, rcpt: &str) -> Vec<Mail> {
        self.mails()
            .into_iter()
            .filter(|m| m.rcpt.iter().any(|r| r == rcpt))
            .collect()
    }

    /// Every webhook request received so far, in order.
    pub fn hooks(&self) -> Vec<Hook> {
        self.files("hook-", ".json")
            .iter()
            .map(|p| {
                let v: serde_json::Value =
                    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap();
                Hook {
                    path: v["path"].as_str().unwrap().to_string(),
                    attempt: v["attempt"].as_u64().unwrap(),
                    status: v["status"].as_u64().unwrap() as u16,
                    valid: v["valid"].as_bool().unwrap(),
                    event: v["event"].as_str().unwrap_or("").to_string(),
                    body: serde_json::from_str(v["body"].as_str().unwrap())
                        .unwrap_or(serde_json::Value::Null),
                }
            })
            .collect()
    }
}

impl Drop for Receivers {
    fn drop(&mut self) {
        // SIGTERM: `timeout` passes it on to Python (a SIGKILL would
        // orphan the receivers).
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}
