//! The `bulwark-nbd` command line, in the library so the man page and
//! completions are generated from the same definition (`docgen`).

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};
use serde::{Deserialize, Serialize};

/// `bulwark-nbd`'s arguments.
#[derive(Parser)]
#[command(
    name = "bulwark-nbd",
    version,
    about = "Serve Bulwark snapshots over NBD (read-only)"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Cmd,
}

/// What `bulwark-nbd` is asked to do.
#[derive(Subcommand)]
pub enum Cmd {
    /// Serve every disk of one snapshot until interrupted (SIGINT/SIGTERM).
    Serve {
        /// Repository location: a directory or s3://BUCKET/PREFIX.
        #[arg(long, env = "BULWARK_REPO")]
        repo: String,
        /// Snapshot id, unique id prefix, or SOURCE@latest.
        #[arg(long)]
        snapshot: String,
        /// Unix socket to listen on.
        #[arg(long, conflicts_with = "listen")]
        socket: Option<PathBuf>,
        /// TCP address, ADDR:PORT. Beyond loopback only with TLS required
        /// (--tls-creds) or --insecure: plain NBD has no authentication.
        #[arg(long)]
        listen: Option<String>,
        /// Directory with server-cert.pem and server-key.pem (QEMU's
        /// tls-creds-x509 layout); with a ca-cert.pem there too, clients
        /// must present a certificate signed by that CA.
        #[arg(long, value_name = "DIR")]
        tls_creds: Option<PathBuf>,
        /// require: every option before STARTTLS is refused with
        /// NBD_REP_ERR_TLS_REQD (as qemu-nbd does). allow: plain-text
        /// clients are served too.
        #[arg(long, value_enum, default_value_t = TlsArg::Require, requires = "tls_creds")]
        tls: TlsArg,
        /// Listen beyond loopback without required TLS: anyone who can reach
        /// the port can read every disk of the snapshot.
        #[arg(long)]
        insecure: bool,
        /// Read the passphrase from this file (else $BULWARK_PASSWORD).
        #[arg(long)]
        password_file: Option<PathBuf>,
        /// Open the repository with this key file instead of a passphrase.
        #[arg(long)]
        key_file: Option<PathBuf>,
        /// Memory for decrypted chunks and fetches in flight, in MiB
        /// (shared by the disks): what the server's memory follows, whatever
        /// the disk's size. From a fast, near S3 server more fetches in
        /// flight buy throughput (512: about 30% more from a loopback one,
        /// in 500 MiB instead of 180).
        #[arg(long, default_value_t = 128)]
        cache_mib: usize,
        /// Fetch these blocks first, in order, in parallel (a restore
        /// drill's report: its `boot_set` per disk), while the client
        /// starts.
        #[arg(long, value_name = "FILE")]
        boot_set: Option<PathBuf>,
        /// Write counters (boot set queued, reads that waited for the
        /// repository and for how long) to FILE as JSON every second.
        #[arg(long, value_name = "FILE")]
        stats: Option<PathBuf>,
        /// Reads wait up to this many seconds for an unreachable repository
        /// (an S3 outage) instead of failing (0: they fail once the
        /// backend's own retries are spent).
        #[arg(long, value_name = "SECONDS", default_value_t = 0)]
        outage_wait: u64,
        /// Restore disk DISK into the local raw file PATH in the background,
        /// as `bulwark restore` does (a live restore's backfill); the file
        /// appears once complete. Repeat for each disk.
        #[arg(long, value_name = "DISK=PATH")]
        backfill: Vec<crate::backfill::Job>,
        /// Cap the backfill at this many MiB/s of data (0: none).
        #[arg(long, value_name = "MIB", default_value_t = 0)]
        backfill_mib_per_sec: u64,
        /// Record the blocks clients read in their first SECONDS (or until
        /// the server stops) and store them in the repository beside the
        /// snapshot: the boot set the next live restore of the VM fetches
        /// first.
        #[arg(long, value_name = "SECONDS")]
        record_boot_set: Option<u64>,
        /// A replica holding the same snapshot (`repo init --replica-of`
        /// and `sync`), opened with the same secret: what the repository
        /// cannot give (unreachable, a pack gone) is read from it, and it
        /// serves alone when the repository cannot be opened at all.
        #[arg(long, value_name = "LOCATION")]
        replica: Option<String>,
        /// Read the backfill jobs and the boot set as one JSON line on
        /// stdin (a [`ServePlan`]) once the disks are open: how `bulwark
        /// restore vm --live` starts the server while it reads the snapshot
        /// itself.
        #[arg(long, hide = true, conflicts_with_all = ["backfill", "boot_set"])]
        plan_on_stdin: bool,
    },
}

/// What `serve --plan-on-stdin` reads: the snapshot the command planned
/// (full id), `DISK=PATH` backfill jobs and the boot set file, if any.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct ServePlan {
    pub snapshot: String,
    #[serde(default)]
    pub backfill: Vec<String>,
    #[serde(default)]
    pub boot_set: Option<PathBuf>,
}

/// `--tls`: whether plain-text clients are served.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TlsArg {
    Require,
    Allow,
}
