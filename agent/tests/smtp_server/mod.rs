//! A real SMTP server for tests: Debian's python3-aiosmtpd on a loopback
//! port, storing each message in a Maildir.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// An SMTP server storing each message in a Maildir; optionally requiring
/// AUTH (without TLS: loopback only).
const SERVER: &str = r#"
import sys
from aiosmtpd.controller import Controller
from aiosmtpd.handlers import Mailbox
from aiosmtpd.smtp import AuthResult, LoginPassword

port, maildir = int(sys.argv[1]), sys.argv[2]
creds = (sys.argv[3].encode(), sys.argv[4].encode()) if len(sys.argv) > 4 else None

def authenticator(server, session, envelope, mechanism, auth_data):
    ok = isinstance(auth_data, LoginPassword) and (auth_data.login, auth_data.password) == creds
    # handled=False: let aiosmtpd answer 535 itself.
    return AuthResult(success=ok, handled=False)

kw = dict(authenticator=authenticator, auth_required=True, auth_require_tls=False) if creds else {}
c = Controller(Mailbox(maildir), hostname="127.0.0.1", port=port, **kw)
c.start()
print("ready", flush=True)
sys.stdin.read()
c.stop()
"#;

/// The python that has aiosmtpd: Debian's, not a pyenv shim's.
fn python() -> &'static str {
    if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

pub struct Server {
    child: Child,
    maildir: PathBuf,
}

impl Server {
    pub fn start(dir: &Path, port: u16, auth: Option<(&str, &str)>) -> Server {
        let script = dir.join("smtpd.py");
        std::fs::write(&script, SERVER).unwrap();
        let maildir = dir.join(format!("maildir-{port}"));
        let mut cmd = Command::new(python());
        // -W ignore: aiosmtpd warns about AUTH without TLS (fine on loopback).
        cmd.args(["-W", "ignore"])
            .arg(&script)
            .arg(port.to_string())
            .arg(&maildir);
        if let Some((u, p)) = auth {
            cmd.args([u, p]);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3 with aiosmtpd (scripts/setup-test-host.sh installs python3-aiosmtpd)");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        if line.trim() != "ready" {
            let _ = child.kill();
            let _ = child.wait();
            panic!("SMTP server did not start (is python3-aiosmtpd installed?)");
        }
        Server { child, maildir }
    }

    /// Every stored message, in arrival order.
    pub fn messages(&self) -> Vec<String> {
        let new = self.maildir.join("new");
        let mut files: Vec<_> = match std::fs::read_dir(&new) {
            Ok(rd) => rd.map(|e| e.unwrap().path()).collect(),
            Err(_) => return vec![],
        };
        files.sort_by_key(|p| std::fs::metadata(p).unwrap().modified().unwrap());
        files
            .iter()
            .map(|p| std::fs::read_to_string(p).unwrap())
            .collect()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback port nobody listens on (just now).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
