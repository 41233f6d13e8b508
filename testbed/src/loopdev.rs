//! Loop devices over test files: block devices for tests, detached on drop.
//!
//! Partition nodes do not appear on the test hosts, so tests use whole
//! devices (or `losetup -o OFFSET`).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::util::run;
use crate::Result;

/// A loop device attached to a file by this process; `losetup -d` on drop.
#[derive(Debug)]
pub struct LoopDevice {
    path: PathBuf,
}

impl LoopDevice {
    /// Attaches `file` to the first free loop device (read-write).
    pub fn attach(file: &Path) -> Result<LoopDevice> {
        let out = run(Command::new("losetup").args(["-f", "--show"]).arg(file))?;
        Ok(LoopDevice {
            path: PathBuf::from(out.trim()),
        })
    }

    /// A new file of `size` bytes filled by `fill`, attached as a device.
    pub fn with_contents(file: &Path, size: u64, fill: impl FnOnce(&mut [u8])) -> Result<Self> {
        let mut data = vec![0u8; size as usize];
        fill(&mut data);
        std::fs::write(file, &data)
            .map_err(crate::util::io_err(format!("writing {}", file.display())))?;
        LoopDevice::attach(file)
    }

    /// `/dev/loopN`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Everything the device holds now (through the device, not the file).
    pub fn read_all(&self) -> Result<Vec<u8>> {
        std::fs::read(&self.path).map_err(crate::util::io_err(format!(
            "reading {}",
            self.path.display()
        )))
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        // Best effort: a device still open elsewhere is freed when closed
        // (losetup -d sets autoclear then).
        let _ = Command::new("losetup").arg("-d").arg(&self.path).status();
    }
}
