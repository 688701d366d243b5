//! The `Meta` gRPC service: what clients call on any meta node.
//!
//! Writes become [`MetaCommand`]s committed through Raft (forwarded to the
//! leader when this node follows). Reads run after a ReadIndex barrier, so
//! they are linearizable from any node, except reads of immutable objects
//! (a numbered version, a tree by id) that this node has already applied:
//! those are served locally.

use std::time::{SystemTime, UNIX_EPOCH};

use granary_client::proto::meta_server::{Meta, MetaServer};
use granary_client::proto::*;
use granary_core::{validate_dataset_name, TreeId};
use granary_raft::{RaftNode, RaftNodeError};
use tonic::{Request, Response, Status};

use super::apply::MetaApp;
use super::command::{dataset_not_found, version_not_found, MetaCommand, MetaReply, MetaResult};
use super::state::*;

/// The service; cheap to clone.
#[derive(Clone)]
pub struct MetaService {
    node: RaftNode<MetaApp>,
    /// Replicas per pack; 0 means min(3, live chunk servers).
    replicas: usize,
}

/// A chunk server that has not sent a heartbeat for this long is not given new packs.
const CHUNK_SERVER_TIMEOUT_MS: u64 = 90_000;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn raft_status(e: RaftNodeError) -> Status {
    match e {
        RaftNodeError::Membership(_) => Status::failed_precondition(e.to_string()),
        _ => Status::unavailable(e.to_string()),
    }
}

fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

fn check_name(name: &str) -> Result<(), Status> {
    validate_dataset_name(name).map_err(|e| Status::invalid_argument(e.to_string()))
}

fn id32(b: &[u8], what: &str) -> Result<[u8; 32], Status> {
    b.try_into()
        .map_err(|_| Status::invalid_argument(format!("{what} must be 32 bytes, got {}", b.len())))
}

/// A pack or node id from its big-endian key.
fn id_of(key: &[u8]) -> u64 {
    u64::from_be_bytes(key.try_into().unwrap_or_default())
}

fn dataset_view(name: String, d: &DatasetRecord) -> Dataset {
    Dataset {
        name,
        created_ms: d.created_ms,
        versions: d.versions,
        latest: d.latest.unwrap_or(0),
    }
}

fn stats_view(s: &Stats) -> VersionStats {
    VersionStats {
        files: s.files,
        dirs: s.dirs,
        symlinks: s.symlinks,
        bytes: s.bytes,
        chunks: s.chunks,
        new_bytes: s.new_bytes,
    }
}

fn version_view(dataset: &str, number: u64, v: &VersionRecord) -> Version {
    Version {
        dataset: dataset.to_string(),
        number,
        root: v.root.to_vec(),
        parent: v.parent,
        message: v.message.clone(),
        created_ms: v.created_ms,
        stats: Some(stats_view(&v.stats)),
    }
}

fn pack_view(id: u64, p: &PackRecord) -> PackInfo {
    PackInfo {
        id,
        tier: p.tier.clone(),
        replicas: p.replicas.clone(),
        bytes: p.bytes,
        chunks: p.chunks,
        object_key: p.object_key.clone(),
    }
}

fn node_view(id: u64, n: &NodeRecord) -> NodeInfo {
    NodeInfo {
        id,
        addr: n.addr.clone(),
        roles: n.roles.clone(),
        capacity: n.capacity,
        used: n.used,
        last_heartbeat_ms: n.last_heartbeat_ms,
    }
}

impl MetaService {
    pub fn new(node: RaftNode<MetaApp>, replicas: usize) -> Self {
        Self { node, replicas }
    }

    /// Picks the chunk servers for pack `id`: live chunk servers, rotated by
    /// the pack id so packs spread evenly.
    fn pick_replicas(&self, id: u64) -> Result<Vec<NodeInfo>, Status> {
        let now = now_ms();
        let mut live: Vec<NodeInfo> = self
            .reader()
            .all::<NodeRecord>(CF_NODES)
            .map_err(internal)?
            .into_iter()
            .filter(|(_, n)| n.roles.iter().any(|r| r == "chunk"))
            .filter(|(_, n)| now.saturating_sub(n.last_heartbeat_ms) < CHUNK_SERVER_TIMEOUT_MS)
            .map(|(k, n)| node_view(id_of(&k), &n))
            .collect();
        if live.is_empty() {
            return Err(Status::failed_precondition(
                "no chunk server is available; start a node with --role meta,chunk or --role chunk",
            ));
        }
        let want = if self.replicas == 0 {
            live.len().min(3)
        } else {
            self.replicas
        };
        if want > live.len() {
            return Err(Status::failed_precondition(format!(
                "{want} replicas are required but only {} chunk servers are available; start more or lower --replicas",
                live.len()
            )));
        }
        live.sort_by_key(|n| n.id);
        let start = (id as usize) % live.len();
        live.rotate_left(start);
        live.truncate(want);
        Ok(live)
    }

    /// The tonic service with Granary's message size limits.
    pub fn server(self) -> MetaServer<Self> {
        MetaServer::new(self)
            .max_decoding_message_size(granary_client::MAX_MESSAGE)
            .max_encoding_message_size(granary_client::MAX_MESSAGE)
    }

    async fn propose(&self, cmd: MetaCommand) -> Result<MetaReply, Status> {
        let bytes = self.node.write(cmd.encode()).await.map_err(raft_status)?;
        let result: MetaResult = bincode::deserialize(&bytes).map_err(internal)?;
        result.map_err(Status::from)
    }

    async fn barrier(&self) -> Result<(), Status> {
        self.node.read_barrier().await.map_err(raft_status)
    }

    fn reader(&self) -> Reader<'_> {
        Reader { db: self.node.db() }
    }

    fn local_version(&self, dataset: &str, number: u64) -> Result<Option<VersionRecord>, Status> {
        self.reader().version(dataset, number).map_err(internal)
    }
}

#[tonic::async_trait]
impl Meta for MetaService {
    async fn create_dataset(&self, req: Request<DatasetName>) -> Result<Response<Dataset>, Status> {
        let name = req.into_inner().name;
        check_name(&name)?;
        match self
            .propose(MetaCommand::CreateDataset {
                name,
                now_ms: now_ms(),
            })
            .await?
        {
            MetaReply::Dataset { name, record } => Ok(Response::new(dataset_view(name, &record))),
            other => Err(internal(format!("unexpected reply {other:?}"))),
        }
    }

    async fn list_datasets(&self, _req: Request<Empty>) -> Result<Response<DatasetList>, Status> {
        self.barrier().await?;
        let all = self
            .reader()
            .all::<DatasetRecord>(CF_DATASETS)
            .map_err(internal)?;
        let datasets = all
            .into_iter()
            .map(|(k, d)| dataset_view(String::from_utf8_lossy(&k).into_owned(), &d))
            .collect();
        Ok(Response::new(DatasetList { datasets }))
    }

    async fn delete_dataset(&self, req: Request<DatasetName>) -> Result<Response<Empty>, Status> {
        let name = req.into_inner().name;
        check_name(&name)?;
        self.propose(MetaCommand::DeleteDataset { name }).await?;
        Ok(Response::new(Empty {}))
    }

    async fn put_trees(&self, req: Request<PutTreesRequest>) -> Result<Response<PutTreesReply>, Status> {
        let objects = req
            .into_inner()
            .objects
            .into_iter()
            .map(|o| (o.id, o.data))
            .collect();
        match self.propose(MetaCommand::PutTrees { objects }).await? {
            MetaReply::Stored(stored) => Ok(Response::new(PutTreesReply { stored })),
            other => Err(internal(format!("unexpected reply {other:?}"))),
        }
    }

    async fn get_trees(&self, req: Request<TreeIds>) -> Result<Response<TreeObjects>, Status> {
        let ids = req.into_inner().ids;
        let mut barrier_done = false;
        let mut objects = Vec::with_capacity(ids.len());
        for id in ids {
            let key = id32(&id, "tree id")?;
            let cf = self.reader().cf(CF_TREES);
            let mut data = self.node.db().get_cf(cf, key).map_err(internal)?;
            if data.is_none() && !barrier_done {
                // Trees are immutable: only a miss needs the barrier.
                self.barrier().await?;
                barrier_done = true;
                data = self.node.db().get_cf(cf, key).map_err(internal)?;
            }
            let data = data.ok_or_else(|| {
                Status::not_found(format!("tree {} is not stored", TreeId::from_bytes(key)))
            })?;
            objects.push(TreeObject { id, data });
        }
        Ok(Response::new(TreeObjects { objects }))
    }

    async fn commit_version(&self, req: Request<CommitRequest>) -> Result<Response<Version>, Status> {
        let r = req.into_inner();
        check_name(&r.dataset)?;
        id32(&r.root, "root tree id")?;
        let s = r.stats.unwrap_or_default();
        let cmd = MetaCommand::CommitVersion {
            dataset: r.dataset,
            root: r.root,
            parent: r.parent,
            force: r.force,
            message: r.message,
            stats: Stats {
                files: s.files,
                dirs: s.dirs,
                symlinks: s.symlinks,
                bytes: s.bytes,
                chunks: s.chunks,
                new_bytes: s.new_bytes,
            },
            now_ms: now_ms(),
        };
        match self.propose(cmd).await? {
            MetaReply::Version {
                dataset,
                number,
                record,
            } => Ok(Response::new(version_view(&dataset, number, &record))),
            other => Err(internal(format!("unexpected reply {other:?}"))),
        }
    }

    async fn get_version(&self, req: Request<VersionRef>) -> Result<Response<Version>, Status> {
        let VersionRef { dataset, number } = req.into_inner();
        check_name(&dataset)?;
        if let Some(n) = number {
            // A committed version never changes: serve it locally if applied here.
            if let Some(v) = self.local_version(&dataset, n)? {
                return Ok(Response::new(version_view(&dataset, n, &v)));
            }
        }
        self.barrier().await?;
        let ds = self
            .reader()
            .dataset(&dataset)
            .map_err(internal)?
            .ok_or_else(|| dataset_not_found(&dataset))?;
        let n = match number.or(ds.latest) {
            Some(n) => n,
            None => {
                return Err(Status::not_found(format!(
                    "dataset '{dataset}' has no versions yet; `granary upload DIR {dataset}` creates one"
                )))
            }
        };
        let v = self
            .local_version(&dataset, n)?
            .ok_or_else(|| version_not_found(&dataset, n))?;
        Ok(Response::new(version_view(&dataset, n, &v)))
    }

    async fn list_versions(&self, req: Request<DatasetName>) -> Result<Response<VersionList>, Status> {
        let name = req.into_inner().name;
        check_name(&name)?;
        self.barrier().await?;
        if self.reader().dataset(&name).map_err(internal)?.is_none() {
            return Err(dataset_not_found(&name).into());
        }
        let versions = self
            .reader()
            .versions(&name)
            .map_err(internal)?
            .iter()
            .map(|(n, v)| version_view(&name, *n, v))
            .collect();
        Ok(Response::new(VersionList { versions }))
    }

    async fn delete_version(&self, req: Request<VersionRef>) -> Result<Response<Empty>, Status> {
        let VersionRef { dataset, number } = req.into_inner();
        check_name(&dataset)?;
        let number = number.ok_or_else(|| {
            Status::invalid_argument(format!("say which version of '{dataset}' to delete: {dataset}@N"))
        })?;
        self.propose(MetaCommand::DeleteVersion { dataset, number })
            .await?;
        Ok(Response::new(Empty {}))
    }

    async fn has_chunks(&self, req: Request<ChunkIds>) -> Result<Response<HasReply>, Status> {
        let ids = req.into_inner().ids;
        for id in &ids {
            id32(id, "chunk id")?;
        }
        self.barrier().await?;
        let keys: Vec<&[u8]> = ids.iter().map(|i| i.as_slice()).collect();
        let present = self.reader().exist_many(CF_CHUNKS, &keys).map_err(internal)?;
        Ok(Response::new(HasReply { present }))
    }

    async fn lookup_chunks(&self, req: Request<ChunkIds>) -> Result<Response<LookupReply>, Status> {
        let ids = req.into_inner().ids;
        self.barrier().await?;
        let r = self.reader();
        let mut reply = LookupReply::default();
        for id in ids {
            id32(&id, "chunk id")?;
            match r.get::<ChunkRecord>(CF_CHUNKS, &id).map_err(internal)? {
                Some(c) => reply.found.push(ChunkLocation {
                    id,
                    pack: c.pack,
                    offset: c.offset,
                    stored_len: c.stored_len,
                    raw_len: c.raw_len,
                }),
                None => reply.missing.push(id),
            }
        }
        Ok(Response::new(reply))
    }

    async fn allocate_pack(&self, _req: Request<Empty>) -> Result<Response<PackAllocation>, Status> {
        let id = match self.propose(MetaCommand::AllocatePack).await? {
            MetaReply::PackId(id) => id,
            other => return Err(internal(format!("unexpected reply {other:?}"))),
        };
        let replicas = self.pick_replicas(id)?;
        Ok(Response::new(PackAllocation { id, replicas }))
    }

    async fn register_pack(&self, req: Request<RegisterPackRequest>) -> Result<Response<PackInfo>, Status> {
        let r = req.into_inner();
        let info = r
            .pack
            .ok_or_else(|| Status::invalid_argument("register_pack needs the pack"))?;
        let chunks = r
            .chunks
            .iter()
            .map(|c| {
                Ok((
                    id32(&c.id, "chunk id")?,
                    ChunkRecord {
                        pack: info.id,
                        offset: c.offset,
                        stored_len: c.stored_len,
                        raw_len: c.raw_len,
                    },
                ))
            })
            .collect::<Result<Vec<_>, Status>>()?;
        let pack = PackRecord {
            tier: if info.tier.is_empty() {
                "ssd".into()
            } else {
                info.tier.clone()
            },
            replicas: info.replicas.clone(),
            bytes: info.bytes,
            chunks: info.chunks,
            object_key: info.object_key.clone(),
            registered_ms: now_ms(),
        };
        self.propose(MetaCommand::RegisterPack {
            id: info.id,
            pack: pack.clone(),
            chunks,
        })
        .await?;
        Ok(Response::new(pack_view(info.id, &pack)))
    }

    async fn get_pack(&self, req: Request<PackRef>) -> Result<Response<PackInfo>, Status> {
        let id = req.into_inner().id;
        self.barrier().await?;
        let p = self
            .reader()
            .get::<PackRecord>(CF_PACKS, &id.to_be_bytes())
            .map_err(internal)?
            .ok_or_else(|| Status::not_found(format!("pack {id} is not registered")))?;
        Ok(Response::new(pack_view(id, &p)))
    }

    async fn list_packs(&self, req: Request<ListPacksRequest>) -> Result<Response<PackList>, Status> {
        let ListPacksRequest { node, tier } = req.into_inner();
        self.barrier().await?;
        let packs = self
            .reader()
            .all::<PackRecord>(CF_PACKS)
            .map_err(internal)?
            .into_iter()
            .filter(|(_, p)| node.is_none_or(|n| p.replicas.contains(&n)))
            .filter(|(_, p)| tier.as_ref().is_none_or(|t| &p.tier == t))
            .map(|(k, p)| pack_view(id_of(&k), &p))
            .collect();
        Ok(Response::new(PackList { packs }))
    }

    async fn register_node(&self, req: Request<NodeInfo>) -> Result<Response<NodeInfo>, Status> {
        let n = req.into_inner();
        let node = NodeRecord {
            addr: n.addr.clone(),
            roles: n.roles.clone(),
            capacity: n.capacity,
            used: n.used,
            last_heartbeat_ms: now_ms(),
        };
        self.propose(MetaCommand::UpsertNode {
            id: n.id,
            node: node.clone(),
        })
        .await?;
        Ok(Response::new(node_view(n.id, &node)))
    }

    async fn heartbeat(&self, req: Request<NodeInfo>) -> Result<Response<Empty>, Status> {
        self.register_node(req).await?;
        Ok(Response::new(Empty {}))
    }

    async fn list_nodes(&self, _req: Request<Empty>) -> Result<Response<NodeList>, Status> {
        self.barrier().await?;
        let nodes = self
            .reader()
            .all::<NodeRecord>(CF_NODES)
            .map_err(internal)?
            .into_iter()
            .map(|(k, n)| node_view(id_of(&k), &n))
            .collect();
        Ok(Response::new(NodeList { nodes }))
    }

    async fn status(&self, req: Request<StatusRequest>) -> Result<Response<StatusReply>, Status> {
        let local_only = req.into_inner().local_only;
        let me = self.node.status().await.map_err(raft_status)?;
        let mut cluster = Vec::new();
        if !local_only {
            let mut tasks = tokio::task::JoinSet::new();
            for (id, addr) in me.nodes.clone() {
                if id == me.node_id {
                    continue;
                }
                let node = self.node.clone();
                tasks.spawn(async move { (id, addr.clone(), node.peer_status(&addr).await) });
            }
            cluster.push(serde_json::to_value(&me).map_err(internal)?);
            while let Some(joined) = tasks.join_next().await {
                let (id, addr, result) = joined.map_err(internal)?;
                cluster.push(match result {
                    Ok(s) => serde_json::to_value(&s).map_err(internal)?,
                    Err(error) => serde_json::json!({"node_id": id, "addr": addr, "error": error}),
                });
            }
            cluster.sort_by_key(|v| v["node_id"].as_u64().unwrap_or(0));
        }
        let json = serde_json::json!({"node": me, "cluster": cluster}).to_string();
        Ok(Response::new(StatusReply { json }))
    }

    async fn add_node(&self, req: Request<AddNodeRequest>) -> Result<Response<Empty>, Status> {
        let AddNodeRequest { id, addr } = req.into_inner();
        self.node.add_node(id, addr).await.map_err(raft_status)?;
        Ok(Response::new(Empty {}))
    }

    async fn remove_node(&self, req: Request<NodeRef>) -> Result<Response<Empty>, Status> {
        self.node
            .remove_node(req.into_inner().id)
            .await
            .map_err(raft_status)?;
        Ok(Response::new(Empty {}))
    }
}
