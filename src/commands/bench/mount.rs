//! `granary bench mount`: reading through `granary mount` against reading a
//! plain local copy of the same files the same way, and against
//! `rclone mount --vfs-cache-mode full` of that local copy (rclone's local
//! backend), in one run. Granary runs as real processes: an embedded
//! `granary server`, the `granary upload` CLI and `granary mount`.
//!
//! Cases: (a) sequential read of every big file, cold (kernel page cache
//! dropped, fresh mount caches); (b) the same with granary's disk cache warm,
//! on a fresh mount (the mount reads the embedded server's packs from their
//! files on this host and does not copy them into its disk cache, so the
//! cache is warmed with `granary prefetch` after (a)); (c) a second read
//! with the kernel page cache warm; (d) a random subset of the big files in random order, disk caches warm,
//! kernel cache dropped; (e) every small file, cold, as files/s, and (e') the
//! same on a fresh mount with the disk caches warm. Plus the mount process's
//! peak RSS (VmHWM). The local copy is the generated data directory itself,
//! read the same way; its cold figure is the baseline of (a) and (b), its
//! small-file figure that of (e) and (e'). Dropping the page cache needs root.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::json;

use super::datagen::random_bytes;
use super::{ensure_tool, start_server, vm_hwm, work_dir, Package};
use crate::commands::data::parse_size;

#[derive(Debug, clap::Args)]
pub struct BenchMountArgs {
    /// Where to put the data, the server, the caches and the mountpoints (default: a temporary
    /// directory). Its `data`, `server` and `*-cache` subdirectories are deleted first, so every
    /// run starts cold.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Big incompressible files of --file-kib each.
    #[arg(long, default_value_t = 4000)]
    pub files: usize,
    /// Size of each big file, in KiB.
    #[arg(long, default_value_t = 256)]
    pub file_kib: usize,
    /// Big files read in random order in case (d).
    #[arg(long, default_value_t = 2000)]
    pub random_files: usize,
    /// Small incompressible files of --small-kib each.
    #[arg(long, default_value_t = 2000)]
    pub small_files: usize,
    /// Size of each small file, in KiB.
    #[arg(long, default_value_t = 4)]
    pub small_kib: usize,
    /// Reader threads (each reads whole files with std::fs::read from a shared list).
    #[arg(long, default_value_t = 4)]
    pub threads: usize,
    /// `--mem-cache` of the granary mounts.
    #[arg(long, default_value = "1GiB")]
    pub mem_cache: String,
    /// `--cache-size` of the granary mounts (0: no disk cache; then (b), (d) and (e') are not warm).
    #[arg(long, default_value = "10GiB")]
    pub cache_size: String,
    /// Skip the rclone side (by default rclone is installed from Debian's package when missing).
    #[arg(long)]
    pub no_rclone: bool,
    /// Print machine-readable JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

fn is_mounted(path: &Path) -> bool {
    let want = path.to_string_lossy();
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|info| info.lines().any(|l| l.split(' ').nth(4) == Some(&*want)))
        .unwrap_or(false)
}

/// Last-resort unmount of `path`: fusermount3 -u -z, then umount -l.
fn force_unmount(path: &Path) {
    if is_mounted(path) {
        let _ = Command::new("fusermount3")
            .arg("-u")
            .arg("-z")
            .arg(path)
            .stderr(Stdio::null())
            .status();
    }
    if is_mounted(path) {
        let _ = Command::new("umount").arg("-l").arg(path).status();
    }
}

/// A `granary mount`; unmounted (waiting for the process to exit) on drop.
pub(super) struct GranaryMount {
    exe: PathBuf,
    path: PathBuf,
    cache: PathBuf,
    pid: u32,
}

impl GranaryMount {
    fn new(exe: &Path, addr: &str, path: &Path, cache: &Path, args: &BenchMountArgs) -> anyhow::Result<Self> {
        Self::open(exe, addr, "bench", path, cache, &args.mem_cache, &args.cache_size)
    }

    /// `granary mount DATASET PATH --cache-dir CACHE --mem-cache M --cache-size C`.
    pub(super) fn open(
        exe: &Path,
        addr: &str,
        dataset: &str,
        path: &Path,
        cache: &Path,
        mem_cache: &str,
        cache_size: &str,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(path)?;
        let out = Command::new(exe)
            .args(["mount", dataset])
            .arg(path)
            .args(["--server", addr, "--mem-cache", mem_cache])
            .args(["--cache-size", cache_size, "--cache-dir"])
            .arg(cache)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .output()
            .context("running granary mount")?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            force_unmount(path);
            bail!("granary mount failed: {}", stderr.trim());
        }
        // "mounted bench at DIR (process PID; log ...)"
        let pid = stderr
            .split("(process ")
            .nth(1)
            .and_then(|s| s.split(';').next())
            .and_then(|s| s.trim().parse::<u32>().ok());
        let m = Self {
            exe: exe.to_path_buf(),
            path: path.to_path_buf(),
            cache: cache.to_path_buf(),
            pid: pid.unwrap_or(0),
        };
        if pid.is_none() {
            bail!("cannot find the mount process id in: {}", stderr.trim());
        }
        Ok(m)
    }

    /// The mount process's peak resident set (VmHWM), in bytes.
    fn peak_rss(&self) -> u64 {
        vm_hwm(self.pid)
    }
}

impl Drop for GranaryMount {
    fn drop(&mut self) {
        let _ = Command::new(&self.exe)
            .arg("umount")
            .arg(&self.path)
            .arg("--cache-dir")
            .arg(&self.cache)
            .stderr(Stdio::null())
            .status();
        force_unmount(&self.path);
    }
}

/// `rclone mount SRC DIR --vfs-cache-mode full` as a child; unmounted and killed on drop.
pub(super) struct RcloneMount {
    path: PathBuf,
    child: Option<Child>,
}

impl RcloneMount {
    pub(super) fn new(src: &Path, path: &Path, cache: &Path, log: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(path)?;
        let log = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
        let child = Command::new("rclone")
            .arg("mount")
            .arg(src)
            .arg(path)
            .args(["--vfs-cache-mode", "full", "--read-only", "--cache-dir"])
            .arg(cache)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting rclone mount")?;
        let mut m = Self {
            path: path.to_path_buf(),
            child: Some(child),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !is_mounted(path) {
            if let Some(Ok(Some(status))) = m.child.as_mut().map(|c| c.try_wait()) {
                m.child = None;
                bail!("rclone mount exited ({status}) before mounting");
            }
            if Instant::now() > deadline {
                bail!("rclone mount did not appear at {} within 30 s", path.display());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(m)
    }
}

impl Drop for RcloneMount {
    fn drop(&mut self) {
        let _ = Command::new("fusermount3")
            .arg("-u")
            .arg(&self.path)
            .stderr(Stdio::null())
            .status();
        if let Some(mut c) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(c.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        force_unmount(&self.path);
    }
}

/// Writes back dirty pages and drops the kernel's page, dentry and inode caches.
pub(super) fn drop_caches() -> anyhow::Result<()> {
    // SAFETY: sync(2) has no preconditions.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", "3")
        .context("cannot drop the kernel page cache (/proc/sys/vm/drop_caches); run as root")
}

/// Reads every file in `files` with `threads` threads; returns (seconds, bytes).
pub(super) fn read_files(files: &[PathBuf], threads: usize) -> anyhow::Result<(f64, u64)> {
    let next = AtomicUsize::new(0);
    let started = Instant::now();
    let bytes = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads.max(1))
            .map(|_| {
                s.spawn(|| -> anyhow::Result<u64> {
                    let mut total = 0;
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(p) = files.get(i) else {
                            return Ok(total);
                        };
                        total += std::fs::read(p)
                            .with_context(|| format!("reading {}", p.display()))?
                            .len() as u64;
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("reader thread"))
            .sum::<anyhow::Result<u64>>()
    })?;
    Ok((started.elapsed().as_secs_f64(), bytes))
}

/// Reads `files` (see [`read_files`]) and checks that every byte arrived.
fn read_checked(files: &[PathBuf], size: usize, threads: usize) -> anyhow::Result<(f64, u64)> {
    let (secs, bytes) = read_files(files, threads)?;
    if bytes != (files.len() * size) as u64 {
        bail!("read {bytes} bytes of {} files of {size} bytes", files.len());
    }
    Ok((secs, bytes))
}

/// The same relative paths under another root.
fn rebase(files: &[PathBuf], from: &Path, to: &Path) -> Vec<PathBuf> {
    files
        .iter()
        .map(|p| to.join(p.strip_prefix(from).expect("file under the data directory")))
        .collect()
}

/// Big files in `big/dNN/`, small files in `small/dNN/` (file i in `d{i % 40}`),
/// each list in path order.
fn generate(data: &Path, args: &BenchMountArgs) -> anyhow::Result<(Vec<PathBuf>, Vec<PathBuf>)> {
    let make = |kind: &str, count: usize, kib: usize, seed: u64| -> anyhow::Result<Vec<PathBuf>> {
        let mut buf = vec![0u8; kib << 10];
        let mut out = Vec::with_capacity(count);
        for i in 0..count {
            let dir = data.join(kind).join(format!("d{:02}", i % 40));
            std::fs::create_dir_all(&dir)?;
            random_bytes(seed + i as u64, &mut buf);
            let p = dir.join(format!("{kind}{i:05}.bin"));
            std::fs::write(&p, &buf).with_context(|| format!("writing {}", p.display()))?;
            out.push(p);
        }
        Ok(out)
    };
    let mut big = make("big", args.files, args.file_kib, 0)?;
    let mut small = make("small", args.small_files, args.small_kib, 10_000_000)?;
    // Read in path order, like `cp -r` or a loader walking a sorted file
    // list (as `bench tier` does); every system reads the same order.
    big.sort();
    small.sort();
    Ok((big, small))
}

/// One measured read: MB/s for byte cases, files/s for the small-file case.
fn rate(secs: f64, bytes: u64, files: usize, per_file: bool) -> f64 {
    if per_file {
        files as f64 / secs
    } else {
        bytes as f64 / secs / 1e6
    }
}

pub fn run(args: &BenchMountArgs) -> anyhow::Result<()> {
    drop_caches()?;
    let use_rclone = !args.no_rclone;
    if use_rclone {
        ensure_tool("rclone", Package::Apt("rclone"))?;
    }
    let mem_cap = parse_size(&args.mem_cache)?;
    parse_size(&args.cache_size)?;
    let exe = std::env::current_exe()?;
    let (_tmp, root) = work_dir(&args.dir, "granary-bench-mount-")?;
    std::fs::create_dir_all(&root)?;
    let root = std::fs::canonicalize(&root)?;
    for sub in ["data", "server", "upload-cache", "granary-cache", "rclone-cache"] {
        let p = root.join(sub);
        if p.exists() {
            std::fs::remove_dir_all(&p)
                .with_context(|| format!("removing {} of an earlier run", p.display()))?;
        }
    }
    let data = root.join("data");
    eprintln!(
        "generating {} x {} KiB + {} x {} KiB in {}",
        args.files,
        args.file_kib,
        args.small_files,
        args.small_kib,
        data.display()
    );
    let (big, small) = generate(&data, args)?;
    let mut random = big.clone();
    fastrand::Rng::with_seed(42).shuffle(&mut random);
    random.truncate(args.random_files.min(big.len()));

    let (_server, addr) = start_server(&exe, &root)?;
    eprintln!("granary upload");
    let up = Command::new(&exe)
        .args(["upload", "--json", "--server", &addr])
        .arg(&data)
        .arg("bench")
        .env("GRANARY_CACHE_DIR", root.join("upload-cache"))
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()?;
    if !up.status.success() {
        bail!(
            "granary upload failed: {}",
            String::from_utf8_lossy(&up.stderr).trim()
        );
    }

    let t = args.threads;
    let (bsz, ssz) = (args.file_kib << 10, args.small_kib << 10);
    let mut results: Vec<(&str, &str, f64)> = Vec::new();
    let mut record = |case: &'static str, who: &'static str, r: f64| {
        eprintln!("  {case} {who}: {r:.0}");
        results.push((case, who, r));
    };

    // Local copy.
    eprintln!("local copy");
    drop_caches()?;
    let (s, b) = read_checked(&big, bsz, t)?;
    record("a", "local", rate(s, b, big.len(), false));
    record("b", "local", rate(s, b, big.len(), false));
    let (s, b) = read_checked(&big, bsz, t)?;
    record("c", "local", rate(s, b, big.len(), false));
    drop_caches()?;
    let (s, b) = read_checked(&random, bsz, t)?;
    record("d", "local", rate(s, b, random.len(), false));
    drop_caches()?;
    let (s, b) = read_checked(&small, ssz, t)?;
    record("e", "local", rate(s, b, small.len(), true));
    record("f", "local", rate(s, b, small.len(), true));

    // Granary: a cold mount (a, c, e), then fresh mounts on the warm disk cache (b; d, e').
    let mnt = root.join("mnt-granary");
    let cache = root.join("granary-cache");
    let mut peak_rss = 0u64;
    {
        eprintln!("granary mount, cold");
        let m = GranaryMount::new(&exe, &addr, &mnt, &cache, args)?;
        let (g_big, g_small) = (rebase(&big, &data, &mnt), rebase(&small, &data, &mnt));
        drop_caches()?;
        let (s, b) = read_checked(&g_big, bsz, t)?;
        record("a", "granary", rate(s, b, big.len(), false));
        let (s, b) = read_checked(&g_big, bsz, t)?;
        record("c", "granary", rate(s, b, big.len(), false));
        drop_caches()?;
        let (s, b) = read_checked(&g_small, ssz, t)?;
        record("e", "granary", rate(s, b, small.len(), true));
        eprintln!("  mount peak RSS {} MiB", m.peak_rss() >> 20);
        peak_rss = peak_rss.max(m.peak_rss());
    }
    // A mount on the chunk server's host reads its pack files directly and
    // leaves the disk cache empty; `granary prefetch` fills it (unmeasured).
    if parse_size(&args.cache_size)? > 0 {
        eprintln!("granary prefetch (warms the disk cache)");
        let out = Command::new(&exe)
            .args([
                "prefetch",
                "bench",
                "--server",
                &addr,
                "--cache-size",
                &args.cache_size,
            ])
            .arg("--cache-dir")
            .arg(&cache)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .output()
            .context("running granary prefetch")?;
        if !out.status.success() {
            bail!(
                "granary prefetch failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
    {
        eprintln!("granary mount, warm disk cache");
        let m = GranaryMount::new(&exe, &addr, &mnt, &cache, args)?;
        drop_caches()?;
        let (s, b) = read_checked(&rebase(&big, &data, &mnt), bsz, t)?;
        record("b", "granary", rate(s, b, big.len(), false));
        eprintln!("  mount peak RSS {} MiB", m.peak_rss() >> 20);
        peak_rss = peak_rss.max(m.peak_rss());
    }
    {
        let m = GranaryMount::new(&exe, &addr, &mnt, &cache, args)?;
        drop_caches()?;
        let (s, b) = read_checked(&rebase(&random, &data, &mnt), bsz, t)?;
        record("d", "granary", rate(s, b, random.len(), false));
        drop_caches()?;
        let (s, b) = read_checked(&rebase(&small, &data, &mnt), ssz, t)?;
        record("f", "granary", rate(s, b, small.len(), true));
        eprintln!("  mount peak RSS {} MiB", m.peak_rss() >> 20);
        peak_rss = peak_rss.max(m.peak_rss());
    }

    // rclone: a cold mount (a, c, e), then a fresh mount on its warm VFS cache (b, d, e').
    if use_rclone {
        let rmnt = root.join("mnt-rclone");
        let rcache = root.join("rclone-cache");
        let log = root.join("rclone.log");
        {
            eprintln!("rclone mount, cold");
            let _m = RcloneMount::new(&data, &rmnt, &rcache, &log)?;
            let (r_big, r_small) = (rebase(&big, &data, &rmnt), rebase(&small, &data, &rmnt));
            drop_caches()?;
            let (s, b) = read_checked(&r_big, bsz, t)?;
            record("a", "rclone", rate(s, b, big.len(), false));
            let (s, b) = read_checked(&r_big, bsz, t)?;
            record("c", "rclone", rate(s, b, big.len(), false));
            drop_caches()?;
            let (s, b) = read_checked(&r_small, ssz, t)?;
            record("e", "rclone", rate(s, b, small.len(), true));
        }
        {
            eprintln!("rclone mount, warm VFS cache");
            let _m = RcloneMount::new(&data, &rmnt, &rcache, &log)?;
            drop_caches()?;
            let (s, b) = read_checked(&rebase(&big, &data, &rmnt), bsz, t)?;
            record("b", "rclone", rate(s, b, big.len(), false));
            drop_caches()?;
            let (s, b) = read_checked(&rebase(&random, &data, &rmnt), bsz, t)?;
            record("d", "rclone", rate(s, b, random.len(), false));
            drop_caches()?;
            let (s, b) = read_checked(&rebase(&small, &data, &rmnt), ssz, t)?;
            record("f", "rclone", rate(s, b, small.len(), true));
        }
    }

    let get = |case: &str, who: &str| {
        results
            .iter()
            .find(|(c, w, _)| *c == case && *w == who)
            .map(|r| r.2)
    };
    // (case, label, unit, local target, rclone target)
    let cases: [(&str, String, &str, f64, Option<f64>); 6] = [
        (
            "a",
            format!("(a) {} big files, cold", big.len()),
            "MB/s",
            0.5,
            Some(5.0),
        ),
        ("b", "(b) warm disk cache, fresh mount".into(), "MB/s", 0.8, None),
        ("c", "(c) kernel page cache warm".into(), "MB/s", 0.9, None),
        (
            "d",
            format!("(d) {} big files, random order", random.len()),
            "MB/s",
            0.5,
            Some(5.0),
        ),
        (
            "e",
            format!("(e) {} x {} KiB files, cold", small.len(), args.small_kib),
            "files/s",
            0.0,
            Some(20.0),
        ),
        (
            "f",
            "(e') the same, warm disk cache, fresh mount".into(),
            "files/s",
            0.0,
            Some(20.0),
        ),
    ];
    let rss_target = mem_cap + (100 << 20);
    let mut rows = Vec::new();
    for (case, label, unit, local_t, rclone_t) in &cases {
        let g = get(case, "granary").unwrap_or(0.0);
        let l = get(case, "local").unwrap_or(0.0);
        let r = get(case, "rclone");
        rows.push(json!({
            "case": case, "label": label, "unit": unit,
            "granary": g, "local": l, "rclone": r,
            "vs_local": g / l, "vs_rclone": r.map(|r| g / r),
            "target_vs_local": (*local_t > 0.0).then_some(*local_t),
            "target_vs_rclone": rclone_t,
        }));
    }
    let report = json!({
        "big_files": big.len(), "file_kib": args.file_kib,
        "small_files": small.len(), "small_kib": args.small_kib,
        "random_files": random.len(), "threads": t, "mem_cache": mem_cap,
        "cases": rows,
        "mount_peak_rss": peak_rss, "rss_target": rss_target,
    });
    if args.json {
        println!("{report}");
        return Ok(());
    }
    let mut out = std::io::stdout().lock();
    let verdict = |ratio: f64, target: f64| {
        if ratio >= target {
            format!(">= {target}x: ok")
        } else {
            format!(">= {target}x: NOT MET")
        }
    };
    writeln!(
        out,
        "granary bench mount: {} x {} KiB + {} x {} KiB, {t} reader threads, --mem-cache {}, --cache-size {}",
        big.len(),
        args.file_kib,
        small.len(),
        args.small_kib,
        args.mem_cache,
        args.cache_size
    )?;
    writeln!(
        out,
        "| case | unit | granary | local | vs local | rclone | vs rclone | target vs local | target vs rclone |"
    )?;
    writeln!(out, "|---|---|---|---|---|---|---|---|---|")?;
    for row in &rows {
        let f = |k: &str| row[k].as_f64();
        let g = f("granary").unwrap_or(0.0);
        let vs_l = f("vs_local").unwrap_or(0.0);
        let (r, vs_r) = match (f("rclone"), f("vs_rclone")) {
            (Some(r), Some(v)) => (format!("{r:.0}"), format!("{v:.2}x")),
            _ => ("-".into(), "-".into()),
        };
        let tl = f("target_vs_local").map_or("-".into(), |t| verdict(vs_l, t));
        let tr = match (f("target_vs_rclone"), f("vs_rclone")) {
            (Some(t), Some(v)) => verdict(v, t),
            (Some(t), None) => format!(">= {t}x: not measured"),
            _ => "-".into(),
        };
        writeln!(
            out,
            "| {} | {} | {g:.0} | {:.0} | {vs_l:.2}x | {r} | {vs_r} | {tl} | {tr} |",
            row["label"].as_str().unwrap_or(""),
            row["unit"].as_str().unwrap_or(""),
            f("local").unwrap_or(0.0),
        )?;
    }
    let mib = |b: u64| b as f64 / 1048576.0;
    writeln!(
        out,
        "mount peak RSS (VmHWM, max over the mounts): {:.0} MiB; target <= mem-cache + 100 MiB = {:.0} MiB: {}",
        mib(peak_rss),
        mib(rss_target),
        if peak_rss <= rss_target { "ok" } else { "NOT MET" }
    )?;
    Ok(())
}
