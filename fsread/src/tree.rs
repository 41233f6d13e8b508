//! The listing model: a tree of entries, each with a type, size, mode,
//! owner and mtime. Filesystems implement [`Tree`]; so can any other source
//! of files (a file-archive snapshot), and the commands that list, find and
//! extract work on the trait alone.

use crate::error::{Error, Result};

/// What an entry is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    CharDevice,
    BlockDevice,
    Fifo,
    Socket,
}

impl Kind {
    /// From the `S_IFMT` bits of a POSIX mode.
    pub fn from_mode(mode: u32) -> Option<Kind> {
        Some(match mode & 0o170000 {
            0o100000 => Kind::File,
            0o040000 => Kind::Dir,
            0o120000 => Kind::Symlink,
            0o020000 => Kind::CharDevice,
            0o060000 => Kind::BlockDevice,
            0o010000 => Kind::Fifo,
            0o140000 => Kind::Socket,
            _ => return None,
        })
    }

    /// The word scripts see (`--json`).
    pub fn name(self) -> &'static str {
        match self {
            Kind::File => "file",
            Kind::Dir => "dir",
            Kind::Symlink => "symlink",
            Kind::CharDevice => "char",
            Kind::BlockDevice => "block",
            Kind::Fifo => "fifo",
            Kind::Socket => "socket",
        }
    }

    /// The letter `ls -l` shows.
    pub fn letter(self) -> char {
        match self {
            Kind::File => '-',
            Kind::Dir => 'd',
            Kind::Symlink => 'l',
            Kind::CharDevice => 'c',
            Kind::BlockDevice => 'b',
            Kind::Fifo => 'p',
            Kind::Socket => 's',
        }
    }
}

/// A point in time: seconds since the Unix epoch and nanoseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Time {
    pub secs: i64,
    pub nsec: u32,
}

/// What a listing shows of an entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Meta {
    pub kind: Kind,
    /// Bytes of content (a symlink: its target's length).
    pub size: u64,
    /// Permission bits (`0o7777`).
    pub mode: u32,
    /// Owner and group ids; `None` where the filesystem has none (FAT, NTFS).
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub mtime: Option<Time>,
    /// Names this entry has (hard links).
    pub nlink: u32,
}

/// An entry as its tree knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    /// Identity within the tree: two names with the same id and
    /// `nlink > 1` are hard links of one file.
    pub id: u64,
    /// Where the tree finds the entry's data (an inode number, a first
    /// cluster); only the tree that made it reads it.
    pub handle: u64,
    pub meta: Meta,
}

/// A named entry of a directory.
#[derive(Clone, Debug)]
pub struct Entry {
    /// The name as stored (trees drop `.` and `..`; whoever makes a path
    /// of it checks [`valid_name`] first: a hostile image may hold `/`).
    pub name: Vec<u8>,
    pub node: Node,
}

/// A read-only tree of files.
///
/// Implementations bound their work: a damaged or hostile source ends in
/// an [`Error`], never a panic or an endless loop.
pub trait Tree: Send + Sync {
    /// The type of tree, for listings (`ext4`, `xfs`, ...).
    fn kind(&self) -> &'static str;
    fn root(&self) -> Result<Node>;
    /// The entries of directory `dir`, in the order stored.
    fn list(&self, dir: &Node) -> Result<Vec<Entry>>;
    /// Reads file content from `offset` into `buf`; the bytes read (0 at
    /// the end). Holes read as zeros.
    fn read(&self, file: &Node, offset: u64, buf: &mut [u8]) -> Result<usize>;
    /// A symlink's target, as stored.
    fn read_link(&self, link: &Node) -> Result<Vec<u8>>;
}

/// Longest symlink target any reader returns.
pub const LINK_MAX: u64 = 64 << 10;

/// Follows `path` (`/`-separated, relative to `from`) without following
/// symlinks; the node it names.
pub fn lookup(tree: &dyn Tree, from: Node, path: &str) -> Result<Node> {
    let mut node = from;
    let mut walked = String::new();
    for part in path.split('/').filter(|p| !p.is_empty() && *p != ".") {
        if node.meta.kind != Kind::Dir {
            return Err(Error::NotDir(walked));
        }
        if !walked.is_empty() {
            walked.push('/');
        }
        walked.push_str(part);
        node = tree
            .list(&node)?
            .into_iter()
            .find(|e| e.name == part.as_bytes())
            .map(|e| e.node)
            .ok_or_else(|| Error::NotFound(walked.clone()))?;
    }
    Ok(node)
}

/// Whether a name read from a filesystem can be used as one path component.
pub fn valid_name(name: &[u8]) -> bool {
    !name.is_empty() && name != b"." && name != b".." && !name.contains(&b'/') && !name.contains(&0)
}
