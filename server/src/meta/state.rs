//! Column families of the metadata state machine and their records.
//!
//! | column family | key | value |
//! |---|---|---|
//! | `datasets` | name | [`DatasetRecord`] |
//! | `versions` | name, 0x00, number (u64 BE) | [`VersionRecord`] |
//! | `trees` | tree id | the tree object's canonical bytes |
//! | `chunks` | chunk id | [`ChunkRecord`] |
//! | `packs` | pack id (u64 BE) | [`PackRecord`] |
//! | `nodes` | node id (u64 BE) | [`NodeRecord`] |
//! | `counters` | name | u64 BE |
//! | `moves` | pack id (u64 BE) | [`MoveRecord`]: a queued tier move |
//! | `pins` | version key | [`PinRecord`]: a version kept on the object tier |
//! | `policies` | dataset name (empty: every dataset) | [`PolicyRecord`] |
//! | `access` | pack id (u64 BE) | last read reported by a chunk server (ms, u64 BE) |
//! | `tree_log` | sequence (u64 BE), tree id | time added (ms, u64 BE) |
//!
//! `tree_log` lists every tree object in the order `PutTrees` added it, so
//! garbage collection can protect trees (and what they reference) that
//! arrived after it marked: see [`crate::gc`].
//!
//! Records are bincode prefixed with a format version byte ([`RECORD_VERSION`]);
//! a record with another version is an error, never misread, so a later
//! release can migrate them.

use granary_core::TreeId;
use rocksdb::DB;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub const CF_DATASETS: &str = "datasets";
pub const CF_VERSIONS: &str = "versions";
pub const CF_TREES: &str = "trees";
pub const CF_CHUNKS: &str = "chunks";
pub const CF_PACKS: &str = "packs";
pub const CF_NODES: &str = "nodes";
pub const CF_COUNTERS: &str = "counters";
pub const CF_MOVES: &str = "moves";
pub const CF_PINS: &str = "pins";
pub const CF_POLICIES: &str = "policies";
pub const CF_ACCESS: &str = "access";
pub const CF_TREE_LOG: &str = "tree_log";

/// Every column family of the metadata model, in snapshot order.
pub const COLUMN_FAMILIES: &[&str] = &[
    CF_DATASETS,
    CF_VERSIONS,
    CF_TREES,
    CF_CHUNKS,
    CF_PACKS,
    CF_NODES,
    CF_COUNTERS,
    CF_MOVES,
    CF_PINS,
    CF_POLICIES,
    CF_ACCESS,
    CF_TREE_LOG,
];

/// Format version of every record below.
pub const RECORD_VERSION: u8 = 1;

pub const COUNTER_PACK_ID: &[u8] = b"pack_id";
/// Sequence number of the last `tree_log` entry.
pub const COUNTER_TREE_SEQ: &[u8] = b"tree_seq";

pub const TIER_SSD: &str = "ssd";
pub const TIER_OBJECT: &str = "object";

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatasetRecord {
    pub created_ms: u64,
    /// Number the next version gets (versions are never renumbered).
    pub next_version: u64,
    /// The latest live version, if any.
    pub latest: Option<u64>,
    /// Live versions.
    pub versions: u64,
    /// Deleted datasets keep their record, so version numbers are never
    /// reused if the name is used again (`name@N` always means one version).
    pub deleted: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub bytes: u64,
    pub chunks: u64,
    pub new_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionRecord {
    pub root: [u8; 32],
    pub parent: Option<u64>,
    pub message: String,
    pub created_ms: u64,
    pub stats: Stats,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRecord {
    pub pack: u64,
    pub offset: u64,
    pub stored_len: u32,
    pub raw_len: u32,
}

impl ChunkRecord {
    /// Length of the chunk's whole frame in its pack (header + stored bytes).
    pub fn frame_len(&self) -> u64 {
        granary_core::frame::FRAME_HEADER_LEN as u64 + self.stored_len as u64
    }
}

/// A sealed pack and where its copies are. Invariant (checked by `apply`):
/// a pack always has an SSD replica or an object copy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackRecord {
    /// The pack's home tier: [`TIER_SSD`] or [`TIER_OBJECT`].
    pub tier: String,
    /// Chunk servers holding an SSD replica.
    pub replicas: Vec<u64>,
    pub bytes: u64,
    pub chunks: u64,
    /// Key of the pack's copy in the object tier; empty when there is none.
    pub object_key: String,
    pub registered_ms: u64,
}

impl PackRecord {
    /// True when the pack has at least one readable copy.
    pub fn has_copy(&self) -> bool {
        !self.replicas.is_empty() || !self.object_key.is_empty()
    }
}

/// A pack queued to move to another tier.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveRecord {
    /// [`TIER_SSD`] or [`TIER_OBJECT`].
    pub to: String,
    pub queued_ms: u64,
}

/// A version kept on the object tier (its packs move there once no
/// unpinned version references them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinRecord {
    /// `manual` (`granary admin tier move`) or `policy` (the cold-after policy).
    pub by: String,
    pub pinned_ms: u64,
}

/// A tiering policy: versions not read for `cold_after_secs` move to the object tier.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyRecord {
    pub cold_after_secs: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub addr: String,
    pub roles: Vec<String>,
    pub capacity: u64,
    pub used: u64,
    pub last_heartbeat_ms: u64,
}

/// Encodes a record with its version byte.
pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    let mut out = vec![RECORD_VERSION];
    bincode::serialize_into(&mut out, v).expect("records serialize");
    out
}

/// Decodes a record, checking its version byte.
pub fn decode<T: DeserializeOwned>(b: &[u8]) -> Result<T, String> {
    match b.split_first() {
        Some((&RECORD_VERSION, rest)) => {
            bincode::deserialize(rest).map_err(|e| format!("damaged metadata record: {e}"))
        }
        Some((v, _)) => Err(format!(
            "metadata record has format version {v}; this build reads {RECORD_VERSION}; upgrade granary"
        )),
        None => Err("empty metadata record".into()),
    }
}

/// Splits a version key into dataset name and number.
pub fn split_version_key(key: &[u8]) -> Option<(String, u64)> {
    if key.len() < 9 || key[key.len() - 9] != 0 {
        return None;
    }
    let (name, rest) = key.split_at(key.len() - 9);
    let n = u64::from_be_bytes(rest[1..].try_into().ok()?);
    Some((String::from_utf8(name.to_vec()).ok()?, n))
}

/// A `tree_log` entry: (sequence, tree id, time added in ms); `None` for a
/// malformed key.
pub fn tree_log_entry(key: &[u8], value: &[u8]) -> Option<(u64, TreeId, u64)> {
    if key.len() != 40 {
        return None;
    }
    let seq = u64::from_be_bytes(key[..8].try_into().ok()?);
    let added = u64::from_be_bytes(value.try_into().unwrap_or_default());
    Some((seq, TreeId::from_slice(&key[8..])?, added))
}

/// Key of version `number` of `dataset`.
pub fn version_key(dataset: &str, number: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(dataset.len() + 9);
    k.extend_from_slice(dataset.as_bytes());
    k.push(0);
    k.extend_from_slice(&number.to_be_bytes());
    k
}

/// Prefix of every version key of `dataset`.
pub fn version_prefix(dataset: &str) -> Vec<u8> {
    let mut k = dataset.as_bytes().to_vec();
    k.push(0);
    k
}

/// Typed reads of the state, shared by `apply` (which sees its own earlier
/// entries) and the service (which reads committed state).
pub struct Reader<'a> {
    pub db: &'a DB,
    /// Reads see this snapshot instead of the latest state: a view made of
    /// several reads that must agree (`tier status`) while entries apply.
    snapshot: Option<&'a rocksdb::Snapshot<'a>>,
}

impl<'a> Reader<'a> {
    /// Reads of the latest state.
    pub fn new(db: &'a DB) -> Self {
        Self { db, snapshot: None }
    }

    /// Reads of the state as it was when `snapshot` was taken.
    pub fn at(db: &'a DB, snapshot: &'a rocksdb::Snapshot<'a>) -> Self {
        Self {
            db,
            snapshot: Some(snapshot),
        }
    }

    fn opts(&self) -> rocksdb::ReadOptions {
        let mut o = rocksdb::ReadOptions::default();
        if let Some(s) = self.snapshot {
            o.set_snapshot(s);
        }
        o
    }

    pub fn cf(&self, name: &str) -> &'a rocksdb::ColumnFamily {
        self.db
            .cf_handle(name)
            .expect("metadata column families are created on open")
    }

    pub fn get<T: DeserializeOwned>(&self, cf: &str, key: &[u8]) -> Result<Option<T>, String> {
        match self
            .db
            .get_cf_opt(self.cf(cf), key, &self.opts())
            .map_err(|e| e.to_string())?
        {
            Some(v) => decode(&v).map(Some),
            None => Ok(None),
        }
    }

    pub fn exists(&self, cf: &str, key: &[u8]) -> Result<bool, String> {
        Ok(self
            .db
            .get_pinned_cf_opt(self.cf(cf), key, &self.opts())
            .map_err(|e| e.to_string())?
            .is_some())
    }

    /// Which of `keys` exist in `cf`.
    pub fn exist_many(&self, cf: &str, keys: &[&[u8]]) -> Result<Vec<bool>, String> {
        let handle = self.cf(cf);
        self.db
            .batched_multi_get_cf_opt(handle, keys, false, &self.opts())
            .into_iter()
            .map(|r| r.map(|v| v.is_some()).map_err(|e| e.to_string()))
            .collect()
    }

    /// A live (not deleted) dataset.
    pub fn dataset(&self, name: &str) -> Result<Option<DatasetRecord>, String> {
        Ok(self.dataset_record(name)?.filter(|d| !d.deleted))
    }

    /// A dataset's record, deleted or not.
    pub fn dataset_record(&self, name: &str) -> Result<Option<DatasetRecord>, String> {
        self.get(CF_DATASETS, name.as_bytes())
    }

    pub fn version(&self, dataset: &str, number: u64) -> Result<Option<VersionRecord>, String> {
        self.get(CF_VERSIONS, &version_key(dataset, number))
    }

    /// Every live version of `dataset`, oldest first.
    pub fn versions(&self, dataset: &str) -> Result<Vec<(u64, VersionRecord)>, String> {
        let prefix = version_prefix(dataset);
        let mut out = Vec::new();
        let it = self.db.iterator_cf_opt(
            self.cf(CF_VERSIONS),
            self.opts(),
            rocksdb::IteratorMode::From(&prefix, rocksdb::Direction::Forward),
        );
        for item in it {
            let (k, v) = item.map_err(|e| e.to_string())?;
            if !k.starts_with(&prefix) || k.len() != prefix.len() + 8 {
                break;
            }
            let n = u64::from_be_bytes(k[prefix.len()..].try_into().expect("8 bytes"));
            out.push((n, decode(&v)?));
        }
        Ok(out)
    }

    /// A u64 counter (0 when never set).
    pub fn counter(&self, name: &[u8]) -> Result<u64, String> {
        self.u64_at(CF_COUNTERS, name)
    }

    /// A big-endian u64 value (counters, pack read times); 0 when absent.
    pub fn u64_at(&self, cf: &str, key: &[u8]) -> Result<u64, String> {
        match self
            .db
            .get_cf_opt(self.cf(cf), key, &self.opts())
            .map_err(|e| e.to_string())?
        {
            Some(v) => Ok(u64::from_be_bytes(
                v.as_slice()
                    .try_into()
                    .map_err(|_| format!("damaged u64 in {cf}"))?,
            )),
            None => Ok(0),
        }
    }

    pub fn pack(&self, id: u64) -> Result<Option<PackRecord>, String> {
        self.get(CF_PACKS, &id.to_be_bytes())
    }

    /// Every record of `cf`, in key order.
    pub fn all<T: DeserializeOwned>(&self, cf: &str) -> Result<Vec<(Vec<u8>, T)>, String> {
        self.db
            .iterator_cf_opt(self.cf(cf), self.opts(), rocksdb::IteratorMode::Start)
            .map(|item| {
                let (k, v) = item.map_err(|e| e.to_string())?;
                Ok((k.to_vec(), decode(&v)?))
            })
            .collect()
    }
}
