//! `granary bench upload`: Granary's upload against `restic backup` of the
//! same data, in one run: a fresh upload, an incremental one (v2: 1% of the
//! files modified in the middle, 1% added), stored-bytes growth for v2 and the
//! peak RSS of server and client. Granary runs as real processes: an embedded
//! `granary server` and the `granary upload` CLI.
//!
//! Every timed run starts from the same state: dirty pages written back and
//! the kernel's caches dropped (as root), so each tool reads the data from
//! disk and neither pays for writing back what generating the data (or the
//! tool before it) left dirty.

use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context};
use serde_json::{json, Value};

use super::datagen::{random_bytes, TextGen};
use super::mount::drop_caches;
use super::{ensure_tool, start_server, vm_hwm, work_dir, Package};

#[derive(Debug, clap::Args)]
pub struct BenchUploadArgs {
    /// Where to put the data, the server and the restic repository (default: a temporary directory).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Incompressible files of --file-kib each.
    #[arg(long, default_value_t = 4000)]
    pub files: usize,
    /// Size of each incompressible file, in KiB.
    #[arg(long, default_value_t = 256)]
    pub file_kib: usize,
    /// MiB of text-like data, in 1 MiB files.
    #[arg(long, default_value_t = 256)]
    pub text_mib: usize,
    /// Print machine-readable JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// A finished child: wall time, peak RSS (from wait4) and its stdout.
struct Run {
    secs: f64,
    max_rss: u64,
    stdout: String,
}

fn run_measured(cmd: &mut Command) -> anyhow::Result<Run> {
    let started = Instant::now();
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    let pid = child.id() as libc::pid_t;
    let mut stdout = child.stdout.expect("piped");
    let mut stderr = child.stderr.expect("piped");
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut s).ok();
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut stderr, &mut s).ok();
        s
    });
    let mut status = 0;
    // SAFETY: rusage is plain data; wait4 fills it for our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let secs = started.elapsed().as_secs_f64();
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    if r < 0 || !std::process::ExitStatus::from_raw(status).success() {
        bail!("{cmd:?} failed: {}", stderr.trim());
    }
    Ok(Run {
        secs,
        max_rss: usage.ru_maxrss as u64 * 1024,
        stdout,
    })
}

fn du(path: &Path) -> u64 {
    let mut total = 0;
    if let Ok(rd) = std::fs::read_dir(path) {
        for e in rd.flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => total += du(&e.path()),
                Ok(t) if t.is_file() => total += e.metadata().map(|m| m.len()).unwrap_or(0),
                _ => {}
            }
        }
    }
    total
}

/// Sets a file's mtime an hour back, like a dataset that is not being written.
fn age(path: &Path) -> anyhow::Result<()> {
    let f = std::fs::File::options().write(true).open(path)?;
    f.set_modified(SystemTime::now() - Duration::from_secs(3600))?;
    Ok(())
}

fn generate(data: &Path, args: &BenchUploadArgs) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let size = args.file_kib << 10;
    let mut buf = vec![0u8; size];
    for i in 0..args.files {
        let dir = data.join(format!("shard{:02}", i % 40));
        std::fs::create_dir_all(&dir)?;
        random_bytes(i as u64, &mut buf);
        let p = dir.join(format!("sample{i:05}.bin"));
        std::fs::write(&p, &buf)?;
        files.push(p);
    }
    let text_dir = data.join("text");
    std::fs::create_dir_all(&text_dir)?;
    let mut text = TextGen::new(11);
    for i in 0..args.text_mib {
        let mut t = Vec::with_capacity(1 << 20);
        text.fill(&mut t, 1 << 20);
        let p = text_dir.join(format!("log{i:04}.txt"));
        std::fs::write(&p, &t)?;
        files.push(p);
    }
    for f in &files {
        age(f)?;
    }
    Ok(files)
}

/// v2: 1% of the files get 4 KiB overwritten in the middle, 1% new files appear.
fn modify(data: &Path, files: &[PathBuf], file_kib: usize) -> anyhow::Result<()> {
    let step = 100;
    for (k, f) in files.iter().enumerate().filter(|(i, _)| i % step == 7) {
        let len = std::fs::metadata(f)?.len();
        let mut patch = vec![0u8; 4096];
        random_bytes(1_000_000 + k as u64, &mut patch);
        use std::os::unix::fs::FileExt;
        let file = std::fs::File::options().write(true).open(f)?;
        file.write_all_at(&patch, len / 2)?;
    }
    let added = data.join("added");
    std::fs::create_dir_all(&added)?;
    let mut buf = vec![0u8; file_kib << 10];
    for i in 0..files.len() / step {
        random_bytes(2_000_000 + i as u64, &mut buf);
        std::fs::write(added.join(format!("new{i:04}.bin")), &buf)?;
    }
    Ok(())
}

/// Seconds to write `bytes` to new files under `dir` the way a chunk server
/// stores packs: 64 MiB files, two written at a time, each fdatasync'd before
/// it counts. Every pack of an upload is fsynced before it is acknowledged,
/// so this is the most a fresh upload of incompressible data can reach here.
fn durable_write_secs(dir: &Path, bytes: u64) -> anyhow::Result<f64> {
    const FILE: u64 = 64 << 20;
    std::fs::create_dir_all(dir)?;
    let block = vec![0x5au8; 1 << 20];
    let files = bytes.div_ceil(FILE);
    let next = std::sync::atomic::AtomicU64::new(0);
    let started = Instant::now();
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..2)
            .map(|_| {
                s.spawn(|| -> std::io::Result<()> {
                    loop {
                        let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if n >= files {
                            return Ok(());
                        }
                        let len = FILE.min(bytes - n * FILE);
                        let mut f = std::fs::File::create(dir.join(format!("{n}.pack")))?;
                        let mut left = len as usize;
                        while left > 0 {
                            let k = left.min(block.len());
                            f.write_all(&block[..k])?;
                            left -= k;
                        }
                        f.sync_data()?;
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .try_for_each(|w| w.join().expect("writer thread"))
    })
    .with_context(|| format!("writing {}", dir.display()))?;
    let secs = started.elapsed().as_secs_f64();
    std::fs::remove_dir_all(dir)?;
    Ok(secs)
}

pub fn run(args: &BenchUploadArgs) -> anyhow::Result<()> {
    ensure_tool("restic", Package::Apt("restic"))?;
    let exe = std::env::current_exe()?;
    let (_tmp, root) = work_dir(&args.dir, "granary-bench-upload-")?;
    let data = root.join("data");
    eprintln!(
        "generating {} x {} KiB + {} MiB text in {}",
        args.files,
        args.file_kib,
        args.text_mib,
        data.display()
    );
    let files = generate(&data, args)?;
    let total = du(&data);

    let (server, addr) = start_server(&exe, &root)?;
    // Files changed less than 2 s before an upload are not trusted to the file cache.
    std::thread::sleep(Duration::from_secs(3));

    let cache = root.join("cache");
    let upload = |label: &str| -> anyhow::Result<(Run, Value)> {
        eprintln!("granary upload ({label})");
        drop_caches()?;
        let run = run_measured(
            Command::new(&exe)
                .args(["upload", "--json", "--server", &addr])
                .arg(&data)
                .arg("bench")
                .env("GRANARY_CACHE_DIR", &cache)
                .env("RUST_LOG", "warn"),
        )?;
        let v: Value = serde_json::from_str(run.stdout.trim()).context("parsing upload --json")?;
        Ok((run, v))
    };
    let repo = root.join("restic");
    let restic = |extra: &[&str]| -> anyhow::Result<Run> {
        drop_caches()?;
        run_measured(
            Command::new("restic")
                .arg("-r")
                .arg(&repo)
                .args(extra)
                .env("RESTIC_PASSWORD", "granary-bench")
                .env("RESTIC_CACHE_DIR", root.join("restic-cache")),
        )
    };
    let packs = root.join("server/packs");

    let (g1, g1v) = upload("fresh")?;
    let g_stored1 = du(&packs);
    restic(&["init", "-q"])?;
    eprintln!("restic backup (fresh)");
    let r1 = restic(&["backup", "-q", "--json", data.to_str().context("utf-8 path")?])?;
    let r_stored1 = du(&repo);
    let snapshot = r1
        .stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find_map(|v| v["snapshot_id"].as_str().map(String::from))
        .context("restic printed no snapshot id")?;

    eprintln!("durable write ceiling of this disk");
    let ceiling_secs = durable_write_secs(&root.join("ceiling"), g_stored1)?;

    modify(&data, &files, args.file_kib)?;
    std::thread::sleep(Duration::from_secs(3));
    let total2 = du(&data);
    let (g2, g2v) = upload("v2")?;
    let g_stored2 = du(&packs);
    eprintln!("restic backup (v2, --parent)");
    let r2 = restic(&[
        "backup",
        "-q",
        "--parent",
        &snapshot,
        data.to_str().context("utf-8 path")?,
    ])?;
    let r_stored2 = du(&repo);
    let server_rss = vm_hwm(server.0.id());
    drop(server);

    let mbps = |bytes: u64, secs: f64| bytes as f64 / secs / 1e6;
    let growth = |a: u64, b: u64| (b as f64 - a as f64) / a as f64 * 100.0;
    let rows = json!({
        "dataset_bytes": total, "v2_bytes": total2,
        "fresh": {"granary_mbps": mbps(total, g1.secs), "restic_mbps": mbps(total, r1.secs),
                  "ratio": r1.secs / g1.secs, "target": 3.0,
                  "granary_sent_bytes": g1v["sent_bytes"], "granary_local_write_bytes": g1v["local_write_bytes"]},
        "v2": {"granary_mbps": mbps(total2, g2.secs), "restic_mbps": mbps(total2, r2.secs),
               "ratio": r2.secs / g2.secs, "target": 1.5,
               "granary_new_bytes": g2v["new_bytes"], "granary_cached_files": g2v["cached_files"]},
        "durable_ceiling": {"stored_mbps": mbps(g_stored1, ceiling_secs),
                            "input_mbps": mbps(total, ceiling_secs),
                            "ratio_to_restic": r1.secs / ceiling_secs,
                            "granary_share": ceiling_secs / g1.secs},
        "v2_growth_percent": {"granary": growth(g_stored1, g_stored2), "restic": growth(r_stored1, r_stored2)},
        "peak_rss_bytes": {"server": server_rss, "client_fresh": g1.max_rss, "client_v2": g2.max_rss,
                           "restic_fresh": r1.max_rss, "target": 512u64 << 20},
        "stored_bytes": {"granary_v1": g_stored1, "granary_v2": g_stored2, "restic_v1": r_stored1, "restic_v2": r_stored2},
    });
    if args.json {
        println!("{rows}");
        return Ok(());
    }
    let mut out = std::io::stdout().lock();
    let ok = |b: bool| if b { "ok" } else { "BELOW TARGET" };
    let f = &rows["fresh"];
    let v = &rows["v2"];
    let gr = &rows["v2_growth_percent"];
    writeln!(
        out,
        "granary bench upload: {:.0} MiB in {} files",
        total as f64 / 1048576.0,
        files.len()
    )?;
    writeln!(
        out,
        "{:<28} {:>12} {:>12} {:>8}  target",
        "", "granary", "restic", "ratio"
    )?;
    writeln!(
        out,
        "{:<28} {:>9.0} MB/s {:>7.0} MB/s {:>7.2}x  >= 3x: {}",
        "fresh upload",
        f["granary_mbps"].as_f64().unwrap_or(0.0),
        f["restic_mbps"].as_f64().unwrap_or(0.0),
        f["ratio"].as_f64().unwrap_or(0.0),
        ok(f["ratio"].as_f64().unwrap_or(0.0) >= 3.0)
    )?;
    let local = f["granary_local_write_bytes"].as_u64().unwrap_or(0);
    let sent = f["granary_sent_bytes"].as_u64().unwrap_or(0);
    writeln!(
        out,
        "  packs written locally       {:>8.0}%  (of {:.0} MiB sent; GRANARY_LOCAL_WRITES=0 streams them)",
        local as f64 * 100.0 / sent.max(1) as f64,
        sent as f64 / 1048576.0
    )?;
    writeln!(
        out,
        "{:<28} {:>9.0} MB/s {:>7.0} MB/s {:>7.2}x  >= 1.5x: {}",
        "v2 (1% modified, 1% added)",
        v["granary_mbps"].as_f64().unwrap_or(0.0),
        v["restic_mbps"].as_f64().unwrap_or(0.0),
        v["ratio"].as_f64().unwrap_or(0.0),
        ok(v["ratio"].as_f64().unwrap_or(0.0) >= 1.5)
    )?;
    let c = &rows["durable_ceiling"];
    writeln!(
        out,
        "{:<28} {:>9.0} MB/s {:>12} {:>7.2}x  (fsync'd 64 MiB files, 2 at a time, {:.0} MB/s of stored bytes; granary reached {:.0}% of it)",
        "  disk's durable ceiling",
        c["input_mbps"].as_f64().unwrap_or(0.0),
        "",
        c["ratio_to_restic"].as_f64().unwrap_or(0.0),
        c["stored_mbps"].as_f64().unwrap_or(0.0),
        c["granary_share"].as_f64().unwrap_or(0.0) * 100.0,
    )?;
    let (ggr, rgr) = (
        gr["granary"].as_f64().unwrap_or(0.0),
        gr["restic"].as_f64().unwrap_or(0.0),
    );
    writeln!(
        out,
        "{:<28} {:>11.2}% {:>11.2}% {:>8}  <= restic: {}",
        "v2 stored-bytes growth",
        ggr,
        rgr,
        "",
        ok(ggr <= rgr)
    )?;
    let mib = |b: u64| b as f64 / 1048576.0;
    writeln!(
        out,
        "{:<28} server {:.0} MiB, client {:.0} MiB (v2 {:.0} MiB), restic {:.0} MiB  <= 512 MiB: {}",
        "peak RSS",
        mib(server_rss),
        mib(g1.max_rss),
        mib(g2.max_rss),
        mib(r1.max_rss),
        ok(server_rss <= 512 << 20 && g1.max_rss <= 512 << 20 && g2.max_rss <= 512 << 20)
    )?;
    Ok(())
}
