//! libvirt through `virsh`: the one module that talks to libvirtd.

use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

/// A libvirt connection URI and the commands Bulwark needs on it.
#[derive(Clone, Debug)]
pub struct Virsh {
    uri: String,
}

impl Virsh {
    pub fn new(uri: impl Into<String>) -> Self {
        Virsh { uri: uri.into() }
    }

    /// Runs `virsh -q -c URI ARGS`; its stdout, or an error with its stderr.
    pub fn run(&self, args: &[&str]) -> Result<String> {
        let out = Command::new("virsh")
            .arg("-q")
            .arg("-c")
            .arg(&self.uri)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("running virsh (is libvirt-clients installed?)")?;
        if !out.status.success() {
            bail!(
                "virsh {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `running`, `paused`, `shut off`, ...
    pub fn domstate(&self, dom: &str) -> Result<String> {
        Ok(self.run(&["domstate", dom])?.trim().to_string())
    }

    pub fn dumpxml(&self, dom: &str, inactive: bool) -> Result<String> {
        if inactive {
            self.run(&["dumpxml", dom, "--inactive"])
        } else {
            self.run(&["dumpxml", dom])
        }
    }

    pub fn checkpoint_names(&self, dom: &str) -> Result<Vec<String>> {
        Ok(self
            .run(&["checkpoint-list", dom, "--name"])?
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect())
    }

    /// Redefines a checkpoint libvirt lost, checking its bitmaps exist.
    pub fn checkpoint_redefine(&self, dom: &str, xml_file: &Path) -> Result<()> {
        let f = xml_file.to_string_lossy();
        self.run(&[
            "checkpoint-create",
            dom,
            &f,
            "--redefine",
            "--redefine-validate",
        ])?;
        Ok(())
    }

    pub fn checkpoint_delete(&self, dom: &str, name: &str, metadata_only: bool) -> Result<()> {
        if metadata_only {
            self.run(&["checkpoint-delete", dom, name, "--metadata"])?;
        } else {
            self.run(&["checkpoint-delete", dom, name])?;
        }
        Ok(())
    }

    pub fn backup_begin(&self, dom: &str, backup_xml: &Path, cp_xml: Option<&Path>) -> Result<()> {
        let b = backup_xml.to_string_lossy();
        match cp_xml {
            Some(c) => self.run(&["backup-begin", dom, &b, &c.to_string_lossy()])?,
            None => self.run(&["backup-begin", dom, &b])?,
        };
        Ok(())
    }

    /// Ends the domain's job (a pull-mode backup ends this way).
    pub fn domjobabort(&self, dom: &str) -> Result<()> {
        self.run(&["domjobabort", dom])?;
        Ok(())
    }

    /// A QMP command through libvirt; the reply's `return` value.
    pub fn qmp(&self, dom: &str, cmd: &serde_json::Value) -> Result<serde_json::Value> {
        let out = self.run(&["qemu-monitor-command", dom, &cmd.to_string()])?;
        let v: serde_json::Value = serde_json::from_str(out.trim()).context("parsing QMP reply")?;
        if let Some(e) = v.get("error") {
            bail!("QMP {cmd} failed: {e}");
        }
        Ok(v.get("return").cloned().unwrap_or(serde_json::Value::Null))
    }

    /// Sets (or with `None` removes) Bulwark's metadata element, in the
    /// persistent config and, if running, the live domain.
    pub fn set_metadata(&self, dom: &str, xml: Option<&str>, live: bool) -> Result<()> {
        let mut args = vec![
            "metadata",
            dom,
            "--uri",
            super::XMLNS,
            "--key",
            "bulwark",
            "--config",
        ];
        if live {
            args.push("--live");
        }
        match xml {
            Some(x) => {
                args.push("--set");
                args.push(x);
            }
            None => args.push("--remove"),
        }
        self.run(&args)?;
        Ok(())
    }
}
