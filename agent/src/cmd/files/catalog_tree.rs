//! A file snapshot's catalog as an [`fsread::Tree`]: `bulwark files` lists,
//! finds and copies out of it like out of a VM's filesystem, reading the
//! catalog alone for listings and only the files' chunks for content.

use std::collections::HashMap;
use std::sync::Arc;

use bulwark_store::files::catalog::{Catalog, Entry, Kind};
use bulwark_store::read::reader::DiskReader;
use fsread::{Error, Meta, Node, Result, Time, Tree};

/// The handle of the (synthetic) root: the directory holding the paths
/// backed up.
const ROOT: u64 = u64::MAX;

pub struct CatalogTree {
    entries: Vec<Entry>,
    /// Children (entry positions) of each directory (`ROOT` for the top).
    children: HashMap<u64, Vec<u64>>,
    /// Entry positions by path (hard-link targets).
    by_path: HashMap<Vec<u8>, u64>,
    /// Hard links to each entry (by position), counted once.
    links: HashMap<u64, u32>,
    data: Arc<DiskReader>,
}

/// The tree of file snapshot `snap`, and the reader of its data.
pub fn open(
    repo: Arc<bulwark_store::Repository>,
    snap: &bulwark_store::Snapshot,
    cache_mib: usize,
) -> anyhow::Result<(Arc<dyn Tree>, Arc<DiskReader>)> {
    let loaded = bulwark_store::files::load(&repo, snap)?;
    let data = Arc::new(bulwark_store::read::reader::open_disk(
        repo.clone(),
        snap,
        bulwark_store::files::DATA,
        cache_mib << 20,
    )?);
    let tree: Arc<dyn Tree> = Arc::new(CatalogTree::new(loaded.catalog, data.clone()));
    Ok((tree, data))
}

impl CatalogTree {
    pub fn new(catalog: Catalog, data: Arc<DiskReader>) -> Self {
        let by_path: HashMap<Vec<u8>, u64> = catalog
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| (e.path.clone(), i as u64))
            .collect();
        let mut links: HashMap<u64, u32> = HashMap::new();
        for e in catalog.entries.iter().filter(|e| !e.link.is_empty()) {
            if let Some(&t) = by_path.get(&e.link) {
                *links.entry(t).or_default() += 1;
            }
        }
        let mut children: HashMap<u64, Vec<u64>> = HashMap::new();
        for (i, e) in catalog.entries.iter().enumerate() {
            let parent = match e.parent() {
                [] => ROOT,
                p => match by_path.get(p) {
                    Some(&d) if catalog.entries[d as usize].kind() == Kind::Dir => d,
                    // An entry without its directory is not reachable.
                    _ => continue,
                },
            };
            children.entry(parent).or_default().push(i as u64);
        }
        CatalogTree {
            entries: catalog.entries,
            children,
            by_path,
            links,
            data,
        }
    }

    /// The entry holding `handle`'s content (itself, or a hard link's target).
    fn data_entry(&self, handle: u64) -> Result<&Entry> {
        let e = self
            .entries
            .get(handle as usize)
            .ok_or_else(|| Error::NotFound(format!("entry {handle}")))?;
        if e.link.is_empty() {
            return Ok(e);
        }
        self.by_path
            .get(&e.link)
            .and_then(|&i| self.entries.get(i as usize))
            .filter(|t| t.has_data())
            .ok_or_else(|| Error::NotFound(String::from_utf8_lossy(&e.link).into_owned()))
    }

    fn node(&self, i: u64) -> Result<Node> {
        let e = self.data_entry(i)?;
        // Inode numbers only: a hard link shows its target's.
        let id = self.by_path.get(&e.path).copied().unwrap_or(i);
        let links = self.links.get(&id).copied().unwrap_or(0);
        Ok(Node {
            id: id + 1,
            handle: i,
            meta: Meta {
                kind: kind(e.kind()),
                size: if e.kind() == Kind::Symlink {
                    e.target.len() as u64
                } else {
                    e.size
                },
                mode: e.mode,
                uid: Some(e.uid),
                gid: Some(e.gid),
                mtime: Some(Time {
                    secs: e.mtime.sec,
                    nsec: e.mtime.nsec,
                }),
                nlink: 1 + links,
            },
        })
    }
}

fn kind(k: Kind) -> fsread::Kind {
    match k {
        Kind::File => fsread::Kind::File,
        Kind::Dir => fsread::Kind::Dir,
        Kind::Symlink => fsread::Kind::Symlink,
        Kind::CharDev => fsread::Kind::CharDevice,
        Kind::BlockDev => fsread::Kind::BlockDevice,
        Kind::Fifo => fsread::Kind::Fifo,
    }
}

impl Tree for CatalogTree {
    fn kind(&self) -> &'static str {
        "files"
    }

    fn root(&self) -> Result<Node> {
        Ok(Node {
            id: 0,
            handle: ROOT,
            meta: Meta {
                kind: fsread::Kind::Dir,
                size: 0,
                mode: 0o755,
                uid: Some(0),
                gid: Some(0),
                mtime: None,
                nlink: 1,
            },
        })
    }

    fn list(&self, dir: &Node) -> Result<Vec<fsread::Entry>> {
        let Some(kids) = self.children.get(&dir.handle) else {
            return Ok(Vec::new());
        };
        kids.iter()
            .map(|&i| {
                Ok(fsread::Entry {
                    name: self.entries[i as usize].name().to_vec(),
                    node: self.node(i)?,
                })
            })
            .collect()
    }

    fn read(&self, file: &Node, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let e = self.data_entry(file.handle)?;
        if offset >= e.size {
            return Ok(0);
        }
        let n = (e.size - offset).min(buf.len() as u64) as usize;
        let at = e.offset.checked_add(offset).ok_or_else(|| Error::Corrupt {
            what: "catalog",
            detail: "offset past 2^64".into(),
        })?;
        self.data
            .read_at(at, &mut buf[..n])
            .map_err(|err| Error::Io {
                offset: at,
                len: n,
                source: std::io::Error::other(err.to_string()),
            })?;
        Ok(n)
    }

    fn read_link(&self, link: &Node) -> Result<Vec<u8>> {
        let e = self
            .entries
            .get(link.handle as usize)
            .ok_or_else(|| Error::NotFound(format!("entry {}", link.handle)))?;
        Ok(e.target.clone())
    }
}
