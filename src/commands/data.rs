//! `granary upload`, `download`, `ls`, `diff`: moving and viewing dataset contents.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use granary_client::diff::Change;
use granary_client::upload::UploadProgress;
use granary_client::version::Node;
use granary_client::{Client, UploadOptions};
use granary_core::{EntryKind, TreeEntry, VersionRef};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use super::runtime;
use crate::cli::{DiffArgs, DownloadArgs, LsArgs, UploadArgs};

/// Parses sizes like `64MiB`, `1GiB`, `512KiB`, `4096`.
pub fn parse_size(s: &str) -> anyhow::Result<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .with_context(|| format!("invalid size '{s}': expected e.g. 64MiB"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        other => anyhow::bail!("invalid size unit '{other}' in '{s}': use KiB, MiB, GiB or TiB"),
    };
    n.checked_mul(mult)
        .with_context(|| format!("size '{s}' is too large"))
}

/// Live upload counters shown on a progress bar.
struct Bar {
    bar: ProgressBar,
    scanned: AtomicU64,
    sent: AtomicU64,
    dedup: AtomicU64,
    files: AtomicU64,
    started: Instant,
}

impl Bar {
    fn refresh(&self) {
        let scanned = self.scanned.load(Ordering::Relaxed);
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        self.bar.set_position(scanned);
        self.bar.set_message(format!(
            "{} files, {:.0} MB/s, sent {}, already stored {}",
            self.files.load(Ordering::Relaxed),
            scanned as f64 / secs / 1e6,
            indicatif::HumanBytes(self.sent.load(Ordering::Relaxed)),
            indicatif::HumanBytes(self.dedup.load(Ordering::Relaxed)),
        ));
    }
}

impl UploadProgress for Bar {
    fn scanned(&self, bytes: u64) {
        self.scanned.fetch_add(bytes, Ordering::Relaxed);
        self.refresh();
    }
    fn file_done(&self) {
        self.files.fetch_add(1, Ordering::Relaxed);
    }
    fn sent(&self, bytes: u64) {
        self.sent.fetch_add(bytes, Ordering::Relaxed);
    }
    fn deduplicated(&self, bytes: u64) {
        self.dedup.fetch_add(bytes, Ordering::Relaxed);
    }
}

fn dir_size(dir: &std::path::Path) -> u64 {
    walkdir_size(dir).unwrap_or(0)
}

fn walkdir_size(dir: &std::path::Path) -> std::io::Result<u64> {
    let mut total = 0;
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let ft = e.file_type()?;
        if ft.is_dir() {
            total += walkdir_size(&e.path()).unwrap_or(0);
        } else if ft.is_file() {
            total += e.metadata()?.len();
        }
    }
    Ok(total)
}

pub fn upload(args: &UploadArgs) -> anyhow::Result<()> {
    let opts = UploadOptions {
        message: args.message.clone().unwrap_or_default(),
        force: args.force,
        threads: args.threads,
        pack_size: parse_size(&args.pack_size)?,
        use_file_cache: !args.rehash,
        ..UploadOptions::default()
    };
    let client = Client::connect(&args.server.servers)?;
    let show = !args.output.json && std::io::stderr().is_terminal();
    let bar = Arc::new(Bar {
        bar: if show {
            let b = ProgressBar::new(dir_size(&args.dir));
            b.set_style(
                ProgressStyle::with_template("{spinner} {bytes}/{total_bytes} [{wide_bar}] {msg}")
                    .expect("valid template"),
            );
            b.enable_steady_tick(Duration::from_millis(200));
            b
        } else {
            ProgressBar::hidden()
        },
        scanned: AtomicU64::new(0),
        sent: AtomicU64::new(0),
        dedup: AtomicU64::new(0),
        files: AtomicU64::new(0),
        started: Instant::now(),
    });
    let started = Instant::now();
    let result = runtime()?.block_on(client.upload_dir(&args.dir, &args.dataset, &opts, bar.clone()));
    bar.bar.finish_and_clear();
    let r = result?;
    let secs = started.elapsed().as_secs_f64();
    let skipped = super::report_skipped(&r.skipped);
    let name = format!("{}@{}", r.version.dataset, r.version.number);
    if args.output.json {
        println!(
            "{}",
            json!({
                "version": name, "dataset": r.version.dataset, "number": r.version.number,
                "files": r.stats.files, "dirs": r.stats.dirs, "symlinks": r.stats.symlinks,
                "bytes": r.stats.bytes, "chunks": r.stats.chunks, "unique_chunks": r.stats.unique_chunks,
                "new_chunks": r.new_chunks, "new_bytes": r.new_bytes, "sent_bytes": r.sent_bytes,
                "local_write_bytes": r.local_bytes, "packs": r.packs, "seconds": secs, "cached_files": r.stats.cached_files,
                "dedup_ratio": if r.new_bytes == 0 { serde_json::Value::Null } else { json!(r.dedup_ratio()) },
                "skipped": skipped,
            })
        );
    } else {
        println!("{name}");
        println!(
            "  {} files, {} dirs, {} symlinks, {} in {} chunks",
            r.stats.files,
            r.stats.dirs,
            r.stats.symlinks,
            indicatif::HumanBytes(r.stats.bytes),
            r.stats.chunks
        );
        println!(
            "  new: {} in {} chunks ({} sent after compression), {:.1}s, {:.0} MB/s",
            indicatif::HumanBytes(r.new_bytes),
            r.new_chunks,
            indicatif::HumanBytes(r.sent_bytes),
            secs,
            r.stats.bytes as f64 / secs.max(0.001) / 1e6
        );
    }
    Ok(())
}

pub fn download(args: &DownloadArgs) -> anyhow::Result<()> {
    let r = VersionRef::parse(&args.version)?;
    let client = Client::connect(&args.server.servers)?;
    let started = Instant::now();
    let (version, report) = runtime()?.block_on(async {
        let reader = client.open_version(&r.dataset, r.number).await?;
        let report = granary_client::download::download(&reader, &args.dir, Arc::new(|_| {})).await?;
        Ok::<_, granary_client::ClientError>((reader.version().number, report))
    })?;
    let secs = started.elapsed().as_secs_f64();
    if args.output.json {
        println!(
            "{}",
            json!({"version": format!("{}@{version}", r.dataset), "dir": args.dir, "files": report.files,
                   "dirs": report.dirs, "symlinks": report.symlinks, "bytes": report.bytes,
                   "local_bytes": report.local_bytes, "object_read_bytes": report.object_read_bytes,
                   "seconds": secs})
        );
    } else {
        println!(
            "{}@{version} -> {}: {} files, {} dirs, {} symlinks, {} in {secs:.1}s",
            r.dataset,
            args.dir.display(),
            report.files,
            report.dirs,
            report.symlinks,
            indicatif::HumanBytes(report.bytes)
        );
    }
    Ok(())
}

fn kind_name(k: EntryKind) -> &'static str {
    match k {
        EntryKind::File => "file",
        EntryKind::Dir => "dir",
        EntryKind::Symlink => "symlink",
    }
}

fn entry_json(e: &TreeEntry) -> serde_json::Value {
    let mut v = json!({
        "name": String::from_utf8_lossy(&e.name), "kind": kind_name(e.kind()), "mode": format!("{:o}", e.mode),
        "size": e.size(), "mtime": e.mtime.secs, "mtime_nanos": e.mtime.nanos,
    });
    if let granary_core::tree::EntryData::Symlink { target } = &e.data {
        v["target"] = json!(String::from_utf8_lossy(target));
    }
    v
}

fn entry_line(e: &TreeEntry, long: bool) -> String {
    let mut name = String::from_utf8_lossy(&e.name).into_owned();
    match &e.data {
        granary_core::tree::EntryData::Dir { .. } => name.push('/'),
        granary_core::tree::EntryData::Symlink { target } if long => {
            name = format!("{name} -> {}", String::from_utf8_lossy(target))
        }
        _ => {}
    }
    if long {
        let kind = match e.kind() {
            EntryKind::File => '-',
            EntryKind::Dir => 'd',
            EntryKind::Symlink => 'l',
        };
        format!(
            "{kind}{:04o} {:>14} {:>12} {name}",
            e.mode,
            e.size(),
            e.mtime.secs
        )
    } else {
        name
    }
}

pub fn ls(args: &LsArgs) -> anyhow::Result<()> {
    let (r, path) = VersionRef::parse_with_path(&args.target)?;
    let client = Client::connect(&args.server.servers)?;
    let entries: Vec<TreeEntry> = runtime()?.block_on(async {
        let reader = client.open_version(&r.dataset, r.number).await?;
        match reader.stat(&path).await? {
            Node::Entry(e) if e.kind() != EntryKind::Dir => Ok(vec![e]),
            _ => Ok::<_, granary_client::ClientError>(reader.read_dir(&path).await?.entries().to_vec()),
        }
    })?;
    if args.output.json {
        println!(
            "{}",
            serde_json::Value::Array(entries.iter().map(entry_json).collect())
        );
    } else {
        for e in &entries {
            println!("{}", entry_line(e, args.long));
        }
    }
    Ok(())
}

pub fn diff(args: &DiffArgs) -> anyhow::Result<()> {
    let a = VersionRef::parse(&args.from)?;
    let b = VersionRef::parse(&args.to)?;
    let client = Client::connect(&args.server.servers)?;
    let changes = runtime()?.block_on(client.diff(&a.dataset, a.number, &b.dataset, b.number))?;
    if args.output.json {
        let v: Vec<_> = changes
            .iter()
            .map(|c| {
                let (change, kind) = match c {
                    Change::Added { kind, .. } => ("added", kind),
                    Change::Removed { kind, .. } => ("removed", kind),
                    Change::Modified { kind, .. } => ("modified", kind),
                };
                json!({"change": change, "path": c.path(), "kind": kind_name(*kind)})
            })
            .collect();
        println!("{}", serde_json::Value::Array(v));
    } else {
        for c in &changes {
            let sign = match c {
                Change::Added { .. } => '+',
                Change::Removed { .. } => '-',
                Change::Modified { .. } => 'M',
            };
            println!("{sign} {}", c.path());
        }
        if changes.is_empty() {
            println!("no differences");
        }
    }
    Ok(())
}
