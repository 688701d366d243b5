//! New packs on their way to their first replica.
//!
//! A pack goes to its first chunk server one of two ways:
//!
//! - **Streamed** (`WritePack`): frames in messages of about 1 MiB, which
//!   the server verifies, writes and forwards down the replica chain.
//! - **Written locally**: when the server is on this host (it proved it
//!   with its `LocalReads` token) and its disk has room, the client writes
//!   the pack's header and frames straight into the server's `incoming/`
//!   directory on a blocking thread, then hands the file over with one
//!   `WritePack` message (`frames_in_incoming`). The server verifies every
//!   frame as it would a streamed one, forwards them down the chain, and
//!   seals the file in place. The frames skip gRPC's encoding, both socket
//!   copies and the server's own write: an upload to the embedded server
//!   spends its CPU on chunking, hashing and compressing.
//!
//! Either way nothing is registered before every replica has fsynced the
//! pack, and a failed pack leaves no file behind (a client killed while
//! writing leaves one in `incoming/`, which the server removes at its next
//! start or after an hour). `GRANARY_LOCAL_WRITES=0` turns local writes off.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::chunk_proto::chunk_client::ChunkClient;
use crate::chunk_proto::{PackSession, WritePackReply, WritePackRequest};
use crate::chunks::server_err;
use crate::error::ClientError;

/// Frames are sent to chunk servers in messages of about this size.
pub(crate) const SEND_MESSAGE: usize = 1 << 20;
/// A local pack's bytes are handed to the kernel's writeback, and the disk's
/// free space checked, every this many bytes (as a chunk server does).
const WRITEBACK_STEP: u64 = 8 << 20;

/// A pack being sent to its first replica.
pub struct PackStream {
    pub id: u64,
    /// Frame bytes added so far.
    pub bytes: u64,
    to: To,
}

enum To {
    Server {
        tx: mpsc::Sender<WritePackRequest>,
        call: JoinHandle<Result<WritePackReply, ClientError>>,
        buf: Vec<u8>,
    },
    Incoming(Box<Incoming>),
}

/// A pack this client writes into a chunk server's `incoming/` directory.
struct Incoming {
    file: IncomingFile,
    /// Frames for the writer thread, about [`SEND_MESSAGE`] at a time.
    tx: mpsc::Sender<Vec<Vec<u8>>>,
    batch: Vec<Vec<u8>>,
    batch_bytes: usize,
    writer: JoinHandle<std::io::Result<()>>,
    client: ChunkClient<Channel>,
    addr: String,
    session: PackSession,
    node: u64,
}

/// The path of a pack written into `incoming/`, removed when dropped: a
/// pack that was not handed over (the upload failed or was dropped midway)
/// leaves nothing there; once handed over, the server has renamed or
/// removed the file, so there is nothing left to remove.
struct IncomingFile(PathBuf);

impl Drop for IncomingFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Where a chunk server on this host takes packs written by its clients.
#[derive(Debug, Clone)]
pub(crate) struct LocalIncoming {
    pub dir: PathBuf,
    /// Bytes the server's disk keeps free for its metadata.
    pub reserve: u64,
}

impl PackStream {
    /// A session streamed over `client`: its first message, with `session`,
    /// is sent at once.
    pub(crate) fn to_server(client: ChunkClient<Channel>, addr: &str, session: PackSession) -> Self {
        let id = session.pack_id;
        let mut client = client;
        let (tx, rx) = mpsc::channel::<WritePackRequest>(4);
        tx.try_send(WritePackRequest {
            session: Some(session),
            frames: Default::default(),
            seal: false,
        })
        .expect("fresh channel has room");
        let addr = addr.to_string();
        let call = tokio::spawn(async move {
            client
                .write_pack(ReceiverStream::new(rx))
                .await
                .map(|r| r.into_inner())
                .map_err(|s| server_err(&addr, s))
        });
        Self {
            id,
            bytes: 0,
            to: To::Server {
                tx,
                call,
                buf: Vec::with_capacity(SEND_MESSAGE + (256 << 10)),
            },
        }
    }

    /// A pack written into `incoming` of chunk server `node` (at `addr`, on
    /// this host), if its disk has room for `room` more bytes and the file
    /// can be created there; `None` otherwise (the caller streams it).
    pub(crate) async fn to_incoming(
        client: ChunkClient<Channel>,
        addr: &str,
        node: u64,
        session: PackSession,
        incoming: &LocalIncoming,
        room: u64,
    ) -> Option<Self> {
        let id = session.pack_id;
        let path = incoming.dir.join(format!("{id}.part"));
        let (dir, reserve) = (incoming.dir.clone(), incoming.reserve);
        let p = path.clone();
        let created = tokio::task::spawn_blocking(move || -> std::io::Result<File> {
            // The server adopts only files of its own user: a client running
            // as another (root, say) streams instead.
            use std::os::unix::fs::MetadataExt;
            // SAFETY: geteuid has no preconditions.
            if std::fs::metadata(&dir)?.uid() != unsafe { libc::geteuid() } {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    "the chunk server runs as another user",
                ));
            }
            match granary_core::pack::disk_space(&dir) {
                Some((_, free)) if free >= reserve + room => {}
                _ => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::StorageFull,
                        "too little room",
                    ))
                }
            }
            let mut f = File::options().write(true).create_new(true).open(&p)?;
            if let Err(e) = f.write_all(&granary_core::pack::encode_header(id)) {
                let _ = std::fs::remove_file(&p);
                return Err(e);
            }
            Ok(f)
        })
        .await;
        let file = match created {
            Ok(Ok(f)) => f,
            Ok(Err(e)) => {
                tracing::debug!(pack = id, path = %path.display(), "streaming the pack instead of writing it locally: {e}");
                return None;
            }
            Err(_) => return None,
        };
        let (tx, rx) = mpsc::channel::<Vec<Vec<u8>>>(4);
        let dir = incoming.dir.clone();
        let writer = tokio::task::spawn_blocking(move || write_incoming(file, rx, &dir, reserve));
        Some(Self {
            id,
            bytes: 0,
            to: To::Incoming(Box::new(Incoming {
                file: IncomingFile(path),
                tx,
                batch: Vec::new(),
                batch_bytes: 0,
                writer,
                client,
                addr: addr.to_string(),
                session,
                node,
            })),
        })
    }

    /// True when this pack is written into a local chunk server's disk.
    pub fn is_local(&self) -> bool {
        matches!(self.to, To::Incoming(_))
    }

    /// Adds one encoded frame.
    pub async fn push(mut self, frame: Vec<u8>) -> Result<Self, ClientError> {
        self.bytes += frame.len() as u64;
        let sent = match &mut self.to {
            To::Server { tx, buf, .. } => {
                buf.extend_from_slice(&frame);
                if buf.len() < SEND_MESSAGE {
                    return Ok(self);
                }
                let frames = std::mem::replace(buf, Vec::with_capacity(SEND_MESSAGE + (256 << 10)));
                let msg = WritePackRequest {
                    session: None,
                    frames: frames.into(),
                    seal: false,
                };
                tx.send(msg).await.is_ok()
            }
            To::Incoming(inc) => {
                inc.batch_bytes += frame.len();
                inc.batch.push(frame);
                if inc.batch_bytes < SEND_MESSAGE {
                    return Ok(self);
                }
                inc.batch_bytes = 0;
                let batch = std::mem::take(&mut inc.batch);
                inc.tx.send(batch).await.is_ok()
            }
        };
        if sent {
            Ok(self)
        } else {
            Err(self.failure().await)
        }
    }

    /// The session's error, once it has ended early.
    async fn failure(self) -> ClientError {
        match self.to {
            To::Server { call, .. } => session_error(call).await,
            To::Incoming(inc) => {
                let Incoming {
                    file,
                    writer,
                    node,
                    session,
                    ..
                } = *inc;
                writer_error(writer, node, session.pack_id, &file.0).await
            }
        }
    }

    /// Sends the rest, seals the pack and waits until every replica has it
    /// on disk and it is registered.
    pub async fn finish(self) -> Result<WritePackReply, ClientError> {
        match self.to {
            To::Server { tx, call, buf } => {
                let last = WritePackRequest {
                    session: None,
                    frames: buf.into(),
                    seal: true,
                };
                if tx.send(last).await.is_err() {
                    return Err(session_error(call).await);
                }
                drop(tx);
                call.await
                    .map_err(|e| ClientError::Invalid(format!("pack session task failed: {e}")))?
            }
            To::Incoming(inc) => {
                // `file` is removed when this returns, unless the server took it.
                let Incoming {
                    file,
                    tx,
                    batch,
                    writer,
                    mut client,
                    addr,
                    session,
                    node,
                    ..
                } = *inc;
                let id = session.pack_id;
                let queued = batch.is_empty() || tx.send(batch).await.is_ok();
                // Closing the channel ends the writer.
                drop(tx);
                if !queued {
                    return Err(writer_error(writer, node, id, &file.0).await);
                }
                match writer.await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return Err(local_write_err(node, id, &file.0, e)),
                    Err(e) => return Err(ClientError::Invalid(format!("pack writer task failed: {e}"))),
                }
                let hand_over = WritePackRequest {
                    session: Some(PackSession {
                        frames_in_incoming: true,
                        ..session
                    }),
                    frames: Default::default(),
                    seal: true,
                };
                client
                    .write_pack(tokio_stream::once(hand_over))
                    .await
                    .map(|r| r.into_inner())
                    .map_err(|s| server_err(&addr, s))
            }
        }
    }
}

/// The error of a streamed session that the server ended early.
async fn session_error(call: JoinHandle<Result<WritePackReply, ClientError>>) -> ClientError {
    match call.await {
        Ok(Err(e)) => e,
        Ok(Ok(_)) => ClientError::Invalid("pack session ended early".into()),
        Err(e) => ClientError::Invalid(format!("pack session task failed: {e}")),
    }
}

/// The error of a local pack's writer thread that stopped taking frames.
async fn writer_error(
    writer: JoinHandle<std::io::Result<()>>,
    node: u64,
    id: u64,
    path: &Path,
) -> ClientError {
    match writer.await {
        Ok(Err(e)) => local_write_err(node, id, path, e),
        Ok(Ok(())) => ClientError::Invalid(format!("writing pack {id} stopped early")),
        Err(e) => ClientError::Invalid(format!("pack writer task failed: {e}")),
    }
}

/// Writes batches of frames to a local pack file until the channel closes,
/// handing them to the kernel's writeback as it goes (the server fsyncs the
/// file when it seals it) and stopping when the disk would eat into the
/// server's reserve.
fn write_incoming(
    mut file: File,
    mut rx: mpsc::Receiver<Vec<Vec<u8>>>,
    dir: &Path,
    reserve: u64,
) -> std::io::Result<()> {
    use std::os::unix::io::AsRawFd;
    let mut written = granary_core::pack::PACK_HEADER_LEN as u64;
    let mut handed = 0u64;
    while let Some(batch) = rx.blocking_recv() {
        for frame in &batch {
            file.write_all(frame)?;
            written += frame.len() as u64;
        }
        if written - handed >= WRITEBACK_STEP {
            // SAFETY: a plain syscall on an open descriptor; only a hint.
            unsafe {
                libc::sync_file_range(
                    file.as_raw_fd(),
                    handed as i64,
                    (written - handed) as i64,
                    libc::SYNC_FILE_RANGE_WRITE,
                );
            }
            handed = written;
            if let Some((_, free)) = granary_core::pack::disk_space(dir) {
                if free < reserve + WRITEBACK_STEP {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::StorageFull,
                        format!("{} MiB free, {} MiB kept for metadata", free >> 20, reserve >> 20),
                    ));
                }
            }
        }
    }
    Ok(())
}

fn local_write_err(node: u64, id: u64, path: &Path, e: std::io::Error) -> ClientError {
    if e.kind() == std::io::ErrorKind::StorageFull {
        ClientError::Server {
            code: tonic::Code::ResourceExhausted,
            message: format!(
                "chunk server {node} is out of disk space writing pack {id} ({e}); free space or add chunk servers"
            ),
        }
    } else {
        ClientError::Invalid(format!("writing pack {id} to {}: {e}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(id: u64) -> PackSession {
        PackSession {
            pack_id: id,
            chain: Vec::new(),
            replica_ids: vec![1],
            register: true,
            frames_in_incoming: false,
        }
    }

    #[tokio::test]
    async fn a_local_pack_not_handed_over_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        // No server listens there: the pack is never handed over.
        let client = ChunkClient::new(Channel::from_static("http://127.0.0.1:1").connect_lazy());
        let incoming = LocalIncoming {
            dir: dir.path().to_path_buf(),
            reserve: 0,
        };
        let stream =
            PackStream::to_incoming(client.clone(), "127.0.0.1:1", 1, session(7), &incoming, 1 << 20)
                .await
                .expect("a local pack in a directory of this user with room");
        assert!(stream.is_local());
        let path = dir.path().join("7.part");
        assert!(path.is_file());
        let (_, frame) = granary_core::frame::frame_chunk(&[5u8; 3 << 20]);
        let stream = stream.push(frame).await.unwrap();
        drop(stream);
        assert!(!path.exists(), "a dropped pack left {}", path.display());

        // The hand-over fails (nothing listens): an error, and no file.
        let stream =
            PackStream::to_incoming(client.clone(), "127.0.0.1:1", 1, session(8), &incoming, 1 << 20)
                .await
                .unwrap();
        let (_, frame) = granary_core::frame::frame_chunk(b"one small chunk");
        let e = stream.push(frame).await.unwrap().finish().await.unwrap_err();
        assert!(e.to_string().contains("127.0.0.1:1"), "{e}");
        assert!(!dir.path().join("8.part").exists());

        // No room for the pack: the caller streams it instead.
        let full = LocalIncoming {
            dir: dir.path().to_path_buf(),
            reserve: u64::MAX / 2,
        };
        assert!(
            PackStream::to_incoming(client, "127.0.0.1:1", 1, session(9), &full, 1 << 20)
                .await
                .is_none()
        );
        assert!(!dir.path().join("9.part").exists());
    }
}
