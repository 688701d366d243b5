//! Uploading a directory as a new dataset version.
//!
//! ```text
//!  rayon pool (2 per core)                    async uploader
//!  walk -> FastCDC -> BLAKE3 -> lz4 frame --> [bounded channel] --> batch `has` (<= 256 ids)
//!                                                                 -> missing frames -> pack stream
//!                                                                    (1 MiB messages, 2 packs in flight)
//!  trees (children first) --------------------------------------> PutTrees -> CommitVersion
//! ```
//!
//! Files the local file cache vouches for (same size, mtime, ctime, inode)
//! are not read at all. Only chunks the cluster lacks travel. Memory is bounded by the channel
//! (256 frames), one read block per file being chunked and the messages in
//! flight, never by file or dataset size. A version is committed only after
//! every pack is on every replica's disk and registered, and every tree is
//! stored (meta refuses trees that reference anything missing), so an upload
//! killed at any point leaves no version behind, and rerunning it sends only
//! what was not yet registered.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use granary_core::frame::encode_frame_hinted;
use granary_core::ingest::{
    ingest_dir, ChunkSink, IngestOptions, IngestStats, NewChunk, Progress, SinkError, Skipped,
};
use granary_core::{validate_dataset_name, ChunkId, ChunkerConfig, TreeId};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::chunk_proto::WritePackReply;
use crate::chunks::ChunkServers;
use crate::error::ClientError;
use crate::file_cache::LocalFileCache;
use crate::meta::MetaClient;
use crate::pack_stream::PackStream;
use crate::proto::{CommitRequest, Version, VersionStats};

/// How to upload.
#[derive(Debug, Clone)]
pub struct UploadOptions {
    /// Describes the version.
    pub message: String,
    /// Commit even if another version was committed since the upload started.
    pub force: bool,
    /// Chunking threads; 0 means two per core
    /// ([`granary_core::ingest::default_threads`]).
    pub threads: usize,
    /// Seal a pack once it holds this many bytes.
    pub pack_size: u64,
    /// Packs being sent at the same time.
    pub parallel_packs: usize,
    pub chunker: ChunkerConfig,
    /// Skip reading files the local file cache vouches for (see [`crate::file_cache`]).
    pub use_file_cache: bool,
}

impl Default for UploadOptions {
    fn default() -> Self {
        Self {
            message: String::new(),
            force: false,
            threads: 0,
            pack_size: granary_core::pack::DEFAULT_PACK_TARGET,
            parallel_packs: 2,
            chunker: ChunkerConfig::default(),
            use_file_cache: true,
        }
    }
}

/// Progress callbacks (from several threads). All default to nothing.
pub trait UploadProgress: Send + Sync {
    /// File bytes chunked and hashed.
    fn scanned(&self, _bytes: u64) {}
    /// A file finished chunking.
    fn file_done(&self) {}
    /// Frame bytes sent to chunk servers (new data only).
    fn sent(&self, _bytes: u64) {}
    /// Chunk bytes found already stored in the cluster.
    fn deduplicated(&self, _bytes: u64) {}
}

/// No progress reporting.
pub struct NoProgress;
impl UploadProgress for NoProgress {}

/// What an upload did.
#[derive(Debug, Clone)]
pub struct UploadReport {
    pub version: Version,
    pub stats: IngestStats,
    /// Chunks that were not yet stored and were sent.
    pub new_chunks: u64,
    /// Raw bytes of those chunks.
    pub new_bytes: u64,
    /// Bytes sent to chunk servers (frames, after compression).
    pub sent_bytes: u64,
    /// Of `sent_bytes`, those written straight into a chunk server on this
    /// host (see [`crate::pack_stream`]).
    pub local_bytes: u64,
    pub packs: u64,
    pub skipped: Vec<Skipped>,
}

impl UploadReport {
    /// Logical bytes per byte of new data (infinite when nothing was new).
    pub fn dedup_ratio(&self) -> f64 {
        if self.new_bytes == 0 {
            f64::INFINITY
        } else {
            self.stats.bytes as f64 / self.new_bytes as f64
        }
    }
}

struct Framed {
    id: ChunkId,
    raw_len: u32,
    frame: Vec<u8>,
}

struct Sink {
    tx: mpsc::Sender<Framed>,
}

impl ChunkSink for Sink {
    fn chunk(&self, c: &NewChunk<'_>) -> Result<(), SinkError> {
        let mut frame = Vec::with_capacity(c.data.len() + granary_core::frame::FRAME_HEADER_LEN);
        encode_frame_hinted(&c.id, c.data, c.hint, &mut frame);
        self.tx
            .blocking_send(Framed {
                id: c.id,
                raw_len: c.data.len() as u32,
                frame,
            })
            .map_err(|_| "the upload stopped".into())
    }
}

struct ProgressAdapter(Arc<dyn UploadProgress>);

impl Progress for ProgressAdapter {
    fn bytes(&self, n: u64) {
        self.0.scanned(n)
    }

    fn file_done(&self, _path: &Path) {
        self.0.file_done()
    }
}

/// Uploads `dir` as the next version of `dataset`. If garbage collection
/// removed a chunk this upload counted on (found present, then swept before
/// the trees were stored), the upload runs once more: that time the chunk
/// is sent.
pub async fn upload_dir(
    meta: &MetaClient,
    chunks: &ChunkServers,
    dir: &Path,
    dataset: &str,
    opts: &UploadOptions,
    progress: Arc<dyn UploadProgress>,
) -> Result<UploadReport, ClientError> {
    match upload_once(meta, chunks, dir, dataset, opts, progress.clone()).await {
        Err(e) if lost_to_gc(&e) => {
            tracing::info!("a chunk was garbage-collected during the upload; uploading again: {e}");
            upload_once(meta, chunks, dir, dataset, opts, progress).await
        }
        other => other,
    }
}

/// True for the errors of a chunk or tree that GC removed while an upload
/// relied on it: `PutTrees` refusing a tree whose chunk or subtree is gone
/// ("... which is not stored"), or `CommitVersion` refusing a root that was
/// already stored (so `PutTrees` skipped it) and then swept ("tree ... is not
/// stored").
fn lost_to_gc(e: &ClientError) -> bool {
    let text = e.to_string();
    text.contains("was removed from the cluster during the upload")
        || (matches!(
            e,
            ClientError::Server {
                code: tonic::Code::FailedPrecondition,
                ..
            }
        ) && text.contains("is not stored"))
}

async fn upload_once(
    meta: &MetaClient,
    chunks: &ChunkServers,
    dir: &Path,
    dataset: &str,
    opts: &UploadOptions,
    progress: Arc<dyn UploadProgress>,
) -> Result<UploadReport, ClientError> {
    validate_dataset_name(dataset).map_err(|e| ClientError::Invalid(e.to_string()))?;
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(ClientError::Invalid(format!(
                "'{}' is not a directory; upload takes a directory",
                dir.display()
            )))
        }
        Err(e) => {
            return Err(ClientError::Invalid(format!(
                "cannot read '{}': {e}",
                dir.display()
            )))
        }
    }
    let parent = match meta.get_version(dataset, None).await {
        Ok(v) => Some(v.number),
        Err(e) if e.is_not_found() => None,
        Err(e) => return Err(e),
    };

    let started = std::time::SystemTime::now();
    let cache = if opts.use_file_cache {
        let mut cache = LocalFileCache::open(dir);
        let mut missing = std::collections::HashSet::new();
        for batch in cache.chunk_ids().chunks(4096) {
            let present = meta.has_chunks(batch).await?;
            missing.extend(batch.iter().zip(present).filter(|(_, p)| !p).map(|(id, _)| *id));
        }
        cache.forget_missing(&missing);
        Some(Arc::new(cache))
    } else {
        None
    };
    let (tx, rx) = mpsc::channel::<Framed>(256);
    let ingest_opts = IngestOptions {
        chunker: opts.chunker,
        threads: opts.threads,
        file_cache: cache
            .clone()
            .map(|c| c as Arc<dyn granary_core::ingest::FileCache>),
        record_files: cache.is_some(),
        ..IngestOptions::default()
    };
    let root: PathBuf = dir.to_path_buf();
    let adapter = ProgressAdapter(progress.clone());
    let ingest = tokio::task::spawn_blocking(move || ingest_dir(&root, &ingest_opts, &Sink { tx }, &adapter));

    let mut sender = Sender {
        meta,
        chunks,
        opts,
        progress: progress.as_ref(),
        current: None,
        inflight: VecDeque::new(),
        new_chunks: 0,
        new_bytes: 0,
        sent_bytes: 0,
        local_bytes: 0,
        packs: 0,
    };
    let sent = sender.run(rx).await;
    let ingested = ingest
        .await
        .map_err(|e| ClientError::Invalid(format!("chunking failed: {e}")))?;
    // A failure to send explains a sink error in the ingest, so it wins.
    sent?;
    let output = ingested.map_err(|e| ClientError::Invalid(e.to_string()))?;

    // Chunks taken from the file cache must still be stored (GC may have
    // reclaimed them since); meta would refuse the trees otherwise.
    let cached: Vec<ChunkId> = output
        .files
        .iter()
        .filter(|f| f.cached)
        .flat_map(|f| f.chunks.iter().map(|c| c.id))
        .collect();
    for batch in cached.chunks(4096) {
        let present = meta.has_chunks(batch).await?;
        if let Some((id, _)) = batch.iter().zip(present).find(|(_, p)| !p) {
            return Err(ClientError::Invalid(format!(
                "chunk {id}, listed by the local file cache, was removed from the cluster during the upload; rerun it"
            )));
        }
    }

    // Trees, children before parents, in requests of at most ~4 MiB.
    let mut batch: Vec<(TreeId, Vec<u8>)> = Vec::new();
    let mut batch_bytes = 0;
    for (id, data) in output.objects {
        batch_bytes += data.len();
        batch.push((id, data));
        if batch_bytes >= 4 << 20 {
            meta.put_trees(std::mem::take(&mut batch)).await?;
            batch_bytes = 0;
        }
    }
    if !batch.is_empty() {
        meta.put_trees(batch).await?;
    }
    let s = &output.stats;
    let version = meta
        .commit_version(CommitRequest {
            dataset: dataset.to_string(),
            root: output.root.as_bytes().to_vec(),
            parent,
            force: opts.force,
            message: opts.message.clone(),
            stats: Some(VersionStats {
                files: s.files,
                dirs: s.dirs,
                symlinks: s.symlinks,
                bytes: s.bytes,
                chunks: s.chunks,
                new_bytes: sender.new_bytes,
            }),
        })
        .await?;
    if let Some(cache) = cache {
        // Only this upload holds the Arc now; a failed save only costs a re-read next time.
        if let Ok(cache) = Arc::try_unwrap(cache) {
            if let Err(e) = cache.save(&output.files, started) {
                tracing::warn!("could not save the local file cache: {e}");
            }
        }
    }
    Ok(UploadReport {
        version,
        stats: output.stats,
        new_chunks: sender.new_chunks,
        new_bytes: sender.new_bytes,
        sent_bytes: sender.sent_bytes,
        local_bytes: sender.local_bytes,
        packs: sender.packs,
        skipped: output.skipped,
    })
}

/// Moves new frames into packs.
struct Sender<'a> {
    meta: &'a MetaClient,
    chunks: &'a ChunkServers,
    opts: &'a UploadOptions,
    progress: &'a dyn UploadProgress,
    current: Option<PackStream>,
    inflight: VecDeque<JoinHandle<Result<WritePackReply, ClientError>>>,
    new_chunks: u64,
    new_bytes: u64,
    sent_bytes: u64,
    local_bytes: u64,
    packs: u64,
}

const HAS_BATCH: usize = 256;

impl Sender<'_> {
    async fn run(&mut self, mut rx: mpsc::Receiver<Framed>) -> Result<(), ClientError> {
        let result = self.drain(&mut rx).await;
        // Stop the chunkers promptly if sending failed.
        drop(rx);
        match result {
            Ok(()) => {
                if let Some(stream) = self.current.take() {
                    self.inflight.push_back(tokio::spawn(stream.finish()));
                }
                while let Some(call) = self.inflight.pop_front() {
                    Self::settle(call).await?;
                }
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    async fn drain(&mut self, rx: &mut mpsc::Receiver<Framed>) -> Result<(), ClientError> {
        let mut pending: Vec<Framed> = Vec::with_capacity(HAS_BATCH);
        let mut open = true;
        while open {
            // Gather up to HAS_BATCH frames, waiting at most 20 ms once one is here.
            match rx.recv().await {
                Some(f) => pending.push(f),
                None => open = false,
            }
            let deadline = tokio::time::Instant::now() + Duration::from_millis(20);
            while open && pending.len() < HAS_BATCH {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(f)) => pending.push(f),
                    Ok(None) => open = false,
                    Err(_) => break,
                }
            }
            if !pending.is_empty() {
                self.send_batch(std::mem::take(&mut pending)).await?;
            }
        }
        Ok(())
    }

    async fn send_batch(&mut self, batch: Vec<Framed>) -> Result<(), ClientError> {
        let ids: Vec<ChunkId> = batch.iter().map(|f| f.id).collect();
        let present = self.meta.has_chunks(&ids).await?;
        for (f, stored) in batch.into_iter().zip(present) {
            if stored {
                self.progress.deduplicated(f.raw_len as u64);
                continue;
            }
            let stream = match self.current.take() {
                Some(s) => s,
                None => {
                    let alloc = self.meta.allocate_pack().await?;
                    self.packs += 1;
                    self.chunks
                        .start_pack(alloc.id, &alloc.replicas, self.opts.pack_size)
                        .await?
                }
            };
            let len = f.frame.len() as u64;
            if stream.is_local() {
                self.local_bytes += len;
            }
            let stream = stream.push(f.frame).await?;
            self.new_chunks += 1;
            self.new_bytes += f.raw_len as u64;
            self.sent_bytes += len;
            self.progress.sent(len);
            if stream.bytes >= self.opts.pack_size {
                self.inflight.push_back(tokio::spawn(stream.finish()));
                while self.inflight.len() > self.opts.parallel_packs.max(1) {
                    Self::settle(self.inflight.pop_front().expect("non-empty")).await?;
                }
            } else {
                self.current = Some(stream);
            }
        }
        Ok(())
    }

    async fn settle(
        call: JoinHandle<Result<WritePackReply, ClientError>>,
    ) -> Result<WritePackReply, ClientError> {
        call.await
            .map_err(|e| ClientError::Invalid(format!("pack upload task failed: {e}")))?
    }
}
