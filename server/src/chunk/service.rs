//! The `Chunk` gRPC service: pack sessions and frame reads.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use granary_client::chunk_proto::chunk_client::ChunkClient;
use granary_client::chunk_proto::chunk_server::{Chunk, ChunkServer};
use granary_client::chunk_proto::*;
use granary_client::object_blocks::ObjectBlocks;
use granary_client::proto::{ChunkLocation, PackInfo, RegisterPackRequest};
use granary_client::MetaClient;
use granary_core::pack::{PackWriter, SealedPack};
use granary_core::PackError;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

use super::peers::ChunkPeers;
use super::store::{verify_pack, verify_pack_crc, LocalReadToken, PackStore};
use granary_client::object::ObjectTier;

/// Largest piece of frame data in one streamed reply message.
const READ_PIECE: usize = 4 << 20;
/// Start disk writeback every this many bytes of a pack.
const WRITEBACK_STEP: u64 = 8 << 20;
/// Largest total of ranges one `GetFrames` call may ask for.
const MAX_READ: usize = 64 << 20;

/// The chunk service of one node; cheap to clone.
#[derive(Clone)]
pub struct ChunkService {
    inner: Arc<Inner>,
}

struct Inner {
    node_id: u64,
    store: PackStore,
    objects: ObjectTier,
    /// Frame reads of packs only in the object tier, in cached blocks.
    blocks: ObjectBlocks,
    meta: MetaClient,
    peers: ChunkPeers,
    /// Packs read since the last report, and when (ms).
    reads: Mutex<HashMap<u64, u64>>,
    /// Held by DeletePack from its question to meta to the unlink, and by a
    /// restore while it checks and reuses a local copy.
    copies: tokio::sync::Mutex<()>,
    /// Offered to clients on this host by `LocalReads`.
    local_token: LocalReadToken,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Largest range asked of a peer in one call when copying a whole pack.
const COPY_PIECE: u64 = 32 << 20;

fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

fn pack_status(node: u64, id: u64, e: PackError) -> Status {
    match &e {
        PackError::Io { source, .. } if source.kind() == std::io::ErrorKind::StorageFull => {
            Status::resource_exhausted(format!(
                "chunk server {node} is out of disk space writing pack {id}; free space or add chunk servers"
            ))
        }
        PackError::BadFrame { .. } => Status::data_loss(format!("pack {id} received a damaged frame: {e}")),
        _ => Status::internal(format!("chunk server {node} could not write pack {id}: {e}")),
    }
}

impl ChunkService {
    pub fn new(
        node_id: u64,
        store: PackStore,
        objects: ObjectTier,
        meta: MetaClient,
        peers: ChunkPeers,
        local_token: LocalReadToken,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                node_id,
                store,
                blocks: ObjectBlocks::new(objects.clone()),
                objects,
                meta,
                peers,
                reads: Mutex::new(HashMap::new()),
                copies: tokio::sync::Mutex::new(()),
                local_token,
            }),
        }
    }

    /// The packs read since the last call, with the time of their last read.
    pub fn take_reads(&self) -> Vec<(u64, u64)> {
        std::mem::take(&mut *self.inner.reads.lock().expect("reads lock"))
            .into_iter()
            .collect()
    }

    /// Makes this server hold a verified copy of pack `id`: keeps a good
    /// local copy, else copies it from the first peer that has a good one,
    /// else from the object tier (`object_key`). Returns (bytes, source).
    pub async fn restore(
        &self,
        id: u64,
        peers: &[String],
        object_key: &str,
    ) -> Result<(u64, String), Status> {
        let store = self.inner.store.clone();
        let local = store.sealed_path(id);
        // No DeletePack between the check of the local copy and its reuse.
        let copies = self.inner.copies.lock().await;
        if local.exists() {
            match tokio::task::spawn_blocking(move || verify_pack(&local, id))
                .await
                .map_err(internal)?
            {
                // Reused: restart its grace period (it is unlisted until
                // meta records it, and the sweep deletes old unlisted packs).
                Ok(len) if store.keep(id).map_err(internal)? => return Ok((len, "local".into())),
                Ok(_) => {} // swept meanwhile: copy it again
                Err(e) => {
                    tracing::warn!(pack = id, "local copy is damaged: {e}");
                    store.quarantine(id).map_err(internal)?;
                }
            }
        }
        drop(copies);
        let mut errors = Vec::new();
        for peer in peers {
            match self.copy_from_peer(id, peer).await {
                Ok(len) => return Ok((len, format!("replica {peer}"))),
                Err(e) => errors.push(format!("{peer}: {e}")),
            }
        }
        if !object_key.is_empty() {
            let tmp = store.restore_path(id).map_err(internal)?;
            let result = async {
                self.inner
                    .objects
                    .get_to_file(object_key, &tmp)
                    .await
                    .map_err(|e| e.to_string())?;
                let store = store.clone();
                tokio::task::spawn_blocking(move || store.install_restored(id))
                    .await
                    .map_err(|e| e.to_string())?
            }
            .await;
            match result {
                Ok(len) => return Ok((len, "object tier".into())),
                Err(e) => errors.push(format!("object tier: {e}")),
            }
        }
        Err(Status::data_loss(format!(
            "pack {id} could not be restored on chunk server {}: {}",
            self.inner.node_id,
            if errors.is_empty() {
                "no other copy is known".to_string()
            } else {
                errors.join("; ")
            }
        )))
    }

    /// Copies pack `id` from a peer's local copy, verifies and installs it.
    async fn copy_from_peer(&self, id: u64, peer: &str) -> Result<u64, String> {
        use std::io::Write;
        let mut client = self.peer(peer).map_err(|s| s.message().to_string())?;
        let stat = client
            .pack_stat(PackStatRequest { pack_id: id })
            .await
            .map_err(|s| s.message().to_string())?
            .into_inner();
        if !stat.present {
            return Err("has no copy".into());
        }
        let tmp = self.inner.store.restore_path(id).map_err(|e| e.to_string())?;
        let mut file = std::fs::File::create(&tmp).map_err(|e| e.to_string())?;
        let mut offset = 0;
        while offset < stat.bytes {
            let len = (stat.bytes - offset).min(COPY_PIECE) as u32;
            let mut stream = client
                .get_frames(GetFramesRequest {
                    pack_id: id,
                    ranges: vec![FrameRange { offset, len }],
                    object_key: String::new(),
                    readahead: false,
                })
                .await
                .map_err(|s| s.message().to_string())?
                .into_inner();
            while let Some(piece) = stream.message().await.map_err(|s| s.message().to_string())? {
                file.write_all(&piece.data).map_err(|e| e.to_string())?;
                offset += piece.data.len() as u64;
            }
        }
        drop(file);
        let store = self.inner.store.clone();
        tokio::task::spawn_blocking(move || store.install_restored(id))
            .await
            .map_err(|e| e.to_string())?
    }

    /// Verifies every local pack; see the `Scrub` RPC.
    pub async fn scrub(&self, repair: bool) -> serde_json::Value {
        let store = self.inner.store.clone();
        let ids: Vec<u64> = match store.list_sealed() {
            Ok(list) => list.into_iter().map(|(id, _)| id).collect(),
            Err(e) => return serde_json::json!({"node": self.inner.node_id, "error": e.to_string()}),
        };
        let (mut bytes, mut bad, mut repaired, mut failed) = (0u64, Vec::new(), Vec::new(), Vec::new());
        for id in &ids {
            let id = *id;
            let path = store.sealed_path(id);
            let result = tokio::task::spawn_blocking(move || verify_pack(&path, id))
                .await
                .unwrap_or_else(|e| Err(e.to_string()));
            match result {
                Ok(len) => bytes += len,
                Err(e) if !store.sealed_path(id).exists() => {
                    tracing::debug!(pack = id, "pack went away during the scrub: {e}");
                }
                Err(e) => {
                    tracing::warn!(pack = id, "scrub found a damaged pack: {e}");
                    bad.push(id);
                    if !repair {
                        continue; // report only: the copy stays where it is
                    }
                    let moved = match store.quarantine(id) {
                        Ok(moved) => moved,
                        Err(q) => {
                            failed.push(
                                serde_json::json!({"pack": id, "error": format!("cannot quarantine: {q}")}),
                            );
                            continue;
                        }
                    };
                    match self.repair(id).await {
                        Ok(source) => repaired.push(serde_json::json!({"pack": id, "from": source})),
                        Err(e) => {
                            // No good copy anywhere: the damaged one goes back, so its
                            // intact frames stay readable and the next scrub reports it again.
                            if !store.sealed_path(id).exists() {
                                if let Err(r) = std::fs::rename(&moved, store.sealed_path(id)) {
                                    tracing::warn!(pack = id, "cannot put the damaged copy back: {r}");
                                }
                            }
                            failed.push(serde_json::json!({"pack": id, "error": e}));
                        }
                    }
                }
            }
        }
        serde_json::json!({
            "node": self.inner.node_id,
            "packs": ids.len(),
            "bytes": bytes,
            "bad": bad,
            "repaired": repaired,
            "failed": failed,
        })
    }

    /// Restores a quarantined pack from its other replicas or the object tier.
    async fn repair(&self, id: u64) -> Result<String, String> {
        let info = match self.inner.meta.get_pack(id).await {
            Ok(info) => info,
            Err(e) if e.code() == Some(tonic::Code::NotFound) => {
                return Ok("nothing: the pack is not registered (garbage)".into())
            }
            Err(e) => return Err(e.to_string()),
        };
        let nodes = self.inner.meta.list_nodes().await.map_err(|e| e.to_string())?;
        let peers: Vec<String> = info
            .replicas
            .iter()
            .filter(|r| **r != self.inner.node_id)
            .filter_map(|r| nodes.iter().find(|n| n.id == *r).map(|n| n.addr.clone()))
            .collect();
        self.restore(id, &peers, &info.object_key)
            .await
            .map(|(_, source)| source)
            .map_err(|s| s.message().to_string())
    }

    /// The tonic service with Granary's message size limits.
    pub fn server(self) -> ChunkServer<Self> {
        ChunkServer::new(self)
            .max_decoding_message_size(granary_client::MAX_MESSAGE)
            .max_encoding_message_size(granary_client::MAX_MESSAGE)
    }

    fn peer(&self, addr: &str) -> Result<ChunkClient<Channel>, Status> {
        self.inner.peers.client(addr)
    }

    /// Runs one pack session; on error the caller aborts the local file.
    async fn session(
        &self,
        session: &PackSession,
        first: WritePackRequest,
        rest: Streaming<WritePackRequest>,
    ) -> Result<WritePackReply, Status> {
        let node = self.inner.node_id;
        let id = session.pack_id;
        let (down_tx, mut downstream) = self.downstream(session).await?;
        let writer = if session.frames_in_incoming {
            if !first.frames.is_empty() || !first.seal {
                return Err(Status::invalid_argument(
                    "a pack written into incoming/ is handed over in one message, with seal set and no frames",
                ));
            }
            self.receive_incoming(id, down_tx.as_ref(), &mut downstream)
                .await?
        } else {
            self.receive_stream(id, first, rest, down_tx.as_ref(), &mut downstream)
                .await?
        };
        drop(down_tx);
        let store = self.inner.store.clone();
        let sealed =
            tokio::task::block_in_place(|| store.finish(writer)).map_err(|e| pack_status(node, id, e))?;
        // From here on the work must finish even if the client goes away, so
        // it runs in its own task: wait for the rest of the chain, register.
        let this = self.clone();
        let register = session.register;
        let downstream = downstream.take();
        let replica_ids = session.replica_ids.clone();
        tokio::spawn(async move {
            // Whether the pack may be registered despite the error (the
            // outcome of RegisterPack is unknown): then the copy stays, and
            // the sweep of unregistered packs decides after its grace period.
            let mut maybe_registered = false;
            let result = async {
                if let Some(call) = downstream {
                    call.await.map_err(|e| Status::internal(e.to_string()))??;
                }
                if register {
                    this.register(id, &sealed, replica_ids)
                        .await
                        .map_err(|(status, unknown)| {
                            maybe_registered = unknown;
                            status
                        })?;
                }
                Ok(WritePackReply {
                    pack_id: id,
                    bytes: sealed.len,
                    chunks: sealed.entries.len() as u64,
                })
            }
            .await;
            if result.is_err() && !maybe_registered {
                // This copy will never be registered: drop it now rather than
                // leave it to the sweep.
                this.inner.store.remove_sealed(id);
            }
            result
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
    }

    /// Starts the session with the next replica of the chain, if any: the
    /// channel to send it frames on, and the call's outcome.
    async fn downstream(&self, session: &PackSession) -> Result<(Option<DownTx>, Option<DownCall>), Status> {
        let Some((next, later)) = session.chain.split_first() else {
            return Ok((None, None));
        };
        let (tx, rx) = mpsc::channel::<WritePackRequest>(8);
        let mut client = self.peer(next)?;
        let next = next.clone();
        let first = WritePackRequest {
            session: Some(PackSession {
                pack_id: session.pack_id,
                chain: later.to_vec(),
                replica_ids: session.replica_ids.clone(),
                register: false,
                frames_in_incoming: false,
            }),
            frames: Default::default(),
            seal: false,
        };
        tx.send(first)
            .await
            .map_err(|_| Status::internal("downstream channel closed"))?;
        let call = tokio::spawn(async move {
            client
                .write_pack(ReceiverStream::new(rx))
                .await
                .map(|r| r.into_inner())
                .map_err(|s| {
                    Status::unavailable(format!(
                        "replica {next} failed: {}",
                        granary_client::error::status_cause(&s)
                    ))
                })
        });
        Ok((Some(tx), Some(call)))
    }

    /// Writes the frames a client streams into a new pack file, forwarding
    /// each message down the chain, until the message that seals it.
    async fn receive_stream(
        &self,
        id: u64,
        first: WritePackRequest,
        mut rest: Streaming<WritePackRequest>,
        down_tx: Option<&DownTx>,
        downstream: &mut Option<DownCall>,
    ) -> Result<PackWriter, Status> {
        let node = self.inner.node_id;
        let mut writer = self
            .inner
            .store
            .create(id)
            .map_err(|e| pack_status(node, id, e))?;
        let full = |(free, reserve): (u64, u64)| {
            Status::resource_exhausted(format!(
                "chunk server {node} is out of disk space ({} MiB free, {} MiB kept for metadata); \
                 free space or add chunk servers",
                free >> 20,
                reserve >> 20
            ))
        };
        self.inner.store.check_space(WRITEBACK_STEP).map_err(full)?;
        let mut msg = first;
        let mut written_back = 0u64;
        loop {
            let seal = msg.seal;
            if !msg.frames.is_empty() || seal {
                forward(down_tx, downstream, msg.frames.clone(), seal).await?;
                let buf = std::mem::take(&mut msg.frames);
                let store = &self.inner.store;
                writer = tokio::task::block_in_place(|| {
                    let mut w = writer;
                    w.append_frames(&buf)?;
                    if w.len() - written_back >= WRITEBACK_STEP {
                        store.start_writeback(&mut w, written_back)?;
                        written_back = w.len();
                        if let Err(space) = store.check_space(WRITEBACK_STEP) {
                            return Ok(Err(space));
                        }
                    }
                    Ok(Ok(w))
                })
                .map_err(|e| pack_status(node, id, e))?
                .map_err(full)?;
            }
            if seal {
                return Ok(writer);
            }
            msg = rest.message().await?.ok_or_else(|| {
                Status::aborted(format!(
                    "the session for pack {id} ended before the pack was complete"
                ))
            })?;
        }
    }

    /// Takes over the pack a client on this host wrote into `incoming/`:
    /// verifies every frame (as if it had been streamed) and forwards them
    /// down the chain; the file is then sealed where it is and renamed into
    /// place, so its bytes are written to this disk once.
    async fn receive_incoming(
        &self,
        id: u64,
        down_tx: Option<&DownTx>,
        downstream: &mut Option<DownCall>,
    ) -> Result<PackWriter, Status> {
        let node = self.inner.node_id;
        let store = &self.inner.store;
        let mut adopted =
            tokio::task::block_in_place(|| store.adopt(id)).map_err(|e| pack_status(node, id, e))?;
        loop {
            let run =
                tokio::task::block_in_place(|| adopted.next_run()).map_err(|e| pack_status(node, id, e))?;
            let seal = run.is_none();
            forward(down_tx, downstream, run.unwrap_or_default(), seal).await?;
            if seal {
                return adopted.into_writer().map_err(|e| pack_status(node, id, e));
            }
        }
    }

    /// Registers a sealed pack and its chunks in meta. An error that leaves
    /// the outcome unknown (the leader died mid-write) is resolved by asking
    /// whether the pack is registered; if that cannot be answered either, the
    /// error says so (`true`): the entry may still commit, so the copies
    /// must stay.
    async fn register(&self, id: u64, sealed: &SealedPack, replicas: Vec<u64>) -> Result<(), (Status, bool)> {
        let chunks = sealed
            .entries
            .iter()
            .map(|e| ChunkLocation {
                id: e.id.as_bytes().to_vec(),
                pack: id,
                offset: e.offset,
                stored_len: e.stored_len,
                raw_len: e.raw_len,
            })
            .collect();
        let pack = PackInfo {
            id,
            tier: "ssd".into(),
            replicas,
            bytes: sealed.len,
            chunks: sealed.entries.len() as u64,
            object_key: String::new(),
            moving_to: String::new(),
        };
        let request = RegisterPackRequest {
            pack: Some(pack),
            chunks,
        };
        match self.inner.meta.register_pack(request).await {
            Ok(_) => Ok(()),
            // Applied and refused: the pack is not registered.
            Err(e) if is_refusal(&e) => Err((
                Status::failed_precondition(format!("pack {id} was not registered: {e}")),
                false,
            )),
            Err(e) => match self.inner.meta.get_pack(id).await {
                Ok(_) => Ok(()),
                Err(_) => Err((
                    Status::unavailable(format!(
                        "pack {id} is stored but could not be registered: {e}; retry the upload"
                    )),
                    true,
                )),
            },
        }
    }
}

/// An error meta answers after applying (or refusing to apply) a command,
/// as opposed to one that leaves its outcome unknown.
fn is_refusal(e: &granary_client::ClientError) -> bool {
    use tonic::Code;
    matches!(
        e.code(),
        Some(Code::InvalidArgument | Code::NotFound | Code::AlreadyExists | Code::FailedPrecondition)
    )
}

/// Frames on their way to the next replica of a pack session.
type DownTx = mpsc::Sender<WritePackRequest>;
/// The next replica's pack session.
type DownCall = JoinHandle<Result<WritePackReply, Status>>;

/// Sends frames (and whether they seal the pack) to the next replica, if
/// any; when it has given up, its own error.
async fn forward(
    down_tx: Option<&DownTx>,
    downstream: &mut Option<DownCall>,
    frames: bytes::Bytes,
    seal: bool,
) -> Result<(), Status> {
    let Some(tx) = down_tx else {
        return Ok(());
    };
    let msg = WritePackRequest {
        session: None,
        frames,
        seal,
    };
    if tx.send(msg).await.is_err() {
        return Err(downstream_error(downstream.take()).await);
    }
    Ok(())
}

/// The error of a downstream replica's session (which has ended).
async fn downstream_error(call: Option<JoinHandle<Result<WritePackReply, Status>>>) -> Status {
    match call {
        Some(call) => match call.await {
            Ok(Err(status)) => status,
            Ok(Ok(_)) => Status::internal("the next replica ended the session early"),
            Err(e) => Status::internal(e.to_string()),
        },
        None => Status::internal("no downstream replica"),
    }
}

#[tonic::async_trait]
impl Chunk for ChunkService {
    async fn write_pack(
        &self,
        req: Request<Streaming<WritePackRequest>>,
    ) -> Result<Response<WritePackReply>, Status> {
        let mut stream = req.into_inner();
        let first = stream
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("empty pack session"))?;
        let session = first.session.ok_or_else(|| {
            Status::invalid_argument("the first message of a pack session must carry the session")
        })?;
        let id = session.pack_id;
        let first = WritePackRequest {
            session: None,
            frames: first.frames,
            seal: first.seal,
        };
        match self.session(&session, first, stream).await {
            Ok(reply) => Ok(Response::new(reply)),
            Err(status) => {
                self.inner.store.abort(id);
                tracing::warn!(pack = id, "pack session failed: {}", status.message());
                Err(status)
            }
        }
    }

    type GetFramesStream = ReceiverStream<Result<FrameData, Status>>;

    async fn get_frames(
        &self,
        req: Request<GetFramesRequest>,
    ) -> Result<Response<Self::GetFramesStream>, Status> {
        let GetFramesRequest {
            pack_id,
            ranges,
            object_key,
            readahead,
        } = req.into_inner();
        let ranges: Vec<(u64, u32)> = ranges.iter().map(|r| (r.offset, r.len)).collect();
        if ranges.iter().map(|(_, l)| *l as usize).sum::<usize>() > MAX_READ {
            return Err(Status::invalid_argument(
                "GetFrames asks for more than 64 MiB; split the request",
            ));
        }
        let store = self.inner.store.clone();
        let node = self.inner.node_id;
        let local = {
            let ranges = ranges.clone();
            tokio::task::spawn_blocking(move || store.read_ranges(pack_id, &ranges))
                .await
                .map_err(internal)?
        };
        let data = match local {
            Ok(data) => data,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !object_key.is_empty() => self
                .inner
                .blocks
                .get_ranges(&object_key, &ranges, readahead)
                .await
                .map_err(|e| match e {
                    granary_client::object::ObjectError::NotFound { .. } => Status::not_found(e.to_string()),
                    _ => Status::unavailable(e.to_string()),
                })?,
            Err(e) => {
                return Err(match e.kind() {
                    std::io::ErrorKind::NotFound => {
                        Status::not_found(format!("pack {pack_id} is not on chunk server {node}"))
                    }
                    std::io::ErrorKind::InvalidInput => Status::out_of_range(e.to_string()),
                    _ => Status::internal(format!("chunk server {node} cannot read pack {pack_id}: {e}")),
                })
            }
        };
        self.inner
            .reads
            .lock()
            .expect("reads lock")
            .insert(pack_id, now_ms());
        let wanted: usize = ranges.iter().map(|(_, l)| *l as usize).sum();
        if data.len() != wanted {
            return Err(Status::internal(format!(
                "chunk server {node} read {} of {wanted} bytes of pack {pack_id}",
                data.len()
            )));
        }
        let (tx, rx) = mpsc::channel(4);
        let data = bytes::Bytes::from(data);
        // Pieces of at most READ_PIECE, cut at frame boundaries (no copy:
        // slices of one buffer), so the client decodes frames in place.
        let mut pieces = Vec::new();
        let (mut start, mut end) = (0, 0);
        for (_, len) in &ranges {
            let len = *len as usize;
            if end > start && end + len - start > READ_PIECE {
                pieces.push(data.slice(start..end));
                start = end;
            }
            end += len;
        }
        if end > start {
            pieces.push(data.slice(start..end));
        }
        tokio::spawn(async move {
            for data in pieces {
                if tx.send(Ok(FrameData { data })).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn pack_stat(&self, req: Request<PackStatRequest>) -> Result<Response<PackStatReply>, Status> {
        let id = req.into_inner().pack_id;
        let size = self.inner.store.size(id);
        Ok(Response::new(PackStatReply {
            present: size.is_some(),
            bytes: size.unwrap_or(0),
        }))
    }

    async fn object_store(
        &self,
        _: Request<ObjectStoreRequest>,
    ) -> Result<Response<ObjectStoreReply>, Status> {
        Ok(Response::new(ObjectStoreReply {
            url: self.inner.objects.url().to_string(),
            node_default: self.inner.objects.is_node_default(),
            s3_endpoint: self.inner.objects.endpoint().to_string(),
        }))
    }

    async fn local_reads(&self, _: Request<LocalReadsRequest>) -> Result<Response<LocalReadsReply>, Status> {
        let t = &self.inner.local_token;
        let store = &self.inner.store;
        Ok(Response::new(LocalReadsReply {
            packs_dir: store.dir().to_string_lossy().into_owned(),
            token_path: t.path.to_string_lossy().into_owned(),
            token: t.token.clone(),
            incoming_dir: store.incoming_dir().to_string_lossy().into_owned(),
            reserve_bytes: store.reserve(),
        }))
    }

    async fn touch_packs(
        &self,
        req: Request<TouchPacksRequest>,
    ) -> Result<Response<TouchPacksReply>, Status> {
        let now = now_ms();
        let mut reads = self.inner.reads.lock().expect("reads lock");
        for id in req.into_inner().pack_ids {
            reads.insert(id, now);
        }
        Ok(Response::new(TouchPacksReply {}))
    }

    async fn upload_pack(
        &self,
        req: Request<UploadPackRequest>,
    ) -> Result<Response<UploadPackReply>, Status> {
        let UploadPackRequest { pack_id, object_key } = req.into_inner();
        if object_key.is_empty() {
            return Err(Status::invalid_argument("UploadPack needs the object key"));
        }
        let path = self.inner.store.sealed_path(pack_id);
        if !path.exists() {
            return Err(Status::not_found(format!(
                "pack {pack_id} is not on chunk server {}",
                self.inner.node_id
            )));
        }
        crate::fault::point("upload-before-put");
        // Check every frame's CRC before the upload: a damaged local copy
        // must not become (or overwrite) the object-tier copy. The pack was
        // verified in full (BLAKE3) when it was written; the CRC finds damage
        // since, at a fraction of the CPU a full check takes. The upload then
        // reads the file from the page cache the check filled.
        let verified = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || verify_pack_crc(&path, pack_id))
                .await
                .map_err(internal)?
        };
        if let Err(e) = verified {
            return Err(Status::data_loss(format!(
                "chunk server {} will not upload pack {pack_id}: its copy is damaged ({e}); run `granary admin scrub`",
                self.inner.node_id
            )));
        }
        let bytes = self
            .inner
            .objects
            .put_file(&object_key, &path)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(Response::new(UploadPackReply { bytes }))
    }

    async fn restore_pack(
        &self,
        req: Request<RestorePackRequest>,
    ) -> Result<Response<RestorePackReply>, Status> {
        let RestorePackRequest {
            pack_id,
            peers,
            object_key,
        } = req.into_inner();
        let (bytes, source) = self.restore(pack_id, &peers, &object_key).await?;
        Ok(Response::new(RestorePackReply { bytes, source }))
    }

    async fn delete_pack(
        &self,
        req: Request<DeletePackRequest>,
    ) -> Result<Response<DeletePackReply>, Status> {
        let id = req.into_inner().pack_id;
        // Whoever asks read meta earlier; a copy meta lists for this server
        // (restored by a newer move or repair since) must stay, and so must
        // one a queued move may be restoring or reusing right now (it lists
        // the copy only once it is done). The lock keeps a restore from
        // reusing the file between the check and the unlink.
        let _copies = self.inner.copies.lock().await;
        let node = self.inner.node_id;
        match self.inner.meta.get_pack(id).await {
            Ok(p) if p.replicas.contains(&node) => {
                return Err(Status::failed_precondition(format!(
                    "pack {id} is listed as a replica on chunk server {node}; it is not deleted"
                )))
            }
            Ok(p) if !p.moving_to.is_empty() => {
                return Err(Status::failed_precondition(format!(
                    "pack {id} has a queued move to the {} tier; its copy on chunk server {node} is not deleted \
                     now (the sweep of unlisted packs removes it later if it stays unlisted)",
                    p.moving_to
                )))
            }
            Ok(_) => {}
            Err(e) if e.is_not_found() => {}
            Err(e) => {
                return Err(Status::unavailable(format!(
                    "cannot ask meta whether pack {id} may be deleted ({e}); the sweep of unlisted packs will delete it later"
                )))
            }
        }
        let deleted = self.inner.store.delete(id);
        if deleted {
            tracing::info!(pack = id, "deleted the local copy of a pack");
        }
        Ok(Response::new(DeletePackReply { deleted }))
    }

    async fn scrub(&self, req: Request<ScrubRequest>) -> Result<Response<ScrubReply>, Status> {
        let report = ChunkService::scrub(self, req.into_inner().repair).await;
        Ok(Response::new(ScrubReply {
            json: report.to_string(),
        }))
    }
}
