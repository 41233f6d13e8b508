//! An opened repository: config, keys, index, snapshots, chunk reads; and
//! below it, the [`condemned`] records its index loader honours, writers'
//! [`markers`] and the snapshots' [`sync_records`].

pub mod condemned;
pub mod markers;
pub mod reports;
pub mod sync_records;

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::backend::{Backend, BackendError, ObjectInfo};
use crate::error::{Error, Result};
use crate::format::blob::{self, ChunkBuf, Plain};
use crate::format::chunker::{Chunker, ChunkerParams};
use crate::format::chunklist::{self, ChunkList};
use crate::format::crypto::{Keys, MasterKey, Opener};
use crate::format::id::Id;
use crate::format::index::{self, ChunkIndex, DedupIndex, Detail, Index, IndexBuilder, Loc};
use crate::format::keys::{KdfParams, KeySlot, Secret};
use crate::format::snapshot::{self, Snapshot};
use crate::format::{object, pack};

pub const VERSION: u32 = 1;
use crate::format::layout::{self, CONFIG};

/// The repository's public, unencrypted settings. Everything secret (the
/// chunker seed too) derives from the master key.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RepoConfig {
    pub version: u32,
    pub id: Id,
    pub chunker: ChunkerParams,
    /// Target pack size in bytes.
    pub pack_size: u32,
    pub compression_level: i32,
    pub created: chrono::DateTime<chrono::Utc>,
    /// S3 Object Lock: how every object is locked (`crate::maintain::lock`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object_lock: Option<crate::maintain::lock::LockSettings>,
    /// Shared by a repository and its replicas (which share its master key
    /// and chunking); a sync goes only within one family. Absent: the
    /// repository's own id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub family: Option<Id>,
    /// The repository this one was made a replica of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica_of: Option<Id>,
}

impl RepoConfig {
    /// The family of repositories this one belongs to.
    pub fn family(&self) -> Id {
        self.family.unwrap_or(self.id)
    }
}

impl Default for RepoConfig {
    fn default() -> Self {
        RepoConfig {
            version: VERSION,
            id: Id::random(),
            chunker: ChunkerParams::default(),
            pack_size: 16 << 20,
            compression_level: blob::DEFAULT_LEVEL,
            created: chrono::Utc::now(),
            object_lock: None,
            family: None,
            replica_of: None,
        }
    }
}

pub struct Repository {
    backend: Arc<dyn Backend>,
    config: RepoConfig,
    keys: Arc<Keys>,
    chunker: Chunker,
    index: Mutex<Option<Arc<Index>>>,
    /// The last index narrowed to some chunks ([`Repository::index_for`]),
    /// with those chunks, sorted.
    narrowed: Mutex<Option<(Vec<Id>, Arc<Index>)>>,
    /// What [`Repository::open_at`] listed while the key was unlocked, for
    /// the first narrowed index load (a reader's); taken by it, so any
    /// later load lists afresh.
    listed: Mutex<Option<Listed>>,
}

/// The index objects and condemned packs as listed once a snapshot had
/// been found: its index objects were stored before it (`backup.rs`), so
/// the listing holds every one its chunks need. Needs no key.
struct Listed {
    index: Vec<ObjectInfo>,
    condemned: crate::format::id::IdSet,
}

impl Listed {
    /// None if either listing fails: the index load then lists again and
    /// meets the error itself, so nothing is decided from a failure here.
    fn list(backend: &dyn Backend) -> Option<Listed> {
        let (index, condemned) = side_by_side(
            "listing index objects",
            || Ok(backend.list(layout::INDEX)?),
            || condemned::packs(backend, None),
        );
        match (index, condemned) {
            (Ok(index), Ok(condemned)) => Some(Listed { index, condemned }),
            (Err(e), _) | (_, Err(e)) => {
                tracing::debug!("listing the index beside the key: {e}");
                None
            }
        }
    }
}

impl std::fmt::Debug for Repository {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Repository")
            .field("location", &self.backend.location())
            .finish()
    }
}

impl Repository {
    /// Creates a repository with one key slot for `secret`.
    pub fn init(
        backend: Arc<dyn Backend>,
        secret: &Secret,
        kdf: &KdfParams,
        config: RepoConfig,
    ) -> Result<Self> {
        config.chunker.validate().map_err(Error::Invalid)?;
        if backend.exists(CONFIG)? {
            return Err(Error::AlreadyInitialized(backend.location()));
        }
        if config.object_lock.is_some() {
            crate::maintain::lock::check_store(backend.as_ref())?;
        }
        Self::create(backend, secret, kdf, config, MasterKey::generate())
    }

    /// Creates a replica of the repository at `source` at `backend`: the
    /// same master key (so chunks keep their ids and move as they are
    /// stored), chunking and packing, a new id and a key slot of its own
    /// for `secret`, which must open `source`. Its config may lock objects
    /// of its own accord.
    pub fn init_replica(
        backend: Arc<dyn Backend>,
        source: &dyn Backend,
        source_secret: &Secret,
        secret: &Secret,
        kdf: &KdfParams,
        object_lock: Option<crate::maintain::lock::LockSettings>,
    ) -> Result<Self> {
        let src = Self::read_config(source)?;
        let master = Self::unlock(source, source_secret)?;
        if backend.exists(CONFIG)? {
            return Err(Error::AlreadyInitialized(backend.location()));
        }
        if object_lock.is_some() {
            crate::maintain::lock::check_store(backend.as_ref())?;
        }
        let config = RepoConfig {
            id: Id::random(),
            family: Some(src.family()),
            replica_of: Some(src.id),
            object_lock,
            created: chrono::Utc::now(),
            ..src
        };
        Self::create(backend, secret, kdf, config, master)
    }

    fn create(
        backend: Arc<dyn Backend>,
        secret: &Secret,
        kdf: &KdfParams,
        config: RepoConfig,
        master: MasterKey,
    ) -> Result<Self> {
        crate::maintain::lock::apply(backend.as_ref(), config.object_lock.as_ref())?;
        let slot = KeySlot::wrap(&master, secret, kdf)?;
        let slot_json = serde_json::to_vec_pretty(&slot).expect("serialize key slot");
        backend.put(&layout::key(&Id::random()), &slot_json)?;
        let cfg = serde_json::to_vec_pretty(&config).expect("serialize config");
        match backend.put(CONFIG, &cfg) {
            Err(BackendError::AlreadyExists(_)) => {
                return Err(Error::AlreadyInitialized(backend.location()))
            }
            r => r?,
        }
        Ok(Self::with_key(backend, config, &master))
    }

    /// Opens an existing repository; `WrongKey` if no slot opens with `secret`.
    pub fn open(backend: Arc<dyn Backend>, secret: &Secret) -> Result<Self> {
        // The key slots are listed while the config is read: on S3 each is
        // a round trip, and every command opens a repository.
        let (slots, config) = side_by_side(
            "listing key slots",
            || Ok(backend.list(layout::KEYS)?),
            || Self::read_config(backend.as_ref()),
        );
        let config = config?;
        crate::maintain::lock::apply(backend.as_ref(), config.object_lock.as_ref())?;
        let master = Self::open_slot(backend.as_ref(), slots?, secret)?;
        Ok(Self::with_key(backend, config, &master))
    }

    /// The public settings of the repository at `backend` (no key needed):
    /// `NoRepository` if there is none.
    pub fn read_config(backend: &dyn Backend) -> Result<RepoConfig> {
        let cfg = match backend.get(CONFIG) {
            Ok(c) => c,
            Err(BackendError::NotFound(_)) => return Err(Error::NoRepository(backend.location())),
            Err(e) => return Err(e.into()),
        };
        let config: RepoConfig =
            serde_json::from_slice(&cfg).map_err(|e| Error::corrupt("config", e.to_string()))?;
        if config.version != VERSION {
            return Err(Error::UnsupportedVersion(config.version));
        }
        config
            .chunker
            .validate()
            .map_err(|e| Error::corrupt("config", e))?;
        Ok(config)
    }

    /// Opens the repository and finds the snapshot `spec` in it
    /// ([`Repository::find_snapshot`]); a full id's manifest is fetched
    /// while the key is unlocked (on S3 a round trip fewer one after the
    /// other: a live restore's server starts so), and then the index
    /// objects and condemned packs are listed, for the reader's index
    /// load (another round trip off its path).
    pub fn open_at(
        backend: Arc<dyn Backend>,
        secret: &Secret,
        spec: &str,
    ) -> Result<(Self, Snapshot)> {
        let Ok(id) = spec.parse::<Id>() else {
            let repo = Self::open(backend, secret)?;
            let snap = repo.find_snapshot(spec)?;
            return Ok((repo, snap));
        };
        let name = layout::snapshot(&id);
        let (found, repo) = side_by_side(
            "fetching the snapshot",
            || {
                let sealed = backend.get(&name)?;
                Ok((sealed, Listed::list(backend.as_ref())))
            },
            || Self::open(backend.clone(), secret),
        );
        let repo = repo?;
        let (sealed, listed) = match found {
            Err(Error::Backend(BackendError::NotFound(_))) => {
                return Err(Error::SnapshotNotFound(spec.into()))
            }
            r => r?,
        };
        let snap = repo.snapshot_from_sealed(&name, &sealed)?;
        *lock(&repo.listed) = listed;
        Ok((repo, snap))
    }

    fn unlock(backend: &dyn Backend, secret: &Secret) -> Result<MasterKey> {
        Self::open_slot(backend, backend.list(layout::KEYS)?, secret)
    }

    /// The master key from the first of `slots` (listed key slots) that
    /// `secret` opens.
    fn open_slot(
        backend: &dyn Backend,
        slots: Vec<ObjectInfo>,
        secret: &Secret,
    ) -> Result<MasterKey> {
        for obj in slots {
            let bytes = backend.get(&obj.name)?;
            let slot: KeySlot = match serde_json::from_slice(&bytes) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("skipping unreadable key slot {}: {e}", obj.name);
                    continue;
                }
            };
            if slot.accepts(secret) {
                if let Some(m) = slot.unwrap_key(secret)? {
                    return Ok(m);
                }
            }
        }
        Err(Error::WrongKey)
    }

    fn with_key(backend: Arc<dyn Backend>, config: RepoConfig, master: &MasterKey) -> Self {
        let keys = Arc::new(Keys::derive(master));
        let chunker = Chunker::new(config.chunker, keys.cdc_seed());
        Repository {
            backend,
            config,
            keys,
            chunker,
            index: Mutex::new(None),
            narrowed: Mutex::new(None),
            listed: Mutex::new(None),
        }
    }

    /// Adds another way to open this repository (e.g. a key file next to a
    /// passphrase). `current` must open it already.
    pub fn add_key(&self, current: &Secret, new: &Secret, kdf: &KdfParams) -> Result<()> {
        let master = Self::unlock(self.backend.as_ref(), current)?;
        let slot = KeySlot::wrap(&master, new, kdf)?;
        let json = serde_json::to_vec_pretty(&slot).expect("serialize key slot");
        self.backend.put(&layout::key(&Id::random()), &json)?;
        Ok(())
    }

    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    pub fn config(&self) -> &RepoConfig {
        &self.config
    }

    pub fn keys(&self) -> &Arc<Keys> {
        &self.keys
    }

    pub fn chunker(&self) -> &Chunker {
        &self.chunker
    }

    /// The merged index, loaded once and then cached.
    pub fn index(&self) -> Result<Arc<Index>> {
        let mut guard = self.index.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(ix) = guard.as_ref() {
            return Ok(ix.clone());
        }
        let ix = Arc::new(self.load_index(Wanted::All)?);
        *guard = Some(ix.clone());
        Ok(ix)
    }

    /// A fresh index of which pack holds each chunk, with the condemned
    /// records as they are now: what a backup reuses chunks from
    /// (`docs/gc.md`, rule 2). Never cached: a backup loads it after its
    /// session marker is visible.
    pub fn dedup_index(&self) -> Result<DedupIndex> {
        self.load_index(Wanted::All)
    }

    /// An index that finds at least `chunks` (a restore, an export or a
    /// verify of one snapshot needs no others): every index object is
    /// still read, but only their entries are kept, so memory follows the
    /// snapshot, not the repository. The full index if it is loaded; the
    /// last narrowed one if it holds them all. For readers only: a backup
    /// needs the full index (`docs/gc.md`, rule 2).
    pub fn index_for(&self, chunks: impl IntoIterator<Item = Id>) -> Result<Arc<Index>> {
        if let Some(ix) = lock(&self.index).as_ref() {
            return Ok(ix.clone());
        }
        let wanted = sorted_chunks(chunks);
        let mut narrowed = lock(&self.narrowed);
        if let Some((have, ix)) = narrowed.as_ref() {
            if wanted.iter().all(|id| sorted_contains(have, id)) {
                return Ok(ix.clone());
            }
        }
        let ix = Arc::new(self.load_index(Wanted::These(&wanted))?);
        *narrowed = Some((wanted, ix.clone()));
        Ok(ix)
    }

    /// [`Repository::index_for`] the chunks `find` returns beside what it
    /// found (a snapshot's chunk lists): the index objects are listed and
    /// fetched while it runs, so on S3 the two chains of round trips
    /// overlap (a live restore's server waits on both before it serves).
    pub fn index_for_found<T>(
        &self,
        find: impl FnOnce() -> Result<(T, Vec<Id>)>,
    ) -> Result<(T, Arc<Index>)> {
        if lock(&self.index).is_some() || lock(&self.narrowed).is_some() {
            let (t, chunks) = find()?;
            return Ok((t, self.index_for(chunks)?));
        }
        let later = LaterChunks::default();
        let (ix, found) = side_by_side(
            "the index loader",
            || self.load_index(Wanted::Later(&later)),
            || {
                let r = find().map(|(t, chunks)| (t, sorted_chunks(chunks)));
                later.set(r.as_ref().ok().map(|(_, c)| c.clone()));
                r
            },
        );
        let (t, chunks) = found?;
        let ix = Arc::new(ix?);
        *lock(&self.narrowed) = Some((chunks, ix.clone()));
        Ok((t, ix))
    }

    /// Runs `f` (find a snapshot, load its chunk lists) while the index
    /// loads on another thread: a restore or an export needs both next,
    /// and on S3 each is a chain of round trips. For readers only: a backup
    /// loads its index when it starts (docs/gc.md, rule 2). `f`'s error
    /// comes first.
    pub fn while_loading_index<T, E: From<Error>>(
        &self,
        f: impl FnOnce() -> std::result::Result<T, E>,
    ) -> std::result::Result<T, E> {
        let (index, r) = side_by_side("the index loader", || self.index(), f);
        let r = r?;
        index?;
        Ok(r)
    }

    /// Forgets the cached index (after a backup added to it).
    pub fn invalidate_index(&self) {
        *lock(&self.index) = None;
        *lock(&self.narrowed) = None;
    }

    /// Each index object is opened and added as it arrives, so only the
    /// table is ever whole in memory, never every object's packs at once;
    /// with `wanted` (sorted by [`Id::fast_cmp`]), only those chunks.
    fn load_index<D: Detail>(&self, wanted: Wanted<'_>) -> Result<ChunkIndex<D>> {
        // A reader's first load uses what open_at listed; a writer's (and
        // the full index) lists now: a backup must see every record
        // written before it starts (docs/gc.md, rule 2).
        let listed = match wanted {
            Wanted::All => None,
            Wanted::These(_) | Wanted::Later(_) => lock(&self.listed).take(),
        };
        let early = listed.is_some();
        let ix = self.load_index_listed(wanted, listed)?;
        // Listed for open_at's snapshot: chunks of one stored since (read
        // through the same repository) are in objects listed afresh.
        if early
            && wanted
                .get()?
                .is_some_and(|w| w.iter().any(|id| !ix.contains(id)))
        {
            return self.load_index_listed(wanted, None);
        }
        Ok(ix)
    }

    fn load_index_listed<D: Detail>(
        &self,
        wanted: Wanted<'_>,
        listed: Option<Listed>,
    ) -> Result<ChunkIndex<D>> {
        let (listing, condemned) = match listed {
            Some(l) => (Some(l.index), Some(l.condemned)),
            None => (None, None),
        };
        // Condemned records are loaded while the index objects load (both
        // are needed before the table is finished: a backup must not reuse
        // what a GC has condemned, docs/gc.md, rule 2).
        let (condemned, builder) = side_by_side(
            "listing condemned packs",
            || match condemned {
                Some(c) => Ok(c),
                None => condemned::packs(self.backend.as_ref(), Some(&self.keys)),
            },
            || self.load_index_objects(wanted, listing),
        );
        let mut builder = builder?;
        builder.set_condemned(condemned?);
        Ok(builder.finish())
    }

    /// Every index object's packs (with `wanted`, only those chunks) in a
    /// builder.
    fn load_index_objects<D: Detail>(
        &self,
        wanted: Wanted<'_>,
        listing: Option<Vec<ObjectInfo>>,
    ) -> Result<IndexBuilder<D>> {
        let builder = Mutex::new(IndexBuilder::default());
        if let Wanted::These(w) = wanted {
            lock(&builder).reserve(w.len());
        }
        each_index_object(
            self.backend.as_ref(),
            listing,
            // An index object spends at least 40 bytes on each chunk it lists.
            |bytes| {
                if let Wanted::All = wanted {
                    lock(&builder).reserve((bytes / 40) as usize);
                }
            },
            |name, bytes| {
                let mut packs = index::open(&self.keys, &bytes, name)?;
                if let Some(w) = wanted.get()? {
                    packs
                        .iter_mut()
                        .for_each(|p| p.blobs.retain(|b| sorted_contains(w, &b.id)));
                    packs.retain(|p| !p.blobs.is_empty());
                }
                let mut b = lock(&builder);
                packs.iter().for_each(|p| b.add_pack(p));
                Ok(())
            },
        )?;
        Ok(builder.into_inner().unwrap_or_else(|e| e.into_inner()))
    }

    /// The packs one index object lists.
    pub(crate) fn load_index_object(&self, name: &str) -> Result<Vec<pack::PackInfo>> {
        index::open(&self.keys, &self.backend.get(name)?, name)
    }

    /// Removes a snapshot: its manifest first (so no listed snapshot ever
    /// lacks a chunk list), then its chunk lists, which no other snapshot
    /// shares, then its sync record. Chunks stay until a GC finds them
    /// unreferenced.
    pub fn delete_snapshot(&self, snap: &Snapshot) -> Result<()> {
        let lists: Vec<Id> = snap.chunk_lists().map(|d| d.chunk_list).collect();
        delete_snapshot_objects(self.backend.as_ref(), &snap.id, &lists)
    }

    pub(crate) fn put_sealed(&self, name: &str, sealed: &[u8]) -> Result<()> {
        self.backend.put(name, sealed)?;
        Ok(())
    }

    fn get_sealed(&self, kind: &str, name: &str) -> Result<Vec<u8>> {
        let bytes = self.backend.get(name)?;
        object::open(&self.keys, kind, name, &bytes)
    }

    /// All snapshots, oldest first.
    pub fn snapshots(&self) -> Result<Vec<Snapshot>> {
        let names: Vec<String> = self
            .backend
            .list(layout::SNAPSHOTS)?
            .into_iter()
            .map(|o| o.name)
            .collect();
        let mut out = load_each(&names, |n| self.load_snapshot_object(n))?;
        out.sort_by(|a, b| a.time.cmp(&b.time).then(a.id.cmp(&b.id)));
        Ok(out)
    }

    pub(crate) fn load_snapshot_object(&self, name: &str) -> Result<Snapshot> {
        let sealed = self.backend.get(name)?;
        self.snapshot_from_sealed(name, &sealed)
    }

    fn snapshot_from_sealed(&self, name: &str, sealed: &[u8]) -> Result<Snapshot> {
        let payload = object::open(&self.keys, snapshot::KIND, name, sealed)?;
        let s: Snapshot =
            serde_json::from_slice(&payload).map_err(|e| Error::corrupt(name, e.to_string()))?;
        if layout::snapshot(&s.id) != name {
            return Err(Error::corrupt(name, "manifest id does not match its name"));
        }
        Ok(s)
    }

    /// Resolves a snapshot by full id, unique id prefix, or `SOURCE@latest`.
    pub fn find_snapshot(&self, spec: &str) -> Result<Snapshot> {
        if let Ok(id) = spec.parse::<Id>() {
            return match self.load_snapshot_object(&layout::snapshot(&id)) {
                Err(Error::Backend(BackendError::NotFound(_))) => {
                    Err(Error::SnapshotNotFound(spec.into()))
                }
                r => r,
            };
        }
        if let Some(source) = spec.strip_suffix("@latest") {
            return self
                .snapshots()?
                .into_iter()
                .rfind(|s| s.source == source)
                .ok_or_else(|| Error::SnapshotNotFound(spec.into()));
        }
        if spec.len() < 4 || !spec.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(Error::SnapshotNotFound(spec.into()));
        }
        let spec_l = spec.to_ascii_lowercase();
        let matches: Vec<_> = self
            .backend
            .list(layout::SNAPSHOTS)?
            .into_iter()
            .filter(|o| o.name[layout::SNAPSHOTS.len()..].starts_with(&spec_l))
            .collect();
        match matches.as_slice() {
            [one] => self.load_snapshot_object(&one.name),
            [] => Err(Error::SnapshotNotFound(spec.into())),
            _ => Err(Error::AmbiguousSnapshot(spec.into())),
        }
    }

    pub fn load_chunk_list(&self, id: &Id) -> Result<ChunkList> {
        let name = layout::chunk_list(id);
        ChunkList::decode(&self.get_sealed(chunklist::KIND, &name)?, &name)
    }

    /// Reads, authenticates and decompresses one chunk.
    pub fn read_chunk(&self, index: &Index, id: &Id) -> Result<Vec<u8>> {
        let loc = index.get(id).ok_or(Error::MissingChunk(*id))?;
        let mut sealed = self.backend.get_range(
            &layout::pack(&index.pack(&loc).id),
            u64::from(loc.offset),
            u64::from(loc.len),
        )?;
        let mut buf = ChunkBuf::default();
        Ok(self
            .open_blob(index, id, &loc, &mut sealed, &mut buf)?
            .into_vec())
    }

    /// Opens the chunk of disk extent `e`: authenticated, as long as the
    /// chunk list says, and damage reported with the disk offset and pack.
    /// Decrypts in place, as [`blob::open_chunk`].
    pub fn open_extent<'a>(
        &self,
        index: &Index,
        e: &crate::format::chunklist::Extent,
        loc: &Loc,
        sealed: &'a mut [u8],
        buf: &'a mut ChunkBuf,
    ) -> Result<Plain<'a>> {
        let id = e
            .chunk
            .ok_or_else(|| Error::Invalid("zero extent has no chunk".into()))?;
        let data = self
            .open_blob(index, &id, loc, sealed, buf)
            .map_err(|err| match err {
                Error::Corrupt { what, detail } => Error::Corrupt {
                    what,
                    detail: format!(
                        "{detail} (disk offset {}, pack {})",
                        e.offset,
                        index.pack(loc).id.short()
                    ),
                },
                other => other,
            })?;
        let n = data.bytes().len();
        if n as u64 != e.len {
            return Err(Error::corrupt(
                format!("chunk {id}"),
                format!("holds {n} bytes, the chunk list says {}", e.len),
            ));
        }
        Ok(data)
    }

    /// Opens a sealed blob fetched from its pack, in place (see
    /// [`blob::open_chunk`]).
    pub fn open_blob<'a>(
        &self,
        index: &Index,
        id: &Id,
        loc: &Loc,
        sealed: &'a mut [u8],
        buf: &'a mut ChunkBuf,
    ) -> Result<Plain<'a>> {
        if sealed.len() != loc.len as usize {
            return Err(Error::corrupt(
                format!("chunk {id}"),
                format!("pack {} is truncated", index.pack(loc).id),
            ));
        }
        let opener = Opener::new(&self.keys, index.salt(loc));
        blob::open_chunk(&opener, id, sealed, self.config.chunker.max as usize, buf)
    }
}

/// `f` on every item from up to `threads` threads; the first error wins
/// and the others stop after the item they are on.
pub(crate) fn for_each_parallel<T: Sync>(
    items: &[T],
    threads: usize,
    f: impl Fn(&T) -> Result<()> + Sync,
) -> Result<()> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let failed = std::sync::Mutex::new(None);
    std::thread::scope(|sc| {
        for _ in 0..threads.max(1).min(items.len()) {
            sc.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(item) = items.get(i) else { break };
                if let Err(e) = f(item) {
                    failed
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get_or_insert(e);
                    next.store(items.len(), std::sync::atomic::Ordering::Relaxed);
                }
            });
        }
    });
    match failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// A mutex's guard, poisoned or not (what it guards stays consistent:
/// every holder finishes its update before anything can panic).
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether `ids`, sorted by [`Id::fast_cmp`], holds `id`.
fn sorted_contains(ids: &[Id], id: &Id) -> bool {
    ids.binary_search_by(|h| h.fast_cmp(id)).is_ok()
}

/// `f` on every index object's name and bytes, on up to 8 threads, after
/// `listed` with the bytes a listing holds. An object gone since the
/// listing was replaced first (a GC's sweep and index compaction write
/// the objects that take over its packs before deleting it), so the
/// listing is read again for names not yet seen, until a pass finds
/// nothing gone: no pack an index object lists is missed.
pub(crate) fn each_index_object(
    backend: &dyn Backend,
    mut listing: Option<Vec<ObjectInfo>>,
    listed: impl Fn(u64),
    f: impl Fn(&str, Vec<u8>) -> Result<()> + Sync,
) -> Result<()> {
    let mut seen = std::collections::HashSet::new();
    loop {
        let all = match listing.take() {
            Some(l) => l,
            None => backend.list(layout::INDEX)?,
        };
        let fresh: Vec<crate::backend::ObjectInfo> = all
            .into_iter()
            .filter(|o| !seen.contains(&o.name))
            .collect();
        listed(fresh.iter().map(|o| o.size).sum());
        let gone = std::sync::atomic::AtomicBool::new(false);
        for_each_parallel(&fresh, 8, |o| match backend.get(&o.name) {
            Ok(bytes) => f(&o.name, bytes),
            Err(BackendError::NotFound(_)) => {
                gone.store(true, std::sync::atomic::Ordering::Relaxed);
                Ok(())
            }
            Err(e) => Err(e.into()),
        })?;
        seen.extend(fresh.into_iter().map(|o| o.name));
        if !gone.into_inner() {
            return Ok(());
        }
    }
}

/// `load` of every name, on up to 8 threads (on S3 each is a round
/// trip), in the order of `names`; the first error wins.
pub(crate) fn load_each<T: Send>(
    names: &[String],
    load: impl Fn(&str) -> Result<T> + Sync,
) -> Result<Vec<T>> {
    let threads = 8.min(names.len()).max(1);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut done: Vec<(usize, Result<T>)> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(n) = names.get(i) else { return mine };
                        let r = load(n);
                        let failed = r.is_err();
                        mine.push((i, r));
                        if failed {
                            return mine;
                        }
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| {
                w.join().unwrap_or_else(|_| {
                    vec![(0, Err(Error::Invalid("a loader thread panicked".into())))]
                })
            })
            .collect()
    });
    done.sort_by_key(|(i, _)| *i);
    done.into_iter().map(|(_, r)| r).collect()
}

/// Deletes a snapshot: its manifest first (from then on it is gone for
/// every reader), then its chunk lists, sync records and drill reports. Needs no key,
/// so a replica's retention runs without one (`crate::sync::retain`).
pub fn delete_snapshot_objects(
    backend: &dyn Backend,
    snapshot: &Id,
    chunk_lists: &[Id],
) -> Result<()> {
    backend.delete(&layout::snapshot(snapshot))?;
    for list in chunk_lists {
        match backend.delete(&layout::chunk_list(list)) {
            Ok(()) | Err(BackendError::NotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    sync_records::delete_all(backend, snapshot)?;
    reports::delete_all(backend, snapshot)
}

/// Runs `a` on another thread while `b` runs on this one, and returns
/// both results: on S3 each is a chain of round trips. `a` panicking is an
/// error naming `what`.
/// Which chunks an index is loaded for.
#[derive(Clone, Copy)]
enum Wanted<'a> {
    All,
    /// Only these (sorted by [`Id::fast_cmp`]).
    These(&'a [Id]),
    /// Those another thread finds meanwhile.
    Later(&'a LaterChunks),
}

impl<'a> Wanted<'a> {
    /// `None`: all.
    fn get(self) -> Result<Option<&'a [Id]>> {
        match self {
            Wanted::All => Ok(None),
            Wanted::These(w) => Ok(Some(w)),
            Wanted::Later(l) => l.wait().map(Some),
        }
    }
}

/// Chunks found on one thread while another loads the index for them.
#[derive(Default)]
struct LaterChunks {
    chunks: std::sync::OnceLock<Vec<Id>>,
    /// Set once: whether `chunks` was (else finding them failed).
    settled: Mutex<Option<bool>>,
    cv: std::sync::Condvar,
}

impl LaterChunks {
    fn set(&self, chunks: Option<Vec<Id>>) {
        let found = chunks.is_some_and(|c| self.chunks.set(c).is_ok());
        *lock(&self.settled) = Some(found);
        self.cv.notify_all();
    }

    fn wait(&self) -> Result<&[Id]> {
        let mut settled = lock(&self.settled);
        while settled.is_none() {
            settled = self.cv.wait(settled).unwrap_or_else(|e| e.into_inner());
        }
        self.chunks
            .get()
            .map(Vec::as_slice)
            .ok_or_else(|| Error::Invalid("the chunks to index were not found".into()))
    }
}

/// Sorted by [`Id::fast_cmp`], once each.
fn sorted_chunks(chunks: impl IntoIterator<Item = Id>) -> Vec<Id> {
    let mut v: Vec<Id> = chunks.into_iter().collect();
    v.sort_unstable_by(Id::fast_cmp);
    v.dedup();
    v
}

pub(crate) fn side_by_side<A: Send, B>(
    what: &str,
    a: impl FnOnce() -> Result<A> + Send,
    b: impl FnOnce() -> B,
) -> (Result<A>, B) {
    std::thread::scope(|s| {
        let a = s.spawn(a);
        let b = b();
        let a = a
            .join()
            .unwrap_or_else(|_| Err(Error::Invalid(format!("{what} panicked"))));
        (a, b)
    })
}
