//! # granary-client
//!
//! The SDK other programs (and the `granary` CLI and FUSE mount) use to talk
//! to a cluster.
//!
//! | module | owns |
//! |---|---|
//! | [`proto`] | the `Meta` gRPC API (generated): client stubs, and the server trait the meta role implements |
//! | [`client`] | [`Client`]: the entry point: connect, upload, open a version, download, diff |
//! | [`meta`] | [`MetaClient`]: datasets, versions, trees, chunk index, packs, nodes, cluster status; fails over between server addresses |
//! | [`chunks`] | chunk servers: locating chunks, fetching and verifying frames, opening pack sessions; direct reads of local packs and of the object tier |
//! | [`pack_stream`] | a new pack on its way to its first replica: streamed over gRPC, or written straight into a chunk server on this host |
//! | [`object`] | the object tier: packs in S3 or a local directory (`object_store`), multipart uploads, range reads; used by chunk servers and by clients |
//! | [`object_blocks`] | frame reads of object-tier packs in cached 16 MiB blocks with readahead |
//! | [`upload`] | directory -> chunks -> packs -> trees -> version |
//! | [`file_cache`] | chunk lists of files already uploaded, so unchanged files are not read again |
//! | [`version`] | [`VersionReader`]: stat, read_dir, read_at over one immutable version |
//! | [`download`] | a version back into a directory, byte- and metadata-identical |
//! | [`diff`] | what changed between two versions |
//! | [`error`] | [`ClientError`]: one readable line per failure |

pub mod blocking;
pub mod chunks;
pub mod client;
pub mod diff;
pub mod download;
pub mod error;
pub mod file_cache;
pub mod meta;
pub mod object;
pub mod object_blocks;
pub mod pack_stream;
pub mod upload;
pub mod version;

pub use chunks::ReadPattern;
pub use client::Client;
pub use error::ClientError;
pub use meta::MetaClient;
pub use upload::{UploadOptions, UploadProgress, UploadReport};
pub use version::VersionReader;

/// Generated code for the `Meta` API (`client/proto/meta.proto`).
pub mod proto {
    tonic::include_proto!("granary.meta");
}

/// Generated code for the chunk servers' API (`client/proto/chunk.proto`).
pub mod chunk_proto {
    tonic::include_proto!("granary.chunk");
}

/// HTTP/2 and gRPC limits, shared with the servers and Raft's peers.
pub use granary_core::wire::{CONNECTION_WINDOW, MAX_FRAME, MAX_MESSAGE, STREAM_WINDOW};
