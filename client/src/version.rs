//! Reading one immutable version: its directory trees, file attributes and
//! file contents. This is the API the FUSE mount and `download` build on.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use granary_core::tree::{decode_chunk_list, EntryData, FileContent, Timestamp};
use granary_core::{ChunkRef, EntryKind, Tree, TreeEntry, TreeId};

use crate::chunks::ChunkServers;
use crate::error::ClientError;
use crate::meta::MetaClient;
use crate::proto::Version;

/// An open version; cheap to clone. Trees are cached (they are immutable).
#[derive(Clone)]
pub struct VersionReader {
    meta: MetaClient,
    chunks: ChunkServers,
    version: Version,
    root: TreeId,
    trees: Arc<Mutex<HashMap<TreeId, Arc<Tree>>>>,
}

/// What `stat` returns: the root directory has no entry of its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Root(TreeId),
    Entry(TreeEntry),
}

impl Node {
    pub fn kind(&self) -> EntryKind {
        match self {
            Node::Root(_) => EntryKind::Dir,
            Node::Entry(e) => e.kind(),
        }
    }

    pub fn size(&self) -> u64 {
        match self {
            Node::Root(_) => 0,
            Node::Entry(e) => e.size(),
        }
    }

    pub fn mtime(&self) -> Timestamp {
        match self {
            Node::Root(_) => Timestamp::default(),
            Node::Entry(e) => e.mtime,
        }
    }
}

fn not_found(path: &str) -> ClientError {
    ClientError::Server {
        code: tonic::Code::NotFound,
        message: format!("'{path}' does not exist in this version"),
    }
}

impl VersionReader {
    pub(crate) fn new(meta: MetaClient, chunks: ChunkServers, version: Version) -> Result<Self, ClientError> {
        let root = TreeId::from_slice(&version.root)
            .ok_or_else(|| ClientError::Invalid("version has a malformed root tree id".into()))?;
        Ok(Self {
            meta,
            chunks,
            version,
            root,
            trees: Arc::default(),
        })
    }

    /// The version's metadata.
    pub fn version(&self) -> &Version {
        &self.version
    }

    pub fn root(&self) -> TreeId {
        self.root
    }

    /// Fetches (or returns the cached) tree `id`.
    pub async fn tree(&self, id: TreeId) -> Result<Arc<Tree>, ClientError> {
        if let Some(t) = self.trees.lock().expect("tree cache lock").get(&id) {
            return Ok(t.clone());
        }
        let objects = self.meta.get_trees(&[id]).await?;
        let (_, data) = objects
            .into_iter()
            .next()
            .ok_or_else(|| not_found(&id.to_string()))?;
        if TreeId::of(&data) != id {
            return Err(ClientError::Invalid(format!("tree {id} came back damaged")));
        }
        let tree =
            Arc::new(Tree::decode(&data).map_err(|e| ClientError::Invalid(format!("tree {id}: {e}")))?);
        self.trees
            .lock()
            .expect("tree cache lock")
            .insert(id, tree.clone());
        Ok(tree)
    }

    /// The node at `path` ("" or "/" is the root; components separated by '/').
    pub async fn stat(&self, path: &str) -> Result<Node, ClientError> {
        let mut node = Node::Root(self.root);
        for part in path.split('/').filter(|p| !p.is_empty()) {
            let dir = match &node {
                Node::Root(id) => *id,
                Node::Entry(TreeEntry {
                    data: EntryData::Dir { tree },
                    ..
                }) => *tree,
                _ => return Err(not_found(path)),
            };
            let tree = self.tree(dir).await?;
            node = Node::Entry(
                tree.get(part.as_bytes())
                    .cloned()
                    .ok_or_else(|| not_found(path))?,
            );
        }
        Ok(node)
    }

    /// The entries of the directory at `path`.
    pub async fn read_dir(&self, path: &str) -> Result<Arc<Tree>, ClientError> {
        match self.stat(path).await? {
            Node::Root(id)
            | Node::Entry(TreeEntry {
                data: EntryData::Dir { tree: id },
                ..
            }) => self.tree(id).await,
            _ => Err(ClientError::Invalid(format!("'{path}' is not a directory"))),
        }
    }

    /// A file entry's chunk list (fetching it when it is stored out of line).
    pub async fn chunk_list(&self, entry: &TreeEntry) -> Result<Vec<ChunkRef>, ClientError> {
        match &entry.data {
            EntryData::File {
                content: FileContent::Inline(list),
                ..
            } => Ok(list.clone()),
            EntryData::File {
                content: FileContent::Spilled { list, .. },
                size,
            } => {
                let objects = self.meta.get_trees(&[*list]).await?;
                let (_, data) = objects
                    .into_iter()
                    .next()
                    .ok_or_else(|| not_found(&list.to_string()))?;
                if TreeId::of(&data) != *list {
                    return Err(ClientError::Invalid(format!(
                        "chunk list {list} came back damaged"
                    )));
                }
                let chunks = decode_chunk_list(&data).map_err(|e| ClientError::Invalid(e.to_string()))?;
                if chunks.iter().map(|c| c.len as u64).sum::<u64>() != *size {
                    return Err(ClientError::Invalid(format!(
                        "chunk list {list} does not match its file size"
                    )));
                }
                Ok(chunks)
            }
            _ => Err(ClientError::Invalid("not a regular file".into())),
        }
    }

    /// Reads up to `len` bytes of the file at `path` from `offset` (fewer at the end of the file).
    pub async fn read_at(&self, path: &str, offset: u64, len: usize) -> Result<Vec<u8>, ClientError> {
        let entry = match self.stat(path).await? {
            Node::Entry(e) if e.kind() == EntryKind::File => e,
            _ => return Err(ClientError::Invalid(format!("'{path}' is not a regular file"))),
        };
        let list = self.chunk_list(&entry).await?;
        read_range(&self.chunks, &list, offset, len).await
    }

    /// The chunk servers, for callers that fetch chunks themselves.
    pub fn chunk_servers(&self) -> &ChunkServers {
        &self.chunks
    }
}

/// Reads `len` bytes from `offset` of a file made of `list`.
pub async fn read_range(
    chunks: &ChunkServers,
    list: &[ChunkRef],
    offset: u64,
    len: usize,
) -> Result<Vec<u8>, ClientError> {
    let mut start = 0u64;
    let mut wanted = Vec::new();
    let end = offset.saturating_add(len as u64);
    for c in list {
        let c_end = start + c.len as u64;
        if c_end > offset && start < end {
            wanted.push((start, *c));
        }
        start = c_end;
        if start >= end {
            break;
        }
    }
    let ids: Vec<_> = wanted.iter().map(|(_, c)| c.id).collect();
    let raws = chunks.fetch(&ids, crate::ReadPattern::Demand).await?;
    let mut out = Vec::with_capacity(len);
    for ((c_start, _), raw) in wanted.iter().zip(raws) {
        let from = offset.saturating_sub(*c_start) as usize;
        let to = ((end - c_start) as usize).min(raw.len());
        out.extend_from_slice(&raw[from..to]);
    }
    Ok(out)
}
