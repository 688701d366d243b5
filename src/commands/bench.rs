//! `granary bench`: benchmarks that measure Granary next to a baseline in the
//! same run and print the ratio, so results from a noisy machine stay comparable.

mod datagen;
mod ingest;
mod meta;
mod mount;
mod tier;
mod upload;

pub use ingest::run as ingest;
pub use meta::{run as meta, BenchMetaArgs};
pub use mount::{run as mount, BenchMountArgs};
pub use tier::{run as tier, BenchTierArgs};
pub use upload::{run as upload, BenchUploadArgs};

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

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

/// A child process killed (and reaped) when dropped, also on errors.
pub(super) struct ChildGuard(pub(super) std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Peak resident set (VmHWM) of a running process, in bytes.
pub(super) fn vm_hwm(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()))
        })
        .unwrap_or(0)
        * 1024
}

/// Starts an embedded `granary server` (data in `root/server`, log in
/// `root/server.log`) on a free loopback port and waits until it answers.
pub(super) fn start_server(
    exe: &std::path::Path,
    root: &std::path::Path,
) -> anyhow::Result<(ChildGuard, String)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let addr = format!("127.0.0.1:{port}");
    let log = std::fs::File::create(root.join("server.log"))?;
    let server = ChildGuard(
        Command::new(exe)
            .args(["server", "--listen", &addr, "--data-dir"])
            .arg(root.join("server"))
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting granary server")?,
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while Command::new(exe)
        .args(["datasets", "--server", &addr])
        .output()
        .map(|o| !o.status.success())
        .unwrap_or(true)
    {
        if Instant::now() > deadline {
            bail!(
                "the server did not start; see {}",
                root.join("server.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok((server, addr))
}

/// The benchmark's working directory: `dir` when given, else a temporary
/// directory (named `prefix...`) that lives as long as the returned guard.
pub(super) fn work_dir(
    dir: &Option<std::path::PathBuf>,
    prefix: &str,
) -> anyhow::Result<(Option<tempfile::TempDir>, std::path::PathBuf)> {
    match dir {
        Some(d) => Ok((None, d.clone())),
        None => {
            let tmp = tempfile::Builder::new().prefix(prefix).tempdir()?;
            let path = tmp.path().to_path_buf();
            Ok((Some(tmp), path))
        }
    }
}
