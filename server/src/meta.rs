//! The meta role: Granary's metadata model on top of Raft.
//!
//! - [`state`]: column families and the records stored in them.
//! - [`command`]: the commands that are Raft entries, their replies and errors.
//! - [`apply`]: [`MetaApp`], which applies a command deterministically
//!   (the `granary_raft::App` implementation).
//! - [`walk`]: which trees and chunks a set of versions reaches.
//! - [`service`]: the `Meta` gRPC service: validates requests, proposes
//!   commands through Raft, and serves reads (linearizable, except reads of
//!   immutable objects that this node already has).
//!
//! Invariant: every stored tree object is complete. `PutTrees` refuses an
//! object whose subtrees, chunk lists or chunks are not stored, so a version
//! commit only has to check that its root tree is stored for the whole
//! version to point at durable data.

pub mod apply;
pub mod command;
pub mod service;
pub mod state;
pub mod walk;

pub use apply::MetaApp;
pub use service::MetaService;
