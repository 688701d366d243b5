//! Adopting an unsealed pack that another process wrote: a client on the
//! chunk server's host writes the header and frames of a new pack straight
//! into the server's disk, and the server reads it back, verifies every
//! frame as if it had received it, and seals it in place (no second copy).

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;

use super::format::{parse_header, IndexEntry, PACK_HEADER_LEN};
use super::writer::{index_run, PackWriter};
use super::PackError;
use crate::frame::{FrameError, FrameHeader, FRAME_HEADER_LEN};

/// Bytes read and verified at a time.
const RUN: usize = 1 << 20;

/// An unsealed pack file being verified, one run of whole frames at a time
/// ([`next_run`](Self::next_run)), before it becomes a [`PackWriter`] that
/// can seal it ([`into_writer`](Self::into_writer)).
pub struct AdoptedPack {
    file: File,
    path: PathBuf,
    header: [u8; PACK_HEADER_LEN],
    pack_id: u64,
    file_len: u64,
    /// File offset of the first byte not verified yet.
    pos: u64,
    entries: Vec<IndexEntry>,
    scratch: Vec<u8>,
}

impl AdoptedPack {
    /// Starts adopting `file` (open for reading and writing, at `path`),
    /// which must hold the header of pack `pack_id` followed by frames.
    pub fn open(file: File, path: &Path, pack_id: u64) -> Result<Self, PackError> {
        let io = |e| PackError::io(path, e);
        let file_len = file.metadata().map_err(io)?.len();
        let mut header = [0u8; PACK_HEADER_LEN];
        let bad = |reason| PackError::BadHeader {
            path: path.to_path_buf(),
            reason,
        };
        if file_len < PACK_HEADER_LEN as u64 {
            return Err(bad("file shorter than a pack header"));
        }
        file.read_exact_at(&mut header, 0).map_err(io)?;
        if parse_header(&header).map_err(bad)? != pack_id {
            return Err(bad("the header names another pack"));
        }
        Ok(Self {
            file,
            path: path.to_path_buf(),
            header,
            pack_id,
            file_len,
            pos: PACK_HEADER_LEN as u64,
            entries: Vec::new(),
            scratch: Vec::new(),
        })
    }

    /// The next run of about 1 MiB of whole frames, each verified
    /// completely (as [`PackWriter::append_frames`] does), or `None` at the
    /// end of the file. A damaged frame, or a file that ends inside one, is
    /// an error.
    pub fn next_run(&mut self) -> Result<Option<Bytes>, PackError> {
        if self.pos >= self.file_len {
            return Ok(None);
        }
        let left = (self.file_len - self.pos) as usize;
        let mut want = left.min(RUN);
        let mut buf = Vec::new();
        let end = loop {
            let have = buf.len();
            buf.resize(want, 0);
            self.file
                .read_exact_at(&mut buf[have..], self.pos + have as u64)
                .map_err(|e| PackError::io(&self.path, e))?;
            // Whole frames at the start of `buf`.
            let mut end = 0;
            let mut next_len = 0;
            while end + FRAME_HEADER_LEN <= buf.len() {
                let h = FrameHeader::parse(&buf[end..]).map_err(|source| self.bad(end, source))?;
                if end + h.frame_len() > buf.len() {
                    next_len = h.frame_len();
                    break;
                }
                end += h.frame_len();
            }
            if end > 0 {
                break end;
            }
            // One frame larger than a run (or a file that ends inside one).
            if want == left {
                return Err(self.bad(
                    0,
                    FrameError::Truncated {
                        needed: next_len.max(FRAME_HEADER_LEN),
                        have: left,
                    },
                ));
            }
            want = left.min(next_len.max(FRAME_HEADER_LEN));
        };
        buf.truncate(end);
        let entries = index_run(&self.path, self.pos, &buf, &mut self.scratch)?;
        self.entries.extend(entries);
        self.pos += end as u64;
        Ok(Some(Bytes::from(buf)))
    }

    fn bad(&self, at: usize, source: FrameError) -> PackError {
        PackError::BadFrame {
            path: self.path.clone(),
            offset: self.pos + at as u64,
            source,
        }
    }

    /// The pack, every frame verified, ready to be sealed. Fails if
    /// [`next_run`](Self::next_run) has not reached the end of the file.
    pub fn into_writer(mut self) -> Result<PackWriter, PackError> {
        if self.pos != self.file_len {
            return Err(PackError::BadFrame {
                path: self.path.clone(),
                offset: self.pos,
                source: FrameError::Corrupt("the pack was adopted before all of it was verified"),
            });
        }
        self.file
            .seek(SeekFrom::Start(self.pos))
            .map_err(|e| PackError::io(&self.path, e))?;
        Ok(PackWriter::from_parts(
            self.file,
            self.path,
            self.header,
            self.pack_id,
            self.pos,
            self.entries,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::frame_chunk;
    use crate::pack::{encode_header, PackReader};
    use std::io::Write;

    fn written(dir: &Path, id: u64, frames: &[Vec<u8>]) -> PathBuf {
        let path = dir.join(format!("{id}.part"));
        let mut f = File::create(&path).unwrap();
        f.write_all(&encode_header(id)).unwrap();
        for fr in frames {
            f.write_all(fr).unwrap();
        }
        path
    }

    fn open(path: &Path, id: u64) -> Result<AdoptedPack, PackError> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        AdoptedPack::open(f, path, id)
    }

    fn chunk(seed: u64, len: usize) -> Vec<u8> {
        let mut rng = fastrand::Rng::with_seed(seed);
        // Half text-like (compresses), half random.
        (0..len)
            .map(|i| {
                if seed.is_multiple_of(2) {
                    b"abcdefgh"[i % 8]
                } else {
                    rng.u8(..)
                }
            })
            .collect()
    }

    #[test]
    fn an_adopted_pack_seals_into_one_that_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        // Frames of every size class, one larger than a run.
        let sizes = [10, 5000, 70_000, 2 << 20, 300_000, 1];
        let raws: Vec<Vec<u8>> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| chunk(i as u64, n))
            .collect();
        let frames: Vec<Vec<u8>> = raws.iter().map(|r| frame_chunk(r).1).collect();
        let path = written(dir.path(), 9, &frames);
        let mut adopted = open(&path, 9).unwrap();
        let mut runs = Vec::new();
        while let Some(run) = adopted.next_run().unwrap() {
            runs.push(run);
        }
        assert_eq!(
            runs.concat(),
            frames.concat(),
            "the runs are the frames, in order"
        );
        let sealed = adopted.into_writer().unwrap().seal().unwrap();
        assert_eq!(sealed.entries.len(), sizes.len());
        let reader = PackReader::open(&path).unwrap();
        assert_eq!(reader.pack_id(), 9);
        for raw in &raws {
            assert_eq!(&reader.read_chunk(&crate::ChunkId::of(raw)).unwrap(), raw);
        }
        assert!(reader.verify().unwrap().bad.is_empty());
    }

    #[test]
    fn a_damaged_torn_or_misnamed_pack_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let frames: Vec<Vec<u8>> = (0..4).map(|i| frame_chunk(&chunk(i, 50_000)).1).collect();

        // Another pack's header.
        let path = written(dir.path(), 3, &frames);
        assert!(matches!(open(&path, 4), Err(PackError::BadHeader { .. })));

        // A flipped byte in the third frame's contents.
        let mut damaged = frames.clone();
        let n = damaged[2].len();
        damaged[2][n - 10] ^= 1;
        let path = written(dir.path(), 5, &damaged);
        let mut a = open(&path, 5).unwrap();
        let e = std::iter::from_fn(|| a.next_run().transpose()).find_map(Result::err);
        assert!(matches!(e, Some(PackError::BadFrame { .. })), "{e:?}");

        // The file ends inside the last frame.
        let path = written(dir.path(), 6, &frames);
        let len = std::fs::metadata(&path).unwrap().len();
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len - 7)
            .unwrap();
        let mut a = open(&path, 6).unwrap();
        let e = std::iter::from_fn(|| a.next_run().transpose()).find_map(Result::err);
        assert!(matches!(e, Some(PackError::BadFrame { .. })), "{e:?}");

        // Sealing before the end is refused.
        let path = written(dir.path(), 7, &frames);
        assert!(open(&path, 7).unwrap().into_writer().is_err());
    }
}
