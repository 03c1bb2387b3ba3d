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
/// default). The process keeps its peak working memory, so this is done only where the
/// local engine runs (`cli::runs_local_engine`): an API or preview process returns what
/// a burst of uploads or decodes took. `MIMALLOC_PURGE_DELAY` in the environment still
/// decides when set.
fn keep_freed_memory() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: called at the start of main, before any other thread exists (the
        // function is not thread safe); the option only changes when memory is purged.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    }
}

/// Carries out mimalloc's purges of freed memory while the process is idle. mimalloc
/// schedules a purge when memory is freed and performs it in a later allocator call
/// once the delay has passed; a server that goes quiet after a burst makes no such
/// call and kept its peak (measured with `remixd bench memory`: 337 MiB three seconds
/// after 40 uploads that took it to 526 MiB). A collect each second from a runtime
/// thread performs the purges that are due, process-wide.
fn purge_when_idle(rt: &tokio::runtime::Runtime) {
    rt.spawn(async {
        let mut every = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            every.tick().await;
            // SAFETY: mi_collect is thread safe; it frees nothing that is in use.
            unsafe { libmimalloc_sys::mi_collect(false) };
        }
    });
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Still before any other thread exists: parsing and reading the settings start none.
    let local_engine = remixd::cli::runs_local_engine(&cli);
    if local_engine {
        keep_freed_memory();
    }
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
    if !local_engine {
        purge_when_idle(&rt);
    }
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
    fn only_local_engine_commands_keep_freed_memory() {
        let runs = |args: &[&str]| {
            let cli = Cli::try_parse_from(args).expect("valid arguments");
            remixd::cli::runs_local_engine(&cli)
        };
        assert!(runs(&[
            "remixd",
            "generate",
            "--model-dir",
            "m",
            "--image",
            "i.png",
            "--prompt",
            "p"
        ]));
        assert!(runs(&["remixd", "bench", "sd", "--model-dir", "m"]));
        assert!(!runs(&["remixd", "bench", "preview"]));
        assert!(!runs(&["remixd", "migrate"]));
        // The default engine is the preview one: a plain serve returns freed memory.
        if std::env::var_os("REMIXD__ENGINE__KIND").is_none() {
            assert!(!runs(&["remixd", "serve"]));
        }
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("local.toml");
        std::fs::write(&cfg, "[engine]\nkind = \"local\"\n").unwrap();
        let cfg = cfg.to_str().unwrap();
        assert!(runs(&["remixd", "--config", cfg, "serve"]));
        assert!(runs(&[
            "remixd", "--config", cfg, "serve", "--role", "worker"
        ]));
        assert!(!runs(&[
            "remixd", "--config", cfg, "serve", "--role", "api"
        ]));
    }

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
