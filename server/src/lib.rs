//! # granary-server
//!
//! The two roles of `granary server`:
//! - **meta**: the metadata model (datasets, versions, trees, chunk index,
//!   packs, nodes, policies) applied deterministically inside the Raft state
//!   machine of `granary-raft`, served to clients as the gRPC `MetaService`;
//! - **chunk**: pack files on local SSD, replication between chunk servers,
//!   the object tier, tiering, scrub, repair and GC workers.
//!
//! The embedded default runs both roles in one process on one node.
//!
//! Status: the roles arrive with the metadata-cluster and data-path issues.
