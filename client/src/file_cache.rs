//! The local file cache: the chunks each file had when it was last uploaded,
//! keyed by what identifies that exact version of the file (size, mtime,
//! ctime, inode, device). An unchanged file is then not read again, as restic
//! does with its parent snapshot; `--rehash` bypasses the cache.
//!
//! One cache file per uploaded directory (by canonical path) under
//! `$GRANARY_CACHE_DIR`, `$XDG_CACHE_HOME/granary` or `~/.cache/granary`,
//! rewritten (temp file + rename) after each successful commit. Files modified
//! less than 2 s before the upload started are not recorded: on filesystems
//! with coarse timestamps a later write could leave the same mtime. Before
//! chunking, the uploader asks the cluster for every chunk the cache names and
//! forgets the files whose chunks it does not store (uploading the same
//! directory to another cluster, or chunks reclaimed by GC): those are read
//! again. After chunking it checks once more, for chunks reclaimed meanwhile.

use std::collections::HashMap;
use std::fs::Metadata;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use granary_core::ingest::{FileCache, FileRecord};
use granary_core::{ChunkId, ChunkRef};
use serde::{Deserialize, Serialize};

const FORMAT: u32 = 1;

#[derive(Serialize, Deserialize, PartialEq, Eq)]
struct Identity {
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    ino: u64,
    dev: u64,
}

impl Identity {
    fn of(m: &Metadata) -> Self {
        Self {
            size: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
            ino: m.ino(),
            dev: m.dev(),
        }
    }
}

#[derive(Serialize, Deserialize)]
struct Entry {
    id: Identity,
    chunks: Vec<([u8; 32], u32)>,
}

#[derive(Serialize, Deserialize, Default)]
struct Stored {
    format: u32,
    entries: HashMap<Vec<u8>, Entry>,
}

/// The cache for one uploaded directory.
pub struct LocalFileCache {
    root: PathBuf,
    file: PathBuf,
    stored: Stored,
}

/// Where cache files live.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("GRANARY_CACHE_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("granary");
    }
    match std::env::var_os("HOME") {
        Some(h) => PathBuf::from(h).join(".cache/granary"),
        None => std::env::temp_dir().join("granary-cache"),
    }
}

impl LocalFileCache {
    /// Loads the cache for uploads of `root` (empty when there is none or it is unreadable).
    pub fn open(root: &Path) -> Self {
        let canonical = std::fs::canonicalize(root).unwrap_or_else(|_| root.to_path_buf());
        let key = blake3::hash(canonical.as_os_str().as_encoded_bytes()).to_hex();
        let file = cache_dir().join("files").join(format!("{}.bin", &key[..32]));
        let stored = std::fs::read(&file)
            .ok()
            .and_then(|b| bincode::deserialize::<Stored>(&b).ok())
            .filter(|s| s.format == FORMAT)
            .unwrap_or_default();
        Self {
            root: root.to_path_buf(),
            file,
            stored,
        }
    }

    /// Every chunk id the cache refers to, once each.
    pub fn chunk_ids(&self) -> Vec<ChunkId> {
        let mut ids: Vec<ChunkId> = self
            .stored
            .entries
            .values()
            .flat_map(|e| e.chunks.iter().map(|(id, _)| ChunkId::from_bytes(*id)))
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// Forgets every file that refers to a chunk in `missing` (the cluster
    /// does not store it: another cluster, or reclaimed by GC), so those files
    /// are read again instead.
    pub fn forget_missing(&mut self, missing: &std::collections::HashSet<ChunkId>) {
        if missing.is_empty() {
            return;
        }
        self.stored.entries.retain(|_, e| {
            e.chunks
                .iter()
                .all(|(id, _)| !missing.contains(&ChunkId::from_bytes(*id)))
        });
    }

    fn key(&self, path: &Path) -> Option<Vec<u8>> {
        path.strip_prefix(&self.root)
            .ok()
            .map(|p| p.as_os_str().as_encoded_bytes().to_vec())
    }

    /// The entry for `path`, if the file is unchanged since it was recorded.
    fn entry(&self, path: &Path, meta: &Metadata) -> Option<&Entry> {
        let e = self.stored.entries.get(&self.key(path)?)?;
        (e.id == Identity::of(meta)).then_some(e)
    }

    /// Records the files of a committed upload that started at `started`.
    pub fn save(mut self, records: &[FileRecord], started: SystemTime) -> std::io::Result<()> {
        let cutoff = started
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0)
            - 2;
        self.stored = Stored {
            format: FORMAT,
            entries: HashMap::with_capacity(records.len()),
        };
        for r in records {
            if r.meta.mtime() >= cutoff || r.meta.ctime() >= cutoff {
                continue;
            }
            if let Some(k) = self.key(&r.path) {
                let chunks = r.chunks.iter().map(|c| (*c.id.as_bytes(), c.len)).collect();
                self.stored.entries.insert(
                    k,
                    Entry {
                        id: Identity::of(&r.meta),
                        chunks,
                    },
                );
            }
        }
        let dir = self.file.parent().expect("cache file has a parent");
        std::fs::create_dir_all(dir)?;
        let tmp = self.file.with_extension("tmp");
        std::fs::write(
            &tmp,
            bincode::serialize(&self.stored).map_err(std::io::Error::other)?,
        )?;
        std::fs::rename(&tmp, &self.file)
    }
}

impl FileCache for LocalFileCache {
    fn lookup(&self, path: &Path, meta: &Metadata) -> Option<Vec<ChunkRef>> {
        let e = self.entry(path, meta)?;
        Some(
            e.chunks
                .iter()
                .map(|(id, len)| ChunkRef {
                    id: ChunkId::from_bytes(*id),
                    len: *len,
                })
                .collect(),
        )
    }

    fn has(&self, path: &Path, meta: &Metadata) -> bool {
        self.entry(path, meta).is_some()
    }
}
