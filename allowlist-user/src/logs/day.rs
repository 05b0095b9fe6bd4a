//! Day partitions: which file a moment belongs to, and back.

/// The Unix day of `ms`.
pub fn day_of_ms(ms: i64) -> i64 {
    ms.div_euclid(86_400_000)
}

/// Days since 1970-01-01 -> (year, month, day), proleptic Gregorian
/// (H. Hinnant's civil_from_days).
fn civil(day: i64) -> (i64, u32, u32) {
    let z = day + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// (year, month, day) -> days since 1970-01-01.
fn days(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = i64::from(if m > 2 { m - 3 } else { m + 9 });
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The file of day `day`: `requests-YYYY-MM-DD.db`.
pub fn day_file(day: i64) -> String {
    let (y, m, d) = civil(day);
    format!("requests-{y:04}-{m:02}-{d:02}.db")
}

/// The day a partition file holds, if `name` is one.
pub fn parse_day_file(name: &str) -> Option<i64> {
    let date = name.strip_prefix("requests-")?.strip_suffix(".db")?;
    let mut it = date.split('-');
    let (y, m, d) = (it.next()?, it.next()?, it.next()?);
    if it.next().is_some() || y.len() != 4 || m.len() != 2 || d.len() != 2 {
        return None;
    }
    let (y, m, d): (i64, u32, u32) = (y.parse().ok()?, m.parse().ok()?, d.parse().ok()?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    let day = days(y, m, d);
    (day_file(day) == name).then_some(day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_and_files_round_trip() {
        assert_eq!(day_file(0), "requests-1970-01-01.db");
        // 2026-11-30 is day 20,787.
        assert_eq!(day_file(20_787), "requests-2026-11-30.db");
        assert_eq!(day_of_ms(20_787 * 86_400_000 + 5), 20_787);
        for day in [-1000, 0, 59, 60, 365, 11_016, 20_787, 100_000] {
            assert_eq!(parse_day_file(&day_file(day)), Some(day), "{day}");
        }
        for bad in [
            "requests-2026-02-30.db",
            "requests-2026-13-01.db",
            "requests-26-11-30.db",
            "x.db",
            "requests-2026-11-30.db-wal",
        ] {
            assert_eq!(parse_day_file(bad), None, "{bad}");
        }
    }
}
