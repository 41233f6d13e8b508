//! Packs of a backup session: sealed chunks are added in disk order, full
//! packs go to uploader threads, and every [`INDEX_FLUSH_PACKS`] stored
//! packs an index object naming them is written (after the packs: a crash
//! leaves packs nobody indexes, never an index entry without its pack).

use std::sync::{Arc, Mutex};

use crossbeam_channel::{bounded, Receiver, Sender};

use crate::error::{Error, Result};
use crate::format::crypto::SessionCipher;
use crate::format::id::{Id, IdSet};
use crate::format::pack::{PackInfo, PackWriter};
use crate::format::{index, layout};
use crate::repo::Repository;

/// Pack infos written in one index object at most; a long backup killed
/// midway keeps the chunks of all but its last few GiB.
const INDEX_FLUSH_PACKS: usize = 64;

pub(super) struct Packer {
    current: Option<PackWriter>,
    pack_size: usize,
    /// Chunks stored by this session (added to a pack).
    pub(super) pending: Arc<Mutex<IdSet>>,
    uploads: Option<Sender<(PackWriter, Arc<SessionCipher>)>>,
    results: Receiver<Result<PackInfo>>,
    uploaders: Vec<std::thread::JoinHandle<()>>,
    in_flight: usize,
    uploaded: Vec<PackInfo>,
    /// Every pack this session stored.
    written: Vec<Id>,
}

impl Packer {
    /// A packer with `uploaders` threads storing packs (0: the backend's
    /// choice, `Backend::upload_concurrency`).
    pub(super) fn new(repo: &Repository, uploaders: usize) -> Self {
        let (utx, urx) = bounded::<(PackWriter, Arc<SessionCipher>)>(1);
        let (rtx, rrx) = bounded(64);
        let uploaders = match uploaders {
            0 => repo.backend().upload_concurrency(),
            n => n,
        };
        let uploaders = (0..uploaders.max(1))
            .map(|_| {
                let urx = urx.clone();
                let rtx = rtx.clone();
                let backend = repo.backend().clone();
                std::thread::spawn(move || {
                    for (w, cipher) in urx {
                        let (bytes, info) = w.finish(&cipher);
                        let r = backend
                            .put_owned(&layout::pack(&info.id), bytes)
                            .map(|_| info)
                            .map_err(Error::from);
                        if rtx.send(r).is_err() {
                            break;
                        }
                    }
                })
            })
            .collect();
        Packer {
            current: None,
            pack_size: repo.config().pack_size as usize,
            pending: Arc::new(Mutex::new(IdSet::default())),
            uploads: Some(utx),
            results: rrx,
            uploaders,
            in_flight: 0,
            uploaded: Vec::new(),
            written: Vec::new(),
        }
    }

    pub(super) fn add(
        &mut self,
        id: Id,
        sealed: &[u8],
        cipher: &Arc<SessionCipher>,
        repo: &Repository,
    ) -> Result<()> {
        let w = self
            .current
            .get_or_insert_with(|| PackWriter::new(cipher, self.pack_size));
        w.add(id, sealed);
        if w.len() >= self.pack_size {
            self.flush_pack(cipher)?;
        }
        self.poll(repo, cipher, false)
    }

    pub(super) fn flush_pack(&mut self, cipher: &Arc<SessionCipher>) -> Result<()> {
        if let Some(w) = self.current.take() {
            if w.is_empty() {
                return Ok(());
            }
            // Sealing the trailer and writing happen on an uploader thread.
            let tx = self.uploads.as_ref().expect("packer open");
            self.in_flight += 1;
            if tx.send((w, cipher.clone())).is_err() {
                return Err(self.upload_failure());
            }
        }
        Ok(())
    }

    fn upload_failure(&mut self) -> Error {
        while let Ok(r) = self.results.try_recv() {
            if let Err(e) = r {
                return e;
            }
        }
        Error::Invalid("pack uploader stopped".into())
    }

    /// Collects finished uploads; writes an index object when enough packs
    /// are stored (or all of them, when `all`).
    fn poll(&mut self, repo: &Repository, cipher: &SessionCipher, all: bool) -> Result<()> {
        loop {
            let r = if all && self.in_flight > 0 {
                self.results.recv().map_err(|_| self.upload_failure())?
            } else {
                match self.results.try_recv() {
                    Ok(r) => r,
                    Err(_) => break,
                }
            };
            self.in_flight -= 1;
            let info = r?;
            self.written.push(info.id);
            self.uploaded.push(info);
        }
        if self.uploaded.len() >= INDEX_FLUSH_PACKS || (all && !self.uploaded.is_empty()) {
            let sealed = index::seal(cipher, &self.uploaded);
            repo.put_sealed(&layout::index(&Id::random()), &sealed)?;
            self.uploaded.clear();
        }
        Ok(())
    }

    /// Stores the last pack, waits for every upload and indexes them; stops
    /// the uploaders.
    pub(super) fn close(&mut self, repo: &Repository, cipher: &Arc<SessionCipher>) -> Result<()> {
        let r = self
            .flush_pack(cipher)
            .and_then(|()| self.poll(repo, cipher, true));
        self.stop();
        r
    }

    /// Every pack this session stored (all of them once closed).
    pub(super) fn written(&self) -> &[Id] {
        &self.written
    }

    fn stop(&mut self) {
        self.uploads = None;
        for h in self.uploaders.drain(..) {
            // Only reaps the thread: its outcomes went through `results`.
            let _ = h.join();
        }
    }
}

impl Drop for Packer {
    fn drop(&mut self) {
        self.stop();
    }
}
