//! A running meta node: openraft plus the cluster plumbing around it.
//!
//! - **Bootstrap and join**: a node with no Raft state and no seed initializes a
//!   one-node cluster; with a seed it asks the cluster to add it (learner
//!   first, then voter while there are fewer than 5 voters). A node with Raft
//!   state simply resumes.
//! - **Writes** ([`RaftNode::write`]) go through the leader: on a follower the
//!   command is forwarded over the peer protocol, so a client may talk to any
//!   node. A write that cannot be committed within the write timeout fails
//!   with [`RaftNodeError::NoQuorum`] instead of hanging.
//! - **Linearizable reads** ([`RaftNode::read_barrier`]) use ReadIndex: the
//!   leader confirms its leadership with a quorum and names an index; the node
//!   waits until it has applied that index and then reads its own state.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use openraft::async_runtime::WatchReceiver;
use openraft::error::{ClientWriteError, LinearizableReadError, RaftError};
use openraft::{BasicNode, ChangeMembers, Config, ReadPolicy, ServerState, SnapshotPolicy};
use rocksdb::DB;
use serde::{Deserialize, Serialize};
use tokio::time::{timeout, Instant};

use crate::network::{Channels, NetworkFactory};
use crate::proto::{Empty, JoinRequest, RemoveRequest};
use crate::store::{self, App, StateMachineStore};
use crate::{Command, NodeId, Raft};

/// How a node runs.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub id: NodeId,
    /// The address peers and clients reach this node at (`host:port`).
    pub addr: String,
    /// Where the node keeps its database and snapshots.
    pub dir: PathBuf,
    pub raft: Config,
    /// How long a write or read barrier may wait for a leader and a quorum.
    pub write_timeout: Duration,
}

impl NodeConfig {
    /// Defaults tuned for a LAN: 150 ms heartbeats, 0.8-1.6 s election
    /// timeouts, a snapshot every 10,000 entries keeping 1,000 entries of log.
    pub fn new(id: NodeId, addr: impl Into<String>, dir: impl Into<PathBuf>) -> Self {
        let raft = Config {
            cluster_name: "granary".into(),
            heartbeat_interval: 150,
            election_timeout_min: 800,
            election_timeout_max: 1600,
            install_snapshot_timeout: 10_000,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(10_000),
            max_in_snapshot_log_to_keep: 1000,
            max_payload_entries: 2000,
            ..Default::default()
        };
        Self {
            id,
            addr: addr.into(),
            dir: dir.into(),
            raft,
            write_timeout: Duration::from_secs(5),
        }
    }
}

/// Why a cluster operation failed. Serializable, so a forwarded write brings
/// the leader's error back intact.
#[derive(Debug, Clone, thiserror::Error, Serialize, Deserialize)]
pub enum RaftNodeError {
    #[error("no quorum: {0}; a majority of the meta nodes must be running (check `granary admin status`)")]
    NoQuorum(String),
    #[error("node is not the leader (leader: {leader:?})")]
    NotLeader { leader: Option<NodeId> },
    #[error("cannot reach node {node} at {addr}: {message}")]
    Unreachable {
        node: NodeId,
        addr: String,
        message: String,
    },
    #[error("membership change failed: {0}")]
    Membership(String),
    #[error("raft stopped: {0}")]
    Fatal(String),
    #[error("metadata storage failed: {0}")]
    Storage(String),
}

impl RaftNodeError {
    /// "Node N is not a member" (also when the leader answered it for a
    /// follower that forwarded the change).
    pub fn is_not_member(&self) -> bool {
        matches!(self, RaftNodeError::Membership(m) if m.contains("is not a member"))
    }
}

/// One node's view of itself and the cluster.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeStatus {
    pub node_id: NodeId,
    pub addr: String,
    /// Leader, Follower, Candidate or Learner.
    pub state: String,
    pub leader: Option<NodeId>,
    pub term: u64,
    pub last_log_index: Option<u64>,
    pub applied_index: Option<u64>,
    pub snapshot_index: Option<u64>,
    pub purged_index: Option<u64>,
    pub voters: Vec<NodeId>,
    pub learners: Vec<NodeId>,
    /// Every member's address.
    pub nodes: BTreeMap<NodeId, String>,
    /// BLAKE3 of the application state, and the applied index it describes.
    pub digest: String,
    pub digest_index: Option<u64>,
}

/// A running meta node; cheap to clone.
pub struct RaftNode<A: App> {
    inner: Arc<Inner<A>>,
}

impl<A: App> Clone for RaftNode<A> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

struct Inner<A: App> {
    id: NodeId,
    addr: String,
    raft: Raft<A>,
    sm: StateMachineStore<A>,
    channels: Channels,
    write_timeout: Duration,
}

fn fatal(e: impl std::fmt::Display) -> RaftNodeError {
    RaftNodeError::Fatal(e.to_string())
}

impl<A: App> RaftNode<A> {
    /// Opens the node's storage and starts Raft (not yet part of any cluster
    /// if the storage is new: see [`bootstrap_or_join`](Self::bootstrap_or_join)).
    pub async fn open(cfg: NodeConfig, app: A) -> Result<Self, RaftNodeError> {
        let (log, sm) = store::open(&cfg.dir, app)
            .await
            .map_err(|e| RaftNodeError::Storage(e.to_string()))?;
        let channels = Channels::default();
        let network = NetworkFactory {
            channels: channels.clone(),
        };
        let config = Arc::new(cfg.raft.validate().map_err(fatal)?);
        let raft = Raft::new(cfg.id, config, network, log, sm.clone())
            .await
            .map_err(fatal)?;
        Ok(Self {
            inner: Arc::new(Inner {
                id: cfg.id,
                addr: cfg.addr,
                raft,
                sm,
                channels,
                write_timeout: cfg.write_timeout,
            }),
        })
    }

    pub fn id(&self) -> NodeId {
        self.inner.id
    }

    pub fn raft(&self) -> &Raft<A> {
        &self.inner.raft
    }

    /// True while this node is the Raft leader.
    pub fn is_leader(&self) -> bool {
        self.raft().is_leader()
    }

    /// The state machine, for receiving snapshots.
    pub(crate) fn state_machine(&self) -> &StateMachineStore<A> {
        &self.inner.sm
    }

    /// The database holding the application's state, for reads.
    pub fn db(&self) -> &Arc<DB> {
        self.inner.sm.db()
    }

    /// The application.
    pub fn app(&self) -> &A {
        self.inner.sm.app()
    }

    /// Joins the cluster through `seed`, initializes a one-node cluster when
    /// there is no seed, or does nothing when this node already has Raft state.
    pub async fn bootstrap_or_join(&self, seed: Option<&str>) -> Result<(), RaftNodeError> {
        if self.raft().is_initialized().await.map_err(fatal)? {
            tracing::info!(node = self.id(), "resuming with existing raft state");
            return Ok(());
        }
        match seed {
            None => {
                let members = BTreeMap::from([(self.id(), BasicNode::new(&self.inner.addr))]);
                match self.raft().initialize(members).await {
                    Ok(()) => tracing::info!(node = self.id(), "initialized a new single-node cluster"),
                    Err(RaftError::APIError(e)) => tracing::info!("not initializing: {e}"),
                    Err(e) => return Err(fatal(e)),
                }
                Ok(())
            }
            Some(seed) => {
                let deadline = Instant::now() + Duration::from_secs(60);
                loop {
                    let result = async {
                        let mut peer = self.inner.channels.peer(seed).map_err(|e| e.to_string())?;
                        peer.join(JoinRequest {
                            node_id: self.id(),
                            addr: self.inner.addr.clone(),
                        })
                        .await
                        .map_err(|s| s.message().to_string())
                    }
                    .await;
                    match result {
                        Ok(_) => {
                            tracing::info!(node = self.id(), seed, "joined the cluster");
                            return Ok(());
                        }
                        Err(msg) if Instant::now() < deadline => {
                            tracing::warn!(seed, "join failed, retrying: {msg}");
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                        Err(msg) => {
                            return Err(RaftNodeError::Membership(format!(
                            "could not join through {seed}: {msg}; check that the address is a running node"
                        )))
                        }
                    }
                }
            }
        }
    }

    /// Commits an application command through the leader and returns the
    /// application's response.
    pub async fn write(&self, command: Vec<u8>) -> Result<Vec<u8>, RaftNodeError> {
        let deadline = Instant::now() + self.inner.write_timeout;
        loop {
            let leader = self.wait_for_leader(deadline).await?;
            let result = if leader == self.id() {
                self.write_as_leader(command.clone()).await
            } else {
                self.forward_write(leader, command.clone(), deadline).await
            };
            match result {
                Err(RaftNodeError::NotLeader { .. }) | Err(RaftNodeError::Unreachable { .. })
                    if Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(RaftNodeError::Unreachable { node, addr, .. }) => {
                    return Err(RaftNodeError::NoQuorum(format!(
                        "the leader (node {node} at {addr}) is unreachable and no new leader was elected within {:?}",
                        self.inner.write_timeout
                    )))
                }
                other => return other,
            }
        }
    }

    /// Commits `command` on this node, which must be the leader. The reply
    /// comes once the applied command is durable (the state machine answers
    /// its clients only after a WAL sync).
    pub async fn write_as_leader(&self, command: Vec<u8>) -> Result<Vec<u8>, RaftNodeError> {
        let t = self.inner.write_timeout;
        match timeout(t, self.raft().client_write(Command(command))).await {
            Err(_) => Err(RaftNodeError::NoQuorum(format!(
                "the write was not committed within {t:?}"
            ))),
            Ok(Ok(resp)) => Ok(resp.data.0),
            // A discarded entry (this node lost leadership while the write
            // waited) is retried through the new leader, as 0.9 did for
            // entries the new leader overwrote. An entry discarded because a
            // snapshot superseded it may have been committed: rare, and the
            // retry may apply it twice (see docs/architecture.md).
            Ok(Err(RaftError::APIError(
                ClientWriteError::ForwardToLeader(f) | ClientWriteError::LogEntryDiscarded(f),
            ))) => Err(RaftNodeError::NotLeader { leader: f.leader_id }),
            Ok(Err(RaftError::APIError(e))) => Err(RaftNodeError::Membership(e.to_string())),
            Ok(Err(RaftError::Fatal(e))) => Err(fatal(e)),
        }
    }

    async fn forward_write(
        &self,
        leader: NodeId,
        command: Vec<u8>,
        deadline: Instant,
    ) -> Result<Vec<u8>, RaftNodeError> {
        let addr = self.addr_of(leader)?;
        let unreachable = |message: String| RaftNodeError::Unreachable {
            node: leader,
            addr: addr.clone(),
            message,
        };
        let mut peer = self
            .inner
            .channels
            .peer(&addr)
            .map_err(|e| unreachable(e.to_string()))?;
        let mut req = tonic::Request::new(crate::proto::Bytes { data: command });
        req.set_timeout(deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(1));
        let reply = peer
            .forward_write(req)
            .await
            .map_err(|s| unreachable(s.message().to_string()))?;
        bincode::deserialize::<Result<Vec<u8>, RaftNodeError>>(&reply.into_inner().data)
            .map_err(|e| unreachable(format!("malformed reply: {e}")))?
    }

    /// On the leader: confirms leadership with a quorum and returns the log
    /// index a linearizable read must observe.
    pub async fn leader_read_index(&self) -> Result<u64, RaftNodeError> {
        let t = self.inner.write_timeout;
        match timeout(t, self.raft().ensure_linearizable(ReadPolicy::ReadIndex)).await {
            Err(_) => Err(RaftNodeError::NoQuorum(format!(
                "leadership not confirmed within {t:?}"
            ))),
            Ok(Ok(read)) => Ok(read.log_id().index),
            Ok(Err(RaftError::APIError(LinearizableReadError::ForwardToLeader(f)))) => {
                Err(RaftNodeError::NotLeader { leader: f.leader_id })
            }
            Ok(Err(RaftError::APIError(LinearizableReadError::QuorumNotEnough(e)))) => {
                Err(RaftNodeError::NoQuorum(e.to_string()))
            }
            Ok(Err(RaftError::Fatal(e))) => Err(fatal(e)),
        }
    }

    /// Waits until this node's state reflects every write committed before the call.
    pub async fn read_barrier(&self) -> Result<(), RaftNodeError> {
        let deadline = Instant::now() + self.inner.write_timeout;
        loop {
            let leader = self.wait_for_leader(deadline).await?;
            let index = if leader == self.id() {
                self.leader_read_index().await
            } else {
                let addr = self.addr_of(leader)?;
                match self.inner.channels.peer(&addr) {
                    Ok(mut peer) => peer
                        .read_index(Empty {})
                        .await
                        .map(|r| r.into_inner().index)
                        .map_err(|s| RaftNodeError::Unreachable {
                            node: leader,
                            addr,
                            message: s.message().to_string(),
                        }),
                    Err(e) => Err(RaftNodeError::Unreachable {
                        node: leader,
                        addr,
                        message: e.to_string(),
                    }),
                }
            };
            match index {
                Ok(index) => {
                    let remaining = deadline.saturating_duration_since(Instant::now());
                    return self
                        .raft()
                        .wait(Some(remaining.max(Duration::from_millis(100))))
                        .applied_index_at_least(Some(index), "read barrier")
                        .await
                        .map(|_| ())
                        .map_err(|e| RaftNodeError::NoQuorum(format!("this node did not catch up: {e}")));
                }
                Err(RaftNodeError::NotLeader { .. }) | Err(RaftNodeError::Unreachable { .. })
                    if Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Adds a node: learner first (waiting until it has caught up), then voter
    /// while the cluster has fewer than 5 voters. Runs on the leader; other
    /// nodes forward it.
    pub async fn add_node(&self, id: NodeId, addr: String) -> Result<(), RaftNodeError> {
        let leader = self
            .wait_for_leader(Instant::now() + self.inner.write_timeout)
            .await?;
        if leader != self.id() {
            let mut peer = self.peer(leader)?;
            peer.join(JoinRequest { node_id: id, addr })
                .await
                .map_err(|s| RaftNodeError::Membership(s.message().to_string()))?;
            return Ok(());
        }
        let membership = self.raft().metrics().borrow_watched().membership_config.clone();
        let is_voter = membership.membership().voter_ids().any(|v| v == id);
        if !is_voter {
            self.raft()
                .add_learner(id, BasicNode::new(&addr), true)
                .await
                .map_err(|e| RaftNodeError::Membership(e.to_string()))?;
            let voters = membership.membership().voter_ids().count();
            if voters < 5 {
                self.raft()
                    .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), true)
                    .await
                    .map_err(|e| RaftNodeError::Membership(e.to_string()))?;
            }
        }
        tracing::info!(node = id, addr, "node added to the cluster");
        Ok(())
    }

    /// Removes a node from the cluster (voter or learner). Runs on the leader;
    /// other nodes forward it.
    pub async fn remove_node(&self, id: NodeId) -> Result<(), RaftNodeError> {
        let leader = self
            .wait_for_leader(Instant::now() + self.inner.write_timeout)
            .await?;
        if leader != self.id() {
            let mut peer = self.peer(leader)?;
            peer.remove_node(RemoveRequest { node_id: id })
                .await
                .map_err(|s| RaftNodeError::Membership(s.message().to_string()))?;
            return Ok(());
        }
        let membership = self.raft().metrics().borrow_watched().membership_config.clone();
        let m = membership.membership();
        let change = if m.voter_ids().any(|v| v == id) {
            if m.voter_ids().count() == 1 {
                return Err(RaftNodeError::Membership(format!(
                    "node {id} is the only voter; add another node before removing it"
                )));
            }
            ChangeMembers::RemoveVoters(BTreeSet::from([id]))
        } else if m.learner_ids().any(|l| l == id) {
            ChangeMembers::RemoveNodes(BTreeSet::from([id]))
        } else {
            return Err(RaftNodeError::Membership(format!(
                "node {id} is not a member; `granary admin status` lists the members"
            )));
        };
        self.raft()
            .change_membership(change, false)
            .await
            .map_err(|e| RaftNodeError::Membership(e.to_string()))?;
        tracing::info!(node = id, "node removed from the cluster");
        Ok(())
    }

    /// This node's status, with a digest of the application state.
    pub async fn status(&self) -> Result<NodeStatus, RaftNodeError> {
        let m = self.raft().metrics().borrow_watched().clone();
        let (digest_at, digest) = self
            .inner
            .sm
            .digest()
            .await
            .map_err(|e| RaftNodeError::Storage(e.to_string()))?;
        let membership = m.membership_config.membership();
        Ok(NodeStatus {
            node_id: self.id(),
            addr: self.inner.addr.clone(),
            state: match m.state {
                ServerState::Leader => "Leader",
                ServerState::Follower => "Follower",
                ServerState::Candidate => "Candidate",
                ServerState::Learner => "Learner",
                ServerState::Shutdown => "Shutdown",
            }
            .to_string(),
            leader: m.current_leader,
            term: m.current_term,
            last_log_index: m.last_log_index,
            applied_index: m.last_applied.map(|l| l.index),
            snapshot_index: m.snapshot.map(|l| l.index),
            purged_index: m.purged.map(|l| l.index),
            voters: membership.voter_ids().collect(),
            learners: membership.learner_ids().collect(),
            nodes: membership.nodes().map(|(id, n)| (*id, n.addr.clone())).collect(),
            digest: digest.to_hex().to_string(),
            digest_index: digest_at.map(|l| l.index),
        })
    }

    /// Asks the node at `addr` for its status.
    pub async fn peer_status(&self, addr: &str) -> Result<NodeStatus, String> {
        let mut peer = self.inner.channels.peer(addr).map_err(|e| e.to_string())?;
        let mut req = tonic::Request::new(Empty {});
        req.set_timeout(Duration::from_secs(2));
        let reply = peer.node_status(req).await.map_err(|s| s.message().to_string())?;
        serde_json::from_slice(&reply.into_inner().data).map_err(|e| e.to_string())
    }

    /// Stops Raft.
    pub async fn shutdown(&self) {
        if let Err(e) = self.raft().shutdown().await {
            tracing::warn!("raft shutdown: {e}");
        }
    }

    /// The address of member `id`.
    pub fn addr_of(&self, id: NodeId) -> Result<String, RaftNodeError> {
        let m = self.raft().metrics().borrow_watched().membership_config.clone();
        m.membership()
            .get_node(&id)
            .map(|n| n.addr.clone())
            .ok_or_else(|| {
                RaftNodeError::NoQuorum(format!("leader {id} is not in this node's membership view"))
            })
    }

    fn peer(
        &self,
        id: NodeId,
    ) -> Result<crate::proto::raft_peer_client::RaftPeerClient<tonic::transport::Channel>, RaftNodeError>
    {
        let addr = self.addr_of(id)?;
        self.inner
            .channels
            .peer(&addr)
            .map_err(|e| RaftNodeError::Unreachable {
                node: id,
                addr,
                message: e.to_string(),
            })
    }

    /// The current leader, waiting for an election until `deadline`.
    async fn wait_for_leader(&self, deadline: Instant) -> Result<NodeId, RaftNodeError> {
        let mut rx = self.raft().metrics();
        loop {
            if let Some(leader) = rx.borrow_and_update().current_leader {
                return Ok(leader);
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() || timeout(remaining, rx.changed()).await.is_err() {
                return Err(RaftNodeError::NoQuorum(format!(
                    "no leader was elected within {:?}",
                    self.inner.write_timeout
                )));
            }
        }
    }
}
