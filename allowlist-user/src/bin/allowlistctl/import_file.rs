//! Import files (`ips authorize --file`, `drop add --file`): one entry per
//! line, `CIDR [text]`, blank lines and `#` comments skipped; and the
//! progress of a long import on stderr, since a million entries take
//! seconds to read, send, store and enforce.

use std::{
    io::{BufRead, IsTerminal},
    path::Path,
    time::{Duration, Instant},
};

use crate::client::CtlError;

/// One entry: the address or CIDR, and the rest of the line (a label or a
/// reason), if any.
pub struct Line {
    pub cidr: String,
    pub rest: Option<String>,
}

/// Where progress goes: stderr when it is a terminal, or when asked for
/// (`--progress`); never stdout, which carries the result.
pub struct Progress {
    on: bool,
    tty: bool,
    started: Instant,
}

/// Lines read between two progress reports while reading.
const READ_REPORT: usize = 100_000;

impl Progress {
    pub fn new(asked: bool) -> Self {
        let tty = std::io::stderr().is_terminal();
        Progress {
            on: asked || tty,
            tty,
            started: Instant::now(),
        }
    }

    fn say(&self, text: &str) {
        if self.on {
            eprintln!("{text}");
        }
    }

    /// Reads `path`, reporting every [`READ_REPORT`] lines.
    pub fn read(&self, path: &Path) -> Result<Vec<Line>, CtlError> {
        let err = |e: std::io::Error| CtlError::Setup(format!("reading {}: {e}", path.display()));
        let file = std::fs::File::open(path).map_err(err)?;
        let mut out = Vec::new();
        for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
            let line = line.map_err(err)?;
            if (n + 1) % READ_REPORT == 0 {
                self.say(&format!("read {} lines of {}", n + 1, path.display()));
            }
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            out.push(match line.split_once(char::is_whitespace) {
                Some((cidr, rest)) => Line {
                    cidr: cidr.to_string(),
                    rest: Some(rest.trim().to_string()),
                },
                None => Line {
                    cidr: line.to_string(),
                    rest: None,
                },
            });
        }
        self.say(&format!(
            "read {} entries from {} in {:.1} s",
            out.len(),
            path.display(),
            self.started.elapsed().as_secs_f64()
        ));
        Ok(out)
    }

    /// Awaits the daemon's answer to the import, saying every few seconds
    /// that it is still at work, then how long it took.
    pub async fn wait<T>(&self, doing: &str, work: impl Future<Output = T>) -> T {
        self.say(&format!("{doing} in one change..."));
        let sent = Instant::now();
        let mut work = std::pin::pin!(work);
        // A terminal gets a line rewritten every second; a pipe a new line
        // every five.
        let every = Duration::from_secs(if self.tty { 1 } else { 5 });
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        let out = loop {
            tokio::select! {
                out = &mut work => break out,
                _ = tick.tick(), if self.on => {
                    let secs = sent.elapsed().as_secs();
                    if self.tty {
                        eprint!("\r  storing and enforcing: {secs} s");
                    } else {
                        eprintln!("  storing and enforcing: {secs} s");
                    }
                }
            }
        };
        if self.tty && self.on && sent.elapsed() >= every {
            eprintln!();
        }
        self.say(&format!(
            "answered in {:.1} s ({:.1} s in all)",
            sent.elapsed().as_secs_f64(),
            self.started.elapsed().as_secs_f64()
        ));
        out
    }
}
