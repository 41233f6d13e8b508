//! One module per command group.

pub mod agent;
pub mod bench;
pub mod image;
pub mod mount;
pub mod repo;
pub mod snapshots;
pub mod verify;
pub mod vm;

/// Human-readable byte counts.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
