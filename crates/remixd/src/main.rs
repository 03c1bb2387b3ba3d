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

/// mimalloc's `mi_option_purge_delay` (its position in `mi_option_t`, the same in the
/// v2 and v3 headers; the `mimalloc` crates name no constant for it). A test checks it
/// still reads as that option's documented default.
const MI_OPTION_PURGE_DELAY: i32 = 15;

/// Keeps freed memory in the process instead of purging it back to the kernel after
/// mimalloc's delay (1 s): the local engine frees and re-allocates activations of
/// hundreds of MB within milliseconds, and purged pages come back as page faults and
/// kernel zeroing (a VAE decode made 94 k faults and used 10 % more CPU time with the
/// default). The process keeps its peak working memory; `MIMALLOC_PURGE_DELAY` in the
/// environment still decides when set.
fn keep_freed_memory() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: called first thing in main, before any other thread exists (the
        // function is not thread safe); the option only changes when memory is purged.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    }
}

fn main() -> ExitCode {
    keep_freed_memory();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_purge_delay_option_is_the_one_set() {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
            return;
        }
        // SAFETY: reading an option; nothing else in this test binary sets options.
        let default = unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
        // mimalloc v3 documents 1000 ms, v2 10 ms.
        assert!(
            matches!(default, 10 | 1000),
            "option {MI_OPTION_PURGE_DELAY} is {default}"
        );
    }
}
