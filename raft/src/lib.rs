//! # granary-raft
//!
//! Replication of Granary's metadata. This crate owns:
//! - the openraft type configuration (`declare_raft_types!`);
//! - the RocksDB-backed log store (vote, log entries; big-endian keys) and the
//!   state machine storage (applied state, snapshots from RocksDB checkpoints);
//! - the tonic gRPC network between meta nodes (AppendEntries, Vote, snapshot
//!   streaming), never exposed to clients.
//!
//! It knows nothing about datasets or chunks: the metadata model that runs
//! *inside* the state machine lives in `granary-server`'s meta role.
//!
//! Status: the storage and network arrive with the metadata-cluster issue.
