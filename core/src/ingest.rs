//! The ingest pipeline: a directory becomes trees and a stream of chunks.
//!
//! 1. **Walk** the directory (walkdir, never following symlinks, so a symlink
//!    loop or a link pointing outside the root is stored as a link and cannot
//!    escape). Sockets, FIFOs and devices are skipped and reported.
//! 2. **Chunk and hash** files on a rayon pool (all cores by default). Files
//!    run in parallel; within a large file the stream is cut block by block
//!    (one block, 4 MiB by default, in memory per file being read) and the
//!    chunks of a block are hashed in parallel, so one huge file still uses
//!    every core.
//! 3. Each chunk seen for the **first time in this run** is handed to the
//!    [`ChunkSink`] from the worker thread, with its raw bytes borrowed: the
//!    sink frames, compresses, checks the cluster or writes it as it likes.
//! 4. After reading, the file is stat'ed again; a file whose size or mtime
//!    changed while it was read is an error ([`IngestError::FileChanged`]),
//!    never a silently torn chunk list.
//! 5. **Trees** are built bottom-up; every tree and spilled chunk list is
//!    returned, children before parents, ready to be stored by id.

use std::collections::{HashMap, HashSet};
use std::fs::{File, Metadata};
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rayon::prelude::*;

use crate::chunker::{Chunker, ChunkerConfig, ChunkerConfigError};
use crate::frame::CompressHint;
use crate::id::{ChunkId, TreeId};
use crate::tree::{file_content, ChunkRef, EntryData, Timestamp, Tree, TreeEntry, TreeError};

/// Errors a sink may return; they abort the ingest.
pub type SinkError = Box<dyn std::error::Error + Send + Sync>;

/// A chunk seen for the first time in an ingest.
pub struct NewChunk<'a> {
    /// BLAKE3 of `data`.
    pub id: ChunkId,
    /// The chunk's raw bytes, borrowed from the read buffer.
    pub data: &'a [u8],
    /// Shared by the chunks of the files of one directory; pass it to
    /// [`encode_frame_hinted`](crate::frame::encode_frame_hinted).
    pub hint: &'a CompressHint,
    /// The file the chunk was first seen in.
    pub path: &'a Path,
}

/// Receives each distinct chunk once, from worker threads.
pub trait ChunkSink: Sync {
    /// Called at most once per chunk id per ingest.
    fn chunk(&self, chunk: &NewChunk<'_>) -> Result<(), SinkError>;
}

/// A sink that drops every chunk (for computing trees only).
pub struct DiscardSink;

impl ChunkSink for DiscardSink {
    fn chunk(&self, _: &NewChunk<'_>) -> Result<(), SinkError> {
        Ok(())
    }
}

/// Progress callbacks, from worker threads. Both default to doing nothing.
pub trait Progress: Sync {
    /// `n` more bytes of file content were chunked and hashed.
    fn bytes(&self, _n: u64) {}
    /// A file was finished.
    fn file_done(&self, _path: &Path) {}
}

/// No progress reporting.
pub struct NoProgress;
impl Progress for NoProgress {}

/// Chunk lists of files seen before, so unchanged files need not be read.
///
/// `lookup` must answer only when it is sure the file is unchanged (same
/// size, mtime, ctime, inode and device as when its chunks were recorded).
pub trait FileCache: Send + Sync {
    fn lookup(&self, path: &Path, meta: &Metadata) -> Option<Vec<ChunkRef>>;

    /// Whether [`lookup`](Self::lookup) would answer, without building its answer.
    fn has(&self, path: &Path, meta: &Metadata) -> bool {
        self.lookup(path, meta).is_some()
    }
}

impl std::fmt::Debug for dyn FileCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FileCache")
    }
}

/// Worker threads of an ingest when none are asked for: two per core. A
/// worker waits on the disk for each file's first read (the kernel's
/// readahead starts only with it); the second thread keeps the core busy
/// chunking and hashing meanwhile. Measured on 2 cores, data read from disk:
/// 4 threads upload 7-18% faster than 2, and 8 no faster than 4.
pub fn default_threads() -> usize {
    2 * std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Tuning for [`ingest_dir`].
#[derive(Debug, Clone)]
pub struct IngestOptions {
    pub chunker: ChunkerConfig,
    /// Worker threads; 0 means [`default_threads`] (two per core).
    pub threads: usize,
    /// Bytes of a large file read and cut at a time (at least twice the maximum chunk size).
    pub block_size: usize,
    /// Files the cache vouches for are not read; their cached chunks are used.
    pub file_cache: Option<Arc<dyn FileCache>>,
    /// Return a [`FileRecord`] for every file (to refresh a file cache).
    pub record_files: bool,
}

impl Default for IngestOptions {
    fn default() -> Self {
        Self {
            chunker: ChunkerConfig::default(),
            threads: 0,
            block_size: 4 << 20,
            file_cache: None,
            record_files: false,
        }
    }
}

/// A file as ingested: what identifies this version of it, and its chunks.
#[derive(Debug, Clone)]
pub struct FileRecord {
    pub path: PathBuf,
    pub meta: Metadata,
    pub chunks: Vec<ChunkRef>,
    /// The chunks came from the file cache; the file was not read.
    pub cached: bool,
}

/// Counts describing one ingest.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IngestStats {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    /// Total file bytes.
    pub bytes: u64,
    /// Chunk references across all files.
    pub chunks: u64,
    /// Distinct chunks (each handed to the sink once).
    pub unique_chunks: u64,
    /// Bytes in distinct chunks.
    pub unique_bytes: u64,
    /// Files whose chunks came from the file cache without reading them.
    pub cached_files: u64,
}

/// Something not stored, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub path: PathBuf,
    pub reason: &'static str,
}

/// Everything an ingest produced.
#[derive(Debug, Clone)]
pub struct IngestOutput {
    /// Id of the root directory's tree.
    pub root: TreeId,
    /// Every tree object (trees and spilled chunk lists), distinct, children before parents.
    pub objects: Vec<(TreeId, Vec<u8>)>,
    pub stats: IngestStats,
    /// Entries that were skipped (special files).
    pub skipped: Vec<Skipped>,
    /// Every file, when [`IngestOptions::record_files`] is set.
    pub files: Vec<FileRecord>,
}

/// Why an ingest failed. Each message names the path and what to do.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("'{0}' is not a directory; upload takes a directory")]
    NotADirectory(PathBuf),
    #[error("cannot read '{path}': {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("'{path}' changed while it was being read; rerun when it is no longer being written")]
    FileChanged { path: PathBuf },
    #[error("cannot store a chunk of '{path}': {source}")]
    Sink {
        path: PathBuf,
        #[source]
        source: SinkError,
    },
    #[error("cannot store '{path}': {source}")]
    Tree {
        path: PathBuf,
        #[source]
        source: TreeError,
    },
    #[error(transparent)]
    Config(#[from] ChunkerConfigError),
    #[error("cannot start ingest threads: {0}")]
    ThreadPool(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> IngestError + '_ {
    move |source| IngestError::Io {
        path: path.to_path_buf(),
        source,
    }
}

struct DirNode {
    path: PathBuf,
    parent: Option<usize>,
    name: Vec<u8>,
    meta: Metadata,
    entries: Vec<TreeEntry>,
}

struct FileJob {
    path: PathBuf,
    dir: usize,
    meta: Metadata,
}

/// Chunk ids already handed to the sink, sharded to keep lock contention low.
struct SeenSet {
    shards: Vec<Mutex<HashSet<ChunkId>>>,
}

impl SeenSet {
    fn new() -> Self {
        Self {
            shards: (0..64).map(|_| Mutex::new(HashSet::new())).collect(),
        }
    }

    /// True if `id` was not seen before.
    fn insert(&self, id: ChunkId) -> bool {
        let shard = &self.shards[id.as_bytes()[0] as usize % 64];
        shard.lock().expect("seen-set lock poisoned").insert(id)
    }
}

/// Walks `root`, chunks and hashes every file, hands new chunks to `sink` and
/// returns the trees. See the module documentation for the stages.
pub fn ingest_dir(
    root: &Path,
    opts: &IngestOptions,
    sink: &dyn ChunkSink,
    progress: &dyn Progress,
) -> Result<IngestOutput, IngestError> {
    let chunker = Chunker::new(opts.chunker)?;
    let root_meta = std::fs::symlink_metadata(root).map_err(io_err(root))?;
    if !root_meta.is_dir() {
        return Err(IngestError::NotADirectory(root.to_path_buf()));
    }

    // 1. Walk.
    let mut dirs: Vec<DirNode> = Vec::new();
    let mut dir_index: HashMap<PathBuf, usize> = HashMap::new();
    let mut files: Vec<FileJob> = Vec::new();
    let mut skipped = Vec::new();
    let mut stats = IngestStats::default();
    for entry in walkdir::WalkDir::new(root)
        .follow_links(false)
        .sort_by_file_name()
    {
        let entry = entry.map_err(|e| {
            let path = e.path().unwrap_or(root).to_path_buf();
            let source = e
                .into_io_error()
                .unwrap_or_else(|| std::io::Error::other("filesystem loop"));
            IngestError::Io { path, source }
        })?;
        let path = entry.path().to_path_buf();
        let meta = entry.metadata().map_err(|e| IngestError::Io {
            path: path.clone(),
            source: e
                .into_io_error()
                .unwrap_or_else(|| std::io::Error::other("cannot stat")),
        })?;
        let parent = if entry.depth() == 0 {
            None
        } else {
            Some(dir_index[path.parent().expect("non-root entry has a parent")])
        };
        let name = entry.file_name().as_bytes().to_vec();
        let ft = meta.file_type();
        if ft.is_dir() {
            dir_index.insert(path.clone(), dirs.len());
            dirs.push(DirNode {
                path,
                parent,
                name,
                meta,
                entries: Vec::new(),
            });
        } else if ft.is_file() {
            files.push(FileJob {
                path,
                dir: parent.expect("root is a directory"),
                meta,
            });
        } else if ft.is_symlink() {
            let target = std::fs::read_link(&path).map_err(io_err(&path))?;
            let entry = TreeEntry {
                name,
                mode: meta.mode() & 0o7777,
                mtime: mtime(&meta),
                data: EntryData::Symlink {
                    target: target.as_os_str().as_bytes().to_vec(),
                },
            };
            dirs[parent.expect("root is a directory")].entries.push(entry);
            stats.symlinks += 1;
        } else {
            let reason = if ft.is_socket() {
                "socket"
            } else if ft.is_fifo() {
                "FIFO"
            } else {
                "device file"
            };
            skipped.push(Skipped { path, reason });
        }
    }

    // 2-4. Chunk and hash files in parallel.
    let threads = match opts.threads {
        0 => default_threads(),
        n => n,
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("granary-ingest-{i}"))
        .build()
        .map_err(|e| IngestError::ThreadPool(e.to_string()))?;
    let seen = SeenSet::new();
    let hints: Vec<CompressHint> = (0..dirs.len()).map(|_| CompressHint::new()).collect();
    let worker = FileWorker {
        hints: &hints,
        chunker,
        cache: opts.file_cache.as_deref(),
        block_size: opts.block_size,
        seen: &seen,
        sink,
        progress,
    };
    // Files are handed to the threads in walk order (`par_bridge` pulls from
    // one shared iterator), not in rayon's halves of the list: the chunks
    // then reach the packs in about path order, so a reader that walks the
    // version in order reads each pack front to back once.
    let mut indexed: Vec<(usize, FileResult)> = pool.install(|| {
        files
            .iter()
            .enumerate()
            .inspect(|(i, _)| {
                if let Some(ahead) = files.get(i + READ_AHEAD_FILES) {
                    worker.read_ahead(ahead);
                }
            })
            .par_bridge()
            .map(|(i, job)| worker.process(job).map(|r| (i, r)))
            .collect::<Result<_, _>>()
    })?;
    indexed.sort_unstable_by_key(|(i, _)| *i);
    let results: Vec<FileResult> = indexed.into_iter().map(|(_, r)| r).collect();

    // 5. Trees, bottom-up.
    let mut objects = Vec::new();
    let mut stored: HashSet<TreeId> = HashSet::new();
    let mut records = Vec::new();
    for (job, result) in files.iter().zip(results) {
        stats.files += 1;
        stats.cached_files += result.cached as u64;
        if opts.record_files {
            records.push(FileRecord {
                path: job.path.clone(),
                meta: job.meta.clone(),
                chunks: result.chunks.clone(),
                cached: result.cached,
            });
        }
        stats.bytes += result.size;
        stats.chunks += result.chunks.len() as u64;
        stats.unique_chunks += result.new_chunks;
        stats.unique_bytes += result.new_bytes;
        let (content, spilled) = file_content(result.chunks);
        if let Some((id, bytes)) = spilled {
            if stored.insert(id) {
                objects.push((id, bytes));
            }
        }
        dirs[job.dir].entries.push(TreeEntry {
            name: job.path.file_name().expect("file has a name").as_bytes().to_vec(),
            mode: job.meta.mode() & 0o7777,
            mtime: mtime(&job.meta),
            data: EntryData::File {
                size: result.size,
                content,
            },
        });
    }
    let mut root_id = None;
    // Walk order is pre-order, so reverse order visits children before parents.
    for i in (0..dirs.len()).rev() {
        let entries = std::mem::take(&mut dirs[i].entries);
        let tree = Tree::new(entries).map_err(|source| IngestError::Tree {
            path: dirs[i].path.clone(),
            source,
        })?;
        let bytes = tree.encode();
        let id = TreeId::of(&bytes);
        if stored.insert(id) {
            objects.push((id, bytes));
        }
        match dirs[i].parent {
            Some(p) => {
                let entry = TreeEntry {
                    name: std::mem::take(&mut dirs[i].name),
                    mode: dirs[i].meta.mode() & 0o7777,
                    mtime: mtime(&dirs[i].meta),
                    data: EntryData::Dir { tree: id },
                };
                dirs[p].entries.push(entry);
                stats.dirs += 1;
            }
            None => root_id = Some(id),
        }
    }
    Ok(IngestOutput {
        root: root_id.expect("the root directory is walked first"),
        objects,
        stats,
        skipped,
        files: records,
    })
}

fn mtime(meta: &Metadata) -> Timestamp {
    Timestamp {
        secs: meta.mtime(),
        nanos: meta.mtime_nsec() as u32,
    }
}

fn same_version(a: &Metadata, b: &Metadata) -> bool {
    a.len() == b.len() && a.mtime() == b.mtime() && a.mtime_nsec() == b.mtime_nsec() && a.ino() == b.ino()
}

struct FileResult {
    size: u64,
    chunks: Vec<ChunkRef>,
    new_chunks: u64,
    new_bytes: u64,
    cached: bool,
}

struct FileWorker<'a> {
    /// One per directory (indexed like `dirs`).
    hints: &'a [CompressHint],
    chunker: Chunker,
    cache: Option<&'a dyn FileCache>,
    block_size: usize,
    seen: &'a SeenSet,
    sink: &'a dyn ChunkSink,
    progress: &'a dyn Progress,
}

/// How many files ahead of the one a thread takes next the kernel is asked
/// to start reading ([`FileWorker::read_ahead`]).
const READ_AHEAD_FILES: usize = 8;

impl FileWorker<'_> {
    /// Asks the kernel to start reading the start of `job` (up to one
    /// block), unless the file cache will answer for it. A thread that then
    /// opens it finds its data on the way instead of waiting for the disk
    /// on its first read: with many small files that wait left the cores
    /// idle about a tenth of the time.
    fn read_ahead(&self, job: &FileJob) {
        if job.meta.len() == 0 || self.cache.is_some_and(|c| c.has(&job.path, &job.meta)) {
            return;
        }
        if let Ok(file) = File::open(&job.path) {
            use std::os::fd::AsRawFd;
            let len = job.meta.len().min(self.block_size as u64) as libc::off_t;
            // SAFETY: a plain syscall on an open descriptor; only a hint.
            unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, len, libc::POSIX_FADV_WILLNEED) };
        }
    }

    fn process(&self, job: &FileJob) -> Result<FileResult, IngestError> {
        let path = &job.path;
        if let Some(chunks) = self.cache.and_then(|c| c.lookup(path, &job.meta)) {
            if chunks.iter().map(|c| c.len as u64).sum::<u64>() == job.meta.len() {
                self.progress.bytes(job.meta.len());
                self.progress.file_done(path);
                return Ok(FileResult {
                    size: job.meta.len(),
                    chunks,
                    new_chunks: 0,
                    new_bytes: 0,
                    cached: true,
                });
            }
        }
        let mut file = File::open(path).map_err(io_err(path))?;
        let before = file.metadata().map_err(io_err(path))?;
        if !same_version(&before, &job.meta) {
            return Err(IngestError::FileChanged { path: path.clone() });
        }
        let hint = &self.hints[job.dir];
        let mut result = FileResult {
            size: 0,
            chunks: Vec::new(),
            new_chunks: 0,
            new_bytes: 0,
            cached: false,
        };
        if before.len() as usize <= self.block_size {
            // Small file: one read, one batch.
            let mut data = Vec::with_capacity(before.len() as usize + 1);
            file.read_to_end(&mut data).map_err(io_err(path))?;
            let ends = self.chunker.cuts(&data);
            self.batch(path, hint, &data, &ends, &mut result)?;
            result.size = data.len() as u64;
        } else {
            let mut reader = self.chunker.reader(&mut file, self.block_size);
            while let Some(batch) = reader.next_batch().map_err(io_err(path))? {
                self.batch(path, hint, batch.data(), batch.ends(), &mut result)?;
            }
            result.size = reader.bytes_read();
        }
        let after = file.metadata().map_err(io_err(path))?;
        if result.size != before.len() || !same_version(&before, &after) {
            return Err(IngestError::FileChanged { path: path.clone() });
        }
        self.progress.file_done(path);
        Ok(result)
    }

    /// Hashes the chunks of `data` (ending at `ends`) in parallel and hands new ones to the sink.
    fn batch(
        &self,
        path: &Path,
        hint: &CompressHint,
        data: &[u8],
        ends: &[usize],
        out: &mut FileResult,
    ) -> Result<(), IngestError> {
        let one = |i: usize| -> Result<(ChunkRef, bool), IngestError> {
            let start = if i == 0 { 0 } else { ends[i - 1] };
            let raw = &data[start..ends[i]];
            let id = ChunkId::of(raw);
            let new = self.seen.insert(id);
            if new {
                let chunk = NewChunk {
                    id,
                    data: raw,
                    hint,
                    path,
                };
                self.sink.chunk(&chunk).map_err(|source| IngestError::Sink {
                    path: path.to_path_buf(),
                    source,
                })?;
            }
            Ok((
                ChunkRef {
                    id,
                    len: raw.len() as u32,
                },
                new,
            ))
        };
        let refs: Vec<(ChunkRef, bool)> = if ends.len() >= 4 {
            (0..ends.len())
                .into_par_iter()
                .map(one)
                .collect::<Result<_, _>>()?
        } else {
            (0..ends.len()).map(one).collect::<Result<_, _>>()?
        };
        for (r, new) in refs {
            if new {
                out.new_chunks += 1;
                out.new_bytes += r.len as u64;
            }
            out.chunks.push(r);
        }
        self.progress.bytes(ends.last().copied().unwrap_or(0) as u64);
        Ok(())
    }
}
