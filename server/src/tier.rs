//! Tiering: which packs live on chunk servers' SSDs and which in the object
//! tier, and the work that moves them.
//!
//! - [`plan`]: `granary admin tier move` (pin versions, queue the moves of
//!   the packs only pinned versions use) and `tier status`.
//! - [`mover`]: the leader's background mover, which works through the
//!   queue. A move to the object tier is: a chunk server holding a replica
//!   uploads the pack (one object; its size is checked), Raft records the
//!   object copy, Raft records the object tier as home with no SSD
//!   replicas, then the replicas' files are deleted. A move back is: chunk
//!   servers restore verified copies from the object, Raft records them,
//!   then the object is deleted. Every step is idempotent and the queue is
//!   in Raft, so a crash at any point leaves the pack readable and the next
//!   leader finishes the move.
//! - [`policy`]: the cold-after policies: versions whose packs nobody read
//!   for the policy's duration are pinned to the object tier; pinned
//!   versions that are read again are moved back.
//!
//! Shared packs: a pack moves to the object tier only when every live
//! version that references it is pinned there. A pack that a hot version
//! also uses stays on SSD (and is counted as `kept_shared`).

pub mod mover;
pub mod plan;
pub mod policy;

use std::collections::{HashMap, HashSet};

use granary_core::{ChunkId, TreeId};

use crate::meta::state::{
    split_version_key, ChunkRecord, Reader, VersionRecord, CF_CHUNKS, CF_TREES, CF_VERSIONS,
};
use crate::meta::walk::Reach;

/// A version's name: dataset and number.
pub type VersionName = (String, u64);

/// Every live version: (dataset, number) and its record.
pub fn live_versions(r: &Reader<'_>) -> Result<Vec<(VersionName, VersionRecord)>, String> {
    Ok(r.all::<VersionRecord>(CF_VERSIONS)?
        .into_iter()
        .filter_map(|(k, v)| split_version_key(&k).map(|id| (id, v)))
        .collect())
}

/// What the given version roots reach.
pub fn reach(r: &Reader<'_>, roots: impl IntoIterator<Item = TreeId>) -> Result<Reach, String> {
    let mut reach = Reach::default();
    let cf = r.cf(CF_TREES);
    reach.add(roots, |id| {
        r.db.get_cf(cf, id.as_bytes()).map_err(|e| e.to_string())
    })?;
    Ok(reach)
}

/// The packs holding `chunks`, with how many of the chunks each holds.
pub fn packs_of<'c>(
    r: &Reader<'_>,
    chunks: impl IntoIterator<Item = &'c ChunkId>,
) -> Result<HashMap<u64, u64>, String> {
    let ids: Vec<&ChunkId> = chunks.into_iter().collect();
    let mut out: HashMap<u64, u64> = HashMap::new();
    let cf = r.cf(CF_CHUNKS);
    for batch in ids.chunks(4096) {
        let keys: Vec<&[u8]> = batch.iter().map(|c| c.as_bytes().as_slice()).collect();
        for v in r.db.batched_multi_get_cf(cf, &keys, false) {
            if let Some(v) = v.map_err(|e| e.to_string())? {
                let rec: ChunkRecord = crate::meta::state::decode(&v)?;
                *out.entry(rec.pack).or_default() += 1;
            }
        }
    }
    Ok(out)
}

/// The set of packs the given versions use.
pub fn version_packs(
    r: &Reader<'_>,
    roots: impl IntoIterator<Item = TreeId>,
) -> Result<HashSet<u64>, String> {
    let reach = reach(r, roots)?;
    Ok(packs_of(r, &reach.chunks)?.into_keys().collect())
}
