//! The tier mover: runs on every meta node, works only while that node is
//! the leader, and drains the `moves` queue a few packs at a time.
//!
//! Steps of a move to the object tier (crash points in brackets, see
//! [`crate::fault`]):
//! 1. a chunk server holding a replica uploads the pack (`UploadPack`),
//!    which checks the stored object's size; [`move-after-upload`]
//! 2. Raft records the object copy (`MoveUploaded`); [`move-after-record`]
//! 3. Raft records the object tier as home, no SSD replicas, and drops the
//!    queue entry (`EndMove`); [`move-after-finish`]
//! 4. the replicas' files are deleted (a crash here leaves files that the
//!    chunk servers' sweep of unregistered packs removes).
//!
//! A move back to SSD: chunk servers restore verified copies from the object
//! (`RestorePack`) until the pack has the replication factor's number of
//! them on live chunk servers, Raft records them as replicas and forgets
//! the object copy (`EndMove`), then the object is deleted.
//!
//! Readers are never without a copy: until step 3 the SSD replicas are
//! listed; from step 2 on the object copy is too, and clients that find a
//! replica gone ask meta again and read through any chunk server.
//!
//! Stale movers change nothing: `EndMove` names the queued move it ends
//! (direction and queue time) and is refused if the pack was queued again or
//! another task ended it (a mover still running on a node that lost the
//! leadership, say), and the deletions come only after it was accepted;
//! replica lists are written compare-and-set (`ReplaceReplicas`). A chunk
//! server refuses to delete a copy that meta lists for it.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use granary_client::chunk_proto::{DeletePackRequest, RestorePackRequest, UploadPackRequest};
use tokio::task::JoinSet;

use crate::cluster::{internal, Cluster, CHUNK_SERVER_TIMEOUT_MS};
use crate::fault;
use crate::meta::command::MetaCommand;
use crate::meta::state::{MoveRecord, PackRecord, CF_MOVES, TIER_OBJECT, TIER_SSD};

/// Packs moved at the same time.
const PARALLEL_MOVES: usize = 4;
/// How often the queue is looked at: reading an empty queue is one RocksDB
/// seek, and a move asked for waits at most this long to start (at 500 ms
/// that wait was up to a sixth of a 3 s benchmark move).
const POLL: Duration = Duration::from_millis(100);

/// Runs the mover until the task is aborted.
pub async fn run(cluster: Cluster) {
    // Packs whose move failed, and when to try again (doubling up to a minute).
    let backoff: std::sync::Arc<std::sync::Mutex<HashMap<u64, (Instant, Duration)>>> = Default::default();
    loop {
        tokio::time::sleep(POLL).await;
        if !cluster.is_leader() {
            continue;
        }
        let queue: Vec<(u64, MoveRecord)> = match cluster.reader().all::<MoveRecord>(CF_MOVES) {
            Ok(q) => q
                .into_iter()
                .map(|(k, m)| (crate::cluster::id_of(&k), m))
                .collect(),
            Err(e) => {
                tracing::warn!("mover cannot read its queue: {e}");
                continue;
            }
        };
        let now = Instant::now();
        let queue: Vec<(u64, MoveRecord)> = {
            let b = backoff.lock().expect("backoff lock");
            queue
                .into_iter()
                .filter(|(id, _)| b.get(id).is_none_or(|(at, _)| *at <= now))
                .collect()
        };
        if queue.is_empty() {
            continue;
        }
        tracing::debug!(packs = queue.len(), "tier mover: working through the queue");
        let mut tasks = JoinSet::new();
        for (id, m) in queue {
            while tasks.len() >= PARALLEL_MOVES {
                tasks.join_next().await;
            }
            let cluster = cluster.clone();
            let backoff = backoff.clone();
            tasks.spawn(async move {
                let _moving = cluster.moving(id);
                match move_pack(&cluster, id, &m).await {
                    Ok(()) => {
                        backoff.lock().expect("backoff lock").remove(&id);
                    }
                    Err(e) => {
                        let mut b = backoff.lock().expect("backoff lock");
                        let delay = b.get(&id).map_or(Duration::from_secs(1), |(_, d)| {
                            (*d * 2).min(Duration::from_secs(60))
                        });
                        b.insert(id, (Instant::now() + delay, delay));
                        tracing::warn!(
                            pack = id,
                            to = %m.to,
                            "tier move failed, retrying in {delay:?}: {}",
                            e.message()
                        );
                    }
                }
            });
        }
        while tasks.join_next().await.is_some() {}
    }
}

/// Carries one queued move as far as it goes.
pub async fn move_pack(cluster: &Cluster, id: u64, m: &MoveRecord) -> Result<(), tonic::Status> {
    let Some(pack) = cluster.reader().pack(id).map_err(internal)? else {
        // Deleted by GC: just drop the queue entry.
        return finish(cluster, id, m, Vec::new(), false).await;
    };
    if m.to == TIER_OBJECT {
        to_object(cluster, id, m, pack).await
    } else {
        to_ssd(cluster, id, m, pack).await
    }
}

/// Ends the queued move `m` (refused if it is no longer the queued one).
async fn finish(
    cluster: &Cluster,
    id: u64,
    m: &MoveRecord,
    replicas: Vec<u64>,
    drop_object: bool,
) -> Result<(), tonic::Status> {
    cluster
        .propose(MetaCommand::EndMove {
            id,
            to: m.to.clone(),
            queued_ms: m.queued_ms,
            replicas,
            drop_object,
        })
        .await
        .map(|_| ())
}

/// Lists `node` as a replica of pack `id` next to `listed` (compare-and-set).
async fn add_replica(
    cluster: &Cluster,
    id: u64,
    listed: &mut Vec<u64>,
    node: u64,
) -> Result<(), tonic::Status> {
    if listed.contains(&node) {
        return Ok(());
    }
    let mut replicas = listed.clone();
    replicas.push(node);
    cluster
        .propose(MetaCommand::ReplaceReplicas {
            id,
            expected: listed.clone(),
            replicas: replicas.clone(),
        })
        .await?;
    *listed = replicas;
    Ok(())
}

/// Replica addresses of `pack`, live chunk servers first.
fn replica_addrs(cluster: &Cluster, pack: &PackRecord) -> Vec<(u64, String)> {
    let live: Vec<u64> = cluster
        .live_chunk_nodes(CHUNK_SERVER_TIMEOUT_MS)
        .map(|l| l.into_iter().map(|(id, _)| id).collect())
        .unwrap_or_default();
    let mut out: Vec<(u64, String)> = pack
        .replicas
        .iter()
        .filter_map(|r| cluster.addr_of(*r).map(|a| (*r, a)))
        .collect();
    out.sort_by_key(|(id, _)| !live.contains(id));
    out
}

async fn to_object(
    cluster: &Cluster,
    id: u64,
    m: &MoveRecord,
    pack: PackRecord,
) -> Result<(), tonic::Status> {
    // Queued while the cluster was one node, say: it waits until every node
    // names the same store (the SSD copies stay meanwhile).
    cluster.check_shared_object_tier().await?;
    let replicas = replica_addrs(cluster, &pack);
    if !pack.object_key.is_empty() {
        // Recorded by an earlier attempt: the SSD copies go only if the
        // object is still there, whole.
        let size = cluster
            .objects()
            .size(&pack.object_key)
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        if size != Some(pack.bytes) {
            return Err(tonic::Status::data_loss(format!(
                "pack {id}: its recorded object {} holds {size:?} bytes, the pack has {}; run `granary admin scrub`",
                pack.object_key, pack.bytes
            )));
        }
    } else {
        // A key of its own: a stale task deleting the object it recorded
        // (a move back to SSD, say) can never hit this upload.
        let key = cluster.objects().move_key(id);
        let mut last = None;
        let mut uploaded = false;
        for (node, addr) in &replicas {
            let req = UploadPackRequest {
                pack_id: id,
                object_key: key.clone(),
            };
            match cluster.chunk(addr)?.upload_pack(req).await {
                Ok(r) => {
                    let bytes = r.into_inner().bytes;
                    if bytes != pack.bytes {
                        return Err(tonic::Status::data_loss(format!(
                            "pack {id}: the object tier holds {bytes} bytes, the pack has {}",
                            pack.bytes
                        )));
                    }
                    tracing::info!(pack = id, node, bytes, "pack uploaded to the object tier");
                    uploaded = true;
                    break;
                }
                Err(s) => last = Some(s),
            }
        }
        if !uploaded {
            return Err(last.unwrap_or_else(|| {
                tonic::Status::unavailable(format!("pack {id} has no reachable SSD replica to upload from"))
            }));
        }
        fault::point("move-after-upload");
        cluster
            .propose(MetaCommand::MoveUploaded {
                id,
                queued_ms: m.queued_ms,
                object_key: key,
            })
            .await?;
    }
    fault::point("move-after-record");
    finish(cluster, id, m, Vec::new(), false).await?;
    fault::point("move-after-finish");
    for (node, addr) in replicas {
        match cluster
            .chunk(&addr)?
            .delete_pack(DeletePackRequest { pack_id: id })
            .await
        {
            Ok(_) => {}
            Err(e) => tracing::info!(
                pack = id,
                node,
                "could not delete the SSD copy now ({}); the chunk server's sweep will",
                e.message()
            ),
        }
    }
    Ok(())
}

async fn to_ssd(cluster: &Cluster, id: u64, m: &MoveRecord, pack: PackRecord) -> Result<(), tonic::Status> {
    debug_assert_eq!(m.to, TIER_SSD);
    if pack.object_key.is_empty() {
        // Already only on SSD (a move back that finished, or never moved).
        return finish(cluster, id, m, pack.replicas, false).await;
    }
    let targets = ssd_targets(cluster, id, &pack)?;
    let mut listed = pack.replicas.clone();
    for (node, addr) in &targets {
        let req = RestorePackRequest {
            pack_id: id,
            peers: Vec::new(),
            object_key: pack.object_key.clone(),
        };
        cluster.chunk(addr)?.restore_pack(req).await.map_err(|s| {
            tonic::Status::unavailable(format!(
                "chunk server {node} could not copy pack {id} back: {}",
                s.message()
            ))
        })?;
        fault::pause("move-after-restore").await;
        // List each copy at once: the chunk server's sweep deletes pack
        // files that meta does not list for it.
        add_replica(cluster, id, &mut listed, *node).await?;
    }
    let key = pack.object_key.clone();
    finish(cluster, id, m, targets.iter().map(|(n, _)| *n).collect(), true).await?;
    if let Err(e) = cluster.objects().delete(&key).await {
        tracing::warn!(pack = id, "could not delete the object copy: {e}");
    }
    Ok(())
}

/// Where a pack moving back to SSD gets its copies: the listed replicas on
/// live chunk servers, then other live chunk servers, up to the replication
/// factor. A listed replica on a silent server is left out (repair gives the
/// pack its copies back later if the server returns); the object copy is
/// dropped only once all of these hold a verified copy.
fn ssd_targets(cluster: &Cluster, id: u64, pack: &PackRecord) -> Result<Vec<(u64, String)>, tonic::Status> {
    let live: Vec<(u64, String)> = cluster
        .live_chunk_nodes(CHUNK_SERVER_TIMEOUT_MS)?
        .into_iter()
        .map(|(id, n)| (id, n.addr))
        .collect();
    let mut targets: Vec<(u64, String)> = pack
        .replicas
        .iter()
        .filter_map(|r| live.iter().find(|(n, _)| n == r).cloned())
        .collect();
    let want = cluster.replication(live.len());
    if targets.len() < want {
        for n in cluster.pick_replicas(id)? {
            if targets.len() >= want {
                break;
            }
            if !targets.iter().any(|(t, _)| *t == n.id) {
                targets.push((n.id, n.addr));
            }
        }
    }
    Ok(targets)
}
