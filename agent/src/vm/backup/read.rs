//! Reading one exported disk into the backup session: the dirty extents
//! from the base's chunk list, or everything.

use anyhow::{Context, Result};
use bulwark_store::{BackupSession, Mode, Repository};

use super::{DiskReport, ReadMode};
use crate::vm::chain::{Base, DiskPlan};
use crate::vm::nbdsrc::NbdSource;

pub(super) fn read_disk(
    repo: &Repository,
    mut src: NbdSource,
    p: &DiskPlan<'_>,
    base: &Base,
    dirty_ctx: Option<&str>,
    session: &mut BackupSession<'_>,
) -> Result<DiskReport> {
    let target = &p.disk.target;
    let (result, dirty_info) = match (dirty_ctx, &base.from) {
        (Some(ctx), Some((_, snap))) => {
            let entry = snap
                .disks
                .iter()
                .find(|d| &d.name == target)
                .context("disk missing from the base snapshot")?;
            let parent = repo.load_chunk_list(&entry.chunk_list)?;
            let dirty = src.dirty(ctx)?;
            let bytes: u64 = dirty.iter().map(|d| d.len).sum();
            tracing::info!("{target}: {} dirty extents, {bytes} bytes", dirty.len());
            let r = session
                .backup_disk(
                    target,
                    &mut src,
                    Mode::Incremental {
                        parent: &parent,
                        dirty: &dirty,
                    },
                )
                .with_context(|| format!("backing up {target}"))?;
            (r, Some((bytes, dirty.len())))
        }
        _ => (
            session
                .backup_disk(target, &mut src, Mode::Full)
                .with_context(|| format!("backing up {target}"))?,
            None,
        ),
    };
    src.close();
    let inc = dirty_info.is_some() && !result.fell_back_to_full;
    Ok(DiskReport {
        name: target.clone(),
        format: p.disk.format.to_string(),
        mode: if inc {
            ReadMode::Incremental
        } else {
            ReadMode::Full
        },
        reason: if inc {
            None
        } else if result.fell_back_to_full {
            Some("disk size changed".into())
        } else {
            p.full_reason.clone()
        },
        size: result.size,
        dirty_bytes: dirty_info.map(|d| d.0),
        dirty_extents: dirty_info.map(|d| d.1),
        bytes_read: result.stats.bytes_read,
        chunks_new: result.stats.chunks_new,
        chunks_reused: result.stats.chunks_reused,
    })
}
