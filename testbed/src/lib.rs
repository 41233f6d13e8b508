//! Test bed for Bulwark's end-to-end tests: tiny bootable VM images and real
//! libvirt/QEMU harnesses.
//!
//! * [`Image::tiny`] builds (cached) the image from `vm-images/build`: an
//!   extlinux-bootable disk (raw and qcow2 v3) with a Debian cloud kernel and a
//!   busybox guest, plus the kernel and initramfs for direct kernel boot.
//! * [`TestBed::ensure`] makes sure `virtlogd` and `libvirtd` run (starting
//!   them if needed; never restarting one it did not start).
//! * [`Vm`] is a libvirt domain (`<domain type='qemu'>`, TCG) on a private copy
//!   of the image, undefined and deleted on drop, even when a test panics.
//! * [`LoopDevice`] is a block device over a test file, detached on drop.
//! * [`QemuVm`] is the same guest under a plain `qemu-system-x86_64 -accel tcg`,
//!   killed on drop.
//! * [`nbd`] has the NBD tests' images, served exports and test PKI.
//! * [`s3`] starts `s3s-fs` and a fault proxy; [`rgw`] starts Ceph's radosgw,
//!   an S3 server that enforces Object Lock.
//!
//! The guest speaks on its serial console in one line format (see
//! [`guest`]); both VM kinds read that console from a file with
//! [`Console::wait_line`] and friends.
//!
//! ```no_run
//! use std::time::Duration;
//! use testbed::{Image, Vm, VmOptions};
//!
//! let image = Image::tiny()?;
//! let mut vm = Vm::define(&image, VmOptions::default())?;
//! vm.start()?;
//! let ready = vm.wait_ready(Duration::from_secs(60))?;
//! assert_eq!(ready.marker, image.marker());
//! vm.qemu_io(&format!("write -P 0xab {} 128k", image.scratch_offset()))?;
//! # Ok::<(), testbed::Error>(())
//! ```
//!
//! Everything here needs root and the packages of `scripts/setup-test-host.sh`.

#![deny(missing_docs)]

pub mod cli;
mod console;
pub mod fsimage;
pub mod guest;
mod image;
mod libvirt;
mod loopdev;
pub mod nbd;
mod qemu;
pub mod rgw;
pub mod s3;
mod util;
mod vmfiles;

use std::path::PathBuf;
use std::time::Duration;

pub use console::Console;
pub use image::{DiskFormat, Image};
pub use libvirt::{domain_qemu_io, TestBed, Vm, LIBVIRT_URI};
pub use loopdev::LoopDevice;
pub use qemu::QemuVm;
pub use util::files_under;
pub use vmfiles::VmFiles;

/// The device path of the guest's disk for HMP `qemu-io -d`, the same under
/// libvirt and under [`QemuVm`].
pub const DISK_QDEV: &str = "/machine/peripheral/virtio-disk0/virtio-backend";

/// What can go wrong in the test bed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O error, with what was being done.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A command ran and failed.
    #[error("`{command}` failed ({status}): {output}")]
    Command {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// Its stderr (or stdout when stderr was empty), trimmed.
        output: String,
    },
    /// Waiting for something on a console (or for a VM state) timed out, or
    /// the VM stopped while we waited.
    #[error("{what} (console {console}); console tail:\n{tail}")]
    Console {
        /// What went wrong.
        what: String,
        /// The console file.
        console: PathBuf,
        /// The last lines of the console.
        tail: String,
    },
    /// The host is not set up (missing package, daemon did not come up, ...).
    #[error("test host not ready: {0} (run scripts/setup-test-host.sh as root)")]
    Setup(String),
    /// A guest line or a QEMU/libvirt answer did not parse.
    #[error("unexpected output: {0}")]
    Unexpected(String),
}

/// Result with the test bed's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How a VM boots.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Boot {
    /// From the disk: SeaBIOS, MBR, extlinux, kernel (about 4-6 s under TCG).
    /// The command line is the one fixed in `extlinux.conf` (no instructions).
    #[default]
    Disk,
    /// Direct kernel boot with the image's kernel and initramfs; `args` are
    /// appended to the image's base command line, e.g.
    /// `["bulwark.write_mib=4", "bulwark.poweroff=1"]`.
    Kernel {
        /// Extra kernel command line arguments (guest instructions).
        args: Vec<String>,
    },
}

/// Options for [`Vm::define`] and [`QemuVm::new`].
#[derive(Debug, Clone)]
pub struct VmOptions {
    /// Which of the image's disks to copy (default qcow2).
    pub format: DiskFormat,
    /// How to boot (default: from the disk).
    pub boot: Boot,
    /// Guest memory in MiB (default 256).
    pub memory_mib: u32,
    /// Prefix of the unique VM name (default `bw-test`).
    pub name_prefix: String,
    /// libvirt only: XML put inside the domain's `<metadata>` element (e.g.
    /// Bulwark's policy element in its own namespace).
    pub metadata_xml: Option<String>,
    /// libvirt only: extra XML put inside `<devices>` (e.g. a second disk).
    pub devices_xml: Option<String>,
}

impl Default for VmOptions {
    fn default() -> Self {
        VmOptions {
            format: DiskFormat::Qcow2,
            boot: Boot::Disk,
            memory_mib: 256,
            name_prefix: "bw-test".to_string(),
            metadata_xml: None,
            devices_xml: None,
        }
    }
}

impl VmOptions {
    /// Default options with a raw disk.
    pub fn raw() -> Self {
        VmOptions {
            format: DiskFormat::Raw,
            ..Self::default()
        }
    }

    /// Default options with a qcow2 disk.
    pub fn qcow2() -> Self {
        Self::default()
    }

    /// Boot the kernel directly with these extra command line arguments.
    pub fn kernel_args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.boot = Boot::Kernel {
            args: args.into_iter().map(Into::into).collect(),
        };
        self
    }
}

/// A VM name unique across processes and calls: `PREFIX-<pid>-<n><random>`.
pub fn unique_name(prefix: &str) -> String {
    util::unique_name(prefix)
}

/// Default time to wait for a guest to boot to its `ready` line.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
