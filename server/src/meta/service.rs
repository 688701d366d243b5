//! The `Meta` gRPC service: what clients call on any meta node.
//!
//! Writes become [`MetaCommand`]s committed through Raft (forwarded to the
//! leader when this node follows). Reads run after a ReadIndex barrier, so
//! they are linearizable from any node, except reads of immutable objects
//! (a numbered version, a tree by id) that this node has already applied:
//! those are served locally.

use granary_client::proto::meta_server::{Meta, MetaServer};
use granary_client::proto::*;
use granary_core::{validate_dataset_name, TreeId};
use tonic::{Request, Response, Status};

use super::command::{dataset_not_found, version_not_found, MetaCommand, MetaReply};
use super::state::*;
use crate::cluster::{id_of, internal, node_view, now_ms, raft_status, Cluster};

/// The service; cheap to clone.
#[derive(Clone)]
pub struct MetaService {
    cluster: Cluster,
}

fn check_name(name: &str) -> Result<(), Status> {
    validate_dataset_name(name).map_err(|e| Status::invalid_argument(e.to_string()))
}

fn id32(b: &[u8], what: &str) -> Result<[u8; 32], Status> {
    b.try_into()
        .map_err(|_| Status::invalid_argument(format!("{what} must be 32 bytes, got {}", b.len())))
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
        moving_to: String::new(),
    }
}

impl MetaService {
    pub fn new(cluster: Cluster) -> Self {
        Self { cluster }
    }

    /// The tonic service with Granary's message size limits.
    pub fn server(self) -> MetaServer<Self> {
        MetaServer::new(self)
            .max_decoding_message_size(granary_client::MAX_MESSAGE)
            .max_encoding_message_size(granary_client::MAX_MESSAGE)
    }

    async fn propose(&self, cmd: MetaCommand) -> Result<MetaReply, Status> {
        self.cluster.propose(cmd).await
    }

    async fn barrier(&self) -> Result<(), Status> {
        self.cluster.barrier().await
    }

    fn reader(&self) -> Reader<'_> {
        self.cluster.reader()
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
        match self
            .propose(MetaCommand::PutTrees {
                objects,
                now_ms: now_ms(),
            })
            .await?
        {
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
            let mut data = self.cluster.node().db().get_cf(cf, key).map_err(internal)?;
            if data.is_none() && !barrier_done {
                // Trees are immutable: only a miss needs the barrier.
                self.barrier().await?;
                barrier_done = true;
                data = self.cluster.node().db().get_cf(cf, key).map_err(internal)?;
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
        let replicas = self.cluster.pick_replicas(id)?;
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
        let mut view = pack_view(id, &p);
        if let Some(m) = self
            .reader()
            .get::<MoveRecord>(CF_MOVES, &id.to_be_bytes())
            .map_err(internal)?
        {
            view.moving_to = m.to;
        }
        Ok(Response::new(view))
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
        let me = self.cluster.node().status().await.map_err(raft_status)?;
        let mut cluster = Vec::new();
        if !local_only {
            let mut tasks = tokio::task::JoinSet::new();
            for (id, addr) in me.nodes.clone() {
                if id == me.node_id {
                    continue;
                }
                let node = self.cluster.node().clone();
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
        self.cluster
            .node()
            .add_node(id, addr)
            .await
            .map_err(raft_status)?;
        Ok(Response::new(Empty {}))
    }

    async fn remove_node(&self, req: Request<NodeRef>) -> Result<Response<Empty>, Status> {
        let id = req.into_inner().id;
        let recorded = self
            .cluster
            .reader()
            .exists(CF_NODES, &id.to_be_bytes())
            .map_err(internal)?;
        match self.cluster.node().remove_node(id).await {
            Ok(()) => {}
            // Out of Raft already: an earlier call failed after that step
            // (no quorum for the record), so a retry finishes the job.
            Err(e) if recorded && e.is_not_member() => {}
            Err(e) => return Err(raft_status(e)),
        }
        // Its packs are re-replicated by the repair loop.
        self.propose(MetaCommand::RemoveNodeRecord { id }).await?;
        Ok(Response::new(Empty {}))
    }

    async fn tier_move(&self, req: Request<TierMoveRequest>) -> Result<Response<JsonReply>, Status> {
        let r = req.into_inner();
        let report = crate::tier::plan::tier_move(&self.cluster, &r.dataset, r.number, &r.to, r.wait).await?;
        Ok(Response::new(JsonReply {
            json: report.to_string(),
        }))
    }

    async fn tier_policy(&self, req: Request<PolicyRequest>) -> Result<Response<JsonReply>, Status> {
        let PolicyRequest {
            dataset,
            cold_after_secs,
        } = req.into_inner();
        if !dataset.is_empty() {
            check_name(&dataset)?;
        }
        self.propose(MetaCommand::SetPolicy {
            dataset: dataset.clone(),
            cold_after_secs,
        })
        .await?;
        let json = serde_json::json!({
            "dataset": if dataset.is_empty() { "*" } else { &dataset },
            "cold_after_secs": cold_after_secs,
        });
        Ok(Response::new(JsonReply {
            json: json.to_string(),
        }))
    }

    async fn tier_status(&self, _req: Request<Empty>) -> Result<Response<JsonReply>, Status> {
        let report = crate::tier::plan::tier_status(&self.cluster).await?;
        Ok(Response::new(JsonReply {
            json: report.to_string(),
        }))
    }

    async fn gc(&self, req: Request<GcRequest>) -> Result<Response<JsonReply>, Status> {
        let r = req.into_inner();
        let compact_below = r.compact_below.unwrap_or(0.5);
        if !(0.0..=1.0).contains(&compact_below) {
            return Err(Status::invalid_argument(
                "--compact-below must be between 0 and 1 (a share of a pack's bytes)",
            ));
        }
        let opts = crate::gc::GcOptions {
            dry_run: r.dry_run,
            compact_below,
            grace: crate::gc::default_grace(),
        };
        let report = crate::gc::run(&self.cluster, opts).await?;
        Ok(Response::new(JsonReply {
            json: report.to_string(),
        }))
    }

    async fn scrub(&self, req: Request<ScrubRequestAll>) -> Result<Response<JsonReply>, Status> {
        let report = crate::repair::scrub(&self.cluster, req.into_inner().repair).await?;
        Ok(Response::new(JsonReply {
            json: report.to_string(),
        }))
    }
}
