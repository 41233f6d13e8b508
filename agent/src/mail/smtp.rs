//! Delivery over SMTP with lettre (blocking; the outbox's thread waits).

use std::time::Duration;

use lettre::message::header::ContentType;
use lettre::message::Mailbox;
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Tls as LTls, TlsParameters};
use lettre::transport::smtp::extension::ClientId;
use lettre::{Message, SmtpTransport};

use super::{Error, Mail, SmtpConfig, TlsMode, Transport};

/// Bounds each SMTP exchange, so a stuck server only stalls the sender
/// thread this long.
const TIMEOUT: Duration = Duration::from_secs(30);

/// An SMTP connection recipe plus the sender address.
pub struct SmtpSender {
    transport: SmtpTransport,
    server: String,
    from: Mailbox,
    id_domain: String,
}

fn mailbox(what: &str, s: &str) -> Result<Mailbox, Error> {
    s.parse()
        .map_err(|e| Error::Config(format!("{what} {s:?}: {e}")))
}

impl SmtpSender {
    /// Checks the config, reads the password file and prepares the
    /// transport (it connects per mail). `hello` is the name this host
    /// greets the server with (EHLO).
    pub fn new(cfg: &SmtpConfig, hello: &str) -> Result<SmtpSender, Error> {
        let from = mailbox("from", &cfg.from)?;
        let tls_params = || {
            TlsParameters::new(cfg.host.clone())
                .map_err(|e| Error::Config(format!("tls for {:?}: {e}", cfg.host)))
        };
        let tls = match cfg.tls {
            TlsMode::None => LTls::None,
            TlsMode::Starttls => LTls::Required(tls_params()?),
            TlsMode::Tls => LTls::Wrapper(tls_params()?),
        };
        let hello = if hello.is_empty() { "localhost" } else { hello };
        let mut b = SmtpTransport::builder_dangerous(cfg.host.as_str())
            .port(cfg.port())
            .tls(tls)
            .hello_name(ClientId::Domain(hello.to_string()))
            .timeout(Some(TIMEOUT));
        match (&cfg.username, &cfg.password_file) {
            (Some(user), Some(pf)) => {
                let pw = std::fs::read_to_string(pf)
                    .map_err(|e| Error::Config(format!("password_file {}: {e}", pf.display())))?;
                let pw = pw.strip_suffix('\n').unwrap_or(&pw);
                let pw = pw.strip_suffix('\r').unwrap_or(pw);
                b = b.credentials(Credentials::new(user.clone(), pw.to_string()));
            }
            (Some(_), None) => {
                return Err(Error::Config("username given without password_file".into()))
            }
            (None, Some(_)) => {
                return Err(Error::Config("password_file given without username".into()))
            }
            (None, None) => {}
        }
        let id_domain = cfg
            .from
            .rsplit_once('@')
            .map(|(_, d)| d.trim_end_matches('>').to_string())
            .filter(|d| !d.is_empty())
            .unwrap_or_else(|| "bulwark.invalid".into());
        Ok(SmtpSender {
            transport: b.build(),
            server: format!("{}:{}", cfg.host, cfg.port()),
            from,
            id_domain,
        })
    }

    /// The message for `mail`. A recipient that is no address is left out
    /// (and logged) rather than holding up the others; none left is an error.
    fn message(&self, id: &str, mail: &Mail) -> Result<Message, Error> {
        let mut to = Vec::new();
        for t in &mail.to {
            match t.parse::<Mailbox>() {
                Ok(m) => to.push(m),
                Err(e) => tracing::warn!("mail {:?}: skipping recipient {t:?}: {e}", mail.subject),
            }
        }
        if to.is_empty() {
            return Err(Error::Build(format!("no valid recipient in {:?}", mail.to)));
        }
        let mut b = Message::builder()
            .from(self.from.clone())
            .subject(mail.subject.clone())
            .message_id(Some(format!("<{id}@{}>", self.id_domain)))
            .header(ContentType::TEXT_PLAIN);
        for t in to {
            b = b.to(t);
        }
        b.body(mail.body.clone())
            .map_err(|e| Error::Build(e.to_string()))
    }
}

impl SmtpSender {
    /// Connects as a mail would (TLS, AUTH), says NOOP and leaves, sending
    /// nothing: `bulwark agent check-config`.
    pub fn check(&self) -> Result<(), Error> {
        let failed = |reason: String| Error::Send {
            server: self.server.clone(),
            reason,
        };
        match self.transport.test_connection() {
            Ok(true) => Ok(()),
            Ok(false) => Err(failed("the connection did not answer NOOP".into())),
            Err(e) => Err(failed(e.to_string())),
        }
    }
}

impl Transport for SmtpSender {
    fn send(&self, id: &str, mail: &Mail) -> Result<(), Error> {
        use lettre::Transport as _;
        let msg = self.message(id, mail)?;
        self.transport
            .send(&msg)
            .map(|_| ())
            .map_err(|e| Error::Send {
                server: self.server.clone(),
                reason: e.to_string(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> SmtpConfig {
        SmtpConfig {
            host: "mail.example.com".into(),
            port: None,
            from: "Bulwark <bulwark@pve1.example.com>".into(),
            tls: TlsMode::Starttls,
            username: None,
            password_file: None,
        }
    }

    #[test]
    fn builds_for_every_tls_mode() {
        for tls in [TlsMode::None, TlsMode::Starttls, TlsMode::Tls] {
            let s = SmtpSender::new(&SmtpConfig { tls, ..cfg() }, "pve1").unwrap();
            assert_eq!(s.id_domain, "pve1.example.com");
        }
    }

    #[test]
    fn rejects_bad_config() {
        let e = |c: SmtpConfig| SmtpSender::new(&c, "h").err().unwrap().to_string();
        assert!(e(SmtpConfig {
            from: "not an address".into(),
            ..cfg()
        })
        .contains("from"));
        assert!(e(SmtpConfig {
            username: Some("u".into()),
            ..cfg()
        })
        .contains("without password_file"));
        assert!(e(SmtpConfig {
            username: Some("u".into()),
            password_file: Some("/nonexistent/pw".into()),
            ..cfg()
        })
        .contains("/nonexistent/pw"));
    }

    #[test]
    fn message_has_headers_and_body() {
        let s = SmtpSender::new(&cfg(), "pve1").unwrap();
        let m = s
            .message(
                "20250601T120000.000000000Z-1-0",
                &Mail {
                    to: vec!["ops@example.com".into(), "not an address".into()],
                    subject: "bulwark: backup of web01/nightly failed on pve1".into(),
                    body: "VM: web01\n".into(),
                },
            )
            .unwrap();
        let text = String::from_utf8(m.formatted()).unwrap();
        assert!(text.contains("Subject: bulwark: backup of web01/nightly failed on pve1"));
        assert!(text.contains("Message-ID: <20250601T120000.000000000Z-1-0@pve1.example.com>"));
        assert!(text.contains("To: ops@example.com"));
        assert!(text.contains("VM: web01"));
        assert!(!text.contains("not an address"));
        let none = Mail {
            to: vec!["x@".into()],
            subject: "s".into(),
            body: "b".into(),
        };
        let e = s.message("1", &none).unwrap_err().to_string();
        assert!(e.contains("no valid recipient"), "{e}");
    }
}
