//! The disk chunk cache: chunks appended to segment files, bounded by a byte
//! cap, shared by every process on the host that uses the same directory.
//!
//! One file per chunk (the first design) spent about half of a cold read's
//! CPU in the filesystem allocating and freeing inodes; appending to a few
//! large files costs one `pwrite` per batch of chunks.
//!
//! ```text
//! CACHE_DIR/segments-v2.lock          flock'd while segments are created, evicted or recovered;
//!                                     holds the next segment number (u64 LE)
//! CACHE_DIR/segments-v2/<seq>.open    a segment a live process appends to (it holds an flock on it)
//! CACHE_DIR/segments-v2/<seq>.seg     a sealed segment: records, then an index footer
//! ```
//!
//! - **Record**: a 44-byte header (magic, length, chunk id, CRC-32 of length
//!   and id) and the chunk's raw bytes. A batch of records is written with
//!   its first header last, so a reader that finds a valid header finds the
//!   bytes behind it; every read re-hashes the bytes with BLAKE3. A record
//!   that does not match is counted (`corrupt`), its magic is overwritten
//!   with a dead mark (so no process serves it again) and the chunk is
//!   fetched again.
//! - **Segments** are created with their whole reserved size (sparse), so
//!   the sum of the segment files' sizes, which every process can see, never
//!   exceeds the cap: a writer that needs a new segment deletes the oldest
//!   sealed segments (of any process) under the directory lock until the new
//!   one fits. A sealed segment is truncated to its records plus a footer
//!   listing them, which is all a process reads to index it.
//! - **Reads** of sealed segments use `O_DIRECT` (a second descriptor):
//!   the bytes go from the disk straight into the buffer the chunks are
//!   sliced from, instead of through the page cache (a copy, page-cache
//!   bookkeeping, and a second cached copy beside the kernel's cache of the
//!   mounted file). Adjacent records are one aligned read, into a buffer
//!   reused from a small pool (32 MiB) once its chunks are dropped. Open segments,
//!   and filesystems without `O_DIRECT` (tmpfs), are read through the page
//!   cache; `GRANARY_CACHE_DIRECT=0` turns direct reads off.
//! - **Eviction** is by segment, oldest first; a chunk read from a segment
//!   that is about to be evicted (the oldest bytes past three quarters of the
//!   cap) is appended again, so data in use stays (LRU-like).
//! - **Sharing**: each process indexes the segments in memory (id -> segment,
//!   offset). It re-lists the directory when its mtime changes (or a second
//!   has passed), picking up sealed segments of other processes and dropping
//!   deleted ones; on a miss it also looks for new records at the end of
//!   other processes' open segments. A segment left `.open` by a process
//!   that died (its flock is free) is sealed by the next process that
//!   allocates.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use granary_core::ChunkId;

use crate::cache::{Bytes, Stats};
use crate::error::FsError;

/// Record header: magic (4), length (4, LE), chunk id (32), CRC-32 of length and id (4, LE).
const HDR: u64 = 44;
const LIVE: [u8; 4] = *b"GCR1";
/// A record found damaged: skipped by every reader and scanner.
const DEAD: [u8; 4] = *b"GCRX";
/// Footer entry: chunk id (32), record offset (4, LE), length (4, LE).
const ENTRY: usize = 40;
/// Footer trailer: magic (8), entries (4), end of records (4), CRC-32 of the entries (4), zero (4).
const TRAILER: usize = 24;
const TRAILER_MAGIC: [u8; 8] = *b"GSEGIX01";
/// Largest segment; smaller caps get segments of cap / 16.
const MAX_SEGMENT: u64 = 32 << 20;
/// A directory listing older than this is redone even if the mtime did not move
/// (mtimes are coarse: two changes within one tick look like one).
const RELIST_AFTER: Duration = Duration::from_secs(1);

const SUBDIR: &str = "segments-v2";
/// Adjacent records read with one `preadv`: at most this many, and about this many bytes.
const MAX_RUN_RECORDS: usize = 256;
const MAX_RUN_BYTES: u64 = 8 << 20;
/// Offset, length and buffer alignment of `O_DIRECT` reads (at least the
/// logical block size of any disk here).
const DIRECT_ALIGN: usize = 4096;

/// Where a chunk's record is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Loc {
    seq: u64,
    off: u32,
    len: u32,
}

struct Segment {
    file: Arc<File>,
    /// A sealed segment opened again with `O_DIRECT`, for reads (`None` while
    /// open, or where the filesystem refuses `O_DIRECT`).
    direct: Option<Arc<File>>,
    /// Still appended to (by this process or another live one).
    open: bool,
    /// Ours: the writer's active segment (or one we sealed).
    mine: bool,
    /// For another process's open segment: records before this offset are indexed.
    scanned: u64,
    /// Size on disk when last listed.
    size: u64,
    ids: Vec<ChunkId>,
}

#[derive(Default)]
struct Index {
    segs: BTreeMap<u64, Segment>,
    map: HashMap<ChunkId, Loc>,
    listed_mtime: Option<SystemTime>,
    listed_at: Option<Instant>,
    /// Hits in segments below this number are appended again (they are next to be evicted).
    renew_below: u64,
}

impl Index {
    /// Forgets segment `seq` and every id that points into it; returns how many ids that was.
    fn drop_segment(&mut self, seq: u64) -> usize {
        let Some(seg) = self.segs.remove(&seq) else {
            return 0;
        };
        let mut n = 0;
        for id in &seg.ids {
            if self.map.get(id).is_some_and(|l| l.seq == seq) {
                self.map.remove(id);
                n += 1;
            }
        }
        n
    }

    fn add(&mut self, seq: u64, records: &[(ChunkId, u32, u32)]) {
        let Some(seg) = self.segs.get_mut(&seq) else {
            return;
        };
        for &(id, off, len) in records {
            seg.ids.push(id);
            self.map.insert(id, Loc { seq, off, len });
        }
    }
}

/// The segment being appended to by this process.
struct Active {
    seq: u64,
    file: Arc<File>,
    path: PathBuf,
    end: u64,
    reserved: u64,
    entries: Vec<(ChunkId, u32, u32)>,
}

impl Active {
    /// True when `n` more records of `bytes` (headers included) fit, with
    /// room left for the footer that will list them.
    fn fits(&self, n: usize, bytes: u64) -> bool {
        let footer = ((self.entries.len() + n) * ENTRY + TRAILER) as u64;
        self.end + bytes + footer <= self.reserved
    }
}

/// One segment file as listed.
struct Listed {
    seq: u64,
    open: bool,
    size: u64,
    path: PathBuf,
}

/// Why a record could not be served.
enum Bad {
    /// Marked dead (by any process), or unreadable just now: a plain miss.
    Dead,
    /// Does not match its id or header: damaged.
    Corrupt(String),
}

/// Chunks in segment files under one directory, bounded by `cap` bytes,
/// shareable by several processes (see the module docs).
pub struct DiskCache {
    dir: PathBuf,
    /// `segments-v2.lock`: `flock` serializes processes, the mutex this
    /// process's threads (they share the descriptor).
    lock: File,
    local: Mutex<()>,
    cap: u64,
    target: u64,
    index: Mutex<Index>,
    writer: Mutex<Option<Active>>,
    /// Sealed segments are read with `O_DIRECT` (turned off for good by the
    /// first read the filesystem refuses, or by `GRANARY_CACHE_DIRECT=0`).
    direct: AtomicBool,
    /// Buffers of direct reads whose chunks are all dropped, for the next.
    bufs: Arc<BufPool>,
}

/// Idle buffers of `O_DIRECT` reads, at most [`POOL_BYTES`] of them. A
/// buffer freed to malloc went back to the kernel at the mount's next
/// `malloc_trim`, and the next read of the same size faulted in and zeroed
/// fresh pages (7% of the mount's CPU in a warm-disk read, and zeroing
/// each buffer before the read 3% more); a pooled one is reused as it is.
#[derive(Default)]
struct BufPool {
    idle: Mutex<Vec<Vec<u8>>>,
}

/// Idle bytes the pool of direct-read buffers keeps.
const POOL_BYTES: usize = 32 << 20;
/// Pool buffers are allocated in multiples of this, so runs of about the
/// same length reuse each other's. A buffer is lent only for a read of at
/// least half its size: a chunk kept in memory holds its whole buffer.
const POOL_STEP: usize = 64 << 10;

impl BufPool {
    /// A buffer of at least `len` bytes of capacity; its contents are
    /// whatever a previous read left (or uninitialised: it has length 0).
    fn take(&self, len: usize) -> Vec<u8> {
        let mut idle = self.idle.lock().expect("buffer pool");
        let best = (0..idle.len())
            .filter(|&i| (len..=len.max(POOL_STEP) * 2).contains(&idle[i].capacity()))
            .min_by_key(|&i| idle[i].capacity());
        match best {
            Some(i) => idle.swap_remove(i),
            None => Vec::with_capacity(len.div_ceil(POOL_STEP) * POOL_STEP),
        }
    }

    fn give(&self, mut buf: Vec<u8>) {
        buf.clear();
        let mut idle = self.idle.lock().expect("buffer pool");
        let held: usize = idle.iter().map(Vec::capacity).sum();
        if held + buf.capacity() <= POOL_BYTES {
            idle.push(buf);
        }
    }
}

/// `len` bytes at `off` of a pool buffer, filled by a read: the owner of
/// the [`Bytes`] a direct read's chunks are sliced from, which gives the
/// buffer back to the pool when the last slice is dropped.
struct Pooled {
    buf: Vec<u8>,
    off: usize,
    len: usize,
    pool: Arc<BufPool>,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        debug_assert!(self.off + self.len <= self.buf.capacity());
        // SAFETY: `off..off + len` lies within the buffer's allocation
        // (checked when the read was issued) and was written by the read.
        unsafe { std::slice::from_raw_parts(self.buf.as_ptr().add(self.off), self.len) }
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        self.pool.give(std::mem::take(&mut self.buf));
    }
}

/// Holds the directory lock (the mutex, then the `flock`) until dropped.
struct DirLock<'a>(&'a File, #[allow(dead_code)] std::sync::MutexGuard<'a, ()>);

impl Drop for DirLock<'_> {
    fn drop(&mut self) {
        let _ = flock(self.0, libc::LOCK_UN);
    }
}

/// `path` opened read-only with `O_DIRECT`, when the filesystem allows it.
fn open_direct(path: &Path) -> Option<Arc<File>> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .ok()
        .map(Arc::new)
}

fn flock(f: &File, op: i32) -> std::io::Result<()> {
    // SAFETY: flock on a descriptor owned by `f`.
    if unsafe { libc::flock(f.as_raw_fd(), op) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn header(id: &ChunkId, len: u32) -> [u8; HDR as usize] {
    let mut h = [0u8; HDR as usize];
    h[..4].copy_from_slice(&LIVE);
    h[4..8].copy_from_slice(&len.to_le_bytes());
    h[8..40].copy_from_slice(id.as_bytes());
    let crc = crc32fast::hash(&h[4..40]);
    h[40..44].copy_from_slice(&crc.to_le_bytes());
    h
}

/// A header's (live, id, len), or `None` when it is not a whole valid header.
fn parse_header(h: &[u8]) -> Option<(bool, ChunkId, u32)> {
    let live = match h.get(..4)? {
        m if m == LIVE => true,
        m if m == DEAD => false,
        _ => return None,
    };
    if crc32fast::hash(&h[4..40]).to_le_bytes() != h[40..44] {
        return None;
    }
    let len = u32::from_le_bytes(h[4..8].try_into().ok()?);
    Some((live, ChunkId::from_slice(&h[8..40])?, len))
}

/// The records of `file` from `from` on, up to the first invalid header or
/// one that runs past `limit`: (live records, where the scan stopped).
fn scan(file: &File, from: u64, limit: u64) -> (Vec<(ChunkId, u32, u32)>, u64) {
    let mut out = Vec::new();
    let mut off = from;
    let mut h = [0u8; HDR as usize];
    while off + HDR <= limit && file.read_exact_at(&mut h, off).is_ok() {
        let Some((live, id, len)) = parse_header(&h) else {
            break;
        };
        let end = off + HDR + len as u64;
        if end > limit {
            break;
        }
        if live {
            out.push((id, off as u32, len));
        }
        off = end;
    }
    (out, off)
}

/// The entries of a sealed segment's footer, or `None` when it has no valid one.
fn read_footer(file: &File, size: u64) -> Option<Vec<(ChunkId, u32, u32)>> {
    if size < TRAILER as u64 {
        return None;
    }
    let mut t = [0u8; TRAILER];
    file.read_exact_at(&mut t, size - TRAILER as u64).ok()?;
    if t[..8] != TRAILER_MAGIC {
        return None;
    }
    let n = u32::from_le_bytes(t[8..12].try_into().ok()?) as u64;
    let end = u32::from_le_bytes(t[12..16].try_into().ok()?) as u64;
    let crc = u32::from_le_bytes(t[16..20].try_into().ok()?);
    if end + n * ENTRY as u64 + TRAILER as u64 != size {
        return None;
    }
    let mut buf = vec![0u8; (n as usize) * ENTRY];
    file.read_exact_at(&mut buf, end).ok()?;
    if crc32fast::hash(&buf) != crc {
        return None;
    }
    let mut out = Vec::with_capacity(n as usize);
    for e in buf.chunks_exact(ENTRY) {
        let id = ChunkId::from_slice(&e[..32])?;
        let off = u32::from_le_bytes(e[32..36].try_into().ok()?);
        let len = u32::from_le_bytes(e[36..40].try_into().ok()?);
        if off as u64 + HDR + len as u64 > end {
            return None;
        }
        out.push((id, off, len));
    }
    Some(out)
}

/// A sealed segment's records: from its footer, or by scanning when the
/// footer is damaged.
fn sealed_entries(file: &File, size: u64) -> Vec<(ChunkId, u32, u32)> {
    read_footer(file, size).unwrap_or_else(|| scan(file, 0, size).0)
}

/// Writes the footer after `end`, truncates to it, renames `.open` to `.seg`
/// and releases the segment's flock.
fn seal_file(file: &File, path: &Path, end: u64, entries: &[(ChunkId, u32, u32)]) -> std::io::Result<u64> {
    let mut footer = Vec::with_capacity(entries.len() * ENTRY + TRAILER);
    for (id, off, len) in entries {
        footer.extend_from_slice(id.as_bytes());
        footer.extend_from_slice(&off.to_le_bytes());
        footer.extend_from_slice(&len.to_le_bytes());
    }
    let crc = crc32fast::hash(&footer);
    footer.extend_from_slice(&TRAILER_MAGIC);
    footer.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    footer.extend_from_slice(&(end as u32).to_le_bytes());
    footer.extend_from_slice(&crc.to_le_bytes());
    footer.extend_from_slice(&[0u8; 4]);
    file.write_all_at(&footer, end)?;
    let size = end + footer.len() as u64;
    file.set_len(size)?;
    std::fs::rename(path, path.with_extension("seg"))?;
    flock(file, libc::LOCK_UN)?;
    Ok(size)
}

impl DiskCache {
    /// Opens (creating) the cache under `dir`: seals segments of dead
    /// processes, deletes the oldest segments until the cache is within
    /// `cap`, and indexes the rest. A cache directory of the earlier
    /// one-file-per-chunk layout (`chunks-v1/`) is deleted.
    pub fn open(dir: &Path, cap: u64) -> Result<Self, FsError> {
        let segs = dir.join(SUBDIR);
        std::fs::create_dir_all(&segs)?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(dir.join(format!("{SUBDIR}.lock")))?;
        let cache = Self {
            dir: segs,
            lock,
            local: Mutex::new(()),
            cap,
            target: (cap / 16).clamp(1, MAX_SEGMENT),
            index: Mutex::new(Index::default()),
            writer: Mutex::new(None),
            direct: AtomicBool::new(std::env::var("GRANARY_CACHE_DIRECT").map_or(true, |v| v != "0")),
            bufs: Arc::default(),
        };
        {
            let _l = cache.locked()?;
            for old in ["chunks-v1", "chunks-tmp"] {
                let _ = std::fs::remove_dir_all(dir.join(old));
            }
            for old in ["chunks-v1.usage", "chunks-v1.lock"] {
                let _ = std::fs::remove_file(dir.join(old));
            }
            cache.make_room(0);
        }
        cache.relist();
        Ok(cache)
    }

    fn locked(&self) -> Result<DirLock<'_>, FsError> {
        let local = self.local.lock().expect("disk cache lock");
        flock(&self.lock, libc::LOCK_EX)?;
        Ok(DirLock(&self.lock, local))
    }

    /// Every segment file, oldest first.
    fn list(&self) -> Vec<Listed> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let name = e.file_name();
            let Some((seq, ext)) = name.to_str().and_then(|n| n.split_once('.')) else {
                continue;
            };
            let (Ok(seq), Ok(md)) = (u64::from_str_radix(seq, 16), e.metadata()) else {
                continue;
            };
            let open = match ext {
                "open" => true,
                "seg" => false,
                _ => continue,
            };
            out.push(Listed {
                seq,
                open,
                size: md.len(),
                path: e.path(),
            });
        }
        // A rename seen mid-listing can show a segment under both names.
        out.sort_by_key(|l| (l.seq, l.open));
        out.dedup_by_key(|l| l.seq);
        out
    }

    /// Seals every listed open segment whose writer is gone (its flock is
    /// free): its valid records get a footer. Call with the directory lock.
    fn recover_dead(&self, listing: &mut [Listed]) {
        for l in listing.iter_mut().filter(|l| l.open) {
            if self
                .index
                .lock()
                .expect("disk index")
                .segs
                .get(&l.seq)
                .is_some_and(|s| s.mine)
            {
                continue;
            }
            let Ok(file) = OpenOptions::new().read(true).write(true).open(&l.path) else {
                continue;
            };
            if flock(&file, libc::LOCK_EX | libc::LOCK_NB).is_err() {
                continue; // a live writer
            }
            let (entries, end) = scan(&file, 0, l.size);
            match seal_file(&file, &l.path, end, &entries) {
                Ok(size) => {
                    tracing::debug!(
                        segment = l.seq,
                        records = entries.len(),
                        "sealed a dead process's cache segment"
                    );
                    l.open = false;
                    l.size = size;
                    l.path = l.path.with_extension("seg");
                }
                Err(e) => tracing::warn!(path = %l.path.display(), "cannot seal a dead cache segment: {e}"),
            }
        }
    }

    /// Lists the directory and brings the index up to date; returns the bytes on disk.
    fn relist(&self) -> u64 {
        let mtime = std::fs::metadata(&self.dir).and_then(|m| m.modified()).ok();
        let listing = self.list();
        let total: u64 = listing.iter().map(|l| l.size).sum();
        let mut ix = self.index.lock().expect("disk index");
        let present: HashMap<u64, &Listed> = listing.iter().map(|l| (l.seq, l)).collect();
        let gone: Vec<u64> = ix
            .segs
            .iter()
            .filter(|(seq, s)| !(present.contains_key(seq) || (s.mine && s.open)))
            .map(|(seq, _)| *seq)
            .collect();
        for seq in gone {
            ix.drop_segment(seq);
        }
        for l in &listing {
            match ix.segs.get_mut(&l.seq) {
                Some(s) => {
                    s.size = l.size;
                    if s.open && !l.open && !s.mine {
                        // Sealed since we last looked: its footer lists every record.
                        s.open = false;
                        s.direct = open_direct(&l.path);
                        let entries = sealed_entries(&s.file, l.size);
                        let new: Vec<_> = entries.into_iter().filter(|e| e.1 as u64 >= s.scanned).collect();
                        ix.add(l.seq, &new);
                    }
                }
                None => {
                    // Read-only when another user's: we can still serve it, not mark it.
                    let Ok(file) = OpenOptions::new()
                        .read(true)
                        .write(true)
                        .open(&l.path)
                        .or_else(|_| File::open(&l.path))
                    else {
                        continue;
                    };
                    let (entries, scanned) = if l.open {
                        scan(&file, 0, l.size)
                    } else {
                        (sealed_entries(&file, l.size), l.size)
                    };
                    ix.segs.insert(
                        l.seq,
                        Segment {
                            file: Arc::new(file),
                            direct: if l.open { None } else { open_direct(&l.path) },
                            open: l.open,
                            mine: false,
                            scanned,
                            size: l.size,
                            ids: Vec::new(),
                        },
                    );
                    ix.add(l.seq, &entries);
                }
            }
        }
        // Renew hits in the oldest bytes beyond three quarters of the cap.
        let mut excess = total.saturating_sub(self.cap / 4 * 3);
        let mut renew_below = 0;
        for (seq, s) in ix.segs.iter() {
            if excess == 0 || s.open {
                break;
            }
            excess = excess.saturating_sub(s.size);
            renew_below = seq + 1;
        }
        ix.renew_below = renew_below;
        ix.listed_mtime = mtime;
        ix.listed_at = Some(Instant::now());
        total
    }

    /// Re-lists when the directory changed or the listing is old.
    fn refresh(&self) {
        let mtime = std::fs::metadata(&self.dir).and_then(|m| m.modified()).ok();
        let fresh = {
            let ix = self.index.lock().expect("disk index");
            ix.listed_mtime == mtime && ix.listed_at.is_some_and(|t| t.elapsed() < RELIST_AFTER)
        };
        if !fresh {
            self.relist();
        }
    }

    /// Indexes records appended to other processes' open segments since we
    /// last looked; true when any were found.
    fn scan_others(&self) -> bool {
        let mut ix = self.index.lock().expect("disk index");
        let mut found = Vec::new();
        for (seq, s) in ix.segs.iter_mut().filter(|(_, s)| s.open && !s.mine) {
            let limit = s.file.metadata().map(|m| m.len()).unwrap_or(0);
            let (entries, end) = scan(&s.file, s.scanned, limit);
            s.scanned = end;
            if !entries.is_empty() {
                found.push((*seq, entries));
            }
        }
        let any = !found.is_empty();
        for (seq, entries) in found {
            ix.add(seq, &entries);
        }
        any
    }

    /// Bytes on disk (all segment files, counted by their size, of every
    /// process sharing the directory) and the cap. Also drops segments other
    /// processes deleted, so this process lets go of their space.
    pub fn usage(&self) -> (u64, u64) {
        // Under the lock, so no segment is caught mid-rename or mid-creation.
        let _l = self.locked();
        (self.relist(), self.cap)
    }

    /// True when `id` is indexed (without reading it).
    pub fn contains(&self, id: &ChunkId) -> bool {
        self.index.lock().expect("disk index").map.contains_key(id)
    }

    /// Every indexed record: chunk id, segment file, offset of the chunk's
    /// bytes in it, length. For tests and tools that look at the files.
    pub fn records(&self) -> Vec<(ChunkId, PathBuf, u64, u32)> {
        self.relist();
        let ix = self.index.lock().expect("disk index");
        let mut out: Vec<_> = ix
            .map
            .iter()
            .filter_map(|(id, l)| {
                let ext = if ix.segs.get(&l.seq)?.open { "open" } else { "seg" };
                let path = self.dir.join(format!("{:016x}.{ext}", l.seq));
                Some((*id, path, l.off as u64 + HDR, l.len))
            })
            .collect();
        out.sort_by(|a, b| (&a.1, a.2).cmp(&(&b.1, b.2)));
        out
    }

    /// The verified bytes of `id`, or `None` (see [`Self::get_many`]).
    pub fn get(&self, id: &ChunkId, stats: &Stats) -> Option<Bytes> {
        self.get_many(std::slice::from_ref(id), stats).pop().flatten()
    }

    /// The verified bytes of each of `ids` found in the cache. A damaged
    /// record is marked dead, counted (`corrupt`) and reported missing.
    pub fn get_many(&self, ids: &[ChunkId], stats: &Stats) -> Vec<Option<Bytes>> {
        self.refresh();
        let direct = self.direct.load(Ordering::Relaxed);
        let lookup = |ids: &[ChunkId], want: &[usize]| {
            let ix = self.index.lock().expect("disk index");
            want.iter()
                .map(|&i| {
                    let l = *ix.map.get(&ids[i])?;
                    let s = ix.segs.get(&l.seq)?;
                    let d = s.direct.clone().filter(|_| direct);
                    Some((l, s.file.clone(), d, s.open && !s.mine, l.seq < ix.renew_below))
                })
                .collect::<Vec<_>>()
        };
        let all: Vec<usize> = (0..ids.len()).collect();
        let mut found = lookup(ids, &all);
        let missing: Vec<usize> = all.iter().copied().filter(|&i| found[i].is_none()).collect();
        if !missing.is_empty() && self.scan_others() {
            for (i, f) in missing.iter().zip(lookup(ids, &missing)) {
                found[*i] = f;
            }
        }
        // Adjacent records of one segment (a batch is usually written in the
        // order it is read) are read with one preadv: large reads from disk.
        let mut order: Vec<usize> = (0..ids.len()).filter(|&i| found[i].is_some()).collect();
        order.sort_by_key(|&i| found[i].as_ref().map(|f| (f.0.seq, f.0.off)));
        let mut results: Vec<Option<Result<Bytes, Bad>>> = (0..ids.len()).map(|_| None).collect();
        let mut k = 0;
        while k < order.len() {
            let (first, file, direct, ..) = found[order[k]].as_ref().expect("found");
            let mut end = first.off as u64 + HDR + first.len as u64;
            let mut j = k + 1;
            while j < order.len() && j - k < MAX_RUN_RECORDS && end - (first.off as u64) < MAX_RUN_BYTES {
                let l = found[order[j]].as_ref().expect("found").0;
                if l.seq != first.seq || l.off as u64 != end {
                    break;
                }
                end += HDR + l.len as u64;
                j += 1;
            }
            let run: Vec<(ChunkId, Loc)> = order[k..j]
                .iter()
                .map(|&i| (ids[i], found[i].as_ref().expect("found").0))
                .collect();
            let read = match direct {
                Some(d) => read_run_direct(d, file, &run, &self.direct, &self.bufs),
                None => read_run(file, &run),
            };
            for (&i, r) in order[k..j].iter().zip(read) {
                results[i] = Some(r);
            }
            k = j;
        }
        let mut renew = Vec::new();
        let mut out = Vec::with_capacity(ids.len());
        for ((id, f), result) in ids.iter().zip(found).zip(results) {
            let (Some((loc, file, _, theirs_open, old)), Some(result)) = (f, result) else {
                out.push(None);
                continue;
            };
            match result {
                Ok(data) => {
                    if old {
                        renew.push((*id, data.clone()));
                    }
                    out.push(Some(data));
                }
                Err(bad) => {
                    if let Bad::Corrupt(why) = bad {
                        if !theirs_open {
                            tracing::warn!(chunk = %id, segment = loc.seq, "corrupt disk cache record ({why}); refetching");
                            stats.corrupt.fetch_add(1, Ordering::Relaxed);
                            let _ = file.write_all_at(&DEAD, loc.off as u64);
                        }
                    }
                    let mut ix = self.index.lock().expect("disk index");
                    if ix.map.get(id) == Some(&loc) {
                        ix.map.remove(id);
                    }
                    out.push(None);
                }
            }
        }
        if !renew.is_empty() {
            let items: Vec<(ChunkId, &[u8])> = renew.iter().map(|(id, d)| (*id, &d[..])).collect();
            if let Err(e) = self.write(&items, stats, true) {
                tracing::warn!("cannot write the disk cache: {e}");
            }
        }
        out
    }

    /// Stores `data` as chunk `id` (see [`Self::put_many`]).
    pub fn put(&self, id: &ChunkId, data: &[u8], stats: &Stats) -> Result<(), FsError> {
        self.put_many(&[(*id, data)], stats)
    }

    /// Appends the chunks not yet cached to this process's segment, making
    /// room (deleting the oldest segments) when it needs a new one. A chunk
    /// bigger than the cap, or that no room can be made for, is not stored.
    pub fn put_many(&self, items: &[(ChunkId, &[u8])], stats: &Stats) -> Result<(), FsError> {
        self.write(items, stats, false)
    }

    fn write(&self, items: &[(ChunkId, &[u8])], stats: &Stats, renew: bool) -> Result<(), FsError> {
        let mut w = self.writer.lock().expect("disk cache writer");
        let items: Vec<&(ChunkId, &[u8])> = {
            let ix = self.index.lock().expect("disk index");
            let mut seen = std::collections::HashSet::new();
            items
                .iter()
                .filter(|(id, d)| {
                    HDR + d.len() as u64 + (ENTRY + TRAILER) as u64 <= self.cap
                        && seen.insert(*id)
                        && (renew || !ix.map.contains_key(id))
                })
                .collect()
        };
        let mut i = 0;
        while i < items.len() {
            if !w
                .as_ref()
                .is_some_and(|a| a.fits(1, HDR + items[i].1.len() as u64))
            {
                if let Some(a) = w.take() {
                    self.seal(a);
                }
                let need = HDR + items[i].1.len() as u64 + (ENTRY + TRAILER) as u64;
                match self.allocate(need.max(self.target), stats)? {
                    Some(a) => *w = Some(a),
                    None => return Ok(()),
                }
            }
            let a = w.as_mut().expect("active segment");
            let mut j = i + 1;
            let mut bytes = HDR + items[i].1.len() as u64;
            while j < items.len() && a.fits(j + 1 - i, bytes + HDR + items[j].1.len() as u64) {
                bytes += HDR + items[j].1.len() as u64;
                j += 1;
            }
            self.append(a, &items[i..j])?;
            i = j;
        }
        Ok(())
    }

    /// Writes records at the segment's end: every byte but the first header,
    /// then the first header, so a concurrent scanner sees all or none.
    fn append(&self, a: &mut Active, items: &[&(ChunkId, &[u8])]) -> Result<(), FsError> {
        let start = a.end;
        let headers: Vec<[u8; HDR as usize]> = items
            .iter()
            .map(|(id, data)| header(id, data.len() as u32))
            .collect();
        let mut bufs: Vec<&[u8]> = Vec::with_capacity(items.len() * 2);
        let mut records = Vec::with_capacity(items.len());
        let mut off = start;
        for (k, (id, data)) in items.iter().enumerate() {
            if k > 0 {
                bufs.push(&headers[k]);
            }
            bufs.push(data);
            records.push((*id, off as u32, data.len() as u32));
            off += HDR + data.len() as u64;
        }
        write_all_vectored_at(&a.file, bufs, start + HDR)?;
        a.file.write_all_at(&headers[0], start)?;
        a.end = off;
        a.entries.extend_from_slice(&records);
        self.index.lock().expect("disk index").add(a.seq, &records);
        Ok(())
    }

    /// Seals dead processes' segments, then deletes the oldest sealed
    /// segments until `need` more bytes fit under the cap (or none is left).
    /// Returns the listing (deleted ones included), the bytes left on disk
    /// and the deleted segments. Call with the directory lock.
    fn make_room(&self, need: u64) -> (Vec<Listed>, u64, Vec<u64>) {
        let mut listing = self.list();
        self.recover_dead(&mut listing);
        let mut used: u64 = listing.iter().map(|l| l.size).sum();
        let mut evicted = Vec::new();
        for l in listing.iter().filter(|l| !l.open) {
            if used + need <= self.cap {
                break;
            }
            if std::fs::remove_file(&l.path).is_ok() {
                used -= l.size;
                evicted.push(l.seq);
            }
        }
        (listing, used, evicted)
    }

    /// Makes room for a segment of `reserve` bytes and creates it; `None`
    /// when the other segments cannot be made to leave room.
    fn allocate(&self, reserve: u64, stats: &Stats) -> Result<Option<Active>, FsError> {
        let _l = self.locked()?;
        let (listing, used, evicted) = self.make_room(reserve);
        {
            let mut ix = self.index.lock().expect("disk index");
            for seq in evicted {
                let n = ix.drop_segment(seq);
                stats.disk_evictions.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
        if used + reserve > self.cap {
            return Ok(None);
        }
        // Segment numbers never repeat (a process may still know an old one):
        // the next one is kept in the lock file.
        let mut next = [0u8; 8];
        let stored = self
            .lock
            .read_exact_at(&mut next, 0)
            .map(|_| u64::from_le_bytes(next))
            .unwrap_or(0);
        let seq = stored.max(listing.last().map_or(0, |l| l.seq + 1)).max(1);
        self.lock.write_all_at(&(seq + 1).to_le_bytes(), 0)?;
        let path = self.dir.join(format!("{seq:016x}.open"));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        flock(&file, libc::LOCK_EX | libc::LOCK_NB)?;
        if let Err(e) = file.set_len(reserve) {
            let _ = std::fs::remove_file(&path);
            return Err(e.into());
        }
        let file = Arc::new(file);
        self.index.lock().expect("disk index").segs.insert(
            seq,
            Segment {
                file: file.clone(),
                direct: None,
                open: true,
                mine: true,
                scanned: 0,
                size: reserve,
                ids: Vec::new(),
            },
        );
        Ok(Some(Active {
            seq,
            file,
            path,
            end: 0,
            reserved: reserve,
            entries: Vec::new(),
        }))
    }

    fn seal(&self, a: Active) {
        // Under the lock: a listing that counts bytes sees the file once.
        let _l = self.locked();
        match seal_file(&a.file, &a.path, a.end, &a.entries) {
            Ok(size) => {
                let direct = open_direct(&a.path.with_extension("seg"));
                if let Some(s) = self.index.lock().expect("disk index").segs.get_mut(&a.seq) {
                    s.open = false;
                    s.size = size;
                    s.direct = direct;
                }
            }
            Err(e) => {
                // (A full disk, say.) Left as it is, its space would stay
                // reserved for as long as this process lives: delete it.
                tracing::warn!(path = %a.path.display(), "cannot seal a disk cache segment ({e}); deleting it");
                let _ = std::fs::remove_file(&a.path);
                let _ = std::fs::remove_file(a.path.with_extension("seg"));
                self.index.lock().expect("disk index").drop_segment(a.seq);
            }
        }
    }

    /// Seals this process's open segment (before exiting; a segment left
    /// open is sealed by the next process that needs room).
    pub fn close(&self) {
        if let Some(a) = self.writer.lock().expect("disk cache writer").take() {
            self.seal(a);
        }
    }
}

impl Drop for DiskCache {
    fn drop(&mut self) {
        self.close();
    }
}

/// `pwritev` of all of `bufs` at `off` (no copy into one buffer: a batch
/// can be 16 MiB, and large short-lived buffers grow the heap).
fn write_all_vectored_at(file: &File, mut bufs: Vec<&[u8]>, mut off: u64) -> std::io::Result<()> {
    bufs.retain(|b| !b.is_empty());
    let mut first = 0;
    while first < bufs.len() {
        let iov: Vec<libc::iovec> = bufs[first..]
            .iter()
            .take(1024)
            .map(|b| libc::iovec {
                iov_base: b.as_ptr() as *mut libc::c_void,
                iov_len: b.len(),
            })
            .collect();
        // SAFETY: every iovec points into a live slice of its stated length; pwritev only reads them.
        let n = unsafe {
            libc::pwritev(
                file.as_raw_fd(),
                iov.as_ptr(),
                iov.len() as i32,
                off as libc::off_t,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        off += n as u64;
        let mut n = n as usize;
        while n > 0 {
            if bufs[first].len() <= n {
                n -= bufs[first].len();
                first += 1;
            } else {
                bufs[first] = &bufs[first][n..];
                n = 0;
            }
        }
    }
    Ok(())
}

/// Reads and verifies the adjacent records `run` (in file order) with one
/// `preadv`; a short read falls back to one read per record.
fn read_run(file: &File, run: &[(ChunkId, Loc)]) -> Vec<Result<Bytes, Bad>> {
    if run.len() == 1 {
        return vec![read_record(file, &run[0].0, run[0].1)];
    }
    let mut headers = vec![[0u8; HDR as usize]; run.len()];
    let mut datas: Vec<Vec<u8>> = run.iter().map(|(_, l)| vec![0u8; l.len as usize]).collect();
    let mut iov = Vec::with_capacity(run.len() * 2);
    for (h, d) in headers.iter_mut().zip(datas.iter_mut()) {
        iov.push(libc::iovec {
            iov_base: h.as_mut_ptr().cast(),
            iov_len: h.len(),
        });
        iov.push(libc::iovec {
            iov_base: d.as_mut_ptr().cast(),
            iov_len: d.len(),
        });
    }
    let want: usize = iov.iter().map(|v| v.iov_len).sum();
    // SAFETY: every iovec points into a live buffer of its stated length (at
    // most 2 * MAX_RUN_RECORDS of them, below IOV_MAX).
    let got = unsafe {
        libc::preadv(
            file.as_raw_fd(),
            iov.as_ptr(),
            iov.len() as i32,
            run[0].1.off as libc::off_t,
        )
    };
    if got < 0 || (got as usize) < want {
        return run.iter().map(|(id, loc)| read_record(file, id, *loc)).collect();
    }
    headers
        .iter()
        .zip(datas)
        .zip(run)
        .map(|((h, data), (id, loc))| check_record(h, Bytes::from(data), id, *loc))
        .collect()
}

/// [`read_run`] through `direct` (the segment opened with `O_DIRECT`): one
/// aligned read covering the records into a buffer from `pool` they are
/// then sliced from. A short or refused read falls back to `read_run` on
/// `file`; a refusal (`EINVAL`: no `O_DIRECT` here after all) clears
/// `enabled`.
fn read_run_direct(
    direct: &File,
    file: &File,
    run: &[(ChunkId, Loc)],
    enabled: &AtomicBool,
    pool: &Arc<BufPool>,
) -> Vec<Result<Bytes, Bad>> {
    let align = DIRECT_ALIGN as u64;
    let start = run[0].1.off as u64;
    let last = run[run.len() - 1].1;
    let end = last.off as u64 + HDR + last.len as u64;
    let from = start / align * align;
    let len = (end.div_ceil(align) * align - from) as usize;
    let mut buf = pool.take(len + DIRECT_ALIGN);
    let pad = buf.as_ptr().align_offset(DIRECT_ALIGN);
    assert!(pad + len <= buf.capacity(), "pool buffer too small");
    let got = loop {
        // SAFETY: `pad..pad + len` lies within the buffer's capacity (just
        // checked); the kernel writes at most `len` bytes there. The bytes
        // are only read back as far as the read filled them.
        let n = unsafe {
            libc::pread(
                direct.as_raw_fd(),
                buf.as_mut_ptr().add(pad).cast(),
                len,
                from as libc::off_t,
            )
        };
        if n >= 0 {
            break Ok(n as usize);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            break Err(e);
        }
    };
    let filled = match got {
        Ok(n) if n as u64 >= end - from => n,
        Ok(_) => {
            pool.give(buf);
            return read_run(file, run);
        }
        Err(e) => {
            pool.give(buf);
            if e.raw_os_error() == Some(libc::EINVAL) {
                tracing::debug!(
                    "the disk cache's filesystem refuses O_DIRECT reads; reading through the page cache"
                );
                enabled.store(false, Ordering::Relaxed);
            }
            return read_run(file, run);
        }
    };
    let buf = Bytes::from_owner(Pooled {
        buf,
        off: pad,
        len: filled,
        pool: pool.clone(),
    });
    run.iter()
        .map(|(id, loc)| {
            let h = (loc.off as u64 - from) as usize;
            let d = h + HDR as usize;
            check_record(&buf[h..d], buf.slice(d..d + loc.len as usize), id, *loc)
        })
        .collect()
}

/// Reads and verifies the record of `id` at `loc`.
fn read_record(file: &File, id: &ChunkId, loc: Loc) -> Result<Bytes, Bad> {
    let mut h = [0u8; HDR as usize];
    let mut data = vec![0u8; loc.len as usize];
    let mut iov = [
        libc::iovec {
            iov_base: h.as_mut_ptr().cast(),
            iov_len: h.len(),
        },
        libc::iovec {
            iov_base: data.as_mut_ptr().cast(),
            iov_len: data.len(),
        },
    ];
    let want = HDR as usize + data.len();
    // SAFETY: both buffers live for the call and are as long as their iovecs say.
    let got = unsafe { libc::preadv(file.as_raw_fd(), iov.as_mut_ptr(), 2, loc.off as libc::off_t) };
    if got < 0 {
        // An I/O error says nothing about the bytes: a miss, not a damaged record.
        tracing::warn!(
            segment = loc.seq,
            "cannot read the disk cache: {}",
            std::io::Error::last_os_error()
        );
        return Err(Bad::Dead);
    }
    if (got as usize) < want {
        return Err(Bad::Corrupt("record cut short".into()));
    }
    check_record(&h, Bytes::from(data), id, loc)
}

/// The record's bytes when its header is live and matches and its bytes hash to `id`.
fn check_record(h: &[u8], data: Bytes, id: &ChunkId, loc: Loc) -> Result<Bytes, Bad> {
    match parse_header(h) {
        Some((false, ..)) => Err(Bad::Dead),
        Some((true, hid, len)) if hid == *id && len == loc.len => {
            if ChunkId::of(&data) == *id {
                Ok(data)
            } else {
                Err(Bad::Corrupt("bytes do not match the chunk id".into()))
            }
        }
        _ => Err(Bad::Corrupt("bad record header".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(i: usize, len: usize) -> Vec<u8> {
        (0..len).map(|k| (k * 31 + i * 7 + k / 251) as u8).collect()
    }

    /// Records of sealed segments are read with O_DIRECT, at any offset and
    /// length (runs of adjacent records and single ones), and a damaged
    /// record is still caught and marked dead on that path.
    #[test]
    fn sealed_segments_are_read_directly_and_still_verified() {
        let tmp = tempfile::tempdir().unwrap();
        let stats = Stats::default();
        // Odd lengths: records start and end off any 4 KiB boundary.
        let datas: Vec<Vec<u8>> = (0..40).map(|i| chunk(i, 1 + i * 977)).collect();
        let ids: Vec<ChunkId> = datas.iter().map(|d| ChunkId::of(d)).collect();
        {
            let c = DiskCache::open(tmp.path(), 64 << 20).unwrap();
            let items: Vec<(ChunkId, &[u8])> = ids.iter().zip(&datas).map(|(id, d)| (*id, &d[..])).collect();
            c.put_many(&items, &stats).unwrap();
        } // dropped: the segment is sealed
        let c = DiskCache::open(tmp.path(), 64 << 20).unwrap();
        {
            let ix = c.index.lock().unwrap();
            assert!(!ix.segs.is_empty());
            assert!(
                ix.segs.values().all(|s| !s.open && s.direct.is_some()),
                "sealed segments get an O_DIRECT descriptor"
            );
        }
        // All at once (one run), every third one (single records), and one by one.
        let got = c.get_many(&ids, &stats);
        for (g, d) in got.iter().zip(&datas) {
            assert_eq!(g.as_deref(), Some(&d[..]));
        }
        let some: Vec<ChunkId> = ids.iter().step_by(3).copied().collect();
        for (g, d) in c.get_many(&some, &stats).iter().zip(datas.iter().step_by(3)) {
            assert_eq!(g.as_deref(), Some(&d[..]));
        }
        for (id, d) in ids.iter().zip(&datas) {
            assert_eq!(c.get(id, &stats).as_deref(), Some(&d[..]));
        }
        assert!(
            c.direct.load(Ordering::Relaxed),
            "the filesystem took the direct reads"
        );
        assert_eq!(stats.corrupt.load(Ordering::Relaxed), 0);
        // Flip a byte of record 20 through the page cache: the direct read sees it.
        let loc = c.index.lock().unwrap().map[&ids[20]];
        let path = c.dir.join(format!("{:016x}.seg", loc.seq));
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        let at = loc.off as u64 + HDR + 5;
        f.write_all_at(&[datas[20][5] ^ 0x40], at).unwrap();
        let got = c.get_many(&ids, &stats);
        assert!(got[20].is_none(), "the damaged record is not served");
        for (i, (g, d)) in got.iter().zip(&datas).enumerate().filter(|(i, _)| *i != 20) {
            assert_eq!(g.as_deref(), Some(&d[..]), "record {i}");
        }
        assert_eq!(stats.corrupt.load(Ordering::Relaxed), 1);
        // Marked dead on disk: a new process does not serve it or count it again.
        drop(c);
        let c = DiskCache::open(tmp.path(), 64 << 20).unwrap();
        assert!(c.get(&ids[20], &stats).is_none());
        assert_eq!(c.get(&ids[21], &stats).as_deref(), Some(&datas[21][..]));
        assert_eq!(stats.corrupt.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn direct_read_buffers_are_reused_once_their_chunks_are_dropped() {
        let tmp = tempfile::tempdir().unwrap();
        let stats = Stats::default();
        let datas: Vec<Vec<u8>> = (0..64).map(|i| chunk(i, 20_000 + i * 311)).collect();
        let ids: Vec<ChunkId> = datas.iter().map(|d| ChunkId::of(d)).collect();
        {
            let c = DiskCache::open(tmp.path(), 64 << 20).unwrap();
            let items: Vec<(ChunkId, &[u8])> = ids.iter().zip(&datas).map(|(id, d)| (*id, &d[..])).collect();
            c.put_many(&items, &stats).unwrap();
        }
        let c = DiskCache::open(tmp.path(), 64 << 20).unwrap();
        let idle = |c: &DiskCache| c.bufs.idle.lock().unwrap().len();
        let got = c.get_many(&ids, &stats);
        assert_eq!(idle(&c), 0, "the run's buffer is held by its chunks");
        // One chunk keeps the whole buffer: it goes back with the last one.
        let kept = got[7].clone().unwrap();
        drop(got);
        assert_eq!(idle(&c), 0);
        drop(kept);
        assert_eq!(idle(&c), 1, "the buffer is back in the pool");
        let ptr = c.bufs.idle.lock().unwrap()[0].as_ptr();
        // A shorter run reuses it; the earlier read's bytes beyond it are
        // not served (each record is verified and only what was read is
        // exposed).
        let half: Vec<ChunkId> = ids[32..].to_vec();
        let got = c.get_many(&half, &stats);
        assert_eq!(idle(&c), 0, "the pooled buffer was taken");
        for (g, d) in got.iter().zip(&datas[32..]) {
            let g = g.as_ref().unwrap();
            assert_eq!(&g[..], &d[..]);
            let p = g.as_ptr() as usize;
            assert!(
                p >= ptr as usize && p < ptr as usize + (2 << 20),
                "sliced from the reused buffer"
            );
        }
        drop(got);
        // Many buffers at once: what comes back is capped.
        let held: Vec<_> = (0..200).map(|i| c.get(&ids[i % 64], &stats).unwrap()).collect();
        drop(held);
        let pooled: usize = c.bufs.idle.lock().unwrap().iter().map(Vec::capacity).sum();
        assert!(pooled <= POOL_BYTES, "{pooled} idle bytes kept");
        assert_eq!(stats.corrupt.load(Ordering::Relaxed), 0);
    }
}
