//! [`MetaApp`]: applies metadata commands inside the Raft state machine.
//!
//! `apply` is deterministic and defensive: it validates everything again
//! (a command may come from any node or a replayed log) and, when it
//! refuses a command, clears the batch so that nothing but the applied index
//! is written.

use std::collections::HashSet;

use granary_core::tree::decode_object;
use granary_core::{validate_dataset_name, ChunkId, TreeId};
use granary_raft::App;
use rocksdb::{WriteBatch, DB};

use super::command::{dataset_not_found, version_not_found, MetaCommand, MetaError, MetaReply, MetaResult};
use super::state::*;
use super::walk::Reach;

/// The metadata model as a Raft application.
#[derive(Debug, Default, Clone, Copy)]
pub struct MetaApp;

impl App for MetaApp {
    fn column_families(&self) -> &'static [&'static str] {
        COLUMN_FAMILIES
    }

    fn apply(&self, db: &DB, batch: &mut WriteBatch, index: u64, command: &[u8]) -> Vec<u8> {
        let result = match MetaCommand::decode(command) {
            Ok(cmd) => Applier {
                r: Reader::new(db),
                batch,
            }
            .apply(cmd),
            Err(e) => Err(MetaError::InvalidArgument(e)),
        };
        if let Err(e) = &result {
            batch.clear();
            tracing::debug!(index, "command refused: {e}");
        }
        bincode::serialize(&result).expect("results serialize")
    }
}

struct Applier<'a, 'b> {
    r: Reader<'a>,
    batch: &'b mut WriteBatch,
}

fn internal(e: String) -> MetaError {
    MetaError::Internal(e)
}

fn check_tier(tier: &str) -> Result<(), MetaError> {
    if tier == TIER_SSD || tier == TIER_OBJECT {
        Ok(())
    } else {
        Err(MetaError::InvalidArgument(format!(
            "unknown tier '{tier}': use {TIER_SSD} or {TIER_OBJECT}"
        )))
    }
}

fn check_name(name: &str) -> Result<(), MetaError> {
    validate_dataset_name(name).map_err(|e| MetaError::InvalidArgument(e.to_string()))
}

impl Applier<'_, '_> {
    fn put<T: serde::Serialize>(&mut self, cf: &str, key: &[u8], v: &T) {
        self.batch.put_cf(self.r.cf(cf), key, encode(v));
    }

    /// Ends a move of pack `id` (the queue entry goes): its home tier becomes
    /// `to` with `replicas`, and `drop_object` forgets the object copy.
    /// Refused if that would leave the pack with no copy.
    fn end_move(&mut self, id: u64, to: String, replicas: Vec<u64>, drop_object: bool) -> MetaResult {
        self.batch.delete_cf(self.r.cf(CF_MOVES), id.to_be_bytes());
        let Some(mut pack) = self.r.pack(id).map_err(internal)? else {
            // Deleted by GC meanwhile: nothing left to move.
            return Ok(MetaReply::Unit);
        };
        pack.tier = to;
        if drop_object {
            pack.object_key.clear();
        }
        self.set_replicas(id, pack, replicas)
    }

    /// Refused unless the queued move of pack `id` is the one to `to`
    /// queued at `queued_ms`: a task working on an older move changes nothing.
    fn check_queued(&self, id: u64, to: &str, queued_ms: u64) -> Result<(), MetaError> {
        let queued = self
            .r
            .get::<MoveRecord>(CF_MOVES, &id.to_be_bytes())
            .map_err(internal)?;
        let refused = match queued {
            Some(m) if m.to == to && m.queued_ms == queued_ms => return Ok(()),
            Some(m) => format!(
                "pack {id} was queued again (to {}) while it moved to {to}; the newer move goes on",
                m.to
            ),
            None => format!("the move of pack {id} to {to} is no longer queued (another task ended it)"),
        };
        Err(MetaError::FailedPrecondition(refused))
    }

    /// Records `object_key` as pack `id`'s object copy.
    fn record_object(&mut self, id: u64, object_key: String) -> MetaResult {
        let mut pack = self.existing_pack(id)?;
        if object_key.is_empty() {
            return Err(MetaError::InvalidArgument("object key must not be empty".into()));
        }
        pack.object_key = object_key;
        self.put(CF_PACKS, &id.to_be_bytes(), &pack);
        Ok(MetaReply::Unit)
    }

    /// Stores `pack` with `replicas`, refused if it would have no copy left.
    fn set_replicas(&mut self, id: u64, mut pack: PackRecord, replicas: Vec<u64>) -> MetaResult {
        pack.replicas = replicas;
        if !pack.has_copy() {
            return Err(MetaError::FailedPrecondition(format!(
                "pack {id} would have no copy left; the change is refused"
            )));
        }
        self.put(CF_PACKS, &id.to_be_bytes(), &pack);
        Ok(MetaReply::Unit)
    }

    fn apply(&mut self, cmd: MetaCommand) -> MetaResult {
        match cmd {
            MetaCommand::CreateDataset { name, now_ms } => {
                check_name(&name)?;
                let previous = self.r.dataset_record(&name).map_err(internal)?;
                if previous.as_ref().is_some_and(|d| !d.deleted) {
                    return Err(MetaError::AlreadyExists(format!(
                        "dataset '{name}' already exists"
                    )));
                }
                let record = DatasetRecord {
                    created_ms: now_ms,
                    next_version: previous.map_or(1, |d| d.next_version),
                    latest: None,
                    versions: 0,
                    deleted: false,
                };
                self.put(CF_DATASETS, name.as_bytes(), &record);
                Ok(MetaReply::Dataset { name, record })
            }
            MetaCommand::DeleteDataset { name } => {
                check_name(&name)?;
                let mut ds = self
                    .r
                    .dataset(&name)
                    .map_err(internal)?
                    .ok_or_else(|| dataset_not_found(&name))?;
                for (n, _) in self.r.versions(&name).map_err(internal)? {
                    self.batch
                        .delete_cf(self.r.cf(CF_VERSIONS), version_key(&name, n));
                    self.batch.delete_cf(self.r.cf(CF_PINS), version_key(&name, n));
                }
                // Keep a tombstone so the version numbers are never reused.
                ds.deleted = true;
                ds.latest = None;
                ds.versions = 0;
                self.put(CF_DATASETS, name.as_bytes(), &ds);
                Ok(MetaReply::Unit)
            }
            MetaCommand::PutTrees { objects, now_ms } => self.put_trees(objects, now_ms),
            MetaCommand::CommitVersion {
                dataset,
                root,
                parent,
                force,
                message,
                stats,
                now_ms,
            } => {
                check_name(&dataset)?;
                let root: [u8; 32] = root
                    .as_slice()
                    .try_into()
                    .map_err(|_| MetaError::InvalidArgument("root tree id must be 32 bytes".into()))?;
                let mut ds = match self.r.dataset_record(&dataset).map_err(internal)? {
                    Some(d) if !d.deleted => d,
                    previous => DatasetRecord {
                        created_ms: now_ms,
                        next_version: previous.map_or(1, |d| d.next_version),
                        latest: None,
                        versions: 0,
                        deleted: false,
                    },
                };
                if !force && parent != ds.latest {
                    let have = match ds.latest {
                        Some(l) => format!("the latest is {dataset}@{l}"),
                        None => format!("'{dataset}' has no versions"),
                    };
                    let claimed = match parent {
                        Some(p) => format!("{dataset}@{p}"),
                        None => "no parent".to_string(),
                    };
                    return Err(MetaError::FailedPrecondition(format!(
                        "stale parent: this commit was made from {claimed} but {have}; \
                         upload again on top of the latest version, or pass --force"
                    )));
                }
                if !self.r.exists(CF_TREES, &root).map_err(internal)? {
                    return Err(MetaError::FailedPrecondition(format!(
                        "tree {} is not stored; upload the version's trees and data before committing",
                        TreeId::from_bytes(root)
                    )));
                }
                // The root may be an old tree that GC has marked dead: logging
                // it makes a sweep computed before this commit keep it and
                // everything it reaches (see crate::gc).
                self.log_tree(
                    &TreeId::from_bytes(root),
                    self.r.counter(COUNTER_TREE_SEQ).map_err(internal)? + 1,
                    now_ms,
                );
                let number = ds.next_version;
                let record = VersionRecord {
                    root,
                    parent: ds.latest,
                    message,
                    created_ms: now_ms,
                    stats,
                };
                ds.next_version += 1;
                ds.latest = Some(number);
                ds.versions += 1;
                self.put(CF_DATASETS, dataset.as_bytes(), &ds);
                self.put(CF_VERSIONS, &version_key(&dataset, number), &record);
                Ok(MetaReply::Version {
                    dataset,
                    number,
                    record,
                })
            }
            MetaCommand::DeleteVersion { dataset, number } => {
                check_name(&dataset)?;
                let mut ds = self
                    .r
                    .dataset(&dataset)
                    .map_err(internal)?
                    .ok_or_else(|| dataset_not_found(&dataset))?;
                if self.r.version(&dataset, number).map_err(internal)?.is_none() {
                    return Err(version_not_found(&dataset, number));
                }
                self.batch
                    .delete_cf(self.r.cf(CF_VERSIONS), version_key(&dataset, number));
                self.batch
                    .delete_cf(self.r.cf(CF_PINS), version_key(&dataset, number));
                ds.versions -= 1;
                if ds.latest == Some(number) {
                    ds.latest = self
                        .r
                        .versions(&dataset)
                        .map_err(internal)?
                        .into_iter()
                        .map(|(n, _)| n)
                        .filter(|n| *n != number)
                        .max();
                }
                self.put(CF_DATASETS, dataset.as_bytes(), &ds);
                Ok(MetaReply::Unit)
            }
            MetaCommand::AllocatePack => {
                let next = self.r.counter(COUNTER_PACK_ID).map_err(internal)? + 1;
                self.batch
                    .put_cf(self.r.cf(CF_COUNTERS), COUNTER_PACK_ID, next.to_be_bytes());
                Ok(MetaReply::PackId(next))
            }
            MetaCommand::RegisterPack { id, pack, chunks } => {
                if self.r.exists(CF_PACKS, &id.to_be_bytes()).map_err(internal)? {
                    // A retried registration (the first attempt's reply was lost) is a no-op.
                    return Ok(MetaReply::Unit);
                }
                if !pack.has_copy() {
                    return Err(MetaError::InvalidArgument(format!(
                        "pack {id} names no replica and no object copy; it is not registered"
                    )));
                }
                let keys: Vec<&[u8]> = chunks.iter().map(|(k, _)| k.as_slice()).collect();
                let present = self.r.exist_many(CF_CHUNKS, &keys).map_err(internal)?;
                let mut seen = HashSet::new();
                for ((key, loc), present) in chunks.iter().zip(present) {
                    // The first stored copy of a chunk stays authoritative; later
                    // copies are dead bytes that compaction reclaims.
                    if !present && seen.insert(*key) {
                        self.put(CF_CHUNKS, key, loc);
                    }
                }
                self.put(CF_PACKS, &id.to_be_bytes(), &pack);
                Ok(MetaReply::Unit)
            }
            MetaCommand::UpsertNode { id, node } => {
                self.put(CF_NODES, &id.to_be_bytes(), &node);
                Ok(MetaReply::Unit)
            }
            MetaCommand::RemoveNodeRecord { id } => {
                self.batch.delete_cf(self.r.cf(CF_NODES), id.to_be_bytes());
                Ok(MetaReply::Unit)
            }
            MetaCommand::QueueMoves {
                packs,
                to,
                pin,
                unpin,
                by,
                now_ms,
            } => {
                check_tier(&to)?;
                for (dataset, number) in &pin {
                    if self.r.version(dataset, *number).map_err(internal)?.is_some() {
                        let pin = PinRecord {
                            by: by.clone(),
                            pinned_ms: now_ms,
                        };
                        self.put(CF_PINS, &version_key(dataset, *number), &pin);
                    }
                }
                for (dataset, number) in &unpin {
                    self.batch
                        .delete_cf(self.r.cf(CF_PINS), version_key(dataset, *number));
                }
                let mut queued = 0;
                for id in packs {
                    let same = self
                        .r
                        .get::<MoveRecord>(CF_MOVES, &id.to_be_bytes())
                        .map_err(internal)?
                        .is_some_and(|m| m.to == to);
                    if same {
                        // Already queued that way: keep the entry, so a move
                        // in flight can still end it (`EndMove` checks it).
                        queued += 1;
                    } else if self.r.pack(id).map_err(internal)?.is_some() {
                        let record = MoveRecord {
                            to: to.clone(),
                            queued_ms: now_ms,
                        };
                        self.put(CF_MOVES, &id.to_be_bytes(), &record);
                        queued += 1;
                    }
                }
                Ok(MetaReply::Stored(queued))
            }
            MetaCommand::PackUploaded { id, object_key } => self.record_object(id, object_key),
            MetaCommand::FinishMove {
                id,
                to,
                replicas,
                drop_object,
            } => {
                check_tier(&to)?;
                self.end_move(id, to, replicas, drop_object)
            }
            MetaCommand::EndMove {
                id,
                to,
                queued_ms,
                replicas,
                drop_object,
            } => {
                check_tier(&to)?;
                self.check_queued(id, &to, queued_ms)?;
                self.end_move(id, to, replicas, drop_object)
            }
            MetaCommand::MoveUploaded {
                id,
                queued_ms,
                object_key,
            } => {
                self.check_queued(id, TIER_OBJECT, queued_ms)?;
                let pack = self.existing_pack(id)?;
                if !pack.object_key.is_empty() && pack.object_key != object_key {
                    return Err(MetaError::FailedPrecondition(format!(
                        "pack {id} already lists the object {}; {object_key} is not recorded",
                        pack.object_key
                    )));
                }
                self.record_object(id, object_key)
            }
            MetaCommand::ReplaceReplicas {
                id,
                expected,
                replicas,
            } => {
                let pack = self.existing_pack(id)?;
                if pack.replicas != expected {
                    return Err(MetaError::FailedPrecondition(format!(
                        "the replicas of pack {id} changed meanwhile (now {:?}, expected {expected:?}); read them again",
                        pack.replicas
                    )));
                }
                self.set_replicas(id, pack, replicas)
            }
            MetaCommand::SetReplicas { id, replicas } => {
                let pack = self.existing_pack(id)?;
                self.set_replicas(id, pack, replicas)
            }
            MetaCommand::TouchPacks { reads } => {
                for (id, ms) in reads {
                    let key = id.to_be_bytes();
                    if !self.r.exists(CF_PACKS, &key).map_err(internal)? {
                        continue;
                    }
                    let old = self.r.u64_at(CF_ACCESS, &key).map_err(internal)?;
                    if ms > old {
                        self.batch.put_cf(self.r.cf(CF_ACCESS), key, ms.to_be_bytes());
                    }
                }
                Ok(MetaReply::Unit)
            }
            MetaCommand::SetPolicy {
                dataset,
                cold_after_secs,
            } => {
                if !dataset.is_empty() {
                    check_name(&dataset)?;
                }
                match cold_after_secs {
                    Some(secs) => self.put(
                        CF_POLICIES,
                        dataset.as_bytes(),
                        &PolicyRecord {
                            cold_after_secs: secs,
                        },
                    ),
                    None => self.batch.delete_cf(self.r.cf(CF_POLICIES), dataset.as_bytes()),
                }
                Ok(MetaReply::Unit)
            }
            MetaCommand::GcSweep {
                mark_seq,
                now_ms,
                grace_ms,
                trees,
                chunks,
                packs,
            } => self.gc_sweep(mark_seq, now_ms, grace_ms, trees, chunks, packs),
            MetaCommand::CompactPack {
                old,
                new_id,
                pack,
                chunks,
            } => {
                let old_record = self.existing_pack(old)?;
                let new_key = new_id.to_be_bytes();
                if self.r.exists(CF_PACKS, &new_key).map_err(internal)? {
                    return Err(MetaError::AlreadyExists(format!(
                        "pack {new_id} is already registered"
                    )));
                }
                if !pack.has_copy() {
                    return Err(MetaError::InvalidArgument(format!("pack {new_id} has no copy")));
                }
                let mut moved = 0;
                for (key, loc) in &chunks {
                    let current: Option<ChunkRecord> = self.r.get(CF_CHUNKS, key).map_err(internal)?;
                    if current.is_some_and(|c| c.pack == old) {
                        self.put(CF_CHUNKS, key, loc);
                        moved += 1;
                    }
                }
                self.put(CF_PACKS, &new_key, &pack);
                self.forget_pack(old);
                Ok(MetaReply::Compacted {
                    moved,
                    old: old_record,
                })
            }
        }
    }

    fn existing_pack(&self, id: u64) -> Result<PackRecord, MetaError> {
        self.r
            .pack(id)
            .map_err(internal)?
            .ok_or_else(|| MetaError::NotFound(format!("pack {id} is not registered")))
    }

    /// Appends `id` to the tree log as entry `seq` (which must be the next one).
    fn log_tree(&mut self, id: &TreeId, seq: u64, now_ms: u64) {
        let mut key = seq.to_be_bytes().to_vec();
        key.extend_from_slice(id.as_bytes());
        self.batch
            .put_cf(self.r.cf(CF_TREE_LOG), key, now_ms.to_be_bytes());
        self.batch
            .put_cf(self.r.cf(CF_COUNTERS), COUNTER_TREE_SEQ, seq.to_be_bytes());
    }

    /// Deletes a pack's record and everything kept about it.
    fn forget_pack(&mut self, id: u64) {
        let key = id.to_be_bytes();
        for cf in [CF_PACKS, CF_MOVES, CF_ACCESS] {
            self.batch.delete_cf(self.r.cf(cf), key);
        }
    }

    /// Applies a GC sweep; see [`MetaCommand::GcSweep`].
    fn gc_sweep(
        &mut self,
        mark_seq: u64,
        now_ms: u64,
        grace_ms: u64,
        trees: Vec<[u8; 32]>,
        chunks: Vec<[u8; 32]>,
        packs: Vec<u64>,
    ) -> MetaResult {
        // Trees stored after the mark, and everything they reach, stay.
        let mut after_mark: Vec<TreeId> = Vec::new();
        let log = self.r.cf(CF_TREE_LOG);
        let mut prune = Vec::new();
        for item in self.r.db.iterator_cf(log, rocksdb::IteratorMode::Start) {
            let (k, v) = item.map_err(|e| internal(e.to_string()))?;
            let Some((seq, tree, added)) = tree_log_entry(&k, &v) else {
                continue;
            };
            if seq > mark_seq {
                after_mark.push(tree);
            } else if added.saturating_add(grace_ms) < now_ms {
                prune.push(k.to_vec());
            }
        }
        let mut protected = Reach::default();
        let trees_cf = self.r.cf(CF_TREES);
        protected
            .add_stored(after_mark, |t| {
                self.r
                    .db
                    .get_cf(trees_cf, t.as_bytes())
                    .map_err(|e| e.to_string())
            })
            .map_err(internal)?;
        let (protected_trees, protected_chunks) = (protected.trees, protected.chunks);
        for k in prune {
            self.batch.delete_cf(log, k);
        }

        let mut swept_trees = 0;
        for t in trees {
            if !protected_trees.contains(&TreeId::from_bytes(t)) {
                self.batch.delete_cf(self.r.cf(CF_TREES), t);
                swept_trees += 1;
            }
        }
        let mut swept_chunks = 0;
        let mut kept_packs: HashSet<u64> = HashSet::new();
        let mut pack_cache: std::collections::HashMap<u64, Option<PackRecord>> = Default::default();
        for c in chunks {
            let Some(rec) = self.r.get::<ChunkRecord>(CF_CHUNKS, &c).map_err(internal)? else {
                continue;
            };
            let pack = match pack_cache.get(&rec.pack) {
                Some(p) => p.clone(),
                None => {
                    let p = self.r.pack(rec.pack).map_err(internal)?;
                    pack_cache.insert(rec.pack, p.clone());
                    p
                }
            };
            let young = pack
                .as_ref()
                .is_some_and(|p| p.registered_ms.saturating_add(grace_ms) > now_ms);
            if young || protected_chunks.contains(&ChunkId::from_bytes(c)) {
                kept_packs.insert(rec.pack);
                continue;
            }
            self.batch.delete_cf(self.r.cf(CF_CHUNKS), c);
            swept_chunks += 1;
        }
        let mut dropped = Vec::new();
        for id in packs {
            // A pack the mover is working on stays until its move ends (a
            // later GC takes it): forgetting it now would orphan the object
            // a move to the object tier is uploading (or has uploaded and
            // not yet recorded), which no one would ever delete.
            if kept_packs.contains(&id) || self.r.exists(CF_MOVES, &id.to_be_bytes()).map_err(internal)? {
                continue;
            }
            let Some(p) = self.r.pack(id).map_err(internal)? else {
                continue;
            };
            if p.registered_ms.saturating_add(grace_ms) > now_ms {
                continue;
            }
            self.forget_pack(id);
            dropped.push((id, p));
        }
        Ok(MetaReply::Swept {
            trees: swept_trees,
            chunks: swept_chunks,
            packs: dropped,
        })
    }

    /// Stores tree objects after checking each hashes to its id, decodes, and
    /// references only stored (or earlier in this batch) trees and chunks.
    fn put_trees(&mut self, objects: Vec<(Vec<u8>, Vec<u8>)>, now_ms: u64) -> MetaResult {
        let mut added: HashSet<TreeId> = HashSet::new();
        let mut stored = 0u32;
        let mut seq = self.r.counter(COUNTER_TREE_SEQ).map_err(internal)?;
        for (id, data) in &objects {
            let id = TreeId::from_slice(id)
                .filter(|_| id.len() == 32)
                .ok_or_else(|| MetaError::InvalidArgument("tree id must be 32 bytes".into()))?;
            if TreeId::of(data) != id {
                return Err(MetaError::InvalidArgument(format!(
                    "tree object {id} does not hash to its id; the upload is damaged, run it again"
                )));
            }
            if added.contains(&id) || self.r.exists(CF_TREES, id.as_bytes()).map_err(internal)? {
                continue;
            }
            let object = decode_object(data)
                .map_err(|e| MetaError::InvalidArgument(format!("tree object {id} is invalid: {e}")))?;
            let (trees, chunks): (Vec<TreeId>, Vec<ChunkId>) = object.references();
            for t in trees {
                if !added.contains(&t) && !self.r.exists(CF_TREES, t.as_bytes()).map_err(internal)? {
                    return Err(MetaError::FailedPrecondition(format!(
                        "tree object {id} references tree {t}, which is not stored; store children before parents"
                    )));
                }
            }
            let keys: Vec<&[u8]> = chunks.iter().map(|c| c.as_bytes().as_slice()).collect();
            let present = self.r.exist_many(CF_CHUNKS, &keys).map_err(internal)?;
            if let Some((c, _)) = chunks.iter().zip(&present).find(|(_, p)| !**p) {
                return Err(MetaError::FailedPrecondition(format!(
                    "tree object {id} references chunk {c}, which is not stored; upload its data first"
                )));
            }
            self.batch.put_cf(self.r.cf(CF_TREES), id.as_bytes(), data);
            seq += 1;
            self.log_tree(&id, seq, now_ms);
            added.insert(id);
            stored += 1;
        }
        Ok(MetaReply::Stored(stored))
    }
}

#[cfg(test)]
mod tests {
    use granary_core::Tree;
    use rocksdb::WriteBatch;

    use super::*;
    use crate::meta::command::MetaResult;

    fn apply(db: &DB, cmd: MetaCommand) -> MetaResult {
        let mut batch = WriteBatch::default();
        let out = MetaApp.apply(db, &mut batch, 1, &cmd.encode());
        db.write(batch).unwrap();
        bincode::deserialize(&out).unwrap()
    }

    fn commit(db: &DB, dataset: &str, root: &TreeId, parent: Option<u64>) -> MetaResult {
        apply(
            db,
            MetaCommand::CommitVersion {
                dataset: dataset.into(),
                root: root.as_bytes().to_vec(),
                parent,
                force: false,
                message: String::new(),
                stats: Stats::default(),
                now_ms: 1,
            },
        )
    }

    #[test]
    fn version_numbers_are_never_reused_and_refusals_write_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let db = granary_raft::store::open_db(dir.path(), COLUMN_FAMILIES).unwrap();
        let tree = Tree::new(vec![]).unwrap().encode();
        let root = TreeId::of(&tree);
        // Committing before the tree is stored is refused, and leaves nothing behind.
        assert!(matches!(
            commit(&db, "ds", &root, None),
            Err(MetaError::FailedPrecondition(_))
        ));
        assert!(Reader::new(&db).dataset_record("ds").unwrap().is_none());
        apply(
            &db,
            MetaCommand::PutTrees {
                objects: vec![(root.as_bytes().to_vec(), tree)],
                now_ms: 1,
            },
        )
        .unwrap();
        for n in 1..=2 {
            let parent = (n > 1).then_some(n - 1);
            assert!(
                matches!(commit(&db, "ds", &root, parent), Ok(MetaReply::Version { number, .. }) if number == n)
            );
        }
        apply(&db, MetaCommand::DeleteDataset { name: "ds".into() }).unwrap();
        assert!(Reader::new(&db).dataset("ds").unwrap().is_none());
        // Recreated: numbering continues at 3, so "ds@1" never names two versions.
        assert!(matches!(
            commit(&db, "ds", &root, None),
            Ok(MetaReply::Version { number: 3, .. })
        ));
        assert!(matches!(
            apply(
                &db,
                MetaCommand::CreateDataset {
                    name: "ds".into(),
                    now_ms: 2
                }
            ),
            Err(MetaError::AlreadyExists(_))
        ));
    }

    /// A one-file tree whose file is the single chunk `data`, stored with its
    /// pack (registered at `registered_ms`). Returns (root, chunk key, pack id).
    fn store_file(db: &DB, data: &[u8], pack: u64, registered_ms: u64) -> (TreeId, [u8; 32], u64) {
        use granary_core::tree::{EntryData, FileContent, Timestamp, TreeEntry};
        use granary_core::ChunkRef;
        let chunk = ChunkId::of(data);
        let record = PackRecord {
            tier: TIER_SSD.into(),
            replicas: vec![1],
            bytes: 100,
            chunks: 1,
            object_key: String::new(),
            registered_ms,
        };
        let loc = ChunkRecord {
            pack,
            offset: 24,
            stored_len: data.len() as u32,
            raw_len: data.len() as u32,
        };
        apply(
            db,
            MetaCommand::RegisterPack {
                id: pack,
                pack: record,
                chunks: vec![(*chunk.as_bytes(), loc)],
            },
        )
        .unwrap();
        let tree = Tree::new(vec![TreeEntry {
            name: b"f".to_vec(),
            mode: 0o644,
            mtime: Timestamp::default(),
            data: EntryData::File {
                size: data.len() as u64,
                content: FileContent::Inline(vec![ChunkRef {
                    id: chunk,
                    len: data.len() as u32,
                }]),
            },
        }])
        .unwrap()
        .encode();
        let root = TreeId::of(&tree);
        apply(
            db,
            MetaCommand::PutTrees {
                objects: vec![(root.as_bytes().to_vec(), tree)],
                now_ms: registered_ms,
            },
        )
        .unwrap();
        (root, *chunk.as_bytes(), pack)
    }

    fn sweep(
        db: &DB,
        mark_seq: u64,
        trees: Vec<[u8; 32]>,
        chunks: Vec<[u8; 32]>,
        packs: Vec<u64>,
    ) -> MetaReply {
        apply(
            db,
            MetaCommand::GcSweep {
                mark_seq,
                now_ms: 10_000,
                grace_ms: 1_000,
                trees,
                chunks,
                packs,
            },
        )
        .unwrap()
    }

    #[test]
    fn gc_sweep_deletes_dead_data_and_keeps_what_arrived_after_the_mark() {
        let dir = tempfile::tempdir().unwrap();
        let db = granary_raft::store::open_db(dir.path(), COLUMN_FAMILIES).unwrap();
        let r = Reader::new(&db);
        // Old, unreferenced data: swept, and its pack forgotten.
        let (root, chunk, pack) = store_file(&db, b"old", 1, 1);
        let mark = r.counter(COUNTER_TREE_SEQ).unwrap();
        match sweep(&db, mark, vec![*root.as_bytes()], vec![chunk], vec![pack]) {
            MetaReply::Swept { trees, chunks, packs } => {
                assert_eq!((trees, chunks, packs.len()), (1, 1, 1));
            }
            other => panic!("{other:?}"),
        }
        assert!(!r.exists(CF_TREES, root.as_bytes()).unwrap());
        assert!(!r.exists(CF_CHUNKS, &chunk).unwrap());
        assert!(r.pack(pack).unwrap().is_none());

        // Dead at the mark, but committed again before the sweep applies
        // (dedup of an old root): everything it reaches is kept.
        let (root, chunk, pack) = store_file(&db, b"again", 2, 1);
        let mark = r.counter(COUNTER_TREE_SEQ).unwrap();
        commit(&db, "ds", &root, None).unwrap();
        match sweep(&db, mark, vec![*root.as_bytes()], vec![chunk], vec![pack]) {
            MetaReply::Swept { trees, chunks, packs } => assert_eq!((trees, chunks, packs.len()), (0, 0, 0)),
            other => panic!("{other:?}"),
        }
        assert!(r.exists(CF_TREES, root.as_bytes()).unwrap());
        assert!(r.exists(CF_CHUNKS, &chunk).unwrap());

        // A chunk of a pack registered within the grace period is kept, and so is its pack.
        let (_, chunk, pack) = store_file(&db, b"young", 3, 9_500);
        let mark = r.counter(COUNTER_TREE_SEQ).unwrap();
        match sweep(&db, mark, vec![], vec![chunk], vec![pack]) {
            MetaReply::Swept { chunks, packs, .. } => assert_eq!((chunks, packs.len()), (0, 0)),
            other => panic!("{other:?}"),
        }
        assert!(r.pack(pack).unwrap().is_some());
    }

    #[test]
    fn gc_sweep_keeps_a_pack_the_mover_is_moving_until_the_move_ends() {
        let dir = tempfile::tempdir().unwrap();
        let db = granary_raft::store::open_db(dir.path(), COLUMN_FAMILIES).unwrap();
        let r = Reader::new(&db);
        let (root, chunk, pack) = store_file(&db, b"moving", 1, 1);
        let queue = MetaCommand::QueueMoves {
            packs: vec![pack],
            to: TIER_OBJECT.into(),
            pin: vec![],
            unpin: vec![],
            by: "manual".into(),
            now_ms: 1,
        };
        apply(&db, queue).unwrap();
        // Dead, but queued: its chunk goes, the pack (and the object the
        // mover may be uploading) stays.
        let mark = r.counter(COUNTER_TREE_SEQ).unwrap();
        match sweep(&db, mark, vec![*root.as_bytes()], vec![chunk], vec![pack]) {
            MetaReply::Swept { chunks, packs, .. } => assert_eq!((chunks, packs.len()), (1, 0)),
            other => panic!("{other:?}"),
        }
        assert!(r.pack(pack).unwrap().is_some());
        // The move ends; the next sweep forgets the pack with its object.
        let key = "packs/0000000000000001.pack".to_string();
        apply(
            &db,
            MetaCommand::PackUploaded {
                id: pack,
                object_key: key.clone(),
            },
        )
        .unwrap();
        let finish = MetaCommand::FinishMove {
            id: pack,
            to: TIER_OBJECT.into(),
            replicas: vec![],
            drop_object: false,
        };
        apply(&db, finish).unwrap();
        match sweep(&db, mark, vec![], vec![], vec![pack]) {
            MetaReply::Swept { packs, .. } => {
                assert_eq!(packs.len(), 1);
                assert_eq!(packs[0].1.object_key, key);
            }
            other => panic!("{other:?}"),
        }
        assert!(r.pack(pack).unwrap().is_none());
    }

    /// Records `packs/7.pack` as pack `id`'s object copy.
    fn record_object(db: &DB, id: u64) {
        let object_key = "packs/7.pack".into();
        apply(db, MetaCommand::PackUploaded { id, object_key }).unwrap();
    }

    #[test]
    fn a_move_ends_only_as_queued_and_replica_changes_are_compare_and_set() {
        let dir = tempfile::tempdir().unwrap();
        let db = granary_raft::store::open_db(dir.path(), COLUMN_FAMILIES).unwrap();
        let r = Reader::new(&db);
        let (_, _, pack) = store_file(&db, b"data", 7, 1);
        let queue = |to: &str, now_ms| MetaCommand::QueueMoves {
            packs: vec![pack],
            to: to.into(),
            pin: vec![],
            unpin: vec![],
            by: "manual".into(),
            now_ms,
        };
        let queued = |r: &Reader| r.get::<MoveRecord>(CF_MOVES, &pack.to_be_bytes()).unwrap();
        apply(&db, queue(TIER_OBJECT, 10)).unwrap();
        // Queued again the same way: the entry (and its time) stays, so the
        // move in flight can still end it.
        apply(&db, queue(TIER_OBJECT, 20)).unwrap();
        assert_eq!(queued(&r).unwrap().queued_ms, 10);
        // Only the queued move records its object, and only one object.
        let uploaded = |queued_ms, key: &str| MetaCommand::MoveUploaded {
            id: pack,
            queued_ms,
            object_key: key.into(),
        };
        assert!(matches!(
            apply(&db, uploaded(20, "packs/a.pack")),
            Err(MetaError::FailedPrecondition(_))
        ));
        assert_eq!(r.pack(pack).unwrap().unwrap().object_key, "");
        apply(&db, uploaded(10, "packs/b.pack")).unwrap();
        apply(&db, uploaded(10, "packs/b.pack")).unwrap();
        assert!(matches!(
            apply(&db, uploaded(10, "packs/c.pack")),
            Err(MetaError::FailedPrecondition(_))
        ));
        assert_eq!(r.pack(pack).unwrap().unwrap().object_key, "packs/b.pack");
        let end = |to: &str, queued_ms| MetaCommand::EndMove {
            id: pack,
            to: to.into(),
            queued_ms,
            replicas: vec![],
            drop_object: false,
        };
        // The user asks for the way back while the move to the object tier
        // runs: the old move's end is refused and changes nothing.
        apply(&db, queue(TIER_SSD, 30)).unwrap();
        assert!(matches!(
            apply(&db, end(TIER_OBJECT, 10)),
            Err(MetaError::FailedPrecondition(_))
        ));
        let p = r.pack(pack).unwrap().unwrap();
        assert_eq!((p.tier.as_str(), p.replicas.clone()), (TIER_SSD, vec![1]));
        assert_eq!(queued(&r).unwrap().to, TIER_SSD);
        assert!(matches!(
            apply(&db, uploaded(10, "packs/d.pack")),
            Err(MetaError::FailedPrecondition(_))
        ));
        // The queued move ends; ending it a second time (a stale task) is refused.
        let back = MetaCommand::EndMove {
            id: pack,
            to: TIER_SSD.into(),
            queued_ms: 30,
            replicas: vec![1, 2],
            drop_object: true,
        };
        apply(&db, back.clone()).unwrap();
        assert!(queued(&r).is_none());
        let p = r.pack(pack).unwrap().unwrap();
        assert_eq!((p.replicas.clone(), p.object_key.as_str()), (vec![1, 2], ""));
        assert!(matches!(apply(&db, back), Err(MetaError::FailedPrecondition(_))));
        // A stale mover of the first move cannot record its object now.
        assert!(matches!(
            apply(&db, uploaded(10, "packs/e.pack")),
            Err(MetaError::FailedPrecondition(_))
        ));
        assert_eq!(r.pack(pack).unwrap().unwrap().object_key, "");

        // Replica lists change only from the list the writer read.
        let replace = |expected: Vec<u64>, replicas: Vec<u64>| MetaCommand::ReplaceReplicas {
            id: pack,
            expected,
            replicas,
        };
        assert!(matches!(
            apply(&db, replace(vec![1], vec![1, 3])),
            Err(MetaError::FailedPrecondition(_))
        ));
        apply(&db, replace(vec![1, 2], vec![1, 2, 3])).unwrap();
        assert_eq!(r.pack(pack).unwrap().unwrap().replicas, vec![1, 2, 3]);
        assert!(matches!(
            apply(&db, replace(vec![1, 2, 3], vec![])),
            Err(MetaError::FailedPrecondition(_))
        ));

        // A pack with no copy anywhere is not registered.
        let nowhere = PackRecord {
            tier: TIER_SSD.into(),
            replicas: vec![],
            bytes: 10,
            chunks: 0,
            object_key: String::new(),
            registered_ms: 1,
        };
        assert!(matches!(
            apply(
                &db,
                MetaCommand::RegisterPack {
                    id: 99,
                    pack: nowhere,
                    chunks: vec![]
                }
            ),
            Err(MetaError::InvalidArgument(_))
        ));
        assert!(r.pack(99).unwrap().is_none());
    }

    #[test]
    fn packs_always_keep_a_copy_and_compaction_repoints_only_its_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let db = granary_raft::store::open_db(dir.path(), COLUMN_FAMILIES).unwrap();
        let r = Reader::new(&db);
        let (_, chunk, pack) = store_file(&db, b"data", 7, 1);
        // Finishing a move to the object tier without an object copy is refused.
        let finish = |drop_object| MetaCommand::FinishMove {
            id: pack,
            to: TIER_OBJECT.into(),
            replicas: vec![],
            drop_object,
        };
        assert!(matches!(
            apply(&db, finish(false)),
            Err(MetaError::FailedPrecondition(_))
        ));
        assert!(matches!(
            apply(
                &db,
                MetaCommand::SetReplicas {
                    id: pack,
                    replicas: vec![]
                }
            ),
            Err(MetaError::FailedPrecondition(_))
        ));
        record_object(&db, pack);
        apply(&db, finish(false)).unwrap();
        let p = r.pack(pack).unwrap().unwrap();
        assert_eq!((p.tier.as_str(), p.replicas.len()), (TIER_OBJECT, 0));
        // ... and it cannot lose the object copy now.
        assert!(matches!(
            apply(&db, finish(true)),
            Err(MetaError::FailedPrecondition(_))
        ));

        // Compaction re-points the chunk and forgets the old pack.
        let loc = ChunkRecord {
            pack: 8,
            offset: 24,
            stored_len: 4,
            raw_len: 4,
        };
        let new = PackRecord {
            tier: TIER_OBJECT.into(),
            replicas: vec![],
            bytes: 50,
            chunks: 1,
            object_key: "packs/8.pack".into(),
            registered_ms: 2,
        };
        let reply = apply(
            &db,
            MetaCommand::CompactPack {
                old: pack,
                new_id: 8,
                pack: new,
                chunks: vec![(chunk, loc), ([9; 32], loc)],
            },
        )
        .unwrap();
        assert!(matches!(reply, MetaReply::Compacted { moved: 1, .. }));
        assert_eq!(r.get::<ChunkRecord>(CF_CHUNKS, &chunk).unwrap(), Some(loc));
        assert!(
            !r.exists(CF_CHUNKS, &[9; 32]).unwrap(),
            "a chunk it did not hold is not created"
        );
        assert!(r.pack(pack).unwrap().is_none());
    }
}
