//! Failure email: tell an admin once when a backup starts failing, once when
//! it recovers, and once when a policy has gone silent.
//!
//! Three parts, so each can be tested alone and none blocks a backup:
//! - [`Notifier`]: the streak rule (pure; its state is JSON so it survives
//!   restarts and a failing job does not mail again after each restart);
//! - [`Outbox`]: mails as files in a directory, drained with per-mail
//!   exponential backoff, so an unreachable SMTP server only delays mail;
//! - [`SmtpSender`]: delivery with lettre over SMTP.
//!
//! [`Alerts`] ties the notifier and the outbox together for the daemon;
//! [`SenderThread`] drains the outbox in the background.

mod notify;
mod outbox;
mod smtp;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use notify::{Job, JobState, Notifier, NotifierState, Task};
pub use outbox::{backoff, Drained, Outbox, Queued, SenderThread, Transport};
pub use smtp::SmtpSender;

/// What went wrong queueing or sending mail.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    State(#[from] crate::statefile::Error),
    #[error("smtp config: {0}")]
    Config(String),
    #[error("building mail: {0}")]
    Build(String),
    #[error("sending mail via {server}: {reason}")]
    Send { server: String, reason: String },
}

impl Error {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Error {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// How to talk to the SMTP server.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// Plain text: only for a relay on localhost or a trusted network.
    None,
    /// Plain connection upgraded with STARTTLS (required, not opportunistic).
    #[default]
    Starttls,
    /// TLS from the first byte (SMTPS, port 465).
    Tls,
}

/// `[smtp]` in the agent's config. Recipients are each policy's
/// `contacts`.
///
/// ```toml
/// [smtp]
/// host = "mail.example.com"
/// port = 587                       # default: 25, 587 or 465 by tls
/// from = "bulwark@pve1.example.com"
/// tls = "starttls"                 # none | starttls (default) | tls
/// username = "bulwark"             # optional: no AUTH without it
/// password_file = "/etc/bulwark/smtp-password"
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SmtpConfig {
    pub host: String,
    #[serde(default)]
    pub port: Option<u16>,
    pub from: String,
    #[serde(default)]
    pub tls: TlsMode,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
}

impl SmtpConfig {
    /// The configured port, else the usual one for the TLS mode.
    pub fn port(&self) -> u16 {
        self.port.unwrap_or(match self.tls {
            TlsMode::None => 25,
            TlsMode::Starttls => 587,
            TlsMode::Tls => 465,
        })
    }
}

/// One mail: recipients (the policy's contacts when it was queued) and
/// content. The sender address comes from [`SmtpConfig`] at sending time.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub struct Mail {
    pub to: Vec<String>,
    pub subject: String,
    pub body: String,
}

/// The notifier's state file plus the outbox: what the daemon calls after
/// each backup. Each call queues at most one mail and saves the state.
pub struct Alerts {
    notifier: Notifier,
    state_path: PathBuf,
    outbox: Outbox,
}

impl Alerts {
    /// Loads the streak state from `state_path` (a missing file is a fresh
    /// start) and opens (creates) the outbox directory.
    pub fn open(
        host: &str,
        state_path: impl Into<PathBuf>,
        outbox_dir: impl Into<PathBuf>,
    ) -> Result<Alerts, Error> {
        let state_path = state_path.into();
        let state = NotifierState::load(&state_path)?;
        Ok(Alerts {
            notifier: Notifier::new(host, state),
            state_path,
            outbox: Outbox::open(outbox_dir)?,
        })
    }

    pub fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    pub fn notifier(&self) -> &Notifier {
        &self.notifier
    }

    /// A failed backup; true if a mail was queued (first of a streak).
    pub fn failure(
        &mut self,
        job: &Job<'_>,
        error: &str,
        log: &[String],
        at: chrono::DateTime<chrono::Utc>,
    ) -> Result<bool, Error> {
        let before = self.notifier.state().clone();
        let mail = self.notifier.failure(job, error, log, at);
        self.commit(mail, &before)
    }

    /// A successful backup; true if a recovery mail was queued.
    pub fn success(
        &mut self,
        job: &Job<'_>,
        at: chrono::DateTime<chrono::Utc>,
    ) -> Result<bool, Error> {
        let before = self.notifier.state().clone();
        let mail = self.notifier.success(job, at);
        self.commit(mail, &before)
    }

    /// Checks one (vm, policy) for silence; true if a mail was queued.
    pub fn check_silence(
        &mut self,
        job: &Job<'_>,
        period: std::time::Duration,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<bool, Error> {
        let before = self.notifier.state().clone();
        let mail = self.notifier.check_silence(job, period, now);
        self.commit(mail, &before)
    }

    /// Mail first, then state: a crash in between repeats a mail rather
    /// than losing one. An unchanged state is not written again (the
    /// silence check runs every tick).
    fn commit(&mut self, mail: Option<Mail>, before: &NotifierState) -> Result<bool, Error> {
        if let Some(m) = &mail {
            self.outbox.queue(m)?;
        }
        if self.notifier.state() != before {
            self.notifier.state().save(&self.state_path)?;
        }
        Ok(mail.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smtp_config_from_toml() {
        let c: SmtpConfig = toml::from_str(
            r#"
            host = "mail.example.com"
            from = "bulwark@pve1.example.com"
            "#,
        )
        .unwrap();
        assert_eq!(c.tls, TlsMode::Starttls);
        assert_eq!(c.port(), 587);
        assert_eq!(c.username, None);

        let c: SmtpConfig = toml::from_str(
            r#"
            host = "127.0.0.1"
            port = 2525
            from = "b@h"
            tls = "none"
            username = "u"
            password_file = "/etc/bulwark/smtp"
            "#,
        )
        .unwrap();
        assert_eq!(c.port(), 2525);
        assert_eq!(c.tls, TlsMode::None);
        assert_eq!(
            c.password_file.as_deref(),
            Some(Path::new("/etc/bulwark/smtp"))
        );

        let tls: SmtpConfig =
            toml::from_str("host = \"h\"\nfrom = \"a@b\"\ntls = \"tls\"").unwrap();
        assert_eq!(tls.port(), 465);
        let none: SmtpConfig =
            toml::from_str("host = \"h\"\nfrom = \"a@b\"\ntls = \"none\"").unwrap();
        assert_eq!(none.port(), 25);

        let e = toml::from_str::<SmtpConfig>("host = \"h\"\nfrom = \"a@b\"\ntls = \"ssl\"")
            .unwrap_err();
        assert!(e.to_string().contains("ssl"), "{e}");
        let e = toml::from_str::<SmtpConfig>("host = \"h\"\nfrom = \"a@b\"\npasword = \"x\"")
            .unwrap_err();
        assert!(e.to_string().contains("pasword"), "{e}");
    }
}
