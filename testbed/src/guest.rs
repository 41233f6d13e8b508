//! The guest's console protocol.
//!
//! The test image's init prints one line per event on ttyS0, each starting
//! with [`PREFIX`]:
//!
//! ```text
//! bulwark-guest: ready marker=<marker> boots=<n>
//! bulwark-guest: wrote file=<path> mib=<n> sha256=<hex>
//! bulwark-guest: poweroff
//! bulwark-guest: idle
//! bulwark-guest: error <text>
//! ```
//!
//! `boots` counts boots of that disk (1 on the first). Instructions come from
//! the kernel command line (direct kernel boot, see [`crate::Boot::Kernel`]):
//! `bulwark.write_mib=N` writes N MiB of fresh random data to
//! `/data/written-<boots>.bin` and syncs; `bulwark.poweroff=1` powers off when
//! done (otherwise the guest stays up, idle).

use crate::{Error, Result};

/// Every guest line starts with this.
pub const PREFIX: &str = "bulwark-guest:";
/// Substring of the line printed once the guest has booted.
pub const READY: &str = "bulwark-guest: ready ";
/// Substring of the line printed after `bulwark.write_mib`.
pub const WROTE: &str = "bulwark-guest: wrote ";
/// The line printed right before powering off.
pub const POWEROFF: &str = "bulwark-guest: poweroff";
/// The line printed when the guest has done its instructions and stays up.
pub const IDLE: &str = "bulwark-guest: idle";

/// `bulwark-guest: ready marker=<marker> boots=<n>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ready {
    /// The image's marker (the content of `/marker`).
    pub marker: String,
    /// How many times this disk has booted, this boot included.
    pub boots: u64,
}

/// `bulwark-guest: wrote file=<path> mib=<n> sha256=<hex>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wrote {
    /// Path of the file inside the guest's root filesystem.
    pub file: String,
    /// Its size in MiB.
    pub mib: u64,
    /// Its SHA-256, lowercase hex.
    pub sha256: String,
}

/// The value of `key=value` in a line, if present.
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace().find_map(|tok| {
        tok.strip_prefix(key)
            .and_then(|rest| rest.strip_prefix('='))
    })
}

fn need<'a>(line: &'a str, key: &str) -> Result<&'a str> {
    field(line, key).ok_or_else(|| Error::Unexpected(format!("no {key}= in guest line {line:?}")))
}

fn number(line: &str, key: &str) -> Result<u64> {
    need(line, key)?
        .parse()
        .map_err(|_| Error::Unexpected(format!("bad {key}= in guest line {line:?}")))
}

impl Ready {
    /// Parses a `ready` line.
    pub fn parse(line: &str) -> Result<Ready> {
        if !line.contains(READY) {
            return Err(Error::Unexpected(format!("not a ready line: {line:?}")));
        }
        Ok(Ready {
            marker: need(line, "marker")?.to_string(),
            boots: number(line, "boots")?,
        })
    }
}

impl Wrote {
    /// Parses a `wrote` line.
    pub fn parse(line: &str) -> Result<Wrote> {
        if !line.contains(WROTE) {
            return Err(Error::Unexpected(format!("not a wrote line: {line:?}")));
        }
        let sha256 = need(line, "sha256")?.to_string();
        if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::Unexpected(format!("bad sha256 in {line:?}")));
        }
        Ok(Wrote {
            file: need(line, "file")?.to_string(),
            mib: number(line, "mib")?,
            sha256,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lines() {
        let r = Ready::parse("bulwark-guest: ready marker=bw-12 boots=3").unwrap();
        assert_eq!(
            r,
            Ready {
                marker: "bw-12".into(),
                boots: 3
            }
        );
        let sha = "a".repeat(64);
        let w = Wrote::parse(&format!(
            "bulwark-guest: wrote file=/data/written-1.bin mib=4 sha256={sha}"
        ))
        .unwrap();
        assert_eq!(w.file, "/data/written-1.bin");
        assert_eq!(w.mib, 4);
        assert!(Ready::parse("bulwark-guest: ready boots=1").is_err());
        assert!(Wrote::parse("bulwark-guest: wrote file=x mib=1 sha256=zz").is_err());
        assert_eq!(field("a=1 b=2", "b"), Some("2"));
        assert_eq!(field("ab=1", "a"), None);
    }
}
