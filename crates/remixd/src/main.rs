//! The `remixd` command. See `remixd --help` and OPERATIONS.md.

use std::process::ExitCode;

use clap::Parser;
use remixd::cli::{Cli, Command};

// The local engine allocates and frees tensors of tens to hundreds of MB per operation;
// the system allocator hands each back to the kernel and faults the pages in again on
// the next one (a profile showed about 15% of an image's time in page faults), while
// mimalloc keeps and reuses them.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The service logs at info; one-shot commands stay quiet unless RUST_LOG says otherwise.
    let default_level = match cli.command {
        Command::Serve { .. } => "info",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default_level.into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(remixd::cli::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
