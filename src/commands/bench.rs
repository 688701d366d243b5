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

/// How a missing baseline tool is installed.
pub(super) enum Package {
    /// A Debian package (`apt-get install`, after `apt-get update` if the
    /// first try fails: a fresh machine has no package lists).
    Apt(&'static str),
    /// A PyPI package (`python3 -m pip install`).
    Pip(&'static str),
}

/// Makes sure `tool` is installed (`tool --version` starts, whatever it
/// answers, and is not a shell or pyenv shim's 127), installing `package`
/// when it is not; the error names the command to run by hand when
/// installing fails.
pub(super) fn ensure_tool(tool: &str, package: Package) -> anyhow::Result<()> {
    let runs = || {
        Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.code() != Some(127))
    };
    if runs() {
        return Ok(());
    }
    let quiet = |cmd: &mut Command| {
        cmd.stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    let (how, installed) = match package {
        Package::Apt(pkg) => {
            eprintln!("installing {tool} (Debian package {pkg}) for the side-by-side run");
            let install = || {
                quiet(
                    Command::new("apt-get")
                        .args(["install", "-y", "-qq", pkg])
                        .env("DEBIAN_FRONTEND", "noninteractive"),
                )
            };
            let ok = install() || (quiet(Command::new("apt-get").args(["update", "-qq"])) && install());
            (format!("apt-get install {pkg}"), ok)
        }
        Package::Pip(pkg) => {
            eprintln!("installing {tool} (PyPI package {pkg}) for the side-by-side run");
            let ok = quiet(Command::new("python3").args(["-m", "pip", "install", "-q", pkg]));
            (format!("pip install '{pkg}'"), ok)
        }
    };
    if !installed || !runs() {
        bail!("{tool} is not installed and `{how}` failed; install it and rerun");
    }
    Ok(())
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
