//! A persistent outbox: each queued mail is one JSON file, so mail survives
//! restarts and an unreachable SMTP server delays mail without ever
//! blocking the backup that queued it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{Error, Mail};
use crate::statefile::StateFile;

const SUFFIX: &str = ".mail.json";
const FIRST_RETRY: Duration = Duration::from_secs(30);
const MAX_RETRY: Duration = Duration::from_secs(3600);

/// Delivers one mail; [`super::SmtpSender`] in production, fakes in tests.
pub trait Transport {
    /// `id` is stable across retries (a Message-ID lets readers spot a
    /// mail the server took but did not confirm).
    fn send(&self, id: &str, mail: &Mail) -> Result<(), Error>;
}

/// A mail waiting in the outbox.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub struct Queued {
    pub id: String,
    pub mail: Mail,
    pub queued_at: DateTime<Utc>,
    /// Failed delivery attempts so far.
    pub attempts: u32,
    pub next_attempt: DateTime<Utc>,
    #[serde(default)]
    pub last_error: Option<String>,
}

/// What one [`Outbox::drain`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Drained {
    pub sent: usize,
    /// Tried and failed; retried after their backoff.
    pub failed: usize,
    /// Not due yet.
    pub waiting: usize,
    /// Unreadable files set aside as `*.bad`.
    pub bad: usize,
}

/// The wait after the `attempts`-th failed attempt: 30 s doubling up to 1 h.
pub fn backoff(attempts: u32) -> Duration {
    let shift = attempts.saturating_sub(1).min(16);
    FIRST_RETRY.saturating_mul(1 << shift).min(MAX_RETRY)
}

/// A directory of queued mails.
#[derive(Clone, Debug)]
pub struct Outbox {
    dir: PathBuf,
}

static SEQ: AtomicU64 = AtomicU64::new(0);

impl Outbox {
    /// Opens the outbox, creating the directory.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Outbox, Error> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        Ok(Outbox { dir })
    }

    #[cfg(test)]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}{SUFFIX}"))
    }

    /// Queues a mail for sending now; returns its id. Only writes a file.
    pub fn queue(&self, mail: &Mail) -> Result<String, Error> {
        self.queue_at(mail, Utc::now())
    }

    /// Queues a mail as of `now` (tests pass their own clock).
    pub fn queue_at(&self, mail: &Mail, now: DateTime<Utc>) -> Result<String, Error> {
        // Time first so names sort in queueing order; pid and a counter keep
        // them unique across processes and threads.
        let id = format!(
            "{}-{}-{}",
            now.format("%Y%m%dT%H%M%S%.9fZ"),
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let q = Queued {
            id: id.clone(),
            mail: mail.clone(),
            queued_at: now,
            attempts: 0,
            next_attempt: now,
            last_error: None,
        };
        self.write(&q)?;
        Ok(id)
    }

    fn write(&self, q: &Queued) -> Result<(), Error> {
        Ok(StateFile::new(self.path(&q.id)).save(q)?)
    }

    fn files(&self) -> Result<Vec<PathBuf>, Error> {
        let mut v = Vec::new();
        for e in std::fs::read_dir(&self.dir).map_err(|e| Error::io(&self.dir, e))? {
            let e = e.map_err(|e| Error::io(&self.dir, e))?;
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.ends_with(SUFFIX) && !name.starts_with('.') {
                v.push(e.path());
            }
        }
        v.sort();
        Ok(v)
    }

    /// A queued mail; `None` when another drainer sent it meanwhile.
    fn read(path: &Path) -> Result<Option<Queued>, Error> {
        Ok(StateFile::new(path).load()?)
    }

    /// Every queued mail, oldest first (unreadable files are skipped).
    pub fn pending(&self) -> Result<Vec<Queued>, Error> {
        Ok(self
            .files()?
            .iter()
            .filter_map(|p| Self::read(p).ok().flatten())
            .collect())
    }

    /// When the earliest queued mail is due, if any.
    pub fn next_due(&self) -> Result<Option<DateTime<Utc>>, Error> {
        Ok(self.pending()?.iter().map(|q| q.next_attempt).min())
    }

    /// Tries every mail due at `now`, oldest first: sent ones are removed,
    /// failed ones wait [`backoff`] longer. One mail failing does not stop
    /// the others.
    pub fn drain(&self, transport: &dyn Transport, now: DateTime<Utc>) -> Result<Drained, Error> {
        let mut d = Drained::default();
        for path in self.files()? {
            let mut q = match Self::read(&path) {
                Ok(Some(q)) => q,
                Ok(None) => continue, // another drainer sent it
                Err(e) => {
                    tracing::warn!("outbox: setting aside {e}");
                    let bad = path.with_extension("bad");
                    std::fs::rename(&path, &bad).map_err(|e| Error::io(&path, e))?;
                    d.bad += 1;
                    continue;
                }
            };
            if q.next_attempt > now {
                d.waiting += 1;
                continue;
            }
            match transport.send(&q.id, &q.mail) {
                Ok(()) => {
                    match std::fs::remove_file(&path) {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => return Err(Error::io(&path, e)),
                    }
                    d.sent += 1;
                }
                Err(e) => {
                    q.attempts = q.attempts.saturating_add(1);
                    let wait = chrono::Duration::from_std(backoff(q.attempts))
                        .unwrap_or(chrono::Duration::hours(1));
                    q.next_attempt = now + wait;
                    q.last_error = Some(e.to_string());
                    tracing::warn!(
                        "mail {:?} not sent (attempt {}), retrying at {}: {e}",
                        q.mail.subject,
                        q.attempts,
                        q.next_attempt
                    );
                    self.write(&q)?;
                    d.failed += 1;
                }
            }
        }
        Ok(d)
    }
}

struct Control {
    stop: bool,
    woken: bool,
}

/// Drains an outbox in a background thread: at once when woken, when the
/// earliest mail comes due, and every `poll` for mail queued by others.
pub struct SenderThread {
    ctl: Arc<(Mutex<Control>, Condvar)>,
    handle: Option<JoinHandle<()>>,
}

impl SenderThread {
    pub fn spawn(
        outbox: Outbox,
        transport: Box<dyn Transport + Send>,
        poll: Duration,
    ) -> SenderThread {
        let ctl = Arc::new((
            Mutex::new(Control {
                stop: false,
                woken: false,
            }),
            Condvar::new(),
        ));
        let c = Arc::clone(&ctl);
        let handle = std::thread::Builder::new()
            .name("bulwark-mail".into())
            .spawn(move || sender_loop(&outbox, transport.as_ref(), poll, &c))
            .ok();
        if handle.is_none() {
            tracing::error!("mail: could not start the sender thread; mail stays queued");
        }
        SenderThread { ctl, handle }
    }

    /// Drain now (after queueing a mail).
    pub fn wake(&self) {
        let (m, cv) = &*self.ctl;
        if let Ok(mut c) = m.lock() {
            c.woken = true;
        }
        cv.notify_all();
    }

    /// Stops the thread after the send in progress, if any, finishes.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let (m, cv) = &*self.ctl;
        if let Ok(mut c) = m.lock() {
            c.stop = true;
        }
        cv.notify_all();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Drop for SenderThread {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn sender_loop(
    outbox: &Outbox,
    transport: &dyn Transport,
    poll: Duration,
    ctl: &(Mutex<Control>, Condvar),
) {
    let (m, cv) = ctl;
    loop {
        if let Err(e) = outbox.drain(transport, Utc::now()) {
            tracing::warn!("mail outbox: {e}");
        }
        let wait = match outbox.next_due() {
            Ok(Some(due)) => (due - Utc::now())
                .to_std()
                .unwrap_or(Duration::ZERO)
                .min(poll),
            _ => poll,
        };
        let Ok(mut c) = m.lock() else { return };
        if !c.stop && !c.woken {
            c = match cv.wait_timeout(c, wait.max(Duration::from_millis(10))) {
                Ok((c, _)) => c,
                Err(_) => return,
            };
        }
        if c.stop {
            return;
        }
        c.woken = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use std::cell::RefCell;

    /// Fails while `down`, records what it sent.
    #[derive(Default)]
    struct Fake {
        down: RefCell<bool>,
        sent: RefCell<Vec<(String, Mail)>>,
    }

    impl Transport for Fake {
        fn send(&self, id: &str, mail: &Mail) -> Result<(), Error> {
            if *self.down.borrow() {
                return Err(Error::Send {
                    server: "fake".into(),
                    reason: "connection refused".into(),
                });
            }
            self.sent.borrow_mut().push((id.to_string(), mail.clone()));
            Ok(())
        }
    }

    fn mail(s: &str) -> Mail {
        Mail {
            to: vec!["ops@example.com".into()],
            subject: s.into(),
            body: format!("body of {s}"),
        }
    }

    fn t0() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2025, 6, 1, 12, 0, 0).unwrap()
    }

    #[test]
    fn backoff_doubles_to_an_hour() {
        let s: Vec<u64> = (1..=9).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(s, [30, 60, 120, 240, 480, 960, 1920, 3600, 3600]);
        assert_eq!(backoff(0).as_secs(), 30);
        assert_eq!(backoff(u32::MAX).as_secs(), 3600);
    }

    #[test]
    fn sends_in_order_and_removes() {
        let d = tempfile::tempdir().unwrap();
        let o = Outbox::open(d.path().join("outbox")).unwrap();
        let a = o.queue_at(&mail("a"), t0()).unwrap();
        let b = o.queue_at(&mail("b"), t0()).unwrap();
        assert_ne!(a, b);
        assert_eq!(o.pending().unwrap().len(), 2);
        let f = Fake::default();
        let r = o.drain(&f, t0()).unwrap();
        assert_eq!(
            r,
            Drained {
                sent: 2,
                ..Drained::default()
            }
        );
        let sent = f.sent.borrow();
        assert_eq!(sent[0], (a, mail("a")));
        assert_eq!(sent[1].1, mail("b"));
        assert!(o.pending().unwrap().is_empty());
        assert_eq!(std::fs::read_dir(o.dir()).unwrap().count(), 0);
    }

    #[test]
    fn failed_mail_waits_with_backoff_and_survives_reopen() {
        let d = tempfile::tempdir().unwrap();
        let o = Outbox::open(d.path()).unwrap();
        o.queue_at(&mail("a"), t0()).unwrap();
        let f = Fake::default();
        *f.down.borrow_mut() = true;
        let s = chrono::Duration::seconds;
        assert_eq!(o.drain(&f, t0()).unwrap().failed, 1);
        let q = &o.pending().unwrap()[0];
        assert_eq!(q.attempts, 1);
        assert_eq!(q.next_attempt, t0() + s(30));
        assert!(q
            .last_error
            .as_deref()
            .unwrap()
            .contains("connection refused"));
        // Not due: not tried.
        assert_eq!(o.drain(&f, t0() + s(29)).unwrap().waiting, 1);
        assert_eq!(o.pending().unwrap()[0].attempts, 1);
        assert_eq!(o.drain(&f, t0() + s(30)).unwrap().failed, 1);
        let q = &o.pending().unwrap()[0];
        assert_eq!((q.attempts, q.next_attempt), (2, t0() + s(90)));
        assert_eq!(o.next_due().unwrap(), Some(t0() + s(90)));
        // A restart: a new Outbox on the same directory.
        let o = Outbox::open(d.path()).unwrap();
        *f.down.borrow_mut() = false;
        assert_eq!(o.drain(&f, t0() + s(60)).unwrap().waiting, 1);
        assert_eq!(o.drain(&f, t0() + s(90)).unwrap().sent, 1);
        assert_eq!(f.sent.borrow().len(), 1);
        assert!(o.pending().unwrap().is_empty());
    }

    #[test]
    fn corrupt_files_are_set_aside() {
        let d = tempfile::tempdir().unwrap();
        let o = Outbox::open(d.path()).unwrap();
        std::fs::write(d.path().join(format!("0-junk{SUFFIX}")), b"{").unwrap();
        std::fs::write(d.path().join(".tmp-half"), b"{").unwrap();
        o.queue_at(&mail("ok"), t0()).unwrap();
        let f = Fake::default();
        let r = o.drain(&f, t0()).unwrap();
        assert_eq!((r.sent, r.bad), (1, 1));
        assert!(d.path().join("0-junk.mail.bad").exists());
        assert_eq!(o.drain(&f, t0()).unwrap(), Drained::default());
    }
}
