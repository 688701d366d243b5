//! Command implementations, one module per family.

mod admin;
pub mod bench;
mod data;
mod datasets;
mod inspect;
mod mount;
mod server;

use crate::cli::{BenchCommand, Cli, Command, InspectCommand};

/// Runs the parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Inspect(InspectCommand::Tree { dir, threads, output }) => {
            inspect::tree(&dir, threads, output.json)
        }
        Command::Inspect(InspectCommand::Pack { file, verify, output }) => {
            inspect::pack(&file, verify, output.json)
        }
        Command::Bench(BenchCommand::Ingest(args)) => bench::ingest(&args),
        Command::Bench(BenchCommand::Meta(args)) => bench::meta(&args),
        Command::Bench(BenchCommand::Upload(args)) => bench::upload(&args),
        Command::Bench(BenchCommand::Mount(args)) => bench::mount(&args),
        Command::Bench(BenchCommand::Tier(args)) => bench::tier(&args),
        Command::Server(args) => server::run(args),
        Command::Upload(args) => data::upload(&args),
        Command::Download(args) => data::download(&args),
        Command::Datasets(output) => datasets::list(&output.server, &output.output),
        Command::Log(args) => datasets::log(&args),
        Command::Ls(args) => data::ls(&args),
        Command::Diff(args) => data::diff(&args),
        Command::Rm(args) => datasets::rm(&args),
        Command::Mount(args) => mount::mount(&args),
        Command::Umount(args) => mount::umount(&args),
        Command::Prefetch(args) => mount::prefetch(&args),
        Command::CacheStats(args) => mount::cache_stats(&args),
        Command::Admin(cmd) => admin::run(cmd),
    }
}

/// Warns about entries an ingest skipped and returns them as JSON.
fn report_skipped(skipped: &[granary_core::ingest::Skipped]) -> serde_json::Value {
    for s in skipped {
        eprintln!(
            "warning: skipped {} ({}): only files, directories and symlinks are stored",
            s.path.display(),
            s.reason
        );
    }
    skipped
        .iter()
        .map(|s| serde_json::json!({"path": s.path.to_string_lossy(), "reason": s.reason}))
        .collect()
}

/// A current-thread runtime for client commands.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}
