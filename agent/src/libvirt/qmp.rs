//! QMP commands through libvirt (`virDomainQemuMonitorCommand`), with the
//! replies Bulwark reads parsed into types.

use std::path::Path;

use serde::Deserialize;
use serde_json::{json, Value};

use super::{Domain, Error, Result};

/// One entry of `query-block`.
#[derive(Clone, Debug, Deserialize)]
pub struct Block {
    #[serde(default)]
    pub inserted: Option<Inserted>,
    /// Older QEMUs list bitmaps here rather than under `inserted`.
    #[serde(rename = "dirty-bitmaps", default)]
    pub dirty_bitmaps: Vec<Bitmap>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Inserted {
    pub file: String,
    #[serde(rename = "node-name", default)]
    pub node_name: Option<String>,
    #[serde(default)]
    pub image: Option<Image>,
    #[serde(rename = "dirty-bitmaps", default)]
    pub dirty_bitmaps: Vec<Bitmap>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Image {
    pub filename: String,
}

/// A dirty bitmap. QEMU sends `inconsistent` only when true, `recording`
/// always: a missing flag reads as false, so a bitmap of unknown state
/// reads as not recording, which forces a full read (safe).
#[derive(Clone, Debug, Deserialize)]
pub struct Bitmap {
    pub name: String,
    #[serde(default)]
    pub recording: bool,
    #[serde(default)]
    pub inconsistent: bool,
}

impl Block {
    /// Whether this block device's image is `path`.
    pub fn is_image(&self, path: &Path) -> bool {
        let p = path.to_string_lossy();
        self.inserted
            .as_ref()
            .is_some_and(|i| i.file == p || i.image.as_ref().is_some_and(|im| im.filename == p))
    }

    pub fn node_name(&self) -> Option<&str> {
        self.inserted.as_ref()?.node_name.as_deref()
    }

    /// Every bitmap, wherever this QEMU lists them.
    pub fn bitmaps(&self) -> impl Iterator<Item = &Bitmap> {
        let inserted = self.inserted.iter().flat_map(|i| i.dirty_bitmaps.iter());
        inserted.chain(self.dirty_bitmaps.iter())
    }

    pub fn bitmap(&self, name: &str) -> Option<&Bitmap> {
        self.bitmaps().find(|b| b.name == name)
    }
}

impl Domain {
    /// Runs one QMP command; its `return` value.
    pub fn qmp(&self, command: &str, arguments: Option<Value>) -> Result<Value> {
        let mut cmd = json!({ "execute": command });
        if let Some(a) = arguments {
            cmd["arguments"] = a;
        }
        let err = |message: String| Error::Qmp {
            domain: self.name.clone(),
            command: command.to_string(),
            message,
        };
        let out = self
            .dom
            .qemu_monitor_command(&cmd.to_string(), 0)
            .map_err(|e| err(e.message().to_string()))?;
        let mut v: Value =
            serde_json::from_str(out.trim()).map_err(|e| err(format!("unreadable reply: {e}")))?;
        if let Some(e) = v.get("error") {
            return Err(err(e.to_string()));
        }
        Ok(v.get_mut("return").map(Value::take).unwrap_or(Value::Null))
    }

    /// `query-block`: the block devices and their bitmaps.
    pub fn query_block(&self) -> Result<Vec<Block>> {
        let v = self.qmp("query-block", None)?;
        serde_json::from_value(v).map_err(|e| Error::Qmp {
            domain: self.name.clone(),
            command: "query-block".into(),
            message: format!("unexpected reply: {e}"),
        })
    }

    /// Removes a bitmap from a block node of the running domain.
    pub fn bitmap_remove(&self, node: &str, name: &str) -> Result<()> {
        self.qmp(
            "block-dirty-bitmap-remove",
            Some(json!({ "node": node, "name": name })),
        )
        .map(|_| ())
    }

    /// Adds a persistent, recording bitmap to a block node of the running
    /// domain (saved into the qcow2 image when QEMU stops).
    pub fn bitmap_add(&self, node: &str, name: &str) -> Result<()> {
        self.qmp(
            "block-dirty-bitmap-add",
            Some(json!({ "node": node, "name": name, "persistent": true })),
        )
        .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_query_block_bitmaps() {
        let v = json!([
            {"device": "", "qdev": "/machine/peripheral/virtio-disk0/virtio-backend",
             "inserted": {"file": "/img/a.qcow2", "node-name": "libvirt-1-format",
                "image": {"filename": "/img/a.qcow2"},
                "dirty-bitmaps": [
                    {"name": "bw-1", "recording": true, "persistent": true},
                    {"name": "bw-0", "recording": true, "inconsistent": true},
                    {"name": "bw-x"}
                ]}},
            {"device": "cd0"}
        ]);
        let blocks: Vec<Block> = serde_json::from_value(v).unwrap();
        let b = &blocks[0];
        assert!(b.is_image(Path::new("/img/a.qcow2")));
        assert!(!blocks[1].is_image(Path::new("/img/a.qcow2")));
        assert_eq!(b.node_name(), Some("libvirt-1-format"));
        let good = b.bitmap("bw-1").unwrap();
        assert!(good.recording && !good.inconsistent);
        assert!(b.bitmap("bw-0").unwrap().inconsistent);
        assert!(!b.bitmap("bw-x").unwrap().recording);
        assert!(b.bitmap("nope").is_none());
    }
}
