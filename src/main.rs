//! `stockflow`: keeps an Amazon seller's inventory true in real time. See `stockflow --help`.
//!
//! It runs on the system allocator: against mimalloc, `replay --file` of 1 M events took ~20 % less
//! CPU and ~30 % less peak memory with glibc's (workers allocate, the store's blocking threads
//! free), though the one-core engine bench is ~12 % faster on mimalloc (docs/BENCHMARKS.md).
//! Batch commands cap glibc's arenas at two and fix its mmap threshold (see [`tune_malloc_for_batch`]).

use std::process::ExitCode;

use clap::Parser;
use stockflow::cmd::{self, Cli};
use stockflow::telemetry;

/// For batch commands ([`Command::is_batch`](stockflow::cmd::Command::is_batch)), caps glibc's
/// malloc arenas at two, unless the operator set `MALLOC_ARENA_MAX`, and fixes the size from which
/// an allocation is its own mapping at 1 MiB, unless `MALLOC_MMAP_THRESHOLD_` is set.
///
/// glibc gives a thread that finds the heap locked an arena of its own, up to eight per core, and
/// each keeps what was freed into it; the store's blocking threads come and go and allocate into
/// arenas of their own. On 2 cores `replay --file` of 10 M events peaked at 1.42 GB RSS with the
/// default and 0.87 GB with two arenas, at the same speed. Servers and consumers keep the default:
/// with two (or four) arenas their threads waited for each other's heap locks, and webhook →
/// committed at 50,000 events/s went from p99 97–219 ms to 220–248 (docs/BENCHMARKS.md, "Issue
/// 24, fourth step"); set `MALLOC_ARENA_MAX` where memory counts more than latency.
///
/// glibc raises its mmap threshold (default 128 KiB) to the size of each mapped block freed, up to
/// 32 MiB, so after the first commits a commit's multi-megabyte buffers come from the heap and
/// what they leave there stays resident. With the threshold fixed at 1 MiB they are mapped and
/// given back when freed: `replay --file` of 1 M events peaked at 228–230 MB instead of 261–264
/// (docs/BENCHMARKS.md, "Issue 24, sixth step").
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn tune_malloc_for_batch(cli: &Cli) {
    if !cli.command.is_batch() {
        return;
    }
    for (var, param, value) in
        [("MALLOC_ARENA_MAX", libc::M_ARENA_MAX, 2), ("MALLOC_MMAP_THRESHOLD_", libc::M_MMAP_THRESHOLD, 1 << 20)]
    {
        if std::env::var_os(var).is_none() {
            // SAFETY: `mallopt` sets one allocator parameter and touches no Rust-owned memory; it
            // runs in `main` before the runtime or any other thread exists.
            unsafe {
                libc::mallopt(param, value);
            }
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_malloc_for_batch(_: &Cli) {}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tune_malloc_for_batch(&cli);
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
