//! Raft storage on RocksDB: one database per node with separate column
//! families for the log, the vote and the state machine.
//!
//! | column family | keys | values |
//! |---|---|---|
//! | `raft_log` | log index, u64 big-endian (so iteration order is log order) | bincode `Entry` |
//! | `raft_state` | `vote`, `committed`, `last_purged` | bincode |
//! | `sm_state` | `last_applied`, `membership`, `installing` | bincode |
//! | the application's own | whatever the [`App`] writes | |
//!
//! Durability (see `syncer.rs` for the group commit):
//! - a vote is written with `sync` before `save_vote` returns;
//! - appended entries are written at once without `sync` (readable
//!   immediately) and reported flushed to openraft (`IOFlushed`) only after
//!   the syncer's next WAL sync;
//! - each applied entry is one `WriteBatch` holding the application's writes
//!   plus `last_applied` (and the membership when it changes), written
//!   without a sync; the clients waiting for the entries of an `apply` call
//!   are answered by the syncer after its next WAL sync has made them
//!   durable. Entries nobody waits for (on followers) are not synced: an
//!   applied batch a crash loses is applied again from the log, which was
//!   durable first, and the log is purged only by a synced write, after
//!   every state-machine write before it.
//!
//! Snapshot installation is crash-safe: see [`snapshot`].
//!
//! RocksDB calls that scan or may wait run on tokio's blocking pool, never on
//! the async workers.

mod log;
mod snapshot;
mod state_machine;
mod syncer;

pub use self::log::{LogStore, MAX_BATCH_BYTES};
pub use self::state_machine::{Snapshot, SnapshotBuilder, StateMachineStore};

use std::path::Path;
use std::sync::Arc;

use rocksdb::{ColumnFamilyDescriptor, Options, WriteBatch, DB};

pub(crate) const CF_LOG: &str = "raft_log";
pub(crate) const CF_RAFT: &str = "raft_state";
pub(crate) const CF_SM: &str = "sm_state";

/// The application whose state the Raft log replicates.
pub trait App: Send + Sync + 'static {
    /// Column families the application keeps its state in. They are created
    /// on open and are exactly what snapshots and digests cover.
    fn column_families(&self) -> &'static [&'static str];

    /// Applies the committed command at log `index`: reads through `db` see
    /// every earlier entry's effects; writes go into `batch`, which is
    /// committed together with the new applied index. Must be deterministic:
    /// every replica applies the same commands in the same order.
    fn apply(&self, db: &DB, batch: &mut WriteBatch, index: u64, command: &[u8]) -> Vec<u8>;
}

/// Opens (or creates) the node's database with the Raft column families and `app_cfs`.
pub fn open_db(path: &Path, app_cfs: &[&str]) -> Result<Arc<DB>, rocksdb::Error> {
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    opts.set_max_background_jobs(2);
    let cfs = [CF_LOG, CF_RAFT, CF_SM]
        .iter()
        .chain(app_cfs.iter())
        .map(|name| ColumnFamilyDescriptor::new(*name, Options::default()));
    Ok(Arc::new(DB::open_cf_descriptors(&opts, path, cfs)?))
}

/// Opens the log store and state machine of a node whose data lives in `dir`.
pub async fn open<A: App>(dir: &Path, app: A) -> std::io::Result<(LogStore, StateMachineStore<A>)> {
    std::fs::create_dir_all(dir)?;
    let db = open_db(&dir.join("db"), app.column_families()).map_err(std::io::Error::other)?;
    let log = LogStore::new(db.clone());
    let sm = StateMachineStore::open(db, dir.join("snapshots"), app, log.syncer()).await?;
    Ok((log, sm))
}

/// Runs a blocking closure on tokio's blocking pool.
pub(crate) async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f)
        .await
        .expect("blocking storage task panicked")
}

pub(crate) fn cf<'a>(db: &'a DB, name: &str) -> &'a rocksdb::ColumnFamily {
    db.cf_handle(name)
        .unwrap_or_else(|| panic!("column family {name} is created on open"))
}
