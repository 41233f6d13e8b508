//! A tree of files ([`fsread::Tree`]: a file snapshot's catalog) as a
//! read-only FUSE file system: `bulwark mount` of a file snapshot shows
//! the files themselves, with their modes, owners and times.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use fsread::{Kind, Node, Tree};
use fuser::{
    FileAttr, FileType, Filesystem, ReplyAttr, ReplyData, ReplyDirectory, ReplyEntry, ReplyOpen,
    Request,
};

const TTL: Duration = Duration::from_secs(3600);
const ROOT: u64 = 1;

pub struct TreeFs {
    tree: Arc<dyn Tree>,
    /// Nodes by FUSE inode (the tree's handle + 2; the root is 1), as
    /// lookups and listings meet them.
    nodes: HashMap<u64, Node>,
    root_handle: u64,
}

impl TreeFs {
    pub fn new(tree: Arc<dyn Tree>) -> fsread::Result<Self> {
        let root = tree.root()?;
        let root_handle = root.handle;
        Ok(TreeFs {
            tree,
            nodes: HashMap::from([(ROOT, root)]),
            root_handle,
        })
    }

    fn ino(&self, n: &Node) -> u64 {
        if n.handle == self.root_handle {
            ROOT
        } else {
            n.handle.wrapping_add(2)
        }
    }

    fn attr(&self, ino: u64, n: &Node) -> FileAttr {
        let m = &n.meta;
        let t = m.mtime.map_or(UNIX_EPOCH, |t| {
            if t.secs >= 0 {
                UNIX_EPOCH + Duration::new(t.secs as u64, t.nsec)
            } else {
                UNIX_EPOCH - Duration::from_secs(t.secs.unsigned_abs())
            }
        });
        FileAttr {
            ino,
            size: m.size,
            blocks: m.size.div_ceil(512),
            atime: t,
            mtime: t,
            ctime: t,
            crtime: t,
            kind: file_type(m.kind),
            perm: (m.mode & 0o7777) as u16,
            nlink: m.nlink.max(1),
            uid: m.uid.unwrap_or(0),
            gid: m.gid.unwrap_or(0),
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }
}

fn file_type(k: Kind) -> FileType {
    match k {
        Kind::File => FileType::RegularFile,
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
        Kind::CharDevice => FileType::CharDevice,
        Kind::BlockDevice => FileType::BlockDevice,
        Kind::Fifo => FileType::NamedPipe,
        Kind::Socket => FileType::Socket,
    }
}

impl Filesystem for TreeFs {
    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        let Some(dir) = self.nodes.get(&parent).cloned() else {
            return reply.error(libc::ENOENT);
        };
        match self.tree.list(&dir) {
            Ok(list) => match list.into_iter().find(|e| e.name == name.as_bytes()) {
                Some(e) => {
                    let ino = self.ino(&e.node);
                    let a = self.attr(ino, &e.node);
                    self.nodes.insert(ino, e.node);
                    reply.entry(&TTL, &a, 0)
                }
                None => reply.error(libc::ENOENT),
            },
            Err(e) => {
                tracing::error!("listing: {e}");
                reply.error(libc::EIO)
            }
        }
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        match self.nodes.get(&ino) {
            Some(n) => reply.attr(&TTL, &self.attr(ino, n)),
            None => reply.error(libc::ENOENT),
        }
    }

    fn readlink(&mut self, _req: &Request<'_>, ino: u64, reply: ReplyData) {
        match self.nodes.get(&ino).map(|n| self.tree.read_link(n)) {
            Some(Ok(t)) => reply.data(&t),
            Some(Err(_)) => reply.error(libc::EIO),
            None => reply.error(libc::ENOENT),
        }
    }

    fn open(&mut self, _req: &Request<'_>, ino: u64, flags: i32, reply: ReplyOpen) {
        if flags & libc::O_ACCMODE != libc::O_RDONLY {
            reply.error(libc::EROFS);
        } else if self.nodes.contains_key(&ino) {
            reply.opened(0, 0);
        } else {
            reply.error(libc::ENOENT);
        }
    }

    fn read(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyData,
    ) {
        let (Some(n), Ok(offset)) = (self.nodes.get(&ino), u64::try_from(offset)) else {
            return reply.error(libc::EINVAL);
        };
        let mut buf = vec![0u8; size as usize];
        match self.tree.read(n, offset, &mut buf) {
            Ok(len) => reply.data(&buf[..len]),
            Err(e) => {
                tracing::error!("read at {offset}: {e}");
                reply.error(libc::EIO)
            }
        }
    }

    fn readdir(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        mut reply: ReplyDirectory,
    ) {
        let Some(dir) = self.nodes.get(&ino).cloned() else {
            return reply.error(libc::ENOENT);
        };
        let list = match self.tree.list(&dir) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("listing: {e}");
                return reply.error(libc::EIO);
            }
        };
        let mut entries = vec![
            (ino, FileType::Directory, b".".to_vec()),
            (ino, FileType::Directory, b"..".to_vec()),
        ];
        for e in list {
            let i = self.ino(&e.node);
            entries.push((i, file_type(e.node.meta.kind), e.name));
            self.nodes.insert(i, e.node);
        }
        for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset.max(0) as usize) {
            if reply.add(ino, (i + 1) as i64, kind, OsStr::from_bytes(&name)) {
                break;
            }
        }
        reply.ok();
    }
}

/// Mounts `fs` (blocks until unmounted).
pub fn serve(fs: TreeFs, dir: &std::path::Path, name: String) -> std::io::Result<()> {
    let opts = [
        fuser::MountOption::RO,
        fuser::MountOption::FSName(name),
        fuser::MountOption::Subtype("bulwark".into()),
        fuser::MountOption::DefaultPermissions,
    ];
    fuser::mount2(fs, dir, &opts)
}
