//! State files: one serde value as JSON in one file, the one way every
//! record of the agent and the commands is kept (checkpoints per domain,
//! live restores, the schedule, the notifier, the outbox).
//!
//! The rules, stated once: a save goes to a temp file in the same
//! directory, is synced and renamed over the file (then the directory is
//! synced), so a crash leaves the old or the new value, never half of one;
//! a change by more than one process (the agent and a command) happens
//! under [`StateFile::lock`], a `flock` on a `.lock` file beside it (`x.json`
//! is locked by `x.lock`), held from load to save.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::marker::PhantomData;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The file holding one `T`.
#[derive(Debug)]
pub struct StateFile<T> {
    path: PathBuf,
    _value: PhantomData<fn() -> T>,
}

impl<T> Clone for StateFile<T> {
    fn clone(&self) -> Self {
        StateFile {
            path: self.path.clone(),
            _value: PhantomData,
        }
    }
}

/// An exclusive lock on a state file, released when dropped.
pub struct Lock {
    _file: File,
}

impl<T: Serialize + DeserializeOwned> StateFile<T> {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        StateFile {
            path: path.into(),
            _value: PhantomData,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn exists(&self) -> bool {
        self.path.exists()
    }

    /// The value, or `None` when there is no file.
    pub fn load(&self) -> Result<Option<T>, Error> {
        match std::fs::read(&self.path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|source| Error::Json {
                    path: self.path.clone(),
                    source,
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&self.path)(e)),
        }
    }

    /// Writes `value` atomically (see the module docs), creating the
    /// directory if needed.
    pub fn save(&self, value: &T) -> Result<(), Error> {
        let json = serde_json::to_vec_pretty(value).map_err(|source| Error::Json {
            path: self.path.clone(),
            source,
        })?;
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(io(dir))?;
        }
        write_atomic(&self.path, &json)
    }

    /// Blocks until no other holder of this file's lock is left.
    pub fn lock(&self) -> Result<Lock, Error> {
        let p = self.path.with_extension("lock");
        if let Some(dir) = p.parent() {
            std::fs::create_dir_all(dir).map_err(io(dir))?;
        }
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)
            .map_err(io(&p))?;
        // SAFETY: flock on a descriptor we own; released when it closes.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(io(&p)(std::io::Error::last_os_error()));
        }
        Ok(Lock { _file: f })
    }

    /// Loads, changes and saves the value under the lock; the value saved.
    /// `None` from a missing file is an error of `missing`'s making.
    pub fn update(
        &self,
        missing: impl FnOnce() -> Error,
        f: impl FnOnce(&mut T),
    ) -> Result<T, Error> {
        let _lock = self.lock()?;
        let mut v = self.load()?.ok_or_else(missing)?;
        f(&mut v);
        self.save(&v)?;
        Ok(v)
    }
}

/// Writes `data` to a temp file in `path`'s directory, syncs it and renames
/// it over `path`, then syncs the directory: a crash leaves the old or the
/// new file and never half of one.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), Error> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".tmp-")
        .tempfile_in(dir)
        .map_err(io(dir))?;
    tmp.write_all(data).map_err(io(tmp.path()))?;
    tmp.as_file().sync_all().map_err(io(tmp.path()))?;
    tmp.persist(path).map_err(|e| io(path)(e.error))?;
    // The rename is what must last; a directory that cannot be opened for
    // the sync still has it (the sync only hurries it to the disk).
    if let Ok(d) = File::open(dir) {
        if let Err(e) = d.sync_all() {
            tracing::debug!("syncing {}: {e}", dir.display());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Counter {
        n: u32,
    }

    #[test]
    fn saves_atomically_and_loads_back() {
        let d = tempfile::tempdir().unwrap();
        let f: StateFile<Counter> = StateFile::new(d.path().join("sub/c.json"));
        assert_eq!(f.load().unwrap(), None);
        f.save(&Counter { n: 1 }).unwrap();
        f.save(&Counter { n: 2 }).unwrap();
        assert_eq!(f.load().unwrap(), Some(Counter { n: 2 }));
        // No temp file left beside it.
        assert_eq!(std::fs::read_dir(d.path().join("sub")).unwrap().count(), 1);
        std::fs::write(f.path(), b"{not json").unwrap();
        assert!(matches!(f.load(), Err(Error::Json { .. })));
    }

    #[test]
    fn updates_under_the_lock_lose_nothing() {
        let d = tempfile::tempdir().unwrap();
        let f: StateFile<Counter> = StateFile::new(d.path().join("c.json"));
        f.save(&Counter::default()).unwrap();
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..25 {
                        f.update(|| unreachable!(), |c| c.n += 1).unwrap();
                    }
                });
            }
        });
        assert_eq!(f.load().unwrap(), Some(Counter { n: 100 }));
        let missing: StateFile<Counter> = StateFile::new(d.path().join("none.json"));
        let e = missing
            .update(
                || io(Path::new("none"))(std::io::ErrorKind::NotFound.into()),
                |_| {},
            )
            .unwrap_err();
        assert!(e.to_string().contains("none"), "{e}");
    }
}
