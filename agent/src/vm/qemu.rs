//! qemu-img and qemu-nbd for disks of stopped domains.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Runs a command; its stdout, or an error naming it with its stderr.
pub(crate) fn run(cmd: &mut Command) -> Result<String> {
    let desc = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {desc}"))?;
    if !out.status.success() {
        bail!(
            "{desc} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A persistent bitmap in a qcow2 image, as `qemu-img info` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bitmap {
    pub name: String,
    /// `auto`: enabled (records writes).
    pub enabled: bool,
    /// `in-use`: the image was not closed cleanly since (crash, destroy):
    /// its content cannot be trusted.
    pub in_use: bool,
}

/// Persistent bitmaps of a qcow2 image (`-U`: also while a VM has it open).
pub fn bitmaps(image: &Path) -> Result<Vec<Bitmap>> {
    let out = run(Command::new("qemu-img")
        .args(["info", "-U", "--output=json", "-f", "qcow2"])
        .arg(image))?;
    let v: serde_json::Value = serde_json::from_str(&out).context("parsing qemu-img info")?;
    let list = v
        .pointer("/format-specific/data/bitmaps")
        .and_then(|b| b.as_array())
        .cloned()
        .unwrap_or_default();
    Ok(list
        .iter()
        .filter_map(|b| {
            let flags: Vec<&str> = b
                .get("flags")?
                .as_array()?
                .iter()
                .filter_map(|f| f.as_str())
                .collect();
            Some(Bitmap {
                name: b.get("name")?.as_str()?.to_string(),
                enabled: flags.contains(&"auto"),
                in_use: flags.contains(&"in-use"),
            })
        })
        .collect())
}

pub fn bitmap_add(image: &Path, name: &str) -> Result<()> {
    run(Command::new("qemu-img")
        .args(["bitmap", "--add", "--enable", "-f", "qcow2"])
        .arg(image)
        .arg(name))?;
    Ok(())
}

pub fn bitmap_remove(image: &Path, name: &str) -> Result<()> {
    run(Command::new("qemu-img")
        .args(["bitmap", "--remove", "-f", "qcow2"])
        .arg(image)
        .arg(name))?;
    Ok(())
}

/// A read-only `qemu-nbd` export of one image on a Unix socket, killed on
/// drop.
pub struct QemuNbd {
    child: Child,
    pub socket: PathBuf,
    pub export: String,
}

impl QemuNbd {
    /// `qemu-nbd -r -f FORMAT [-B BITMAP] -x EXPORT --socket SOCKET IMAGE`.
    pub fn start(
        image: &Path,
        format: &str,
        bitmap: Option<&str>,
        socket: &Path,
        export: &str,
    ) -> Result<Self> {
        let _ = std::fs::remove_file(socket);
        let mut cmd = Command::new("qemu-nbd");
        cmd.args(["-r", "-f", format, "-x", export, "--shared=1", "--socket"])
            .arg(socket);
        if let Some(b) = bitmap {
            cmd.args(["-B", b]);
        }
        cmd.arg(image)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().context("starting qemu-nbd (qemu-utils)")?;
        let t = Instant::now();
        // qemu-nbd binds (the file appears) before it listens: a client in
        // between is refused. Wait for the listening socket itself; a probe
        // connection would be its one client, and it exits when that goes.
        while !listening(socket) {
            if let Some(st) = child.try_wait()? {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut err);
                }
                bail!(
                    "qemu-nbd on {} exited ({st}): {}",
                    image.display(),
                    err.trim()
                );
            }
            if t.elapsed() > Duration::from_secs(20) {
                let _ = child.kill();
                let _ = child.wait();
                bail!("qemu-nbd on {} did not start", image.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(QemuNbd {
            child,
            socket: socket.to_path_buf(),
            export: export.to_string(),
        })
    }
}

/// Whether a Unix socket is listening at `path`, from `/proc/net/unix`
/// (flag `__SO_ACCEPTCON`, 0x10000, marks a listening socket).
fn listening(path: &Path) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/net/unix") else {
        // No procfs: the socket file is the best sign there is.
        return path.exists();
    };
    let want = path.to_string_lossy();
    table.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() >= 8 && f[7] == want && f[3] == "00010000"
    })
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}
