//! # granary-core
//!
//! The pure heart of Granary: the formats and algorithms every other crate
//! builds on. It has no async runtime, no RocksDB and no gRPC; everything here
//! is plain functions over bytes and files, so it can be tested exhaustively
//! and reused by the server, the client SDK and the FUSE mount alike.
//!
//! | module | owns |
//! |---|---|
//! | [`id`] | [`ChunkId`] and [`TreeId`]: 32-byte BLAKE3 content addresses |
//! | [`chunker`] | content-defined chunking (FastCDC) of slices and streams |
//! | [`frame`] | one chunk as stored: versioned header + raw or lz4 bytes, verified on decode |
//! | [`pack`] | append-only files of frames with an index footer; crash recovery and verification |
//! | [`tree`] | canonical, content-addressed directory listings and spilled chunk lists |
//! | [`ingest`] | the parallel walk → chunk → hash pipeline that turns a directory into trees |
//! | [`name`] | dataset names and `NAME@N[:PATH]` references |
//! | [`wire`] | HTTP/2 and gRPC limits every endpoint shares |
//!
//! Data flows through them in that order on upload: a file is cut by the
//! [`chunker`], each chunk is named by its [`ChunkId`], encoded as a
//! [`frame`](frame::encode_frame), appended to a [`pack`], and the file's
//! chunk list is recorded in a [`tree`](tree::Tree).

pub mod chunker;
pub mod frame;
pub mod id;
pub mod ingest;
pub mod name;
pub mod pack;
pub mod tree;
pub mod wire;

pub use chunker::{Chunker, ChunkerConfig};
pub use frame::{Codec, FrameError, FrameHeader};
pub use id::{ChunkId, IdParseError, TreeId};
pub use name::{validate_dataset_name, NameError, VersionRef};
pub use pack::{IndexEntry, PackError, PackReader, PackWriter};
pub use tree::{ChunkRef, EntryKind, Tree, TreeEntry, TreeError};
