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
        eprintln!("error: {}", one_line(&err));
        std::process::exit(1);
    }
}

/// The error and its causes joined into one line, each cause once: many
/// messages already embed their cause (`cannot read 'x': No such file...`),
/// and a cause whose text is already in the line is not repeated; line
/// breaks inside a message become "; ".
fn one_line(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        let text = text.trim().lines().map(str::trim).collect::<Vec<_>>().join("; ");
        if text.is_empty() || line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
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

#[cfg(test)]
mod tests {
    use super::one_line;

    #[test]
    fn a_cause_already_in_the_message_is_not_repeated() {
        let io = std::io::Error::from_raw_os_error(libc::ENOENT);
        let io_text = io.to_string();
        let err = granary_core::ingest::IngestError::Io {
            path: "/nope".into(),
            source: io,
        };
        let line = one_line(&anyhow::Error::new(err).context("uploading"));
        assert_eq!(line, format!("uploading: cannot read '/nope': {io_text}"));
    }

    #[test]
    fn causes_not_in_the_message_are_joined_on_one_line() {
        let err = anyhow::anyhow!("disk full\ntry again").context("cannot seal pack 7");
        assert_eq!(one_line(&err), "cannot seal pack 7: disk full; try again");
    }
}
