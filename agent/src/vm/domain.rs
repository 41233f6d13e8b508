//! What Bulwark needs from a domain's XML: its disks and its policies.

use std::path::PathBuf;

use anyhow::{Context, Result};

use super::XMLNS;

/// One disk that can be backed up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Disk {
    /// Target device (`vda`): the disk's name in snapshots and in libvirt's
    /// backup and checkpoint XML.
    pub target: String,
    /// Image file or block device.
    pub path: PathBuf,
    pub format: DiskFormat,
}

/// An image format as libvirt's `<driver type>` names it: the two Bulwark
/// treats differently, and the rest (read whole through QEMU, by name).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiskFormat {
    Qcow2,
    Raw,
    Other(String),
}

impl DiskFormat {
    pub fn parse(name: &str) -> DiskFormat {
        match name {
            "qcow2" => DiskFormat::Qcow2,
            "raw" => DiskFormat::Raw,
            other => DiskFormat::Other(other.to_string()),
        }
    }

    /// The name QEMU and libvirt use.
    pub fn as_str(&self) -> &str {
        match self {
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Raw => "raw",
            DiskFormat::Other(s) => s,
        }
    }
}

impl std::fmt::Display for DiskFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Disk {
    /// Only qcow2 (v3) images hold persistent dirty bitmaps.
    pub fn has_bitmaps(&self) -> bool {
        self.format == DiskFormat::Qcow2
    }
}

#[derive(Clone, Debug)]
pub struct DomainInfo {
    pub name: String,
    pub uuid: String,
    pub disks: Vec<Disk>,
    /// Policy names from Bulwark's metadata element (empty: not protected).
    pub policies: Vec<String>,
    /// Writable disks Bulwark cannot read (network, volume, ...): a backup
    /// refuses rather than store a VM with a disk missing.
    pub unsupported: Vec<String>,
    /// The UEFI variable store (`<os><nvram>`), if the domain has one.
    pub nvram: Option<PathBuf>,
}

pub fn parse(xml: &str) -> Result<DomainInfo> {
    let doc = roxmltree::Document::parse(xml).context("parsing domain XML")?;
    let root = doc.root_element();
    let text_of = |tag: &str| {
        root.children()
            .find(|n| n.has_tag_name(tag))
            .and_then(|n| n.text())
            .map(|t| t.trim().to_string())
            .unwrap_or_default()
    };
    let name = text_of("name");
    let uuid = text_of("uuid");
    let mut disks = Vec::new();
    let mut unsupported = Vec::new();
    if let Some(devices) = root.children().find(|n| n.has_tag_name("devices")) {
        for d in devices.children().filter(|n| n.has_tag_name("disk")) {
            if d.attribute("device").unwrap_or("disk") != "disk" {
                continue;
            }
            let child = |tag: &str| d.children().find(|n| n.has_tag_name(tag));
            if child("readonly").is_some() || child("transient").is_some() {
                continue;
            }
            let target = child("target").and_then(|t| t.attribute("dev"));
            // No source: an empty drive, nothing to back up.
            let Some(src) = child("source") else { continue };
            // libvirt's defaults: a disk without `type` is a file.
            let kind = d.attribute("type").unwrap_or("file");
            let path = match kind {
                "file" => src.attribute("file"),
                "block" => src.attribute("dev"),
                _ => None,
            };
            let (Some(path), Some(target)) = (path, target) else {
                unsupported.push(format!("{} ({kind})", target.unwrap_or("?")));
                continue;
            };
            // libvirt's default: no driver type is raw (it never probes),
            // so this is what the guest sees too.
            let format = DiskFormat::parse(
                child("driver")
                    .and_then(|t| t.attribute("type"))
                    .unwrap_or("raw"),
            );
            disks.push(Disk {
                target: target.to_string(),
                path: PathBuf::from(path),
                format,
            });
        }
    }
    Ok(DomainInfo {
        name,
        uuid,
        disks,
        policies: policies(&root),
        unsupported,
        nvram: root
            .children()
            .find(|n| n.has_tag_name("os"))
            .and_then(|os| os.children().find(|n| n.has_tag_name("nvram")))
            .and_then(|n| n.text())
            .map(|t| PathBuf::from(t.trim()))
            .filter(|p| !p.as_os_str().is_empty()),
    })
}

fn policies(root: &roxmltree::Node<'_, '_>) -> Vec<String> {
    let Some(meta) = root.children().find(|n| n.has_tag_name("metadata")) else {
        return Vec::new();
    };
    meta.descendants()
        .filter(|n| n.has_tag_name((XMLNS, "policy")))
        .filter_map(|n| n.attribute("name").map(String::from))
        .collect()
}

/// The metadata element as it appears in domain XML (for `virsh define`).
#[cfg(test)]
pub fn policies_xml(policies: &[String]) -> String {
    let mut s = format!("<bulwark:policies xmlns:bulwark='{XMLNS}'>");
    for p in policies {
        s.push_str(&format!("<bulwark:policy name='{}'/>", xml_escape(p)));
    }
    s.push_str("</bulwark:policies>");
    s
}

/// The same element for `virsh metadata --set`: without a namespace, which
/// libvirt adds (with the `--key` prefix).
pub fn policies_set_xml(policies: &[String]) -> String {
    let mut s = String::from("<policies>");
    for p in policies {
        s.push_str(&format!("<policy name='{}'/>", xml_escape(p)));
    }
    s.push_str("</policies>");
    s
}

pub fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_disks_and_policies() {
        let xml = r#"<domain type='qemu'><name>web</name><uuid>u-1</uuid>
          <metadata><bulwark:policies xmlns:bulwark="https://bulwark.dev/xmlns/libvirt/1">
            <bulwark:policy name="hourly"/><bulwark:policy name="weekly"/></bulwark:policies></metadata>
          <devices>
            <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
              <source file='/a.qcow2'/><target dev='vda' bus='virtio'/></disk>
            <disk type='block' device='disk'><driver name='qemu' type='raw'/>
              <source dev='/dev/sdb'/><target dev='vdb' bus='virtio'/></disk>
            <disk type='file' device='cdrom'><source file='/x.iso'/><target dev='sda'/><readonly/></disk>
          </devices></domain>"#;
        let d = parse(xml).unwrap();
        assert_eq!(d.name, "web");
        assert_eq!(d.policies, vec!["hourly", "weekly"]);
        assert_eq!(d.disks.len(), 2);
        assert!(d.disks[0].has_bitmaps());
        assert_eq!(d.disks[1].path, PathBuf::from("/dev/sdb"));
        assert!(!d.disks[1].has_bitmaps());
        assert!(d.unsupported.is_empty());
        let net = r#"<domain><name>n</name><devices>
            <disk type='network' device='disk'><source protocol='rbd' name='p/i'/><target dev='vdc'/></disk>
          </devices></domain>"#;
        let n = parse(net).unwrap();
        assert!(n.disks.is_empty());
        assert_eq!(n.unsupported, vec!["vdc (network)"]);
        let p = policies_xml(&["a".into()]);
        let wrapped = format!("<domain><metadata>{p}</metadata></domain>");
        assert_eq!(parse(&wrapped).unwrap().policies, vec!["a"]);
    }
}
