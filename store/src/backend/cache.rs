//! A local cache in front of a remote backend (S3).
//!
//! Every repository object is immutable (written once under a fresh name,
//! never overwritten), so caching by name is safe:
//!
//! * metadata objects (`index/`, `snapshots/`, `chunklists/`, `keys/`) are
//!   kept whole, written through on `put` and filled on `get`: a backup or a
//!   `snapshots` listing does not download them again. Listing still asks
//!   the bucket what exists, and cached names the bucket no longer lists are
//!   evicted (a prune on another host deleted them);
//! * ranges of packs (`data/`) fetched with `get_range` (the demand reads
//!   of NBD exports, FUSE mounts, live restores) are kept as files up to a
//!   size bound, least recently used out first; a later read of the same
//!   range, or of any range inside a cached one, is served locally. What is
//!   read once (`get_range_once`: full restores, and the read-ahead of a
//!   sequential stream) is served from the cache when there, never added. Whole-pack `get`s (verify) always go to the bucket: verify
//!   is about what the bucket holds.
//!
//! The cache lives in `DIR/<repository id>`; the id is read from the
//! repository's `config` the first time it is fetched, so a bucket that is
//! wiped and initialised again gets a fresh cache. Cached bytes are never
//! trusted more than the bucket's: every object is still authenticated by
//! the repository's AES-GCM when it is opened. Cache write failures are
//! logged and ignored (the cache is an optimisation, never a dependency).

use crate::format::layout;
use std::collections::HashMap;
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::{Backend, BackendError, ObjectInfo};

const META_PREFIXES: [&str; 4] = layout::METADATA;
const RANGES: &str = "ranges";

#[derive(Clone, Debug)]
pub struct CacheOptions {
    /// Base directory; the repository id is appended.
    pub dir: PathBuf,
    /// Bound on cached pack ranges, in bytes (metadata is not counted: it
    /// is small next to the data, and a backup needs all of it).
    pub max_range_bytes: u64,
}

impl CacheOptions {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        CacheOptions {
            dir: dir.into(),
            max_range_bytes: 2 << 30,
        }
    }
}

#[derive(Debug)]
struct RangeEntry {
    offset: u64,
    len: u64,
    used: u64,
}

#[derive(Debug, Default)]
struct Ranges {
    by_object: HashMap<String, Vec<RangeEntry>>,
    total: u64,
    clock: u64,
}

#[derive(Debug)]
pub struct CachedBackend {
    inner: Arc<dyn Backend>,
    opts: CacheOptions,
    root: Mutex<Option<PathBuf>>,
    ranges: Mutex<Ranges>,
}

fn is_meta(name: &str) -> bool {
    META_PREFIXES.iter().any(|p| name.starts_with(p))
}

/// `data/ab/abcd...` -> `abcd...`: the flat directory name of a pack.
fn pack_dir(name: &str) -> Option<&str> {
    let rest = name.strip_prefix(layout::DATA)?;
    let leaf = rest.rsplit('/').next()?;
    (!leaf.is_empty() && leaf.chars().all(|c| c.is_ascii_alphanumeric())).then_some(leaf)
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != ".." && !c.starts_with('.'))
}

/// Writes `data` to `path` via a temp file and rename: a reader sees all
/// of it or nothing.
fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().expect("cache paths have a parent");
    fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".tmp-{}", crate::format::id::Id::random().short()));
    let r = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(data)?;
        fs::rename(&tmp, path)
    })();
    if r.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    r
}

impl CachedBackend {
    pub fn new(inner: Arc<dyn Backend>, opts: CacheOptions) -> Self {
        CachedBackend {
            inner,
            opts,
            root: Mutex::new(None),
            ranges: Mutex::new(Ranges::default()),
        }
    }

    /// The cache directory of this repository, once known.
    pub fn dir(&self) -> Option<PathBuf> {
        self.root.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set_root_from_config(&self, config: &[u8]) {
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(config) else {
            return;
        };
        let Some(id) = v.get("id").and_then(|i| i.as_str()) else {
            return;
        };
        if !id.chars().all(|c| c.is_ascii_hexdigit()) || id.is_empty() {
            return;
        }
        let mut root = self.root.lock().unwrap_or_else(|e| e.into_inner());
        if root.is_some() {
            return;
        }
        let dir = self.opts.dir.join(id);
        if let Err(e) = fs::create_dir_all(&dir) {
            tracing::warn!("cache directory {}: {e}; not caching", dir.display());
            return;
        }
        self.load_ranges(&dir);
        *root = Some(dir);
    }

    /// The cache root, learning the repository id first if needed.
    fn root(&self) -> Option<PathBuf> {
        if let Some(r) = self.dir() {
            return Some(r);
        }
        if let Ok(cfg) = self.inner.get(layout::CONFIG) {
            self.set_root_from_config(&cfg);
        }
        self.dir()
    }

    fn load_ranges(&self, root: &Path) {
        let mut r = self.ranges.lock().unwrap_or_else(|e| e.into_inner());
        let Ok(packs) = fs::read_dir(root.join(RANGES)) else {
            return;
        };
        let mut found: Vec<(std::time::SystemTime, String, u64, u64)> = Vec::new();
        for p in packs.flatten() {
            let pack = p.file_name().to_string_lossy().into_owned();
            let Ok(files) = fs::read_dir(p.path()) else {
                continue;
            };
            for f in files.flatten() {
                let fname = f.file_name().to_string_lossy().into_owned();
                let parsed = fname
                    .split_once('-')
                    .and_then(|(a, b)| Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?)));
                let Some((offset, len)) = parsed else {
                    let _ = fs::remove_file(f.path()); // temp files of a killed run
                    continue;
                };
                let mtime = f
                    .metadata()
                    .and_then(|m| m.modified())
                    .unwrap_or(std::time::UNIX_EPOCH);
                found.push((mtime, pack.clone(), offset, len));
            }
        }
        found.sort();
        for (_, pack, offset, len) in found {
            r.clock += 1;
            let used = r.clock;
            r.total += len;
            r.by_object
                .entry(pack)
                .or_default()
                .push(RangeEntry { offset, len, used });
        }
    }

    fn range_path(root: &Path, pack: &str, offset: u64, len: u64) -> PathBuf {
        root.join(RANGES).join(pack).join(format!("{offset}-{len}"))
    }

    /// A pack range from the cache, else from the bucket, and then cached
    /// if `keep`.
    fn read_range(
        &self,
        name: &str,
        offset: u64,
        len: u64,
        buf: &mut Vec<u8>,
        keep: bool,
    ) -> Result<(), BackendError> {
        let (Some(pack), Some(root)) = (pack_dir(name), self.root()) else {
            return self.inner.get_range_into(name, offset, len, buf);
        };
        if self.cached_range(&root, pack, offset, len, buf).is_some() {
            return Ok(());
        }
        self.inner.get_range_into(name, offset, len, buf)?;
        if keep && buf.len() as u64 == len {
            self.store_range(&root, pack, offset, buf);
        }
        Ok(())
    }

    /// Reads a cached range into `buf`; `None` if it is not cached (or its
    /// file is unreadable, which also forgets it).
    fn cached_range(
        &self,
        root: &Path,
        pack: &str,
        offset: u64,
        len: u64,
        buf: &mut Vec<u8>,
    ) -> Option<()> {
        let (eo, el) = {
            let mut r = self.ranges.lock().unwrap_or_else(|e| e.into_inner());
            r.clock += 1;
            let clock = r.clock;
            let e = r
                .by_object
                .get_mut(pack)?
                .iter_mut()
                .find(|e| e.offset <= offset && e.offset + e.len >= offset + len)?;
            e.used = clock;
            (e.offset, e.len)
        };
        let path = Self::range_path(root, pack, eo, el);
        let f = File::open(&path).ok()?;
        buf.clear();
        buf.resize(len as usize, 0);
        if f.read_exact_at(buf, offset - eo).is_err() {
            self.forget_range(root, pack, eo, el);
            return None;
        }
        let _ = f.set_modified(std::time::SystemTime::now());
        Some(())
    }

    fn forget_range(&self, root: &Path, pack: &str, offset: u64, len: u64) {
        let mut r = self.ranges.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(v) = r.by_object.get_mut(pack) {
            let before = v.len();
            v.retain(|e| !(e.offset == offset && e.len == len));
            if v.len() < before {
                r.total = r.total.saturating_sub(len);
            }
        }
        let _ = fs::remove_file(Self::range_path(root, pack, offset, len));
    }

    fn store_range(&self, root: &Path, pack: &str, offset: u64, data: &[u8]) {
        let len = data.len() as u64;
        if len == 0 || len > self.opts.max_range_bytes {
            return;
        }
        let path = Self::range_path(root, pack, offset, len);
        if let Err(e) = write_atomic(&path, data) {
            tracing::warn!("cache write {}: {e}", path.display());
            return;
        }
        let mut evict = Vec::new();
        {
            let mut r = self.ranges.lock().unwrap_or_else(|e| e.into_inner());
            r.clock += 1;
            let used = r.clock;
            let v = r.by_object.entry(pack.to_string()).or_default();
            if v.iter().any(|e| e.offset == offset && e.len == len) {
                return; // another thread stored the same range
            }
            v.push(RangeEntry { offset, len, used });
            r.total += len;
            if r.total > self.opts.max_range_bytes {
                // Evict least recently used down to 90% of the bound.
                let target = self.opts.max_range_bytes / 10 * 9;
                let mut all: Vec<(u64, String, u64, u64)> = r
                    .by_object
                    .iter()
                    .flat_map(|(p, v)| v.iter().map(|e| (e.used, p.clone(), e.offset, e.len)))
                    .collect();
                all.sort();
                let mut total = r.total;
                for (_, p, o, l) in all {
                    if total <= target {
                        break;
                    }
                    total -= l;
                    evict.push((p, o, l));
                }
            }
        }
        for (p, o, l) in evict {
            self.forget_range(root, &p, o, l);
        }
    }

    fn meta_path(root: &Path, name: &str) -> Option<PathBuf> {
        (is_meta(name) && valid_name(name)).then(|| root.join(name))
    }

    /// Drops cached metadata under `prefix` that the bucket no longer has.
    fn evict_unlisted(&self, root: &Path, prefix: &str, listed: &[ObjectInfo]) {
        let names: std::collections::HashSet<&str> =
            listed.iter().map(|o| o.name.as_str()).collect();
        for p in META_PREFIXES {
            if !p.starts_with(prefix) {
                continue; // a narrower listing says nothing about the rest
            }
            let dir = root.join(p.trim_end_matches('/'));
            let Ok(rd) = fs::read_dir(&dir) else { continue };
            for e in rd.flatten() {
                let fname = e.file_name().to_string_lossy().into_owned();
                let name = format!("{p}{fname}");
                if !names.contains(name.as_str()) {
                    tracing::debug!("cache: evicting {name} (gone from the bucket)");
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        if layout::DATA.starts_with(prefix) {
            let packs: std::collections::HashSet<&str> =
                listed.iter().filter_map(|o| pack_dir(&o.name)).collect();
            let gone: Vec<(String, u64, u64)> = {
                let r = self.ranges.lock().unwrap_or_else(|e| e.into_inner());
                r.by_object
                    .iter()
                    .filter(|(p, _)| !packs.contains(p.as_str()))
                    .flat_map(|(p, v)| v.iter().map(|e| (p.clone(), e.offset, e.len)))
                    .collect()
            };
            for (p, o, l) in gone {
                self.forget_range(root, &p, o, l);
            }
        }
    }
}

impl Backend for CachedBackend {
    fn location(&self) -> String {
        self.inner.location()
    }

    fn put(&self, name: &str, data: &[u8]) -> Result<(), BackendError> {
        self.inner.put(name, data)?;
        if let Some(path) = self.root().and_then(|r| Self::meta_path(&r, name)) {
            if let Err(e) = write_atomic(&path, data) {
                tracing::warn!("cache write {}: {e}", path.display());
            }
        }
        Ok(())
    }

    fn put_owned(&self, name: &str, data: Vec<u8>) -> Result<(), BackendError> {
        match self.root().and_then(|r| Self::meta_path(&r, name)) {
            Some(_) => self.put(name, &data),
            None => self.inner.put_owned(name, data),
        }
    }

    fn get(&self, name: &str) -> Result<Vec<u8>, BackendError> {
        if name == layout::CONFIG {
            let cfg = self.inner.get(name)?;
            self.set_root_from_config(&cfg);
            return Ok(cfg);
        }
        let Some(path) = (if is_meta(name) { self.root() } else { None })
            .and_then(|r| Self::meta_path(&r, name))
        else {
            return self.inner.get(name);
        };
        if let Ok(data) = fs::read(&path) {
            return Ok(data);
        }
        let data = self.inner.get(name)?;
        if let Err(e) = write_atomic(&path, &data) {
            tracing::warn!("cache write {}: {e}", path.display());
        }
        Ok(data)
    }

    fn get_range_into(
        &self,
        name: &str,
        offset: u64,
        len: u64,
        buf: &mut Vec<u8>,
    ) -> Result<(), BackendError> {
        self.read_range(name, offset, len, buf, true)
    }

    fn get_range_once(
        &self,
        name: &str,
        offset: u64,
        len: u64,
        buf: &mut Vec<u8>,
    ) -> Result<(), BackendError> {
        self.read_range(name, offset, len, buf, false)
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, BackendError> {
        let listed = self.inner.list(prefix)?;
        if let Some(root) = self.dir() {
            self.evict_unlisted(&root, prefix, &listed);
        }
        Ok(listed)
    }

    fn delete(&self, name: &str) -> Result<(), BackendError> {
        let r = self.inner.delete(name);
        if let Some(root) = self.dir() {
            if let Some(path) = Self::meta_path(&root, name) {
                let _ = fs::remove_file(path);
            }
            if let Some(pack) = pack_dir(name) {
                let entries: Vec<(u64, u64)> = self
                    .ranges
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .by_object
                    .get(pack)
                    .map(|v| v.iter().map(|e| (e.offset, e.len)).collect())
                    .unwrap_or_default();
                for (o, l) in entries {
                    self.forget_range(&root, pack, o, l);
                }
            }
        }
        r
    }

    fn exists(&self, name: &str) -> Result<bool, BackendError> {
        self.inner.exists(name)
    }

    fn upload_concurrency(&self) -> usize {
        self.inner.upload_concurrency()
    }

    fn read_concurrency(&self) -> usize {
        self.inner.read_concurrency()
    }

    fn object_lock(&self) -> Option<&dyn super::ObjectLock> {
        self.inner.object_lock()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::LocalBackend;

    #[test]
    fn caches_metadata_and_ranges_and_evicts_deleted() {
        let remote = tempfile::tempdir().unwrap();
        let cache = tempfile::tempdir().unwrap();
        let inner: Arc<dyn Backend> = Arc::new(LocalBackend::new(remote.path()));
        inner.put("config", br#"{"id":"00ab"}"#).unwrap();
        inner.put("index/aa", b"index one").unwrap();
        let pack: Vec<u8> = (0..100u8).collect();
        inner.put("data/bb/bbcc", &pack).unwrap();
        let c = CachedBackend::new(inner.clone(), CacheOptions::new(cache.path()));
        c.get("config").unwrap();
        let root = cache.path().join("00ab");
        assert_eq!(c.dir().unwrap(), root);
        assert_eq!(c.get("index/aa").unwrap(), b"index one");
        assert!(root.join("index/aa").exists());
        assert_eq!(c.get_range("data/bb/bbcc", 10, 20).unwrap(), &pack[10..30]);
        // A read-once range is served from the cache when there, and never
        // added to it.
        let mut buf = b"stale".to_vec();
        c.get_range_once("data/bb/bbcc", 12, 4, &mut buf).unwrap();
        assert_eq!(buf, &pack[12..16]);
        c.get_range_once("data/bb/bbcc", 50, 10, &mut buf).unwrap();
        assert_eq!(buf, &pack[50..60]);
        assert_eq!(
            c.ranges.lock().unwrap().total,
            20,
            "only the first range is cached"
        );
        // Gone from the remote: still served from the cache.
        fs::remove_file(remote.path().join("index/aa")).unwrap();
        fs::remove_file(remote.path().join("data/bb/bbcc")).unwrap();
        assert_eq!(c.get("index/aa").unwrap(), b"index one");
        assert_eq!(c.get_range("data/bb/bbcc", 15, 5).unwrap(), &pack[15..20]);
        // A listing that no longer names them evicts them.
        assert!(c.list("index/").unwrap().is_empty());
        assert!(c.get("index/aa").is_err());
        assert!(c.list("data/").unwrap().is_empty());
        assert!(c.get_range("data/bb/bbcc", 15, 5).is_err());
        // Written through.
        c.put("snapshots/cc", b"snap").unwrap();
        assert_eq!(fs::read(root.join("snapshots/cc")).unwrap(), b"snap");
    }

    #[test]
    fn range_cache_is_bounded() {
        let remote = tempfile::tempdir().unwrap();
        let cache = tempfile::tempdir().unwrap();
        let inner: Arc<dyn Backend> = Arc::new(LocalBackend::new(remote.path()));
        inner.put("config", br#"{"id":"01"}"#).unwrap();
        inner.put("data/dd/dd01", &[7u8; 1000]).unwrap();
        let mut o = CacheOptions::new(cache.path());
        o.max_range_bytes = 250;
        let c = CachedBackend::new(inner, o);
        for i in 0..10 {
            c.get_range("data/dd/dd01", i * 100, 100).unwrap();
        }
        let r = c.ranges.lock().unwrap();
        assert!(r.total <= 250, "{}", r.total);
        // The most recent one is kept.
        assert!(r.by_object["dd01"].iter().any(|e| e.offset == 900));
    }
}
