//! The chunk index: chunk id -> (pack, offset, length).
//!
//! On the bucket it is a set of append-only index objects, each written
//! after the packs it lists are stored, so an index entry never points at a
//! pack that is not there. Readers merge all of them. An index object frames
//! each pack in the clear (id, size, SHA-256, chunk count) around its
//! sealed record ([`Frame`]), so a sync can copy packs, check them and
//! index them at the destination without the key (`docs/format.md`).
//! In memory every chunk is one 44-byte entry (its 32-byte id and 12
//! bytes of location) in one array sorted by id, searched by bisection:
//! about 1.1 GB for 25M chunks, where a hash map of the same took twice
//! that. The array is built once ([`IndexBuilder`]) and then only read.

use crate::error::{Error, Result};
use crate::format::crypto::{Keys, SessionCipher, SALT_LEN};
use crate::format::id::{Id, IdMap, IdSet};
use crate::format::object::{self, Reader};
use crate::format::pack::{BlobEntry, PackInfo, PackObject};

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

/// One chunk in the sorted table.
#[derive(Clone, Copy, Debug)]
struct Entry {
    id: Id,
    loc: Loc,
}

impl Entry {
    fn cmp_id(&self, id: &Id) -> std::cmp::Ordering {
        self.id.fast_cmp(id)
    }
}

#[derive(Default, Clone)]
pub struct Index {
    packs: Vec<PackMeta>,
    /// Every chunk once, sorted by id.
    chunks: Vec<Entry>,
    /// Packs a GC has condemned (`docs/gc.md`): still readable, never reused.
    condemned: IdSet,
}

impl Index {
    pub fn new() -> Self {
        Self::default()
    }

    /// A chunk a backup may reference without storing it: indexed in a pack
    /// no GC has condemned. (A condemned pack may be deleted once the
    /// backups that could not know are done; see `docs/gc.md`.)
    pub fn reusable(&self, id: &Id) -> bool {
        self.get(id)
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
        self.get(id).is_some()
    }

    pub fn get(&self, id: &Id) -> Option<Loc> {
        self.chunks
            .binary_search_by(|e| e.cmp_id(id))
            .ok()
            .map(|i| self.chunks[i].loc)
    }

    pub fn pack(&self, loc: &Loc) -> &PackMeta {
        &self.packs[loc.pack as usize]
    }

    pub fn packs(&self) -> &[PackMeta] {
        &self.packs
    }

    /// Every chunk and its location, by id.
    pub fn iter(&self) -> impl Iterator<Item = (&Id, &Loc)> {
        self.chunks.iter().map(|e| (&e.id, &e.loc))
    }
}

/// Collects the packs of index objects (in any order, from any thread
/// behind a lock) into an [`Index`].
#[derive(Default)]
pub struct IndexBuilder {
    packs: Vec<PackMeta>,
    pack_pos: IdMap<u32>,
    chunks: Vec<Entry>,
    condemned: IdSet,
}

impl IndexBuilder {
    /// A builder that knows which packs are condemned: locations outside
    /// them win.
    pub fn new(condemned: IdSet) -> Self {
        IndexBuilder {
            condemned,
            ..Self::default()
        }
    }

    /// Room for `n` more chunks (one allocation instead of doublings). A
    /// hint only: if `n` (from a listing's sizes) cannot be had, the table
    /// grows as it fills.
    pub fn reserve(&mut self, n: usize) {
        if self.chunks.try_reserve_exact(n).is_err() {
            tracing::debug!("index: no room for {n} chunks up front");
        }
    }

    pub fn add_pack(&mut self, p: &PackInfo) {
        let pos = *self.pack_pos.entry(p.id).or_insert_with(|| {
            self.packs.push(PackMeta {
                id: p.id,
                salt: p.salt,
            });
            (self.packs.len() - 1) as u32
        });
        self.chunks.extend(p.blobs.iter().map(|b| Entry {
            id: b.id,
            loc: Loc {
                pack: pos,
                offset: b.offset,
                len: b.len,
            },
        }));
    }

    /// Sorts the chunks and keeps one location of each: a chunk stored
    /// twice (racing writers, a repack) is equally good in either pack,
    /// except that a pack not condemned beats a condemned one; among equals
    /// the lowest pack id, so the choice does not depend on load order.
    pub fn finish(mut self) -> Index {
        let packs = &self.packs;
        let condemned = &self.condemned;
        let rank = |e: &Entry| {
            let p = &packs[e.loc.pack as usize].id;
            (condemned.contains(p), *p, e.loc.offset)
        };
        self.chunks.sort_unstable_by(|a, b| a.cmp_id(&b.id));
        let mut kept = 0;
        for i in 0..self.chunks.len() {
            let e = self.chunks[i];
            if kept > 0 && self.chunks[kept - 1].id == e.id {
                if rank(&e) < rank(&self.chunks[kept - 1]) {
                    self.chunks[kept - 1] = e;
                }
            } else {
                self.chunks[kept] = e;
                kept += 1;
            }
        }
        self.chunks.truncate(kept);
        self.chunks.shrink_to_fit();
        Index {
            packs: self.packs,
            chunks: self.chunks,
            condemned: self.condemned,
        }
    }
}

/// The payload magic of index objects sealed whole (the first format,
/// still read).
const MAGIC: &[u8; 4] = b"BWIX";
/// Index objects of today: per-pack sealed records in a plain frame.
const MAGIC_V2: &[u8; 4] = b"BWI2";
/// The kind an index object sealed whole was sealed as.
pub const KIND: &str = "index";
/// The kind of one pack's sealed record.
const RECORD_KIND: &str = "index-pack";
/// Packs one index object frames at most (a hostile frame count is not
/// trusted for allocation beyond this).
const MAX_FRAMES: usize = 1 << 20;

/// One pack as an index object frames it: in the clear what a sync needs
/// to copy and check the pack without the key (its id, size, SHA-256 and
/// chunk count; all zeros for a digest nobody recorded), and the pack's
/// index record sealed, carried verbatim from one repository to another.
/// The record names the pack inside the seal, so it cannot be framed under
/// another pack's id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub pack: Id,
    pub size: u64,
    pub sha256: [u8; 32],
    pub blobs: u32,
    pub record: Vec<u8>,
}

impl Frame {
    /// The pack object as the frame describes it, if its digest is known.
    pub fn object(&self) -> Option<PackObject> {
        (self.sha256 != [0; 32]).then_some(PackObject {
            size: self.size,
            sha256: self.sha256,
        })
    }
}

/// An index object listing `packs`, each record sealed under `cipher`.
pub fn seal(cipher: &SessionCipher, packs: &[PackInfo]) -> Vec<u8> {
    let frames: Vec<Frame> = packs
        .iter()
        .map(|p| {
            let o = p.object.unwrap_or(PackObject {
                size: 0,
                sha256: [0; 32],
            });
            Frame {
                pack: p.id,
                size: o.size,
                sha256: o.sha256,
                blobs: p.blobs.len() as u32,
                record: object::seal(cipher, RECORD_KIND, &encode_record(p)),
            }
        })
        .collect();
    assemble(&frames)
}

/// An index object of these frames, as they are (a sync assembles the
/// destination's index from the source's records this way).
pub fn assemble<'a>(frames: impl IntoIterator<Item = &'a Frame>) -> Vec<u8> {
    let frames: Vec<&Frame> = frames.into_iter().collect();
    let n: usize = frames.iter().map(|f| 80 + f.record.len()).sum();
    let mut out = Vec::with_capacity(8 + n);
    out.extend_from_slice(MAGIC_V2);
    out.extend_from_slice(&(frames.len() as u32).to_le_bytes());
    for f in frames {
        out.extend_from_slice(&f.pack.0);
        out.extend_from_slice(&f.size.to_le_bytes());
        out.extend_from_slice(&f.sha256);
        out.extend_from_slice(&f.blobs.to_le_bytes());
        out.extend_from_slice(&(f.record.len() as u32).to_le_bytes());
        out.extend_from_slice(&f.record);
    }
    out
}

/// The frames of an index object, read without the key. An object sealed
/// whole (the first format) has none to give: `Ok(None)`.
pub fn frames(bytes: &[u8], name: &str) -> Result<Option<Vec<Frame>>> {
    if !bytes.starts_with(MAGIC_V2) {
        return Ok(None);
    }
    let mut r = Reader::new(bytes, name);
    r.expect(MAGIC_V2)?;
    let n = r.u32()? as usize;
    if n > MAX_FRAMES {
        return Err(Error::corrupt(
            name,
            format!("{n} packs in one index object"),
        ));
    }
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let pack = r.id()?;
        let size = r.u64()?;
        let mut sha256 = [0u8; 32];
        sha256.copy_from_slice(r.bytes(32)?);
        let blobs = r.u32()?;
        let len = r.u32()? as usize;
        let record = r.bytes(len)?.to_vec();
        out.push(Frame {
            pack,
            size,
            sha256,
            blobs,
            record,
        });
    }
    if !r.done() {
        return Err(Error::corrupt(name, "bytes after the last frame"));
    }
    Ok(Some(out))
}

/// The packs an index object lists, opened with the key (either format).
pub fn open(keys: &Keys, bytes: &[u8], name: &str) -> Result<Vec<PackInfo>> {
    let Some(frames) = frames(bytes, name)? else {
        return decode_v1(&object::open(keys, KIND, name, bytes)?, name);
    };
    frames
        .into_iter()
        .map(|f| {
            let payload = object::open(keys, RECORD_KIND, name, &f.record)?;
            let mut p = decode_record(&payload, name)?;
            if p.id != f.pack || p.blobs.len() != f.blobs as usize {
                return Err(Error::corrupt(
                    name,
                    format!("the record framed as pack {} is another's", f.pack.short()),
                ));
            }
            p.object = f.object();
            Ok(p)
        })
        .collect()
}

fn encode_record(p: &PackInfo) -> Vec<u8> {
    let mut out = Vec::with_capacity(68 + p.blobs.len() * 40);
    out.extend_from_slice(&p.id.0);
    out.extend_from_slice(&p.salt);
    out.extend_from_slice(&(p.blobs.len() as u32).to_le_bytes());
    for b in &p.blobs {
        out.extend_from_slice(&b.id.0);
        out.extend_from_slice(&b.offset.to_le_bytes());
        out.extend_from_slice(&b.len.to_le_bytes());
    }
    out
}

fn decode_record(payload: &[u8], name: &str) -> Result<PackInfo> {
    let mut r = Reader::new(payload, name);
    let p = read_pack(&mut r)?;
    if !r.done() {
        return Err(Error::corrupt(name, "bytes after a pack record"));
    }
    Ok(p)
}

fn read_pack(r: &mut Reader<'_>) -> Result<PackInfo> {
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
    Ok(PackInfo {
        id,
        salt,
        blobs,
        object: None,
    })
}

/// The payload of an index object sealed whole (the first format).
fn decode_v1(payload: &[u8], name: &str) -> Result<Vec<PackInfo>> {
    let mut r = Reader::new(payload, name);
    r.expect(MAGIC)?;
    let n = r.u32()? as usize;
    let mut packs = Vec::with_capacity(n.min(4096));
    for _ in 0..n {
        packs.push(read_pack(&mut r)?);
    }
    Ok(packs)
}

/// The first format's payload, for tests of the reader that still reads it.
#[cfg(test)]
fn encode_v1(packs: &[PackInfo]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(packs.len() as u32).to_le_bytes());
    for p in packs {
        out.extend_from_slice(&encode_record(p));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::format::crypto::MasterKey;

    fn pack(blobs: usize) -> PackInfo {
        PackInfo {
            id: Id::random(),
            salt: [7; 32],
            blobs: (0..blobs)
                .map(|i| BlobEntry {
                    id: Id::random(),
                    offset: 36 + 100 * i as u32,
                    len: 100,
                })
                .collect(),
            object: Some(PackObject::of(b"the pack's bytes")),
        }
    }

    #[test]
    fn sealed_frames_open_and_merge() {
        let keys = Keys::derive(&MasterKey::generate());
        let (a, b) = (pack(1), pack(3));
        let bytes = seal(&keys.session(), &[a.clone(), b.clone()]);
        let back = open(&keys, &bytes, "t").unwrap();
        assert_eq!((back[0].id, back[1].id), (a.id, b.id));
        assert_eq!(back[1].blobs, b.blobs);
        assert_eq!(back[0].object, a.object);
        // Without the key: ids, sizes, digests, counts, never the blobs.
        let f = frames(&bytes, "t").unwrap().unwrap();
        assert_eq!((f[1].pack, f[1].blobs, f[1].object()), (b.id, 3, b.object));
        // A sync's reassembly of one record opens with the key.
        let one = assemble([&f[1]]);
        let back = open(&keys, &one, "t").unwrap();
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].blobs, b.blobs);
        let mut bld = IndexBuilder::default();
        bld.add_pack(&back[0]);
        bld.add_pack(&back[0]);
        let ix = bld.finish();
        assert_eq!((ix.len(), ix.packs().len()), (3, 1));
        let loc = ix.get(&b.blobs[2].id).unwrap();
        assert_eq!((loc.offset, loc.len), (236, 100));
    }

    #[test]
    fn a_record_framed_under_another_pack_is_refused() {
        let keys = Keys::derive(&MasterKey::generate());
        let bytes = seal(&keys.session(), &[pack(1), pack(1)]);
        let mut f = frames(&bytes, "t").unwrap().unwrap();
        f[0].pack = f[1].pack;
        let e = open(&keys, &assemble(&f), "t").unwrap_err().to_string();
        assert!(e.contains("another's"), "{e}");
        // Truncated, or with a frame count that lies: errors, not panics.
        for cut in [3, 8, 40, bytes.len() - 1] {
            assert!(frames(&bytes[..cut], "t").is_err() || cut < 4, "{cut}");
        }
        let mut lie = bytes.clone();
        lie[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(frames(&lie, "t").is_err());
        assert!(open(&Keys::derive(&MasterKey::generate()), &bytes, "t").is_err());
    }

    #[test]
    fn objects_sealed_whole_still_open() {
        let keys = Keys::derive(&MasterKey::generate());
        let p = pack(2);
        let v1 = object::seal(&keys.session(), KIND, &encode_v1(std::slice::from_ref(&p)));
        assert_eq!(frames(&v1, "t").unwrap(), None);
        let back = open(&keys, &v1, "t").unwrap();
        assert_eq!(
            (back[0].id, &back[0].blobs, back[0].object),
            (p.id, &p.blobs, None)
        );
        assert!(decode_v1(b"BWIX\x05\0\0\0", "t").is_err());
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
            object: None,
        };
        let (old, new) = (pack(36), pack(72));
        let mut condemned = IdSet::default();
        condemned.insert(old.id);
        let mut b = IndexBuilder::new(condemned.clone());
        b.add_pack(&old);
        let ix = b.finish();
        assert!(ix.contains(&chunk) && !ix.reusable(&chunk));
        let mut b = IndexBuilder::new(condemned.clone());
        b.add_pack(&old);
        b.add_pack(&new);
        let ix = b.finish();
        assert!(ix.reusable(&chunk));
        assert_eq!(ix.get(&chunk).unwrap().offset, 72, "the live copy wins");
        // In the other order too.
        let mut b = IndexBuilder::new(condemned);
        b.add_pack(&new);
        b.add_pack(&old);
        assert_eq!(b.finish().get(&chunk).unwrap().offset, 72);
    }

    /// The sorted table answers as the hash map it replaced did, on random
    /// packs with shared chunks, condemned packs and absent ids: same
    /// membership, same reusability, a location in a pack that holds the
    /// chunk (the one the map's rule picks when there is one best).
    #[test]
    fn sorted_table_lookups_equal_the_hash_map_on_random_data() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(32);
        let pool: Vec<Id> = (0..5000).map(|_| Id(rng.gen())).collect();
        let packs: Vec<PackInfo> = (0..400)
            .map(|_| {
                let n = rng.gen_range(1..40);
                PackInfo {
                    id: Id(rng.gen()),
                    salt: [0; 32],
                    blobs: (0..n)
                        .map(|k| BlobEntry {
                            id: pool[rng.gen_range(0..pool.len())],
                            offset: 36 + 100 * k,
                            len: 1 + rng.gen_range(0..1000),
                        })
                        .collect(),
                    object: None,
                }
            })
            .collect();
        let condemned: IdSet = packs.iter().step_by(7).map(|p| p.id).collect();
        // The old structure: first seen wins, a live pack beats a condemned one.
        let mut map: IdMap<(Id, u32, u32)> = IdMap::default();
        let mut holders: IdMap<Vec<(Id, u32, u32)>> = IdMap::default();
        let mut b = IndexBuilder::new(condemned.clone());
        for p in &packs {
            b.add_pack(p);
            for bl in &p.blobs {
                let here = (p.id, bl.offset, bl.len);
                holders.entry(bl.id).or_default().push(here);
                let e = map.entry(bl.id).or_insert(here);
                if condemned.contains(&e.0) && !condemned.contains(&p.id) {
                    *e = here;
                }
            }
        }
        let ix = b.finish();
        assert_eq!(ix.len(), map.len());
        let absent = (0..1000).map(|_| Id(rng.gen()));
        for id in pool.iter().copied().chain(absent) {
            let old = map.get(&id);
            assert_eq!(ix.contains(&id), old.is_some());
            let old_reusable = old.is_some_and(|o| !condemned.contains(&o.0));
            assert_eq!(ix.reusable(&id), old_reusable, "{id}");
            if let Some(loc) = ix.get(&id) {
                let here = (ix.pack(&loc).id, loc.offset, loc.len);
                assert!(holders[&id].contains(&here), "{id}: a place that holds it");
                assert_eq!(
                    condemned.contains(&here.0),
                    condemned.contains(&old.unwrap().0)
                );
            }
        }
        let mut sorted: Vec<Id> = ix.iter().map(|(id, _)| *id).collect();
        sorted.dedup();
        assert_eq!(sorted.len(), ix.len(), "each chunk once");
        assert!(sorted.windows(2).all(|w| w[0] < w[1]));
    }
}
