//! `granary bench tier`: moving packs to an S3 object tier against plain
//! object_store uploads of the same pack files, and reading a dataset cold
//! through `granary mount` from the object tier against `rclone mount` of
//! the same files in the same bucket, in one run.
//!
//! Unless `--s3-endpoint` is given, the command starts its own S3 server,
//! `moto_server`, on a free loopback port (stopped at the end). Everything
//! it stores goes under `s3://BUCKET/bench-tier-RANDOM/`: `granary/` is the
//! server's object tier, `raw-put/` the baseline's uploads, `rclone/`
//! rclone's copy of the files (removed at the end on an outside server).
//! Granary runs as real processes: an embedded `granary server` (whose
//! object tier is that S3 prefix), the `granary upload` CLI, `granary admin
//! tier move` and `granary mount`.
//!
//! Figures:
//! - **tiering**: `granary admin tier move DATASET --to object` (it waits
//!   until the mover is done), MB/s of pack bytes moved. Baseline: the same
//!   pack files (hard links taken before the move) uploaded with
//!   [`ObjectTier::put_file`] (object_store: one PUT below 16 MiB, else a
//!   multipart upload of 8 MiB parts, four in flight), four files at a time
//!   like the mover; run once before and once after the move, the mean is
//!   the baseline.
//! - **cold mount read**: every file read once, in path order by
//!   `--threads` threads, through a fresh `granary mount` with empty caches,
//!   the packs only in the object tier; MB/s of file bytes. Baseline:
//!   `rclone mount --vfs-cache-mode full` (empty cache) of rclone's own copy
//!   of the files in the same bucket, read the same way, once before and once
//!   after granary (the mean is the baseline). Reference: the same read
//!   through `granary mount` before the move, from the chunk server's disk.
//!   Ceiling: the tiered pack objects fetched whole with ranged GETs of
//!   the chunk server's block size, 10 in flight, and nothing else done
//!   with them; it is stated in file bytes per second (file bytes over the
//!   GETs' time), the most a cold read through any reader of these objects
//!   could reach against this S3 server.
//!
//! The kernel page cache is dropped before every measured step (needs root).
//! The CPU the S3 server, the granary server, the mount process and this
//! process used during each step is reported as a share of one core: moto
//! is Python and bounds both sides of each comparison.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures::{StreamExt, TryStreamExt};
use granary_client::object::ObjectTier;
use granary_client::object_blocks;
use serde_json::{json, Value};

use super::datagen::{random_bytes, TextGen};
use super::mount::{drop_caches, read_files, GranaryMount, RcloneMount};
use super::{ensure_tool, start_server, work_dir, ChildGuard, Package};
use crate::commands::data::parse_size;

/// Dataset name used for the upload.
const DATASET: &str = "bench";
/// Packs uploaded at once by the baseline: the mover's `PARALLEL_MOVES`.
const PARALLEL_PUTS: usize = 4;

#[derive(Debug, clap::Args)]
pub struct BenchTierArgs {
    /// Where to put the data, the server, the caches and the mountpoints (default: a temporary
    /// directory). Its `data`, `server`, `raw-packs` and `*-cache` subdirectories are deleted first.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Dataset size (files of --file-kib; every fourth file is text-like, the rest incompressible).
    #[arg(long, default_value = "512MiB")]
    pub size: String,
    /// Size of each file, in KiB.
    #[arg(long, default_value_t = 1024)]
    pub file_kib: usize,
    /// Reader threads of the cold reads (each reads whole files with std::fs::read).
    #[arg(long, default_value_t = 4)]
    pub threads: usize,
    /// `--threads` of the upload (0: its default, two per core). With one thread the packs hold the
    /// files in path order; with several, files chunked at the same time share packs.
    #[arg(long, default_value_t = 0)]
    pub upload_threads: usize,
    /// Use this S3 endpoint (e.g. http://127.0.0.1:9000) instead of starting `moto_server`.
    /// Credentials come from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (default test/test).
    #[arg(long)]
    pub s3_endpoint: Option<String>,
    /// Bucket to use (created if missing).
    #[arg(long, default_value = "granary-bench")]
    pub bucket: String,
    /// Print machine-readable JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// CPU seconds (user + system) a process has used so far; 0 when it is gone.
fn cpu_secs(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after "(comm) ": state is field 3, utime 14, stime 15.
    let Some((_, rest)) = stat.rsplit_once(") ") else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    (ticks(11) + ticks(12)) as f64 / hz
}

/// The process whose command line has `arg` as an argument (the mount daemons).
fn pid_with_arg(arg: &Path) -> Option<u32> {
    let want = arg.as_os_str().as_encoded_bytes();
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
        cmdline.split(|b| *b == 0).any(|a| a == want).then_some(pid)
    })
}

/// CPU used by a few processes across one measured step.
struct CpuWatch {
    procs: Vec<(&'static str, u32, f64)>,
    started: Instant,
}

impl CpuWatch {
    fn start(procs: &[(&'static str, Option<u32>)]) -> Self {
        Self {
            procs: procs
                .iter()
                .filter_map(|(name, pid)| pid.map(|p| (*name, p, cpu_secs(p))))
                .collect(),
            started: Instant::now(),
        }
    }

    /// `{name: share of one core}` over the step.
    fn stop(&self) -> Value {
        let wall = self.started.elapsed().as_secs_f64().max(1e-9);
        let mut out = serde_json::Map::new();
        for (name, pid, before) in &self.procs {
            out.insert(name.to_string(), json!((cpu_secs(*pid) - before) / wall));
        }
        Value::Object(out)
    }
}

/// `moto_server -H 127.0.0.1 -p PORT` (log in `root/moto.log`), once it accepts connections.
fn start_moto(root: &Path) -> anyhow::Result<(ChildGuard, String)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let log = std::fs::File::create(root.join("moto.log"))?;
    let child = match Command::new("moto_server")
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
    {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "moto_server is not installed; install it with `pip install 'moto[server]'` \
             (or pass --s3-endpoint of another S3 server) and rerun"
        ),
        Err(e) => return Err(e).context("starting moto_server"),
    };
    let mut moto = ChildGuard(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = moto.0.try_wait() {
            bail!(
                "moto_server exited at start-up ({status}); see {}",
                root.join("moto.log").display()
            );
        }
        if Instant::now() > deadline {
            bail!("moto_server did not answer on port {port} within 30 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok((moto, format!("http://127.0.0.1:{port}")))
}

/// Runs `cmd`, failing with its stderr when it fails; returns stdout.
fn run_ok(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("starting {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `count` files of `size` bytes in `dNN/` directories; every fourth is text-like.
fn generate(data: &Path, count: usize, size: usize) -> anyhow::Result<Vec<PathBuf>> {
    let mut text = TextGen::new(7);
    let mut buf = Vec::with_capacity(size);
    let mut files = Vec::with_capacity(count);
    for i in 0..count {
        let dir = data.join(format!("d{:02}", i % 16));
        std::fs::create_dir_all(&dir)?;
        buf.clear();
        let p = if i % 4 == 3 {
            text.fill(&mut buf, size);
            dir.join(format!("log{i:05}.txt"))
        } else {
            buf.resize(size, 0);
            random_bytes(20_000_000 + i as u64, &mut buf);
            dir.join(format!("sample{i:05}.bin"))
        };
        std::fs::write(&p, &buf).with_context(|| format!("writing {}", p.display()))?;
        files.push(p);
    }
    // Read in path order, like `cp -r` or a loader walking a sorted file list.
    files.sort();
    Ok(files)
}

/// Every `*.pack` file under `dir`.
fn find_packs(dir: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let t = e.file_type()?;
        if t.is_dir() {
            find_packs(&e.path(), out)?;
        } else if t.is_file() && e.path().extension().is_some_and(|x| x == "pack") {
            out.push(e.path());
        }
    }
    Ok(())
}

/// Reads every file of `files` with `threads` threads; fails unless every byte arrived.
fn read_all(files: &[PathBuf], size: usize, threads: usize) -> anyhow::Result<(f64, u64)> {
    let (secs, bytes) = read_files(files, threads)?;
    if bytes != (files.len() * size) as u64 {
        bail!("read {bytes} bytes of {} files of {size} bytes", files.len());
    }
    Ok((secs, bytes))
}

/// One measured step.
struct Step {
    secs: f64,
    bytes: u64,
    /// Share of one core each watched process used.
    cpu: Value,
}

impl Step {
    fn mbps(&self) -> f64 {
        self.bytes as f64 / self.secs / 1e6
    }

    fn json(&self) -> Value {
        json!({"secs": self.secs, "bytes": self.bytes, "mbps": self.mbps(), "cpu": self.cpu})
    }
}

/// The baseline of tiering: uploads every file of `packs` to `tier` with
/// [`ObjectTier::put_file`], [`PARALLEL_PUTS`] at a time, from a cold page
/// cache; deletes the objects afterwards (not timed).
fn raw_put(
    rt: &tokio::runtime::Runtime,
    tier: &ObjectTier,
    packs: &[PathBuf],
    moto_pid: Option<u32>,
) -> anyhow::Result<Step> {
    drop_caches()?;
    let watch = CpuWatch::start(&[
        ("s3_server", moto_pid),
        ("bench_client", Some(std::process::id())),
    ]);
    let started = Instant::now();
    let bytes: u64 = rt.block_on(async {
        futures::stream::iter(packs.iter().enumerate())
            .map(|(i, p)| async move { tier.put_file(&tier.pack_key(i as u64), p).await })
            .buffer_unordered(PARALLEL_PUTS)
            .try_fold(0u64, |sum, n| async move { Ok(sum + n) })
            .await
    })?;
    let secs = started.elapsed().as_secs_f64();
    let cpu = watch.stop();
    rt.block_on(async {
        for i in 0..packs.len() {
            tier.delete(&tier.pack_key(i as u64)).await?;
        }
        anyhow::Ok(())
    })?;
    Ok(Step { secs, bytes, cpu })
}

/// Ranged GETs in flight in the raw-GET ceiling: as many as a chunk server
/// sends at most for its block reads.
const PARALLEL_GETS: usize = object_blocks::BLOCK_GETS_IN_FLIGHT;
/// Size of each ranged GET of the ceiling: the chunk server's block.
const GET_BLOCK: u64 = object_blocks::BLOCK;

/// The ceiling of a cold read from the object tier: every pack object under
/// `tier` read whole with [`ObjectTier::get_ranges`] in [`GET_BLOCK`]
/// ranges, [`PARALLEL_GETS`] at a time, the bytes dropped. A mount that
/// reads through the chunk server fetches these same bytes and then still
/// verifies, decodes and serves them.
fn raw_get(rt: &tokio::runtime::Runtime, tier: &ObjectTier, moto_pid: Option<u32>) -> anyhow::Result<Step> {
    let packs = rt.block_on(tier.list_pack_objects())?;
    let ranges: Vec<(&str, u64, u32)> = packs
        .iter()
        .flat_map(|p| {
            let size = p.size;
            (0..size.div_ceil(GET_BLOCK)).map(move |b| {
                (
                    p.key.as_str(),
                    b * GET_BLOCK,
                    (size - b * GET_BLOCK).min(GET_BLOCK) as u32,
                )
            })
        })
        .collect();
    let watch = CpuWatch::start(&[
        ("s3_server", moto_pid),
        ("bench_client", Some(std::process::id())),
    ]);
    let started = Instant::now();
    let bytes: u64 = rt.block_on(async {
        futures::stream::iter(ranges.iter())
            .map(|&(key, off, len)| async move {
                let got = tier.get_ranges(key, &[(off, len)]).await?;
                anyhow::Ok(got.len() as u64)
            })
            .buffer_unordered(PARALLEL_GETS)
            .try_fold(0u64, |sum, n| async move { Ok(sum + n) })
            .await
    })?;
    Ok(Step {
        secs: started.elapsed().as_secs_f64(),
        bytes,
        cpu: watch.stop(),
    })
}

/// Reads every file of `files` (paths under `data`) at the same paths under
/// `under`, a directory of the mount at `mnt` (whose process is watched),
/// from a cold page cache, with `threads` threads.
#[allow(clippy::too_many_arguments)]
fn cold_read(
    files: &[PathBuf],
    data: &Path,
    mnt: &Path,
    under: &Path,
    size: usize,
    threads: usize,
    moto_pid: Option<u32>,
    server_pid: Option<u32>,
) -> anyhow::Result<Step> {
    let on_mount: Vec<PathBuf> = files
        .iter()
        .map(|p| under.join(p.strip_prefix(data).expect("under the data directory")))
        .collect();
    drop_caches()?;
    let watch = CpuWatch::start(&[
        ("s3_server", moto_pid),
        ("granary_server", server_pid),
        ("mount", pid_with_arg(mnt)),
    ]);
    let (secs, bytes) = read_all(&on_mount, size, threads)?;
    Ok(Step {
        secs,
        bytes,
        cpu: watch.stop(),
    })
}

pub fn run(args: &BenchTierArgs) -> anyhow::Result<()> {
    drop_caches()?;
    ensure_tool("rclone", Package::Apt("rclone"))?;
    let file_size = args.file_kib << 10;
    if file_size == 0 {
        bail!("--file-kib must be at least 1");
    }
    let count = (parse_size(&args.size)? as usize / file_size).max(1);
    let exe = std::env::current_exe()?;
    let (_tmp, root) = work_dir(&args.dir, "granary-bench-tier-")?;
    std::fs::create_dir_all(&root)?;
    let root = std::fs::canonicalize(&root)?;
    for sub in [
        "data",
        "server",
        "raw-packs",
        "upload-cache",
        "granary-cache",
        "granary-ssd-cache",
        "rclone-cache",
    ] {
        let p = root.join(sub);
        if p.exists() {
            std::fs::remove_dir_all(&p)
                .with_context(|| format!("removing {} of an earlier run", p.display()))?;
        }
    }

    // The S3 server and the environment every process here uses to reach it:
    // AWS_* for the granary server (and this process's baseline uploads),
    // RCLONE_CONFIG_S3_* for rclone's remote `s3:`, GRANARY_OBJECT_STORE
    // for the server's object tier. Set before any thread starts.
    let (moto, endpoint) = match &args.s3_endpoint {
        Some(e) => (None, e.trim_end_matches('/').to_string()),
        None => {
            ensure_tool("moto_server", Package::Pip("moto[server]"))?;
            eprintln!("starting moto_server");
            let (m, e) = start_moto(&root)?;
            (Some(m), e)
        }
    };
    let moto_pid = moto.as_ref().map(|m| m.0.id());
    let key_id = std::env::var("AWS_ACCESS_KEY_ID").unwrap_or_else(|_| "test".into());
    let secret = std::env::var("AWS_SECRET_ACCESS_KEY").unwrap_or_else(|_| "test".into());
    let region = std::env::var("AWS_REGION").unwrap_or_else(|_| "us-east-1".into());
    let prefix = format!("bench-tier-{:08x}", fastrand::u32(..));
    let bucket = &args.bucket;
    let tier_url = format!("s3://{bucket}/{prefix}/granary");
    for (k, v) in [
        ("AWS_ENDPOINT", endpoint.as_str()),
        ("AWS_ACCESS_KEY_ID", &key_id),
        ("AWS_SECRET_ACCESS_KEY", &secret),
        ("AWS_REGION", &region),
        ("AWS_ALLOW_HTTP", "true"),
        ("GRANARY_OBJECT_STORE", &tier_url),
        ("RCLONE_CONFIG_S3_TYPE", "s3"),
        ("RCLONE_CONFIG_S3_PROVIDER", "Other"),
        ("RCLONE_CONFIG_S3_ENDPOINT", &endpoint),
        ("RCLONE_CONFIG_S3_ACCESS_KEY_ID", &key_id),
        ("RCLONE_CONFIG_S3_SECRET_ACCESS_KEY", &secret),
        ("RCLONE_CONFIG_S3_REGION", &region),
        ("RCLONE_CONFIG_S3_FORCE_PATH_STYLE", "true"),
    ] {
        std::env::set_var(k, v);
    }
    std::env::remove_var("AWS_ENDPOINT_URL");
    // rclone (1.60) fails to build its S3 client when AWS_CA_BUNDLE is set
    // ("LoadCustomCABundleError ... unsupported transport").
    std::env::remove_var("AWS_CA_BUNDLE");
    run_ok(Command::new("rclone").args(["mkdir", &format!("s3:{bucket}")])).context("creating the bucket")?;
    // Objects on an outside S3 server are removed at the end (moto just stops).
    struct Purge(Option<String>);
    impl Drop for Purge {
        fn drop(&mut self) {
            if let Some(remote) = &self.0 {
                let _ = Command::new("rclone")
                    .args(["purge", remote])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }
    let _purge = Purge(
        args.s3_endpoint
            .is_some()
            .then(|| format!("s3:{bucket}/{prefix}")),
    );

    let data = root.join("data");
    eprintln!(
        "generating {count} x {} KiB in {} (every fourth file text-like)",
        args.file_kib,
        data.display()
    );
    let files = generate(&data, count, file_size)?;
    let logical = (count * file_size) as u64;

    let (server, addr) = start_server(&exe, &root)?;
    let server_pid = server.0.id();
    eprintln!("granary upload");
    let up = run_ok(
        Command::new(&exe)
            .args(["upload", "--json", "--server", &addr])
            .args(["--threads", &args.upload_threads.to_string()])
            .arg(&data)
            .arg(DATASET)
            .env("GRANARY_CACHE_DIR", root.join("upload-cache"))
            .env("RUST_LOG", "warn"),
    )
    .context("granary upload")?;
    let _: Value = serde_json::from_str(up.trim()).context("granary upload --json output")?;

    // Hard links to the sealed packs: the baseline uploads the same files
    // after the mover has deleted its names for them.
    let mut packs = Vec::new();
    find_packs(&root.join("server"), &mut packs)?;
    if packs.is_empty() {
        bail!("no pack files under {}", root.join("server").display());
    }
    let raw = root.join("raw-packs");
    std::fs::create_dir_all(&raw)?;
    let mut linked = Vec::new();
    for (i, p) in packs.iter().enumerate() {
        let to = raw.join(format!("{i:04}.pack"));
        std::fs::hard_link(p, &to).with_context(|| format!("linking {}", p.display()))?;
        linked.push(to);
    }
    let pack_bytes: u64 = linked
        .iter()
        .map(|p| std::fs::metadata(p).map(|m| m.len()))
        .sum::<std::io::Result<u64>>()?;

    // Reference: the same cold read through the mount while the packs are
    // still on the chunk server's disk (the mount's own ceiling here).
    eprintln!("granary mount, cold (packs on SSD, reference)");
    let mnt = root.join("mnt-granary");
    // One cold read through a fresh `granary mount` with an empty cache.
    let mount_read = |cache: &str| -> anyhow::Result<Step> {
        let _m = GranaryMount::open(&exe, &addr, DATASET, &mnt, &root.join(cache), "1GiB", "10GiB")?;
        let step = cold_read(
            &files,
            &data,
            &mnt,
            &mnt,
            file_size,
            args.threads,
            moto_pid,
            Some(server_pid),
        )?;
        eprintln!("  {:.0} MB/s", step.mbps());
        Ok(step)
    };
    let ssd_read = mount_read("granary-ssd-cache")?;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;

    // (1) Tiering, bracketed by two runs of the baseline (their mean is the
    // baseline), so drifting load on the machine hits both sides alike.
    let raw_tier = ObjectTier::from_url(&format!("s3://{bucket}/{prefix}/raw-put"))?;
    eprintln!("raw PUT of {} pack files ({pack_bytes} bytes)", linked.len());
    let put1 = raw_put(&rt, &raw_tier, &linked, moto_pid)?;
    eprintln!("  {:.0} MB/s", put1.mbps());
    eprintln!("granary admin tier move {DATASET} --to object");
    drop_caches()?;
    let watch = CpuWatch::start(&[("s3_server", moto_pid), ("granary_server", Some(server_pid))]);
    let started = Instant::now();
    let moved = run_ok(
        Command::new(&exe)
            .args([
                "admin", "tier", "move", DATASET, "--to", "object", "--json", "--server", &addr,
            ])
            .env("RUST_LOG", "warn"),
    )?;
    let tier_secs = started.elapsed().as_secs_f64();
    let tier_cpu = watch.stop();
    let moved: Value = serde_json::from_str(moved.trim()).context("tier move --json output")?;
    if moved["done"] != Value::Bool(true) {
        bail!("the tier move did not finish: {moved}");
    }
    let moved_bytes = moved["queued_bytes"].as_u64().unwrap_or(0);
    let status: Value = serde_json::from_str(
        run_ok(Command::new(&exe).args(["admin", "tier", "status", "--json", "--server", &addr]))?.trim(),
    )?;
    let totals = &status["totals"];
    if totals["ssd_packs"].as_u64() != Some(0) || totals["object_bytes"].as_u64() != Some(moved_bytes) {
        bail!("after the move not every pack is in the object tier: {totals}");
    }
    let tier_step = Step {
        secs: tier_secs,
        bytes: moved_bytes,
        cpu: tier_cpu,
    };
    eprintln!("  {:.0} MB/s", tier_step.mbps());
    eprintln!("raw PUT again");
    let put2 = raw_put(&rt, &raw_tier, &linked, moto_pid)?;
    eprintln!("  {:.0} MB/s", put2.mbps());
    let granary_tier = ObjectTier::from_url(&tier_url)?;
    eprintln!(
        "raw ranged GETs of the tiered packs ({} MiB each, {PARALLEL_GETS} in flight)",
        GET_BLOCK >> 20
    );
    let get = raw_get(&rt, &granary_tier, moto_pid)?;
    eprintln!("  {:.0} MB/s", get.mbps());

    // (2) rclone's copy of the source files in the same bucket.
    eprintln!("rclone copy of the files to s3:{bucket}/{prefix}/rclone");
    let started = Instant::now();
    let remote = format!("s3:{bucket}/{prefix}/rclone");
    run_ok(
        Command::new("rclone")
            .args(["copy", "--transfers", "4"])
            .arg(&data)
            .arg(&remote),
    )?;
    let rclone_copy_secs = started.elapsed().as_secs_f64();

    // (2) Cold reads: rclone, granary, rclone again (the baseline is their mean).
    let rclone_read = || -> anyhow::Result<Step> {
        eprintln!("rclone mount, cold");
        let (rmnt, cache) = (root.join("mnt-rclone"), root.join("rclone-cache"));
        if cache.exists() {
            std::fs::remove_dir_all(&cache)?;
        }
        // The bucket is mounted, not the copy's prefix: rclone checks a
        // remote's path with a HEAD first, which s3s-fs answers with 500
        // (not 404) when the key is a "directory" of its files, and rclone
        // then retries for ever.
        let _m = RcloneMount::new(
            Path::new(&format!("s3:{bucket}")),
            &rmnt,
            &cache,
            &root.join("rclone.log"),
        )?;
        let under = rmnt.join(&prefix).join("rclone");
        let step = cold_read(
            &files,
            &data,
            &rmnt,
            &under,
            file_size,
            args.threads,
            moto_pid,
            None,
        )?;
        eprintln!("  {:.0} MB/s", step.mbps());
        Ok(step)
    };
    let read1 = rclone_read()?;
    eprintln!("granary mount, cold (object tier)");
    let granary_read = mount_read("granary-cache")?;
    let read2 = rclone_read()?;
    drop(server);

    let tier_mbps = tier_step.mbps();
    let put_mbps = (put1.mbps() + put2.mbps()) / 2.0;
    let g_mbps = granary_read.mbps();
    let r_mbps = (read1.mbps() + read2.mbps()) / 2.0;
    // File bytes per second if the read took only as long as fetching the packs.
    let get_ceiling = logical as f64 / get.secs / 1e6;
    let report = json!({
        "files": count, "file_kib": args.file_kib, "logical_bytes": logical,
        "packs": linked.len(), "pack_bytes": pack_bytes, "threads": args.threads,
        "s3_server": if moto.is_some() { "moto_server" } else { "external" }, "s3_endpoint": endpoint,
        "tiering": {
            "granary": tier_step.json(), "mbps": tier_mbps,
            "raw_put": [put1.json(), put2.json()], "raw_put_mbps": put_mbps,
            "ratio": tier_mbps / put_mbps, "target": 0.8,
        },
        "cold_read": {
            "granary": granary_read.json(), "mbps": g_mbps,
            "rclone": [read1.json(), read2.json()], "rclone_mbps": r_mbps,
            "rclone_copy_secs": rclone_copy_secs,
            "ratio": g_mbps / r_mbps, "target": 3.0,
            "granary_from_ssd": ssd_read.json(),
            "raw_get": get.json(), "raw_get_ceiling_mbps": get_ceiling,
            "ceiling_vs_rclone": get_ceiling / r_mbps,
        },
    });
    if args.json {
        println!("{report}");
        return Ok(());
    }
    let verdict = |ratio: f64, target: f64| if ratio >= target { "ok" } else { "NOT MET" };
    let cpu = |v: &Value| {
        v.as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| format!("{k} {:.0}%", v.as_f64().unwrap_or(0.0) * 100.0))
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default()
    };
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "granary bench tier: {count} x {} KiB ({:.0} MiB, every fourth file text-like) in {} packs \
         ({:.0} MiB); S3: {} at {endpoint}",
        args.file_kib,
        logical as f64 / 1048576.0,
        linked.len(),
        pack_bytes as f64 / 1048576.0,
        if moto.is_some() { "moto_server" } else { "external" },
    )?;
    let ratio = tier_mbps / put_mbps;
    writeln!(
        out,
        "tiering: {tier_mbps:.0} MB/s vs raw PUT {put_mbps:.0} MB/s = {ratio:.2}x (target >= 0.8x: {})",
        verdict(ratio, 0.8)
    )?;
    writeln!(
        out,
        "  raw PUT runs before and after: {:.0} and {:.0} MB/s; CPU (share of one core): tier move: {}; \
         raw PUT: {}",
        put1.mbps(),
        put2.mbps(),
        cpu(&tier_step.cpu),
        cpu(&put1.cpu)
    )?;
    let ratio = g_mbps / r_mbps;
    writeln!(
        out,
        "cold mount read: {g_mbps:.0} MB/s vs rclone mount {r_mbps:.0} MB/s = {ratio:.2}x (target >= 3x: {})",
        verdict(ratio, 3.0)
    )?;
    writeln!(
        out,
        "  rclone runs before and after: {:.0} and {:.0} MB/s; CPU (share of one core): granary: {}; rclone: {}",
        read1.mbps(),
        read2.mbps(),
        cpu(&granary_read.cpu),
        cpu(&read1.cpu)
    )?;
    writeln!(
        out,
        "  reference: the same read through granary mount with the packs on SSD: {:.0} MB/s \
         (object tier / SSD = {:.2}x)",
        ssd_read.mbps(),
        g_mbps / ssd_read.mbps()
    )?;
    writeln!(
        out,
        "  ceiling: raw ranged GETs of the tiered packs ({} MiB, {PARALLEL_GETS} in flight): {:.0} MB/s of pack \
         bytes, {get_ceiling:.0} MB/s of file bytes = {:.2}x rclone; the mount reached {:.2}x of it; CPU: {}",
        GET_BLOCK >> 20,
        get.mbps(),
        get_ceiling / r_mbps,
        g_mbps / get_ceiling,
        cpu(&get.cpu)
    )?;
    Ok(())
}
