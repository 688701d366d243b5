//! `granary inspect`: local, server-less views of directories and pack files.

use std::path::Path;

use anyhow::{bail, Context};
use granary_core::ingest::{ingest_dir, DiscardSink, IngestOptions, NoProgress};
use granary_core::PackReader;
use serde_json::json;

/// Computes the root tree id of `dir` as an upload would.
pub fn tree(dir: &Path, threads: usize, json: bool) -> anyhow::Result<()> {
    let opts = IngestOptions {
        threads,
        ..IngestOptions::default()
    };
    let out = ingest_dir(dir, &opts, &DiscardSink, &NoProgress)?;
    let s = &out.stats;
    let skipped = super::report_skipped(&out.skipped);
    if json {
        println!(
            "{}",
            json!({
                "root": out.root.to_hex(),
                "files": s.files, "dirs": s.dirs, "symlinks": s.symlinks,
                "bytes": s.bytes, "chunks": s.chunks,
                "unique_chunks": s.unique_chunks, "unique_bytes": s.unique_bytes,
                "tree_objects": out.objects.len(),
                "skipped": skipped,
            })
        );
    } else {
        println!("root tree  {}", out.root);
        println!(
            "contents   {} files, {} directories, {} symlinks, {} bytes",
            s.files, s.dirs, s.symlinks, s.bytes
        );
        println!(
            "chunks     {} ({} distinct, {} bytes distinct)",
            s.chunks, s.unique_chunks, s.unique_bytes
        );
    }
    Ok(())
}

/// Lists and optionally verifies a sealed pack.
pub fn pack(file: &Path, verify: bool, json: bool) -> anyhow::Result<()> {
    let reader = PackReader::open(file)?;
    let raw: u64 = reader.entries().iter().map(|e| e.raw_len as u64).sum();
    let report = if verify {
        Some(
            reader
                .verify()
                .with_context(|| format!("verifying {}", file.display()))?,
        )
    } else {
        None
    };
    if json {
        let bad: Vec<_> = report
            .iter()
            .flat_map(|r| r.bad.iter())
            .map(|(e, err)| json!({"chunk": e.id.to_hex(), "offset": e.offset, "error": err.to_string()}))
            .collect();
        println!(
            "{}",
            json!({
                "pack_id": reader.pack_id(), "bytes": reader.len(), "chunks": reader.entries().len(),
                "raw_bytes": raw, "verified": report.is_some(), "bad": bad,
            })
        );
    } else {
        println!(
            "pack {}: {} chunks, {} bytes on disk, {} bytes raw",
            reader.pack_id(),
            reader.entries().len(),
            reader.len(),
            raw
        );
        if let Some(r) = &report {
            println!("verified   {} ok, {} damaged", r.ok, r.bad.len());
            for (e, err) in &r.bad {
                println!("damaged    chunk {} at offset {}: {err}", e.id, e.offset);
            }
        }
    }
    if let Some(r) = report {
        if !r.bad.is_empty() {
            bail!(
                "{} of {} frames in {} are damaged; restore the pack from a replica",
                r.bad.len(),
                reader.entries().len(),
                file.display()
            );
        }
    }
    Ok(())
}
