//! Keeping every pack readable: re-replication and scrub.
//!
//! - [`run`]: the leader's repair loop (every 10 s, `GRANARY_REPAIR_SECS`).
//!   A chunk server that has not sent a heartbeat for the dead-node timeout
//!   (10 min, `GRANARY_NODE_DEAD_SECS`), or that was removed from the
//!   cluster, has lost its replicas: each SSD pack that lists it gets a new
//!   replica on a live chunk server that does not hold it (copied from a
//!   surviving replica, else from the object tier, and verified), and Raft
//!   records the new replica set. Packs with fewer replicas than the
//!   replication factor are topped up the same way.
//! - [`scrub`]: `granary admin scrub`: every chunk server verifies every
//!   frame of its packs (bad copies are quarantined and restored from a
//!   replica or the object tier), and this node verifies every object-tier
//!   copy (a bad one is uploaded again from an SSD replica).

use std::time::Duration;

use granary_client::chunk_proto::{RestorePackRequest, ScrubRequest, UploadPackRequest};
use serde_json::json;
use tonic::Status;

use crate::chunk::store::verify_pack;
use crate::cluster::{id_of, internal, now_ms, Cluster, CHUNK_SERVER_TIMEOUT_MS};
use crate::meta::command::MetaCommand;
use crate::meta::state::{PackRecord, CF_PACKS};
use crate::settings::env_secs;

/// How long a chunk server may be silent before its replicas are replaced.
pub fn dead_after() -> Duration {
    env_secs("GRANARY_NODE_DEAD_SECS", 600)
}

/// Runs the repair loop until the task is aborted.
pub async fn run(cluster: Cluster) {
    let every = env_secs("GRANARY_REPAIR_SECS", 10);
    loop {
        tokio::time::sleep(every).await;
        if !cluster.is_leader() {
            continue;
        }
        if let Err(e) = rereplicate(&cluster).await {
            tracing::warn!("re-replication pass failed: {}", e.message());
        }
    }
}

/// One re-replication pass; returns how many replicas were added.
pub async fn rereplicate(cluster: &Cluster) -> Result<u64, Status> {
    let dead_ms = dead_after().as_millis() as u64;
    let alive: Vec<(u64, String)> = cluster
        .live_chunk_nodes(dead_ms)?
        .into_iter()
        .map(|(id, n)| (id, n.addr))
        .collect();
    // New copies go only to servers heard from recently.
    let fresh: Vec<u64> = cluster
        .live_chunk_nodes(CHUNK_SERVER_TIMEOUT_MS)?
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    if alive.is_empty() {
        return Ok(0);
    }
    let want = cluster.replication(alive.len());
    let packs = cluster.reader().all::<PackRecord>(CF_PACKS).map_err(internal)?;
    let mut added = 0;
    'packs: for (k, pack) in packs {
        let id = id_of(&k);
        // Object-tier packs, and packs a mover task is working on now. A
        // move that waits in the queue (backing off after failures, or
        // refused until the nodes share one object store) does not keep a
        // pack from its replicas: repair lists copies compare-and-set, and a
        // move's end lists only copies it verified (a copy it leaves out is
        // unlisted and swept), so neither leaves the pack without a copy.
        if pack.replicas.is_empty() || cluster.is_moving(id) {
            continue;
        }
        let good: Vec<u64> = pack
            .replicas
            .iter()
            .copied()
            .filter(|r| alive.iter().any(|(a, _)| a == r))
            .collect();
        if good.len() >= want.min(alive.len()) && good.len() == pack.replicas.len() {
            continue;
        }
        let peers: Vec<String> = good
            .iter()
            .filter_map(|r| alive.iter().find(|(a, _)| a == r).map(|(_, addr)| addr.clone()))
            .collect();
        if peers.is_empty() && pack.object_key.is_empty() {
            tracing::error!(
                pack = id,
                "every replica of this pack is on dead chunk servers and it has no object copy"
            );
            continue;
        }
        // What meta lists now; each change is compare-and-set against it, so
        // a move or another repair that changed the list meanwhile wins and
        // this pack waits for the next pass.
        let mut listed = pack.replicas.clone();
        let mut replicas = good.clone();
        let start = id as usize % alive.len();
        for (node, addr) in alive.iter().cycle().skip(start).take(alive.len()) {
            if replicas.len() >= want {
                break;
            }
            if replicas.contains(node) || !fresh.contains(node) {
                continue;
            }
            let req = RestorePackRequest {
                pack_id: id,
                peers: peers.clone(),
                object_key: pack.object_key.clone(),
            };
            match cluster.chunk(addr)?.restore_pack(req).await {
                Ok(r) => {
                    tracing::info!(pack = id, node, from = %r.into_inner().source, "re-replicated a pack");
                    replicas.push(*node);
                    added += 1;
                    // List the copy at once: the chunk server's sweep deletes
                    // pack files that meta does not list for it.
                    let change = MetaCommand::ReplaceReplicas {
                        id,
                        expected: listed.clone(),
                        replicas: replicas.clone(),
                    };
                    if !replace_replicas(cluster, id, change).await? {
                        continue 'packs;
                    }
                    listed = replicas.clone();
                }
                Err(e) => tracing::warn!(pack = id, node, "could not re-replicate: {}", e.message()),
            }
        }
        if replicas.is_empty() {
            continue;
        }
        if replicas != listed {
            let change = MetaCommand::ReplaceReplicas {
                id,
                expected: listed,
                replicas,
            };
            replace_replicas(cluster, id, change).await?;
        }
    }
    Ok(added)
}

/// Proposes a compare-and-set replica change; `false` when the list changed
/// meanwhile (the pack is looked at again in the next pass).
async fn replace_replicas(cluster: &Cluster, id: u64, change: MetaCommand) -> Result<bool, Status> {
    match cluster.propose(change).await {
        Ok(_) => Ok(true),
        Err(e) if e.code() == tonic::Code::FailedPrecondition => {
            tracing::info!(
                pack = id,
                "replicas changed during repair, next pass: {}",
                e.message()
            );
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// `granary admin scrub`: every chunk server's packs and every object copy.
pub async fn scrub(cluster: &Cluster, repair: bool) -> Result<serde_json::Value, Status> {
    cluster.barrier().await?;
    let mut nodes = Vec::new();
    for (id, n) in cluster.live_chunk_nodes(CHUNK_SERVER_TIMEOUT_MS)? {
        let report = match cluster.chunk(&n.addr)?.scrub(ScrubRequest { repair }).await {
            Ok(r) => serde_json::from_str(&r.into_inner().json).map_err(internal)?,
            Err(e) => json!({"node": id, "error": e.message()}),
        };
        nodes.push(report);
    }
    let (mut packs, mut bytes, mut bad, mut repaired, mut failed) =
        (0u64, 0u64, Vec::new(), Vec::new(), Vec::new());
    let dir = cluster.scratch().map_err(internal)?;
    for (k, pack) in cluster.reader().all::<PackRecord>(CF_PACKS).map_err(internal)? {
        if pack.object_key.is_empty() {
            continue;
        }
        let id = id_of(&k);
        packs += 1;
        let path = dir.path().join(format!("{id}.pack"));
        let check = async {
            cluster
                .objects()
                .get_to_file(&pack.object_key, &path)
                .await
                .map_err(|e| e.to_string())?;
            let p = path.clone();
            tokio::task::spawn_blocking(move || verify_pack(&p, id))
                .await
                .map_err(|e| e.to_string())?
        }
        .await;
        let _ = std::fs::remove_file(&path);
        match check {
            Ok(len) => bytes += len,
            Err(e) => {
                tracing::warn!(pack = id, "object copy is damaged or missing: {e}");
                bad.push(id);
                if !repair {
                    continue;
                }
                match reupload(cluster, id, &pack).await {
                    Ok(node) => repaired.push(json!({"pack": id, "from": format!("node {node}")})),
                    Err(e) => failed.push(json!({"pack": id, "error": e})),
                }
            }
        }
    }
    let ok = nodes.iter().all(|n| {
        n.get("error").is_none()
            && n["bad"].as_array().is_none_or(|b| b.is_empty() || repair)
            && n["failed"].as_array().is_none_or(|f| f.is_empty())
    }) && failed.is_empty()
        && (bad.is_empty() || repair);
    Ok(json!({
        "ok": ok,
        "finished_ms": now_ms(),
        "nodes": nodes,
        "object": {"packs": packs, "bytes": bytes, "bad": bad, "repaired": repaired, "failed": failed},
    }))
}

/// Uploads a pack's object copy again from one of its SSD replicas.
async fn reupload(cluster: &Cluster, id: u64, pack: &PackRecord) -> Result<u64, String> {
    for node in &pack.replicas {
        let Some(addr) = cluster.addr_of(*node) else {
            continue;
        };
        let req = UploadPackRequest {
            pack_id: id,
            object_key: pack.object_key.clone(),
        };
        let Ok(mut c) = cluster.chunk(&addr) else { continue };
        if c.upload_pack(req).await.is_ok() {
            return Ok(*node);
        }
    }
    Err(format!(
        "pack {id}: the object copy is bad and no SSD replica could upload it again"
    ))
}
