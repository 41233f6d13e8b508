//! Keys derived from the master secret, and the AES-256-GCM scheme.
//!
//! # Nonce uniqueness
//!
//! AES-GCM breaks if a (key, nonce) pair ever repeats, and many hosts write
//! one repository at once with no coordination. So nothing is ever encrypted
//! under the master data key directly. Every writer session draws a random
//! 256-bit salt and derives its own subkey with HKDF-SHA256(salt, data key);
//! inside a session, nonces are a 96-bit counter held in one atomic, so they
//! never repeat under that subkey. Two sessions share a subkey only if they
//! draw the same 256-bit salt (probability ~2^-256 per pair), so (key, nonce)
//! pairs are unique across every host and every run without shared state.
//! The salt travels in the object (pack or sealed object) header, the nonce
//! in front of each sealed blob.
//!
//! # Chunk ids
//!
//! A chunk's id is HMAC-SHA256(id key, plaintext): equal plaintexts dedup,
//! while whoever reads the bucket without the key cannot test whether the
//! repository holds a given block ("do you hold this file" oracle).

use ring::{aead, hkdf, hmac};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};
use crate::format::id::Id;

pub const SALT_LEN: usize = 32;
pub const NONCE_LEN: usize = 12;
pub const TAG_LEN: usize = 16;
/// Bytes a sealed blob adds to its plaintext.
pub const SEAL_OVERHEAD: usize = NONCE_LEN + TAG_LEN;

/// The repository's master secret: 32 random bytes, stored only wrapped in key slots.
#[derive(Clone)]
pub struct MasterKey(pub(crate) [u8; 32]);

impl MasterKey {
    pub fn generate() -> Self {
        let mut b = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut b);
        MasterKey(b)
    }
}

struct Len(usize);
impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

fn hkdf_expand(salt: &[u8], ikm: &[u8], info: &str, out: &mut [u8]) {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, salt).extract(ikm);
    let info = [info.as_bytes()];
    // Lengths here are fixed and far below HKDF's 255*32 limit.
    prk.expand(&info, Len(out.len()))
        .and_then(|okm| okm.fill(out))
        .expect("HKDF output length within limits");
}

/// The working keys of an opened repository.
pub struct Keys {
    id_key: hmac::Key,
    data_key: [u8; 32],
    cdc_seed: u64,
    fingerprint: String,
}

impl Keys {
    pub fn derive(master: &MasterKey) -> Self {
        let mut id_key = [0u8; 32];
        let mut data_key = [0u8; 32];
        let mut seed = [0u8; 8];
        let mut fp = [0u8; 8];
        hkdf_expand(b"bulwark", &master.0, "bulwark/v1/chunk-id", &mut id_key);
        hkdf_expand(b"bulwark", &master.0, "bulwark/v1/data", &mut data_key);
        hkdf_expand(b"bulwark", &master.0, "bulwark/v1/cdc-seed", &mut seed);
        hkdf_expand(b"bulwark", &master.0, "bulwark/v1/fingerprint", &mut fp);
        Keys {
            id_key: hmac::Key::new(hmac::HMAC_SHA256, &id_key),
            data_key,
            cdc_seed: u64::from_le_bytes(seed),
            fingerprint: hex::encode(fp),
        }
    }

    /// HMAC-SHA256(id key, data).
    pub fn chunk_id(&self, data: &[u8]) -> Id {
        let tag = hmac::sign(&self.id_key, data);
        let mut b = [0u8; 32];
        b.copy_from_slice(tag.as_ref());
        Id(b)
    }

    /// Seed for the chunker's gear table: secret, so cut points say less
    /// about content.
    pub fn cdc_seed(&self) -> u64 {
        self.cdc_seed
    }

    /// Short public name of the master key, recorded in every manifest.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// A fresh writer session with its own subkey (see the module docs).
    pub fn session(&self) -> SessionCipher {
        let mut salt = [0u8; SALT_LEN];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut salt);
        SessionCipher {
            key: self.subkey(&salt),
            salt,
            counter: AtomicU64::new(0),
        }
    }

    fn subkey(&self, salt: &[u8; SALT_LEN]) -> aead::LessSafeKey {
        let mut k = [0u8; 32];
        hkdf_expand(salt, &self.data_key, "bulwark/v1/session", &mut k);
        aead::LessSafeKey::new(
            aead::UnboundKey::new(&aead::AES_256_GCM, &k).expect("32-byte AES-256 key"),
        )
    }

    /// Opens a blob sealed by the session whose salt is `salt`.
    pub fn open(&self, salt: &[u8; SALT_LEN], aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>> {
        Opener::new(self, salt).open(aad, sealed)
    }
}

/// Encrypts blobs for one writer session: subkey from a random salt, nonces
/// from a counter.
pub struct SessionCipher {
    salt: [u8; SALT_LEN],
    key: aead::LessSafeKey,
    counter: AtomicU64,
}

impl SessionCipher {
    pub fn salt(&self) -> &[u8; SALT_LEN] {
        &self.salt
    }

    /// Returns `nonce || ciphertext || tag`. `aad` binds the blob to its
    /// context (its chunk id, or the kind of object).
    pub fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let mut nonce = [0u8; NONCE_LEN];
        nonce[4..].copy_from_slice(&n.to_be_bytes());
        let mut out = Vec::with_capacity(plaintext.len() + SEAL_OVERHEAD);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plaintext);
        let tag = self
            .key
            .seal_in_place_separate_tag(
                aead::Nonce::assume_unique_for_key(nonce),
                aead::Aad::from(aad),
                &mut out[NONCE_LEN..],
            )
            .expect("AES-GCM input within size limits");
        out.extend_from_slice(tag.as_ref());
        out
    }
}

/// Opens blobs of one session (one derived subkey, reused across blobs).
pub struct Opener {
    key: aead::LessSafeKey,
}

impl Opener {
    pub fn new(keys: &Keys, salt: &[u8; SALT_LEN]) -> Self {
        Opener {
            key: keys.subkey(salt),
        }
    }

    pub fn open(&self, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>> {
        // Too short for a nonce: empty parts, which `decrypt` refuses.
        let nonce = sealed.get(..NONCE_LEN).unwrap_or_default();
        let mut buf = sealed.get(NONCE_LEN..).unwrap_or_default().to_vec();
        let n = self.decrypt(aad, nonce, &mut buf)?.len();
        buf.truncate(n);
        Ok(buf)
    }

    /// Decrypts `sealed` where it lies and returns its plaintext, a part of
    /// `sealed` (no copy, no allocation).
    pub fn open_in_place<'a>(&self, aad: &[u8], sealed: &'a mut [u8]) -> Result<&'a mut [u8]> {
        let (nonce, body) = sealed.split_at_mut(NONCE_LEN.min(sealed.len()));
        self.decrypt(aad, nonce, body)
    }

    /// `body` (ciphertext and tag) decrypted in place. A short blob (no
    /// whole nonce and tag) is corrupt, as is anything that fails the tag.
    fn decrypt<'a>(&self, aad: &[u8], nonce: &[u8], body: &'a mut [u8]) -> Result<&'a mut [u8]> {
        if nonce.len() + body.len() < SEAL_OVERHEAD {
            return Err(Error::corrupt("blob", "shorter than nonce and tag"));
        }
        let nonce = aead::Nonce::try_assume_unique_for_key(nonce)
            .map_err(|_| Error::corrupt("blob", "bad nonce"))?;
        self.key
            .open_in_place(nonce, aead::Aad::from(aad), body)
            .map_err(|_| Error::corrupt("blob", "authentication failed"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_roundtrip_and_tamper() {
        let keys = Keys::derive(&MasterKey::generate());
        let s = keys.session();
        let a = s.seal(b"ctx", b"hello");
        let b = s.seal(b"ctx", b"hello");
        assert_ne!(a, b, "nonces must differ");
        assert_eq!(keys.open(s.salt(), b"ctx", &a).unwrap(), b"hello");
        assert!(keys.open(s.salt(), b"other", &a).is_err());
        let mut bad = a.clone();
        bad[NONCE_LEN + 1] ^= 1;
        assert!(keys.open(s.salt(), b"ctx", &bad).is_err());
        let other = Keys::derive(&MasterKey::generate());
        assert!(other.open(s.salt(), b"ctx", &a).is_err());
    }

    #[test]
    fn chunk_ids_are_keyed() {
        let k1 = Keys::derive(&MasterKey::generate());
        let k2 = Keys::derive(&MasterKey::generate());
        assert_eq!(k1.chunk_id(b"x"), k1.chunk_id(b"x"));
        assert_ne!(k1.chunk_id(b"x"), k2.chunk_id(b"x"));
    }
}
