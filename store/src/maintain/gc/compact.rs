//! Index compaction: the small index objects every backup adds become a
//! few large ones, so loading the index costs fewer requests.
//!
//! Safe beside writers and readers: a merged object is stored (a `put`
//! returns once it is durable) before the objects it replaces are deleted,
//! and only objects this step listed are ever deleted, so an object a
//! writer stores meanwhile is never touched. A reader that finds a listed
//! object gone lists again and reads its replacement
//! (`repo::each_index_object`). It runs under the GC lock: a sweep
//! rewriting an object this merges would otherwise leave the merged copy
//! naming a deleted pack (`docs/gc.md`, rules 4 and 6).

use crate::backend::ObjectInfo;
use crate::error::Result;
use crate::format::id::{Id, IdSet};
use crate::format::index::{self, Frame};
use crate::format::layout;
use crate::repo::condemned::delete_if_there;
use crate::repo::Repository;

/// A merged object grows to about this size (about a hundred thousand
/// chunks; a loader holds eight at a time); objects of half this or more are left alone.
const TARGET_BYTES: u64 = 4 << 20;

/// What a compaction did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Compaction {
    /// Small index objects merged and deleted.
    pub merged: usize,
    /// Merged objects written in their place.
    pub written: usize,
}

/// Merges the small index objects, a batch of up to [`TARGET_BYTES`] at a
/// time. The caller holds the GC lock.
pub(super) fn run(repo: &Repository) -> Result<Compaction> {
    let mut done = Compaction::default();
    for batch in batches(repo.backend().list(layout::INDEX)?) {
        let frames = read_frames(repo, &batch)?;
        if !frames.is_empty() {
            let name = layout::index(&Id::random());
            repo.backend().put(&name, &index::assemble(&frames))?;
            done.written += 1;
        }
        // Only now, with the merged object stored, do the small ones go.
        for o in &batch {
            delete_if_there(repo.backend().as_ref(), &o.name)?;
        }
        done.merged += batch.len();
    }
    Ok(done)
}

/// The small objects, in batches of two or more that together stay under
/// the target.
fn batches(listed: Vec<ObjectInfo>) -> Vec<Vec<ObjectInfo>> {
    let mut small: Vec<ObjectInfo> = listed
        .into_iter()
        .filter(|o| o.size < TARGET_BYTES / 2)
        .collect();
    small.sort_by_key(|o| o.size);
    let mut out: Vec<Vec<ObjectInfo>> = Vec::new();
    let mut current: Vec<ObjectInfo> = Vec::new();
    let mut bytes = 0;
    for o in small {
        if bytes + o.size > TARGET_BYTES && !current.is_empty() {
            out.push(std::mem::take(&mut current));
            bytes = 0;
        }
        bytes += o.size;
        current.push(o);
    }
    out.push(current);
    out.retain(|b| b.len() >= 2);
    out
}

/// The frames of every pack the batch lists, each pack once. An object of
/// the first format (sealed whole) is opened and framed anew.
fn read_frames(repo: &Repository, batch: &[ObjectInfo]) -> Result<Vec<Frame>> {
    let mut seen = IdSet::default();
    let mut out = Vec::new();
    let cipher = repo.keys().session();
    for o in batch {
        let bytes = repo.backend().get(&o.name)?;
        // Opened whole first: a damaged object stops the compaction
        // rather than spread into the merged one.
        let packs = index::open(repo.keys(), &bytes, &o.name)?;
        let frames = match index::frames(&bytes, &o.name)? {
            Some(f) => f,
            None => index::frames(&index::seal(&cipher, &packs), &o.name)?.unwrap_or_default(),
        };
        out.extend(frames.into_iter().filter(|f| seen.insert(f.pack)));
    }
    Ok(out)
}
