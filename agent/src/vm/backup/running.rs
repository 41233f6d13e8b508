//! Reading a running domain: a libvirt pull-mode backup, its new checkpoint
//! created atomically at the job's start, each disk read over NBD from
//! libvirt's export (`qemu:dirty-bitmap:backup-<disk>` for incrementals),
//! then the job is ended.

use anyhow::{Context, Result};

use super::read::read_disk;
use super::Job;
use crate::libvirt::Domain;
use crate::vm::chain::Chain;
use crate::vm::domain::xml_escape;
use crate::vm::nbdsrc::NbdSource;

pub(super) fn read(dom: &Domain, chain: &Chain<'_>, job: &mut Job<'_, '_, '_>) -> Result<()> {
    let socket = job.dir.join("nbd.sock");
    let checkpoint = (!job.new.disks.is_empty()).then(|| chain.checkpoint_xml(job.new));
    dom.backup_begin(&backup_xml(job, &socket), checkpoint.as_deref())
        .context("starting the pull-mode backup")?;
    let mut guard = JobGuard { dom, active: true };
    for p in job.plans {
        let target = &p.disk.target;
        let ctx = format!("qemu:dirty-bitmap:backup-{target}");
        let dirty = (p.full_reason.is_none() && job.base.from.is_some()).then_some(ctx.as_str());
        let src = NbdSource::connect(&socket, target, dirty)?;
        let r = read_disk(job.repo, src, p, job.base, dirty, job.session)?;
        if job.new.disks.contains(target) {
            job.session.set_checkpoint(target, &job.new.name);
        }
        job.reports.push(r);
    }
    guard.end()
}

/// `<domainbackup mode='pull'>`: every disk, incremental from the base
/// checkpoint where its plan says so, served on a Unix socket in the job
/// directory (scratch files there too).
fn backup_xml(job: &Job<'_, '_, '_>, socket: &std::path::Path) -> String {
    let mut xml = format!(
        "<domainbackup mode='pull'><server transport='unix' socket='{}'/><disks>",
        xml_escape(&socket.to_string_lossy())
    );
    for p in job.plans {
        let t = xml_escape(&p.disk.target);
        let mode = match (&p.full_reason, &job.base.from) {
            (None, Some((cp, _))) => format!(
                "backupmode='incremental' incremental='{}'",
                xml_escape(&cp.name)
            ),
            _ => "backupmode='full'".into(),
        };
        let scratch = job.dir.join(format!("{}.scratch", p.disk.target));
        xml.push_str(&format!(
            "<disk name='{t}' backup='yes' type='file' {mode}><scratch file='{}'/></disk>",
            xml_escape(&scratch.to_string_lossy())
        ));
    }
    xml.push_str("</disks></domainbackup>");
    xml
}

/// Ends the pull-mode job when dropped (also on errors and panics).
struct JobGuard<'a> {
    dom: &'a Domain,
    active: bool,
}

impl JobGuard<'_> {
    fn end(&mut self) -> Result<()> {
        if std::mem::take(&mut self.active) {
            self.dom.abort_job().context("ending the backup job")?;
        }
        Ok(())
    }
}

impl Drop for JobGuard<'_> {
    fn drop(&mut self) {
        // On the error path: the error being returned is the one to report.
        let _ = self.end();
    }
}
