//! Reading sealed packs: validated index, verified chunk reads, full verification.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::format::{parse_header, parse_index, IndexEntry, Trailer, PACK_HEADER_LEN, TRAILER_LEN};
use super::PackError;
use crate::frame::{check_frame, decode_frame_into, FrameError};
use crate::id::ChunkId;

/// A sealed pack opened for reading. Reads use positioned I/O, so one reader
/// can serve many threads at once.
#[derive(Debug)]
pub struct PackReader {
    file: File,
    path: PathBuf,
    pack_id: u64,
    len: u64,
    entries: Vec<IndexEntry>,
    /// Indices into `entries`, sorted by chunk id.
    by_id: Vec<u32>,
}

/// Result of verifying every frame of a pack.
#[derive(Debug, Default)]
pub struct VerifyReport {
    /// Frames that decoded and matched their ids.
    pub ok: usize,
    /// Frames that did not, with the reason.
    pub bad: Vec<(IndexEntry, FrameError)>,
}

impl PackReader {
    /// Opens a sealed pack, validating header, trailer, index checksum and layout.
    pub fn open(path: &Path) -> Result<Self, PackError> {
        let file = File::open(path).map_err(|e| PackError::io(path, e))?;
        let len = file.metadata().map_err(|e| PackError::io(path, e))?.len();
        let footer_err = |reason| PackError::BadFooter {
            path: path.to_path_buf(),
            reason,
        };
        if len < (PACK_HEADER_LEN + TRAILER_LEN) as u64 {
            return Err(footer_err("file too short to be a sealed pack"));
        }
        let mut header = [0u8; PACK_HEADER_LEN];
        file.read_exact_at(&mut header, 0)
            .map_err(|e| PackError::io(path, e))?;
        let pack_id = parse_header(&header).map_err(|reason| PackError::BadHeader {
            path: path.to_path_buf(),
            reason,
        })?;
        let mut t = [0u8; TRAILER_LEN];
        file.read_exact_at(&mut t, len - TRAILER_LEN as u64)
            .map_err(|e| PackError::io(path, e))?;
        let trailer = Trailer::parse(&t, len).map_err(footer_err)?;
        let range = trailer.index_range();
        let mut index = vec![0u8; (range.end - range.start) as usize];
        file.read_exact_at(&mut index, range.start)
            .map_err(|e| PackError::io(path, e))?;
        let entries = parse_index(&header, &index, &trailer).map_err(footer_err)?;
        let mut by_id: Vec<u32> = (0..entries.len() as u32).collect();
        by_id.sort_by_key(|&i| entries[i as usize].id);
        Ok(Self {
            file,
            path: path.to_path_buf(),
            pack_id,
            len,
            entries,
            by_id,
        })
    }

    /// The pack id from the header.
    pub fn pack_id(&self) -> u64 {
        self.pack_id
    }

    /// Size of the pack file.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when the pack holds no frames.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// All frames in file order.
    pub fn entries(&self) -> &[IndexEntry] {
        &self.entries
    }

    /// The index entry for chunk `id`, if the pack holds it.
    pub fn find(&self, id: &ChunkId) -> Option<&IndexEntry> {
        self.by_id
            .binary_search_by(|&i| self.entries[i as usize].id.cmp(id))
            .ok()
            .map(|k| &self.entries[self.by_id[k] as usize])
    }

    /// The stored frame bytes of `entry`, unverified (for forwarding).
    pub fn read_frame(&self, entry: &IndexEntry) -> Result<Vec<u8>, PackError> {
        let mut buf = vec![0u8; entry.frame_len() as usize];
        self.file
            .read_exact_at(&mut buf, entry.offset)
            .map_err(|e| PackError::io(&self.path, e))?;
        Ok(buf)
    }

    /// Reads, decodes and verifies chunk `id`.
    pub fn read_chunk(&self, id: &ChunkId) -> Result<Vec<u8>, PackError> {
        let entry = *self.find(id).ok_or_else(|| PackError::NotFound {
            path: self.path.clone(),
            id: *id,
        })?;
        let frame = self.read_frame(&entry)?;
        let mut raw = Vec::with_capacity(entry.raw_len as usize);
        decode_frame_into(&frame, Some(id), &mut raw).map_err(|source| PackError::BadFrame {
            path: self.path.clone(),
            offset: entry.offset,
            source,
        })?;
        Ok(raw)
    }

    /// Checks every frame's header, CRC-32 and agreement with the index,
    /// without decompressing or hashing ([`check_frame`]): finds damage done
    /// to a pack since it was verified in full when it was written, at a
    /// fraction of [`Self::verify`]'s cost.
    pub fn verify_crc(&self) -> Result<VerifyReport, PackError> {
        self.check_each(|buf, e| check_frame(buf, Some(&e.id)))
    }

    /// Decodes and verifies every frame, reading the pack sequentially.
    pub fn verify(&self) -> Result<VerifyReport, PackError> {
        let mut raw = Vec::new();
        self.check_each(|buf, e| {
            raw.clear();
            decode_frame_into(buf, Some(&e.id), &mut raw)
        })
    }

    fn check_each(
        &self,
        mut check: impl FnMut(&[u8], &IndexEntry) -> Result<crate::frame::FrameHeader, FrameError>,
    ) -> Result<VerifyReport, PackError> {
        let mut report = VerifyReport::default();
        let mut buf = Vec::new();
        for e in &self.entries {
            buf.resize(e.frame_len() as usize, 0);
            self.file
                .read_exact_at(&mut buf, e.offset)
                .map_err(|err| PackError::io(&self.path, err))?;
            match check(&buf, e) {
                Ok(h) if h.stored_len == e.stored_len && h.raw_len == e.raw_len => report.ok += 1,
                Ok(_) => report
                    .bad
                    .push((*e, FrameError::Corrupt("frame header disagrees with the index"))),
                Err(err) => report.bad.push((*e, err)),
            }
        }
        Ok(report)
    }
}
