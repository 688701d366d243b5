//! Helpers shared by the core integration tests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::Mutex;

use granary_core::ingest::{ChunkSink, NewChunk, SinkError};
use granary_core::tree::{decode_chunk_list, EntryData, FileContent};
use granary_core::{ChunkId, Tree, TreeId};

/// Deterministic pseudo-random bytes.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut v = vec![0u8; len];
    rng.fill(&mut v);
    v
}

/// A sink that keeps every chunk in memory.
#[derive(Default)]
pub struct MemSink {
    pub chunks: Mutex<HashMap<ChunkId, Vec<u8>>>,
}

impl ChunkSink for MemSink {
    fn chunk(&self, c: &NewChunk<'_>) -> Result<(), SinkError> {
        let prev = self.chunks.lock().unwrap().insert(c.id, c.data.to_vec());
        assert!(prev.is_none(), "chunk {} handed to the sink twice", c.id);
        Ok(())
    }
}

/// Writes the tree `root` out under `dest` from the objects and chunks, as a download would.
pub fn materialize(
    root: TreeId,
    objects: &HashMap<TreeId, Vec<u8>>,
    chunks: &HashMap<ChunkId, Vec<u8>>,
    dest: &Path,
) {
    let tree = Tree::decode(&objects[&root]).expect("tree decodes");
    let mut dirs = Vec::new();
    for e in tree.entries() {
        let path = dest.join(std::ffi::OsStr::from_bytes(&e.name));
        match &e.data {
            EntryData::File { size, content } => {
                let list = match content {
                    FileContent::Inline(list) => list.clone(),
                    FileContent::Spilled { list, .. } => decode_chunk_list(&objects[list]).unwrap(),
                };
                let mut data = Vec::new();
                for c in list {
                    data.extend_from_slice(&chunks[&c.id]);
                }
                assert_eq!(data.len() as u64, *size);
                std::fs::write(&path, data).unwrap();
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(e.mode)).unwrap();
                set_mtime(&path, e.mtime.secs, e.mtime.nanos);
            }
            EntryData::Dir { tree } => {
                std::fs::create_dir(&path).unwrap();
                materialize(*tree, objects, chunks, &path);
                dirs.push((path, e.mode, e.mtime));
            }
            EntryData::Symlink { target } => {
                std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(target), &path).unwrap();
            }
        }
    }
    // Directory attributes last: filling a directory changes its mtime.
    for (path, mode, mtime) in dirs {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        set_mtime(&path, mtime.secs, mtime.nanos);
    }
}

fn set_mtime(path: &Path, secs: i64, nanos: u32) {
    let t = std::time::UNIX_EPOCH + std::time::Duration::new(secs as u64, nanos);
    let f = std::fs::File::options().read(true).open(path).unwrap();
    f.set_modified(t).unwrap();
}

/// A listing of everything under `root`: relative path, kind, mode, mtime, size, content hash or link target.
pub fn snapshot(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in walkdir_sorted(root) {
        let rel = e.strip_prefix(root).unwrap();
        let meta = std::fs::symlink_metadata(&e).unwrap();
        let name = format!("{:?}", rel.as_os_str().as_bytes());
        let ft = meta.file_type();
        let line = if ft.is_symlink() {
            format!("{name} link -> {:?}", std::fs::read_link(&e).unwrap())
        } else if ft.is_dir() {
            format!(
                "{name} dir mode={:o} mtime={}.{}",
                meta.mode() & 0o7777,
                meta.mtime(),
                meta.mtime_nsec()
            )
        } else {
            let data = std::fs::read(&e).unwrap();
            format!(
                "{name} file mode={:o} mtime={}.{} size={} blake3={}",
                meta.mode() & 0o7777,
                meta.mtime(),
                meta.mtime_nsec(),
                data.len(),
                blake3::hash(&data)
            )
        };
        out.push(line);
    }
    out
}

fn walkdir_sorted(root: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for p in entries {
        out.push(p.clone());
        if std::fs::symlink_metadata(&p).unwrap().is_dir() {
            out.extend(walkdir_sorted(&p));
        }
    }
    out
}
