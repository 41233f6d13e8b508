//! How sizes, durations and times are written for people and read from
//! the command line and the config: one spelling everywhere.

/// Human-readable byte counts.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// `24h`, `30m`, `0s`, `7d`, `1h30m`: a duration for the command line.
pub fn parse_duration(s: &str) -> Result<chrono::Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e}"))?;
    chrono::Duration::from_std(d).map_err(|e| format!("{s:?}: {e}"))
}

/// An RFC 3339 time (`2026-11-20T02:00:00Z`, `2026-11-20T03:00:00+01:00`).
pub fn parse_time(s: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&chrono::Utc))
        .map_err(|e| format!("{s:?} is not an RFC 3339 time: {e}"))
}
