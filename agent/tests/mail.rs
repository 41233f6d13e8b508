//! Failure email end to end: the notifier's streak rule, the outbox and
//! lettre against a real SMTP server (Debian's python3-aiosmtpd) on
//! loopback, each test with its own port, directories and server process.

mod smtp_server;

use std::time::{Duration, Instant};

use bulwark::mail;
use bulwark::mail::{
    Alerts, Job, Outbox, SenderThread, SmtpConfig, SmtpSender, Task, TlsMode, Transport,
};
use chrono::{DateTime, TimeZone, Utc};
use smtp_server::{free_port, Server};

fn config(port: u16) -> SmtpConfig {
    SmtpConfig {
        host: "127.0.0.1".into(),
        port: Some(port),
        from: "bulwark@pve1.example.com".into(),
        tls: TlsMode::None,
        username: None,
        password_file: None,
    }
}

fn t(mins: i64) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2025, 6, 1, 2, 0, 0).unwrap() + chrono::Duration::minutes(mins)
}

const ERR: &str = "disk vda: NBD read failed: Connection reset by peer";

fn contacts() -> Vec<String> {
    vec![
        "ops@example.com".to_string(),
        "oncall@example.com".to_string(),
    ]
}

fn web01(contacts: &[String]) -> Job<'_> {
    Job {
        task: Task::Backup,
        vm: "web01",
        policy: "nightly",
        repository: "s3-main",
        contacts,
    }
}

/// Unfolded headers and body of one stored message.
fn header<'a>(msg: &'a str, name: &str) -> Option<&'a str> {
    msg.lines()
        .take_while(|l| !l.is_empty())
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
}

#[test]
fn failure_streak_and_recovery_arrive_once_each() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let server = Server::start(dir.path(), port, None);
    let smtp = SmtpSender::new(&config(port), "pve1").unwrap();
    let state = dir.path().join("notify.json");
    let outbox = dir.path().join("outbox");
    let log = vec![
        "02:00:01 backup web01/nightly: starting".to_string(),
        "02:00:07 vda: read 1.2 GiB".to_string(),
    ];

    let c = contacts();
    let job = web01(&c);
    let mut alerts = Alerts::open("pve1", &state, &outbox).unwrap();
    assert!(alerts.failure(&job, ERR, &log, t(0)).unwrap());
    assert_eq!(alerts.outbox().pending().unwrap().len(), 1);
    let d = alerts.outbox().drain(&smtp, Utc::now()).unwrap();
    assert_eq!((d.sent, d.failed), (1, 0));
    assert!(alerts.outbox().pending().unwrap().is_empty());

    let msgs = server.messages();
    assert_eq!(msgs.len(), 1);
    let m = &msgs[0];
    assert_eq!(
        header(m, "Subject"),
        Some("bulwark: backup of web01/nightly failed on pve1")
    );
    assert_eq!(header(m, "From"), Some("bulwark@pve1.example.com"));
    assert_eq!(header(m, "To"), Some("ops@example.com, oncall@example.com"));
    assert_eq!(
        header(m, "X-RcptTo"),
        Some("ops@example.com, oncall@example.com")
    );
    for s in [
        "VM:         web01",
        "Policy:     nightly",
        "Repository: s3-main",
        "Host:       pve1",
        "disk vda: NBD read failed: Connection reset by peer",
        "02:00:07 vda: read 1.2 GiB",
    ] {
        assert!(m.contains(s), "{s:?} not in the mail:\n{m}");
    }

    // The same streak, also after a restart of the agent: no mail.
    assert!(!alerts.failure(&job, ERR, &log, t(60)).unwrap());
    drop(alerts);
    let mut alerts = Alerts::open("pve1", &state, &outbox).unwrap();
    assert!(!alerts.failure(&job, ERR, &log, t(120)).unwrap());
    assert_eq!(alerts.outbox().drain(&smtp, Utc::now()).unwrap().sent, 0);
    assert_eq!(server.messages().len(), 1);

    // Success: one recovery mail; a second success sends nothing.
    assert!(alerts.success(&job, t(180)).unwrap());
    assert!(!alerts.success(&job, t(240)).unwrap());
    assert_eq!(alerts.outbox().drain(&smtp, Utc::now()).unwrap().sent, 1);
    let msgs = server.messages();
    assert_eq!(msgs.len(), 2);
    let r = &msgs[1];
    assert_eq!(
        header(r, "Subject"),
        Some("bulwark: backup of web01/nightly recovered on pve1")
    );
    assert!(r.contains("3 failed attempts over 3h"), "{r}");
    assert!(r.contains("VM:         web01"), "{r}");
}

#[test]
fn mail_waits_in_the_outbox_while_the_server_is_down() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let smtp = SmtpSender::new(&config(port), "pve1").unwrap();
    let mut alerts = Alerts::open(
        "pve1",
        dir.path().join("notify.json"),
        dir.path().join("outbox"),
    )
    .unwrap();
    let c = contacts();
    let job = web01(&c);
    let start = Instant::now();
    assert!(alerts.failure(&job, ERR, &[], t(0)).unwrap());
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "queueing must not wait for SMTP"
    );

    let now = Utc::now();
    let d = alerts.outbox().drain(&smtp, now).unwrap();
    assert_eq!((d.sent, d.failed), (0, 1));
    let q = alerts.outbox().pending().unwrap();
    assert_eq!(q.len(), 1);
    assert_eq!(q[0].attempts, 1);
    assert_eq!(q[0].next_attempt, now + chrono::Duration::seconds(30));
    let err = q[0].last_error.as_deref().unwrap();
    assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");

    let server = Server::start(dir.path(), port, None);
    // Not due yet: left alone although the server is up now.
    let d = alerts
        .outbox()
        .drain(&smtp, now + chrono::Duration::seconds(10))
        .unwrap();
    assert_eq!((d.sent, d.waiting), (0, 1));
    assert!(server.messages().is_empty());
    // Due: delivered and removed.
    let d = alerts
        .outbox()
        .drain(&smtp, now + chrono::Duration::seconds(31))
        .unwrap();
    assert_eq!(d.sent, 1);
    assert!(alerts.outbox().pending().unwrap().is_empty());
    let msgs = server.messages();
    assert_eq!(msgs.len(), 1);
    assert!(msgs[0].contains("VM:         web01"));
    assert!(msgs[0].contains("Connection reset by peer"));
}

#[test]
fn auth_with_password_file() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let server = Server::start(dir.path(), port, Some(("bulwark", "s3cret pw")));
    let pw = dir.path().join("smtp-password");
    std::fs::write(&pw, "s3cret pw\n").unwrap();
    let outbox = Outbox::open(dir.path().join("outbox")).unwrap();
    let m = mail::Mail {
        to: contacts(),
        subject: "auth test".into(),
        body: "authenticated body\n".into(),
    };

    // No credentials: the server refuses, the mail stays.
    let anon = SmtpSender::new(&config(port), "pve1").unwrap();
    outbox.queue(&m).unwrap();
    assert_eq!(outbox.drain(&anon, Utc::now()).unwrap().failed, 1);
    let err = outbox.pending().unwrap()[0].last_error.clone().unwrap();
    assert!(err.contains("530"), "want 'authentication required': {err}");
    // Wrong password: same.
    let bad_pw = dir.path().join("bad-password");
    std::fs::write(&bad_pw, "nope\n").unwrap();
    let wrong = SmtpSender::new(
        &SmtpConfig {
            username: Some("bulwark".into()),
            password_file: Some(bad_pw),
            ..config(port)
        },
        "pve1",
    )
    .unwrap();
    let later = Utc::now() + chrono::Duration::hours(2);
    assert_eq!(outbox.drain(&wrong, later).unwrap().failed, 1);
    let err = outbox.pending().unwrap()[0].last_error.clone().unwrap();
    assert!(err.contains("535"), "want 'credentials invalid': {err}");
    assert!(server.messages().is_empty());

    let good = SmtpSender::new(
        &SmtpConfig {
            username: Some("bulwark".into()),
            password_file: Some(pw),
            ..config(port)
        },
        "pve1",
    )
    .unwrap();
    assert_eq!(
        outbox
            .drain(&good, later + chrono::Duration::hours(2))
            .unwrap()
            .sent,
        1
    );
    let msgs = server.messages();
    assert_eq!(msgs.len(), 1);
    assert_eq!(header(&msgs[0], "Subject"), Some("auth test"));
    assert!(msgs[0].contains("authenticated body"));
}

#[test]
fn sender_thread_delivers_in_the_background() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let server = Server::start(dir.path(), port, None);
    let outbox = Outbox::open(dir.path().join("outbox")).unwrap();
    let smtp: Box<dyn Transport + Send> = Box::new(SmtpSender::new(&config(port), "pve1").unwrap());
    let sender = SenderThread::spawn(outbox.clone(), smtp, Duration::from_secs(60));
    let m = mail::Mail {
        to: contacts(),
        subject: "background".into(),
        body: "sent by the sender thread\n".into(),
    };
    outbox.queue(&m).unwrap();
    sender.wake();
    let deadline = Instant::now() + Duration::from_secs(20);
    while server.messages().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    sender.stop();
    let msgs = server.messages();
    assert_eq!(msgs.len(), 1, "the sender thread did not deliver in time");
    assert!(msgs[0].contains("sent by the sender thread"));
    assert!(outbox.pending().unwrap().is_empty());
}

#[test]
fn silence_mail_once() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let server = Server::start(dir.path(), port, None);
    let smtp = SmtpSender::new(&config(port), "pve1").unwrap();
    let mut alerts = Alerts::open(
        "pve1",
        dir.path().join("notify.json"),
        dir.path().join("outbox"),
    )
    .unwrap();
    let day = Duration::from_secs(86400);
    let c = contacts();
    let job = web01(&c);
    assert!(alerts.success(&job, t(0)).is_ok());
    assert!(!alerts.check_silence(&job, day, t(47 * 60)).unwrap());
    assert!(alerts.check_silence(&job, day, t(48 * 60)).unwrap());
    assert!(!alerts.check_silence(&job, day, t(72 * 60)).unwrap());
    assert_eq!(alerts.outbox().drain(&smtp, Utc::now()).unwrap().sent, 1);
    let msgs = server.messages();
    assert_eq!(msgs.len(), 1);
    assert_eq!(
        header(&msgs[0], "Subject"),
        Some("bulwark: no backup of web01/nightly on pve1 for 2days")
    );
}
