//! curl with a cookie jar, for the console's HTTP-level tests: what a
//! browser would send, and what an attacker's script could.

use std::{path::PathBuf, process::Command};

/// One answer: status, raw header block, body.
#[derive(Debug)]
pub struct Page {
    pub status: u16,
    pub headers: String,
    pub body: String,
}

impl Page {
    /// A header's value (the last one of that name), case-insensitive.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .lines()
            .filter_map(|l| l.split_once(':'))
            .rfind(|(k, _)| k.trim().eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_string())
    }

    pub fn set_cookies(&self) -> Vec<String> {
        self.headers
            .lines()
            .filter_map(|l| l.split_once(':'))
            .filter(|(k, _)| k.trim().eq_ignore_ascii_case("set-cookie"))
            .map(|(_, v)| v.trim().to_string())
            .collect()
    }

    /// The value of the first `name="csrf"` field on the page.
    pub fn csrf(&self) -> String {
        let at = self
            .body
            .find("name=\"csrf\" value=\"")
            .unwrap_or_else(|| panic!("no csrf field in:\n{}", self.body));
        let rest = &self.body[at + "name=\"csrf\" value=\"".len()..];
        rest[..rest.find('"').unwrap()].to_string()
    }
}

/// A client with its own cookie jar (one browser profile).
pub struct Web {
    pub base: String,
    jar: PathBuf,
    _dir: tempfile::TempDir,
}

impl Web {
    pub fn new(base: &str) -> Web {
        let dir = tempfile::Builder::new()
            .prefix(crate::PREFIX)
            .tempdir()
            .expect("tempdir");
        Web {
            base: base.to_string(),
            jar: dir.path().join("jar"),
            _dir: dir,
        }
    }

    /// `curl` with the jar; `extra` are more curl arguments.
    pub fn fetch(&self, path: &str, extra: &[&str]) -> Page {
        let out = Command::new("curl")
            .args(["-sk", "-i", "--max-time", "10", "-b"])
            .arg(&self.jar)
            .arg("-c")
            .arg(&self.jar)
            .args(extra)
            .arg(format!("{}{path}", self.base))
            .output()
            .expect("running curl");
        assert!(
            out.status.success(),
            "curl {path}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        Page {
            status,
            headers: head.to_string(),
            body: body.to_string(),
        }
    }

    pub fn get(&self, path: &str) -> Page {
        self.fetch(path, &[])
    }

    /// A form post (`application/x-www-form-urlencoded`) of `fields`.
    pub fn post(&self, path: &str, fields: &[(&str, &str)], extra: &[&str]) -> Page {
        let mut args: Vec<String> = Vec::new();
        for (k, v) in fields {
            args.push("--data-urlencode".into());
            args.push(format!("{k}={v}"));
        }
        if fields.is_empty() {
            args.push("-X".into());
            args.push("POST".into());
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        self.fetch(path, &refs)
    }

    /// Signs in with `token` through the sign-in form.
    pub fn sign_in(&self, token: &str) -> Page {
        let form = self.get("/console/signin");
        assert_eq!(form.status, 200, "{form:?}");
        self.post(
            "/console/signin",
            &[("csrf", &form.csrf()), ("token", token)],
            &[],
        )
    }
}
