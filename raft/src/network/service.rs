//! The `RaftPeer` gRPC service: openraft RPCs plus write forwarding, read
//! index, membership and status for the rest of the cluster.

use openraft::type_config::alias::{SnapshotMetaOf, VoteOf};
use tokio::io::AsyncWriteExt;
use tonic::{Request, Response, Status, Streaming};

use crate::node::RaftNode;
use crate::proto::raft_peer_server::{RaftPeer, RaftPeerServer};
use crate::proto::snapshot_chunk::Part;
use crate::proto::{Bytes, Empty, JoinRequest, ReadIndexReply, RemoveRequest, SnapshotChunk};
use crate::store::{App, Snapshot};
use crate::TypeConfig;

/// Serves the peer protocol for one node.
pub struct PeerService<A: App> {
    node: RaftNode<A>,
}

impl<A: App> PeerService<A> {
    /// The tonic service for `node`, with large message limits for snapshot chunks.
    pub fn server(node: RaftNode<A>) -> RaftPeerServer<Self> {
        RaftPeerServer::new(Self { node })
            .max_decoding_message_size(super::MAX_MESSAGE)
            .max_encoding_message_size(super::MAX_MESSAGE)
    }
}

fn decode<T: serde::de::DeserializeOwned>(req: Request<Bytes>) -> Result<T, Status> {
    bincode::deserialize(&req.into_inner().data)
        .map_err(|e| Status::invalid_argument(format!("malformed peer message: {e}")))
}

fn encode<T: serde::Serialize>(v: &T) -> Result<Response<Bytes>, Status> {
    bincode::serialize(v)
        .map(|data| Response::new(Bytes { data }))
        .map_err(|e| Status::internal(e.to_string()))
}

#[tonic::async_trait]
impl<A: App> RaftPeer for PeerService<A> {
    async fn append_entries(&self, req: Request<Bytes>) -> Result<Response<Bytes>, Status> {
        let rpc = decode(req)?;
        encode(&self.node.raft().append_entries(rpc).await)
    }

    async fn vote(&self, req: Request<Bytes>) -> Result<Response<Bytes>, Status> {
        let rpc = decode(req)?;
        encode(&self.node.raft().vote(rpc).await)
    }

    /// Receives a snapshot into an unnamed temp file, checks it, then hands
    /// it to openraft, which installs it if the sender is still the leader.
    async fn install_snapshot(
        &self,
        req: Request<Streaming<SnapshotChunk>>,
    ) -> Result<Response<Bytes>, Status> {
        let mut chunks = req.into_inner();
        let (vote, meta): (VoteOf<TypeConfig>, SnapshotMetaOf<TypeConfig>) = match chunks.message().await? {
            Some(SnapshotChunk {
                part: Some(Part::Header(header)),
            }) => bincode::deserialize(&header)
                .map_err(|e| Status::invalid_argument(format!("malformed snapshot header: {e}")))?,
            _ => {
                return Err(Status::invalid_argument(
                    "a snapshot transfer must start with its header",
                ))
            }
        };
        let sm = self.node.state_machine();
        let receive_err = |e: std::io::Error| Status::internal(format!("receiving a snapshot: {e}"));
        let mut file = sm.snapshot_receiver().await.map_err(receive_err)?;
        while let Some(chunk) = chunks.message().await? {
            let Some(Part::Data(data)) = chunk.part else {
                return Err(Status::invalid_argument(
                    "a snapshot transfer has one header, first",
                ));
            };
            file.write_all(&data).await.map_err(receive_err)?;
        }
        file.flush().await.map_err(receive_err)?;
        // Checked here so that a damaged transfer is an error the leader
        // retries, not a failed install, which openraft treats as fatal.
        let snapshot = sm
            .check_received(file, &meta)
            .await
            .map_err(|e| Status::data_loss(e.to_string()))?;
        let result = self
            .node
            .raft()
            .install_full_snapshot(vote, Snapshot { meta, snapshot })
            .await;
        encode(&result)
    }

    async fn forward_write(&self, req: Request<Bytes>) -> Result<Response<Bytes>, Status> {
        let data = req.into_inner().data;
        encode(&self.node.write_as_leader(data).await)
    }

    async fn read_index(&self, _req: Request<Empty>) -> Result<Response<ReadIndexReply>, Status> {
        let index = self
            .node
            .leader_read_index()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(Response::new(ReadIndexReply { index }))
    }

    async fn join(&self, req: Request<JoinRequest>) -> Result<Response<Empty>, Status> {
        let JoinRequest { node_id, addr } = req.into_inner();
        self.node
            .add_node(node_id, addr)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(Response::new(Empty {}))
    }

    async fn remove_node(&self, req: Request<RemoveRequest>) -> Result<Response<Empty>, Status> {
        self.node
            .remove_node(req.into_inner().node_id)
            .await
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        Ok(Response::new(Empty {}))
    }

    async fn node_status(&self, _req: Request<Empty>) -> Result<Response<Bytes>, Status> {
        let status = self
            .node
            .status()
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        let data = serde_json::to_vec(&status).map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(Bytes { data }))
    }
}
