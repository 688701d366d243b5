//! # granary-server
//!
//! The roles of `granary server`:
//!
//! | module | owns |
//! |---|---|
//! | [`meta`] | the metadata model (datasets, versions, trees, chunk index, packs, nodes) applied inside the Raft state machine of `granary-raft`, and the `Meta` gRPC service clients call |
//! | [`chunk`] | the chunk role: pack files on local disk, pack sessions replicated down a chain of chunk servers, frame reads |
//! | [`run`] | starting a node: data directory, listener, Raft bootstrap or join, serving, clean shutdown |
//!
//! Tiering, scrub, repair and GC arrive with the tiering work.

pub mod chunk;
pub mod meta;
pub mod run;

pub use run::{run, Roles, ServerConfig, ServerError};
