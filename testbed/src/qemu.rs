//! Plain QEMU (no libvirt): `qemu-system-x86_64 -accel tcg`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::guest::{Ready, Wrote};
use crate::image::Image;
use crate::libvirt::qemu_io_via;
use crate::util::{describe, io_err};
use crate::vmfiles::VmFiles;
use crate::{Boot, Error, Result, VmOptions};

/// The test image under a plain `qemu-system-x86_64 -accel tcg` process, on a
/// private copy of its disk: serial console to a file, a QMP socket for HMP
/// commands, QEMU's stdout/stderr to a log file, no network. The process is
/// killed on drop and the temp dir deleted.
#[derive(Debug)]
pub struct QemuVm {
    files: VmFiles,
    args: Vec<String>,
    child: Option<Child>,
}

crate::vmfiles::deref_to_files!(QemuVm);

impl QemuVm {
    /// Copies the image's disk into a new temp dir (not started yet).
    pub fn new(image: &Image, opts: VmOptions) -> Result<QemuVm> {
        let files = VmFiles::new(image, &opts, "bw-testbed-qemu-")?;
        let (name, disk) = (files.name().to_string(), files.disk_path());
        let console_path = files.console.path();
        let qmp = files.dir().join("qmp.sock");
        let mut args: Vec<String> = vec![
            "-name".into(),
            name.clone(),
            "-accel".into(),
            "tcg".into(),
            "-machine".into(),
            "pc".into(),
            "-m".into(),
            opts.memory_mib.to_string(),
            "-smp".into(),
            "1".into(),
            "-nodefaults".into(),
            "-display".into(),
            "none".into(),
            "-no-reboot".into(),
            "-serial".into(),
            format!("file:{}", console_path.display()),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", qmp.display()),
            "-drive".into(),
            format!(
                "file={},if=none,id=drive0,format={},cache=writeback",
                disk.display(),
                opts.format.as_str()
            ),
            "-device".into(),
            "virtio-blk-pci,drive=drive0,id=virtio-disk0,bootindex=1".into(),
        ];
        if let Boot::Kernel { args: extra } = &opts.boot {
            args.extend([
                "-kernel".into(),
                image.kernel().display().to_string(),
                "-initrd".into(),
                image.initrd().display().to_string(),
                "-append".into(),
                image.cmdline_with(extra),
            ]);
        }
        Ok(QemuVm {
            files,
            args,
            child: None,
        })
    }

    /// QEMU's stdout and stderr.
    pub fn qemu_log_path(&self) -> PathBuf {
        self.dir.path().join("qemu.log")
    }
    /// The QEMU command line arguments.
    pub fn args(&self) -> &[String] {
        &self.args
    }

    /// Appends QEMU arguments (an `-object`, ...) before [`QemuVm::start`].
    pub fn add_args(&mut self, args: &[&str]) {
        self.args.extend(args.iter().map(|a| a.to_string()));
    }

    /// Spawns QEMU. Console waits then look only at output from this boot on.
    pub fn start(&mut self) -> Result<()> {
        if self.is_running() {
            return Err(Error::Unexpected(format!(
                "{} is already running",
                self.name
            )));
        }
        self.console.skip_to_end();
        let _ = std::fs::remove_file(self.qmp_path());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.qemu_log_path())
            .map_err(io_err("opening qemu.log"))?;
        let log2 = log.try_clone().map_err(io_err("opening qemu.log"))?;
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(&self.args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        let child = cmd
            .spawn()
            .map_err(io_err(format!("spawning {}", describe(&cmd))))?;
        self.child = Some(child);
        Ok(())
    }

    /// Whether the QEMU process is running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Kills QEMU (like pulling the plug) and reaps it; the disk stays.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            if matches!(c.try_wait(), Ok(None)) {
                c.kill().map_err(io_err("killing qemu"))?;
            }
            c.wait().map_err(io_err("waiting for qemu"))?;
        }
        Ok(())
    }

    /// Waits for QEMU to exit by itself (e.g. after `bulwark.poweroff=1`).
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            let Some(c) = self.child.as_mut() else {
                return Ok(());
            };
            if c.try_wait().map_err(io_err("waiting for qemu"))?.is_some() {
                self.child = None;
                return Ok(());
            }
            if start.elapsed() >= timeout {
                return Err(self
                    .console
                    .error(format!("qemu still running after {timeout:?}")));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for a console line containing `pattern` (see
    /// [`Console::wait_line`]); fails early if QEMU exits.
    pub fn wait_line(&mut self, pattern: &str, timeout: Duration) -> Result<String> {
        let log = self.qemu_log_path();
        let child = &mut self.child;
        self.files.console.wait_line_checked(pattern, timeout, || {
            let exited = match child.as_mut() {
                None => true,
                Some(c) => !matches!(c.try_wait(), Ok(None)),
            };
            if exited {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                Err(Error::Unexpected(format!(
                    "qemu is not running; qemu.log: {}",
                    crate::util::tail_lines(&text, 10)
                )))
            } else {
                Ok(())
            }
        })
    }

    /// Waits for the guest's `ready` line.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<Ready> {
        Ready::parse(&self.wait_line(crate::guest::READY, timeout)?)
    }

    /// Waits for the guest's `wrote` line.
    pub fn wait_wrote(&mut self, timeout: Duration) -> Result<Wrote> {
        Wrote::parse(&self.wait_line(crate::guest::WROTE, timeout)?)
    }

    fn qmp_path(&self) -> PathBuf {
        self.dir.path().join("qmp.sock")
    }

    /// Runs an HMP command (via QMP `human-monitor-command`), returning its
    /// reply.
    pub fn hmp(&self, command: &str) -> Result<String> {
        let path = self.qmp_path();
        let mut stream = None;
        let start = Instant::now();
        while stream.is_none() {
            match UnixStream::connect(&path) {
                Ok(s) => stream = Some(s),
                Err(e) if start.elapsed() > Duration::from_secs(5) => {
                    return Err(io_err(format!("connecting to {}", path.display()))(e))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
        let stream = stream.ok_or_else(|| Error::Unexpected("no QMP socket".into()))?;
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(io_err("setting QMP timeout"))?;
        let mut writer = stream.try_clone().map_err(io_err("cloning QMP socket"))?;
        let mut reader = BufReader::new(stream);
        // Greeting, then capabilities negotiation.
        read_qmp_reply(&mut reader, true)?;
        writer
            .write_all(b"{\"execute\":\"qmp_capabilities\"}\n")
            .map_err(io_err("writing to QMP"))?;
        read_qmp_reply(&mut reader, false)?;
        let req = serde_json::json!({
            "execute": "human-monitor-command",
            "arguments": { "command-line": command },
        });
        writer
            .write_all(format!("{req}\n").as_bytes())
            .map_err(io_err("writing to QMP"))?;
        let ret = read_qmp_reply(&mut reader, false)?;
        Ok(ret.as_str().unwrap_or_default().to_string())
    }

    /// Runs a `qemu-io` command on the running VM's disk from the host (see
    /// [`crate::Vm::qemu_io`]); its output comes from QEMU's log.
    pub fn qemu_io(&self, command: &str) -> Result<String> {
        qemu_io_via(&self.qemu_log_path(), command, |c| self.hmp(c))
    }

    /// Pauses the guest's vCPUs (HMP `stop`).
    pub fn pause(&self) -> Result<()> {
        self.hmp("stop").map(|_| ())
    }

    /// Resumes the guest (HMP `cont`).
    pub fn resume(&self) -> Result<()> {
        self.hmp("cont").map(|_| ())
    }
}

/// Reads QMP messages until a greeting (`greeting`) or a reply; skips events.
fn read_qmp_reply(reader: &mut impl BufRead, greeting: bool) -> Result<serde_json::Value> {
    loop {
        let mut line = String::new();
        let n = reader
            .read_line(&mut line)
            .map_err(io_err("reading from QMP"))?;
        if n == 0 {
            return Err(Error::Unexpected("QMP socket closed".into()));
        }
        let v: serde_json::Value = serde_json::from_str(line.trim())
            .map_err(|e| Error::Unexpected(format!("bad QMP message {line:?}: {e}")))?;
        if greeting {
            if v.get("QMP").is_some() {
                return Ok(v);
            }
            continue;
        }
        if let Some(r) = v.get("return") {
            return Ok(r.clone());
        }
        if let Some(e) = v.get("error") {
            return Err(Error::Unexpected(format!("QMP error: {e}")));
        }
    }
}

impl Drop for QemuVm {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}
