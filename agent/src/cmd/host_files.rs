//! `bulwark backup files` and `bulwark restore files`: file trees of a
//! host (its `/etc`, keys, data), in the same repository as the VMs.
//! Exit code 3: the backup or restore is partial (what is missing is
//! listed), as restic does.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use bulwark_store::files::{self, Excludes, FilesBackup, FilesOptions};

use crate::units::human;
use crate::{secret, Global};

/// The exit code of a backup or restore that left something out.
pub const EXIT_PARTIAL: i32 = 3;

#[derive(clap::Args)]
pub struct BackupFilesArgs {
    /// Files or directories to back up.
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
    /// Name the snapshots of these paths are grouped under (change
    /// detection compares with the latest snapshot of this source).
    #[arg(long, default_value_t = bulwark_store::hostname())]
    pub source: String,
    /// Descend into file systems mounted below the paths (default: stay on
    /// each path's own file system).
    #[arg(long)]
    pub cross_mounts: bool,
    /// Leave out what matches (a name glob, or a path glob with `/`); repeatable.
    #[arg(long = "exclude", value_name = "PATTERN")]
    pub exclude: Vec<String>,
    /// Read exclude patterns from a file (one a line, `#` comments).
    #[arg(long = "exclude-file", value_name = "FILE")]
    pub exclude_file: Vec<PathBuf>,
    /// Read every file, even those unchanged since the last snapshot.
    #[arg(long)]
    pub reread: bool,
    /// The snapshot's time (RFC 3339) instead of now.
    #[arg(long, value_parser = crate::units::parse_time)]
    pub time: Option<chrono::DateTime<chrono::Utc>>,
    /// Worker threads (default: one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args)]
pub struct RestoreFilesArgs {
    /// Snapshot id, unique id prefix, or SOURCE@latest.
    pub snapshot: String,
    /// Only these paths (and what is below them); default: everything.
    pub paths: Vec<PathBuf>,
    /// Directory to restore into (created if missing); paths keep their
    /// place below it (`/etc/hosts` becomes `DIR/etc/hosts`).
    #[arg(long)]
    pub to: PathBuf,
    #[arg(long)]
    pub json: bool,
}

impl BackupFilesArgs {
    /// The store's options of these arguments (also the agent's hosts').
    pub fn options(&self, policy: Option<String>) -> Result<FilesOptions> {
        Ok(FilesOptions {
            source: self.source.clone(),
            paths: self.paths.clone(),
            excludes: Excludes::new(&self.exclude, &self.exclude_file)
                .map_err(anyhow::Error::msg)?,
            cross_mounts: self.cross_mounts,
            reread: self.reread,
            threads: self.threads,
            policy,
            time: self.time,
        })
    }
}

pub fn backup(g: &Global, a: BackupFilesArgs) -> Result<i32> {
    let opts = a.options(None)?;
    let t = Instant::now();
    // The tree is scanned while the passphrase is asked for and derived.
    let scan = files::start(&opts).context("backing up files")?;
    let repo = secret::open(g)?;
    let b = files::backup_started(&repo, &opts, scan).context("backing up files")?;
    let secs = t.elapsed().as_secs_f64();
    if a.json {
        println!("{}", backup_json(&b, secs));
    } else {
        print_backup(&b, secs);
    }
    Ok(if b.errors.is_empty() { 0 } else { EXIT_PARTIAL })
}

/// The `--json` report of a file backup.
pub fn backup_json(b: &FilesBackup, secs: f64) -> serde_json::Value {
    let st = &b.snapshot.stats;
    serde_json::json!({
        "snapshot": b.snapshot.id,
        "source": b.snapshot.source,
        "files": b.files,
        "entries": b.snapshot.files.as_ref().map_or(0, |f| f.entries),
        "bytes": b.snapshot.files.as_ref().map_or(0, |f| f.bytes),
        "bytes_read": b.bytes_read,
        "bytes_reused": b.bytes_reused,
        "files_reused": b.files_reused,
        "bytes_new": st.bytes_new,
        "bytes_stored": st.bytes_stored,
        "sockets_skipped": b.sockets_skipped,
        "partial": !b.errors.is_empty(),
        "errors": errors_json(&b.errors),
        "seconds": secs,
    })
}

fn errors_json(errors: &[(String, String)]) -> serde_json::Value {
    errors
        .iter()
        .map(|(p, e)| serde_json::json!({"path": p, "error": e}))
        .collect()
}

fn print_backup(b: &FilesBackup, secs: f64) {
    for (p, e) in &b.errors {
        eprintln!("warning: {p}: {e}");
    }
    let st = &b.snapshot.stats;
    println!(
        "snapshot {} of {}: {} files, read {}, {} unchanged files reused unread ({}), new {}, stored {}, {:.1}s{}",
        b.snapshot.id.short(),
        b.snapshot.source,
        b.files,
        human(b.bytes_read),
        b.files_reused,
        human(b.bytes_reused),
        human(st.bytes_new),
        human(st.bytes_stored),
        secs,
        if b.errors.is_empty() {
            String::new()
        } else {
            format!("; PARTIAL: {} errors", b.errors.len())
        }
    );
}

pub fn restore(g: &Global, a: RestoreFilesArgs) -> Result<i32> {
    use std::os::unix::ffi::OsStrExt;
    let repo = Arc::new(secret::open(g)?);
    let snap = repo.while_loading_index(|| repo.find_snapshot(&a.snapshot))?;
    let paths: Vec<Vec<u8>> = a
        .paths
        .iter()
        .map(|p| p.as_os_str().as_bytes().to_vec())
        .collect();
    let t = Instant::now();
    let r = files::restore::restore(repo, &snap, &paths, &a.to).with_context(|| {
        format!(
            "restoring snapshot {} to {}",
            snap.id.short(),
            a.to.display()
        )
    })?;
    let secs = t.elapsed().as_secs_f64();
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "snapshot": snap.id, "to": a.to, "entries": r.entries, "files": r.files,
                "bytes": r.bytes, "errors": errors_json(&r.errors), "seconds": secs,
            })
        );
    } else {
        for (p, e) in &r.errors {
            eprintln!("warning: {p}: {e}");
        }
        println!(
            "restored {} entries ({} files, {}) of snapshot {} to {} in {:.1}s",
            r.entries,
            r.files,
            human(r.bytes),
            snap.id.short(),
            a.to.display(),
            secs
        );
    }
    Ok(if r.errors.is_empty() { 0 } else { EXIT_PARTIAL })
}
