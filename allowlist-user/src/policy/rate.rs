//! Rate limits: `N/period` as configured, and the GCRA limiter that
//! enforces them per key without a lock.

use std::sync::atomic::{AtomicI64, Ordering};

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    Second,
    Minute,
    Hour,
    Day,
}

impl Period {
    pub fn millis(self) -> i64 {
        match self {
            Period::Second => 1_000,
            Period::Minute => 60_000,
            Period::Hour => 3_600_000,
            Period::Day => 86_400_000,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateLimit {
    pub count: u32,
    pub period: Period,
}

impl RateLimit {
    /// Parses `N/second|minute|hour|day`.
    pub fn parse(s: &str) -> Result<RateLimit, String> {
        let bad = || {
            format!(
                "rate {s:?} is not N/PERIOD; write it like 100/minute (periods: second, minute, hour, day)"
            )
        };
        let (n, p) = s.trim().split_once('/').ok_or_else(bad)?;
        let count: u32 = n.trim().parse().map_err(|_| bad())?;
        if count == 0 {
            return Err(format!(
                "rate {s:?} allows nothing; revoke the key instead, or give a count of 1 or more"
            ));
        }
        let period = match p.trim() {
            "s" | "sec" | "second" => Period::Second,
            "m" | "min" | "minute" => Period::Minute,
            "h" | "hour" => Period::Hour,
            "d" | "day" => Period::Day,
            _ => return Err(bad()),
        };
        // The limiter counts in microseconds: at most one request per µs.
        if i64::from(count) > period.millis() * 1000 {
            return Err(format!(
                "rate {s:?} is more than one request per microsecond; the highest limit is 1000000/second \
                 (or leave --rate out for no limit)"
            ));
        }
        Ok(RateLimit { count, period })
    }
}

impl std::fmt::Display for RateLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let p = match self.period {
            Period::Second => "second",
            Period::Minute => "minute",
            Period::Hour => "hour",
            Period::Day => "day",
        };
        write!(f, "{}/{p}", self.count)
    }
}

/// Generic cell rate algorithm: `count` requests per `period`, in bursts
/// of up to `count`. The state is one atomic (theoretical arrival time).
#[derive(Debug)]
pub struct Gcra {
    tat_us: AtomicI64,
}

/// What the rate limiter says, for the `X-RateLimit-*` headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateInfo {
    pub limit: u32,
    pub remaining: u32,
    /// Unix seconds when the budget is whole again.
    pub reset: i64,
    /// Seconds to wait, when refused.
    pub retry_after: Option<i64>,
}

impl Gcra {
    pub fn new() -> Gcra {
        Gcra {
            tat_us: AtomicI64::new(i64::MIN),
        }
    }

    /// The budget as it stands, without spending any of it.
    pub fn peek(&self, limit: &RateLimit, now_ms: i64) -> RateInfo {
        let period = limit.period.millis() * 1000;
        let interval = (period / i64::from(limit.count)).max(1);
        let now = now_ms * 1000;
        let base = self.tat_us.load(Ordering::Acquire).max(now);
        RateInfo {
            limit: limit.count,
            remaining: ((now + period - base) / interval).clamp(0, i64::from(limit.count)) as u32,
            reset: (base + 999_999) / 1_000_000,
            retry_after: None,
        }
    }

    pub fn check(&self, limit: &RateLimit, now_ms: i64) -> (bool, RateInfo) {
        let period = limit.period.millis() * 1000;
        let interval = (period / i64::from(limit.count)).max(1);
        let tolerance = period - interval;
        let now = now_ms * 1000;
        let mut tat = self.tat_us.load(Ordering::Acquire);
        loop {
            let base = tat.max(now);
            if base - tolerance > now {
                let retry = (base - tolerance - now + 999_999) / 1_000_000;
                let info = RateInfo {
                    limit: limit.count,
                    remaining: 0,
                    reset: (base + 999_999) / 1_000_000,
                    retry_after: Some(retry.max(1)),
                };
                return (false, info);
            }
            let new = base + interval;
            match self
                .tat_us
                .compare_exchange_weak(tat, new, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    let remaining =
                        ((now + period - new) / interval).clamp(0, i64::from(limit.count)) as u32;
                    let info = RateInfo {
                        limit: limit.count,
                        remaining,
                        reset: (new + 999_999) / 1_000_000,
                        retry_after: None,
                    };
                    return (true, info);
                }
                Err(t) => tat = t,
            }
        }
    }
}

impl Default for Gcra {
    fn default() -> Self {
        Gcra::new()
    }
}
