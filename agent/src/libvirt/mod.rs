//! libvirt through its C API: the one module that talks to libvirtd.
//!
//! Built on the `virt` crate; the calls it does not wrap (checkpoints,
//! pull-mode backups, events) are wrapped here from `virt-sys`, once, in
//! [`checkpoint`] and [`events`]. QMP goes through libvirt
//! (`virDomainQemuMonitorCommand`), parsed into types in [`qmp`].

pub mod blockjob;
pub mod checkpoint;
pub mod events;
pub mod qmp;

use std::ffi::CStr;
use std::path::PathBuf;

use virt::connect::Connect;
use virt::sys;

/// What a libvirt call can fail with; the variants callers act on are
/// their own.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no domain {0:?} in libvirt")]
    NoDomain(String),
    #[error("domain {domain:?} has no checkpoint {name:?}")]
    NoCheckpoint { domain: String, name: String },
    #[error("no storage pool {0:?} in libvirt")]
    NoPool(String),
    #[error("connecting to libvirt at {uri}: {message}")]
    Connect { uri: String, message: String },
    #[error("{op}: {message}")]
    Call { op: String, message: String },
    #[error("QMP {command} on {domain}: {message}")]
    Qmp {
        domain: String,
        command: String,
        message: String,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The libvirt error code of `e` (`VIR_ERR_*`).
fn code(e: &virt::error::Error) -> sys::virErrorNumber {
    e.code().to_raw()
}

/// A `virt` error as [`Error::Call`], with what was being done.
pub(super) fn call(op: impl Into<String>) -> impl FnOnce(virt::error::Error) -> Error {
    let op = op.into();
    move |e| Error::Call {
        op,
        message: e.message().to_string(),
    }
}

/// The last libvirt error of this thread, for calls made through `virt-sys`.
fn last(op: impl Into<String>) -> Error {
    call(op)(virt::error::Error::last_error())
}

/// A connection to libvirtd. Cloning shares it (libvirt connections are
/// thread-safe).
#[derive(Clone)]
pub struct Libvirt {
    conn: Connect,
}

impl Libvirt {
    /// Opens `uri` (`qemu:///system`, ...). libvirt's own printing of errors
    /// to stderr is turned off: every error comes back as a value.
    pub fn open(uri: &str) -> Result<Self> {
        virt::error::clear_error_callback();
        let conn = Connect::open(Some(uri)).map_err(|e| Error::Connect {
            uri: uri.to_string(),
            message: e.message().to_string(),
        })?;
        Ok(Libvirt { conn })
    }

    /// The domain named (or with the UUID) `name`; [`Error::NoDomain`] if
    /// there is none.
    pub fn domain(&self, name: &str) -> Result<Domain> {
        let found = match self.conn.lookup_domain_by_name(name) {
            Err(e) if code(&e) == sys::VIR_ERR_NO_DOMAIN && looks_like_uuid(name) => {
                self.conn.lookup_domain_by_uuid_string(name)
            }
            r => r,
        };
        match found {
            Ok(dom) => {
                let name = dom.name().map_err(call("reading a domain's name"))?;
                Ok(Domain { dom, name })
            }
            Err(e) if code(&e) == sys::VIR_ERR_NO_DOMAIN => Err(Error::NoDomain(name.into())),
            Err(e) => Err(call(format!("looking up domain {name}"))(e)),
        }
    }

    /// The domain named `name`, or `None`.
    pub fn find_domain(&self, name: &str) -> Result<Option<Domain>> {
        match self.domain(name) {
            Ok(d) => Ok(Some(d)),
            Err(Error::NoDomain(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Every domain, defined or running.
    pub fn domains(&self) -> Result<Vec<Domain>> {
        let all = self
            .conn
            .list_all_domains(0)
            .map_err(call("listing domains"))?;
        let mut out = Vec::with_capacity(all.len());
        for dom in all {
            match dom.name() {
                Ok(name) => out.push(Domain { dom, name }),
                // Undefined between the listing and here.
                Err(e) if code(&e) == sys::VIR_ERR_NO_DOMAIN => {}
                Err(e) => return Err(call("reading a domain's name")(e)),
            }
        }
        Ok(out)
    }

    /// Every domain's state by name, in two calls (one per domain would
    /// make `agent status` of hundreds of domains slow).
    pub fn domain_states(&self) -> Result<std::collections::BTreeMap<String, State>> {
        let active: std::collections::BTreeSet<String> = self
            .conn
            .list_all_domains(sys::VIR_CONNECT_LIST_DOMAINS_ACTIVE)
            .map_err(call("listing running domains"))?
            .iter()
            .filter_map(|d| d.name().ok())
            .collect();
        Ok(self
            .domains()?
            .into_iter()
            .map(|d| {
                let s = if active.contains(&d.name) {
                    State::Active
                } else {
                    State::ShutOff
                };
                (d.name, s)
            })
            .collect())
    }

    /// Defines (persistently) a domain from its XML.
    pub fn define(&self, xml: &str) -> Result<Domain> {
        let dom = self
            .conn
            .define_domain_xml(xml)
            .map_err(call("defining the domain"))?;
        let name = dom.name().map_err(call("reading the new domain's name"))?;
        Ok(Domain { dom, name })
    }

    /// Creates and starts a transient domain: it has no definition, so
    /// once destroyed (or the host restarts) nothing of it is left.
    pub fn create_transient(&self, xml: &str) -> Result<Domain> {
        let dom = self
            .conn
            .create_domain_xml(xml, 0)
            .map_err(call("starting the domain"))?;
        let name = dom.name().map_err(call("reading the new domain's name"))?;
        Ok(Domain { dom, name })
    }

    /// A screenshot of the domain's first screen: its MIME type (QEMU
    /// gives a PPM) and bytes.
    pub fn screenshot(&self, dom: &Domain) -> Result<(String, Vec<u8>)> {
        let stream = virt::stream::Stream::new(&self.conn, 0)
            .map_err(call("opening a stream for a screenshot"))?;
        let mime = dom
            .dom
            .screenshot(&stream, 0, 0)
            .map_err(dom.err("taking a screenshot of"))?;
        let mut out = Vec::new();
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = stream
                .recv(&mut buf)
                .map_err(dom.err("receiving the screenshot of"))?;
            if n <= 0 {
                break;
            }
            // A bound: a screen is a few MiB at most.
            if out.len() > 64 << 20 {
                let _ = stream.abort();
                return Err(Error::Call {
                    op: format!("receiving the screenshot of {}", dom.name),
                    message: "more than 64 MiB".into(),
                });
            }
            out.extend_from_slice(&buf[..n as usize]);
        }
        stream
            .finish()
            .map_err(dom.err("ending the screenshot stream of"))?;
        Ok((mime, out))
    }

    /// The target directory of a directory-type storage pool.
    pub fn pool_dir(&self, pool: &str) -> Result<PathBuf> {
        let xml = self
            .pool(pool)?
            .xml_desc(0)
            .map_err(call(format!("pool {pool}")))?;
        let doc = roxmltree::Document::parse(&xml).map_err(|e| Error::Call {
            op: format!("parsing the XML of pool {pool}"),
            message: e.to_string(),
        })?;
        let root = doc.root_element();
        if root.attribute("type") != Some("dir") {
            return Err(Error::Call {
                op: format!("pool {pool}"),
                message: format!(
                    "of type {:?}: only directory pools take restored images (or use --storage-dir)",
                    root.attribute("type").unwrap_or("?")
                ),
            });
        }
        doc.descendants()
            .find(|n| {
                n.has_tag_name("path") && n.parent().is_some_and(|p| p.has_tag_name("target"))
            })
            .and_then(|n| n.text())
            .map(|t| PathBuf::from(t.trim()))
            .ok_or_else(|| Error::Call {
                op: format!("pool {pool}"),
                message: "no target path".into(),
            })
    }

    /// Makes the pool list volumes created behind its back.
    pub fn pool_refresh(&self, pool: &str) -> Result<()> {
        self.pool(pool)?
            .refresh(0)
            .map_err(call(format!("refreshing pool {pool}")))
    }

    fn pool(&self, pool: &str) -> Result<virt::storage_pool::StoragePool> {
        match self.conn.lookup_storage_pool_by_name(pool) {
            Ok(p) => Ok(p),
            Err(e) if code(&e) == sys::VIR_ERR_NO_STORAGE_POOL => Err(Error::NoPool(pool.into())),
            Err(e) => Err(call(format!("looking up pool {pool}"))(e)),
        }
    }
}

/// A domain's run state, as far as backups care.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// QEMU runs (running, paused, shutting down, suspended): live calls.
    Active,
    /// No QEMU: images are read and changed offline.
    ShutOff,
}

/// One libvirt domain.
#[derive(Clone)]
pub struct Domain {
    dom: virt::domain::Domain,
    name: String,
}

impl Domain {
    pub fn name(&self) -> &str {
        &self.name
    }

    fn raw(&self) -> sys::virDomainPtr {
        // SAFETY: the pointer stays valid while `self.dom` holds its
        // reference, i.e. for every use in this module.
        unsafe { self.dom.as_ptr() }
    }

    /// Maps a "no such domain" error to [`Error::NoDomain`].
    fn err(&self, op: &str) -> impl FnOnce(virt::error::Error) -> Error + '_ {
        let op = format!("{op} {}", self.name);
        move |e| {
            if code(&e) == sys::VIR_ERR_NO_DOMAIN {
                Error::NoDomain(self.name.clone())
            } else {
                call(op)(e)
            }
        }
    }

    pub fn state(&self) -> Result<State> {
        let active = self
            .dom
            .is_active()
            .map_err(self.err("reading the state of"))?;
        Ok(if active {
            State::Active
        } else {
            State::ShutOff
        })
    }

    /// The domain XML: the live one, or with `inactive` the persistent
    /// config (what a restore defines).
    pub fn xml(&self, inactive: bool) -> Result<String> {
        let flags = if inactive {
            sys::VIR_DOMAIN_XML_INACTIVE
        } else {
            0
        };
        self.dom
            .xml_desc(flags)
            .map_err(self.err("reading the XML of"))
    }

    pub fn start(&self) -> Result<()> {
        self.dom.create().map_err(self.err("starting"))
    }

    /// Stops QEMU at once (no guest shutdown).
    pub fn destroy(&self) -> Result<()> {
        self.dom.destroy().map_err(self.err("destroying"))
    }

    /// Removes the definition with its NVRAM and checkpoint metadata.
    pub fn undefine(&self) -> Result<()> {
        self.dom
            .undefine_flags(
                sys::VIR_DOMAIN_UNDEFINE_NVRAM | sys::VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA,
            )
            .map_err(self.err("undefining"))
    }

    /// Sets (or with `None` removes) Bulwark's metadata element in the
    /// persistent config and, with `live`, in the running domain.
    pub fn set_metadata(&self, xml: Option<&str>, live: bool) -> Result<()> {
        let mut flags = sys::VIR_DOMAIN_AFFECT_CONFIG;
        if live {
            flags |= sys::VIR_DOMAIN_AFFECT_LIVE;
        }
        let key = xml.map(|_| "bulwark");
        self.dom
            .set_metadata(
                sys::VIR_DOMAIN_METADATA_ELEMENT as i32,
                xml,
                key,
                Some(crate::vm::XMLNS),
                flags,
            )
            .map_err(self.err("setting the metadata of"))
    }

    /// A QEMU guest agent command (JSON) and its reply; waits at most
    /// `timeout_secs` for the agent.
    pub fn agent_command(&self, cmd: &str, timeout_secs: i32) -> Result<String> {
        self.dom
            .qemu_agent_command(cmd, timeout_secs, 0)
            .map_err(self.err("asking the guest agent of"))
    }

    /// Ends the domain's current job (a pull-mode backup ends this way).
    pub fn abort_job(&self) -> Result<()> {
        // SAFETY: a valid domain pointer; no out-parameters.
        if unsafe { sys::virDomainAbortJob(self.raw()) } < 0 {
            return Err(last(format!("ending the job of {}", self.name)));
        }
        Ok(())
    }
}

fn looks_like_uuid(s: &str) -> bool {
    s.len() == 36 && s.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
}

/// A C string from libvirt, copied; `None` for a null pointer.
///
/// # Safety
/// `p` is null or points to a NUL-terminated string valid for this call.
unsafe fn c_str(p: *const std::os::raw::c_char) -> Option<String> {
    // SAFETY: non-null, and NUL-terminated by the caller's promise.
    (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
}
