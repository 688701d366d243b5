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
//!
//! Records are bincode prefixed with a format version byte ([`RECORD_VERSION`]);
//! a record with another version is an error, never misread, so a later
//! release can migrate them.

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

/// Every column family of the metadata model, in snapshot order.
pub const COLUMN_FAMILIES: &[&str] = &[
    CF_DATASETS,
    CF_VERSIONS,
    CF_TREES,
    CF_CHUNKS,
    CF_PACKS,
    CF_NODES,
    CF_COUNTERS,
];

/// Format version of every record below.
pub const RECORD_VERSION: u8 = 1;

pub const COUNTER_PACK_ID: &[u8] = b"pack_id";

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

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackRecord {
    /// `ssd` or `object`.
    pub tier: String,
    /// Chunk servers holding an SSD replica.
    pub replicas: Vec<u64>,
    pub bytes: u64,
    pub chunks: u64,
    /// Key in the object tier, when there.
    pub object_key: String,
    pub registered_ms: u64,
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
}

impl<'a> Reader<'a> {
    pub fn cf(&self, name: &str) -> &'a rocksdb::ColumnFamily {
        self.db
            .cf_handle(name)
            .expect("metadata column families are created on open")
    }

    pub fn get<T: DeserializeOwned>(&self, cf: &str, key: &[u8]) -> Result<Option<T>, String> {
        match self.db.get_cf(self.cf(cf), key).map_err(|e| e.to_string())? {
            Some(v) => decode(&v).map(Some),
            None => Ok(None),
        }
    }

    pub fn exists(&self, cf: &str, key: &[u8]) -> Result<bool, String> {
        Ok(self
            .db
            .get_pinned_cf(self.cf(cf), key)
            .map_err(|e| e.to_string())?
            .is_some())
    }

    /// Which of `keys` exist in `cf`.
    pub fn exist_many(&self, cf: &str, keys: &[&[u8]]) -> Result<Vec<bool>, String> {
        let handle = self.cf(cf);
        self.db
            .batched_multi_get_cf(handle, keys, false)
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
        let it = self.db.iterator_cf(
            self.cf(CF_VERSIONS),
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

    /// Every record of `cf`, in key order.
    pub fn all<T: DeserializeOwned>(&self, cf: &str) -> Result<Vec<(Vec<u8>, T)>, String> {
        self.db
            .iterator_cf(self.cf(cf), rocksdb::IteratorMode::Start)
            .map(|item| {
                let (k, v) = item.map_err(|e| e.to_string())?;
                Ok((k.to_vec(), decode(&v)?))
            })
            .collect()
    }
}
