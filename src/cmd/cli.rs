//! The command line's shape: [`Cli`] (global flags) and [`Command`] (the subcommands), from
//! which `stockflow --help` is generated, and the log level and allocator policy a command implies.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use super::{
    accounts, consume, dashboard, demo, generate, group, ingest, journals, outbox, probe, reconcile, run, setup, store,
};

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
    /// More log output: `-v` INFO, `-vv` DEBUG (one-shot commands log only warnings by default;
    /// `STOCKFLOW_LOG` overrides both).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// The default log level: long-running commands (servers, consumers) log at INFO, one-shot
    /// commands (demo, replay, dumps, …) only warnings so their summary is what a person reads;
    /// each `-v` raises it one step.
    pub fn log_level(&self) -> &'static str {
        let base = u8::from(self.command.is_long_running());
        match base + self.verbose {
            0 => "warn",
            1 => "info",
            2 => "debug",
            _ => "trace",
        }
    }
}

impl Command {
    /// Runs until stopped (a server or a consumer), as opposed to a one-shot command.
    pub fn is_long_running(&self) -> bool {
        match self {
            Command::Run(_) | Command::Dashboard(_) => true,
            Command::Reconcile(args) => args.every.is_some(),
            Command::Consume(args) => !args.drains(),
            Command::Ingest(IngestArgs { action: IngestAction::Serve(_) }) => true,
            _ => false,
        }
    }

    /// Batch work where peak memory matters and nothing waits on an answer: one-shot commands
    /// other than `replay --target` (which measures latency) and `consume --drain` (the consumer
    /// catching up, as after an outage: it runs as `consume` does, and with two arenas its shard
    /// workers, store threads and drain lanes spent 8–10 % of its CPU waiting on heap locks).
    /// `main` caps glibc's malloc arenas for these.
    pub fn is_batch(&self) -> bool {
        match self {
            Command::Consume(_) => false,
            Command::Replay(args) if args.target.is_some() => false,
            command => !command.is_long_running(),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate a peak-season stream, run it through the embedded pipeline, verify the result.
    ///
    /// Exits 0 when the stored state equals a straight pass over the stream, 1 otherwise.
    Demo(demo::DemoArgs),
    /// Serve the ingest API and the live dashboard, and consume the stream until SIGINT/SIGTERM
    /// (embedded backend).
    Run(run::RunArgs),
    /// Serve the live dashboard (stock of every SKU, alerts as they happen, throughput and lag)
    /// over the embedded store or, with --dynamodb, the AWS deployment's tables.
    Dashboard(dashboard::DashboardArgs),
    /// Consume the embedded stream until SIGINT/SIGTERM, or with --drain until caught up; with
    /// --stream, join the consumer group of a Kinesis stream (state and leases in DynamoDB).
    Consume(consume::ConsumeArgs),
    /// The ingest HTTP server alone (`ingest serve`), onto Kinesis (--stream) or the embedded log.
    Ingest(IngestArgs),
    /// Append an NDJSON file's events to the embedded stream and consume them; or, with
    /// --target, drive a target (embedded, a local `stockflow run`, an ingest URL, Kinesis) at a
    /// profile's pace, measure it, verify the final state and write a report with a picture.
    Replay(Box<crate::loadtest::replay::ReplayArgs>),
    /// Generate a deterministic order stream shaped by a profile (baseline-day, black-friday,
    /// cyber-week, custom) with its schedule and expected result, for `replay --dir`.
    Loadgen(crate::loadtest::loadgen::LoadgenArgs),
    /// Write the demo's deterministic stream to an NDJSON file.
    Generate(generate::GenerateArgs),
    /// Print per-SKU state as NDJSON, sorted by SKU.
    State(store::DumpArgs),
    /// Print alerts (oversell, low stock) as NDJSON, sorted by alert id.
    Alerts(store::DumpArgs),
    /// The dead-letter store: `dump` it as NDJSON, or `remove` records an operator has dealt with.
    Dlq(store::DlqArgs),
    /// Compare the stored state with a straight pass over an NDJSON file; exit 1 on mismatch.
    Verify(store::VerifyArgs),
    /// The connectors' delivery: status, dead letters, and `retry` to re-send dead letters.
    Outbox(outbox::OutboxArgs),
    /// `accounts check`: read the accounting connector's configured accounts back from
    /// QuickBooks or Xero and say which are missing, inactive or of the wrong type.
    Accounts(accounts::AccountsArgs),
    /// The accounting connector's summary journals: `list` them per period, `show` the per-SKU
    /// detail behind a period as CSV or JSON, `retry` refused ones.
    Journals(journals::JournalsArgs),
    /// Create the DynamoDB tables of the AWS deployment (safe to run repeatedly), or with
    /// --validate only check them and the stream.
    Setup(setup::SetupArgs),
    /// GET a URL and exit 0 on a 2xx answer: the container health check (no curl in the image).
    Probe(probe::ProbeArgs),
    /// Compare stockflow's stock with Amazon's FBA inventory (Inventory API or a ledger report)
    /// and its value with the books, explained per SKU; once, or --every DURATION.
    ///
    /// Writes reconcile.json, reconcile.csv and reconcile.html; with --apply, counts the
    /// unexplained SKUs on the stream. Exits 0 within the thresholds, 2 past one, 1 on failure.
    Reconcile(Box<reconcile::ReconcileArgs>),
    /// The consumer group of the AWS deployment: `group status` prints every shard's owner,
    /// epoch, checkpoint, last commit and lag from the lease table.
    Group(group::GroupArgs),
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
    Serve(ingest::ServeArgs),
    /// Load an ingest server from this process: closed loop (max throughput) or an open-model
    /// fixed rate (--rate), single events or NDJSON batches; prints throughput and latency.
    Load(crate::loadtest::load::LoadArgs),
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::Cli;

    fn level(args: &[&str]) -> &'static str {
        Cli::try_parse_from(std::iter::once("stockflow").chain(args.iter().copied())).unwrap().log_level()
    }

    #[test]
    fn one_shot_commands_log_warnings_and_servers_info_unless_asked() {
        assert_eq!(level(&["demo"]), "warn");
        assert_eq!(level(&["state", "dump"]), "warn");
        assert_eq!(level(&["consume", "--drain"]), "warn");
        assert_eq!(level(&["demo", "-v"]), "info");
        assert_eq!(level(&["-vv", "replay", "--file", "x"]), "debug");
        assert_eq!(level(&["run"]), "info");
        assert_eq!(level(&["consume"]), "info");
        assert_eq!(level(&["ingest", "serve"]), "info");
        assert_eq!(level(&["run", "-v"]), "debug");
    }

    #[test]
    fn batch_commands_are_the_one_shot_ones_that_do_not_measure_latency() {
        let batch = |args: &[&str]| {
            Cli::try_parse_from(std::iter::once("stockflow").chain(args.iter().copied())).unwrap().command.is_batch()
        };
        for args in [&["demo"][..], &["replay", "--file", "x"], &["state", "dump"]] {
            assert!(batch(args), "{args:?}");
        }
        for args in [
            &["run"][..],
            &["consume"],
            &["consume", "--drain"],
            &["ingest", "serve"],
            &["replay", "--file", "x", "--target", "local"],
        ] {
            assert!(!batch(args), "{args:?}");
        }
    }
}
