//! [`MetaApp`]: applies metadata commands inside the Raft state machine.
//!
//! `apply` is deterministic and defensive: it validates everything again
//! (a command may come from any node or a replayed log) and, when it
//! refuses a command, clears the batch so that nothing but the applied index
//! is written.

use std::collections::HashSet;

use granary_core::tree::{decode_object, EntryData, FileContent, TreeObject};
use granary_core::{validate_dataset_name, ChunkId, TreeId};
use granary_raft::App;
use rocksdb::{WriteBatch, DB};

use super::command::{dataset_not_found, version_not_found, MetaCommand, MetaError, MetaReply, MetaResult};
use super::state::*;

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
                r: Reader { db },
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

fn check_name(name: &str) -> Result<(), MetaError> {
    validate_dataset_name(name).map_err(|e| MetaError::InvalidArgument(e.to_string()))
}

impl Applier<'_, '_> {
    fn put<T: serde::Serialize>(&mut self, cf: &str, key: &[u8], v: &T) {
        self.batch.put_cf(self.r.cf(cf), key, encode(v));
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
                }
                // Keep a tombstone so the version numbers are never reused.
                ds.deleted = true;
                ds.latest = None;
                ds.versions = 0;
                self.put(CF_DATASETS, name.as_bytes(), &ds);
                Ok(MetaReply::Unit)
            }
            MetaCommand::PutTrees { objects } => self.put_trees(objects),
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
                let next = match self
                    .r
                    .db
                    .get_cf(self.r.cf(CF_COUNTERS), COUNTER_PACK_ID)
                    .map_err(|e| internal(e.to_string()))?
                {
                    Some(v) => {
                        u64::from_be_bytes(
                            v.as_slice()
                                .try_into()
                                .map_err(|_| internal("bad counter".into()))?,
                        ) + 1
                    }
                    None => 1,
                };
                self.batch
                    .put_cf(self.r.cf(CF_COUNTERS), COUNTER_PACK_ID, next.to_be_bytes());
                Ok(MetaReply::PackId(next))
            }
            MetaCommand::RegisterPack { id, pack, chunks } => {
                if self.r.exists(CF_PACKS, &id.to_be_bytes()).map_err(internal)? {
                    // A retried registration (the first attempt's reply was lost) is a no-op.
                    return Ok(MetaReply::Unit);
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
        }
    }

    /// Stores tree objects after checking each hashes to its id, decodes, and
    /// references only stored (or earlier in this batch) trees and chunks.
    fn put_trees(&mut self, objects: Vec<(Vec<u8>, Vec<u8>)>) -> MetaResult {
        let mut added: HashSet<TreeId> = HashSet::new();
        let mut stored = 0u32;
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
            let mut trees: Vec<TreeId> = Vec::new();
            let mut chunks: Vec<ChunkId> = Vec::new();
            match &object {
                TreeObject::Tree(t) => {
                    for e in t.entries() {
                        match &e.data {
                            EntryData::Dir { tree } => trees.push(*tree),
                            EntryData::File { content, .. } => match content {
                                FileContent::Inline(list) => chunks.extend(list.iter().map(|c| c.id)),
                                FileContent::Spilled { list, .. } => trees.push(*list),
                            },
                            EntryData::Symlink { .. } => {}
                        }
                    }
                }
                TreeObject::ChunkList(list) => chunks.extend(list.iter().map(|c| c.id)),
            }
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
        assert!(Reader { db: &db }.dataset_record("ds").unwrap().is_none());
        apply(
            &db,
            MetaCommand::PutTrees {
                objects: vec![(root.as_bytes().to_vec(), tree)],
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
        assert!(Reader { db: &db }.dataset("ds").unwrap().is_none());
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
}
