//! Frames: one chunk as stored.
//!
//! ```text
//! offset  size  field
//! 0       2     magic "GF"
//! 2       1     format version (1)
//! 3       1     codec (Codec as u8: 0 raw, 1 lz4 block)
//! 4       4     raw length, u32 little-endian
//! 8       4     stored length, u32 little-endian (bytes that follow the header)
//! 12      32    chunk id: BLAKE3 of the raw bytes
//! 44      4     CRC-32 of bytes 0..44 and of the stored bytes, little-endian
//! 48      ...   stored bytes
//! ```
//!
//! Carrying the id makes a frame self-describing: a pack can be re-indexed
//! from its frames alone and a stray frame can always be checked.
//! Decoding never trusts the header: lengths are bounded, the codec must be
//! known, the CRC must match, and the BLAKE3 of the decoded bytes must equal
//! the id (and the id the caller expected). BLAKE3 alone proves the content;
//! the CRC also catches damage to stored bytes that would still decode to the
//! same content (an lz4 match offset flipped inside repetitive data), so every
//! flipped byte is reported, and a scrub can check frames without decoding.
//! lz4 is used only when it saves at least 5%.

use std::sync::atomic::{AtomicU8, Ordering};

use bytes::Bytes;

use crate::id::ChunkId;

/// Frame magic bytes.
pub const FRAME_MAGIC: [u8; 2] = *b"GF";
/// Current frame format version.
pub const FRAME_VERSION: u8 = 1;
/// Size of the frame header in bytes.
pub const FRAME_HEADER_LEN: usize = 48;
/// Largest raw chunk a frame may carry (FastCDC's maximum chunk size).
pub const MAX_CHUNK_LEN: u32 = 16 * 1024 * 1024;

/// How a frame's bytes are stored.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Codec {
    /// Stored as is.
    Raw = 0,
    /// An lz4 block (lz4_flex), without a size prefix.
    Lz4 = 1,
}

impl TryFrom<u8> for Codec {
    type Error = FrameError;

    fn try_from(v: u8) -> Result<Self, FrameError> {
        match v {
            0 => Ok(Codec::Raw),
            1 => Ok(Codec::Lz4),
            other => Err(FrameError::UnknownCodec(other)),
        }
    }
}

/// What can be wrong with a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Fewer bytes than the header or its stored length require.
    #[error("truncated frame: need {needed} bytes, have {have}")]
    Truncated { needed: usize, have: usize },
    /// The magic bytes are wrong: this is not the start of a frame.
    #[error("not a frame: bad magic bytes")]
    BadMagic,
    /// A format version this build does not understand.
    #[error("unsupported frame version {0} (this build reads version {FRAME_VERSION}); upgrade granary")]
    UnknownVersion(u8),
    /// A codec byte this build does not understand.
    #[error("unknown frame codec {0}")]
    UnknownCodec(u8),
    /// The header is self-contradictory or the payload does not decode.
    #[error("corrupt frame: {0}")]
    Corrupt(&'static str),
    /// The bytes decode, but do not hash to the id in the header.
    #[error("corrupt frame: content hash does not match chunk id {0}")]
    HashMismatch(ChunkId),
    /// The frame is intact but holds another chunk than the one asked for.
    #[error("frame holds chunk {found}, expected {expected}")]
    WrongChunk { expected: ChunkId, found: ChunkId },
}

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub codec: Codec,
    pub raw_len: u32,
    pub stored_len: u32,
    pub id: ChunkId,
    /// CRC-32 of the first 44 header bytes and the stored bytes.
    pub crc: u32,
}

impl FrameHeader {
    /// Parses and sanity-checks the header at the start of `buf`.
    pub fn parse(buf: &[u8]) -> Result<Self, FrameError> {
        if buf.len() < FRAME_HEADER_LEN {
            return Err(FrameError::Truncated {
                needed: FRAME_HEADER_LEN,
                have: buf.len(),
            });
        }
        if buf[0..2] != FRAME_MAGIC {
            return Err(FrameError::BadMagic);
        }
        if buf[2] != FRAME_VERSION {
            return Err(FrameError::UnknownVersion(buf[2]));
        }
        let codec = Codec::try_from(buf[3])?;
        let raw_len = u32::from_le_bytes(buf[4..8].try_into().expect("4 bytes"));
        let stored_len = u32::from_le_bytes(buf[8..12].try_into().expect("4 bytes"));
        let id = ChunkId::from_slice(&buf[12..44]).expect("32 bytes");
        let crc = u32::from_le_bytes(buf[44..48].try_into().expect("4 bytes"));
        if raw_len > MAX_CHUNK_LEN {
            return Err(FrameError::Corrupt("raw length exceeds the maximum chunk size"));
        }
        match codec {
            Codec::Raw if stored_len != raw_len => {
                return Err(FrameError::Corrupt("raw frame with stored length != raw length"))
            }
            Codec::Lz4
                if stored_len as usize > lz4_flex::block::get_maximum_output_size(raw_len as usize) =>
            {
                return Err(FrameError::Corrupt("lz4 frame longer than its worst case"))
            }
            _ => {}
        }
        Ok(Self {
            codec,
            raw_len,
            stored_len,
            id,
            crc,
        })
    }

    /// Encodes the header.
    pub fn to_bytes(&self) -> [u8; FRAME_HEADER_LEN] {
        let mut out = [0u8; FRAME_HEADER_LEN];
        out[0..2].copy_from_slice(&FRAME_MAGIC);
        out[2] = FRAME_VERSION;
        out[3] = self.codec as u8;
        out[4..8].copy_from_slice(&self.raw_len.to_le_bytes());
        out[8..12].copy_from_slice(&self.stored_len.to_le_bytes());
        out[12..44].copy_from_slice(self.id.as_bytes());
        out[44..48].copy_from_slice(&self.crc.to_le_bytes());
        out
    }

    /// The CRC a frame with this header and `stored` bytes must carry.
    pub fn compute_crc(&self, stored: &[u8]) -> u32 {
        let mut h = crc32fast::Hasher::new();
        h.update(&self.to_bytes()[..44]);
        h.update(stored);
        h.finalize()
    }

    /// Header plus stored bytes.
    pub fn frame_len(&self) -> usize {
        FRAME_HEADER_LEN + self.stored_len as usize
    }
}

/// Chunks smaller than this are never compressed: the saving is too small to pay for itself.
const MIN_COMPRESS_LEN: usize = 512;
/// Size of the probe compressed before committing to lz4 on a whole chunk.
const PROBE_LEN: usize = 4096;

/// What the previous chunks of a stream said about compressing the next one.
///
/// Files tend to be homogeneous, and so do the files of one directory: a
/// text file keeps compressing, a JPEG never does, and a directory of JPEGs
/// holds more JPEGs. The ingest gives the files of one directory one hint
/// (it is atomic, so chunks encoded on different threads can share it),
/// which lets the encoder skip the probe on data that has been compressing
/// and on random-looking data where nothing has been.
#[derive(Debug, Default)]
pub struct CompressHint(AtomicU8);

const HINT_UNKNOWN: u8 = 0;
const HINT_COMPRESSIBLE: u8 = 1;
const HINT_INCOMPRESSIBLE: u8 = 2;

impl CompressHint {
    /// A hint that knows nothing yet.
    pub const fn new() -> Self {
        Self(AtomicU8::new(HINT_UNKNOWN))
    }
}

/// Appends the frame for chunk `id` with contents `raw` to `out` and returns
/// the codec chosen. `id` must be `ChunkId::of(raw)`.
///
/// lz4 is kept only when it saves at least 5%. Deciding costs little: chunks
/// under 512 bytes are stored raw; for chunks larger than 16 KiB whose stream
/// has not been compressing (see [`CompressHint`]), a 4 KiB probe from the
/// middle is compressed first, and if even the probe does not shrink by 3% the
/// chunk is stored raw without compressing the rest. Once a stream has been
/// incompressible, a chunk whose middle 1 KiB has random-looking byte
/// statistics skips the probe too. Incompressible data (images, archives)
/// therefore costs a byte count per chunk, and data that keeps compressing
/// no probe at all.
pub fn encode_frame_hinted(id: &ChunkId, raw: &[u8], hint: &CompressHint, out: &mut Vec<u8>) -> Codec {
    debug_assert!(raw.len() <= MAX_CHUNK_LEN as usize);
    let start = out.len();
    out.extend_from_slice(&[0u8; FRAME_HEADER_LEN]);
    let large = raw.len() > 4 * PROBE_LEN;
    let try_lz4 = raw.len() >= MIN_COMPRESS_LEN
        && (!large
            || match hint.0.load(Ordering::Relaxed) {
                HINT_COMPRESSIBLE => true,
                HINT_INCOMPRESSIBLE => !looks_random(raw) && probe_compresses(raw),
                _ => probe_compresses(raw),
            });
    let codec = if try_lz4 {
        let max = lz4_flex::block::get_maximum_output_size(raw.len());
        out.resize(start + FRAME_HEADER_LEN + max, 0);
        let n = lz4_flex::block::compress_into(raw, &mut out[start + FRAME_HEADER_LEN..])
            .expect("output buffer sized by get_maximum_output_size");
        if n * 20 <= raw.len() * 19 {
            out.truncate(start + FRAME_HEADER_LEN + n);
            Codec::Lz4
        } else {
            out.truncate(start + FRAME_HEADER_LEN);
            out.extend_from_slice(raw);
            Codec::Raw
        }
    } else {
        out.extend_from_slice(raw);
        Codec::Raw
    };
    if large {
        let learned = if codec == Codec::Lz4 {
            HINT_COMPRESSIBLE
        } else {
            HINT_INCOMPRESSIBLE
        };
        hint.0.store(learned, Ordering::Relaxed);
    }
    let mut header = FrameHeader {
        codec,
        raw_len: raw.len() as u32,
        stored_len: (out.len() - start - FRAME_HEADER_LEN) as u32,
        id: *id,
        crc: 0,
    };
    header.crc = header.compute_crc(&out[start + FRAME_HEADER_LEN..]);
    out[start..start + FRAME_HEADER_LEN].copy_from_slice(&header.to_bytes());
    codec
}

/// [`encode_frame_hinted`] for a chunk with no history.
pub fn encode_frame(id: &ChunkId, raw: &[u8], out: &mut Vec<u8>) -> Codec {
    encode_frame_hinted(id, raw, &CompressHint::new(), out)
}

/// True when 1 KiB from the middle of `raw` has the byte statistics of
/// random data (nearly every byte value present, none frequent): what
/// compressed media, encrypted or already-compressed data look like, and
/// what lz4 cannot shrink. About a tenth of the cost of the lz4 probe;
/// asked only of data whose stream has not been compressing, so a stream
/// that starts compressing is still noticed (its bytes stop looking random).
fn looks_random(raw: &[u8]) -> bool {
    const SAMPLE: usize = 1024;
    let mid = raw.len() / 2 - SAMPLE / 2;
    let mut counts = [0u16; 256];
    for &b in &raw[mid..mid + SAMPLE] {
        counts[b as usize] += 1;
    }
    // Uniform bytes: ~251 of 256 values seen, the most frequent ~10 times.
    let distinct = counts.iter().filter(|&&c| c > 0).count();
    let max = counts.iter().copied().max().unwrap_or(0);
    distinct >= 200 && max <= 24
}

fn probe_compresses(raw: &[u8]) -> bool {
    let mid = raw.len() / 2 - PROBE_LEN / 2;
    let probe = &raw[mid..mid + PROBE_LEN];
    lz4_flex::block::compress(probe).len() * 100 <= PROBE_LEN * 97
}

/// Encodes a frame into a new buffer, hashing `raw` to find its id.
pub fn frame_chunk(raw: &[u8]) -> (ChunkId, Vec<u8>) {
    let id = ChunkId::of(raw);
    let mut out = Vec::with_capacity(FRAME_HEADER_LEN + raw.len());
    encode_frame(&id, raw, &mut out);
    (id, out)
}

/// Checks everything about the frame that fills `frame` exactly except its
/// content: header, expected chunk, length and CRC-32 (which covers the
/// header and the stored bytes), without decompressing or hashing. Catches
/// damage to a frame that was fully verified once.
pub fn check_frame(frame: &[u8], expected: Option<&ChunkId>) -> Result<FrameHeader, FrameError> {
    let header = check_layout(frame, expected)?;
    if header.compute_crc(&frame[FRAME_HEADER_LEN..]) != header.crc {
        return Err(FrameError::Corrupt("CRC mismatch"));
    }
    Ok(header)
}

/// [`check_frame`] without the CRC, for a reader that hashes the contents
/// anyway ([`decode_frame_shared`]): damaged stored bytes decode to other
/// contents or not at all, and a damaged length, codec or id fails the
/// checks here or the hash, so the reader never gets wrong bytes (about 5%
/// of a cold mount read's CPU). What only the CRC sees (its own field, say)
/// leaves the contents intact; scrub and writers still check it.
fn check_layout(frame: &[u8], expected: Option<&ChunkId>) -> Result<FrameHeader, FrameError> {
    let header = FrameHeader::parse(frame)?;
    if let Some(expected) = expected {
        if *expected != header.id {
            return Err(FrameError::WrongChunk {
                expected: *expected,
                found: header.id,
            });
        }
    }
    let needed = header.frame_len();
    if frame.len() < needed {
        return Err(FrameError::Truncated {
            needed,
            have: frame.len(),
        });
    }
    if frame.len() > needed {
        return Err(FrameError::Corrupt("trailing bytes after the frame"));
    }
    Ok(header)
}

/// Decodes the frame that fills `frame` exactly and verifies it, appending the
/// raw bytes to `out`. With `expected`, the frame must also hold that chunk.
pub fn decode_frame_into(
    frame: &[u8],
    expected: Option<&ChunkId>,
    out: &mut Vec<u8>,
) -> Result<FrameHeader, FrameError> {
    let header = check_frame(frame, expected)?;
    decode_checked(&header, &frame[FRAME_HEADER_LEN..], out)?;
    Ok(header)
}

/// Verifies the frame that fills `frame` exactly, like [`decode_frame_into`],
/// without keeping its contents: a stored-raw chunk is hashed in place, a
/// compressed one is decompressed into `scratch` (cleared first, reused by
/// the caller across frames) and hashed there.
pub fn verify_frame(frame: &[u8], scratch: &mut Vec<u8>) -> Result<FrameHeader, FrameError> {
    let header = check_frame(frame, None)?;
    let payload = &frame[FRAME_HEADER_LEN..];
    match header.codec {
        Codec::Raw => check_hash(&header, payload)?,
        Codec::Lz4 => {
            scratch.clear();
            decode_checked(&header, payload, scratch)?;
        }
    }
    Ok(header)
}

/// Appends the raw bytes of a checked frame's payload to `out` and verifies
/// their hash; on error `out` is as it was.
fn decode_checked(header: &FrameHeader, payload: &[u8], out: &mut Vec<u8>) -> Result<(), FrameError> {
    let start = out.len();
    match header.codec {
        Codec::Raw => out.extend_from_slice(payload),
        Codec::Lz4 => {
            out.resize(start + header.raw_len as usize, 0);
            let n = lz4_flex::block::decompress_into(payload, &mut out[start..]).map_err(|_| {
                out.truncate(start);
                FrameError::Corrupt("lz4 data does not decode")
            })?;
            if n != header.raw_len as usize {
                out.truncate(start);
                return Err(FrameError::Corrupt("lz4 data decodes to the wrong length"));
            }
        }
    }
    check_hash(header, &out[start..]).inspect_err(|_| out.truncate(start))
}

/// The raw bytes of a frame must hash to its chunk id.
fn check_hash(header: &FrameHeader, raw: &[u8]) -> Result<(), FrameError> {
    if ChunkId::of(raw) != header.id {
        return Err(FrameError::HashMismatch(header.id));
    }
    Ok(())
}

/// Decodes and verifies the frame that fills `frame` exactly, like
/// [`decode_frame_into`] but for readers: the contents are checked against
/// the chunk id and the CRC is not ([`check_layout`]), and a stored-raw
/// chunk is not copied: its bytes are returned as a slice of `frame`'s
/// buffer. A compressed chunk is decompressed into a buffer of its own.
pub fn decode_frame_shared(frame: Bytes, expected: Option<&ChunkId>) -> Result<Bytes, FrameError> {
    let header = check_layout(&frame, expected)?;
    match header.codec {
        Codec::Raw => {
            let raw = frame.slice(FRAME_HEADER_LEN..);
            check_hash(&header, &raw)?;
            Ok(raw)
        }
        Codec::Lz4 => {
            let mut out = Vec::with_capacity(header.raw_len as usize);
            decode_checked(&header, &frame[FRAME_HEADER_LEN..], &mut out)?;
            Ok(Bytes::from(out))
        }
    }
}

/// Decodes and verifies a frame into a new buffer.
pub fn decode_frame(frame: &[u8], expected: Option<&ChunkId>) -> Result<Vec<u8>, FrameError> {
    let mut out = Vec::new();
    decode_frame_into(frame, expected, &mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_compressed_random_is_not() {
        let text = b"the quick brown fox jumps over the lazy dog. ".repeat(2000);
        let (id, frame) = frame_chunk(&text);
        assert_eq!(FrameHeader::parse(&frame).unwrap().codec, Codec::Lz4);
        assert!(frame.len() < text.len() / 4);
        assert_eq!(decode_frame(&frame, Some(&id)).unwrap(), text);

        let mut random = vec![0u8; 64 * 1024];
        blake3::Hasher::new().finalize_xof().fill(&mut random);
        let (id, frame) = frame_chunk(&random);
        assert_eq!(FrameHeader::parse(&frame).unwrap().codec, Codec::Raw);
        assert_eq!(frame.len(), FRAME_HEADER_LEN + random.len());
        assert_eq!(decode_frame(&frame, Some(&id)).unwrap(), random);
    }

    #[test]
    fn a_stream_that_stopped_compressing_still_compresses_what_can_be() {
        let mut random = vec![0u8; 64 * 1024];
        blake3::Hasher::new().finalize_xof().fill(&mut random);
        let text = b"the quick brown fox jumps over the lazy dog. ".repeat(2000);
        // Little-endian u32 token ids below 50,000: two zero-heavy bytes in four.
        let tokens: Vec<u8> = (0..16_384u32)
            .flat_map(|i| ((i * 7919) % 50_000).to_le_bytes())
            .collect();
        assert!(looks_random(&random));
        assert!(!looks_random(&text));
        assert!(!looks_random(&tokens));

        let hint = CompressHint::new();
        let codec = |raw: &[u8]| encode_frame_hinted(&ChunkId::of(raw), raw, &hint, &mut Vec::new());
        assert_eq!(codec(&random), Codec::Raw);
        assert_eq!(hint.0.load(Ordering::Relaxed), HINT_INCOMPRESSIBLE);
        // Random-looking: no probe, stored raw.
        assert_eq!(codec(&random), Codec::Raw);
        // The stream changes: compressible data is still probed and compressed.
        assert_eq!(codec(&text), Codec::Lz4);
        assert_eq!(codec(&random), Codec::Raw);
        let json: Vec<u8> = (0..2000u32)
            .flat_map(|i| format!("{{\"id\": {i}, \"label\": \"cat\"}}\n").into_bytes())
            .collect();
        assert!(!looks_random(&json));
        assert_eq!(codec(&json), Codec::Lz4);
    }

    #[test]
    fn unknown_codec_and_version_are_typed_errors() {
        let (_, mut frame) = frame_chunk(b"hello");
        frame[3] = 9;
        assert_eq!(decode_frame(&frame, None), Err(FrameError::UnknownCodec(9)));
        frame[3] = 0;
        frame[2] = 2;
        assert_eq!(decode_frame(&frame, None), Err(FrameError::UnknownVersion(2)));
    }

    #[test]
    fn shared_decode_borrows_raw_chunks_and_verifies_every_kind() {
        let mut random = vec![0u8; 64 * 1024];
        blake3::Hasher::new().finalize_xof().fill(&mut random);
        let (id, frame) = frame_chunk(&random);
        let frame = Bytes::from(frame);
        let raw = decode_frame_shared(frame.clone(), Some(&id)).unwrap();
        assert_eq!(&raw[..], &random[..]);
        assert_eq!(
            raw.as_ptr(),
            frame[FRAME_HEADER_LEN..].as_ptr(),
            "a raw chunk is a slice of the frame, not a copy"
        );

        let text = b"the quick brown fox jumps over the lazy dog. ".repeat(2000);
        let (tid, tframe) = frame_chunk(&text);
        assert_eq!(
            &decode_frame_shared(Bytes::from(tframe.clone()), Some(&tid)).unwrap()[..],
            &text[..]
        );

        // A flipped payload byte fails the hash, whether the CRC matches
        // (recomputed) or not (readers do not check it); nothing is returned.
        for f in [frame.to_vec(), tframe] {
            let mut bad = f.clone();
            let last = bad.len() - 1;
            bad[last] ^= 1;
            assert!(decode_frame_shared(Bytes::from(bad.clone()), None).is_err());
            let h = FrameHeader::parse(&bad).unwrap();
            let crc = h.compute_crc(&bad[FRAME_HEADER_LEN..]);
            let mut with_crc = bad.clone();
            with_crc[..FRAME_HEADER_LEN].copy_from_slice(&FrameHeader { crc, ..h }.to_bytes());
            assert!(decode_frame_shared(Bytes::from(with_crc), None).is_err());
        }
    }

    #[test]
    fn wrong_chunk_is_reported() {
        let (_, frame) = frame_chunk(b"hello");
        let other = ChunkId::of(b"other");
        assert!(matches!(
            decode_frame(&frame, Some(&other)),
            Err(FrameError::WrongChunk { .. })
        ));
    }
}
