//! Bulwark's command line and agent as a library: every module testable
//! without the binary, which only calls [`main`].
//!
//! - [`cmd`]: one module per command (parse arguments, call, print);
//! - [`daemon`]: the agent (schedules, events, jobs, status, enforcement);
//! - [`vm`], [`libvirt`], [`live`], [`drill`]: VM backup, restore and
//!   restore drills on libvirt's API;
//! - [`config`], [`calendar`], [`mail`], [`logging`]: the agent's parts an
//!   operator configures;
//! - [`secret`], [`target`], [`statefile`], [`progress`], [`units`]:
//!   shared by the commands and the agent.

pub mod calendar;
pub mod cmd;
pub mod config;
pub mod daemon;
pub mod drill;
pub mod libvirt;
pub mod live;
pub mod logging;
pub mod mail;
pub mod progress;
pub mod secret;
pub mod statefile;
pub mod target;
pub mod units;
pub mod vm;
pub mod web;

use clap::{Parser, Subcommand};

/// The command line.
#[derive(Parser)]
#[command(
    name = "bulwark",
    version,
    about = "Backup and instant restore for QEMU/libvirt VMs"
)]
pub struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

/// Options every command that touches a repository takes.
#[derive(clap::Args, Clone, Debug)]
pub struct Global {
    /// Repository location: a directory (the embedded local datastore) or
    /// s3://BUCKET/PREFIX.
    #[arg(long, env = "BULWARK_REPO", global = true)]
    pub repo: Option<String>,
    /// Read the passphrase from this file (else $BULWARK_PASSWORD, else a prompt).
    #[arg(long, global = true)]
    pub password_file: Option<std::path::PathBuf>,
    /// Open the repository with this key file instead of a passphrase.
    #[arg(long, global = true)]
    pub key_file: Option<std::path::PathBuf>,
    /// More log output (-v info, -vv debug).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    #[command(flatten)]
    pub backend: secret::BackendArgs,
}

/// What `bulwark` is asked to do.
#[derive(Subcommand)]
pub enum Command {
    /// Create or inspect a repository.
    #[command(subcommand)]
    Repo(cmd::repo::RepoCmd),
    /// Back up a disk image.
    #[command(subcommand)]
    Backup(cmd::image::BackupCmd),
    /// List snapshots.
    Snapshots(cmd::snapshots::Args),
    /// Restore a snapshot.
    #[command(subcommand)]
    Restore(cmd::image::RestoreCmd),
    /// Remove snapshots by retention rules (keep-last/hourly/daily/...).
    Prune(cmd::prune::Args),
    /// Copy snapshots to a replica repository (another site), without a key.
    Sync(cmd::sync::Args),
    /// Prove a VM snapshot boots: an isolated throw-away domain, checked.
    Drill(cmd::drill::Args),
    /// Reclaim space no snapshot uses (safe while backups run).
    Gc(cmd::gc::Args),
    /// Read back every chunk the snapshots use and check it.
    Verify(cmd::verify::Args),
    /// Mount a snapshot read-only: one raw image file per disk.
    Mount(cmd::mount::Args),
    /// Undo `bulwark mount`.
    Umount(cmd::mount::UmountArgs),
    /// Single files from a snapshot's filesystems: ls, get, find (no root).
    #[command(subcommand)]
    Files(cmd::files::FilesCmd),
    /// Name backup policies in a domain's XML (Bulwark's metadata namespace).
    Protect(cmd::vm::ProtectArgs),
    /// Remove Bulwark's policies from a domain's XML.
    Unprotect(cmd::vm::UnprotectArgs),
    /// The agent daemon and its control socket.
    #[command(subcommand)]
    Agent(cmd::agent::AgentCmd),
    /// Install or remove the libvirt hook.
    #[command(subcommand)]
    Hook(cmd::vm::HookCmd),
    /// Measure the throughput of each primitive and of the backup pipeline.
    Benchmark(cmd::bench::Args),
    /// The dashboard (`[web]` in the agent's config) and its users.
    Web(cmd::web::Args),
    /// Print the shell completion script (bash, zsh, fish, ...).
    Completions(cmd::completions::Args),
}

/// Parses the command line, runs the command; the process's exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    if matches!(cli.command, Command::Agent(_)) {
        // Its backups' packs in flight, not the data, set the memory.
        bulwark_store::alloc::map_large_buffers_apart();
    }
    logging::init(cli.global.verbose);
    let r = match cli.command {
        Command::Repo(c) => cmd::repo::run(&cli.global, c),
        Command::Backup(c) => cmd::image::backup(&cli.global, c),
        Command::Snapshots(a) => cmd::snapshots::run(&cli.global, a),
        Command::Restore(c) => cmd::image::restore(&cli.global, c),
        Command::Verify(a) => cmd::verify::run(&cli.global, a),
        Command::Gc(a) => cmd::gc::run(&cli.global, a),
        Command::Sync(a) => cmd::sync::run(&cli.global, a),
        Command::Drill(a) => cmd::drill::run(&cli.global, a),
        Command::Prune(a) => cmd::prune::run(&cli.global, a),
        Command::Mount(a) => cmd::mount::mount(&cli.global, a),
        Command::Umount(a) => cmd::mount::umount(a),
        Command::Files(c) => cmd::files::run(&cli.global, c),
        Command::Benchmark(a) => cmd::bench::run(&cli.global, a),
        Command::Protect(a) => cmd::vm::protect(a),
        Command::Unprotect(a) => cmd::vm::unprotect(a),
        Command::Hook(c) => cmd::vm::hook(c),
        Command::Agent(c) => cmd::agent::run(c),
        Command::Web(a) => cmd::web::run(a),
        Command::Completions(a) => cmd::completions::run(a),
    };
    match r {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    }
}
