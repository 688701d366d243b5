//! # granary-server
//!
//! The roles of `granary server`:
//!
//! | module | owns |
//! |---|---|
//! | [`meta`] | the metadata model (datasets, versions, trees, chunk index, packs, nodes) applied inside the Raft state machine of `granary-raft`, and the `Meta` gRPC service clients call |
//! | [`chunk`] | the chunk role: pack files on local disk, pack sessions replicated down a chain of chunk servers, frame reads |
//! | [`object`] | the object tier: packs in S3 or a local directory (`object_store`), multipart uploads, range reads |
//! | [`cluster`] | one node's handle on the cluster: Raft proposals, applied state, chunk server clients, placement |
//! | [`tier`] | tiering: `tier move` planning, the leader's mover, cold-after policies |
//! | [`gc`] | garbage collection: mark, sweep, pack compaction |
//! | [`repair`] | re-replication of lost replicas, `admin scrub` across chunk servers and the object tier |
//! | [`settings`] | server settings read from the environment (`GRANARY_*_SECS`) |
//! | [`fault`] | crash points for tests (`GRANARY_FAULT`) |
//! | [`run`] | starting a node: data directory, listener, Raft bootstrap or join, serving, clean shutdown |

pub mod chunk;
pub mod cluster;
pub mod fault;
pub mod gc;
pub mod meta;
pub mod object;
pub mod repair;
pub mod run;
pub mod settings;
pub mod tier;

pub use run::{run, Roles, ServerConfig, ServerError};
