//! `bulwark agent run|status|backup|schedule|check-config`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use bulwark_proto::{Backed, Reply, Request};

use crate::config::{self, Config};

#[derive(clap::Subcommand, Debug)]
pub enum AgentCmd {
    /// Run the agent in the foreground (the systemd unit runs this).
    Run {
        #[arg(long, env = "BULWARK_CONFIG", default_value = config::DEFAULT_PATH)]
        config: PathBuf,
    },
    /// Every domain on the host: its policies, last result, next run, last
    /// snapshot, and anything wrong; the repositories' checks.
    Status {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        sock: Sock,
    },
    /// Have the running agent back up a domain now, under a policy.
    Backup {
        domain: String,
        /// Default: the first of the domain's policies this agent knows.
        #[arg(long)]
        policy: Option<String>,
        #[arg(long)]
        full: bool,
        #[command(flatten)]
        sock: Sock,
    },
    /// Print the next run times of a schedule, in local time.
    Schedule(crate::cmd::schedule::Args),
    /// Check a config before the agent runs it: parse and validate it,
    /// reach each repository, the SMTP server and libvirt, and list what
    /// would run in the next 24 hours.
    CheckConfig(crate::cmd::check_config::Args),
}

#[derive(clap::Args, Debug)]
pub struct Sock {
    /// The agent's socket (default: the one in --config).
    #[arg(long)]
    socket: Option<PathBuf>,
    #[arg(long, env = "BULWARK_CONFIG", default_value = config::DEFAULT_PATH)]
    config: PathBuf,
}

impl Sock {
    fn path(&self) -> Result<PathBuf> {
        if let Some(s) = &self.socket {
            return Ok(s.clone());
        }
        Ok(Config::load(&self.config)?.socket)
    }
}

pub fn run(c: AgentCmd) -> Result<i32> {
    match c {
        AgentCmd::Schedule(a) => crate::cmd::schedule::run(a),
        AgentCmd::CheckConfig(a) => crate::cmd::check_config::run(a),
        AgentCmd::Run { config } => {
            crate::daemon::run(Config::load(&config)?)?;
            Ok(0)
        }
        AgentCmd::Status { json, sock } => {
            let reply: Reply<serde_json::Value> =
                crate::daemon::request(&sock.path()?, &Request::Status, Duration::from_secs(30))?;
            // The document as the agent sent it, `"ok": true` included.
            let doc = serde_json::to_string(&reply)?;
            let v = reply.into_result().context("agent")?;
            if json {
                println!("{doc}");
            } else {
                print_status(&v);
            }
            // Scripts and monitoring may key on the exit code too.
            let wrong = v["problems"].as_array().is_some_and(|p| !p.is_empty());
            Ok(if wrong { 1 } else { 0 })
        }
        AgentCmd::Backup {
            domain,
            policy,
            full,
            sock,
        } => {
            let req = Request::Backup {
                domain,
                policy,
                full,
            };
            // The report is shown as the agent wrote it.
            let reply: Reply<Backed<serde_json::Value>> =
                crate::daemon::request(&sock.path()?, &req, Duration::from_secs(24 * 3600))?;
            let Backed { report } = reply.into_result().context("agent")?;
            println!("{report}");
            Ok(0)
        }
    }
}

/// `agent status` for a person: a line per (domain, policy), then what is
/// wrong, then the repositories.
fn print_status(v: &serde_json::Value) {
    let t = |x: &serde_json::Value| {
        x.as_u64()
            .and_then(|s| chrono::DateTime::from_timestamp(s as i64, 0))
            .map(|d| {
                d.with_timezone(&chrono::Local)
                    .format("%Y-%m-%d %H:%M")
                    .to_string()
            })
            .unwrap_or_else(|| "-".into())
    };
    let s = |x: &serde_json::Value| x.as_str().unwrap_or("-").to_string();
    println!(
        "agent {} on {}: {} domains, backing up: {}",
        s(&v["version"]),
        s(&v["host"]),
        v["domains"].as_array().map_or(0, |d| d.len()),
        match v["running"].as_array() {
            Some(r) if !r.is_empty() => r.iter().map(s).collect::<Vec<_>>().join(", "),
            _ => "nothing".into(),
        }
    );
    println!(
        "{:<24} {:<9} {:<12} {:<16} {:<7} {:<16} SNAPSHOT",
        "DOMAIN", "STATE", "POLICY", "LAST RUN", "RESULT", "NEXT RUN"
    );
    for d in v["domains"].as_array().into_iter().flatten() {
        let policies = d["policies"].as_array().cloned().unwrap_or_default();
        if policies.is_empty() {
            println!("{:<24} {:<9} {:<12}", s(&d["name"]), s(&d["state"]), "-");
        }
        for p in policies {
            let snap = s(&p["last_snapshot"]);
            println!(
                "{:<24} {:<9} {:<12} {:<16} {:<7} {:<16} {}",
                s(&d["name"]),
                s(&d["state"]),
                s(&p["name"]),
                t(&p["last_run"]),
                if p["usable"] == false {
                    "refused".into()
                } else {
                    s(&p["last_result"])
                },
                t(&p["next_run"]),
                &snap[..snap.len().min(12)],
            );
        }
    }
    let problems = v["problems"].as_array().cloned().unwrap_or_default();
    if !problems.is_empty() {
        println!("\nproblems:");
        for p in problems {
            let what = p["domain"]
                .as_str()
                .or(p["repository"].as_str())
                .unwrap_or("");
            println!("  {what}: {}", s(&p["problem"]));
        }
    }
    if let Some(targets) = v["targets"].as_object().filter(|t| !t.is_empty()) {
        println!("\nrepositories:");
        for (name, tg) in targets {
            let state = if tg["ok"] == true {
                "usable".to_string()
            } else {
                format!("NOT usable ({}): {}", s(&tg["kind"]), s(&tg["error"]))
            };
            println!("  {name}: {state} (checked {})", t(&tg["checked"]));
        }
    }
}
