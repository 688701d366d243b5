//! [`ChunkPeers`]: gRPC clients for other chunk servers, one lazily
//! connected channel per address, shared by everything on this node that
//! talks to chunk servers (pack session chains, restores, the mover, GC,
//! repair).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use granary_client::chunk_proto::chunk_client::ChunkClient;
use tonic::transport::Channel;
use tonic::Status;

/// Chunk-server clients by address; cheap to clone.
#[derive(Clone, Default)]
pub struct ChunkPeers {
    channels: Arc<Mutex<HashMap<String, Channel>>>,
}

impl ChunkPeers {
    /// A client for the chunk server at `addr` (connected on first use),
    /// with Granary's message size limits.
    pub fn client(&self, addr: &str) -> Result<ChunkClient<Channel>, Status> {
        let mut channels = self.channels.lock().expect("chunk peer map lock");
        let channel = match channels.get(addr) {
            Some(c) => c.clone(),
            None => {
                let c = granary_raft::network::endpoint(addr)
                    .map_err(|e| Status::invalid_argument(format!("bad chunk server address '{addr}': {e}")))?
                    .connect_lazy();
                channels.insert(addr.to_string(), c.clone());
                c
            }
        };
        Ok(ChunkClient::new(channel)
            .max_decoding_message_size(granary_client::MAX_MESSAGE)
            .max_encoding_message_size(granary_client::MAX_MESSAGE))
    }
}
