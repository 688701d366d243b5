//! Talking to chunk servers: locating chunks, fetching and verifying
//! frames, and streaming new packs.
//!
//! **Local reads.** A chunk server on this host (it proves it with a token
//! file, see `LocalReads` in chunk.proto) has its sealed packs read straight
//! from its disk: one `pread` per run of frames and the same verification
//! as a fetched frame, instead of a `GetFrames` call that the server answers
//! with the same `pread` plus gRPC encoding, two socket copies and decoding.
//! Any error (the pack moved away, a damaged frame, no permission) falls back
//! to `GetFrames`. Reads are reported to the chunk server (`TouchPacks`, at
//! most every 30 s per pack) so the tiering policy sees the pack read.
//! `GRANARY_LOCAL_READS=0` turns them off.
//!
//! **Direct object-tier reads.** A pack that is only in the object tier is
//! read from there by the client itself, through its own block cache
//! ([`ObjectBlocks`]), instead of by a chunk server that then forwards the
//! bytes over gRPC: the object store serves every reader, and no chunk
//! server's CPU or network sits in the way. The client learns the tier's
//! URL from a chunk server (`ObjectStore`) and opens it with
//! [`ObjectTier::for_reads`]: an `s3://` tier with the `AWS_*` variables of
//! its own environment (no credentials there: no direct reads), a
//! `file://` tier only when the directory is on this host (a chunk server's
//! default `DATA_DIR/objects` only when that server is on this host). Every
//! frame is verified as from a chunk server. When the tier cannot be
//! opened or a direct read fails, reads go through chunk servers (which
//! read the object tier themselves) and the client tries again after
//! [`AVOID_FAILED`]. Reads are reported like local reads (`TouchPacks`), so
//! the tiering policy sees hot object-tier packs. `GRANARY_OBJECT_READS=server`
//! turns direct reads off.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use granary_core::frame::decode_frame_shared;
use granary_core::pack::{read_ranges, sealed_pack_path};
use granary_core::ChunkId;
use tonic::transport::Channel;

use crate::chunk_proto::chunk_client::ChunkClient;
use crate::chunk_proto::{
    FrameRange, GetFramesRequest, LocalReadsRequest, ObjectStoreRequest, PackSession, TouchPacksRequest,
};
use crate::error::ClientError;
use crate::meta::MetaClient;
use crate::object::{ObjectError, ObjectTier};
use crate::object_blocks::ObjectBlocks;
use crate::pack_stream::{LocalIncoming, PackStream};
use crate::proto::{ChunkLocation, NodeInfo};

/// Largest frame data asked of a chunk server in one call.
pub const MAX_FETCH: usize = 16 << 20;

/// How the caller of a fetch reads. It tells a chunk server that serves the
/// pack from the object tier what to get there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadPattern {
    /// On demand: the exact bytes, unless the server sees a sequential reader.
    Demand,
    /// Ahead of a sequential reader (a mount's readahead): the aligned
    /// blocks of the pack that hold the chunks, and the next one. For a
    /// caller that reads ahead itself; a plain sequential reader (a
    /// download) is `Demand`, and the server, seeing its calls follow each
    /// other, fetches more blocks ahead for it.
    Ahead,
}

/// Chunks fetched, in the order asked for, and which of them were read
/// from the disk of a chunk server on this host.
#[derive(Debug, Clone, Default)]
pub struct Fetched {
    pub chunks: Vec<Bytes>,
    pub local: Vec<bool>,
    /// Frame bytes of these chunks read directly from the object tier.
    pub object_read_bytes: u64,
}

/// Where the chunks of one pack were read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// From a chunk server, over gRPC.
    Server,
    /// From the disk of a chunk server on this host (a local read).
    Local,
    /// From the object tier, directly.
    Object,
}

/// Where a chunk is: its pack and frame position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub pack: u64,
    pub offset: u64,
    pub stored_len: u32,
    pub raw_len: u32,
}

impl Location {
    /// Length of the whole frame (header + stored bytes).
    pub fn frame_len(&self) -> u32 {
        granary_core::frame::FRAME_HEADER_LEN as u32 + self.stored_len
    }
}

/// Connections to chunk servers and caches of where packs live; cheap to clone.
#[derive(Clone)]
pub struct ChunkServers {
    meta: MetaClient,
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    channels: Mutex<HashMap<String, Channel>>,
    nodes: RwLock<HashMap<u64, String>>,
    /// Chunk servers (any can read a pack's object-tier copy).
    chunk_nodes: RwLock<Vec<String>>,
    packs: RwLock<HashMap<u64, PackCopies>>,
    /// Chunk servers whose last read failed, and when: tried last for a while.
    failed: Mutex<HashMap<String, std::time::Instant>>,
    /// `GRANARY_LOCAL_READS=0`: every read goes through `GetFrames`.
    no_local_reads: bool,
    /// `GRANARY_LOCAL_WRITES=0`: every new pack is streamed (`WritePack`).
    no_local_writes: bool,
    /// Per chunk server, once asked: its directories when this client sees
    /// the same disk, else `None`.
    local: Mutex<HashMap<String, Option<LocalServer>>>,
    /// When each (chunk server, pack) read locally was last reported.
    touched: Mutex<HashMap<(String, u64), Instant>>,
    /// Frame bytes read directly from local chunk servers' packs.
    local_bytes: AtomicU64,
    /// `GRANARY_OBJECT_READS=server`: object-tier packs are read through chunk servers.
    no_object_reads: bool,
    /// The object tier as this client reads it directly.
    objects: tokio::sync::Mutex<ObjectReads>,
    /// Frame bytes read directly from the object tier.
    object_read_bytes: AtomicU64,
    /// Memory for the block cache of direct object-tier reads; 0: no
    /// direct reads.
    object_cache: AtomicU64,
}

/// The default memory for the block cache of direct object-tier reads.
pub const OBJECT_CACHE: u64 = crate::object_blocks::CACHED_BLOCKS as u64 * crate::object_blocks::BLOCK;
/// Fewer cached blocks than this: no direct object-tier reads (a pack
/// spans 4-5 blocks, and a sequential reader has 2-4 more fetched ahead).
const MIN_OBJECT_BLOCKS: u64 = 8;
/// How long direct object-tier reads stay off after a failure that will
/// not pass by itself (no credentials, another endpoint, a directory not
/// on this host, an object store without the packs the cluster's has).
const OBJECT_READS_OFF: Duration = Duration::from_secs(300);
/// Longest wait for a chunk server's answer to `ObjectStore`.
const OBJECT_STORE_ASK: Duration = Duration::from_secs(3);

/// What a direct object-tier read gave.
enum Direct {
    /// The chunks.
    Read(Vec<Bytes>),
    /// The object is not in the store this client reads.
    Missing,
    /// This client does not read the object tier directly now, or the read
    /// failed (said in the log).
    No,
}

/// Whether this client reads the object tier directly (see the module docs).
#[derive(Default)]
enum ObjectReads {
    /// Not looked up yet.
    #[default]
    Unknown,
    /// Through chunk servers, until the time given (then looked up again).
    Off(Instant),
    /// Directly, through this block cache.
    On(Arc<ObjectBlocks>),
}

/// How often a pack read locally is reported to its chunk server, at most.
const TOUCH_EVERY: Duration = Duration::from_secs(30);

/// A chunk server on this host, as its `LocalReads` reply describes it.
#[derive(Debug, Clone)]
struct LocalServer {
    packs_dir: PathBuf,
    /// Where it takes new packs written by clients (`None`: it does not).
    incoming: Option<LocalIncoming>,
}

/// Where a pack's copies are, as last heard from meta.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PackCopies {
    replicas: Vec<u64>,
    object_key: String,
}

/// How long a chunk server that failed a read is tried after the other replicas.
const AVOID_FAILED: std::time::Duration = std::time::Duration::from_secs(30);

pub(crate) fn server_err(addr: &str, s: tonic::Status) -> ClientError {
    ClientError::Server {
        code: s.code(),
        message: format!("chunk server {addr}: {}", crate::error::status_cause(&s)),
    }
}

impl ChunkServers {
    pub fn new(meta: MetaClient) -> Self {
        let no_local_reads = std::env::var("GRANARY_LOCAL_READS").is_ok_and(|v| v == "0");
        let no_local_writes = std::env::var("GRANARY_LOCAL_WRITES").is_ok_and(|v| v == "0");
        let no_object_reads = match std::env::var("GRANARY_OBJECT_READS") {
            Ok(v) if matches!(v.as_str(), "server" | "0" | "off") => true,
            Ok(v) if !matches!(v.as_str(), "" | "direct" | "1" | "on") => {
                tracing::warn!("GRANARY_OBJECT_READS={v} is not `direct` or `server`; reading directly");
                false
            }
            _ => false,
        };
        Self {
            meta,
            inner: Arc::new(Inner {
                no_local_reads,
                no_local_writes,
                no_object_reads,
                object_cache: AtomicU64::new(if no_object_reads { 0 } else { OBJECT_CACHE }),
                ..Inner::default()
            }),
        }
    }

    /// Sets the memory the block cache of direct object-tier reads may use
    /// ([`OBJECT_CACHE`] by default). Below 8 blocks (128 MiB) this client
    /// reads the object tier through chunk servers. Takes effect when the
    /// tier is next opened (at the first object-tier read). Returns the
    /// memory the cache may use: `bytes` in whole blocks, or 0 (also when
    /// direct reads are off, `GRANARY_OBJECT_READS=server`).
    pub fn set_object_cache(&self, bytes: u64) -> u64 {
        let blocks = bytes / crate::object_blocks::BLOCK;
        let bytes = if blocks < MIN_OBJECT_BLOCKS || self.inner.no_object_reads {
            0
        } else {
            blocks * crate::object_blocks::BLOCK
        };
        self.inner.object_cache.store(bytes, Ordering::Relaxed);
        bytes
    }

    /// Frame bytes this client has read directly from the object tier.
    pub fn object_read_bytes(&self) -> u64 {
        self.inner.object_read_bytes.load(Ordering::Relaxed)
    }

    /// The block cache this client reads the object tier through, when it
    /// reads it directly (looked up once; again after [`AVOID_FAILED`] when
    /// no chunk server answered, after [`OBJECT_READS_OFF`] when one did
    /// and the tier cannot be read from here).
    async fn object_reader(&self) -> Option<Arc<ObjectBlocks>> {
        let blocks = self.inner.object_cache.load(Ordering::Relaxed) / crate::object_blocks::BLOCK;
        if blocks == 0 {
            return None;
        }
        let mut state = self.inner.objects.lock().await;
        match &*state {
            ObjectReads::On(blocks) => return Some(blocks.clone()),
            ObjectReads::Off(until) if Instant::now() < *until => return None,
            _ => {}
        }
        match self.open_object_tier().await {
            Ok(tier) => {
                tracing::debug!(url = tier.url(), "reading the object tier directly");
                let blocks = Arc::new(ObjectBlocks::with_blocks(tier, blocks as usize));
                *state = ObjectReads::On(blocks.clone());
                Some(blocks)
            }
            Err((why, lasting)) => {
                let off = if lasting { OBJECT_READS_OFF } else { AVOID_FAILED };
                tracing::debug!(
                    "reading the object tier through chunk servers for {}s: {why}",
                    off.as_secs()
                );
                *state = ObjectReads::Off(Instant::now() + off);
                None
            }
        }
    }

    /// Turns direct object-tier reads off for `off`; whether they were on
    /// (so of several reads failing at once, one says so).
    async fn object_reads_off(&self, off: Duration) -> bool {
        let mut state = self.inner.objects.lock().await;
        let was_on = matches!(*state, ObjectReads::On(_));
        *state = ObjectReads::Off(Instant::now() + off);
        was_on
    }

    /// The object tier, opened for reads, as the first chunk server that
    /// answers (healthy ones first, each given [`OBJECT_STORE_ASK`]) names
    /// it. An error says why, and whether it will last (a server answered,
    /// but this client cannot read that tier).
    async fn open_object_tier(&self) -> Result<ObjectTier, (String, bool)> {
        if self.inner.chunk_nodes.read().expect("lock").is_empty() {
            self.refresh_nodes().await.map_err(|e| (e.to_string(), false))?;
        }
        let mut nodes = self.inner.chunk_nodes.read().expect("lock").clone();
        {
            let failed = self.inner.failed.lock().expect("failed map lock");
            let now = Instant::now();
            nodes.sort_by_key(|a| {
                failed
                    .get(a)
                    .is_some_and(|t| now.duration_since(*t) < AVOID_FAILED)
            });
        }
        let mut why = ("no chunk server is known".to_string(), false);
        for addr in &nodes {
            let mut client = match self.client(addr) {
                Ok(c) => c,
                Err(e) => {
                    why = (e.to_string(), false);
                    continue;
                }
            };
            let reply = match tokio::time::timeout(
                OBJECT_STORE_ASK,
                client.object_store(ObjectStoreRequest {}),
            )
            .await
            {
                Ok(Ok(r)) => r.into_inner(),
                Ok(Err(s)) => {
                    why = (server_err(addr, s).to_string(), false);
                    continue;
                }
                Err(_) => {
                    why = (format!("chunk server {addr} did not answer in time"), false);
                    continue;
                }
            };
            if reply.node_default && self.local_dir(addr).await.is_none() {
                why = (
                    format!("the object tier is chunk server {addr}'s own directory, not on this host"),
                    true,
                );
                continue;
            }
            return ObjectTier::for_reads(&reply.url, &reply.s3_endpoint).map_err(|e| (e.to_string(), true));
        }
        Err(why)
    }

    /// Reads and verifies `chunks` of `pack` from its object-tier copy
    /// `key`, directly, when this client does that (see the module docs);
    /// `touch`: a chunk server to report the read to. A failure of the
    /// store turns direct reads off for [`AVOID_FAILED`]; a damaged copy is
    /// this pack's problem only (a chunk server reads the same object and
    /// reports it the same way).
    async fn try_read_object(
        &self,
        pack: u64,
        key: &str,
        chunks: &[(ChunkId, Location)],
        pattern: ReadPattern,
        touch: Option<&str>,
    ) -> Direct {
        let Some(blocks) = self.object_reader().await else {
            return Direct::No;
        };
        let ranges: Vec<(u64, u32)> = chunks.iter().map(|(_, l)| (l.offset, l.frame_len())).collect();
        let data = match blocks
            .get_ranges(key, &ranges, pattern == ReadPattern::Ahead)
            .await
        {
            Ok(data) => data,
            Err(e @ ObjectError::NotFound { .. }) => {
                tracing::debug!(pack, "object-tier copy not found, asking chunk servers: {e}");
                return Direct::Missing;
            }
            Err(e) => {
                if self.object_reads_off(AVOID_FAILED).await {
                    tracing::warn!(
                        pack,
                        "reading the object tier directly failed, reading through chunk servers for {}s: {e}",
                        AVOID_FAILED.as_secs()
                    );
                } else {
                    tracing::debug!(pack, "reading the object tier directly failed: {e}");
                }
                return Direct::No;
            }
        };
        let what = format!(
            "the copy of pack {pack} in the object tier {} ({key})",
            blocks.url()
        );
        match decode_frames(&[Bytes::from(data)], chunks, &what) {
            Ok(out) => {
                let total: u64 = ranges.iter().map(|(_, n)| u64::from(*n)).sum();
                self.inner.object_read_bytes.fetch_add(total, Ordering::Relaxed);
                if let Some(addr) = touch {
                    self.touch(addr, pack);
                }
                Direct::Read(out)
            }
            Err(e) => {
                tracing::warn!(pack, "{e}; asking chunk servers");
                Direct::No
            }
        }
    }

    /// Frame bytes this client has read directly from the packs of chunk
    /// servers on its host.
    pub fn local_read_bytes(&self) -> u64 {
        self.inner.local_bytes.load(Ordering::Relaxed)
    }

    /// The packs directory of chunk server `addr` when this client reads
    /// its packs directly (see [`local_server`](Self::local_server)).
    async fn local_dir(&self, addr: &str) -> Option<PathBuf> {
        if self.inner.no_local_reads {
            return None;
        }
        self.local_server(addr).await.map(|l| l.packs_dir)
    }

    /// Where this client writes new packs for chunk server `addr`, when it
    /// is on this host and takes them (see [`crate::pack_stream`]).
    async fn local_incoming(&self, addr: &str) -> Option<LocalIncoming> {
        if self.inner.no_local_writes {
            return None;
        }
        self.local_server(addr).await.and_then(|l| l.incoming)
    }

    /// Chunk server `addr`'s directories when this client sees its disk: the
    /// token file its `LocalReads` names holds its token. Asked once per
    /// server (again after an error that says nothing).
    async fn local_server(&self, addr: &str) -> Option<LocalServer> {
        if let Some(known) = self.inner.local.lock().expect("local map lock").get(addr) {
            return known.clone();
        }
        let reply = match self.client(addr).ok()?.local_reads(LocalReadsRequest {}).await {
            Ok(r) => Some(r.into_inner()),
            // An older chunk server: no local reads there.
            Err(s) if s.code() == tonic::Code::Unimplemented => None,
            Err(_) => return None,
        };
        let server = match reply {
            Some(r) if !r.token.is_empty() => {
                let seen = tokio::fs::read_to_string(&r.token_path).await.ok();
                (seen.as_deref() == Some(r.token.as_str())).then(|| LocalServer {
                    packs_dir: PathBuf::from(r.packs_dir),
                    incoming: (!r.incoming_dir.is_empty()).then(|| LocalIncoming {
                        dir: PathBuf::from(r.incoming_dir),
                        reserve: r.reserve_bytes,
                    }),
                })
            }
            _ => None,
        };
        if let Some(s) = &server {
            tracing::debug!(addr, dir = %s.packs_dir.display(), "this chunk server is on this host");
        }
        self.inner
            .local
            .lock()
            .expect("local map lock")
            .insert(addr.to_string(), server.clone());
        server
    }

    /// Reads and verifies `chunks` of sealed pack `pack` straight from the
    /// packs directory `dir` of chunk server `addr`.
    async fn read_local(
        &self,
        dir: &Path,
        addr: &str,
        pack: u64,
        chunks: &[(ChunkId, Location)],
    ) -> Result<Vec<Bytes>, ClientError> {
        let path = sealed_pack_path(dir, pack);
        let ranges: Vec<(u64, u32)> = chunks.iter().map(|(_, l)| (l.offset, l.frame_len())).collect();
        let total: u64 = ranges.iter().map(|(_, n)| *n as u64).sum();
        let chunks = chunks.to_vec();
        let what = format!("the copy of pack {pack} in {}", path.display());
        let out = crate::blocking::unblock(move || {
            let data =
                read_ranges(&path, &ranges).map_err(|e| ClientError::Invalid(format!("{what}: {e}")))?;
            decode_frames(&[Bytes::from(data)], &chunks, &what)
        })
        .await
        .map_err(|e| ClientError::Invalid(format!("local read task failed: {e}")))??;
        self.inner.local_bytes.fetch_add(total, Ordering::Relaxed);
        self.touch(addr, pack);
        Ok(out)
    }

    /// Tells chunk server `addr` that `pack` was read (at most every
    /// [`TOUCH_EVERY`]), in the background.
    fn touch(&self, addr: &str, pack: u64) {
        let now = Instant::now();
        {
            let mut touched = self.inner.touched.lock().expect("touched map lock");
            let key = (addr.to_string(), pack);
            if touched
                .get(&key)
                .is_some_and(|at| now.duration_since(*at) < TOUCH_EVERY)
            {
                return;
            }
            touched.insert(key, now);
        }
        if let Ok(mut client) = self.client(addr) {
            tokio::spawn(async move {
                let req = TouchPacksRequest { pack_ids: vec![pack] };
                if let Err(s) = client.touch_packs(req).await {
                    tracing::debug!(pack, "could not report a local read: {}", s.message());
                }
            });
        }
    }

    fn client(&self, addr: &str) -> Result<ChunkClient<Channel>, ClientError> {
        let mut channels = self.inner.channels.lock().expect("channel map lock");
        let channel = match channels.get(addr) {
            Some(c) => c.clone(),
            None => {
                let c = crate::meta::endpoint(addr)?.connect_lazy();
                channels.insert(addr.to_string(), c.clone());
                c
            }
        };
        Ok(ChunkClient::new(channel)
            .max_decoding_message_size(crate::MAX_MESSAGE)
            .max_encoding_message_size(crate::MAX_MESSAGE))
    }

    /// Where each chunk is stored. Fails naming the first chunk the cluster does not have.
    pub async fn locate(&self, ids: &[ChunkId]) -> Result<HashMap<ChunkId, Location>, ClientError> {
        let mut out = HashMap::with_capacity(ids.len());
        for batch in ids.chunks(4096) {
            let reply = self.meta.lookup_chunks(batch).await?;
            if let Some(missing) = reply.missing.first() {
                let id = ChunkId::from_slice(missing)
                    .map(|c| c.to_string())
                    .unwrap_or_default();
                return Err(ClientError::Server {
                    code: tonic::Code::DataLoss,
                    message: format!("chunk {id} is not stored in the cluster; the version is damaged"),
                });
            }
            for ChunkLocation {
                id,
                pack,
                offset,
                stored_len,
                raw_len,
            } in reply.found
            {
                let id = ChunkId::from_slice(&id)
                    .ok_or_else(|| ClientError::Invalid("malformed chunk id".into()))?;
                out.insert(
                    id,
                    Location {
                        pack,
                        offset,
                        stored_len,
                        raw_len,
                    },
                );
            }
        }
        Ok(out)
    }

    /// Asks meta for the nodes: their addresses, and which are chunk servers.
    async fn refresh_nodes(&self) -> Result<(), ClientError> {
        let nodes = self.meta.list_nodes().await?;
        let mut chunk_nodes: Vec<String> = nodes
            .iter()
            .filter(|n| n.roles.iter().any(|r| r == "chunk"))
            .map(|n| n.addr.clone())
            .collect();
        chunk_nodes.sort();
        *self.inner.chunk_nodes.write().expect("lock") = chunk_nodes;
        let mut map = self.inner.nodes.write().expect("node cache lock");
        for n in nodes {
            map.insert(n.id, n.addr);
        }
        Ok(())
    }

    /// Where `pack`'s copies are (cached; `refresh` asks meta again).
    async fn copies(&self, pack: u64, refresh: bool) -> Result<PackCopies, ClientError> {
        if !refresh {
            if let Some(c) = self.inner.packs.read().expect("pack cache lock").get(&pack) {
                return Ok(c.clone());
            }
        }
        let info = self.meta.get_pack(pack).await?;
        let copies = PackCopies {
            replicas: info.replicas,
            object_key: info.object_key,
        };
        self.inner
            .packs
            .write()
            .expect("pack cache lock")
            .insert(pack, copies.clone());
        Ok(copies)
    }

    /// The chunk servers to ask for `pack`: its SSD replicas (healthy ones
    /// first), then, when it has an object-tier copy, up to two other chunk
    /// servers, which read it from the object tier.
    async fn sources(&self, pack: u64, copies: &PackCopies) -> Result<Vec<String>, ClientError> {
        let known = |id: &u64| self.inner.nodes.read().expect("node cache lock").contains_key(id);
        let need_nodes = !copies.replicas.iter().all(known)
            || (!copies.object_key.is_empty() && self.inner.chunk_nodes.read().expect("lock").is_empty());
        if need_nodes {
            self.refresh_nodes().await?;
        }
        let mut out: Vec<String> = {
            let nodes = self.inner.nodes.read().expect("node cache lock");
            copies
                .replicas
                .iter()
                .filter_map(|id| nodes.get(id).cloned())
                .collect()
        };
        if !copies.object_key.is_empty() {
            let all = self.inner.chunk_nodes.read().expect("lock").clone();
            if !all.is_empty() {
                let start = pack as usize % all.len();
                let others: Vec<String> = all
                    .iter()
                    .cycle()
                    .skip(start)
                    .take(all.len())
                    .filter(|a| !out.contains(a))
                    .take(2)
                    .cloned()
                    .collect();
                out.extend(others);
            }
        }
        // Healthy sources first (stable: otherwise in the order above).
        let failed = self.inner.failed.lock().expect("failed map lock");
        let now = std::time::Instant::now();
        out.sort_by_key(|a| {
            failed
                .get(a)
                .is_some_and(|t| now.duration_since(*t) < AVOID_FAILED)
        });
        Ok(out)
    }

    /// Fetches, verifies and decodes chunks of one pack; `chunks` must fit in [`MAX_FETCH`].
    /// Tries each source in turn; when all fail, asks meta where the pack is
    /// now (a tier move may have just moved it) and tries once more.
    /// Returns the raw chunks in order, and where they were read.
    pub async fn fetch_from_pack(
        &self,
        pack: u64,
        chunks: &[(ChunkId, Location)],
        pattern: ReadPattern,
    ) -> Result<(Vec<Bytes>, Origin), ClientError> {
        let mut copies = self.copies(pack, false).await?;
        let mut refreshed = false;
        loop {
            match self.fetch_from_copies(pack, &copies, chunks, pattern).await {
                Ok(v) => return Ok(v),
                Err(e) if refreshed => return Err(e),
                Err(e) => {
                    refreshed = true;
                    let now = self.copies(pack, true).await?;
                    if now == copies {
                        return Err(e);
                    }
                    tracing::debug!(pack, "pack moved while reading; trying its new copies");
                    copies = now;
                }
            }
        }
    }

    async fn fetch_from_copies(
        &self,
        pack: u64,
        copies: &PackCopies,
        chunks: &[(ChunkId, Location)],
        pattern: ReadPattern,
    ) -> Result<(Vec<Bytes>, Origin), ClientError> {
        let sources = self.sources(pack, copies).await?;
        // Only in the object tier: read it directly, if this client can.
        let object_only = copies.replicas.is_empty() && !copies.object_key.is_empty();
        let mut direct_missing = false;
        if object_only {
            let touch = sources.first().map(String::as_str);
            match self
                .try_read_object(pack, &copies.object_key, chunks, pattern, touch)
                .await
            {
                Direct::Read(v) => return Ok((v, Origin::Object)),
                Direct::Missing => direct_missing = true,
                Direct::No => {}
            }
        }
        if sources.is_empty() {
            return Err(ClientError::Server {
                code: tonic::Code::Unavailable,
                message: format!("pack {pack} has no known copy; run `granary admin status`"),
            });
        }
        // SSD replicas on this host first, read directly.
        for addr in &sources {
            let replica = {
                let nodes = self.inner.nodes.read().expect("node cache lock");
                copies.replicas.iter().any(|id| nodes.get(id) == Some(addr))
            };
            if !replica {
                continue;
            }
            if let Some(dir) = self.local_dir(addr).await {
                match self.read_local(&dir, addr, pack, chunks).await {
                    Ok(v) => return Ok((v, Origin::Local)),
                    // Damage is worth a warning; a pack that moved away is not.
                    Err(e @ ClientError::Server { .. }) => {
                        tracing::warn!(pack, addr, "local read failed, trying another copy: {e}")
                    }
                    Err(e) => tracing::debug!(pack, addr, "local read failed, asking the chunk server: {e}"),
                }
            }
        }
        let ranges: Vec<FrameRange> = chunks
            .iter()
            .map(|(_, l)| FrameRange {
                offset: l.offset,
                len: l.frame_len(),
            })
            .collect();
        let mut last = None;
        for addr in &sources {
            match self
                .fetch_once(addr, pack, &copies.object_key, &ranges, chunks, pattern)
                .await
            {
                Ok(v) => {
                    self.inner.failed.lock().expect("failed map lock").remove(addr);
                    // The chunk server found the object this client did not:
                    // the two see different stores.
                    if direct_missing && self.object_reads_off(OBJECT_READS_OFF).await {
                        tracing::warn!(
                            pack,
                            addr,
                            "the object store this client reads lacks a pack the chunk server read from its own; \
                             reading through chunk servers for {}s",
                            OBJECT_READS_OFF.as_secs()
                        );
                    }
                    return Ok((v, Origin::Server));
                }
                Err(e) => {
                    if sources.len() > 1 {
                        tracing::warn!(pack, addr, "read from chunk server failed, trying another: {e}");
                    }
                    self.inner
                        .failed
                        .lock()
                        .expect("failed map lock")
                        .insert(addr.clone(), std::time::Instant::now());
                    last = Some(e);
                }
            }
        }
        Err(last.expect("at least one source was tried"))
    }

    async fn fetch_once(
        &self,
        addr: &str,
        pack: u64,
        object_key: &str,
        ranges: &[FrameRange],
        chunks: &[(ChunkId, Location)],
        pattern: ReadPattern,
    ) -> Result<Vec<Bytes>, ClientError> {
        let mut client = self.client(addr)?;
        let req = GetFramesRequest {
            pack_id: pack,
            ranges: ranges.to_vec(),
            object_key: object_key.to_string(),
            readahead: pattern == ReadPattern::Ahead,
        };
        let mut stream = client
            .get_frames(req)
            .await
            .map_err(|s| server_err(addr, s))?
            .into_inner();
        let total: usize = ranges.iter().map(|r| r.len as usize).sum();
        let mut pieces = Vec::new();
        let mut got = 0;
        while let Some(piece) = stream.message().await.map_err(|s| server_err(addr, s))? {
            got += piece.data.len();
            if !piece.data.is_empty() {
                pieces.push(piece.data);
            }
        }
        if got != total {
            return Err(ClientError::Server {
                code: tonic::Code::DataLoss,
                message: format!("chunk server {addr} returned {got} of {total} bytes of pack {pack}"),
            });
        }
        decode_frames(
            &pieces,
            chunks,
            &format!("chunk server {addr}'s copy of pack {pack}"),
        )
    }

    /// Fetches any chunks: locates them, groups them by pack and fetches each
    /// pack's frames in as few calls as possible. Returns raw chunks in order.
    /// When a pack cannot be read, its chunks are located again once (GC
    /// compaction may have just moved them to another pack).
    pub async fn fetch(&self, ids: &[ChunkId], pattern: ReadPattern) -> Result<Vec<Bytes>, ClientError> {
        Ok(self.fetch_marked(ids, pattern).await?.chunks)
    }

    /// [`Self::fetch`], also saying which chunks were read from the disk of
    /// a chunk server on this host (a cache on that same disk gains nothing
    /// by copying those).
    pub async fn fetch_marked(&self, ids: &[ChunkId], pattern: ReadPattern) -> Result<Fetched, ClientError> {
        let mut locations = self.locate(ids).await?;
        let mut out: Vec<Bytes> = vec![Bytes::new(); ids.len()];
        let mut local = vec![false; ids.len()];
        let mut object_read_bytes = 0;
        let mut pending: Vec<usize> = (0..ids.len()).collect();
        for attempt in 0..2 {
            let mut by_pack: HashMap<u64, Vec<usize>> = HashMap::new();
            for &i in &pending {
                by_pack.entry(locations[&ids[i]].pack).or_default().push(i);
            }
            let mut failed: Vec<usize> = Vec::new();
            let mut first_error = None;
            for (pack, idxs) in by_pack {
                for group in split_groups(&idxs, |i| locations[&ids[i]].frame_len() as usize) {
                    let request: Vec<(ChunkId, Location)> =
                        group.iter().map(|&i| (ids[i], locations[&ids[i]])).collect();
                    match self.fetch_from_pack(pack, &request, pattern).await {
                        Ok((raws, origin)) => {
                            if origin == Origin::Object {
                                object_read_bytes +=
                                    request.iter().map(|(_, l)| u64::from(l.frame_len())).sum::<u64>();
                            }
                            for (&k, raw) in group.iter().zip(raws) {
                                out[k] = raw;
                                local[k] = origin == Origin::Local;
                            }
                        }
                        Err(e) if attempt == 0 => {
                            failed.extend_from_slice(&group);
                            first_error.get_or_insert(e);
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
            let Some(e) = first_error else {
                return Ok(Fetched {
                    chunks: out,
                    local,
                    object_read_bytes,
                });
            };
            let again: Vec<ChunkId> = failed.iter().map(|&i| ids[i]).collect();
            let fresh = self.locate(&again).await?;
            if again.iter().all(|id| fresh.get(id) == locations.get(id)) {
                return Err(e);
            }
            tracing::debug!("chunks moved to other packs while reading; reading them there");
            locations.extend(fresh);
            pending = failed;
        }
        Ok(Fetched {
            chunks: out,
            local,
            object_read_bytes,
        })
    }

    /// Opens a pack session: the frames go to `replicas[0]`, which forwards
    /// them to the others; once all have it on disk the pack is registered.
    /// When `replicas[0]` is on this host and its disk has `room` to spare,
    /// the pack is written straight into it (see [`crate::pack_stream`]).
    pub async fn start_pack(
        &self,
        id: u64,
        replicas: &[NodeInfo],
        room: u64,
    ) -> Result<PackStream, ClientError> {
        let first = replicas
            .first()
            .ok_or_else(|| ClientError::Invalid("a pack needs at least one replica".into()))?;
        let client = self.client(&first.addr)?;
        let session = PackSession {
            pack_id: id,
            chain: replicas[1..].iter().map(|n| n.addr.clone()).collect(),
            replica_ids: replicas.iter().map(|n| n.id).collect(),
            register: true,
            frames_in_incoming: false,
        };
        if let Some(incoming) = self.local_incoming(&first.addr).await {
            let local = PackStream::to_incoming(
                client.clone(),
                &first.addr,
                first.id,
                session.clone(),
                &incoming,
                room,
            )
            .await;
            if let Some(stream) = local {
                return Ok(stream);
            }
        }
        Ok(PackStream::to_server(client, &first.addr, session))
    }
}

/// Splits `idxs` into groups whose total size stays within [`MAX_FETCH`].
fn split_groups(idxs: &[usize], size: impl Fn(usize) -> usize) -> Vec<Vec<usize>> {
    let mut groups = Vec::new();
    let mut group = Vec::new();
    let mut total = 0usize;
    for &i in idxs {
        let n = size(i);
        if total + n > MAX_FETCH && !group.is_empty() {
            groups.push(std::mem::take(&mut group));
            total = 0;
        }
        total += n;
        group.push(i);
    }
    if !group.is_empty() {
        groups.push(group);
    }
    groups
}

/// Verifies and decodes `chunks` from `pieces` (their frames, in order);
/// `what` names the copy they came from in the error.
fn decode_frames(
    pieces: &[Bytes],
    chunks: &[(ChunkId, Location)],
    what: &str,
) -> Result<Vec<Bytes>, ClientError> {
    let mut out = Vec::with_capacity(chunks.len());
    let mut frames = Frames {
        pieces,
        piece: 0,
        pos: 0,
    };
    for (id, loc) in chunks {
        let len = loc.frame_len() as usize;
        // A stored-raw chunk stays a slice of the received piece (no copy).
        let raw = decode_frame_shared(frames.next(len), Some(id)).map_err(|e| ClientError::Server {
            code: tonic::Code::DataLoss,
            message: format!(
                "{what} has a damaged frame: {e}; \
                 `granary admin scrub` reports it and repairs it where another copy exists"
            ),
        })?;
        out.push(raw);
    }
    Ok(out)
}

/// Consecutive frames out of a `GetFrames` reply's pieces. The server cuts
/// pieces at frame boundaries, so a frame is borrowed in place; one that
/// spans pieces anyway is copied together.
struct Frames<'a> {
    pieces: &'a [Bytes],
    piece: usize,
    pos: usize,
}

impl<'a> Frames<'a> {
    /// The next `len` bytes (the caller checked that the pieces hold them
    /// all): a slice of the piece that holds them, or a copy when they span
    /// pieces.
    fn next(&mut self, len: usize) -> Bytes {
        let pieces = self.pieces;
        if self.piece < pieces.len() && pieces[self.piece].len() - self.pos >= len {
            let p = &pieces[self.piece];
            let frame = p.slice(self.pos..self.pos + len);
            self.pos += len;
            if self.pos == p.len() {
                (self.piece, self.pos) = (self.piece + 1, 0);
            }
            return frame;
        }
        let mut joined = Vec::with_capacity(len);
        while joined.len() < len {
            let p = &pieces[self.piece];
            let take = (len - joined.len()).min(p.len() - self.pos);
            joined.extend_from_slice(&p[self.pos..self.pos + take]);
            self.pos += take;
            if self.pos == p.len() {
                (self.piece, self.pos) = (self.piece + 1, 0);
            }
        }
        Bytes::from(joined)
    }
}

#[cfg(test)]
mod tests {
    use super::{Bytes, Frames};

    #[test]
    fn frames_are_borrowed_in_place_and_joined_across_pieces() {
        let whole: Vec<u8> = (0..100u8).collect();
        // Pieces cut at 30 and 70; frames of 10, 20, 25, 20 (spans 70), 25.
        let pieces = vec![
            Bytes::copy_from_slice(&whole[..30]),
            Bytes::copy_from_slice(&whole[30..70]),
            Bytes::copy_from_slice(&whole[70..]),
        ];
        let mut f = Frames {
            pieces: &pieces,
            piece: 0,
            pos: 0,
        };
        let mut at = 0;
        for (len, borrowed) in [(10, true), (20, true), (25, true), (20, false), (25, true)] {
            let got = f.next(len);
            assert_eq!(&got[..], &whole[at..at + len]);
            let inside = pieces.iter().any(|p| p.as_ptr_range().contains(&got.as_ptr()));
            assert_eq!(inside, borrowed, "frame at {at}");
            at += len;
        }
        assert_eq!((f.piece, f.pos), (3, 0));
    }
}
