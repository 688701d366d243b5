//! Frame reads from object-tier packs in aligned blocks, with a small
//! in-memory cache of recent blocks.
//!
//! `GetFrames` on a pack that is only in the object tier used to send one
//! ranged GET per call: a mount reading a dataset of 1 MiB files sent one GET
//! per file. A sequential reader now gets the aligned [`BLOCK`]-sized blocks
//! that cover its call (one GET each, the blocks of a call concurrently), and
//! the next [`PREFETCH_BLOCKS`] blocks (one for a caller that reads ahead
//! itself) start downloading while it reads them. The last few blocks
//! ([`CACHED_BLOCKS`] by default) are kept in memory and serve later calls; callers that want a
//! block being fetched wait for that fetch instead of starting another. A sequential scan of a pack (a mount, a download)
//! then costs one GET per block, overlapped with the reading.
//!
//! A call counts as sequential when the caller says it reads ahead
//! (`GetFramesRequest.readahead`: a mount's prefetches), when it
//! starts within a block of where one of the last few calls on the same
//! object ended, or in (or just after) a block that is cached or being
//! fetched; several readers of one pack are each recognised. The caller's
//! word matters most at a pack's first call, which nothing else can tell
//! from a random read: without it that call was one exact GET before the
//! blocks, and a read through many packs paid that GET's latency per pack.
//! Other calls (random reads) whose bytes are not all cached are read
//! exactly, so they do not pull a whole block each.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::{OnceCell, Semaphore};

use crate::object::{ObjectError, ObjectTier};

/// Block size of object-tier reads.
pub const BLOCK: u64 = 16 << 20;
/// Blocks kept in memory by default (at most `BLOCK * CACHED_BLOCKS` = 256
/// MiB, plus blocks still referenced by calls in progress).
pub const CACHED_BLOCKS: usize = 16;
/// Call ends remembered per object, to recognise several sequential readers.
const ENDS_KEPT: usize = 8;
/// Object sizes and last read positions remembered (sizes never change: packs are immutable).
const SIZES_KEPT: usize = 4096;

/// Blocks fetched ahead of a sequential reader.
pub const PREFETCH_BLOCKS: u64 = 4;

/// Block GETs in flight at most, per chunk server (or client), with the
/// default cache (a smaller cache allows fewer: at most half its blocks). A mount's
/// readahead can span several packs; without a cap its blocks (and each
/// pack's next one) were 20-25 GETs at once against the S3 server, which
/// then served every one of them slower (measured against moto: the same
/// GETs took 1.5-1.7x its CPU).
pub const BLOCK_GETS_IN_FLIGHT: usize = 8;
/// Block GETs in flight at most for the calls of readers that wait for
/// them (not reading ahead), besides [`BLOCK_GETS_IN_FLIGHT`]: a reader's
/// own block does not queue behind the readahead's. (A quarter of a
/// smaller cache's blocks, at least one.)
pub const DEMAND_GETS_IN_FLIGHT: usize = 4;

type BlockId = (String, u64);

/// Block `i` of the object `key` of `size` bytes, with one GET.
async fn fetch_block(
    tier: &ObjectTier,
    gets: &Semaphore,
    key: &str,
    i: u64,
    size: u64,
) -> Result<Bytes, ObjectError> {
    let _permit = gets.acquire().await.expect("never closed");
    let start = i * BLOCK;
    let len = BLOCK.min(size - start) as u32;
    tier.get_range(key, start, len).await
}

/// Block reads of one object tier; see the module docs.
pub struct ObjectBlocks {
    tier: ObjectTier,
    /// Blocks kept.
    cached_blocks: usize,
    /// [`BLOCK_GETS_IN_FLIGHT`] permits, one per block GET of readahead.
    gets: Arc<Semaphore>,
    /// [`DEMAND_GETS_IN_FLIGHT`] permits, one per block GET a reader waits for.
    demand_gets: Semaphore,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Cached (or being fetched) blocks; `order` is least recently used first.
    blocks: HashMap<BlockId, Arc<OnceCell<Bytes>>>,
    order: VecDeque<BlockId>,
    sizes: HashMap<String, u64>,
    /// Where the last few calls on each object ended.
    ends: HashMap<String, VecDeque<u64>>,
}

impl ObjectBlocks {
    /// Block reads of `tier` with the default cache of [`CACHED_BLOCKS`].
    pub fn new(tier: ObjectTier) -> Self {
        Self::with_blocks(tier, CACHED_BLOCKS)
    }

    /// Block reads of `tier` keeping `cached_blocks` blocks (at least 2).
    /// GETs in flight are capped so that the blocks being fetched fit in
    /// the cache: half of it for readahead, a quarter for waiting readers.
    pub fn with_blocks(tier: ObjectTier, cached_blocks: usize) -> Self {
        let cached_blocks = cached_blocks.max(2);
        Self {
            tier,
            cached_blocks,
            gets: Arc::new(Semaphore::new(BLOCK_GETS_IN_FLIGHT.min(cached_blocks / 2))),
            demand_gets: Semaphore::new(DEMAND_GETS_IN_FLIGHT.min(cached_blocks / 4).max(1)),
            state: Mutex::default(),
        }
    }

    /// The URL of the tier read.
    pub fn url(&self) -> &str {
        self.tier.url()
    }

    /// Like [`ObjectTier::get_ranges`]: byte ranges `(offset, len)` of object
    /// `key`, concatenated in request order, read through the block cache.
    /// `readahead`: the caller reads ahead of a sequential reader, so the
    /// call is served from blocks (see the module docs).
    pub async fn get_ranges(
        &self,
        key: &str,
        ranges: &[(u64, u32)],
        readahead: bool,
    ) -> Result<Vec<u8>, ObjectError> {
        let wanted: Vec<(u64, u64)> = ranges
            .iter()
            .filter(|(_, len)| *len > 0)
            .map(|&(offset, len)| (offset, offset.saturating_add(u64::from(len))))
            .collect();
        let total: u64 = wanted.iter().map(|(s, e)| e - s).sum();
        let mut ids: Vec<u64> = wanted
            .iter()
            .flat_map(|&(start, end)| start / BLOCK..end.div_ceil(BLOCK))
            .collect();
        ids.sort_unstable();
        ids.dedup();
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let sequential = self.sequential(key, &wanted) || readahead;
        // Read exactly when the cache is full of blocks still being fetched
        // and this call needs others: more cells would only push it past
        // its size.
        let crowded = || self.unfilled() >= self.cached_blocks && !self.has_all(key, &ids, false);
        if (!sequential && !self.has_all(key, &ids, true)) || (sequential && crowded()) {
            return self.tier.get_ranges(key, ranges).await;
        }
        let size = match self.known_size(key) {
            Some(s) => s,
            None => {
                let size = self.tier.size(key).await?.ok_or_else(|| ObjectError::NotFound {
                    url: self.tier.url().to_string(),
                    key: key.to_string(),
                })?;
                let mut st = self.state.lock().expect("object block cache lock");
                if st.sizes.len() >= SIZES_KEPT {
                    st.sizes.clear();
                }
                st.sizes.insert(key.to_string(), size);
                size
            }
        };
        if wanted.iter().any(|&(_, end)| end > size) {
            // Past the end of the object: the exact read reports it.
            return self.tier.get_ranges(key, ranges).await;
        }
        let cells: Vec<(u64, Arc<OnceCell<Bytes>>)> = ids.iter().map(|&i| (i, self.cell(key, i))).collect();
        if sequential {
            // A sequential reader: fetch the next blocks while it reads
            // these. A caller that reads ahead itself gets one: its own
            // readahead asks for the rest in time.
            let last = *ids.last().expect("not empty");
            // Not while half the cache is already waiting to be filled: the
            // readers' own calls come first, and more cells in flight would
            // push out filled blocks nobody has read yet.
            // A small cache gets fewer: a quarter of its blocks at most.
            let ahead = if self.unfilled() >= self.cached_blocks / 2 {
                0
            } else if readahead {
                1
            } else {
                PREFETCH_BLOCKS.min((self.cached_blocks as u64 / 4).max(1))
            };
            for next in (last + 1..=last + ahead).take_while(|n| n * BLOCK < size) {
                let cell = self.cell(key, next);
                if !cell.initialized() {
                    let (tier, gets, key) = (self.tier.clone(), self.gets.clone(), key.to_string());
                    tokio::spawn(async move {
                        let _ = cell
                            .get_or_try_init(|| fetch_block(&tier, &gets, &key, next, size))
                            .await;
                    });
                }
            }
        }
        // The blocks of this call: a reader waits for them unless the call
        // reads ahead.
        let gets = if readahead { &*self.gets } else { &self.demand_gets };
        let blocks: Vec<Bytes> = futures::future::try_join_all(cells.iter().map(|(i, cell)| async move {
            cell.get_or_try_init(|| fetch_block(&self.tier, gets, key, *i, size))
                .await
                .cloned()
        }))
        .await?;
        let mut out = Vec::with_capacity(total as usize);
        for (start, end) in wanted {
            let mut pos = start;
            while pos < end {
                let i = pos / BLOCK;
                let block = &blocks[ids.binary_search(&i).expect("every covering block was fetched")];
                let from = (pos - i * BLOCK) as usize;
                let to = (end.min((i + 1) * BLOCK) - i * BLOCK) as usize;
                out.extend_from_slice(&block[from..to]);
                pos = (i + 1) * BLOCK;
            }
        }
        Ok(out)
    }

    fn known_size(&self, key: &str) -> Option<u64> {
        self.state
            .lock()
            .expect("object block cache lock")
            .sizes
            .get(key)
            .copied()
    }

    /// Whether the call continues a sequential reader (see the module docs);
    /// records where it ends.
    fn sequential(&self, key: &str, wanted: &[(u64, u64)]) -> bool {
        let start = wanted.iter().map(|r| r.0).min().unwrap_or(0);
        let end = wanted.iter().map(|r| r.1).max().unwrap_or(0);
        let mut st = self.state.lock().expect("object block cache lock");
        let block = start / BLOCK;
        let in_cache = [Some(block), block.checked_sub(1)]
            .into_iter()
            .flatten()
            .any(|b| st.blocks.contains_key(&(key.to_string(), b)));
        if st.ends.len() >= SIZES_KEPT && !st.ends.contains_key(key) {
            st.ends.clear();
        }
        let ends = st.ends.entry(key.to_string()).or_default();
        let near = ends.iter().any(|e| start.abs_diff(*e) <= BLOCK);
        if ends.len() >= ENDS_KEPT {
            ends.pop_front();
        }
        ends.push_back(end);
        in_cache || near
    }

    /// Cells waiting for their block's GET.
    fn unfilled(&self) -> usize {
        let st = self.state.lock().expect("object block cache lock");
        st.blocks.values().filter(|c| !c.initialized()).count()
    }

    /// Whether every block of `ids` is cached (`filled`), or cached or
    /// being fetched.
    fn has_all(&self, key: &str, ids: &[u64], filled: bool) -> bool {
        let st = self.state.lock().expect("object block cache lock");
        ids.iter().all(|&i| {
            st.blocks
                .get(&(key.to_string(), i))
                .is_some_and(|c| !filled || c.initialized())
        })
    }

    /// The cache cell of block `i` of `key` (new and empty when not cached),
    /// marked most recently used; evicts the least recently used beyond the cap.
    fn cell(&self, key: &str, i: u64) -> Arc<OnceCell<Bytes>> {
        let id = (key.to_string(), i);
        let mut st = self.state.lock().expect("object block cache lock");
        if let Some(pos) = st.order.iter().position(|b| *b == id) {
            st.order.remove(pos);
        }
        st.order.push_back(id.clone());
        let cell = st.blocks.entry(id.clone()).or_default().clone();
        // Blocks still being fetched (not filled, and held by a fetch or a
        // waiting call besides this map) stay: a reader asked for them, and
        // dropping one would make its next call fetch it again. The cache
        // holds more than its cap only while more are in flight than it holds.
        while st.order.len() > self.cached_blocks {
            let State { blocks, order, .. } = &mut *st;
            // Nor the block just asked for (the caller is about to read it).
            let Some(pos) = order.iter().position(|b| {
                *b != id
                    && blocks
                        .get(b)
                        .is_none_or(|c| c.initialized() || Arc::strong_count(c) == 1)
            }) else {
                break;
            };
            let old = order.remove(pos).expect("position is in range");
            blocks.remove(&old);
        }
        cell
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_being_fetched_are_not_evicted() {
        let dir = tempfile::tempdir().unwrap();
        let tier = ObjectTier::from_url(&format!("file://{}", dir.path().display())).unwrap();
        let blocks = ObjectBlocks::new(tier);
        // Block 0 is being fetched (a fetch holds its cell, not filled yet);
        // block 1 was filled; block 2 was left empty by a failed fetch.
        let fetching = blocks.cell("k", 0);
        blocks.cell("k", 1).set(Bytes::from_static(b"x")).unwrap();
        drop(blocks.cell("k", 2));
        for i in 3..3 + CACHED_BLOCKS as u64 {
            blocks.cell("k", i).set(Bytes::new()).unwrap();
        }
        let st = blocks.state.lock().unwrap();
        let has = |i: u64| st.blocks.contains_key(&("k".to_string(), i));
        assert!(has(0), "the block in flight stays");
        assert!(!has(1) && !has(2), "filled and abandoned blocks are evicted");
        assert_eq!(st.blocks.len(), CACHED_BLOCKS);
        drop(fetching);
    }

    #[test]
    fn a_smaller_cache_keeps_fewer_blocks_and_fetches_fewer_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let tier = ObjectTier::from_url(&format!("file://{}", dir.path().display())).unwrap();
        let blocks = ObjectBlocks::with_blocks(tier, 4);
        for i in 0..10 {
            blocks.cell("k", i).set(Bytes::new()).unwrap();
        }
        assert_eq!(blocks.state.lock().unwrap().blocks.len(), 4);
        assert_eq!(blocks.gets.available_permits(), 2, "readahead: half the blocks");
        assert_eq!(blocks.demand_gets.available_permits(), 1, "readers: a quarter");
    }

    #[tokio::test]
    async fn a_small_cache_scans_a_pack_without_fetching_a_block_twice() {
        let dir = tempfile::tempdir().unwrap();
        let tier = ObjectTier::from_url(&format!("file://{}", dir.path().display())).unwrap();
        let len = (5 * BLOCK - 1000) as usize;
        let data: Vec<u8> = (0..len).map(|i| (i * 13 % 251) as u8).collect();
        tier.put_bytes("packs/z.pack", Bytes::from(data.clone()))
            .await
            .unwrap();
        let blocks = ObjectBlocks::with_blocks(tier, 8);
        let step = 1 << 20;
        let mut got = Vec::with_capacity(len);
        let mut at = 0;
        while at < len {
            let n = step.min(len - at);
            got.extend(
                blocks
                    .get_ranges("packs/z.pack", &[(at as u64, n as u32)], false)
                    .await
                    .unwrap(),
            );
            at += n;
            // From the second call on (the first is read exactly), every
            // block this scan needs next is cached or on its way, never
            // dropped before it is read.
            let st = blocks.state.lock().unwrap();
            let next = (at as u64).min(len as u64 - 1) / BLOCK;
            assert!(
                at <= step || at == len || st.blocks.contains_key(&("packs/z.pack".to_string(), next)),
                "block {next} is missing at {at}"
            );
            assert!(st.blocks.len() <= 8, "{} blocks", st.blocks.len());
        }
        assert!(got == data, "the scan returns the object");
    }

    #[tokio::test]
    async fn a_reader_does_not_wait_behind_the_readahead() {
        let dir = tempfile::tempdir().unwrap();
        let tier = ObjectTier::from_url(&format!("file://{}", dir.path().display())).unwrap();
        let data: Vec<u8> = (0..(3 * BLOCK) as usize).map(|i| (i % 253) as u8).collect();
        tier.put_bytes("packs/y.pack", Bytes::from(data.clone()))
            .await
            .unwrap();
        let blocks = ObjectBlocks::new(tier);
        // Readahead holds every block GET it may have in flight.
        let _held = blocks
            .gets
            .acquire_many(BLOCK_GETS_IN_FLIGHT as u32)
            .await
            .unwrap();
        // A reader's first call (exact), then its next one (sequential: served from blocks).
        assert_eq!(
            blocks
                .get_ranges("packs/y.pack", &[(0, 10)], false)
                .await
                .unwrap(),
            &data[..10]
        );
        let next = blocks.get_ranges("packs/y.pack", &[(10, 4096)], false);
        let got = tokio::time::timeout(std::time::Duration::from_secs(10), next)
            .await
            .expect("the reader's block is fetched while readahead holds its permits")
            .unwrap();
        assert_eq!(got, &data[10..4106]);
        assert!(
            blocks.cell("packs/y.pack", 0).initialized(),
            "served from a block"
        );
    }

    #[tokio::test]
    async fn block_reads_match_exact_reads() {
        let dir = tempfile::tempdir().unwrap();
        let tier = ObjectTier::from_url(&format!("file://{}", dir.path().display())).unwrap();
        let len = (2 * BLOCK + 12345) as usize;
        let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        tier.put_bytes("packs/x.pack", Bytes::from(data.clone()))
            .await
            .unwrap();
        let blocks = ObjectBlocks::new(tier.clone());
        let cases: Vec<Vec<(u64, u32)>> = vec![
            vec![(0, 10)],
            vec![(BLOCK - 5, 2 << 20), (3, 7), (0, 0)],
            vec![(0, BLOCK as u32), (BLOCK, BLOCK as u32), (2 * BLOCK, 12345)],
            vec![(2 * BLOCK + 100, 1000), (5, 1 << 20)],
        ];
        for ranges in cases {
            let want: Vec<u8> = ranges
                .iter()
                .flat_map(|&(o, l)| data[o as usize..o as usize + l as usize].iter().copied())
                .collect();
            assert_eq!(
                blocks.get_ranges("packs/x.pack", &ranges, false).await.unwrap(),
                want
            );
        }
        // A sequential reader's blocks are cached: once fetched, reads inside
        // them do not go to the object tier.
        let seq = ObjectBlocks::new(tier.clone());
        assert_eq!(
            seq.get_ranges("packs/x.pack", &[(0, 10)], false).await.unwrap(),
            data[..10]
        );
        assert_eq!(
            seq.get_ranges("packs/x.pack", &[(10, 1000)], false)
                .await
                .unwrap(),
            data[10..1010]
        );
        // Overwritten (packs never are): reads in the cached block still see the old bytes.
        tier.put_bytes("packs/x.pack", Bytes::from(vec![0u8; len]))
            .await
            .unwrap();
        assert_eq!(
            seq.get_ranges("packs/x.pack", &[(5 << 20, 100)], false)
                .await
                .unwrap(),
            data[5 << 20..(5 << 20) + 100],
            "served from the cached block"
        );
        tier.put_bytes("packs/x.pack", Bytes::from(data.clone()))
            .await
            .unwrap();
        // A readahead call is served from blocks even as a pack's first
        // call in the middle of the pack; a plain first call is read exactly.
        let ahead = ObjectBlocks::new(tier.clone());
        let plain = ObjectBlocks::new(tier.clone());
        let at = BLOCK + (3 << 20);
        for b in [&ahead, &plain] {
            let readahead = std::ptr::eq(b, &ahead);
            assert_eq!(
                b.get_ranges("packs/x.pack", &[(at, 1000)], readahead)
                    .await
                    .unwrap(),
                data[at as usize..at as usize + 1000]
            );
        }
        let zeros = vec![0u8; len];
        tier.put_bytes("packs/x.pack", Bytes::from(zeros.clone()))
            .await
            .unwrap();
        let later = (BLOCK + (9 << 20), 100);
        let range = later.0 as usize..later.0 as usize + 100;
        assert_eq!(
            ahead.get_ranges("packs/x.pack", &[later], false).await.unwrap(),
            data[range.clone()],
            "the readahead call cached its block"
        );
        assert_eq!(
            plain.get_ranges("packs/x.pack", &[later], false).await.unwrap(),
            zeros[range],
            "the plain first call cached nothing"
        );
        tier.put_bytes("packs/x.pack", Bytes::from(data.clone()))
            .await
            .unwrap();
        // Past the end and missing objects fail like exact reads.
        assert!(blocks
            .get_ranges("packs/x.pack", &[(len as u64 - 10, 2 << 20)], false)
            .await
            .is_err());
        assert!(matches!(
            blocks.get_ranges("packs/y.pack", &[(0, 2 << 20)], false).await,
            Err(ObjectError::NotFound { .. })
        ));
    }
}
