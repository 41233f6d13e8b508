//! The tiny test image built by `vm-images/build`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

use crate::util::{io_err, run};
use crate::{Error, Result};

/// Disk image format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFormat {
    /// Raw disk image.
    Raw,
    /// qcow2 v3 (compat=1.1: can hold persistent dirty bitmaps).
    Qcow2,
}

impl DiskFormat {
    /// The name QEMU and libvirt use (`raw`, `qcow2`).
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }
}

/// A built test image: its files and facts (see `vm-images/build`).
///
/// The disk is 128 MiB: an MBR with extlinux, one bootable ext4 partition
/// (`/dev/vda1`) at [`Image::partition_offset`], and an unpartitioned scratch
/// area at [`Image::scratch_offset`] that the guest never touches, for
/// host-side writes in tests. The image files are shared: never write to
/// them, copy them (as [`crate::Vm`] and [`crate::QemuVm`] do).
#[derive(Debug, Clone)]
pub struct Image {
    dir: PathBuf,
    marker: String,
    disk_size: u64,
    partition_offset: u64,
    partition_size: u64,
    scratch_offset: u64,
    scratch_size: u64,
    cmdline: String,
}

impl Image {
    /// Builds the image (cached: milliseconds when nothing changed) into the
    /// default directory and loads it. The directory is `$BULWARK_VM_IMAGES`
    /// if set, else `$CARGO_TARGET_DIR/vm-images`, else `target/vm-images` in
    /// the workspace. Built at most once per process.
    pub fn tiny() -> Result<Image> {
        static BUILT: OnceLock<Mutex<Option<Image>>> = OnceLock::new();
        let cell = BUILT.get_or_init(|| Mutex::new(None));
        let mut guard = cell.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(img) = guard.as_ref() {
            return Ok(img.clone());
        }
        let img = Image::build_into(&Self::default_dir())?;
        *guard = Some(img.clone());
        Ok(img)
    }

    /// The directory [`Image::tiny`] builds into.
    pub fn default_dir() -> PathBuf {
        if let Some(d) = std::env::var_os("BULWARK_VM_IMAGES") {
            return PathBuf::from(d);
        }
        if let Some(d) = std::env::var_os("CARGO_TARGET_DIR") {
            return PathBuf::from(d).join("vm-images");
        }
        workspace_dir().join("target").join("vm-images")
    }

    /// Runs `vm-images/build DIR` (cached) and loads the result.
    pub fn build_into(dir: &Path) -> Result<Image> {
        let script = workspace_dir().join("vm-images").join("build");
        if !script.exists() {
            return Err(Error::Setup(format!("{} not found", script.display())));
        }
        run(Command::new("bash")
            .arg(&script)
            .arg(dir)
            .env("BULWARK_VM_IMAGES_QUIET", "1"))?;
        Image::load(dir)
    }

    /// Loads an image built earlier into `dir`.
    pub fn load(dir: &Path) -> Result<Image> {
        let env_path = dir.join("tiny.env");
        let text = std::fs::read_to_string(&env_path)
            .map_err(io_err(format!("reading {}", env_path.display())))?;
        let vars: HashMap<&str, &str> = text
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.trim(), v.trim()))
            .collect();
        let get = |k: &str| {
            vars.get(k)
                .copied()
                .ok_or_else(|| Error::Unexpected(format!("{} has no {k}", env_path.display())))
        };
        let num = |k: &str| -> Result<u64> {
            get(k)?
                .parse()
                .map_err(|_| Error::Unexpected(format!("{} has a bad {k}", env_path.display())))
        };
        let img = Image {
            dir: dir.to_path_buf(),
            marker: get("MARKER")?.to_string(),
            disk_size: num("DISK_SIZE")?,
            partition_offset: num("PARTITION_OFFSET")?,
            partition_size: num("PARTITION_SIZE")?,
            scratch_offset: num("SCRATCH_OFFSET")?,
            scratch_size: num("SCRATCH_SIZE")?,
            cmdline: get("CMDLINE")?.to_string(),
        };
        for p in [img.raw(), img.qcow2(), img.kernel(), img.initrd()] {
            if !p.exists() {
                return Err(Error::Unexpected(format!("{} is missing", p.display())));
            }
        }
        Ok(img)
    }

    /// The directory holding the image files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    /// The raw disk image.
    pub fn raw(&self) -> PathBuf {
        self.dir.join("tiny.raw")
    }
    /// The qcow2 disk image.
    pub fn qcow2(&self) -> PathBuf {
        self.dir.join("tiny.qcow2")
    }
    /// The disk image of a format.
    pub fn disk(&self, format: DiskFormat) -> PathBuf {
        match format {
            DiskFormat::Raw => self.raw(),
            DiskFormat::Qcow2 => self.qcow2(),
        }
    }
    /// The kernel, for direct kernel boot.
    pub fn kernel(&self) -> PathBuf {
        self.dir.join("vmlinuz")
    }
    /// The initramfs, for direct kernel boot.
    pub fn initrd(&self) -> PathBuf {
        self.dir.join("initrd.img")
    }
    /// The marker value stored in the guest's `/marker`.
    pub fn marker(&self) -> &str {
        &self.marker
    }
    /// The disk's virtual size in bytes.
    pub fn disk_size(&self) -> u64 {
        self.disk_size
    }
    /// Byte offset of the ext4 root partition (vda1) in the disk.
    pub fn partition_offset(&self) -> u64 {
        self.partition_offset
    }
    /// Size of the root partition in bytes.
    pub fn partition_size(&self) -> u64 {
        self.partition_size
    }
    /// Byte offset of the scratch area (outside any partition).
    pub fn scratch_offset(&self) -> u64 {
        self.scratch_offset
    }
    /// Size of the scratch area in bytes.
    pub fn scratch_size(&self) -> u64 {
        self.scratch_size
    }
    /// The base kernel command line (`root=/dev/vda1 console=ttyS0 quiet`).
    pub fn cmdline(&self) -> &str {
        &self.cmdline
    }

    /// The base command line plus `args`.
    pub fn cmdline_with(&self, args: &[String]) -> String {
        let mut s = self.cmdline.clone();
        for a in args {
            s.push(' ');
            s.push_str(a);
        }
        s
    }

    /// Reads a file from the root filesystem of a raw disk with this image's
    /// layout (e.g. a stopped VM's [`crate::Vm::disk_path`]), with
    /// `debugfs -R 'cat PATH'`; no mount needed.
    pub fn read_guest_file(&self, raw_disk: &Path, guest_path: &str) -> Result<Vec<u8>> {
        let dev = format!("{}?offset={}", raw_disk.display(), self.partition_offset);
        let out = Command::new("debugfs")
            .arg("-R")
            .arg(format!("cat {guest_path}"))
            .arg(&dev)
            .output()
            .map_err(io_err("running debugfs"))?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() || stderr.lines().any(|l| l.contains(guest_path)) {
            return Err(Error::Command {
                command: format!("debugfs -R 'cat {guest_path}' {dev}"),
                status: out.status.to_string(),
                output: stderr.trim().to_string(),
            });
        }
        Ok(out.stdout)
    }
}

/// The workspace root (the parent of this crate's directory).
fn workspace_dir() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}
