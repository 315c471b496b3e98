//! `stockflow`: keeps an Amazon seller's inventory true in real time. See `stockflow --help`.

use std::process::ExitCode;

use clap::Parser;
use stockflow::cmd::{self, Cli};
use stockflow::telemetry;

/// mimalloc: the hot path allocates effects and order lines; it halves their cost over glibc.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
