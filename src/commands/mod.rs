//! Command implementations, one module per family.

mod bench;
mod inspect;

use anyhow::bail;

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
        Command::Server(_) => not_yet("server"),
        Command::Upload(_) => not_yet("upload"),
        Command::Download(_) => not_yet("download"),
        Command::Datasets(_) => not_yet("datasets"),
        Command::Log(_) => not_yet("log"),
        Command::Ls(_) => not_yet("ls"),
        Command::Diff(_) => not_yet("diff"),
        Command::Rm(_) => not_yet("rm"),
        Command::Mount(_) => not_yet("mount"),
        Command::Umount(_) => not_yet("umount"),
        Command::Prefetch(_) => not_yet("prefetch"),
        Command::Admin(_) => not_yet("admin"),
    }
}

fn not_yet(command: &str) -> anyhow::Result<()> {
    bail!("`granary {command}` is not available in this build yet; `granary inspect` and `granary bench` work without a server")
}
