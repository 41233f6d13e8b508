//! A repository in a local directory: the embedded default.
//!
//! Objects are files named like the object. A write goes to a hidden temp
//! file that is fsynced and then hard-linked into place: the link is atomic
//! and fails if the name exists, so a crash leaves either the whole object or
//! only a hidden temp file (ignored by listings), and nothing is overwritten.

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use super::{Backend, BackendError, ObjectInfo};

#[derive(Debug)]
pub struct LocalBackend {
    root: PathBuf,
}

impl LocalBackend {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        LocalBackend { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, name: &str) -> Result<PathBuf, BackendError> {
        // Names are ours (hex ids and fixed prefixes); refuse anything that
        // could climb out of the repository.
        if name.is_empty()
            || name.starts_with('/')
            || name
                .split('/')
                .any(|c| c.is_empty() || c == "." || c == ".." || c.starts_with('.'))
        {
            return Err(BackendError::Other(format!("invalid object name {name:?}")));
        }
        Ok(self.root.join(name))
    }

    fn io(&self, op: &'static str, name: &str, source: std::io::Error) -> BackendError {
        if source.kind() == std::io::ErrorKind::NotFound && op != "create" {
            return BackendError::NotFound(name.to_string());
        }
        BackendError::Io {
            op,
            name: name.to_string(),
            location: self.location(),
            source,
        }
    }
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

impl Backend for LocalBackend {
    fn location(&self) -> String {
        self.root.display().to_string()
    }

    fn put(&self, name: &str, data: &[u8]) -> Result<(), BackendError> {
        let path = self.path(name)?;
        let dir = path.parent().unwrap_or(&self.root).to_path_buf();
        if !dir.exists() {
            fs::create_dir_all(&dir).map_err(|e| self.io("create", name, e))?;
            if let Some(p) = dir.parent() {
                let _ = sync_dir(p);
            }
        }
        let tmp = dir.join(format!(".tmp-{}", crate::format::id::Id::random().short()));
        let write = || -> std::io::Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(data)?;
            f.sync_all()?;
            Ok(())
        };
        if let Err(e) = write() {
            let _ = fs::remove_file(&tmp);
            return Err(self.io("create", name, e));
        }
        let linked = fs::hard_link(&tmp, &path);
        let _ = fs::remove_file(&tmp);
        match linked {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(BackendError::AlreadyExists(name.to_string()))
            }
            Err(e) => return Err(self.io("create", name, e)),
        }
        sync_dir(&dir).map_err(|e| self.io("create", name, e))
    }

    fn get(&self, name: &str) -> Result<Vec<u8>, BackendError> {
        fs::read(self.path(name)?).map_err(|e| self.io("read", name, e))
    }

    fn get_range_into(
        &self,
        name: &str,
        offset: u64,
        len: u64,
        buf: &mut Vec<u8>,
    ) -> Result<(), BackendError> {
        buf.clear();
        let mut read = || -> std::io::Result<()> {
            let mut f = File::open(self.path(name).map_err(std::io::Error::other)?)?;
            f.seek(SeekFrom::Start(offset))?;
            buf.reserve(len as usize);
            f.take(len).read_to_end(buf)?;
            Ok(())
        };
        read().map_err(|e| self.io("read", name, e))
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, BackendError> {
        let mut out = Vec::new();
        let mut stack = vec![self.root.clone()];
        while let Some(dir) = stack.pop() {
            let rd = match fs::read_dir(&dir) {
                Ok(rd) => rd,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(self.io("list", prefix, e)),
            };
            for entry in rd {
                let entry = entry.map_err(|e| self.io("list", prefix, e))?;
                let fname = entry.file_name();
                let fname = fname.to_string_lossy();
                if fname.starts_with('.') {
                    continue; // temp files of writes in flight or killed
                }
                let path = entry.path();
                // Walked from below `root`, so the prefix always strips.
                let rel = path
                    .strip_prefix(&self.root)
                    .map(|p| p.to_string_lossy().replace('\\', "/"))
                    .unwrap_or_default();
                let ft = entry.file_type().map_err(|e| self.io("list", prefix, e))?;
                if ft.is_dir() {
                    // Descend only into directories that can hold matches.
                    let d = format!("{rel}/");
                    if d.starts_with(prefix) || prefix.starts_with(&d) {
                        stack.push(path);
                    }
                } else if rel.starts_with(prefix) {
                    let size = entry
                        .metadata()
                        .map_err(|e| self.io("list", prefix, e))?
                        .len();
                    out.push(ObjectInfo { name: rel, size });
                }
            }
        }
        Ok(out)
    }

    fn delete(&self, name: &str) -> Result<(), BackendError> {
        fs::remove_file(self.path(name)?).map_err(|e| self.io("delete", name, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_get_list_no_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let b = LocalBackend::new(dir.path());
        b.put("data/ab/abcd", b"hello").unwrap();
        b.put("index/x1", b"i").unwrap();
        assert!(matches!(
            b.put("data/ab/abcd", b"other"),
            Err(BackendError::AlreadyExists(_))
        ));
        assert_eq!(b.get("data/ab/abcd").unwrap(), b"hello");
        assert_eq!(b.get_range("data/ab/abcd", 1, 3).unwrap(), b"ell");
        assert_eq!(b.get_range("data/ab/abcd", 3, 100).unwrap(), b"lo");
        let mut l = b.list("data/").unwrap();
        l.sort_by(|a, b| a.name.cmp(&b.name));
        assert_eq!(
            l,
            vec![ObjectInfo {
                name: "data/ab/abcd".into(),
                size: 5
            }]
        );
        assert!(matches!(b.get("nope"), Err(BackendError::NotFound(_))));
        assert!(b.get("../etc/passwd").is_err());
        std::fs::write(dir.path().join("index/.tmp-zz"), b"partial").unwrap();
        assert_eq!(b.list("index/").unwrap().len(), 1);
        b.delete("index/x1").unwrap();
        assert!(!b.exists("index/x1").unwrap());
    }
}
