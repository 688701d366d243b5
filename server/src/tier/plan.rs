//! `granary admin tier move` and `tier status`.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use granary_core::TreeId;
use serde_json::json;
use tonic::Status;

use super::{live_versions, version_packs};
use crate::cluster::{internal, now_ms, Cluster};
use crate::meta::command::{dataset_not_found, version_not_found, MetaCommand, MetaReply};
use crate::meta::state::*;

/// How long `--wait` waits for the queued moves.
const WAIT_LIMIT: Duration = Duration::from_secs(3600);

/// Pins (to `object`) or unpins (to `ssd`) a version, or every version of a
/// dataset, and queues the pack moves that follow. Returns a JSON report.
pub async fn tier_move(
    cluster: &Cluster,
    dataset: &str,
    number: Option<u64>,
    to: &str,
    wait: bool,
) -> Result<serde_json::Value, Status> {
    tier_move_by(cluster, dataset, number, to, wait, "manual").await
}

/// [`tier_move`] on behalf of `by` (`manual` or `policy`).
pub async fn tier_move_by(
    cluster: &Cluster,
    dataset: &str,
    number: Option<u64>,
    to: &str,
    wait: bool,
    by: &str,
) -> Result<serde_json::Value, Status> {
    if to != TIER_OBJECT && to != TIER_SSD {
        return Err(Status::invalid_argument(format!(
            "unknown tier '{to}': use --to object or --to ssd"
        )));
    }
    granary_core::validate_dataset_name(dataset).map_err(|e| Status::invalid_argument(e.to_string()))?;
    cluster.barrier().await?;
    let r = cluster.reader();
    r.dataset(dataset)
        .map_err(internal)?
        .ok_or_else(|| Status::from(dataset_not_found(dataset)))?;
    let versions = live_versions(&r).map_err(internal)?;
    let selected: Vec<(String, u64)> = versions
        .iter()
        .map(|(id, _)| id.clone())
        .filter(|(d, n)| d == dataset && number.is_none_or(|want| want == *n))
        .collect();
    if let (Some(n), true) = (number, selected.is_empty()) {
        return Err(version_not_found(dataset, n).into());
    }
    if to == TIER_OBJECT {
        // Nothing is pinned or queued where other nodes could not read it.
        cluster.check_shared_object_tier().await?;
    }
    let root_of = |id: &(String, u64)| -> TreeId {
        let v = versions
            .iter()
            .find(|(k, _)| k == id)
            .expect("selected from versions");
        TreeId::from_bytes(v.1.root)
    };
    let mine = version_packs(&r, selected.iter().map(root_of)).map_err(internal)?;
    let pins: HashSet<(String, u64)> = r
        .all::<PinRecord>(CF_PINS)
        .map_err(internal)?
        .into_iter()
        .filter_map(|(k, _)| split_version_key(&k))
        .collect();
    let (mut queue, kept_shared, pin, unpin) = if to == TIER_OBJECT {
        // Packs of versions that stay hot stay on SSD.
        let hot_roots = versions
            .iter()
            .filter(|(id, _)| !selected.contains(id) && !pins.contains(id))
            .map(|(_, v)| TreeId::from_bytes(v.root));
        let hot = version_packs(&r, hot_roots).map_err(internal)?;
        let mut queue = Vec::new();
        let mut kept = 0;
        for id in &mine {
            if hot.contains(id) {
                kept += 1;
            } else if r
                .pack(*id)
                .map_err(internal)?
                .is_some_and(|p| !p.replicas.is_empty())
            {
                queue.push(*id);
            }
        }
        (queue, kept, selected.clone(), Vec::new())
    } else {
        let mut queue = Vec::new();
        for id in &mine {
            if r.pack(*id)
                .map_err(internal)?
                .is_some_and(|p| p.replicas.is_empty() || p.tier == TIER_OBJECT)
            {
                queue.push(*id);
            }
        }
        (queue, 0, Vec::new(), selected.clone())
    };
    let mut bytes = 0;
    for id in &queue {
        bytes += r.pack(*id).map_err(internal)?.map_or(0, |p| p.bytes);
    }
    queue.sort_unstable();
    let queued = match cluster
        .propose(MetaCommand::QueueMoves {
            packs: queue.clone(),
            to: to.to_string(),
            pin,
            unpin,
            by: by.into(),
            now_ms: now_ms(),
        })
        .await?
    {
        MetaReply::Stored(n) => n,
        other => return Err(internal(format!("unexpected reply {other:?}"))),
    };
    let mut done = !wait;
    if wait {
        let deadline = tokio::time::Instant::now() + WAIT_LIMIT;
        while tokio::time::Instant::now() < deadline {
            cluster.barrier().await?;
            let r = cluster.reader();
            let mut pending = false;
            for id in &queue {
                if r.exists(CF_MOVES, &id.to_be_bytes()).map_err(internal)? {
                    pending = true;
                    break;
                }
            }
            if !pending {
                done = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(json!({
        "dataset": dataset,
        "versions": selected.iter().map(|(_, n)| *n).collect::<Vec<_>>(),
        "to": to,
        "packs_used": mine.len(),
        "queued": queued,
        "queued_bytes": bytes,
        "kept_shared": kept_shared,
        "done": done,
    }))
}

/// Bytes per tier per dataset, the policies and the mover's queue.
pub async fn tier_status(cluster: &Cluster) -> Result<serde_json::Value, Status> {
    cluster.barrier().await?;
    // One snapshot for every read: a move that ends meanwhile must not show
    // as both finished (gone from the queue) and still moving.
    let snapshot = cluster.snapshot();
    let r = cluster.reader_at(&snapshot);
    let versions = super::live_versions(&r).map_err(internal)?;
    let pins: HashSet<Vec<u8>> = r
        .all::<PinRecord>(CF_PINS)
        .map_err(internal)?
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    let mut by_dataset: BTreeMap<String, Vec<(super::VersionName, TreeId)>> = BTreeMap::new();
    for (id, v) in &versions {
        by_dataset
            .entry(id.0.clone())
            .or_default()
            .push((id.clone(), TreeId::from_bytes(v.root)));
    }
    let mut datasets = Vec::new();
    for (name, vs) in &by_dataset {
        let packs = version_packs(&r, vs.iter().map(|(_, root)| *root)).map_err(internal)?;
        let (mut ssd, mut object, mut moving) = (0u64, 0u64, 0u64);
        for id in &packs {
            if let Some(p) = r.pack(*id).map_err(internal)? {
                if !p.replicas.is_empty() {
                    ssd += p.bytes;
                } else {
                    object += p.bytes;
                }
                if r.exists(CF_MOVES, &id.to_be_bytes()).map_err(internal)? {
                    moving += p.bytes;
                }
            }
        }
        let pinned: Vec<u64> = vs
            .iter()
            .filter(|(id, _)| pins.contains(&version_key(&id.0, id.1)))
            .map(|(id, _)| id.1)
            .collect();
        datasets.push(json!({
            "dataset": name,
            "versions": vs.len(),
            "pinned_to_object": pinned,
            "packs": packs.len(),
            "ssd_bytes": ssd,
            "object_bytes": object,
            "moving_bytes": moving,
        }));
    }
    let (mut total_ssd, mut total_object, mut packs_ssd, mut packs_object) = (0u64, 0u64, 0u64, 0u64);
    for (_, p) in r.all::<PackRecord>(CF_PACKS).map_err(internal)? {
        if !p.replicas.is_empty() {
            total_ssd += p.bytes;
            packs_ssd += 1;
        }
        if !p.object_key.is_empty() {
            total_object += p.bytes;
            packs_object += 1;
        }
    }
    let queue: Vec<serde_json::Value> = r
        .all::<MoveRecord>(CF_MOVES)
        .map_err(internal)?
        .into_iter()
        .map(|(k, m)| json!({"pack": crate::cluster::id_of(&k), "to": m.to, "queued_ms": m.queued_ms}))
        .collect();
    let policies: Vec<serde_json::Value> = r
        .all::<PolicyRecord>(CF_POLICIES)
        .map_err(internal)?
        .into_iter()
        .map(|(k, p)| {
            json!({
                "dataset": if k.is_empty() { "*".to_string() } else { String::from_utf8_lossy(&k).into_owned() },
                "cold_after_secs": p.cold_after_secs,
            })
        })
        .collect();
    Ok(json!({
        "object_store": cluster.objects().url(),
        "datasets": datasets,
        "totals": {
            "ssd_bytes": total_ssd,
            "ssd_packs": packs_ssd,
            "object_bytes": total_object,
            "object_packs": packs_object,
        },
        "queue": queue,
        "policies": policies,
    }))
}
