//! Sealed metadata objects (index, chunk lists, snapshot manifests):
//! `magic || session salt || seal(zstd(payload))`, the object kind bound in
//! as associated data so one kind cannot be swapped for another.

use crate::error::{Error, Result};
use crate::format::crypto::{Keys, Opener, SessionCipher, SALT_LEN};

const MAGIC: &[u8; 4] = b"BWO1";
/// Metadata can be large (a 1 TiB disk's chunk list) but never this large.
const MAX_PAYLOAD: usize = 1 << 30;

pub fn seal(cipher: &SessionCipher, kind: &str, payload: &[u8]) -> Vec<u8> {
    let comp = zstd::bulk::compress(payload, 3).expect("zstd into a growable buffer");
    let mut out = Vec::with_capacity(comp.len() + 80);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(cipher.salt());
    out.extend_from_slice(&cipher.seal(kind.as_bytes(), &comp));
    out
}

pub fn open(keys: &Keys, kind: &str, name: &str, bytes: &[u8]) -> Result<Vec<u8>> {
    Sessions::new(keys).open(kind, name, bytes)
}

/// Opens many objects, keeping the subkey of the last writer session seen:
/// an index object holds one sealed record per pack, nearly all from one
/// session, and deriving a subkey costs more than opening a record.
pub struct Sessions<'k> {
    keys: &'k Keys,
    last: Option<([u8; SALT_LEN], Opener)>,
}

impl<'k> Sessions<'k> {
    pub fn new(keys: &'k Keys) -> Self {
        Sessions { keys, last: None }
    }

    pub fn open(&mut self, kind: &str, name: &str, bytes: &[u8]) -> Result<Vec<u8>> {
        if bytes.len() < 4 + SALT_LEN || &bytes[..4] != MAGIC {
            return Err(Error::corrupt(name, "not a Bulwark object"));
        }
        let mut salt = [0u8; SALT_LEN];
        salt.copy_from_slice(&bytes[4..4 + SALT_LEN]);
        let opener = match &mut self.last {
            Some((s, o)) if *s == salt => o,
            last => &last.insert((salt, Opener::new(self.keys, &salt))).1,
        };
        let comp = opener
            .open(kind.as_bytes(), &bytes[4 + SALT_LEN..])
            .map_err(|_| {
                Error::corrupt(
                    name,
                    "authentication failed (damaged, or another repository's key)",
                )
            })?;
        decompress(&comp).map_err(|e| Error::corrupt(name, format!("zstd: {e}")))
    }
}

thread_local! {
    /// One zstd context per thread: an index holds a sealed record per
    /// pack, and a context costs more to make than a record to open.
    static DCTX: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// Decompresses into a buffer of the size the frame states (our frames
/// state it), at most `MAX_PAYLOAD`: not a 1 GiB allocation per object.
fn decompress(comp: &[u8]) -> std::io::Result<Vec<u8>> {
    let size = zstd::zstd_safe::get_frame_content_size(comp)
        .ok()
        .flatten()
        .and_then(|n| usize::try_from(n).ok())
        .map_or(MAX_PAYLOAD, |n| n.min(MAX_PAYLOAD));
    DCTX.with(|d| {
        let mut d = d.borrow_mut();
        let dctx = match &mut *d {
            Some(c) => c,
            empty => empty.insert(zstd::bulk::Decompressor::new()?),
        };
        let mut out = Vec::with_capacity(size);
        dctx.decompress_to_buffer(comp, &mut out)?;
        Ok(out)
    })
}

/// Little helpers for the binary payloads: bounds-checked reads that turn
/// truncation into a `Corrupt` error instead of a panic.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    what: &'a str,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8], what: &'a str) -> Self {
        Reader { buf, pos: 0, what }
    }

    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| Error::corrupt(self.what, "truncated"))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    pub fn u8(&mut self) -> Result<u8> {
        Ok(self.bytes(1)?[0])
    }

    pub fn u32(&mut self) -> Result<u32> {
        let mut b = [0u8; 4];
        b.copy_from_slice(self.bytes(4)?);
        Ok(u32::from_le_bytes(b))
    }

    pub fn u64(&mut self) -> Result<u64> {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.bytes(8)?);
        Ok(u64::from_le_bytes(b))
    }

    pub fn id(&mut self) -> Result<crate::format::id::Id> {
        let mut b = [0u8; 32];
        b.copy_from_slice(self.bytes(32)?);
        Ok(crate::format::id::Id(b))
    }

    pub fn expect(&mut self, magic: &[u8]) -> Result<()> {
        if self.bytes(magic.len())? != magic {
            return Err(Error::corrupt(self.what, "bad magic"));
        }
        Ok(())
    }

    pub fn done(&self) -> bool {
        self.pos == self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::crypto::MasterKey;

    #[test]
    fn objects_round_trip_through_the_shared_context() {
        let keys = Keys::derive(&MasterKey::generate());
        let big: Vec<u8> = (0..3_000_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();
        for payload in [&b""[..], b"x", &big] {
            let sealed = seal(&keys.session(), "t", payload);
            assert_eq!(open(&keys, "t", "n", &sealed).unwrap(), payload);
        }
        // A cut frame is an error, not a panic or a short payload.
        let comp = zstd::bulk::compress(&big, 3).unwrap();
        assert!(decompress(&comp[..comp.len() / 2]).is_err());
        assert_eq!(decompress(&comp).unwrap(), big);
    }
}
