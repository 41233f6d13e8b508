//! What every test VM has, whichever way it runs (libvirt domain or a bare
//! QEMU process): a unique name, a temp dir holding a private copy of the
//! image's disk, and a serial console log.

use std::path::{Path, PathBuf};

use crate::console::Console;
use crate::image::{DiskFormat, Image};
use crate::util::{copy_sparse, io_err};
use crate::{Result, VmOptions};

/// A VM's name, directory, disk and console.
#[derive(Debug)]
pub struct VmFiles {
    pub(crate) name: String,
    pub(crate) dir: tempfile::TempDir,
    pub(crate) disk: PathBuf,
    pub(crate) format: DiskFormat,
    pub(crate) console: Console,
}

impl VmFiles {
    /// A new temp dir (named `prefix...`) with the image's disk copied in,
    /// sparse, in `opts.format`, and a unique name from `opts.name_prefix`.
    pub(crate) fn new(image: &Image, opts: &VmOptions, prefix: &str) -> Result<VmFiles> {
        let dir = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir()
            .map_err(io_err("creating temp dir"))?;
        let disk = dir.path().join(format!("disk.{}", opts.format.as_str()));
        copy_sparse(&image.disk(opts.format), &disk)?;
        let console = Console::new(dir.path().join("console.log"));
        Ok(VmFiles {
            name: crate::unique_name(&opts.name_prefix),
            dir,
            disk,
            format: opts.format,
            console,
        })
    }

    /// The VM's unique name.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The VM's disk (a private copy of the image).
    pub fn disk_path(&self) -> &Path {
        &self.disk
    }
    /// The disk's format.
    pub fn disk_format(&self) -> DiskFormat {
        self.format
    }
    /// The VM's temp dir (deleted on drop).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
    /// The serial console.
    pub fn console(&mut self) -> &mut Console {
        &mut self.console
    }
}

/// `Deref` to the [`VmFiles`] field `files`: name, dir, disk and console
/// read the same on every kind of test VM.
macro_rules! deref_to_files {
    ($t:ty) => {
        impl std::ops::Deref for $t {
            type Target = $crate::vmfiles::VmFiles;
            fn deref(&self) -> &$crate::vmfiles::VmFiles {
                &self.files
            }
        }

        impl std::ops::DerefMut for $t {
            fn deref_mut(&mut self) -> &mut $crate::vmfiles::VmFiles {
                &mut self.files
            }
        }
    };
}
pub(crate) use deref_to_files;
