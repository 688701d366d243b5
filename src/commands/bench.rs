//! `granary bench`: benchmarks that measure Granary next to a baseline in the
//! same run and print the ratio, so results from a noisy machine stay comparable.

mod datagen;
mod ingest;
mod meta;
mod mount;
mod upload;

pub use ingest::run as ingest;
pub use meta::{run as meta, BenchMetaArgs};
pub use mount::{run as mount, BenchMountArgs};
pub use upload::{run as upload, BenchUploadArgs};

use std::time::{Duration, Instant};

/// Best (shortest) wall time of `runs` runs of `f`.
fn best_of<T>(runs: u32, mut f: impl FnMut() -> anyhow::Result<T>) -> anyhow::Result<(Duration, T)> {
    let mut best: Option<(Duration, T)> = None;
    for _ in 0..runs.max(1) {
        let start = Instant::now();
        let value = f()?;
        let took = start.elapsed();
        if best.as_ref().is_none_or(|(b, _)| took < *b) {
            best = Some((took, value));
        }
    }
    Ok(best.expect("at least one run"))
}

/// Throughput in GB/s (10^9 bytes per second).
fn gbps(bytes: u64, took: Duration) -> f64 {
    bytes as f64 / took.as_secs_f64() / 1e9
}
