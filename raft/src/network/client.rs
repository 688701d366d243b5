//! openraft's `RaftNetworkV2` over the `RaftPeer` gRPC client.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::sync::{Arc, Mutex};

use openraft::error::{NetworkError, RPCError, RaftError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::type_config::alias::VoteOf;
use openraft::type_config::TypeConfigExt;
use openraft::{BasicNode, RaftNetworkV2, StorageError};
use serde::de::DeserializeOwned;
use tokio::io::AsyncReadExt;
use tokio::time::Instant;
use tonic::transport::Channel;

use crate::proto::raft_peer_client::RaftPeerClient;
use crate::proto::snapshot_chunk::Part;
use crate::proto::{Bytes, SnapshotChunk};
use crate::store::Snapshot;
use crate::{NodeId, TypeConfig};

/// gRPC channels to peers, one per address, shared by every user.
#[derive(Clone, Default)]
pub struct Channels {
    map: Arc<Mutex<HashMap<String, Channel>>>,
}

impl Channels {
    /// The channel to `addr`, created (lazily connecting) on first use.
    pub fn get(&self, addr: &str) -> Result<Channel, tonic::transport::Error> {
        let mut map = self.map.lock().expect("channel map lock");
        if let Some(c) = map.get(addr) {
            return Ok(c.clone());
        }
        let c = super::endpoint(addr)?.connect_lazy();
        map.insert(addr.to_string(), c.clone());
        Ok(c)
    }

    /// A peer client for `addr`.
    pub fn peer(&self, addr: &str) -> Result<RaftPeerClient<Channel>, tonic::transport::Error> {
        Ok(RaftPeerClient::new(self.get(addr)?)
            .max_decoding_message_size(super::MAX_MESSAGE)
            .max_encoding_message_size(super::MAX_MESSAGE))
    }
}

/// Creates [`PeerClient`]s for openraft.
#[derive(Clone, Default)]
pub struct NetworkFactory {
    pub channels: Channels,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerClient;

    async fn new_client(&mut self, _target: NodeId, node: &BasicNode) -> PeerClient {
        PeerClient {
            addr: node.addr.clone(),
            client: self.channels.peer(&node.addr).ok(),
        }
    }
}

/// openraft's connection to one peer.
pub struct PeerClient {
    addr: String,
    client: Option<RaftPeerClient<Channel>>,
}

/// Snapshot chunks queued ahead of the transport: a little read-ahead, so
/// disk and network overlap, without holding much of the snapshot in memory.
const CHUNKS_AHEAD: usize = 2;
/// Chunk size when openraft suggests none.
const DEFAULT_CHUNK: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Msg(String);

fn status_error(addr: &str, s: tonic::Status) -> RPCError<TypeConfig> {
    let e = Msg(format!("peer {addr}: {}", s.message()));
    match s.code() {
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled => {
            RPCError::Unreachable(Unreachable::new(&e))
        }
        _ => RPCError::Network(NetworkError::new(&e)),
    }
}

fn network_error(e: impl std::error::Error + 'static) -> RPCError<TypeConfig> {
    RPCError::Network(NetworkError::new(&e))
}

/// A peer whose Raft failed or stopped cannot take part until it restarts:
/// back off from it as from an unreachable one.
fn remote_stopped(addr: &str, e: impl std::fmt::Display) -> RPCError<TypeConfig> {
    RPCError::Unreachable(Unreachable::new(&Msg(format!("peer {addr}: {e}"))))
}

impl PeerClient {
    fn client(&mut self) -> Result<&mut RaftPeerClient<Channel>, RPCError<TypeConfig>> {
        let addr = &self.addr;
        self.client.as_mut().ok_or_else(|| {
            RPCError::Unreachable(Unreachable::new(&Msg(format!("invalid peer address '{addr}'"))))
        })
    }

    async fn call<Req, Resp>(
        &mut self,
        req: &Req,
        option: &RPCOption,
        method: impl AsyncFnOnce(
            &mut RaftPeerClient<Channel>,
            tonic::Request<Bytes>,
        ) -> Result<tonic::Response<Bytes>, tonic::Status>,
    ) -> Result<Resp, RPCError<TypeConfig>>
    where
        Req: serde::Serialize,
        Resp: DeserializeOwned,
    {
        let addr = self.addr.clone();
        let data = bincode::serialize(req).map_err(network_error)?;
        let transfer = std::time::Duration::from_secs_f64(data.len() as f64 / 25e6);
        let mut request = tonic::Request::new(Bytes { data });
        // The hard TTL, as under 0.9 (openraft does not enforce it itself):
        // for AppendEntries it is the heartbeat interval, 150 ms, plus the
        // time the payload takes at 25 MB/s (sent, written and synced by the
        // follower), so a follower catching up on batches of multi-MiB
        // entries (up to `MAX_BATCH_BYTES`) gets them in time; heartbeats
        // keep the short deadline.
        request.set_timeout(option.hard_ttl() + transfer);
        let reply = method(self.client()?, request)
            .await
            .map_err(|s| status_error(&addr, s))?;
        let result: Result<Resp, RaftError<TypeConfig>> =
            bincode::deserialize(&reply.into_inner().data).map_err(network_error)?;
        result.map_err(|e| remote_stopped(&addr, e))
    }
}

/// Queues `header`, then the file's bytes in chunks of `chunk` bytes,
/// noting the time each time the transport takes one.
///
/// Only reading the file can fail here: that is a storage error, which
/// openraft treats as fatal. When the transport drops the stream (the peer is
/// unreachable or went away) this just stops; the call then ends with the
/// network error, which openraft retries later.
async fn read_chunks(
    mut file: tokio::fs::File,
    header: Vec<u8>,
    chunk: usize,
    tx: tokio::sync::mpsc::Sender<SnapshotChunk>,
    progress: Arc<Mutex<Instant>>,
) -> io::Result<()> {
    let header = SnapshotChunk {
        part: Some(Part::Header(header)),
    };
    if tx.send(header).await.is_err() {
        return Ok(());
    }
    loop {
        let mut data = Vec::with_capacity(chunk);
        (&mut file).take(chunk as u64).read_to_end(&mut data).await?;
        if data.is_empty() {
            return Ok(());
        }
        let data = SnapshotChunk {
            part: Some(Part::Data(data)),
        };
        if tx.send(data).await.is_err() {
            return Ok(());
        }
        *progress.lock().expect("progress lock") = Instant::now();
    }
}

impl RaftNetworkV2<TypeConfig> for PeerClient {
    type SnapshotData = tokio::fs::File;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(&rpc, &option, async |c, r| c.append_entries(r).await)
            .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(&rpc, &option, async |c, r| c.vote(r).await).await
    }

    /// Streams the snapshot file in chunks over one client-streaming call;
    /// the follower writes them to a file, checks it and installs it.
    ///
    /// `option.hard_ttl()` (`install_snapshot_timeout`) bounds how long the
    /// transport may go without taking the next chunk. Once every chunk is sent the follower installs
    /// the snapshot, which takes as long as the snapshot is large; that wait
    /// is bounded by the channel's HTTP/2 keep-alive (a dead peer) and by
    /// `cancel`, not by a timeout.
    async fn full_snapshot(
        &mut self,
        vote: VoteOf<TypeConfig>,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let addr = self.addr.clone();
        let header = bincode::serialize(&(&vote, &snapshot.meta)).map_err(network_error)?;
        let chunk = option
            .snapshot_chunk_size()
            .unwrap_or(DEFAULT_CHUNK)
            .clamp(64 << 10, super::MAX_MESSAGE / 2);
        let idle = option.hard_ttl();
        let progress = Arc::new(Mutex::new(Instant::now()));
        let (tx, rx) = tokio::sync::mpsc::channel(CHUNKS_AHEAD);
        let reader = read_chunks(snapshot.snapshot, header, chunk, tx, progress.clone());
        let client = self.client()?;
        let call = client.install_snapshot(tokio_stream::wrappers::ReceiverStream::new(rx));
        tokio::pin!(reader, call, cancel);
        let mut all_sent = false;
        let reply = loop {
            let stalled_at = *progress.lock().expect("progress lock") + idle;
            tokio::select! {
                reply = &mut call => break reply,
                read = &mut reader, if !all_sent => match read {
                    Ok(()) => all_sent = true,
                    Err(e) => {
                        let e = StorageError::read_snapshot(None, TypeConfig::err_from_error(&e));
                        return Err(StreamingError::StorageError(e));
                    }
                },
                closed = &mut cancel => return Err(StreamingError::Closed(closed)),
                _ = tokio::time::sleep_until(stalled_at), if !all_sent => {
                    if progress.lock().expect("progress lock").elapsed() >= idle {
                        let e = Msg(format!("peer {addr}: the snapshot transfer made no progress for {idle:?}"));
                        return Err(StreamingError::Unreachable(Unreachable::new(&e)));
                    }
                }
            }
        };
        let reply = reply.map_err(|s| status_error(&addr, s))?;
        let result: Result<SnapshotResponse<TypeConfig>, openraft::error::Fatal<TypeConfig>> =
            bincode::deserialize(&reply.into_inner().data).map_err(network_error)?;
        result.map_err(|e| remote_stopped(&addr, e).into())
    }
}
