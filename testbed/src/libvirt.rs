//! libvirtd-driven VMs, via `virsh`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::guest::{Ready, Wrote};
use crate::image::Image;
use crate::util::{io_err, link_or_copy, make_world_readable, run, xml_escape};
use crate::vmfiles::VmFiles;
use crate::{Boot, Error, Result, VmOptions, DISK_QDEV};

/// The libvirt connection URI the test bed uses.
pub const LIBVIRT_URI: &str = "qemu:///system";

const LIBVIRT_DIRS: &[&str] = &[
    "/var/log/libvirt",
    "/var/log/libvirt/qemu",
    "/var/run/libvirt",
    "/var/lib/libvirt/qemu",
    "/var/cache/libvirt",
];

/// The host's libvirt, ready for tests.
#[derive(Debug, Clone, Copy)]
pub struct TestBed {
    _private: (),
}

impl TestBed {
    /// Makes sure `virtlogd` and `libvirtd` run and answer on
    /// [`LIBVIRT_URI`]: creates the directories they need and starts
    /// whichever is not running (`virtlogd -d`, then `libvirtd -d`, left
    /// running for later tests). Never kills or restarts a running daemon.
    /// Checked once per process.
    pub fn ensure() -> Result<TestBed> {
        static DONE: OnceLock<Mutex<bool>> = OnceLock::new();
        let m = DONE.get_or_init(|| Mutex::new(false));
        let mut done = m.lock().unwrap_or_else(|p| p.into_inner());
        if !*done {
            ensure_daemons()?;
            *done = true;
        }
        Ok(TestBed { _private: () })
    }

    /// Runs `virsh -c qemu:///system ARGS`, returning its stdout.
    pub fn virsh<I, S>(&self, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        virsh(args)
    }
}

fn virsh<I, S>(args: I) -> Result<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    run(Command::new("virsh")
        .arg("-q")
        .arg("-c")
        .arg(LIBVIRT_URI)
        .args(args))
}

fn process_running(name: &str) -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    entries.flatten().any(|e| {
        let is_pid = e
            .file_name()
            .to_string_lossy()
            .bytes()
            .all(|b| b.is_ascii_digit());
        is_pid
            && std::fs::read_to_string(e.path().join("comm"))
                .map(|c| c.trim() == name)
                .unwrap_or(false)
    })
}

fn libvirt_answers() -> bool {
    virsh(["version"]).is_ok()
}

fn ensure_daemons() -> Result<()> {
    let virtlogd_up = process_running("virtlogd");
    if virtlogd_up && libvirt_answers() {
        return Ok(());
    }
    for tool in ["virsh", "libvirtd", "virtlogd", "qemu-system-x86_64"] {
        if which(tool).is_none() {
            return Err(Error::Setup(format!("{tool} not installed")));
        }
    }
    for d in LIBVIRT_DIRS {
        std::fs::create_dir_all(d).map_err(io_err(format!("creating {d}")))?;
    }
    configure_qemu_user()?;
    if !virtlogd_up {
        run(Command::new(which("virtlogd").unwrap_or_else(|| "virtlogd".into())).arg("-d"))?;
    }
    if !process_running("libvirtd") {
        run(Command::new(which("libvirtd").unwrap_or_else(|| "libvirtd".into())).arg("-d"))?;
    }
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(20) {
        if libvirt_answers() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(Error::Setup(format!(
        "libvirtd does not answer on {LIBVIRT_URI}"
    )))
}

/// Lets QEMU run as root (test disks live in temp dirs), as
/// scripts/setup-test-host.sh does; only before we start libvirtd ourselves.
fn configure_qemu_user() -> Result<()> {
    let conf = Path::new("/etc/libvirt/qemu.conf");
    let Ok(text) = std::fs::read_to_string(conf) else {
        return Ok(());
    };
    if text.contains("# bulwark-test-host") || process_running("libvirtd") {
        return Ok(());
    }
    let add = "# bulwark-test-host: QEMU runs as root so tests can use images anywhere.\n\
               user = \"root\"\ngroup = \"root\"\ndynamic_ownership = 0\nremember_owner = 0\n";
    let mut new = text;
    if !new.ends_with('\n') {
        new.push('\n');
    }
    new.push_str(add);
    std::fs::write(conf, new).map_err(io_err(format!("writing {}", conf.display())))
}

fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// A libvirt domain running the test image on a private copy of its disk.
///
/// `<domain type='qemu'>` (TCG), 1 vCPU, virtio disk `vda` (QEMU device
/// `virtio-disk0`, see [`DISK_QDEV`]), serial console to a file, no network.
/// On drop: destroy, undefine (with checkpoint and snapshot metadata) and
/// delete the temp dir and QEMU log, also when a test panics.
#[derive(Debug)]
pub struct Vm {
    files: VmFiles,
    xml: String,
}

crate::vmfiles::deref_to_files!(Vm);

impl Vm {
    /// Copies the image's disk into a new temp dir and defines a domain with
    /// a unique name on it (not started). Calls [`TestBed::ensure`].
    pub fn define(image: &Image, opts: VmOptions) -> Result<Vm> {
        TestBed::ensure()?;
        let files = VmFiles::new(image, &opts, "bw-testbed-")?;
        // libvirt's QEMU runs as another user: it must reach the disk.
        make_world_readable(files.dir())?;
        let dir = files.dir();
        let kernel = match &opts.boot {
            Boot::Disk => String::new(),
            Boot::Kernel { args } => {
                let k = dir.join("vmlinuz");
                let i = dir.join("initrd.img");
                link_or_copy(&image.kernel(), &k)?;
                link_or_copy(&image.initrd(), &i)?;
                format!(
                    "    <kernel>{}</kernel>\n    <initrd>{}</initrd>\n    <cmdline>{}</cmdline>\n",
                    xml_escape(&k.to_string_lossy()),
                    xml_escape(&i.to_string_lossy()),
                    xml_escape(&image.cmdline_with(args)),
                )
            }
        };
        let xml = format!(
            "<domain type='qemu'>
  <name>{name}</name>
{metadata}  <memory unit='MiB'>{mem}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
{kernel}    <boot dev='hd'/>
  </os>
  <features><acpi/></features>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='{fmt}'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='file'>
      <source path='{console}'/>
      <target port='0'/>
    </serial>
    <memballoon model='none'/>
{devices}  </devices>
</domain>
",
            name = xml_escape(files.name()),
            metadata = opts
                .metadata_xml
                .as_deref()
                .map(|m| format!("  <metadata>\n{m}\n  </metadata>\n"))
                .unwrap_or_default(),
            devices = opts
                .devices_xml
                .as_deref()
                .map(|d| format!("{d}\n"))
                .unwrap_or_default(),
            mem = opts.memory_mib,
            fmt = opts.format.as_str(),
            disk = xml_escape(&files.disk_path().to_string_lossy()),
            console = xml_escape(&files.console.path().to_string_lossy()),
        );
        let xml_path = dir.join("domain.xml");
        std::fs::write(&xml_path, &xml).map_err(io_err("writing domain.xml"))?;
        let vm = Vm { files, xml };
        virsh([std::ffi::OsStr::new("define"), xml_path.as_os_str()])?;
        Ok(vm)
    }

    /// The domain XML it was defined with.
    pub fn xml(&self) -> &str {
        &self.xml
    }
    /// libvirt's log of the QEMU process (stdout/stderr, including the output
    /// of HMP `qemu-io`).
    pub fn qemu_log_path(&self) -> PathBuf {
        Path::new("/var/log/libvirt/qemu").join(format!("{}.log", self.name))
    }

    /// Starts the domain. Console waits then look only at output from this
    /// boot on.
    pub fn start(&mut self) -> Result<()> {
        self.console.skip_to_end();
        virsh(["start", &self.name])?;
        Ok(())
    }

    /// The domain state as `virsh domstate` says it (`running`, `paused`,
    /// `shut off`, ...).
    pub fn state(&self) -> Result<String> {
        Ok(virsh(["domstate", &self.name])?.trim().to_string())
    }

    /// Waits for a console line containing `pattern` (see
    /// [`Console::wait_line`]); fails early, with the console tail, if the
    /// domain stops running.
    pub fn wait_line(&mut self, pattern: &str, timeout: Duration) -> Result<String> {
        let name = self.name.clone();
        self.console.wait_line_checked(pattern, timeout, move || {
            let state = virsh(["domstate", &name])?;
            let state = state.trim();
            if state == "running" || state == "paused" {
                Ok(())
            } else {
                Err(Error::Unexpected(format!("domain {name} is {state}")))
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

    /// Waits until the domain is shut off (e.g. after `bulwark.poweroff=1`).
    pub fn wait_shut_off(&mut self, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            if self.state()? == "shut off" {
                return Ok(());
            }
            if start.elapsed() >= timeout {
                return Err(self.console.error(format!(
                    "domain {} still not shut off after {timeout:?}",
                    self.name
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs an HMP command (`virsh qemu-monitor-command --hmp`), returning
    /// its reply.
    pub fn hmp(&self, command: &str) -> Result<String> {
        virsh(["qemu-monitor-command", &self.name, "--hmp", command])
    }

    /// Runs a `qemu-io` command (e.g. `write -P 0xab 120M 128k`, or
    /// `read -P 0xab 120M 128k` to verify) on the running VM's disk from the
    /// host, through HMP. qemu-io prints to QEMU's stdout, not to the
    /// monitor: its output is read back from [`Vm::qemu_log_path`] and
    /// returned; an output saying `failed` (e.g. pattern verification) is an
    /// error.
    pub fn qemu_io(&self, command: &str) -> Result<String> {
        domain_qemu_io(&self.name, command)
    }

    /// Pauses the guest's vCPUs (`virsh suspend`).
    pub fn pause(&self) -> Result<()> {
        virsh(["suspend", &self.name]).map(|_| ())
    }

    /// Resumes a paused guest (`virsh resume`).
    pub fn resume(&self) -> Result<()> {
        virsh(["resume", &self.name]).map(|_| ())
    }

    /// Stops the domain at once (`virsh destroy`); it stays defined and can
    /// be started again on the same disk.
    pub fn destroy(&self) -> Result<()> {
        virsh(["destroy", &self.name]).map(|_| ())
    }

    /// Destroys the domain if it is running, leaving it defined.
    pub fn stop(&self) -> Result<()> {
        match self.state()?.as_str() {
            "shut off" => Ok(()),
            _ => self.destroy(),
        }
    }
}

/// [`Vm::qemu_io`] on any running domain whose first disk is
/// `virtio-disk0` (a domain a test did not define itself, e.g. a restored one).
pub fn domain_qemu_io(domain: &str, command: &str) -> Result<String> {
    let log = Path::new("/var/log/libvirt/qemu").join(format!("{domain}.log"));
    qemu_io_via(&log, command, |hmp| {
        virsh(["qemu-monitor-command", domain, "--hmp", hmp])
    })
}

/// HMP `qemu-io` on the VM's disk, sent by `hmp`: it answers nothing when
/// it worked, and its output lands in QEMU's `log`.
pub(crate) fn qemu_io_via(
    log: &Path,
    command: &str,
    hmp: impl FnOnce(&str) -> Result<String>,
) -> Result<String> {
    let before = std::fs::metadata(log).map(|m| m.len()).unwrap_or(0);
    let reply = hmp(&format!("qemu-io -d {DISK_QDEV} \"{command}\""))?;
    if !reply.trim().is_empty() {
        return Err(Error::Unexpected(format!(
            "qemu-io {command:?}: {}",
            reply.trim()
        )));
    }
    let out = wait_log_growth(log, before)?;
    check_qemu_io_output(command, out)
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Ok(state) = self.state() {
            if state != "shut off" {
                let _ = virsh(["destroy", &self.name]);
            }
        }
        let _ = virsh([
            "undefine",
            &self.name,
            "--checkpoints-metadata",
            "--snapshots-metadata",
            "--managed-save",
        ]);
        let _ = std::fs::remove_file(self.qemu_log_path());
    }
}

/// Waits until a log file has grown past `before` and stopped growing, then
/// returns the new text (best effort: at most about 3 s).
pub(crate) fn wait_log_growth(log: &Path, before: u64) -> Result<String> {
    let start = Instant::now();
    let mut last_len = before;
    let mut stable_since = Instant::now();
    loop {
        let len = std::fs::metadata(log).map(|m| m.len()).unwrap_or(0);
        if len != last_len {
            last_len = len;
            stable_since = Instant::now();
        }
        let grown = len > before;
        if (grown && stable_since.elapsed() >= Duration::from_millis(150))
            || start.elapsed() >= Duration::from_secs(3)
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    let bytes = std::fs::read(log).map_err(io_err(format!("reading {}", log.display())))?;
    let from = usize::try_from(before)
        .unwrap_or(usize::MAX)
        .min(bytes.len());
    Ok(String::from_utf8_lossy(&bytes[from..]).into_owned())
}

pub(crate) fn check_qemu_io_output(command: &str, out: String) -> Result<String> {
    if out.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.contains("failed") || l.contains("error")
    }) {
        return Err(Error::Unexpected(format!(
            "qemu-io {command:?} failed: {}",
            out.trim()
        )));
    }
    Ok(out)
}
