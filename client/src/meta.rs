//! [`MetaClient`]: the `Meta` API with server fail-over.
//!
//! The client is given one or more server addresses. Any node serves any
//! request (followers forward writes to the leader), so the client sticks to
//! one address and moves to the next only when the connection itself fails
//! (refused, reset, timed out), never when a server answered with an error.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use granary_core::{ChunkId, TreeId};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use crate::error::ClientError;
use crate::proto::meta_client::MetaClient as Grpc;
use crate::proto::*;

/// A connection to the metadata cluster; cheap to clone.
#[derive(Clone)]
pub struct MetaClient {
    addrs: Arc<Vec<String>>,
    endpoints: Arc<Vec<Endpoint>>,
    /// Created on first use, inside the caller's runtime.
    channels: Arc<Vec<OnceLock<Channel>>>,
    current: Arc<AtomicUsize>,
}

pub(crate) fn endpoint(addr: &str) -> Result<Endpoint, ClientError> {
    let e = Endpoint::from_shared(format!("http://{addr}")).map_err(|e| {
        ClientError::Invalid(format!(
            "invalid server address '{addr}': {e}; expected HOST:PORT"
        ))
    })?;
    Ok(e.connect_timeout(Duration::from_secs(3))
        .tcp_nodelay(true)
        .initial_stream_window_size(crate::STREAM_WINDOW)
        .initial_connection_window_size(crate::CONNECTION_WINDOW)
        .max_frame_size(crate::MAX_FRAME)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5)))
}

/// True when the status comes from the transport (no answer from a server).
fn is_transport(s: &Status) -> bool {
    matches!(s.code(), Code::Unavailable | Code::Unknown | Code::Cancelled)
        && std::error::Error::source(s).is_some()
}

impl MetaClient {
    /// Prepares connections to `addrs` (`host:port`, any node of the cluster).
    /// Nothing is sent until the first call.
    pub fn connect(addrs: &[String]) -> Result<Self, ClientError> {
        let addrs: Vec<String> = addrs
            .iter()
            .map(|a| a.trim().to_string())
            .filter(|a| !a.is_empty())
            .collect();
        if addrs.is_empty() {
            return Err(ClientError::Invalid(
                "no server address given; use --server HOST:PORT".into(),
            ));
        }
        let endpoints: Vec<Endpoint> = addrs
            .iter()
            .map(|a| endpoint(a))
            .collect::<Result<_, ClientError>>()?;
        Ok(Self {
            addrs: Arc::new(addrs),
            channels: Arc::new(endpoints.iter().map(|_| OnceLock::new()).collect()),
            endpoints: Arc::new(endpoints),
            current: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// Runs `call` against the current server, moving to the next address
    /// when the connection fails.
    async fn call<T, F, Fut>(&self, call: F) -> Result<T, ClientError>
    where
        F: Fn(Grpc<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let n = self.channels.len();
        let start = self.current.load(Ordering::Relaxed);
        let mut last = String::new();
        for k in 0..n {
            let i = (start + k) % n;
            let channel = self.channels[i].get_or_init(|| self.endpoints[i].connect_lazy());
            let grpc = Grpc::new(channel.clone())
                .max_decoding_message_size(crate::MAX_MESSAGE)
                .max_encoding_message_size(crate::MAX_MESSAGE);
            match call(grpc).await {
                Ok(r) => {
                    self.current.store(i, Ordering::Relaxed);
                    return Ok(r.into_inner());
                }
                Err(s) if is_transport(&s) => {
                    tracing::debug!(addr = %self.addrs[i], "server unreachable: {s}");
                    last = crate::error::status_cause(&s);
                }
                Err(s) => {
                    return Err(ClientError::Server {
                        code: s.code(),
                        message: s.message().to_string(),
                    })
                }
            }
        }
        Err(ClientError::Unreachable {
            addrs: self.addrs.join(","),
            message: last,
        })
    }

    pub async fn create_dataset(&self, name: &str) -> Result<Dataset, ClientError> {
        let req = DatasetName { name: name.into() };
        self.call(|mut c| {
            let req = req.clone();
            async move { c.create_dataset(req).await }
        })
        .await
    }

    pub async fn list_datasets(&self) -> Result<Vec<Dataset>, ClientError> {
        Ok(self
            .call(|mut c| async move { c.list_datasets(Empty {}).await })
            .await?
            .datasets)
    }

    pub async fn delete_dataset(&self, name: &str) -> Result<(), ClientError> {
        let req = DatasetName { name: name.into() };
        self.call(|mut c| {
            let req = req.clone();
            async move { c.delete_dataset(req).await }
        })
        .await
        .map(|_| ())
    }

    /// Stores tree objects. Children must be stored before (or in the same
    /// call as) the trees that reference them.
    pub async fn put_trees(&self, objects: Vec<(TreeId, Vec<u8>)>) -> Result<u32, ClientError> {
        let req = PutTreesRequest {
            objects: objects
                .into_iter()
                .map(|(id, data)| TreeObject {
                    id: id.as_bytes().to_vec(),
                    data,
                })
                .collect(),
        };
        Ok(self
            .call(|mut c| {
                let req = req.clone();
                async move { c.put_trees(req).await }
            })
            .await?
            .stored)
    }

    /// Fetches tree objects; fails naming the first id that is not stored.
    pub async fn get_trees(&self, ids: &[TreeId]) -> Result<Vec<(TreeId, Vec<u8>)>, ClientError> {
        let req = TreeIds {
            ids: ids.iter().map(|i| i.as_bytes().to_vec()).collect(),
        };
        let reply = self
            .call(|mut c| {
                let req = req.clone();
                async move { c.get_trees(req).await }
            })
            .await?;
        reply
            .objects
            .into_iter()
            .map(|o| Ok((tree_id(&o.id)?, o.data)))
            .collect()
    }

    /// Commits a version; see `CommitRequest` for the parent check.
    pub async fn commit_version(&self, req: CommitRequest) -> Result<Version, ClientError> {
        self.call(|mut c| {
            let req = req.clone();
            async move { c.commit_version(req).await }
        })
        .await
    }

    /// A version by number, or the latest when `number` is `None`.
    pub async fn get_version(&self, dataset: &str, number: Option<u64>) -> Result<Version, ClientError> {
        let req = VersionRef {
            dataset: dataset.into(),
            number,
        };
        self.call(|mut c| {
            let req = req.clone();
            async move { c.get_version(req).await }
        })
        .await
    }

    pub async fn list_versions(&self, dataset: &str) -> Result<Vec<Version>, ClientError> {
        let req = DatasetName { name: dataset.into() };
        Ok(self
            .call(|mut c| {
                let req = req.clone();
                async move { c.list_versions(req).await }
            })
            .await?
            .versions)
    }

    pub async fn delete_version(&self, dataset: &str, number: u64) -> Result<(), ClientError> {
        let req = VersionRef {
            dataset: dataset.into(),
            number: Some(number),
        };
        self.call(|mut c| {
            let req = req.clone();
            async move { c.delete_version(req).await }
        })
        .await
        .map(|_| ())
    }

    /// Which of `ids` the cluster stores, in order.
    pub async fn has_chunks(&self, ids: &[ChunkId]) -> Result<Vec<bool>, ClientError> {
        let req = ChunkIds {
            ids: ids.iter().map(|i| i.as_bytes().to_vec()).collect(),
        };
        Ok(self
            .call(|mut c| {
                let req = req.clone();
                async move { c.has_chunks(req).await }
            })
            .await?
            .present)
    }

    /// Where each of `ids` is stored.
    pub async fn lookup_chunks(&self, ids: &[ChunkId]) -> Result<LookupReply, ClientError> {
        let req = ChunkIds {
            ids: ids.iter().map(|i| i.as_bytes().to_vec()).collect(),
        };
        self.call(|mut c| {
            let req = req.clone();
            async move { c.lookup_chunks(req).await }
        })
        .await
    }

    /// A new pack id and the chunk servers for its replicas, in chain order.
    pub async fn allocate_pack(&self) -> Result<PackAllocation, ClientError> {
        self.call(|mut c| async move { c.allocate_pack(Empty {}).await })
            .await
    }

    pub async fn register_pack(&self, req: RegisterPackRequest) -> Result<PackInfo, ClientError> {
        self.call(|mut c| {
            let req = req.clone();
            async move { c.register_pack(req).await }
        })
        .await
    }

    pub async fn get_pack(&self, id: u64) -> Result<PackInfo, ClientError> {
        self.call(|mut c| async move { c.get_pack(PackRef { id }).await })
            .await
    }

    pub async fn list_packs(
        &self,
        node: Option<u64>,
        tier: Option<String>,
    ) -> Result<Vec<PackInfo>, ClientError> {
        let req = ListPacksRequest { node, tier };
        Ok(self
            .call(|mut c| {
                let req = req.clone();
                async move { c.list_packs(req).await }
            })
            .await?
            .packs)
    }

    pub async fn register_node(&self, info: NodeInfo) -> Result<NodeInfo, ClientError> {
        self.call(|mut c| {
            let info = info.clone();
            async move { c.register_node(info).await }
        })
        .await
    }

    pub async fn heartbeat(&self, info: NodeInfo) -> Result<(), ClientError> {
        self.call(|mut c| {
            let info = info.clone();
            async move { c.heartbeat(info).await }
        })
        .await
        .map(|_| ())
    }

    pub async fn list_nodes(&self) -> Result<Vec<NodeInfo>, ClientError> {
        Ok(self
            .call(|mut c| async move { c.list_nodes(Empty {}).await })
            .await?
            .nodes)
    }

    /// Cluster status as JSON: `{"node": {...}, "cluster": [...]}`.
    pub async fn status(&self, local_only: bool) -> Result<serde_json::Value, ClientError> {
        let reply = self
            .call(|mut c| async move { c.status(StatusRequest { local_only }).await })
            .await?;
        serde_json::from_str(&reply.json)
            .map_err(|e| ClientError::Invalid(format!("malformed status reply: {e}")))
    }

    pub async fn add_node(&self, id: u64, addr: &str) -> Result<(), ClientError> {
        let req = AddNodeRequest {
            id,
            addr: addr.into(),
        };
        self.call(|mut c| {
            let req = req.clone();
            async move { c.add_node(req).await }
        })
        .await
        .map(|_| ())
    }

    pub async fn remove_node(&self, id: u64) -> Result<(), ClientError> {
        self.call(|mut c| async move { c.remove_node(NodeRef { id }).await })
            .await
            .map(|_| ())
    }
}

fn json(reply: JsonReply) -> Result<serde_json::Value, ClientError> {
    serde_json::from_str(&reply.json).map_err(|e| ClientError::Invalid(format!("malformed admin reply: {e}")))
}

/// Admin calls: tiering, GC, scrub. Each returns the server's JSON report.
impl MetaClient {
    /// Moves a version (or every version when `number` is `None`) to `to` (`object` or `ssd`).
    pub async fn tier_move(
        &self,
        dataset: &str,
        number: Option<u64>,
        to: &str,
        wait: bool,
    ) -> Result<serde_json::Value, ClientError> {
        let req = TierMoveRequest {
            dataset: dataset.into(),
            number,
            to: to.into(),
            wait,
        };
        json(
            self.call(|mut c| {
                let req = req.clone();
                async move { c.tier_move(req).await }
            })
            .await?,
        )
    }

    /// Sets (or with `None` removes) the cold-after policy of `dataset` ("" = every dataset).
    pub async fn tier_policy(
        &self,
        dataset: &str,
        cold_after_secs: Option<u64>,
    ) -> Result<serde_json::Value, ClientError> {
        let req = PolicyRequest {
            dataset: dataset.into(),
            cold_after_secs,
        };
        json(
            self.call(|mut c| {
                let req = req.clone();
                async move { c.tier_policy(req).await }
            })
            .await?,
        )
    }

    pub async fn tier_status(&self) -> Result<serde_json::Value, ClientError> {
        json(
            self.call(|mut c| async move { c.tier_status(Empty {}).await })
                .await?,
        )
    }

    pub async fn gc(
        &self,
        dry_run: bool,
        compact_below: Option<f64>,
    ) -> Result<serde_json::Value, ClientError> {
        let req = GcRequest {
            dry_run,
            compact_below,
        };
        json(self.call(|mut c| async move { c.gc(req).await }).await?)
    }

    pub async fn scrub(&self, repair: bool) -> Result<serde_json::Value, ClientError> {
        json(
            self.call(|mut c| async move { c.scrub(ScrubRequestAll { repair }).await })
                .await?,
        )
    }
}

fn tree_id(b: &[u8]) -> Result<TreeId, ClientError> {
    TreeId::from_slice(b)
        .filter(|_| b.len() == 32)
        .ok_or_else(|| ClientError::Invalid("server sent a malformed tree id".into()))
}
