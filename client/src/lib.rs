//! # granary-client
//!
//! The SDK other programs (and the `granary` CLI and FUSE mount) use to talk
//! to a cluster.
//!
//! | module | owns |
//! |---|---|
//! | [`proto`] | the `Meta` gRPC API (generated): client stubs, and the server trait the meta role implements |
//! | [`meta`] | [`MetaClient`]: datasets, versions, trees, chunk index, packs, nodes, cluster status; fails over between server addresses |
//! | [`error`] | [`ClientError`]: one readable line per failure |
//!
//! Upload, download and the read API over a version arrive with the data path.

pub mod error;
pub mod meta;

pub use error::ClientError;
pub use meta::MetaClient;

/// Generated code for the `Meta` API (`client/proto/meta.proto`).
pub mod proto {
    tonic::include_proto!("granary.meta");
}

/// HTTP/2 windows: client-streaming uploads need far more than the 64 KiB
/// defaults (measured on loopback: ~0.23 GB/s with defaults, ~2 GB/s with these).
pub const STREAM_WINDOW: u32 = 4 << 20;
pub const CONNECTION_WINDOW: u32 = 8 << 20;
/// Largest gRPC message either side accepts.
pub const MAX_MESSAGE: usize = 64 << 20;
