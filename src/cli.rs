//! Command-line definition (clap derive). Every command and flag is documented
//! here; `granary help COMMAND` shows it.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Granary: a distributed, content-addressed store for machine-learning datasets.
///
/// Upload a directory as an immutable dataset version, mount any version
/// read-only through FUSE, and tier cold data to an object store.
/// Start with `granary server` (one node, both roles, data in ./granary-data).
#[derive(Debug, Parser)]
#[command(name = "granary", version, propagate_version = true, max_term_width = 100)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a server node (meta and/or chunk role). No flags: a one-node cluster with both roles.
    Server(ServerArgs),
    /// Upload a directory as a new version of a dataset.
    ///
    /// Only chunks the cluster does not have yet are sent. Files unchanged since the last upload
    /// from this host (same size, mtime, ctime and inode) are not read again (--rehash reads them).
    /// On the host of a chunk server, new packs are written straight into its data directory and
    /// handed over (`local_write_bytes` in --json); GRANARY_LOCAL_WRITES=0 streams them instead.
    Upload(UploadArgs),
    /// Download a dataset version into a directory.
    Download(DownloadArgs),
    /// List datasets.
    Datasets(DatasetsArgs),
    /// Show the versions of a dataset (DATASET@N: just that one).
    Log(DatasetArg),
    /// List files of a dataset version: DATASET[@N][:PATH].
    Ls(LsArgs),
    /// Show what changed between two versions.
    Diff(DiffArgs),
    /// Delete a dataset version (its data is reclaimed by GC).
    Rm(DatasetArg),
    /// Mount a dataset version read-only with FUSE.
    Mount(MountArgs),
    /// Unmount a Granary mount.
    Umount(UmountArgs),
    /// Warm the local cache with a whole version or some paths of it.
    Prefetch(PrefetchArgs),
    /// Show a mount's cache counters: hits, misses, bytes fetched, corrupt cache files.
    CacheStats(CacheStatsArgs),
    /// Cluster administration: status, membership, tiering, GC, scrub.
    #[command(subcommand)]
    Admin(AdminCommand),
    /// Look at local data without a server: compute a directory's tree, check a pack file.
    #[command(subcommand)]
    Inspect(InspectCommand),
    /// Benchmarks that print their figures next to a baseline measured in the same run.
    #[command(subcommand)]
    Bench(BenchCommand),
}

/// `--json` for output that scripts read.
#[derive(Debug, Args)]
pub struct OutputArgs {
    /// Print machine-readable JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct DatasetsArgs {
    #[command(flatten)]
    pub server: ServerAddrArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

/// Where to find the cluster.
#[derive(Debug, Args)]
pub struct ServerAddrArgs {
    /// Server address(es), comma-separated; any node of the cluster works.
    #[arg(
        long = "server",
        env = "GRANARY_SERVER",
        default_value = "127.0.0.1:7700",
        value_delimiter = ','
    )]
    pub servers: Vec<String>,
}

#[derive(Debug, Args)]
pub struct ServerArgs {
    /// This node's id, unique in the cluster.
    #[arg(long, default_value_t = 1)]
    pub node_id: u64,
    /// Address to listen on for clients and peers.
    #[arg(long, default_value = "127.0.0.1:7700")]
    pub listen: String,
    /// Where this node keeps its metadata and packs.
    #[arg(long, default_value = "./granary-data")]
    pub data_dir: PathBuf,
    /// Address of any existing cluster node to join (first start only).
    #[arg(long)]
    pub join: Option<String>,
    /// Roles this node runs: meta, chunk, or meta,chunk.
    #[arg(long, default_value = "meta,chunk")]
    pub role: String,
    /// Replicas kept of every pack (default: min(3, live chunk servers)).
    #[arg(long, default_value_t = 0)]
    pub replicas: usize,
    /// The object tier for cold packs: s3://BUCKET[/PREFIX] (endpoint, region and credentials from
    /// AWS_ENDPOINT, AWS_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY; http:// endpoints are allowed)
    /// or file:///PATH. Every node of a cluster must use the same one. Default: file://DATA_DIR/objects.
    #[arg(long, env = "GRANARY_OBJECT_STORE")]
    pub object_store: Option<String>,
}

#[derive(Debug, Args)]
pub struct UploadArgs {
    /// The directory to upload.
    pub dir: PathBuf,
    /// Dataset name (created on first upload).
    pub dataset: String,
    /// A message describing this version.
    #[arg(short, long)]
    pub message: Option<String>,
    /// Commit even if another version of the dataset was committed meanwhile.
    #[arg(long)]
    pub force: bool,
    /// Seal packs at this size (e.g. 64MiB; smaller packs suit small datasets and tests).
    #[arg(long, default_value = "64MiB")]
    pub pack_size: String,
    /// Chunking threads (default: two per core, so reads that wait on the disk do not idle a core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Read every file, ignoring the local cache of files unchanged since the last upload.
    #[arg(long)]
    pub rehash: bool,
    #[command(flatten)]
    pub server: ServerAddrArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, Args)]
pub struct DownloadArgs {
    /// DATASET or DATASET@N (latest version when N is left out).
    pub version: String,
    /// Directory to write into (created if missing).
    pub dir: PathBuf,
    #[command(flatten)]
    pub server: ServerAddrArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, Args)]
pub struct DatasetArg {
    /// DATASET or DATASET@N.
    pub target: String,
    #[command(flatten)]
    pub server: ServerAddrArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, Args)]
pub struct LsArgs {
    /// DATASET[@N][:PATH].
    pub target: String,
    /// Long format: kind, mode, size, mtime.
    #[arg(short = 'l')]
    pub long: bool,
    #[command(flatten)]
    pub server: ServerAddrArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, Args)]
pub struct DiffArgs {
    /// The older version, DATASET@A.
    pub from: String,
    /// The newer version, DATASET@B.
    pub to: String,
    #[command(flatten)]
    pub server: ServerAddrArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, Args)]
pub struct MountArgs {
    /// DATASET or DATASET@N.
    pub version: String,
    /// An existing empty directory to mount on.
    pub mountpoint: PathBuf,
    /// Disk cache directory, shared by all mounts on this host.
    #[arg(long, default_value = "/var/cache/granary")]
    pub cache_dir: PathBuf,
    /// Disk cache size cap, e.g. 10GiB.
    #[arg(long, default_value = "10GiB")]
    pub cache_size: String,
    /// Memory for chunks, e.g. 1GiB: the memory cache plus the prefetches in
    /// flight (a quarter of it, up to 256 MiB) plus the blocks of object-tier
    /// packs read directly (another quarter, up to 256 MiB; no direct reads
    /// when this is below 512MiB), so the mount's footprint stays near this.
    #[arg(long, default_value = "1GiB")]
    pub mem_cache: String,
    /// Stay in the foreground until unmounted (for container entrypoints).
    #[arg(long)]
    pub foreground: bool,
    /// Let other users read the mount.
    #[arg(long)]
    pub allow_other: bool,
    #[command(flatten)]
    pub server: ServerAddrArgs,
}

#[derive(Debug, Args)]
pub struct UmountArgs {
    /// The mountpoint to unmount.
    pub mountpoint: PathBuf,
    /// The cache directory the mount uses: `umount` waits until the mount
    /// process found there has written its final counters and exited.
    #[arg(long, default_value = "/var/cache/granary")]
    pub cache_dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct PrefetchArgs {
    /// DATASET or DATASET@N.
    pub version: String,
    /// Paths inside the version to prefetch (default: everything).
    pub paths: Vec<String>,
    /// Disk cache directory to warm (the one mounts use).
    #[arg(long, default_value = "/var/cache/granary")]
    pub cache_dir: PathBuf,
    /// Disk cache size cap, e.g. 10GiB.
    #[arg(long, default_value = "10GiB")]
    pub cache_size: String,
    #[command(flatten)]
    pub server: ServerAddrArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, Args)]
pub struct CacheStatsArgs {
    /// The mountpoint whose counters to show.
    pub mountpoint: PathBuf,
    /// The disk cache directory the mount uses.
    #[arg(long, default_value = "/var/cache/granary")]
    pub cache_dir: PathBuf,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Cluster status: leader, term, nodes, log and applied indexes.
    Status {
        #[command(flatten)]
        server: ServerAddrArgs,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Remove a node from the cluster (its pack replicas are re-created on other chunk servers).
    RemoveNode {
        /// The node id to remove.
        node_id: u64,
        #[command(flatten)]
        server: ServerAddrArgs,
    },
    /// Tiering: move data between chunk servers' SSDs and the object tier.
    #[command(subcommand)]
    Tier(TierCommand),
    /// Garbage collection: delete data no live version references and compact sparse packs.
    Gc {
        /// Report what would be deleted and compacted; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Compact packs whose live share of bytes is below this (0 to 1; 0 disables compaction).
        #[arg(long, default_value_t = 0.5)]
        compact_below: f64,
        #[command(flatten)]
        server: ServerAddrArgs,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Verify every frame of every pack on every chunk server and in the object tier; repair bad copies.
    /// Exits non-zero when damaged data could not be repaired.
    Scrub {
        /// Only report damage; do not quarantine-and-restore bad copies.
        #[arg(long)]
        no_repair: bool,
        #[command(flatten)]
        server: ServerAddrArgs,
        #[command(flatten)]
        output: OutputArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum TierCommand {
    /// Move a version (DATASET@N) or every version of a dataset (DATASET) to a tier. Packs that a
    /// version staying on SSD also uses stay on SSD. Waits for the moves, with progress.
    Move {
        /// DATASET@N for one version, DATASET for all of them.
        target: String,
        /// Destination tier: object or ssd.
        #[arg(long, value_parser = ["object", "ssd"])]
        to: String,
        /// Queue the moves and return at once (`granary admin tier status` shows the queue).
        #[arg(long)]
        no_wait: bool,
        #[command(flatten)]
        server: ServerAddrArgs,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Tiering policies: versions not read for a while move to the object tier on their own.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Bytes per tier per dataset, the policies and the mover's queue.
    Status {
        #[command(flatten)]
        server: ServerAddrArgs,
        #[command(flatten)]
        output: OutputArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Set a cold-after policy for one dataset, or the default for every dataset.
    Set {
        /// The dataset; the default policy for all datasets when absent.
        #[arg(long)]
        dataset: Option<String>,
        /// Versions whose data nobody read for this long move to the object tier (e.g. 30d, 12h, 90s).
        #[arg(long, value_parser = humantime::parse_duration)]
        cold_after: std::time::Duration,
        #[command(flatten)]
        server: ServerAddrArgs,
    },
    /// Remove the policy of one dataset, or the default policy.
    Clear {
        /// The dataset whose policy goes; without it, the default policy for all datasets.
        #[arg(long)]
        dataset: Option<String>,
        #[command(flatten)]
        server: ServerAddrArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum InspectCommand {
    /// Chunk and hash a local directory as an upload would, and print its root tree id and stats.
    ///
    /// The same directory always gives the same tree id; nothing is stored.
    Tree {
        /// The directory to scan.
        dir: PathBuf,
        /// Worker threads (default: two per core).
        #[arg(long, default_value_t = 0)]
        threads: usize,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// List the chunks of a sealed pack file and optionally verify every frame.
    Pack {
        /// Path to a .pack file.
        file: PathBuf,
        /// Decode and verify every frame (BLAKE3).
        #[arg(long)]
        verify: bool,
        #[command(flatten)]
        output: OutputArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Ingest pipeline (chunk + hash + frame) vs plain BLAKE3 and plain lz4 on the same bytes.
    Ingest(BenchIngestArgs),
    /// Commit throughput and latency of a local multi-node metadata cluster.
    Meta(crate::commands::bench::BenchMetaArgs),
    /// Fresh and incremental upload vs `restic backup` of the same data, storage growth, peak RSS.
    Upload(crate::commands::bench::BenchUploadArgs),
    /// Reading through `granary mount` vs a local copy and `rclone mount` of it: cold, warm, random, small files, RSS.
    Mount(crate::commands::bench::BenchMountArgs),
    /// Moving packs to an S3 object tier vs plain PUTs; cold reads from it through the mount vs `rclone mount`.
    Tier(crate::commands::bench::BenchTierArgs),
}

#[derive(Debug, Args)]
pub struct BenchIngestArgs {
    /// Where to generate the data (default: a temporary directory, removed afterwards).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// MiB of incompressible data.
    #[arg(long, default_value_t = 512)]
    pub random_mib: u64,
    /// MiB of text-like data.
    #[arg(long, default_value_t = 256)]
    pub text_mib: u64,
    /// Size of each generated file, in MiB.
    #[arg(long, default_value_t = 4)]
    pub file_mib: u64,
    /// Worker threads for every contender (default: one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Runs per contender; the best is reported.
    #[arg(long, default_value_t = 3)]
    pub runs: u32,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// Every command has a description and every flag and argument a help
    /// line, so `--help` at every level is complete.
    #[test]
    fn every_command_and_argument_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            if cmd.get_about().is_none() && !path.is_empty() {
                missing.push(format!("command `{path}`"));
            }
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if arg.is_hide_set() || id == "help" || id == "version" {
                    continue;
                }
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("`{path}` argument {id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                walk(sub, format!("{path} {}", sub.get_name()).trim(), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&super::Cli::command(), "", &mut missing);
        assert!(missing.is_empty(), "no help text: {missing:#?}");
    }
}
