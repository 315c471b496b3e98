//! `stockflow`: keeps an Amazon seller's inventory true in real time.
//!
//! Subcommands: `demo` (generate a peak-season stream, run it through the embedded pipeline,
//! verify), `run` (ingest server + consumer), `consume`, `replay`, `generate`, `state dump`,
//! `alerts dump`, `dlq dump`, `verify`.

mod commands;
mod config;
mod demo;
mod generate;
mod ingest;
mod telemetry;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

/// stockflow — a stream processor that keeps an Amazon seller's inventory true in real time.
///
/// It reads canonical stock events (orders placed, cancelled and shipped; stock received,
/// adjusted and counted) from a stream, keeps per-SKU stock, reservations, costs and windows,
/// raises oversell and low-stock alerts, and commits state, effects and stream position
/// together so crashes neither lose nor double-count anything.
#[derive(Debug, Parser)]
#[command(name = "stockflow", version, propagate_version = true)]
pub struct Cli {
    /// Configuration file (TOML). Every field has a default; see deploy/stockflow.example.toml.
    #[arg(long, global = true, env = "STOCKFLOW_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Data directory of the embedded log and state store (overrides `data_dir`).
    #[arg(long, global = true, env = "STOCKFLOW_DATA_DIR", value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Shards of a new embedded log (overrides `shards`; an existing log keeps its count).
    #[arg(long, global = true, env = "STOCKFLOW_SHARDS", value_name = "N")]
    shards: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate a peak-season stream, run it through the embedded pipeline, verify the result.
    ///
    /// Exits 0 when the stored state equals a straight pass over the stream, 1 otherwise.
    Demo(demo::DemoArgs),
    /// Serve the ingest API and consume the stream until SIGINT/SIGTERM (embedded backend).
    Run(commands::RunArgs),
    /// Consume the embedded stream until SIGINT/SIGTERM, or with --drain until caught up.
    Consume(commands::ConsumeArgs),
    /// Append the canonical events of an NDJSON file to the stream, then consume them.
    Replay(commands::ReplayArgs),
    /// Write the demo's deterministic stream to an NDJSON file.
    Generate(generate_args::GenerateArgs),
    /// Print per-SKU state as NDJSON, sorted by SKU.
    State(DumpArgs),
    /// Print alerts (oversell, low stock) as NDJSON, sorted by alert id.
    Alerts(DumpArgs),
    /// Print the dead-letter store as NDJSON.
    Dlq(DumpArgs),
    /// Compare the stored state with a straight pass over an NDJSON file; exit 1 on mismatch.
    Verify(commands::VerifyArgs),
}

#[derive(Debug, Args)]
struct DumpArgs {
    #[command(subcommand)]
    action: DumpAction,
}

#[derive(Debug, Subcommand)]
enum DumpAction {
    /// Write every record as one JSON line to stdout.
    Dump,
}

mod generate_args {
    use std::path::PathBuf;

    /// Arguments of `stockflow generate`.
    #[derive(Debug, clap::Args)]
    pub struct GenerateArgs {
        /// Output file (NDJSON).
        #[arg(long, value_name = "FILE")]
        pub out: PathBuf,
        #[command(flatten)]
        pub stream: crate::demo::StreamArgs,
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let metrics = telemetry::init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(commands::dispatch(cli, metrics)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
