//! The Raft log and vote (openraft `RaftLogStorage`).

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

use openraft::storage::{IOFlushed, LogState, RaftLogStorage};
use openraft::type_config::alias::{EntryOf, LogIdOf, VoteOf};
use openraft::RaftLogReader;
use rocksdb::{Direction, IteratorMode, WriteBatch, WriteOptions, DB};

use super::syncer::Syncer;
use super::{blocking, cf, CF_LOG, CF_RAFT};
use crate::TypeConfig;

const KEY_VOTE: &[u8] = b"vote";
const KEY_COMMITTED: &[u8] = b"committed";
const KEY_LAST_PURGED: &[u8] = b"last_purged";

type Entry = EntryOf<TypeConfig>;
type LogId = LogIdOf<TypeConfig>;
type Vote = VoteOf<TypeConfig>;

/// The log store; cheap to clone (shares the database).
///
/// Appends use group commit: `append` writes the entries without `sync`
/// (so they are readable at once, as openraft requires) and hands the
/// flush callback to the syncer (`syncer.rs`), which reports them flushed after its
/// next WAL sync. openraft 0.10 does not wait for that callback before it
/// takes the next writes, so while one fsync runs the next entries queue up
/// behind it, and under load one fsync covers many entries.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<DB>,
    syncer: Syncer,
}

fn key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn index_of(key: &[u8]) -> io::Result<u64> {
    let bytes = key
        .try_into()
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "a raft log key is not 8 bytes"))?;
    Ok(u64::from_be_bytes(bytes))
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> io::Result<T> {
    bincode::deserialize(bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

fn encode<T: serde::Serialize>(v: &T) -> io::Result<Vec<u8>> {
    bincode::serialize(v).map_err(io::Error::other)
}

fn synced() -> WriteOptions {
    let mut w = WriteOptions::default();
    w.set_sync(true);
    w
}

impl LogStore {
    pub(crate) fn new(db: Arc<DB>) -> Self {
        let syncer = Syncer::start(&db);
        Self { db, syncer }
    }

    /// The syncer, for the state machine's writes.
    pub(crate) fn syncer(&self) -> Syncer {
        self.syncer.clone()
    }

    fn get_meta<T: serde::de::DeserializeOwned>(&self, k: &[u8]) -> io::Result<Option<T>> {
        match self
            .db
            .get_cf(cf(&self.db, CF_RAFT), k)
            .map_err(io::Error::other)?
        {
            Some(v) => Ok(Some(decode(&v)?)),
            None => Ok(None),
        }
    }

    /// Deletes every entry from `index` on, synced.
    async fn delete_from(&self, index: u64) -> io::Result<()> {
        let db = self.db.clone();
        blocking(move || {
            let mut batch = WriteBatch::default();
            batch.delete_range_cf(cf(&db, CF_LOG), key(index), key(u64::MAX));
            batch.delete_cf(cf(&db, CF_LOG), key(u64::MAX));
            db.write_opt(batch, &synced())
        })
        .await
        .map_err(io::Error::other)
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> io::Result<Vec<Entry>> {
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
            let (k, v) = item.map_err(io::Error::other)?;
            if !range.contains(&index_of(&k)?) {
                break;
            }
            entries.push(decode(&v)?);
        }
        Ok(entries)
    }

    /// At most [`MAX_BATCH_BYTES`] of encoded entries (always at least one),
    /// so a follower catching up gets AppendEntries it can receive in time
    /// rather than one call with thousands of multi-MiB entries that times
    /// out, and is resent, forever.
    async fn limited_get_log_entries(&mut self, start: u64, end: u64) -> io::Result<Vec<Entry>> {
        let mut entries = Vec::new();
        let mut bytes = 0usize;
        let it = self.db.iterator_cf(
            cf(&self.db, CF_LOG),
            IteratorMode::From(&key(start), Direction::Forward),
        );
        for item in it {
            let (k, v) = item.map_err(io::Error::other)?;
            if index_of(&k)? >= end || (!entries.is_empty() && bytes + v.len() > MAX_BATCH_BYTES) {
                break;
            }
            bytes += v.len();
            entries.push(decode(&v)?);
        }
        Ok(entries)
    }

    async fn read_vote(&mut self) -> io::Result<Option<Vote>> {
        self.get_meta(KEY_VOTE)
    }
}

/// The most encoded log bytes one AppendEntries carries (beyond its first
/// entry): about 0.1 s on a loaded gigabit link, well under the gRPC
/// message limit.
pub const MAX_BATCH_BYTES: usize = 8 << 20;

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> io::Result<LogState<TypeConfig>> {
        let last_purged: Option<LogId> = self.get_meta(KEY_LAST_PURGED)?;
        let last = match self
            .db
            .iterator_cf(cf(&self.db, CF_LOG), IteratorMode::End)
            .next()
        {
            Some(item) => {
                let (_, v) = item.map_err(io::Error::other)?;
                let entry: Entry = decode(&v)?;
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

    async fn save_vote(&mut self, vote: &Vote) -> io::Result<()> {
        let bytes = encode(vote)?;
        let db = self.db.clone();
        blocking(move || db.put_cf_opt(cf(&db, CF_RAFT), KEY_VOTE, bytes, &synced()))
            .await
            .map_err(|e| io::Error::other(format!("cannot persist the vote: {e}")))
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> io::Result<()> {
        // Called by openraft's core for every commit it sees, and the core
        // waits for it: written inline and unsynced (like `append`), not through
        // the blocking pool, whose thread hand-off would delay every commit.
        // Losing it in a crash only means re-learning the commit from the leader.
        let bytes = encode(&committed)?;
        self.db
            .put_cf(cf(&self.db, CF_RAFT), KEY_COMMITTED, bytes)
            .map_err(io::Error::other)
    }

    async fn read_committed(&mut self) -> io::Result<Option<LogId>> {
        Ok(self.get_meta::<Option<LogId>>(KEY_COMMITTED)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<TypeConfig>) -> io::Result<()>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut batch = WriteBatch::default();
        let written = (|| {
            for entry in entries {
                batch.put_cf(cf(&self.db, CF_LOG), key(entry.log_id.index), encode(&entry)?);
            }
            // Unsynced: fast, and readable as soon as this returns; the syncer makes it durable.
            self.db.write(batch).map_err(io::Error::other)
        })();
        match written {
            Ok(()) => self.syncer.flushed(callback),
            Err(e) => {
                callback.io_completed(Err(io::Error::new(e.kind(), e.to_string())));
                Err(e)
            }
        }
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> io::Result<()> {
        self.delete_from(last_log_id.map_or(0, |l| l.index + 1)).await
    }

    async fn purge(&mut self, log_id: LogId) -> io::Result<()> {
        let v = encode(&log_id)?;
        let db = self.db.clone();
        blocking(move || {
            let mut batch = WriteBatch::default();
            batch.put_cf(cf(&db, CF_RAFT), KEY_LAST_PURGED, v);
            batch.delete_range_cf(cf(&db, CF_LOG), key(0), key(log_id.index + 1));
            db.write_opt(batch, &synced())
        })
        .await
        .map_err(io::Error::other)
    }
}
