//! `bulwark backup image` and `bulwark restore image`: raw disk images.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use bulwark_store::format::snapshot::{DiskEntry, Snapshot};
use bulwark_store::read::restore::{restore_to_path, Overwrite, RestoreOptions};
use bulwark_store::{BackupOptions, BackupSession, ImageFile, Mode, SnapshotMeta};
use clap::Subcommand;

use crate::units::human;
use crate::{progress, secret, Global};

#[derive(Subcommand)]
pub enum BackupCmd {
    /// Back up a raw image file (or block device), reading only its data
    /// extents (SEEK_DATA/SEEK_HOLE). Raw images carry no dirty bitmap, so
    /// every run reads all data; deduplication keeps what it stores small.
    Image {
        file: PathBuf,
        /// Name the snapshots of this image are grouped under.
        #[arg(long)]
        source: String,
        /// Name of the disk in the snapshot (NBD export and mount file name).
        #[arg(long, default_value = "vda")]
        disk: String,
        /// Snapshot recorded as the parent (default: SOURCE@latest, if any).
        #[arg(long)]
        parent: Option<String>,
        /// The snapshot's time (RFC 3339) instead of now, as `restic backup
        /// --time` (imports, crafted histories).
        #[arg(long, value_parser = crate::units::parse_time)]
        time: Option<chrono::DateTime<chrono::Utc>>,
        /// Worker threads (default: one per core).
        #[arg(long, default_value_t = 0)]
        threads: usize,
        #[arg(long)]
        json: bool,
    },
    /// Back up a libvirt domain (running or stopped), incrementally when its
    /// dirty bitmaps allow.
    Vm(super::vm::BackupVmArgs),
    /// Back up files and directories of this host (all metadata; unchanged
    /// files since the source's last snapshot are not read). Exit code 3:
    /// something could not be read (listed; the snapshot is partial).
    Files(super::host_files::BackupFilesArgs),
}

#[derive(Subcommand)]
pub enum RestoreCmd {
    /// Restore VM snapshots as new libvirt domains (disks, XML, start), or
    /// with --live boot them at once while the disks are copied in.
    Vm(super::restore_vm::Args),
    /// Live restores: phase, bytes streamed, throughput, ETA.
    Status(super::restore_live::StatusArgs),
    /// Stop a live restore (the VM is destroyed; --keep keeps its disks).
    Cancel(super::restore_live::CancelArgs),
    /// Stream a failed live restore again (the VM and guest writes kept).
    Retry(super::restore_live::RetryArgs),
    /// Restore a file snapshot (or the paths named) below a directory, with
    /// owners, modes, times, xattrs, ACLs, hard links and holes. Exit code
    /// 3: some entries could not be restored (listed).
    Files(super::host_files::RestoreFilesArgs),
    /// Write a snapshot's disk to a new sparse raw image file, or with
    /// --force over an existing file or a block device (zeros written).
    Image {
        /// Snapshot id, unique id prefix, or SOURCE@latest.
        snapshot: String,
        #[arg(long)]
        to: PathBuf,
        /// Which disk of the snapshot (default: its only disk).
        #[arg(long)]
        disk: Option<String>,
        /// Replace an existing file, or write over a block device.
        #[arg(long)]
        force: bool,
        #[arg(long, default_value_t = 0)]
        threads: usize,
        #[arg(long)]
        json: bool,
    },
}

pub fn backup(g: &Global, c: BackupCmd) -> Result<i32> {
    if !matches!(c, BackupCmd::Files(_)) {
        // A disk's packs in flight, not its data, set the memory. (A file
        // backup's memory is its catalog; it keeps glibc's own threshold.)
        bulwark_store::alloc::map_large_buffers_apart();
    }
    let c = match c {
        BackupCmd::Vm(a) => return super::vm::backup(g, a),
        BackupCmd::Files(a) => return super::host_files::backup(g, a),
        c => c,
    };
    let BackupCmd::Image {
        file,
        source,
        disk,
        parent,
        time,
        threads,
        json,
    } = c
    else {
        unreachable!("handled above")
    };
    let repo = secret::open(g)?;
    let parent = match parent {
        Some(p) => Some(repo.find_snapshot(&p)?.id),
        None => repo
            .snapshots()?
            .into_iter()
            .rfind(|s| s.source == source)
            .map(|s| s.id),
    };
    let mut src = ImageFile::open(&file).with_context(|| format!("opening {}", file.display()))?;
    let t = Instant::now();
    let mut session = BackupSession::new(
        &repo,
        &BackupOptions {
            threads,
            ..Default::default()
        },
    )?;
    session
        .backup_disk(&disk, &mut src, Mode::Full)
        .with_context(|| format!("backing up {}", file.display()))?;
    let snap = session.finish(SnapshotMeta {
        source,
        parent,
        time,
        ..Default::default()
    })?;
    let secs = t.elapsed().as_secs_f64();
    let st = &snap.stats;
    let size = snap.size();
    // Bytes not read (holes) and bytes kept as zero extents, so a backup
    // that read little says why.
    let holes = size.saturating_sub(st.bytes_read);
    let zeros = size.saturating_sub(snap.disks.iter().map(|d| d.data_bytes).sum());
    if json {
        println!(
            "{}",
            serde_json::json!({
                "snapshot": snap.id,
                "source": snap.source,
                "mode": "full",
                "size": size,
                "block_device": src.is_device(),
                "bytes_read": st.bytes_read,
                "bytes_holes": holes,
                "bytes_zero": zeros,
                "bytes_new": st.bytes_new,
                "bytes_stored": st.bytes_stored,
                "chunks_new": st.chunks_new,
                "chunks_reused": st.chunks_reused,
                "seconds": secs,
            })
        );
    } else {
        let mut why = Vec::new();
        if src.is_device() {
            why.push("block device: read whole".to_string());
        }
        if holes > 0 {
            why.push(format!("{} in holes not read", human(holes)));
        }
        if zeros > 0 {
            why.push(format!("{} of zeros kept as zero extents", human(zeros)));
        }
        let why = if why.is_empty() {
            String::new()
        } else {
            format!(" ({})", why.join(", "))
        };
        println!(
            "snapshot {} of {}: read {} of {}{why} in {:.1}s ({:.0} MiB/s), new {}, stored {}",
            snap.id.short(),
            snap.source,
            human(st.bytes_read),
            human(size),
            secs,
            st.bytes_read as f64 / (1 << 20) as f64 / secs.max(1e-6),
            human(st.bytes_new),
            human(st.bytes_stored)
        );
    }
    Ok(0)
}

/// The disk of `snap` named `name`, or its only disk.
fn disk_of<'a>(snap: &'a Snapshot, name: Option<&str>) -> Result<&'a DiskEntry> {
    match name {
        Some(name) => snap
            .disks
            .iter()
            .find(|d| d.name == name)
            .with_context(|| format!("snapshot {} has no disk {name}", snap.id.short())),
        None if snap.disks.len() == 1 => Ok(&snap.disks[0]),
        None => bail!(
            "snapshot {} has {} disks ({}): pick one with --disk",
            snap.id.short(),
            snap.disks.len(),
            snap.disks
                .iter()
                .map(|d| d.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

pub fn restore(g: &Global, c: RestoreCmd) -> Result<i32> {
    let c = match c {
        RestoreCmd::Vm(a) => return super::restore_vm::run(g, a),
        RestoreCmd::Status(a) => return super::restore_live::status(a),
        RestoreCmd::Cancel(a) => return super::restore_live::cancel(a),
        RestoreCmd::Retry(a) => return super::restore_live::retry(a),
        RestoreCmd::Files(a) => return super::host_files::restore(g, a),
        c => c,
    };
    let RestoreCmd::Image {
        snapshot,
        to,
        disk,
        force,
        threads,
        json,
    } = c
    else {
        unreachable!("handled above")
    };
    let repo = secret::open(g)?;
    // The restore reads only this disk's part of the index.
    let snap = repo.find_snapshot(&snapshot)?;
    let list = repo.load_chunk_list(&disk_of(&snap, disk.as_deref())?.chunk_list)?;
    let d = disk_of(&snap, disk.as_deref())?;
    let pb = progress::bar(d.size, &format!("restore {}", d.name));
    let t = Instant::now();
    let overwrite = if force {
        Overwrite::Allowed
    } else {
        Overwrite::Never
    };
    let r = restore_to_path(
        &repo,
        &list,
        d.size,
        &to,
        overwrite,
        &RestoreOptions { threads },
        &|n| pb.inc(n),
    );
    pb.finish_and_clear();
    match r {
        Ok(_) => {}
        Err(bulwark_store::Error::TargetExists(_)) => {
            bail!("{} exists; pass --force to replace it", to.display())
        }
        Err(e) => {
            return Err(e).with_context(|| {
                format!(
                    "restoring {} of snapshot {} to {}",
                    d.name,
                    snap.id.short(),
                    to.display()
                )
            })
        }
    }
    let secs = t.elapsed().as_secs_f64();
    if json {
        println!(
            "{}",
            serde_json::json!({
                "snapshot": snap.id, "disk": d.name, "to": to, "size": d.size,
                "data_bytes": d.data_bytes, "seconds": secs,
            })
        );
    } else {
        println!(
            "restored {} of snapshot {} to {} ({}, {} of data) in {:.1}s",
            d.name,
            snap.id.short(),
            to.display(),
            human(d.size),
            human(d.data_bytes),
            secs
        );
    }
    Ok(0)
}
