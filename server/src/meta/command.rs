//! The metadata commands that travel through Raft, their replies and errors.
//!
//! A command is one Raft entry and is applied all-or-nothing. Everything
//! that must be identical on every replica (timestamps, new numbers) is
//! decided by the proposing node and carried in the command or derived from
//! the state, never read from a replica's clock.

use serde::{Deserialize, Serialize};

use super::state::{ChunkRecord, DatasetRecord, NodeRecord, PackRecord, Stats, VersionRecord};

/// A chunk id as stored in commands.
pub type ChunkKey = [u8; 32];

/// One metadata mutation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaCommand {
    CreateDataset {
        name: String,
        now_ms: u64,
    },
    /// Deletes a dataset and all its versions.
    DeleteDataset {
        name: String,
    },
    /// Stores tree objects (trees and chunk lists), children before parents.
    PutTrees {
        objects: Vec<(Vec<u8>, Vec<u8>)>,
        now_ms: u64,
    },
    CommitVersion {
        dataset: String,
        #[serde(with = "serde_bytes")]
        root: Vec<u8>,
        parent: Option<u64>,
        force: bool,
        message: String,
        stats: Stats,
        now_ms: u64,
    },
    DeleteVersion {
        dataset: String,
        number: u64,
    },
    AllocatePack,
    /// Records a sealed pack and the location of every chunk in it.
    RegisterPack {
        id: u64,
        pack: PackRecord,
        chunks: Vec<([u8; 32], ChunkRecord)>,
    },
    /// Registers a node or refreshes its heartbeat.
    UpsertNode {
        id: u64,
        node: NodeRecord,
    },
    /// Forgets a node (removed from the cluster); its pack replicas are
    /// re-replicated by the repair loop.
    RemoveNodeRecord {
        id: u64,
    },
    /// Pins or unpins versions to the object tier and queues pack moves.
    QueueMoves {
        packs: Vec<u64>,
        /// [`TIER_SSD`](super::state::TIER_SSD) or [`TIER_OBJECT`](super::state::TIER_OBJECT).
        to: String,
        pin: Vec<(String, u64)>,
        unpin: Vec<(String, u64)>,
        /// `manual` or `policy`.
        by: String,
        now_ms: u64,
    },
    /// A pack's copy is now stored (and verified) in the object tier, not
    /// checked against the move queue. Written by builds before 2026-12-07
    /// and still applied from their log entries; the mover now proposes
    /// [`MetaCommand::MoveUploaded`].
    PackUploaded {
        id: u64,
        object_key: String,
    },
    /// Ends a move without checking which move is queued. Written by builds
    /// before 2026-12-04 and still applied from their log entries; the mover
    /// now proposes [`MetaCommand::EndMove`].
    FinishMove {
        id: u64,
        to: String,
        replicas: Vec<u64>,
        drop_object: bool,
    },
    /// Replaces a pack's SSD replica set unconditionally. Written by builds
    /// before 2026-12-04; repair and the mover now propose
    /// [`MetaCommand::ReplaceReplicas`].
    SetReplicas {
        id: u64,
        replicas: Vec<u64>,
    },
    /// Last read times of packs, reported by chunk servers.
    TouchPacks {
        reads: Vec<(u64, u64)>,
    },
    /// Sets (`Some`) or clears (`None`) the tiering policy of a dataset
    /// (empty name: the default for every dataset).
    SetPolicy {
        dataset: String,
        cold_after_secs: Option<u64>,
    },
    /// Garbage collection's sweep, computed from a snapshot taken when the
    /// tree log ended at `mark_seq`. Trees added after that (and everything
    /// they reference) and chunks of packs registered within `grace_ms` are
    /// kept whatever the lists say.
    GcSweep {
        mark_seq: u64,
        now_ms: u64,
        grace_ms: u64,
        trees: Vec<ChunkKey>,
        chunks: Vec<ChunkKey>,
        packs: Vec<u64>,
    },
    /// Compaction: registers pack `new_id` (holding copies of `old`'s live
    /// chunks), re-points those chunks to it and forgets `old`.
    CompactPack {
        old: u64,
        new_id: u64,
        pack: PackRecord,
        chunks: Vec<(ChunkKey, ChunkRecord)>,
    },
    /// Ends the queued move `(to, queued_ms)` of pack `id`: the pack's home
    /// tier becomes `to` with these SSD replicas, `drop_object` forgets the
    /// object copy, and the queue entry goes. Refused (nothing changes) when
    /// the queue holds a different move for the pack (re-queued meanwhile)
    /// or none (another mover task finished it): a mover that lost the race
    /// must not act on what it read before.
    EndMove {
        id: u64,
        to: String,
        queued_ms: u64,
        replicas: Vec<u64>,
        drop_object: bool,
    },
    /// Replaces a pack's SSD replica set if it still is `expected` (repair,
    /// the mover); refused when another change came first, so a list read
    /// before a slow copy never overwrites a newer one.
    ReplaceReplicas {
        id: u64,
        expected: Vec<u64>,
        replicas: Vec<u64>,
    },
    /// The queued move of pack `id` to the object tier (queued at
    /// `queued_ms`) stored and verified its copy as `object_key`. Refused
    /// when that move is no longer the queued one, or the pack already
    /// lists another object: a stale mover never records an object that a
    /// newer move, or GC's orphan sweep, may delete.
    MoveUploaded {
        id: u64,
        queued_ms: u64,
        object_key: String,
    },
}

impl MetaCommand {
    pub fn encode(&self) -> Vec<u8> {
        bincode::serialize(self).expect("commands serialize")
    }

    pub fn decode(b: &[u8]) -> Result<Self, String> {
        bincode::deserialize(b).map_err(|e| format!("malformed metadata command: {e}"))
    }
}

/// What a command returns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaReply {
    Unit,
    Dataset {
        name: String,
        record: DatasetRecord,
    },
    Version {
        dataset: String,
        number: u64,
        record: VersionRecord,
    },
    Stored(u32),
    PackId(u64),
    /// What a sweep removed; the packs' copies can now be deleted.
    Swept {
        trees: u64,
        chunks: u64,
        packs: Vec<(u64, PackRecord)>,
    },
    /// A compaction's result: chunks re-pointed and the old pack's record.
    Compacted {
        moved: u64,
        old: PackRecord,
    },
}

/// Why a command was refused. The message is the user-facing line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum MetaError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Internal(String),
}

impl From<MetaError> for tonic::Status {
    fn from(e: MetaError) -> Self {
        match e {
            MetaError::InvalidArgument(m) => tonic::Status::invalid_argument(m),
            MetaError::NotFound(m) => tonic::Status::not_found(m),
            MetaError::AlreadyExists(m) => tonic::Status::already_exists(m),
            MetaError::FailedPrecondition(m) => tonic::Status::failed_precondition(m),
            MetaError::Internal(m) => tonic::Status::internal(m),
        }
    }
}

/// The result of applying a command, as stored in the Raft response.
pub type MetaResult = Result<MetaReply, MetaError>;

/// "dataset 'x' not found" with the fix.
pub fn dataset_not_found(name: &str) -> MetaError {
    MetaError::NotFound(format!(
        "dataset '{name}' not found; `granary datasets` lists them"
    ))
}

/// "version x@n not found" with the fix.
pub fn version_not_found(dataset: &str, number: u64) -> MetaError {
    MetaError::NotFound(format!(
        "version {dataset}@{number} not found; `granary log {dataset}` lists its versions"
    ))
}
