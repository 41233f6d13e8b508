//! `files ls` and `files find`: volumes and entries as a table, `ls -l`
//! lines or JSON, and the bounded walk both use.

use std::collections::HashSet;

use anyhow::Result;
use fsread::{Kind, Place, Volume};
use serde_json::{json, Value};

use super::{FindArgs, Located, LsArgs, Session, Target};
use crate::units::human;

/// Deepest directory a walk enters (a hostile image may nest without end).
const MAX_DEPTH: usize = 1024;

pub(super) fn ls(s: &Session, a: &LsArgs) -> Result<i32> {
    match s.resolve(a.path.as_deref().unwrap_or(""))? {
        Target::Volumes(v) => {
            print_volumes(&v, a.json)?;
            Ok(0)
        }
        Target::Node(loc) => {
            let mut out = Vec::new();
            let mut errors = 0;
            if loc.node.meta.kind != Kind::Dir {
                out.push(loc);
            } else if a.recursive {
                errors = walk(&loc, &mut |e| {
                    out.push(e.clone());
                    Ok(())
                });
            } else {
                children(&loc, &mut |e| {
                    out.push(e.clone());
                    Ok(())
                })?;
            }
            print_entries(&out, a.long, a.json)?;
            Ok(i32::from(errors > 0))
        }
    }
}

pub(super) fn find(s: &Session, a: &FindArgs) -> Result<i32> {
    let pattern = glob::Pattern::new(&a.pattern)?;
    let whole_path = a.pattern.contains('/');
    let roots = match &a.under {
        Some(p) => match s.resolve(p)? {
            Target::Node(l) => vec![Ok(l)],
            Target::Volumes(_) => s.roots(),
        },
        None => s.roots(),
    };
    let mut found = Vec::new();
    let mut errors = 0;
    for r in roots {
        let root = match r {
            Ok(r) => r,
            Err(e) => {
                eprintln!("warning: {e:#}");
                errors += 1;
                continue;
            }
        };
        errors += walk(&root, &mut |e| {
            let subject = if whole_path {
                e.path.as_str()
            } else {
                name_of(&e.path)
            };
            if pattern.matches(subject) {
                found.push(e.clone());
            }
            Ok(())
        });
    }
    print_entries(&found, a.long, a.json)?;
    Ok(i32::from(errors > 0))
}

fn name_of(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// Calls `f` for each entry of directory `dir`, sorted by name. Names a
/// path cannot hold (`/`, NUL) are reported and skipped.
pub(crate) fn children(dir: &Located, f: &mut dyn FnMut(&Located) -> Result<()>) -> Result<()> {
    let mut entries = dir.tree.list(&dir.node)?;
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    for e in entries {
        if !fsread::valid_name(&e.name) {
            eprintln!(
                "warning: {}: skipped an entry with an unusable name {:?}",
                dir.path,
                String::from_utf8_lossy(&e.name)
            );
            continue;
        }
        let name = String::from_utf8_lossy(&e.name);
        f(&Located {
            tree: dir.tree.clone(),
            node: e.node,
            path: format!("{}/{name}", dir.path),
        })?;
    }
    Ok(())
}

/// Calls `f(rel, entry)` for `top` and every entry below it, where `rel`
/// is the path below `top`'s parent (`etc/hosts` for `vda/p1/etc`);
/// unreadable directories are reported, their count returned.
pub(super) fn each_below(top: &Located, f: &mut dyn FnMut(&str, &Located) -> Result<()>) -> usize {
    let base = name_of(&top.path).to_string();
    if let Err(e) = f(&base, top) {
        eprintln!("error: {}: {e:#}", top.path);
        return 1;
    }
    if top.node.meta.kind != Kind::Dir {
        return 0;
    }
    let skip = top.path.len();
    walk(top, &mut |e| f(&format!("{base}{}", &e.path[skip..]), e))
}

/// Calls `f` for every entry below `root`, depth first, each directory
/// once (a directory entered twice means a hostile loop) and at most
/// [`MAX_DEPTH`] deep. Unreadable directories are reported; their count.
pub(super) fn walk(root: &Located, f: &mut dyn FnMut(&Located) -> Result<()>) -> usize {
    let mut seen = HashSet::new();
    let mut errors = 0;
    walk_dir(root, 0, &mut seen, &mut errors, f);
    errors
}

fn walk_dir(
    dir: &Located,
    depth: usize,
    seen: &mut HashSet<u64>,
    errors: &mut usize,
    f: &mut dyn FnMut(&Located) -> Result<()>,
) {
    if depth > MAX_DEPTH || !seen.insert(dir.node.id) {
        eprintln!(
            "warning: {}: directory loop or nesting too deep, not entered",
            dir.path
        );
        *errors += 1;
        return;
    }
    let mut subdirs = Vec::new();
    let r = children(dir, &mut |e| {
        f(e)?;
        if e.node.meta.kind == Kind::Dir {
            subdirs.push(e.clone());
        }
        Ok(())
    });
    if let Err(e) = r {
        eprintln!("error: {}: {e:#}", dir.path);
        *errors += 1;
    }
    for d in subdirs {
        walk_dir(&d, depth + 1, seen, errors, f);
    }
}

fn print_volumes(vols: &[&Volume], json: bool) -> Result<()> {
    if json {
        let v: Vec<Value> = vols.iter().map(|v| volume_json(v)).collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({ "volumes": v }))?
        );
        return Ok(());
    }
    println!(
        "{:<28}  {:>10}  {:<8}  {:<16}  DETAIL",
        "PATH", "SIZE", "CONTENT", "LABEL"
    );
    for v in vols {
        let detail = match (&v.place, &v.content) {
            (_, fsread::Content::Damaged(e)) => e.clone(),
            (_, fsread::Content::LvmPv(Some(vg))) => format!("volume group {vg}"),
            (Place::Partition { type_name, .. }, _) => format!("partition type {type_name}"),
            (_, fsread::Content::Other(why)) => why.clone(),
            _ => String::new(),
        };
        println!(
            "{:<28}  {:>10}  {:<8}  {:<16}  {detail}",
            v.path,
            human(v.size),
            v.content.name(),
            v.label.as_deref().unwrap_or("")
        );
    }
    Ok(())
}

/// A volume as `--json` shows it.
pub(crate) fn volume_json(v: &Volume) -> Value {
    let mut j = json!({
        "path": v.path,
        "size": v.size,
        "content": v.content.name(),
        "label": v.label,
    });
    match &v.place {
        Place::Disk => j["type"] = json!("disk"),
        Place::Partition {
            number,
            start,
            type_name,
            name,
        } => {
            j["type"] = json!("partition");
            j["partition"] =
                json!({ "number": number, "start": start, "type": type_name, "name": name });
        }
        Place::LogicalVolume { vg, lv } => {
            j["type"] = json!("lvm");
            j["lvm"] = json!({ "vg": vg, "lv": lv });
        }
    }
    match &v.content {
        fsread::Content::Damaged(e) => j["error"] = json!(e),
        fsread::Content::Other(why) => j["detail"] = json!(why),
        _ => {}
    }
    j
}

fn print_entries(entries: &[Located], long: bool, json: bool) -> Result<()> {
    if json {
        let v: Vec<Value> = entries.iter().map(entry_json).collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({ "entries": v }))?
        );
        return Ok(());
    }
    for e in entries {
        let m = &e.node.meta;
        if !long {
            let slash = if m.kind == Kind::Dir { "/" } else { "" };
            println!("{}{slash}", e.path);
            continue;
        }
        let owner = match (m.uid, m.gid) {
            (Some(u), Some(g)) => format!("{u}:{g}"),
            _ => "-".into(),
        };
        let time = m
            .mtime
            .and_then(|t| chrono::DateTime::from_timestamp(t.secs, t.nsec))
            .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
            .unwrap_or_else(|| "-".into());
        let target = link_target(e)
            .map(|t| format!(" -> {t}"))
            .unwrap_or_default();
        println!(
            "{}  {:>5}  {:>11}  {:>12}  {time}  {}{target}",
            mode_string(m.kind, m.mode),
            m.nlink,
            owner,
            m.size,
            e.path
        );
    }
    Ok(())
}

fn link_target(e: &Located) -> Option<String> {
    (e.node.meta.kind == Kind::Symlink).then(|| match e.tree.read_link(&e.node) {
        Ok(t) => String::from_utf8_lossy(&t).into_owned(),
        Err(err) => format!("(unreadable: {err})"),
    })
}

/// An entry as `--json` shows it.
pub(crate) fn entry_json(e: &Located) -> Value {
    let m = &e.node.meta;
    json!({
        "path": e.path,
        "name": name_of(&e.path),
        "type": m.kind.name(),
        "size": m.size,
        "mode": format!("{:04o}", m.mode),
        "uid": m.uid,
        "gid": m.gid,
        "mtime": m.mtime
            .and_then(|t| chrono::DateTime::from_timestamp(t.secs, t.nsec))
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)),
        "nlink": m.nlink,
        "target": link_target(e),
    })
}

/// `drwxr-xr-x`.
fn mode_string(kind: Kind, mode: u32) -> String {
    let mut s = String::with_capacity(10);
    s.push(kind.letter());
    for (shift, special, ch) in [(6, 0o4000, 's'), (3, 0o2000, 's'), (0, 0o1000, 't')] {
        let bits = mode >> shift & 7;
        s.push(if bits & 4 != 0 { 'r' } else { '-' });
        s.push(if bits & 2 != 0 { 'w' } else { '-' });
        s.push(match (bits & 1 != 0, mode & special != 0) {
            (true, true) => ch,
            (false, true) => ch.to_ascii_uppercase(),
            (true, false) => 'x',
            (false, false) => '-',
        });
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mode_strings() {
        assert_eq!(mode_string(Kind::Dir, 0o755), "drwxr-xr-x");
        assert_eq!(mode_string(Kind::File, 0o4644), "-rwSr--r--");
        assert_eq!(mode_string(Kind::Dir, 0o1777), "drwxrwxrwt");
    }
}
