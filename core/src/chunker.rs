//! Content-defined chunking with FastCDC.
//!
//! Files are cut where a rolling gear hash of the content matches a mask
//! (FastCDC 2020, normalization level 1, from the `fastcdc` crate), so an
//! insertion early in a file moves only the boundaries around it: the chunks
//! after it keep their bytes and therefore their ids. That is what makes
//! uploading version 2 of a dataset that changed 1% store about 1% more.
//!
//! Two entry points share the same cut function and so produce identical
//! chunks for identical bytes:
//! - [`Chunker::cuts`] over a slice that holds a whole file;
//! - [`ChunkReader`] over any [`Read`], holding at most one block of the
//!   stream in memory (the block is at least twice the maximum chunk size).

use std::io::{self, Read};

use fastcdc::v2020::{self, Normalization};

/// Chunk size limits. Defaults: 16 KiB minimum, 64 KiB average, 256 KiB maximum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkerConfig {
    /// No chunk is shorter than this, except the last chunk of a file.
    pub min_size: u32,
    /// The size chunks are normalized around.
    pub avg_size: u32,
    /// No chunk is longer than this.
    pub max_size: u32,
}

impl Default for ChunkerConfig {
    fn default() -> Self {
        Self {
            min_size: 16 * 1024,
            avg_size: 64 * 1024,
            max_size: 256 * 1024,
        }
    }
}

/// A chunker configuration outside the limits FastCDC supports.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid chunk sizes min={min} avg={avg} max={max}: {reason}")]
pub struct ChunkerConfigError {
    min: u32,
    avg: u32,
    max: u32,
    reason: &'static str,
}

impl ChunkerConfig {
    /// Tiny chunks (64 B / 256 B / 1 KiB) so tests reach many boundaries with little data.
    pub const fn tiny() -> Self {
        Self {
            min_size: 64,
            avg_size: 256,
            max_size: 1024,
        }
    }

    /// Checks the sizes against FastCDC's supported ranges.
    pub fn validate(&self) -> Result<(), ChunkerConfigError> {
        let (min, avg, max) = (
            self.min_size as usize,
            self.avg_size as usize,
            self.max_size as usize,
        );
        let reason = if !(v2020::MINIMUM_MIN..=v2020::MINIMUM_MAX).contains(&min) {
            Some("min must be between 64 B and 1 MiB")
        } else if !(v2020::AVERAGE_MIN..=v2020::AVERAGE_MAX).contains(&avg) {
            Some("avg must be between 256 B and 4 MiB")
        } else if !(v2020::MAXIMUM_MIN..=v2020::MAXIMUM_MAX).contains(&max) {
            Some("max must be between 1 KiB and 16 MiB")
        } else if !(min <= avg && avg <= max) {
            Some("sizes must satisfy min <= avg <= max")
        } else if min % 2 != 0 || avg % 2 != 0 || max % 2 != 0 {
            Some("sizes must be even")
        } else {
            None
        };
        match reason {
            Some(reason) => Err(ChunkerConfigError {
                min: self.min_size,
                avg: self.avg_size,
                max: self.max_size,
                reason,
            }),
            None => Ok(()),
        }
    }
}

/// A validated chunker: cheap to copy, shareable between threads.
#[derive(Debug, Clone, Copy)]
pub struct Chunker {
    config: ChunkerConfig,
    mask_s: u64,
    mask_l: u64,
}

impl Chunker {
    /// Builds a chunker after validating `config`.
    pub fn new(config: ChunkerConfig) -> Result<Self, ChunkerConfigError> {
        config.validate()?;
        let (mask_s, mask_l) = v2020::select_masks(config.avg_size as usize, Normalization::Level1);
        Ok(Self {
            config,
            mask_s,
            mask_l,
        })
    }

    /// The configuration this chunker was built from.
    pub fn config(&self) -> ChunkerConfig {
        self.config
    }

    /// Length of the chunk that starts at `data[0]`, where `data` is either
    /// at least `max_size` long or ends at the end of the stream.
    pub fn next_cut(&self, data: &[u8]) -> usize {
        let (_, len) = v2020::cut(
            data,
            self.config.min_size as usize,
            self.config.avg_size as usize,
            self.config.max_size as usize,
            self.mask_s,
            self.mask_l,
            self.mask_s << 1,
            self.mask_l << 1,
        );
        len
    }

    /// The end offsets of the chunks of `data`, which holds a whole stream.
    /// The last offset equals `data.len()`; an empty slice has no chunks.
    pub fn cuts(&self, data: &[u8]) -> Vec<usize> {
        let mut ends = Vec::with_capacity(data.len() / self.config.avg_size as usize + 1);
        self.cuts_into(data, true, &mut ends);
        ends
    }

    /// Appends to `ends` the chunk end offsets found in `data`. Without `eof`,
    /// a trailing part shorter than `max_size` is left uncut (its chunk may
    /// continue in bytes not yet read); returns the offset where cutting stopped.
    fn cuts_into(&self, data: &[u8], eof: bool, ends: &mut Vec<usize>) -> usize {
        let max = self.config.max_size as usize;
        let mut pos = 0;
        while pos < data.len() && (eof || data.len() - pos >= max) {
            pos += self.next_cut(&data[pos..]);
            ends.push(pos);
        }
        pos
    }

    /// Streams `reader` in blocks of `block_size` bytes (raised to at least
    /// twice `max_size`).
    pub fn reader<R: Read>(&self, reader: R, block_size: usize) -> ChunkReader<R> {
        let block_size = block_size.max(2 * self.config.max_size as usize);
        ChunkReader {
            chunker: *self,
            reader,
            buf: Vec::with_capacity(block_size),
            block_size,
            consumed: 0,
            ends: Vec::new(),
            eof: false,
            total: 0,
        }
    }
}

/// Streaming chunker over a [`Read`]: yields [`ChunkBatch`]es, each a block of
/// contiguous bytes with the chunk boundaries found in it. Memory stays at one
/// block however long the stream is.
pub struct ChunkReader<R> {
    chunker: Chunker,
    reader: R,
    buf: Vec<u8>,
    block_size: usize,
    /// Bytes at the front of `buf` that the previous batch handed out.
    consumed: usize,
    ends: Vec<usize>,
    eof: bool,
    total: u64,
}

/// A block of a stream and the chunks cut in it.
pub struct ChunkBatch<'a> {
    data: &'a [u8],
    ends: &'a [usize],
    /// Offset of `data[0]` in the stream.
    pub stream_offset: u64,
}

impl<'a> ChunkBatch<'a> {
    /// The chunks of this batch, in stream order.
    pub fn chunks(&self) -> impl ExactSizeIterator<Item = &'a [u8]> + Clone + 'a {
        let data = self.data;
        let ends = self.ends;
        (0..ends.len()).map(move |i| {
            let start = if i == 0 { 0 } else { ends[i - 1] };
            &data[start..ends[i]]
        })
    }

    /// The bytes of the batch; chunk `i` ends at `ends()[i]`.
    pub fn data(&self) -> &'a [u8] {
        self.data
    }

    /// End offsets of the chunks within [`data`](Self::data).
    pub fn ends(&self) -> &'a [usize] {
        self.ends
    }

    /// Number of chunks in the batch.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// True when the batch holds no chunk.
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// Bytes covered by the batch.
    pub fn bytes(&self) -> usize {
        self.ends.last().copied().unwrap_or(0)
    }
}

impl<R: Read> ChunkReader<R> {
    /// The next batch of chunks, or `None` at the end of the stream.
    pub fn next_batch(&mut self) -> io::Result<Option<ChunkBatch<'_>>> {
        // Drop what the previous batch handed out; keep its uncut tail.
        self.buf.drain(..self.consumed);
        self.total += self.consumed as u64;
        self.consumed = 0;
        self.ends.clear();
        loop {
            if !self.eof && self.buf.len() < self.block_size {
                self.fill()?;
            }
            if self.buf.is_empty() {
                return Ok(None);
            }
            let cut = self.chunker.cuts_into(&self.buf, self.eof, &mut self.ends);
            if cut > 0 {
                self.consumed = cut;
                return Ok(Some(ChunkBatch {
                    data: &self.buf[..cut],
                    ends: &self.ends,
                    stream_offset: self.total,
                }));
            }
            // Not enough bytes for a full-size chunk yet and not at EOF: read more.
        }
    }

    /// Total bytes handed out in batches so far, including the current one.
    pub fn bytes_read(&self) -> u64 {
        self.total + self.consumed as u64
    }

    /// Gives back the underlying reader.
    pub fn into_inner(self) -> R {
        self.reader
    }

    fn fill(&mut self) -> io::Result<()> {
        let start = self.buf.len();
        self.buf.resize(self.block_size, 0);
        let mut filled = start;
        while filled < self.block_size {
            match self.reader.read(&mut self.buf[filled..]) {
                Ok(0) => {
                    self.eof = true;
                    break;
                }
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.buf.truncate(filled);
                    return Err(e);
                }
            }
        }
        self.buf.truncate(filled);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_sizes_are_valid() {
        Chunker::new(ChunkerConfig::default()).unwrap();
        Chunker::new(ChunkerConfig::tiny()).unwrap();
    }

    #[test]
    fn invalid_sizes_are_rejected_with_reason() {
        let err = Chunker::new(ChunkerConfig {
            min_size: 4096,
            avg_size: 1024,
            max_size: 8192,
        })
        .unwrap_err();
        assert!(err.to_string().contains("min <= avg <= max"), "{err}");
    }

    #[test]
    fn empty_input_has_no_chunks() {
        let c = Chunker::new(ChunkerConfig::tiny()).unwrap();
        assert!(c.cuts(&[]).is_empty());
        let mut r = c.reader(&[][..], 0);
        assert!(r.next_batch().unwrap().is_none());
    }
}
