//! # granary-raft
//!
//! Replication of Granary's metadata with openraft 0.10 (a pre-release: its
//! core submits log writes without waiting for them to be flushed and
//! batches queued client writes, which 0.9 could not; see
//! `docs/architecture.md`):
//!
//! | module | owns |
//! |---|---|
//! | [`store`] | one RocksDB per node: the Raft log and vote ([`store::LogStore`]), the state machine ([`store::StateMachineStore`]) and snapshot files |
//! | [`network`] | the `RaftPeer` gRPC service between meta nodes and its client (openraft's `RaftNetworkV2`), including the chunked snapshot transfer |
//! | [`node`] | [`RaftNode`]: opening, bootstrapping and joining a cluster, writes forwarded to the leader, linearizable read barriers, membership changes, status |
//!
//! The crate knows nothing about datasets or chunks. An application plugs in
//! through the [`App`] trait: it names its column families and applies one
//! committed command at a time into a RocksDB `WriteBatch`. Commands and
//! responses travel as opaque bytes ([`Command`], [`Response`]).

pub mod network;
pub mod node;
pub mod store;

pub use node::{NodeConfig, NodeStatus, RaftNode, RaftNodeError};
pub use store::App;

use std::fmt;

use serde::{Deserialize, Serialize};

/// An application command, encoded by the application. (`serde_bytes`:
/// encoded as one byte string, not element by element.)
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command(#[serde(with = "serde_bytes")] pub Vec<u8>);

/// The application's reply to a command, encoded by the application.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response(#[serde(with = "serde_bytes")] pub Vec<u8>);

impl fmt::Debug for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Command({} bytes)", self.0.len())
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

impl fmt::Debug for Response {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Response({} bytes)", self.0.len())
    }
}

/// Node ids are plain integers, unique within a cluster.
pub type NodeId = u64;

openraft::declare_raft_types!(
    /// Granary's openraft type configuration: opaque commands and nodes
    /// addressed by `host:port`. (Snapshots are files, never whole in memory:
    /// the state machine's `SnapshotData`.)
    pub TypeConfig:
        D = Command,
        R = Response,
        NodeId = NodeId,
        Node = openraft::BasicNode,
);

/// The openraft handle for this configuration and an application's state machine.
pub type Raft<A> = openraft::Raft<TypeConfig, store::StateMachineStore<A>>;

/// Generated gRPC code for the peer protocol.
pub mod proto {
    tonic::include_proto!("granary.raft");
}
