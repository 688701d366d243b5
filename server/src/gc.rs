//! Garbage collection: `granary admin gc`.
//!
//! 1. **Mark** (on a RocksDB snapshot of this node's applied state, after a
//!    read barrier): every tree and chunk reachable from a live version, or
//!    from a tree stored within the grace period (an upload that has not
//!    committed yet), is live. The snapshot also records how far the tree
//!    log went (`mark_seq`).
//! 2. **Sweep**: dead trees, dead chunk records and packs with no live chunk
//!    go to Raft as `GcSweep` entries (grouped so a pack's dead chunks are
//!    in one entry). Applying one re-checks against what arrived since the
//!    mark: trees stored after `mark_seq` and everything they reach are
//!    kept, chunks of packs registered within the grace period are kept, and
//!    a pack is only forgotten when none of its chunks was kept and no tier
//!    move is queued for it (a later GC takes it once the move ends). Then
//!    the copies of forgotten packs are deleted (SSD replicas and object),
//!    and so are pack objects no record lists (older than the grace period,
//!    no queued move): what a crash between an upload and its record left.
//! 3. **Compact**: packs whose live share of bytes is below the threshold
//!    are rewritten: their live frames are copied (verified) into a new pack
//!    on the same tier, one `CompactPack` entry registers it and re-points
//!    the chunk index, then the old copies are deleted. Readers holding old
//!    locations find the pack gone, look the chunks up again and read the
//!    new pack.
//!
//! Runs online: uploads and mounts continue. An upload that found a chunk
//! present (dedup), then lost it to a sweep before storing its trees, fails
//! with "not stored" at `PutTrees` and is retried by the client, which then
//! uploads the chunk.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use granary_client::chunk_proto::{
    DeletePackRequest, FrameRange, GetFramesRequest, PackSession, WritePackRequest,
};
use granary_core::frame::{decode_frame_into, FrameHeader};
use granary_core::pack::{PackWriter, PACK_HEADER_LEN};
use granary_core::{ChunkId, TreeId};
use serde_json::json;
use tonic::Status;

use crate::cluster::{id_of, internal, now_ms, Cluster};
use crate::meta::command::{ChunkKey, MetaCommand, MetaReply};
use crate::meta::state::*;
use crate::meta::walk::Reach;

/// Chunks per `GcSweep` entry (a pack's chunks are never split).
const SWEEP_BATCH: usize = 20_000;
/// Largest read of an old pack's frames in one call.
const READ_PIECE: u64 = 32 << 20;
/// Frames sent per message of a compaction pack session.
const SEND_MESSAGE: usize = 1 << 20;

/// One GC at a time on this node.
static GC_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How long new data is safe from GC: `GRANARY_GC_GRACE_SECS`, default 1 hour.
pub fn default_grace() -> Duration {
    crate::settings::env_secs("GRANARY_GC_GRACE_SECS", 3600)
}

#[derive(Debug, Clone)]
pub struct GcOptions {
    pub dry_run: bool,
    /// Compact packs whose live share of bytes is below this (0 disables).
    pub compact_below: f64,
    pub grace: Duration,
}

/// What the mark found.
#[derive(Debug, Default)]
struct Plan {
    mark_seq: u64,
    versions: u64,
    live_trees: u64,
    live_chunks: u64,
    dead_trees: Vec<ChunkKey>,
    /// Dead chunks grouped by pack.
    dead_chunks: HashMap<u64, Vec<ChunkKey>>,
    dead_bytes: u64,
    /// Packs with no live chunk.
    dead_packs: Vec<u64>,
    dead_pack_bytes: u64,
}

/// Runs a GC; returns the report.
pub async fn run(cluster: &Cluster, opts: GcOptions) -> Result<serde_json::Value, Status> {
    let _one = GC_LOCK.lock().await;
    cluster.barrier().await?;
    let now = now_ms();
    let grace_ms = opts.grace.as_millis() as u64;
    let c = cluster.clone();
    let plan = tokio::task::spawn_blocking(move || mark(&c, now, grace_ms))
        .await
        .map_err(internal)?
        .map_err(|e| Status::failed_precondition(format!("GC stopped, nothing was deleted: {e}")))?;
    let mut report = json!({
        "dry_run": opts.dry_run,
        "live_versions": plan.versions,
        "live_trees": plan.live_trees,
        "live_chunks": plan.live_chunks,
        "dead_trees": plan.dead_trees.len(),
        "dead_chunks": plan.dead_chunks.values().map(Vec::len).sum::<usize>(),
        "dead_chunk_bytes": plan.dead_bytes,
        "dead_packs": plan.dead_packs.len(),
        "dead_pack_bytes": plan.dead_pack_bytes,
    });
    if opts.dry_run {
        let candidates = compaction_candidates(cluster, &opts, now, &plan.dead_chunks)?;
        report["compaction_candidates"] = json!(candidates.len());
        return Ok(report);
    }
    let (trees, chunks, dropped) = sweep(cluster, &plan, now, grace_ms).await?;
    let mut freed = 0;
    for (id, pack) in &dropped {
        freed += pack.bytes;
        delete_copies(cluster, *id, pack).await;
    }
    report["orphan_objects"] = json!(delete_orphan_objects(cluster, now, grace_ms).await);
    report["swept_trees"] = json!(trees);
    report["swept_chunks"] = json!(chunks);
    report["deleted_packs"] = json!(dropped.len());
    report["freed_bytes"] = json!(freed);

    let mut compacted = Vec::new();
    if opts.compact_below > 0.0 {
        cluster.barrier().await?;
        for candidate in compaction_candidates(cluster, &opts, now, &HashMap::new())? {
            let old = candidate.id;
            match compact(cluster, candidate).await {
                Ok(v) => compacted.push(v),
                Err(e) => {
                    tracing::warn!(pack = old, "compaction failed: {}", e.message());
                    compacted.push(json!({"old": old, "error": e.message()}));
                }
            }
        }
    }
    report["compacted"] = json!(compacted);
    Ok(report)
}

/// Step 1: the mark, on a snapshot.
fn mark(cluster: &Cluster, now: u64, grace_ms: u64) -> Result<Plan, String> {
    let db = cluster.node().db();
    let snap = db.snapshot();
    let cf = |name| cluster.reader().cf(name);
    let e = |e: rocksdb::Error| e.to_string();
    let mut plan = Plan {
        mark_seq: match snap.get_cf(cf(CF_COUNTERS), COUNTER_TREE_SEQ).map_err(e)? {
            Some(v) => u64::from_be_bytes(v.as_slice().try_into().map_err(|_| "damaged counter")?),
            None => 0,
        },
        ..Plan::default()
    };
    let mut roots: Vec<TreeId> = Vec::new();
    for item in snap.iterator_cf(cf(CF_VERSIONS), rocksdb::IteratorMode::Start) {
        let (_, v) = item.map_err(e)?;
        let v: VersionRecord = decode(&v)?;
        roots.push(TreeId::from_bytes(v.root));
        plan.versions += 1;
    }
    for item in snap.iterator_cf(cf(CF_TREE_LOG), rocksdb::IteratorMode::Start) {
        let (k, v) = item.map_err(e)?;
        if let Some((_, tree, added)) = tree_log_entry(&k, &v) {
            if added.saturating_add(grace_ms) > now {
                roots.push(tree);
            }
        }
    }
    let mut live = Reach::default();
    let trees_cf = cf(CF_TREES);
    live.add(roots, |id| snap.get_cf(trees_cf, id.as_bytes()).map_err(e))?;
    plan.live_trees = live.trees.len() as u64;
    for item in snap.iterator_cf(trees_cf, rocksdb::IteratorMode::Start) {
        let (k, _) = item.map_err(e)?;
        if let Some(id) = TreeId::from_slice(&k).filter(|_| k.len() == 32) {
            if !live.trees.contains(&id) {
                plan.dead_trees.push(*id.as_bytes());
            }
        }
    }
    let mut live_in_pack: HashSet<u64> = HashSet::new();
    for item in snap.iterator_cf(cf(CF_CHUNKS), rocksdb::IteratorMode::Start) {
        let (k, v) = item.map_err(e)?;
        let Some(id) = ChunkId::from_slice(&k).filter(|_| k.len() == 32) else {
            continue;
        };
        let rec: ChunkRecord = decode(&v)?;
        if live.chunks.contains(&id) {
            plan.live_chunks += 1;
            live_in_pack.insert(rec.pack);
        } else {
            plan.dead_bytes += rec.frame_len();
            plan.dead_chunks.entry(rec.pack).or_default().push(*id.as_bytes());
        }
    }
    for item in snap.iterator_cf(cf(CF_PACKS), rocksdb::IteratorMode::Start) {
        let (k, v) = item.map_err(e)?;
        let id = id_of(&k);
        let p: PackRecord = decode(&v)?;
        if !live_in_pack.contains(&id) && p.registered_ms.saturating_add(grace_ms) <= now {
            plan.dead_packs.push(id);
            plan.dead_pack_bytes += p.bytes;
        }
    }
    Ok(plan)
}

/// Step 2: proposes the sweep in batches; returns (trees, chunks, dropped packs).
async fn sweep(
    cluster: &Cluster,
    plan: &Plan,
    now: u64,
    grace_ms: u64,
) -> Result<(u64, u64, Vec<(u64, PackRecord)>), Status> {
    let dead_packs: HashSet<u64> = plan.dead_packs.iter().copied().collect();
    // Packs with dead chunks first (each with its chunks), then dead packs
    // without any chunk record.
    let mut groups: Vec<(u64, Vec<ChunkKey>)> =
        plan.dead_chunks.iter().map(|(p, c)| (*p, c.clone())).collect();
    groups.sort_by_key(|(p, _)| *p);
    for p in &plan.dead_packs {
        if !plan.dead_chunks.contains_key(p) {
            groups.push((*p, Vec::new()));
        }
    }
    let mut trees: Vec<ChunkKey> = plan.dead_trees.clone();
    let (mut swept_trees, mut swept_chunks, mut dropped) = (0u64, 0u64, Vec::new());
    let mut batch_chunks: Vec<ChunkKey> = Vec::new();
    let mut batch_packs: Vec<u64> = Vec::new();
    let mut groups = groups.into_iter().peekable();
    loop {
        while let Some((pack, chunks)) = groups.peek() {
            if !batch_chunks.is_empty() && batch_chunks.len() + chunks.len() > SWEEP_BATCH {
                break;
            }
            batch_chunks.extend_from_slice(chunks);
            if dead_packs.contains(pack) {
                batch_packs.push(*pack);
            }
            groups.next();
        }
        // Every dead tree goes in the first entry, before any chunk is
        // deleted: a tree that survives a sweep entry never points at a
        // chunk that entry deleted (a commit of an old root in between would
        // otherwise see the root and not its missing chunks).
        let batch_trees: Vec<ChunkKey> = std::mem::take(&mut trees);
        if batch_chunks.is_empty() && batch_packs.is_empty() && batch_trees.is_empty() {
            break;
        }
        let cmd = MetaCommand::GcSweep {
            mark_seq: plan.mark_seq,
            now_ms: now,
            grace_ms,
            trees: batch_trees,
            chunks: std::mem::take(&mut batch_chunks),
            packs: std::mem::take(&mut batch_packs),
        };
        match cluster.propose(cmd).await? {
            MetaReply::Swept { trees, chunks, packs } => {
                swept_trees += trees;
                swept_chunks += chunks;
                dropped.extend(packs);
            }
            other => return Err(internal(format!("unexpected reply {other:?}"))),
        }
    }
    Ok((swept_trees, swept_chunks, dropped))
}

/// Deletes every copy of a pack that meta no longer lists (best effort:
/// the chunk servers' sweep removes SSD copies that are left).
async fn delete_copies(cluster: &Cluster, id: u64, pack: &PackRecord) {
    for node in &pack.replicas {
        if let Some(addr) = cluster.addr_of(*node) {
            if let Ok(mut c) = cluster.chunk(&addr) {
                if let Err(e) = c.delete_pack(DeletePackRequest { pack_id: id }).await {
                    tracing::info!(
                        pack = id,
                        node,
                        "could not delete a dead pack now: {}",
                        e.message()
                    );
                }
            }
        }
    }
    if !pack.object_key.is_empty() {
        if let Err(e) = cluster.objects().delete(&pack.object_key).await {
            tracing::warn!(pack = id, "could not delete a dead pack's object: {e}");
        }
    }
}

/// Deletes pack objects that no pack record lists (by key: a pack's earlier
/// upload under another key counts as unlisted), older than the grace period
/// and with no queued move: left by a crash between an upload and its Raft
/// record (a compaction, a move whose pack GC took, a move that another task
/// recorded first), or by a move back to SSD that died before deleting the
/// object. Returns how many.
async fn delete_orphan_objects(cluster: &Cluster, now: u64, grace_ms: u64) -> u64 {
    let objects = match cluster.objects().list_pack_objects().await {
        Ok(o) => o,
        Err(e) => {
            tracing::warn!("GC cannot list the object tier, orphan objects stay: {e}");
            return 0;
        }
    };
    let mut deleted = 0;
    for o in objects {
        if o.modified_ms.saturating_add(grace_ms) > now {
            continue;
        }
        let r = cluster.reader();
        // The queue first: once no move of the pack is queued, no mover can
        // record this key any more (`MoveUploaded` is refused), so a record
        // read after that which names another key (or none) is final.
        if r.exists(CF_MOVES, &o.id.to_be_bytes()).unwrap_or(true) {
            continue;
        }
        let listed = r
            .pack(o.id)
            .map_or(true, |p| p.is_some_and(|p| p.object_key == o.key));
        if listed {
            continue;
        }
        match cluster.objects().delete(&o.key).await {
            Ok(()) => {
                tracing::info!(pack = o.id, key = %o.key, "deleted an object no pack lists");
                deleted += 1;
            }
            Err(e) => tracing::warn!(pack = o.id, "could not delete an orphan object: {e}"),
        }
    }
    deleted
}

/// A pack worth compacting and its live chunks.
struct Candidate {
    id: u64,
    pack: PackRecord,
    live: Vec<(ChunkId, ChunkRecord)>,
    share: f64,
}

/// Packs whose live share is below the threshold (after excluding the
/// chunks in `dead`, for a dry run), oldest first.
fn compaction_candidates(
    cluster: &Cluster,
    opts: &GcOptions,
    now: u64,
    dead: &HashMap<u64, Vec<ChunkKey>>,
) -> Result<Vec<Candidate>, Status> {
    if opts.compact_below <= 0.0 {
        return Ok(Vec::new());
    }
    let r = cluster.reader();
    let dead: HashSet<&ChunkKey> = dead.values().flatten().collect();
    let mut live: HashMap<u64, Vec<(ChunkId, ChunkRecord)>> = HashMap::new();
    for (k, rec) in r.all::<ChunkRecord>(CF_CHUNKS).map_err(internal)? {
        let Some(id) = ChunkId::from_slice(&k).filter(|_| k.len() == 32) else {
            continue;
        };
        if !dead.contains(id.as_bytes()) {
            live.entry(rec.pack).or_default().push((id, rec));
        }
    }
    let grace_ms = opts.grace.as_millis() as u64;
    let mut out = Vec::new();
    for (id, mut chunks) in live {
        let Some(pack) = r.pack(id).map_err(internal)? else {
            continue;
        };
        if pack.bytes == 0
            || pack.registered_ms.saturating_add(grace_ms) > now
            || r.exists(CF_MOVES, &id.to_be_bytes()).map_err(internal)?
        {
            continue;
        }
        let live_bytes: u64 = chunks.iter().map(|(_, c)| c.frame_len()).sum();
        let share = live_bytes as f64 / pack.bytes as f64;
        if share < opts.compact_below {
            chunks.sort_by_key(|(_, c)| c.offset);
            out.push(Candidate {
                id,
                pack,
                live: chunks,
                share,
            });
        }
    }
    out.sort_by_key(|c| c.id);
    Ok(out)
}

/// Reads the frames of `chunks` (sorted by offset) from pack `id`, verified.
async fn read_frames(
    cluster: &Cluster,
    id: u64,
    pack: &PackRecord,
    chunks: &[(ChunkId, ChunkRecord)],
) -> Result<Vec<u8>, Status> {
    let mut data = Vec::new();
    let mut start = 0;
    while start < chunks.len() {
        let mut end = start;
        let mut size = 0;
        while end < chunks.len() && (end == start || size + chunks[end].1.frame_len() <= READ_PIECE) {
            size += chunks[end].1.frame_len();
            end += 1;
        }
        let ranges: Vec<(u64, u32)> = chunks[start..end]
            .iter()
            .map(|(_, c)| (c.offset, c.frame_len() as u32))
            .collect();
        data.extend(read_ranges(cluster, id, pack, &ranges).await?);
        start = end;
    }
    // Verify every frame before it is copied anywhere.
    let mut pos = 0;
    let mut raw = Vec::new();
    for (cid, c) in chunks {
        let len = c.frame_len() as usize;
        raw.clear();
        decode_frame_into(&data[pos..pos + len], Some(cid), &mut raw).map_err(|e| {
            Status::data_loss(format!(
                "pack {id} has a damaged frame at offset {}: {e}; run `granary admin scrub`",
                c.offset
            ))
        })?;
        pos += len;
    }
    Ok(data)
}

/// Byte ranges of pack `id` from an SSD replica, else from the object tier.
async fn read_ranges(
    cluster: &Cluster,
    id: u64,
    pack: &PackRecord,
    ranges: &[(u64, u32)],
) -> Result<Vec<u8>, Status> {
    let mut last = None;
    for node in &pack.replicas {
        let Some(addr) = cluster.addr_of(*node) else {
            continue;
        };
        let req = GetFramesRequest {
            pack_id: id,
            ranges: ranges
                .iter()
                .map(|(o, l)| FrameRange { offset: *o, len: *l })
                .collect(),
            object_key: String::new(),
            readahead: false,
        };
        let result = async {
            let mut stream = cluster.chunk(&addr)?.get_frames(req).await?.into_inner();
            let mut out = Vec::new();
            while let Some(piece) = stream.message().await? {
                out.extend_from_slice(&piece.data);
            }
            Ok::<_, Status>(out)
        }
        .await;
        match result {
            Ok(out) => return Ok(out),
            Err(e) => last = Some(e),
        }
    }
    if !pack.object_key.is_empty() {
        return cluster
            .objects()
            .get_ranges(&pack.object_key, ranges)
            .await
            .map_err(|e| Status::unavailable(e.to_string()));
    }
    Err(last.unwrap_or_else(|| Status::unavailable(format!("pack {id} has no readable copy"))))
}

/// Step 3 for one pack.
async fn compact(cluster: &Cluster, c: Candidate) -> Result<serde_json::Value, Status> {
    let Candidate {
        id,
        pack,
        live,
        share,
    } = c;
    let frames = read_frames(cluster, id, &pack, &live).await?;
    let new_id = match cluster.propose(MetaCommand::AllocatePack).await? {
        MetaReply::PackId(n) => n,
        other => return Err(internal(format!("unexpected reply {other:?}"))),
    };
    // Frames follow the header in order, so their new offsets are known.
    let mut locations = Vec::with_capacity(live.len());
    let mut offset = PACK_HEADER_LEN as u64;
    for (cid, rec) in &live {
        locations.push((
            *cid.as_bytes(),
            ChunkRecord {
                pack: new_id,
                offset,
                ..*rec
            },
        ));
        offset += rec.frame_len();
    }
    let new_pack = if !pack.replicas.is_empty() {
        compact_to_ssd(cluster, new_id, &frames, live.len() as u64).await?
    } else {
        compact_to_object(cluster, new_id, &frames).await?
    };
    let new_bytes = new_pack.bytes;
    let moved = match cluster
        .propose(MetaCommand::CompactPack {
            old: id,
            new_id,
            pack: new_pack,
            chunks: locations,
        })
        .await?
    {
        MetaReply::Compacted { moved, old } => {
            delete_copies(cluster, id, &old).await;
            moved
        }
        other => return Err(internal(format!("unexpected reply {other:?}"))),
    };
    tracing::info!(old = id, new = new_id, moved, "compacted a pack");
    Ok(json!({
        "old": id,
        "new": new_id,
        "live_share": share,
        "old_bytes": pack.bytes,
        "new_bytes": new_bytes,
        "chunks": moved,
    }))
}

/// Writes the new pack to chunk servers through a normal pack session
/// (not registered by the chunk server: `CompactPack` registers it).
async fn compact_to_ssd(
    cluster: &Cluster,
    new_id: u64,
    frames: &[u8],
    chunks: u64,
) -> Result<PackRecord, Status> {
    let replicas = cluster.pick_replicas(new_id)?;
    let mut client = cluster.chunk(&replicas[0].addr)?;
    let mut messages = vec![WritePackRequest {
        session: Some(PackSession {
            pack_id: new_id,
            chain: replicas[1..].iter().map(|n| n.addr.clone()).collect(),
            replica_ids: replicas.iter().map(|n| n.id).collect(),
            register: false,
            frames_in_incoming: false,
        }),
        frames: Default::default(),
        seal: false,
    }];
    // Whole frames per message.
    let mut pos = 0;
    let mut msg = Vec::new();
    while pos < frames.len() {
        let len = FrameHeader::parse(&frames[pos..])
            .map_err(|e| internal(format!("frame: {e}")))?
            .frame_len();
        msg.extend_from_slice(&frames[pos..pos + len]);
        pos += len;
        if msg.len() >= SEND_MESSAGE {
            messages.push(WritePackRequest {
                session: None,
                frames: std::mem::take(&mut msg).into(),
                seal: false,
            });
        }
    }
    messages.push(WritePackRequest {
        session: None,
        frames: msg.into(),
        seal: true,
    });
    let reply = client
        .write_pack(tokio_stream::iter(messages))
        .await?
        .into_inner();
    Ok(PackRecord {
        tier: TIER_SSD.into(),
        replicas: replicas.iter().map(|n| n.id).collect(),
        bytes: reply.bytes,
        chunks,
        object_key: String::new(),
        registered_ms: now_ms(),
    })
}

/// Builds the new pack in a temporary file and uploads it as one object.
async fn compact_to_object(cluster: &Cluster, new_id: u64, frames: &[u8]) -> Result<PackRecord, Status> {
    let dir = cluster.scratch().map_err(internal)?;
    let path = dir.path().join(format!("{new_id}.pack"));
    let sealed = {
        let path = path.clone();
        let frames = frames.to_vec();
        tokio::task::spawn_blocking(move || {
            let mut w = PackWriter::create(&path, new_id)?;
            let mut pos = 0;
            while pos < frames.len() {
                let len = FrameHeader::parse(&frames[pos..])
                    .map_err(|source| granary_core::PackError::BadFrame {
                        path: path.clone(),
                        offset: pos as u64,
                        source,
                    })?
                    .frame_len();
                w.append_frame(&frames[pos..pos + len])?;
                pos += len;
            }
            w.seal()
        })
        .await
        .map_err(internal)?
        .map_err(internal)?
    };
    let key = cluster.objects().pack_key(new_id);
    cluster
        .objects()
        .put_file(&key, &path)
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    Ok(PackRecord {
        tier: TIER_OBJECT.into(),
        replicas: Vec::new(),
        bytes: sealed.len,
        chunks: sealed.entries.len() as u64,
        object_key: key,
        registered_ms: now_ms(),
    })
}
