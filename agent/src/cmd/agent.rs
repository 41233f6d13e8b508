//! `bulwark agent run|status|backup|schedule|check-config`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use bulwark_proto::{Backed, Reply, Request, Status};

use crate::config::{self, Config};
use crate::vm::backup::Report;

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
            let reply: Reply<Status> =
                crate::daemon::request(&sock.path()?, &Request::Status, Duration::from_secs(30))?;
            // The document as the agent sends it, `"ok": true` included.
            let doc = serde_json::to_string(&reply)?;
            let st = reply.into_result().context("agent")?;
            if json {
                println!("{doc}");
            } else {
                print_status(&st);
            }
            // Scripts and monitoring may key on the exit code too.
            Ok(if st.problems.is_empty() { 0 } else { 1 })
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
            let reply: Reply<Backed<Report>> =
                crate::daemon::request(&sock.path()?, &req, Duration::from_secs(24 * 3600))?;
            let Backed { report } = reply.into_result().context("agent")?;
            println!("{}", serde_json::to_string(&report)?);
            Ok(0)
        }
    }
}

/// `agent status` for a person: a line per (domain, policy), then what is
/// wrong, then the repositories.
fn print_status(st: &Status) {
    let t = |x: Option<u64>| {
        x.and_then(|s| chrono::DateTime::from_timestamp(s as i64, 0))
            .map(|d| {
                d.with_timezone(&chrono::Local)
                    .format("%Y-%m-%d %H:%M")
                    .to_string()
            })
            .unwrap_or_else(|| "-".into())
    };
    let running = if st.running.is_empty() {
        "nothing".to_string()
    } else {
        st.running.join(", ")
    };
    println!(
        "agent {} on {}: {} domains, backing up: {running}",
        st.version,
        st.host,
        st.domains.len(),
    );
    println!(
        "{:<24} {:<9} {:<12} {:<16} {:<7} {:<16} SNAPSHOT",
        "DOMAIN", "STATE", "POLICY", "LAST RUN", "RESULT", "NEXT RUN"
    );
    for d in &st.domains {
        if d.policies.is_empty() {
            println!("{:<24} {:<9} {:<12}", d.name, d.state, "-");
        }
        for p in &d.policies {
            let snap = p.last_snapshot.as_deref().unwrap_or("-");
            let result = match (&p.last_result, p.usable) {
                (_, false) => "refused",
                (Some(r), true) => r.as_str(),
                (None, true) => "-",
            };
            println!(
                "{:<24} {:<9} {:<12} {:<16} {:<7} {:<16} {}",
                d.name,
                d.state,
                p.name,
                t(p.last_run),
                result,
                t(p.next_run),
                &snap[..snap.len().min(12)],
            );
        }
    }
    if !st.problems.is_empty() {
        println!("\nproblems:");
        for p in &st.problems {
            println!("  {}: {}", p.subject(), p.problem);
        }
    }
    if !st.targets.is_empty() {
        println!("\nrepositories:");
        for (name, tg) in &st.targets {
            let state = if tg.ok {
                "usable".to_string()
            } else {
                format!(
                    "NOT usable ({}): {}",
                    tg.kind.as_deref().unwrap_or("-"),
                    tg.error.as_deref().unwrap_or("-")
                )
            };
            println!("  {name}: {state} (checked {})", t(Some(tg.checked)));
        }
    }
}
