//! `bulwark agent schedule` end to end: the binary, a fixed `--after` and a
//! fixed time zone, so the printed times are known.

use std::process::{Command, Output};

/// Europe/Berlin's rules as a POSIX TZ string: needs no tzdata on the host.
const BERLIN: &str = "CET-1CEST,M3.5.0,M10.5.0/3";

fn run(tz: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_bulwark"))
        .arg("agent")
        .arg("schedule")
        .args(args)
        .env("TZ", tz)
        .env_remove("BULWARK_LOG")
        .env_remove("BULWARK_CONFIG")
        .output()
        .unwrap()
}

fn ok(tz: &str, args: &[&str]) -> Vec<String> {
    let out = run(tz, args);
    assert!(
        out.status.success(),
        "schedule {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn weekdays_across_the_spring_change() {
    let lines = ok(
        BERLIN,
        &[
            "mon..fri 02:00",
            "--after",
            "2025-03-27T12:00:00Z",
            "--count",
            "4",
        ],
    );
    assert_eq!(
        lines,
        [
            "normalized: Mon..Fri *-*-* 02:00:00",
            "Fri 2025-03-28 02:00:00 +01:00",
            "Mon 2025-03-31 02:00:00 +02:00",
            "Tue 2025-04-01 02:00:00 +02:00",
            "Wed 2025-04-02 02:00:00 +02:00",
        ]
    );
}

#[test]
fn nonexistent_time_runs_at_the_end_of_the_gap() {
    let lines = ok(
        BERLIN,
        &["02:30", "--after", "2025-03-29T00:00:00Z", "--count", "3"],
    );
    assert_eq!(
        lines[1..],
        [
            "Sat 2025-03-29 02:30:00 +01:00",
            "Sun 2025-03-30 03:00:00 +02:00",
            "Mon 2025-03-31 02:30:00 +02:00",
        ]
    );
    // Fall back: 02:30 exists twice on 2025-10-26 and runs once.
    let lines = ok(
        BERLIN,
        &["02:30", "--after", "2025-10-25T12:00:00Z", "--count", "2"],
    );
    assert_eq!(
        lines[1..],
        [
            "Sun 2025-10-26 02:30:00 +02:00",
            "Mon 2025-10-27 02:30:00 +01:00"
        ]
    );
}

/// The host's zone (chrono's `Local`) right at the fall-back transition:
/// every time once, in order.
#[test]
fn fall_back_transition_in_the_local_zone() {
    let ny = "EST5EDT,M3.2.0,M11.1.0";
    let lines = ok(
        ny,
        &["*:0/30", "--after", "2025-11-02T05:00:00Z", "--count", "4"],
    );
    assert_eq!(
        lines[1..],
        [
            "Sun 2025-11-02 01:30:00 -04:00",
            "Sun 2025-11-02 02:00:00 -05:00",
            "Sun 2025-11-02 02:30:00 -05:00",
            "Sun 2025-11-02 03:00:00 -05:00",
        ]
    );
    let lines = ok(
        BERLIN,
        &["hourly", "--after", "2025-10-25T23:30:00Z", "--count", "3"],
    );
    assert_eq!(
        lines[1..],
        [
            "Sun 2025-10-26 02:00:00 +02:00",
            "Sun 2025-10-26 03:00:00 +01:00",
            "Sun 2025-10-26 04:00:00 +01:00",
        ]
    );
    // Spring forward at the exact gap start.
    let lines = ok(
        ny,
        &["hourly", "--after", "2025-03-09T06:30:00Z", "--count", "3"],
    );
    assert_eq!(
        lines[1..],
        [
            "Sun 2025-03-09 03:00:00 -04:00",
            "Sun 2025-03-09 04:00:00 -04:00",
            "Sun 2025-03-09 05:00:00 -04:00",
        ]
    );
}

#[test]
fn default_count_is_five_and_first_saturday() {
    let lines = ok(
        BERLIN,
        &["sat *-1..7 03:00", "--after", "2025-06-15T00:00:00Z"],
    );
    assert_eq!(
        lines,
        [
            "normalized: Sat *-*-01..07 03:00:00",
            "Sat 2025-07-05 03:00:00 +02:00",
            "Sat 2025-08-02 03:00:00 +02:00",
            "Sat 2025-09-06 03:00:00 +02:00",
            "Sat 2025-10-04 03:00:00 +02:00",
            "Sat 2025-11-01 03:00:00 +01:00",
        ]
    );
}

#[test]
fn json_output() {
    let out = run(
        "UTC",
        &[
            "*:0/15",
            "--json",
            "--count",
            "3",
            "--after",
            "2025-06-15T10:50:00Z",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["schedule"], "*:0/15");
    assert_eq!(v["kind"], "calendar");
    assert_eq!(v["normalized"], "*-*-* *:00/15:00");
    assert_eq!(v["after"], "2025-06-15T10:50:00+00:00");
    assert_eq!(
        v["next"],
        serde_json::json!([
            "2025-06-15T11:00:00+00:00",
            "2025-06-15T11:15:00+00:00",
            "2025-06-15T11:30:00+00:00"
        ])
    );
}

#[test]
fn intervals_count_from_after() {
    let lines = ok(
        "UTC",
        &[
            "every 90m",
            "--after",
            "2025-06-15T10:00:00Z",
            "--count",
            "2",
        ],
    );
    assert_eq!(
        lines,
        [
            "normalized: every 1h 30m",
            "Sun 2025-06-15 11:30:00 +00:00",
            "Sun 2025-06-15 13:00:00 +00:00",
        ]
    );
}

#[test]
fn past_one_off_never_runs() {
    let lines = ok("UTC", &["2020-01-01", "--after", "2025-06-15T10:00:00Z"]);
    assert_eq!(
        lines,
        [
            "normalized: 2020-01-01 00:00:00",
            "(never runs after Sun 2025-06-15 10:00:00 +00:00)",
        ]
    );
}

#[test]
fn bad_expression_fails_naming_the_part() {
    let out = run("UTC", &["mon..fry 02:00"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("\"fry\" is not a weekday"), "{err}");
    assert!(out.stdout.is_empty());
    let out = run("UTC", &["daily", "--after", "yesterday"]);
    assert_eq!(out.status.code(), Some(2), "clap rejects a bad --after");
}
