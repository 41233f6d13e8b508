//! The packs as the index objects and the bucket listing know them, and
//! what the mark phase found in each. Only counts are kept per pack; a
//! pack's blob list is read again from its index object when a repack or
//! a sweep needs it (few packs, and index objects never change).

use std::sync::Mutex;

use super::table::{ChunkTable, Held};
use crate::error::Result;
use crate::format::id::{Id, IdMap, IdSet};
use crate::format::pack::PackInfo;
use crate::format::{index, layout};
use crate::repo::{each_index_object, lock, Repository};

pub(super) struct Packs {
    /// Every pack object in the bucket, with its size.
    size: IdMap<u64>,
    /// Indexed packs by position (the positions [`Held::pack`] names).
    ids: Vec<Id>,
    pos: IdMap<u32>,
    /// Each index object's name and the positions of the packs it lists.
    objects: Vec<(String, Vec<u32>)>,
    /// The first index object each pack was read from.
    object_of: Vec<u32>,
    /// Per position: chunk bytes, live chunk bytes, and whether deleting
    /// it would lose a live chunk ([`Packs::tally`]).
    blob_bytes: Vec<u64>,
    live_bytes: Vec<u64>,
    needed: Vec<bool>,
}

impl Packs {
    /// Reads every index object (each one's blobs go into the table as it
    /// arrives, so no object's packs are held after it is read), then
    /// lists the pack objects. The table comes back sealed.
    pub fn load(repo: &Repository) -> Result<(Packs, ChunkTable)> {
        let shared = Mutex::new((Packs::new(), ChunkTable::default()));
        each_index_object(
            repo.backend().as_ref(),
            None,
            // An index object spends at least 40 bytes on each chunk it lists.
            |bytes| lock(&shared).1.reserve((bytes / 40) as usize),
            |name, bytes| {
                let list = index::open(repo.keys(), &bytes, name)?;
                let mut guard = lock(&shared);
                let (packs, table) = &mut *guard;
                let object = packs.objects.len() as u32;
                let positions = list.iter().map(|p| packs.add(p, object, table)).collect();
                packs.objects.push((name.to_string(), positions));
                Ok(())
            },
        )?;
        let (mut packs, mut table) = shared.into_inner().unwrap_or_else(|e| e.into_inner());
        for o in repo.backend().list(layout::DATA)? {
            // Hidden temp files and anything that is not a pack name.
            if let Some(id) = layout::pack_id(&o.name) {
                packs.size.insert(id, o.size);
            }
        }
        table.seal();
        Ok((packs, table))
    }

    fn new() -> Self {
        Packs {
            size: IdMap::default(),
            ids: Vec::new(),
            pos: IdMap::default(),
            objects: Vec::new(),
            object_of: Vec::new(),
            blob_bytes: Vec::new(),
            live_bytes: Vec::new(),
            needed: Vec::new(),
        }
    }

    /// A pack's position; its blobs go into `table` the first time only.
    fn add(&mut self, p: &PackInfo, object: u32, table: &mut ChunkTable) -> u32 {
        if let Some(&pos) = self.pos.get(&p.id) {
            return pos;
        }
        let pos = self.ids.len() as u32;
        self.ids.push(p.id);
        self.pos.insert(p.id, pos);
        self.object_of.push(object);
        for b in &p.blobs {
            table.add(Held {
                id: b.id,
                pack: pos,
                len: b.len,
            });
        }
        pos
    }

    /// Counts, once the table is marked, each pack's chunk bytes and live
    /// chunk bytes, and whether it is *needed*: it holds a live chunk with
    /// no copy in an existing pack outside `condemned`.
    pub fn tally(&mut self, table: &ChunkTable, condemned: &IdSet) {
        let n = self.ids.len();
        let (mut blob_bytes, mut live_bytes, mut needed) = (vec![0; n], vec![0; n], vec![false; n]);
        let good = |pack: u32| {
            let id = &self.ids[pack as usize];
            !condemned.contains(id) && self.size.contains_key(id)
        };
        for (live, copies) in table.chunks() {
            for h in copies {
                blob_bytes[h.pack as usize] += u64::from(h.len);
                if live {
                    live_bytes[h.pack as usize] += u64::from(h.len);
                }
            }
            if !live {
                continue;
            }
            // Two distinct good holders at most tell everything.
            let mut goods = copies.iter().map(|h| h.pack).filter(|&q| good(q));
            let first = goods.next();
            let second = first.and_then(|f| goods.find(|&q| q != f));
            for h in copies {
                let spare_elsewhere = match (first, second) {
                    (Some(_), Some(_)) => true,
                    (Some(q), None) => q != h.pack,
                    (None, _) => false,
                };
                needed[h.pack as usize] |= !spare_elsewhere;
            }
        }
        (self.blob_bytes, self.live_bytes, self.needed) = (blob_bytes, live_bytes, needed);
    }

    pub fn exists(&self, p: &Id) -> bool {
        self.size.contains_key(p)
    }

    /// The pack objects listed, with their sizes.
    pub fn listed(&self) -> &IdMap<u64> {
        &self.size
    }

    pub fn size_of(&self, p: &Id) -> u64 {
        self.size.get(p).copied().unwrap_or(0)
    }

    pub fn blob_bytes(&self, p: &Id) -> u64 {
        self.pos.get(p).map_or(0, |&i| self.blob_bytes[i as usize])
    }

    pub fn live_bytes(&self, p: &Id) -> u64 {
        self.pos.get(p).map_or(0, |&i| self.live_bytes[i as usize])
    }

    /// Whether deleting `p` would lose a live chunk (see [`Self::tally`]);
    /// a pack no index lists holds nothing anyone can find.
    pub fn needed(&self, p: &Id) -> bool {
        self.pos.get(p).is_some_and(|&i| self.needed[i as usize])
    }

    /// What the index says each of `wanted` holds, read again from their
    /// index objects (absent: not indexed).
    pub fn infos(&self, repo: &Repository, wanted: &[Id]) -> Result<IdMap<PackInfo>> {
        let mut by_object: std::collections::BTreeMap<u32, IdSet> = Default::default();
        for p in wanted {
            if let Some(&i) = self.pos.get(p) {
                by_object
                    .entry(self.object_of[i as usize])
                    .or_default()
                    .insert(*p);
            }
        }
        let mut out = IdMap::default();
        for (o, ids) in by_object {
            let list = repo.load_index_object(&self.objects[o as usize].0)?;
            out.extend(
                list.into_iter()
                    .filter(|p| ids.contains(&p.id))
                    .map(|p| (p.id, p)),
            );
        }
        Ok(out)
    }

    /// The index objects that list any of `packs`, by name.
    pub fn objects_listing<'a>(&'a self, packs: &'a IdSet) -> impl Iterator<Item = &'a str> + 'a {
        self.objects
            .iter()
            .filter(|(_, ps)| ps.iter().any(|&i| packs.contains(&self.ids[i as usize])))
            .map(|(n, _)| n.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::pack::BlobEntry;
    use rand::{Rng, SeedableRng};

    /// The counts and the *needed* rule over the marked table equal the old
    /// rules over a set of live ids and every pack's blob list, on random
    /// packs sharing chunks, some condemned, some gone from the bucket,
    /// some listed twice.
    #[test]
    fn tallies_equal_the_rules_over_a_live_set() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let pool: Vec<Id> = (0..3000).map(|_| Id(rng.gen())).collect();
        let infos: Vec<PackInfo> = (0..500)
            .map(|_| PackInfo {
                id: Id(rng.gen()),
                salt: [0; 32],
                blobs: (0..rng.gen_range(1..20))
                    .map(|k| BlobEntry {
                        id: pool[rng.gen_range(0..pool.len())],
                        offset: 36 + 1000 * k,
                        len: rng.gen_range(1..1000),
                    })
                    .collect(),
                object: None,
            })
            .collect();
        let live: IdSet = pool.iter().filter(|_| rng.gen_bool(0.4)).copied().collect();
        let condemned: IdSet = infos.iter().step_by(5).map(|p| p.id).collect();
        let mut packs = Packs::new();
        let mut table = ChunkTable::default();
        for (k, p) in infos.iter().enumerate() {
            if k % 9 != 0 {
                packs.size.insert(p.id, 1 << 20);
            }
            packs.add(p, 0, &mut table);
            if k % 4 == 0 {
                packs.add(p, 1, &mut table); // listed by a second object
            }
        }
        table.seal();
        live.iter().for_each(|id| table.mark(id));
        packs.tally(&table, &condemned);

        let mut copies: IdMap<Vec<Id>> = IdMap::default();
        for p in &infos {
            for b in &p.blobs {
                copies.entry(b.id).or_default().push(p.id);
            }
        }
        let exists = |q: &Id| packs.size.contains_key(q);
        for p in &infos {
            let sum = |f: &dyn Fn(&BlobEntry) -> bool| {
                p.blobs
                    .iter()
                    .filter(|b| f(b))
                    .map(|b| u64::from(b.len))
                    .sum::<u64>()
            };
            assert_eq!(packs.blob_bytes(&p.id), sum(&|_| true));
            assert_eq!(packs.live_bytes(&p.id), sum(&|b| live.contains(&b.id)));
            let needed = p.blobs.iter().any(|b| {
                live.contains(&b.id)
                    && !copies[&b.id]
                        .iter()
                        .any(|q| q != &p.id && !condemned.contains(q) && exists(q))
            });
            assert_eq!(packs.needed(&p.id), needed, "pack {}", p.id);
        }
        assert!(infos.iter().any(|p| packs.needed(&p.id)));
        assert!(infos
            .iter()
            .any(|p| !packs.needed(&p.id) && packs.live_bytes(&p.id) > 0));
        let indexed = live.iter().filter(|id| copies.contains_key(id)).count();
        assert_eq!(
            (table.live_count(), table.unindexed()),
            (indexed, live.len() - indexed)
        );
    }
}
