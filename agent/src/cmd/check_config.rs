//! `bulwark agent check-config [FILE]`: what the agent would make of a
//! config, before it runs it. The file is parsed and validated as the agent
//! loads it; then each repository is opened (the steps of `repo
//! check-target`), the SMTP server is greeted as a mail would be (TLS,
//! AUTH, nothing sent), libvirt is asked which domains name which policy,
//! and what would run on this host in the next 24 hours is listed.
//! Exit code 0 only if every check passed.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Result;
use chrono::{DateTime, Local};
use serde::Serialize;

use crate::calendar::Schedule;
use crate::config::{self, Config};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The config to check.
    #[arg(env = "BULWARK_CONFIG", default_value = config::DEFAULT_PATH)]
    pub file: PathBuf,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs listed per schedule at most (a calendar event every second would
/// otherwise list 86400).
const MAX_RUNS: usize = 1440;

/// One check: what, its name, and the outcome.
#[derive(Debug, Serialize)]
struct Check {
    check: &'static str,
    name: String,
    ok: bool,
    /// What was found (ok) or what is wrong.
    detail: String,
}

impl Check {
    fn new(check: &'static str, name: &str, r: Result<String, String>) -> Check {
        let ok = r.is_ok();
        Check {
            check,
            name: name.to_string(),
            ok,
            detail: r.unwrap_or_else(|e| e),
        }
    }
}

/// What a schedule would start in the window.
#[derive(Debug, Serialize)]
struct Planned {
    /// `backup` (a policy) or `gc` (a repository).
    job: &'static str,
    name: String,
    repository: String,
    schedule: String,
    /// Why the agent will not run it (`[enforce] allowed_repositories`).
    #[serde(skip_serializing_if = "Option::is_none")]
    refused: Option<String>,
    /// The domains that name the policy (backups; none known without
    /// libvirt).
    #[serde(skip_serializing_if = "Option::is_none")]
    domains: Option<Vec<String>>,
    runs: Vec<DateTime<Local>>,
}

#[derive(Debug, Serialize)]
struct Report {
    config: PathBuf,
    ok: bool,
    checks: Vec<Check>,
    from: DateTime<Local>,
    to: DateTime<Local>,
    host: String,
    /// This host's offset of calendar schedules (`schedule_spread`).
    spread_seconds: u64,
    next_24h: Vec<Planned>,
}

pub fn run(a: Args) -> Result<i32> {
    let cfg = Config::load(&a.file)?;
    let host = crate::daemon::hostname();
    let mut checks = repositories(&cfg);
    checks.extend(smtp(&cfg, &host));
    let (libvirt, domains) = libvirt(&cfg);
    checks.push(libvirt);
    checks.extend(refusals(&cfg));
    let from = Local::now();
    let to = from + chrono::Duration::hours(24);
    let spread = calendar_offset(&cfg, &host)?;
    let report = Report {
        ok: checks.iter().all(|c| c.ok),
        next_24h: plan(&cfg, domains.as_ref(), &host, &from, &to)?,
        config: a.file,
        checks,
        from,
        to,
        host,
        spread_seconds: spread.as_secs(),
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print(&report, &cfg);
    }
    Ok(if report.ok { 0 } else { 1 })
}

/// Each repository opened with its key, as the agent's checks do.
fn repositories(cfg: &Config) -> Vec<Check> {
    cfg.repositories
        .iter()
        .map(|(name, rc)| {
            let r = rc
                .location_as(crate::config::Role::Backup)
                .map_err(|e| ("credentials", format!("{e:#}")))
                .and_then(|l| {
                    crate::target::check(&l, || rc.has_key().then(|| rc.secret()).transpose())
                })
                .map(|()| format!("{}: usable", rc.path))
                .map_err(|(kind, e)| format!("{} ({kind}): {e}", rc.path));
            Check::new("repository", name, r)
        })
        .collect()
}

/// The SMTP server greeted as a mail would be (TLS, AUTH), nothing sent.
fn smtp(cfg: &Config, host: &str) -> Option<Check> {
    let s = cfg.smtp.as_ref()?;
    let server = format!("{}:{}", s.host, s.port());
    let r = crate::mail::SmtpSender::new(s, host)
        .and_then(|sender| sender.check())
        .map(|()| format!("{server} accepted the connection"))
        .map_err(|e| match e {
            // The server is named beside it already.
            crate::mail::Error::Send { reason, .. } => reason,
            e => e.to_string(),
        });
    Some(Check::new("smtp", &server, r))
}

/// Every domain that names a policy, by policy (`None`: libvirt
/// unreachable).
type Domains = BTreeMap<String, Vec<String>>;

fn libvirt(cfg: &Config) -> (Check, Option<Domains>) {
    let uri = &cfg.libvirt_uri;
    match domains_by_policy(uri) {
        Ok((all, by_policy)) => {
            let named: usize = by_policy.values().map(Vec::len).sum();
            let detail = format!("{all} domains, {named} policy assignments");
            (Check::new("libvirt", uri, Ok(detail)), Some(by_policy))
        }
        Err(e) => (Check::new("libvirt", uri, Err(format!("{e:#}"))), None),
    }
}

fn domains_by_policy(uri: &str) -> Result<(usize, Domains)> {
    let lv = crate::libvirt::Libvirt::open(uri)?;
    let doms = lv.domains()?;
    let mut by_policy = Domains::new();
    for d in &doms {
        // One undefined since the listing is no longer the agent's either.
        let Ok(xml) = d.xml(true) else { continue };
        let info = crate::vm::domain::parse(&xml)?;
        for p in info.policies {
            by_policy.entry(p).or_default().push(info.name.clone());
        }
    }
    Ok((doms.len(), by_policy))
}

/// Policies the agent loads but will not run.
fn refusals(cfg: &Config) -> Vec<Check> {
    cfg.policies
        .keys()
        .filter_map(|p| Some(Check::new("policy", p, Err(cfg.refusal(p)?))))
        .collect()
}

/// This host's offset of calendar schedules, as the agent computes it.
fn calendar_offset(cfg: &Config, host: &str) -> Result<std::time::Duration> {
    Ok(crate::calendar::spread_offset(host, cfg.spread()?))
}

/// What each policy and each GC schedule would start between `from` and
/// `to`, the policies shifted by this host's spread as the agent does.
fn plan(
    cfg: &Config,
    domains: Option<&Domains>,
    host: &str,
    from: &DateTime<Local>,
    to: &DateTime<Local>,
) -> Result<Vec<Planned>> {
    let spread = cfg.spread()?;
    let mut out = Vec::new();
    // Each policy's backups, then its drills.
    let jobs = cfg.policies.iter().flat_map(|(name, p)| {
        [("backup", Some(&p.schedule)), ("drill", p.drill.as_ref())]
            .into_iter()
            .filter_map(move |(job, expr)| Some((job, name, p, expr?)))
    });
    for (job, name, p, expr) in jobs {
        let sched = config::schedule(expr)?.with_spread(host, spread);
        out.push(Planned {
            job,
            name: name.clone(),
            repository: p.repository.clone(),
            schedule: sched.to_string(),
            refused: cfg.refusal(name),
            domains: domains.map(|d| d.get(name).cloned().unwrap_or_default()),
            runs: runs(&sched, from, to),
        });
    }
    for (name, h) in &cfg.host {
        let sched = config::schedule(&h.schedule)?.with_spread(host, spread);
        out.push(Planned {
            job: "files",
            name: name.clone(),
            repository: h.repository.clone(),
            schedule: sched.to_string(),
            refused: None,
            domains: None,
            runs: runs(&sched, from, to),
        });
    }
    for (name, rc) in &cfg.repositories {
        let Some(s) = &rc.gc_schedule else { continue };
        let sched = config::schedule(s)?;
        out.push(Planned {
            job: "gc",
            name: name.clone(),
            repository: name.clone(),
            schedule: sched.to_string(),
            refused: None,
            domains: None,
            runs: runs(&sched, from, to),
        });
    }
    Ok(out)
}

/// The runs of `sched` in `(from, to]` (an interval counts from `from`, as
/// if it had run then), at most [`MAX_RUNS`].
fn runs(sched: &Schedule, from: &DateTime<Local>, to: &DateTime<Local>) -> Vec<DateTime<Local>> {
    let mut out: Vec<DateTime<Local>> = Vec::new();
    while out.len() < MAX_RUNS {
        match sched.next_after(out.last().unwrap_or(from)) {
            Some(t) if &t <= to => out.push(t),
            _ => break,
        }
    }
    out
}

fn print(r: &Report, cfg: &Config) {
    println!(
        "{}: {} repositories, {} policies, mail {}",
        r.config.display(),
        cfg.repositories.len(),
        cfg.policies.len(),
        if cfg.smtp.is_some() {
            "on"
        } else {
            "off (no [smtp])"
        }
    );
    for c in &r.checks {
        let verdict = if c.ok { "ok  " } else { "FAIL" };
        println!("{verdict} {:<10} {:<16} {}", c.check, c.name, c.detail);
    }
    println!(
        "\nnext 24 h on {} (calendar schedules shifted by {}):",
        r.host,
        humantime::format_duration(std::time::Duration::from_secs(r.spread_seconds))
    );
    if r.next_24h.is_empty() {
        println!("  nothing: no policies, host file backups or gc_schedule");
    }
    for p in &r.next_24h {
        println!("  {}", planned_line(p));
        if let Some(d) = &p.domains {
            let names = if d.is_empty() {
                "none names it".to_string()
            } else {
                d.join(", ")
            };
            println!("      domains: {names}");
        }
    }
    if r.next_24h.iter().any(|p| p.job == "backup") {
        println!(
            "  (a domain never backed up under a policy, or that missed a run while the agent \
             was down, is backed up once as soon as the agent runs)"
        );
    }
}

/// `backup hourly -> main (hourly): 24 runs: Mon 14:00, Mon 15:00, ...`
fn planned_line(p: &Planned) -> String {
    let what = match p.job {
        "gc" => format!("gc {} ({})", p.name, p.schedule),
        "drill" => format!(
            "restore drill {} <- {} ({})",
            p.name, p.repository, p.schedule
        ),
        "files" => format!(
            "file backup {} -> {} ({})",
            p.name, p.repository, p.schedule
        ),
        _ => format!("backup {} -> {} ({})", p.name, p.repository, p.schedule),
    };
    if let Some(why) = &p.refused {
        return format!("{what}: refused: {why}");
    }
    const SHOWN: usize = 12;
    let mut times: Vec<String> = p
        .runs
        .iter()
        .take(SHOWN)
        .map(|t| t.format("%a %H:%M").to_string())
        .collect();
    if p.runs.len() > SHOWN {
        times.push("...".into());
    }
    let count = match p.runs.len() {
        0 => "no run".to_string(),
        1 => "1 run".to_string(),
        n if n >= MAX_RUNS => format!("{n}+ runs"),
        n => format!("{n} runs"),
    };
    if times.is_empty() {
        format!("{what}: {count}")
    } else {
        format!("{what}: {count}: {}", times.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn runs_stay_inside_the_window() {
        let from = Local.with_ymd_and_hms(2026, 3, 2, 10, 30, 0).unwrap();
        let to = from + chrono::Duration::hours(24);
        let hourly = Schedule::parse("hourly").unwrap();
        let r = runs(&hourly, &from, &to);
        assert_eq!(r.len(), 24);
        assert!(r.iter().all(|t| *t > from && *t <= to));
        let nightly = Schedule::parse("*-*-* 02:00").unwrap();
        assert_eq!(runs(&nightly, &from, &to).len(), 1);
        let every = Schedule::parse("every 15m").unwrap();
        assert_eq!(runs(&every, &from, &to).len(), 96);
        let busy = Schedule::parse("*:*:0/10").unwrap();
        assert_eq!(runs(&busy, &from, &to).len(), MAX_RUNS);
    }
}
