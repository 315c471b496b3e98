//! The command line: `stockflow --help` is generated from these types.

use std::path::PathBuf;

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
    pub config: Option<PathBuf>,
    /// Data directory of the embedded log and state store (overrides `data_dir`).
    #[arg(long, global = true, env = "STOCKFLOW_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Shards of a new embedded log (overrides `shards`; an existing log keeps its count).
    #[arg(long, global = true, env = "STOCKFLOW_SHARDS", value_name = "N")]
    pub shards: Option<usize>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate a peak-season stream, run it through the embedded pipeline, verify the result.
    ///
    /// Exits 0 when the stored state equals a straight pass over the stream, 1 otherwise.
    Demo(crate::demo::DemoArgs),
    /// Serve the ingest API and the live dashboard, and consume the stream until SIGINT/SIGTERM
    /// (embedded backend).
    Run(crate::commands::RunArgs),
    /// Serve the live dashboard (stock of every SKU, alerts as they happen, throughput and lag)
    /// over the embedded store or, with --dynamodb, the AWS deployment's tables.
    Dashboard(crate::commands::DashboardArgs),
    /// Consume the embedded stream until SIGINT/SIGTERM, or with --drain until caught up; with
    /// --stream, join the consumer group of a Kinesis stream (state and leases in DynamoDB).
    Consume(crate::commands::ConsumeArgs),
    /// The ingest HTTP server alone (`ingest serve`), onto Kinesis (--stream) or the embedded log.
    Ingest(IngestArgs),
    /// Append an NDJSON file's events to the embedded stream and consume them; or, with
    /// --target, drive a target (embedded, a local `stockflow run`, an ingest URL, Kinesis) at a
    /// profile's pace, measure it, verify the final state and write a report with a picture.
    Replay(Box<crate::commands::ReplayArgs>),
    /// Generate a deterministic order stream shaped by a profile (baseline-day, black-friday,
    /// cyber-week, custom) with its schedule and expected result, for `replay --dir`.
    Loadgen(crate::loadgen::LoadgenArgs),
    /// Write the demo's deterministic stream to an NDJSON file.
    Generate(generate_args::GenerateArgs),
    /// Print per-SKU state as NDJSON, sorted by SKU.
    State(DumpArgs),
    /// Print alerts (oversell, low stock) as NDJSON, sorted by alert id.
    Alerts(DumpArgs),
    /// The dead-letter store: `dump` it as NDJSON, or `remove` records an operator has dealt with.
    Dlq(DlqArgs),
    /// Compare the stored state with a straight pass over an NDJSON file; exit 1 on mismatch.
    Verify(crate::commands::VerifyArgs),
    /// The connectors' delivery: status, dead letters, and `retry` to re-send dead letters.
    Outbox(crate::commands::OutboxArgs),
    /// `accounts check`: read the accounting connector's configured accounts back from
    /// QuickBooks or Xero and say which are missing, inactive or of the wrong type.
    Accounts(crate::accounts::AccountsArgs),
    /// The accounting connector's summary journals: `list` them per period, `show` the per-SKU
    /// detail behind a period as CSV or JSON, `retry` refused ones.
    Journals(crate::journals::JournalsArgs),
    /// Create (or validate) the DynamoDB tables of the AWS deployment; safe to run repeatedly.
    Setup(crate::commands::SetupArgs),
    /// The consumer group of the AWS deployment: `group status` prints every shard's owner,
    /// epoch, checkpoint, last commit and lag from the lease table.
    Group(crate::commands::GroupArgs),
}

#[derive(Debug, Args)]
pub struct IngestArgs {
    #[command(subcommand)]
    pub action: IngestAction,
}

#[derive(Debug, Subcommand)]
pub enum IngestAction {
    /// Serve the ingest API (/v1/events, /v1/amazon/notifications, /v1/manufacturer/events,
    /// /healthz, /metrics) until SIGINT/SIGTERM. Webhook signatures are required when
    /// STOCKFLOW_WEBHOOK_SECRET_ID (Secrets Manager), STOCKFLOW_WEBHOOK_SECRETS or
    /// STOCKFLOW_WEBHOOK_SECRETS_FILE is set.
    Serve(crate::commands::ServeArgs),
    /// Load an ingest server from this process: closed loop (max throughput) or an open-model
    /// fixed rate (--rate), single events or NDJSON batches; prints throughput and latency.
    Load(crate::load::LoadArgs),
}

#[derive(Debug, Args)]
pub struct DumpArgs {
    #[command(subcommand)]
    pub action: DumpAction,
    #[command(flatten)]
    pub store: crate::commands::StoreArgs,
}

#[derive(Debug, Subcommand)]
pub enum DumpAction {
    /// Write every record as one JSON line to stdout.
    Dump,
}

#[derive(Debug, Args)]
pub struct DlqArgs {
    #[command(subcommand)]
    pub action: DlqAction,
    #[command(flatten)]
    pub store: crate::commands::StoreArgs,
}

#[derive(Debug, Subcommand)]
pub enum DlqAction {
    /// Write every dead letter as one JSON line to stdout.
    Dump,
    /// Remove dead letters (they are kept until removed): one by `--shard` and `--position`, a
    /// shard's by `--shard`, or `--all`. Run it while stockflow is stopped on the embedded store.
    Remove {
        /// The shard.
        #[arg(long, required_unless_present = "all")]
        shard: Option<String>,
        /// The record's position: its `position.sequence` from `dlq dump` (`SEQUENCE/SUB` for a
        /// sub-record of an aggregated Kinesis record).
        #[arg(long, requires = "shard")]
        position: Option<String>,
        /// Every dead letter.
        #[arg(long, conflicts_with_all = ["shard", "position"])]
        all: bool,
    },
}

pub mod generate_args {
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
