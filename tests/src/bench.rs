//! Helpers shared by the benchmarks.

use std::path::Path;

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
