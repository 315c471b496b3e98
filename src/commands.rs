//! The subcommands other than `demo`: wiring of config, the embedded backend, the ingest app and
//! the shard workers.

use std::borrow::Cow;
use std::fs::File;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Deserialize;
use stockflow_pipeline::{EmbeddedLog, OutRecord, Progress, WorkerReport, run_all_shards};
use stockflow_state::embedded::RedbStore;
use stockflow_state::reference::{Outcome, SkuSummary, straight_pass};
use stockflow_state::{StateStore, StoreError};
use tokio::sync::watch;

use stockflow_connectors::DrainControl;

use crate::cli::{Cli, Command};
use crate::config::{FileConfig, Settings};
use crate::connectors::{Connectors, DrainSummary};
use crate::{demo, generate};

/// Arguments of `stockflow run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Address of the ingest server (overrides `ingest.listen`).
    #[arg(long, env = "STOCKFLOW_LISTEN", value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// Address of the live dashboard (overrides `dashboard.listen`).
    #[arg(long, env = "STOCKFLOW_DASHBOARD_LISTEN", value_name = "ADDR")]
    dashboard_listen: Option<SocketAddr>,
    /// Serve ingest without webhook secrets on a non-loopback address (refused otherwise:
    /// anyone who reaches the port could write stock).
    #[arg(long)]
    allow_unsigned: bool,
}

/// Arguments of `stockflow dashboard`.
#[derive(Debug, clap::Args)]
pub struct DashboardArgs {
    /// Address to serve on (overrides `dashboard.listen`).
    #[arg(long, env = "STOCKFLOW_DASHBOARD_LISTEN", value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// Read the AWS deployment's DynamoDB tables (every consumer-group member's SKUs) instead of
    /// the embedded store of the data directory.
    #[arg(long)]
    dynamodb: bool,
    /// DynamoDB endpoint override (overrides `dynamodb.endpoint`), e.g. a local emulator.
    #[arg(long, env = "DYNAMODB_ENDPOINT", value_name = "URL")]
    dynamodb_endpoint: Option<String>,
    /// Table name prefix (overrides `dynamodb.table_prefix`).
    #[arg(long, env = "STOCKFLOW_TABLE_PREFIX", value_name = "PREFIX")]
    table_prefix: Option<String>,
    /// A group member's metrics URL (`consume --metrics-listen`), for the throughput and lag
    /// charts; repeat for each member.
    #[arg(long, value_name = "URL")]
    scrape: Vec<String>,
    /// Pause between two reads of every SKU state, ms (overrides `dashboard.refresh_ms`; with
    /// --dynamodb the default is 10,000: each read is a Scan of the state table).
    #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(100..=3_600_000))]
    refresh_ms: Option<u64>,
}

/// Arguments of `stockflow consume`.
#[derive(Debug, clap::Args)]
pub struct ConsumeArgs {
    /// Stop once every shard has been read to its current end and committed (embedded log).
    #[arg(long)]
    drain: bool,
    /// Read this Kinesis stream as a consumer-group member, state in DynamoDB (overrides
    /// `kinesis.stream`); without it, the embedded log is read.
    #[arg(long, env = "STOCKFLOW_STREAM", value_name = "NAME")]
    stream: Option<String>,
    /// Kinesis endpoint override (overrides `kinesis.endpoint`), e.g. a local emulator.
    #[arg(long, env = "KINESIS_ENDPOINT", value_name = "URL")]
    kinesis_endpoint: Option<String>,
    /// DynamoDB endpoint override (overrides `dynamodb.endpoint`), e.g. a local emulator.
    #[arg(long, env = "DYNAMODB_ENDPOINT", value_name = "URL")]
    dynamodb_endpoint: Option<String>,
    /// Table name prefix (overrides `dynamodb.table_prefix`).
    #[arg(long, env = "STOCKFLOW_TABLE_PREFIX", value_name = "PREFIX")]
    table_prefix: Option<String>,
    /// Serve /metrics and /healthz on this address (Kinesis consumer).
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
}

/// Arguments of `stockflow ingest serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on (overrides `ingest.listen`).
    #[arg(long, env = "STOCKFLOW_LISTEN", value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// Put events on this Kinesis stream (overrides `kinesis.stream`); without it, on the
    /// embedded log of the data directory.
    #[arg(long, env = "STOCKFLOW_STREAM", value_name = "NAME")]
    stream: Option<String>,
    /// Kinesis endpoint override (overrides `kinesis.endpoint`), e.g. a local emulator.
    #[arg(long, env = "KINESIS_ENDPOINT", value_name = "URL")]
    kinesis_endpoint: Option<String>,
    /// Serve without webhook secrets on a non-loopback address (refused otherwise).
    #[arg(long)]
    allow_unsigned: bool,
}

/// Refuses to serve unsigned ingest on a non-loopback address unless asked to; returns the
/// word for the banner.
fn signing_mode(verifier: bool, listen: SocketAddr, allow_unsigned: bool) -> anyhow::Result<&'static str> {
    if verifier {
        return Ok("signed");
    }
    if !listen.ip().is_loopback() && !allow_unsigned {
        bail!(
            "refusing to serve unsigned ingest on {listen}: anyone who reaches it could write stock. \
             Configure webhook secrets (STOCKFLOW_WEBHOOK_SECRETS or STOCKFLOW_WEBHOOK_SECRET_ID), \
             listen on 127.0.0.1, or pass --allow-unsigned"
        );
    }
    if !listen.ip().is_loopback() {
        tracing::warn!(%listen, "serving UNSIGNED ingest on a non-loopback address (--allow-unsigned)");
    }
    Ok("unsigned")
}

/// Arguments of `stockflow replay`.
#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// NDJSON file of canonical events, one per line (bad lines are dead-lettered, not dropped).
    #[arg(long, value_name = "FILE", required_unless_present_any = ["dir", "profile"])]
    file: Option<PathBuf>,
    /// Records per durable append (default 10,000), or with --target per request or put
    /// (default 100 over HTTP, 500 on a stream).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    batch: Option<u32>,
    /// Only append; leave consuming to `stockflow run` or `stockflow consume`.
    #[arg(long, conflicts_with = "target")]
    no_consume: bool,
    #[command(flatten)]
    drive: crate::replay::DriveArgs,
}

/// Which store an operator command reads: the embedded one of the data directory, or with
/// `--dynamodb` the AWS deployment's tables (every consumer-group member's shards).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct StoreArgs {
    /// Read the AWS deployment's DynamoDB tables instead of the embedded store.
    #[arg(long, global = true)]
    pub dynamodb: bool,
    /// DynamoDB endpoint override (overrides `dynamodb.endpoint`), e.g. a local emulator.
    #[arg(long, global = true, env = "DYNAMODB_ENDPOINT", value_name = "URL")]
    pub dynamodb_endpoint: Option<String>,
    /// Table name prefix (overrides `dynamodb.table_prefix`).
    #[arg(long, global = true, env = "STOCKFLOW_TABLE_PREFIX", value_name = "PREFIX")]
    pub table_prefix: Option<String>,
}

impl StoreArgs {
    /// The DynamoDB store these flags (and the config) name.
    pub async fn dynamo(&self, settings: &Settings) -> stockflow_state::dynamodb::DynamoStore {
        use stockflow_state::dynamodb::DynamoStore;
        let endpoint = self.dynamodb_endpoint.clone().or_else(|| settings.dynamodb.endpoint.clone());
        let prefix = self.table_prefix.clone().unwrap_or_else(|| settings.dynamodb.table_prefix.clone());
        DynamoStore::new(DynamoStore::client(endpoint.as_deref()).await, &prefix)
    }
}

/// Runs `$body` with `$store` bound to the store `$args` names: the embedded one, or DynamoDB.
macro_rules! with_store {
    ($settings:expr, $args:expr, |$store:ident| $body:expr) => {
        if $args.dynamodb {
            let $store = $args.dynamo(&$settings).await;
            $body
        } else {
            let $store = open_store(&$settings)?;
            $body
        }
    };
}

/// Arguments of `stockflow group`.
#[derive(Debug, clap::Args)]
pub struct GroupArgs {
    #[command(subcommand)]
    action: GroupAction,
    #[command(flatten)]
    store: StoreArgs,
}

#[derive(Debug, clap::Subcommand)]
enum GroupAction {
    /// One line per shard: state (live, ended, free), owner, epoch, checkpoint, last commit's
    /// age and the reader's lag then, parents and children.
    Status,
}

/// Arguments of `stockflow outbox`.
#[derive(Debug, clap::Args)]
pub struct OutboxArgs {
    #[command(subcommand)]
    action: OutboxAction,
    #[command(flatten)]
    store: StoreArgs,
}

#[derive(Debug, clap::Subcommand)]
enum OutboxAction {
    /// Per connector and shard: the delivery cursor, the request in flight, effects not yet
    /// delivered, and dead letters.
    Status,
    /// Print the connectors' dead letters (requests given up, with the last error) as NDJSON.
    DeadLetters {
        /// Only this connector (`alerts-webhook`, `manufacturer`, `accounting`, `log`, `feed`).
        #[arg(long)]
        connector: Option<String>,
    },
    /// Flag dead letters for another delivery: the next `run`/`consume` re-sends each under its
    /// own idempotency key (run it while stockflow is stopped: the store is one process's).
    Retry {
        /// Only this connector.
        #[arg(long)]
        connector: Option<String>,
    },
    /// Remove connector dead letters for good (dealt with by hand): one by `--key`, a connector's,
    /// or `--all`.
    Drop {
        /// Only this connector.
        #[arg(long, required_unless_present = "all")]
        connector: Option<String>,
        /// Only the request with this idempotency key.
        #[arg(long, requires = "connector")]
        key: Option<String>,
        /// Every connector dead letter.
        #[arg(long, conflicts_with_all = ["connector", "key"])]
        all: bool,
    },
}

/// Arguments of `stockflow verify`.
#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// The NDJSON file whose straight pass the stored state must equal.
    #[arg(long, value_name = "FILE")]
    events: PathBuf,
    /// Differences to print at most.
    #[arg(long, default_value_t = 20)]
    max_diff: usize,
    #[command(flatten)]
    store: StoreArgs,
}

/// Arguments of `stockflow setup`.
#[derive(Debug, clap::Args)]
pub struct SetupArgs {
    /// DynamoDB endpoint override (overrides `dynamodb.endpoint`), e.g. a local emulator.
    #[arg(long, env = "DYNAMODB_ENDPOINT", value_name = "URL")]
    dynamodb_endpoint: Option<String>,
    /// Table name prefix (overrides `dynamodb.table_prefix`).
    #[arg(long, env = "STOCKFLOW_TABLE_PREFIX", value_name = "PREFIX")]
    table_prefix: Option<String>,
}

/// The embedded backend of one data directory, locked against a second process.
#[derive(Debug)]
pub struct Embedded {
    /// The durable log.
    pub log: EmbeddedLog,
    /// The state store.
    pub store: Arc<RedbStore>,
    _lock: File,
}

impl Embedded {
    /// Opens (creating if needed) the log and store in the settings' data directory.
    pub fn open(settings: &Settings, fsync: bool) -> anyhow::Result<Self> {
        let lock = lock_data_dir(&settings.data_dir)?;
        let options = stockflow_pipeline::log::LogOptions { fsync, segment_bytes: settings.retention.segment_bytes };
        let log = EmbeddedLog::open_with_options(settings.log_dir(), settings.shards, options)
            .with_context(|| format!("opening the log in {}", settings.log_dir().display()))?;
        let store = RedbStore::open(settings.state_path())
            .with_context(|| format!("opening the state store {}", settings.state_path().display()))?;
        Ok(Embedded { log, store: Arc::new(store), _lock: lock })
    }

    /// Consumes every shard until `shutdown` (or, after [`EmbeddedLog::seal`], the end).
    pub async fn consume(
        &self,
        settings: &Settings,
        shutdown: watch::Receiver<bool>,
        progress: Arc<Progress>,
    ) -> anyhow::Result<Vec<WorkerReport>> {
        let (stop_sweeps, sweeps_stopped) = watch::channel(false);
        let sweeper = crate::retention::spawn_embedded(
            self.log.clone(),
            Arc::clone(&self.store),
            settings.connectors.names(),
            settings.retention,
            sweeps_stopped,
        );
        let reports = run_all_shards(
            &self.log,
            Arc::clone(&self.store),
            Arc::clone(&settings.engine),
            settings.worker,
            shutdown,
            progress,
        )
        .await;
        let _ = stop_sweeps.send(true);
        let _ = sweeper.await;
        Ok(reports?)
    }

    /// One retention sweep now (after the drains delivered what they could).
    pub async fn sweep(&self, settings: &Settings) -> anyhow::Result<crate::retention::Swept> {
        crate::retention::sweep_embedded(&self.log, &*self.store, &settings.connectors.names(), &settings.retention)
            .await
    }
}

fn lock_data_dir(dir: &Path) -> anyhow::Result<File> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("LOCK");
    let file = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(_) => bail!(
            "{} is in use by another stockflow process (the embedded backend is single-process; \
             stop it, or send events to its ingest API)",
            dir.display()
        ),
    }
}

/// A receiver that turns true on SIGINT or SIGTERM.
pub fn shutdown_signal() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    // The handlers are registered here, before the caller goes on (and prints its banner): a
    // SIGTERM that comes right after must not meet the default action and kill the process.
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::spawn(async move {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = int.recv() => {}
                    }
                    tracing::info!("shutdown requested: finishing batches and committing");
                    let _ = tx.send(true);
                });
            }
            (Err(e), _) | (_, Err(e)) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM/SIGINT");
                tokio::spawn(async move {
                    let _ = tokio::signal::ctrl_c().await;
                    let _ = tx.send(true);
                });
            }
        }
    }
    #[cfg(not(unix))]
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("shutdown requested: finishing batches and committing");
        let _ = tx.send(true);
    });
    rx
}

/// Runs the chosen subcommand.
pub async fn dispatch(cli: Cli, metrics: Option<PrometheusHandle>) -> anyhow::Result<ExitCode> {
    let mut file = match &cli.config {
        Some(path) => FileConfig::load(path)?,
        None => FileConfig::default(),
    };
    let explicit_dir = cli.data_dir.is_some();
    let context =
        crate::replay::CliContext { config: cli.config.clone(), shards: cli.shards, data_dir: cli.data_dir.clone() };
    if let Some(dir) = cli.data_dir {
        file.data_dir = dir;
    }
    if let Some(shards) = cli.shards {
        file.shards = shards;
    }
    let settings = file.validate()?;
    match cli.command {
        Command::Demo(args) => demo::run(args, settings, explicit_dir, metrics).await,
        Command::Run(args) => run(args, settings, metrics).await,
        Command::Dashboard(args) => dashboard(args, settings, metrics).await,
        Command::Consume(args) => consume(args, settings, metrics).await,
        Command::Ingest(crate::cli::IngestArgs { action: crate::cli::IngestAction::Serve(args) }) => {
            ingest_serve(args, settings, metrics).await
        }
        Command::Ingest(crate::cli::IngestArgs { action: crate::cli::IngestAction::Load(args) }) => {
            let summary = crate::load::run(args).await?;
            Ok(if summary.errors == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Command::Replay(args) if args.drive.target.is_some() => {
            let args = *args;
            crate::replay::run(args.drive, args.file, args.batch, settings, context, metrics).await
        }
        Command::Replay(args) => replay(*args, settings).await,
        Command::Loadgen(args) => {
            crate::loadgen::run(&args, std::sync::Arc::clone(&settings.engine), &settings.amazon)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Generate(args) => {
            let stream = generate::generate(&args.stream.to_config());
            let out = File::create(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
            stream.write_ndjson(std::io::BufWriter::new(out))?;
            println!("wrote {} events ({} bytes) to {}", stream.len(), stream.bytes(), args.out.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::State(args) => with_store!(settings, args.store, |store| dump_states(&store).await),
        Command::Alerts(args) => with_store!(settings, args.store, |store| dump_alerts(&store).await),
        Command::Dlq(args) => {
            let action = args.action;
            with_store!(settings, args.store, |store| dead_letters(action, &store).await)
        }
        Command::Verify(args) => verify(args, settings).await,
        Command::Setup(args) => setup(args, settings).await,
        Command::Outbox(args) => {
            let store_args = args.store.clone();
            with_store!(settings, store_args, |store| outbox(args, &settings, &store).await)
        }
        Command::Group(args) => group(args, settings).await,
        Command::Accounts(args) => crate::accounts::run(args, &settings).await,
        Command::Journals(args) => {
            let store_args = args.store.clone();
            with_store!(settings, store_args, |store| crate::journals::run(args, &store).await)
        }
    }
}

async fn run(args: RunArgs, settings: Settings, metrics: Option<PrometheusHandle>) -> anyhow::Result<ExitCode> {
    let listen = args.listen.unwrap_or(settings.listen);
    let verifier = crate::webhook::load(std::time::Duration::from_secs(300)).await?;
    let signed = signing_mode(verifier.is_some(), listen, args.allow_unsigned)?;
    let backend = Embedded::open(&settings, true)?;
    let shutdown = shutdown_signal();
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding the ingest server to {listen}"))?;
    let progress = Arc::new(Progress::default());
    let (dashboard, dashboard_at) = crate::dashboard::start_in_process(
        Arc::clone(&backend.store),
        Arc::clone(&progress),
        &settings,
        args.dashboard_listen.unwrap_or(settings.dashboard.listen),
        true,
        metrics.clone(),
        shutdown.clone(),
    )
    .await?;
    println!(
        "stockflow: ingest ({signed}) on http://{}/v1/events, metrics on /metrics, dashboard on http://{dashboard_at}/",
        listener.local_addr()?
    );
    let app = crate::ingest::app(crate::ingest::IngestState {
        metrics,
        verifier,
        ..ingest_state(&settings, backend.log.clone())
    });
    let app = crate::server::guarded(app, listener.local_addr()?, settings.ingest_limits);
    let mut server_stop = shutdown.clone();
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { crate::server::stopped(&mut server_stop).await })
            .await
    });
    let connectors = Connectors::build(&settings.connectors, settings.engine.windows.allowed_lateness_ms()).await?;
    let (_finish, finish) = watch::channel(false);
    let drains = connectors.spawn(Arc::clone(&backend.store), DrainControl::new(shutdown.clone(), finish));
    tracing::info!(connectors = %connectors.names().join(", "), "delivering effects");
    let reports = backend.consume(&settings, shutdown, progress).await?;
    server.await.context("ingest server task")??;
    let (delivered, _) = drains.join().await?;
    backend.sweep(&settings).await?;
    dashboard.close().await;
    for d in &delivered {
        tracing::info!(
            connector = d.connector,
            effects = d.effects,
            requests = d.sent,
            failed = d.failed,
            dead_lettered = d.dead_lettered,
            "delivered"
        );
    }
    for r in &reports {
        tracing::info!(shard = %r.shard, checkpoint = ?r.checkpoint, applied = r.stats.applied, "shard stopped");
    }
    Ok(ExitCode::SUCCESS)
}

/// `stockflow dashboard`: the dashboard alone, over the embedded store of a stopped stockflow
/// (`run` serves its own) or over the AWS deployment's tables, until SIGINT/SIGTERM.
async fn dashboard(
    args: DashboardArgs,
    settings: Settings,
    metrics: Option<PrometheusHandle>,
) -> anyhow::Result<ExitCode> {
    let shutdown = shutdown_signal();
    let listen = args.listen.unwrap_or(settings.dashboard.listen);
    let sizes = settings.engine.windows.sizes_ms().to_vec();
    let telemetry = if args.scrape.is_empty() {
        crate::dashboard::Telemetry::None
    } else {
        crate::dashboard::Telemetry::Scrape {
            client: Box::new(stockflow_connectors::connector::HttpClient::new(std::time::Duration::from_secs(2))),
            urls: args.scrape.clone(),
        }
    };
    let mut cfg = settings.dashboard.config();
    cfg.refresh = std::time::Duration::from_millis(args.refresh_ms.unwrap_or(if args.dynamodb {
        10_000.max(settings.dashboard.refresh_ms)
    } else {
        settings.dashboard.refresh_ms
    }));
    if args.dynamodb {
        cfg.alert_poll = cfg.alert_poll.max(std::time::Duration::from_secs(2));
    }
    let (dashboard, _embedded) = if args.dynamodb {
        let endpoint = args.dynamodb_endpoint.or_else(|| settings.dynamodb.endpoint.clone());
        let prefix = args.table_prefix.unwrap_or_else(|| settings.dynamodb.table_prefix.clone());
        let store = Arc::new(stockflow_state::dynamodb::DynamoStore::new(
            stockflow_state::dynamodb::DynamoStore::client(endpoint.as_deref()).await,
            &prefix,
        ));
        let d = crate::dashboard::Dashboard::start(Arc::clone(&store), telemetry, sizes, cfg, shutdown.clone());
        d.follow_group(store, std::time::Duration::from_secs(2));
        (d, None)
    } else {
        if !settings.state_path().exists() {
            anyhow::bail!("no stockflow store in {} (--data-dir, or --dynamodb for AWS)", settings.data_dir.display());
        }
        let backend = Embedded::open(&settings, false).map_err(|e| {
            e.context("the dashboard of a running `stockflow run` is served by that process (see its first line)")
        })?;
        let store = Arc::clone(&backend.store);
        let d = crate::dashboard::Dashboard::start(store, telemetry, sizes, cfg, shutdown.clone());
        (d, Some(backend))
    };
    let at =
        crate::server::serve(listen, false, crate::dashboard::router(dashboard, metrics), shutdown.clone()).await?;
    println!("stockflow: dashboard on http://{at}/");
    let mut stop = shutdown;
    crate::server::stopped(&mut stop).await;
    Ok(ExitCode::SUCCESS)
}

async fn ingest_serve(
    args: ServeArgs,
    settings: Settings,
    metrics: Option<PrometheusHandle>,
) -> anyhow::Result<ExitCode> {
    let listen = args.listen.unwrap_or(settings.listen);
    let verifier = crate::webhook::load(std::time::Duration::from_secs(300)).await?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding the ingest server to {listen}"))?;
    let mut stop = shutdown_signal();
    let graceful = async move { crate::server::stopped(&mut stop).await };
    let signed = signing_mode(verifier.is_some(), listen, args.allow_unsigned)?;
    let bound = listener.local_addr()?;
    if let Some(stream) = args.stream.or_else(|| settings.kinesis.stream.clone()) {
        let endpoint = args.kinesis_endpoint.or_else(|| settings.kinesis.endpoint.clone());
        let client = stockflow_pipeline::kinesis::client(endpoint.as_deref(), false).await;
        let producer = stockflow_pipeline::kinesis::KinesisProducer::new(client, &stream);
        println!(
            "stockflow: ingest ({signed}) on http://{}/v1/events -> Kinesis stream {stream}",
            listener.local_addr()?
        );
        let app =
            crate::ingest::app(crate::ingest::IngestState { metrics, verifier, ..ingest_state(&settings, producer) });
        let app = crate::server::guarded(app, bound, settings.ingest_limits);
        axum::serve(listener, app).with_graceful_shutdown(graceful).await?;
    } else {
        let backend = Embedded::open(&settings, true)?;
        println!(
            "stockflow: ingest ({signed}) on http://{}/v1/events -> {}",
            listener.local_addr()?,
            settings.log_dir().display()
        );
        let app = crate::ingest::app(crate::ingest::IngestState {
            metrics,
            verifier,
            ..ingest_state(&settings, backend.log.clone())
        });
        let app = crate::server::guarded(app, bound, settings.ingest_limits);
        axum::serve(listener, app).with_graceful_shutdown(graceful).await?;
    }
    Ok(ExitCode::SUCCESS)
}

/// The ingest state over `producer`, behind the group-commit batcher configured in `[ingest]`.
fn ingest_state<P: stockflow_pipeline::StreamProducer>(
    settings: &Settings,
    producer: P,
) -> crate::ingest::IngestState<stockflow_pipeline::batcher::Batching<P>> {
    let batching = stockflow_pipeline::batcher::Batching::new(Arc::new(producer), settings.ingest_batch);
    crate::ingest::IngestState {
        amazon: settings.amazon.clone(),
        max_future_ms: settings.ingest_max_future_ms,
        ..crate::ingest::IngestState::new(Arc::new(batching))
    }
}

async fn consume(args: ConsumeArgs, settings: Settings, metrics: Option<PrometheusHandle>) -> anyhow::Result<ExitCode> {
    if let Some(stream) = args.stream.clone().or_else(|| settings.kinesis.stream.clone()) {
        let targets = crate::group::AwsTargets {
            stream,
            kinesis_endpoint: args.kinesis_endpoint.or_else(|| settings.kinesis.endpoint.clone()),
            dynamodb_endpoint: args.dynamodb_endpoint.or_else(|| settings.dynamodb.endpoint.clone()),
            table_prefix: args.table_prefix.unwrap_or_else(|| settings.dynamodb.table_prefix.clone()),
        };
        return crate::group::consume(&settings, targets, args.metrics_listen, metrics).await;
    }
    let backend = Embedded::open(&settings, true)?;
    if args.drain {
        backend.log.seal();
    }
    let progress = Arc::new(Progress::default());
    let reports = consume_and_deliver(&backend, &settings, args.drain, progress).await?;
    print_reports(&reports);
    Ok(ExitCode::SUCCESS)
}

/// Consumes the embedded log with the connectors' drains alongside. With `finish`, once the
/// consumers are done (the log is sealed) the drains deliver the rest of the outbox and stop.
async fn consume_and_deliver(
    backend: &Embedded,
    settings: &Settings,
    finish: bool,
    progress: Arc<Progress>,
) -> anyhow::Result<Vec<WorkerReport>> {
    let connectors = Connectors::build(&settings.connectors, settings.engine.windows.allowed_lateness_ms()).await?;
    let shutdown = shutdown_signal();
    let (finish_tx, finish_rx) = watch::channel(false);
    let drains = connectors.spawn(Arc::clone(&backend.store), DrainControl::new(shutdown.clone(), finish_rx));
    let reports = backend.consume(settings, shutdown, progress).await?;
    if finish {
        let _ = finish_tx.send(true);
    }
    let (delivered, sync) = drains.join().await?;
    backend.sweep(settings).await?;
    print_deliveries(&delivered);
    if let Some(s) = sync {
        println!("stock levels: {} SKUs sent to the manufacturer in {} requests", s.levels, s.batches);
    }
    Ok(reports)
}

fn print_deliveries(delivered: &[DrainSummary]) {
    for d in delivered.iter().filter(|d| d.sent + d.failed + d.dead_lettered > 0) {
        println!(
            "delivered: {:<15} {} effects in {} requests ({} failed and retried, {} throttled, {} dead-lettered)",
            d.connector, d.effects, d.sent, d.failed, d.throttled, d.dead_lettered
        );
    }
}

fn print_reports(reports: &[WorkerReport]) {
    let applied: u64 = reports.iter().map(|r| r.stats.applied).sum();
    let dups: u64 = reports.iter().map(|r| r.stats.duplicates).sum();
    println!("consumed: {applied} events applied, {dups} duplicates skipped, {} shards", reports.len());
}

/// Reads an NDJSON file into its non-empty lines.
pub fn read_lines(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

/// Non-empty lines of an NDJSON buffer (trailing `\r` removed).
pub fn lines(buf: &[u8]) -> impl Iterator<Item = &[u8]> + '_ {
    buf.split(|b| *b == b'\n').map(|l| l.strip_suffix(b"\r").unwrap_or(l)).filter(|l| !l.trim_ascii().is_empty())
}

#[derive(Deserialize)]
struct KeyOnly<'a> {
    #[serde(borrow)]
    sku: Cow<'a, str>,
}

/// The partition key of a raw record: its SKU, or `""` for a record without one (it will be
/// dead-lettered by the shard that gets it).
pub fn partition_key(record: &[u8]) -> Cow<'_, str> {
    serde_json::from_slice::<KeyOnly<'_>>(record).map(|k| k.sku).unwrap_or(Cow::Borrowed(""))
}

async fn replay(args: ReplayArgs, settings: Settings) -> anyhow::Result<ExitCode> {
    if args.drive.dir.is_some()
        || args.drive.profile.is_some()
        || args.drive.speedup.is_some()
        || args.drive.rate.is_some()
    {
        bail!("--dir, --profile, --speedup and --rate drive a --target (embedded, local, http://…, kinesis:…)");
    }
    let file = args.file.context("--file is required")?;
    let backend = Embedded::open(&settings, true)?;
    let started = std::time::Instant::now();
    let appended = append_file(&backend.log, &file, args.batch.unwrap_or(10_000).max(1) as usize)?;
    println!("appended {appended} records from {} in {:.2?}", file.display(), started.elapsed());
    if args.no_consume {
        return Ok(ExitCode::SUCCESS);
    }
    backend.log.seal();
    let reports = consume_and_deliver(&backend, &settings, true, Arc::new(Progress::default())).await?;
    print_reports(&reports);
    // Opening the store again gives back what retention freed (compacted when mostly free).
    drop(backend);
    drop(Embedded::open(&settings, true)?);
    Ok(ExitCode::SUCCESS)
}

/// Streams an NDJSON file into the log, `batch` lines per append: memory stays at one batch
/// whatever the file's size. Returns the records appended.
fn append_file(log: &EmbeddedLog, file: &Path, batch: usize) -> anyhow::Result<u64> {
    use std::io::BufRead;
    let mut reader = std::io::BufReader::with_capacity(
        1 << 20,
        File::open(file).with_context(|| format!("reading {}", file.display()))?,
    );
    let mut chunk: Vec<u8> = Vec::with_capacity(batch * 256);
    let mut ranges: Vec<std::ops::Range<usize>> = Vec::with_capacity(batch);
    let mut appended = 0u64;
    let flush = |chunk: &mut Vec<u8>, ranges: &mut Vec<std::ops::Range<usize>>| -> anyhow::Result<u64> {
        let keys: Vec<Cow<'_, str>> = ranges.iter().map(|r| partition_key(&chunk[r.clone()])).collect();
        let out: Vec<OutRecord<'_>> =
            ranges.iter().zip(&keys).map(|(r, k)| OutRecord { key: k, payload: &chunk[r.clone()] }).collect();
        log.append(&out)?;
        let n = out.len() as u64;
        drop(out);
        drop(keys);
        chunk.clear();
        ranges.clear();
        Ok(n)
    };
    loop {
        let start = chunk.len();
        let n = reader.read_until(b'\n', &mut chunk).with_context(|| format!("reading {}", file.display()))?;
        if n == 0 {
            break;
        }
        let line = &chunk[start..];
        let line = line.strip_suffix(b"\n").unwrap_or(line);
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.trim_ascii().is_empty() {
            chunk.truncate(start);
            continue;
        }
        ranges.push(start..start + line.len());
        if ranges.len() >= batch {
            appended += flush(&mut chunk, &mut ranges)?;
        }
    }
    if !ranges.is_empty() {
        appended += flush(&mut chunk, &mut ranges)?;
    }
    Ok(appended)
}

fn open_store(settings: &Settings) -> anyhow::Result<RedbStore> {
    let path = settings.state_path();
    if !path.exists() {
        bail!("no state store at {} (run `stockflow replay` or `stockflow run` first)", path.display());
    }
    RedbStore::open(&path).with_context(|| format!("opening {} (is a stockflow process using it?)", path.display()))
}

fn print_ndjson<T: serde::Serialize>(items: impl IntoIterator<Item = T>) -> anyhow::Result<()> {
    write_ndjson(std::io::stdout().lock(), items)
}

/// Writes each item as one JSON line, buffered.
pub fn write_ndjson<T: serde::Serialize>(out: impl Write, items: impl IntoIterator<Item = T>) -> anyhow::Result<()> {
    let mut out = std::io::BufWriter::new(out);
    for item in items {
        serde_json::to_writer(&mut out, &item)?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(())
}

async fn dump_states<S: StateStore>(store: &S) -> anyhow::Result<ExitCode> {
    let states = store.sku_states().await?;
    print_ndjson(states.iter().map(|(sku, s)| SkuSummary::of(sku, s)))?;
    Ok(ExitCode::SUCCESS)
}

async fn dump_alerts<S: StateStore + stockflow_state::OutboxStore>(store: &S) -> anyhow::Result<ExitCode> {
    // Streamed page by page, per shard in commit order: memory stays at one page.
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    stockflow_state::outbox::for_each_effect(store, |_, entry| {
        if entry.effect.is_alert() {
            serde_json::to_writer(&mut out, &entry.effect).map_err(|e| StoreError::Unavailable(e.to_string()))?;
            out.write_all(b"\n").map_err(|e| StoreError::Unavailable(e.to_string()))?;
        }
        Ok(())
    })
    .await?;
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

async fn dead_letters<S: StateStore>(action: crate::cli::DlqAction, store: &S) -> anyhow::Result<ExitCode> {
    use crate::cli::DlqAction;
    match action {
        DlqAction::Dump => print_ndjson(store.dead_letters().await?)?,
        DlqAction::Remove { shard, position, all } => {
            let position = match position {
                // As the log prints it: `SEQUENCE` or `SEQUENCE/SUB`.
                Some(p) => {
                    let (sequence, sub) = p.split_once('/').unwrap_or((p.as_str(), "0"));
                    match (sequence.bytes().all(|b| b.is_ascii_digit()) && !sequence.is_empty(), sub.parse::<u64>()) {
                        (true, Ok(sub)) => Some(stockflow_state::Position { sequence: sequence.to_string(), sub }),
                        _ => bail!("--position {p:?}: expected SEQUENCE or SEQUENCE/SUB (digits)"),
                    }
                }
                None => None,
            };
            let n = store
                .remove_dead_letters(&|d| {
                    all || (shard.as_deref() == Some(d.shard.as_str())
                        && position.as_ref().is_none_or(|p| *p == d.position))
                })
                .await?;
            println!("{n} dead letters removed");
            if n == 0 && !all {
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn verify(args: VerifyArgs, settings: Settings) -> anyhow::Result<ExitCode> {
    let buf = read_lines(&args.events)?;
    let expected = straight_pass(Arc::clone(&settings.engine), lines(&buf));
    let actual = with_store!(settings, args.store, |store| Outcome::of_store(&store).await?);
    let diff = expected.diff(&actual, args.max_diff);
    if diff.is_empty() {
        println!(
            "verified: {} SKUs, {} alerts and {} dead letters equal the straight pass over {}",
            actual.skus.len(),
            actual.alerts.len(),
            actual.dead_letters,
            args.events.display()
        );
        Ok(ExitCode::SUCCESS)
    } else {
        println!("MISMATCH against the straight pass over {}:", args.events.display());
        for line in diff {
            println!("  {line}");
        }
        Ok(ExitCode::FAILURE)
    }
}

async fn outbox<S: stockflow_state::outbox::OutboxStore>(
    args: OutboxArgs,
    settings: &Settings,
    store: &S,
) -> anyhow::Result<ExitCode> {
    use stockflow_state::outbox::requeue_dead_letters;
    match args.action {
        OutboxAction::Status => {
            let dead = store.connector_dead_letters(None).await?;
            for name in settings.connectors.names() {
                for shard in store.outbox_shards().await? {
                    let cursor = store.cursor(name, &shard).await?;
                    // Counted page by page: a connector far behind must not load its backlog.
                    let mut behind = 0usize;
                    let mut after = cursor.delivered.clone();
                    loop {
                        let page = store.read_outbox(&shard, after.as_ref(), stockflow_state::outbox::PAGE).await?;
                        let Some(last) = page.last() else { break };
                        after = Some(last.pos.clone());
                        behind += page.len();
                    }
                    let flight = cursor.in_flight.as_ref().map_or_else(
                        || "-".to_string(),
                        |f| {
                            format!(
                                "{} ({} effects, {} failed attempts)",
                                f.request.key,
                                f.request.items.len(),
                                f.attempts
                            )
                        },
                    );
                    let dl = dead.iter().filter(|d| d.connector == name && d.shard == shard).count();
                    println!(
                        "{name:<15} {shard:<10} effects after the cursor {behind:>8}  in flight {flight}  dead letters {dl}"
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        OutboxAction::DeadLetters { connector } => {
            print_ndjson(store.connector_dead_letters(connector.as_deref()).await?)?;
            Ok(ExitCode::SUCCESS)
        }
        OutboxAction::Drop { connector, key, all } => {
            let mut n = 0;
            for d in store.connector_dead_letters(connector.as_deref()).await? {
                if all || key.as_deref().is_none_or(|k| k == d.request.key) {
                    store.remove_dead_letter(&d.connector, &d.shard, &d.request.key, None).await?;
                    n += 1;
                }
            }
            println!("{n} connector dead letters removed");
            Ok(if n == 0 && !all { ExitCode::FAILURE } else { ExitCode::SUCCESS })
        }
        OutboxAction::Retry { connector } => {
            let n = requeue_dead_letters(store, connector.as_deref()).await?;
            println!(
                "{n} dead letters flagged for another delivery (re-sent by the next `stockflow run` or `consume`; \
                 in a consumer group, by the member that delivers the shard)"
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `stockflow group status`: the lease table, read consistently, one line per shard.
async fn group(args: GroupArgs, settings: Settings) -> anyhow::Result<ExitCode> {
    let GroupAction::Status = args.action;
    let store = args.store.dynamo(&settings).await;
    let rows = store.group_status().await.context("reading the lease table")?;
    let now = stockflow_state::now_ms();
    println!(
        "{:<24} {:<6} {:<40} {:>17} {:<28} {:>10} {:>9}  lineage",
        "shard", "state", "owner", "epoch", "checkpoint", "committed", "lag"
    );
    let mut owners = std::collections::BTreeSet::new();
    for r in &rows {
        let l = &r.lease;
        let state = if l.ended {
            "ended"
        } else if l.owner.is_some() {
            "live"
        } else {
            "free"
        };
        if !l.ended
            && let Some(o) = &l.owner
        {
            owners.insert(o.clone());
        }
        let checkpoint = l.checkpoint.as_ref().map_or_else(|| "-".to_string(), ToString::to_string);
        let checkpoint =
            if checkpoint.len() > 28 { format!("…{}", &checkpoint[checkpoint.len() - 27..]) } else { checkpoint };
        let committed =
            r.committed_at_ms.map_or_else(|| "-".to_string(), |t| format!("{:.1}s ago", (now - t) as f64 / 1000.0));
        let lag = r.lag_ms.map_or_else(|| "-".to_string(), |ms| format!("{:.1}s", ms as f64 / 1000.0));
        let mut lineage = String::new();
        if !l.parents.is_empty() {
            lineage.push_str(&format!("parents {}", l.parents.join(",")));
        }
        if !l.children.is_empty() {
            lineage.push_str(&format!(
                "{}children {}",
                if lineage.is_empty() { "" } else { "; " },
                l.children.join(",")
            ));
        }
        println!(
            "{:<24} {:<6} {:<40} {:>17} {:<28} {:>10} {:>9}  {lineage}",
            l.key,
            state,
            l.owner.as_deref().unwrap_or("-"),
            l.epoch,
            checkpoint,
            committed,
            lag
        );
    }
    println!("{} shards, {} live members", rows.len(), owners.len());
    Ok(ExitCode::SUCCESS)
}

async fn setup(args: SetupArgs, settings: Settings) -> anyhow::Result<ExitCode> {
    use stockflow_state::dynamodb::{DynamoStore, TableOutcome};
    let endpoint = args.dynamodb_endpoint.or(settings.dynamodb.endpoint);
    let prefix = args.table_prefix.unwrap_or(settings.dynamodb.table_prefix);
    let store = DynamoStore::new(DynamoStore::client(endpoint.as_deref()).await, &prefix);
    for outcome in store.setup().await.context("setting up the DynamoDB tables")? {
        match outcome {
            TableOutcome::Created(t) => println!("created  {t}"),
            TableOutcome::Valid(t) => println!("valid    {t}"),
        }
    }
    println!("TTL enabled on {} (expires_at)", store.tables().dedup);
    Ok(ExitCode::SUCCESS)
}
