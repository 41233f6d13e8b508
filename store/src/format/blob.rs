//! Per-chunk encoding: zstd when it shrinks the chunk, raw otherwise, then
//! sealed with the chunk id as associated data (so a blob cannot be passed
//! off as another chunk).

use crate::error::{Error, Result};
use crate::format::crypto::{Opener, SessionCipher};
use crate::format::id::Id;

const RAW: u8 = 0;
const ZSTD: u8 = 1;

/// zstd level 1 (as PBS uses): most of the ratio of higher levels on disk
/// images at several times the speed, and backups are CPU-bound here.
pub const DEFAULT_LEVEL: i32 = 1;

/// Compresses (if worth it) and seals one chunk.
pub fn seal_chunk(cipher: &SessionCipher, id: &Id, data: &[u8], level: i32) -> Vec<u8> {
    let mut plain = Vec::with_capacity(data.len() + 1);
    plain.push(ZSTD);
    // Into the room after the tag, at most `data.len()` bytes: a failure
    // (output would not fit) just means the chunk does not shrink.
    let mut out = std::io::Cursor::new(&mut plain);
    out.set_position(1);
    match compress_into(data, &mut out, level) {
        Ok(n) if n + 1 < data.len() => {}
        _ => {
            plain.truncate(1);
            plain[0] = RAW;
            plain.extend_from_slice(data);
        }
    }
    cipher.seal(&id.0, &plain)
}

thread_local! {
    /// A compression context per thread, kept between chunks: making one
    /// costs more than compressing a small file's chunk.
    static COMPRESSOR: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { std::cell::RefCell::new(None) };
}

fn compress_into(
    data: &[u8],
    out: &mut std::io::Cursor<&mut Vec<u8>>,
    level: i32,
) -> std::io::Result<usize> {
    COMPRESSOR.with_borrow_mut(|c| {
        let mut comp = match c.take() {
            Some((l, comp)) if l == level => comp,
            _ => zstd::bulk::Compressor::new(level)?,
        };
        let n = comp.compress_to_buffer(data, out);
        *c = Some((level, comp));
        n
    })
}

/// What a thread that opens one chunk after another keeps between them:
/// the decompression context and the buffer decompressed chunks land in.
#[derive(Default)]
pub struct ChunkBuf {
    dctx: Option<zstd::bulk::Decompressor<'static>>,
    out: Vec<u8>,
}

/// An opened chunk's plaintext, where it lies.
pub enum Plain<'a> {
    /// Stored raw: a part of the sealed bytes, decrypted in place.
    Stored(&'a [u8]),
    /// Decompressed into the [`ChunkBuf`]'s buffer (sized to the chunk).
    Decompressed(&'a mut Vec<u8>),
}

impl Plain<'_> {
    pub fn bytes(&self) -> &[u8] {
        match self {
            Plain::Stored(b) => b,
            Plain::Decompressed(v) => v,
        }
    }

    /// The plaintext as a buffer of its own: the decompressed buffer itself
    /// (taken from the `ChunkBuf`, no copy), or a copy of a stored chunk.
    pub fn into_vec(self) -> Vec<u8> {
        match self {
            Plain::Stored(b) => b.to_vec(),
            Plain::Decompressed(v) => std::mem::take(v),
        }
    }
}

/// Opens a chunk where it lies: `sealed` is decrypted in place, and the
/// plaintext is a part of `sealed` if the chunk was stored raw, or
/// decompressed into `buf`. `max_len` bounds decompression (a damaged or
/// hostile blob cannot make us allocate more).
pub fn open_chunk<'a>(
    opener: &Opener,
    id: &Id,
    sealed: &'a mut [u8],
    max_len: usize,
    buf: &'a mut ChunkBuf,
) -> Result<Plain<'a>> {
    let corrupt = |detail: String| Error::corrupt(format!("chunk {id}"), detail);
    let plain = opener
        .open_in_place(&id.0, sealed)
        .map_err(|_| corrupt("authentication failed".into()))?;
    match plain.split_first() {
        Some((&RAW, rest)) => Ok(Plain::Stored(rest)),
        Some((&ZSTD, rest)) => {
            let dctx = match &mut buf.dctx {
                Some(d) => d,
                empty => empty.insert(
                    zstd::bulk::Decompressor::new()
                        .map_err(|e| corrupt(format!("zstd context: {e}")))?,
                ),
            };
            // Room for what the frame says it holds (our frames say), so a
            // buffer taken away by `Plain::into_vec` is no larger than its
            // chunk; at most `max_len` in any case.
            let size = zstd::zstd_safe::get_frame_content_size(rest)
                .ok()
                .flatten()
                .and_then(|n| usize::try_from(n).ok())
                .map_or(max_len, |n| n.min(max_len));
            buf.out.clear();
            buf.out.reserve_exact(size);
            // Output is bounded by the buffer's capacity, which may exceed
            // `size` (a reused buffer): checked after.
            let n = dctx
                .decompress_to_buffer(rest, &mut buf.out)
                .map_err(|e| corrupt(format!("zstd: {e}")))?;
            if n > max_len {
                return Err(corrupt(format!(
                    "decompresses to more than {max_len} bytes"
                )));
            }
            Ok(Plain::Decompressed(&mut buf.out))
        }
        _ => Err(corrupt("unknown encoding".into())),
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
    use crate::format::crypto::{Keys, MasterKey};

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
            assert!(sealed.len() <= data.len() + 1 + crate::format::crypto::SEAL_OVERHEAD);
            let mut buf = ChunkBuf::default();
            let open = |id: &Id, buf: &mut ChunkBuf| {
                open_chunk(&o, id, &mut sealed.clone(), data.len(), buf).map(|p| p.into_vec())
            };
            assert_eq!(open(&id, &mut buf).unwrap(), data);
            // The buffer is reused: the same again.
            assert_eq!(open(&id, &mut buf).unwrap(), data);
            let other = keys.chunk_id(b"other");
            assert!(open(&other, &mut buf).is_err());
        }
        let id = keys.chunk_id(&text);
        let mut sealed = seal_chunk(&s, &id, &text, 1);
        assert!(sealed.len() < text.len() / 10);
        // Decompression stops at the bound.
        let mut buf = ChunkBuf::default();
        assert!(open_chunk(&o, &id, &mut sealed.clone(), text.len() - 1, &mut buf).is_err());
        // A decompressed chunk taken away is no larger than the chunk.
        let v = open_chunk(&o, &id, &mut sealed, text.len(), &mut buf)
            .unwrap()
            .into_vec();
        assert_eq!((v.len(), v.capacity()), (text.len(), text.len()));
    }
}
