//! Block jobs (the stream of a live restore): start, progress, abort,
//! wrapped from `virt-sys` once.

use std::ffi::CString;

use virt::sys;

use super::{last, Domain, Error, Result};

/// Progress of a disk's block job, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JobProgress {
    pub cur: u64,
    pub end: u64,
}

/// A running domain's counters (see [`Domain::activity`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Activity {
    pub read: u64,
    pub cpu: std::time::Duration,
    pub vcpus: u32,
}

fn disk_cstr(disk: &str) -> Result<CString> {
    CString::new(disk).map_err(|_| Error::Call {
        op: "disk name".into(),
        message: "contains a NUL byte".into(),
    })
}

impl Domain {
    /// Starts a block-stream job on `disk`: every block its backing chain
    /// holds is copied into the top image (blocks the top image has, such
    /// as guest writes, are never overwritten); at the end the backing is
    /// dropped from the chain. `mib_per_sec` 0: unlimited.
    pub fn block_pull(&self, disk: &str, mib_per_sec: u64) -> Result<()> {
        let d = disk_cstr(disk)?;
        let bw = mib_per_sec as std::os::raw::c_ulong;
        // SAFETY: valid domain and C string; bandwidth in MiB/s.
        if unsafe { sys::virDomainBlockPull(self.raw(), d.as_ptr(), bw, 0) } < 0 {
            return Err(last(format!("starting the stream of {} {disk}", self.name)));
        }
        Ok(())
    }

    /// The block job on `disk`, or `None` if there is none.
    pub fn block_job(&self, disk: &str) -> Result<Option<JobProgress>> {
        let d = disk_cstr(disk)?;
        let mut info = sys::virDomainBlockJobInfo {
            type_: 0,
            bandwidth: 0,
            cur: 0,
            end: 0,
        };
        // SAFETY: valid domain, C string and out-struct.
        let r = unsafe { sys::virDomainGetBlockJobInfo(self.raw(), d.as_ptr(), &mut info, 0) };
        match r {
            r if r < 0 => Err(last(format!(
                "reading the block job of {} {disk}",
                self.name
            ))),
            0 => Ok(None),
            _ => Ok(Some(JobProgress {
                cur: info.cur,
                end: info.end,
            })),
        }
    }

    /// What the guest has done since the domain started: bytes read from
    /// `disks`, and CPU time.
    pub fn activity(&self, disks: &[&str]) -> Result<Activity> {
        let mut read = 0;
        for disk in disks {
            let st = self.dom.block_stats(disk).map_err(super::call(format!(
                "reading the I/O counters of {} {disk}",
                self.name
            )))?;
            read += st.rd_bytes.max(0) as u64;
        }
        let info = self.dom.info().map_err(super::call(format!(
            "reading the CPU time of {}",
            self.name
        )))?;
        Ok(Activity {
            read,
            cpu: std::time::Duration::from_nanos(info.cpu_time),
            vcpus: info.nr_virt_cpu.max(1),
        })
    }

    /// Cancels the block job on `disk` (what it copied stays copied).
    pub fn block_job_abort(&self, disk: &str) -> Result<()> {
        let d = disk_cstr(disk)?;
        // SAFETY: valid domain and C string.
        if unsafe { sys::virDomainBlockJobAbort(self.raw(), d.as_ptr(), 0) } < 0 {
            return Err(last(format!(
                "cancelling the block job of {} {disk}",
                self.name
            )));
        }
        Ok(())
    }
}
