//! When the API guard is armed (`[kernel] api_guard`).
//!
//! Unarmed, an unknown address reaches the proxy, gets a clear
//! `403 IP_NOT_ALLOWED`, enters the unauthorized list and triggers the
//! notification: the loop the product is built around. Armed, XDP drops
//! it before any TCP or TLS work — what a flood needs, and what the owner
//! then learns about only from the recorded guard drops. So in `auto` mode
//! the guard is armed only while the edge is under a connection flood (new
//! connections per second above the threshold, or the kernel dropping
//! connection attempts at the listen queue or answering them with SYN
//! cookies) and disarmed after a calm period.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// `[kernel] api_guard`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ApiGuardMode {
    /// Armed only under a connection flood (and while API blocking is
    /// active).
    #[default]
    Auto,
    /// Armed whenever API blocking is active.
    On,
    /// Never armed.
    Off,
}

impl ApiGuardMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ApiGuardMode::Auto => "auto",
            ApiGuardMode::On => "on",
            ApiGuardMode::Off => "off",
        }
    }
}

/// One second's reading of the edge.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reading {
    /// Connections the proxy accepted.
    pub accepted: u64,
    /// Connection attempts the kernel dropped at a full listen queue or
    /// answered with a SYN cookie.
    pub overflowed: u64,
}

/// Arms on a flood, disarms after `calm` without one.
#[derive(Clone, Debug)]
pub struct FloodDetector {
    threshold: u64,
    calm: Duration,
    /// Time since the last flooded second while armed.
    quiet: Option<Duration>,
}

impl FloodDetector {
    pub fn new(threshold: u64, calm: Duration) -> FloodDetector {
        FloodDetector {
            threshold,
            calm,
            quiet: None,
        }
    }

    pub fn armed(&self) -> bool {
        self.quiet.is_some()
    }

    /// Takes one reading over `elapsed`; returns the new state and why when
    /// it changes.
    pub fn observe(&mut self, r: Reading, elapsed: Duration) -> Option<(bool, String)> {
        let secs = elapsed.as_secs_f64().max(0.001);
        let rate = (r.accepted as f64 / secs).round() as u64;
        let flooded = rate > self.threshold || r.overflowed > 0;
        match (&mut self.quiet, flooded) {
            (None, true) => {
                self.quiet = Some(Duration::ZERO);
                let why = if r.overflowed > 0 {
                    format!(
                        "connection flood: the kernel dropped or SYN-cookied {} connection attempts",
                        r.overflowed
                    )
                } else {
                    format!(
                        "connection flood: {rate} new connections/s (flood_threshold {})",
                        self.threshold
                    )
                };
                Some((true, why))
            }
            (Some(q), true) => {
                *q = Duration::ZERO;
                None
            }
            (Some(q), false) => {
                *q += elapsed;
                if *q >= self.calm {
                    self.quiet = None;
                    Some((
                        false,
                        format!("calm for {} s after a flood", self.calm.as_secs()),
                    ))
                } else {
                    None
                }
            }
            (None, false) => None,
        }
    }
}

/// The kernel's count of connection attempts refused at a listen queue
/// (`TcpExt: ListenDrops`, which includes overflows) plus SYN cookies sent,
/// from `/proc/net/netstat` of this network namespace.
pub fn listen_pressure() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/net/netstat").ok()?;
    parse_netstat(&text)
}

fn parse_netstat(text: &str) -> Option<u64> {
    let mut lines = text.lines();
    while let Some(names) = lines.next() {
        let values = lines.next()?;
        if !names.starts_with("TcpExt:") {
            continue;
        }
        let mut total = 0;
        for (n, v) in names.split_whitespace().zip(values.split_whitespace()) {
            if n == "ListenDrops" || n == "SyncookiesSent" {
                total += v.parse::<u64>().ok()?;
            }
        }
        return Some(total);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn arms_on_a_flood_and_disarms_after_the_calm_period() {
        let mut d = FloodDetector::new(100, Duration::from_secs(3));
        let r = |accepted, overflowed| Reading {
            accepted,
            overflowed,
        };
        assert_eq!(d.observe(r(50, 0), S), None);
        let (armed, why) = d.observe(r(500, 0), S).unwrap();
        assert!(armed && why.contains("500 new connections/s"), "{why}");
        assert_eq!(d.observe(r(10, 0), S), None);
        assert_eq!(d.observe(r(10, 0), S), None);
        // A flooded second restarts the calm period.
        assert_eq!(d.observe(r(0, 7), S), None);
        assert_eq!(d.observe(r(10, 0), S), None);
        assert_eq!(d.observe(r(10, 0), S), None);
        let (armed, _) = d.observe(r(10, 0), S).unwrap();
        assert!(!armed && !d.armed());
        let (armed, why) = d.observe(r(0, 3), S).unwrap();
        assert!(armed && why.contains("SYN-cookied 3"), "{why}");
    }

    #[test]
    fn reads_listen_drops_and_syn_cookies() {
        let text = "TcpExt: SyncookiesSent SyncookiesRecv ListenOverflows ListenDrops\n\
                    TcpExt: 5 1 2 9\n\
                    IpExt: InNoRoutes\nIpExt: 0\n";
        assert_eq!(parse_netstat(text), Some(14));
        assert_eq!(parse_netstat("IpExt: A\nIpExt: 1\n"), None);
    }
}
