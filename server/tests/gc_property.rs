//! Property test: garbage collection (sweep and compaction), tier moves and
//! uploads that race a GC never lose or damage a live version, and storage
//! returns to exactly the live size.
//!
//! Each case starts a real server in this process (one node, meta and chunk
//! roles, fresh directories, an object tier) and runs a random
//! sequence of operations on 2-3 small datasets: uploads (random edits of
//! the dataset's last tree, or a fresh tree; files share pieces so chunks
//! dedup across files, versions and datasets, and packs are shared), removal
//! of a live version, GC with `compact_below` 0, 0.5 or 0.99, tier moves of a
//! dataset or one version to the object tier or back (waiting for the
//! mover), an upload and a GC started together, a tier move left to the
//! mover while a GC runs (and the moved version is maybe removed), and
//! waits past the GC grace period (`GRANARY_GC_GRACE_SECS=1`) so that GC
//! has something to reclaim.
//!
//! After every step, every version the model holds downloads byte-identical
//! to the directory it was uploaded from, and the server lists exactly the
//! model's versions. At the end every version but one is removed and, past
//! the grace period, two GCs must bring storage back to exactly the live
//! size (see `Case::check_live_size`); removing the last version and one
//! more GC must leave no pack registered and no pack file or object on disk.
//! The property runs twice: with a `file://` object tier (its directory is
//! checked on disk) and, in fewer cases, with an S3 one (a fresh prefix of
//! `$GRANARY_TEST_S3_URL` per case, pack objects counted by listing the
//! store; the S3 variant fails, not skips, when that variable is unset). A
//! further deterministic test covers the one race of an upload with GC that
//! random timing practically never hits.
//!
//! `PROPTEST_CASES` sets the number of `file://` cases (default
//! [`DEFAULT_CASES`]), `GC_PROPERTY_S3_CASES` that of S3 cases (default
//! [`DEFAULT_S3_CASES`]);
//! shrinking is off unless `PROPTEST_MAX_SHRINK_ITERS` is set, since every
//! case runs a server for a few seconds. `GC_PROPERTY_VERBOSE=1` prints each
//! step as it runs; a failure prints every step of its case.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use granary_client::object::ObjectTier;
use granary_client::upload::NoProgress;
use granary_client::{Client, ClientError, UploadOptions};
use granary_core::frame::FRAME_HEADER_LEN;
use granary_core::pack::{INDEX_ENTRY_LEN, PACK_HEADER_LEN, TRAILER_LEN};
use granary_core::tree::EntryData;
use granary_core::{ChunkId, ChunkerConfig, TreeId};
use granary_server::{Roles, ServerConfig, ServerError};
use proptest::prelude::*;

// free_port and poll_until, shared with the end-to-end tests' harness.
#[path = "../../tests/common/std_helpers.rs"]
mod std_helpers;
use std_helpers::{free_port, poll_until};

/// Cases when `PROPTEST_CASES` is not set (about 4 s each on 2 busy cores).
const DEFAULT_CASES: u32 = 16;
/// Cases of the S3 variant when `GC_PROPERTY_S3_CASES` is not set.
const DEFAULT_S3_CASES: u32 = 4;
/// GC grace period of the servers (`GRANARY_GC_GRACE_SECS`).
const GRACE: Duration = Duration::from_secs(1);
/// How long to wait so that everything written before is out of the grace
/// period. GC compares millisecond timestamps of this same host, so a
/// quarter second of margin is plenty.
const PAST_GRACE: Duration = Duration::from_millis(1250);
/// Bound on any wait for the server (start, file deletions).
const TIMEOUT: Duration = Duration::from_secs(30);

/// A directory tree: relative path -> file content (directories are implied).
type Files = BTreeMap<String, Vec<u8>>;

/// One step of a case. Datasets and versions are picked by index among what
/// exists when the step runs, so every generated sequence is meaningful.
#[derive(Debug, Clone)]
enum Op {
    /// Upload a random edit of the dataset's last tree (or a fresh tree).
    Upload { ds: usize, seed: u64, fresh: bool },
    /// Remove a live version (of `ds` if it has one, else of any dataset).
    Rm { ds: usize, pick: usize },
    /// `gc` with `compact_below` = `COMPACT[compact]`.
    Gc { compact: usize },
    /// `tier move` of every version of the dataset, or of one, and wait.
    TierMove {
        ds: usize,
        pick: Option<usize>,
        to_object: bool,
    },
    /// An upload and a GC started together (one `delay_ms` after the
    /// other). `revive` uploads a tree of a removed version again, whose
    /// chunks the GC may be sweeping right then; `settle` first waits past
    /// the grace period so that everything removed so far is reclaimable.
    UploadRacingGc {
        ds: usize,
        seed: u64,
        revive: bool,
        settle: bool,
        compact: usize,
        gc_first: bool,
        delay_ms: u64,
    },
    /// Past the grace period, `tier move` without waiting, optionally `rm`
    /// of the moved version, and a GC `delay_ms` later, while the mover
    /// (which looks at its queue every 0.5 s) works; then wait for the
    /// queue to drain.
    TierMoveRacingGc {
        ds: usize,
        pick: Option<usize>,
        to_object: bool,
        rm: bool,
        compact: usize,
        delay_ms: u64,
    },
    /// Let the GC grace period pass.
    Wait,
}

const COMPACT: [f64; 3] = [0.0, 0.5, 0.99];

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (0..3usize, any::<u64>(), prop::bool::weighted(0.2))
            .prop_map(|(ds, seed, fresh)| Op::Upload { ds, seed, fresh }),
        3 => (0..3usize, any::<usize>()).prop_map(|(ds, pick)| Op::Rm { ds, pick }),
        2 => (0..3usize).prop_map(|compact| Op::Gc { compact }),
        2 => (0..3usize, prop::option::of(any::<usize>()), any::<bool>())
            .prop_map(|(ds, pick, to_object)| Op::TierMove { ds, pick, to_object }),
        3 => (
            (0..3usize, any::<u64>(), any::<bool>(), any::<bool>()),
            (0..3usize, any::<bool>(), 0..40u64)
        )
            .prop_map(|((ds, seed, revive, settle), (compact, gc_first, delay_ms))| {
                Op::UploadRacingGc {
                    ds,
                    seed,
                    revive,
                    settle,
                    compact,
                    gc_first,
                    delay_ms,
                }
            }),
        2 => (
            (0..3usize, prop::option::of(any::<usize>()), prop::bool::weighted(0.7)),
            (any::<bool>(), 0..3usize, 0..1200u64)
        )
            .prop_map(|((ds, pick, to_object), (rm, compact, delay_ms))| {
                Op::TierMoveRacingGc {
                    ds,
                    pick,
                    to_object,
                    rm,
                    compact,
                    delay_ms,
                }
            }),
        2 => Just(Op::Wait),
    ]
}

/// Random content generator: files are pieces of a shared pool and fresh
/// random bytes, some of it compressible.
struct Gen {
    rng: fastrand::Rng,
    pieces: Vec<Vec<u8>>,
}

impl Gen {
    fn new(seed: u64) -> Self {
        let mut rng = fastrand::Rng::with_seed(seed);
        let pieces = (0..8)
            .map(|i| {
                let len = rng.usize(300..12_000);
                if i % 3 == 0 {
                    // Compressible: frames store fewer bytes than the chunk.
                    let mut text = Vec::new();
                    let mut n = rng.u32(..1000);
                    while text.len() < len {
                        text.extend_from_slice(format!("line {n} of piece {i}\n").as_bytes());
                        n += 1;
                    }
                    text.truncate(len);
                    text
                } else {
                    random_bytes(&mut rng, len)
                }
            })
            .collect();
        Self { rng, pieces }
    }

    fn content(&mut self) -> Vec<u8> {
        let rng = &mut self.rng;
        let target = match rng.u8(..10) {
            0..=3 => rng.usize(200..2_000),
            4..=7 => rng.usize(2_000..20_000),
            _ => rng.usize(20_000..100_000),
        };
        let mut out = Vec::with_capacity(target + 12_000);
        while out.len() < target {
            if rng.bool() {
                out.extend_from_slice(&self.pieces[rng.usize(..self.pieces.len())]);
            } else {
                let n = rng.usize(50..3_000);
                out.extend(random_bytes(rng, n));
            }
        }
        out.truncate(target);
        out
    }

    fn path(&mut self) -> String {
        let rng = &mut self.rng;
        let mut p = String::new();
        for _ in 0..rng.usize(0..=3) {
            p.push_str(&format!("d{}/", rng.u8(..3)));
        }
        p.push_str(&format!("f{}.bin", rng.u8(..12)));
        p
    }

    fn fresh(&mut self) -> Files {
        let mut t = Files::new();
        for _ in 0..self.rng.usize(1..=6) {
            let p = self.path();
            let c = self.content();
            t.insert(p, c);
        }
        t
    }

    /// One to three edits of `tree`: add, remove, rename or change files.
    fn edit(&mut self, tree: &Files) -> Files {
        let mut t = tree.clone();
        for _ in 0..self.rng.usize(1..=3) {
            let keys: Vec<String> = t.keys().cloned().collect();
            let pick = keys[self.rng.usize(..keys.len())].clone();
            match self.rng.u8(..8) {
                0 | 1 => {
                    let (p, c) = (self.path(), self.content());
                    t.insert(p, c);
                }
                2 if t.len() > 1 => {
                    t.remove(&pick);
                }
                3 => {
                    let c = t.remove(&pick).unwrap();
                    let p = self.path();
                    t.insert(p, c);
                }
                _ => {
                    let rng = &mut self.rng;
                    let c = t.get_mut(&pick).unwrap();
                    let at = rng.usize(..=c.len());
                    match rng.u8(..4) {
                        0 => {
                            let n = rng.usize(1..500);
                            let ins = random_bytes(rng, n);
                            c.splice(at..at, ins);
                        }
                        1 => c.truncate(at),
                        2 => c.extend_from_slice(&self.pieces[rng.usize(..self.pieces.len())]),
                        _ => {
                            let end = (at + rng.usize(1..2_000)).min(c.len());
                            for b in &mut c[at..end] {
                                *b = rng.u8(..);
                            }
                        }
                    }
                }
            }
        }
        t
    }
}

fn random_bytes(rng: &mut fastrand::Rng, n: usize) -> Vec<u8> {
    (0..n).map(|_| rng.u8(..)).collect()
}

fn write_tree(dir: &Path, t: &Files) {
    std::fs::create_dir_all(dir).unwrap();
    for (p, c) in t {
        let path = dir.join(p);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, c).unwrap();
    }
}

/// Every regular file under `dir` (anything else is an error).
fn read_tree(dir: &Path) -> Result<Files, String> {
    let mut out = Files::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).map_err(|e| format!("{}: {e}", d.display()))? {
            let e = e.map_err(|e| e.to_string())?;
            let ty = e.file_type().map_err(|e| e.to_string())?;
            let rel = e.path().strip_prefix(dir).unwrap().to_string_lossy().into_owned();
            if ty.is_dir() {
                stack.push(e.path());
            } else if ty.is_file() {
                out.insert(rel, std::fs::read(e.path()).map_err(|e| e.to_string())?);
            } else {
                return Err(format!("unexpected non-file {rel}"));
            }
        }
    }
    Ok(out)
}

/// What differs between two trees, readably.
fn tree_diff(want: &Files, got: &Files) -> String {
    let mut out = Vec::new();
    for (p, c) in want {
        match got.get(p) {
            None => out.push(format!("missing {p} ({} bytes)", c.len())),
            Some(g) if g != c => {
                let first = c
                    .iter()
                    .zip(g)
                    .position(|(a, b)| a != b)
                    .unwrap_or(c.len().min(g.len()));
                out.push(format!(
                    "{p}: {} bytes, want {} (first difference at byte {first})",
                    g.len(),
                    c.len()
                ));
            }
            Some(_) => {}
        }
    }
    for (p, g) in got {
        if !want.contains_key(p) {
            out.push(format!("unexpected {p} ({} bytes)", g.len()));
        }
    }
    out.join("; ")
}

/// Total size of the files under `dir` and how many there are.
fn disk_usage(dir: &Path) -> (u64, u64) {
    let (mut bytes, mut files) = (0, 0);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(e.path()),
                Ok(_) => {
                    // A file may be deleted between listing and stat.
                    if let Ok(m) = e.metadata() {
                        bytes += m.len();
                        files += 1;
                    }
                }
                Err(_) => {}
            }
        }
    }
    (bytes, files)
}

/// A server running in this process.
struct Server {
    data: PathBuf,
    /// The object tier's directory when it is `file://`; `None` for S3.
    objects: Option<PathBuf>,
    /// The object tier's URL.
    object_url: String,
    client: Client,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), ServerError>>,
}

impl Server {
    /// A server with its data directory below `dir`; its object tier is
    /// `object_url`, or `file://<dir>/objects` when that is `None`.
    async fn start(dir: &Path, object_url: Option<&str>) -> Result<Self, String> {
        let data = dir.join("data");
        let (objects, object_url) = match object_url {
            Some(url) => (None, url.to_string()),
            None => {
                let objects = dir.join("objects");
                std::fs::create_dir_all(&objects).unwrap();
                let url = format!("file://{}", objects.display());
                (Some(objects), url)
            }
        };
        let addr = format!("127.0.0.1:{}", free_port());
        let cfg = ServerConfig {
            node_id: 1,
            listen: addr.clone(),
            data_dir: data.clone(),
            join: None,
            roles: Roles {
                meta: true,
                chunk: true,
            },
            replicas: 0,
            object_store: Some(object_url.clone()),
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(granary_server::run(cfg, async {
            let _ = stopped.await;
        }));
        let client = Client::connect(std::slice::from_ref(&addr)).map_err(|e| e.to_string())?;
        let meta = client.meta().clone();
        poll_until("the server to register its chunk role", TIMEOUT, || {
            let meta = meta.clone();
            async move {
                let nodes = meta.list_nodes().await.map_err(|e| e.to_string())?;
                if nodes.iter().any(|n| n.roles.iter().any(|r| r == "chunk")) {
                    Ok(())
                } else {
                    Err(format!("nodes: {nodes:?}"))
                }
            }
        })
        .await?;
        Ok(Self {
            data,
            objects,
            object_url,
            client,
            stop,
            task,
        })
    }

    async fn stop(self) -> Result<(), String> {
        let _ = self.stop.send(());
        match tokio::time::timeout(TIMEOUT, self.task).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(e))) => Err(format!("the server failed: {e}")),
            Ok(Err(e)) => Err(format!("the server task failed: {e}")),
            Err(_) => Err("the server did not stop".into()),
        }
    }

    /// Bytes and number of stored packs: SSD pack files, and the files
    /// below a `file://` object tier's directory or the pack objects an S3
    /// listing shows.
    async fn stored(&self) -> Result<(u64, u64), String> {
        let (a, n) = disk_usage(&self.data.join("packs"));
        let (b, m) = match &self.objects {
            Some(dir) => disk_usage(dir),
            None => {
                let url = &self.object_url;
                let packs = ObjectTier::from_url(url)
                    .map_err(|e| format!("object tier {url}: {e}"))?
                    .list_packs()
                    .await
                    .map_err(|e| format!("listing {url}: {e}"))?;
                (packs.iter().map(|(_, size)| size).sum(), packs.len() as u64)
            }
        };
        Ok((a + b, n + m))
    }
}

fn err(what: impl std::fmt::Display, e: ClientError) -> String {
    format!("{what}: {e}")
}

/// The state of one case: the server, the model and a log of the steps.
struct Case {
    server: Server,
    tmp: PathBuf,
    datasets: usize,
    gen: Gen,
    /// Live versions: (dataset index, number) -> files.
    live: BTreeMap<(usize, u64), Files>,
    /// Each dataset's last uploaded tree.
    last: Vec<Option<Files>>,
    /// Each dataset's highest version number so far (0: none).
    newest: Vec<u64>,
    /// Trees of removed versions, with their dataset.
    removed: Vec<(usize, Files)>,
    step: usize,
    /// When the last step that may have stored trees or packs ended: GC
    /// keeps everything stored within the grace period before its start.
    last_write: Instant,
    log: Vec<String>,
    verbose: bool,
}

/// Tiny chunks (64 B - 1 KiB) in 16 KiB packs: many chunks and packs from little data.
fn upload_opts(message: String) -> UploadOptions {
    UploadOptions {
        message,
        threads: 1,
        pack_size: 16 << 10,
        chunker: ChunkerConfig::tiny(),
        use_file_cache: false,
        ..UploadOptions::default()
    }
}

fn name(ds: usize) -> String {
    format!("ds{ds}")
}

fn size_of(t: &Files) -> String {
    format!(
        "{} files, {} bytes",
        t.len(),
        t.values().map(Vec::len).sum::<usize>()
    )
}

impl Case {
    /// Logs a step, after what the server and client reported during it.
    fn note(&mut self, line: String) {
        let mut lines: Vec<String> = Vec::new();
        for e in take_events() {
            if lines.last() != Some(&format!("    {e}")) {
                lines.push(format!("    {e}"));
            }
        }
        lines.push(line);
        for line in lines {
            if self.verbose {
                eprintln!("  {line}");
            }
            self.log.push(line);
        }
    }

    fn upload_opts(&self) -> UploadOptions {
        upload_opts(format!("step {}", self.step))
    }

    fn source_dir(&self, files: &Files) -> PathBuf {
        let dir = self.tmp.join(format!("src-{}", self.step));
        write_tree(&dir, files);
        dir
    }

    fn next_tree(&mut self, ds: usize, seed: u64, fresh: bool) -> Files {
        self.gen.rng.seed(seed);
        match (&self.last[ds], fresh) {
            (Some(t), false) => {
                let t = t.clone();
                self.gen.edit(&t)
            }
            _ => self.gen.fresh(),
        }
    }

    /// Live versions of `ds`, or of any dataset when it has none.
    fn pick_version(&self, ds: usize, pick: usize) -> Option<(usize, u64)> {
        let mine: Vec<(usize, u64)> = self.live.keys().filter(|(d, _)| *d == ds).copied().collect();
        let from = if mine.is_empty() {
            self.live.keys().copied().collect()
        } else {
            mine
        };
        (!from.is_empty()).then(|| from[pick % from.len()])
    }

    /// What a tier move of `ds` (every version) or of a picked version
    /// names: the dataset and maybe the number; `None` when it has no
    /// live version to move.
    fn move_target(&self, ds: usize, pick: Option<usize>) -> Option<(usize, Option<u64>)> {
        match pick {
            None => self.live.keys().any(|(d, _)| *d == ds).then_some((ds, None)),
            Some(p) => self.pick_version(ds, p).map(|(d, n)| (d, Some(n))),
        }
    }

    fn committed(&mut self, ds: usize, number: u64, files: Files) -> Result<(), String> {
        let newest = self.newest[ds];
        if number <= newest {
            return Err(format!(
                "{}@{number} committed after {}@{newest}: version numbers are never reused",
                name(ds),
                name(ds)
            ));
        }
        self.newest[ds] = number;
        self.last[ds] = Some(files.clone());
        self.live.insert((ds, number), files);
        Ok(())
    }

    /// Waits until everything stored so far is past the GC grace period.
    async fn past_grace(&self) {
        tokio::time::sleep_until((self.last_write + PAST_GRACE).into()).await;
    }

    async fn gc(&self, compact: f64) -> Result<serde_json::Value, String> {
        let report = self
            .server
            .client
            .meta()
            .gc(false, Some(compact))
            .await
            .map_err(|e| err(format!("gc --compact-below {compact}"), e))?;
        if let Some(bad) = report["compacted"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c.get("error").is_some()))
        {
            return Err(format!(
                "gc --compact-below {compact}: a compaction failed: {bad}"
            ));
        }
        Ok(report)
    }

    fn gc_summary(report: &serde_json::Value) -> String {
        format!(
            "swept {} trees, {} chunks, {} packs; compacted {}",
            report["swept_trees"],
            report["swept_chunks"],
            report["deleted_packs"],
            report["compacted"].as_array().map_or(0, Vec::len)
        )
    }

    async fn run_op(&mut self, op: &Op) -> Result<(), String> {
        let meta = self.server.client.meta().clone();
        match *op {
            Op::Upload { ds, seed, fresh } => {
                let ds = ds % self.datasets;
                let files = self.next_tree(ds, seed, fresh);
                let dir = self.source_dir(&files);
                let report = self
                    .server
                    .client
                    .upload_dir(&dir, &name(ds), &self.upload_opts(), Arc::new(NoProgress))
                    .await
                    .map_err(|e| err(format!("upload to {}", name(ds)), e))?;
                let n = report.version.number;
                self.note(format!(
                    "upload {}@{n}: {}, {} new chunks, {} packs",
                    name(ds),
                    size_of(&files),
                    report.new_chunks,
                    report.packs
                ));
                self.committed(ds, n, files)?;
            }
            Op::Rm { ds, pick } => {
                let Some((ds, n)) = self.pick_version(ds % self.datasets, pick) else {
                    self.note("rm: no live version, skipped".into());
                    return Ok(());
                };
                meta.delete_version(&name(ds), n)
                    .await
                    .map_err(|e| err(format!("rm {}@{n}", name(ds)), e))?;
                let files = self.live.remove(&(ds, n)).unwrap();
                self.removed.push((ds, files));
                self.note(format!("rm {}@{n}", name(ds)));
            }
            Op::Gc { compact } => {
                let report = self.gc(COMPACT[compact]).await?;
                self.note(format!(
                    "gc --compact-below {}: {}",
                    COMPACT[compact],
                    Self::gc_summary(&report)
                ));
            }
            Op::TierMove { ds, pick, to_object } => {
                let to = if to_object { "object" } else { "ssd" };
                let ds = ds % self.datasets;
                let Some((ds, n)) = self.move_target(ds, pick) else {
                    self.note(format!(
                        "tier move {} --to {to}: no live version, skipped",
                        name(ds)
                    ));
                    return Ok(());
                };
                let what = format!(
                    "tier move {}{} --to {to}",
                    name(ds),
                    n.map(|n| format!("@{n}")).unwrap_or_default()
                );
                let report = meta
                    .tier_move(&name(ds), n, to, true)
                    .await
                    .map_err(|e| err(&what, e))?;
                if report["done"] != true {
                    return Err(format!("{what}: not done after waiting: {report}"));
                }
                self.note(format!(
                    "{what}: {} packs used, {} queued, {} kept shared",
                    report["packs_used"], report["queued"], report["kept_shared"]
                ));
            }
            Op::UploadRacingGc {
                ds,
                seed,
                revive,
                settle,
                compact,
                gc_first,
                delay_ms,
            } => {
                let ds = ds % self.datasets;
                if settle {
                    self.past_grace().await;
                }
                let (files, how) = if revive && !self.removed.is_empty() {
                    let k = seed as usize % self.removed.len();
                    let (from, t) = &self.removed[k];
                    (t.clone(), format!("a removed tree of {}", name(*from)))
                } else {
                    (self.next_tree(ds, seed, false), "an edit".to_string())
                };
                let dir = self.source_dir(&files);
                let opts = self.upload_opts();
                let client = self.server.client.clone();
                let delay = Duration::from_millis(delay_ms);
                let upload = async {
                    if gc_first {
                        tokio::time::sleep(delay).await;
                    }
                    client
                        .upload_dir(&dir, &name(ds), &opts, Arc::new(NoProgress))
                        .await
                };
                let gc = async {
                    if !gc_first {
                        tokio::time::sleep(delay).await;
                    }
                    self.gc(COMPACT[compact]).await
                };
                let (uploaded, report) = tokio::join!(upload, gc);
                let report = report?;
                let what = format!(
                    "{}upload {how} ({}) to {} racing gc --compact-below {} ({} first by {delay_ms} ms)",
                    if settle {
                        "wait past the grace period, "
                    } else {
                        ""
                    },
                    size_of(&files),
                    name(ds),
                    COMPACT[compact],
                    if gc_first { "gc" } else { "upload" },
                );
                match uploaded {
                    Ok(r) => {
                        let n = r.version.number;
                        self.note(format!(
                            "{what}: committed @{n}, {} new chunks; gc {}",
                            r.new_chunks,
                            Self::gc_summary(&report)
                        ));
                        self.committed(ds, n, files)?;
                    }
                    Err(e) => {
                        // The client retries once when GC took a chunk it
                        // counted on; with one GC at a time that retry
                        // must succeed, so any failure is a finding.
                        return Err(format!(
                            "{what}: the upload failed: {e}; gc {}",
                            Self::gc_summary(&report)
                        ));
                    }
                }
            }
            Op::TierMoveRacingGc {
                ds,
                pick,
                to_object,
                rm,
                compact,
                delay_ms,
            } => {
                let to = if to_object { "object" } else { "ssd" };
                let ds = ds % self.datasets;
                let Some((ds, n)) = self.move_target(ds, pick) else {
                    self.note(format!(
                        "tier move {} --to {to} --no-wait: no live version, skipped",
                        name(ds)
                    ));
                    return Ok(());
                };
                self.past_grace().await;
                let mut what = format!(
                    "wait past the grace period, tier move {}{} --to {to} --no-wait",
                    name(ds),
                    n.map(|n| format!("@{n}")).unwrap_or_default()
                );
                let report = meta
                    .tier_move(&name(ds), n, to, false)
                    .await
                    .map_err(|e| err(&what, e))?;
                what.push_str(&format!(" ({} queued)", report["queued"]));
                if let (true, Some(n)) = (rm, n) {
                    meta.delete_version(&name(ds), n)
                        .await
                        .map_err(|e| err(format!("{what}, rm {}@{n}", name(ds)), e))?;
                    let files = self.live.remove(&(ds, n)).unwrap();
                    self.removed.push((ds, files));
                    what.push_str(&format!(", rm {}@{n}", name(ds)));
                }
                tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                let report = self.gc(COMPACT[compact]).await?;
                what.push_str(&format!(
                    ", gc --compact-below {} after {delay_ms} ms: {}",
                    COMPACT[compact],
                    Self::gc_summary(&report)
                ));
                poll_until("the tier mover's queue to drain", TIMEOUT, || async {
                    let status = meta.tier_status().await.map_err(|e| e.to_string())?;
                    match status["queue"].as_array() {
                        Some(q) if q.is_empty() => Ok(()),
                        _ => Err(format!("queue: {}", status["queue"])),
                    }
                })
                .await
                .map_err(|e| format!("{what}: {e}"))?;
                self.note(what);
            }
            Op::Wait => {
                self.past_grace().await;
                self.note("wait past the GC grace period".into());
            }
        }
        Ok(())
    }

    /// The server lists exactly the model's versions, and each downloads
    /// byte-identical to its source.
    async fn verify(&self) -> Result<(), String> {
        let meta = self.server.client.meta();
        for ds in 0..self.datasets {
            let listed: BTreeSet<u64> = match meta.list_versions(&name(ds)).await {
                Ok(v) => v.iter().map(|v| v.number).collect(),
                Err(e) if e.is_not_found() => BTreeSet::new(),
                Err(e) => return Err(err(format!("list versions of {}", name(ds)), e)),
            };
            let want: BTreeSet<u64> = self
                .live
                .keys()
                .filter(|(d, _)| *d == ds)
                .map(|(_, n)| *n)
                .collect();
            if listed != want {
                return Err(format!(
                    "{} lists versions {listed:?}, the model has {want:?}",
                    name(ds)
                ));
            }
        }
        let checks = self.live.iter().map(|((ds, n), files)| async move {
            let dest = self.tmp.join(format!("check-{}-{ds}-{n}", self.step));
            let result = async {
                self.server
                    .client
                    .download(&name(*ds), Some(*n), &dest)
                    .await
                    .map_err(|e| err("download", e))?;
                let got = read_tree(&dest)?;
                if &got != files {
                    return Err(tree_diff(files, &got));
                }
                Ok(())
            }
            .await;
            let _ = std::fs::remove_dir_all(&dest);
            result.map_err(|e| format!("{}@{n} is not what was uploaded: {e}", name(*ds)))
        });
        let errors: Vec<String> = futures::future::join_all(checks)
            .await
            .into_iter()
            .filter_map(Result::err)
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("\n"))
        }
    }

    /// The distinct chunks of a version and their stored lengths.
    async fn chunks_of(&self, ds: usize, n: u64) -> Result<HashMap<ChunkId, u32>, String> {
        let reader = self
            .server
            .client
            .open_version(&name(ds), Some(n))
            .await
            .map_err(|e| err("open version", e))?;
        let mut ids = BTreeSet::new();
        let mut stack: Vec<TreeId> = vec![reader.root()];
        while let Some(id) = stack.pop() {
            let tree = reader.tree(id).await.map_err(|e| err("read tree", e))?;
            for e in tree.entries() {
                match &e.data {
                    EntryData::Dir { tree } => stack.push(*tree),
                    EntryData::File { .. } => {
                        for c in reader.chunk_list(e).await.map_err(|e| err("chunk list", e))? {
                            ids.insert(c.id);
                        }
                    }
                    EntryData::Symlink { .. } => {}
                }
            }
        }
        let ids: Vec<ChunkId> = ids.into_iter().collect();
        let mut out = HashMap::new();
        for batch in ids.chunks(4096) {
            let reply = self
                .server
                .client
                .meta()
                .lookup_chunks(batch)
                .await
                .map_err(|e| err("lookup chunks", e))?;
            if !reply.missing.is_empty() {
                return Err(format!(
                    "{} chunks of {}@{n} are missing",
                    reply.missing.len(),
                    name(ds)
                ));
            }
            for c in reply.found {
                out.insert(ChunkId::from_slice(&c.id).unwrap(), c.stored_len);
            }
        }
        Ok(out)
    }

    /// With one version left and everything else past the grace period,
    /// GC must bring storage back to exactly what that version needs.
    ///
    /// Why exact: a pack holds a 24-byte header, its frames (48-byte frame
    /// header + stored bytes each), a 48-byte index entry per frame and a
    /// 56-byte trailer. The first GC sweeps every dead chunk and every pack
    /// left without a live chunk, then compacts every pack whose live share
    /// (live frame bytes / pack bytes) is below 0.99: with chunks of at most
    /// 1 KiB, header, index and trailer alone keep every pack's share below
    /// 1072 / (1072 + 48) < 0.96, so every pack is rewritten with exactly
    /// its live frames, in the tier it was in (each pack has one copy: one
    /// SSD replica or one object). A live chunk is indexed in exactly one
    /// pack and compaction copies only indexed frames, so duplicate copies
    /// of a chunk (two uploads storing it at once) are gone too. The second
    /// GC finds nothing: the new packs are within the grace period. So the
    /// registered packs hold exactly the live chunks, and
    ///   disk bytes = live frame bytes + live chunks x INDEX_ENTRY_LEN
    ///                + packs x (PACK_HEADER_LEN + TRAILER_LEN),
    /// which is far below the brief's "live frame bytes x 1.2 + per-pack
    /// overhead" (equality, not a margin, is what compaction promises).
    async fn check_live_size(&self, ds: usize, n: u64) -> Result<String, String> {
        let chunks = self.chunks_of(ds, n).await?;
        let frames: u64 = chunks.values().map(|l| *l as u64 + FRAME_HEADER_LEN as u64).sum();
        let meta = self.server.client.meta();
        let packs = meta
            .list_packs(None, None)
            .await
            .map_err(|e| err("list packs", e))?;
        let expected = frames
            + chunks.len() as u64 * INDEX_ENTRY_LEN as u64
            + packs.len() as u64 * (PACK_HEADER_LEN + TRAILER_LEN) as u64;
        let registered: u64 = packs.iter().map(|p| p.bytes).sum();
        let indexed: u64 = packs.iter().map(|p| p.chunks).sum();
        let summary = format!(
            "{} live chunks, {frames} live frame bytes, {} packs of {registered} bytes",
            chunks.len(),
            packs.len()
        );
        if registered != expected || indexed != chunks.len() as u64 {
            return Err(format!(
                "storage did not return to the live size: {summary} holding {indexed} chunks; \
                 expected {expected} bytes; packs: {packs:?}"
            ));
        }
        let dry = meta
            .gc(true, Some(0.0))
            .await
            .map_err(|e| err("gc --dry-run", e))?;
        for (k, want) in [
            ("live_versions", 1),
            ("live_chunks", chunks.len() as u64),
            ("dead_chunks", 0),
            ("dead_trees", 0),
            ("dead_packs", 0),
        ] {
            if dry[k] != want {
                return Err(format!("gc --dry-run: {k} is {}, expected {want}: {dry}", dry[k]));
            }
        }
        // Copies GC or the mover deleted go at once; anything else (a
        // leftover of an interrupted session) within the chunk server's
        // sweep period.
        poll_until("disk usage to match the registered packs", TIMEOUT, || async {
            let (bytes, files) = self.server.stored().await?;
            if bytes == registered && files == packs.len() as u64 {
                Ok(())
            } else {
                Err(format!(
                    "{files} files of {bytes} bytes on disk, {} packs of {registered} bytes registered",
                    packs.len()
                ))
            }
        })
        .await?;
        Ok(summary)
    }

    async fn finish(&mut self) -> Result<(), String> {
        let meta = self.server.client.meta().clone();
        let keep = match self.live.keys().next_back().copied() {
            Some(k) => k,
            None => {
                let files = self.next_tree(0, 0, true);
                let dir = self.source_dir(&files);
                let r = self
                    .server
                    .client
                    .upload_dir(&dir, &name(0), &self.upload_opts(), Arc::new(NoProgress))
                    .await
                    .map_err(|e| err("final upload", e))?;
                self.committed(0, r.version.number, files)?;
                self.last_write = Instant::now();
                (0, r.version.number)
            }
        };
        let others: Vec<(usize, u64)> = self.live.keys().filter(|k| **k != keep).copied().collect();
        for (ds, n) in others {
            meta.delete_version(&name(ds), n)
                .await
                .map_err(|e| err(format!("rm {}@{n}", name(ds)), e))?;
            self.live.remove(&(ds, n));
        }
        self.note(format!(
            "end: removed every version but {}@{}",
            name(keep.0),
            keep.1
        ));
        self.past_grace().await;
        for _ in 0..2 {
            let report = self.gc(0.99).await?;
            self.last_write = Instant::now();
            self.note(format!(
                "end: gc --compact-below 0.99: {}",
                Self::gc_summary(&report)
            ));
        }
        self.verify().await?;
        let summary = self.check_live_size(keep.0, keep.1).await?;
        self.note(format!("end: storage is the live size: {summary}"));

        meta.delete_version(&name(keep.0), keep.1)
            .await
            .map_err(|e| err("rm the last version", e))?;
        self.live.clear();
        self.past_grace().await;
        let report = self.gc(0.99).await?;
        self.note(format!(
            "end: rm the last version, gc: {}",
            Self::gc_summary(&report)
        ));
        let packs = meta
            .list_packs(None, None)
            .await
            .map_err(|e| err("list packs", e))?;
        if !packs.is_empty() {
            return Err(format!("packs still registered with no version left: {packs:?}"));
        }
        let dry = meta
            .gc(true, Some(0.0))
            .await
            .map_err(|e| err("gc --dry-run", e))?;
        for k in [
            "live_versions",
            "live_trees",
            "live_chunks",
            "dead_trees",
            "dead_chunks",
            "dead_packs",
        ] {
            if dry[k] != 0 {
                return Err(format!(
                    "gc --dry-run with no version left: {k} is {}: {dry}",
                    dry[k]
                ));
            }
        }
        poll_until("every pack file and object to be deleted", TIMEOUT, || async {
            match self.server.stored().await? {
                (0, 0) => Ok(()),
                (bytes, files) => Err(format!("{files} files of {bytes} bytes left")),
            }
        })
        .await?;
        self.note("end: no pack registered, nothing on disk".into());
        Ok(())
    }
}

async fn run_case(
    object_url: Option<&str>,
    seed: u64,
    datasets: usize,
    ops: &[Op],
    log: &mut Vec<String>,
) -> Result<(), String> {
    take_events();
    let tmp = tempfile::tempdir().map_err(|e| e.to_string())?;
    let server = Server::start(tmp.path(), object_url).await?;
    let mut case = Case {
        server,
        tmp: tmp.path().to_path_buf(),
        datasets,
        gen: Gen::new(seed),
        live: BTreeMap::new(),
        last: vec![None; datasets],
        newest: vec![0; datasets],
        removed: Vec::new(),
        step: 0,
        last_write: Instant::now(),
        log: Vec::new(),
        verbose: std::env::var_os("GC_PROPERTY_VERBOSE").is_some(),
    };
    let mut result = Ok(());
    for (i, op) in ops.iter().enumerate() {
        case.step = i + 1;
        result = case.run_op(op).await;
        if !matches!(
            op,
            Op::Rm { .. } | Op::Wait | Op::TierMove { .. } | Op::Gc { compact: 0 }
        ) {
            case.last_write = Instant::now();
        }
        if result.is_ok() {
            result = case
                .verify()
                .await
                .map_err(|e| format!("after step {} ({op:?}): {e}", i + 1));
        } else {
            result = result.map_err(|e| format!("step {} ({op:?}): {e}", i + 1));
        }
        if result.is_err() {
            break;
        }
    }
    if result.is_ok() {
        case.step = ops.len() + 1;
        result = case.finish().await.map_err(|e| format!("at the end: {e}"));
    }
    case.log
        .extend(take_events().into_iter().map(|e| format!("    {e}")));
    *log = std::mem::take(&mut case.log);
    let stopped = case.server.stop().await;
    result.and(stopped)
}

/// Warnings and errors of the server and client, and the client's retries
/// of uploads that lost a chunk to GC, since the last [`take_events`].
static EVENTS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
/// Uploads the client ran again because GC took a chunk they counted on.
static RETRIES: AtomicU32 = AtomicU32::new(0);

fn take_events() -> Vec<String> {
    std::mem::take(&mut *EVENTS.lock().unwrap())
}

/// Records [`EVENTS`]; everything else is dropped.
struct Recorder;

struct Fields(String);

impl tracing::field::Visit for Fields {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0.insert_str(0, &format!("{value:?} "));
        } else {
            self.0.push_str(&format!("{}={value:?} ", field.name()));
        }
    }
}

impl tracing::Subscriber for Recorder {
    fn enabled(&self, m: &tracing::Metadata<'_>) -> bool {
        *m.level() <= tracing::Level::WARN || m.target() == "granary_client::upload"
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, e: &tracing::Event<'_>) {
        let mut f = Fields(String::new());
        e.record(&mut f);
        if f.0.contains("uploading again") {
            RETRIES.fetch_add(1, Ordering::Relaxed);
        }
        let line = format!(
            "[{} {}] {}",
            e.metadata().level(),
            e.metadata().target(),
            f.0.trim_end()
        );
        EVENTS.lock().unwrap().push(line);
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

fn setup() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = tracing::subscriber::set_global_default(Recorder);
        // Before any server starts: GC reads its grace period per call, the
        // chunk servers' sweep of unregistered pack files at start.
        std::env::set_var("GRANARY_GC_GRACE_SECS", GRACE.as_secs().to_string());
        std::env::set_var("GRANARY_PACK_GRACE_SECS", "1");
    });
}

fn config() -> ProptestConfig {
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u32>().ok());
    ProptestConfig {
        cases: env("PROPTEST_CASES").unwrap_or(DEFAULT_CASES),
        max_shrink_iters: env("PROPTEST_MAX_SHRINK_ITERS").unwrap_or(0),
        // A failure prints its steps; replaying a seed against a live
        // server is not exact anyway, so no regression file is written.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Runs one case against a fresh server whose object tier is `object_url`
/// (`None`: a `file://` directory); panics with the case's steps on failure.
fn check_case(object_url: Option<&str>, seed: u64, datasets: usize, ops: &[Op]) {
    // One case at a time, also across the `file://` and S3 tests: a case's
    // log holds every warning recorded while it runs (EVENTS is global).
    static ONE_CASE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let one_case = ONE_CASE.lock().unwrap_or_else(|e| e.into_inner());
    setup();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    let started = Instant::now();
    let mut log = Vec::new();
    let result = rt.block_on(run_case(object_url, seed, datasets, ops, &mut log));
    drop(rt);
    drop(one_case);
    if std::env::var_os("GC_PROPERTY_VERBOSE").is_some() {
        eprintln!(
            "case: {} steps in {:.1?}; uploads retried after losing a chunk to GC so far: {}",
            ops.len(),
            started.elapsed(),
            RETRIES.load(Ordering::Relaxed)
        );
    }
    if let Err(e) = result {
        let tier = object_url.unwrap_or("a file:// directory");
        panic!(
            "{e}\n\ncase: seed {seed}, {datasets} datasets, {} ops, object tier {tier}; steps done:\n  {}\n",
            ops.len(),
            log.join("\n  ")
        );
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn gc_keeps_live_versions_and_returns_storage(
        seed in any::<u64>(),
        datasets in 2..=3usize,
        ops in prop::collection::vec(op(), 4..=12),
    ) {
        check_case(None, seed, datasets, &ops);
    }
}

/// The same property with the server's object tier in S3: each case uses
/// its own prefix `$GRANARY_TEST_S3_URL/gc-property-<unique>`, and the end
/// checks count pack objects through an S3 listing. `GC_PROPERTY_S3_CASES`
/// sets the number of cases (default [`DEFAULT_S3_CASES`]). Fails, not
/// skips, when `GRANARY_TEST_S3_URL` is unset.
#[test]
fn s3_gc_keeps_live_versions_and_returns_storage() {
    let base = std::env::var("GRANARY_TEST_S3_URL").unwrap_or_else(|_| {
        panic!("GRANARY_TEST_S3_URL is not set; run the suite with ./scripts/test, which starts an S3 server")
    });
    let cases = std::env::var("GC_PROPERTY_S3_CASES")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .unwrap_or(DEFAULT_S3_CASES);
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig { cases, ..config() });
    let cases = (any::<u64>(), 2..=3usize, prop::collection::vec(op(), 4..=12));
    let result = runner.run(&cases, |(seed, datasets, ops)| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let url = format!(
            "{}/gc-property-{}-{nanos:x}",
            base.trim_end_matches('/'),
            std::process::id()
        );
        check_case(Some(&url), seed, datasets, &ops);
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// The race an upload can lose to GC at its very end, made deterministic.
/// Uploading a tree the cluster still stores (that of a removed version)
/// sends no chunk and stores no tree (`PutTrees` skips stored trees without
/// logging them); a GC sweep that lands before the commit then removes the
/// root, and the commit is refused. The client runs an upload again on
/// exactly this answer (`lost_to_gc` in client/src/upload.rs), so it must
/// stay FailedPrecondition "... is not stored"; uploading again then stores
/// the version in full.
#[test]
fn commit_of_a_root_swept_after_put_trees_is_refused_as_not_stored() {
    setup();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let tmp = tempfile::tempdir().unwrap();
        let server = Server::start(tmp.path(), None).await.unwrap();
        let (client, meta) = (server.client.clone(), server.client.meta().clone());
        let files = Gen::new(7).fresh();
        let src = tmp.path().join("src");
        write_tree(&src, &files);
        let opts = upload_opts(String::new());
        let upload = || client.upload_dir(&src, "ds", &opts, Arc::new(NoProgress));
        let v1 = upload().await.unwrap().version;
        meta.delete_version("ds", v1.number).await.unwrap();
        // The upload's trees call stored nothing; GC sweeps the dead root.
        tokio::time::sleep(PAST_GRACE).await;
        let report = meta.gc(false, Some(0.0)).await.unwrap();
        assert!(report["swept_trees"].as_u64().unwrap() > 0, "{report}");
        let e = meta
            .commit_version(granary_client::proto::CommitRequest {
                dataset: "ds".into(),
                root: v1.root.clone(),
                parent: None,
                force: false,
                message: String::new(),
                stats: None,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some(tonic::Code::FailedPrecondition), "{e}");
        assert!(e.to_string().contains("is not stored"), "{e}");
        // The client's retry: the same upload stores everything again.
        let v2 = upload().await.unwrap().version;
        assert_eq!(v2.root, v1.root);
        let dest = tmp.path().join("back");
        client.download("ds", Some(v2.number), &dest).await.unwrap();
        assert_eq!(read_tree(&dest).unwrap(), files);
        server.stop().await.unwrap();
    });
}

/// Garbage collection as the upload's progress callback: the first chunk the
/// upload finds already stored makes it sweep every unreferenced chunk, the
/// ones this upload is counting on included.
struct GcOnFirstDedup {
    meta: granary_client::MetaClient,
    swept: std::sync::Mutex<Option<serde_json::Value>>,
}

impl granary_client::upload::UploadProgress for GcOnFirstDedup {
    fn deduplicated(&self, _bytes: u64) {
        let mut swept = self.swept.lock().unwrap();
        if swept.is_none() {
            let report = tokio::task::block_in_place(|| {
                tokio::runtime::Handle::current().block_on(self.meta.gc(false, Some(0.0)))
            });
            *swept = Some(report.unwrap());
        }
    }
}

/// `upload_dir` itself recovers when GC sweeps, mid-upload, the chunks it
/// found already stored: the first attempt is refused ("not stored"), the
/// second sends them; without the retry the upload fails.
#[test]
fn an_upload_whose_found_chunks_are_swept_mid_upload_retries_and_commits() {
    setup();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let tmp = tempfile::tempdir().unwrap();
        let server = Server::start(tmp.path(), None).await.unwrap();
        let (client, meta) = (server.client.clone(), server.client.meta().clone());
        let files = Gen::new(11).fresh();
        let src = tmp.path().join("src");
        write_tree(&src, &files);
        let opts = upload_opts(String::new());
        let v1 = client
            .upload_dir(&src, "ds", &opts, Arc::new(NoProgress))
            .await
            .unwrap()
            .version;
        // v1 goes; its chunks stay stored (unreferenced) until a GC past the grace.
        meta.delete_version("ds", v1.number).await.unwrap();
        tokio::time::sleep(PAST_GRACE).await;
        let progress = Arc::new(GcOnFirstDedup {
            meta: meta.clone(),
            swept: Default::default(),
        });
        let report = client
            .upload_dir(&src, "ds", &opts, progress.clone())
            .await
            .expect("the upload retries after GC swept the chunks it found");
        let gc = progress
            .swept
            .lock()
            .unwrap()
            .clone()
            .expect("the upload found stored chunks");
        assert!(gc["swept_chunks"].as_u64().unwrap() > 0, "{gc}");
        assert!(
            report.new_chunks > 0,
            "the retry sent the swept chunks: {report:?}"
        );
        let dest = tmp.path().join("back");
        client
            .download("ds", Some(report.version.number), &dest)
            .await
            .unwrap();
        assert_eq!(read_tree(&dest).unwrap(), files);
        server.stop().await.unwrap();
    });
}
