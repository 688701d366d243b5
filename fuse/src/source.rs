//! [`Source`]: where a mount gets a version's trees, chunk lists and chunks.
//!
//! The filesystem logic and the caches depend on this trait, not on gRPC:
//! [`ClientSource`] serves a real version through the client SDK,
//! [`MemSource`] serves an in-memory version (tests, and a fault injector:
//! it counts fetches and can be made to fail).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use granary_client::chunks::Fetched;
use granary_client::{ReadPattern, VersionReader};
use granary_core::tree::{EntryData, FileContent};
use granary_core::{ChunkId, ChunkRef, Tree, TreeEntry, TreeId};

use crate::cache::Want;
use crate::error::FsError;

/// One immutable version, as the mount sees it.
pub trait Source: Send + Sync + 'static {
    /// The root directory's tree.
    fn root(&self) -> TreeId;
    /// Modification time of the root directory (the version's commit time), in ms.
    fn root_mtime_ms(&self) -> u64 {
        0
    }
    /// Tree `id` (the implementation caches trees; they are immutable).
    fn tree(&self, id: TreeId) -> BoxFuture<'_, Result<Arc<Tree>, FsError>>;
    /// A file entry's chunk list.
    fn chunk_list<'a>(&'a self, entry: &'a TreeEntry) -> BoxFuture<'a, Result<Vec<ChunkRef>, FsError>>;
    /// The raw bytes of `ids`, in order, for a read (`Want::Read`) or ahead
    /// of one (`Want::Prefetch`), and which were read from the disk of a
    /// chunk server on this host. The implementation verifies them.
    fn fetch<'a>(&'a self, ids: &'a [ChunkId], why: Want) -> BoxFuture<'a, Result<Fetched, FsError>>;
}

/// A version read through the client SDK.
pub struct ClientSource {
    reader: VersionReader,
}

impl ClientSource {
    pub fn new(reader: VersionReader) -> Self {
        Self { reader }
    }

    pub fn reader(&self) -> &VersionReader {
        &self.reader
    }
}

impl Source for ClientSource {
    fn root(&self) -> TreeId {
        self.reader.root()
    }

    fn root_mtime_ms(&self) -> u64 {
        self.reader.version().created_ms
    }

    fn tree(&self, id: TreeId) -> BoxFuture<'_, Result<Arc<Tree>, FsError>> {
        Box::pin(async move { Ok(self.reader.tree(id).await?) })
    }

    fn chunk_list<'a>(&'a self, entry: &'a TreeEntry) -> BoxFuture<'a, Result<Vec<ChunkRef>, FsError>> {
        Box::pin(async move { Ok(self.reader.chunk_list(entry).await?) })
    }

    fn fetch<'a>(&'a self, ids: &'a [ChunkId], why: Want) -> BoxFuture<'a, Result<Fetched, FsError>> {
        // A prefetch says so: a chunk server reading the pack from the
        // object tier then fetches whole blocks from its first call on.
        let pattern = match why {
            Want::Read => ReadPattern::Demand,
            Want::Prefetch => ReadPattern::Ahead,
        };
        // `ChunkServers::fetch` verifies every frame against its chunk id (BLAKE3).
        Box::pin(async move { Ok(self.reader.chunk_servers().fetch_marked(ids, pattern).await?) })
    }
}

/// An in-memory version: trees and chunks in maps. Counts fetch calls (and
/// those made ahead of a reader) and chunks fetched, fails every fetch while `fail` is set, and makes every
/// fetch take `delay_ms` (a slow cluster).
pub struct MemSource {
    pub root: TreeId,
    pub trees: HashMap<TreeId, Arc<Tree>>,
    pub lists: HashMap<TreeId, Vec<ChunkRef>>,
    pub chunks: HashMap<ChunkId, Vec<u8>>,
    pub fetch_calls: AtomicU64,
    /// Fetch calls made ahead of a reader (`Want::Prefetch`).
    pub prefetch_calls: AtomicU64,
    pub chunks_fetched: AtomicU64,
    pub fail: AtomicBool,
    pub delay_ms: AtomicU64,
    /// Report every chunk fetched as read from a chunk server's disk on this host.
    pub local: AtomicBool,
}

impl Default for MemSource {
    fn default() -> Self {
        let empty = Tree::new(Vec::new()).expect("an empty tree is valid");
        let root = empty.id();
        Self {
            root,
            trees: HashMap::from([(root, Arc::new(empty))]),
            lists: HashMap::new(),
            chunks: HashMap::new(),
            fetch_calls: AtomicU64::new(0),
            prefetch_calls: AtomicU64::new(0),
            chunks_fetched: AtomicU64::new(0),
            fail: AtomicBool::new(false),
            local: AtomicBool::new(false),
            delay_ms: AtomicU64::new(0),
        }
    }
}

impl MemSource {
    /// Adds a chunk and returns its reference.
    pub fn add_chunk(&mut self, data: &[u8]) -> ChunkRef {
        let id = ChunkId::of(data);
        self.chunks.insert(id, data.to_vec());
        ChunkRef {
            id,
            len: data.len() as u32,
        }
    }

    /// Adds a tree and returns its id.
    pub fn add_tree(&mut self, tree: Tree) -> TreeId {
        let id = tree.id();
        self.trees.insert(id, Arc::new(tree));
        id
    }
}

impl Source for MemSource {
    fn root(&self) -> TreeId {
        self.root
    }

    fn tree(&self, id: TreeId) -> BoxFuture<'_, Result<Arc<Tree>, FsError>> {
        Box::pin(async move { self.trees.get(&id).cloned().ok_or(FsError::NotFound) })
    }

    fn chunk_list<'a>(&'a self, entry: &'a TreeEntry) -> BoxFuture<'a, Result<Vec<ChunkRef>, FsError>> {
        Box::pin(async move {
            match &entry.data {
                EntryData::File {
                    content: FileContent::Inline(list),
                    ..
                } => Ok(list.clone()),
                EntryData::File {
                    content: FileContent::Spilled { list, .. },
                    ..
                } => self.lists.get(list).cloned().ok_or(FsError::NotFound),
                _ => Err(FsError::Invalid("not a regular file".into())),
            }
        })
    }

    fn fetch<'a>(&'a self, ids: &'a [ChunkId], why: Want) -> BoxFuture<'a, Result<Fetched, FsError>> {
        Box::pin(async move {
            self.fetch_calls.fetch_add(1, Ordering::Relaxed);
            if why == Want::Prefetch {
                self.prefetch_calls.fetch_add(1, Ordering::Relaxed);
            }
            let delay = self.delay_ms.load(Ordering::Relaxed);
            if delay > 0 {
                tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
            }
            if self.fail.load(Ordering::Relaxed) {
                return Err(FsError::Remote("injected failure".into()));
            }
            self.chunks_fetched.fetch_add(ids.len() as u64, Ordering::Relaxed);
            let chunks = ids
                .iter()
                .map(|id| {
                    self.chunks
                        .get(id)
                        .map(|c| Bytes::copy_from_slice(c))
                        .ok_or_else(|| FsError::Remote(format!("chunk {id} missing")))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let local = vec![self.local.load(Ordering::Relaxed); chunks.len()];
            Ok(Fetched {
                chunks,
                local,
                object_read_bytes: 0,
            })
        })
    }
}
