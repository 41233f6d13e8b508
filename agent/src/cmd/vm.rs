//! `bulwark backup vm`, `bulwark protect`, `bulwark unprotect`.

use std::path::PathBuf;

use anyhow::Result;

use super::human;
use crate::vm::backup::{self, Options};
use crate::vm::state::StateDir;
use crate::vm::virsh::Virsh;
use crate::{secret, Global};

#[derive(clap::Args, Debug)]
pub struct BackupVmArgs {
    /// Domain name or UUID.
    pub domain: String,
    /// Read every allocated block (a fresh checkpoint chain starts).
    #[arg(long)]
    pub full: bool,
    /// Policy name recorded in the snapshot.
    #[arg(long)]
    pub policy: Option<String>,
    /// Worker threads (default: one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Where checkpoint records, sockets and scratch files live.
    #[arg(long, env = "BULWARK_STATE_DIR", default_value = crate::vm::DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// libvirt connection URI.
    #[arg(long, env = "BULWARK_LIBVIRT_URI", default_value = "qemu:///system")]
    pub connect: String,
    #[arg(long)]
    pub json: bool,
}

pub fn backup(g: &Global, a: BackupVmArgs) -> Result<i32> {
    let repo = secret::open(g)?;
    let r = backup::backup(
        &repo,
        &Options {
            domain: a.domain,
            full: a.full,
            policy: a.policy,
            threads: a.threads,
            state: StateDir::new(a.state_dir),
            virsh: Virsh::new(a.connect),
        },
    )?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "snapshot {} of {} ({}, {}): read {} of {} in {:.1}s, new {}, stored {}",
            &r.snapshot[..12.min(r.snapshot.len())],
            r.domain,
            if r.running { "running" } else { "stopped" },
            r.mode,
            human(r.bytes_read),
            human(r.size),
            r.seconds,
            human(r.bytes_new),
            human(r.bytes_stored),
        );
        for d in &r.disks {
            print!(
                "  {} ({}): mode: {}, read {}",
                d.name,
                d.format,
                d.mode,
                human(d.bytes_read)
            );
            if let Some(b) = d.dirty_bytes {
                print!(", dirty {}", human(b));
            }
            if let Some(why) = &d.reason {
                print!(" (reason: {why})");
            }
            println!();
        }
    }
    Ok(0)
}
