//! Reachability: the trees and chunks a set of versions references.
//!
//! Tiering (which packs a version uses), GC (what is live) and tier status
//! all start from version roots and follow directory trees and spilled chunk
//! lists down to chunk ids.

use std::collections::HashSet;

use granary_core::tree::decode_object;
use granary_core::{ChunkId, TreeId};

/// Trees and chunks reached from some roots.
#[derive(Debug, Default)]
pub struct Reach {
    pub trees: HashSet<TreeId>,
    pub chunks: HashSet<ChunkId>,
}

impl Reach {
    /// Adds everything reachable from `roots`; `get` reads a tree object.
    /// A tree that is not stored is an error: a committed version never
    /// points at a missing tree, so this is damage, and callers that delete
    /// data must stop rather than guess.
    pub fn add(
        &mut self,
        roots: impl IntoIterator<Item = TreeId>,
        get: impl Fn(&TreeId) -> Result<Option<Vec<u8>>, String>,
    ) -> Result<(), String> {
        self.walk(roots, get, false)
    }

    /// Like [`add`](Self::add), but a tree that is not stored is skipped
    /// (for a GC sweep's protection, which only keeps what exists).
    pub fn add_stored(
        &mut self,
        roots: impl IntoIterator<Item = TreeId>,
        get: impl Fn(&TreeId) -> Result<Option<Vec<u8>>, String>,
    ) -> Result<(), String> {
        self.walk(roots, get, true)
    }

    fn walk(
        &mut self,
        roots: impl IntoIterator<Item = TreeId>,
        get: impl Fn(&TreeId) -> Result<Option<Vec<u8>>, String>,
        skip_missing: bool,
    ) -> Result<(), String> {
        let mut stack: Vec<TreeId> = roots.into_iter().collect();
        while let Some(id) = stack.pop() {
            if self.trees.contains(&id) {
                continue;
            }
            let data = match get(&id)? {
                Some(data) => data,
                None if skip_missing => continue,
                None => return Err(format!("tree {id} is referenced but not stored")),
            };
            let object = decode_object(&data).map_err(|e| format!("tree {id} is damaged: {e}"))?;
            let (trees, chunks) = object.references();
            self.trees.insert(id);
            stack.extend(trees.into_iter().filter(|t| !self.trees.contains(t)));
            self.chunks.extend(chunks);
        }
        Ok(())
    }
}
