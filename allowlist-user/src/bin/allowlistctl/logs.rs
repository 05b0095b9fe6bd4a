//! `allowlistctl logs`: the account's usage log, newest first, filtered;
//! `--csv` streams every matching row (RFC 4180) to stdout, with progress
//! on a terminal.

use std::io::{IsTerminal, Write};

use allowlist::api::{LogList, LogSummary};
use clap::Args;

use crate::{
    Output,
    client::{Client, CtlError, query_value},
};

#[derive(Args, Debug)]
pub struct LogsArgs {
    /// Only this key id.
    #[arg(long)]
    key: Option<String>,
    /// Only this HTTP method.
    #[arg(long)]
    method: Option<String>,
    /// Only this status.
    #[arg(long)]
    status: Option<u16>,
    /// Only this reason code (ok, key_allowlist, account_list, denied,
    /// bad_secret, rate_limited, bad_request, kernel_drop ...).
    #[arg(long)]
    reason: Option<String>,
    /// Only clients inside this address or CIDR.
    #[arg(long)]
    ip: Option<String>,
    /// From T: Unix seconds, 2026-11-30T09:00:00Z, or a duration back
    /// from now like 24h.
    #[arg(long)]
    since: Option<String>,
    /// Until T (same forms).
    #[arg(long)]
    until: Option<String>,
    /// At most this many rows (not with --csv, which exports every row).
    #[arg(long, default_value_t = 100)]
    limit: usize,
    /// Skip this many matching rows first (paging; give --until too so
    /// new rows do not shift the pages).
    #[arg(long, default_value_t = 0)]
    offset: usize,
    /// Every matching row as CSV (RFC 4180, header row) on stdout.
    #[arg(long, conflicts_with = "summary")]
    csv: bool,
    /// Counts instead of rows: requests over time by status class (in
    /// --buckets slices; the last 24 h without --since) and refusals by
    /// reason.
    #[arg(long)]
    summary: bool,
    /// With --summary: how many time slices.
    #[arg(long, default_value_t = 24, requires = "summary")]
    buckets: usize,
}

impl LogsArgs {
    fn filters(&self) -> String {
        let mut q = Vec::new();
        let mut add = |k: &str, v: &Option<String>| {
            if let Some(v) = v {
                q.push(format!("{k}={}", query_value(v)));
            }
        };
        add("key", &self.key);
        add("method", &self.method);
        add("status", &self.status.map(|s| s.to_string()));
        add("reason", &self.reason);
        add("ip", &self.ip);
        add("since", &self.since);
        add("until", &self.until);
        q.join("&")
    }
}

pub async fn run(client: &Client, args: LogsArgs) -> Result<Output, CtlError> {
    let filters = args.filters();
    if args.csv {
        let path = format!("/v1/logs/csv?{filters}");
        let mut out = std::io::BufWriter::new(std::io::stdout().lock());
        let progress = std::io::stderr().is_terminal();
        let mut rows: u64 = 0;
        let mut shown = 0u64;
        client
            .stream(&path, |chunk| {
                rows += chunk.iter().filter(|b| **b == b'\n').count() as u64;
                if progress && rows / 100_000 > shown {
                    shown = rows / 100_000;
                    eprint!("\r{} rows", rows.saturating_sub(1));
                }
                out.write_all(chunk)
            })
            .await?;
        out.flush()
            .map_err(|e| CtlError::Setup(format!("writing the output: {e}")))?;
        if progress {
            eprintln!("\r{} rows exported", rows.saturating_sub(1));
        }
        return Ok(Output::empty());
    }
    if args.summary {
        let path = format!("/v1/logs/summary?buckets={}&{filters}", args.buckets);
        let s: LogSummary = client.get(&path).await?;
        let at = |ms: i64| {
            humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64),
            )
        };
        let mut text = format!(
            "{} requests from {} to {}\n{:<22} {:>9} {:>9} {:>9} {:>9}\n",
            s.total,
            at(s.since_ms),
            at(s.until_ms),
            "from",
            "2xx",
            "3xx",
            "4xx",
            "5xx"
        );
        for b in &s.buckets {
            text.push_str(&format!(
                "{:<22} {:>9} {:>9} {:>9} {:>9}\n",
                at(b.at_ms).to_string(),
                b.s2xx,
                b.s3xx,
                b.s4xx,
                b.s5xx
            ));
        }
        text.push_str("refusals by reason:\n");
        for r in &s.refusals {
            text.push_str(&format!("  {:<20} {}\n", r.reason, r.count));
        }
        if s.refusals.is_empty() {
            text.push_str("  none\n");
        }
        return Output::new(&s, text);
    }
    let path = format!(
        "/v1/logs?limit={}&offset={}&{filters}",
        args.limit, args.offset
    );
    let list: LogList = client.get(&path).await?;
    let mut text = String::new();
    for r in &list.entries {
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(r.at_ms.max(0) as u64);
        text.push_str(&format!(
            "{}  {:<15} {:<6} {:<24} {} {:<14} {:<16} {}  {} µs\n",
            humantime::format_rfc3339_millis(at),
            r.client,
            r.method,
            r.path,
            r.status,
            r.reason,
            if r.key_id.is_empty() { "-" } else { &r.key_id },
            r.rule,
            r.latency_us
        ));
    }
    if list.entries.is_empty() {
        text.push_str("no log entries match\n");
    }
    Output::new(&list, text)
}
