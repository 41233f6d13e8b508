//! Packs: many sealed chunks in one object of ~16 MiB, because object stores
//! charge (in money and latency) per request, not per byte.
//!
//! Layout: `"BWPK" || session salt || blob* || sealed trailer || u32 LE
//! trailer length`. The trailer lists (chunk id, offset, length) so a pack
//! describes itself and the index can be rebuilt from packs alone. Chunks of
//! one disk go in disk order, so a pack is natural read-ahead for restores.

use crate::error::{Error, Result};
use crate::format::crypto::{Keys, SessionCipher, SALT_LEN};
use crate::format::id::Id;
use crate::format::object::Reader;

const MAGIC: &[u8; 4] = b"BWPK";
pub const HEADER_LEN: usize = 4 + SALT_LEN;
const TRAILER_AAD: &[u8] = b"bulwark/v1/pack-trailer";

/// Where a pack's blob sits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlobEntry {
    pub id: Id,
    pub offset: u32,
    pub len: u32,
}

/// A pack as the index records it.
#[derive(Clone, Debug)]
pub struct PackInfo {
    pub id: Id,
    pub salt: [u8; SALT_LEN],
    pub blobs: Vec<BlobEntry>,
}

pub struct PackWriter {
    buf: Vec<u8>,
    blobs: Vec<BlobEntry>,
    salt: [u8; SALT_LEN],
}

impl PackWriter {
    pub fn new(cipher: &SessionCipher, capacity: usize) -> Self {
        let mut buf = Vec::with_capacity(capacity + (1 << 20));
        buf.extend_from_slice(MAGIC);
        buf.extend_from_slice(cipher.salt());
        PackWriter {
            buf,
            blobs: Vec::new(),
            salt: *cipher.salt(),
        }
    }

    pub fn add(&mut self, id: Id, sealed: &[u8]) {
        self.blobs.push(BlobEntry {
            id,
            offset: self.buf.len() as u32,
            len: sealed.len() as u32,
        });
        self.buf.extend_from_slice(sealed);
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blobs.is_empty()
    }

    /// Seals the trailer and returns the pack's bytes and what the index needs.
    pub fn finish(mut self, cipher: &SessionCipher) -> (Vec<u8>, PackInfo) {
        let mut t = Vec::with_capacity(4 + self.blobs.len() * 40);
        t.extend_from_slice(&(self.blobs.len() as u32).to_le_bytes());
        for b in &self.blobs {
            t.extend_from_slice(&b.id.0);
            t.extend_from_slice(&b.offset.to_le_bytes());
            t.extend_from_slice(&b.len.to_le_bytes());
        }
        let sealed = cipher.seal(TRAILER_AAD, &t);
        self.buf.extend_from_slice(&sealed);
        self.buf
            .extend_from_slice(&(sealed.len() as u32).to_le_bytes());
        let info = PackInfo {
            id: Id::random(),
            salt: self.salt,
            blobs: self.blobs,
        };
        (self.buf, info)
    }
}

/// Reads a whole pack's trailer (for verify and index rebuilds).
pub fn read_trailer(keys: &Keys, id: Id, bytes: &[u8]) -> Result<PackInfo> {
    let name = crate::format::layout::pack(&id);
    if bytes.len() < HEADER_LEN + 4 || &bytes[..4] != MAGIC {
        return Err(Error::corrupt(&name, "not a pack"));
    }
    let mut salt = [0u8; SALT_LEN];
    salt.copy_from_slice(&bytes[4..HEADER_LEN]);
    let mut l = [0u8; 4];
    l.copy_from_slice(&bytes[bytes.len() - 4..]);
    let tlen = u32::from_le_bytes(l) as usize;
    let tstart = (bytes.len() - 4)
        .checked_sub(tlen)
        .filter(|&s| s >= HEADER_LEN)
        .ok_or_else(|| Error::corrupt(&name, "bad trailer length"))?;
    let t = keys
        .open(&salt, TRAILER_AAD, &bytes[tstart..bytes.len() - 4])
        .map_err(|_| Error::corrupt(&name, "trailer authentication failed"))?;
    let mut r = Reader::new(&t, &name);
    let n = r.u32()? as usize;
    let mut blobs = Vec::with_capacity(n.min(1 << 16));
    for _ in 0..n {
        let b = BlobEntry {
            id: r.id()?,
            offset: r.u32()?,
            len: r.u32()?,
        };
        if b.offset as usize + b.len as usize > tstart {
            return Err(Error::corrupt(&name, "blob outside pack"));
        }
        blobs.push(b);
    }
    Ok(PackInfo { id, salt, blobs })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::crypto::MasterKey;

    #[test]
    fn pack_roundtrip() {
        let keys = Keys::derive(&MasterKey::generate());
        let s = keys.session();
        let mut w = PackWriter::new(&s, 1024);
        let a = keys.chunk_id(b"a");
        let sealed = crate::format::blob::seal_chunk(&s, &a, b"aaaa", 1);
        w.add(a, &sealed);
        let (bytes, info) = w.finish(&s);
        let back = read_trailer(&keys, info.id, &bytes).unwrap();
        assert_eq!(back.blobs, info.blobs);
        assert_eq!(back.salt, info.salt);
        let e = back.blobs[0];
        let mut blob = bytes[e.offset as usize..(e.offset + e.len) as usize].to_vec();
        let o = crate::format::crypto::Opener::new(&keys, &back.salt);
        let mut buf = crate::format::blob::ChunkBuf::default();
        let opened = crate::format::blob::open_chunk(&o, &a, &mut blob, 4, &mut buf).unwrap();
        assert_eq!(opened.bytes(), b"aaaa");
        let mut bad = bytes.clone();
        let n = bad.len();
        bad[n - 10] ^= 1;
        assert!(read_trailer(&keys, info.id, &bad).is_err());
    }
}
