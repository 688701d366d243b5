//! Trees: canonical, content-addressed directory listings.
//!
//! A tree lists one directory's entries sorted by name (raw bytes, so
//! non-UTF-8 names round-trip exactly). A subdirectory entry points at its own
//! tree by id, so a version is a Merkle tree: an unchanged subtree has the
//! same id in every version and is stored once. A file entry carries its chunk
//! list inline, or, past [`SPILL_THRESHOLD`] chunks, the id of a separate
//! chunk-list object, so listing a directory never drags in the chunk lists of
//! huge files. Trees and chunk lists are both *tree objects*, stored by id.
//!
//! Encoding (all integers little-endian, fixed width, so every value has
//! exactly one encoding and `encode(decode(b)) == b` for every valid `b`):
//!
//! ```text
//! object   := "GT" version:u8(=1) kind:u8 body      kind 1 = tree, 2 = chunk list
//! tree     := count:u32 entry*                       entries strictly sorted by name
//! entry    := name_len:u16 name mode:u32 mtime_secs:i64 mtime_nanos:u32 type:u8 data
//! data     := file:    size:u64 (0 count:u32 chunkref* | 1 list:id32 count:u32)
//!           | dir:     tree:id32
//!           | symlink: len:u32 target
//! chunkref := id:id32 len:u32
//! chunks   := count:u32 chunkref*
//! ```
//!
//! Decoding rejects anything that is not canonical or not safe to materialize:
//! names that are empty, ".", "..", contain '/' or NUL, unsorted or duplicate
//! entries, chunk lengths that do not add up to the file size, trailing bytes.

use crate::frame::MAX_CHUNK_LEN;
use crate::id::{ChunkId, TreeId};

/// Object magic.
pub const TREE_MAGIC: [u8; 2] = *b"GT";
/// Current tree object encoding version.
pub const TREE_VERSION: u8 = 1;
/// Files with more chunks than this store their chunk list as a separate object.
pub const SPILL_THRESHOLD: usize = 512;
/// Longest entry name accepted, in bytes.
pub const MAX_NAME_LEN: usize = 1024;
/// Longest symlink target accepted, in bytes.
pub const MAX_SYMLINK_LEN: usize = 4096;

const KIND_TREE: u8 = 1;
const KIND_CHUNK_LIST: u8 = 2;

/// What can be wrong with a tree object or entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TreeError {
    #[error("tree object is truncated")]
    Truncated,
    #[error("not a tree object: bad magic bytes")]
    BadMagic,
    #[error(
        "unsupported tree object version {0} (this build reads version {TREE_VERSION}); upgrade granary"
    )]
    UnknownVersion(u8),
    #[error("unknown tree object kind {0}")]
    UnknownKind(u8),
    #[error("invalid entry name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("duplicate entry name {0:?}")]
    DuplicateName(String),
    #[error("corrupt tree object: {0}")]
    Corrupt(&'static str),
    #[error("expected a {expected}, found another kind of tree object")]
    WrongKind { expected: &'static str },
}

/// A file's modification time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp {
    /// Seconds since the Unix epoch (may be negative).
    pub secs: i64,
    /// Nanoseconds, below 1,000,000,000.
    pub nanos: u32,
}

/// One chunk of a file: its id and raw length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChunkRef {
    pub id: ChunkId,
    pub len: u32,
}

/// The three kinds of entry a tree holds.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EntryKind {
    File = 1,
    Dir = 2,
    Symlink = 3,
}

/// Where a file's chunk list lives.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum FileContent {
    /// In the tree entry itself.
    Inline(Vec<ChunkRef>),
    /// In a separate chunk-list object of `chunks` entries.
    Spilled { list: TreeId, chunks: u32 },
}

/// Kind-specific part of an entry.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum EntryData {
    File { size: u64, content: FileContent },
    Dir { tree: TreeId },
    Symlink { target: Vec<u8> },
}

/// One entry of a directory.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TreeEntry {
    /// The name as raw bytes.
    pub name: Vec<u8>,
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    pub mtime: Timestamp,
    pub data: EntryData,
}

impl TreeEntry {
    /// The entry's kind.
    pub fn kind(&self) -> EntryKind {
        match self.data {
            EntryData::File { .. } => EntryKind::File,
            EntryData::Dir { .. } => EntryKind::Dir,
            EntryData::Symlink { .. } => EntryKind::Symlink,
        }
    }

    /// File size, symlink target length, or 0 for a directory.
    pub fn size(&self) -> u64 {
        match &self.data {
            EntryData::File { size, .. } => *size,
            EntryData::Dir { .. } => 0,
            EntryData::Symlink { target } => target.len() as u64,
        }
    }
}

/// Checks that `name` is safe to create inside a directory.
pub fn validate_name(name: &[u8]) -> Result<(), TreeError> {
    let reason = if name.is_empty() {
        Some("empty")
    } else if name == b"." || name == b".." {
        Some("'.' and '..' are not entries")
    } else if name.contains(&b'/') {
        Some("contains '/'")
    } else if name.contains(&0) {
        Some("contains a NUL byte")
    } else if name.len() > MAX_NAME_LEN {
        Some("longer than 1024 bytes")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(TreeError::InvalidName {
            name: String::from_utf8_lossy(&name[..name.len().min(80)]).into_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

/// A directory listing, sorted by name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Tree {
    entries: Vec<TreeEntry>,
}

impl Tree {
    /// Builds a tree, sorting `entries` and rejecting invalid or duplicate names.
    pub fn new(mut entries: Vec<TreeEntry>) -> Result<Self, TreeError> {
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        for e in &entries {
            validate_entry(e)?;
        }
        if let Some(w) = entries.windows(2).find(|w| w[0].name == w[1].name) {
            return Err(TreeError::DuplicateName(
                String::from_utf8_lossy(&w[0].name).into_owned(),
            ));
        }
        Ok(Self { entries })
    }

    /// Entries sorted by name.
    pub fn entries(&self) -> &[TreeEntry] {
        &self.entries
    }

    /// The entry called `name`.
    pub fn get(&self, name: &[u8]) -> Option<&TreeEntry> {
        self.entries
            .binary_search_by(|e| e.name.as_slice().cmp(name))
            .ok()
            .map(|i| &self.entries[i])
    }

    /// Canonical encoding.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = object_header(KIND_TREE);
        put_u32(&mut out, self.entries.len() as u32);
        for e in &self.entries {
            put_u16(&mut out, e.name.len() as u16);
            out.extend_from_slice(&e.name);
            put_u32(&mut out, e.mode);
            out.extend_from_slice(&e.mtime.secs.to_le_bytes());
            put_u32(&mut out, e.mtime.nanos);
            out.push(e.kind() as u8);
            match &e.data {
                EntryData::File { size, content } => {
                    out.extend_from_slice(&size.to_le_bytes());
                    match content {
                        FileContent::Inline(chunks) => {
                            out.push(0);
                            put_chunks(&mut out, chunks);
                        }
                        FileContent::Spilled { list, chunks } => {
                            out.push(1);
                            out.extend_from_slice(list.as_bytes());
                            put_u32(&mut out, *chunks);
                        }
                    }
                }
                EntryData::Dir { tree } => out.extend_from_slice(tree.as_bytes()),
                EntryData::Symlink { target } => {
                    put_u32(&mut out, target.len() as u32);
                    out.extend_from_slice(target);
                }
            }
        }
        out
    }

    /// The tree's id: BLAKE3 of its encoding.
    pub fn id(&self) -> TreeId {
        TreeId::of(&self.encode())
    }

    /// Decodes and validates a tree object.
    pub fn decode(bytes: &[u8]) -> Result<Self, TreeError> {
        match decode_object(bytes)? {
            TreeObject::Tree(t) => Ok(t),
            TreeObject::ChunkList(_) => Err(TreeError::WrongKind { expected: "tree" }),
        }
    }
}

/// Encodes a chunk-list object.
pub fn encode_chunk_list(chunks: &[ChunkRef]) -> Vec<u8> {
    let mut out = object_header(KIND_CHUNK_LIST);
    put_chunks(&mut out, chunks);
    out
}

/// Decodes a chunk-list object.
pub fn decode_chunk_list(bytes: &[u8]) -> Result<Vec<ChunkRef>, TreeError> {
    match decode_object(bytes)? {
        TreeObject::ChunkList(c) => Ok(c),
        TreeObject::Tree(_) => Err(TreeError::WrongKind {
            expected: "chunk list",
        }),
    }
}

/// Builds the content of a file from its chunks, spilling long lists: returns
/// the content and, when spilled, the chunk-list object's id and bytes.
pub fn file_content(chunks: Vec<ChunkRef>) -> (FileContent, Option<(TreeId, Vec<u8>)>) {
    if chunks.len() <= SPILL_THRESHOLD {
        return (FileContent::Inline(chunks), None);
    }
    let bytes = encode_chunk_list(&chunks);
    let id = TreeId::of(&bytes);
    (
        FileContent::Spilled {
            list: id,
            chunks: chunks.len() as u32,
        },
        Some((id, bytes)),
    )
}

/// Either kind of tree object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TreeObject {
    Tree(Tree),
    ChunkList(Vec<ChunkRef>),
}

impl TreeObject {
    /// The tree objects (subdirectories, spilled chunk lists) and chunks
    /// this object references directly.
    pub fn references(&self) -> (Vec<TreeId>, Vec<ChunkId>) {
        let mut trees = Vec::new();
        let mut chunks = Vec::new();
        match self {
            TreeObject::Tree(t) => {
                for e in t.entries() {
                    match &e.data {
                        EntryData::Dir { tree } => trees.push(*tree),
                        EntryData::File { content, .. } => match content {
                            FileContent::Inline(list) => chunks.extend(list.iter().map(|c| c.id)),
                            FileContent::Spilled { list, .. } => trees.push(*list),
                        },
                        EntryData::Symlink { .. } => {}
                    }
                }
            }
            TreeObject::ChunkList(list) => chunks.extend(list.iter().map(|c| c.id)),
        }
        (trees, chunks)
    }
}

/// Decodes and validates any tree object.
pub fn decode_object(bytes: &[u8]) -> Result<TreeObject, TreeError> {
    let mut r = Cursor { buf: bytes, pos: 0 };
    if r.take(2)? != TREE_MAGIC {
        return Err(TreeError::BadMagic);
    }
    let version = r.u8()?;
    if version != TREE_VERSION {
        return Err(TreeError::UnknownVersion(version));
    }
    let object = match r.u8()? {
        KIND_TREE => TreeObject::Tree(decode_tree_body(&mut r)?),
        KIND_CHUNK_LIST => TreeObject::ChunkList(r.chunks()?),
        other => return Err(TreeError::UnknownKind(other)),
    };
    if r.pos != bytes.len() {
        return Err(TreeError::Corrupt("trailing bytes"));
    }
    Ok(object)
}

fn decode_tree_body(r: &mut Cursor<'_>) -> Result<Tree, TreeError> {
    let count = r.u32()? as usize;
    // Each entry takes at least 20 bytes: a bound that stops absurd counts early.
    if count > r.remaining() / 20 {
        return Err(TreeError::Truncated);
    }
    let mut entries: Vec<TreeEntry> = Vec::with_capacity(count);
    for _ in 0..count {
        let name_len = r.u16()? as usize;
        let name = r.take(name_len)?.to_vec();
        let mode = r.u32()?;
        let secs = i64::from_le_bytes(r.take(8)?.try_into().expect("8 bytes"));
        let nanos = r.u32()?;
        let data = match r.u8()? {
            1 => {
                let size = r.u64()?;
                let content = match r.u8()? {
                    0 => FileContent::Inline(r.chunks()?),
                    1 => FileContent::Spilled {
                        list: TreeId::from_slice(r.take(32)?).expect("32 bytes"),
                        chunks: r.u32()?,
                    },
                    _ => return Err(TreeError::Corrupt("unknown file content tag")),
                };
                EntryData::File { size, content }
            }
            2 => EntryData::Dir {
                tree: TreeId::from_slice(r.take(32)?).expect("32 bytes"),
            },
            3 => {
                let len = r.u32()? as usize;
                EntryData::Symlink {
                    target: r.take(len)?.to_vec(),
                }
            }
            _ => return Err(TreeError::Corrupt("unknown entry type")),
        };
        let entry = TreeEntry {
            name,
            mode,
            mtime: Timestamp { secs, nanos },
            data,
        };
        validate_entry(&entry)?;
        if let Some(prev) = entries.last() {
            if prev.name >= entry.name {
                return Err(if prev.name == entry.name {
                    TreeError::DuplicateName(String::from_utf8_lossy(&entry.name).into_owned())
                } else {
                    TreeError::Corrupt("entries are not sorted by name")
                });
            }
        }
        entries.push(entry);
    }
    Ok(Tree { entries })
}

fn validate_entry(e: &TreeEntry) -> Result<(), TreeError> {
    validate_name(&e.name)?;
    if e.mtime.nanos >= 1_000_000_000 {
        return Err(TreeError::Corrupt("mtime nanoseconds out of range"));
    }
    if e.mode > 0o7777 {
        return Err(TreeError::Corrupt("mode has bits beyond 0o7777"));
    }
    match &e.data {
        EntryData::File { size, content } => match content {
            FileContent::Inline(chunks) => {
                if chunks.iter().map(|c| c.len as u64).sum::<u64>() != *size {
                    return Err(TreeError::Corrupt("chunk lengths do not add up to the file size"));
                }
            }
            FileContent::Spilled { chunks, .. } => {
                if (*chunks as usize) <= SPILL_THRESHOLD {
                    return Err(TreeError::Corrupt("short chunk list stored out of line"));
                }
            }
        },
        EntryData::Dir { .. } => {}
        EntryData::Symlink { target } => {
            if target.is_empty() || target.len() > MAX_SYMLINK_LEN || target.contains(&0) {
                return Err(TreeError::Corrupt(
                    "symlink target empty, too long or contains NUL",
                ));
            }
        }
    }
    Ok(())
}

fn object_header(kind: u8) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(&TREE_MAGIC);
    out.push(TREE_VERSION);
    out.push(kind);
    out
}

fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_chunks(out: &mut Vec<u8>, chunks: &[ChunkRef]) {
    put_u32(out, chunks.len() as u32);
    for c in chunks {
        out.extend_from_slice(c.id.as_bytes());
        put_u32(out, c.len);
    }
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], TreeError> {
        if self.remaining() < n {
            return Err(TreeError::Truncated);
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, TreeError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, TreeError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2 bytes")))
    }

    fn u32(&mut self) -> Result<u32, TreeError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }

    fn u64(&mut self) -> Result<u64, TreeError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }

    fn chunks(&mut self) -> Result<Vec<ChunkRef>, TreeError> {
        let count = self.u32()? as usize;
        if count > self.remaining() / 36 {
            return Err(TreeError::Truncated);
        }
        let mut chunks = Vec::with_capacity(count);
        for _ in 0..count {
            let id = ChunkId::from_slice(self.take(32)?).expect("32 bytes");
            let len = self.u32()?;
            if len == 0 || len > MAX_CHUNK_LEN {
                return Err(TreeError::Corrupt("chunk length is zero or above the maximum"));
            }
            chunks.push(ChunkRef { id, len });
        }
        Ok(chunks)
    }
}
