//! `bulwark-hook`: installed as `/etc/libvirt/hooks/qemu.d/bulwark`.
//!
//! libvirt runs it as `HOOK DOMAIN OPERATION SUBOP EXTRA` with the domain
//! XML on stdin, synchronously, while holding locks: so it never calls
//! libvirt (deadlock), never waits long, and always exits 0 (a failing
//! `prepare` would stop the VM from starting, a failing `reconnect` makes
//! libvirt kill it). Problems are logged to stderr, which libvirt keeps.
//!
//! * `prepare begin`, domain with Bulwark policy metadata: every qcow2 disk
//!   gets a persistent, enabled dirty bitmap (`qemu-img bitmap --add
//!   --enable`, offline: QEMU is not running yet) unless it has one of
//!   Bulwark's already; bitmaps flagged `in-use` mean the VM was not stopped
//!   cleanly last time (crash): reported to the agent.
//! * `prepare begin`, `started begin`, `release end`: one JSON line to the
//!   agent's Unix socket (short timeouts; skipped when the agent is down).
//!
//! Configuration: `/etc/bulwark/hook.conf` (or `$BULWARK_HOOK_CONF`), lines
//! `key = value`: `socket` (agent socket, default `/run/bulwark/agent.sock`),
//! `qemu_img` (default `qemu-img`).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::Duration;

// The names the agent uses too, from one place: a mismatch would make the
// hook skip protected domains or add bitmaps the agent does not know.
use bulwark_proto::{is_ours, needs_first_bitmap, HookEvent, DEFAULT_SOCKET, HOOK_BITMAP, XMLNS};

struct Conf {
    socket: String,
    qemu_img: String,
}

fn conf() -> Conf {
    let mut c = Conf {
        socket: DEFAULT_SOCKET.into(),
        qemu_img: "qemu-img".into(),
    };
    let path =
        std::env::var("BULWARK_HOOK_CONF").unwrap_or_else(|_| "/etc/bulwark/hook.conf".into());
    if let Ok(text) = std::fs::read_to_string(path) {
        for line in text.lines() {
            let line = line.trim();
            if line.starts_with('#') {
                continue;
            }
            if let Some((k, v)) = line.split_once('=') {
                let v = v.trim().trim_matches('"').to_string();
                match k.trim() {
                    "socket" => c.socket = v,
                    "qemu_img" => c.qemu_img = v,
                    _ => {}
                }
            }
        }
    }
    c
}

fn main() {
    // Never `env::args()`: it panics on a name that is not UTF-8, and a
    // failing hook fails the VM's start.
    let args: Vec<String> = std::env::args_os()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let (dom, op, sub) = (
        args.get(1).map_or("", String::as_str),
        args.get(2).map_or("", String::as_str),
        args.get(3).map_or("", String::as_str),
    );
    // Only these events matter; return at once for everything else
    // (reconnect, migrate, restore, attach, ...), reading nothing.
    let interesting = matches!(
        (op, sub),
        ("prepare", "begin") | ("started", "begin") | ("release", "end")
    );
    if !interesting {
        return;
    }
    let mut xml = String::new();
    // The hook never fails libvirt: unreadable XML means no bitmap is
    // added, and the next backup reads the disk in full.
    let _ = std::io::stdin().take(16 << 20).read_to_string(&mut xml);
    if !xml.contains(XMLNS) {
        return; // not protected by Bulwark
    }
    let c = conf();
    let uuid = element_text(&xml, "uuid").unwrap_or_default();
    let mut unclean = false;
    let mut added = Vec::new();
    if (op, sub) == ("prepare", "begin") {
        for (target, file) in qcow2_disks(&xml) {
            match bitmaps(&c, &file) {
                Ok(bms) => {
                    // A bitmap of ours still in use: the VM did not stop cleanly.
                    if bms.iter().any(|b| is_ours(&b.0) && b.1) {
                        unclean = true;
                    }
                    if needs_first_bitmap(bms.iter().map(|b| b.0.as_str())) {
                        match add_bitmap(&c, &file) {
                            Ok(()) => added.push(target.clone()),
                            Err(e) => eprintln!("bulwark-hook: {dom}: {target}: {e}"),
                        }
                    }
                }
                Err(e) => eprintln!("bulwark-hook: {dom}: {target}: {e}"),
            }
        }
    }
    let msg = HookEvent {
        domain: dom.to_string(),
        uuid,
        event: format!("{op} {sub}"),
        unclean,
        bitmaps_added: added,
    }
    .to_json_line();
    if let Err(e) = notify(&c.socket, &msg) {
        // The agent may be down: the backup notices on its own later.
        eprintln!("bulwark-hook: {dom}: agent not told ({}): {e}", c.socket);
    }
}

fn notify(socket: &str, msg: &str) -> std::io::Result<()> {
    let mut s = UnixStream::connect(socket)?;
    s.set_write_timeout(Some(Duration::from_secs(2)))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(msg.as_bytes())?;
    let mut reply = [0u8; 64];
    let _ = s.read(&mut reply);
    Ok(())
}

fn run(c: &Conf, args: &[&str]) -> Result<String, String> {
    let out = Command::new(&c.qemu_img)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running {}: {e}", c.qemu_img))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "qemu-img {} failed: {}",
            args.first().copied().unwrap_or(""),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// `(name, in_use)` of every persistent bitmap, from `qemu-img info` JSON.
fn bitmaps(c: &Conf, path: &str) -> Result<Vec<(String, bool)>, String> {
    let json = run(c, &["info", "-U", "--output=json", "-f", "qcow2", path])?;
    Ok(scan_bitmaps(&json))
}

/// Scans the `"bitmaps": [...]` array by hand (std only): each object's
/// `name` and whether its flags hold `in-use`.
fn scan_bitmaps(json: &str) -> Vec<(String, bool)> {
    let Some(start) = json.find("\"bitmaps\"") else {
        return Vec::new();
    };
    let Some(open) = json[start..].find('[') else {
        return Vec::new();
    };
    let arr = &json[start + open..];
    let mut depth = 0usize;
    let mut end = arr.len();
    for (i, ch) in arr.char_indices() {
        match ch {
            '[' | '{' => depth += 1,
            ']' | '}' => {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    end = i;
                    break;
                }
            }
            _ => {}
        }
    }
    let arr = &arr[..end];
    let mut out = Vec::new();
    // Objects hold no nested objects: split at '}'.
    for obj in arr.split('}') {
        if let Some(i) = obj.find("\"name\"") {
            let name = obj[i + 6..].split('"').nth(1).unwrap_or("").to_string();
            if !name.is_empty() {
                out.push((name, obj.contains("\"in-use\"")));
            }
        }
    }
    out
}

fn add_bitmap(c: &Conf, path: &str) -> Result<(), String> {
    run(
        c,
        &[
            "bitmap",
            "--add",
            "--enable",
            "-f",
            "qcow2",
            path,
            HOOK_BITMAP,
        ],
    )
    .map(|_| ())
}

/// `(target, file)` of every writable qcow2 file disk.
fn qcow2_disks(xml: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some(i) = rest.find("<disk ") {
        let after = &rest[i..];
        let end = after.find("</disk>").unwrap_or(after.len());
        let disk = &after[..end];
        rest = &after[end..];
        let head = &disk[..disk.find('>').unwrap_or(disk.len())];
        if attr(head, "device").unwrap_or("disk") != "disk"
            || attr(head, "type").unwrap_or("file") != "file"
            || disk.contains("<readonly")
        {
            continue;
        }
        let tag = |name: &str| {
            disk.find(&format!("<{name} ")).map(|j| {
                let t = &disk[j..];
                &t[..t.find('>').unwrap_or(t.len())]
            })
        };
        let fmt = tag("driver").and_then(|t| attr(t, "type"));
        let file = tag("source").and_then(|t| attr(t, "file"));
        let target = tag("target").and_then(|t| attr(t, "dev"));
        if let (Some("qcow2"), Some(f), Some(t)) = (fmt, file, target) {
            out.push((t.to_string(), unescape(f)));
        }
    }
    out
}

fn attr<'a>(tag: &'a str, name: &str) -> Option<&'a str> {
    for q in ['\'', '"'] {
        let pat = format!(" {name}={q}");
        if let Some(i) = tag.find(&pat) {
            let v = &tag[i + pat.len()..];
            return v.find(q).map(|e| &v[..e]);
        }
    }
    None
}

fn element_text(xml: &str, name: &str) -> Option<String> {
    let open = format!("<{name}>");
    let i = xml.find(&open)? + open.len();
    let e = xml[i..].find('<')?;
    Some(xml[i..i + e].trim().to_string())
}

fn unescape(s: &str) -> String {
    s.replace("&apos;", "'")
        .replace("&quot;", "\"")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_qcow2_disks() {
        let xml = "<domain><uuid>abc</uuid><devices>\
            <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
            <source file='/v/a&amp;b.qcow2'/><target dev='vda' bus='virtio'/></disk>\
            <disk type=\"file\" device=\"disk\"><driver name=\"qemu\" type=\"raw\"/>\
            <source file=\"/v/b.raw\"/><target dev=\"vdb\"/></disk>\
            <disk type='file' device='cdrom'><driver name='qemu' type='qcow2'/>\
            <source file='/c.qcow2'/><target dev='sda'/><readonly/></disk></devices></domain>";
        assert_eq!(
            qcow2_disks(xml),
            vec![("vda".to_string(), "/v/a&b.qcow2".to_string())]
        );
        assert_eq!(element_text(xml, "uuid").as_deref(), Some("abc"));
    }

    #[test]
    fn scans_bitmaps() {
        let j = r#"{"format-specific": {"data": {"bitmaps": [
            {"flags": ["in-use", "auto"], "name": "bw-1", "granularity": 65536},
            {"flags": ["auto"], "name": "other", "granularity": 65536}], "refcount-bits": 16}},
            "children": [{"name": "file"}]}"#;
        assert_eq!(
            scan_bitmaps(j),
            vec![("bw-1".to_string(), true), ("other".to_string(), false)]
        );
        assert!(scan_bitmaps("{}").is_empty());
    }
}
