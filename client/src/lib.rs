//! # granary-client
//!
//! The SDK other programs (and the `granary` CLI and FUSE mount) use to talk
//! to a cluster: upload a directory as a dataset version through the
//! `granary-core` ingest pipeline (only chunks the cluster lacks travel),
//! list and read versions, download them, and diff two versions.
//!
//! Status: arrives with the data-path issue.
