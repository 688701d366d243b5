//! # granary-server
//!
//! The roles of `granary server`:
//!
//! | module | owns |
//! |---|---|
//! | [`meta`] | the metadata model (datasets, versions, trees, chunk index, packs, nodes) applied inside the Raft state machine of `granary-raft`, and the `Meta` gRPC service clients call |
//! | [`run`] | starting a node: data directory, listener, Raft bootstrap or join, serving, clean shutdown |
//!
//! The chunk role (packs on local SSD, replication, tiering, scrub, repair,
//! GC) arrives with the data-path and tiering work.

pub mod meta;
pub mod run;

pub use run::{run, Roles, ServerConfig, ServerError};
