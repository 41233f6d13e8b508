//! Reading a stopped domain: the new checkpoint's bitmap is added to every
//! qcow2 image first, then each image is exported read-only by
//! `qemu-nbd -B BASE` and read the same way as a running one.

use anyhow::Result;

use super::read::read_disk;
use super::Job;
use crate::vm::chain::Chain;
use crate::vm::nbdsrc::NbdSource;
use crate::vm::qemu::QemuNbd;

pub(super) fn read(chain: &Chain<'_>, job: &mut Job<'_, '_, '_>) -> Result<()> {
    // From here on the new bitmap records every write: whatever happens
    // next, nothing written after this read goes unseen.
    chain.add_offline(job.new)?;
    for p in job.plans {
        let target = &p.disk.target;
        let inc = p.full_reason.is_none() && job.base.from.is_some();
        let bitmap = job
            .base
            .from
            .as_ref()
            .filter(|_| inc)
            .map(|(cp, _)| cp.name.as_str());
        let sock = job.dir.join(format!("{target}.sock"));
        let nbd = QemuNbd::start(&p.disk.path, p.disk.format.as_str(), bitmap, &sock, target)?;
        let ctx = bitmap.map(|b| format!("qemu:dirty-bitmap:{b}"));
        let src = NbdSource::connect(&nbd.socket, &nbd.export, ctx.as_deref())?;
        let r = read_disk(job.repo, src, p, job.base, ctx.as_deref(), job.session)?;
        drop(nbd);
        if job.new.disks.contains(target) {
            job.session.set_checkpoint(target, &job.new.name);
        }
        job.reports.push(r);
    }
    Ok(())
}
