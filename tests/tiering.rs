//! End-to-end tests of tiering: real `granary server` processes with an
//! object tier, driven through the real `granary upload / download / mount /
//! admin tier` command line, checked through `tier status`, the nodes' pack
//! directories and a listing of the object store itself.
//!
//! Every check is a function of the object-store URL and runs twice: against a
//! local directory (`file://<tempdir>`) and against S3
//! (`$GRANARY_TEST_S3_URL/<unique prefix>`, the moto server `scripts/test`
//! starts). The S3 variants fail, not skip, when that variable is unset.
//!
//! 1. a version moves to the object tier and back, byte-identical through
//!    `download` and a FUSE mount each way; 2. packs shared with a version that
//!    stays hot stay on SSD; 3. kill -9 of the mover (and of the chunk server's
//!    upload) at every crash point, then a restart finishes the move while a
//!    download runs; 4. a cold-after policy moves a version to the object tier
//!    and, once it is read again, back; 5. bad input fails with one clear line;
//! 6. a cluster whose nodes do not name one object store refuses to tier.

#[macro_use]
mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use granary_client::object::ObjectTier;
use serde_json::Value;

const SEC: Duration = Duration::from_secs(1);

// ---------------------------------------------------------------------------
// Object stores
// ---------------------------------------------------------------------------

/// The local directory of a `file://` URL.
fn file_dir(url: &str) -> Option<PathBuf> {
    url.strip_prefix("file://").map(PathBuf::from)
}

/// (pack id, size) of every pack object in the object store at `url`, read
/// from the store itself (not through Granary's metadata).
async fn object_packs(url: &str) -> Vec<(u64, u64)> {
    let tier = ObjectTier::from_url(url).unwrap_or_else(|e| panic!("object tier {url}: {e}"));
    let mut packs = tier
        .list_packs()
        .await
        .unwrap_or_else(|e| panic!("listing {url}: {e}"));
    packs.sort_unstable();
    packs
}

/// `*.pack` files below a `file://` tier's directory (any name, any depth).
fn pack_files_below(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    let Ok(entries) = fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        let m = fs::symlink_metadata(&p).unwrap();
        if m.is_dir() {
            out.extend(pack_files_below(&p));
        } else if p.extension().is_some_and(|x| x == "pack") {
            out.push((p, m.len()));
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Servers and the CLI
// ---------------------------------------------------------------------------

/// One node with `--object-store url` and the given environment.
async fn start(url: &str, env: &[(&str, &str)]) -> Cluster {
    let mut opts = NodeOptions::default().arg("--object-store").arg(url);
    for (k, v) in env {
        opts = opts.env(*k, *v);
    }
    Cluster::start_with(1, opts).await
}

/// `granary admin tier ARGS --server ADDR --json`.
#[track_caller]
fn tier_json(addr: &str, args: &[&str]) -> Value {
    let mut all = vec!["admin", "tier"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--server", addr, "--json"]);
    let v = ok_json(&format!("tier {}", args.join(" ")), granary(&all));
    eprintln!("tier {}: {v}", args.join(" "));
    v
}

fn tier_status(addr: &str) -> Result<Value, String> {
    let o = granary(&["admin", "tier", "status", "--server", addr, "--json"]);
    if !o.status.success() {
        return Err(format!("tier status failed: {}", text(&o.stderr).trim()));
    }
    serde_json::from_slice(&o.stdout).map_err(|e| format!("tier status printed no JSON ({e})"))
}

/// The `datasets[]` entry of `name` in a tier status.
fn ds_of<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["datasets"]
        .as_array()
        .and_then(|a| a.iter().find(|d| d["dataset"] == name))
        .unwrap_or_else(|| panic!("tier status lists no dataset {name}: {status}"))
}

fn n(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("field {key} is not a number in {v}"))
}

fn queue_len(status: &Value) -> usize {
    status["queue"].as_array().map_or(0, Vec::len)
}

/// Waits until the mover's queue is empty; returns that status.
async fn wait_queue_empty(addr: &str, timeout: Duration) -> Value {
    wait_for("an empty mover queue", timeout, || async {
        let st = tier_status(addr)?;
        if queue_len(&st) == 0 {
            Ok(st)
        } else {
            Err(format!("queue: {}", st["queue"]))
        }
    })
    .await
}

/// (count, bytes) of the `*.pack` files in a node's `DATA/packs` directory.
fn ssd_packs(data_dir: &Path) -> (usize, u64) {
    let files = pack_files_below(&data_dir.join("packs"));
    (files.len(), files.iter().map(|(_, len)| len).sum())
}

/// Waits until node `data_dir` holds no `.pack` bytes (the mover deletes the
/// replicas right after recording the move; the chunk server's sweep removes
/// any it left).
async fn wait_no_ssd_packs(data_dir: &Path, timeout: Duration) {
    wait_for("no pack file on SSD", timeout, || async {
        match ssd_packs(data_dir) {
            (0, 0) => Ok(()),
            (files, bytes) => Err(format!("{files} pack file(s), {bytes} bytes")),
        }
    })
    .await
}

/// `granary upload SRC DATASET --pack-size 1MiB --json`, with the file cache in `work`.
#[track_caller]
fn upload(addr: &str, src: &Path, dataset: &str, work: &Path) -> Value {
    upload_with(addr, src, dataset, work, &[])
}

/// [`upload`] with `extra` flags.
#[track_caller]
fn upload_with(addr: &str, src: &Path, dataset: &str, work: &Path, extra: &[&str]) -> Value {
    let mut args = vec![
        "upload",
        s(src),
        dataset,
        "--pack-size",
        "1MiB",
        "--json",
        "--server",
        addr,
    ];
    args.extend_from_slice(extra);
    let o = granary_cmd(&args)
        .env("GRANARY_CACHE_DIR", work.join("upload-cache"))
        .output()
        .expect("run granary upload");
    let v = ok_json(&format!("upload {dataset}"), o);
    eprintln!("upload {dataset}: {v}");
    v
}

// ---------------------------------------------------------------------------
// Trees
// ---------------------------------------------------------------------------

/// About 5 MiB in nested directories: incompressible and repetitive files,
/// an empty file, an empty directory, a few modes.
fn make_tree(root: &Path, seed: u64) {
    let mut rng = fastrand::Rng::with_seed(seed);
    for d in ["a/b/c", "text", "empty dir"] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    for (path, len) in [
        ("empty", 0),
        ("big.bin", 2_600_000),
        ("a/one.bin", 700_000),
        ("a/b/c/deep.bin", 1_300_000),
        ("a/b/small", 100),
    ] {
        fs::write(root.join(path), random_bytes(&mut rng, len)).unwrap();
    }
    let text: String = (0..40_000).map(|i| format!("row {i}, seed {seed}\n")).collect();
    fs::write(root.join("text/rows.csv"), text).unwrap();
    fs::set_permissions(root.join("a/b/small"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::set_permissions(root.join("a/one.bin"), fs::Permissions::from_mode(0o755)).unwrap();
}

/// [`make_tree`] with `seed` in `work/src`; returns its path and snapshot.
fn source_tree(work: &Path, seed: u64) -> (PathBuf, Snapshot) {
    let src = work.join("src");
    make_tree(&src, seed);
    let want = snapshot_without_mtimes(&src);
    (src, want)
}

/// Downloads `version` into the fresh directory `dest` and compares it with `want`.
#[track_caller]
fn download_same(addr: &str, version: &str, dest: &Path, want: &Snapshot) {
    download_with(addr, version, dest, want, &[], &[]);
}

/// [`download_same`] with `set` added to and `unset` removed from the
/// client's environment; returns the `--json` report, with the client's
/// log lines (warnings and errors) as `"stderr"`.
#[track_caller]
fn download_with(
    addr: &str,
    version: &str,
    dest: &Path,
    want: &Snapshot,
    set: &[(&str, &str)],
    unset: &[&str],
) -> Value {
    let mut cmd = granary_cmd(&["download", version, s(dest), "--server", addr, "--json"]);
    cmd.envs(set.iter().copied());
    for k in unset {
        cmd.env_remove(k);
    }
    let out = cmd.output().expect("run granary");
    let stderr = text(&out.stderr);
    let mut report = ok_json(&format!("download {version}"), out);
    report["stderr"] = Value::String(stderr);
    assert_same(
        &format!("download of {version}"),
        want,
        &snapshot_without_mtimes(dest),
    );
    report
}

// ---------------------------------------------------------------------------
// FUSE mounts
// ---------------------------------------------------------------------------

/// Mounts `version` with a fresh cache (so every byte comes from the
/// servers), compares the whole tree with `want`, unmounts. Returns the
/// mount's final counters.
#[track_caller]
fn mount_same(addr: &str, version: &str, work: &Path, tag: &str, want: &Snapshot) -> Value {
    let mnt = work.join(format!("mnt-{tag}"));
    let m = MountGuard::mount(addr, version, &mnt, &work.join(format!("mount-cache-{tag}")));
    assert_same(
        &format!("mount of {version} ({tag})"),
        want,
        &snapshot_without_mtimes(&mnt),
    );
    m.umount()
}

fn workdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("granary-tiering-")
        .tempdir()
        .expect("temp dir")
}

// ---------------------------------------------------------------------------
// 1. A version to the object tier and back
// ---------------------------------------------------------------------------

async fn move_to_object_and_back(url: &str) {
    let started = Instant::now();
    let work = workdir();
    let work = work.path();
    let c = start(url, &[]).await;
    let addr = c.addr(1);
    let data = c.node(1).dir.clone();
    let (src, want) = source_tree(work, 1);
    let up = upload(&addr, &src, "ds", work);
    let packs = n(&up, "packs");
    assert!(packs >= 4, "expected several 1 MiB packs: {up}");
    let (files, bytes) = ssd_packs(&data);
    assert_eq!(files as u64, packs, "pack files on SSD after the upload");
    let st = tier_status(&addr).unwrap();
    assert_eq!(st["object_store"], url, "{st}");
    assert_eq!(n(ds_of(&st, "ds"), "ssd_bytes"), bytes, "{st}");
    assert_eq!(n(ds_of(&st, "ds"), "object_bytes"), 0, "{st}");
    assert!(object_packs(url).await.is_empty());

    // To the object tier.
    let mv = tier_json(&addr, &["move", "ds@1", "--to", "object"]);
    assert_eq!(mv["done"], true, "{mv}");
    assert_eq!(mv["to"], "object", "{mv}");
    assert_eq!(mv["versions"], serde_json::json!([1]), "{mv}");
    assert_eq!(n(&mv, "packs_used"), packs, "{mv}");
    assert_eq!(n(&mv, "queued"), packs, "{mv}");
    assert_eq!(n(&mv, "queued_bytes"), bytes, "{mv}");
    assert_eq!(n(&mv, "kept_shared"), 0, "{mv}");
    let st = tier_status(&addr).unwrap();
    let d = ds_of(&st, "ds");
    assert_eq!(n(d, "ssd_bytes"), 0, "{st}");
    assert_eq!(n(d, "object_bytes"), bytes, "{st}");
    assert_eq!(n(d, "moving_bytes"), 0, "{st}");
    assert_eq!(d["pinned_to_object"], serde_json::json!([1]), "{st}");
    assert_eq!(n(&st["totals"], "ssd_packs"), 0, "{st}");
    assert_eq!(n(&st["totals"], "object_packs"), packs, "{st}");
    assert_eq!(queue_len(&st), 0, "{st}");
    wait_no_ssd_packs(&data, 10 * SEC).await;
    let objects = object_packs(url).await;
    assert_eq!(objects.len() as u64, packs, "objects: {objects:?}");
    assert_eq!(objects.iter().map(|(_, len)| len).sum::<u64>(), bytes);
    if let Some(dir) = file_dir(url) {
        let files = pack_files_below(&dir);
        assert_eq!(files.len() as u64, packs, "{files:?}");
        assert_eq!(files.iter().map(|(_, len)| len).sum::<u64>(), bytes);
    }
    // Clients read the object tier themselves: the tier is a directory on
    // this host, or an S3 server whose AWS_* variables they have too.
    let direct = download_with(&addr, "ds@1", &work.join("dl-object"), &want, &[], &[]);
    assert!(
        n(&direct, "object_read_bytes") > 0 && n(&direct, "object_read_bytes") <= bytes,
        "read directly from the object tier: {direct}"
    );
    let stats = mount_same(&addr, "ds@1", work, "object", &want);
    assert!(
        n(&stats, "object_read_bytes") > 0,
        "the mount read the object tier directly: {stats}"
    );
    // Through the chunk server when told to, and when the client cannot
    // open the tier: no credentials for S3, or another endpoint than the
    // servers' (nothing listens there). It does not even try then.
    type Env<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a [&'a str]);
    let mut through_server: Vec<Env> = vec![("told", &[("GRANARY_OBJECT_READS", "server")], &[])];
    if url.starts_with("s3://") {
        through_server.push((
            "no-credentials",
            &[],
            &["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"],
        ));
        through_server.push((
            "other-endpoint",
            &[("AWS_ENDPOINT", "http://127.0.0.1:9")],
            &["AWS_ENDPOINT_URL"],
        ));
    }
    for (tag, set, unset) in through_server {
        let dest = work.join(format!("dl-object-{tag}"));
        let r = download_with(&addr, "ds@1", &dest, &want, set, unset);
        assert_eq!(n(&r, "object_read_bytes"), 0, "{tag}: {r}");
        let log = r["stderr"].as_str().unwrap();
        assert!(
            !log.contains("object tier directly failed"),
            "{tag}: tried it: {r}"
        );
    }

    // Moving it again queues nothing.
    let again = tier_json(&addr, &["move", "ds", "--to", "object"]);
    assert_eq!(
        (n(&again, "queued"), again["done"].clone()),
        (0, Value::Bool(true))
    );

    // Back to SSD.
    let back = tier_json(&addr, &["move", "ds@1", "--to", "ssd"]);
    assert_eq!(back["done"], true, "{back}");
    assert_eq!(n(&back, "queued"), packs, "{back}");
    let st = tier_status(&addr).unwrap();
    let d = ds_of(&st, "ds");
    assert_eq!(n(d, "ssd_bytes"), bytes, "{st}");
    assert_eq!(n(d, "object_bytes"), 0, "{st}");
    assert_eq!(d["pinned_to_object"], serde_json::json!([]), "{st}");
    assert_eq!(n(&st["totals"], "object_packs"), 0, "{st}");
    assert_eq!(ssd_packs(&data), (packs as usize, bytes));
    wait_for("the object copies to be deleted", 10 * SEC, || async {
        let left = object_packs(url).await;
        let files = file_dir(url).map(|d| pack_files_below(&d)).unwrap_or_default();
        if left.is_empty() && files.is_empty() {
            Ok(())
        } else {
            Err(format!("objects {left:?}, files {files:?}"))
        }
    })
    .await;
    let back = download_with(&addr, "ds@1", &work.join("dl-ssd"), &want, &[], &[]);
    assert_eq!(n(&back, "object_read_bytes"), 0, "back on SSD: {back}");
    mount_same(&addr, "ds@1", work, "ssd", &want);
    eprintln!("move_to_object_and_back({url}) took {:?}", started.elapsed());
}

object_store_tests!(
    move_to_object_and_back,
    file_move_to_object_and_back,
    s3_move_to_object_and_back,
    "tiering-move"
);

// ---------------------------------------------------------------------------
// 2. Shared packs stay with the hot version
// ---------------------------------------------------------------------------

async fn shared_packs_stay_on_ssd(url: &str) {
    let started = Instant::now();
    let work = workdir();
    let work = work.path();
    let c = start(url, &[]).await;
    let addr = c.addr(1);
    let data = c.node(1).dir.clone();
    let src = work.join("src");
    make_tree(&src, 2);
    // A 4 MB big.bin, chunked by one thread so that its chunks follow each
    // other in the packs: some packs hold nothing else, and only ds@1 uses
    // them once ds@2 replaces big.bin. Every other pack ds@2 uses too.
    let big = |seed| random_bytes(&mut fastrand::Rng::with_seed(seed), 4_000_000);
    fs::write(src.join("big.bin"), big(98)).unwrap();
    let want1 = snapshot_without_mtimes(&src);
    upload_with(&addr, &src, "ds", work, &["--threads", "1"]);
    fs::write(src.join("big.bin"), big(99)).unwrap();
    let want2 = snapshot_without_mtimes(&src);
    upload_with(&addr, &src, "ds", work, &["--threads", "1"]);
    let st = tier_status(&addr).unwrap();
    let total = n(&st["totals"], "ssd_packs");
    let total_bytes = n(&st["totals"], "ssd_bytes");

    let mv1 = tier_json(&addr, &["move", "ds@1", "--to", "object"]);
    assert_eq!(mv1["done"], true, "{mv1}");
    let (used1, queued1, kept1) = (n(&mv1, "packs_used"), n(&mv1, "queued"), n(&mv1, "kept_shared"));
    assert!(kept1 > 0, "ds@2 shares packs with ds@1: {mv1}");
    assert!(queued1 > 0, "the old big.bin fills packs only ds@1 uses: {mv1}");
    assert_eq!(queued1 + kept1, used1, "{mv1}");
    let st = tier_status(&addr).unwrap();
    let d = ds_of(&st, "ds");
    assert_eq!(d["pinned_to_object"], serde_json::json!([1]), "{st}");
    assert!(n(d, "ssd_bytes") > 0 && n(d, "object_bytes") > 0, "{st}");
    assert_eq!(n(&st["totals"], "object_packs"), queued1, "{st}");
    assert_eq!(n(&st["totals"], "ssd_packs"), total - queued1, "{st}");
    assert_eq!(n(d, "ssd_bytes") + n(d, "object_bytes"), total_bytes, "{st}");
    assert_eq!(object_packs(url).await.len() as u64, queued1);
    wait_for("only ds@1's own packs to leave the SSD", 10 * SEC, || async {
        let (files, _) = ssd_packs(&data);
        if files as u64 == total - queued1 {
            Ok(())
        } else {
            Err(format!("{files} pack files, want {}", total - queued1))
        }
    })
    .await;
    download_same(&addr, "ds@1", &work.join("dl-1a"), &want1);
    download_same(&addr, "ds@2", &work.join("dl-2a"), &want2);

    // Now ds@2 too: nothing stays hot, so every remaining pack moves.
    let mv2 = tier_json(&addr, &["move", "ds@2", "--to", "object"]);
    assert_eq!(mv2["done"], true, "{mv2}");
    assert_eq!(n(&mv2, "kept_shared"), 0, "{mv2}");
    assert_eq!(n(&mv2, "queued"), total - queued1, "{mv2}");
    let st = tier_status(&addr).unwrap();
    let d = ds_of(&st, "ds");
    assert_eq!(n(d, "ssd_bytes"), 0, "{st}");
    assert_eq!(n(d, "object_bytes"), total_bytes, "{st}");
    assert_eq!(d["pinned_to_object"], serde_json::json!([1, 2]), "{st}");
    assert_eq!(n(&st["totals"], "ssd_packs"), 0, "{st}");
    assert_eq!(object_packs(url).await.len() as u64, total);
    wait_no_ssd_packs(&data, 10 * SEC).await;
    download_same(&addr, "ds@1", &work.join("dl-1b"), &want1);
    download_same(&addr, "ds@2", &work.join("dl-2b"), &want2);
    eprintln!("shared_packs_stay_on_ssd({url}) took {:?}", started.elapsed());
}

object_store_tests!(
    shared_packs_stay_on_ssd,
    file_shared_packs_stay_on_ssd,
    s3_shared_packs_stay_on_ssd,
    "tiering-shared"
);

// ---------------------------------------------------------------------------
// 3. kill -9 at every step of a move
// ---------------------------------------------------------------------------

/// The crash points of a move to the object tier (server/src/fault.rs).
const CRASH_POINTS: [&str; 4] = [
    "move-after-upload",
    "move-after-record",
    "move-after-finish",
    "upload-before-put",
];

/// One crash point, on its own node and its own part of the object store.
async fn crash_at(url: &str, point: &str, src: &Path, want: &Snapshot, work: &Path) {
    let started = Instant::now();
    // GC's grace 1 s: its orphan sweep removes what a killed upload left.
    let mut c = start(url, &[("GRANARY_FAULT", point), ("GRANARY_GC_GRACE_SECS", "1")]).await;
    let addr = c.addr(1);
    let data = c.node(1).dir.clone();
    // Its own file cache: a fresh cluster has none of the chunks.
    let packs = n(&upload(&addr, src, "ds", &work.join(point)), "packs");
    let mv = tier_json(&addr, &["move", "ds", "--to", "object", "--no-wait"]);
    assert_eq!(n(&mv, "queued"), packs, "{mv}");
    assert_eq!(mv["done"], false, "{mv}");
    wait_for(&format!("the server to kill itself at {point}"), 30 * SEC, || {
        let running = c.is_running(1);
        async move {
            if running {
                Err("still running".to_string())
            } else {
                Ok(())
            }
        }
    })
    .await;
    assert!(
        c.node(1).log_tail(20).contains(&format!("GRANARY_FAULT={point}")),
        "node 1 died, but not at {point}:\n{}",
        c.node(1).log_tail(20)
    );

    // Until the move is recorded as finished, every replica file stays; the
    // chunk server dies before its first PUT, so nothing reached the store.
    let (files, _) = ssd_packs(&data);
    if point == "move-after-finish" {
        assert!(
            files >= 1,
            "{point}: the crash came before the replica files were deleted"
        );
    } else {
        assert_eq!(files as u64, packs, "{point}: pack files on SSD after the crash");
    }
    if point == "upload-before-put" {
        assert_eq!(
            object_packs(url).await,
            vec![],
            "{point}: objects after the crash"
        );
    }
    c.set_env(1, "GRANARY_FAULT", None);
    c.restart(1);
    c.wait_leader(&[1], 30 * SEC).await;
    // A reader while the mover finishes the moves.
    let dest = work.join(format!("dl-{point}"));
    let reader = {
        let (addr, dest) = (addr.clone(), dest.clone());
        std::thread::spawn(move || granary(&["download", "ds@1", s(&dest), "--server", &addr]))
    };
    let st = wait_queue_empty(&addr, 60 * SEC).await;
    let o = tokio::task::spawn_blocking(move || reader.join().expect("download thread"))
        .await
        .unwrap();
    ok(&format!("download during the restarted move ({point})"), o);
    assert_same(
        &format!("download after a crash at {point}"),
        want,
        &snapshot_without_mtimes(&dest),
    );

    let d = ds_of(&st, "ds");
    assert_eq!(n(d, "ssd_bytes"), 0, "{point}: {st}");
    assert!(n(d, "object_bytes") > 0, "{point}: {st}");
    assert_eq!(n(&st["totals"], "ssd_packs"), 0, "{point}: {st}");
    assert_eq!(n(&st["totals"], "object_packs"), packs, "{point}: {st}");
    let mut objects = object_packs(url).await;
    let mut ids: Vec<u64> = objects.iter().map(|(id, _)| *id).collect();
    ids.dedup();
    assert_eq!(ids.len() as u64, packs, "{point}: objects {objects:?}");
    if point == "move-after-upload" {
        assert!(objects.len() as u64 > packs, "{point}: objects {objects:?}");
    }
    if objects.len() as u64 > packs {
        // Uploads the crash cut off before their record (this one, or the
        // other packs' moving at the same time) stay under keys of their own
        // while the retry uploads again: GC deletes them, and only them, once
        // they are older than its grace period.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let g = ok_json("admin gc", granary(&["admin", "gc", "--json", "--server", &addr]));
        assert_eq!(n(&g, "orphan_objects"), objects.len() as u64 - packs, "{g}");
        objects = object_packs(url).await;
    }
    assert_eq!(objects.len() as u64, packs, "{point}: objects {objects:?}");
    assert_eq!(
        objects.iter().map(|(_, len)| len).sum::<u64>(),
        n(d, "object_bytes"),
        "{point}: object sizes {objects:?}"
    );
    // The mover deletes replicas after recording the move; a crash right
    // there leaves files that the chunk server's sweep (grace 2 s) removes.
    wait_no_ssd_packs(&data, 20 * SEC).await;
    download_same(&addr, "ds", &work.join(format!("dl-{point}-after")), want);
    eprintln!("crash at {point}: {:?}", started.elapsed());
}

async fn killed_mover_finishes_after_restart(url: &str) {
    let started = Instant::now();
    let work = workdir();
    let work = work.path();
    let (src, want) = source_tree(work, 3);
    for point in CRASH_POINTS {
        crash_at(&format!("{url}/{point}"), point, &src, &want, work).await;
    }
    eprintln!(
        "killed_mover_finishes_after_restart({url}) took {:?}",
        started.elapsed()
    );
}

object_store_tests!(
    killed_mover_finishes_after_restart,
    file_killed_mover_finishes_after_restart,
    s3_killed_mover_finishes_after_restart,
    "tiering-crash"
);

/// A late `DeletePack` (say, from the end of a move to the object tier whose
/// replies were slow) reaching a chunk server while a move back to SSD has
/// restored the pack there but not yet listed it in meta is refused, and
/// the chunk server's sweep of unlisted packs (2 s grace here) spares it
/// too: the copy the move is about to list survives, and the move finishes
/// on it. (Before the sweep checked for queued moves, it deleted such a
/// copy, and the move then listed a replica that was gone and deleted the
/// object copy.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_delete_spares_a_copy_a_queued_move_restored() {
    use granary_client::chunk_proto::chunk_client::ChunkClient;
    use granary_client::chunk_proto::DeletePackRequest;
    let work = workdir();
    let work = work.path();
    let objects = objects_dir();
    let c = start(
        &file_url(&objects),
        &[("GRANARY_FAULT_PAUSE", "move-after-restore:10")],
    )
    .await;
    let addr = c.addr(1);
    let data = c.node(1).dir.clone();
    let (src, want) = source_tree(work, 7);
    upload(&addr, &src, "ds", work);
    tier_json(&addr, &["move", "ds", "--to", "object"]);
    wait_no_ssd_packs(&data, 10 * SEC).await;

    let mv = tier_json(&addr, &["move", "ds", "--to", "ssd", "--no-wait"]);
    assert!(n(&mv, "queued") >= 1, "{mv}");
    // The first restored copy appears; the mover then pauses before meta
    // lists it.
    let (path, _) = wait_for("the move back to restore a pack", 30 * SEC, || async {
        pack_files_below(&data.join("packs"))
            .into_iter()
            .next()
            .ok_or_else(|| "no pack file yet".to_string())
    })
    .await;
    let id: u64 = path
        .file_stem()
        .and_then(|s| s.to_str())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("pack id of {}", path.display()));
    let mut chunk = ChunkClient::connect(format!("http://{addr}")).await.unwrap();
    let refused = chunk
        .delete_pack(DeletePackRequest { pack_id: id })
        .await
        .expect_err("a delete during a queued move is refused");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused:?}");
    // Refused for the queued move; or, on a machine too slow to send the
    // delete within the pause, because the move has listed the copy by then.
    assert!(
        refused.message().contains("queued move to the ssd tier")
            || refused.message().contains("is listed as a replica"),
        "{}",
        refused.message()
    );

    let st = wait_queue_empty(&addr, 60 * SEC).await;
    let d = ds_of(&st, "ds");
    assert_eq!(n(d, "object_bytes"), 0, "{st}");
    assert!(n(d, "ssd_bytes") > 0, "{st}");
    assert!(path.exists(), "{} is listed now and stays", path.display());
    let back = download_with(&addr, "ds@1", &work.join("dl"), &want, &[], &[]);
    assert_eq!(n(&back, "object_read_bytes"), 0, "read from SSD: {back}");
}

// ---------------------------------------------------------------------------
// 4. Cold-after policies
// ---------------------------------------------------------------------------

async fn policy_moves_cold_data_and_back(url: &str) {
    let started = Instant::now();
    let work = workdir();
    let work = work.path();
    let c = start(url, &[("GRANARY_POLICY_SECS", "1")]).await;
    let addr = c.addr(1);
    let data = c.node(1).dir.clone();
    let (src, want) = source_tree(work, 4);
    upload(&addr, &src, "ds", work);
    ok(
        "policy set",
        granary(&[
            "admin",
            "tier",
            "policy",
            "set",
            "--dataset",
            "ds",
            "--cold-after",
            "3s",
            "--server",
            &addr,
        ]),
    );
    let st = tier_status(&addr).unwrap();
    assert_eq!(
        st["policies"],
        serde_json::json!([{"dataset": "ds", "cold_after_secs": 3}]),
        "{st}"
    );

    let st = wait_for("the policy to move ds to the object tier", 30 * SEC, || async {
        let st = tier_status(&addr)?;
        let d = ds_of(&st, "ds");
        if n(d, "ssd_bytes") == 0 && n(d, "object_bytes") > 0 && queue_len(&st) == 0 {
            Ok(st)
        } else {
            Err(format!("{d}"))
        }
    })
    .await;
    eprintln!("cold after {:?}: {st}", started.elapsed());
    assert_eq!(
        ds_of(&st, "ds")["pinned_to_object"],
        serde_json::json!([1]),
        "{st}"
    );
    wait_no_ssd_packs(&data, 10 * SEC).await;
    assert!(!object_packs(url).await.is_empty());

    // Reading it makes it hot again: the chunk server reports the reads
    // within 5 s and the next scan moves the version back to SSD. With a
    // 3 s policy it is cold again 3 s after the read and moves out once more,
    // so the state on SSD lasts only about a second: poll it in-process.
    download_same(&addr, "ds@1", &work.join("dl-cold"), &want);
    let read_at = Instant::now();
    let meta = c.client(1);
    let mut last = String::new();
    let st = loop {
        let st = meta.tier_status().await.expect("tier status");
        let d = ds_of(&st, "ds");
        if n(d, "ssd_bytes") > 0 && n(d, "object_bytes") == 0 {
            break st;
        }
        last = d.to_string();
        assert!(
            read_at.elapsed() < 40 * SEC,
            "the policy did not move ds back to SSD within 40 s of a read; last: {last}"
        );
        tokio::time::sleep(Duration::from_millis(40)).await;
    };
    eprintln!(
        "hot again {:?} after the read (before: {last}): {st}",
        read_at.elapsed()
    );
    download_same(&addr, "ds@1", &work.join("dl-hot"), &want);

    ok(
        "policy clear",
        granary(&[
            "admin",
            "tier",
            "policy",
            "clear",
            "--dataset",
            "ds",
            "--server",
            &addr,
        ]),
    );
    let st = tier_status(&addr).unwrap();
    assert_eq!(st["policies"], serde_json::json!([]), "{st}");
    eprintln!(
        "policy_moves_cold_data_and_back({url}) took {:?}",
        started.elapsed()
    );
}

object_store_tests!(
    policy_moves_cold_data_and_back,
    file_policy_moves_cold_data_and_back,
    s3_policy_moves_cold_data_and_back,
    "tiering-policy"
);

// ---------------------------------------------------------------------------
// 5. Bad input
// ---------------------------------------------------------------------------

/// Asserts a failed command: exit code `code`, nothing on stdout, and one
/// `error: ...` line (the last of stderr) that contains every needle. Returns it.
#[track_caller]
fn fails(what: &str, o: &Output, code: i32, needles: &[&str]) -> String {
    let err = text(&o.stderr);
    assert_eq!(
        o.status.code(),
        Some(code),
        "{what}: expected exit code {code}\nstdout: {}\nstderr: {err}",
        text(&o.stdout)
    );
    assert!(
        o.stdout.is_empty(),
        "{what}: printed on stdout: {}",
        text(&o.stdout)
    );
    let errors: Vec<&str> = err
        .lines()
        .filter(|l| l.to_lowercase().contains("error"))
        .collect();
    assert_eq!(errors.len(), 1, "{what}: expected one error line; stderr:\n{err}");
    let line = errors[0];
    assert!(
        line.starts_with("error: "),
        "{what}: malformed error line {line:?}"
    );
    for needle in needles {
        assert!(
            line.contains(needle),
            "{what}: the error does not mention {needle:?}: {line}"
        );
    }
    eprintln!("{what}: {line}");
    line.to_string()
}

async fn bad_input_is_refused(url: &str) {
    let work = workdir();
    let work = work.path();
    let c = start(url, &[]).await;
    let addr = c.addr(1);
    let src = work.join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("f"), b"some bytes").unwrap();
    upload(&addr, &src, "ds", work);

    let mv =
        |target: &str, to: &str| granary(&["admin", "tier", "move", target, "--to", to, "--server", &addr]);
    let line = fails("move nosuch", &mv("nosuch", "object"), 1, &["nosuch"]);
    assert!(line.contains("not found"), "{line}");
    let line = fails("move ds@99", &mv("ds@99", "object"), 1, &["ds@99"]);
    assert!(line.contains("not found"), "{line}");
    fails("move ds@1 --to tape", &mv("ds@1", "tape"), 2, &["tape"]);
    let o = mv("ds@1", "tape");
    assert!(text(&o.stderr).contains("object, ssd"), "{}", text(&o.stderr));
    fails("move 'bad name!'", &mv("bad name!", "object"), 1, &["bad name!"]);
    // Nothing was queued or pinned by the refused commands.
    nothing_tiered(&addr);

    // A server with an object store URL of an unknown kind does not start.
    let data = work.join("bad-server");
    let port = free_port().to_string();
    let mut child = granary_cmd(&[
        "server",
        "--node-id",
        "1",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--data-dir",
        s(&data),
        "--object-store",
        "ftp://x",
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("spawn granary server");
    let deadline = Instant::now() + 20 * SEC;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("granary server --object-store ftp://x still runs after 20 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let o = child.wait_with_output().unwrap();
    let line = fails(
        "server --object-store ftp://x",
        &o,
        1,
        &["ftp://x", "s3://bucket", "file:///"],
    );
    assert_eq!(
        line.matches("ftp://x").count(),
        1,
        "the error repeats itself: {line}"
    );
    assert_eq!(
        text(&o.stderr).trim().lines().count(),
        1,
        "expected just the error line: {}",
        text(&o.stderr)
    );
}

object_store_tests!(
    bad_input_is_refused,
    file_bad_input_is_refused,
    s3_bad_input_is_refused,
    "tiering-bad-input"
);

// ---------------------------------------------------------------------------
// 6. Nodes that do not share one object store do not tier
// ---------------------------------------------------------------------------

/// `granary admin tier move DATASET --to object --server ADDR` (text output).
fn tier_move_object(addr: &str, target: &str) -> Output {
    granary(&[
        "admin", "tier", "move", target, "--to", "object", "--server", addr,
    ])
}

/// Nothing of `ds` is pinned, queued or in the object tier.
#[track_caller]
fn nothing_tiered(addr: &str) {
    let st = tier_status(addr).unwrap();
    assert_eq!(queue_len(&st), 0, "{st}");
    assert_eq!(
        ds_of(&st, "ds")["pinned_to_object"],
        serde_json::json!([]),
        "{st}"
    );
    assert_eq!(n(ds_of(&st, "ds"), "object_bytes"), 0, "{st}");
}

/// A two-node cluster: with each node's default object directory, and then
/// with two different stores, `tier move --to object` fails with one line
/// that names the node, its store and the fix, and nothing is pinned, queued
/// or moved (a pack there would be unreadable from the other node). Once
/// both nodes name the same store, the move goes through and the other node
/// serves the version from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_without_one_shared_object_store_do_not_tier() {
    let work = workdir();
    let work = work.path();
    let mut c = Cluster::start(2).await;
    let (a1, a2) = (c.addr(1), c.addr(2));
    let (src, want) = source_tree(work, 6);
    upload(&a1, &src, "ds", work);

    // Each node's own `file://DATA_DIR/objects`.
    let line = fails(
        "tier move with default object stores",
        &tier_move_object(&a1, "ds"),
        1,
        &["own data directory", "--object-store", "objects"],
    );
    assert!(line.contains("node 1") || line.contains("node 2"), "{line}");
    nothing_tiered(&a1);

    // Two different stores.
    let (one, two) = (objects_dir(), objects_dir());
    let (url1, url2) = (file_url(&one), file_url(&two));
    for (id, url) in [(1, &url1), (2, &url2)] {
        c.kill(id);
        c.set_env(id, "GRANARY_OBJECT_STORE", Some(url));
        c.restart(id);
    }
    c.wait_leader(&[1, 2], 20 * SEC).await;
    let line = wait_for("both nodes to answer about their stores", 20 * SEC, || async {
        let o = tier_move_object(&a2, "ds");
        let err = text(&o.stderr);
        if err.contains("different object stores") {
            Ok(err)
        } else {
            Err(format!("exit {:?}: {err}", o.status.code()))
        }
    })
    .await;
    assert!(line.contains(&url1) && line.contains(&url2), "{line}");
    nothing_tiered(&a1);
    assert!(object_packs(&url1).await.is_empty() && object_packs(&url2).await.is_empty());

    // One shared store: the move goes through; node 2 serves the version.
    c.kill(2);
    c.set_env(2, "GRANARY_OBJECT_STORE", Some(&url1));
    c.restart(2);
    c.wait_leader(&[1, 2], 20 * SEC).await;
    let mv = wait_for("the move on one shared store", 20 * SEC, || async {
        let o = granary(&[
            "admin", "tier", "move", "ds", "--to", "object", "--server", &a1, "--json",
        ]);
        if o.status.success() {
            serde_json::from_slice::<Value>(&o.stdout).map_err(|e| e.to_string())
        } else {
            Err(text(&o.stderr))
        }
    })
    .await;
    assert_eq!(mv["done"], true, "{mv}");
    let st = tier_status(&a2).unwrap();
    assert_eq!(n(ds_of(&st, "ds"), "ssd_bytes"), 0, "{st}");
    assert!(!object_packs(&url1).await.is_empty());
    for id in [1, 2] {
        wait_no_ssd_packs(&c.node(id).dir.clone(), 10 * SEC).await;
    }
    download_same(&a2, "ds@1", &work.join("dl-node-2"), &want);
}
