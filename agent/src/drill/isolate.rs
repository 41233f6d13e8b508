//! The drill's domain XML: the snapshot's domain, restored under a
//! throw-away name onto overlays in the lab directory, then cut off from
//! the host. No network interface at all, no host devices or directories,
//! no disk that is not in the snapshot (it would be the host's, writable),
//! empty removable drives, no display listening anywhere; serial ports
//! write to files in the lab (the console check reads them), and the
//! guest agent's channel is kept or added when a check needs it.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use xmltree::{Element, EmitterConfig, XMLNode};

/// Devices a drill never gives the guest.
const REMOVED: &[&str] = &[
    "interface",
    "hostdev",
    "redirdev",
    "smartcard",
    "filesystem",
    "tpm",
    "shmem",
    "vsock",
    "parallel",
    "console",
    "graphics",
];

/// The guest agent's virtio-serial port name.
pub const GUEST_AGENT: &str = "org.qemu.guest_agent.0";

/// What the checks need of the domain.
pub struct Isolation<'a> {
    /// Where console logs go.
    pub dir: &'a Path,
    /// The disks that were restored (overlays); every other disk goes.
    pub disks: &'a [String],
    pub console: bool,
    pub guest_agent: bool,
    pub screenshot: bool,
}

/// The isolated XML and the console log files its serial ports write.
pub struct Isolated {
    pub xml: String,
    pub consoles: Vec<PathBuf>,
}

pub fn isolate(xml: &str, i: &Isolation<'_>) -> Result<Isolated> {
    let mut dom = Element::parse(xml.as_bytes()).context("parsing the domain XML")?;
    let devices = dom
        .get_mut_child("devices")
        .context("domain XML without devices")?;
    devices.children.retain(|c| match c {
        XMLNode::Element(e) => keep(e, i),
        _ => true,
    });
    for d in elements_mut(devices, "disk") {
        if d.attributes.get("device").is_some_and(|v| v != "disk") {
            d.children.retain(|c| !is(c, "source"));
        }
    }
    let consoles = serial_to_files(devices, i);
    if i.guest_agent && !has_guest_agent(devices) {
        devices
            .children
            .push(XMLNode::Element(guest_agent_channel()));
    }
    if i.screenshot && devices.get_child("video").is_none() {
        let mut video = Element::new("video");
        let mut model = Element::new("model");
        model.attributes.insert("type".into(), "vga".into());
        video.children.push(XMLNode::Element(model));
        devices.children.push(XMLNode::Element(video));
    }
    let mut out = Vec::new();
    dom.write_with_config(
        &mut out,
        EmitterConfig::new()
            .perform_indent(true)
            .write_document_declaration(false),
    )
    .context("writing the domain XML")?;
    Ok(Isolated {
        xml: String::from_utf8(out).context("domain XML is not UTF-8")?,
        consoles,
    })
}

/// Whether a device stays in the drill's domain.
fn keep(e: &Element, i: &Isolation<'_>) -> bool {
    if REMOVED.contains(&e.name.as_str()) {
        return false;
    }
    match e.name.as_str() {
        "disk" => {
            let removable = e.attributes.get("device").is_some_and(|v| v != "disk");
            let target = e.get_child("target").and_then(|t| t.attributes.get("dev"));
            removable || target.is_some_and(|t| i.disks.contains(t))
        }
        // Spice agents, host sockets and the like: only the guest agent.
        "channel" => is_guest_agent(e),
        _ => true,
    }
}

/// Every serial port writes to `console-N.log` in the lab; one is added
/// when the console check needs it and the domain has none.
fn serial_to_files(devices: &mut Element, i: &Isolation<'_>) -> Vec<PathBuf> {
    let mut consoles = Vec::new();
    for s in elements_mut(devices, "serial") {
        let path = i.dir.join(format!("console-{}.log", consoles.len()));
        s.attributes.insert("type".into(), "file".into());
        s.children
            .retain(|c| !is(c, "source") && !is(c, "log") && !is(c, "protocol"));
        s.children.insert(0, XMLNode::Element(file_source(&path)));
        consoles.push(path);
    }
    if consoles.is_empty() && i.console {
        let path = i.dir.join("console-0.log");
        let mut s = Element::new("serial");
        s.attributes.insert("type".into(), "file".into());
        s.children.push(XMLNode::Element(file_source(&path)));
        devices.children.push(XMLNode::Element(s));
        consoles.push(path);
    }
    consoles
}

fn file_source(path: &Path) -> Element {
    let mut src = Element::new("source");
    src.attributes
        .insert("path".into(), path.display().to_string());
    src
}

fn is_guest_agent(e: &Element) -> bool {
    e.get_child("target")
        .and_then(|t| t.attributes.get("name"))
        .is_some_and(|n| n == GUEST_AGENT)
}

fn has_guest_agent(devices: &Element) -> bool {
    devices.children.iter().any(|c| match c {
        XMLNode::Element(e) => e.name == "channel" && is_guest_agent(e),
        _ => false,
    })
}

/// A unix channel for the guest agent; libvirt picks the socket path.
fn guest_agent_channel() -> Element {
    let mut ch = Element::new("channel");
    ch.attributes.insert("type".into(), "unix".into());
    let mut t = Element::new("target");
    t.attributes.insert("type".into(), "virtio".into());
    t.attributes.insert("name".into(), GUEST_AGENT.into());
    ch.children.push(XMLNode::Element(t));
    ch
}

fn is(node: &XMLNode, name: &str) -> bool {
    matches!(node, XMLNode::Element(e) if e.name == name)
}

fn elements_mut<'e>(el: &'e mut Element, name: &'e str) -> impl Iterator<Item = &'e mut Element> {
    el.children.iter_mut().filter_map(move |c| match c {
        XMLNode::Element(e) if e.name == name => Some(e),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const XML: &str = "<domain type='kvm'><name>d</name><devices>
      <disk type='file' device='disk'><source file='/o/vda.qcow2'/><target dev='vda'/></disk>
      <disk type='block' device='disk'><source dev='/dev/sdb'/><target dev='vdb'/></disk>
      <disk type='file' device='cdrom'><source file='/iso/x.iso'/><target dev='sda'/></disk>
      <interface type='network'><source network='default'/></interface>
      <interface type='bridge'><source bridge='br0'/></interface>
      <hostdev mode='subsystem' type='usb'/>
      <filesystem type='mount'><source dir='/srv'/><target dir='srv'/></filesystem>
      <graphics type='vnc' port='-1' listen='0.0.0.0'/>
      <serial type='pty'><target port='0'/></serial>
      <console type='pty'><target type='serial'/></console>
      <channel type='spicevmc'><target type='virtio' name='com.redhat.spice.0'/></channel>
      <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    </devices></domain>";

    fn run(console: bool, ga: bool, shot: bool) -> Isolated {
        isolate(
            XML,
            &Isolation {
                dir: Path::new("/lab"),
                disks: &["vda".to_string()],
                console,
                guest_agent: ga,
                screenshot: shot,
            },
        )
        .unwrap()
    }

    #[test]
    fn cuts_the_domain_off_from_the_host() {
        let out = run(true, true, false);
        let x = &out.xml;
        for gone in [
            "<interface",
            "hostdev",
            "filesystem",
            "graphics",
            "/dev/sdb",
            "x.iso",
            "spicevmc",
            "<console",
        ] {
            assert!(!x.contains(gone), "{gone} left in {x}");
        }
        assert!(x.contains("/o/vda.qcow2"));
        assert!(
            x.contains("device=\"cdrom\""),
            "the drive stays, empty: {x}"
        );
        assert!(x.contains("org.qemu.guest_agent.0"));
        assert!(x.contains("<source path=\"/lab/console-0.log\""), "{x}");
        assert_eq!(out.consoles, vec![PathBuf::from("/lab/console-0.log")]);
        assert!(!x.contains("<video"));
    }

    #[test]
    fn adds_what_the_checks_need() {
        let bare =
            "<domain><devices><disk device='disk'><target dev='vda'/></disk></devices></domain>";
        let out = isolate(
            bare,
            &Isolation {
                dir: Path::new("/lab"),
                disks: &["vda".to_string()],
                console: true,
                guest_agent: true,
                screenshot: true,
            },
        )
        .unwrap();
        assert_eq!(out.consoles.len(), 1);
        assert!(out.xml.contains(GUEST_AGENT));
        assert!(out.xml.contains("<video>"), "{}", out.xml);
        let out = isolate(
            bare,
            &Isolation {
                dir: Path::new("/lab"),
                disks: &["vda".to_string()],
                console: false,
                guest_agent: false,
                screenshot: false,
            },
        )
        .unwrap();
        assert!(out.consoles.is_empty());
        assert!(!out.xml.contains(GUEST_AGENT), "{}", out.xml);
        // The domain's own guest agent channel stays (a socket libvirt makes).
        assert!(run(false, false, false).xml.contains(GUEST_AGENT));
    }
}
