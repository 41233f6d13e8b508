//! Restores: a snapshot's disk written back to a file or device, sparse.
//!
//! A file target is written beside its final name and renamed only once
//! complete, so a failed restore never leaves a file that looks whole. A
//! block device is written in place and, not being sparse, gets its zero
//! extents written as zeros too.
//!
//! Chunks that sit next to each other in one pack (the usual case: a disk's
//! chunks are packed in disk order) are fetched with one ranged read, and
//! several such reads run in parallel. Every chunk is authenticated before a
//! byte of it is written; a damaged one stops the restore with an error.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::error::{Error, Result};
use crate::format::chunklist::ChunkList;
use crate::format::index::Index;
use crate::read::fetch;
use crate::repo::Repository;

/// Largest single ranged read.
const MAX_BATCH: u64 = 32 << 20;

#[derive(Clone, Debug, Default)]
pub struct RestoreOptions {
    /// Parallel fetch/decrypt/write threads; 0 = the backend's choice
    /// (`Backend::read_concurrency`).
    pub threads: usize,
}

/// What [`restore_to_path`] may write over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Overwrite {
    /// Nothing: an existing file or any block device is refused.
    Never,
    /// An existing file is replaced (once the restore is complete) and a
    /// block device is overwritten.
    Allowed,
}

/// Where a disk was restored to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// A sparse file (zero extents are holes).
    File,
    /// A block device (zero extents written as zeros).
    Device,
}

/// Who watches a file restore as it writes (a live restore's server, which
/// serves what its backfill has written from the file rather than the
/// repository). Offsets are the disk's, which are the file's.
pub trait Watch: Sync {
    /// A restore into a new file starts: what an earlier one wrote is no
    /// longer there (the file it opens next may be the same, truncated).
    fn starting(&self) {}
    /// The file, open for reading and writing, sized, all holes.
    fn opened(&self, _file: &File) {}
    /// `[offset, offset + len)` holds the disk's bytes now.
    fn wrote(&self, _offset: u64, _len: u64) {}
}

/// Nobody watches.
pub struct Unwatched;

impl Watch for Unwatched {}

/// Restores the disk of `list` (`size` bytes) to `to`: a new sparse file,
/// or with [`Overwrite::Allowed`] an existing file or a block device at
/// least `size` bytes long. On error nothing is left at `to` that was not
/// there before (a device keeps whatever was written).
pub fn restore_to_path(
    repo: &Repository,
    list: &ChunkList,
    size: u64,
    to: &Path,
    overwrite: Overwrite,
    opts: &RestoreOptions,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<Target> {
    restore_to_path_watched(repo, list, size, to, overwrite, opts, progress, &Unwatched)
}

/// [`restore_to_path`], a file target's writes told to `watch` as they land.
#[allow(clippy::too_many_arguments)]
pub fn restore_to_path_watched(
    repo: &Repository,
    list: &ChunkList,
    size: u64,
    to: &Path,
    overwrite: Overwrite,
    opts: &RestoreOptions,
    progress: &(dyn Fn(u64) + Sync),
    watch: &dyn Watch,
) -> Result<Target> {
    let meta = match std::fs::metadata(to) {
        Ok(m) => Some(m),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(Error::io(format!("stat {}", to.display()), e)),
    };
    if meta.is_some() && overwrite == Overwrite::Never {
        return Err(Error::TargetExists(to.display().to_string()));
    }
    if meta.is_some_and(|m| m.file_type().is_block_device()) {
        restore_to_device(repo, list, size, to, opts, progress)?;
        return Ok(Target::Device);
    }
    // A partial file left by a killed restore carries our name: reuse it.
    let tmp = partial_name(to);
    watch.starting();
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(|e| Error::io(format!("create {}", tmp.display()), e))?;
    let written = f
        .set_len(size)
        .map_err(|e| Error::io(format!("size {}", tmp.display()), e))
        .and_then(|()| {
            // Truncated and sized: the zero extents are holes already.
            preallocate_data(&f, list);
            watch.opened(&f);
            for e in list.extents().iter().filter(|e| e.chunk.is_none()) {
                watch.wrote(e.offset, e.len);
            }
            restore_into_watched(repo, list, &f, &Layout::identity(), opts, progress, watch)
        })
        .and_then(|()| {
            f.sync_all()
                .map_err(|e| Error::io(format!("fsync {}", tmp.display()), e))
        });
    drop(f);
    if let Err(e) = written {
        // The partial file is ours alone: removing it loses nothing.
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, to).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(format!("rename to {}", to.display()), e)
    })?;
    if let Some(dir) = to.parent().filter(|d| !d.as_os_str().is_empty()) {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| Error::io(format!("fsync {}", dir.display()), e))?;
    }
    Ok(Target::File)
}

/// Reserves the blocks of the disk's data extents in the new file, which
/// stays sparse where the disk is zero. Writes into reserved blocks skip the
/// filesystem's allocation: on ext4 the parallel writers of a restore into
/// holes contend on the inode's allocation lock, and 2 GiB written by 4
/// threads cost 0.8-0.9 s of system time, with one run in three spinning
/// for 3-9 s, against 0.65-0.7 s and no spin into reserved blocks. Only a
/// hint: a filesystem that cannot reserve (ZFS, some network ones; or one
/// short of space, where the writes report it) just allocates as they land,
/// so an error here stops the reserving and changes no byte written. Not on
/// btrfs, which writes reserved blocks in place and so never compresses
/// them: on a compressed mount the image would take its full size.
fn preallocate_data(f: &File, list: &ChunkList) {
    if on_btrfs(f) {
        return;
    }
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for e in list.extents().iter().filter(|e| e.chunk.is_some()) {
        match runs.last_mut() {
            Some((o, l)) if *o + *l == e.offset => *l += e.len,
            _ => runs.push((e.offset, e.len)),
        }
    }
    for (offset, len) in runs {
        let (Ok(o), Ok(l)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            return;
        };
        // SAFETY: fallocate on a descriptor `f` owns; no memory is touched.
        if unsafe { libc::fallocate(f.as_raw_fd(), 0, o, l) } != 0 {
            tracing::debug!(
                "restore writes allocate as they go: {}",
                std::io::Error::last_os_error()
            );
            return;
        }
    }
}

/// Whether `f` is on btrfs (unknown: no).
fn on_btrfs(f: &File) -> bool {
    let mut st = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: fstatfs writes a whole `statfs` into `st` when it returns 0,
    // and `st` is read only then.
    if unsafe { libc::fstatfs(f.as_raw_fd(), st.as_mut_ptr()) } != 0 {
        return false;
    }
    // SAFETY: initialized by the successful call above.
    let st = unsafe { st.assume_init() };
    st.f_type == libc::BTRFS_SUPER_MAGIC
}

/// `DIR/.NAME.bulwark-partial`: hidden, and named for what it will become.
pub fn partial_name(to: &Path) -> PathBuf {
    let mut name = std::ffi::OsString::from(".");
    name.push(to.file_name().unwrap_or_default());
    name.push(".bulwark-partial");
    to.with_file_name(name)
}

fn restore_to_device(
    repo: &Repository,
    list: &ChunkList,
    size: u64,
    dev: &Path,
    opts: &RestoreOptions,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<()> {
    let f = OpenOptions::new()
        .write(true)
        .open(dev)
        .map_err(|e| Error::io(format!("open {}", dev.display()), e))?;
    let dev_size = std::io::Seek::seek(&mut &f, std::io::SeekFrom::End(0))
        .map_err(|e| Error::io(format!("size of {}", dev.display()), e))?;
    if dev_size < size {
        return Err(Error::Invalid(format!(
            "{} holds {dev_size} bytes, the disk needs {size}",
            dev.display()
        )));
    }
    for e in list.extents().iter().filter(|e| e.chunk.is_none()) {
        zero_range(&f, e.offset, e.len)
            .map_err(|err| Error::io(format!("zeroing {} at {}", dev.display(), e.offset), err))?;
    }
    restore_to_file(repo, list, &f, opts, progress)?;
    f.sync_all()
        .map_err(|e| Error::io(format!("fsync {}", dev.display()), e))
}

/// Makes `[offset, offset + len)` read as zeros: `FALLOC_FL_ZERO_RANGE`
/// (write-zeroes on a device), else plain writes of zeros.
fn zero_range(f: &File, offset: u64, len: u64) -> std::io::Result<()> {
    if let (Ok(o), Ok(l)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) {
        // SAFETY: fallocate on a descriptor `f` owns; no memory is touched.
        let r = unsafe { libc::fallocate(f.as_raw_fd(), libc::FALLOC_FL_ZERO_RANGE, o, l) };
        if r == 0 {
            return Ok(());
        }
        // Unsupported or unaligned: fall through to writing zeros, which
        // either works or fails with its own error.
    }
    const STEP: u64 = 1 << 20;
    let zeros = vec![0u8; STEP.min(len) as usize];
    let mut pos = offset;
    while pos < offset + len {
        let n = STEP.min(offset + len - pos) as usize;
        f.write_all_at(&zeros[..n], pos)?;
        pos += n as u64;
    }
    Ok(())
}

/// Writes the chunks of the disk described by `list` into `out` (already
/// sized; zero extents are not written, so a new file keeps them as holes). `progress` is called with bytes done.
pub fn restore_to_file(
    repo: &Repository,
    list: &ChunkList,
    out: &File,
    opts: &RestoreOptions,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<()> {
    restore_into(repo, list, out, &Layout::identity(), opts, progress)
}

/// Where each byte of the disk goes in the output file: runs of
/// `(disk offset, length, file offset)`, sorted. The identity for a raw
/// image; for a qcow2 image with metadata preallocated, the data clusters'
/// places (`qemu-img map`), so a restore writes the clusters in place.
#[derive(Clone, Debug)]
pub struct Layout {
    runs: Vec<(u64, u64, u64)>,
}

impl Layout {
    pub fn identity() -> Layout {
        Layout {
            runs: vec![(0, u64::MAX, 0)],
        }
    }

    /// Runs must be sorted, not overlap, and cover `0..size` without gaps.
    pub fn new(mut runs: Vec<(u64, u64, u64)>, size: u64) -> Result<Layout> {
        runs.sort_unstable();
        let mut at = 0;
        for &(start, len, _) in &runs {
            if start != at || len == 0 {
                return Err(Error::Invalid(format!(
                    "layout has a gap or overlap at disk offset {at}"
                )));
            }
            at = start + len;
        }
        if at < size {
            return Err(Error::Invalid(format!(
                "layout ends at {at}, before the disk's size {size}"
            )));
        }
        Ok(Layout { runs })
    }

    /// Writes `data`, which belongs at disk offset `off`, where the layout
    /// places it (split at run boundaries).
    fn write_at(
        &self,
        out: &File,
        mut data: &[u8],
        mut off: u64,
        written: &mut Written,
    ) -> Result<()> {
        while !data.is_empty() {
            let i = self.runs.partition_point(|r| r.0 <= off).saturating_sub(1);
            let (start, len, host) = *self.runs.get(i).ok_or_else(|| {
                Error::Invalid(format!("disk offset {off} is outside the layout"))
            })?;
            let in_run = off - start;
            if in_run >= len {
                return Err(Error::Invalid(format!(
                    "disk offset {off} is outside the layout"
                )));
            }
            let n = (len - in_run).min(data.len() as u64) as usize;
            out.write_all_at(&data[..n], host + in_run)
                .map_err(|err| Error::io(format!("write at offset {}", host + in_run), err))?;
            written.add(host + in_run, n as u64);
            data = &data[n..];
            off += n as u64;
        }
        Ok(())
    }
}

/// [`restore_to_file`] with the disk placed in `out` by `layout`.
pub fn restore_into(
    repo: &Repository,
    list: &ChunkList,
    out: &File,
    layout: &Layout,
    opts: &RestoreOptions,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<()> {
    restore_into_watched(repo, list, out, layout, opts, progress, &Unwatched)
}

fn restore_into_watched(
    repo: &Repository,
    list: &ChunkList,
    out: &File,
    layout: &Layout,
    opts: &RestoreOptions,
    progress: &(dyn Fn(u64) + Sync),
    watch: &dyn Watch,
) -> Result<()> {
    let index = repo.index_for(crate::read::reader::chunks_of(list))?;
    let batches = fetch::plan(&index, list, MAX_BATCH)?;
    let zero_bytes: u64 = list
        .extents()
        .iter()
        .filter(|e| e.chunk.is_none())
        .map(|e| e.len)
        .sum();
    progress(zero_bytes);
    let threads = match opts.threads {
        0 => repo.backend().read_concurrency(),
        n => n,
    };
    let next = AtomicUsize::new(0);
    let failed: Mutex<Option<Error>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..threads.min(batches.len().max(1)) {
            s.spawn(|| {
                let mut bufs = fetch::Scratch::default();
                loop {
                    if failed.lock().map(|f| f.is_some()).unwrap_or(true) {
                        return;
                    }
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(b) = batches.get(i) else { return };
                    let r = restore_span(
                        repo, &index, list, b, out, layout, &mut bufs, progress, watch,
                    );
                    if let Err(e) = r {
                        let mut f = failed.lock().unwrap_or_else(|p| p.into_inner());
                        f.get_or_insert(e);
                        return;
                    }
                }
            });
        }
    });
    if let Some(e) = failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn restore_span(
    repo: &Repository,
    index: &Index,
    list: &ChunkList,
    span: &fetch::Span,
    out: &File,
    layout: &Layout,
    bufs: &mut fetch::Scratch,
    progress: &(dyn Fn(u64) + Sync),
    watch: &dyn Watch,
) -> Result<()> {
    fetch::fetch(repo, index, &[span], fetch::Reads::Once, &mut bufs.fetched)?;
    let mut written = Written::default();
    fetch::open_each(
        repo,
        index,
        list,
        span,
        &mut bufs.fetched,
        span.start,
        &mut bufs.chunk,
        |i, data| {
            let e = &list.extents()[i];
            layout.write_at(out, data?.bytes(), e.offset, &mut written)?;
            watch.wrote(e.offset, e.len);
            progress(e.len);
            Ok(())
        },
    )?;
    written.start_writeback(out);
    Ok(())
}

/// The file range a span's writes touched (in file offsets), if any.
#[derive(Default)]
struct Written(Option<(u64, u64)>);

impl Written {
    fn add(&mut self, at: u64, len: u64) {
        let (lo, hi) = self.0.unwrap_or((at, at + len));
        self.0 = Some((lo.min(at), hi.max(at + len)));
    }

    /// Starts writing the range's dirty pages to disk now, so the final
    /// fsync waits for the tail of the restore, not for all of it (with the
    /// kernel's default thresholds nothing would be written back before
    /// the fsync on a host with a few GiB free). Only a hint: an error here
    /// changes nothing, the fsync at the end reports any write error.
    fn start_writeback(&self, out: &File) {
        let Some((lo, hi)) = self.0 else { return };
        let (Ok(lo), Ok(len)) = (
            libc::off64_t::try_from(lo),
            libc::off64_t::try_from(hi - lo),
        ) else {
            return;
        };
        if len > 0 {
            // SAFETY: a syscall on a descriptor `out` owns; no memory passed.
            unsafe { libc::sync_file_range(out.as_raw_fd(), lo, len, libc::SYNC_FILE_RANGE_WRITE) };
        }
    }
}

#[cfg(test)]
mod layout_tests {
    use super::*;

    #[test]
    fn a_new_file_reserves_its_data_extents_and_stays_sparse_where_zero() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let mib = 1u64 << 20;
        let mut list = ChunkList::new();
        list.push(2 * mib, Some(crate::Id([1; 32])));
        list.push(mib, Some(crate::Id([2; 32])));
        list.push(64 * mib, None);
        list.push(mib, Some(crate::Id([3; 32])));
        f.set_len(list.size()).unwrap();
        preallocate_data(&f, &list);
        let allocated = std::fs::metadata(&path).unwrap().blocks() * 512;
        // A filesystem that cannot reserve allocates as the writes land.
        let probe = File::create(dir.path().join("probe")).unwrap();
        // SAFETY: fallocate on a descriptor the test owns.
        if unsafe { libc::fallocate(probe.as_raw_fd(), 0, 0, 4096) } == 0 {
            assert!(allocated >= 4 * mib, "{allocated}");
            assert!(
                allocated < 8 * mib,
                "the zero extent was reserved: {allocated}"
            );
        }
        let mut b = vec![1u8; 4096];
        f.read_exact_at(&mut b, mib).unwrap();
        assert!(b.iter().all(|&x| x == 0), "reserved blocks read as zeros");
    }

    #[test]
    fn writes_land_where_the_layout_says() {
        let dir = tempfile::tempdir().unwrap();
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("out"))
            .unwrap();
        // Disk 0..8 at file 100, disk 8..16 at file 10.
        let l = Layout::new(vec![(8, 8, 10), (0, 8, 100)], 16).unwrap();
        let mut w = Written::default();
        l.write_at(&f, b"abcdefghijkl", 2, &mut w).unwrap();
        assert_eq!(w.0, Some((10, 108)));
        let mut b = vec![0u8; 108];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut b, 0).unwrap();
        assert_eq!(&b[102..108], b"abcdef");
        assert_eq!(&b[10..16], b"ghijkl");
        assert!(l.write_at(&f, b"x", 16, &mut w).is_err());
        assert!(Layout::new(vec![(0, 8, 0), (9, 7, 8)], 16).is_err());
        assert!(Layout::new(vec![(0, 8, 0)], 16).is_err());
    }
}
