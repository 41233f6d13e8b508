//! Checkpoints and pull-mode backups: the `virt-sys` calls the `virt`
//! crate does not wrap, wrapped safely once.

use std::ffi::CString;
use std::os::raw::c_char;

use virt::sys;

use super::{c_str, last, Domain, Error, Result};

/// Owns one `virDomainCheckpointPtr` reference.
struct Checkpoint(sys::virDomainCheckpointPtr);

impl Drop for Checkpoint {
    fn drop(&mut self) {
        // SAFETY: we own this reference; freeing it once.
        unsafe { sys::virDomainCheckpointFree(self.0) };
    }
}

fn cstring(s: &str, what: &str) -> Result<CString> {
    CString::new(s).map_err(|_| Error::Call {
        op: what.to_string(),
        message: "contains a NUL byte".into(),
    })
}

impl Domain {
    /// Names of libvirt's checkpoints of this domain.
    pub fn checkpoint_names(&self) -> Result<Vec<String>> {
        let mut list: *mut sys::virDomainCheckpointPtr = std::ptr::null_mut();
        // SAFETY: `list` is an out-parameter libvirt fills with `n` owned
        // references (freed below) in an array we free with libc::free.
        let n = unsafe { sys::virDomainListAllCheckpoints(self.raw(), &mut list, 0) };
        if n < 0 {
            return Err(last(format!("listing checkpoints of {}", self.name)));
        }
        let mut names = Vec::with_capacity(n as usize);
        for i in 0..n as usize {
            // SAFETY: i < n, each entry a valid reference we now own.
            let cp = Checkpoint(unsafe { *list.add(i) });
            // SAFETY: the name lives as long as the checkpoint object.
            if let Some(name) = unsafe { c_str(sys::virDomainCheckpointGetName(cp.0)) } {
                names.push(name);
            }
        }
        // SAFETY: the array itself was allocated by libvirt with malloc.
        unsafe { libc::free(list as *mut libc::c_void) };
        Ok(names)
    }

    fn checkpoint(&self, name: &str) -> Result<Checkpoint> {
        let c = cstring(name, "checkpoint name")?;
        // SAFETY: valid domain and C string; returns an owned reference or null.
        let p = unsafe { sys::virDomainCheckpointLookupByName(self.raw(), c.as_ptr(), 0) };
        if p.is_null() {
            let e = virt::error::Error::last_error();
            if e.code().to_raw() == sys::VIR_ERR_NO_DOMAIN_CHECKPOINT {
                return Err(Error::NoCheckpoint {
                    domain: self.name.clone(),
                    name: name.to_string(),
                });
            }
            return Err(super::call(format!("looking up checkpoint {name}"))(e));
        }
        Ok(Checkpoint(p))
    }

    /// Redefines a checkpoint libvirt lost from its XML, checking that its
    /// bitmaps exist (`--redefine --redefine-validate`).
    pub fn checkpoint_redefine(&self, xml: &str) -> Result<()> {
        let x = cstring(xml, "checkpoint XML")?;
        let flags = sys::VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE
            | sys::VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE_VALIDATE;
        // SAFETY: valid domain and C string; the result is an owned reference.
        let p = unsafe { sys::virDomainCheckpointCreateXML(self.raw(), x.as_ptr(), flags) };
        if p.is_null() {
            return Err(last(format!("redefining a checkpoint of {}", self.name)));
        }
        drop(Checkpoint(p));
        Ok(())
    }

    /// Deletes a checkpoint: its bitmaps merged into its parent's, or with
    /// `metadata_only` just libvirt's record.
    pub fn checkpoint_delete(&self, name: &str, metadata_only: bool) -> Result<()> {
        let cp = self.checkpoint(name)?;
        let flags = if metadata_only {
            sys::VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY
        } else {
            0
        };
        // SAFETY: a valid checkpoint reference.
        if unsafe { sys::virDomainCheckpointDelete(cp.0, flags) } < 0 {
            return Err(last(format!("deleting checkpoint {name} of {}", self.name)));
        }
        Ok(())
    }

    /// Starts a backup job from `<domainbackup>` XML, with a checkpoint
    /// created atomically at its start when `checkpoint_xml` is given.
    pub fn backup_begin(&self, backup_xml: &str, checkpoint_xml: Option<&str>) -> Result<()> {
        let b = cstring(backup_xml, "backup XML")?;
        let c = checkpoint_xml
            .map(|c| cstring(c, "checkpoint XML"))
            .transpose()?;
        let cp: *const c_char = c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
        // SAFETY: valid domain, C strings alive for the call, null allowed.
        if unsafe { sys::virDomainBackupBegin(self.raw(), b.as_ptr(), cp, 0) } < 0 {
            return Err(last(format!("starting a backup of {}", self.name)));
        }
        Ok(())
    }
}
