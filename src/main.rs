//! `stockflow`: keeps an Amazon seller's inventory true in real time. See `stockflow --help`.
//!
//! It runs on the system allocator: against mimalloc, `replay --file` of 1 M events took ~20 % less
//! CPU and ~30 % less peak memory with glibc's (workers allocate, the store's blocking threads
//! free), though the one-core engine bench is ~12 % faster on mimalloc (docs/BENCHMARKS.md).
//! glibc's arenas are capped at two (see [`cap_malloc_arenas`]).

use std::process::ExitCode;

use clap::Parser;
use stockflow::cmd::{self, Cli};
use stockflow::telemetry;

/// Caps glibc's malloc arenas at two, unless the operator set `MALLOC_ARENA_MAX`.
///
/// glibc gives a thread that finds the heap locked an arena of its own, up to eight per core, and
/// each keeps what was freed into it. The store's blocking threads come and go and each allocated
/// into a fresh arena: `replay --file` of 10 M events peaked at 1.23 GB RSS with the default and at
/// 0.93 GB with two arenas, at the same speed (docs/BENCHMARKS.md, "Issue 24, fourth step").
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn cap_malloc_arenas() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: `mallopt` sets one allocator parameter and touches no Rust-owned memory; it runs
        // first thing in `main`, before any other thread exists.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn cap_malloc_arenas() {}

fn main() -> ExitCode {
    cap_malloc_arenas();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut telemetry = telemetry::init_at(cli.log_level(), runtime.handle());
    let outcome = runtime.block_on(cmd::dispatch(cli, telemetry.metrics.clone()));
    // The last spans leave while the runtime still runs their requests.
    telemetry.shutdown();
    match outcome {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
