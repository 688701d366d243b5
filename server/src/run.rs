//! Starting and stopping a node.
//!
//! 1. Claim the data directory: an exclusive lock (one server per
//!    directory) and `node.json`, which binds the directory to its node id.
//! 2. Open the Raft node (RocksDB under `DIR/meta`) and bind the listener.
//! 3. Serve the peer protocol, the `Meta` API and (chunk role) the `Chunk`
//!    API on that one address; packs live under `DATA_DIR/packs`.
//! 4. Bootstrap a one-node cluster, join one through `--join`, or resume.
//! 5. Register the node in the metadata (roles, disk capacity and usage) and
//!    refresh it every 30 s; meta gives new packs only to chunk servers
//!    heard from in the last 90 s.
//! 6. On shutdown (SIGTERM/SIGINT): stop serving, stop Raft.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use granary_raft::network::PeerService;
use granary_raft::{NodeConfig, RaftNode, RaftNodeError};
use serde::{Deserialize, Serialize};
use tokio_stream::StreamExt;

use granary_client::MetaClient;

use crate::chunk::peers::ChunkPeers;
use crate::chunk::{ChunkService, LocalReadToken, PackStore};
use crate::cluster::Cluster;
use crate::meta::command::MetaCommand;
use crate::meta::state::NodeRecord;
use crate::meta::{MetaApp, MetaService};
use granary_client::object::ObjectTier;

/// Which roles a node runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Roles {
    pub meta: bool,
    pub chunk: bool,
}

impl FromStr for Roles {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut roles = Roles {
            meta: false,
            chunk: false,
        };
        for part in s.split(',').map(str::trim) {
            match part {
                "meta" => roles.meta = true,
                "chunk" => roles.chunk = true,
                other => return Err(format!("unknown role '{other}': use meta, chunk or meta,chunk")),
            }
        }
        Ok(roles)
    }
}

impl Roles {
    fn names(&self) -> Vec<String> {
        let mut v = Vec::new();
        if self.meta {
            v.push("meta".to_string());
        }
        if self.chunk {
            v.push("chunk".to_string());
        }
        v
    }
}

/// How to run a node.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub node_id: u64,
    /// `host:port` to listen on; also the address peers and clients use.
    pub listen: String,
    pub data_dir: PathBuf,
    /// Any node of an existing cluster, used on first start only.
    pub join: Option<String>,
    pub roles: Roles,
    /// Replicas per pack; 0 means min(3, live chunk servers).
    pub replicas: usize,
    /// The object tier (`s3://bucket[/prefix]` or `file:///path`); every
    /// node of a cluster must name the same one. Default: `file://DATA_DIR/objects`.
    pub object_store: Option<String>,
}

/// Why a node could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot use data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("data directory {path} is in use by another granary server; stop it or pass another --data-dir")]
    Locked { path: PathBuf },
    #[error("data directory {path} belongs to node {found}, not node {requested}; pass --node-id {found} or use another --data-dir")]
    WrongNode {
        path: PathBuf,
        found: u64,
        requested: u64,
    },
    #[error("cannot listen on {addr}: {source}; is another granary server using it? pick another --listen")]
    Listen {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("{0}")]
    Unsupported(String),
    #[error(transparent)]
    Raft(#[from] RaftNodeError),
    #[error("the gRPC server failed: {0}")]
    Serve(String),
    #[error(transparent)]
    ObjectStore(#[from] granary_client::object::ObjectError),
}

#[derive(Serialize, Deserialize)]
struct NodeFile {
    format: u32,
    node_id: u64,
}

/// Locks the data directory and checks (or records) which node owns it.
/// A fresh local-read token in `DATA_DIR/local-read-token` (absolute path:
/// clients on this host open it from anywhere).
fn local_token(data_dir: &Path) -> Result<LocalReadToken, ServerError> {
    let path = data_dir.join("local-read-token");
    std::path::absolute(&path)
        .and_then(|p| LocalReadToken::write(&p))
        .map_err(|source| ServerError::DataDir { path, source })
}

fn claim_data_dir(dir: &Path, node_id: u64) -> Result<std::fs::File, ServerError> {
    let io_err = |source| ServerError::DataDir {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io_err)?;
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("LOCK"))
        .map_err(io_err)?;
    if lock.try_lock().is_err() {
        return Err(ServerError::Locked {
            path: dir.to_path_buf(),
        });
    }
    let node_file = dir.join("node.json");
    match std::fs::read(&node_file) {
        Ok(bytes) => {
            let found: NodeFile = serde_json::from_slice(&bytes).map_err(|e| {
                io_err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("node.json: {e}"),
                ))
            })?;
            if found.node_id != node_id {
                return Err(ServerError::WrongNode {
                    path: dir.to_path_buf(),
                    found: found.node_id,
                    requested: node_id,
                });
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let tmp = dir.join("node.json.tmp");
            std::fs::write(
                &tmp,
                serde_json::to_vec(&NodeFile { format: 1, node_id }).expect("json"),
            )
            .map_err(io_err)?;
            std::fs::File::open(&tmp)
                .and_then(|f| f.sync_all())
                .map_err(io_err)?;
            std::fs::rename(&tmp, &node_file).map_err(io_err)?;
        }
        Err(e) => return Err(io_err(e)),
    }
    Ok(lock)
}

/// Runs a node until `shutdown` resolves.
pub async fn run(cfg: ServerConfig, shutdown: impl Future<Output = ()> + Send) -> Result<(), ServerError> {
    if !cfg.roles.meta {
        return Err(ServerError::Unsupported(
            "chunk-only nodes are not available yet; run with --role meta,chunk".into(),
        ));
    }
    // A bad object tier URL fails before anything starts.
    let object_url = match &cfg.object_store {
        Some(url) => url.clone(),
        None => {
            let dir =
                std::path::absolute(cfg.data_dir.join("objects")).map_err(|source| ServerError::DataDir {
                    path: cfg.data_dir.clone(),
                    source,
                })?;
            format!("file://{}", dir.display())
        }
    };
    let objects = match cfg.object_store {
        Some(_) => ObjectTier::from_url(&object_url)?,
        None => ObjectTier::from_url(&object_url)?.node_default(),
    };
    let _lock = claim_data_dir(&cfg.data_dir, cfg.node_id)?;
    // Scratch space of a previous run (compaction, scrub) is garbage.
    let _ = std::fs::remove_dir_all(cfg.data_dir.join("tmp"));
    let listener = tokio::net::TcpListener::bind(&cfg.listen)
        .await
        .map_err(|source| ServerError::Listen {
            addr: cfg.listen.clone(),
            source,
        })?;
    let node = RaftNode::open(
        NodeConfig::new(cfg.node_id, &cfg.listen, cfg.data_dir.join("meta")),
        MetaApp,
    )
    .await?;

    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).map(|s| {
        if let Ok(s) = &s {
            let _ = s.set_nodelay(true);
        }
        s
    });
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    tracing::info!(url = %objects.url(), "object tier");
    let peers = ChunkPeers::default();
    let cluster = Cluster::new(
        node.clone(),
        objects.clone(),
        cfg.replicas,
        cfg.data_dir.join("tmp"),
        peers.clone(),
    );
    let store = if cfg.roles.chunk {
        Some(
            PackStore::open(&cfg.data_dir.join("packs")).map_err(|source| ServerError::DataDir {
                path: cfg.data_dir.join("packs"),
                source,
            })?,
        )
    } else {
        None
    };
    let chunk_service = match &store {
        Some(store) => {
            let meta = MetaClient::connect(std::slice::from_ref(&cfg.listen))
                .map_err(|e| ServerError::Unsupported(e.to_string()))?;
            Some(ChunkService::new(
                cfg.node_id,
                store.clone(),
                objects.clone(),
                meta,
                peers.clone(),
                local_token(&cfg.data_dir)?,
            ))
        }
        None => None,
    };
    let router = tonic::transport::Server::builder()
        .initial_stream_window_size(granary_client::STREAM_WINDOW)
        .initial_connection_window_size(granary_client::CONNECTION_WINDOW)
        .max_frame_size(granary_client::MAX_FRAME)
        .add_service(PeerService::server(node.clone()))
        .add_service(MetaService::new(cluster.clone()).server())
        .add_optional_service(chunk_service.clone().map(ChunkService::server));
    let server = tokio::spawn(router.serve_with_incoming_shutdown(incoming, async {
        let _ = stop_rx.await;
    }));

    if let Err(e) = node.bootstrap_or_join(cfg.join.as_deref()).await {
        let _ = stop_tx.send(());
        node.shutdown().await;
        return Err(e.into());
    }
    tracing::info!(node = cfg.node_id, addr = %cfg.listen, roles = ?cfg.roles.names(), "granary server ready");
    // Register before announcing readiness, so a client that starts right away
    // finds this chunk server; without a quorum the loop keeps retrying.
    let registered = register_node(&node, &cfg, store.as_ref()).await.is_ok();
    let sweeper = store
        .clone()
        .map(|store| tokio::spawn(sweep_loop(store, cfg.clone())));
    let mut background = vec![
        tokio::spawn(heartbeat_loop(node.clone(), cfg.clone(), store, registered)),
        tokio::spawn(crate::tier::mover::run(cluster.clone())),
        tokio::spawn(crate::tier::policy::run(cluster.clone())),
        tokio::spawn(crate::repair::run(cluster.clone())),
    ];
    if let Some(chunks) = &chunk_service {
        background.push(tokio::spawn(report_reads(node.clone(), chunks.clone())));
        background.push(tokio::spawn(scrub_loop(chunks.clone())));
    }
    background.extend(sweeper);
    shutdown.await;
    tracing::info!("shutting down");
    for task in background {
        task.abort();
    }
    let _ = stop_tx.send(());
    node.shutdown().await;
    match server.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(ServerError::Serve(e.to_string())),
        Err(e) => Err(ServerError::Serve(e.to_string())),
    }
}

/// Records this node (roles, disk capacity and usage) in the metadata.
async fn register_node(
    node: &RaftNode<MetaApp>,
    cfg: &ServerConfig,
    store: Option<&PackStore>,
) -> Result<(), RaftNodeError> {
    let (capacity, used) = store.map(PackStore::usage).unwrap_or((0, 0));
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let cmd = MetaCommand::UpsertNode {
        id: cfg.node_id,
        node: NodeRecord {
            addr: cfg.listen.clone(),
            roles: cfg.roles.names(),
            capacity,
            used,
            last_heartbeat_ms: now_ms,
        },
    };
    node.write(cmd.encode()).await.map(|_| ())
}

/// Periodically removes sealed packs that were never registered, and packs
/// clients on this host wrote into `incoming/` and never handed over.
async fn sweep_loop(store: PackStore, cfg: ServerConfig) {
    let grace = crate::chunk::store::unregistered_grace();
    let incoming_grace = crate::chunk::store::incoming_grace();
    let every = grace.clamp(Duration::from_secs(1), Duration::from_secs(60));
    let Ok(meta) = MetaClient::connect(std::slice::from_ref(&cfg.listen)) else {
        return;
    };
    loop {
        tokio::time::sleep(every).await;
        crate::chunk::store::sweep_unregistered(&store, &meta, cfg.node_id, grace).await;
        let s = store.clone();
        let _ = tokio::task::spawn_blocking(move || s.sweep_incoming(incoming_grace)).await;
    }
}

/// Reports which packs this chunk server read (for the cold-after
/// policies) every 5 s when there were reads.
async fn report_reads(node: RaftNode<MetaApp>, chunks: ChunkService) {
    loop {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let reads = chunks.take_reads();
        if reads.is_empty() {
            continue;
        }
        let cmd = MetaCommand::TouchPacks { reads };
        if let Err(e) = node.write(cmd.encode()).await {
            tracing::debug!("pack read report dropped: {e}");
        }
    }
}

/// The slow background scrubber: verifies (and repairs) every local pack
/// once a day (`GRANARY_SCRUB_SECS`).
async fn scrub_loop(chunks: ChunkService) {
    let every = crate::settings::env_secs("GRANARY_SCRUB_SECS", 86_400);
    loop {
        tokio::time::sleep(every).await;
        let report = chunks.scrub(true).await;
        tracing::info!(%report, "background scrub finished");
    }
}

/// Refreshes this node's record every 30 s, or three times per dead-node
/// timeout when that is shorter (`GRANARY_NODE_DEAD_SECS`: a live node must
/// never look dead); every 2 s while that fails.
async fn heartbeat_loop(node: RaftNode<MetaApp>, cfg: ServerConfig, store: Option<PackStore>, mut ok: bool) {
    let every = Duration::from_secs(30)
        .min(crate::repair::dead_after() / 3)
        .max(Duration::from_millis(200));
    loop {
        let wait = if ok {
            every
        } else {
            every.min(Duration::from_secs(2))
        };
        tokio::time::sleep(wait).await;
        ok = match register_node(&node, &cfg, store.as_ref()).await {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!("node registration deferred: {e}");
                false
            }
        };
    }
}
