//! `bulwark agent run|status|backup`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};
use serde_json::json;

use crate::config::{self, Config};

#[derive(clap::Subcommand, Debug)]
pub enum AgentCmd {
    /// Run the agent in the foreground (the systemd unit runs this).
    Run {
        #[arg(long, env = "BULWARK_CONFIG", default_value = config::DEFAULT_PATH)]
        config: PathBuf,
    },
    /// Ask a running agent what it did last.
    Status {
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
        AgentCmd::Run { config } => {
            crate::daemon::run(Config::load(&config)?)?;
            Ok(0)
        }
        AgentCmd::Status { sock } => {
            let v = crate::daemon::request(
                &sock.path()?,
                &json!({"op": "status"}),
                Duration::from_secs(10),
            )?;
            println!("{v}");
            Ok(0)
        }
        AgentCmd::Backup {
            domain,
            policy,
            full,
            sock,
        } => {
            let v = crate::daemon::request(
                &sock.path()?,
                &json!({"op": "backup", "domain": domain, "policy": policy, "full": full}),
                Duration::from_secs(24 * 3600),
            )?;
            if v["ok"] != true {
                bail!("agent: {}", v["error"].as_str().unwrap_or("failed"));
            }
            println!("{}", v["report"]);
            Ok(0)
        }
    }
}
