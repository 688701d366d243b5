//! `granary admin`: cluster status and membership.

use granary_client::MetaClient;
use serde_json::Value;

use super::runtime;
use crate::cli::AdminCommand;

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
    }
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
