//! Harness for end-to-end tests that run real `granary server` processes.
//!
//! A [`Cluster`] owns a temporary directory with one data directory per node
//! (`node-N/`) and its log (`node-N.log`, stderr and stdout of the process).
//! Every node listens on its own loopback port, so tests run in parallel
//! threads of one test binary without sharing anything. Dropping the cluster
//! (also while a test panics) kills every child process; on a panic it first
//! prints the tail of every node's log, and `GRANARY_TEST_KEEP=1` keeps the
//! directory for a closer look. `GRANARY_TEST_LOG` sets the servers'
//! `RUST_LOG` (default `warn`).

#![allow(dead_code)]

mod std_helpers;
pub use std_helpers::{free_port, poll_until};

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::fs::OpenOptions;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileExt, MetadataExt};

use granary_client::{proto, ClientError, MetaClient};
use granary_core::{Tree, TreeId};
pub use granary_raft::NodeStatus;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_granary");

/// One `granary server` process and its fixed address and data directory.
pub struct Node {
    pub id: u64,
    pub addr: String,
    pub dir: PathBuf,
    pub log: PathBuf,
    join: Option<String>,
    child: Option<Child>,
    starts: u32,
    /// Extra `granary server` flags and environment of this node.
    pub opts: NodeOptions,
}

/// Extra flags and environment for `granary server` processes.
#[derive(Debug, Clone, Default)]
pub struct NodeOptions {
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

impl NodeOptions {
    pub fn arg(mut self, a: impl Into<String>) -> Self {
        self.args.push(a.into());
        self
    }

    pub fn env(mut self, k: impl Into<String>, v: impl Into<String>) -> Self {
        self.env.push((k.into(), v.into()));
        self
    }
}

impl Node {
    fn spawn(&mut self) {
        assert!(self.child.is_none(), "node {} is already running", self.id);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open node log");
        self.starts += 1;
        use std::io::Write;
        let _ = writeln!(
            &log,
            "===== harness: start #{} of node {} =====",
            self.starts, self.id
        );
        let mut cmd = Command::new(BIN);
        cmd.arg("server")
            .arg("--node-id")
            .arg(self.id.to_string())
            .arg("--listen")
            .arg(&self.addr)
            .arg("--data-dir")
            .arg(&self.dir);
        if let Some(seed) = &self.join {
            cmd.arg("--join").arg(seed);
        }
        cmd.args(&self.opts.args);
        let level = std::env::var("GRANARY_TEST_LOG").unwrap_or_else(|_| "warn".into());
        cmd.env("RUST_LOG", level)
            .env("NO_COLOR", "1")
            // Sealed packs whose session failed are swept after 2 s, not 10 minutes.
            .env("GRANARY_PACK_GRACE_SECS", "2")
            .env_remove("GRANARY_SERVER")
            // The object store comes from the test's flags or environment only.
            .env_remove("GRANARY_OBJECT_STORE")
            .envs(self.opts.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log);
        self.child = Some(cmd.spawn().expect("spawn granary server"));
    }

    /// True while the process runs; reaps it (and reports where its log is) once it exited.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut().map(|c| c.try_wait()) {
            Some(Ok(None)) => true,
            Some(Ok(Some(status))) => {
                eprintln!(
                    "node {} exited by itself ({status}); see {}",
                    self.id,
                    self.log.display()
                );
                self.child = None;
                false
            }
            Some(Err(e)) => panic!("waiting for node {}: {e}", self.id),
            None => false,
        }
    }

    /// SIGKILL, as a crash would; waits until the process is gone.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The last `lines` lines of the node's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A set of nodes in one temporary directory. Node ids are chosen by the test.
pub struct Cluster {
    // Declared before `tmp`: the processes die before their directories go.
    nodes: BTreeMap<u64, Node>,
    tmp: Option<tempfile::TempDir>,
    /// Flags and environment every node spawned from now on gets.
    pub defaults: NodeOptions,
}

impl Default for Cluster {
    fn default() -> Self {
        Self::new()
    }
}

impl Cluster {
    /// An empty cluster: no node yet.
    pub fn new() -> Self {
        let tmp = tempfile::Builder::new()
            .prefix("granary-test-")
            .tempdir()
            .expect("temp dir");
        Self {
            nodes: BTreeMap::new(),
            tmp: Some(tmp),
            defaults: NodeOptions::default(),
        }
    }

    /// Like [`start`](Self::start), every node with `opts`.
    pub async fn start_with(n: u64, opts: NodeOptions) -> Self {
        let mut c = Self::new();
        c.defaults = opts;
        c.start_nodes(n).await;
        c
    }

    /// Starts nodes 1..=n: node 1 bootstraps, each other node joins node 1;
    /// returns once node 1 reports all n nodes as voters and every node
    /// knows the leader.
    pub async fn start(n: u64) -> Self {
        let mut c = Self::new();
        c.start_nodes(n).await;
        c
    }

    async fn start_nodes(&mut self, n: u64) {
        self.spawn(1, None);
        self.wait_leader(&[1], Duration::from_secs(20)).await;
        for id in 2..=n {
            self.spawn(id, Some(1));
            let want: Vec<u64> = (1..=id).collect();
            self.wait_voters(1, &want, Duration::from_secs(30)).await;
        }
        let all = self.ids();
        self.wait_leader(&all, Duration::from_secs(20)).await;
    }

    /// Changes node `id`'s environment for its next (re)start: sets `k`, or removes it for `None`.
    pub fn set_env(&mut self, id: u64, k: &str, v: Option<&str>) {
        let opts = &mut self.node_mut(id).opts;
        opts.env.retain(|(key, _)| key != k);
        if let Some(v) = v {
            opts.env.push((k.to_string(), v.to_string()));
        }
    }

    pub fn root(&self) -> &Path {
        self.tmp.as_ref().unwrap().path()
    }

    /// Adds node `id` on a fresh port and starts it, joining node `join` if given.
    pub fn spawn(&mut self, id: u64, join: Option<u64>) {
        assert!(!self.nodes.contains_key(&id), "node {id} exists already");
        let join = join.map(|j| self.addr(j));
        let root = self.root().to_path_buf();
        let mut node = Node {
            id,
            addr: format!("127.0.0.1:{}", free_port()),
            dir: root.join(format!("node-{id}")),
            log: root.join(format!("node-{id}.log")),
            join,
            child: None,
            starts: 0,
            opts: self.defaults.clone(),
        };
        node.spawn();
        self.nodes.insert(id, node);
    }

    /// Ids of every node the cluster ever started.
    pub fn ids(&self) -> Vec<u64> {
        self.nodes.keys().copied().collect()
    }

    pub fn node(&self, id: u64) -> &Node {
        self.nodes.get(&id).unwrap_or_else(|| panic!("no node {id}"))
    }

    fn node_mut(&mut self, id: u64) -> &mut Node {
        self.nodes.get_mut(&id).unwrap_or_else(|| panic!("no node {id}"))
    }

    pub fn addr(&self, id: u64) -> String {
        self.node(id).addr.clone()
    }

    /// True while node `id`'s process runs.
    pub fn is_running(&mut self, id: u64) -> bool {
        self.node_mut(id).is_running()
    }

    /// kill -9 node `id`.
    pub fn kill(&mut self, id: u64) {
        self.node_mut(id).kill();
    }

    /// Starts node `id` again with the same address, data directory and flags.
    pub fn restart(&mut self, id: u64) {
        self.node_mut(id).spawn();
    }

    /// A client that talks to node `id` only.
    pub fn client(&self, id: u64) -> MetaClient {
        self.client_of(&[id])
    }

    /// A client that fails over between the given nodes, in that order.
    pub fn client_of(&self, ids: &[u64]) -> MetaClient {
        let addrs: Vec<String> = ids.iter().map(|&i| self.addr(i)).collect();
        MetaClient::connect(&addrs).expect("client")
    }

    /// Node `id`'s own status (through the SDK), or why it could not be had.
    pub async fn status(&self, id: u64) -> Result<NodeStatus, String> {
        let client = self.client(id);
        let json = match tokio::time::timeout(Duration::from_secs(3), client.status(true)).await {
            Ok(Ok(json)) => json,
            Ok(Err(e)) => return Err(format!("node {id}: {e}")),
            Err(_) => return Err(format!("node {id}: status timed out")),
        };
        serde_json::from_value(json["node"].clone())
            .map_err(|e| format!("node {id}: malformed status {json}: {e}"))
    }

    /// The status of every node in `ids`, or the first failure.
    pub async fn statuses(&self, ids: &[u64]) -> Result<Vec<NodeStatus>, String> {
        let mut out = Vec::new();
        for &id in ids {
            out.push(self.status(id).await?);
        }
        Ok(out)
    }

    /// Waits until every node in `ids` reports the same leader, which is one of
    /// `ids` and reports itself as `Leader`; returns its id.
    pub async fn wait_leader(&self, ids: &[u64], timeout: Duration) -> u64 {
        wait_for(&format!("a leader among nodes {ids:?}"), timeout, || async {
            let all = self.statuses(ids).await?;
            let leader = all[0]
                .leader
                .ok_or_else(|| format!("node {} knows no leader", all[0].node_id))?;
            if all.iter().any(|s| s.leader != Some(leader)) {
                return Err(format!("nodes disagree on the leader: {:?}", leaders(&all)));
            }
            let l = all
                .iter()
                .find(|s| s.node_id == leader)
                .ok_or_else(|| format!("leader {leader} is not one of {ids:?}"))?;
            if l.state != "Leader" {
                return Err(format!("leader {leader} reports state {}", l.state));
            }
            Ok(leader)
        })
        .await
    }

    /// Waits until node `id` reports exactly `voters` as voters and no learner.
    pub async fn wait_voters(&self, id: u64, voters: &[u64], timeout: Duration) -> NodeStatus {
        wait_for(
            &format!("node {id} to report voters {voters:?}"),
            timeout,
            || async {
                let s = self.status(id).await?;
                if s.voters == voters && s.learners.is_empty() {
                    Ok(s)
                } else {
                    Err(format!("voters {:?}, learners {:?}", s.voters, s.learners))
                }
            },
        )
        .await
    }

    /// Waits until every node in `ids` reports the same applied index, digest
    /// and digest index (the digest describing exactly the applied index);
    /// returns the status of the first.
    pub async fn wait_converged(&self, ids: &[u64], timeout: Duration) -> NodeStatus {
        wait_for(&format!("nodes {ids:?} to converge"), timeout, || async {
            let all = self.statuses(ids).await?;
            let first = &all[0];
            let same = all.iter().all(|s| {
                s.applied_index.is_some()
                    && s.applied_index == first.applied_index
                    && s.digest_index == s.applied_index
                    && s.digest == first.digest
            });
            if same {
                Ok(first.clone())
            } else {
                let view: Vec<String> = all
                    .iter()
                    .map(|s| {
                        format!(
                            "node {}: applied {:?}, digest {} at {:?}",
                            s.node_id,
                            s.applied_index,
                            &s.digest[..s.digest.len().min(12)],
                            s.digest_index
                        )
                    })
                    .collect();
                Err(view.join("; "))
            }
        })
        .await
    }

    /// `granary admin status --json` against node `id`: the parsed JSON
    /// (`{"node": ..., "cluster": [...]}`), or the command's error output.
    pub fn admin_status(&self, id: u64) -> Result<serde_json::Value, String> {
        let o = self.cli(&["admin", "status", "--server", &self.addr(id), "--json"]);
        if !o.status.success() {
            return Err(format!(
                "admin status --json against node {id} failed ({}): {}",
                o.status,
                String::from_utf8_lossy(&o.stderr).trim()
            ));
        }
        serde_json::from_slice(&o.stdout).map_err(|e| {
            format!(
                "admin status --json printed no JSON ({e}): {}",
                String::from_utf8_lossy(&o.stdout)
            )
        })
    }

    /// Runs the `granary` binary with `args` and returns its output.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .env("RUST_LOG", "warn")
            .env_remove("GRANARY_SERVER")
            .output()
            .expect("run granary")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        if panicking {
            for n in self.nodes.values() {
                eprintln!(
                    "----- node {} ({}) log, last lines of {} -----\n{}",
                    n.id,
                    n.addr,
                    n.log.display(),
                    n.log_tail(40)
                );
            }
        }
        for n in self.nodes.values_mut() {
            n.kill();
        }
        if std::env::var_os("GRANARY_TEST_KEEP").is_some() {
            if let Some(tmp) = self.tmp.take() {
                eprintln!("kept test directory {}", tmp.keep().display());
            }
        }
    }
}

fn leaders(all: &[NodeStatus]) -> Vec<(u64, Option<u64>, String)> {
    all.iter()
        .map(|s| (s.node_id, s.leader, s.state.clone()))
        .collect()
}

/// Polls `check` until it returns `Ok`, and returns that value; panics after
/// `timeout` with `what` and the last reason `check` gave.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    poll_until(what, timeout, check)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// An empty tree object and its id: a valid root for a version.
pub fn empty_tree() -> (TreeId, Vec<u8>) {
    let t = Tree::new(vec![]).unwrap();
    let bytes = t.encode();
    (TreeId::of(&bytes), bytes)
}

/// A commit request of `root` on top of `parent`.
pub fn commit_req(dataset: &str, root: &TreeId, parent: Option<u64>, message: &str) -> proto::CommitRequest {
    proto::CommitRequest {
        dataset: dataset.into(),
        root: root.as_bytes().to_vec(),
        parent,
        force: false,
        message: message.into(),
        stats: None,
    }
}

/// The gRPC code of a server error by name (`"NotFound"`, ...), or `"none"`.
pub fn code_name(e: &ClientError) -> String {
    e.code().map_or_else(|| "none".into(), |c| format!("{c:?}"))
}

/// Asserts that `r` failed with the gRPC code named `code` (`"NotFound"`, ...)
/// and a one-line message that satisfies `check`; returns the message.
#[track_caller]
pub fn expect_err<T: Debug>(
    what: &str,
    r: Result<T, ClientError>,
    code: &str,
    check: impl FnOnce(&str) -> bool,
) -> String {
    let e = match r {
        Ok(v) => panic!("{what}: expected {code}, got success: {v:?}"),
        Err(e) => e,
    };
    let msg = e.to_string();
    eprintln!("{what}: {}: {msg}", code_name(&e));
    assert_eq!(code_name(&e), code, "{what}: wrong code for error: {msg}");
    assert!(
        !msg.is_empty() && !msg.contains('\n'),
        "{what}: message is not one line: {msg:?}"
    );
    assert!(check(&msg), "{what}: unexpected message: {msg}");
    msg
}

// ---------------------------------------------------------------------------
// Running the CLI
// ---------------------------------------------------------------------------

/// `granary ARGS` with quiet logs, no colours, no inherited GRANARY_SERVER.
pub fn granary_cmd(args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.args(args)
        .env("RUST_LOG", "warn")
        .env("NO_COLOR", "1")
        .env("GRANARY_PACK_GRACE_SECS", "2")
        .env_remove("GRANARY_SERVER")
        .stdin(Stdio::null());
    c
}

pub fn granary(args: &[&str]) -> Output {
    granary_cmd(args).output().expect("run granary")
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

pub fn s(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// Asserts success and returns stdout.
#[track_caller]
pub fn ok(what: &str, o: Output) -> String {
    assert!(
        o.status.success(),
        "{what}: exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        text(&o.stdout),
        text(&o.stderr)
    );
    text(&o.stdout)
}

/// Asserts success and parses stdout as JSON.
#[track_caller]
pub fn ok_json(what: &str, o: Output) -> serde_json::Value {
    let out = ok(what, o);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{what}: stdout is not JSON ({e}): {out}"))
}

/// `len` random (incompressible) bytes.
pub fn random_bytes(rng: &mut fastrand::Rng, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rng.fill(&mut v);
    v
}

// ---------------------------------------------------------------------------
// Object stores
// ---------------------------------------------------------------------------

/// A fresh directory for a `file://` object tier (removed on drop).
pub fn objects_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("granary-objects-")
        .tempdir()
        .expect("temp dir")
}

/// The `file://` URL of a directory from [`objects_dir`].
pub fn file_url(dir: &tempfile::TempDir) -> String {
    format!("file://{}", dir.path().display())
}

/// `$GRANARY_TEST_S3_URL/<test>-<unique>`: a prefix no other test (or earlier
/// run) uses. Panics (the test fails, it does not skip) when the variable is unset.
pub fn s3_url(test: &str) -> String {
    let base = std::env::var("GRANARY_TEST_S3_URL").unwrap_or_else(|_| {
        panic!("GRANARY_TEST_S3_URL is not set; run the suite with ./scripts/test, which starts an S3 server")
    });
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "{}/{test}-{}-{nanos:x}",
        base.trim_end_matches('/'),
        std::process::id()
    )
}

/// Two tests of one check `async fn CHECK(url: &str)`: `FILE_TEST` runs it
/// against a fresh `file://` directory ([`objects_dir`]), `S3_TEST` against a
/// fresh prefix `PREFIX-...` of `$GRANARY_TEST_S3_URL` ([`s3_url`]).
///
/// `object_store_tests!(CHECK, FILE_TEST, S3_TEST, "PREFIX");` (the test
/// crate declares `#[macro_use] mod common;`).
#[allow(unused_macros)]
macro_rules! object_store_tests {
    ($check:ident, $file_test:ident, $s3_test:ident, $prefix:literal) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $file_test() {
            let objects = crate::common::objects_dir();
            $check(&crate::common::file_url(&objects)).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $s3_test() {
            $check(&crate::common::s3_url($prefix)).await;
        }
    };
}

// ---------------------------------------------------------------------------
// FUSE mounts
// ---------------------------------------------------------------------------

/// Whether `p` is a mountpoint now.
pub fn is_mounted(p: &Path) -> bool {
    let want = std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines()
        .any(|l| l.split(' ').nth(4) == Some(want.to_str().unwrap()))
}

/// A `granary mount`; unmounts (lazily, so a panicking test's open files do
/// not block it) on drop, also when the test panics.
pub struct MountGuard {
    pub path: PathBuf,
    pub cache: PathBuf,
}

impl MountGuard {
    /// `granary mount VERSION PATH --cache-dir CACHE --server ADDR`; asserts success.
    #[track_caller]
    pub fn mount(addr: &str, version: &str, path: &Path, cache: &Path) -> Self {
        Self::mount_with(addr, version, path, cache, &[])
    }

    /// As [`MountGuard::mount`], with `extra` flags appended.
    #[track_caller]
    pub fn mount_with(addr: &str, version: &str, path: &Path, cache: &Path, extra: &[&str]) -> Self {
        Self::mount_with_env(addr, version, path, cache, extra, &[])
    }

    /// As [`MountGuard::mount_with`], the mount running with `env` set.
    #[track_caller]
    pub fn mount_with_env(
        addr: &str,
        version: &str,
        path: &Path,
        cache: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        std::fs::create_dir_all(path).unwrap();
        let started = Instant::now();
        let mut args = vec![
            "mount",
            version,
            s(path),
            "--server",
            addr,
            "--cache-dir",
            s(cache),
        ];
        args.extend_from_slice(extra);
        let mut cmd = granary_cmd(&args);
        cmd.envs(env.iter().copied());
        let o = cmd.output().expect("run granary mount");
        let g = MountGuard {
            path: path.to_path_buf(),
            cache: cache.to_path_buf(),
        };
        ok(&format!("mount {version}"), o);
        eprintln!("mount {version} took {:?}", started.elapsed());
        assert!(
            is_mounted(path),
            "{} is not mounted after `granary mount`",
            path.display()
        );
        g
    }

    /// The mount's counters (`granary cache-stats --json`).
    #[track_caller]
    pub fn stats(&self) -> serde_json::Value {
        ok_json(
            "cache-stats",
            granary(&[
                "cache-stats",
                s(&self.path),
                "--cache-dir",
                s(&self.cache),
                "--json",
            ]),
        )
    }

    /// `granary umount`; asserts success and that the path is no longer a mountpoint.
    #[track_caller]
    pub fn unmount(self) {
        ok(
            "umount",
            granary(&["umount", s(&self.path), "--cache-dir", s(&self.cache)]),
        );
        assert!(!is_mounted(&self.path));
    }

    /// [`unmount`](Self::unmount), which waits for the mount process to
    /// write its final counters and exit; asserts it is gone and returns
    /// those counters.
    #[track_caller]
    pub fn umount(self) -> serde_json::Value {
        let pid = self.stats()["pid"].as_u64().unwrap();
        let (path, cache) = (self.path.clone(), self.cache.clone());
        self.unmount();
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "mount process {pid} still runs after umount"
        );
        let v = MountGuard { path, cache }.stats();
        assert_eq!(v["mounted"], false);
        v["stats"].clone()
    }
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        if is_mounted(&self.path) {
            let _ = Command::new("fusermount3")
                .arg("-u")
                .arg("-z")
                .arg(&self.path)
                .status();
            if is_mounted(&self.path) {
                let _ = Command::new("umount").arg("-l").arg(&self.path).status();
            }
        }
    }
}

/// Reads up to `len` bytes at `off` of `path` (through a mount), then drops
/// the file's pages from the kernel page cache, so the next read of the same
/// range goes to the mount process again.
pub fn read_uncached(path: &Path, off: u64, len: usize) -> std::io::Result<Vec<u8>> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; len];
    let mut n = 0;
    while n < len {
        let got = f.read_at(&mut buf[n..], off + n as u64)?;
        if got == 0 {
            break;
        }
        n += got;
    }
    buf.truncate(n);
    // SAFETY: fadvise on our own open descriptor.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    Ok(buf)
}

// ---------------------------------------------------------------------------
// Trees on disk: snapshots and comparing them
// ---------------------------------------------------------------------------

/// What a snapshot records of one entry's contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    File {
        size: u64,
        blake3: String,
    },
    Dir,
    /// The link's target.
    Symlink(Vec<u8>),
}

/// One entry of a [`Snapshot`]. Symlinks carry only their target (mode and mtime 0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub kind: Kind,
    /// `mode & 0o7777`.
    pub mode: u32,
    /// (seconds, nanoseconds); (0, 0) in a [`snapshot_without_mtimes`].
    pub mtime: (i64, i64),
}

/// Relative path bytes -> entry, of everything below a root (the root itself excluded).
pub type Snapshot = BTreeMap<Vec<u8>, Entry>;

/// BLAKE3 (hex) of the file at `p`.
pub fn blake3_file(p: &Path) -> String {
    let mut h = blake3::Hasher::new();
    let mut f = std::fs::File::open(p).unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
    std::io::copy(&mut f, &mut h).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()));
    h.finalize().to_hex().to_string()
}

/// Every entry below `root` by a recursive walk (not following symlinks):
/// kind, size and BLAKE3 of files, symlink targets, modes and mtimes.
pub fn snapshot(root: &Path) -> Snapshot {
    snapshot_of(root, true)
}

/// [`snapshot`] without mtimes (all (0, 0)): what a mount or a download
/// must reproduce when times are not the point.
pub fn snapshot_without_mtimes(root: &Path) -> Snapshot {
    snapshot_of(root, false)
}

fn snapshot_of(root: &Path, mtimes: bool) -> Snapshot {
    fn walk(root: &Path, dir: &Path, mtimes: bool, out: &mut Snapshot) {
        for e in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display())) {
            let p = e.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(root).unwrap().as_os_str().as_bytes().to_vec();
            let ft = m.file_type();
            let entry = if ft.is_symlink() {
                Entry {
                    kind: Kind::Symlink(std::fs::read_link(&p).unwrap().into_os_string().into_vec()),
                    mode: 0,
                    mtime: (0, 0),
                }
            } else {
                let kind = if ft.is_dir() {
                    walk(root, &p, mtimes, out);
                    Kind::Dir
                } else {
                    assert!(ft.is_file(), "unexpected file type at {}", p.display());
                    Kind::File {
                        size: m.len(),
                        blake3: blake3_file(&p),
                    }
                };
                Entry {
                    kind,
                    mode: m.mode() & 0o7777,
                    mtime: if mtimes {
                        (m.mtime(), m.mtime_nsec())
                    } else {
                        (0, 0)
                    },
                }
            };
            out.insert(rel, entry);
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, mtimes, &mut out);
    out
}

/// Total size of the regular files in a snapshot.
pub fn file_bytes(snap: &Snapshot) -> u64 {
    snap.values()
        .map(|e| match e.kind {
            Kind::File { size, .. } => size,
            _ => 0,
        })
        .sum()
}

/// Asserts two snapshots are identical, naming every differing path.
#[track_caller]
pub fn assert_same(what: &str, want: &Snapshot, got: &Snapshot) {
    if want == got {
        return;
    }
    let mut report = Vec::new();
    for (k, w) in want {
        match got.get(k) {
            None => report.push(format!("missing {:?}: {w:?}", text(k))),
            Some(g) if g != w => report.push(format!("differs {:?}:\n   want {w:?}\n   got  {g:?}", text(k))),
            _ => {}
        }
    }
    for (k, g) in got {
        if !want.contains_key(k) {
            report.push(format!("extra {:?}: {g:?}", text(k)));
        }
    }
    panic!(
        "{what}: trees differ in {} entries:\n{}",
        report.len(),
        report.join("\n")
    );
}
