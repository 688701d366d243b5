//! The peer network between meta nodes: the `RaftPeer` gRPC service
//! ([`PeerService`]) and openraft's `RaftNetworkV2` on top of its client
//! ([`NetworkFactory`]). Payloads are bincode-encoded openraft messages;
//! snapshots are files streamed in chunks over one client-streaming call. A
//! peer that cannot be reached maps to openraft's `Unreachable`, so openraft
//! backs off instead of hammering it.

mod client;
mod service;

pub use client::{Channels, NetworkFactory, PeerClient};
pub use service::PeerService;

use std::time::Duration;

use tonic::transport::Endpoint;

/// HTTP/2 and gRPC limits, shared with the client SDK and the servers.
pub use granary_core::wire::{CONNECTION_WINDOW, MAX_FRAME, MAX_MESSAGE, STREAM_WINDOW};

/// A lazily connecting endpoint for `host:port`.
pub fn endpoint(addr: &str) -> Result<Endpoint, tonic::transport::Error> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5)))
}
