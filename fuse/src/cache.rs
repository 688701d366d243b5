//! Chunk caches shared by every mount of a process, keyed by chunk id.
//!
//! A read asks [`ChunkCache::get_many`] for the chunks it overlaps. Each chunk
//! is looked up in the memory cache, then the disk cache, then joined to a
//! fetch already in flight for it (a prefetch, another reader), and only the
//! rest is fetched from the [`Source`] in one batch. A batch is a shared
//! future: every reader waiting for one of its chunks is woken when it lands,
//! and the batch itself fills the memory cache before it completes.
//!
//! The memory cache is a byte-bounded LRU ([`Lru`]). With a disk cache it
//! stages chunks: what readahead or a fetch brought in is kept until a read
//! has consumed it (see [`ChunkCache::consumed`]); without one it keeps every
//! fetched chunk, least recently used out first. The disk cache
//! ([`DiskCache`], in `disk_cache.rs`) appends chunks to segment files,
//! re-hashes every chunk it reads with BLAKE3 (a damaged one is counted as
//! `corrupt` and fetched again) and may be shared by several processes.
//! Fetched chunks reach memory before the batch completes and disk in the
//! background (reads wait for the disk only when 256 MiB of writes are
//! queued); [`ChunkCache::flush`] waits for the queue.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures::future::{BoxFuture, FutureExt, Shared};
use granary_client::chunks::Fetched;
use granary_core::{ChunkId, ChunkRef};
use serde::{Deserialize, Serialize};

pub use crate::disk_cache::DiskCache;
use crate::error::FsError;
use crate::source::Source;

/// A chunk's bytes, shared between caches and readers (a chunk fetched
/// stored-raw is a slice of the buffer it arrived in).
pub type Bytes = bytes::Bytes;

/// A least-recently-used map of chunk id to value, bounded by total size.
pub struct Lru<V> {
    map: HashMap<ChunkId, (V, u64, u64)>,
    order: BTreeMap<u64, ChunkId>,
    tick: u64,
    total: u64,
    cap: u64,
}

impl<V: Clone> Lru<V> {
    pub fn new(cap: u64) -> Self {
        Self {
            map: HashMap::new(),
            order: BTreeMap::new(),
            tick: 0,
            total: 0,
            cap,
        }
    }

    /// The value for `id`, marking it most recently used.
    pub fn get(&mut self, id: &ChunkId) -> Option<V> {
        let (v, _, t) = self.map.get_mut(id)?;
        self.order.remove(t);
        self.tick += 1;
        *t = self.tick;
        self.order.insert(self.tick, *id);
        Some(v.clone())
    }

    pub fn contains(&self, id: &ChunkId) -> bool {
        self.map.contains_key(id)
    }

    /// Inserts `id` of `size` bytes and returns what had to go to stay under
    /// the cap. Nothing is inserted (and nothing evicted) when `size` alone
    /// exceeds the cap.
    pub fn insert(&mut self, id: ChunkId, v: V, size: u64) -> Vec<ChunkId> {
        if size > self.cap {
            return Vec::new();
        }
        self.remove(&id);
        let mut evicted = Vec::new();
        while self.total + size > self.cap {
            let Some((_, old)) = self.order.pop_first() else {
                break;
            };
            if let Some((_, s, _)) = self.map.remove(&old) {
                self.total -= s;
            }
            evicted.push(old);
        }
        self.tick += 1;
        self.order.insert(self.tick, id);
        self.map.insert(id, (v, size, self.tick));
        self.total += size;
        evicted
    }

    pub fn remove(&mut self, id: &ChunkId) -> bool {
        match self.map.remove(id) {
            Some((_, s, t)) => {
                self.order.remove(&t);
                self.total -= s;
                true
            }
            None => false,
        }
    }

    /// Bytes held.
    pub fn total(&self) -> u64 {
        self.total
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn cap(&self) -> u64 {
        self.cap
    }
}

/// Counters of one mount (or one `prefetch` run).
#[derive(Debug, Default)]
pub struct Stats {
    pub mem_hits: AtomicU64,
    pub disk_hits: AtomicU64,
    /// Chunks a read needed that were already being fetched (by readahead).
    pub inflight_hits: AtomicU64,
    /// Chunks a read needed that had to be fetched.
    pub misses: AtomicU64,
    /// Chunks fetched ahead of reads.
    pub prefetched_chunks: AtomicU64,
    pub chunks_fetched: AtomicU64,
    pub bytes_fetched: AtomicU64,
    /// Of `bytes_fetched`, read from the disk of a chunk server on this host.
    pub local_bytes: AtomicU64,
    /// Frame bytes (as stored: lz4 where it paid) read directly from the
    /// object tier, not through a chunk server.
    pub object_read_bytes: AtomicU64,
    pub fetch_errors: AtomicU64,
    /// Disk cache files that did not match their chunk id (deleted, refetched).
    pub corrupt: AtomicU64,
    pub mem_evictions: AtomicU64,
    pub disk_evictions: AtomicU64,
    pub reads: AtomicU64,
    pub bytes_read: AtomicU64,
}

/// A point-in-time copy of [`Stats`] plus cache occupancy, as written to the stats file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsSnapshot {
    pub mem_hits: u64,
    pub disk_hits: u64,
    pub inflight_hits: u64,
    pub misses: u64,
    pub prefetched_chunks: u64,
    pub chunks_fetched: u64,
    pub bytes_fetched: u64,
    #[serde(default)]
    pub local_bytes: u64,
    #[serde(default)]
    pub object_read_bytes: u64,
    pub fetch_errors: u64,
    pub corrupt: u64,
    pub mem_evictions: u64,
    pub disk_evictions: u64,
    pub reads: u64,
    pub bytes_read: u64,
    pub mem_bytes: u64,
    pub mem_cap: u64,
    pub disk_bytes: u64,
    pub disk_cap: u64,
}

fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

impl Stats {
    pub fn snapshot(&self) -> StatsSnapshot {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            mem_hits: g(&self.mem_hits),
            disk_hits: g(&self.disk_hits),
            inflight_hits: g(&self.inflight_hits),
            misses: g(&self.misses),
            prefetched_chunks: g(&self.prefetched_chunks),
            chunks_fetched: g(&self.chunks_fetched),
            bytes_fetched: g(&self.bytes_fetched),
            local_bytes: g(&self.local_bytes),
            object_read_bytes: g(&self.object_read_bytes),
            fetch_errors: g(&self.fetch_errors),
            corrupt: g(&self.corrupt),
            mem_evictions: g(&self.mem_evictions),
            disk_evictions: g(&self.disk_evictions),
            reads: g(&self.reads),
            bytes_read: g(&self.bytes_read),
            ..Default::default()
        }
    }
}

/// Fetched chunks queued for the disk cache before reads wait for the disk: 256 MiB.
const PENDING_WRITES_KIB: u32 = 256 << 10;

/// A fetch in flight, shared by everyone who needs one of its chunks.
pub type Batch = Shared<BoxFuture<'static, Result<Arc<Vec<Bytes>>, FsError>>>;

/// Why chunks are wanted: reads count hits and misses, prefetches do not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    Read,
    Prefetch,
}

/// The memory cache, the optional disk cache and the fetches in flight.
pub struct ChunkCache {
    /// Chunk bytes, and whether they are staged: read from the disk cache
    /// ahead of a reader, and dropped once read (the disk cache and the
    /// kernel's page cache keep them; holding them here too would only fill
    /// memory).
    mem: Mutex<Lru<(Bytes, bool)>>,
    /// Disk writes queued (KiB permits taken by queued writes).
    pending: Arc<tokio::sync::Semaphore>,
    disk: Option<DiskCache>,
    /// Whether chunks read from the disk of a chunk server on this host go
    /// to the disk cache too (see [`Self::new`]).
    copy_local: bool,
    inflight: Mutex<HashMap<ChunkId, (Batch, usize)>>,
}

impl ChunkCache {
    /// A mount's cache. Chunks read from the disk of a chunk server on this
    /// host (local reads) are not copied into the disk cache: they already
    /// are on a disk here, and copying them would double the disk's writes
    /// and the space they take.
    pub fn new(mem_cap: u64, disk: Option<DiskCache>) -> Arc<Self> {
        Self::build(mem_cap, disk, false)
    }

    /// The cache `granary prefetch` fills: every chunk it fetches goes to
    /// the disk cache, local reads included (the user asked for a warm cache).
    pub fn prefetching(mem_cap: u64, disk: DiskCache) -> Arc<Self> {
        Self::build(mem_cap, Some(disk), true)
    }

    fn build(mem_cap: u64, disk: Option<DiskCache>, copy_local: bool) -> Arc<Self> {
        Arc::new(Self {
            mem: Mutex::new(Lru::new(mem_cap)),
            pending: Arc::new(tokio::sync::Semaphore::new(PENDING_WRITES_KIB as usize)),
            disk,
            copy_local,
            inflight: Mutex::new(HashMap::new()),
        })
    }

    pub fn disk(&self) -> Option<&DiskCache> {
        self.disk.as_ref()
    }

    /// Waits until every queued disk write is done (in tests, and before [`Self::close`]).
    pub async fn flush(&self) {
        let _ = self.pending.acquire_many(PENDING_WRITES_KIB).await;
    }

    /// Before exiting: waits for queued disk writes and seals the disk
    /// cache's open segment, so other processes index all of it at once.
    pub async fn close(&self) {
        self.flush().await;
        if let Some(d) = &self.disk {
            d.close();
        }
    }

    /// Fills cache occupancy into a snapshot.
    pub fn fill(&self, s: &mut StatsSnapshot) {
        let m = self.mem.lock().expect("mem cache");
        s.mem_bytes = m.total();
        s.mem_cap = m.cap();
        if let Some(d) = &self.disk {
            (s.disk_bytes, s.disk_cap) = d.usage();
        }
    }

    fn mem_put(&self, id: ChunkId, b: Bytes, staged: bool, stats: &Stats) {
        let len = b.len() as u64;
        let evicted = self.mem.lock().expect("mem cache").insert(id, (b, staged), len);
        add(&stats.mem_evictions, evicted.len() as u64);
    }

    /// Drops staged chunks (see `mem`) that a read has consumed.
    pub fn consumed(&self, ids: impl IntoIterator<Item = ChunkId>) {
        let mut mem = self.mem.lock().expect("mem cache");
        for id in ids {
            if mem.get(&id).is_some_and(|(_, staged)| staged) {
                mem.remove(&id);
            }
        }
    }

    /// True when `id` is in memory or on disk (without reading it).
    pub fn is_cached(&self, id: &ChunkId) -> bool {
        self.mem.lock().expect("mem cache").contains(id) || self.disk.as_ref().is_some_and(|d| d.contains(id))
    }

    /// Starts getting every chunk in `want`: chunks in memory are ready,
    /// chunks already in flight are joined, the rest form one new batch (which
    /// looks in the disk cache, then fetches what is still missing). Nothing
    /// runs until the returned slots are awaited ([`Self::get_many`] awaits
    /// them; readahead spawns a task that does); the batch is registered at
    /// once, so a read that comes next joins it instead of fetching again.
    pub fn start(
        self: &Arc<Self>,
        source: &Arc<dyn Source>,
        want: &[ChunkRef],
        why: Want,
        stats: &Arc<Stats>,
    ) -> Vec<Slot> {
        let read = why == Want::Read;
        let mut out: Vec<Option<Slot>> = Vec::with_capacity(want.len());
        let mut missing = Vec::new();
        {
            let mut mem = self.mem.lock().expect("mem cache");
            for (i, c) in want.iter().enumerate() {
                let hit = mem.get(&c.id);
                if hit.is_none() {
                    missing.push(i);
                }
                out.push(hit.map(|(b, _)| Slot::Ready(b)));
            }
        }
        if read {
            add(&stats.mem_hits, (want.len() - missing.len()) as u64);
        }
        if !missing.is_empty() {
            let mut inflight = self.inflight.lock().expect("inflight map");
            // The new batch: its chunks, and which request slot gets which.
            let mut mine: Vec<ChunkRef> = Vec::new();
            let mut position: HashMap<ChunkId, usize> = HashMap::new();
            let mut slots: Vec<(usize, usize)> = Vec::new();
            for &i in &missing {
                if let Some((b, k)) = inflight.get(&want[i].id) {
                    if read {
                        add(&stats.inflight_hits, 1);
                    }
                    out[i] = Some(Slot::Wait(b.clone(), *k));
                } else {
                    let k = *position.entry(want[i].id).or_insert_with(|| {
                        mine.push(want[i]);
                        mine.len() - 1
                    });
                    slots.push((i, k));
                }
            }
            if !mine.is_empty() {
                let batch = self
                    .clone()
                    .batch(source.clone(), mine.clone(), why, stats.clone())
                    .shared();
                for (k, c) in mine.iter().enumerate() {
                    inflight.insert(c.id, (batch.clone(), k));
                }
                for (i, k) in slots {
                    out[i] = Some(Slot::Wait(batch.clone(), k));
                }
            }
        }
        out.into_iter()
            .map(|s| s.expect("every slot is resolved"))
            .collect()
    }

    /// The bytes of every chunk in `want`, in order.
    pub async fn get_many(
        self: &Arc<Self>,
        source: &Arc<dyn Source>,
        want: &[ChunkRef],
        why: Want,
        stats: &Arc<Stats>,
    ) -> Result<Vec<Bytes>, FsError> {
        let slots = self.start(source, want, why, stats);
        let mut out = Vec::with_capacity(slots.len());
        for slot in slots {
            out.push(slot.get().await?);
        }
        Ok(out)
    }

    fn batch(
        self: Arc<Self>,
        source: Arc<dyn Source>,
        ids: Vec<ChunkRef>,
        why: Want,
        stats: Arc<Stats>,
    ) -> BoxFuture<'static, Result<Arc<Vec<Bytes>>, FsError>> {
        async move {
            let result = self.clone().load(&source, &ids, why, &stats).await;
            if result.is_err() {
                add(&stats.fetch_errors, 1);
            }
            let mut inflight = self.inflight.lock().expect("inflight map");
            for c in &ids {
                inflight.remove(&c.id);
            }
            result.map(Arc::new)
        }
        .boxed()
    }

    /// Disk cache, then the source, for `ids`; fills both caches.
    async fn load(
        self: Arc<Self>,
        source: &Arc<dyn Source>,
        ids: &[ChunkRef],
        why: Want,
        stats: &Arc<Stats>,
    ) -> Result<Vec<Bytes>, FsError> {
        let read = why == Want::Read;
        let mut got: Vec<Option<Bytes>> = vec![None; ids.len()];
        if self.disk.is_some() {
            let this = self.clone();
            let list: Vec<ChunkId> = ids.iter().map(|c| c.id).collect();
            let st = stats.clone();
            // Inline on a fuser thread's first poll of a request (see
            // `granary_client::blocking`), else on the blocking pool.
            let found = granary_client::blocking::unblock(move || {
                let disk = this.disk.as_ref().expect("disk cache");
                disk.get_many(&list, &st)
            })
            .await
            .map_err(|e| FsError::Io(format!("disk cache task: {e}")))?;
            for (i, b) in found.into_iter().enumerate() {
                if let Some(b) = b {
                    // A reader has them now; a prefetch stages them for its reader.
                    if read {
                        add(&stats.disk_hits, 1);
                    } else {
                        self.mem_put(ids[i].id, b.clone(), true, stats);
                    }
                    got[i] = Some(b);
                }
            }
        }
        let missing: Vec<usize> = (0..ids.len()).filter(|&i| got[i].is_none()).collect();
        if !missing.is_empty() {
            add(
                if read {
                    &stats.misses
                } else {
                    &stats.prefetched_chunks
                },
                missing.len() as u64,
            );
            let just: Vec<ChunkId> = missing.iter().map(|&i| ids[i].id).collect();
            let Fetched {
                chunks: raws,
                local,
                object_read_bytes,
            } = source.fetch(&just, why).await?;
            if raws.len() != just.len()
                || local.len() != just.len()
                || raws
                    .iter()
                    .zip(&missing)
                    .any(|(r, &i)| r.len() != ids[i].len as usize)
            {
                return Err(FsError::Remote(
                    "the cluster returned chunks of the wrong size".into(),
                ));
            }
            add(&stats.chunks_fetched, raws.len() as u64);
            add(&stats.bytes_fetched, raws.iter().map(|b| b.len() as u64).sum());
            let mut items = Vec::with_capacity(raws.len());
            let mut local_bytes = 0;
            for ((b, &i), here) in raws.into_iter().zip(&missing).zip(local) {
                // With a disk cache, fetched chunks are staged: kept until
                // read, then the disk cache (or, for a local read, the pack
                // file it came from) and the kernel's page cache of that
                // file hold them. Kept in memory as well they only filled
                // it, a new page for every byte fetched.
                self.mem_put(ids[i].id, b.clone(), self.disk.is_some(), stats);
                if here {
                    local_bytes += b.len() as u64;
                }
                if !here || self.copy_local {
                    items.push((ids[i].id, b.clone()));
                }
                got[i] = Some(b);
            }
            add(&stats.local_bytes, local_bytes);
            add(&stats.object_read_bytes, object_read_bytes);
            if self.disk.is_some() && !items.is_empty() {
                // Written in the background: a read does not wait for the
                // disk, unless more than PENDING_WRITES are already queued.
                let kib: u64 = items
                    .iter()
                    .map(|(_, b)| b.len() as u64)
                    .sum::<u64>()
                    .div_ceil(1024);
                let permit = self
                    .pending
                    .clone()
                    .acquire_many_owned(kib.min(PENDING_WRITES_KIB as u64) as u32)
                    .await
                    .map_err(|e| FsError::Io(format!("disk cache writer: {e}")))?;
                let this = self.clone();
                let st = stats.clone();
                tokio::task::spawn_blocking(move || {
                    let disk = this.disk.as_ref().expect("disk cache");
                    let refs: Vec<(ChunkId, &[u8])> = items.iter().map(|(id, b)| (*id, &b[..])).collect();
                    if let Err(e) = disk.put_many(&refs, &st) {
                        tracing::warn!(chunks = refs.len(), "cannot write the disk cache: {e}");
                    }
                    drop(permit);
                });
            }
        }
        Ok(got.into_iter().map(|b| b.expect("filled")).collect())
    }
}

/// One chunk being got: ready, or waiting on a batch.
pub enum Slot {
    Ready(Bytes),
    Wait(Batch, usize),
}

impl Slot {
    pub async fn get(self) -> Result<Bytes, FsError> {
        match self {
            Slot::Ready(b) => Ok(b),
            Slot::Wait(batch, k) => Ok(batch.await?[k].clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> ChunkId {
        ChunkId::of(&[n])
    }

    #[test]
    fn lru_evicts_least_recently_used_within_its_cap() {
        let mut l = Lru::new(10);
        assert!(l.insert(id(1), (), 4).is_empty());
        assert!(l.insert(id(2), (), 4).is_empty());
        assert!(l.get(&id(1)).is_some()); // 2 is now the oldest
        assert_eq!(l.insert(id(3), (), 4), vec![id(2)]);
        assert_eq!((l.total(), l.len()), (8, 2));
        assert!(
            l.insert(id(4), (), 11).is_empty(),
            "too big: not inserted, nothing evicted"
        );
        assert!(!l.contains(&id(4)));
        assert_eq!(l.insert(id(5), (), 10), vec![id(1), id(3)]);
        assert_eq!(l.total(), 10);
        assert!(l.remove(&id(5)) && l.is_empty() && l.total() == 0);
        // Re-inserting replaces, it does not double count.
        l.insert(id(6), (), 3);
        l.insert(id(6), (), 5);
        assert_eq!(l.total(), 5);
    }
}
