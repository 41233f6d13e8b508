//! AES-256-GCM: `ring` (what the store uses) against the RustCrypto
//! `aes-gcm` crate, on 1 MiB blobs in one run. Run: `cargo bench -p
//! bulwark-store --bench aead`.

use std::time::Instant;

use aes_gcm::aead::{AeadInPlace, KeyInit};

fn main() {
    let total: usize = 512 << 20;
    let blob = 1 << 20;
    let mut buf = vec![0x5au8; blob];
    let key = [7u8; 32];

    let ring_key = ring::aead::LessSafeKey::new(
        ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, &key).unwrap(),
    );
    let t = Instant::now();
    for i in 0..total / blob {
        let mut nonce = [0u8; 12];
        nonce[4..].copy_from_slice(&(i as u64).to_be_bytes());
        let tag = ring_key
            .seal_in_place_separate_tag(
                ring::aead::Nonce::assume_unique_for_key(nonce),
                ring::aead::Aad::empty(),
                &mut buf,
            )
            .unwrap();
        let _ = std::hint::black_box(tag);
    }
    let ring_rate = (total >> 20) as f64 / t.elapsed().as_secs_f64();

    let rc = aes_gcm::Aes256Gcm::new_from_slice(&key).unwrap();
    let t = Instant::now();
    for i in 0..total / blob {
        let mut nonce = [0u8; 12];
        nonce[4..].copy_from_slice(&(i as u64).to_be_bytes());
        let tag = rc
            .encrypt_in_place_detached((&nonce).into(), b"", &mut buf)
            .unwrap();
        let _ = std::hint::black_box(tag);
    }
    let rc_rate = (total >> 20) as f64 / t.elapsed().as_secs_f64();

    println!("AES-256-GCM seal, 1 MiB blobs, one core:");
    println!("  ring     {ring_rate:8.0} MiB/s");
    println!("  aes-gcm  {rc_rate:8.0} MiB/s");
    println!("  ring / aes-gcm = {:.2}x", ring_rate / rc_rate);
}
