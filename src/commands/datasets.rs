//! `granary datasets`, `granary log`, `granary rm`: dataset and version metadata.

use granary_client::MetaClient;
use granary_core::{TreeId, VersionRef};
use serde_json::json;

use super::runtime;
use crate::cli::{DatasetArg, OutputArgs, ServerAddrArgs};

fn time(ms: u64) -> String {
    let secs = (ms / 1000) as i64;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since the epoch (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

pub fn list(server: &ServerAddrArgs, output: &OutputArgs) -> anyhow::Result<()> {
    let client = MetaClient::connect(&server.servers)?;
    let datasets = runtime()?.block_on(client.list_datasets())?;
    if output.json {
        let v: Vec<_> = datasets
            .iter()
            .map(|d| json!({"name": d.name, "versions": d.versions, "latest": (d.latest > 0).then_some(d.latest), "created_ms": d.created_ms}))
            .collect();
        println!("{}", serde_json::Value::Array(v));
    } else if datasets.is_empty() {
        println!("no datasets yet; `granary upload DIR NAME` creates one");
    } else {
        println!("{:<32} {:>8} {:>7}  created", "dataset", "versions", "latest");
        for d in datasets {
            let latest = if d.latest > 0 {
                d.latest.to_string()
            } else {
                "-".into()
            };
            println!(
                "{:<32} {:>8} {:>7}  {}",
                d.name,
                d.versions,
                latest,
                time(d.created_ms)
            );
        }
    }
    Ok(())
}

pub fn log(args: &DatasetArg) -> anyhow::Result<()> {
    let r = VersionRef::parse(&args.target)?;
    let client = MetaClient::connect(&args.server.servers)?;
    let mut versions = runtime()?.block_on(client.list_versions(&r.dataset))?;
    // `log DATASET@N` shows that one version.
    if let Some(n) = r.number {
        versions.retain(|v| v.number == n);
        if versions.is_empty() {
            anyhow::bail!(
                "version {}@{n} not found; `granary log {}` lists its versions",
                r.dataset,
                r.dataset
            );
        }
    }
    if args.output.json {
        let v: Vec<_> = versions
            .iter()
            .map(|v| {
                let s = v.stats.unwrap_or_default();
                json!({
                    "version": format!("{}@{}", v.dataset, v.number), "number": v.number, "parent": v.parent,
                    "root": TreeId::from_slice(&v.root).map(|t| t.to_hex()), "message": v.message,
                    "created_ms": v.created_ms, "files": s.files, "bytes": s.bytes, "new_bytes": s.new_bytes,
                })
            })
            .collect();
        println!("{}", serde_json::Value::Array(v));
    } else {
        for v in versions.iter().rev() {
            let s = v.stats.unwrap_or_default();
            println!(
                "{}@{}  {}  {} files, {} bytes  {}",
                v.dataset,
                v.number,
                time(v.created_ms),
                s.files,
                s.bytes,
                v.message
            );
        }
    }
    Ok(())
}

pub fn rm(args: &DatasetArg) -> anyhow::Result<()> {
    let r = VersionRef::parse(&args.target)?;
    let Some(n) = r.number else {
        anyhow::bail!(
            "say which version to delete: {}@N (`granary log {}` lists them)",
            r.dataset,
            r.dataset
        );
    };
    let client = MetaClient::connect(&args.server.servers)?;
    runtime()?.block_on(client.delete_version(&r.dataset, n))?;
    if args.output.json {
        println!("{}", json!({"deleted": r.to_string()}));
    } else {
        println!("deleted {r}; its data is reclaimed by the next `granary admin gc`");
    }
    Ok(())
}
