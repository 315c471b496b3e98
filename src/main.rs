//! `stockflow`: keeps an Amazon seller's inventory true in real time. See `stockflow --help`.
//!
//! It runs on the system allocator: against mimalloc, `replay --file` of 1 M events took ~20 % less
//! CPU and ~30 % less peak memory with glibc's (workers allocate, the store's blocking threads
//! free), though the one-core engine bench is ~12 % faster on mimalloc (docs/BENCHMARKS.md).

use std::process::ExitCode;

use clap::Parser;
use stockflow::cmd::{self, Cli};
use stockflow::telemetry;

fn main() -> ExitCode {
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
