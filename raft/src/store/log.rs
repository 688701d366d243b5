//! The Raft log and vote (openraft `RaftLogStorage`).

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{AnyError, Entry, LogId, RaftLogReader, StorageError, StorageIOError, Vote};
use rocksdb::{Direction, IteratorMode, WriteBatch, WriteOptions, DB};

use super::{blocking, cf, CF_LOG, CF_RAFT};
use crate::{NodeId, TypeConfig};

const KEY_VOTE: &[u8] = b"vote";
const KEY_COMMITTED: &[u8] = b"committed";
const KEY_LAST_PURGED: &[u8] = b"last_purged";

/// The log store; cheap to clone (shares the database).
///
/// Appends use group commit: `append` writes the entries without `sync`
/// (so they are readable at once, as openraft requires) and hands the
/// durability callback to a syncer thread. The syncer collects every request
/// that is waiting, syncs the WAL once (`flush_wal(true)`), and reports all of
/// them durable. While one fsync runs, the next entries queue up behind it, so
/// under load one fsync covers many entries instead of one each.
///
/// The same syncer serves [`LogStore::sync`]: the state machine's writes go to
/// the same WAL, so a write waits there for its applied effects to be durable
/// before its client is answered, sharing the fsync with the log's appends.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<DB>,
    syncer: std::sync::mpsc::Sender<SyncRequest>,
}

/// Something waiting for the WAL to be synced.
enum SyncRequest {
    /// Entries openraft appended.
    Append(LogFlushed<TypeConfig>),
    /// Everything written before the request (see [`LogStore::sync`]).
    Barrier(tokio::sync::oneshot::Sender<Result<(), String>>),
}

/// Syncs the WAL for every waiting request at once, then completes them.
///
/// It holds the database weakly: the thread may outlive the stores (it ends
/// only when every sender is gone), and the database must close when its
/// owners drop it, not whenever this thread happens to finish — RocksDB
/// closing while the process exits aborts it.
fn run_syncer(db: std::sync::Weak<DB>, rx: std::sync::mpsc::Receiver<SyncRequest>) {
    while let Ok(first) = rx.recv() {
        let mut waiting = vec![first];
        waiting.extend(rx.try_iter());
        let result = match db.upgrade() {
            Some(db) => db.flush_wal(true).map_err(|e| e.to_string()),
            None => Err("the log database is closed".to_string()),
        };
        for request in waiting {
            match request {
                SyncRequest::Append(cb) => cb.log_io_completed(result.clone().map_err(std::io::Error::other)),
                SyncRequest::Barrier(tx) => {
                    let _ = tx.send(result.clone());
                }
            }
        }
    }
}

fn key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn index_of(key: &[u8]) -> u64 {
    u64::from_be_bytes(key.try_into().expect("log keys are 8 bytes"))
}

fn read_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::read_logs(AnyError::new(&e)).into()
}

fn write_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::write_logs(AnyError::new(&e)).into()
}

fn synced() -> WriteOptions {
    let mut w = WriteOptions::default();
    w.set_sync(true);
    w
}

impl LogStore {
    pub(crate) fn new(db: Arc<DB>) -> Self {
        let (syncer, rx) = std::sync::mpsc::channel();
        let sync_db = Arc::downgrade(&db);
        std::thread::Builder::new()
            .name("granary-log-sync".into())
            .spawn(move || run_syncer(sync_db, rx))
            .expect("spawn the log syncer thread");
        Self { db, syncer }
    }

    /// Returns once every write made to the database before the call is
    /// durable (one WAL sync, shared with every append and caller waiting).
    pub async fn sync(&self) -> Result<(), String> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.syncer
            .send(SyncRequest::Barrier(tx))
            .map_err(|_| "the log syncer stopped".to_string())?;
        rx.await.map_err(|_| "the log syncer stopped".to_string())?
    }

    fn get_meta<T: serde::de::DeserializeOwned>(&self, k: &[u8]) -> Result<Option<T>, StorageError<NodeId>> {
        match self.db.get_cf(cf(&self.db, CF_RAFT), k).map_err(read_err)? {
            Some(v) => Ok(Some(bincode::deserialize(&v).map_err(read_err)?)),
            None => Ok(None),
        }
    }

    async fn put_meta<T: serde::Serialize>(
        &self,
        k: &'static [u8],
        v: &T,
        sync: bool,
    ) -> Result<(), StorageError<NodeId>> {
        let bytes = bincode::serialize(v).map_err(write_err)?;
        let db = self.db.clone();
        blocking(move || {
            let opts = if sync { synced() } else { WriteOptions::default() };
            db.put_cf_opt(cf(&db, CF_RAFT), k, bytes, &opts)
        })
        .await
        .map_err(write_err)
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<NodeId>> {
        let start = match range.start_bound() {
            Bound::Included(x) => *x,
            Bound::Excluded(x) => x + 1,
            Bound::Unbounded => 0,
        };
        let mut entries = Vec::new();
        let it = self.db.iterator_cf(
            cf(&self.db, CF_LOG),
            IteratorMode::From(&key(start), Direction::Forward),
        );
        for item in it {
            let (k, v) = item.map_err(read_err)?;
            if !range.contains(&index_of(&k)) {
                break;
            }
            entries.push(bincode::deserialize(&v).map_err(read_err)?);
        }
        Ok(entries)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<NodeId>> {
        let last_purged: Option<LogId<NodeId>> = self.get_meta(KEY_LAST_PURGED)?;
        let last = match self
            .db
            .iterator_cf(cf(&self.db, CF_LOG), IteratorMode::End)
            .next()
        {
            Some(item) => {
                let (_, v) = item.map_err(read_err)?;
                let entry: Entry<TypeConfig> = bincode::deserialize(&v).map_err(read_err)?;
                Some(entry.log_id)
            }
            None => None,
        };
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last.or(last_purged),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        self.put_meta(KEY_VOTE, vote, true)
            .await
            .map_err(|_| StorageIOError::write_vote(AnyError::error("cannot persist the vote")).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        self.get_meta(KEY_VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> Result<(), StorageError<NodeId>> {
        // Called by openraft's core for every commit it sees, and the core
        // waits for it: written inline and unsynced (like `append`), not through
        // the blocking pool, whose thread hand-off would delay every commit.
        let bytes = bincode::serialize(&committed).map_err(write_err)?;
        self.db
            .put_cf(cf(&self.db, CF_RAFT), KEY_COMMITTED, bytes)
            .map_err(write_err)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        Ok(self.get_meta::<Option<LogId<NodeId>>>(KEY_COMMITTED)?.flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut batch = WriteBatch::default();
        for entry in entries {
            let v = bincode::serialize(&entry).map_err(write_err)?;
            batch.put_cf(cf(&self.db, CF_LOG), key(entry.log_id.index), v);
        }
        // Unsynced: fast, and readable as soon as this returns; the syncer makes it durable.
        if let Err(e) = self.db.write(batch) {
            callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
            return Err(write_err(e));
        }
        if let Err(std::sync::mpsc::SendError(SyncRequest::Append(callback))) =
            self.syncer.send(SyncRequest::Append(callback))
        {
            let e = std::io::Error::other("the log syncer stopped");
            callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
            return Err(write_err(e));
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let db = self.db.clone();
        blocking(move || {
            let mut batch = WriteBatch::default();
            batch.delete_range_cf(cf(&db, CF_LOG), key(log_id.index), key(u64::MAX));
            batch.delete_cf(cf(&db, CF_LOG), key(u64::MAX));
            db.write_opt(batch, &synced())
        })
        .await
        .map_err(write_err)
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let v = bincode::serialize(&log_id).map_err(write_err)?;
        let db = self.db.clone();
        blocking(move || {
            let mut batch = WriteBatch::default();
            batch.put_cf(cf(&db, CF_RAFT), KEY_LAST_PURGED, v);
            batch.delete_range_cf(cf(&db, CF_LOG), key(0), key(log_id.index + 1));
            db.write_opt(batch, &synced())
        })
        .await
        .map_err(write_err)
    }
}
