//! Helpers shared by the benchmarks.

use std::{
    io::{Read, Write},
    net::Ipv4Addr,
    os::unix::net::UnixStream,
    path::Path,
};

use allowlist::{
    policy::{ApiMode, KeyStatus, Scope, SmtpMode, hash_secret},
    state::{AccountState, State},
    store::{AccountRecord, AllowRecord, AuthorizedRecord, BlockingState, KeyRecord},
};
use ipnet::{IpNet, Ipv4Net};

/// xorshift64*: deterministic, so every run measures the same data.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }
}

/// Replaces the section of BENCHMARKS.md that starts with `heading` (up to
/// the next `## `), or appends it.
pub fn write_section(path: &Path, heading: &str, section: &str) {
    let old = std::fs::read_to_string(path).unwrap_or_else(|_| {
        "# Benchmarks\n\nLatest figures, with the command that made them. Ratios are against a baseline measured in the same run.\n\n".into()
    });
    let new = match old.find(heading) {
        Some(start) => {
            let end = old[start + heading.len()..]
                .find("\n## ")
                .map(|e| start + heading.len() + e + 1)
                .unwrap_or(old.len());
            format!("{}{}{}", &old[..start], section, &old[end..])
        }
        None => format!("{old}\n{section}"),
    };
    std::fs::write(path, new).unwrap();
}

/// Writes `section` into the file named by `ALLOWLIST_BENCH_OUT`, if set.
pub fn publish(heading: &str, section: &str) {
    if let Some(out) = std::env::var_os("ALLOWLIST_BENCH_OUT") {
        write_section(Path::new(&out), heading, section);
    }
}

/// Requests/s and p99 latency (ms) from `wrk --latency` output.
pub fn parse_wrk(text: &str) -> (f64, f64) {
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    let p99 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("99%"))
        .map(|v| v.trim().to_string())
        .unwrap_or_default();
    let p99_ms = if let Some(us) = p99.strip_suffix("us") {
        us.parse::<f64>().unwrap_or(f64::NAN) / 1000.0
    } else if let Some(ms) = p99.strip_suffix("ms") {
        ms.parse().unwrap_or(f64::NAN)
    } else if let Some(s) = p99.strip_suffix('s') {
        s.parse::<f64>().unwrap_or(f64::NAN) * 1000.0
    } else {
        f64::NAN
    };
    (rps, p99_ms)
}

// The policy benchmarks' installation: 10,000 accounts × 10 keys × 20
// entries, 100 authorized /24s per account, API blocking active.
pub const ACCOUNTS: usize = 10_000;
pub const KEYS_PER_ACCOUNT: usize = 10;
pub const AUTHORIZED_PER_ACCOUNT: usize = 100;
pub const KEYS: usize = ACCOUNTS * KEYS_PER_ACCOUNT;
pub const ENTRIES: usize = 20;

/// The state, and per account the /24s of its authorized list in order
/// (key `n` of an account has an allowlist entry covering the `n`th, so
/// the workload can hold allowed calls).
pub fn state(rng: &mut Rng) -> (State, Vec<Vec<Ipv4Net>>) {
    let mut st = State::default();
    let mut nets_of = Vec::with_capacity(ACCOUNTS);
    let mut kid = 1u32;
    for acct in 0..ACCOUNTS {
        let name = format!("acct-{acct}");
        let mut a = AccountState::new(AccountRecord {
            idx: acct as u32 + 1,
            name: name.clone(),
            parent: None,
            emails: vec![],
            enforce_blocking: false,
            created_at: 0,
            blocking: BlockingState {
                api: ApiMode::Active,
                api_since: 0,
                smtp: SmtpMode::Inactive,
                smtp_since: 0,
            },
            last_learned_at: 0,
        });
        let nets: Vec<Ipv4Net> = (0..AUTHORIZED_PER_ACCOUNT)
            .map(|_| {
                Ipv4Net::new(Ipv4Addr::from(rng.next_u64() as u32), 24)
                    .unwrap()
                    .trunc()
            })
            .collect();
        for net in nets.iter().take(KEYS_PER_ACCOUNT) {
            // Twenty distinct entries (a key's allowlist, like the
            // store, holds each prefix once), the first covering the
            // account's `n`th /24.
            let mut seen = std::collections::HashSet::new();
            let first = IpNet::V4(Ipv4Net::new(net.network(), 16).unwrap().trunc());
            seen.insert(first);
            let mut allow = vec![AllowRecord {
                cidr: first,
                label: String::new(),
            }];
            while allow.len() < ENTRIES {
                let len = 16 + (rng.next_u64() % 17) as u8;
                let cidr = IpNet::V4(
                    Ipv4Net::new(Ipv4Addr::from(rng.next_u64() as u32), len)
                        .unwrap()
                        .trunc(),
                );
                if seen.insert(cidr) {
                    allow.push(AllowRecord {
                        cidr,
                        label: String::new(),
                    });
                }
            }
            let id = format!("{:016x}", kid);
            a.keys.insert(
                id.clone(),
                KeyRecord {
                    kid,
                    id: id.clone(),
                    account: name.clone(),
                    name: format!("key-{kid}"),
                    description: String::new(),
                    scopes: vec![Scope::Full],
                    status: KeyStatus::Active,
                    secret_hash: hash_secret(&format!("secret-{kid}")),
                    previous: None,
                    rate: None,
                    created_at: 0,
                    last_used_ms: None,
                    requests_day: 0,
                    requests_today: 0,
                    allow,
                },
            );
            kid += 1;
        }
        for n4 in &nets {
            let net = IpNet::V4(*n4);
            a.authorized.insert(
                net,
                AuthorizedRecord {
                    cidr: net,
                    label: String::new(),
                    source: "learned".into(),
                    key_id: None,
                    created_at: 0,
                    created_by: "learning".into(),
                    shared: false,
                },
            );
        }
        st.insert_account(a);
        nets_of.push(nets);
    }
    (st, nets_of)
}

/// `st` as the records a store import takes: accounts, keys (in the
/// state's order) and `(account, entry)` authorized entries.
pub fn records(
    st: &State,
) -> (
    Vec<AccountRecord>,
    Vec<KeyRecord>,
    Vec<(String, AuthorizedRecord)>,
) {
    let accounts = st.accounts.values().map(|a| a.record.clone()).collect();
    let keys = st
        .accounts
        .values()
        .flat_map(|a| a.keys.values().cloned())
        .collect();
    let authorized = st
        .accounts
        .values()
        .flat_map(|a| {
            a.authorized
                .values()
                .map(|e| (a.record.name.clone(), e.clone()))
        })
        .collect();
    (accounts, keys, authorized)
}

/// The value at quantile `p` of sorted samples.
pub fn pct(sorted: &[u64], p: f64) -> u64 {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

/// One admin API call over the Unix socket, without spawning a process.
pub fn admin(socket: &std::path::Path, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = UnixStream::connect(socket).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nhost: a\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out[9..12].parse().unwrap();
    (
        status,
        out.split("\r\n\r\n").nth(1).unwrap_or("").to_string(),
    )
}
