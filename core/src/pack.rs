//! Packs: append-only files of frames, the unit of replication and tiering.
//!
//! ```text
//! +--------------------+  offset 0
//! | header (24 bytes)  |  magic "GRANPACK", version, pack id
//! +--------------------+  offset 24
//! | frame              |  see crate::frame: 48-byte header + stored bytes
//! | frame              |
//! | ...                |  frames are contiguous, in append order
//! +--------------------+  index_offset
//! | index entries      |  48 bytes each: chunk id, frame offset, stored len, raw len
//! +--------------------+
//! | trailer (56 bytes) |  index offset, entry count, BLAKE3 checksum, magic "GRANPIDX"
//! +--------------------+  end of file
//! ```
//!
//! An *unsealed* pack (still being written) is just header + frames; it can be
//! re-indexed from its frames, and [`PackWriter::open_unsealed`] truncates a
//! torn tail back to the last complete, verified frame after a crash.
//! [`PackWriter::seal`] appends the index and trailer and fsyncs. A *sealed*
//! pack is opened with [`PackReader::open`], which checks the trailer, the
//! index checksum and that the index tiles the frame area exactly; a pack that
//! fails is reported, never served. Every chunk read is verified against its id.
//! The footer can also be parsed from byte ranges alone ([`Trailer::parse`],
//! [`parse_index`]), which is how object-tier packs are read with range GETs.

mod adopt;
mod files;
mod format;
mod reader;
mod writer;

pub use adopt::AdoptedPack;
pub use files::{disk_space, read_ranges, sealed_pack_path, shard_dir};
pub use format::{
    encode_footer, encode_header, parse_header, parse_index, IndexEntry, Trailer, INDEX_ENTRY_LEN,
    PACK_HEADER_LEN, PACK_MAGIC, PACK_VERSION, TRAILER_LEN, TRAILER_MAGIC,
};
pub use reader::{PackReader, VerifyReport};
pub use writer::{PackWriter, Recovery, SealedPack, DEFAULT_PACK_TARGET};

use std::path::PathBuf;

use crate::frame::FrameError;
use crate::id::ChunkId;

/// What can go wrong reading or writing a pack. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum PackError {
    #[error("pack {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("pack {path}: not a granary pack or damaged header ({reason})")]
    BadHeader { path: PathBuf, reason: &'static str },
    #[error("pack {path}: damaged footer ({reason}); the pack must be repaired from a replica")]
    BadFooter { path: PathBuf, reason: &'static str },
    #[error("pack {path}: frame at offset {offset} is damaged: {source}")]
    BadFrame {
        path: PathBuf,
        offset: u64,
        #[source]
        source: FrameError,
    },
    #[error("pack {path}: chunk {id} is not in this pack")]
    NotFound { path: PathBuf, id: ChunkId },
    #[error("pack {path}: already sealed; sealed packs are immutable")]
    Sealed { path: PathBuf },
}

impl PackError {
    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        PackError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}
