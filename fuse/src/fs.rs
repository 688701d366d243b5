//! [`GranaryFs`]: the filesystem logic of a mount, without FUSE.
//!
//! Inodes are numbered by a hash of their path in the version (the root is
//! 1), so the same version gets the same numbers on every mount; a path whose
//! number is taken by another path (a 63-bit hash collision) probes the next
//! free number. Inodes are created on lookup and readdir and kept for the
//! life of the mount (a version is immutable, so nothing is ever stale).
//!
//! Reads map a byte range to the chunks it overlaps (binary search over the
//! chunk end offsets) and get them through the [`ChunkCache`]. Each open file
//! handle has a readahead state: a read that starts where the previous one
//! ended extends a sequential streak; from the second sequential read on, the
//! chunks after the read are prefetched in a window that doubles per read up
//! to a per-handle cap, in batches, and only while the prefetch bytes in
//! flight over the whole mount stay below a global cap. A read anywhere else
//! resets the window to zero, so random access prefetches nothing.
//!
//! The same idea works across files: datasets are mostly read a directory at
//! a time in name order (the 4 KiB-to-few-MiB files of an image or shard set),
//! where each file is too small for its own readahead to start and every file
//! would cost a fetch round trip. Each directory keeps a streak of first reads
//! of its files: a file whose position is near the last one read (within
//! [`SIBLING_NEAR`], since several readers work through a list at once) extends
//! it; from the third such file on, the files after it are prefetched whole, in
//! a window of bytes that doubles per file like a handle's, under the same
//! global cap. A read of a file far from the last resets the directory's
//! streak, so files read in random order prefetch nothing. A directory's
//! window may grow to the global cap; when it reaches past the directory's
//! last file, the pass goes on into the parent's next entries while they are
//! directories (`d00/` then `d01/`, as a walk in name order reads a dataset):
//! their first files are prefetched and their streak starts as if those files
//! were being read. Read through an object tier, a pack then no longer waits
//! for the one before it (a directory is often less than a pack).
//!
//! Every prefetch tells the [`Source`] it is one (`Want::Prefetch`); a chunk
//! server reading the pack from the object tier then fetches whole blocks
//! from its first call on, instead of the exact bytes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use granary_core::tree::{EntryData, FileContent, Timestamp};
use granary_core::{ChunkRef, EntryKind, TreeEntry, TreeId};
use tokio::sync::OnceCell;

use crate::cache::{Bytes, ChunkCache, Stats, Want};
use crate::error::FsError;
use crate::source::Source;

/// The root directory's inode number.
pub const ROOT_INO: u64 = 1;

/// Tunables of one mount.
#[derive(Debug, Clone)]
pub struct FsConfig {
    /// First readahead window of a sequential streak.
    pub readahead_initial: u64,
    /// Largest readahead window of one handle.
    pub readahead_max: u64,
    /// Prefetch bytes in flight over the whole mount, and the largest window
    /// of a directory's name-order pass. In flight means in memory outside
    /// the memory cache: `granary mount` takes this budget out of
    /// `--mem-cache` (at most a quarter of it), so the mount stays within it.
    pub readahead_global: u64,
    /// Largest batch of chunks one prefetch fetch asks for.
    pub prefetch_batch: u64,
    /// Owner reported for every inode.
    pub uid: u32,
    pub gid: u32,
}

impl Default for FsConfig {
    fn default() -> Self {
        Self {
            readahead_initial: 1 << 20,
            readahead_max: 64 << 20,
            readahead_global: 256 << 20,
            prefetch_batch: 4 << 20,
            uid: 0,
            gid: 0,
        }
    }
}

/// The three kinds of inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
    Symlink,
}

/// What `getattr` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub kind: Kind,
    pub size: u64,
    /// Permission bits (`mode & 0o7777`).
    pub perm: u16,
    pub mtime: Timestamp,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
}

/// A file's chunks and where each ends.
pub struct Layout {
    pub chunks: Vec<ChunkRef>,
    pub ends: Vec<u64>,
}

impl Layout {
    fn new(chunks: Vec<ChunkRef>) -> Self {
        let mut end = 0;
        let ends = chunks
            .iter()
            .map(|c| {
                end += c.len as u64;
                end
            })
            .collect();
        Self { chunks, ends }
    }

    pub fn size(&self) -> u64 {
        self.ends.last().copied().unwrap_or(0)
    }

    /// Indexes of the chunks overlapping `[from, to)`.
    pub fn span(&self, from: u64, to: u64) -> std::ops::Range<usize> {
        if from >= to {
            return 0..0;
        }
        let first = self.ends.partition_point(|&e| e <= from);
        let last = self.ends.partition_point(|&e| e < to);
        first..(last + 1).min(self.chunks.len())
    }

    /// Where chunk `i` starts.
    pub fn start(&self, i: usize) -> u64 {
        if i == 0 {
            0
        } else {
            self.ends[i - 1]
        }
    }
}

struct Inode {
    ino: u64,
    parent: u64,
    path: Vec<u8>,
    node: NodeData,
    layout: OnceCell<Arc<Layout>>,
}

enum NodeData {
    Root(TreeId, Timestamp),
    Entry(TreeEntry),
}

impl Inode {
    fn kind(&self) -> Kind {
        match &self.node {
            NodeData::Root(..) => Kind::Dir,
            NodeData::Entry(e) => match e.kind() {
                EntryKind::Dir => Kind::Dir,
                EntryKind::File => Kind::File,
                EntryKind::Symlink => Kind::Symlink,
            },
        }
    }

    fn dir_tree(&self) -> Option<TreeId> {
        match &self.node {
            NodeData::Root(t, _) => Some(*t),
            NodeData::Entry(TreeEntry {
                data: EntryData::Dir { tree },
                ..
            }) => Some(*tree),
            _ => None,
        }
    }
}

#[derive(Default)]
struct Readahead {
    /// Where a sequential read would start.
    next: u64,
    /// Consecutive sequential reads.
    streak: u32,
    window: u64,
    /// Prefetch has been issued up to here.
    issued_to: u64,
}

/// Files whose read state [`GranaryFs::read_inode`] keeps (then it starts over).
const INODE_HANDLES: usize = 4096;

/// Most chunks in one prefetch batch. A batch completes as a whole, so a
/// reader waiting for its first chunk waits for all of them; from the disk
/// cache (one file each) 4 MiB of 4 KiB chunks would be a thousand reads.
const PREFETCH_BATCH_CHUNKS: usize = 64;

/// Directories whose file-order readahead state is kept; when full, the
/// half touched longest ago is dropped (a pass there starts over).
const DIR_STATES: usize = 1024;

/// Makes room in `states` for `ino`: drops the half of the states touched
/// longest ago when full (clearing them all would restart every reader's
/// pass, the one deciding now included), then stamps `ino`'s as touched.
fn touch_dir_state(states: &mut HashMap<u64, DirReadahead>, ino: u64, tick: &mut u64) {
    if states.len() >= DIR_STATES && !states.contains_key(&ino) {
        let mut ticks: Vec<u64> = states.values().map(|s| s.touched).collect();
        let (_, &mut median, _) = ticks.select_nth_unstable(DIR_STATES / 2);
        states.retain(|_, s| s.touched > median);
    }
    *tick += 1;
    states.entry(ino).or_default().touched = *tick;
}

/// A first read of a file within this many positions of the directory's last
/// one counts as continuing a name-order pass.
const SIBLING_NEAR: usize = 8;
/// Sibling directories one read carries a name-order pass into, at most:
/// each costs a tree fetch the first time, and the read waits for them. The
/// next reads carry it further.
const DIRS_AHEAD_PER_READ: usize = 4;

/// Name-order reads of one directory's files (see the module docs).
#[derive(Default, Clone)]
struct DirReadahead {
    /// Position of the furthest file read in the current streak.
    last: usize,
    streak: u32,
    window: u64,
    /// Files before this position have been prefetched or read.
    issued_to: usize,
    /// Started by a pass over an earlier sibling (no read here yet):
    /// `issued_bytes` of its first files are prefetched.
    seeded: bool,
    issued_bytes: u64,
    /// Seeded over a pass that had finished here (an earlier epoch): the
    /// kernel may still cache these files, and reads it serves never reach
    /// the mount, so only `readahead_initial` bytes are prefetched until a
    /// read does.
    again: bool,
    /// When a read or a pass last came here (see [`touch_dir_state`]).
    touched: u64,
}

/// The directories' readahead states, and the clock that stamps them.
#[derive(Default)]
struct DirStates {
    states: HashMap<u64, DirReadahead>,
    tick: u64,
}

struct Handle {
    ino: u64,
    layout: Arc<Layout>,
    ra: Mutex<Readahead>,
}

/// One mounted version.
pub struct GranaryFs {
    source: Arc<dyn Source>,
    cache: Arc<ChunkCache>,
    stats: Arc<Stats>,
    cfg: FsConfig,
    inodes: RwLock<HashMap<u64, Arc<Inode>>>,
    /// (parent ino, name) -> ino.
    names: RwLock<HashMap<(u64, Vec<u8>), u64>>,
    handles: RwLock<HashMap<u64, Arc<Handle>>>,
    /// Handles of files read without an open (see [`GranaryFs::read_inode`]).
    inode_handles: Mutex<HashMap<u64, Arc<Handle>>>,
    /// File-order readahead per directory inode.
    dir_ra: Mutex<DirStates>,
    next_fh: AtomicU64,
    /// Prefetch bytes reserved and not yet landed (at most `cfg.readahead_global`).
    prefetch_inflight: Arc<AtomicU64>,
    /// The most `prefetch_inflight` has been (for tests).
    prefetch_peak: AtomicU64,
}

fn ino_of(path: &[u8]) -> u64 {
    let h = blake3::hash(path);
    let n = u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes")) >> 1;
    n.max(ROOT_INO + 1)
}

impl GranaryFs {
    pub fn new(source: Arc<dyn Source>, cache: Arc<ChunkCache>, cfg: FsConfig) -> Arc<Self> {
        let mtime_ms = source.root_mtime_ms();
        let root = Arc::new(Inode {
            ino: ROOT_INO,
            parent: ROOT_INO,
            path: Vec::new(),
            node: NodeData::Root(
                source.root(),
                Timestamp {
                    secs: (mtime_ms / 1000) as i64,
                    nanos: (mtime_ms % 1000) as u32 * 1_000_000,
                },
            ),
            layout: OnceCell::new(),
        });
        Arc::new(Self {
            source,
            cache,
            stats: Arc::default(),
            cfg,
            inodes: RwLock::new(HashMap::from([(ROOT_INO, root)])),
            names: RwLock::default(),
            handles: RwLock::default(),
            inode_handles: Mutex::default(),
            dir_ra: Mutex::default(),
            next_fh: AtomicU64::new(1),
            prefetch_inflight: Arc::default(),
            prefetch_peak: AtomicU64::new(0),
        })
    }

    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    pub fn cache(&self) -> &Arc<ChunkCache> {
        &self.cache
    }

    fn inode(&self, ino: u64) -> Result<Arc<Inode>, FsError> {
        self.inodes
            .read()
            .expect("inode table")
            .get(&ino)
            .cloned()
            .ok_or(FsError::NotFound)
    }

    /// The inode of `entry` inside directory `parent`, created on first use.
    fn child(&self, parent: &Inode, entry: &TreeEntry) -> Arc<Inode> {
        let key = (parent.ino, entry.name.clone());
        // The name table's read guard must be gone before the inode table is
        // locked: a creator below holds the inode table and waits for the
        // name table (found by a hang in a lookup storm, session 7).
        let known = self.names.read().expect("name table").get(&key).copied();
        if let Some(ino) = known {
            return self.inode(ino).expect("named inode exists");
        }
        let mut path = parent.path.clone();
        path.push(b'/');
        path.extend_from_slice(&entry.name);
        let mut inodes = self.inodes.write().expect("inode table");
        let mut names = self.names.write().expect("name table");
        if let Some(ino) = names.get(&key) {
            return inodes[ino].clone();
        }
        let mut ino = ino_of(&path);
        while inodes.contains_key(&ino) {
            ino = ino.wrapping_add(1).max(ROOT_INO + 1);
        }
        let inode = Arc::new(Inode {
            ino,
            parent: parent.ino,
            path,
            node: NodeData::Entry(entry.clone()),
            layout: OnceCell::new(),
        });
        inodes.insert(ino, inode.clone());
        names.insert(key, ino);
        inode
    }

    fn attr_of(&self, inode: &Inode) -> Attr {
        let (size, perm, mtime) = match &inode.node {
            NodeData::Root(_, t) => (0, 0o755, *t),
            NodeData::Entry(e) => (e.size(), (e.mode & 0o7777) as u16, e.mtime),
        };
        let kind = inode.kind();
        Attr {
            ino: inode.ino,
            kind,
            size,
            perm,
            mtime,
            nlink: if kind == Kind::Dir { 2 } else { 1 },
            uid: self.cfg.uid,
            gid: self.cfg.gid,
        }
    }

    pub async fn getattr(&self, ino: u64) -> Result<Attr, FsError> {
        Ok(self.attr_of(&*self.inode(ino)?))
    }

    pub async fn lookup(&self, parent: u64, name: &[u8]) -> Result<Attr, FsError> {
        let dir = self.inode(parent)?;
        let tree = self.source.tree(dir.dir_tree().ok_or(FsError::NotDir)?).await?;
        let entry = tree.get(name).ok_or(FsError::NotFound)?;
        Ok(self.attr_of(&self.child(&dir, entry)))
    }

    /// The entries of directory `ino` (without `.` and `..`), sorted by name.
    pub async fn readdir(&self, ino: u64) -> Result<Vec<(Vec<u8>, Attr)>, FsError> {
        self.readdir_page(ino, 0, usize::MAX).await
    }

    /// At most `max` entries of directory `ino` from entry number `start` on
    /// (a page of a listing: only these get inodes now, so listing a huge
    /// directory page by page stays linear).
    pub async fn readdir_page(
        &self,
        ino: u64,
        start: usize,
        max: usize,
    ) -> Result<Vec<(Vec<u8>, Attr)>, FsError> {
        let dir = self.inode(ino)?;
        let tree = self.source.tree(dir.dir_tree().ok_or(FsError::NotDir)?).await?;
        Ok(tree
            .entries()
            .iter()
            .skip(start)
            .take(max)
            .map(|e| (e.name.clone(), self.attr_of(&self.child(&dir, e))))
            .collect())
    }

    /// The parent of directory `ino` (the root is its own parent).
    pub fn parent_of(&self, ino: u64) -> u64 {
        self.inode(ino).map(|i| i.parent).unwrap_or(ROOT_INO)
    }

    pub async fn readlink(&self, ino: u64) -> Result<Vec<u8>, FsError> {
        match &self.inode(ino)?.node {
            NodeData::Entry(TreeEntry {
                data: EntryData::Symlink { target },
                ..
            }) => Ok(target.clone()),
            _ => Err(FsError::Invalid("not a symlink".into())),
        }
    }

    async fn layout(&self, inode: &Inode) -> Result<Arc<Layout>, FsError> {
        let NodeData::Entry(entry) = &inode.node else {
            return Err(FsError::IsDir);
        };
        match inode.kind() {
            Kind::File => {}
            Kind::Dir => return Err(FsError::IsDir),
            Kind::Symlink => return Err(FsError::Invalid("a symlink".into())),
        }
        inode
            .layout
            .get_or_try_init(|| async {
                let list = self.source.chunk_list(entry).await?;
                let layout = Layout::new(list);
                if layout.size() != entry.size() {
                    return Err(FsError::Remote(format!(
                        "chunk list of '{}' does not match its size",
                        String::from_utf8_lossy(&inode.path)
                    )));
                }
                Ok(Arc::new(layout))
            })
            .await
            .cloned()
    }

    /// Opens file `ino` and returns a handle. A file of at most one chunk is
    /// fetched whole here.
    pub async fn open(&self, ino: u64) -> Result<u64, FsError> {
        let inode = self.inode(ino)?;
        let layout = self.layout(&inode).await?;
        if layout.chunks.len() == 1 {
            self.cache
                .get_many(&self.source, &layout.chunks, Want::Read, &self.stats)
                .await?;
        }
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles.write().expect("handle table").insert(
            fh,
            Arc::new(Handle {
                ino,
                layout,
                ra: Mutex::default(),
            }),
        );
        Ok(fh)
    }

    pub fn release(&self, fh: u64) {
        self.handles.write().expect("handle table").remove(&fh);
    }

    /// Open handles (for tests).
    pub fn open_handles(&self) -> usize {
        self.handles.read().expect("handle table").len()
    }

    /// Reads up to `size` bytes at `offset` through handle `fh` (short at EOF).
    pub async fn read(&self, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>, FsError> {
        let h = self
            .handles
            .read()
            .expect("handle table")
            .get(&fh)
            .cloned()
            .ok_or_else(|| FsError::Invalid(format!("no open file handle {fh}")))?;
        self.read_handle(&h, offset, size).await
    }

    /// Reads file `ino` without an open handle: the kernel sends reads with
    /// handle 0 once `open` answered ENOSYS (zero-message opens: no OPEN or
    /// RELEASE round trip per file). The readahead state is then per inode,
    /// kept for the most recently read files.
    pub async fn read_inode(&self, ino: u64, offset: u64, size: u32) -> Result<Vec<u8>, FsError> {
        let cached = self
            .inode_handles
            .lock()
            .expect("inode handles")
            .get(&ino)
            .cloned();
        let h = match cached {
            Some(h) => h,
            None => {
                let inode = self.inode(ino)?;
                let h = Arc::new(Handle {
                    ino,
                    layout: self.layout(&inode).await?,
                    ra: Mutex::default(),
                });
                let mut map = self.inode_handles.lock().expect("inode handles");
                if map.len() >= INODE_HANDLES {
                    map.clear();
                }
                map.entry(ino).or_insert(h).clone()
            }
        };
        self.read_handle(&h, offset, size).await
    }

    async fn read_handle(&self, h: &Arc<Handle>, offset: u64, size: u32) -> Result<Vec<u8>, FsError> {
        let h = h.clone();
        let file_size = h.layout.size();
        let end = offset.saturating_add(size as u64).min(file_size);
        self.stats.reads.fetch_add(1, Ordering::Relaxed);
        if offset >= end {
            return Ok(Vec::new());
        }
        if offset == 0 {
            self.sibling_readahead(h.ino).await;
        }
        self.readahead(&h, offset, end);
        let span = h.layout.span(offset, end);
        let first = span.start;
        let chunks = self
            .cache
            .get_many(&self.source, &h.layout.chunks[span], Want::Read, &self.stats)
            .await?;
        let out = assemble(&h.layout, first, &chunks, offset, end);
        // Chunks this read took to their end are done with (the straddling
        // last one waits for the next read).
        let done = (first..first + chunks.len()).take_while(|&i| h.layout.ends[i] <= end);
        self.cache.consumed(done.map(|i| h.layout.chunks[i].id));
        self.stats
            .bytes_read
            .fetch_add(out.len() as u64, Ordering::Relaxed);
        Ok(out)
    }

    /// Updates the handle's readahead state for a read of `[offset, end)` and
    /// starts prefetching when the read continues a sequential streak.
    fn readahead(&self, h: &Handle, offset: u64, end: u64) {
        let layout = &h.layout;
        let chunks = {
            let mut ra = h.ra.lock().expect("readahead state");
            if offset == ra.next {
                ra.streak += 1;
            } else {
                *ra = Readahead::default();
            }
            ra.next = end;
            if ra.streak < 2 {
                return;
            }
            ra.window = if ra.window == 0 {
                self.cfg.readahead_initial
            } else {
                (ra.window * 2).min(self.cfg.readahead_max.min(self.cfg.readahead_global))
            };
            let to = end.saturating_add(ra.window).min(layout.size());
            let from = ra.issued_to.max(end);
            // Issue in steps of at least half a window so every read does not start a tiny fetch.
            if to <= from || (to - from < ra.window / 2 && to < layout.size()) {
                return;
            }
            let span = layout.span(from, to);
            // Skip chunks the current read already asks for.
            let first = span.start.max(layout.span(offset, end).end);
            let chunks = &layout.chunks[first..span.end];
            // As much of the window as the budget has free, if that is at
            // least half of it: the rest is issued by a later read, when
            // other prefetches have landed.
            let (n, bytes) = self.reserve_prefix(chunks.len(), |i| chunks[i].len as u64, u64::MAX);
            if n == 0 {
                return;
            }
            if n < chunks.len() && bytes < ra.window / 2 {
                release(&self.prefetch_inflight, bytes);
                return;
            }
            ra.issued_to = if n == chunks.len() {
                to
            } else {
                layout.ends[first + n - 1]
            };
            &chunks[..n]
        };
        let mut batches = self.batches();
        for &c in chunks {
            batches.push(c);
        }
        batches.flush();
    }

    /// Reserves the budget for the first files of `entries` until their
    /// sizes reach `want` (the last may pass it) or the budget is spent,
    /// whichever comes first: how many files and their bytes. A pass whose
    /// window is the whole budget thus goes on with what is free, instead
    /// of waiting for every byte in flight to land.
    fn reserve_files(&self, entries: &[TreeEntry], want: u64) -> (usize, u64) {
        self.reserve_prefix(entries.len(), |i| entries[i].size(), want)
    }

    /// Reserves the budget for the first of `count` items (`size(i)` bytes
    /// each) until their sizes reach `want` (the last may pass it) or the
    /// next would not fit: how many items and their bytes.
    fn reserve_prefix(&self, count: usize, size: impl Fn(usize) -> u64, want: u64) -> (usize, u64) {
        let cap = self.cfg.readahead_global;
        let mut took = (0, 0);
        let reserved = self
            .prefetch_inflight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
                let free = cap.saturating_sub(cur);
                let (mut n, mut sum) = (0, 0u64);
                while n < count && sum < want && sum + size(n) <= free {
                    sum += size(n);
                    n += 1;
                }
                took = (n, sum);
                (n > 0).then_some(cur + sum)
            });
        match reserved {
            Ok(before) => {
                self.prefetch_peak.fetch_max(before + took.1, Ordering::Relaxed);
                took
            }
            Err(_) => (0, 0),
        }
    }

    /// Updates the file-order readahead of the directory holding `ino` for a
    /// first read of that file, and prefetches the files after it when the
    /// directory is being read in name order (see the module docs).
    async fn sibling_readahead(&self, ino: u64) {
        let Ok(inode) = self.inode(ino) else { return };
        let Ok(dir) = self.inode(inode.parent) else { return };
        let Some(tree_id) = dir.dir_tree() else { return };
        let Ok(tree) = self.source.tree(tree_id).await else {
            return;
        };
        let name = inode.path.rsplit(|&b| b == b'/').next().unwrap_or(&[]);
        let entries = tree.entries();
        let Ok(pos) = entries.binary_search_by(|e| e.name.as_slice().cmp(name)) else {
            return;
        };
        let (issue, next) = {
            let mut guard = self.dir_ra.lock().expect("directory readahead");
            let DirStates { states, tick } = &mut *guard;
            touch_dir_state(states, dir.ino, tick);
            let ra = states.get_mut(&dir.ino).expect("just touched");
            if ra.streak > 0 && pos + SIBLING_NEAR >= ra.last && pos <= ra.last + SIBLING_NEAR {
                ra.streak += 1;
                ra.last = ra.last.max(pos);
                ra.seeded = false;
                ra.again = false;
            } else {
                *ra = DirReadahead {
                    last: pos,
                    streak: 1,
                    window: 0,
                    issued_to: pos + 1,
                    seeded: false,
                    issued_bytes: 0,
                    again: false,
                    touched: ra.touched,
                };
            }
            if ra.streak < 3 {
                return;
            }
            ra.window = if ra.window == 0 {
                self.cfg.readahead_initial
            } else {
                (ra.window * 2).min(self.cfg.readahead_global)
            };
            // The files after `last`, until their bytes fill the window; in
            // steps of at least half a window, so that every file read does
            // not start a fetch of one more file.
            let from = ra.issued_to.max(ra.last + 1).min(entries.len());
            let ahead: u64 = entries[ra.last + 1..from].iter().map(|e| e.size()).sum();
            if ahead >= ra.window / 2 {
                return;
            }
            let issue = if from == entries.len() {
                None
            } else {
                match self.reserve_files(&entries[from..], ra.window - ahead) {
                    (0, _) => return, // the budget is spent: the next read tries again
                    (n, bytes) => {
                        ra.issued_to = from + n;
                        Some((from, from + n, bytes))
                    }
                }
            };
            let (to, bytes) = issue.map_or((from, 0), |(_, to, bytes)| (to, bytes));
            // The window reaches past the directory's last file: the pass
            // goes on into the next directories.
            let next = (to == entries.len() && ahead + bytes < ra.window)
                .then(|| (ra.window - ahead - bytes, ra.window));
            (issue, next)
        };
        if let Some((from, to, reserved)) = issue {
            self.prefetch_files(&entries[from..to], reserved);
        }
        if let Some((bytes, window)) = next {
            self.continue_into_next_dir(&dir, bytes, window).await;
        }
    }

    /// Carries a name-order pass over directory `dir` into the parent's next
    /// entries while they are directories (`d00/` then `d01/`, as a walk in
    /// name order reads a dataset), so that `bytes` beyond `dir` are
    /// prefetched: counts what earlier calls prefetched there, prefetches
    /// the files after that, and starts each directory's readahead state as
    /// if those files were being read, so the pass's first reads there
    /// continue the streak (with its `window`). Stops at a directory that
    /// readers are in already (a pass that finished there earlier, as in the
    /// previous epoch of a training loop, does not count), and after
    /// [`DIRS_AHEAD_PER_READ`] directories.
    async fn continue_into_next_dir(&self, dir: &Inode, mut bytes: u64, window: u64) {
        let Ok(parent) = self.inode(dir.parent) else {
            return;
        };
        if parent.ino == dir.ino {
            return; // the root
        }
        let Some(tree_id) = parent.dir_tree() else { return };
        let Ok(siblings) = self.source.tree(tree_id).await else {
            return;
        };
        let siblings = siblings.entries();
        let name = dir.path.rsplit(|&b| b == b'/').next().unwrap_or(&[]);
        let Ok(mut pos) = siblings.binary_search_by(|e| e.name.as_slice().cmp(name)) else {
            return;
        };
        for _ in 0..DIRS_AHEAD_PER_READ {
            if bytes == 0 {
                return;
            }
            pos += 1;
            let Some(next) = siblings.get(pos) else { return };
            let EntryData::Dir { tree } = &next.data else {
                return;
            };
            let Ok(tree) = self.source.tree(*tree).await else {
                return;
            };
            let next_dir = self.child(&parent, next);
            let entries = tree.entries();
            let (from, to, reserved, again) = {
                let mut guard = self.dir_ra.lock().expect("directory readahead");
                let DirStates { states, tick } = &mut *guard;
                let fresh = !states.contains_key(&next_dir.ino);
                touch_dir_state(states, next_dir.ino, tick);
                let seed = DirReadahead {
                    last: 0,
                    // The pass's first read here makes it 3: prefetching goes on.
                    streak: 2,
                    // Doubled back to `window` by that read.
                    window: (window / 2).max(self.cfg.readahead_initial),
                    issued_to: 0,
                    seeded: true,
                    issued_bytes: 0,
                    again: false,
                    touched: 0,
                };
                let ra = states.get_mut(&next_dir.ino).expect("just touched");
                let touched = ra.touched;
                let finished = ra.last + 1 >= entries.len() && ra.issued_to >= entries.len();
                if fresh {
                    *ra = DirReadahead { touched, ..seed };
                } else if !ra.seeded && finished {
                    *ra = DirReadahead {
                        again: true,
                        touched,
                        ..seed
                    };
                }
                if !ra.seeded || ra.issued_bytes >= bytes {
                    return;
                }
                ra.window = ra.window.max((window / 2).max(self.cfg.readahead_initial));
                bytes -= ra.issued_bytes;
                // A later epoch: a little until a read shows the kernel does
                // not have these files (a pass over cached pages found the
                // mount prefetching whole windows nobody read, at a third of
                // the page cache's speed), and no further.
                let here = if ra.again {
                    bytes.min(self.cfg.readahead_initial.saturating_sub(ra.issued_bytes))
                } else {
                    bytes
                };
                if here == 0 {
                    return;
                }
                let from = ra.issued_to.min(entries.len());
                let (n, sum) = self.reserve_files(&entries[from..], here);
                if n == 0 && from < entries.len() {
                    return; // the budget is spent
                }
                let to = from + n;
                ra.issued_to = to;
                ra.issued_bytes += sum;
                (from, to, sum, ra.again)
            };
            self.prefetch_files(&entries[from..to], reserved);
            bytes = bytes.saturating_sub(reserved);
            if again || to < entries.len() {
                return;
            }
        }
    }

    /// Prefetches the files among `entries` whole, in the background;
    /// `reserved` bytes of the budget were reserved for them.
    ///
    /// Files whose chunk list is in their entry are registered with the
    /// cache before this returns, so a read that comes next joins their
    /// fetch (a task started here may run only after the reader has moved
    /// on: reads served from memory outpace a thread's wake-up); spilled
    /// lists are fetched first, in the task.
    fn prefetch_files(&self, entries: &[TreeEntry], reserved: u64) {
        let mut batches = self.batches();
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            batches.give_back(reserved);
            return;
        };
        let mut spilled: Vec<TreeEntry> = Vec::new();
        for e in entries
            .iter()
            .filter(|e| e.kind() == EntryKind::File && e.size() > 0)
        {
            match &e.data {
                EntryData::File {
                    content: FileContent::Inline(list),
                    ..
                } => list.iter().for_each(|c| batches.push(*c)),
                _ => spilled.push(e.clone()),
            }
        }
        if spilled.is_empty() {
            batches.flush();
            batches.give_back(reserved.saturating_sub(batches.pushed));
            return;
        }
        let source = self.source.clone();
        rt.spawn(async move {
            for entry in &spilled {
                // One fetch per spilled list (the source caches lists).
                let Ok(list) = source.chunk_list(entry).await else {
                    continue;
                };
                list.into_iter().for_each(|c| batches.push(c));
            }
            batches.flush();
            // What was reserved for entries that pushed nothing (symlinks, failed lists).
            batches.give_back(reserved.saturating_sub(batches.pushed));
        });
    }

    /// An empty set of prefetch batches for this mount.
    fn batches(&self) -> Batches {
        Batches {
            prefetcher: Prefetcher {
                cache: self.cache.clone(),
                source: self.source.clone(),
                stats: self.stats.clone(),
                inflight: self.prefetch_inflight.clone(),
            },
            max_bytes: self.cfg.prefetch_batch,
            batch: Vec::new(),
            bytes: 0,
            pushed: 0,
        }
    }

    /// Prefetch bytes in flight now (for tests).
    pub fn prefetch_inflight(&self) -> u64 {
        self.prefetch_inflight.load(Ordering::Relaxed)
    }

    /// The most prefetch bytes that were ever in flight at once (for tests).
    pub fn prefetch_peak(&self) -> u64 {
        self.prefetch_peak.load(Ordering::Relaxed)
    }

    /// Every chunk of the file at inode `ino` (for `granary prefetch`).
    pub async fn chunks_of(&self, ino: u64) -> Result<Vec<ChunkRef>, FsError> {
        Ok(self.layout(&*self.inode(ino)?).await?.chunks.clone())
    }
}

/// Chunks to prefetch, cut into batches of at most `max_bytes` and
/// [`PREFETCH_BATCH_CHUNKS`] as they are pushed; each batch is fetched in the
/// background. The caller has reserved the bytes it pushes
/// ([`GranaryFs::reserve_prefix`]: a prefetch reserves before it is
/// issued, so readers deciding at the same moment cannot pass the budget
/// together); each batch gives its share back when
/// it lands.
struct Batches {
    prefetcher: Prefetcher,
    max_bytes: u64,
    batch: Vec<ChunkRef>,
    bytes: u64,
    /// Bytes pushed so far.
    pushed: u64,
}

impl Batches {
    fn push(&mut self, c: ChunkRef) {
        self.batch.push(c);
        self.bytes += c.len as u64;
        self.pushed += c.len as u64;
        if self.bytes >= self.max_bytes || self.batch.len() >= PREFETCH_BATCH_CHUNKS {
            self.flush();
        }
    }

    /// Starts the batch gathered so far, if any.
    fn flush(&mut self) {
        if !self.batch.is_empty() {
            self.prefetcher
                .spawn(std::mem::take(&mut self.batch), std::mem::take(&mut self.bytes));
        }
    }

    /// Returns reserved bytes that no batch will carry.
    fn give_back(&self, bytes: u64) {
        release(&self.prefetcher.inflight, bytes);
    }
}

/// What a background prefetch needs, apart from the filesystem.
#[derive(Clone)]
struct Prefetcher {
    cache: Arc<ChunkCache>,
    source: Arc<dyn Source>,
    stats: Arc<Stats>,
    inflight: Arc<AtomicU64>,
}

impl Prefetcher {
    /// Starts fetching `chunks` (`bytes` in all, reserved by the caller)
    /// into the cache in the background; gives the bytes back when done.
    fn spawn(&self, chunks: Vec<ChunkRef>, bytes: u64) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            release(&self.inflight, bytes);
            return;
        };
        let this = self.clone();
        // Registered now, so the next read joins these fetches.
        let slots = this
            .cache
            .start(&this.source, &chunks, Want::Prefetch, &this.stats);
        rt.spawn(async move {
            for slot in slots {
                if let Err(e) = slot.get().await {
                    tracing::debug!("prefetch failed (a read will retry): {e}");
                    break;
                }
            }
            release(&this.inflight, bytes);
        });
    }
}

/// Gives `bytes` of prefetch budget back (saturating: a tree whose chunk
/// lists disagree with its sizes must not wrap the counter).
fn release(inflight: &AtomicU64, bytes: u64) {
    let _ = inflight.fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
        Some(cur.saturating_sub(bytes))
    });
}

/// Copies `[offset, end)` out of chunks `first..` of `layout`.
fn assemble(layout: &Layout, first: usize, chunks: &[Bytes], offset: u64, end: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity((end - offset) as usize);
    for (k, data) in chunks.iter().enumerate() {
        let start = layout.start(first + k);
        let from = offset.saturating_sub(start) as usize;
        let to = ((end - start) as usize).min(data.len());
        out.extend_from_slice(&data[from..to]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use granary_core::ChunkId;

    #[test]
    fn a_full_table_of_directory_states_drops_the_oldest_half() {
        let (mut states, mut tick) = (HashMap::new(), 0);
        for ino in 0..DIR_STATES as u64 {
            touch_dir_state(&mut states, ino, &mut tick);
        }
        // Directory 0 is being read still: its state is touched again.
        states.get_mut(&0).unwrap().streak = 7;
        touch_dir_state(&mut states, 0, &mut tick);
        assert_eq!(states.len(), DIR_STATES, "touching a known one makes no room");
        touch_dir_state(&mut states, 5000, &mut tick);
        assert!(states.len() <= DIR_STATES / 2 + 1, "{}", states.len());
        assert_eq!(states[&0].streak, 7, "the directory being read keeps its pass");
        assert!(states.contains_key(&5000) && states.contains_key(&(DIR_STATES as u64 - 1)));
        assert!(!states.contains_key(&1), "the oldest went");
    }

    #[test]
    fn span_maps_byte_ranges_to_chunks() {
        let c = |n: u32| ChunkRef {
            id: ChunkId::of(&n.to_le_bytes()),
            len: n,
        };
        let l = Layout::new(vec![c(10), c(5), c(20)]); // [0,10) [10,15) [15,35)
        assert_eq!(l.size(), 35);
        assert_eq!(l.span(0, 1), 0..1);
        assert_eq!(l.span(9, 11), 0..2);
        assert_eq!(l.span(10, 15), 1..2);
        assert_eq!(l.span(14, 16), 1..3);
        assert_eq!(l.span(0, 35), 0..3);
        assert_eq!(l.span(34, 100), 2..3);
        assert_eq!(l.span(5, 5), 0..0);
        assert_eq!((l.start(0), l.start(1), l.start(2)), (0, 10, 15));
        assert_eq!(Layout::new(vec![]).span(0, 10), 0..0);
    }

    /// A streaming reader whose next step is larger than what the budget
    /// has free (other readers hold the rest) still prefetches the part
    /// that fits when it is at least half its window. All or nothing, its
    /// steps (half a window plus the reads since) never fit again and it
    /// stopped prefetching for good.
    #[test]
    fn sequential_readahead_takes_the_part_of_a_step_the_budget_has_room_for() {
        use crate::source::MemSource;
        use granary_core::tree::file_content;
        use granary_core::Tree;

        let (len, chunk) = (8usize << 20, 16usize << 10);
        let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 4099) as u8).collect();
        let mut src = MemSource::default();
        let chunks: Vec<_> = data.chunks(chunk).map(|c| src.add_chunk(c)).collect();
        let (content, spilled) = file_content(chunks.clone());
        if let Some((id, _)) = spilled {
            src.lists.insert(id, chunks);
        }
        let entry = TreeEntry {
            name: b"f".to_vec(),
            mode: 0o644,
            mtime: Timestamp::default(),
            data: EntryData::File {
                size: len as u64,
                content,
            },
        };
        src.root = src.add_tree(Tree::new(vec![entry]).unwrap());
        let cfg = FsConfig {
            readahead_initial: 64 << 10,
            readahead_max: 1 << 20,
            readahead_global: 2 << 20,
            prefetch_batch: 128 << 10,
            ..FsConfig::default()
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let src: Arc<dyn Source> = Arc::new(src);
            let fs = GranaryFs::new(src, ChunkCache::new(64 << 20, None), cfg);
            // Other readers' prefetches hold 1.4 MiB of the 2 MiB budget:
            // 0.6 MiB is free, less than a step at the full 1 MiB window
            // (0.5 MiB + a 256 KiB read at least) and more than half of it.
            let held = 1_400 << 10;
            fs.prefetch_inflight.fetch_add(held, Ordering::AcqRel);
            let ino = fs.lookup(ROOT_INO, b"f").await.unwrap().ino;
            let fh = fs.open(ino).await.unwrap();
            let mut pos = 0;
            while pos < len {
                let got = fs.read(fh, pos as u64, 256 << 10).await.unwrap();
                assert_eq!(got, &data[pos..pos + got.len()]);
                pos += got.len();
                // Let the batches issued so far land and give their bytes back.
                for _ in 0..200 {
                    if fs.prefetch_inflight() == held {
                        break;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                }
            }
            let s = fs.stats().snapshot();
            // All or nothing prefetched the first ~1.5 MiB (92 of 512
            // chunks) and then nothing; taking what fits prefetches most of
            // the 8 MiB.
            assert!(
                s.prefetched_chunks > 300,
                "readahead stopped when its steps no longer fit whole: {s:?}"
            );
            assert!(
                fs.prefetch_peak() <= 2 << 20,
                "budget passed: {}",
                fs.prefetch_peak()
            );
            assert_eq!(fs.prefetch_inflight(), held, "every reservation is given back");
        });
    }

    #[test]
    fn inode_numbers_are_a_function_of_the_path() {
        assert_eq!(ino_of(b"/a/b"), ino_of(b"/a/b"));
        assert_ne!(ino_of(b"/a/b"), ino_of(b"/a/c"));
        assert!(ino_of(b"/x") > ROOT_INO && ino_of(b"/x") < 1 << 63);
    }
}
