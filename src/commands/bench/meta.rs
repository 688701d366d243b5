//! `granary bench meta`: commit throughput and latency of a real metadata
//! cluster. Starts `--nodes` local `granary server` processes on loopback
//! ports in a temporary directory, forms the cluster with `--join`, then, for
//! each concurrency level c, runs `--commits` version commits split over c
//! tasks (each task commits a chain of versions to its own dataset, with a
//! 1 KiB message) and reports commits/s and per-commit latency against the
//! issue's targets. The servers are killed when the benchmark ends, also on
//! error.

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use granary_client::{proto, MetaClient};
use granary_core::{Tree, TreeId};
use serde_json::json;

/// The targets, at this concurrency.
const TARGET_CONCURRENCY: usize = 64;
const TARGET_COMMITS_PER_S: f64 = 5000.0;
const TARGET_P99_MS: f64 = 50.0;

#[derive(Debug, clap::Args)]
pub struct BenchMetaArgs {
    /// Meta nodes to start (all on this machine).
    #[arg(long, default_value_t = 3)]
    pub nodes: u64,
    /// Commits measured at each concurrency level.
    #[arg(long, default_value_t = 20_000)]
    pub commits: u64,
    /// Concurrency levels: how many committers run at once, each on its own dataset.
    #[arg(long, default_value = "1,64", value_delimiter = ',')]
    pub concurrency: Vec<usize>,
    /// Print machine-readable JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: &BenchMetaArgs) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("locating the granary binary")?;
    run_with(args, &exe)
}

/// [`run`] with the `granary` binary to start the servers from.
pub fn run_with(args: &BenchMetaArgs, exe: &Path) -> anyhow::Result<()> {
    if args.nodes == 0 {
        bail!("--nodes must be at least 1");
    }
    if args.commits == 0 {
        bail!("--commits must be at least 1");
    }
    if args.concurrency.is_empty() || args.concurrency.contains(&0) {
        bail!("--concurrency takes levels of at least 1, e.g. 1,64");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    // `servers` is dropped (every process killed) on every way out of here.
    let mut servers = Servers::new(exe)?;
    let rows = rt.block_on(async {
        if !args.json {
            eprintln!(
                "starting {} granary server node(s) in {}",
                args.nodes,
                servers.dir.path().display()
            );
        }
        let addrs = servers.form_cluster(args.nodes).await?;
        let leader = servers.leader_addr().await?;
        // The leader first: the client stays there and uses the others only if it fails.
        let mut order = vec![leader.clone()];
        order.extend(addrs.into_iter().filter(|a| *a != leader));
        let client = MetaClient::connect(&order)?;
        let root = empty_root(&client).await?;
        let mut rows = Vec::new();
        for (round, &c) in args.concurrency.iter().enumerate() {
            if !args.json {
                eprintln!("concurrency {c}: {} commits...", args.commits);
            }
            rows.push(measure(&client, &root, round, c, args.commits).await?);
        }
        anyhow::Ok(rows)
    })?;
    servers.kill_all();
    report(args, &rows);
    Ok(())
}

/// Stores the empty tree every benchmark version points at.
async fn empty_root(client: &MetaClient) -> anyhow::Result<TreeId> {
    let bytes = Tree::new(vec![])?.encode();
    let id = TreeId::of(&bytes);
    client
        .put_trees(vec![(id, bytes)])
        .await
        .context("storing the root tree")?;
    Ok(id)
}

/// One concurrency level's results.
struct Row {
    concurrency: usize,
    commits: u64,
    wall: Duration,
    /// Per-commit latencies, sorted.
    latencies: Vec<Duration>,
}

impl Row {
    fn commits_per_s(&self) -> f64 {
        self.commits as f64 / self.wall.as_secs_f64()
    }

    fn percentile_ms(&self, p: f64) -> f64 {
        let n = self.latencies.len();
        let i = ((n as f64 * p).ceil() as usize).clamp(1, n) - 1;
        self.latencies[i].as_secs_f64() * 1e3
    }

    fn max_ms(&self) -> f64 {
        self.latencies.last().map_or(0.0, |d| d.as_secs_f64() * 1e3)
    }

    /// (commits/s met, p99 met) where the issue sets a target.
    fn verdict(&self) -> Option<(bool, bool)> {
        (self.concurrency == TARGET_CONCURRENCY).then(|| {
            (
                self.commits_per_s() >= TARGET_COMMITS_PER_S,
                self.percentile_ms(0.99) < TARGET_P99_MS,
            )
        })
    }
}

/// Runs `commits` commits over `tasks` tasks, each on its own dataset.
async fn measure(
    client: &MetaClient,
    root: &TreeId,
    round: usize,
    tasks: usize,
    commits: u64,
) -> anyhow::Result<Row> {
    // A 1 KiB message, as a real commit message with some stats would be.
    let filler = "m".repeat(1000);
    let per_task = |t: usize| commits / tasks as u64 + u64::from((t as u64) < commits % tasks as u64);
    // Each task first creates its dataset with one unmeasured commit, so the
    // measurement covers steady-state commits only.
    let mut ready = Vec::new();
    for t in 0..tasks {
        let client = client.clone();
        let (root, ds) = (*root, format!("bench-r{round}-c{tasks}-t{t}"));
        ready.push(tokio::spawn(async move {
            client
                .commit_version(request(&ds, &root, None, format!("{ds} setup")))
                .await
                .with_context(|| format!("creating dataset {ds}"))?;
            anyhow::Ok(ds)
        }));
    }
    let mut datasets = Vec::new();
    for r in ready {
        datasets.push(r.await??);
    }

    let start = Instant::now();
    let mut running = Vec::new();
    for (t, ds) in datasets.into_iter().enumerate() {
        let client = client.clone();
        let (root, filler, n) = (*root, filler.clone(), per_task(t));
        running.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(n as usize);
            for k in 0..n {
                let parent = k + 1;
                let req = request(&ds, &root, Some(parent), format!("{ds} {} {filler}", parent + 1));
                let t0 = Instant::now();
                let v = client
                    .commit_version(req)
                    .await
                    .with_context(|| format!("committing {ds}@{}", parent + 1))?;
                latencies.push(t0.elapsed());
                if v.number != parent + 1 {
                    bail!(
                        "{ds}: committed version {} where {} was expected",
                        v.number,
                        parent + 1
                    );
                }
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut latencies = Vec::with_capacity(commits as usize);
    for r in running {
        latencies.extend(r.await??);
    }
    let wall = start.elapsed();
    latencies.sort_unstable();
    Ok(Row {
        concurrency: tasks,
        commits,
        wall,
        latencies,
    })
}

fn request(dataset: &str, root: &TreeId, parent: Option<u64>, message: String) -> proto::CommitRequest {
    proto::CommitRequest {
        dataset: dataset.to_string(),
        root: root.as_bytes().to_vec(),
        parent,
        force: false,
        message,
        stats: None,
    }
}

fn report(args: &BenchMetaArgs, rows: &[Row]) {
    let yes_no = |ok: bool| if ok { "met" } else { "NOT MET" };
    if args.json {
        let out: Vec<_> = rows
            .iter()
            .map(|r| {
                let v = r.verdict();
                json!({
                    "nodes": args.nodes,
                    "concurrency": r.concurrency,
                    "commits": r.commits,
                    "seconds": r.wall.as_secs_f64(),
                    "commits_per_s": r.commits_per_s(),
                    "p50_ms": r.percentile_ms(0.50),
                    "p99_ms": r.percentile_ms(0.99),
                    "max_ms": r.max_ms(),
                    "target_commits_per_s": v.map(|_| TARGET_COMMITS_PER_S),
                    "target_p99_ms": v.map(|_| TARGET_P99_MS),
                    "commits_per_s_met": v.map(|v| v.0),
                    "p99_met": v.map(|v| v.1),
                })
            })
            .collect();
        println!("{}", serde_json::Value::Array(out));
        return;
    }
    println!(
        "granary bench meta: {} node(s) on this machine, {} commits per level, 1 KiB messages",
        args.nodes, args.commits
    );
    println!(
        "{:>11} {:>10} {:>9} {:>9} {:>9} {:>9}  target (at concurrency {TARGET_CONCURRENCY})",
        "concurrency", "commits/s", "p50 ms", "p99 ms", "max ms", "seconds"
    );
    for r in rows {
        let target = match r.verdict() {
            Some((rate, p99)) => format!(
                ">= {TARGET_COMMITS_PER_S:.0} commits/s: {}, p99 < {TARGET_P99_MS:.0} ms: {}",
                yes_no(rate),
                yes_no(p99)
            ),
            None => "-".to_string(),
        };
        println!(
            "{:>11} {:>10.0} {:>9.2} {:>9.2} {:>9.2} {:>9.2}  {target}",
            r.concurrency,
            r.commits_per_s(),
            r.percentile_ms(0.50),
            r.percentile_ms(0.99),
            r.max_ms(),
            r.wall.as_secs_f64(),
        );
    }
}

/// A loopback port nobody listens on (the kernel picks it; we release it).
fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The server processes; every one is killed on drop.
struct Servers {
    exe: PathBuf,
    // Declared before `dir`: the processes die before their directories go.
    children: Vec<(u64, String, Child)>,
    dir: tempfile::TempDir,
}

impl Servers {
    fn new(exe: &Path) -> anyhow::Result<Self> {
        Ok(Self {
            exe: exe.to_path_buf(),
            children: Vec::new(),
            dir: tempfile::Builder::new()
                .prefix("granary-bench-meta-")
                .tempdir()
                .context("creating a temporary directory")?,
        })
    }

    fn log_path(&self, id: u64) -> PathBuf {
        self.dir.path().join(format!("node-{id}.log"))
    }

    /// Starts node `id` on a free port, joining `join` if given; returns its address.
    fn spawn(&mut self, id: u64, join: Option<&str>) -> anyhow::Result<String> {
        let addr = format!("127.0.0.1:{}", free_port()?);
        let log = File::create(self.log_path(id))?;
        let mut cmd = Command::new(&self.exe);
        cmd.arg("server")
            .arg("--node-id")
            .arg(id.to_string())
            .arg("--listen")
            .arg(&addr)
            .arg("--data-dir")
            .arg(self.dir.path().join(format!("node-{id}")));
        if let Some(seed) = join {
            cmd.arg("--join").arg(seed);
        }
        let child = cmd
            .env(
                "RUST_LOG",
                std::env::var("GRANARY_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {} server", self.exe.display()))?;
        self.children.push((id, addr.clone(), child));
        Ok(addr)
    }

    /// Node 1 bootstraps, the others join it; returns every address once the
    /// first min(n, 5) nodes are voters and the rest learners.
    async fn form_cluster(&mut self, n: u64) -> anyhow::Result<Vec<String>> {
        let seed = self.spawn(1, None)?;
        self.wait(&seed, "node 1 to become leader", |s| s["state"] == "Leader")
            .await?;
        for id in 2..=n {
            self.spawn(id, Some(&seed))?;
        }
        let voters: Vec<u64> = (1..=n.min(5)).collect();
        let want = json!(voters);
        self.wait(&seed, &format!("voters {voters:?}"), |s| {
            s["voters"] == want && s["nodes"].as_object().is_some_and(|m| m.len() as u64 == n)
        })
        .await?;
        Ok(self.children.iter().map(|(_, a, _)| a.clone()).collect())
    }

    /// The leader's address, as node 1 sees it.
    async fn leader_addr(&mut self) -> anyhow::Result<String> {
        let seed = self.children[0].1.clone();
        let s = self.wait(&seed, "a leader", |s| s["leader"].is_u64()).await?;
        let leader = s["leader"].to_string();
        s["nodes"][&leader]
            .as_str()
            .map(str::to_string)
            .with_context(|| format!("leader {leader} has no address in {s}"))
    }

    /// Polls the status of the node at `addr` until `ok` holds (30 s at most).
    async fn wait(
        &mut self,
        addr: &str,
        what: &str,
        ok: impl Fn(&serde_json::Value) -> bool,
    ) -> anyhow::Result<serde_json::Value> {
        let client = MetaClient::connect(&[addr.to_string()])?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            self.check_alive()?;
            let last = match tokio::time::timeout(Duration::from_secs(3), client.status(true)).await {
                Ok(Ok(s)) if ok(&s["node"]) => return Ok(s["node"].clone()),
                Ok(Ok(s)) => s["node"].to_string(),
                Ok(Err(e)) => e.to_string(),
                Err(_) => "status timed out".into(),
            };
            if Instant::now() > deadline {
                bail!("timed out waiting for {what} at {addr}; last status: {last}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Fails, with the end of its log, if a server exited.
    fn check_alive(&mut self) -> anyhow::Result<()> {
        for (id, addr, child) in &mut self.children {
            if let Some(status) = child.try_wait()? {
                let log = std::fs::read_to_string(self.dir.path().join(format!("node-{id}.log")))
                    .unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(5).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                bail!(
                    "server node {id} ({addr}) exited ({status}); its log ends: {}",
                    tail.join(" | ")
                );
            }
        }
        Ok(())
    }

    fn kill_all(&mut self) {
        for (_, _, child) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.children.clear();
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.kill_all();
    }
}
