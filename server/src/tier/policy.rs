//! Cold-after policies, applied by the leader every minute
//! (`GRANARY_POLICY_SECS` overrides it).
//!
//! A version is cold when neither it was committed nor any of its packs was
//! read (as chunk servers report) within its dataset's `cold_after` (or the
//! default policy's). Cold versions that are not pinned are pinned to the
//! object tier by the policy and their packs queued (shared packs follow the
//! rule in [`crate::tier`]). A version the policy pinned whose packs were
//! read since it was pinned is unpinned and moved back to SSD, however long
//! ago that read was: reads reach meta up to 5 s late and this scan runs
//! only every `GRANARY_POLICY_SECS`, so a short `cold_after` must not hide them.
//! Versions pinned by hand (`tier move`) are left alone.

use std::collections::HashMap;
use std::time::Duration;

use granary_core::TreeId;

use super::{live_versions, packs_of, reach};
use crate::cluster::{now_ms, Cluster};
use crate::meta::state::*;

fn interval() -> Duration {
    crate::settings::env_secs("GRANARY_POLICY_SECS", 60)
}

/// Runs the policy scan until the task is aborted.
pub async fn run(cluster: Cluster) {
    loop {
        tokio::time::sleep(interval()).await;
        if !cluster.is_leader() {
            continue;
        }
        if let Err(e) = scan(&cluster).await {
            tracing::warn!("tiering policy scan failed: {e}");
        }
    }
}

/// One pass: pins cold versions, unpins policy-pinned versions read again.
pub async fn scan(cluster: &Cluster) -> Result<(), String> {
    let r = cluster.reader();
    let policies: HashMap<Vec<u8>, PolicyRecord> = r.all::<PolicyRecord>(CF_POLICIES)?.into_iter().collect();
    if policies.is_empty() {
        return Ok(());
    }
    let now = now_ms();
    let mut to_cold = Vec::new();
    let mut to_hot = Vec::new();
    for ((dataset, number), v) in live_versions(&r)? {
        let Some(policy) = policies
            .get(dataset.as_bytes())
            .or_else(|| policies.get(&Vec::new()))
        else {
            continue;
        };
        let cold_ms = policy.cold_after_secs.saturating_mul(1000);
        let reached = reach(&r, [TreeId::from_bytes(v.root)])?;
        let mut last = v.created_ms;
        for pack in packs_of(&r, &reached.chunks)?.keys() {
            last = last.max(r.u64_at(CF_ACCESS, &pack.to_be_bytes())?);
        }
        let pin: Option<PinRecord> = r.get(CF_PINS, &version_key(&dataset, number))?;
        let cold = now.saturating_sub(last) >= cold_ms;
        match pin {
            None if cold => to_cold.push((dataset, number)),
            Some(p) if p.by == "policy" && last > p.pinned_ms => to_hot.push((dataset, number)),
            _ => {}
        }
    }
    for (dataset, number) in to_cold {
        tracing::info!(version = %format!("{dataset}@{number}"), "policy: version is cold, moving it to the object tier");
        policy_move(cluster, &dataset, number, TIER_OBJECT).await?;
    }
    for (dataset, number) in to_hot {
        tracing::info!(version = %format!("{dataset}@{number}"), "policy: version is read again, moving it back to SSD");
        policy_move(cluster, &dataset, number, TIER_SSD).await?;
    }
    Ok(())
}

async fn policy_move(cluster: &Cluster, dataset: &str, number: u64, to: &str) -> Result<(), String> {
    super::plan::tier_move_by(cluster, dataset, Some(number), to, false, "policy")
        .await
        .map(|_| ())
        .map_err(|s| s.message().to_string())
}
