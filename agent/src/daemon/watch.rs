//! What the agent knows of the host's domains, kept by libvirt's events
//! rather than by polling: the protected domains and their policies (the
//! scheduler's list), bitmaps put in place as soon as a protected domain is
//! defined or started (even with the hook missing), lifecycle events in
//! each domain's record, and an undefined domain's record archived. After
//! every (re)connection to libvirtd the whole host is rescanned, since
//! events may have been missed while it was down.

use std::collections::BTreeMap;
use std::sync::Mutex;

use anyhow::{Context, Result};

use super::Agent;
use crate::libvirt::events::{self, Event, Lifecycle};
use crate::libvirt::{Domain, Libvirt, State};
use crate::vm::chain::HOOK_BITMAP;
use crate::vm::domain::{self, DomainInfo};
use crate::vm::qemu;
use bulwark_proto::needs_first_bitmap;

/// Every domain on the host by name: the policies its XML names (none:
/// unprotected). Whether this agent may run them is the config's call.
#[derive(Default)]
pub(super) struct Inventory {
    domains: Mutex<BTreeMap<String, Vec<String>>>,
}

impl Inventory {
    pub fn all(&self) -> BTreeMap<String, Vec<String>> {
        self.domains
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set(&self, name: &str, policies: Vec<String>) {
        let mut d = self.domains.lock().unwrap_or_else(|e| e.into_inner());
        d.insert(name.to_string(), policies);
    }

    fn remove(&self, name: &str) {
        let mut d = self.domains.lock().unwrap_or_else(|e| e.into_inner());
        d.remove(name);
    }

    fn retain(&self, names: &[String]) {
        let mut d = self.domains.lock().unwrap_or_else(|e| e.into_inner());
        d.retain(|k, _| names.contains(k));
    }
}

/// Follows libvirt's events for as long as the process runs.
pub(super) fn run(agent: &Agent) {
    for ev in events::watch(&agent.cfg.libvirt_uri) {
        tracing::debug!("libvirt event: {ev:?}");
        if let Err(e) = agent.on_event(&ev) {
            tracing::warn!("handling {ev:?}: {e:#}");
        }
        // The inventory may have changed what is due (the first listing
        // above all: never-run policies start now).
        agent.wake.pull();
    }
}

impl Agent {
    fn on_event(&self, ev: &Event) -> Result<()> {
        match ev {
            Event::Connected => {
                let r = self.rescan();
                self.connections
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                r
            }
            Event::MetadataChanged { domain } => self.refresh(domain),
            Event::Lifecycle {
                domain,
                uuid,
                change,
            } => match change {
                Lifecycle::Added => {
                    self.apply_default_policies(domain)?;
                    self.refresh(domain)
                }
                Lifecycle::Defined | Lifecycle::Started => {
                    self.note(uuid, domain, change, false)?;
                    self.refresh(domain)
                }
                Lifecycle::Undefined => {
                    self.inventory.remove(domain);
                    if let Some(to) = self.state.archive(uuid)? {
                        tracing::info!("{domain} undefined: its record is in {}", to.display());
                    }
                    Ok(())
                }
                Lifecycle::Stopped => self.note(uuid, domain, change, false),
                Lifecycle::Crashed => {
                    tracing::warn!("{domain} crashed: its next backup reads everything");
                    self.note(uuid, domain, change, true)
                }
            },
            Event::BlockJob {
                domain,
                disk,
                status,
            } => {
                tracing::info!("{domain}: block job on {disk}: {status:?}");
                Ok(())
            }
        }
    }

    /// Records a lifecycle event in a known domain's record (domains the
    /// agent never backed up get no record for it).
    fn note(&self, uuid: &str, domain: &str, change: &Lifecycle, unclean: bool) -> Result<()> {
        if uuid.is_empty() || uuid.contains('/') {
            return Ok(());
        }
        if !unclean && self.protected().iter().all(|(n, _)| n != domain) {
            return Ok(());
        }
        let _lock = self.state.lock(uuid)?;
        let mut st = self.state.load(uuid)?;
        st.domain = domain.to_string();
        st.last_event = Some(format!("{change:?}").to_lowercase());
        st.unclean_stop |= unclean;
        self.state.save(&st)
    }

    /// Reads every domain anew.
    fn rescan(&self) -> Result<()> {
        let lv = Libvirt::open(&self.cfg.libvirt_uri)?;
        let doms = lv.domains()?;
        let names: Vec<String> = doms.iter().map(|d| d.name().to_string()).collect();
        self.inventory.retain(&names);
        for d in &doms {
            if let Err(e) = self.refresh_domain(d) {
                tracing::warn!("{}: {e:#}", d.name());
            }
        }
        tracing::info!(
            "{} domains, {} protected",
            names.len(),
            self.protected().len()
        );
        Ok(())
    }

    fn refresh(&self, name: &str) -> Result<()> {
        let lv = Libvirt::open(&self.cfg.libvirt_uri)?;
        match lv.find_domain(name)? {
            Some(d) => self.refresh_domain(&d),
            None => {
                self.inventory.remove(name);
                Ok(())
            }
        }
    }

    /// Updates the inventory from the domain's XML and, if it is
    /// protected, puts its bitmaps in place.
    fn refresh_domain(&self, dom: &Domain) -> Result<()> {
        let info = domain::parse(&dom.xml(true)?)?;
        for p in &info.policies {
            if let Some(why) = self.cfg.refusal(p) {
                tracing::warn!("{}: {why}: not run", info.name);
            }
        }
        let protected = info.policies.iter().any(|p| self.cfg.usable_policy(p));
        self.inventory.set(dom.name(), info.policies.clone());
        if protected {
            self.ensure_bitmaps(dom, &info)?;
        }
        Ok(())
    }

    /// `[enforce] default_policies`: a new domain that names no policy gets
    /// them in its metadata (persistent, and live if it runs), as `bulwark
    /// protect` would. Only at definition: an operator who unprotects a VM
    /// later is not overruled.
    fn apply_default_policies(&self, name: &str) -> Result<()> {
        let defaults = &self.cfg.enforce.default_policies;
        if defaults.is_empty() {
            return Ok(());
        }
        let lv = Libvirt::open(&self.cfg.libvirt_uri)?;
        let Some(dom) = lv.find_domain(name)? else {
            return Ok(());
        };
        let info = domain::parse(&dom.xml(true)?)?;
        if !info.policies.is_empty() {
            return Ok(());
        }
        let running = dom.state()? == State::Active;
        dom.set_metadata(Some(&domain::policies_set_xml(defaults)), running)
            .with_context(|| format!("giving {name} the default policies"))?;
        tracing::info!("{name}: new VM protected by {}", defaults.join(", "));
        Ok(())
    }

    /// What the hook does at `prepare begin`, for domains the hook missed:
    /// the first-bitmap rule ([`needs_first_bitmap`]). Offline with qemu-img when the domain is
    /// shut off, through QMP when it runs.
    fn ensure_bitmaps(&self, dom: &Domain, info: &DomainInfo) -> Result<()> {
        // A backup of this domain holds the lock: never race its bitmaps.
        let _lock = self.state.lock(&info.uuid)?;
        match dom.state()? {
            State::ShutOff => {
                for d in info.disks.iter().filter(|d| d.has_bitmaps()) {
                    let have = qemu::bitmaps(&d.path)?;
                    if needs_first_bitmap(have.iter().map(|b| b.name.as_str())) {
                        qemu::bitmap_add(&d.path, HOOK_BITMAP)
                            .with_context(|| format!("adding a bitmap to {}", d.target))?;
                        tracing::info!("{}: bitmap {HOOK_BITMAP} added to {}", info.name, d.target);
                    }
                }
            }
            State::Active => {
                let live = domain::parse(&dom.xml(false)?)?;
                let blocks = dom.query_block()?;
                for d in live.disks.iter().filter(|d| d.has_bitmaps()) {
                    let Some(b) = blocks.iter().find(|b| b.is_image(&d.path)) else {
                        continue;
                    };
                    let first = needs_first_bitmap(b.bitmaps().map(|bm| bm.name.as_str()));
                    if let (true, Some(node)) = (first, b.node_name()) {
                        dom.bitmap_add(node, HOOK_BITMAP)?;
                        tracing::info!("{}: bitmap {HOOK_BITMAP} added to {}", info.name, d.target);
                    }
                }
            }
        }
        Ok(())
    }
}
