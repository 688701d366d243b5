//! End-to-end tests of `granary mount`: real `granary server` processes, data
//! uploaded with the real `granary upload`, mounted with the real
//! `granary mount` under the test's own temporary directory, read through the
//! kernel, unmounted with `granary umount`.
//!
//! Every mount is held by a [`MountGuard`] (`tests/common`) that lazily
//! unmounts on drop, also when the test panics, so no test leaves a mount
//! behind.

mod common;

use std::fs::{self, File};
use std::io::{ErrorKind, Read};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// A dataset directory: nested dirs, files from empty to several MiB
/// (incompressible and repetitive), odd names and modes, symlinks.
fn make_tree(root: &Path, seed: u64) {
    let mut rng = fastrand::Rng::with_seed(seed);
    fs::create_dir_all(root.join("a/b/c")).unwrap();
    fs::create_dir_all(root.join("empty dir")).unwrap();
    fs::create_dir_all(root.join("train")).unwrap();
    let files: Vec<(&str, usize)> = vec![
        ("empty", 0),
        ("one", 1),
        ("small.txt", 100),
        ("a/b/c/deep.bin", 70_000),
        ("a/b/mid.bin", 300_000),
        ("big.bin", 6 << 20),
        ("a/name with spaces ü.dat", 5000),
    ];
    for (p, n) in files {
        fs::write(root.join(p), random_bytes(&mut rng, n)).unwrap();
    }
    let text: Vec<u8> = (0..2_000_000u32)
        .flat_map(|i| format!("line {i}\n").into_bytes())
        .take(3_000_000)
        .collect();
    fs::write(root.join("train/text.csv"), text).unwrap();
    for i in 0..30 {
        let n = rng.usize(0..20_000);
        fs::write(
            root.join(format!("train/shard-{i:03}")),
            random_bytes(&mut rng, n),
        )
        .unwrap();
    }
    fs::set_permissions(root.join("small.txt"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::set_permissions(root.join("a/b/mid.bin"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(root.join("a/b"), fs::Permissions::from_mode(0o750)).unwrap();
    if seed == 1 {
        // A directory listed over many readdir requests.
        fs::create_dir_all(root.join("many")).unwrap();
        for i in 0..2500 {
            let name = format!("entry-with-a-longish-name-{i:05}-{}", rng.u32(..));
            fs::write(root.join("many").join(name), i.to_string()).unwrap();
        }
    }
    std::os::unix::fs::symlink("a/b/c/deep.bin", root.join("link")).unwrap();
    std::os::unix::fs::symlink("/nonexistent/target", root.join("a/dangling")).unwrap();
}

struct Fixture {
    cluster: Cluster,
    addr: String,
    tmp: tempfile::TempDir,
}

impl Fixture {
    async fn new() -> Self {
        let cluster = Cluster::start(1).await;
        let addr = cluster.addr(1);

        let tmp = tempfile::Builder::new()
            .prefix("granary-mount-")
            .tempdir()
            .unwrap();
        Self { cluster, addr, tmp }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.tmp.path().join(p)
    }

    #[track_caller]
    fn upload(&self, dir: &Path, dataset: &str) {
        let o = Command::new(BIN)
            .args([
                "upload",
                s(dir),
                dataset,
                "--pack-size",
                "1MiB",
                "--server",
                &self.addr,
            ])
            .env("RUST_LOG", "warn")
            .env("GRANARY_CACHE_DIR", self.path("upload-cache"))
            .env_remove("GRANARY_SERVER")
            .output()
            .unwrap();
        ok(&format!("upload {dataset}"), o);
    }
}

/// Checks `errno` of a failed call.
#[track_caller]
fn erofs<T: std::fmt::Debug>(what: &str, r: std::io::Result<T>) {
    let e = r.expect_err(what);
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{what}: {e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mounted_version_reads_like_the_source_and_refuses_writes() {
    let f = Fixture::new().await;
    let src = f.path("src");
    make_tree(&src, 1);
    f.upload(&src, "ds");
    let mnt = f.path("mnt");
    let m = MountGuard::mount(&f.addr, "ds@1", &mnt, &f.path("cache"));

    // Random small reads fetch what they touch and prefetch nothing.
    {
        let want = fs::read(src.join("big.bin")).unwrap();
        let file = File::open(mnt.join("big.bin")).unwrap();
        let mut rng = fastrand::Rng::with_seed(3);
        for _ in 0..20 {
            let off = rng.usize(..want.len());
            let mut buf = [0u8; 4096];
            let n = file.read_at(&mut buf, off as u64).unwrap();
            assert_eq!(&buf[..n], &want[off..(off + 4096).min(want.len())]);
        }
        let st = wait_stats(&m, |s| s["reads"].as_u64().unwrap() >= 20);
        eprintln!("after 20 random 4 KiB reads: {st}");
        assert_eq!(st["prefetched_chunks"], 0, "{st}");
        assert!(st["chunks_fetched"].as_u64().unwrap() <= 40, "{st}");
    }

    // Names, kinds, sizes, modes, symlink targets, content hashes.
    let started = Instant::now();
    assert_eq!(snapshot_without_mtimes(&mnt), snapshot_without_mtimes(&src));
    eprintln!("cold walk + hash of the whole version: {:?}", started.elapsed());
    let meta = fs::metadata(mnt.join("small.txt")).unwrap();
    assert_eq!(meta.nlink(), 1);

    // Random reads across chunk boundaries, and at and past EOF.
    let want = fs::read(src.join("big.bin")).unwrap();
    let file = File::open(mnt.join("big.bin")).unwrap();
    let mut rng = fastrand::Rng::with_seed(9);
    for _ in 0..300 {
        let off = rng.usize(..want.len() + 1000);
        let len = rng.usize(1..300_000);
        let mut buf = vec![0u8; len];
        let n = file.read_at(&mut buf, off as u64).unwrap();
        let from = off.min(want.len());
        let to = (off + len).min(want.len());
        assert_eq!(&buf[..n], &want[from..to], "read {len} at {off}");
    }
    let mut buf = [0u8; 10];
    assert_eq!(file.read_at(&mut buf, want.len() as u64).unwrap(), 0);
    assert_eq!(file.read_at(&mut buf, want.len() as u64 + 12345).unwrap(), 0);
    assert_eq!(file.read_at(&mut buf, want.len() as u64 - 3).unwrap(), 3);

    // Eight threads reading different files and ranges at once.
    let src = Arc::new(src);
    let mnt = Arc::new(mnt);
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let (src, mnt) = (src.clone(), mnt.clone());
            std::thread::spawn(move || {
                let mut rng = fastrand::Rng::with_seed(100 + t);
                let names = ["big.bin", "train/text.csv", "a/b/mid.bin", "a/b/c/deep.bin"];
                for _ in 0..60 {
                    let name = names[rng.usize(..names.len())];
                    let want = fs::read(src.join(name)).unwrap();
                    let f = File::open(mnt.join(name)).unwrap();
                    let off = rng.usize(..want.len());
                    let mut buf = vec![0u8; rng.usize(1..200_000)];
                    let n = f.read_at(&mut buf, off as u64).unwrap();
                    assert_eq!(&buf[..n], &want[off..(off + buf.len()).min(want.len())]);
                }
                // And one whole sequential read.
                let mut all = Vec::new();
                File::open(mnt.join("train/text.csv"))
                    .unwrap()
                    .read_to_end(&mut all)
                    .unwrap();
                assert_eq!(all, fs::read(src.join("train/text.csv")).unwrap());
            })
        })
        .collect();
    for t in threads {
        t.join().expect("reader thread");
    }

    // Writes of every kind fail with EROFS; nothing changes.
    let mnt: &Path = &mnt;
    erofs("create", File::create(mnt.join("new")));
    erofs(
        "open for writing",
        fs::OpenOptions::new().write(true).open(mnt.join("small.txt")),
    );
    erofs(
        "truncate",
        fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(mnt.join("one")),
    );
    erofs("unlink", fs::remove_file(mnt.join("small.txt")));
    erofs("mkdir", fs::create_dir(mnt.join("d")));
    erofs("rmdir", fs::remove_dir(mnt.join("empty dir")));
    erofs("rename", fs::rename(mnt.join("one"), mnt.join("two")));
    erofs(
        "chmod",
        fs::set_permissions(mnt.join("one"), fs::Permissions::from_mode(0o777)),
    );
    erofs("symlink", std::os::unix::fs::symlink("x", mnt.join("l2")));
    erofs("hard link", fs::hard_link(mnt.join("one"), mnt.join("one2")));
    assert_eq!(snapshot_without_mtimes(mnt), snapshot_without_mtimes(&src));
    let nothing = fs::metadata(mnt.join("nothing-here")).unwrap_err();
    assert_eq!(nothing.kind(), ErrorKind::NotFound);

    drop(file);
    let stats = m.umount();
    eprintln!("counters after the first test: {stats}");
    assert!(stats["bytes_fetched"].as_u64().unwrap() > 0);
    assert!(
        stats["prefetched_chunks"].as_u64().unwrap() > 0,
        "sequential reads prefetch: {stats}"
    );
    assert_eq!(stats["corrupt"], 0);
}

/// Polls the mount's counters (rewritten twice a second) until `done` holds.
fn wait_stats(m: &MountGuard, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let st = m.stats()["stats"].clone();
        if done(&st) {
            return st;
        }
        assert!(Instant::now() < deadline, "counters never got there: {st}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Bytes of every regular file under `root` (by a full read), to warm or check counters.
fn read_everything(root: &Path) -> u64 {
    file_bytes(&snapshot_without_mtimes(root))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_versions_warm_remount_corrupt_cache_and_prefetch() {
    let f = Fixture::new().await;
    let src = f.path("src");
    make_tree(&src, 2);
    f.upload(&src, "ds");
    let v1 = snapshot_without_mtimes(&src);
    // Version 2: one file changed, one removed, one added.
    fs::write(src.join("small.txt"), b"changed in v2").unwrap();
    fs::remove_file(src.join("a/b/mid.bin")).unwrap();
    fs::write(src.join("added.bin"), vec![7u8; 123_456]).unwrap();
    f.upload(&src, "ds");
    let v2 = snapshot_without_mtimes(&src);
    assert_ne!(v1, v2);

    // The embedded server's packs are on this host's disk: a mount reads
    // them there and does not copy them into its disk cache.
    let m1 = MountGuard::mount(&f.addr, "ds@1", &f.path("m1"), &f.path("cache-local"));
    assert_eq!(snapshot_without_mtimes(&f.path("m1")), v1);
    let local = m1.umount();
    eprintln!("counters with local reads: {local}");
    assert!(local["bytes_fetched"].as_u64().unwrap() > 0, "{local}");
    assert_eq!(local["local_bytes"], local["bytes_fetched"], "{local}");
    assert_eq!(local["disk_bytes"], 0, "{local}");

    // The rest is about the disk cache, as on a host without a chunk server:
    // local reads off.
    let mount = |version: &str, at: &str, cache: &Path| {
        MountGuard::mount_with_env(
            &f.addr,
            version,
            &f.path(at),
            cache,
            &[],
            &[("GRANARY_LOCAL_READS", "0")],
        )
    };
    // Both versions mounted at once, sharing one cache directory.
    let cache = f.path("cache");
    let m1 = mount("ds@1", "m1", &cache);
    let m2 = mount("ds", "m2", &cache);
    assert_eq!(snapshot_without_mtimes(&f.path("m1")), v1);
    assert_eq!(snapshot_without_mtimes(&f.path("m2")), v2);
    let s1 = m1.umount();
    let s2 = m2.umount();
    eprintln!("cold counters: v1 {s1}\nv2 {s2}");
    assert_eq!(s1["local_bytes"], 0, "{s1}");

    // Remount: the disk cache holds everything, nothing comes from the server.
    let m2 = mount("ds@2", "m2", &cache);
    let started = Instant::now();
    let total = read_everything(&f.path("m2"));
    eprintln!("warm read of {total} bytes: {:?}", started.elapsed());
    let warm = m2.umount();
    eprintln!("warm counters: {warm}");
    assert_eq!(warm["bytes_fetched"], 0, "{warm}");
    assert_eq!(warm["misses"], 0, "{warm}");
    assert!(warm["disk_hits"].as_u64().unwrap() > 0, "{warm}");

    // Damage two cached chunks in their segment files: detected, marked
    // dead, refetched, counted once.
    let mut damaged = 0u64;
    {
        use std::os::unix::fs::FileExt;
        let disk = granary_fuse::DiskCache::open(&cache, u64::MAX).unwrap();
        for (_, path, off, len) in disk.records().into_iter().filter(|r| r.3 > 1000).take(2) {
            let file = fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
            let mut b = [0u8; 1];
            file.read_exact_at(&mut b, off + 500).unwrap();
            file.write_all_at(&[b[0] ^ 0xff], off + 500).unwrap();
            damaged += len as u64;
        }
    }
    assert!(damaged > 0);
    let m2 = mount("ds@2", "m2", &cache);
    let m1 = mount("ds@1", "m1", &cache);
    assert_eq!(snapshot_without_mtimes(&f.path("m2")), v2);
    assert_eq!(snapshot_without_mtimes(&f.path("m1")), v1);
    let a = m2.umount();
    let b = m1.umount();
    eprintln!("after damage: {a}\n{b}");
    let corrupt = a["corrupt"].as_u64().unwrap() + b["corrupt"].as_u64().unwrap();
    assert_eq!(corrupt, 2);
    let refetched = a["bytes_fetched"].as_u64().unwrap() + b["bytes_fetched"].as_u64().unwrap();
    assert_eq!(refetched, damaged);

    // `granary prefetch` warms a fresh cache; a mount on it fetches nothing.
    let cache2 = f.path("cache2");
    let o = granary(&[
        "prefetch",
        "ds@1",
        "--server",
        &f.addr,
        "--cache-dir",
        s(&cache2),
        "--json",
    ]);
    let out: Value = serde_json::from_str(&ok("prefetch", o)).unwrap();
    eprintln!("prefetch: {out}");
    assert!(out["fetched_bytes"].as_u64().unwrap() > 0);
    let o = granary(&[
        "prefetch",
        "ds@1",
        "a",
        "--server",
        &f.addr,
        "--cache-dir",
        s(&cache2),
        "--json",
    ]);
    let again: Value = serde_json::from_str(&ok("prefetch again", o)).unwrap();
    assert_eq!(again["fetched_bytes"], 0, "{again}");
    // A cache too small for the version: prefetch says what did not fit.
    let o = granary(&[
        "prefetch",
        "ds@1",
        "--server",
        &f.addr,
        "--cache-dir",
        s(&f.path("cache-small")),
        "--cache-size",
        "64KiB",
    ]);
    let err = text(&o.stderr);
    assert!(!o.status.success(), "prefetch into a 64 KiB cache succeeded");
    assert!(
        err.contains("fit in the disk cache") && err.contains("--cache-size"),
        "{err}"
    );
    let m1 = MountGuard::mount(&f.addr, "ds@1", &f.path("m1"), &cache2);
    assert_eq!(snapshot_without_mtimes(&f.path("m1")), v1);
    let st = m1.umount();
    assert_eq!(st["bytes_fetched"], 0, "{st}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_mounts_fail_clearly_and_sigterm_unmounts() {
    let f = Fixture::new().await;
    let src = f.path("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("x"), b"x").unwrap();
    f.upload(&src, "ds");
    let mnt = f.path("mnt");
    fs::create_dir_all(&mnt).unwrap();
    let cache = f.path("cache");
    for (version, needle) in [
        ("nope", "dataset 'nope' not found"),
        ("ds@7", "version ds@7 not found"),
        ("bad name!", "invalid dataset name"),
    ] {
        let o = granary(&[
            "mount",
            version,
            s(&mnt),
            "--server",
            &f.addr,
            "--cache-dir",
            s(&cache),
        ]);
        let err = text(&o.stderr);
        eprintln!("mount {version}: {err}");
        assert!(!o.status.success(), "mount {version} succeeded");
        assert!(
            err.starts_with("error: ") && err.contains(needle),
            "mount {version}: {err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(!is_mounted(&mnt), "a failed mount left {} mounted", mnt.display());
    }
    let o = granary(&[
        "mount",
        "ds",
        s(&f.path("missing")),
        "--server",
        &f.addr,
        "--cache-dir",
        s(&cache),
    ]);
    assert!(text(&o.stderr).contains("does not exist"), "{}", text(&o.stderr));
    let o = granary(&["umount", s(&mnt)]);
    assert!(text(&o.stderr).contains("not mounted"), "{}", text(&o.stderr));

    // --foreground stays attached; SIGTERM unmounts and exits cleanly.
    let mut child = Command::new(BIN)
        .args([
            "mount",
            "ds",
            s(&mnt),
            "--foreground",
            "--server",
            &f.addr,
            "--cache-dir",
            s(&cache),
        ])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let _guard = MountGuard {
        path: mnt.clone(),
        cache: cache.clone(),
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !is_mounted(&mnt) {
        assert!(Instant::now() < deadline, "foreground mount never appeared");
        assert!(child.try_wait().unwrap().is_none(), "foreground mount exited");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(fs::read(mnt.join("x")).unwrap(), b"x");
    let o = granary(&[
        "mount",
        "ds",
        s(&mnt),
        "--server",
        &f.addr,
        "--cache-dir",
        s(&cache),
    ]);
    assert!(
        text(&o.stderr).contains("already a mountpoint"),
        "{}",
        text(&o.stderr)
    );
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(status.success(), "foreground mount exited with {status}");
    assert!(!is_mounted(&mnt), "SIGTERM left the mount in place");

    // A mount whose process was killed leaves a stale mountpoint (every
    // stat fails with ENOTCONN): mount says so, umount (given the path with
    // a trailing slash) clears it.
    let mut child = Command::new(BIN)
        .args(["mount", "ds", s(&mnt), "--foreground", "--server", &f.addr])
        .args(["--cache-dir", s(&cache)])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !is_mounted(&mnt) {
        assert!(Instant::now() < deadline, "foreground mount never appeared");
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let stale = fs::metadata(&mnt).unwrap_err();
    assert_eq!(stale.raw_os_error(), Some(libc::ENOTCONN), "{stale}");
    let o = granary(&[
        "mount",
        "ds",
        s(&mnt),
        "--server",
        &f.addr,
        "--cache-dir",
        s(&cache),
    ]);
    let err = text(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("is a stale mount") && err.contains("granary umount"),
        "{err}"
    );
    let o = granary(&["umount", &format!("{}/", mnt.display())]);
    assert!(o.status.success(), "umount of a stale mount: {}", text(&o.stderr));
    assert!(!is_mounted(&mnt), "the stale mount is still there");
    assert!(fs::metadata(&mnt).unwrap().is_dir());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_fail_with_eio_while_the_cluster_is_down_and_recover() {
    let mut f = Fixture::new().await;
    let src = f.path("src");
    make_tree(&src, 4);
    f.upload(&src, "ds");
    let mnt = f.path("mnt");
    let m = MountGuard::mount(&f.addr, "ds", &mnt, &f.path("cache"));
    // Cached before the outage: the listing and one file.
    assert_eq!(
        fs::read(mnt.join("small.txt")).unwrap(),
        fs::read(src.join("small.txt")).unwrap()
    );
    f.cluster.kill(1);
    let started = Instant::now();
    let e = fs::read(mnt.join("a/b/mid.bin")).unwrap_err();
    eprintln!("read during the outage: {e} after {:?}", started.elapsed());
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    assert!(started.elapsed() < Duration::from_secs(30));
    // What is cached still reads.
    assert_eq!(
        fs::read(mnt.join("small.txt")).unwrap(),
        fs::read(src.join("small.txt")).unwrap()
    );
    f.cluster.restart(1);
    f.cluster.wait_leader(&[1], Duration::from_secs(20)).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match fs::read(mnt.join("a/b/mid.bin")) {
            Ok(b) => {
                assert_eq!(b, fs::read(src.join("a/b/mid.bin")).unwrap());
                break;
            }
            Err(e) => {
                assert!(Instant::now() < deadline, "reads never recovered: {e}");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
    assert_eq!(snapshot_without_mtimes(&mnt), snapshot_without_mtimes(&src));
    let st = m.umount();
    eprintln!("counters after the outage: {st}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_stay_correct_while_a_replica_holder_dies() {
    let mut c = Cluster::start(3).await;
    let tmp = tempfile::Builder::new()
        .prefix("granary-mount-")
        .tempdir()
        .unwrap();
    let src = tmp.path().join("src");
    fs::create_dir_all(&src).unwrap();
    let mut rng = fastrand::Rng::with_seed(33);
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    for i in 0..16 {
        let name = format!("f{i:02}.bin");
        let n = rng.usize(500_000..3_000_000);
        let data = random_bytes(&mut rng, n);
        fs::write(src.join(&name), &data).unwrap();
        files.push((name, data));
    }
    let addrs = format!("{},{},{}", c.addr(1), c.addr(2), c.addr(3));
    let o = Command::new(BIN)
        .args([
            "upload",
            s(&src),
            "ds",
            "--pack-size",
            "1MiB",
            "--server",
            &c.addr(1),
        ])
        .env("RUST_LOG", "warn")
        .env("GRANARY_CACHE_DIR", tmp.path().join("upload-cache"))
        .env_remove("GRANARY_SERVER")
        .output()
        .unwrap();
    ok("upload", o);
    // Every pack is on all three nodes; node 3 is the first replica of some,
    // so reads of those must move on to another replica once it is gone.
    let packs = c.client(1).list_packs(None, None).await.unwrap();
    let led_by_3 = packs.iter().filter(|p| p.replicas[0] == 3).count();
    eprintln!("{} packs, {led_by_3} with node 3 as first replica", packs.len());
    for p in &packs {
        let mut r = p.replicas.clone();
        r.sort();
        assert_eq!(r, vec![1, 2, 3], "pack {} replicas {:?}", p.id, p.replicas);
    }
    assert!(led_by_3 > 0, "node 3 leads no pack chain: {packs:?}");

    // No memory or disk cache: every read the kernel passes on is a fetch,
    // and no local reads: node 3's files stay on this host's disk after it
    // dies, a client on another host has only the network.
    let mnt = tmp.path().join("mnt");
    let cache = tmp.path().join("cache");
    let m = MountGuard::mount_with_env(
        &addrs,
        "ds@1",
        &mnt,
        &cache,
        &["--mem-cache", "0", "--cache-size", "0"],
        &[("GRANARY_LOCAL_READS", "0")],
    );

    let files = Arc::new(files);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let killed_at = Arc::new(std::sync::Mutex::new(None::<Instant>));
    let reader = {
        let (files, stop, killed_at, mnt) = (files.clone(), stop.clone(), killed_at.clone(), mnt.clone());
        std::thread::spawn(move || {
            let mut rng = fastrand::Rng::with_seed(77);
            let (mut before, mut after) = (0u64, 0u64);
            let mut slowest = Duration::ZERO;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let (name, want) = &files[rng.usize(..files.len())];
                let off = rng.usize(..want.len());
                let len = rng.usize(1..600_000);
                let killed = killed_at.lock().unwrap().is_some();
                let started = Instant::now();
                let got = read_uncached(&mnt.join(name), off as u64, len).unwrap_or_else(|e| {
                    panic!("read {len} at {off} of {name} (node 3 killed: {killed}): {e}")
                });
                slowest = slowest.max(started.elapsed());
                assert!(
                    got == want[off..(off + len).min(want.len())],
                    "wrong bytes: read {len} at {off} of {name} (node 3 killed: {killed})"
                );
                if killed {
                    after += 1;
                } else {
                    before += 1;
                }
            }
            (before, after, slowest)
        })
    };

    std::thread::sleep(Duration::from_secs(2));
    assert!(!reader.is_finished(), "the reader failed before the kill");
    c.kill(3);
    *killed_at.lock().unwrap() = Some(Instant::now());
    eprintln!("killed node 3");
    std::thread::sleep(Duration::from_secs(5));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (before, after, slowest) = reader.join().expect("reader thread");
    eprintln!("random reads: {before} before the kill, {after} after; slowest {slowest:?}");
    assert!(
        before > 0 && after >= 10,
        "too few reads: {before} before, {after} after"
    );

    // Every file, whole and sequential (readahead batches across all packs).
    for (name, want) in files.iter() {
        let got = read_uncached(&mnt.join(name), 0, want.len() + 1)
            .unwrap_or_else(|e| panic!("full read of {name} after the kill: {e}"));
        assert!(got == *want, "wrong bytes in the full read of {name}");
    }

    let st = m.umount();
    eprintln!("counters: {st}");
    assert_eq!(st["fetch_errors"], 0, "{st}");
    assert_eq!(st["corrupt"], 0, "{st}");
    // The mount's log shows reads that moved on from node 3.
    let mut log = String::new();
    for e in fs::read_dir(cache.join("mounts")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "log") {
            log.push_str(&fs::read_to_string(p).unwrap());
        }
    }
    let moved = log.matches("trying another").count();
    eprintln!("{moved} fetches moved to another replica");
    assert!(moved > 0, "no fetch failed over; mount log:\n{log}");
}
