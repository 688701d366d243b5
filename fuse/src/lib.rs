//! # granary-fuse
//!
//! `granary mount DATASET[@N] DIR`: a read-only FUSE filesystem (fuser) over
//! one immutable dataset version.
//!
//! | module | owns |
//! |---|---|
//! | [`source`] | [`Source`]: trees, chunk lists and chunks of a version; the SDK implementation and an in-memory one |
//! | [`cache`] | [`ChunkCache`]: the memory cache, fetches in flight, counters; in front of the disk cache |
//! | [`disk_cache`] | [`DiskCache`]: chunks in append-only segment files, capped, shared between processes |
//! | [`fs`] | [`GranaryFs`]: inodes, attributes, directories, reads mapped to chunks, sequential readahead |
//! | [`adapter`] | [`FuseAdapter`]: the thin fuser layer; write-type calls get `EROFS` |
//! | [`error`] | [`FsError`] and its errno mapping |
//!
//! The filesystem logic never sees FUSE, so it is tested against a reference
//! model without mounting (`fuse/tests/model.rs`); `tests/mount.rs` mounts for real.

pub mod adapter;
pub mod cache;
pub mod disk_cache;
pub mod error;
pub mod fs;
pub mod source;

pub use adapter::FuseAdapter;
pub use cache::{ChunkCache, DiskCache, Stats, StatsSnapshot};
pub use error::FsError;
pub use fs::{FsConfig, GranaryFs};
pub use source::{ClientSource, MemSource, Source};
