//! End-to-end tests of keeping data tidy and safe: garbage collection (with
//! pack compaction, on SSD and in the object tier, online under a FUSE mount
//! and racing uploads), scrub and repair of a damaged pack copy (from a
//! replica, and with no other copy, on SSD and in the object tier), and
//! re-replication after a chunk server dies or is removed. Real `granary
//! server` processes driven through the real command line, checked by
//! downloads, the SDK, the data directories and listings of the object store.
//! The object-tier tests run against both a `file://` directory and S3
//! (`$GRANARY_TEST_S3_URL`, which they need: unset, they fail).
//!
//! Servers here use `GRANARY_GC_GRACE_SECS=1`; before a GC that must reclaim
//! something a test waits a little longer than that (the grace is the
//! precondition, never something asserted by a sleep).

#[macro_use]
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use granary_client::object::ObjectTier;
use serde_json::Value;

const SEC: Duration = Duration::from_secs(1);
/// A little longer than the servers' GC grace (1 s).
const PAST_GRACE: Duration = Duration::from_millis(1300);
/// Pack overhead per chunk (docs/architecture.md): a 48-byte frame header
/// and a 48-byte index entry.
const PER_CHUNK: u64 = 48 + 48;

/// Relative path -> contents.
type Files = BTreeMap<String, Vec<u8>>;

fn grace_1s() -> NodeOptions {
    NodeOptions::default().env("GRANARY_GC_GRACE_SECS", "1")
}

fn tempdir(what: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("granary-maint-{what}-"))
        .tempdir()
        .unwrap()
}

/// `n` random (incompressible) files `TAG/fNNN.bin`; file i's size and bytes
/// depend only on (tag, i, seed_of(i)), so equal inputs give equal files.
fn files(tag: &str, n: usize, sizes: std::ops::Range<usize>, seed_of: impl Fn(usize) -> u64) -> Files {
    (0..n)
        .map(|i| {
            let tag_seed = tag
                .bytes()
                .fold(7u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64));
            let mut rng = fastrand::Rng::with_seed(tag_seed ^ (seed_of(i) << 32) ^ i as u64);
            let len = rng.usize(sizes.clone());
            (format!("{tag}/f{i:03}.bin"), random_bytes(&mut rng, len))
        })
        .collect()
}

fn union(sets: &[&Files]) -> Files {
    sets.iter()
        .flat_map(|s| s.iter().map(|(k, v)| (k.clone(), v.clone())))
        .collect()
}

/// Writes `files` into a new directory `work/name`; returns it.
fn write_tree(work: &Path, name: &str, files: &Files) -> PathBuf {
    let root = work.join(name);
    for (rel, data) in files {
        let p = root.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, data).unwrap();
    }
    root
}

fn hash(data: &[u8]) -> String {
    blake3::hash(data).to_hex().to_string()
}

/// Relative path -> BLAKE3 of every regular file below `root`.
fn hash_tree(root: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        for e in fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                let rel = p.strip_prefix(root).unwrap().to_str().unwrap().to_string();
                out.insert(rel, hash(&fs::read(&p).unwrap()));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn want_hashes(files: &Files) -> BTreeMap<String, String> {
    files.iter().map(|(k, v)| (k.clone(), hash(v))).collect()
}

fn u(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("field {key} is not a number in {v}"))
}

/// `granary upload DIR DATASET --json --pack-size 1MiB`, its file cache in `work`.
fn upload_cmd(addr: &str, dir: &Path, dataset: &str, work: &Path) -> Command {
    let mut c = granary_cmd(&[
        "upload",
        s(dir),
        dataset,
        "--json",
        "--pack-size",
        "1MiB",
        "--server",
        addr,
    ]);
    c.env("GRANARY_CACHE_DIR", work.join("upload-cache"));
    c
}

#[track_caller]
fn upload_ok(addr: &str, dir: &Path, dataset: &str, work: &Path) -> Value {
    let o = upload_cmd(addr, dir, dataset, work).output().unwrap();
    let v = ok_json(&format!("upload {dataset}"), o);
    eprintln!("upload {dataset}: {v}");
    v
}

/// Writes `files` into `work/name` ([`write_tree`]) and uploads that as `dataset`.
#[track_caller]
fn upload_files(addr: &str, work: &Path, name: &str, files: &Files, dataset: &str) -> Value {
    upload_ok(addr, &write_tree(work, name, files), dataset, work)
}

/// Uploads ds@1 (16 random files) and ds@2 (the same with every other file
/// replaced); returns ds@2's files and upload report.
#[track_caller]
fn upload_v1_and_v2(addr: &str, work: &Path) -> (Files, Value) {
    let v1 = files("d", 16, 150_000..450_000, |_| 1);
    let v2 = files("d", 16, 150_000..450_000, |i| if i % 2 == 1 { 2 } else { 1 });
    upload_files(addr, work, "v1", &v1, "ds");
    let up2 = upload_files(addr, work, "v2", &v2, "ds");
    (v2, up2)
}

/// Downloads `version` into a fresh directory under `work` and checks every
/// file against `want`; returns the command's stderr.
#[track_caller]
fn download_matches(addr: &str, version: &str, work: &Path, want: &Files) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let dest = work.join(format!("dl-{}", N.fetch_add(1, Ordering::SeqCst)));
    let o = granary(&["download", version, s(&dest), "--json", "--server", addr]);
    let err = text(&o.stderr);
    ok(&format!("download {version}"), o);
    let got = hash_tree(&dest);
    let want = want_hashes(want);
    if got != want {
        let differ: Vec<&String> = want
            .keys()
            .chain(got.keys())
            .filter(|k| want.get(*k) != got.get(*k))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        panic!("download of {version} differs in {differ:?}");
    }
    let _ = fs::remove_dir_all(&dest);
    err
}

/// Reads every file of `dataset@number` through the SDK (every chunk is
/// fetched and verified, without a download's fsync per file) and checks it
/// against `want`, and that the version holds no other file.
async fn read_matches(addr: &str, dataset: &str, number: u64, want: &Files) {
    use futures::StreamExt;
    let client = granary_client::Client::connect(&[addr.to_string()]).unwrap();
    let reader = client.open_version(dataset, Some(number)).await.unwrap();
    let reader = &reader;
    let mut dirs = BTreeSet::new();
    for rel in want.keys() {
        dirs.insert(rel.split_once('/').unwrap().0.to_string());
    }
    let root = reader.read_dir("").await.unwrap();
    let names: BTreeSet<String> = root
        .entries()
        .iter()
        .map(|e| String::from_utf8_lossy(&e.name).into_owned())
        .collect();
    assert_eq!(names, dirs, "{dataset}@{number}: top-level entries");
    let mut count = 0;
    for d in &dirs {
        count += reader.read_dir(d).await.unwrap().entries().len();
    }
    assert_eq!(count, want.len(), "{dataset}@{number}: number of files");
    let bad: Vec<String> = futures::stream::iter(want.iter())
        .map(|(rel, data)| async move {
            match reader.read_at(rel, 0, data.len() + 1).await {
                Ok(got) if got == *data => None,
                Ok(_) => Some(format!("{rel}: wrong bytes")),
                Err(e) => Some(format!("{rel}: {e}")),
            }
        })
        .buffer_unordered(16)
        .filter_map(|r| async move { r })
        .collect()
        .await;
    assert!(bad.is_empty(), "{dataset}@{number} reads wrong: {bad:?}");
}

/// `granary admin gc --json ARGS`.
#[track_caller]
fn gc(addr: &str, args: &[&str]) -> Value {
    let mut all = vec!["admin", "gc", "--json", "--server", addr];
    all.extend_from_slice(args);
    let v = ok_json("admin gc", granary(&all));
    eprintln!("gc {args:?}: {v}");
    v
}

#[track_caller]
fn rm(addr: &str, version: &str) {
    ok(
        &format!("rm {version}"),
        granary(&["rm", version, "--server", addr]),
    );
}

/// `granary admin scrub --json`, which must succeed; its report.
#[track_caller]
fn scrub_ok(addr: &str, what: &str) -> Value {
    ok_json(what, granary(&["admin", "scrub", "--json", "--server", addr]))
}

/// `granary admin scrub --json ARGS` where damage cannot be repaired: asserts
/// a non-zero exit with an `error: ` on stderr; returns the JSON report.
#[track_caller]
fn failed_scrub(addr: &str, args: &[&str]) -> Value {
    let mut all = vec!["admin", "scrub", "--json", "--server", addr];
    all.extend_from_slice(args);
    let o = granary(&all);
    let (out, err) = (text(&o.stdout), text(&o.stderr));
    eprintln!("scrub {args:?}: {out}{err}");
    assert!(
        !o.status.success(),
        "scrub {args:?} exited 0 with damage it cannot repair"
    );
    assert!(err.contains("error: "), "{err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("scrub {args:?} printed no JSON ({e}): {out}"))
}

/// Asserts a failed command's stderr `err` ends in one `error: ` line that
/// names pack `id` as damaged.
#[track_caller]
fn assert_names_damaged_pack(err: &str, id: u64) {
    let line = err.lines().last().unwrap_or_default();
    assert!(line.starts_with("error: "), "{err}");
    assert!(
        line.contains(&format!("pack {id}")) && line.contains("damaged"),
        "the error does not say what is damaged: {line}"
    );
}

/// Bytes a GC gave back: dead packs deleted plus what compaction saved.
fn reclaimed(report: &Value) -> u64 {
    let compacted: u64 = report["compacted"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| u(c, "old_bytes").saturating_sub(u(c, "new_bytes")))
        .sum();
    u(report, "freed_bytes") + compacted
}

/// Asserts a GC found nothing more to do.
#[track_caller]
fn assert_nothing_collected(what: &str, r: &Value) {
    for key in ["swept_trees", "swept_chunks", "deleted_packs", "freed_bytes"] {
        assert_eq!(u(r, key), 0, "{what}: {key} in {r}");
    }
    assert_eq!(r["compacted"], Value::Array(vec![]), "{what}: {r}");
}

/// Asserts every compaction in a GC report succeeded; returns (old, new) ids.
#[track_caller]
fn compactions(r: &Value) -> Vec<(u64, u64)> {
    r["compacted"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            assert!(c.get("error").is_none(), "a compaction failed: {c}");
            (u(c, "old"), u(c, "new"))
        })
        .collect()
}

/// The stored size of a version of random files: raw bytes plus frame and
/// index overhead per chunk (upload `--json` stats).
fn stored_size(upload: &Value) -> u64 {
    u(upload, "bytes") + PER_CHUNK * u(upload, "unique_chunks")
}

fn pack_path(data_dir: &Path, id: u64) -> PathBuf {
    data_dir
        .join("packs")
        .join(format!("{:02x}", id % 256))
        .join(format!("{id}.pack"))
}

/// (id, size) of every sealed pack file in a data directory.
fn pack_files(data_dir: &Path) -> BTreeMap<u64, u64> {
    let mut out = BTreeMap::new();
    let Ok(shards) = fs::read_dir(data_dir.join("packs")) else {
        return out;
    };
    for shard in shards.flatten() {
        for f in fs::read_dir(shard.path()).into_iter().flatten().flatten() {
            let p = f.path();
            if p.extension().is_some_and(|e| e == "pack") {
                if let Some(id) = p
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .and_then(|s| s.parse().ok())
                {
                    out.insert(id, f.metadata().map(|m| m.len()).unwrap_or(0));
                }
            }
        }
    }
    out
}

fn disk_pack_bytes(data_dir: &Path) -> u64 {
    pack_files(data_dir).values().sum()
}

/// key file name -> size of every object below a `file://` object store's `packs/`.
fn objects(root: &Path) -> BTreeMap<String, u64> {
    fs::read_dir(root.join("packs"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| {
            (
                e.file_name().to_str().unwrap().to_string(),
                e.metadata().unwrap().len(),
            )
        })
        .collect()
}

/// Flips (xor 0xff) the byte at `offset` of `path`.
fn flip_byte(path: &Path, offset: u64) {
    let f = fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).unwrap();
    b[0] ^= 0xff;
    f.write_all_at(&b, offset).unwrap();
    f.sync_all().unwrap();
}

// ---------------------------------------------------------------------------
// 1. GC on SSD
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_reclaims_a_removed_version_and_keeps_the_live_one() {
    let started = Instant::now();
    let work = tempdir("gc");
    let c = Cluster::start_with(1, grace_1s()).await;
    let addr = c.addr(1);
    let data = c.node(1).dir.clone();
    let meta = c.client(1);

    let (v2, up2) = upload_v1_and_v2(&addr, work.path());

    let dry = gc(&addr, &["--dry-run"]);
    assert_eq!(dry["dry_run"], true);
    assert_eq!(u(&dry, "live_versions"), 2, "{dry}");
    for key in ["dead_trees", "dead_chunks", "dead_chunk_bytes", "dead_packs"] {
        assert_eq!(u(&dry, key), 0, "nothing is dead before any rm: {key} in {dry}");
    }

    rm(&addr, "ds@1");
    tokio::time::sleep(PAST_GRACE).await;
    let packs_before = pack_files(&data);
    let registered_before = meta.list_packs(None, None).await.unwrap().len();
    let dry = gc(&addr, &["--dry-run"]);
    assert_eq!(u(&dry, "live_versions"), 1, "{dry}");
    assert!(u(&dry, "dead_chunks") > 0, "v1's replaced files are dead: {dry}");
    assert!(u(&dry, "dead_chunk_bytes") > 0, "{dry}");
    assert_eq!(pack_files(&data), packs_before, "a dry run changed pack files");
    assert_eq!(
        meta.list_packs(None, None).await.unwrap().len(),
        registered_before
    );
    download_matches(&addr, "ds@2", work.path(), &v2);

    let before = disk_pack_bytes(&data);
    let r = gc(&addr, &[]);
    assert_eq!(r["dry_run"], false);
    assert!(u(&r, "swept_chunks") > 0, "{r}");
    assert_eq!(u(&r, "swept_chunks"), u(&dry, "dead_chunks"), "{r}");
    assert_eq!(u(&r, "swept_trees"), u(&dry, "dead_trees"), "{r}");
    assert!(reclaimed(&r) > 0, "nothing freed or compacted: {r}");
    for c in r["compacted"].as_array().unwrap() {
        assert!(
            c["live_share"].as_f64().unwrap() < 0.5,
            "default threshold is 0.5: {c}"
        );
    }
    compactions(&r);
    download_matches(&addr, "ds@2", work.path(), &v2);
    assert!(
        !granary(&[
            "download",
            "ds@1",
            s(&work.path().join("gone")),
            "--server",
            &addr
        ])
        .status
        .success(),
        "the removed version still downloads"
    );
    let after_default = disk_pack_bytes(&data);
    assert!(after_default < before, "{after_default} >= {before}");
    assert_nothing_collected("second gc", &gc(&addr, &[]));
    assert_eq!(disk_pack_bytes(&data), after_default);

    // Packs v1 and v2 shared may be up to half dead after that; compacting
    // everything below 80% live leaves at most 25% dead bytes.
    let r = gc(&addr, &["--compact-below", "0.8"]);
    assert_eq!(u(&r, "swept_chunks"), 0, "{r}");
    compactions(&r);
    let v2_size = stored_size(&up2);
    let bound = v2_size + v2_size * 3 / 10 + (256 << 10);
    let after = wait_for("pack files to shrink to about v2's size", 20 * SEC, || async {
        let now = disk_pack_bytes(&data);
        if now <= bound {
            Ok(now)
        } else {
            Err(format!(
                "{now} bytes of packs on disk, want <= {bound} (v2 stores {v2_size})"
            ))
        }
    })
    .await;
    eprintln!(
        "pack bytes on disk: {before} before gc, {after_default} after the default gc, {after} after \
         compacting below 0.8; v2 stores {v2_size}"
    );
    download_matches(&addr, "ds@2", work.path(), &v2);
    assert_nothing_collected("last gc", &gc(&addr, &["--compact-below", "0.8"]));
    assert_eq!(disk_pack_bytes(&data), after);
    download_matches(&addr, "ds@2", work.path(), &v2);
    eprintln!("gc on SSD: {:?}", started.elapsed());
}

// ---------------------------------------------------------------------------
// 2. The object tier: GC with compaction, scrub of a damaged object
// ---------------------------------------------------------------------------
//
// Each check is a function of the object-store URL and runs twice: against a
// local directory (`file://<tempdir>`) and against S3
// (`$GRANARY_TEST_S3_URL/<unique prefix>`, the moto server `scripts/test`
// starts). The S3 variants fail, not skip, when that variable is unset.

fn object_tier(url: &str) -> ObjectTier {
    ObjectTier::from_url(url).unwrap_or_else(|e| panic!("object tier {url}: {e}"))
}

/// Pack id -> size of every pack object in the store at `url`, listed from
/// the store itself (not through Granary's metadata). For a `file://` store
/// the files below its `packs/` directory must say the same.
async fn stored_objects(url: &str) -> BTreeMap<u64, u64> {
    let listed = object_tier(url)
        .list_pack_objects()
        .await
        .unwrap_or_else(|e| panic!("listing {url}: {e}"));
    if let Some(dir) = url.strip_prefix("file://") {
        let on_disk = objects(Path::new(dir));
        let want: BTreeMap<String, u64> = listed
            .iter()
            .map(|o| (o.key.rsplit('/').next().unwrap().to_string(), o.size))
            .collect();
        assert_eq!(on_disk, want, "files below {dir}/packs vs. the store's listing");
    }
    let by_id: BTreeMap<u64, u64> = listed.iter().map(|o| (o.id, o.size)).collect();
    assert_eq!(by_id.len(), listed.len(), "one object per pack: {listed:?}");
    by_id
}

/// The key of pack `id`'s object in the store at `url`, from its listing.
async fn object_key(url: &str, id: u64) -> String {
    let listed = object_tier(url)
        .list_pack_objects()
        .await
        .unwrap_or_else(|e| panic!("listing {url}: {e}"));
    let mut keys = listed.into_iter().filter(|o| o.id == id).map(|o| o.key);
    let key = keys
        .next()
        .unwrap_or_else(|| panic!("pack {id} has no object in {url}"));
    assert_eq!(keys.next(), None, "pack {id} has more than one object");
    key
}

/// Flips (xor 0xff) the byte at `offset` of pack `id`'s object: in the file
/// of a `file://` store, by writing the object again with that byte changed
/// in S3.
async fn flip_object_byte(url: &str, id: u64, offset: u64) {
    let key = object_key(url, id).await;
    if let Some(dir) = url.strip_prefix("file://") {
        flip_byte(&Path::new(dir).join(&key), offset);
        return;
    }
    let tier = object_tier(url);
    let size = tier.size(&key).await.unwrap().expect("the pack object exists");
    let mut data = tier.get_ranges(&key, &[(0, size as u32)]).await.unwrap();
    data[offset as usize] ^= 0xff;
    tier.put_bytes(&key, data.into()).await.unwrap();
}

/// One node with `--object-store url` (and a 1 s GC grace).
async fn start_with_store(url: &str) -> Cluster {
    Cluster::start_with(1, grace_1s().arg("--object-store").arg(url)).await
}

/// `tier move DATASET --to object`, waited for; then waits until no pack
/// file is left on SSD and checks every registered pack is an object of
/// its size. Returns the registered packs.
async fn move_all_to_object(c: &Cluster, url: &str, dataset: &str) -> Vec<granary_client::proto::PackInfo> {
    let addr = c.addr(1);
    let data = c.node(1).dir.clone();
    let mv = ok_json(
        "tier move",
        granary(&[
            "admin", "tier", "move", dataset, "--to", "object", "--json", "--server", &addr,
        ]),
    );
    eprintln!("tier move: {mv}");
    assert_eq!(mv["done"], true, "{mv}");
    let registered = c.client(1).list_packs(None, None).await.unwrap();
    assert_eq!(u(&mv, "queued") as usize, registered.len(), "{mv}");
    wait_for("SSD copies to go after the move", 20 * SEC, || async {
        let left = pack_files(&data);
        if left.is_empty() {
            Ok(())
        } else {
            Err(format!("packs still on SSD: {left:?}"))
        }
    })
    .await;
    let objs = stored_objects(url).await;
    assert_eq!(objs.len(), registered.len(), "{objs:?}");
    for p in &registered {
        assert_eq!(p.tier, "object", "pack {p:?}");
        assert!(p.replicas.is_empty(), "pack {p:?}");
        assert_eq!(objs.get(&p.id), Some(&p.bytes), "pack {p:?}");
    }
    registered
}

async fn gc_compacts_packs_in_the_object_tier(url: &str) {
    let started = Instant::now();
    let work = tempdir("gc-object");
    let c = start_with_store(url).await;
    let addr = c.addr(1);
    let data = c.node(1).dir.clone();
    let meta = c.client(1);

    let (v2, up2) = upload_v1_and_v2(&addr, work.path());

    move_all_to_object(&c, url, "ds").await;
    let bytes_before: u64 = stored_objects(url).await.values().sum();

    rm(&addr, "ds@1");
    tokio::time::sleep(PAST_GRACE).await;
    // Below 0.9 live, so every pack mixing v1's dead and v2's live chunks is
    // compacted, whatever the mix.
    let r = gc(&addr, &["--compact-below", "0.9"]);
    assert!(u(&r, "swept_chunks") > 0, "{r}");
    let done = compactions(&r);
    assert!(!done.is_empty(), "no pack was compacted: {r}");
    let objs_after = stored_objects(url).await;
    let packs_after = meta.list_packs(None, None).await.unwrap();
    for (old, new) in &done {
        assert!(!objs_after.contains_key(old), "old pack {old} is still an object");
        assert!(objs_after.contains_key(new), "new pack {new} is not an object");
        let p = packs_after
            .iter()
            .find(|p| p.id == *new)
            .expect("new pack registered");
        assert_eq!(p.tier, "object");
        assert!(p.replicas.is_empty(), "compacted into SSD? {p:?}");
        assert_eq!(objs_after[new], p.bytes);
    }
    // Exactly the registered packs are objects; nothing went to SSD.
    let want: BTreeSet<u64> = packs_after.iter().map(|p| p.id).collect();
    assert_eq!(objs_after.keys().copied().collect::<BTreeSet<_>>(), want);
    assert!(pack_files(&data).is_empty());
    let bytes_after: u64 = objs_after.values().sum();
    let v2_size = stored_size(&up2);
    eprintln!("object bytes: {bytes_before} before gc, {bytes_after} after; v2 stores {v2_size}");
    assert!(bytes_after < bytes_before);
    assert!(
        bytes_after <= v2_size + v2_size * 3 / 10 + (256 << 10),
        "{bytes_after} bytes of objects for {v2_size} bytes of v2"
    );
    download_matches(&addr, "ds@2", work.path(), &v2);
    assert_nothing_collected("second gc", &gc(&addr, &["--compact-below", "0.9"]));
    assert_eq!(stored_objects(url).await, objs_after);
    download_matches(&addr, "ds@2", work.path(), &v2);
    eprintln!("gc in the object tier ({url}): {:?}", started.elapsed());
}

object_store_tests!(
    gc_compacts_packs_in_the_object_tier,
    file_gc_compacts_packs_in_the_object_tier,
    s3_gc_compacts_packs_in_the_object_tier,
    "maint-gc"
);

/// A damaged object with no SSD replica: scrub reports it under `object.bad`
/// and exits non-zero (with and without repair), downloads never return
/// wrong bytes, and a move back to SSD does not bring the damage back.
///
/// Not covered here: the repair itself (an object copy uploaded again from
/// an SSD replica). A pack has both copies only between the two Raft steps
/// of a move to the object tier (a move back deletes the object), so that
/// state can only be held still with a crash point, and the restarted
/// mover finishes the move at once.
async fn object_scrub_reports_damage_never_serves_it(url: &str) {
    let started = Instant::now();
    let work = tempdir("scrub-object");
    let c = start_with_store(url).await;
    let addr = c.addr(1);
    let content = files("d", 10, 200_000..500_000, |_| 1);
    upload_files(&addr, work.path(), "src", &content, "ds");
    let registered = move_all_to_object(&c, url, "ds").await;
    let pack = registered.iter().max_by_key(|p| p.bytes).unwrap().clone();
    let before = stored_objects(url).await;

    // Nothing is damaged yet.
    let clean = scrub_ok(&addr, "scrub before any damage");
    eprintln!("scrub: {clean}");
    assert_eq!(clean["ok"], true, "{clean}");
    assert_eq!(u(&clean["object"], "packs") as usize, registered.len(), "{clean}");
    assert_eq!(clean["object"]["bad"], serde_json::json!([]), "{clean}");

    flip_object_byte(url, pack.id, pack.bytes / 2).await;
    eprintln!(
        "flipped byte {} of pack {}'s object ({} bytes)",
        pack.bytes / 2,
        pack.id,
        pack.bytes
    );
    assert_eq!(
        stored_objects(url).await,
        before,
        "the damage changed the listing"
    );

    // A download fails with one clear line naming the pack, or (from a
    // copy read before the damage) returns exactly the uploaded bytes.
    let dest = work.path().join("dl-damaged");
    let o = granary(&["download", "ds", s(&dest), "--server", &addr]);
    let err = text(&o.stderr);
    eprintln!("download of damaged data: {err}");
    if o.status.success() {
        assert_eq!(hash_tree(&dest), want_hashes(&content), "wrong bytes downloaded");
    } else {
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert_names_damaged_pack(&err, pack.id);
    }

    for args in [vec![], vec!["--no-repair"]] {
        let report = failed_scrub(&addr, &args);
        assert_eq!(report["ok"], false, "{report}");
        let object = &report["object"];
        assert_eq!(u(object, "packs") as usize, registered.len(), "{report}");
        assert_eq!(
            object["bad"],
            serde_json::json!([pack.id]),
            "scrub {args:?}: {report}"
        );
        assert_eq!(object["repaired"], serde_json::json!([]), "{report}");
        let failed = object["failed"].as_array().unwrap();
        if args.is_empty() {
            // No SSD replica to upload it again from.
            assert_eq!(failed.len(), 1, "{report}");
            assert_eq!(u(&failed[0], "pack"), pack.id, "{report}");
        } else {
            assert!(failed.is_empty(), "{report}");
        }
        for n in report["nodes"].as_array().unwrap() {
            assert_eq!(
                n["bad"],
                serde_json::json!([]),
                "no SSD copy is damaged: {report}"
            );
        }
    }
    // The damaged object is still there (it is the only copy).
    assert_eq!(stored_objects(url).await, before);

    // A move back to SSD restores verified copies only: the other packs come
    // back, the damaged one stays in the object tier.
    let mv = ok_json(
        "tier move --to ssd",
        granary(&[
            "admin",
            "tier",
            "move",
            "ds",
            "--to",
            "ssd",
            "--no-wait",
            "--json",
            "--server",
            &addr,
        ]),
    );
    eprintln!("tier move --to ssd: {mv}");
    let meta = c.client(1);
    wait_for("the undamaged packs to be back on SSD", 30 * SEC, || async {
        let packs = meta.list_packs(None, None).await.map_err(|e| e.to_string())?;
        match packs.iter().find(|p| p.id != pack.id && p.tier != "ssd") {
            None => Ok(()),
            Some(p) => Err(format!("pack {p:?}")),
        }
    })
    .await;
    // ... once the mover has tried the damaged one and logged the failure.
    let log = &c.node(1).log;
    let refused = wait_for("the mover to refuse the damaged pack", 30 * SEC, || async {
        let text = fs::read_to_string(log).unwrap_or_default();
        text.lines()
            .find(|l| l.contains("tier move failed") && l.contains(&format!("pack={} ", pack.id)))
            .map(str::to_string)
            .ok_or_else(|| "no such line in the node's log yet".to_string())
    })
    .await;
    eprintln!("mover: {refused}");
    let packs = meta.list_packs(None, None).await.unwrap();
    let p = packs.iter().find(|p| p.id == pack.id).unwrap();
    assert_eq!(p.tier, "object", "the damaged pack moved to SSD: {p:?}");
    assert!(p.replicas.is_empty(), "the damaged pack has SSD replicas: {p:?}");
    assert!(
        !pack_files(&c.node(1).dir).contains_key(&pack.id),
        "a copy of the damaged pack is on SSD"
    );
    // Still never wrong bytes.
    let dest = work.path().join("dl-again");
    let o = granary(&["download", "ds", s(&dest), "--server", &addr]);
    if o.status.success() {
        assert_eq!(hash_tree(&dest), want_hashes(&content), "wrong bytes downloaded");
    } else {
        assert_eq!(o.status.code(), Some(1), "{}", text(&o.stderr));
    }
    eprintln!("scrub of a damaged object ({url}): {:?}", started.elapsed());
}

object_store_tests!(
    object_scrub_reports_damage_never_serves_it,
    file_object_scrub_reports_damage_never_serves_it,
    s3_object_scrub_reports_damage_never_serves_it,
    "maint-scrub"
);

// ---------------------------------------------------------------------------
// 3. GC online: under a mount, racing uploads
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_with_compaction_under_an_open_mount_never_breaks_reads() {
    let started = Instant::now();
    let work = tempdir("gc-mount");
    let c = Cluster::start_with(1, grace_1s()).await;
    let addr = c.addr(1);

    // ds@1 = C+E and ds@2 = A+B share packs with ds@3 = A+C: removing ds@2,
    // then ds@1, leaves packs that are part dead and part read by the mount.
    let a = files("a", 8, 100_000..350_000, |_| 1);
    let b = files("b", 8, 100_000..350_000, |_| 2);
    let cc = files("c", 8, 100_000..350_000, |_| 3);
    let e = files("e", 8, 100_000..350_000, |_| 4);
    let v3 = union(&[&a, &cc]);
    upload_files(&addr, work.path(), "v1", &union(&[&cc, &e]), "ds");
    upload_files(&addr, work.path(), "v2", &union(&[&a, &b]), "ds");
    upload_files(&addr, work.path(), "v3", &v3, "ds");

    // No memory or disk cache: every read the kernel passes on is a fetch.
    let mnt = work.path().join("mnt");
    let cache = work.path().join("mount-cache");
    let guard = MountGuard::mount_with(
        &addr,
        "ds@3",
        &mnt,
        &cache,
        &["--mem-cache", "0", "--cache-size", "0"],
    );

    let want: Arc<Vec<(String, Vec<u8>)>> = Arc::new(v3.clone().into_iter().collect());
    let stop = Arc::new(AtomicBool::new(false));
    let failure: Arc<Mutex<Option<String>>> = Arc::default();
    let reader = {
        let (want, stop, failure, mnt) = (want.clone(), stop.clone(), failure.clone(), mnt.clone());
        std::thread::spawn(move || {
            let mut rng = fastrand::Rng::with_seed(5);
            let mut reads = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let (name, data) = &want[rng.usize(..want.len())];
                // Whole files and random ranges.
                let (off, len) = if rng.bool() {
                    (0, data.len() + 1)
                } else {
                    let off = rng.usize(..data.len());
                    (off, rng.usize(1..200_000))
                };
                let end = (off + len).min(data.len());
                match read_uncached(&mnt.join(name), off as u64, len) {
                    Ok(got) if got == data[off..end] => reads += 1,
                    Ok(got) => {
                        *failure.lock().unwrap() = Some(format!(
                            "wrong bytes: {len} at {off} of {name}: got {} bytes, hash {}, want {}",
                            got.len(),
                            hash(&got),
                            hash(&data[off..end])
                        ));
                        break;
                    }
                    Err(e) => {
                        *failure.lock().unwrap() = Some(format!("read {len} at {off} of {name}: {e}"));
                        break;
                    }
                }
            }
            reads
        })
    };

    let mut compacted = 0;
    for victim in ["ds@2", "ds@1"] {
        tokio::time::sleep(SEC).await;
        rm(&addr, victim);
        tokio::time::sleep(PAST_GRACE).await;
        let r = gc(&addr, &["--compact-below", "0.9"]);
        assert!(u(&r, "swept_chunks") > 0, "after rm {victim}: {r}");
        compacted += compactions(&r).len();
        assert!(
            failure.lock().unwrap().is_none() && !reader.is_finished(),
            "the reader failed during the gc after rm {victim}: {:?}",
            failure.lock().unwrap()
        );
    }
    assert!(compacted > 0, "no pack the mount reads was compacted");
    tokio::time::sleep(2 * SEC).await;
    stop.store(true, Ordering::SeqCst);
    let reads = reader.join().expect("reader thread");
    if let Some(f) = failure.lock().unwrap().take() {
        panic!("the reader failed after {reads} good reads: {f}");
    }
    eprintln!("{reads} reads through the mount, {compacted} packs compacted under it");
    assert!(reads >= 20, "too few reads: {reads}");
    for (name, data) in want.iter() {
        let got = read_uncached(&mnt.join(name), 0, data.len() + 1).unwrap();
        assert!(got == *data, "wrong bytes in a full read of {name} after the gcs");
    }
    download_matches(&addr, "ds@3", work.path(), &v3);

    let stats = guard.stats();
    eprintln!("mount counters: {stats}");
    assert_eq!(stats["stats"]["corrupt"], 0, "{stats}");
    guard.unmount();
    eprintln!("gc under a mount: {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_racing_gc_commit_only_complete_versions() {
    let started = Instant::now();
    let work = tempdir("gc-race");
    let c = Cluster::start_with(1, grace_1s()).await;
    let addr = c.addr(1);
    let meta = c.client(1);

    // (number, contents) of every version that must stay downloadable.
    let mut live: Vec<(u64, Files)> = Vec::new();
    let base = files("base", 6, 50_000..250_000, |_| 0);
    let up = upload_files(&addr, work.path(), "base", &base, "race");
    live.push((u(&up, "number"), base.clone()));
    let (mut committed, mut failed, mut retried) = (0, 0, 0);
    let delays = [0u64, 4, 8, 12, 16, 20, 25, 30];
    for (round, delay) in (1..).zip(delays) {
        // Data whose chunks are stored but dead (their version removed
        // longer ago than the grace) when the racing upload finds them.
        // Many small files: the upload asks which chunks are stored in
        // several batches over some tens of ms, so a GC can land between a
        // "stored" answer and the commit (the upload's retry path).
        let mine = files(&format!("r{round}"), 600, 1000..6000, |_| round);
        let content = union(&[&base, &mine]);
        let dir = write_tree(work.path(), &format!("round-{round}"), &content);
        let up = upload_ok(&addr, &dir, "race", work.path());
        rm(&addr, &format!("race@{}", u(&up, "number")));
        tokio::time::sleep(PAST_GRACE).await;

        // The same contents again, from a new directory, racing a GC that
        // starts a little later each round: early rounds sweep before the
        // upload asks what is stored, later ones between that question and
        // the commit, the last ones after the commit.
        let again = write_tree(work.path(), &format!("round-{round}-again"), &content);
        let mut up_cmd = upload_cmd(&addr, &again, "race", work.path());
        up_cmd
            .arg("--threads")
            .arg("1")
            .env("RUST_LOG", "warn,granary_client=info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut gc_cmd = granary_cmd(&[
            "admin",
            "gc",
            "--json",
            "--server",
            &addr,
            "--compact-below",
            "0.9",
        ]);
        gc_cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let up_child = up_cmd.spawn().unwrap();
        std::thread::sleep(Duration::from_millis(delay));
        let gc_child = gc_cmd.spawn().unwrap();
        let up_out = up_child.wait_with_output().unwrap();
        let gc_report = ok_json("racing gc", gc_child.wait_with_output().unwrap());
        compactions(&gc_report);
        let err = text(&up_out.stderr);
        let retry = err.contains("garbage-collected during the upload");
        retried += retry as u32;
        eprintln!(
            "round {round} (gc {delay} ms after the upload): gc swept {} chunks; upload retried: {retry}",
            gc_report["swept_chunks"]
        );
        if up_out.status.success() {
            let v: Value = serde_json::from_slice(&up_out.stdout).unwrap();
            eprintln!("round {round}: upload committed {v}");
            live.push((u(&v, "number"), content.clone()));
            committed += 1;
        } else {
            // A failure is one clear line, never a committed half version.
            let line = err.lines().last().unwrap_or_default();
            eprintln!("round {round}: upload failed: {err}");
            assert_eq!(up_out.status.code(), Some(1), "{err}");
            assert!(line.starts_with("error: "), "unclear failure: {err}");
            failed += 1;
        }
        // Every committed version is complete right now.
        for (n, want) in &live {
            read_matches(&addr, "race", *n, want).await;
        }
    }
    eprintln!("racing uploads: {committed} committed ({retried} after a retry), {failed} failed");
    assert!(
        committed * 2 >= delays.len(),
        "too few racing uploads committed: {committed}"
    );

    // Nothing a committed version needs was collected: a full GC now finds
    // every live version complete, and they still download.
    let listed: Vec<u64> = meta
        .list_versions("race")
        .await
        .unwrap()
        .iter()
        .map(|v| v.number)
        .collect();
    let mut want_numbers: Vec<u64> = live.iter().map(|(n, _)| *n).collect();
    want_numbers.sort();
    let mut listed_sorted = listed.clone();
    listed_sorted.sort();
    assert_eq!(listed_sorted, want_numbers, "live versions");
    tokio::time::sleep(PAST_GRACE).await;
    gc(&addr, &["--compact-below", "0.9"]);
    for (n, want) in &live {
        read_matches(&addr, "race", *n, want).await;
    }
    let (n, want) = live.last().unwrap();
    download_matches(&addr, &format!("race@{n}"), work.path(), want);
    eprintln!("uploads racing gc: {:?}", started.elapsed());
}

// ---------------------------------------------------------------------------
// 4-5. Scrub and repair
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrub_repairs_a_damaged_copy_from_a_replica() {
    let started = Instant::now();
    let work = tempdir("scrub");
    let c = Cluster::start(3).await;
    let addr = c.addr(1);
    let content = files("d", 12, 200_000..600_000, |_| 1);
    upload_files(&addr, work.path(), "src", &content, "ds");
    download_matches(&addr, "ds", work.path(), &content);

    // The largest pack whose chain starts at node 2, so downloads ask node 2 first.
    let packs = c.client(1).list_packs(None, None).await.unwrap();
    for p in &packs {
        let mut r = p.replicas.clone();
        r.sort();
        assert_eq!(r, vec![1, 2, 3], "pack {p:?}");
    }
    let pack = packs
        .iter()
        .filter(|p| p.replicas[0] == 2)
        .max_by_key(|p| p.bytes)
        .unwrap_or_else(|| panic!("no pack is read from node 2 first: {packs:?}"))
        .clone();
    let (good, bad) = (
        pack_path(&c.node(1).dir, pack.id),
        pack_path(&c.node(2).dir, pack.id),
    );
    assert_eq!(fs::read(&good).unwrap(), fs::read(&bad).unwrap());
    flip_byte(&bad, pack.bytes / 2);
    assert_ne!(fs::read(&good).unwrap(), fs::read(&bad).unwrap());
    eprintln!(
        "flipped byte {} of pack {} ({} bytes) on node 2",
        pack.bytes / 2,
        pack.id,
        pack.bytes
    );

    // Before any scrub: the client finds the damaged frame and reads another replica.
    let err = download_matches(&addr, "ds", work.path(), &content);
    assert!(
        err.contains("damaged frame") && err.contains(&format!("pack {}", pack.id)),
        "the download did not report the damaged frame it read around: {err}"
    );

    let report = scrub_ok(&addr, "admin scrub");
    eprintln!("scrub: {report}");
    assert_eq!(report["ok"], true, "{report}");
    let nodes = report["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 3, "{report}");
    for n in nodes {
        let id = u(n, "node");
        assert!(n.get("error").is_none(), "{n}");
        assert_eq!(u(n, "packs") as usize, packs.len(), "{n}");
        assert!(n["failed"].as_array().unwrap().is_empty(), "{n}");
        let bad_ids: Vec<u64> = n["bad"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_u64().unwrap())
            .collect();
        let repaired = n["repaired"].as_array().unwrap();
        if id == 2 {
            assert_eq!(bad_ids, vec![pack.id], "{n}");
            assert_eq!(repaired.len(), 1, "{n}");
            assert_eq!(u(&repaired[0], "pack"), pack.id, "{n}");
            let from = repaired[0]["from"].as_str().unwrap();
            assert!(from.contains("replica"), "repaired from {from}, not a replica");
        } else {
            assert!(bad_ids.is_empty() && repaired.is_empty(), "{n}");
        }
    }
    assert!(
        fs::read(&good).unwrap() == fs::read(&bad).unwrap(),
        "node 2's copy differs from node 1's after the repair"
    );
    let quarantined: Vec<String> = fs::read_dir(c.node(2).dir.join("quarantine"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        quarantined
            .iter()
            .any(|n| n.starts_with(&format!("{}.pack", pack.id))),
        "no quarantined copy of pack {}: {quarantined:?}",
        pack.id
    );
    let err = download_matches(&addr, "ds", work.path(), &content);
    assert!(!err.contains("damaged"), "damage after the repair: {err}");

    // A second scrub finds everything good.
    let again = scrub_ok(&addr, "second scrub");
    assert_eq!(again["ok"], true);
    for n in again["nodes"].as_array().unwrap() {
        assert!(n["bad"].as_array().unwrap().is_empty(), "{again}");
    }
    eprintln!("scrub with replicas: {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damage_without_another_copy_is_reported_never_served() {
    let started = Instant::now();
    let work = tempdir("scrub-alone");
    let c = Cluster::start(1).await;
    let addr = c.addr(1);
    let content = files("d", 10, 200_000..500_000, |_| 1);
    upload_files(&addr, work.path(), "src", &content, "ds");
    let packs = c.client(1).list_packs(None, None).await.unwrap();
    let pack = packs.iter().max_by_key(|p| p.bytes).unwrap().clone();
    let path = pack_path(&c.node(1).dir, pack.id);
    flip_byte(&path, pack.bytes / 2);

    // The download fails clearly; it cannot return wrong bytes.
    let dest = work.path().join("dl-damaged");
    let o = granary(&["download", "ds", s(&dest), "--server", &addr]);
    let err = text(&o.stderr);
    eprintln!("download of damaged data: {err}");
    assert_eq!(
        o.status.code(),
        Some(1),
        "the download succeeded with a damaged only copy: {err}"
    );
    assert_names_damaged_pack(&err, pack.id);
    for args in [vec![], vec!["--no-repair"], vec![]] {
        let report = failed_scrub(&addr, &args);
        assert_eq!(report["ok"], false, "{report}");
        let node = &report["nodes"][0];
        assert_eq!(
            node["bad"],
            serde_json::json!([pack.id]),
            "scrub {args:?}: {report}"
        );
        if args.is_empty() {
            let failed = node["failed"].as_array().unwrap();
            assert_eq!(failed.len(), 1, "{report}");
            assert_eq!(u(&failed[0], "pack"), pack.id);
        }
    }
    // The failed repairs put the damaged copy back: it stays reported, and
    // its intact frames stay readable.
    assert!(
        path.exists(),
        "the only copy of pack {} is gone from packs/",
        pack.id
    );
    // Human output names the pack too.
    for args in [["--no-repair"].as_slice(), [].as_slice()] {
        let mut all = vec!["admin", "scrub", "--server", &addr];
        all.extend_from_slice(args);
        let o = granary(&all);
        assert!(!o.status.success());
        let out = text(&o.stdout);
        assert!(
            out.contains(&format!("damaged: [{}]", pack.id)),
            "scrub {args:?} output does not name pack {}: {out}",
            pack.id
        );
    }
    // Still never wrong bytes.
    let o = granary(&[
        "download",
        "ds",
        s(&work.path().join("dl-again")),
        "--server",
        &addr,
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o.stderr));
    eprintln!("scrub without a replica: {:?}", started.elapsed());
}

// ---------------------------------------------------------------------------
// 6. Re-replication
// ---------------------------------------------------------------------------

/// Waits until every registered pack lists 3 replicas on `nodes`, and every
/// one of them holds a copy the same size as node `reference`'s.
async fn wait_replicated(c: &Cluster, nodes: &[u64], reference: u64, timeout: Duration) {
    let meta = c.client(reference);
    wait_for(&format!("every pack on nodes {nodes:?}"), timeout, || async {
        let packs = meta.list_packs(None, None).await.map_err(|e| e.to_string())?;
        let want = pack_files(&c.node(reference).dir);
        for p in &packs {
            let mut r = p.replicas.clone();
            r.sort();
            if r != nodes {
                return Err(format!("pack {} on {:?}", p.id, p.replicas));
            }
            if want.get(&p.id) != Some(&p.bytes) {
                return Err(format!("node {reference} has no full copy of pack {}", p.id));
            }
        }
        for &n in nodes {
            let have = pack_files(&c.node(n).dir);
            for p in &packs {
                if have.get(&p.id) != Some(&p.bytes) {
                    return Err(format!("node {n}'s copy of pack {}: {:?}", p.id, have.get(&p.id)));
                }
            }
        }
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_node_s_packs_are_copied_to_a_new_node() {
    let started = Instant::now();
    let work = tempdir("rerepl");
    let mut c = Cluster::start_with(
        3,
        NodeOptions::default()
            .env("GRANARY_NODE_DEAD_SECS", "3")
            .env("GRANARY_REPAIR_SECS", "1"),
    )
    .await;
    let content = files("d", 10, 200_000..600_000, |_| 1);
    upload_files(&c.addr(1), work.path(), "src", &content, "ds");
    let packs = c.client(1).list_packs(None, None).await.unwrap();
    assert!(packs.len() >= 3, "{packs:?}");
    // Nothing changes while every node is alive (heartbeats keep them fresh).
    tokio::time::sleep(5 * SEC).await;
    assert_eq!(c.client(1).list_packs(None, None).await.unwrap(), packs);

    c.kill(3);
    c.spawn(4, Some(1));
    let t = Instant::now();
    wait_replicated(&c, &[1, 2, 4], 1, 60 * SEC).await;
    eprintln!("re-replicated onto node 4 in {:?}", t.elapsed());
    let addrs = format!("{},{}", c.addr(1), c.addr(2));
    download_matches(&addrs, "ds", work.path(), &content);
    // Node 4's copies are byte-identical to node 1's.
    for p in &packs {
        assert!(
            fs::read(pack_path(&c.node(4).dir, p.id)).unwrap()
                == fs::read(pack_path(&c.node(1).dir, p.id)).unwrap(),
            "node 4's copy of pack {} differs",
            p.id
        );
    }
    eprintln!("re-replication after a dead node: {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_node_s_packs_are_copied_to_the_live_nodes() {
    let started = Instant::now();
    let work = tempdir("remove");
    let mut c = Cluster::start_with(3, NodeOptions::default().env("GRANARY_REPAIR_SECS", "1")).await;
    let content = files("d", 10, 200_000..600_000, |_| 1);
    upload_files(&c.addr(1), work.path(), "src", &content, "ds");

    c.kill(3);
    c.spawn(4, Some(1));
    c.wait_voters(1, &[1, 2, 3, 4], 30 * SEC).await;
    ok(
        "remove-node 3",
        granary(&["admin", "remove-node", "3", "--server", &c.addr(1)]),
    );
    let t = Instant::now();
    wait_replicated(&c, &[1, 2, 4], 1, 60 * SEC).await;
    eprintln!("re-replicated after remove-node in {:?}", t.elapsed());
    let nodes = c.client(1).list_nodes().await.unwrap();
    assert!(
        nodes.iter().all(|n| n.id != 3),
        "node 3 is still listed: {nodes:?}"
    );
    let addrs = format!("{},{},{}", c.addr(1), c.addr(2), c.addr(4));
    download_matches(&addrs, "ds", work.path(), &content);
    eprintln!("re-replication after remove-node: {:?}", started.elapsed());
}
