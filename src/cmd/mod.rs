//! The command line: its shape in [`cli`] (`stockflow --help` is generated from [`Cli`]);
//! [`dispatch`] runs a command.
//!
//! One file per command or command family; each exposes its arguments and a `run`. Where the work
//! lives: the embedded backend, config, connectors and the group member in [`crate::runtime`]; the
//! ingest app in [`crate::ingest`]; the dashboard in [`crate::dashboard`]; the body of `replay`, the
//! generators behind `generate`/`loadgen` and the HTTP load tool behind `ingest load` in
//! [`crate::loadtest`].

pub mod accounts;
pub mod cli;
pub mod consume;
pub mod dashboard;
pub mod demo;
pub mod generate;
pub mod group;
pub mod ingest;
pub mod journals;
pub mod outbox;
pub mod probe;
pub mod reconcile;
pub mod run;
pub mod setup;
pub mod store;

pub use cli::{Cli, Command, IngestAction, IngestArgs};

use std::process::ExitCode;

use metrics_exporter_prometheus::PrometheusHandle;

use crate::runtime::config::FileConfig;

/// Runs the chosen subcommand.
pub async fn dispatch(cli: Cli, metrics: Option<PrometheusHandle>) -> anyhow::Result<ExitCode> {
    let mut file = FileConfig::load_with_env(cli.config.as_deref(), std::env::vars())?;
    let explicit_dir = cli.data_dir.is_some();
    let context = crate::loadtest::replay::CliContext {
        config: cli.config.clone(),
        shards: cli.shards,
        data_dir: cli.data_dir.clone(),
    };
    if let Some(dir) = cli.data_dir {
        file.data_dir = dir;
    }
    if let Some(shards) = cli.shards {
        file.shards = shards;
    }
    let settings = file.validate()?;
    match cli.command {
        Command::Demo(args) => demo::run(args, settings, explicit_dir, metrics).await,
        Command::Run(args) => run::run(args, settings, metrics).await,
        Command::Dashboard(args) => dashboard::run(args, settings, metrics).await,
        Command::Consume(args) => consume::run(args, settings, metrics).await,
        Command::Ingest(IngestArgs { action: IngestAction::Serve(args) }) => {
            ingest::serve(args, settings, metrics).await
        }
        Command::Ingest(IngestArgs { action: IngestAction::Load(args) }) => ingest::load(args).await,
        Command::Replay(args) => crate::loadtest::replay::run(*args, settings, context, metrics).await,
        Command::Loadgen(args) => generate::loadgen(&args, &settings),
        Command::Generate(args) => generate::generate(args),
        Command::State(args) => store::state_dump(args, settings).await,
        Command::Alerts(args) => store::alerts_dump(args, settings).await,
        Command::Dlq(args) => store::dlq(args, settings).await,
        Command::Verify(args) => store::verify(args, settings).await,
        Command::Setup(args) => setup::run(args, settings).await,
        Command::Probe(args) => probe::run(args).await,
        Command::Outbox(args) => outbox::run(args, settings).await,
        Command::Reconcile(args) => reconcile::run(*args, settings, metrics).await,
        Command::Group(args) => group::run(args, settings).await,
        Command::Accounts(args) => accounts::run(args, &settings).await,
        Command::Journals(args) => journals::dispatch(args, settings).await,
    }
}
