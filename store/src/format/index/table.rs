//! The merged index in memory: every chunk once, in 256 buckets by the
//! first byte of its id, each bucket sorted by the other 31 and searched
//! by bisection.
//!
//! Why buckets: ids are uniform, so a bucket is 1/256th of the table; it is
//! sorted (and cleared of duplicates) on its own, in cache, on every core,
//! where one sort of the whole table was most of a backup's start at 25M
//! chunks. The bucket's byte is not stored.
//!
//! What a chunk costs depends on what the caller needs ([`Detail`]): a
//! reader needs the chunk's place in its pack ([`Loc`], 43 bytes a chunk),
//! a backup only which pack holds it ([`InPack`], 35 bytes), so a backup at
//! 25M chunks holds about 830 MiB, not 1.1 GiB.

use crate::format::crypto::SALT_LEN;
use crate::format::id::{Id, IdBuildHasher, IdMap, IdSet};
use crate::format::pack::{BlobEntry, PackInfo};

/// What an index keeps of each chunk besides its id.
pub trait Detail: Copy + Send + Sync + 'static {
    fn of(pack: u32, blob: &BlobEntry) -> Self;
    /// Position of the chunk's pack in [`ChunkIndex::packs`].
    fn pack(&self) -> u32;
    /// Breaks ties between copies in equally good packs (so the copy kept
    /// does not depend on load order).
    fn offset(&self) -> u32;
}

/// Where a chunk lies: its pack, and its bytes in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Loc {
    /// Position in [`ChunkIndex::packs`].
    pub pack: u32,
    pub offset: u32,
    pub len: u32,
}

impl Detail for Loc {
    fn of(pack: u32, b: &BlobEntry) -> Self {
        Loc {
            pack,
            offset: b.offset,
            len: b.len,
        }
    }
    fn pack(&self) -> u32 {
        self.pack
    }
    fn offset(&self) -> u32 {
        self.offset
    }
}

/// Which pack holds a chunk (position in [`ChunkIndex::packs`]): all a
/// backup needs to reuse it and to name its pack in the sync record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InPack(pub u32);

impl Detail for InPack {
    fn of(pack: u32, _: &BlobEntry) -> Self {
        InPack(pack)
    }
    fn pack(&self) -> u32 {
        self.0
    }
    fn offset(&self) -> u32 {
        0
    }
}

#[derive(Clone, Debug)]
pub struct PackMeta {
    pub id: Id,
    /// Position of its session's salt in [`ChunkIndex::salts`]: packs of
    /// one writer session share it, so it is kept once (at 25M chunks in
    /// 1.5M packs, 45 MiB less).
    salt: u32,
}

/// One chunk: its id without the bucket's byte, and its detail, packed
/// (no padding: 31 + 12 or 31 + 4 bytes).
#[repr(C, packed)]
#[derive(Clone, Copy)]
struct Rec<D: Copy> {
    tail: [u8; 31],
    detail: D,
}

fn tail(id: &Id) -> &[u8] {
    &id.0[1..]
}

/// Orders tails by their first 8 bytes as one number, then the rest: ids
/// are uniform, so the number nearly always decides (a plain comparison
/// of 31 bytes was a third of a large index's build).
fn cmp_tail(a: &[u8], b: &[u8]) -> std::cmp::Ordering {
    let head = |t: &[u8]| {
        let mut h = [0u8; 8];
        h.copy_from_slice(&t[..8]);
        u64::from_be_bytes(h)
    };
    head(a).cmp(&head(b)).then_with(|| a[8..].cmp(&b[8..]))
}

const BUCKETS: usize = 256;
/// Buckets this large are sorted by counting first ([`Sorter`]).
const COUNTING_SORT_FROM: usize = 1 << 14;

/// The index readers use: every chunk's place.
pub type Index = ChunkIndex<Loc>;
/// The index a backup uses: every chunk's pack.
pub type DedupIndex = ChunkIndex<InPack>;

pub struct ChunkIndex<D: Detail> {
    packs: Vec<PackMeta>,
    salts: Vec<[u8; SALT_LEN]>,
    /// Every chunk once; bucket `b` holds the ids starting with byte `b`,
    /// sorted by the rest.
    buckets: Vec<Vec<Rec<D>>>,
    /// Packs a GC has condemned (`docs/gc.md`): still readable, never reused.
    condemned: IdSet,
}

impl<D: Detail> Default for ChunkIndex<D> {
    fn default() -> Self {
        ChunkIndex {
            packs: Vec::new(),
            salts: Vec::new(),
            buckets: (0..BUCKETS).map(|_| Vec::new()).collect(),
            condemned: IdSet::default(),
        }
    }
}

impl<D: Detail> ChunkIndex<D> {
    pub fn new() -> Self {
        Self::default()
    }

    /// A chunk a backup may reference without storing it: indexed in a pack
    /// no GC has condemned. (A condemned pack may be deleted once the
    /// backups that could not know are done; see `docs/gc.md`.)
    pub fn reusable(&self, id: &Id) -> bool {
        self.get(id)
            .is_some_and(|d| !self.condemned.contains(&self.packs[d.pack() as usize].id))
    }

    pub fn is_condemned(&self, pack: &Id) -> bool {
        self.condemned.contains(pack)
    }

    pub fn len(&self) -> usize {
        self.buckets.iter().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.iter().all(Vec::is_empty)
    }

    pub fn contains(&self, id: &Id) -> bool {
        self.get(id).is_some()
    }

    pub fn get(&self, id: &Id) -> Option<D> {
        let bucket = &self.buckets[id.0[0] as usize];
        bucket
            .binary_search_by(|r| cmp_tail(&r.tail, tail(id)))
            .ok()
            .map(|i| bucket[i].detail)
    }

    /// The pack a chunk's detail names.
    pub fn pack(&self, d: &D) -> &PackMeta {
        &self.packs[d.pack() as usize]
    }

    /// The salt of the session that sealed a chunk's pack.
    pub fn salt(&self, d: &D) -> &[u8; SALT_LEN] {
        &self.salts[self.pack(d).salt as usize]
    }

    pub fn packs(&self) -> &[PackMeta] {
        &self.packs
    }

    /// Every chunk and its detail, by id.
    pub fn iter(&self) -> impl Iterator<Item = (Id, D)> + '_ {
        self.buckets.iter().enumerate().flat_map(|(b, recs)| {
            recs.iter().map(move |r| {
                let mut id = [0u8; 32];
                id[0] = b as u8;
                id[1..].copy_from_slice(&r.tail);
                (Id(id), r.detail)
            })
        })
    }
}

/// Collects the packs of index objects (in any order, from any thread
/// behind a lock) into a [`ChunkIndex`].
pub struct IndexBuilder<D: Detail = Loc> {
    index: ChunkIndex<D>,
    /// Each pack's position by the first 8 bytes of its id (a pack may be
    /// listed twice: by an object and by the compaction that replaces it);
    /// ids that share those bytes, a chance of one in 10^7 at 1.5M packs,
    /// are kept by whole id in `pos_more`. Half the memory of a map by id.
    pos: std::collections::HashMap<u64, u32, IdBuildHasher>,
    pos_more: IdMap<u32>,
    salt_pos: std::collections::HashMap<[u8; SALT_LEN], u32>,
}

impl<D: Detail> Default for IndexBuilder<D> {
    fn default() -> Self {
        IndexBuilder {
            index: ChunkIndex::default(),
            pos: Default::default(),
            pos_more: IdMap::default(),
            salt_pos: Default::default(),
        }
    }
}

impl<D: Detail> IndexBuilder<D> {
    /// A builder that knows which packs are condemned: locations outside
    /// them win.
    pub fn new(condemned: IdSet) -> Self {
        let mut b = Self::default();
        b.set_condemned(condemned);
        b
    }

    /// Which packs are condemned (before [`Self::finish`]).
    pub fn set_condemned(&mut self, condemned: IdSet) {
        self.index.condemned = condemned;
    }

    /// Room for about `n` more chunks (one allocation per bucket instead of
    /// doublings). A hint only: a bucket that cannot have it grows as it
    /// fills.
    pub fn reserve(&mut self, n: usize) {
        let each = n / BUCKETS;
        // Ids are uniform: a bucket's share varies by about its square root.
        let each = each + 4 * (each as f64).sqrt() as usize + 16;
        for b in &mut self.index.buckets {
            if b.try_reserve_exact(each).is_err() {
                tracing::debug!("index: no room for {n} chunks up front");
                return;
            }
        }
    }

    /// The position of pack `p`, added if it is new.
    fn pack_pos(&mut self, p: &PackInfo) -> u32 {
        let packs = &mut self.index.packs;
        let fresh = packs.len() as u32;
        let pos = *self.pos.entry(p.id.head()).or_insert(fresh);
        if packs.get(pos as usize).is_some_and(|m| m.id == p.id) {
            return pos;
        }
        let pos = match pos == fresh {
            true => fresh,
            false => *self.pos_more.entry(p.id).or_insert(fresh),
        };
        if pos == fresh {
            let salts = &mut self.index.salts;
            let salt = *self.salt_pos.entry(p.salt).or_insert_with(|| {
                salts.push(p.salt);
                (salts.len() - 1) as u32
            });
            packs.push(PackMeta { id: p.id, salt });
        }
        pos
    }

    pub fn add_pack(&mut self, p: &PackInfo) {
        let pos = self.pack_pos(p);
        for b in &p.blobs {
            let mut rec = Rec {
                tail: [0; 31],
                detail: D::of(pos, b),
            };
            rec.tail.copy_from_slice(tail(&b.id));
            self.index.buckets[b.id.0[0] as usize].push(rec);
        }
    }

    /// Sorts each bucket (on every core) and keeps one copy of each chunk:
    /// a chunk stored twice (racing writers, a repack) is equally good in
    /// either pack, except that a pack not condemned beats a condemned one;
    /// among equals the lowest pack id, so the choice does not depend on
    /// load order.
    pub fn finish(self) -> ChunkIndex<D> {
        let mut index = self.index;
        let (packs, condemned) = (&index.packs, &index.condemned);
        let rank = |r: &Rec<D>| {
            let d = r.detail;
            let p = &packs[d.pack() as usize].id;
            (condemned.contains(p), *p, d.offset())
        };
        // Buckets are about equal (ids are uniform): an equal share each.
        let threads = match index.len() {
            n if n < 1 << 16 => 1,
            _ => std::thread::available_parallelism().map_or(2, |n| n.get()),
        };
        std::thread::scope(|s| {
            for share in index.buckets.chunks_mut(BUCKETS.div_ceil(threads)) {
                s.spawn(move || {
                    let mut sorter = Sorter::default();
                    for b in share {
                        sorter.sort(b);
                        dedup(b, rank);
                    }
                });
            }
        });
        index
    }
}

/// Sorts buckets by their tails: a counting sort on the first two bytes
/// (a bucket of 100k chunks falls into runs of one or two), then each run
/// on its own. A comparison sort moved every 35-43 byte record some 17
/// times; this moves it twice.
struct Sorter<D: Copy> {
    scratch: Vec<Rec<D>>,
    starts: Vec<u32>,
}

impl<D: Copy> Default for Sorter<D> {
    fn default() -> Self {
        Sorter {
            scratch: Vec::new(),
            starts: Vec::new(),
        }
    }
}

impl<D: Copy> Sorter<D> {
    fn sort(&mut self, bucket: &mut [Rec<D>]) {
        // Small buckets (small repositories): not worth 64k counters.
        if bucket.len() < COUNTING_SORT_FROM {
            bucket.sort_unstable_by(|a, b| cmp_tail(&a.tail, &b.tail));
            return;
        }
        if self.starts.is_empty() {
            self.starts = vec![0; 1 << 16];
        }
        let key = |r: &Rec<D>| u16::from_be_bytes([r.tail[0], r.tail[1]]) as usize;
        self.starts.fill(0);
        for r in bucket.iter() {
            self.starts[key(r)] += 1;
        }
        let mut at = 0;
        for s in self.starts.iter_mut() {
            let n = *s;
            *s = at;
            at += n;
        }
        self.scratch.clear();
        self.scratch.extend_from_slice(bucket);
        for r in self.scratch.iter() {
            let slot = &mut self.starts[key(r)];
            bucket[*slot as usize] = *r;
            *slot += 1;
        }
        // `starts` now holds each run's end.
        let mut from = 0;
        for &end in self.starts.iter() {
            let end = end as usize;
            if end - from > 1 {
                bucket[from..end].sort_unstable_by(|a, b| cmp_tail(&a.tail, &b.tail));
            }
            from = end;
        }
    }
}

/// Keeps one record per id in a sorted bucket: the best by `rank`.
fn dedup<D: Detail, R: Ord>(bucket: &mut Vec<Rec<D>>, rank: impl Fn(&Rec<D>) -> R) {
    let mut kept = 0;
    for i in 0..bucket.len() {
        let r = bucket[i];
        if kept > 0 && bucket[kept - 1].tail == r.tail {
            if rank(&r) < rank(&bucket[kept - 1]) {
                bucket[kept - 1] = r;
            }
        } else {
            bucket[kept] = r;
            kept += 1;
        }
    }
    bucket.truncate(kept);
    bucket.shrink_to_fit();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn condemned_packs_are_read_but_not_reused() {
        let chunk = Id::random();
        let pack = |off| PackInfo {
            id: Id::random(),
            salt: [1; 32],
            blobs: vec![BlobEntry {
                id: chunk,
                offset: off,
                len: 10,
            }],
            object: None,
        };
        let (old, new) = (pack(36), pack(72));
        let mut condemned = IdSet::default();
        condemned.insert(old.id);
        let mut b = IndexBuilder::<Loc>::new(condemned.clone());
        b.add_pack(&old);
        let ix = b.finish();
        assert!(ix.contains(&chunk) && !ix.reusable(&chunk));
        let mut b = IndexBuilder::<Loc>::new(condemned.clone());
        b.add_pack(&old);
        b.add_pack(&new);
        let ix = b.finish();
        assert!(ix.reusable(&chunk));
        assert_eq!(ix.get(&chunk).unwrap().offset, 72, "the live copy wins");
        // In the other order too.
        let mut b = IndexBuilder::<Loc>::new(condemned);
        b.add_pack(&new);
        b.add_pack(&old);
        assert_eq!(b.finish().get(&chunk).unwrap().offset, 72);
    }

    /// The sorted table answers as the hash map it replaced did, on random
    /// packs with shared chunks, condemned packs and absent ids: same
    /// membership, same reusability, a location in a pack that holds the
    /// chunk (the one the map's rule picks when there is one best); and
    /// a backup's table (packs only) names the reader's pack for each.
    #[test]
    fn sorted_table_lookups_equal_the_hash_map_on_random_data() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(32);
        let pool: Vec<Id> = (0..5000).map(|_| Id(rng.gen())).collect();
        let packs: Vec<PackInfo> = (0..400)
            .map(|_| {
                let n = rng.gen_range(1..40);
                PackInfo {
                    id: Id(rng.gen()),
                    salt: [0; 32],
                    blobs: (0..n)
                        .map(|k| BlobEntry {
                            id: pool[rng.gen_range(0..pool.len())],
                            offset: 36 + 100 * k,
                            len: 1 + rng.gen_range(0..1000),
                        })
                        .collect(),
                    object: None,
                }
            })
            .collect();
        let condemned: IdSet = packs.iter().step_by(7).map(|p| p.id).collect();
        // The old structure: first seen wins, a live pack beats a condemned one.
        let mut map: IdMap<(Id, u32, u32)> = IdMap::default();
        let mut holders: IdMap<Vec<(Id, u32, u32)>> = IdMap::default();
        let mut b = IndexBuilder::<Loc>::new(condemned.clone());
        let mut d = IndexBuilder::<InPack>::new(condemned.clone());
        for p in &packs {
            b.add_pack(p);
            d.add_pack(p);
            for bl in &p.blobs {
                let here = (p.id, bl.offset, bl.len);
                holders.entry(bl.id).or_default().push(here);
                let e = map.entry(bl.id).or_insert(here);
                if condemned.contains(&e.0) && !condemned.contains(&p.id) {
                    *e = here;
                }
            }
        }
        let ix = b.finish();
        let dedup = d.finish();
        assert_eq!(ix.len(), map.len());
        assert_eq!(dedup.len(), map.len());
        let absent = (0..1000).map(|_| Id(rng.gen()));
        for id in pool.iter().copied().chain(absent) {
            let old = map.get(&id);
            assert_eq!(ix.contains(&id), old.is_some());
            let old_reusable = old.is_some_and(|o| !condemned.contains(&o.0));
            assert_eq!(ix.reusable(&id), old_reusable, "{id}");
            assert_eq!(dedup.reusable(&id), old_reusable, "{id}");
            if let Some(loc) = ix.get(&id) {
                let here = (ix.pack(&loc).id, loc.offset, loc.len);
                assert!(holders[&id].contains(&here), "{id}: a place that holds it");
                assert_eq!(
                    condemned.contains(&here.0),
                    condemned.contains(&old.unwrap().0)
                );
                // A backup's index names the same pack as a reader's.
                let inpack = dedup.get(&id).expect("in both");
                assert_eq!(dedup.pack(&inpack).id, here.0, "{id}");
            } else {
                assert!(dedup.get(&id).is_none());
            }
        }
        let mut sorted: Vec<Id> = ix.iter().map(|(id, _)| id).collect();
        sorted.dedup();
        assert_eq!(sorted.len(), ix.len(), "each chunk once");
        assert!(sorted.windows(2).all(|w| w[0] < w[1]));
    }

    /// The counting sort of large buckets orders them as a comparison sort
    /// does, duplicates and ids sharing their first bytes included.
    #[test]
    fn counting_sort_equals_a_comparison_sort() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut recs: Vec<Rec<InPack>> = (0..3 * COUNTING_SORT_FROM)
            .map(|i| {
                let mut tail: [u8; 31] = rng.gen();
                if i % 5 == 0 {
                    tail[..6].copy_from_slice(&[1, 2, 3, 4, 5, 6]);
                }
                Rec {
                    tail,
                    detail: InPack(i as u32),
                }
            })
            .collect();
        let dup: Vec<Rec<InPack>> = recs.iter().step_by(9).copied().collect();
        recs.extend(dup);
        let mut want = recs.clone();
        want.sort_by_key(|r| r.tail);
        Sorter::default().sort(&mut recs);
        assert!(recs.len() >= COUNTING_SORT_FROM);
        let tails = |v: &[Rec<InPack>]| v.iter().map(|r| r.tail).collect::<Vec<_>>();
        assert_eq!(tails(&recs), tails(&want));
    }

    /// A pack listed twice is one pack; two packs whose ids share their
    /// first 8 bytes stay two; packs of one session share one salt.
    #[test]
    fn packs_are_kept_once_by_whole_id() {
        let one = |id: Id, salt: u8, chunk: Id| PackInfo {
            id,
            salt: [salt; 32],
            blobs: vec![BlobEntry {
                id: chunk,
                offset: 36,
                len: 10,
            }],
            object: None,
        };
        let a = Id::random();
        let mut b = a;
        b.0[31] ^= 1;
        let (ca, cb, cc) = (Id::random(), Id::random(), Id::random());
        let mut bld = IndexBuilder::<Loc>::default();
        bld.add_pack(&one(a, 1, ca));
        bld.add_pack(&one(b, 1, cb));
        bld.add_pack(&one(a, 1, ca));
        bld.add_pack(&one(Id::random(), 2, cc));
        let ix = bld.finish();
        assert_eq!((ix.packs().len(), ix.salts.len(), ix.len()), (3, 2, 3));
        let (la, lb, lc) = (
            ix.get(&ca).unwrap(),
            ix.get(&cb).unwrap(),
            ix.get(&cc).unwrap(),
        );
        assert_eq!((ix.pack(&la).id, ix.pack(&lb).id), (a, b));
        assert_eq!((ix.salt(&la), ix.salt(&lc)), (&[1; 32], &[2; 32]));
    }
}
