//! Byte layout of pack headers, index entries and trailers (pure functions).

use crate::frame::FRAME_HEADER_LEN;
use crate::id::ChunkId;

/// First 8 bytes of every pack.
pub const PACK_MAGIC: [u8; 8] = *b"GRANPACK";
/// Last 8 bytes of every sealed pack.
pub const TRAILER_MAGIC: [u8; 8] = *b"GRANPIDX";
/// Current pack format version.
pub const PACK_VERSION: u8 = 1;
/// Header size: magic, version, 7 reserved bytes, pack id.
pub const PACK_HEADER_LEN: usize = 24;
/// Size of one index entry.
pub const INDEX_ENTRY_LEN: usize = 48;
/// Trailer size: index offset, entry count, checksum, magic.
pub const TRAILER_LEN: usize = 56;

/// Where one frame sits in a pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IndexEntry {
    pub id: ChunkId,
    /// Offset of the frame header from the start of the pack.
    pub offset: u64,
    /// Bytes stored after the frame header.
    pub stored_len: u32,
    /// Length of the chunk once decoded.
    pub raw_len: u32,
}

impl IndexEntry {
    /// Header plus stored bytes.
    pub fn frame_len(&self) -> u64 {
        FRAME_HEADER_LEN as u64 + self.stored_len as u64
    }

    /// Offset just past the frame.
    pub fn end(&self) -> u64 {
        self.offset + self.frame_len()
    }

    fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.id.as_bytes());
        out.extend_from_slice(&self.offset.to_le_bytes());
        out.extend_from_slice(&self.stored_len.to_le_bytes());
        out.extend_from_slice(&self.raw_len.to_le_bytes());
    }

    fn read(b: &[u8]) -> Self {
        IndexEntry {
            id: ChunkId::from_slice(&b[0..32]).expect("32 bytes"),
            offset: u64::from_le_bytes(b[32..40].try_into().expect("8 bytes")),
            stored_len: u32::from_le_bytes(b[40..44].try_into().expect("4 bytes")),
            raw_len: u32::from_le_bytes(b[44..48].try_into().expect("4 bytes")),
        }
    }
}

/// Encodes a pack header.
pub fn encode_header(pack_id: u64) -> [u8; PACK_HEADER_LEN] {
    let mut h = [0u8; PACK_HEADER_LEN];
    h[0..8].copy_from_slice(&PACK_MAGIC);
    h[8] = PACK_VERSION;
    h[16..24].copy_from_slice(&pack_id.to_le_bytes());
    h
}

/// Parses a pack header and returns the pack id.
pub fn parse_header(h: &[u8]) -> Result<u64, &'static str> {
    if h.len() < PACK_HEADER_LEN {
        return Err("file shorter than a pack header");
    }
    if h[0..8] != PACK_MAGIC {
        return Err("bad magic bytes");
    }
    if h[8] != PACK_VERSION {
        return Err("unsupported pack version; upgrade granary");
    }
    Ok(u64::from_le_bytes(h[16..24].try_into().expect("8 bytes")))
}

/// The fixed-size end of a sealed pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trailer {
    pub index_offset: u64,
    pub entry_count: u64,
    pub checksum: [u8; 32],
}

impl Trailer {
    /// Parses the last [`TRAILER_LEN`] bytes of a pack of `pack_len` bytes and
    /// checks that the index it describes fits exactly before it.
    pub fn parse(b: &[u8], pack_len: u64) -> Result<Self, &'static str> {
        if b.len() != TRAILER_LEN {
            return Err("trailer has the wrong size");
        }
        if b[48..56] != TRAILER_MAGIC {
            return Err("no trailer magic; the pack is not sealed or its end is damaged");
        }
        let t = Trailer {
            index_offset: u64::from_le_bytes(b[0..8].try_into().expect("8 bytes")),
            entry_count: u64::from_le_bytes(b[8..16].try_into().expect("8 bytes")),
            checksum: b[16..48].try_into().expect("32 bytes"),
        };
        let index_len = t
            .entry_count
            .checked_mul(INDEX_ENTRY_LEN as u64)
            .ok_or("entry count out of range")?;
        let expected_len = t
            .index_offset
            .checked_add(index_len)
            .and_then(|v| v.checked_add(TRAILER_LEN as u64))
            .ok_or("index offset out of range")?;
        if t.index_offset < PACK_HEADER_LEN as u64 || expected_len != pack_len {
            return Err("index offset and entry count do not match the pack size");
        }
        Ok(t)
    }

    /// Byte range of the index within the pack.
    pub fn index_range(&self) -> std::ops::Range<u64> {
        self.index_offset..self.index_offset + self.entry_count * INDEX_ENTRY_LEN as u64
    }

    fn encode(&self) -> [u8; TRAILER_LEN] {
        let mut b = [0u8; TRAILER_LEN];
        b[0..8].copy_from_slice(&self.index_offset.to_le_bytes());
        b[8..16].copy_from_slice(&self.entry_count.to_le_bytes());
        b[16..48].copy_from_slice(&self.checksum);
        b[48..56].copy_from_slice(&TRAILER_MAGIC);
        b
    }
}

fn footer_checksum(header: &[u8], index: &[u8], index_offset: u64, count: u64) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(header);
    h.update(index);
    h.update(&index_offset.to_le_bytes());
    h.update(&count.to_le_bytes());
    *h.finalize().as_bytes()
}

/// Encodes index + trailer for frames that end at `index_offset`.
pub fn encode_footer(header: &[u8; PACK_HEADER_LEN], entries: &[IndexEntry], index_offset: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len() * INDEX_ENTRY_LEN + TRAILER_LEN);
    for e in entries {
        e.write(&mut out);
    }
    let count = entries.len() as u64;
    let trailer = Trailer {
        index_offset,
        entry_count: count,
        checksum: footer_checksum(header, &out, index_offset, count),
    };
    out.extend_from_slice(&trailer.encode());
    out
}

/// Verifies the checksum of `index` (the bytes at `trailer.index_range()`) and
/// that its entries tile the frame area `[PACK_HEADER_LEN, index_offset)`
/// exactly, in order. Returns the entries.
pub fn parse_index(header: &[u8], index: &[u8], trailer: &Trailer) -> Result<Vec<IndexEntry>, &'static str> {
    if header.len() != PACK_HEADER_LEN || index.len() as u64 != trailer.entry_count * INDEX_ENTRY_LEN as u64 {
        return Err("index has the wrong size");
    }
    if footer_checksum(header, index, trailer.index_offset, trailer.entry_count) != trailer.checksum {
        return Err("index checksum mismatch");
    }
    let mut entries = Vec::with_capacity(trailer.entry_count as usize);
    let mut next = PACK_HEADER_LEN as u64;
    for b in index.chunks_exact(INDEX_ENTRY_LEN) {
        let e = IndexEntry::read(b);
        if e.offset != next {
            return Err("index entries do not tile the frame area");
        }
        next = e.end();
        entries.push(e);
    }
    if next != trailer.index_offset {
        return Err("index entries do not end at the index");
    }
    Ok(entries)
}
