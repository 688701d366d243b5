//! Transport settings every Granary gRPC endpoint shares: the client SDK,
//! the chunk and meta services, and Raft's peer network. Both sides of a
//! connection must agree on them, so they live here, below every crate that
//! opens one.

/// HTTP/2 windows: client-streaming uploads need far more than the 64 KiB
/// defaults (measured on loopback: ~0.23 GB/s with defaults, ~2 GB/s with these).
pub const STREAM_WINDOW: u32 = 4 << 20;
pub const CONNECTION_WINDOW: u32 = 8 << 20;
/// Largest HTTP/2 frame either side accepts (the default is 16 KiB): a 1 MiB
/// reply of frames crosses h2 as a few DATA frames instead of 64.
pub const MAX_FRAME: u32 = 1 << 20;
/// Largest gRPC message either side accepts (frame replies, snapshot
/// chunks, big Raft batches).
pub const MAX_MESSAGE: usize = 64 << 20;
