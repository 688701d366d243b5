//! [`Cluster`]: one node's handle on the whole cluster, used by the `Meta`
//! service and the background work that runs on the leader (the tier mover,
//! re-replication, the policy scan) or on demand (GC, scrub).
//!
//! It bundles the Raft node (propose commands, read the applied state), the
//! object tier, gRPC clients for chunk servers, and placement: which chunk
//! servers are alive and which get a new copy of a pack.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use granary_client::chunk_proto::chunk_client::ChunkClient;
use granary_client::chunk_proto::ObjectStoreRequest;
use granary_client::proto::NodeInfo;
use granary_raft::{RaftNode, RaftNodeError};
use tonic::transport::Channel;
use tonic::Status;

use crate::chunk::peers::ChunkPeers;
use crate::meta::command::{MetaCommand, MetaReply, MetaResult};
use crate::meta::state::{NodeRecord, Reader, CF_NODES};
use crate::meta::MetaApp;
use granary_client::object::ObjectTier;

/// A chunk server that has not sent a heartbeat for this long is not given new packs.
pub const CHUNK_SERVER_TIMEOUT_MS: u64 = 90_000;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A Raft error as the gRPC status a client sees.
pub fn raft_status(e: RaftNodeError) -> Status {
    match e {
        RaftNodeError::Membership(_) => Status::failed_precondition(e.to_string()),
        _ => Status::unavailable(e.to_string()),
    }
}

pub fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

/// A node id from its big-endian key.
pub fn id_of(key: &[u8]) -> u64 {
    u64::from_be_bytes(key.try_into().unwrap_or_default())
}

/// The cluster as seen from this node; cheap to clone.
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

struct Inner {
    node: RaftNode<MetaApp>,
    objects: ObjectTier,
    /// Replicas per pack; 0 means min(3, live chunk servers).
    replicas: usize,
    /// Scratch space for whole packs (compaction, object-tier scrub).
    tmp_dir: std::path::PathBuf,
    peers: ChunkPeers,
    /// Packs a mover task of this node is working on now.
    moving: std::sync::Mutex<std::collections::HashSet<u64>>,
}

/// Marks a pack as being moved by this node until dropped ([`Cluster::moving`]).
pub struct MovingGuard {
    cluster: Cluster,
    id: u64,
}

impl Drop for MovingGuard {
    fn drop(&mut self) {
        self.cluster
            .inner
            .moving
            .lock()
            .expect("moving lock")
            .remove(&self.id);
    }
}

impl Cluster {
    pub fn new(
        node: RaftNode<MetaApp>,
        objects: ObjectTier,
        replicas: usize,
        tmp_dir: std::path::PathBuf,
        peers: ChunkPeers,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                node,
                objects,
                replicas,
                tmp_dir,
                peers,
                moving: Default::default(),
            }),
        }
    }

    pub fn node(&self) -> &RaftNode<MetaApp> {
        &self.inner.node
    }

    pub fn objects(&self) -> &ObjectTier {
        &self.inner.objects
    }

    /// Marks pack `id` as being moved by a mover task of this node until the
    /// guard is dropped; re-replication leaves such packs alone.
    pub fn moving(&self, id: u64) -> MovingGuard {
        self.inner.moving.lock().expect("moving lock").insert(id);
        MovingGuard {
            cluster: self.clone(),
            id,
        }
    }

    /// Whether a mover task of this node is working on pack `id` now.
    pub fn is_moving(&self, id: u64) -> bool {
        self.inner.moving.lock().expect("moving lock").contains(&id)
    }

    /// A new scratch directory (deleted when dropped) on the data disk.
    pub fn scratch(&self) -> std::io::Result<tempfile::TempDir> {
        std::fs::create_dir_all(&self.inner.tmp_dir)?;
        tempfile::tempdir_in(&self.inner.tmp_dir)
    }

    /// Typed reads of this node's applied state.
    pub fn reader(&self) -> Reader<'_> {
        Reader::new(self.inner.node.db())
    }

    /// A snapshot of the state, for [`reader_at`](Self::reader_at).
    pub fn snapshot(&self) -> rocksdb::Snapshot<'_> {
        self.inner.node.db().snapshot()
    }

    /// Reads of the state as of `snapshot`: several reads that must agree
    /// with each other while later entries apply.
    pub fn reader_at<'a>(&'a self, snapshot: &'a rocksdb::Snapshot<'a>) -> Reader<'a> {
        Reader::at(self.inner.node.db(), snapshot)
    }

    /// True while this node is the Raft leader.
    pub fn is_leader(&self) -> bool {
        self.inner.node.is_leader()
    }

    /// Commits a command through Raft and returns its reply.
    pub async fn propose(&self, cmd: MetaCommand) -> Result<MetaReply, Status> {
        let bytes = self.inner.node.write(cmd.encode()).await.map_err(raft_status)?;
        let result: MetaResult = bincode::deserialize(&bytes).map_err(internal)?;
        result.map_err(Status::from)
    }

    /// Waits until this node has applied everything committed before the call.
    pub async fn barrier(&self) -> Result<(), Status> {
        self.inner.node.read_barrier().await.map_err(raft_status)
    }

    /// A client for the chunk server at `addr`.
    pub fn chunk(&self, addr: &str) -> Result<ChunkClient<Channel>, Status> {
        self.inner.peers.client(addr)
    }

    /// Every registered chunk server, by id.
    pub fn chunk_nodes(&self) -> Result<Vec<(u64, NodeRecord)>, Status> {
        Ok(self
            .reader()
            .all::<NodeRecord>(CF_NODES)
            .map_err(internal)?
            .into_iter()
            .filter(|(_, n)| n.roles.iter().any(|r| r == "chunk"))
            .map(|(k, n)| (id_of(&k), n))
            .collect())
    }

    /// Chunk servers heard from within `max_age_ms`, sorted by id.
    pub fn live_chunk_nodes(&self, max_age_ms: u64) -> Result<Vec<(u64, NodeRecord)>, Status> {
        let now = now_ms();
        let mut live: Vec<(u64, NodeRecord)> = self
            .chunk_nodes()?
            .into_iter()
            .filter(|(_, n)| now.saturating_sub(n.last_heartbeat_ms) < max_age_ms)
            .collect();
        live.sort_by_key(|(id, _)| *id);
        Ok(live)
    }

    /// The address of node `id`, if registered.
    pub fn addr_of(&self, id: u64) -> Option<String> {
        self.reader()
            .get::<NodeRecord>(CF_NODES, &id.to_be_bytes())
            .ok()
            .flatten()
            .map(|n| n.addr)
    }

    /// Whether every node that touches the object tier names the same object
    /// store, so a pack moved there can be read, scrubbed and restored by any
    /// of them. With more than one node, refused (with the fix) when a node
    /// uses its default `file://DATA_DIR/objects`, which only it sees, or
    /// when two nodes name different stores, or while a live chunk server
    /// cannot be asked (it may be the one that differs).
    pub async fn check_shared_object_tier(&self) -> Result<(), Status> {
        let me = self.inner.node.id();
        let mut seen: Vec<(u64, String, bool)> = vec![(
            me,
            self.objects().url().to_string(),
            self.objects().is_node_default(),
        )];
        let others: Vec<(u64, String)> = self
            .live_chunk_nodes(CHUNK_SERVER_TIMEOUT_MS)?
            .into_iter()
            .filter(|(id, _)| *id != me)
            .map(|(id, n)| (id, n.addr))
            .collect();
        if others.is_empty() {
            return Ok(());
        }
        // A chunk server that cannot say which store it uses refuses the
        // move too: it may be the one that names another.
        let asks = others.into_iter().map(|(id, addr)| async move {
            let ask = async {
                let mut c = self.chunk(&addr)?;
                let mut req = tonic::Request::new(ObjectStoreRequest {});
                req.set_timeout(std::time::Duration::from_secs(5));
                c.object_store(req).await.map(|r| r.into_inner())
            };
            ask.await.map(|r| (id, r.url, r.node_default)).map_err(|e| {
                Status::unavailable(format!(
                    "chunk server {id} ({addr}) did not say which object store it uses ({}); \
                     nothing moves to the object tier until every live chunk server answers",
                    e.message()
                ))
            })
        });
        for answer in futures::future::join_all(asks).await {
            seen.push(answer?);
        }
        const FIX: &str =
            "start every server with the same --object-store (s3://bucket/prefix, or file:// on a \
                           filesystem every node mounts) to use the object tier";
        if let Some((id, url, _)) = seen.iter().find(|(_, _, default)| *default) {
            let others: Vec<String> = seen
                .iter()
                .filter(|(other, _, _)| other != id)
                .map(|(other, _, _)| other.to_string())
                .collect();
            return Err(Status::failed_precondition(format!(
                "node {id} keeps the object tier in its own data directory ({url}: no --object-store was given), \
                 which node(s) {} cannot read; {FIX}",
                others.join(", ")
            )));
        }
        // `s3://b/p` and `s3://b/p/` name the same store.
        let same = |a: &str, b: &str| a.trim_end_matches('/') == b.trim_end_matches('/');
        let (first, url) = (seen[0].0, &seen[0].1);
        if let Some((id, other, _)) = seen.iter().find(|(_, u, _)| !same(u, url)) {
            return Err(Status::failed_precondition(format!(
                "nodes name different object stores (node {first}: {url}, node {id}: {other}); {FIX}"
            )));
        }
        Ok(())
    }

    /// How many replicas a pack should have now.
    pub fn replication(&self, live: usize) -> usize {
        if self.inner.replicas == 0 {
            live.min(3)
        } else {
            self.inner.replicas
        }
    }

    /// Picks the chunk servers for pack `id`: live chunk servers, rotated by
    /// the pack id so packs spread evenly.
    pub fn pick_replicas(&self, id: u64) -> Result<Vec<NodeInfo>, Status> {
        let live = self.live_chunk_nodes(CHUNK_SERVER_TIMEOUT_MS)?;
        if live.is_empty() {
            return Err(Status::failed_precondition(
                "no chunk server is available; start a node with --role meta,chunk or --role chunk",
            ));
        }
        let want = self.replication(live.len());
        if want > live.len() {
            return Err(Status::failed_precondition(format!(
                "{want} replicas are required but only {} chunk servers are available; start more or lower --replicas",
                live.len()
            )));
        }
        let mut live: Vec<NodeInfo> = live.iter().map(|(id, n)| node_view(*id, n)).collect();
        let start = (id as usize) % live.len();
        live.rotate_left(start);
        live.truncate(want);
        Ok(live)
    }
}

pub fn node_view(id: u64, n: &NodeRecord) -> NodeInfo {
    NodeInfo {
        id,
        addr: n.addr.clone(),
        roles: n.roles.clone(),
        capacity: n.capacity,
        used: n.used,
        last_heartbeat_ms: n.last_heartbeat_ms,
    }
}
