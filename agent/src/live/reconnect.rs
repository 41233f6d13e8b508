//! Guest reads that wait out a server restart, on libvirt versions that
//! drop `<reconnect>` from an NBD backing (9.0 does): each overlay's
//! backing is swapped, through QMP, for an NBD node of our own with
//! `reconnect-delay`. The overlay's options are taken verbatim from QEMU's
//! command line (libvirt's `-blockdev`), so `blockdev-reopen` changes its
//! backing and nothing else. Best effort: if anything here fails, the
//! restore goes on with libvirt's node (reads fail during an outage).

use std::path::Path;

use anyhow::{Context, Result};
use serde_json::{json, Value};

use crate::libvirt::Domain;

/// Our backing node for disk `target`.
pub fn node_name(target: &str) -> String {
    format!("bw-live-{target}")
}

/// Swaps the backing of each disk in `targets` for a reconnecting one.
pub fn install(dom: &Domain, socket: &Path, targets: &[String], delay_secs: u32) -> Result<()> {
    for t in targets {
        let node = node_name(t);
        let backing = json!({
            "driver": "raw",
            "node-name": node,
            "read-only": true,
            "file": {
                "driver": "nbd",
                "node-name": format!("{node}-nbd"),
                "server": {"type": "unix", "path": socket.to_string_lossy()},
                "export": t,
                "reconnect-delay": delay_secs,
            },
        });
        reopen_on(dom, t, &node, backing)?;
        tracing::info!(
            "{}: {t} reads through {node} (reconnect-delay {delay_secs}s)",
            dom.name()
        );
    }
    Ok(())
}

/// Moves disk `target`'s backing from the server onto `file`, a complete
/// local raw copy of the same snapshot disk (the backfill): from then on
/// the disk reads nothing from the repository. The server's node is then
/// nobody's backing and is removed.
pub fn move_onto_file(dom: &Domain, target: &str, file: &Path) -> Result<()> {
    let node = format!("bw-base-{target}");
    let backing = json!({
        "driver": "raw",
        "node-name": node,
        "read-only": true,
        "file": {
            "driver": "file",
            "node-name": format!("{node}-file"),
            "filename": file.to_string_lossy(),
        },
    });
    reopen_on(dom, target, &node, backing)?;
    remove(dom, target);
    Ok(())
}

/// Adds `backing` (a node named `node`) and makes it the backing of disk
/// `target`'s overlay; the node is removed again if that fails.
fn reopen_on(dom: &Domain, target: &str, node: &str, backing: Value) -> Result<()> {
    let blockdevs = qemu_blockdevs(dom.name())?;
    let xml = dom.xml(false)?;
    let index =
        source_index(&xml, target).with_context(|| format!("no source index for {target}"))?;
    let top_name = format!("libvirt-{index}-format");
    let top = blockdevs
        .iter()
        .find(|b| b["node-name"] == top_name.as_str())
        .with_context(|| format!("no -blockdev {top_name} on QEMU's command line"))?;
    dom.qmp("blockdev-add", Some(backing))?;
    let mut opts = top.clone();
    opts["backing"] = json!(node);
    if let Err(e) = dom.qmp("blockdev-reopen", Some(json!({ "options": [opts] }))) {
        let _ = dom.qmp("blockdev-del", Some(json!({ "node-name": node })));
        return Err(e.into());
    }
    Ok(())
}

/// Removes our node once the stream has made the disk local (it is then
/// nobody's backing any more). Harmless if it is gone already.
pub fn remove(dom: &Domain, target: &str) {
    let _ = dom.qmp(
        "blockdev-del",
        Some(json!({ "node-name": node_name(target) })),
    );
}

/// The `-blockdev` JSON arguments of the domain's QEMU process.
fn qemu_blockdevs(domain: &str) -> Result<Vec<Value>> {
    let pidfile = format!("/run/libvirt/qemu/{domain}.pid");
    let pid = std::fs::read_to_string(&pidfile)
        .with_context(|| format!("reading {pidfile}"))?
        .trim()
        .to_string();
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))?;
    let args: Vec<String> = cmdline
        .split(|&b| b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    Ok(args
        .windows(2)
        .filter(|w| w[0] == "-blockdev")
        .filter_map(|w| serde_json::from_str(&w[1]).ok())
        .collect())
}

/// The `index` libvirt gave the disk's top image (its node names are
/// `libvirt-INDEX-format` / `-storage`).
fn source_index(xml: &str, target: &str) -> Option<String> {
    let doc = roxmltree::Document::parse(xml).ok()?;
    let disk = doc
        .descendants()
        .filter(|n| n.has_tag_name("disk"))
        .find(|d| {
            d.children()
                .any(|c| c.has_tag_name("target") && c.attribute("dev") == Some(target))
        })?;
    disk.children()
        .find(|c| c.has_tag_name("source"))?
        .attribute("index")
        .map(str::to_string)
}
