//! Key slots: the master secret, wrapped once per way of opening the
//! repository (a passphrase through Argon2id, or a key file).
//!
//! Slots are small JSON objects under `keys/`; adding or removing one never
//! touches data, and the bucket only ever sees wrapped keys.

use argon2::{Algorithm, Argon2, Params, Version};
use ring::aead;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::format::crypto::MasterKey;

/// How a user proves they may open the repository.
#[derive(Clone)]
pub enum Secret {
    Passphrase(String),
    /// The 32 secret bytes of a key file (see [`read_key_file`]).
    KeyFile([u8; 32]),
}

/// Argon2id cost. The default costs ~0.1-0.3 s and 64 MiB, like restic and
/// PBS: cheap for a user once per run, expensive for a guesser.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct KdfParams {
    pub m_cost_kib: u32,
    pub t_cost: u32,
    pub p_cost: u32,
}

impl Default for KdfParams {
    fn default() -> Self {
        KdfParams {
            m_cost_kib: 64 * 1024,
            t_cost: 3,
            p_cost: 1,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct KeySlot {
    pub version: u32,
    /// "passphrase" or "keyfile".
    pub kind: String,
    pub created: chrono::DateTime<chrono::Utc>,
    pub host: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kdf: Option<KdfParams>,
    /// Hex: the per-slot salt (Argon2 salt or HKDF salt).
    pub salt: String,
    /// Hex: nonce || AES-256-GCM(master key) || tag under the slot's key.
    pub wrapped: String,
}

const SLOT_AAD: &[u8] = b"bulwark/v1/key-slot";

fn kek(secret: &Secret, kdf: Option<&KdfParams>, salt: &[u8]) -> Result<[u8; 32]> {
    let mut out = [0u8; 32];
    match (secret, kdf) {
        (Secret::Passphrase(p), Some(k)) => {
            let params = Params::new(k.m_cost_kib, k.t_cost, k.p_cost, Some(32))
                .map_err(|e| Error::Invalid(format!("bad KDF parameters: {e}")))?;
            let blocks = params.block_count();
            let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, params);
            match HugeBlocks::new(blocks) {
                Some(mut memory) => {
                    argon.hash_password_into_with_memory(p.as_bytes(), salt, &mut out, &mut *memory)
                }
                None => argon.hash_password_into(p.as_bytes(), salt, &mut out),
            }
            .map_err(|e| Error::Invalid(format!("KDF failed: {e}")))?;
        }
        (Secret::KeyFile(bytes), _) => {
            let prk = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, salt).extract(bytes);
            prk.expand(&[b"bulwark/v1/key-file"], &aead::AES_256_GCM)
                .and_then(|okm| okm.fill(&mut out))
                .map_err(|_| Error::Invalid("HKDF failed".into()))?;
        }
        (Secret::Passphrase(_), None) => return Err(Error::corrupt("key slot", "no KDF params")),
    }
    Ok(out)
}

/// Argon2's memory in transparent huge pages where the kernel has them.
/// Every run fills 64 MiB it never had: in 4 KiB pages that is 16k page
/// faults, which on a virtual machine whose host takes freed memory back
/// cost more than the hashing (0.3 s against 0.12 s measured); huge pages
/// also spare the hashing's random reads TLB misses. The memory is
/// anonymous, so it starts zeroed and goes back zeroed to the kernel.
struct HugeBlocks {
    ptr: std::ptr::NonNull<argon2::Block>,
    count: usize,
}

impl HugeBlocks {
    /// None when the mapping fails: the crate's own allocation is used.
    fn new(count: usize) -> Option<Self> {
        let len = count.checked_mul(std::mem::size_of::<argon2::Block>())?;
        // SAFETY: a fresh private anonymous mapping, checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return None;
        }
        // SAFETY: `p` is the mapping of `len` bytes just made. The advice
        // is a hint: without huge pages it is ordinary memory.
        unsafe { libc::madvise(p, len, libc::MADV_HUGEPAGE) };
        Some(HugeBlocks {
            ptr: std::ptr::NonNull::new(p.cast())?,
            count,
        })
    }
}

impl std::ops::Deref for HugeBlocks {
    type Target = [argon2::Block];
    fn deref(&self) -> &[argon2::Block] {
        // SAFETY: page-aligned (Block needs 64), zeroed (a valid Block),
        // `count` blocks long, and owned by `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.count) }
    }
}

impl std::ops::DerefMut for HugeBlocks {
    fn deref_mut(&mut self) -> &mut [argon2::Block] {
        // SAFETY: as in `deref`, and borrowed mutably through `self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.count) }
    }
}

impl Drop for HugeBlocks {
    fn drop(&mut self) {
        let len = self.count * std::mem::size_of::<argon2::Block>();
        // SAFETY: the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), len) };
    }
}

fn aead_key(k: &[u8; 32]) -> aead::LessSafeKey {
    aead::LessSafeKey::new(aead::UnboundKey::new(&aead::AES_256_GCM, k).expect("32-byte key"))
}

impl KeySlot {
    /// Wraps `master` for `secret`.
    pub fn wrap(master: &MasterKey, secret: &Secret, kdf: &KdfParams) -> Result<Self> {
        let mut salt = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut salt);
        let (kind, kdf) = match secret {
            Secret::Passphrase(_) => ("passphrase", Some(kdf.clone())),
            Secret::KeyFile(_) => ("keyfile", None),
        };
        let key = aead_key(&kek(secret, kdf.as_ref(), &salt)?);
        // The slot key is fresh (random salt) and used once: a random nonce is safe.
        let mut nonce = [0u8; 12];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut nonce);
        let mut buf = master.0.to_vec();
        key.seal_in_place_append_tag(
            aead::Nonce::assume_unique_for_key(nonce),
            aead::Aad::from(SLOT_AAD),
            &mut buf,
        )
        .expect("seal");
        let mut wrapped = nonce.to_vec();
        wrapped.extend_from_slice(&buf);
        Ok(KeySlot {
            version: 1,
            kind: kind.into(),
            created: chrono::Utc::now(),
            host: crate::hostname(),
            kdf,
            salt: hex::encode(salt),
            wrapped: hex::encode(wrapped),
        })
    }

    /// Whether this slot is meant for this kind of secret (so a key file is
    /// not run through Argon2 for every passphrase slot).
    pub fn accepts(&self, secret: &Secret) -> bool {
        matches!(
            (self.kind.as_str(), secret),
            ("passphrase", Secret::Passphrase(_)) | ("keyfile", Secret::KeyFile(_))
        )
    }

    /// The master key, or `None` if `secret` does not open this slot.
    pub fn unwrap_key(&self, secret: &Secret) -> Result<Option<MasterKey>> {
        let salt = hex::decode(&self.salt).map_err(|_| Error::corrupt("key slot", "bad salt"))?;
        let wrapped = hex::decode(&self.wrapped)
            .map_err(|_| Error::corrupt("key slot", "bad wrapped key"))?;
        if wrapped.len() != 12 + 32 + 16 {
            return Err(Error::corrupt("key slot", "wrapped key has wrong length"));
        }
        let key = aead_key(&kek(secret, self.kdf.as_ref(), &salt)?);
        let mut nonce = [0u8; 12];
        nonce.copy_from_slice(&wrapped[..12]);
        let mut buf = wrapped[12..].to_vec();
        match key.open_in_place(
            aead::Nonce::assume_unique_for_key(nonce),
            aead::Aad::from(SLOT_AAD),
            &mut buf,
        ) {
            Ok(pt) => {
                let mut m = [0u8; 32];
                m.copy_from_slice(&pt[..32]);
                Ok(Some(MasterKey(m)))
            }
            Err(_) => Ok(None),
        }
    }
}

const KEY_FILE_HEADER: &str = "bulwark-key-file-v1";

/// Contents for a new key file: a header line and 32 random bytes in hex.
pub fn new_key_file() -> (String, [u8; 32]) {
    let mut b = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut b);
    (format!("{KEY_FILE_HEADER}\n{}\n", hex::encode(b)), b)
}

/// Parses a key file's contents.
pub fn read_key_file(text: &str) -> Result<[u8; 32]> {
    let mut lines = text.lines();
    if lines.next().map(str::trim) != Some(KEY_FILE_HEADER) {
        return Err(Error::Invalid(format!(
            "not a Bulwark key file (first line must be {KEY_FILE_HEADER})"
        )));
    }
    let mut b = [0u8; 32];
    let hexpart = lines.next().unwrap_or("").trim();
    hex::decode_to_slice(hexpart, &mut b)
        .map_err(|_| Error::Invalid("key file: second line must be 64 hex digits".into()))?;
    Ok(b)
}

/// The secret from the usual non-interactive sources, in order: a key file,
/// a password file (first line), then `$BULWARK_PASSWORD`. `None` if none is
/// given (an interactive caller may then prompt).
pub fn secret_from_sources(
    key_file: Option<&std::path::Path>,
    password_file: Option<&std::path::Path>,
) -> Result<Option<Secret>> {
    let read = |p: &std::path::Path, what: &str| {
        std::fs::read_to_string(p)
            .map_err(|e| Error::io(format!("reading {what} {}", p.display()), e))
    };
    if let Some(p) = key_file {
        let bytes = read_key_file(&read(p, "key file")?)
            .map_err(|e| Error::Invalid(format!("{}: {e}", p.display())))?;
        return Ok(Some(Secret::KeyFile(bytes)));
    }
    if let Some(p) = password_file {
        let pw = read(p, "password file")?
            .lines()
            .next()
            .unwrap_or("")
            .to_string();
        if pw.is_empty() {
            return Err(Error::Invalid(format!(
                "password file {} is empty",
                p.display()
            )));
        }
        return Ok(Some(Secret::Passphrase(pw)));
    }
    Ok(std::env::var("BULWARK_PASSWORD")
        .ok()
        .filter(|p| !p.is_empty())
        .map(Secret::Passphrase))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cheap() -> KdfParams {
        KdfParams {
            m_cost_kib: 1024,
            t_cost: 1,
            p_cost: 1,
        }
    }

    #[test]
    fn passphrase_slot() {
        let m = MasterKey::generate();
        let slot = KeySlot::wrap(&m, &Secret::Passphrase("pw".into()), &cheap()).unwrap();
        let got = slot
            .unwrap_key(&Secret::Passphrase("pw".into()))
            .unwrap()
            .unwrap();
        assert_eq!(got.0, m.0);
        assert!(slot
            .unwrap_key(&Secret::Passphrase("nope".into()))
            .unwrap()
            .is_none());
    }

    #[test]
    fn the_kdf_in_huge_pages_derives_what_the_crates_own_memory_does() {
        let k = KdfParams {
            m_cost_kib: 8 * 1024,
            t_cost: 2,
            p_cost: 1,
        };
        let salt = [7u8; 32];
        let got = kek(&Secret::Passphrase("pw".into()), Some(&k), &salt).unwrap();
        let mut want = [0u8; 32];
        let params = Params::new(k.m_cost_kib, k.t_cost, k.p_cost, Some(32)).unwrap();
        Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
            .hash_password_into(b"pw", &salt, &mut want)
            .unwrap();
        assert_eq!(got, want);
        assert!(HugeBlocks::new(8 * 1024).is_some_and(|b| b.len() == 8 * 1024));
    }

    #[test]
    fn key_file_slot() {
        let m = MasterKey::generate();
        let (text, bytes) = new_key_file();
        assert_eq!(read_key_file(&text).unwrap(), bytes);
        let slot = KeySlot::wrap(&m, &Secret::KeyFile(bytes), &cheap()).unwrap();
        assert!(slot.accepts(&Secret::KeyFile(bytes)));
        assert!(!slot.accepts(&Secret::Passphrase("x".into())));
        assert_eq!(
            slot.unwrap_key(&Secret::KeyFile(bytes)).unwrap().unwrap().0,
            m.0
        );
        assert!(slot
            .unwrap_key(&Secret::KeyFile([0; 32]))
            .unwrap()
            .is_none());
        assert!(read_key_file("garbage").is_err());
    }
}
