//! Backup schedules: systemd calendar events (systemd.time(7), as Proxmox
//! Backup Server also uses them) and the older interval forms.
//!
//! Calendar events name wall-clock times (`mon..fri 02:00`, `*:0/15`,
//! `sat *-1..7 03:00`), so admins can keep backups out of office hours; the
//! interval forms (`every 15m`, `2h`) stay for configs written before.
//!
//! Daylight saving time, decided once here so every caller agrees:
//! - a local time that does not exist (spring forward: 02:30 in Berlin on the
//!   last Sunday of March) fires at the first instant after the gap (03:00
//!   CEST), and all times inside one gap fire once there. systemd skips such
//!   times; a backup agent should not silently lose a day's backup.
//! - a local time that exists twice (fall back) fires once, at its first
//!   occurrence; the repeated hour does not run the schedule again.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use chrono::{
    DateTime, Datelike, LocalResult, NaiveDate, NaiveDateTime, NaiveTime, TimeZone, Timelike, Utc,
};

/// Calendar events never elapse after this year (systemd's limit too): it
/// bounds the search for dates that never come (`*-02-30`).
pub const MAX_YEAR: i32 = 2199;
const MIN_YEAR: i32 = 1970;

/// Why a schedule did not parse; names the expression and the bad part.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("schedule is empty")]
    Empty,
    #[error("schedule {expr:?}: {part:?}: {reason}")]
    Part {
        expr: String,
        part: String,
        reason: String,
    },
    #[error("schedule {expr:?}: {reason}")]
    Expr { expr: String, reason: String },
}

/// One item of a component list: `v`, `a..b`, `v/step`, `a..b/step`, `*`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Item {
    start: u32,
    end: u32,
    step: u32,
    star: bool,
    /// `v/step`: no end was given.
    open: bool,
}

impl Item {
    fn contains(&self, v: u32) -> bool {
        v >= self.start && v <= self.end && (v - self.start).is_multiple_of(self.step)
    }

    /// For `~` days: `k` counts back from the month's last day (1 = last).
    /// Repetitions run forward in time, i.e. towards k = 1, as in systemd:
    /// `~07/1` is the last seven days.
    fn contains_from_end(&self, k: u32) -> bool {
        if self.open {
            k <= self.start && (self.start - k).is_multiple_of(self.step)
        } else if self.step == 1 || self.star {
            self.contains(k)
        } else {
            k >= self.start && k <= self.end && (self.end - k).is_multiple_of(self.step)
        }
    }
}

/// The allowed values of one date or time component.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Field {
    items: Vec<Item>,
    max: u32,
    width: usize,
}

impl Field {
    fn any(min: u32, max: u32, width: usize) -> Field {
        Field {
            items: vec![Item {
                start: min,
                end: max,
                step: 1,
                star: true,
                open: false,
            }],
            max,
            width,
        }
    }

    fn matches(&self, v: u32) -> bool {
        self.items.iter().any(|i| i.contains(v))
    }

    /// The smallest allowed value >= `v`.
    fn next(&self, v: u32) -> Option<u32> {
        (v..=self.max).find(|&x| self.matches(x))
    }
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let w = self.width;
        for (n, i) in self.items.iter().enumerate() {
            if n > 0 {
                f.write_str(",")?;
            }
            if i.star {
                f.write_str("*")?;
            } else if i.start == i.end || i.open {
                write!(f, "{:0w$}", i.start)?;
            } else {
                write!(f, "{:0w$}..{:0w$}", i.start, i.end)?;
            }
            if i.step > 1 {
                write!(f, "/{}", i.step)?;
            }
        }
        Ok(())
    }
}

/// A parsed calendar event: which weekdays, dates and times it elapses at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CalendarEvent {
    /// Bit 0 is Monday.
    weekdays: u8,
    year: Field,
    month: Field,
    day: Field,
    /// `~`: days count back from the month's last day (`*-02~1` = Feb's last).
    end_of_month: bool,
    hour: Field,
    minute: Field,
    second: Field,
    /// Elapse in UTC instead of the caller's time zone.
    utc: bool,
}

const ALL_WEEKDAYS: u8 = 0x7f;
const WEEKDAY_NAMES: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
const WEEKDAY_LONG: [&str; 7] = [
    "monday",
    "tuesday",
    "wednesday",
    "thursday",
    "friday",
    "saturday",
    "sunday",
];

/// systemd's shorthands, as the full expressions they stand for.
fn shorthand(s: &str) -> Option<&'static str> {
    Some(match s {
        "minutely" => "*-*-* *:*:00",
        "hourly" => "*-*-* *:00:00",
        "daily" => "*-*-* 00:00:00",
        "weekly" => "Mon *-*-* 00:00:00",
        "monthly" => "*-*-01 00:00:00",
        "quarterly" => "*-01,04,07,10-01 00:00:00",
        "semiannually" | "semi-annually" => "*-01,07-01 00:00:00",
        "yearly" | "annually" => "*-01-01 00:00:00",
        _ => return None,
    })
}

struct Parser<'a> {
    expr: &'a str,
}

impl Parser<'_> {
    fn part(&self, part: &str, reason: impl Into<String>) -> Error {
        Error::Part {
            expr: self.expr.to_string(),
            part: part.to_string(),
            reason: reason.into(),
        }
    }

    fn number(&self, part: &str, s: &str, what: &str) -> Result<u32, Error> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) || s.len() > 9 {
            return Err(self.part(part, format!("{s:?} is not a number ({what})")));
        }
        s.parse()
            .map_err(|_| self.part(part, format!("{s:?} is not a number ({what})")))
    }

    /// A comma list of `*`, `v`, `a..b`, each optionally `/step`.
    fn field(
        &self,
        part: &str,
        s: &str,
        what: &str,
        min: u32,
        max: u32,
        width: usize,
    ) -> Result<Field, Error> {
        let mut items = Vec::new();
        for item in s.split(',') {
            if item.is_empty() {
                return Err(self.part(part, format!("empty list item in the {what}")));
            }
            let (base, step) = match item.split_once('/') {
                Some((b, st)) => {
                    if st.contains('.') {
                        return Err(self.part(
                            part,
                            format!("{what}: fractional repetitions are not supported"),
                        ));
                    }
                    let st = self.number(part, st, what)?;
                    if st == 0 {
                        return Err(self.part(part, format!("{what}: repetition /0")));
                    }
                    (b, Some(st))
                }
                None => (item, None),
            };
            let (start, end, star) = if base == "*" {
                (min, max, true)
            } else if let Some((a, b)) = base.split_once("..") {
                let a = self.number(part, a, what)?;
                let b = self.number(part, b, what)?;
                if a > b {
                    return Err(self.part(part, format!("{what} range {a}..{b} runs backwards")));
                }
                (a, b, false)
            } else {
                if base.contains('.') {
                    return Err(self.part(
                        part,
                        format!("{what} {base:?}: fractions are not supported"),
                    ));
                }
                let v = self.number(part, base, what)?;
                (v, if step.is_some() { max } else { v }, false)
            };
            for v in [start, end] {
                if v < min || v > max {
                    return Err(self.part(part, format!("{what} {v} is out of range {min}..{max}")));
                }
            }
            items.push(Item {
                start,
                end,
                step: step.unwrap_or(1),
                star,
                open: step.is_some() && !star && !base.contains(".."),
            });
        }
        Ok(Field { items, max, width })
    }

    fn weekday(&self, part: &str, name: &str) -> Result<u32, Error> {
        let n = name.to_ascii_lowercase();
        WEEKDAY_LONG
            .iter()
            .position(|l| n.len() >= 3 && l.starts_with(&n) && (n.len() == 3 || n == **l))
            .map(|p| p as u32)
            .ok_or_else(|| self.part(part, format!("{name:?} is not a weekday")))
    }

    /// `mon,wed..fri`; a range may wrap (`sat..mon`).
    fn weekdays(&self, s: &str) -> Result<u8, Error> {
        let mut bits = 0u8;
        for item in s.split(',') {
            if item.is_empty() {
                return Err(self.part(s, "empty weekday list item"));
            }
            let range = item.split_once("..").or_else(|| item.split_once('-'));
            let (a, b) = match range {
                Some((a, b)) => (self.weekday(s, a)?, self.weekday(s, b)?),
                None => {
                    let d = self.weekday(s, item)?;
                    (d, d)
                }
            };
            let mut d = a;
            loop {
                bits |= 1 << d;
                if d == b {
                    break;
                }
                d = (d + 1) % 7;
            }
        }
        Ok(bits)
    }

    fn date(&self, ev: &mut CalendarEvent, s: &str) -> Result<(), Error> {
        let (ym, day) = if let Some((ym, d)) = s.split_once('~') {
            ev.end_of_month = true;
            (ym, d)
        } else {
            match s.rsplit_once('-') {
                Some((ym, d)) => (ym, d),
                None => return Err(self.part(s, "a date needs MONTH-DAY")),
            }
        };
        let (year, month) = match ym.split_once('-') {
            Some((y, m)) => (Some(y), m),
            None => (None, ym),
        };
        if let Some(y) = year {
            ev.year = self.field(s, y, "year", MIN_YEAR as u32, MAX_YEAR as u32, 4)?;
        }
        ev.month = self.field(s, month, "month", 1, 12, 2)?;
        ev.day = self.field(s, day, "day", 1, 31, 2)?;
        Ok(())
    }

    fn time(&self, ev: &mut CalendarEvent, s: &str) -> Result<(), Error> {
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() < 2 || parts.len() > 3 {
            return Err(self.part(s, "a time is HOUR:MINUTE[:SECOND]"));
        }
        ev.hour = self.field(s, parts[0], "hour", 0, 23, 2)?;
        ev.minute = self.field(s, parts[1], "minute", 0, 59, 2)?;
        if let Some(sec) = parts.get(2) {
            ev.second = self.field(s, sec, "second", 0, 59, 2)?;
        }
        Ok(())
    }

    fn event(&self) -> Result<CalendarEvent, Error> {
        let s = self.expr.trim();
        if s.is_empty() {
            return Err(Error::Empty);
        }
        if let Some(full) = shorthand(&s.to_ascii_lowercase()) {
            return Parser { expr: full }.event();
        }
        let mut ev = CalendarEvent {
            weekdays: ALL_WEEKDAYS,
            year: Field::any(MIN_YEAR as u32, MAX_YEAR as u32, 4),
            month: Field::any(1, 12, 2),
            day: Field::any(1, 31, 2),
            end_of_month: false,
            hour: Field::any(0, 23, 2),
            minute: Field::any(0, 59, 2),
            second: Field::any(0, 59, 2),
            utc: false,
        };
        // A bare weekday or date means midnight; seconds default to :00.
        let zero = |max| Field {
            items: vec![Item {
                start: 0,
                end: 0,
                step: 1,
                star: false,
                open: false,
            }],
            max,
            width: 2,
        };
        ev.hour = zero(23);
        ev.minute = zero(59);
        ev.second = zero(59);

        let tokens: Vec<&str> = s.split_whitespace().collect();
        let mut i = 0;
        // Weekdays come first and may be spread over tokens ("Mon, Fri").
        let mut wd = String::new();
        while i < tokens.len()
            && tokens[i].starts_with(|c: char| c.is_ascii_alphabetic())
            && !tokens[i].contains(':')
            && !tokens[i].eq_ignore_ascii_case("utc")
        {
            wd.push_str(tokens[i]);
            i += 1;
        }
        if !wd.is_empty() {
            ev.weekdays = self.weekdays(wd.trim_end_matches(','))?;
        }
        let (mut have_date, mut have_time) = (false, false);
        for (n, tok) in tokens.iter().enumerate().skip(i) {
            if tok.eq_ignore_ascii_case("utc") || *tok == "Z" {
                if n + 1 != tokens.len() {
                    return Err(self.part(tok, "the time zone must come last"));
                }
                ev.utc = true;
            } else if tok.contains(':') {
                if have_time {
                    return Err(self.part(tok, "a second time part"));
                }
                self.time(&mut ev, tok)?;
                have_time = true;
            } else if tok.contains('-') || tok.contains('~') {
                if have_date || have_time {
                    return Err(self.part(tok, "the date must come once, before the time"));
                }
                self.date(&mut ev, tok)?;
                have_date = true;
            } else if tok.starts_with(|c: char| c.is_ascii_alphabetic()) {
                return Err(self.part(
                    tok,
                    "unknown word (only UTC is supported as a time zone; weekdays come first)",
                ));
            } else {
                return Err(self.part(tok, "neither a weekday, a date (Y-M-D) nor a time (H:M)"));
            }
        }
        if wd.is_empty() && !have_date && !have_time {
            return Err(Error::Expr {
                expr: self.expr.to_string(),
                reason: "no weekday, date or time".into(),
            });
        }
        Ok(ev)
    }
}

impl CalendarEvent {
    /// Parses a systemd calendar event (`mon..fri 02:00`, `*:0/15`, `daily`).
    pub fn parse(expr: &str) -> Result<CalendarEvent, Error> {
        Parser { expr }.event()
    }

    fn day_matches(&self, date: NaiveDate) -> bool {
        if self.weekdays & (1 << date.weekday().num_days_from_monday()) == 0 {
            return false;
        }
        if self.end_of_month {
            let k = days_in_month(date.year(), date.month()) - date.day() + 1;
            self.day.items.iter().any(|i| i.contains_from_end(k))
        } else {
            self.day.matches(date.day())
        }
    }

    /// The earliest time of day >= `min` that the event allows.
    fn next_time(&self, min: NaiveTime) -> Option<NaiveTime> {
        for h in min.hour()..24 {
            if !self.hour.matches(h) {
                continue;
            }
            let m0 = if h == min.hour() { min.minute() } else { 0 };
            for m in m0..60 {
                if !self.minute.matches(m) {
                    continue;
                }
                let s0 = if h == min.hour() && m == min.minute() {
                    min.second()
                } else {
                    0
                };
                if let Some(s) = self.second.next(s0) {
                    return NaiveTime::from_hms_opt(h, m, s);
                }
            }
        }
        None
    }

    /// The earliest wall-clock time >= `from` the event allows, ignoring
    /// time zones.
    fn next_naive(&self, from: NaiveDateTime) -> Option<NaiveDateTime> {
        let mut date = from.date();
        let mut tmin = from.time();
        loop {
            let y = date.year();
            if !(MIN_YEAR..=MAX_YEAR).contains(&y) {
                return None;
            }
            if !self.year.matches(y as u32) {
                let ny = self.year.next(y as u32 + 1)?;
                date = NaiveDate::from_ymd_opt(ny as i32, 1, 1)?;
                tmin = NaiveTime::MIN;
                continue;
            }
            if !self.month.matches(date.month()) {
                date = match self.month.next(date.month() + 1) {
                    Some(m) => NaiveDate::from_ymd_opt(y, m, 1)?,
                    None => NaiveDate::from_ymd_opt(y + 1, 1, 1)?,
                };
                tmin = NaiveTime::MIN;
                continue;
            }
            if self.day_matches(date) {
                if let Some(t) = self.next_time(tmin) {
                    return Some(date.and_time(t));
                }
            }
            date = date.succ_opt()?;
            tmin = NaiveTime::MIN;
        }
    }

    /// The first elapse strictly after `after`, in `after`'s time zone (see
    /// the module doc for DST); `None` if the event never elapses again.
    pub fn next_after<Tz: TimeZone>(&self, after: &DateTime<Tz>) -> Option<DateTime<Tz>> {
        if self.utc {
            let next = self.next_in(&after.with_timezone(&Utc), &Utc)?;
            return Some(next.with_timezone(&after.timezone()));
        }
        self.next_in(after, &after.timezone())
    }

    fn next_in<Tz: TimeZone>(&self, after: &DateTime<Tz>, tz: &Tz) -> Option<DateTime<Tz>> {
        let second = chrono::Duration::seconds(1);
        let mut from = after.naive_local().with_nanosecond(0)? + second;
        // Each round moves `from` forward; the bound only guards against a
        // time zone whose rules make no progress.
        for _ in 0..100_000 {
            let cand = self.next_naive(from)?;
            match resolve(tz, cand) {
                LocalResult::Single(t) => {
                    if &t > after {
                        return Some(t);
                    }
                    from = cand + second;
                }
                LocalResult::Ambiguous(a, b) => {
                    let first = if a < b { a } else { b };
                    if &first > after {
                        return Some(first);
                    }
                    from = cand + second;
                }
                LocalResult::None => {
                    let end = gap_end(tz, cand)?;
                    if &end > after {
                        return Some(end);
                    }
                    from = end.naive_local().max(cand + second);
                }
            }
        }
        None
    }

    /// The next `n` elapses after `after`.
    #[cfg(test)]
    pub fn next_n<Tz: TimeZone>(&self, after: &DateTime<Tz>, n: usize) -> Vec<DateTime<Tz>> {
        let mut out: Vec<DateTime<Tz>> = Vec::with_capacity(n);
        while out.len() < n {
            let from = out.last().unwrap_or(after);
            match self.next_after(from) {
                Some(t) => out.push(t),
                None => break,
            }
        }
        out
    }
}

/// The instants whose local time is `cand`. Derived from UTC-to-local
/// lookups only: chrono's `Local` resolves a local time right at a
/// transition wrongly (02:00 on a fall-back night in New York came back as
/// 02:00 EDT, an instant whose local time is 01:00 EST).
fn resolve<Tz: TimeZone>(tz: &Tz, cand: NaiveDateTime) -> LocalResult<DateTime<Tz>> {
    use chrono::Offset;
    let day = chrono::Duration::days(1);
    // Zones change offset at most once within a day of any time; the
    // offsets a day before, at and a day after cover both sides.
    let mut found: Vec<DateTime<Tz>> = Vec::with_capacity(2);
    for probe in [cand - day, cand, cand + day] {
        let off = tz.offset_from_utc_datetime(&probe).fix();
        let utc = cand - off;
        if tz.offset_from_utc_datetime(&utc).fix() == off {
            let t = tz.from_utc_datetime(&utc);
            if !found.contains(&t) {
                found.push(t);
            }
        }
    }
    found.sort();
    match found.len() {
        0 => LocalResult::None,
        1 => LocalResult::Single(found.remove(0)),
        _ => {
            let latest = found.remove(found.len() - 1);
            LocalResult::Ambiguous(found.remove(0), latest)
        }
    }
}

/// The first instant whose local time is at or past `cand`, a local time
/// inside a gap: the instant the clock jumped over it.
fn gap_end<Tz: TimeZone>(tz: &Tz, cand: NaiveDateTime) -> Option<DateTime<Tz>> {
    let local = |ts: i64| {
        DateTime::from_timestamp(ts, 0).map(|u| tz.from_utc_datetime(&u.naive_utc()).naive_local())
    };
    let guess = cand.and_utc().timestamp();
    // UTC offsets stay within ±26 h, so these bracket the gap.
    let (mut lo, mut hi) = (guess - 2 * 86400, guess + 2 * 86400);
    if local(lo)? >= cand || local(hi)? < cand {
        return None;
    }
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if local(mid)? < cand {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Some(tz.from_utc_datetime(&DateTime::from_timestamp(hi, 0)?.naive_utc()))
}

fn days_in_month(y: i32, m: u32) -> u32 {
    let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
    NaiveDate::from_ymd_opt(ny, nm, 1)
        .and_then(|d| d.pred_opt())
        .map_or(31, |d| d.day())
}

/// The normalized form, as `systemd-analyze calendar` prints it.
impl fmt::Display for CalendarEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.weekdays != ALL_WEEKDAYS {
            let mut d = 0;
            let mut first = true;
            while d < 7 {
                if self.weekdays & (1 << d) == 0 {
                    d += 1;
                    continue;
                }
                let mut e = d;
                while e + 1 < 7 && self.weekdays & (1 << (e + 1)) != 0 {
                    e += 1;
                }
                if !first {
                    f.write_str(",")?;
                }
                first = false;
                match e - d {
                    0 => f.write_str(WEEKDAY_NAMES[d])?,
                    1 => write!(f, "{},{}", WEEKDAY_NAMES[d], WEEKDAY_NAMES[e])?,
                    _ => write!(f, "{}..{}", WEEKDAY_NAMES[d], WEEKDAY_NAMES[e])?,
                }
                d = e + 1;
            }
            f.write_str(" ")?;
        }
        let sep = if self.end_of_month { "~" } else { "-" };
        write!(
            f,
            "{}-{}{sep}{} {}:{}:{}",
            self.year, self.month, self.day, self.hour, self.minute, self.second
        )?;
        if self.utc {
            f.write_str(" UTC")?;
        }
        Ok(())
    }
}

impl FromStr for CalendarEvent {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        CalendarEvent::parse(s)
    }
}

/// When a policy runs: a calendar event or, as configs used to say, an
/// interval since the last run; optionally shifted by a per-host offset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Schedule {
    kind: Kind,
    offset: Duration,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `every 15m`, `2h`: runs when this long has passed since the last run.
    Every(Duration),
    Calendar(Box<CalendarEvent>),
}

/// `every N{s,m,h,d}` or `N{s,m,h,d}` (a bare number is seconds), as
/// `config::interval` accepted them; `None` if `s` is not of that form.
fn parse_interval(s: &str) -> Option<Result<Duration, Error>> {
    let lower = s.trim().to_ascii_lowercase();
    let rest = lower.strip_prefix("every");
    let n = rest.unwrap_or(&lower).trim();
    let digits = n.find(|c: char| !c.is_ascii_digit()).unwrap_or(n.len());
    let (num, unit) = n.split_at(digits);
    let unit = unit.trim();
    let mult = match unit {
        "s" | "" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ if rest.is_some() => 0,
        _ => return None,
    };
    if num.is_empty() && rest.is_none() {
        return None;
    }
    let err = |reason: &str| Error::Expr {
        expr: s.to_string(),
        reason: reason.to_string(),
    };
    if mult == 0 {
        return Some(Err(err("want every N followed by s, m, h or d")));
    }
    let secs = match num.parse::<u64>().ok().and_then(|v| v.checked_mul(mult)) {
        Some(v) => v,
        None => return Some(Err(err("want every N followed by s, m, h or d"))),
    };
    if secs == 0 {
        return Some(Err(err("zero interval")));
    }
    Some(Ok(Duration::from_secs(secs)))
}

impl Schedule {
    /// An interval (`every 15m`, `30s`) or a calendar event (`daily`,
    /// `mon..fri 02:00`). `hourly`/`daily`/`weekly` are calendar events now
    /// (top of the hour, midnight, Monday midnight), as in systemd.
    pub fn parse(s: &str) -> Result<Schedule, Error> {
        let kind = match parse_interval(s) {
            Some(d) => Kind::Every(d?),
            None => Kind::Calendar(Box::new(CalendarEvent::parse(s)?)),
        };
        Ok(Schedule {
            kind,
            offset: Duration::ZERO,
        })
    }

    pub fn kind(&self) -> &Kind {
        &self.kind
    }

    /// Shifts every calendar elapse later by `offset` (see [`spread_offset`]);
    /// intervals already differ per host, so they ignore it.
    pub fn with_offset(mut self, offset: Duration) -> Schedule {
        self.offset = offset;
        self
    }

    /// Shifts the schedule by a stable per-host offset below `max`, so a
    /// fleet sharing one schedule does not hit the repository at once.
    pub fn with_spread(self, host: &str, max: Duration) -> Schedule {
        self.with_offset(spread_offset(host, max))
    }

    #[cfg(test)]
    pub fn offset(&self) -> Duration {
        self.offset
    }

    /// The next run after `after` (for intervals: `after` is the last run).
    pub fn next_after<Tz: TimeZone>(&self, after: &DateTime<Tz>) -> Option<DateTime<Tz>> {
        match &self.kind {
            Kind::Every(d) => after
                .clone()
                .checked_add_signed(chrono::Duration::from_std(*d).ok()?),
            Kind::Calendar(ev) => {
                let off = chrono::Duration::from_std(self.offset).ok()?;
                let nominal = ev.next_after(&after.clone().checked_sub_signed(off)?)?;
                nominal.checked_add_signed(off)
            }
        }
    }

    /// The next `n` runs after `after`.
    pub fn next_n<Tz: TimeZone>(&self, after: &DateTime<Tz>, n: usize) -> Vec<DateTime<Tz>> {
        let mut out: Vec<DateTime<Tz>> = Vec::with_capacity(n);
        while out.len() < n {
            match self.next_after(out.last().unwrap_or(after)) {
                Some(t) => out.push(t),
                None => break,
            }
        }
        out
    }

    /// Whether a run came due between the last run and `now` without
    /// happening (agent down, host off): then run once at start, like
    /// systemd's `Persistent=true`. Never having run is not a missed run,
    /// as for systemd without a stamp file: the first run follows the
    /// schedule.
    pub fn missed<Tz: TimeZone>(
        &self,
        last_run: Option<&DateTime<Tz>>,
        now: &DateTime<Tz>,
    ) -> bool {
        match last_run.and_then(|l| self.next_after(l)) {
            Some(due) => &due <= now,
            None => false,
        }
    }

    /// The longest gap between runs over the next eight runs after
    /// `around`: what "no backup for twice its period" measures against.
    /// The longest, so `mon..fri` is not silent every weekend.
    pub fn period<Tz: TimeZone>(&self, around: &DateTime<Tz>) -> Option<Duration> {
        if let Kind::Every(d) = self.kind {
            return Some(d);
        }
        let runs = self.next_n(around, 9);
        runs.windows(2)
            .filter_map(|w| (w[1].clone() - w[0].clone()).to_std().ok())
            .max()
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Every(d) => write!(f, "every {}", humantime::format_duration(*d))?,
            Kind::Calendar(ev) => write!(f, "{ev}")?,
        }
        if !self.offset.is_zero() && matches!(self.kind, Kind::Calendar(_)) {
            write!(f, " (+{})", humantime::format_duration(self.offset))?;
        }
        Ok(())
    }
}

impl FromStr for Schedule {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Schedule::parse(s)
    }
}

impl<'de> serde::Deserialize<'de> for Schedule {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Schedule::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// A stable offset in `[0, max)` whole seconds derived from `host`: the
/// same host always gets the same offset (across restarts and releases,
/// hence FNV-1a rather than std's unspecified hasher), different hosts
/// spread evenly.
pub fn spread_offset(host: &str, max: Duration) -> Duration {
    let range = max.as_secs();
    if range == 0 {
        return Duration::ZERO;
    }
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in host.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // splitmix64's finalizer: FNV's low bits alone spread similar names
    // poorly.
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^= h >> 31;
    Duration::from_secs(h % range)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono_tz::America::New_York;
    use chrono_tz::Europe::Berlin;
    use chrono_tz::Tz;

    fn at(tz: Tz, s: &str) -> DateTime<Tz> {
        let n = NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S").unwrap();
        tz.from_local_datetime(&n).earliest().unwrap()
    }

    fn utc(s: &str) -> DateTime<Utc> {
        let n = NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S").unwrap();
        Utc.from_utc_datetime(&n)
    }

    fn fmt<T: TimeZone>(ts: &[DateTime<T>]) -> Vec<String>
    where
        T::Offset: fmt::Display,
    {
        ts.iter()
            .map(|t| t.format("%a %Y-%m-%d %H:%M:%S %Z").to_string())
            .collect()
    }

    /// The next `n` elapses of `expr` after `from` (UTC).
    fn next(expr: &str, from: &str, n: usize) -> Vec<String> {
        let ev = CalendarEvent::parse(expr).unwrap();
        fmt(&ev.next_n(&utc(from), n))
            .into_iter()
            .map(|s| s.trim_end_matches(" UTC").to_string())
            .collect()
    }

    fn norm(expr: &str) -> String {
        CalendarEvent::parse(expr).unwrap().to_string()
    }

    fn err(expr: &str) -> String {
        CalendarEvent::parse(expr).unwrap_err().to_string()
    }

    #[test]
    fn shorthands_normalize_like_systemd() {
        assert_eq!(norm("minutely"), "*-*-* *:*:00");
        assert_eq!(norm("hourly"), "*-*-* *:00:00");
        assert_eq!(norm("daily"), "*-*-* 00:00:00");
        assert_eq!(norm("weekly"), "Mon *-*-* 00:00:00");
        assert_eq!(norm("monthly"), "*-*-01 00:00:00");
        assert_eq!(norm("yearly"), "*-01-01 00:00:00");
        assert_eq!(norm("annually"), "*-01-01 00:00:00");
        assert_eq!(norm("quarterly"), "*-01,04,07,10-01 00:00:00");
        assert_eq!(norm("semiannually"), "*-01,07-01 00:00:00");
        assert_eq!(norm("DAILY"), "*-*-* 00:00:00");
        assert_eq!(norm("  daily  "), "*-*-* 00:00:00");
    }

    #[test]
    fn forms_normalize() {
        assert_eq!(norm("mon..fri 02:00"), "Mon..Fri *-*-* 02:00:00");
        assert_eq!(norm("*:0/15"), "*-*-* *:00/15:00");
        assert_eq!(norm("sat *-1..7 03:00"), "Sat *-*-01..07 03:00:00");
        assert_eq!(norm("*:*:0/10"), "*-*-* *:*:00/10");
        assert_eq!(norm("Wed, 17:48"), "Wed *-*-* 17:48:00");
        assert_eq!(norm("Mon, Fri 10:00"), "Mon,Fri *-*-* 10:00:00");
        assert_eq!(
            norm("Wed..Wed,Wed *-1"),
            "Wed *-*-01 00:00:00",
            "duplicates collapse"
        );
        assert_eq!(norm("mon,wed..fri"), "Mon,Wed..Fri *-*-* 00:00:00");
        assert_eq!(norm("sat..mon"), "Mon,Sat,Sun *-*-* 00:00:00");
        assert_eq!(norm("sat-sun"), "Sat,Sun *-*-* 00:00:00");
        assert_eq!(norm("monday"), "Mon *-*-* 00:00:00");
        assert_eq!(norm("2025-03-30 02:30:15"), "2025-03-30 02:30:15");
        assert_eq!(norm("2025-3-3"), "2025-03-03 00:00:00");
        assert_eq!(norm("12-25 18:00"), "*-12-25 18:00:00");
        assert_eq!(norm("*-02~01"), "*-02~01 00:00:00");
        assert_eq!(norm("0/2:00"), "*-*-* 00/2:00:00");
        assert_eq!(norm("1..23/3:05"), "*-*-* 01..23/3:05:00");
        assert_eq!(norm("1/3:05"), "*-*-* 01/3:05:00");
        assert_eq!(norm("1..20/3:05"), "*-*-* 01..20/3:05:00");
        assert_eq!(norm("*/6:00"), "*-*-* */6:00:00");
        assert_eq!(norm("2025..2030/2-*-* 00:00"), "2025..2030/2-*-* 00:00:00");
        assert_eq!(norm("12:00 UTC"), "*-*-* 12:00:00 UTC");
    }

    #[test]
    fn invalid_inputs_name_the_bad_part() {
        assert_eq!(err(""), "schedule is empty");
        assert_eq!(err("   "), "schedule is empty");
        assert!(err("mon..fry 02:00").contains("\"fry\" is not a weekday"));
        assert!(err("25:00").contains("hour 25 is out of range 0..23"));
        assert!(err("*:60").contains("minute 60 is out of range 0..59"));
        assert!(err("*:*:61").contains("second 61 is out of range"));
        assert!(err("*-13-01").contains("month 13 is out of range 1..12"));
        assert!(err("*-02-32").contains("day 32 is out of range 1..31"));
        assert!(err("*-00-01").contains("month 0 is out of range"));
        assert!(err("1969-01-01").contains("year 1969 is out of range"));
        assert!(err("*:0/0").contains("repetition /0"));
        assert!(err("5..3:00").contains("hour range 5..3 runs backwards"));
        assert!(err("1,,2:00").contains("empty list item in the hour"));
        assert!(err("ab:00").contains("\"ab\" is not a number (hour)"));
        assert!(err("+1:00").contains("is not a number"));
        assert!(err("12:00:00.5").contains("fractions are not supported"));
        assert!(err("12:00 Europe/Berlin").contains("only UTC"));
        assert!(err("12:00:00:00").contains("HOUR:MINUTE[:SECOND]"));
        assert!(err("12").contains("neither a weekday"));
        assert!(err("12:00 13:00").contains("a second time part"));
        assert!(err("12:00 2025-01-01").contains("before the time"));
        assert!(err("UTC 12:00").contains("must come last"));
        assert!(err("mo 12:00").contains("\"mo\" is not a weekday"));
        assert!(err("mond 12:00").contains("not a weekday"));
        assert!(err("UTC").contains("no weekday, date or time"));
        assert!(err("*:*/1.5").contains("fractional repetitions"));
        assert!(err("2025").contains("neither a weekday"));
        // The expression is named in the message.
        assert!(err("25:00").starts_with("schedule \"25:00\": \"25:00\":"));
    }

    #[test]
    fn shorthands_elapse() {
        let f = "2025-06-15 10:20:30"; // a Sunday
        assert_eq!(
            next("minutely", f, 2),
            ["Sun 2025-06-15 10:21:00", "Sun 2025-06-15 10:22:00"]
        );
        assert_eq!(
            next("hourly", f, 2),
            ["Sun 2025-06-15 11:00:00", "Sun 2025-06-15 12:00:00"]
        );
        assert_eq!(
            next("daily", f, 2),
            ["Mon 2025-06-16 00:00:00", "Tue 2025-06-17 00:00:00"]
        );
        assert_eq!(
            next("weekly", f, 2),
            ["Mon 2025-06-16 00:00:00", "Mon 2025-06-23 00:00:00"]
        );
        assert_eq!(
            next("monthly", f, 2),
            ["Tue 2025-07-01 00:00:00", "Fri 2025-08-01 00:00:00"]
        );
        assert_eq!(
            next("yearly", f, 2),
            ["Thu 2026-01-01 00:00:00", "Fri 2027-01-01 00:00:00"]
        );
        assert_eq!(
            next("quarterly", f, 2),
            ["Tue 2025-07-01 00:00:00", "Wed 2025-10-01 00:00:00"]
        );
    }

    #[test]
    fn weekday_ranges_skip_weekends() {
        assert_eq!(
            next("mon..fri 02:00", "2025-06-12 03:00:00", 4),
            [
                "Fri 2025-06-13 02:00:00",
                "Mon 2025-06-16 02:00:00",
                "Tue 2025-06-17 02:00:00",
                "Wed 2025-06-18 02:00:00"
            ]
        );
        assert_eq!(
            next("sat..mon 12:00", "2025-06-12 00:00:00", 4),
            [
                "Sat 2025-06-14 12:00:00",
                "Sun 2025-06-15 12:00:00",
                "Mon 2025-06-16 12:00:00",
                "Sat 2025-06-21 12:00:00"
            ]
        );
        assert_eq!(
            next("Mon,Wed 08:30", "2025-06-16 08:30:00", 2),
            ["Wed 2025-06-18 08:30:00", "Mon 2025-06-23 08:30:00"],
            "strictly after: the elapse at `after` itself is not returned"
        );
    }

    #[test]
    fn repetitions_and_lists() {
        assert_eq!(
            next("*:0/15", "2025-06-15 10:50:00", 3),
            [
                "Sun 2025-06-15 11:00:00",
                "Sun 2025-06-15 11:15:00",
                "Sun 2025-06-15 11:30:00"
            ]
        );
        assert_eq!(
            next("*:*:0/10", "2025-06-15 10:59:45", 3),
            [
                "Sun 2025-06-15 10:59:50",
                "Sun 2025-06-15 11:00:00",
                "Sun 2025-06-15 11:00:10"
            ]
        );
        assert_eq!(
            next("*:5/20", "2025-06-15 10:50:00", 3),
            [
                "Sun 2025-06-15 11:05:00",
                "Sun 2025-06-15 11:25:00",
                "Sun 2025-06-15 11:45:00"
            ]
        );
        assert_eq!(
            next("8..18/4:00", "2025-06-15 13:00:00", 4),
            [
                "Sun 2025-06-15 16:00:00",
                "Mon 2025-06-16 08:00:00",
                "Mon 2025-06-16 12:00:00",
                "Mon 2025-06-16 16:00:00"
            ]
        );
        assert_eq!(
            next("1,13:30,45", "2025-06-15 13:40:00", 4),
            [
                "Sun 2025-06-15 13:45:00",
                "Mon 2025-06-16 01:30:00",
                "Mon 2025-06-16 01:45:00",
                "Mon 2025-06-16 13:30:00"
            ]
        );
        assert_eq!(
            next("*-*-1/7 06:00", "2025-06-02 00:00:00", 5),
            [
                "Sun 2025-06-08 06:00:00",
                "Sun 2025-06-15 06:00:00",
                "Sun 2025-06-22 06:00:00",
                "Sun 2025-06-29 06:00:00",
                "Tue 2025-07-01 06:00:00"
            ]
        );
        // Sub-second `after`: the next whole elapse.
        let ev = CalendarEvent::parse("*:*:0/10").unwrap();
        let t = utc("2025-06-15 10:00:00") + chrono::Duration::milliseconds(500);
        assert_eq!(fmt(&ev.next_n(&t, 1)), ["Sun 2025-06-15 10:00:10 UTC"]);
    }

    #[test]
    fn first_saturday_of_the_month() {
        assert_eq!(
            next("sat *-1..7 03:00", "2025-06-15 00:00:00", 4),
            [
                "Sat 2025-07-05 03:00:00",
                "Sat 2025-08-02 03:00:00",
                "Sat 2025-09-06 03:00:00",
                "Sat 2025-10-04 03:00:00"
            ]
        );
    }

    #[test]
    fn month_ends_and_leap_years() {
        assert_eq!(
            next("*-*-31 12:00", "2025-01-31 13:00:00", 4),
            [
                "Mon 2025-03-31 12:00:00",
                "Sat 2025-05-31 12:00:00",
                "Thu 2025-07-31 12:00:00",
                "Sun 2025-08-31 12:00:00"
            ]
        );
        assert_eq!(
            next("*-02-29", "2025-01-01 00:00:00", 3),
            [
                "Tue 2028-02-29 00:00:00",
                "Sun 2032-02-29 00:00:00",
                "Fri 2036-02-29 00:00:00"
            ]
        );
        // 2100 is no leap year.
        assert_eq!(
            next("*-02-29", "2096-03-01 00:00:00", 1),
            ["Fri 2104-02-29 00:00:00"]
        );
        // Last day of the month, and the third-last.
        assert_eq!(
            next("*-*~01 23:00", "2024-01-31 23:00:00", 4),
            [
                "Thu 2024-02-29 23:00:00",
                "Sun 2024-03-31 23:00:00",
                "Tue 2024-04-30 23:00:00",
                "Fri 2024-05-31 23:00:00"
            ]
        );
        assert_eq!(
            next("*-02~03", "2025-01-01 00:00:00", 2),
            ["Wed 2025-02-26 00:00:00", "Thu 2026-02-26 00:00:00"]
        );
        // Last Monday of May.
        assert_eq!(
            next("Mon *-05~07/1", "2025-01-01 00:00:00", 2),
            ["Mon 2025-05-26 00:00:00", "Mon 2026-05-25 00:00:00"]
        );
        // The last seven days of each month, every other one.
        assert_eq!(
            next("*-*~07/2 12:00", "2025-04-01 00:00:00", 5),
            [
                "Thu 2025-04-24 12:00:00",
                "Sat 2025-04-26 12:00:00",
                "Mon 2025-04-28 12:00:00",
                "Wed 2025-04-30 12:00:00",
                "Sun 2025-05-25 12:00:00"
            ]
        );
        assert_eq!(
            next("*-*~01..02 12:00", "2025-04-01 00:00:00", 3),
            [
                "Tue 2025-04-29 12:00:00",
                "Wed 2025-04-30 12:00:00",
                "Fri 2025-05-30 12:00:00"
            ]
        );
        // Never: no February has 30 days.
        let ev = CalendarEvent::parse("*-02-30").unwrap();
        assert_eq!(ev.next_after(&utc("2025-01-01 00:00:00")), None);
    }

    #[test]
    fn year_rollover_and_fixed_years() {
        assert_eq!(
            next("*-12-31 23:59:59", "2025-12-31 23:59:59", 1),
            ["Thu 2026-12-31 23:59:59"]
        );
        assert_eq!(
            next("daily", "2025-12-31 23:59:59", 2),
            ["Thu 2026-01-01 00:00:00", "Fri 2026-01-02 00:00:00"]
        );
        assert_eq!(
            next("*:0/30", "2025-12-31 23:45:00", 2),
            ["Thu 2026-01-01 00:00:00", "Thu 2026-01-01 00:30:00"]
        );
        assert_eq!(
            next("2026,2028-01-01", "2025-06-01 00:00:00", 3),
            ["Thu 2026-01-01 00:00:00", "Sat 2028-01-01 00:00:00"]
        );
        assert_eq!(
            next("2020-01-01", "2025-06-01 00:00:00", 1),
            Vec::<String>::new()
        );
        assert_eq!(
            next("2199-12-31 23:59:59", "2199-12-31 23:59:58", 2),
            ["Tue 2199-12-31 23:59:59"]
        );
    }

    #[test]
    fn utc_suffix_elapses_in_utc() {
        let ev = CalendarEvent::parse("12:00 UTC").unwrap();
        let after = at(Berlin, "2025-06-15 00:00:00");
        let n = ev.next_n(&after, 2);
        assert_eq!(
            fmt(&n),
            [
                "Sun 2025-06-15 14:00:00 CEST",
                "Mon 2025-06-16 14:00:00 CEST"
            ]
        );
    }

    #[test]
    fn dst_spring_forward_berlin_moves_to_the_gap_end() {
        // 2025-03-30: 02:00 CET jumps to 03:00 CEST.
        let ev = CalendarEvent::parse("02:30").unwrap();
        let n = ev.next_n(&at(Berlin, "2025-03-28 12:00:00"), 4);
        assert_eq!(
            fmt(&n),
            [
                "Sat 2025-03-29 02:30:00 CET",
                "Sun 2025-03-30 03:00:00 CEST",
                "Mon 2025-03-31 02:30:00 CEST",
                "Tue 2025-04-01 02:30:00 CEST"
            ]
        );
        // Every quarter hour: the gap's four times fire once, at 03:00.
        let ev = CalendarEvent::parse("*:0/15").unwrap();
        let n = ev.next_n(&at(Berlin, "2025-03-30 01:30:00"), 4);
        assert_eq!(
            fmt(&n),
            [
                "Sun 2025-03-30 01:45:00 CET",
                "Sun 2025-03-30 03:00:00 CEST",
                "Sun 2025-03-30 03:15:00 CEST",
                "Sun 2025-03-30 03:30:00 CEST"
            ]
        );
        // Exactly at the gap start.
        let ev = CalendarEvent::parse("02:00").unwrap();
        let n = ev.next_n(&at(Berlin, "2025-03-30 01:59:59"), 1);
        assert_eq!(fmt(&n), ["Sun 2025-03-30 03:00:00 CEST"]);
        // Hourly: 02:00 does not exist, 03:00 fires once.
        let ev = CalendarEvent::parse("hourly").unwrap();
        let n = ev.next_n(&at(Berlin, "2025-03-30 00:30:00"), 3);
        assert_eq!(
            fmt(&n),
            [
                "Sun 2025-03-30 01:00:00 CET",
                "Sun 2025-03-30 03:00:00 CEST",
                "Sun 2025-03-30 04:00:00 CEST"
            ]
        );
    }

    #[test]
    fn dst_fall_back_berlin_fires_once() {
        // 2025-10-26: 03:00 CEST falls back to 02:00 CET.
        let ev = CalendarEvent::parse("02:30").unwrap();
        let n = ev.next_n(&at(Berlin, "2025-10-25 12:00:00"), 3);
        assert_eq!(
            fmt(&n),
            [
                "Sun 2025-10-26 02:30:00 CEST",
                "Mon 2025-10-27 02:30:00 CET",
                "Tue 2025-10-28 02:30:00 CET"
            ]
        );
        let ev = CalendarEvent::parse("*:0/30").unwrap();
        let n = ev.next_n(&at(Berlin, "2025-10-26 01:45:00"), 4);
        assert_eq!(
            fmt(&n),
            [
                "Sun 2025-10-26 02:00:00 CEST",
                "Sun 2025-10-26 02:30:00 CEST",
                "Sun 2025-10-26 03:00:00 CET",
                "Sun 2025-10-26 03:30:00 CET"
            ]
        );
        // Starting inside the repeated hour (second pass): 02:30 already ran.
        let second_pass = Berlin
            .from_local_datetime(
                &NaiveDateTime::parse_from_str("2025-10-26 02:10:00", "%Y-%m-%d %H:%M:%S").unwrap(),
            )
            .latest()
            .unwrap();
        let ev = CalendarEvent::parse("02:30").unwrap();
        assert_eq!(
            fmt(&ev.next_n(&second_pass, 1)),
            ["Mon 2025-10-27 02:30:00 CET"]
        );
    }

    #[test]
    fn dst_new_york() {
        // 2025-03-09: 02:00 EST jumps to 03:00 EDT.
        let ev = CalendarEvent::parse("mon..sun 02:15").unwrap();
        let n = ev.next_n(&at(New_York, "2025-03-08 12:00:00"), 3);
        assert_eq!(
            fmt(&n),
            [
                "Sun 2025-03-09 03:00:00 EDT",
                "Mon 2025-03-10 02:15:00 EDT",
                "Tue 2025-03-11 02:15:00 EDT"
            ]
        );
        // 2025-11-02: 02:00 EDT falls back to 01:00 EST.
        let ev = CalendarEvent::parse("01:30").unwrap();
        let n = ev.next_n(&at(New_York, "2025-11-01 12:00:00"), 2);
        assert_eq!(
            fmt(&n),
            ["Sun 2025-11-02 01:30:00 EDT", "Mon 2025-11-03 01:30:00 EST"]
        );
        let ev = CalendarEvent::parse("hourly").unwrap();
        let n = ev.next_n(&at(New_York, "2025-11-02 00:30:00"), 3);
        assert_eq!(
            fmt(&n),
            [
                "Sun 2025-11-02 01:00:00 EDT",
                "Sun 2025-11-02 02:00:00 EST",
                "Sun 2025-11-02 03:00:00 EST"
            ]
        );
        // Results are strictly increasing instants across both changes.
        let ev = CalendarEvent::parse("*:*:0/20").unwrap();
        for start in ["2025-03-09 01:00:00", "2025-11-02 00:30:00"] {
            let n = ev.next_n(&at(New_York, start), 600);
            assert_eq!(n.len(), 600);
            assert!(n.windows(2).all(|w| w[0] < w[1]), "{start}");
        }
    }

    #[test]
    fn local_times_resolve_around_transitions() {
        let n = |s: &str| NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S").unwrap();
        let f = |r: LocalResult<DateTime<Tz>>| match r {
            LocalResult::None => vec![],
            LocalResult::Single(a) => fmt(&[a]),
            LocalResult::Ambiguous(a, b) => fmt(&[a, b]),
        };
        assert_eq!(
            f(resolve(&Berlin, n("2025-03-30 02:30:00"))),
            Vec::<String>::new()
        );
        assert_eq!(
            f(resolve(&Berlin, n("2025-03-30 03:00:00"))),
            ["Sun 2025-03-30 03:00:00 CEST"]
        );
        assert_eq!(
            f(resolve(&Berlin, n("2025-10-26 02:00:00"))),
            [
                "Sun 2025-10-26 02:00:00 CEST",
                "Sun 2025-10-26 02:00:00 CET"
            ]
        );
        assert_eq!(
            f(resolve(&Berlin, n("2025-10-26 03:00:00"))),
            ["Sun 2025-10-26 03:00:00 CET"]
        );
        assert_eq!(
            f(resolve(&New_York, n("2025-11-02 02:00:00"))),
            ["Sun 2025-11-02 02:00:00 EST"]
        );
        assert_eq!(
            f(resolve(&Berlin, n("2025-06-15 12:00:00"))),
            ["Sun 2025-06-15 12:00:00 CEST"]
        );
    }

    #[test]
    fn half_hour_dst_lord_howe() {
        // 2025-10-05: 02:00 +10:30 jumps to 02:30 +11:00.
        let tz = chrono_tz::Australia::Lord_Howe;
        let ev = CalendarEvent::parse("02:15").unwrap();
        let n = ev.next_n(&at(tz, "2025-10-04 12:00:00"), 3);
        let s: Vec<String> = n.iter().map(|t| t.to_rfc3339()).collect();
        assert_eq!(
            s,
            [
                "2025-10-05T02:30:00+11:00",
                "2025-10-06T02:15:00+11:00",
                "2025-10-07T02:15:00+11:00"
            ]
        );
    }

    #[test]
    fn intervals_stay_compatible() {
        let every = |s: &str| match Schedule::parse(s).unwrap().kind() {
            Kind::Every(d) => d.as_secs(),
            Kind::Calendar(ev) => panic!("{s:?} parsed as calendar event {ev}"),
        };
        assert_eq!(every("every 15m"), 900);
        assert_eq!(every("every 2h"), 7200);
        assert_eq!(every("every 1d"), 86400);
        assert_eq!(every("every 30s"), 30);
        assert_eq!(every("every15m"), 900);
        assert_eq!(every("every 15 m"), 900);
        assert_eq!(every("2s"), 2);
        assert_eq!(every("45"), 45);
        assert_eq!(every("Every 5M"), 300);
        for bad in [
            "every 0s",
            "0m",
            "every",
            "every 5w",
            "every x",
            "every 99999999999999999d",
        ] {
            let e = Schedule::parse(bad).unwrap_err().to_string();
            assert!(e.contains(bad), "{bad}: {e}");
        }
        // The old names are calendar events now.
        for (s, n) in [
            ("hourly", "*-*-* *:00:00"),
            ("daily", "*-*-* 00:00:00"),
            ("weekly", "Mon *-*-* 00:00:00"),
            ("mon..fri 02:00", "Mon..Fri *-*-* 02:00:00"),
            ("2:00", "*-*-* 02:00:00"),
            ("2025-01-01", "2025-01-01 00:00:00"),
        ] {
            assert_eq!(Schedule::parse(s).unwrap().to_string(), n);
        }
        assert_eq!(
            Schedule::parse("every 90m").unwrap().to_string(),
            "every 1h 30m"
        );
        let t = utc("2025-06-15 10:00:00");
        let s = Schedule::parse("every 15m").unwrap();
        assert_eq!(
            fmt(&s.next_n(&t, 2)),
            ["Sun 2025-06-15 10:15:00 UTC", "Sun 2025-06-15 10:30:00 UTC"]
        );
    }

    #[test]
    fn schedule_deserializes_from_toml() {
        #[derive(serde::Deserialize)]
        struct P {
            schedule: Schedule,
        }
        let p: P = toml::from_str("schedule = \"mon..fri 02:00\"").unwrap();
        assert_eq!(p.schedule.to_string(), "Mon..Fri *-*-* 02:00:00");
        let e = toml::from_str::<P>("schedule = \"25:00\"").err().unwrap();
        assert!(e.to_string().contains("hour 25 is out of range"), "{e}");
    }

    #[test]
    fn spread_is_stable_bounded_and_spread() {
        let max = Duration::from_secs(3600);
        let a = spread_offset("host-a.example", max);
        assert_eq!(a, spread_offset("host-a.example", max));
        assert!(a < max);
        // Known value: changing the hash would move every host's backups.
        assert_eq!(spread_offset("pve1", max), spread_offset("pve1", max));
        assert_eq!(spread_offset("x", Duration::ZERO), Duration::ZERO);
        assert_eq!(
            spread_offset("x", Duration::from_millis(999)),
            Duration::ZERO
        );
        let offs: std::collections::BTreeSet<u64> = (0..100)
            .map(|i| spread_offset(&format!("node{i:02}"), max).as_secs())
            .collect();
        assert!(offs.len() > 95, "{} distinct offsets of 100", offs.len());
        // Spread over the whole range, not clustered.
        let quarters: std::collections::BTreeSet<u64> = offs.iter().map(|o| o / 900).collect();
        assert_eq!(quarters.len(), 4);
    }

    #[test]
    fn schedule_with_offset_shifts_calendar_elapses() {
        let s = Schedule::parse("daily")
            .unwrap()
            .with_offset(Duration::from_secs(17 * 60 + 5));
        assert_eq!(
            fmt(&s.next_n(&utc("2025-06-15 00:10:00"), 3)),
            [
                "Sun 2025-06-15 00:17:05 UTC",
                "Mon 2025-06-16 00:17:05 UTC",
                "Tue 2025-06-17 00:17:05 UTC"
            ]
        );
        assert_eq!(s.to_string(), "*-*-* 00:00:00 (+17m 5s)");
        let sp = Schedule::parse("hourly")
            .unwrap()
            .with_spread("pve1", Duration::from_secs(600));
        let off = spread_offset("pve1", Duration::from_secs(600));
        assert_eq!(sp.offset(), off);
        let n = sp.next_after(&utc("2025-06-15 10:00:00")).unwrap();
        assert_eq!(n.timestamp() % 3600, off.as_secs() as i64);
    }

    #[test]
    fn missed_runs() {
        let s = Schedule::parse("02:00").unwrap();
        let last = utc("2025-06-14 02:00:00");
        // Next due 2025-06-15 02:00.
        assert!(!s.missed(Some(&last), &utc("2025-06-15 01:59:59")));
        assert!(s.missed(Some(&last), &utc("2025-06-15 02:00:00")));
        assert!(s.missed(Some(&last), &utc("2025-06-20 12:00:00")));
        assert!(!s.missed(None, &utc("2025-06-20 12:00:00")));
        let e = Schedule::parse("every 6h").unwrap();
        assert!(!e.missed(Some(&last), &utc("2025-06-14 07:59:59")));
        assert!(e.missed(Some(&last), &utc("2025-06-14 08:00:00")));
        // A one-off in the past that already ran: nothing more to miss.
        let once = Schedule::parse("2025-06-14 02:00").unwrap();
        assert!(!once.missed(Some(&last), &utc("2030-01-01 00:00:00")));
    }

    #[test]
    fn periods() {
        let t = utc("2025-06-15 10:00:00");
        let p = |s: &str| Schedule::parse(s).unwrap().period(&t).map(|d| d.as_secs());
        assert_eq!(p("every 15m"), Some(900));
        assert_eq!(p("*:0/15"), Some(900));
        assert_eq!(p("daily"), Some(86400));
        assert_eq!(p("mon..fri 02:00"), Some(3 * 86400));
        assert_eq!(p("2020-01-01"), None);
    }
}
