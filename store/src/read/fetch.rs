//! How a disk's chunks are fetched: runs of chunks that sit back to back in
//! one pack become one ranged read (a *span*). Shared by restores (which
//! walk every span) and [`crate::read::reader::DiskReader`] (which fetches spans
//! on demand and ahead of a sequential reader).

use crate::error::{Error, Result};
use crate::format::blob::{ChunkBuf, Plain};
use crate::format::chunklist::ChunkList;
use crate::format::index::{Index, Loc};
use crate::format::layout;
use crate::repo::Repository;

/// Consecutive data extents of a chunk list whose chunks lie back to back
/// in one pack: one ranged read fetches them all.
#[derive(Clone, Debug)]
pub struct Span {
    pub pack: u32,
    /// Byte range in the pack.
    pub start: u64,
    pub end: u64,
    /// (extent index in the chunk list, where its chunk is).
    pub items: Vec<(usize, Loc)>,
}

impl Span {
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

/// Splits the data extents of `list` into spans of at most `max` bytes (a
/// single larger chunk is a span of its own). Fails if a chunk is missing
/// from the index: a restore must not start what it cannot finish.
pub fn plan(index: &Index, list: &ChunkList, max: u64) -> Result<Vec<Span>> {
    let mut out: Vec<Span> = Vec::new();
    for (i, e) in list.extents().iter().enumerate() {
        let Some(id) = e.chunk else { continue };
        let loc = index.get(&id).ok_or(Error::MissingChunk(id))?;
        let (s, end) = (
            u64::from(loc.offset),
            u64::from(loc.offset) + u64::from(loc.len),
        );
        match out.last_mut() {
            Some(b) if b.pack == loc.pack && b.end == s && end - b.start <= max => {
                b.end = end;
                b.items.push((i, loc));
            }
            _ => out.push(Span {
                pack: loc.pack,
                start: s,
                end,
                items: vec![(i, loc)],
            }),
        }
    }
    Ok(out)
}

/// What a thread reuses from one fetch to the next: the fetched pack
/// bytes and the chunk buffer (no allocation per fetch or chunk).
#[derive(Default)]
pub struct Scratch {
    pub fetched: Vec<u8>,
    pub chunk: ChunkBuf,
}

/// How often the bytes of a fetch are read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reads {
    /// Once (a full restore, a read-ahead stream): not worth a place in
    /// the disk cache.
    Once,
    /// Maybe again (an export's or a mount's demand read): cached.
    Again,
}

/// Fetches the pack bytes of consecutive spans `spans` (all in one pack,
/// back to back) with one ranged read, into `buf`.
pub fn fetch(
    repo: &Repository,
    index: &Index,
    spans: &[&Span],
    reads: Reads,
    buf: &mut Vec<u8>,
) -> Result<()> {
    let (Some(first), Some(last)) = (spans.first(), spans.last()) else {
        buf.clear();
        return Ok(());
    };
    let name = layout::pack(&index.packs()[first.pack as usize].id);
    let (start, len) = (first.start, last.end - first.start);
    let backend = repo.backend();
    Ok(match reads {
        Reads::Once => backend.get_range_once(&name, start, len, buf),
        Reads::Again => backend.get_range_into(&name, start, len, buf),
    }?)
}

/// Opens the chunks of `span` from `bytes` (the pack bytes from `base`,
/// which is at or before `span.start`), decrypting them where they lie, and
/// hands each to `f` with its extent's index in the chunk list:
/// authenticated and as long as the chunk list says, or its own error. An
/// error `f` returns stops the walk and is returned.
#[allow(clippy::too_many_arguments)]
pub fn open_each(
    repo: &Repository,
    index: &Index,
    list: &ChunkList,
    span: &Span,
    bytes: &mut [u8],
    base: u64,
    buf: &mut ChunkBuf,
    mut f: impl FnMut(usize, Result<Plain>) -> Result<()>,
) -> Result<()> {
    for (i, loc) in &span.items {
        let s = (u64::from(loc.offset) - base) as usize;
        // Short: an empty slice, which `open_extent` rejects as a truncated
        // pack, never zeros.
        let sealed = bytes.get_mut(s..s + loc.len as usize).unwrap_or(&mut []);
        f(
            *i,
            repo.open_extent(index, &list.extents()[*i], loc, sealed, buf),
        )?;
    }
    Ok(())
}
