//! # granary-fuse
//!
//! `granary mount DATASET[@N] DIR`: a read-only FUSE filesystem (fuser) over
//! one immutable dataset version. The filesystem logic (inode table from
//! trees, reads mapped to chunks, readahead) is kept apart from the thin fuser
//! adapter so it can be tested against a reference model without FUSE; the
//! memory and disk chunk caches are shared by every mount on the host.
//!
//! Status: arrives with the FUSE issue.
