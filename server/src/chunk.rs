//! The chunk role: packs of frames on local disk (the SSD tier).
//!
//! - [`store`]: [`PackStore`], pack files under `DATA_DIR/packs/XX/ID.pack`
//!   (`ID.open` while a session writes them), disk usage.
//! - [`service`]: the `Chunk` gRPC service: pack sessions and frame reads.
//! - [`peers`]: gRPC clients for other chunk servers, shared by the node.
//!
//! Frame reads of packs only in the object tier go through
//! [`granary_client::object_blocks`] (cached 16 MiB blocks), which clients
//! use too when they read the object tier directly.
//!
//! A pack session: the client streams whole frames to the first replica; each
//! replica verifies every frame (BLAKE3 + CRC) as it appends it, forwards the
//! stream to the next replica in the chain, and at the end seals (fsync) and
//! renames its file, then waits for the rest of the chain to do the same. The
//! first replica then registers the pack and its chunk list in meta and only
//! then acknowledges the client. Any failure aborts the session on every
//! replica (the `.open` files are deleted) and nothing is registered.

pub mod peers;
pub mod service;
pub mod store;

pub use service::ChunkService;
pub use store::{LocalReadToken, PackStore};
