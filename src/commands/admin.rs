//! `granary admin`: cluster status and membership, tiering, GC, scrub.

use std::time::Duration;

use granary_client::MetaClient;
use granary_core::VersionRef;
use indicatif::{HumanBytes, ProgressBar, ProgressStyle};
use serde_json::Value;

use super::runtime;
use crate::cli::{AdminCommand, PolicyCommand, TierCommand};

pub fn run(cmd: AdminCommand) -> anyhow::Result<()> {
    match cmd {
        AdminCommand::Status { server, output } => {
            let client = MetaClient::connect(&server.servers)?;
            let status = runtime()?.block_on(client.status(false))?;
            if output.json {
                println!("{status}");
            } else {
                print_status(&status);
            }
            Ok(())
        }
        AdminCommand::RemoveNode { node_id, server } => {
            let client = MetaClient::connect(&server.servers)?;
            runtime()?.block_on(client.remove_node(node_id))?;
            println!("node {node_id} removed from the cluster");
            Ok(())
        }
        AdminCommand::Tier(cmd) => tier(cmd),
        AdminCommand::Gc {
            dry_run,
            compact_below,
            server,
            output,
        } => {
            let client = MetaClient::connect(&server.servers)?;
            let spinner = spinner(
                if dry_run {
                    "marking (dry run)"
                } else {
                    "collecting garbage"
                },
                output.json,
            );
            let report = runtime()?.block_on(client.gc(dry_run, Some(compact_below)))?;
            spinner.finish_and_clear();
            if output.json {
                println!("{report}");
            } else {
                print_gc(&report);
            }
            Ok(())
        }
        AdminCommand::Scrub {
            no_repair,
            server,
            output,
        } => {
            let client = MetaClient::connect(&server.servers)?;
            let spinner = spinner("verifying every pack", output.json);
            let report = runtime()?.block_on(client.scrub(!no_repair))?;
            spinner.finish_and_clear();
            if output.json {
                println!("{report}");
            } else {
                print_scrub(&report);
            }
            if report["ok"].as_bool() != Some(true) {
                anyhow::bail!("scrub found damage it could not repair; see the report above");
            }
            Ok(())
        }
    }
}

/// A spinner on stderr (hidden for --json or when stderr is not a terminal).
fn spinner(msg: &'static str, json: bool) -> ProgressBar {
    use std::io::IsTerminal;
    if json || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new_spinner().with_message(msg);
    pb.enable_steady_tick(Duration::from_millis(120));
    pb
}

fn tier(cmd: TierCommand) -> anyhow::Result<()> {
    match cmd {
        TierCommand::Move {
            target,
            to,
            no_wait,
            server,
            output,
        } => {
            let r = VersionRef::parse(&target)?;
            let client = MetaClient::connect(&server.servers)?;
            let rt = runtime()?;
            let report = rt.block_on(client.tier_move(&r.dataset, r.number, &to, false))?;
            let queued = report["queued"].as_u64().unwrap_or(0);
            let mut done = queued == 0;
            if !no_wait && queued > 0 {
                done = rt.block_on(wait_for_moves(&client, &report, output.json))?;
            }
            if output.json {
                let mut report = report;
                report["done"] = Value::Bool(done);
                println!("{report}");
            } else {
                let what = match r.number {
                    Some(n) => format!("{}@{n}", r.dataset),
                    None => format!("every version of {}", r.dataset),
                };
                println!(
                    "{what}: {queued} pack(s), {} {} the {to} tier",
                    HumanBytes(report["queued_bytes"].as_u64().unwrap_or(0)),
                    if done { "moved to" } else { "queued for" },
                );
                let kept = report["kept_shared"].as_u64().unwrap_or(0);
                if kept > 0 {
                    println!("{kept} pack(s) stay on SSD: versions that are not moving use them too");
                }
                if !done {
                    println!("`granary admin tier status` shows the mover's queue");
                }
            }
            Ok(())
        }
        TierCommand::Policy(PolicyCommand::Set {
            dataset,
            cold_after,
            server,
        }) => {
            let client = MetaClient::connect(&server.servers)?;
            let name = dataset.unwrap_or_default();
            runtime()?.block_on(client.tier_policy(&name, Some(cold_after.as_secs())))?;
            println!(
                "{}: versions not read for {} move to the object tier",
                if name.is_empty() { "every dataset" } else { &name },
                humantime::format_duration(cold_after)
            );
            Ok(())
        }
        TierCommand::Policy(PolicyCommand::Clear { dataset, server }) => {
            let client = MetaClient::connect(&server.servers)?;
            let name = dataset.unwrap_or_default();
            runtime()?.block_on(client.tier_policy(&name, None))?;
            println!(
                "{}: tiering policy removed",
                if name.is_empty() { "default" } else { &name }
            );
            Ok(())
        }
        TierCommand::Status { server, output } => {
            let client = MetaClient::connect(&server.servers)?;
            let status = runtime()?.block_on(client.tier_status())?;
            if output.json {
                println!("{status}");
            } else {
                print_tier_status(&status);
            }
            Ok(())
        }
    }
}

/// Polls the mover's queue until the packs of this move are done; a bar
/// counts the packs. Returns whether everything moved.
async fn wait_for_moves(client: &MetaClient, report: &Value, json: bool) -> anyhow::Result<bool> {
    use std::io::IsTerminal;
    let queued = report["queued"].as_u64().unwrap_or(0);
    let to = report["to"].as_str().unwrap_or("");
    let bar = if json || !std::io::stderr().is_terminal() {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(queued).with_style(
            ProgressStyle::with_template("moving to {msg}: {bar:30} {pos}/{len} packs ({elapsed})")
                .expect("valid template"),
        )
    };
    bar.set_message(to.to_string());
    let mut last = (u64::MAX, std::time::Instant::now());
    loop {
        let status = client.tier_status().await?;
        let pending = status["queue"]
            .as_array()
            .map(|q| q.iter().filter(|m| m["to"].as_str() == Some(to)).count() as u64)
            .unwrap_or(0);
        bar.set_position(queued.saturating_sub(pending));
        if pending == 0 {
            bar.finish_and_clear();
            return Ok(true);
        }
        if pending < last.0 {
            last = (pending, std::time::Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(300) {
            bar.finish_and_clear();
            eprintln!("warning: the mover made no progress for 5 minutes; the server log says why");
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn print_tier_status(s: &Value) {
    println!("object tier: {}", s["object_store"].as_str().unwrap_or("?"));
    let t = &s["totals"];
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    println!(
        "packs: {} on SSD ({}), {} in the object tier ({})",
        n(&t["ssd_packs"]),
        HumanBytes(n(&t["ssd_bytes"])),
        n(&t["object_packs"]),
        HumanBytes(n(&t["object_bytes"]))
    );
    println!(
        "{:<24} {:>8} {:>12} {:>12} {:>12}  pinned",
        "dataset", "versions", "ssd", "object", "moving"
    );
    for d in s["datasets"].as_array().into_iter().flatten() {
        let pinned: Vec<String> = d["pinned_to_object"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|v| format!("@{v}"))
            .collect();
        println!(
            "{:<24} {:>8} {:>12} {:>12} {:>12}  {}",
            d["dataset"].as_str().unwrap_or("?"),
            n(&d["versions"]),
            HumanBytes(n(&d["ssd_bytes"])).to_string(),
            HumanBytes(n(&d["object_bytes"])).to_string(),
            HumanBytes(n(&d["moving_bytes"])).to_string(),
            pinned.join(" ")
        );
    }
    let queue = s["queue"].as_array().map(Vec::len).unwrap_or(0);
    println!("mover queue: {queue} pack(s)");
    for p in s["policies"].as_array().into_iter().flatten() {
        println!(
            "policy: {} cold after {}",
            p["dataset"].as_str().unwrap_or("?"),
            humantime::format_duration(Duration::from_secs(n(&p["cold_after_secs"])))
        );
    }
}

fn print_gc(r: &Value) {
    let n = |k: &str| r[k].as_u64().unwrap_or(0);
    if r["dry_run"].as_bool() == Some(true) {
        println!(
            "dry run: {} live version(s); would delete {} tree(s), {} chunk(s) ({}) and {} pack(s) ({}); {} pack(s) to compact",
            n("live_versions"),
            n("dead_trees"),
            n("dead_chunks"),
            HumanBytes(n("dead_chunk_bytes")),
            n("dead_packs"),
            HumanBytes(n("dead_pack_bytes")),
            n("compaction_candidates"),
        );
        return;
    }
    println!(
        "{} live version(s); deleted {} tree(s), {} chunk(s) and {} pack(s), freeing {}",
        n("live_versions"),
        n("swept_trees"),
        n("swept_chunks"),
        n("deleted_packs"),
        HumanBytes(n("freed_bytes")),
    );
    let compacted = r["compacted"].as_array().cloned().unwrap_or_default();
    let (ok, failed): (Vec<_>, Vec<_>) = compacted.iter().partition(|c| c.get("error").is_none());
    if !ok.is_empty() {
        let before: u64 = ok.iter().map(|c| c["old_bytes"].as_u64().unwrap_or(0)).sum();
        let after: u64 = ok.iter().map(|c| c["new_bytes"].as_u64().unwrap_or(0)).sum();
        println!(
            "compacted {} pack(s): {} -> {}",
            ok.len(),
            HumanBytes(before),
            HumanBytes(after)
        );
    }
    for f in failed {
        println!(
            "compaction of pack {} failed: {}",
            f["old"],
            f["error"].as_str().unwrap_or("?")
        );
    }
}

fn print_scrub(r: &Value) {
    for node in r["nodes"].as_array().into_iter().flatten() {
        if let Some(e) = node["error"].as_str() {
            println!("node {}: scrub failed: {e}", node["node"]);
            continue;
        }
        println!(
            "node {}: {} pack(s), {} verified; damaged: {}; repaired: {}; failed: {}",
            node["node"],
            node["packs"],
            HumanBytes(node["bytes"].as_u64().unwrap_or(0)),
            node["bad"],
            node["repaired"],
            node["failed"],
        );
    }
    let o = &r["object"];
    println!(
        "object tier: {} pack(s), {} verified; damaged: {}; repaired: {}; failed: {}",
        o["packs"],
        HumanBytes(o["bytes"].as_u64().unwrap_or(0)),
        o["bad"],
        o["repaired"],
        o["failed"],
    );
    println!(
        "{}",
        if r["ok"].as_bool() == Some(true) {
            "scrub: OK"
        } else {
            "scrub: DAMAGE NOT REPAIRED"
        }
    );
}

fn opt(v: &Value) -> String {
    v.as_u64().map(|n| n.to_string()).unwrap_or_else(|| "-".into())
}

fn print_status(status: &Value) {
    let me = &status["node"];
    let voters: Vec<u64> = me["voters"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_u64)
        .collect();
    let learners: Vec<u64> = me["learners"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_u64)
        .collect();
    match me["leader"].as_u64() {
        Some(l) => println!(
            "cluster: leader node {l}, term {}, voters {voters:?}, learners {learners:?}",
            me["term"]
        ),
        None => println!(
            "cluster: NO LEADER (no quorum), term {}, voters {voters:?}",
            me["term"]
        ),
    }
    println!(
        "{:<5} {:<22} {:<8} {:<10} {:>9} {:>9} {:>9}  digest",
        "node", "addr", "role", "state", "last log", "applied", "snapshot"
    );
    for n in status["cluster"].as_array().into_iter().flatten() {
        let id = n["node_id"].as_u64().unwrap_or(0);
        let role = if voters.contains(&id) { "voter" } else { "learner" };
        let addr = n["addr"].as_str().unwrap_or("?");
        if let Some(err) = n["error"].as_str() {
            println!("{id:<5} {addr:<22} {role:<8} unreachable: {err}");
            continue;
        }
        let digest = n["digest"].as_str().unwrap_or("");
        println!(
            "{id:<5} {addr:<22} {role:<8} {:<10} {:>9} {:>9} {:>9}  {}",
            n["state"].as_str().unwrap_or("?"),
            opt(&n["last_log_index"]),
            opt(&n["applied_index"]),
            opt(&n["snapshot_index"]),
            &digest[..digest.len().min(12)]
        );
    }
}
