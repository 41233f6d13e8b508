//! The chunk index: chunk id -> (pack, offset, length).
//!
//! On the bucket it is a set of append-only index objects, each written
//! after the packs it lists are stored, so an index entry never points at a
//! pack that is not there. Readers merge all of them. An index object frames
//! each pack in the clear (id, size, SHA-256, chunk count) around its
//! sealed record ([`Frame`]), so a sync can copy packs, check them and
//! index them at the destination without the key (`docs/format.md`).
//! In memory the index is a sorted table ([`table`]) built once
//! ([`IndexBuilder`]) and then only read.

mod table;

pub use table::{ChunkIndex, DedupIndex, Detail, InPack, Index, IndexBuilder, Loc, PackMeta};

use crate::error::{Error, Result};
use crate::format::crypto::{Keys, SessionCipher, SALT_LEN};
use crate::format::id::Id;
use crate::format::object::{self, Reader};
use crate::format::pack::{BlobEntry, PackInfo, PackObject};

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
    let mut sessions = object::Sessions::new(keys);
    frames
        .into_iter()
        .map(|f| {
            let payload = sessions.open(RECORD_KIND, name, &f.record)?;
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
        let mut bld = IndexBuilder::<Loc>::default();
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
}
