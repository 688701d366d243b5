//! # granary-server
//!
//! The roles of `granary server`:
//!
//! | module | owns |
//! |---|---|
//! | [`meta`] | the metadata model (datasets, versions, trees, chunk index, packs, nodes) applied inside the Raft state machine of `granary-raft`, and the `Meta` gRPC service clients call |
//! | [`chunk`] | the chunk role: pack files on local disk, pack sessions replicated down a chain of chunk servers, frame reads |
//! | [`cluster`] | one node's handle on the cluster: Raft proposals, applied state, chunk server clients, placement |
//! | [`tier`] | tiering: `tier move` planning, the leader's mover, cold-after policies |
//! | [`gc`] | garbage collection: mark, sweep, pack compaction |
//! | [`repair`] | re-replication of lost replicas, `admin scrub` across chunk servers and the object tier |
//! | [`settings`] | server settings read from the environment (`GRANARY_*_SECS`) |
//! | [`fault`] | crash and pause points for tests (`GRANARY_FAULT`, `GRANARY_FAULT_PAUSE`) |
//! | [`run`] | starting a node: data directory, listener, Raft bootstrap or join, serving, clean shutdown |
//!
//! The object tier itself (`ObjectTier`: packs in S3 or a local directory,
//! multipart uploads, range reads, block-cached frame reads) lives in
//! `granary_client::object` and `granary_client::object_blocks`: chunk servers
//! and clients both read it.

pub mod chunk;
pub mod cluster;
pub mod fault;
pub mod gc;
pub mod meta;
pub mod repair;
pub mod run;
pub mod settings;
pub mod tier;

pub use run::{run, Roles, ServerConfig, ServerError};
