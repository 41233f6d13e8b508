//! A snapshot's domain XML, rewritten for a new VM on this host: new name
//! and identity, disks pointing at the restored images, files the VM writes
//! moved next to them, and nothing that ties it to the old VM (policies,
//! checkpoints, fixed socket paths) carried over unasked.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use xmltree::{Element, EmitterConfig, XMLNode};

use super::XMLNS;

/// Image format of a restored disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageFormat {
    Qcow2,
    Raw,
}

impl ImageFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Raw => "raw",
        }
    }
}

/// A restored disk: its target (`vda`), image and format.
#[derive(Clone, Debug)]
pub struct RestoredDisk {
    pub target: String,
    pub path: PathBuf,
    pub format: ImageFormat,
}

/// What the new VM becomes.
pub struct Rewrite<'a> {
    pub name: &'a str,
    pub disks: &'a [RestoredDisk],
    /// Keep MAC addresses (disaster recovery: the old VM is gone for good).
    pub keep_macs: bool,
    /// Keep Bulwark's policy metadata (the new VM is backed up too).
    pub keep_policies: bool,
    /// Where the files the VM writes go (serial logs, NVRAM).
    pub dir: &'a Path,
    /// The restored UEFI variables, if the snapshot has them.
    pub nvram: Option<&'a Path>,
}

/// The rewritten XML and what was changed that an operator should know.
pub struct Rewritten {
    pub xml: String,
    pub notes: Vec<String>,
}

pub fn rewrite(xml: &str, r: &Rewrite<'_>) -> Result<Rewritten> {
    let mut dom = Element::parse(xml.as_bytes()).context("parsing the snapshot's domain XML")?;
    if dom.name != "domain" {
        bail!("the snapshot's XML is a <{}>, not a <domain>", dom.name);
    }
    let mut notes = Vec::new();
    identity(&mut dom, r.name);
    metadata(&mut dom, r.keep_policies);
    nvram(&mut dom, r.nvram, &mut notes);
    if let Some(devices) = dom.get_mut_child("devices") {
        disks(devices, r.disks, &mut notes)?;
        if !r.keep_macs {
            for iface in children_mut(devices, "interface") {
                iface.children.retain(|c| !is(c, "mac"));
            }
        }
        host_files(devices, r.name, r.dir);
    }
    Ok(Rewritten {
        xml: emit(&dom)?,
        notes,
    })
}

/// New name; no UUID (libvirt makes a new one), no runtime id.
fn identity(dom: &mut Element, name: &str) {
    dom.attributes.remove("id");
    dom.children.retain(|c| !is(c, "uuid"));
    match dom.get_mut_child("name") {
        Some(n) => n.children = vec![XMLNode::Text(name.to_string())],
        None => {
            let mut n = Element::new("name");
            n.children.push(XMLNode::Text(name.to_string()));
            dom.children.insert(0, XMLNode::Element(n));
        }
    }
}

fn metadata(dom: &mut Element, keep_policies: bool) {
    if keep_policies {
        return;
    }
    if let Some(meta) = dom.get_mut_child("metadata") {
        meta.children.retain(|c| match c {
            XMLNode::Element(e) => e.namespace.as_deref() != Some(XMLNS),
            _ => true,
        });
    }
    dom.children.retain(|c| match c {
        XMLNode::Element(e) if e.name == "metadata" => {
            e.children.iter().any(|c| c.as_element().is_some())
        }
        _ => true,
    });
}

fn nvram(dom: &mut Element, restored: Option<&Path>, notes: &mut Vec<String>) {
    let Some(nv) = dom
        .get_mut_child("os")
        .and_then(|os| os.get_mut_child("nvram"))
    else {
        return;
    };
    match restored {
        Some(p) => nv.children = vec![XMLNode::Text(p.display().to_string())],
        None => {
            // libvirt makes a fresh variable store from the template.
            nv.children.clear();
            notes
                .push("the snapshot holds no UEFI variables: the VM starts with fresh ones".into());
        }
    }
}

/// Each restored disk points at its new image; other disks keep their
/// source only while it exists here (a CD-ROM whose ISO is gone is ejected).
fn disks(devices: &mut Element, restored: &[RestoredDisk], notes: &mut Vec<String>) -> Result<()> {
    let mut seen = Vec::new();
    let mut drop = Vec::new();
    for (i, node) in devices.children.iter_mut().enumerate() {
        let XMLNode::Element(d) = node else { continue };
        if d.name != "disk" {
            continue;
        }
        let target = d
            .get_child("target")
            .and_then(|t| t.attributes.get("dev"))
            .cloned()
            .unwrap_or_default();
        if let Some(rd) = restored.iter().find(|rd| rd.target == target) {
            d.attributes.insert("type".into(), "file".into());
            d.children
                .retain(|c| !is(c, "source") && !is(c, "backingStore"));
            let mut src = Element::new("source");
            src.attributes
                .insert("file".into(), rd.path.display().to_string());
            d.children.insert(0, XMLNode::Element(src));
            let drv = match d.get_mut_child("driver") {
                Some(drv) => drv,
                None => {
                    let mut drv = Element::new("driver");
                    drv.attributes.insert("name".into(), "qemu".into());
                    d.children.insert(0, XMLNode::Element(drv));
                    d.get_mut_child("driver").expect("just inserted")
                }
            };
            drv.attributes
                .insert("type".into(), rd.format.as_str().into());
            seen.push(target);
            continue;
        }
        let path = d.get_child("source").and_then(|s| {
            s.attributes
                .get("file")
                .or_else(|| s.attributes.get("dev"))
                .cloned()
        });
        let device = d.attributes.get("device").map_or("disk", String::as_str);
        match path {
            Some(p) if !Path::new(&p).exists() && device != "disk" => {
                d.children.retain(|c| !is(c, "source"));
                notes.push(format!(
                    "{target}: {p} is not on this host; the {device} is empty"
                ));
            }
            Some(p) if !Path::new(&p).exists() => {
                drop.push(i);
                notes.push(format!(
                    "{target}: not in the snapshot and {p} is not on this host; left out"
                ));
            }
            _ => {}
        }
    }
    for i in drop.into_iter().rev() {
        devices.children.remove(i);
    }
    for rd in restored {
        if !seen.contains(&rd.target) {
            bail!("the domain XML has no disk {} to restore into", rd.target);
        }
    }
    Ok(())
}

/// Files and sockets the old VM wrote at fixed host paths: logs move to
/// `dir`, sockets get paths libvirt chooses.
fn host_files(devices: &mut Element, name: &str, dir: &Path) {
    let mut n = 0;
    for node in devices.children.iter_mut() {
        let XMLNode::Element(d) = node else { continue };
        if !["serial", "console", "parallel", "channel"].contains(&d.name.as_str()) {
            continue;
        }
        let kind = d.name.clone();
        let ty = d.attributes.get("type").cloned().unwrap_or_default();
        if let Some(src) = d.get_mut_child("source") {
            if ty == "file" && src.attributes.contains_key("path") {
                let p = dir.join(format!("{name}-{kind}{n}.log"));
                src.attributes
                    .insert("path".into(), p.display().to_string());
            } else if ty == "unix" && src.attributes.get("mode").map(String::as_str) == Some("bind")
            {
                src.attributes.remove("path");
            }
        }
        if let Some(log) = d.get_mut_child("log") {
            if log.attributes.contains_key("file") {
                let p = dir.join(format!("{name}-{kind}{n}-log.log"));
                log.attributes
                    .insert("file".into(), p.display().to_string());
            }
        }
        n += 1;
    }
}

/// Live restore: each restored disk's overlay gets the snapshot's disk, as
/// served by `bulwark-nbd` on `socket`, as its raw backing, with QEMU's
/// NBD client reconnecting for `reconnect_secs` when the server restarts.
pub fn add_nbd_backing(xml: &str, socket: &Path, reconnect_secs: u32) -> Result<String> {
    let mut dom = Element::parse(xml.as_bytes()).context("parsing the domain XML")?;
    let devices = dom
        .get_mut_child("devices")
        .context("domain XML without devices")?;
    for d in children_mut(devices, "disk") {
        if d.attributes.get("device").is_some_and(|v| v != "disk") {
            continue;
        }
        let Some(target) = d
            .get_child("target")
            .and_then(|t| t.attributes.get("dev"))
            .cloned()
        else {
            continue;
        };
        d.children.retain(|c| !is(c, "backingStore"));
        let mut host = Element::new("host");
        host.attributes.insert("transport".into(), "unix".into());
        host.attributes
            .insert("socket".into(), socket.display().to_string());
        let mut reconnect = Element::new("reconnect");
        reconnect
            .attributes
            .insert("delay".into(), reconnect_secs.to_string());
        let mut src = Element::new("source");
        src.attributes.insert("protocol".into(), "nbd".into());
        src.attributes.insert("name".into(), target);
        src.children.push(XMLNode::Element(host));
        src.children.push(XMLNode::Element(reconnect));
        let mut format = Element::new("format");
        format.attributes.insert("type".into(), "raw".into());
        let mut bs = Element::new("backingStore");
        bs.attributes.insert("type".into(), "network".into());
        bs.children.push(XMLNode::Element(format));
        bs.children.push(XMLNode::Element(src));
        d.children.push(XMLNode::Element(bs));
    }
    emit(&dom)
}

/// The domain XML as libvirt takes it: indented, no declaration.
pub(crate) fn emit(dom: &Element) -> Result<String> {
    let mut out = Vec::new();
    dom.write_with_config(
        &mut out,
        EmitterConfig::new()
            .perform_indent(true)
            .write_document_declaration(false),
    )
    .context("writing the domain XML")?;
    String::from_utf8(out).context("domain XML is not UTF-8")
}

pub(crate) fn is(node: &XMLNode, name: &str) -> bool {
    matches!(node, XMLNode::Element(e) if e.name == name)
}

pub(crate) fn children_mut<'e>(
    el: &'e mut Element,
    name: &'e str,
) -> impl Iterator<Item = &'e mut Element> {
    el.children.iter_mut().filter_map(move |c| match c {
        XMLNode::Element(e) if e.name == name => Some(e),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const XML: &str = r#"<domain type='qemu' id='7'>
  <name>web</name>
  <uuid>0f4b3b84-5f3e-4f76-9d26-6f7d3a0e0a11</uuid>
  <metadata>
    <bulwark:policies xmlns:bulwark="https://bulwark.dev/xmlns/libvirt/1"><bulwark:policy name="hourly"/></bulwark:policies>
    <other:thing xmlns:other="https://example.com/x">kept</other:thing>
  </metadata>
  <memory unit='MiB'>256</memory>
  <os><type arch='x86_64'>hvm</type><loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE.fd</loader><nvram template='/usr/share/OVMF/OVMF_VARS.fd'>/var/lib/libvirt/qemu/nvram/web_VARS.fd</nvram></os>
  <devices>
    <disk type='block' device='disk'><driver name='qemu' type='raw' cache='none'/><source dev='/dev/vg0/web'/><target dev='vda' bus='virtio'/></disk>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/old/data.qcow2'/><backingStore type='file'><format type='qcow2'/><source file='/old/base.qcow2'/></backingStore><target dev='vdb' bus='virtio'/></disk>
    <disk type='file' device='cdrom'><source file='/nonexistent/install.iso'/><target dev='sda' bus='sata'/><readonly/></disk>
    <interface type='network'><mac address='52:54:00:12:34:56'/><source network='default'/><model type='virtio'/></interface>
    <serial type='file'><source path='/var/log/web-serial.log'/><target port='0'/><log file='/var/log/web-log.txt' append='on'/></serial>
    <channel type='unix'><source mode='bind' path='/var/lib/libvirt/qemu/channel/target/domain-7-web/org.qemu.guest_agent.0'/><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
  </devices>
</domain>"#;

    fn disks() -> Vec<RestoredDisk> {
        vec![
            RestoredDisk {
                target: "vda".into(),
                path: "/srv/r/web2-vda.qcow2".into(),
                format: ImageFormat::Qcow2,
            },
            RestoredDisk {
                target: "vdb".into(),
                path: "/srv/r/web2-vdb.raw".into(),
                format: ImageFormat::Raw,
            },
        ]
    }

    fn run(keep_macs: bool, keep_policies: bool, nvram: Option<&Path>) -> (Element, Vec<String>) {
        let d = disks();
        let r = rewrite(
            XML,
            &Rewrite {
                name: "web2",
                disks: &d,
                keep_macs,
                keep_policies,
                dir: Path::new("/srv/r"),
                nvram,
            },
        )
        .unwrap();
        (Element::parse(r.xml.as_bytes()).unwrap(), r.notes)
    }

    fn disk<'e>(dom: &'e Element, target: &str) -> &'e Element {
        dom.get_child("devices")
            .unwrap()
            .children
            .iter()
            .filter_map(|c| c.as_element())
            .find(|d| {
                d.name == "disk"
                    && d.get_child("target").and_then(|t| t.attributes.get("dev"))
                        == Some(&target.to_string())
            })
            .unwrap()
    }

    #[test]
    fn new_identity_disks_and_host_files() {
        let (dom, notes) = run(false, false, Some(Path::new("/srv/r/web2_VARS.fd")));
        assert!(!dom.attributes.contains_key("id"));
        assert_eq!(dom.get_child("name").unwrap().get_text().unwrap(), "web2");
        assert!(dom.get_child("uuid").is_none());
        // Policies gone, other metadata kept.
        let meta = dom.get_child("metadata").unwrap();
        let kids: Vec<_> = meta
            .children
            .iter()
            .filter_map(|c| c.as_element())
            .collect();
        assert_eq!(kids.len(), 1);
        assert_eq!(kids[0].name, "thing");
        // Disks: files in the new place, formats set, no backing chain.
        let vda = disk(&dom, "vda");
        assert_eq!(vda.attributes["type"], "file");
        assert_eq!(
            vda.get_child("source").unwrap().attributes["file"],
            "/srv/r/web2-vda.qcow2"
        );
        assert_eq!(vda.get_child("driver").unwrap().attributes["type"], "qcow2");
        assert_eq!(vda.get_child("driver").unwrap().attributes["cache"], "none");
        let vdb = disk(&dom, "vdb");
        assert_eq!(vdb.get_child("driver").unwrap().attributes["type"], "raw");
        assert!(vdb.get_child("backingStore").is_none());
        // The missing ISO is ejected, with a note.
        assert!(disk(&dom, "sda").get_child("source").is_none());
        assert!(notes.iter().any(|n| n.contains("install.iso")), "{notes:?}");
        // New MAC (none: libvirt picks), serial log and socket moved.
        let dev = dom.get_child("devices").unwrap();
        let iface = dev.get_child("interface").unwrap();
        assert!(iface.get_child("mac").is_none());
        let serial = dev.get_child("serial").unwrap();
        assert_eq!(
            serial.get_child("source").unwrap().attributes["path"],
            "/srv/r/web2-serial0.log"
        );
        assert!(serial.get_child("log").unwrap().attributes["file"].starts_with("/srv/r/web2-"));
        let chan = dev.get_child("channel").unwrap();
        assert!(!chan
            .get_child("source")
            .unwrap()
            .attributes
            .contains_key("path"));
        let nv = dom.get_child("os").unwrap().get_child("nvram").unwrap();
        assert_eq!(nv.get_text().unwrap(), "/srv/r/web2_VARS.fd");
    }

    #[test]
    fn keep_macs_and_policies_when_asked() {
        let (dom, notes) = run(true, true, None);
        let dev = dom.get_child("devices").unwrap();
        let mac = dev
            .get_child("interface")
            .unwrap()
            .get_child("mac")
            .unwrap();
        assert_eq!(mac.attributes["address"], "52:54:00:12:34:56");
        let meta = dom.get_child("metadata").unwrap();
        assert_eq!(
            meta.children.iter().filter_map(|c| c.as_element()).count(),
            2
        );
        // No NVRAM in the snapshot: a fresh store from the template.
        let nv = dom.get_child("os").unwrap().get_child("nvram").unwrap();
        assert!(nv.get_text().is_none());
        assert_eq!(nv.attributes["template"], "/usr/share/OVMF/OVMF_VARS.fd");
        assert!(notes.iter().any(|n| n.contains("UEFI")), "{notes:?}");
    }

    #[test]
    fn a_disk_to_restore_must_exist_in_the_xml() {
        let d = vec![RestoredDisk {
            target: "vdz".into(),
            path: "/x".into(),
            format: ImageFormat::Raw,
        }];
        let r = rewrite(
            XML,
            &Rewrite {
                name: "n",
                disks: &d,
                keep_macs: false,
                keep_policies: false,
                dir: Path::new("/srv"),
                nvram: None,
            },
        );
        assert!(r.is_err());
        assert!(rewrite(
            "<network/>",
            &Rewrite {
                name: "n",
                disks: &[],
                keep_macs: false,
                keep_policies: false,
                dir: Path::new("/srv"),
                nvram: None,
            }
        )
        .is_err());
    }
}
