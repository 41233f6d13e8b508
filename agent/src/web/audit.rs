//! Every change made through the dashboard (and every login), with its
//! user: one JSON line each in `STATE_DIR/web/audit.log`, and the log.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;

use serde_json::{json, Value};

pub struct Audit {
    path: PathBuf,
    file: Mutex<()>,
}

impl Audit {
    pub fn new(path: PathBuf) -> Audit {
        Audit {
            path,
            file: Mutex::new(()),
        }
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// Records `user` doing `action` (`login`, `restore`, ...) with its
    /// details and outcome. A record that cannot be written is logged as
    /// an error; the action itself has happened either way.
    pub fn record(&self, user: &str, action: &str, detail: Value, outcome: &str) {
        tracing::info!(user, action, %detail, outcome, "web");
        let line = json!({
            "time": chrono::Utc::now().to_rfc3339(),
            "user": user,
            "action": action,
            "detail": detail,
            "outcome": outcome,
        });
        let _g = self.file.lock().unwrap_or_else(|e| e.into_inner());
        let r = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .and_then(|mut f| writeln!(f, "{line}"));
        if let Err(e) = r {
            tracing::error!("audit log {}: {e}: {line}", self.path.display());
        }
    }
}
