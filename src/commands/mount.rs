//! `granary mount`, `umount`, `prefetch`, `cache-stats`.
//!
//! `mount` without `--foreground` re-executes itself with `--foreground` in a
//! new session (stdout closed, stderr to `<cache-dir>/mounts/<key>.log`) and
//! waits on a pipe until the child reports the mount ready or its error, so
//! the command returns only once the mount works and a failure (unknown
//! dataset or version, bad mountpoint) leaves nothing mounted. The mounted
//! process writes its counters to `<cache-dir>/mounts/<key>.json` twice a
//! second and once more on exit; `key` is derived from the mountpoint's path.
//! SIGTERM, SIGINT and SIGHUP unmount and exit; so does an external unmount.

use std::collections::HashSet;
use std::io::{IsTerminal, Read, Write};
use std::os::fd::FromRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures::StreamExt;
use granary_client::chunks::OBJECT_CACHE;
use granary_client::version::Node;
use granary_client::{Client, VersionReader};
use granary_core::tree::EntryData;
use granary_core::{ChunkRef, VersionRef};
use granary_fuse::cache::Want;
use granary_fuse::{ChunkCache, ClientSource, DiskCache, FsConfig, GranaryFs, Source, Stats};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use super::data::parse_size;
use crate::cli::{CacheStatsArgs, MountArgs, PrefetchArgs, UmountArgs};

/// The environment variable that hands the child the write end of the ready pipe.
const READY_FD: &str = "GRANARY_MOUNT_READY_FD";

/// Name of a mountpoint's stats and log files under `<cache-dir>/mounts/`.
fn mount_key(mountpoint: &Path) -> String {
    let h = blake3::hash(mountpoint.as_os_str().as_bytes());
    h.to_hex()[..16].to_string()
}

fn stats_path(cache_dir: &Path, mountpoint: &Path) -> PathBuf {
    cache_dir
        .join("mounts")
        .join(format!("{}.json", mount_key(mountpoint)))
}

/// Undoes the octal escapes of /proc/self/mountinfo.
fn unescape(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

/// The filesystem type mounted at `path`, if any.
fn mounted_fstype(path: &Path) -> Option<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = path.as_os_str().as_bytes();
    info.lines().rev().find_map(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        let sep = fields.iter().position(|f| *f == "-")?;
        (unescape(fields.get(4)?) == want).then(|| fields.get(sep + 1).unwrap_or(&"").to_string())
    })
}

/// Appended to errors about the cache directory (the default,
/// /var/cache/granary, needs root).
const CACHE_DIR_HINT: &str = "; pass --cache-dir DIR to use a directory you can write";

/// `p` resolved for finding it in the mount table: canonical when it can be
/// resolved, else its canonical parent joined with its name (a stale FUSE
/// mount, whose process died, fails every `stat` with ENOTCONN).
fn mount_table_path(p: &Path) -> PathBuf {
    if let Ok(c) = std::fs::canonicalize(p) {
        return c;
    }
    let abs = std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    match (abs.parent(), abs.file_name()) {
        (Some(parent), Some(name)) => std::fs::canonicalize(parent)
            .map(|d| d.join(name))
            .unwrap_or_else(|_| abs.clone()),
        _ => abs,
    }
}

fn canonical_mountpoint(p: &Path) -> anyhow::Result<PathBuf> {
    let c = match std::fs::canonicalize(p).and_then(|c| std::fs::metadata(&c).map(|_| c)) {
        Ok(c) => c,
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => bail!(
            "{} is a stale mount (its mount process is gone); run `granary umount {}` first",
            p.display(),
            p.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "mountpoint {} does not exist; create it with `mkdir -p {}`",
            p.display(),
            p.display()
        ),
        Err(e) => bail!("cannot use mountpoint {}: {e}", p.display()),
    };
    if !c.is_dir() {
        bail!("mountpoint {} is not a directory", c.display());
    }
    Ok(c)
}

pub fn mount(args: &MountArgs) -> anyhow::Result<()> {
    let mountpoint = canonical_mountpoint(&args.mountpoint)?;
    if let Some(fs) = mounted_fstype(&mountpoint) {
        bail!(
            "{} is already a mountpoint ({fs}); unmount it first with `granary umount {}`",
            mountpoint.display(),
            mountpoint.display()
        );
    }
    let mem_cap = parse_size(&args.mem_cache)?;
    let disk_cap = parse_size(&args.cache_size)?;
    VersionRef::parse(&args.version)?;
    let ready_fd = std::env::var(READY_FD).ok().and_then(|v| v.parse::<i32>().ok());
    if args.foreground || ready_fd.is_some() {
        // SAFETY: the parent created this descriptor for us and nothing else uses it.
        let ready = ready_fd.map(|fd| unsafe { std::fs::File::from_raw_fd(fd) });
        return run_mounted(args, &mountpoint, mem_cap, disk_cap, ready);
    }
    spawn_background(args, &mountpoint)
}

/// Starts `granary mount --foreground` detached and waits for its verdict.
fn spawn_background(args: &MountArgs, mountpoint: &Path) -> anyhow::Result<()> {
    let mounts = args.cache_dir.join("mounts");
    std::fs::create_dir_all(&mounts).with_context(|| {
        format!(
            "cannot create the cache directory {}{CACHE_DIR_HINT}",
            mounts.display()
        )
    })?;
    let log_path = mounts.join(format!("{}.log", mount_key(mountpoint)));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("cannot open {}", log_path.display()))?;
    let mut fds = [0i32; 2];
    // SAFETY: `fds` has room for the two descriptors pipe(2) writes.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error()).context("pipe");
    }
    // SAFETY: both descriptors were just created and are owned here.
    let (mut read_end, write_end) = unsafe {
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    };
    // SAFETY: plain fcntl on our own descriptor.
    unsafe { libc::fcntl(fds[0], libc::F_SETFD, libc::FD_CLOEXEC) };
    let mut cmd = Command::new(std::env::current_exe().context("cannot find the granary executable")?);
    cmd.args(std::env::args_os().skip(1))
        .env(READY_FD, fds[1].to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    // SAFETY: setsid is async-signal-safe; it detaches the child from our terminal.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let child = cmd.spawn().context("cannot start the mount process")?;
    drop(write_end);
    let mut verdict = String::new();
    let _ = read_end.read_to_string(&mut verdict);
    match verdict.lines().next() {
        Some("ok") => {
            eprintln!(
                "mounted {} at {} (process {}; log {})",
                args.version,
                mountpoint.display(),
                child.id(),
                log_path.display()
            );
            Ok(())
        }
        Some(line) => bail!("{}", line.strip_prefix("error: ").unwrap_or(line)),
        None => bail!(
            "the mount process exited before the mount was ready; see {}",
            log_path.display()
        ),
    }
}

fn write_stats(path: &Path, base: &serde_json::Value, fs: &GranaryFs, mounted: bool) {
    let mut s = fs.stats().snapshot();
    fs.cache().fill(&mut s);
    if !mounted {
        // A newer mount on the same path owns the file now.
        let owner = std::fs::read_to_string(path)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v["pid"].as_u64());
        if owner.is_some_and(|p| p != std::process::id() as u64) {
            return;
        }
    }
    let mut v = base.clone();
    v["mounted"] = json!(mounted);
    v["stats"] = serde_json::to_value(&s).unwrap_or_default();
    let tmp = path.with_extension(format!("json.{}", std::process::id()));
    if std::fs::write(&tmp, v.to_string()).is_ok() {
        let _ = std::fs::rename(&tmp, path);
    }
}

/// Mounts, reports readiness on `ready`, and serves until unmounted or signalled.
/// Keeps glibc malloc from holding much freed memory: by default each of the
/// mount's ~30 threads may get its own arena, and chunk and fetch buffers
/// freed on other threads than they were allocated on stay in them; a mount
/// over a 1 GiB memory cache held ~80 MiB of freed heap. Two arenas halve
/// that. (A fixed mmap threshold saved more but cost a page fault per 4 KiB
/// fetched: ~12% of a cold read's CPU.)
fn tame_malloc() {
    // SAFETY: mallopt only changes allocator parameters; called before the mount's threads start.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// The disk cache keeps every segment it indexes open (one descriptor per
/// 32 MiB: ~3,200 for a 100 GiB cache), more than the usual soft limit of
/// 1,024: raise the soft limit to the hard one.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn run_mounted(
    args: &MountArgs,
    mountpoint: &Path,
    mem_cap: u64,
    disk_cap: u64,
    mut ready: Option<std::fs::File>,
) -> anyhow::Result<()> {
    tame_malloc();
    raise_fd_limit();
    let result = (|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .enable_all()
            .build()?;
        let r = VersionRef::parse(&args.version)?;
        let client = Client::connect(&args.server.servers)?;
        let reader = rt
            .block_on(client.open_version(&r.dataset, r.number))
            .with_context(|| format!("cannot mount {}", args.version))?;
        let name = format!("{}@{}", reader.version().dataset, reader.version().number);
        // The root listing, so a damaged version fails here rather than at the first `ls`.
        rt.block_on(reader.tree(reader.root()))
            .with_context(|| format!("cannot mount {name}: its root directory cannot be read"))?;
        let disk = DiskCache::open(&args.cache_dir, disk_cap).with_context(|| {
            format!(
                "cannot use the cache directory {}{CACHE_DIR_HINT}",
                args.cache_dir.display()
            )
        })?;
        // Prefetched chunks in flight are memory too: `--mem-cache` covers
        // them and the memory cache proper, so the mount stays within it.
        // So are the blocks of direct object-tier reads: a quarter, at most
        // OBJECT_CACHE (256 MiB); below 8 blocks there are no direct reads
        // and nothing is set aside.
        let defaults = FsConfig::default();
        let readahead_global = defaults.readahead_global.min((mem_cap / 4).max(4 << 20));
        let object_cache = reader
            .chunk_servers()
            .set_object_cache(OBJECT_CACHE.min(mem_cap / 4));
        let cache = ChunkCache::new(
            mem_cap
                .saturating_sub(readahead_global)
                .saturating_sub(object_cache),
            Some(disk),
        );
        // SAFETY: getuid/getgid cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        let cfg = FsConfig {
            uid,
            gid,
            readahead_global,
            ..defaults
        };
        let fs = GranaryFs::new(Arc::new(ClientSource::new(reader)), cache, cfg);
        let bg = granary_fuse::adapter::mount(
            fs.clone(),
            rt.handle().clone(),
            mountpoint,
            &name,
            args.allow_other,
        )
        .with_context(|| format!("cannot mount on {}", mountpoint.display()))?;
        Ok::<_, anyhow::Error>((rt, fs, bg, name))
    })();
    let (rt, fs, bg, name) = match result {
        Ok(v) => v,
        Err(e) => {
            if let Some(mut r) = ready.take() {
                let _ = writeln!(r, "error: {e:#}");
            }
            return Err(e);
        }
    };
    let stats_file = stats_path(&args.cache_dir, mountpoint);
    let base = json!({
        "mountpoint": mountpoint, "version": name, "pid": std::process::id(),
        "cache_dir": args.cache_dir,
    });
    write_stats(&stats_file, &base, &fs, true);
    if let Some(mut r) = ready.take() {
        let _ = writeln!(r, "ok");
    }
    tracing::info!("mounted {name} at {}", mountpoint.display());
    // Freed chunk buffers stay in glibc's heap; handing their pages back
    // keeps the mount near its caches. Every 100 ms: at 500 ms the heap grew
    // by what passed through between trims (a warm read with a 256 MiB
    // memory cache peaked at 360-480 MiB).
    std::thread::Builder::new()
        .name("granary-trim".into())
        .spawn(|| loop {
            std::thread::sleep(Duration::from_millis(100));
            // SAFETY: malloc_trim only returns free heap pages to the kernel.
            unsafe { libc::malloc_trim(0) };
        })
        .context("starting the heap trimmer")?;
    let signalled = rt.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut hup = signal(SignalKind::hangup())?;
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                _ = term.recv() => return Ok::<_, std::io::Error>(true),
                _ = int.recv() => return Ok(true),
                _ = hup.recv() => return Ok(true),
                _ = tick.tick() => {
                    write_stats(&stats_file, &base, &fs, true);
                    if bg.guard.is_finished() {
                        return Ok(false);
                    }
                }
            }
        }
    })?;
    if signalled {
        tracing::info!("signal received; unmounting {}", mountpoint.display());
        if let Err(e) = bg.umount_and_join() {
            tracing::warn!("unmount failed ({e}); detaching {}", mountpoint.display());
            lazy_unmount(mountpoint);
        }
    } else {
        // Unmounted from outside (`granary umount`, fusermount3 -u). Dropping
        // the session would unmount its path again, and by now a new mount may
        // live there: leak it instead (its thread has ended; we exit next).
        std::mem::forget(bg);
    }
    // Chunks still queued for the disk cache go there before we exit.
    rt.block_on(fs.cache().close());
    write_stats(&stats_file, &base, &fs, false);
    rt.shutdown_timeout(Duration::from_secs(2));
    Ok(())
}

fn lazy_unmount(path: &Path) {
    if let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) {
        // SAFETY: a valid NUL-terminated path.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

pub fn umount(args: &UmountArgs) -> anyhow::Result<()> {
    let mp = mount_table_path(&args.mountpoint);
    match mounted_fstype(&mp) {
        None => bail!("{} is not mounted", mp.display()),
        Some(t) if !t.starts_with("fuse") => bail!("{} is a {t} mount, not a Granary mount", mp.display()),
        Some(_) => {}
    }
    // The mount process, from its counters file, to wait for below.
    let pid = std::fs::read_to_string(stats_path(&args.cache_dir, &mp))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .filter(|v| v["mounted"] == json!(true))
        .and_then(|v| v["pid"].as_u64());
    let c = std::ffi::CString::new(mp.as_os_str().as_bytes())?;
    // SAFETY: a valid NUL-terminated path.
    if unsafe { libc::umount2(c.as_ptr(), 0) } == 0 {
        if let Some(pid) = pid {
            let deadline = Instant::now() + Duration::from_secs(10);
            while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EBUSY) {
        bail!(
            "{} is busy: a process has a file open or its working directory there (see `fuser -m {}`)",
            mp.display(),
            mp.display()
        );
    }
    let out = Command::new("fusermount3").arg("-u").arg(&mp).output();
    match out {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => bail!(
            "cannot unmount {}: {err}; fusermount3: {}",
            mp.display(),
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(_) => bail!("cannot unmount {}: {err}", mp.display()),
    }
}

pub fn cache_stats(args: &CacheStatsArgs) -> anyhow::Result<()> {
    let mp = mount_table_path(&args.mountpoint);
    let path = stats_path(&args.cache_dir, &mp);
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "no counters for {} in {} (is it mounted with --cache-dir {}?)",
            mp.display(),
            path.display(),
            args.cache_dir.display()
        )
    })?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is damaged", path.display()))?;
    if args.output.json {
        println!("{v}");
        return Ok(());
    }
    println!(
        "{} at {} ({})",
        v["version"].as_str().unwrap_or("?"),
        mp.display(),
        if v["mounted"].as_bool() == Some(true) {
            "mounted"
        } else {
            "unmounted"
        }
    );
    if let Some(s) = v["stats"].as_object() {
        for (k, val) in s {
            println!("  {k:<18} {val}");
        }
    }
    Ok(())
}

/// Collects the chunks of every file under `path` of the version.
async fn collect_chunks(reader: &VersionReader, path: &str, out: &mut Vec<ChunkRef>) -> anyhow::Result<()> {
    let mut stack = vec![path.trim_matches('/').to_string()];
    while let Some(p) = stack.pop() {
        match reader.stat(&p).await.with_context(|| format!("'{p}'"))? {
            Node::Entry(e) if matches!(e.data, EntryData::File { .. }) => {
                out.extend(reader.chunk_list(&e).await?)
            }
            Node::Entry(e) if !matches!(e.data, EntryData::Dir { .. }) => {}
            _ => {
                for e in reader.read_dir(&p).await?.entries() {
                    let child = if p.is_empty() {
                        String::from_utf8_lossy(&e.name).into_owned()
                    } else {
                        format!("{p}/{}", String::from_utf8_lossy(&e.name))
                    };
                    match &e.data {
                        EntryData::File { .. } => out.extend(reader.chunk_list(e).await?),
                        EntryData::Dir { .. } => stack.push(child),
                        EntryData::Symlink { .. } => {}
                    }
                }
            }
        }
    }
    Ok(())
}

pub fn prefetch(args: &PrefetchArgs) -> anyhow::Result<()> {
    raise_fd_limit();
    let r = VersionRef::parse(&args.version)?;
    let disk_cap = parse_size(&args.cache_size)?;
    let client = Client::connect(&args.server.servers)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()?;
    let started = Instant::now();
    let (name, total, cached, stats) = rt.block_on(async {
        let disk = DiskCache::open(&args.cache_dir, disk_cap).with_context(|| {
            format!(
                "cannot use the cache directory {}{CACHE_DIR_HINT}",
                args.cache_dir.display()
            )
        })?;
        let reader = client.open_version(&r.dataset, r.number).await?;
        let name = format!("{}@{}", reader.version().dataset, reader.version().number);
        let mut chunks = Vec::new();
        let paths = if args.paths.is_empty() {
            vec![String::new()]
        } else {
            args.paths.clone()
        };
        for p in &paths {
            collect_chunks(&reader, p, &mut chunks).await?;
        }
        let mut seen = HashSet::new();
        chunks.retain(|c| seen.insert(c.id));
        let cache = ChunkCache::prefetching(0, disk);
        let total: u64 = chunks.iter().map(|c| c.len as u64).sum();
        let todo: Vec<ChunkRef> = chunks
            .iter()
            .copied()
            .filter(|c| !cache.is_cached(&c.id))
            .collect();
        let cached = total - todo.iter().map(|c| c.len as u64).sum::<u64>();
        let bar = if !args.output.json && std::io::stderr().is_terminal() {
            let b = ProgressBar::new(total);
            b.set_style(
                ProgressStyle::with_template(
                    "{spinner} {bytes}/{total_bytes} [{wide_bar}] {bytes_per_sec} {msg}",
                )
                .expect("valid template"),
            );
            b
        } else {
            ProgressBar::hidden()
        };
        bar.set_position(cached);
        let source: Arc<dyn Source> = Arc::new(ClientSource::new(reader));
        let stats = Arc::new(Stats::default());
        let mut batches = Vec::new();
        let mut cur = Vec::new();
        let mut size = 0u64;
        for c in todo {
            size += c.len as u64;
            cur.push(c);
            if size >= 8 << 20 {
                batches.push(std::mem::take(&mut cur));
                size = 0;
            }
        }
        if !cur.is_empty() {
            batches.push(cur);
        }
        let mut stream = futures::stream::iter(batches.into_iter().map(|b| {
            let (cache, source, stats) = (cache.clone(), source.clone(), stats.clone());
            async move {
                let bytes: u64 = b.iter().map(|c| c.len as u64).sum();
                cache
                    .get_many(&source, &b, Want::Prefetch, &stats)
                    .await
                    .map(|_| bytes)
            }
        }))
        .buffer_unordered(4);
        while let Some(done) = stream.next().await {
            bar.inc(done?);
        }
        cache.close().await;
        bar.finish_and_clear();
        // The cache writes what it can make room for (evicting the oldest
        // segments, maybe this run's own): what did not stay is reported.
        let kept: u64 = chunks
            .iter()
            .filter(|c| cache.is_cached(&c.id))
            .map(|c| c.len as u64)
            .sum();
        if kept < total {
            bail!(
                "only {} of {name}'s {} fit in the disk cache {} (cap {}); raise --cache-size \
                 (every mount on the host shares this cap) or prefetch fewer paths",
                indicatif::HumanBytes(kept),
                indicatif::HumanBytes(total),
                args.cache_dir.display(),
                indicatif::HumanBytes(disk_cap)
            );
        }
        Ok::<_, anyhow::Error>((name, total, cached, stats.snapshot()))
    })?;
    let secs = started.elapsed().as_secs_f64();
    if args.output.json {
        println!(
            "{}",
            json!({"version": name, "bytes": total, "already_cached_bytes": cached,
                   "fetched_bytes": stats.bytes_fetched, "fetched_chunks": stats.chunks_fetched,
                   "corrupt": stats.corrupt, "seconds": secs})
        );
    } else {
        println!(
            "{name}: {} in cache ({} were already there, fetched {} in {} chunks) in {secs:.1}s",
            indicatif::HumanBytes(total),
            indicatif::HumanBytes(cached),
            indicatif::HumanBytes(stats.bytes_fetched),
            stats.chunks_fetched
        );
    }
    Ok(())
}
