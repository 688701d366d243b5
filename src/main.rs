//! `granary`: one binary for every role and tool of Granary.
//!
//! `cli` defines the command line; `commands/` holds one module per command
//! family. Errors surface as one line on stderr and a non-zero exit code.

mod cli;
mod commands;

use clap::Parser;

fn main() {
    let cli = cli::Cli::parse();
    init_tracing();
    if let Err(err) = commands::run(cli) {
        // One readable line: the error and its causes, joined.
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
