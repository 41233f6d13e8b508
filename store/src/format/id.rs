//! 256-bit identifiers: chunk ids (keyed hashes of plaintext) and random
//! object ids (packs, snapshots, index and chunk-list objects).

use std::fmt;
use std::str::FromStr;

/// A 32-byte id, shown as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Id(pub [u8; 32]);

impl Id {
    /// A fresh random id; names of objects we write are these, so two hosts
    /// writing one bucket never pick the same name.
    pub fn random() -> Self {
        let mut b = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut b);
        Id(b)
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The first 8 hex digits, as shown in listings.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..4])
    }

    pub fn from_slice(b: &[u8]) -> Option<Self> {
        Some(Id(b.try_into().ok()?))
    }

    /// The order of ids, decided by their first 8 bytes as a number
    /// nearly always (ids are uniform): no `memcmp` call per comparison
    /// in the sorts and bisections of large tables, where it was half the
    /// time.
    pub fn fast_cmp(&self, other: &Id) -> std::cmp::Ordering {
        self.head().cmp(&other.head()).then_with(|| self.cmp(other))
    }

    /// The first 8 bytes as a big-endian number: ids sort by it first.
    pub fn head(&self) -> u64 {
        let b = &self.0;
        u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
    }
}

impl std::hash::Hash for Id {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.0[..8]);
        state.write_u64(u64::from_le_bytes(b));
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Id({})", self.short())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("not a 64-digit hex id: {0:?}")]
pub struct ParseIdError(String);

impl FromStr for Id {
    type Err = ParseIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut b = [0u8; 32];
        hex::decode_to_slice(s, &mut b).map_err(|_| ParseIdError(s.to_string()))?;
        Ok(Id(b))
    }
}

impl serde::Serialize for Id {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> serde::Deserialize<'de> for Id {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Chunk ids are HMAC outputs and object ids are random: the first 8 bytes are
/// already uniformly spread, so hashing them again only costs time.
#[derive(Default, Clone, Copy)]
pub struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only `Id` (one `write_u64`) is meant to be hashed with this; fold
        // anything else in rather than fail.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
}

pub type IdBuildHasher = std::hash::BuildHasherDefault<IdHasher>;
pub type IdMap<V> = std::collections::HashMap<Id, V, IdBuildHasher>;
pub type IdSet = std::collections::HashSet<Id, IdBuildHasher>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_roundtrip() {
        let id = Id::random();
        assert_eq!(id.to_hex().parse::<Id>().unwrap(), id);
        assert!("xyz".parse::<Id>().is_err());
        assert_eq!(id.short().len(), 8);
    }
}
