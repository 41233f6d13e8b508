//! `bulwark backup vm`, `bulwark protect`, `bulwark unprotect`.

use std::path::PathBuf;

use anyhow::Result;

use crate::libvirt::{Libvirt, State};
use crate::units::human;
use crate::vm::backup::{self, Options};
use crate::vm::state::StateDir;
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
            libvirt: Libvirt::open(&a.connect)?,
        },
    )?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "snapshot {} of {} ({}, {}): read {} of {} in {:.1}s, new {}, stored {}",
            r.snapshot.short(),
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

#[derive(clap::Args, Debug)]
pub struct ProtectArgs {
    /// Domain name or UUID.
    pub domain: String,
    /// Policy name (repeat for several, e.g. hourly and weekly).
    #[arg(long = "policy", required = true)]
    pub policies: Vec<String>,
    /// Add to the domain's policies instead of replacing them.
    #[arg(long)]
    pub add: bool,
    #[arg(long, env = "BULWARK_LIBVIRT_URI", default_value = "qemu:///system")]
    pub connect: String,
    /// The agent's config: each policy must be defined there and target a
    /// repository `[enforce] allowed_repositories` allows (skipped if the
    /// file does not exist: a host with no agent).
    #[arg(long, env = "BULWARK_CONFIG", default_value = crate::config::DEFAULT_PATH)]
    pub config: PathBuf,
}

#[derive(clap::Args, Debug)]
pub struct UnprotectArgs {
    pub domain: String,
    #[arg(long, env = "BULWARK_LIBVIRT_URI", default_value = "qemu:///system")]
    pub connect: String,
}

/// `bulwark protect`: names policies in the domain's XML (persistent, and
/// live if it runs), in Bulwark's metadata namespace.
pub fn protect(a: ProtectArgs) -> Result<i32> {
    check_policies(&a.config, &a.policies)?;
    let dom = Libvirt::open(&a.connect)?.domain(&a.domain)?;
    let running = dom.state()? == State::Active;
    let mut policies = if a.add {
        crate::vm::domain::parse(&dom.xml(true)?)?.policies
    } else {
        Vec::new()
    };
    for p in a.policies {
        if !policies.contains(&p) {
            policies.push(p);
        }
    }
    let xml = crate::vm::domain::policies_set_xml(&policies);
    dom.set_metadata(Some(&xml), running)?;
    println!("{}: protected by {}", a.domain, policies.join(", "));
    Ok(0)
}

/// Refuses policies the agent would not run: unknown, or targeting a
/// repository the host does not allow.
fn check_policies(config: &std::path::Path, policies: &[String]) -> Result<()> {
    if !config.exists() {
        eprintln!(
            "note: {} does not exist: policy names not checked",
            config.display()
        );
        return Ok(());
    }
    let cfg = crate::config::Config::load(config)?;
    for p in policies {
        if !cfg.policies.contains_key(p) {
            let known: Vec<&String> = cfg.policies.keys().collect();
            anyhow::bail!(
                "no policy {p:?} in {} (defined: {})",
                config.display(),
                known
                    .iter()
                    .map(|k| k.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        if let Some(why) = cfg.refusal(p) {
            anyhow::bail!("{why} ({})", config.display());
        }
    }
    Ok(())
}

pub fn unprotect(a: UnprotectArgs) -> Result<i32> {
    let dom = Libvirt::open(&a.connect)?.domain(&a.domain)?;
    let running = dom.state()? == State::Active;
    dom.set_metadata(None, running)?;
    println!("{}: no Bulwark policy", a.domain);
    Ok(0)
}

#[derive(clap::Subcommand, Debug)]
pub enum HookCmd {
    /// Install bulwark-hook as DIR/bulwark (copied atomically). libvirtd
    /// looks for hooks when it starts: if this is the first qemu hook on
    /// the host, restart libvirtd once (running VMs keep running).
    Install {
        /// The hook binary (default: bulwark-hook next to this binary).
        #[arg(long)]
        binary: Option<PathBuf>,
        #[arg(long, default_value = "/etc/libvirt/hooks/qemu.d")]
        dir: PathBuf,
    },
    /// Remove DIR/bulwark.
    Uninstall {
        #[arg(long, default_value = "/etc/libvirt/hooks/qemu.d")]
        dir: PathBuf,
    },
}

pub fn hook(c: HookCmd) -> Result<i32> {
    use anyhow::Context;
    match c {
        HookCmd::Install { binary, dir } => {
            let bin = match binary {
                Some(b) => b,
                None => std::env::current_exe()?
                    .parent()
                    .context("locating bulwark-hook")?
                    .join("bulwark-hook"),
            };
            anyhow::ensure!(bin.is_file(), "{} not found", bin.display());
            let first = std::fs::read_dir(&dir).map_or(true, |d| d.count() == 0)
                && !dir.with_extension("").is_file();
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let dst = dir.join("bulwark");
            let tmp = dir.join(".bulwark.tmp");
            std::fs::copy(&bin, &tmp).with_context(|| format!("copying {}", bin.display()))?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
            std::fs::rename(&tmp, &dst)?;
            println!("installed {}", dst.display());
            if first {
                println!(
                    "note: first qemu hook on this host: restart libvirtd once so it finds it"
                );
            }
            Ok(0)
        }
        HookCmd::Uninstall { dir } => {
            let dst = dir.join("bulwark");
            match std::fs::remove_file(&dst) {
                Ok(()) => println!("removed {}", dst.display()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("removing {}", dst.display())),
            }
            Ok(0)
        }
    }
}
