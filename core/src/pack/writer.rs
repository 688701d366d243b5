//! Writing packs: append frames, seal, and recover an unsealed pack after a crash.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use super::format::{
    encode_footer, encode_header, parse_header, IndexEntry, Trailer, PACK_HEADER_LEN, TRAILER_LEN,
};
use super::PackError;
use crate::frame::{decode_frame_into, encode_frame, verify_frame, FrameHeader, FRAME_HEADER_LEN};
use crate::id::ChunkId;

/// Default size at which a pack is sealed: 64 MiB.
pub const DEFAULT_PACK_TARGET: u64 = 64 * 1024 * 1024;

/// An open, unsealed pack being appended to.
pub struct PackWriter {
    file: BufWriter<File>,
    path: PathBuf,
    header: [u8; PACK_HEADER_LEN],
    pack_id: u64,
    len: u64,
    entries: Vec<IndexEntry>,
    scratch: Vec<u8>,
}

/// What [`PackWriter::open_unsealed`] found and fixed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Complete, verified frames kept.
    pub frames: usize,
    /// Bytes of torn or damaged tail removed.
    pub truncated_bytes: u64,
}

/// Summary of a sealed pack.
#[derive(Debug, Clone)]
pub struct SealedPack {
    pub path: PathBuf,
    pub pack_id: u64,
    /// Total size of the pack file.
    pub len: u64,
    pub entries: Vec<IndexEntry>,
}

impl PackWriter {
    /// Creates a new pack file at `path` (which must not exist) and writes its header.
    pub fn create(path: &Path, pack_id: u64) -> Result<Self, PackError> {
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| PackError::io(path, e))?;
        let header = encode_header(pack_id);
        let mut file = BufWriter::with_capacity(1 << 20, file);
        file.write_all(&header).map_err(|e| PackError::io(path, e))?;
        Ok(Self {
            file,
            path: path.to_path_buf(),
            header,
            pack_id,
            len: PACK_HEADER_LEN as u64,
            entries: Vec::new(),
            scratch: Vec::new(),
        })
    }

    /// Reopens an unsealed pack after a crash: keeps every complete frame that
    /// verifies, truncates whatever follows the last one, and fsyncs.
    pub fn open_unsealed(path: &Path) -> Result<(Self, Recovery), PackError> {
        let io = |e| PackError::io(path, e);
        let mut file = OpenOptions::new().read(true).write(true).open(path).map_err(io)?;
        let file_len = file.metadata().map_err(io)?.len();
        if is_sealed(&mut file, file_len).map_err(io)? {
            return Err(PackError::Sealed {
                path: path.to_path_buf(),
            });
        }
        let mut reader = BufReader::with_capacity(1 << 20, &mut file);
        let mut header = [0u8; PACK_HEADER_LEN];
        reader.read_exact(&mut header).map_err(|_| PackError::BadHeader {
            path: path.to_path_buf(),
            reason: "file shorter than a pack header",
        })?;
        let pack_id = parse_header(&header).map_err(|reason| PackError::BadHeader {
            path: path.to_path_buf(),
            reason,
        })?;
        let mut entries = Vec::new();
        let mut pos = PACK_HEADER_LEN as u64;
        let mut frame = Vec::new();
        let mut raw = Vec::new();
        loop {
            frame.clear();
            frame.resize(FRAME_HEADER_LEN, 0);
            if read_full(&mut reader, &mut frame).map_err(io)? < FRAME_HEADER_LEN {
                break;
            }
            let Ok(h) = FrameHeader::parse(&frame) else {
                break;
            };
            frame.resize(h.frame_len(), 0);
            if read_full(&mut reader, &mut frame[FRAME_HEADER_LEN..]).map_err(io)? < h.stored_len as usize {
                break;
            }
            raw.clear();
            if decode_frame_into(&frame, None, &mut raw).is_err() {
                break;
            }
            entries.push(IndexEntry {
                id: h.id,
                offset: pos,
                stored_len: h.stored_len,
                raw_len: h.raw_len,
            });
            pos += h.frame_len() as u64;
        }
        drop(reader);
        let truncated_bytes = file_len - pos;
        if truncated_bytes > 0 {
            file.set_len(pos).map_err(io)?;
            file.sync_all().map_err(io)?;
        }
        file.seek(SeekFrom::Start(pos)).map_err(io)?;
        let recovery = Recovery {
            frames: entries.len(),
            truncated_bytes,
        };
        Ok((
            Self {
                file: BufWriter::with_capacity(1 << 20, file),
                path: path.to_path_buf(),
                header,
                pack_id,
                len: pos,
                entries,
                scratch: Vec::new(),
            },
            recovery,
        ))
    }

    /// A writer for a file whose header and verified frames are already
    /// there (see [`AdoptedPack`](super::AdoptedPack)), positioned at its end.
    pub(super) fn from_parts(
        file: File,
        path: PathBuf,
        header: [u8; PACK_HEADER_LEN],
        pack_id: u64,
        len: u64,
        entries: Vec<IndexEntry>,
    ) -> Self {
        Self {
            file: BufWriter::with_capacity(1 << 20, file),
            path,
            header,
            pack_id,
            len,
            entries,
            scratch: Vec::new(),
        }
    }

    /// Encodes `raw` (whose id is `id`) as a frame and appends it.
    pub fn append_chunk(&mut self, id: &ChunkId, raw: &[u8]) -> Result<IndexEntry, PackError> {
        let mut frame = std::mem::take(&mut self.scratch);
        frame.clear();
        encode_frame(id, raw, &mut frame);
        let result = self.write_frame(&frame);
        self.scratch = frame;
        result
    }

    /// Appends an already-encoded frame (e.g. one received from a client)
    /// after verifying it completely: a damaged frame is never written.
    pub fn append_frame(&mut self, frame: &[u8]) -> Result<IndexEntry, PackError> {
        let mut raw = std::mem::take(&mut self.scratch);
        raw.clear();
        let verified = decode_frame_into(frame, None, &mut raw);
        self.scratch = raw;
        verified.map_err(|source| PackError::BadFrame {
            path: self.path.clone(),
            offset: self.len,
            source,
        })?;
        self.write_frame(frame)
    }

    /// Appends a run of already-encoded frames, concatenated (as a client
    /// sends them), after verifying every one completely; if one is damaged
    /// or cut short nothing of the run is written. The run goes to the file
    /// in one write, without a copy through the write buffer when it is at
    /// least as large. Returns how many frames it held.
    pub fn append_frames(&mut self, run: &[u8]) -> Result<usize, PackError> {
        let mut scratch = std::mem::take(&mut self.scratch);
        let verified = index_run(&self.path, self.len, run, &mut scratch);
        self.scratch = scratch;
        let entries = verified?;
        let n = entries.len();
        self.file
            .write_all(run)
            .map_err(|e| PackError::io(&self.path, e))?;
        self.len += run.len() as u64;
        self.entries.extend(entries);
        Ok(n)
    }

    fn write_frame(&mut self, frame: &[u8]) -> Result<IndexEntry, PackError> {
        let h = FrameHeader::parse(frame).expect("frame was encoded or verified");
        self.file
            .write_all(frame)
            .map_err(|e| PackError::io(&self.path, e))?;
        let entry = IndexEntry {
            id: h.id,
            offset: self.len,
            stored_len: h.stored_len,
            raw_len: h.raw_len,
        };
        self.len += frame.len() as u64;
        self.entries.push(entry);
        Ok(entry)
    }

    /// Hands buffered frames to the OS (no fsync).
    pub fn flush(&mut self) -> Result<(), PackError> {
        self.file.flush().map_err(|e| PackError::io(&self.path, e))
    }

    /// Makes every appended frame durable (flush + fdatasync).
    pub fn sync(&mut self) -> Result<(), PackError> {
        self.file.flush().map_err(|e| PackError::io(&self.path, e))?;
        self.file
            .get_ref()
            .sync_data()
            .map_err(|e| PackError::io(&self.path, e))
    }

    /// Appends the index and trailer and fsyncs. The pack is immutable afterwards.
    pub fn seal(mut self) -> Result<SealedPack, PackError> {
        let footer = encode_footer(&self.header, &self.entries, self.len);
        self.file
            .write_all(&footer)
            .map_err(|e| PackError::io(&self.path, e))?;
        self.file.flush().map_err(|e| PackError::io(&self.path, e))?;
        self.file
            .get_ref()
            .sync_all()
            .map_err(|e| PackError::io(&self.path, e))?;
        Ok(SealedPack {
            path: self.path,
            pack_id: self.pack_id,
            len: self.len + footer.len() as u64,
            entries: self.entries,
        })
    }

    /// Bytes written so far (header + frames).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when no frame has been appended.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Frames appended so far.
    pub fn entries(&self) -> &[IndexEntry] {
        &self.entries
    }

    /// The pack's id, as written in its header.
    pub fn pack_id(&self) -> u64 {
        self.pack_id
    }

    /// The file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl std::os::unix::io::AsRawFd for PackWriter {
    fn as_raw_fd(&self) -> std::os::unix::io::RawFd {
        self.file.get_ref().as_raw_fd()
    }
}

/// The index entries of `run`, a run of frames that starts at file offset
/// `base` of the pack at `path`, each frame verified completely.
pub(super) fn index_run(
    path: &Path,
    base: u64,
    run: &[u8],
    scratch: &mut Vec<u8>,
) -> Result<Vec<IndexEntry>, PackError> {
    let mut entries = Vec::new();
    let mut pos = 0;
    while pos < run.len() {
        let offset = base + pos as u64;
        let bad = |source| PackError::BadFrame {
            path: path.to_path_buf(),
            offset,
            source,
        };
        let len = FrameHeader::parse(&run[pos..]).map_err(bad)?.frame_len();
        let end = (pos + len).min(run.len());
        let h = verify_frame(&run[pos..end], scratch).map_err(bad)?;
        entries.push(IndexEntry {
            id: h.id,
            offset,
            stored_len: h.stored_len,
            raw_len: h.raw_len,
        });
        pos = end;
    }
    Ok(entries)
}

/// True when the file ends in a trailer that matches its size.
fn is_sealed(file: &mut File, len: u64) -> std::io::Result<bool> {
    if len < (PACK_HEADER_LEN + TRAILER_LEN) as u64 {
        return Ok(false);
    }
    let mut t = [0u8; TRAILER_LEN];
    file.seek(SeekFrom::Start(len - TRAILER_LEN as u64))?;
    file.read_exact(&mut t)?;
    file.seek(SeekFrom::Start(0))?;
    Ok(Trailer::parse(&t, len).is_ok())
}

/// Reads until `buf` is full or EOF; returns the bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}
