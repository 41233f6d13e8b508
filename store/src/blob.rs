//! Per-chunk encoding: zstd when it shrinks the chunk, raw otherwise, then
//! sealed with the chunk id as associated data (so a blob cannot be passed
//! off as another chunk).

use crate::crypto::{Opener, SessionCipher};
use crate::error::{Error, Result};
use crate::id::Id;

const RAW: u8 = 0;
const ZSTD: u8 = 1;

/// zstd level 1 (as PBS uses): most of the ratio of higher levels on disk
/// images at several times the speed, and backups are CPU-bound here.
pub const DEFAULT_LEVEL: i32 = 1;

/// Compresses (if worth it) and seals one chunk.
pub fn seal_chunk(cipher: &SessionCipher, id: &Id, data: &[u8], level: i32) -> Vec<u8> {
    let mut plain = Vec::with_capacity(data.len() + 1);
    plain.push(ZSTD);
    // zstd's bulk API into a preallocated buffer: a failure (output would not
    // fit) just means the chunk does not shrink.
    let mut comp = vec![0u8; data.len()];
    match zstd::bulk::compress_to_buffer(data, &mut comp, level) {
        Ok(n) if n + 1 < data.len() => plain.extend_from_slice(&comp[..n]),
        _ => {
            plain[0] = RAW;
            plain.extend_from_slice(data);
        }
    }
    cipher.seal(&id.0, &plain)
}

/// Opens, decompresses and returns a chunk's plaintext. `max_len` bounds
/// decompression (a damaged or hostile blob cannot make us allocate more).
pub fn open_chunk(opener: &Opener, id: &Id, sealed: &[u8], max_len: usize) -> Result<Vec<u8>> {
    let plain = opener
        .open(&id.0, sealed)
        .map_err(|_| Error::corrupt(format!("chunk {id}"), "authentication failed"))?;
    match plain.split_first() {
        Some((&RAW, rest)) => Ok(rest.to_vec()),
        Some((&ZSTD, rest)) => zstd::bulk::decompress(rest, max_len)
            .map_err(|e| Error::corrupt(format!("chunk {id}"), format!("zstd: {e}"))),
        _ => Err(Error::corrupt(format!("chunk {id}"), "unknown encoding")),
    }
}

/// Opens a sealed chunk and seals the same encoded bytes under another
/// session key, without decompressing (repacking).
pub fn reseal(opener: &Opener, cipher: &SessionCipher, id: &Id, sealed: &[u8]) -> Result<Vec<u8>> {
    let plain = opener
        .open(&id.0, sealed)
        .map_err(|_| Error::corrupt(format!("chunk {id}"), "authentication failed"))?;
    Ok(cipher.seal(&id.0, &plain))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::{Keys, MasterKey};

    #[test]
    fn roundtrip_raw_and_compressed() {
        let keys = Keys::derive(&MasterKey::generate());
        let s = keys.session();
        let o = Opener::new(&keys, s.salt());
        let text = b"abcdefgh".repeat(10_000);
        let mut random = vec![0u8; 50_000];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut random);
        for data in [&text[..], &random[..], &b"x"[..]] {
            let id = keys.chunk_id(data);
            let sealed = seal_chunk(&s, &id, data, DEFAULT_LEVEL);
            assert!(sealed.len() <= data.len() + 1 + crate::crypto::SEAL_OVERHEAD);
            assert_eq!(open_chunk(&o, &id, &sealed, data.len()).unwrap(), data);
            let other = keys.chunk_id(b"other");
            assert!(open_chunk(&o, &other, &sealed, data.len()).is_err());
        }
        let id = keys.chunk_id(&text);
        assert!(seal_chunk(&s, &id, &text, 1).len() < text.len() / 10);
    }
}
