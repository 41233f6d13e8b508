//! The streak rule, written once: one mail when a (vm, policy) starts
//! failing, none while it keeps failing, one when it recovers; one mail per
//! silence (no success for twice the policy's period).

use std::path::Path;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{Error, Mail};
use crate::statefile::StateFile;

/// What the notifier remembers per (vm, policy).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct JobState {
    pub vm: String,
    pub policy: String,
    /// Set while failing: when the streak began.
    #[serde(default)]
    pub failing_since: Option<DateTime<Utc>>,
    /// Failures in the current streak.
    #[serde(default)]
    pub failures: u32,
    #[serde(default)]
    pub last_error: Option<String>,
    #[serde(default)]
    pub last_ok: Option<DateTime<Utc>>,
    /// When the notifier first heard of the job: silence counts from here
    /// until the first success.
    #[serde(default)]
    pub first_seen: Option<DateTime<Utc>>,
    /// A silence mail went out and no success came since.
    #[serde(default)]
    pub silence_reported: bool,
}

/// Every job's state; saved as JSON after each change.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct NotifierState {
    pub jobs: Vec<JobState>,
}

impl NotifierState {
    /// Reads the state file; a missing one is a fresh start.
    pub fn load(path: &Path) -> Result<NotifierState, Error> {
        Ok(StateFile::new(path).load()?.unwrap_or_default())
    }

    /// Writes the state file atomically.
    pub fn save(&self, path: &Path) -> Result<(), Error> {
        Ok(StateFile::new(path).save(self)?)
    }

    pub fn job(&self, vm: &str, policy: &str) -> Option<&JobState> {
        self.jobs.iter().find(|j| j.vm == vm && j.policy == policy)
    }

    fn job_mut(&mut self, vm: &str, policy: &str, now: DateTime<Utc>) -> &mut JobState {
        let i = match self
            .jobs
            .iter()
            .position(|j| j.vm == vm && j.policy == policy)
        {
            Some(i) => i,
            None => {
                self.jobs.push(JobState {
                    vm: vm.to_string(),
                    policy: policy.to_string(),
                    first_seen: Some(now),
                    ..JobState::default()
                });
                self.jobs.len() - 1
            }
        };
        &mut self.jobs[i]
    }
}

/// Which job an event is about, and whom to tell.
#[derive(Clone, Copy, Debug)]
pub struct Job<'a> {
    pub task: Task,
    pub vm: &'a str,
    pub policy: &'a str,
    pub repository: &'a str,
    /// The policy's `contacts`; none: state is still tracked, no mail.
    pub contacts: &'a [String],
}

/// What kind of job fails and recovers: the words of its mails.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Task {
    /// A (vm, policy) backup, with the prune after it.
    #[default]
    Backup,
    /// A repository's garbage collection (`vm` is empty).
    Gc,
    /// A VM without a policy on a host that requires one.
    Protection,
    /// A sync job (`policy` is `sync:NAME`, `repository` its destination).
    Sync,
    /// A VM's restore drill (`policy` is `drill:POLICY`).
    Drill,
}

impl Job<'_> {
    /// The VM and policy lines of a mail (a GC has neither).
    fn who(&self) -> String {
        match self.task {
            Task::Gc | Task::Sync => String::new(),
            _ => format!(
                "VM:         {}\nPolicy:     {}\n",
                self.vm,
                job_name(self.policy)
            ),
        }
    }

    /// What failed, as the mail's first sentence, and its subject.
    fn failed(&self, host: &str) -> (String, String) {
        let (vm, policy, repo) = (self.vm, self.policy, self.repository);
        match self.task {
            Task::Backup => (
                format!("The backup of VM {vm} under policy {policy} failed."),
                format!("bulwark: backup of {vm}/{policy} failed on {host}"),
            ),
            Task::Gc => (
                format!("The garbage collection of repository {repo} failed."),
                format!("bulwark: garbage collection of {repo} failed on {host}"),
            ),
            Task::Sync => (
                format!(
                    "The sync job {} into repository {repo} failed.",
                    job_name(policy)
                ),
                format!("bulwark: sync {} failed on {host}", job_name(policy)),
            ),
            Task::Drill => (
                format!(
                    "The restore drill of VM {vm} failed: its latest snapshot did not boot \
                     and pass its checks (policy {}).",
                    job_name(policy)
                ),
                format!("bulwark: restore drill of {vm} failed on {host}"),
            ),
            Task::Protection => (
                format!(
                    "VM {vm} names no backup policy of this host, and the host requires \
                     every VM to be protected ([enforce] require_protection)."
                ),
                format!("bulwark: VM {vm} on {host} is not protected"),
            ),
        }
    }

    /// What recovered, as the mail's first sentence, and its subject.
    fn recovered(&self, host: &str) -> (String, String) {
        let (vm, policy, repo) = (self.vm, self.policy, self.repository);
        match self.task {
            Task::Backup => (
                format!("The backup of VM {vm} under policy {policy} succeeded again."),
                format!("bulwark: backup of {vm}/{policy} recovered on {host}"),
            ),
            Task::Gc => (
                format!("The garbage collection of repository {repo} succeeded again."),
                format!("bulwark: garbage collection of {repo} recovered on {host}"),
            ),
            Task::Sync => (
                format!(
                    "The sync job {} into repository {repo} succeeded again.",
                    job_name(policy)
                ),
                format!("bulwark: sync {} recovered on {host}", job_name(policy)),
            ),
            Task::Drill => (
                format!("The restore drill of VM {vm} passed again."),
                format!("bulwark: restore drill of {vm} passed again on {host}"),
            ),
            Task::Protection => (
                format!("VM {vm} is protected now."),
                format!("bulwark: VM {vm} on {host} is protected now"),
            ),
        }
    }
}

/// A sync job's or drill's name from its mail key (`sync:NAME`,
/// `drill:POLICY`).
fn job_name(policy: &str) -> &str {
    policy
        .strip_prefix("sync:")
        .or_else(|| policy.strip_prefix("drill:"))
        .unwrap_or(policy)
}

/// Decides which events deserve a mail; sends nothing itself.
#[derive(Clone, Debug)]
pub struct Notifier {
    host: String,
    state: NotifierState,
}

fn fmt_time(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

fn fmt_duration(d: chrono::Duration) -> String {
    let secs = d.num_seconds().max(0) as u64;
    // Whole minutes are precise enough for "since when".
    let rounded = if secs >= 60 { secs - secs % 60 } else { secs };
    humantime::format_duration(Duration::from_secs(rounded)).to_string()
}

/// The lines every failure and recovery mail starts with.
fn head(host: &str, job: &Job<'_>, at: DateTime<Utc>) -> String {
    format!(
        "Host:       {host}\n{}Repository: {}\nTime:       {}\n",
        job.who(),
        job.repository,
        fmt_time(at)
    )
}

fn indent(s: &str) -> String {
    s.replace('\n', "\n  ")
}

fn mail(job: &Job<'_>, subject: String, body: String) -> Option<Mail> {
    if job.contacts.is_empty() {
        return None;
    }
    Some(Mail {
        to: job.contacts.to_vec(),
        subject,
        body,
    })
}

impl Notifier {
    pub fn new(host: &str, state: NotifierState) -> Notifier {
        Notifier {
            host: host.to_string(),
            state,
        }
    }

    pub fn state(&self) -> &NotifierState {
        &self.state
    }

    /// A failed backup: a mail only if it starts a streak. `log` is the
    /// job's last log lines, oldest first.
    pub fn failure(
        &mut self,
        job: &Job<'_>,
        error: &str,
        log: &[String],
        at: DateTime<Utc>,
    ) -> Option<Mail> {
        let st = self.state.job_mut(job.vm, job.policy, at);
        st.failures = st.failures.saturating_add(1);
        st.last_error = Some(error.to_string());
        if st.failing_since.is_some() {
            return None;
        }
        st.failing_since = Some(at);
        let (what, subject) = job.failed(&self.host);
        let mut body = format!(
            "{what}\n\n{head}Last good:  {last_ok}\n\nError:\n  {error}\n",
            head = head(&self.host, job, at),
            last_ok = st.last_ok.map_or("never".to_string(), fmt_time),
            error = indent(error),
        );
        if !log.is_empty() {
            body.push_str("\nLast log lines:\n");
            for l in log {
                body.push_str("  ");
                body.push_str(l);
                body.push('\n');
            }
        }
        body.push_str(
            "\nFurther failures send no mail; you will get one when it succeeds again.\n",
        );
        mail(job, subject, body)
    }

    /// A successful backup: a mail only if it ends a failure streak or a
    /// reported silence.
    pub fn success(&mut self, job: &Job<'_>, at: DateTime<Utc>) -> Option<Mail> {
        let st = self.state.job_mut(job.vm, job.policy, at);
        let failing_since = st.failing_since.take();
        let failures = std::mem::take(&mut st.failures);
        let last_error = st.last_error.take();
        let was_silent = std::mem::take(&mut st.silence_reported);
        let previous_ok = st.last_ok.replace(at);
        if failing_since.is_none() && !was_silent {
            return None;
        }
        let (what, subject) = job.recovered(&self.host);
        let mut body = format!(
            "{what}\n\n{head}Previous good backup: {prev}\n",
            head = head(&self.host, job, at),
            prev = previous_ok.map_or("never".to_string(), fmt_time),
        );
        if let Some(since) = failing_since {
            body.push_str(&format!(
                "Failing since: {} ({} failed attempts over {})\n",
                fmt_time(since),
                failures,
                fmt_duration(at - since)
            ));
        }
        if let Some(e) = last_error {
            body.push_str(&format!("Last error:\n  {}\n", indent(&e)));
        }
        mail(job, subject, body)
    }

    /// Silence: no success for at least twice `period` (counted from the
    /// first time the job was seen if it never succeeded). One mail until
    /// the next success.
    pub fn check_silence(
        &mut self,
        job: &Job<'_>,
        period: Duration,
        now: DateTime<Utc>,
    ) -> Option<Mail> {
        let st = self.state.job_mut(job.vm, job.policy, now);
        if st.silence_reported {
            return None;
        }
        let since = st.last_ok.or(st.first_seen)?;
        let limit = chrono::Duration::from_std(period.saturating_mul(2)).ok()?;
        let silent = now - since;
        if silent < limit {
            return None;
        }
        st.silence_reported = true;
        let mut body = format!(
            "No backup of VM {vm} under policy {policy} has succeeded for {silent} \
             (the policy runs about every {period}).\n\n\
             Host:       {host}\n\
             {who}\
             Repository: {repo}\n\
             Last good:  {last_ok}\n",
            vm = job.vm,
            policy = job.policy,
            who = job.who(),
            repo = job.repository,
            silent = fmt_duration(silent),
            period = humantime::format_duration(period),
            host = self.host,
            last_ok = st.last_ok.map_or("never".to_string(), fmt_time),
        );
        if let Some(e) = &st.last_error {
            body.push_str(&format!("Last error:\n  {}\n", indent(e)));
        }
        body.push_str("\nIs the agent running and the schedule right?\n");
        let subject = format!(
            "bulwark: no backup of {}/{} on {} for {}",
            job.vm,
            job.policy,
            self.host,
            fmt_duration(silent)
        );
        mail(job, subject, body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    const ERR: &str = "disk vda: NBD connection refused";

    fn t(h: i64) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2025, 6, 1, 0, 0, 0).unwrap() + chrono::Duration::hours(h)
    }

    fn contacts() -> Vec<String> {
        vec!["ops@example.com".to_string()]
    }

    fn job<'a>(vm: &'a str, contacts: &'a [String]) -> Job<'a> {
        Job {
            task: Task::Backup,
            vm,
            policy: "nightly",
            repository: "main",
            contacts,
        }
    }

    #[test]
    fn one_mail_per_failure_streak_and_one_recovery() {
        let c = contacts();
        let web = job("web01", &c);
        let mut n = Notifier::new("pve1", NotifierState::default());
        let log = vec!["starting backup".to_string(), "vda: 12% done".to_string()];
        let m = n.failure(&web, ERR, &log, t(0)).unwrap();
        assert_eq!(m.to, ["ops@example.com"]);
        assert_eq!(m.subject, "bulwark: backup of web01/nightly failed on pve1");
        for s in [
            "Host:       pve1",
            "VM:         web01",
            "Policy:     nightly",
            "Repository: main",
            "disk vda: NBD connection refused",
            "  vda: 12% done",
            "Last good:  never",
        ] {
            assert!(m.body.contains(s), "{s:?} missing in:\n{}", m.body);
        }
        assert_eq!(n.failure(&web, ERR, &[], t(1)), None);
        assert_eq!(n.failure(&web, "other error", &[], t(2)), None);
        // Another VM has its own streak.
        assert!(n.failure(&job("db01", &c), ERR, &[], t(2)).is_some());
        let r = n.success(&web, t(3)).unwrap();
        assert_eq!(
            r.subject,
            "bulwark: backup of web01/nightly recovered on pve1"
        );
        assert!(r.body.contains("3 failed attempts over 3h"), "{}", r.body);
        assert!(r.body.contains("Last error:\n  other error"), "{}", r.body);
        // Success after success: nothing.
        assert_eq!(n.success(&web, t(4)), None);
        assert_eq!(n.success(&job("new", &c), t(4)), None);
        // A new streak mails again and names the last good backup.
        let m = n.failure(&web, ERR, &[], t(5)).unwrap();
        assert!(
            m.body.contains("Last good:  2025-06-01 04:00:00 UTC"),
            "{}",
            m.body
        );
        assert!(!m.body.contains("Last log lines"));
    }

    #[test]
    fn policies_of_one_vm_are_separate() {
        let c = contacts();
        let mut n = Notifier::new("h", NotifierState::default());
        let mut j = job("web01", &c);
        assert!(n.failure(&j, ERR, &[], t(0)).is_some());
        j.policy = "hourly";
        assert!(n.failure(&j, ERR, &[], t(0)).is_some());
        assert!(n.failure(&j, ERR, &[], t(1)).is_none());
    }

    #[test]
    fn no_contacts_no_mail_but_the_streak_counts() {
        let none: Vec<String> = vec![];
        let c = contacts();
        let mut n = Notifier::new("h", NotifierState::default());
        assert_eq!(n.failure(&job("web01", &none), ERR, &[], t(0)), None);
        // Contacts added later (config reload) mid-streak: still no repeat.
        assert_eq!(n.failure(&job("web01", &c), ERR, &[], t(1)), None);
        assert!(n.success(&job("web01", &c), t(2)).is_some());
    }

    #[test]
    fn state_survives_a_restart() {
        let c = contacts();
        let web = job("web01", &c);
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("notify.json");
        let mut n = Notifier::new("pve1", NotifierState::load(&p).unwrap());
        assert!(n.failure(&web, ERR, &[], t(0)).is_some());
        n.state().save(&p).unwrap();
        let mut n = Notifier::new("pve1", NotifierState::load(&p).unwrap());
        assert_eq!(n.failure(&web, ERR, &[], t(1)), None);
        assert!(n.success(&web, t(2)).is_some());
        assert_eq!(n.state().job("web01", "nightly").unwrap().failures, 0);
        std::fs::write(&p, b"{not json").unwrap();
        let e = NotifierState::load(&p).unwrap_err().to_string();
        assert!(e.contains("notify.json"), "{e}");
    }

    #[test]
    fn silence_mails_once_per_streak() {
        let c = contacts();
        let web = job("web01", &c);
        let day = Duration::from_secs(86400);
        let mut n = Notifier::new("pve1", NotifierState::default());
        // First sighting starts the clock.
        assert_eq!(n.check_silence(&web, day, t(0)), None);
        assert_eq!(n.check_silence(&web, day, t(47)), None);
        let m = n.check_silence(&web, day, t(48)).unwrap();
        assert_eq!(
            m.subject,
            "bulwark: no backup of web01/nightly on pve1 for 2days"
        );
        assert!(m.body.contains("Last good:  never"), "{}", m.body);
        assert_eq!(n.check_silence(&web, day, t(100)), None);
        // Success ends the silence, with a recovery mail.
        let r = n.success(&web, t(101)).unwrap();
        assert!(r.subject.contains("recovered"));
        assert_eq!(n.check_silence(&web, day, t(148)), None);
        let m = n.check_silence(&web, day, t(149)).unwrap();
        assert!(
            m.body.contains("Last good:  2025-06-05 05:00:00 UTC"),
            "{}",
            m.body
        );
        assert_eq!(n.check_silence(&web, day, t(200)), None);
    }

    #[test]
    fn silence_and_failure_streaks_are_independent() {
        let c = contacts();
        let web = job("web01", &c);
        let day = Duration::from_secs(86400);
        let mut n = Notifier::new("pve1", NotifierState::default());
        assert!(n.success(&web, t(0)).is_none());
        assert!(n.failure(&web, ERR, &[], t(24)).is_some());
        assert!(n.failure(&web, ERR, &[], t(48)).is_none());
        let m = n.check_silence(&web, day, t(48)).unwrap();
        assert!(m.body.contains("NBD connection refused"), "{}", m.body);
        // One recovery mail ends both.
        assert!(n.success(&web, t(50)).is_some());
        assert!(n.success(&web, t(51)).is_none());
    }

    #[test]
    fn gc_and_protection_mails_say_what_they_are_about() {
        let c = contacts();
        let gc = Job {
            task: Task::Gc,
            vm: "",
            policy: "gc:main",
            repository: "main",
            contacts: &c,
        };
        let mut n = Notifier::new("pve1", NotifierState::default());
        let m = n.failure(&gc, "lock held", &[], t(0)).unwrap();
        assert_eq!(
            m.subject,
            "bulwark: garbage collection of main failed on pve1"
        );
        assert!(m
            .body
            .starts_with("The garbage collection of repository main failed."));
        assert!(!m.body.contains("VM:"), "{}", m.body);
        let m = n.success(&gc, t(1)).unwrap();
        assert_eq!(
            m.subject,
            "bulwark: garbage collection of main recovered on pve1"
        );
        let bare = Job {
            task: Task::Protection,
            vm: "web01",
            policy: "(protection)",
            repository: "-",
            contacts: &c,
        };
        let m = n.failure(&bare, "no policy", &[], t(0)).unwrap();
        assert_eq!(m.subject, "bulwark: VM web01 on pve1 is not protected");
        assert!(n.failure(&bare, "no policy", &[], t(1)).is_none());
        let m = n.success(&bare, t(2)).unwrap();
        assert_eq!(m.subject, "bulwark: VM web01 on pve1 is protected now");
    }

    #[test]
    fn a_failing_sync_job_mails_once_with_its_lag_and_once_on_recovery() {
        let c = contacts();
        let sync = Job {
            task: Task::Sync,
            vm: "",
            policy: "sync:offsite",
            repository: "offsite",
            contacts: &c,
        };
        let mut n = Notifier::new("backup1", NotifierState::default());
        let why = "endpoint unreachable (offsite is 3days behind main)";
        let m = n.failure(&sync, why, &[], t(0)).unwrap();
        assert_eq!(m.subject, "bulwark: sync offsite failed on backup1");
        assert!(m
            .body
            .starts_with("The sync job offsite into repository offsite failed."));
        assert!(m.body.contains("3days behind main"), "{}", m.body);
        assert!(!m.body.contains("VM:"), "{}", m.body);
        assert!(n.failure(&sync, why, &[], t(1)).is_none(), "one per streak");
        let m = n.success(&sync, t(2)).unwrap();
        assert_eq!(m.subject, "bulwark: sync offsite recovered on backup1");
    }
}
