//! The chunk index: chunk id -> (pack, offset, length).
//!
//! On the bucket it is a set of append-only index objects, each written
//! after the packs it lists are stored, so an index entry never points at a
//! pack that is not there. Readers merge all of them. In memory an entry is
//! the 32-byte id plus 12 bytes of location in a hash table keyed by the id's
//! first 8 bytes: about 50 bytes a chunk, 50 MiB for a 1 TiB repository of
//! 1 MiB chunks.

use crate::error::Result;
use crate::format::crypto::SALT_LEN;
use crate::format::id::{Id, IdMap, IdSet};
use crate::format::object::Reader;
use crate::format::pack::{BlobEntry, PackInfo};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Loc {
    /// Position in [`Index::packs`].
    pub pack: u32,
    pub offset: u32,
    pub len: u32,
}

#[derive(Clone, Debug)]
pub struct PackMeta {
    pub id: Id,
    pub salt: [u8; SALT_LEN],
}

#[derive(Default, Clone)]
pub struct Index {
    packs: Vec<PackMeta>,
    pack_pos: IdMap<u32>,
    chunks: IdMap<Loc>,
    /// Packs a GC has condemned (`docs/gc.md`): still readable, never reused.
    condemned: IdSet,
}

impl Index {
    pub fn new() -> Self {
        Self::default()
    }

    /// An index that knows which packs are condemned; call before
    /// [`Index::add_pack`] so locations outside them win.
    pub fn with_condemned(condemned: IdSet) -> Self {
        Index {
            condemned,
            ..Self::default()
        }
    }

    /// A chunk a backup may reference without storing it: indexed in a pack
    /// no GC has condemned. (A condemned pack may be deleted once the
    /// backups that could not know are done; see `docs/gc.md`.)
    pub fn reusable(&self, id: &Id) -> bool {
        self.chunks
            .get(id)
            .is_some_and(|l| !self.condemned.contains(&self.packs[l.pack as usize].id))
    }

    pub fn is_condemned(&self, pack: &Id) -> bool {
        self.condemned.contains(pack)
    }

    pub fn len(&self) -> usize {
        self.chunks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    pub fn contains(&self, id: &Id) -> bool {
        self.chunks.contains_key(id)
    }

    pub fn get(&self, id: &Id) -> Option<Loc> {
        self.chunks.get(id).copied()
    }

    pub fn pack(&self, loc: &Loc) -> &PackMeta {
        &self.packs[loc.pack as usize]
    }

    pub fn packs(&self) -> &[PackMeta] {
        &self.packs
    }

    pub fn iter(&self) -> impl Iterator<Item = (&Id, &Loc)> {
        self.chunks.iter()
    }

    /// Adds a pack's blobs; the first location seen for a chunk wins (a
    /// chunk stored twice by racing writers is equally good in either pack),
    /// except that a pack not condemned beats a condemned one.
    pub fn add_pack(&mut self, p: &PackInfo) {
        let fresh = !self.condemned.contains(&p.id);
        let pos = *self.pack_pos.entry(p.id).or_insert_with(|| {
            self.packs.push(PackMeta {
                id: p.id,
                salt: p.salt,
            });
            (self.packs.len() - 1) as u32
        });
        self.chunks.reserve(p.blobs.len());
        for b in &p.blobs {
            let loc = Loc {
                pack: pos,
                offset: b.offset,
                len: b.len,
            };
            match self.chunks.entry(b.id) {
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(loc);
                }
                std::collections::hash_map::Entry::Occupied(mut o) => {
                    let old = self.packs[o.get().pack as usize].id;
                    if fresh && self.condemned.contains(&old) {
                        o.insert(loc);
                    }
                }
            }
        }
    }
}

const MAGIC: &[u8; 4] = b"BWIX";
pub const KIND: &str = "index";

/// Binary payload of one index object.
pub fn encode(packs: &[PackInfo]) -> Vec<u8> {
    let n: usize = packs.iter().map(|p| 68 + p.blobs.len() * 40).sum();
    let mut out = Vec::with_capacity(8 + n);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(packs.len() as u32).to_le_bytes());
    for p in packs {
        out.extend_from_slice(&p.id.0);
        out.extend_from_slice(&p.salt);
        out.extend_from_slice(&(p.blobs.len() as u32).to_le_bytes());
        for b in &p.blobs {
            out.extend_from_slice(&b.id.0);
            out.extend_from_slice(&b.offset.to_le_bytes());
            out.extend_from_slice(&b.len.to_le_bytes());
        }
    }
    out
}

pub fn decode(payload: &[u8], name: &str) -> Result<Vec<PackInfo>> {
    let mut r = Reader::new(payload, name);
    r.expect(MAGIC)?;
    let n = r.u32()? as usize;
    let mut packs = Vec::with_capacity(n.min(4096));
    for _ in 0..n {
        let id = r.id()?;
        let mut salt = [0u8; SALT_LEN];
        salt.copy_from_slice(r.bytes(SALT_LEN)?);
        let m = r.u32()? as usize;
        let mut blobs = Vec::with_capacity(m.min(1 << 16));
        for _ in 0..m {
            blobs.push(BlobEntry {
                id: r.id()?,
                offset: r.u32()?,
                len: r.u32()?,
            });
        }
        packs.push(PackInfo { id, salt, blobs });
    }
    Ok(packs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_decode_merge() {
        let p = PackInfo {
            id: Id::random(),
            salt: [7; 32],
            blobs: vec![BlobEntry {
                id: Id::random(),
                offset: 36,
                len: 100,
            }],
        };
        let back = decode(&encode(std::slice::from_ref(&p)), "t").unwrap();
        assert_eq!(back[0].blobs, p.blobs);
        let mut ix = Index::new();
        ix.add_pack(&back[0]);
        ix.add_pack(&back[0]);
        assert_eq!(ix.len(), 1);
        assert_eq!(ix.packs().len(), 1);
        let loc = ix.get(&p.blobs[0].id).unwrap();
        assert_eq!((loc.offset, loc.len), (36, 100));
        assert!(decode(b"BWIX\x05\0\0\0", "t").is_err());
    }

    #[test]
    fn condemned_packs_are_read_but_not_reused() {
        let chunk = Id::random();
        let pack = |off| PackInfo {
            id: Id::random(),
            salt: [1; 32],
            blobs: vec![BlobEntry {
                id: chunk,
                offset: off,
                len: 10,
            }],
        };
        let (old, new) = (pack(36), pack(72));
        let mut condemned = IdSet::default();
        condemned.insert(old.id);
        let mut ix = Index::with_condemned(condemned.clone());
        ix.add_pack(&old);
        assert!(ix.contains(&chunk) && !ix.reusable(&chunk));
        ix.add_pack(&new);
        assert!(ix.reusable(&chunk));
        assert_eq!(ix.get(&chunk).unwrap().offset, 72, "the live copy wins");
        // In the other order too.
        let mut ix = Index::with_condemned(condemned);
        ix.add_pack(&new);
        ix.add_pack(&old);
        assert_eq!(ix.get(&chunk).unwrap().offset, 72);
    }
}
