//! The process around the pipeline: configuration, the embedded backend's wiring, the one shutdown
//! signal, the connectors next to the consumers, retention sweeps and the consumer-group member.
//!
//! Depends on [`crate::ingest`], [`crate::server`] and [`crate::telemetry`]; the dashboard, the
//! load tests and the commands build on it.

pub mod config;
pub mod connectors;
pub mod emf;
pub mod group;
pub mod kafka;
pub mod retention;

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, bail};
use stockflow_connectors::DrainControl;
use stockflow_pipeline::{EmbeddedLog, Progress, WorkerReport, run_all_shards};
use stockflow_state::embedded::RedbStore;
use tokio::sync::watch;

use crate::runtime::config::Settings;
use crate::runtime::connectors::{Connectors, DrainSummary};

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
        let sweeper = crate::runtime::retention::spawn_embedded(
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
    pub async fn sweep(&self, settings: &Settings) -> anyhow::Result<crate::runtime::retention::Swept> {
        crate::runtime::retention::sweep_embedded(
            &self.log,
            &*self.store,
            &settings.connectors.names(),
            &settings.retention,
        )
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

/// The process's one shutdown signal: created (its SIGINT/SIGTERM handlers registered) by the
/// first call, shared by every later one, and true for good once a signal came.
///
/// Why a process-wide value that commands subscribe to, rather than one made in `dispatch` and
/// passed down: registering the handlers replaces Ctrl-C's default action, so only the commands
/// that stop gracefully (servers, consumers, `replay --file`, `reconcile --every`, the demo's
/// hold) may register them; a one-shot dump, `verify` or `replay --target` must still die on
/// Ctrl-C at once. Creating it on first use does exactly that, and the `OnceLock` keeps it one
/// signal however many places subscribe.
static SHUTDOWN: std::sync::OnceLock<watch::Sender<bool>> = std::sync::OnceLock::new();

/// A receiver of the process's shutdown signal, which turns true on SIGINT or SIGTERM. The first
/// call registers the handlers (inside the runtime), before the caller goes on and prints its
/// banner: a SIGTERM that comes right after must not meet the default action and kill the process.
pub fn shutdown_signal() -> watch::Receiver<bool> {
    SHUTDOWN
        .get_or_init(|| {
            listen_for_signals();
            watch::channel(false).0
        })
        .subscribe()
}

fn request_shutdown() {
    tracing::info!("shutdown requested: finishing batches and committing");
    if let Some(tx) = SHUTDOWN.get() {
        // Kept even with no receiver yet: a later subscriber sees it.
        tx.send_replace(true);
    }
}

fn listen_for_signals() {
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
                    request_shutdown();
                });
            }
            (Err(e), _) | (_, Err(e)) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM/SIGINT");
                tokio::spawn(async move {
                    let _ = tokio::signal::ctrl_c().await;
                    request_shutdown();
                });
            }
        }
    }
    #[cfg(not(unix))]
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        request_shutdown();
    });
}

/// Opens the embedded state store of the data directory (operator commands on a stopped
/// stockflow).
pub fn open_store(settings: &Settings) -> anyhow::Result<RedbStore> {
    let path = settings.state_path();
    if !path.exists() {
        bail!("no state store at {} (run `stockflow replay` or `stockflow run` first)", path.display());
    }
    RedbStore::open(&path).with_context(|| format!("opening {} (is a stockflow process using it?)", path.display()))
}

/// Consumes the embedded log with the connectors' drains alongside. With `finish`, once the
/// consumers are done (the log is sealed) the drains deliver the rest of the outbox and stop.
pub async fn consume_and_deliver(
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

pub fn print_deliveries(delivered: &[DrainSummary]) {
    for d in delivered.iter().filter(|d| d.sent + d.failed + d.dead_lettered > 0) {
        println!(
            "delivered: {:<15} {} effects in {} requests ({} failed and retried, {} throttled, {} dead-lettered)",
            d.connector, d.effects, d.sent, d.failed, d.throttled, d.dead_lettered
        );
    }
}

pub fn print_reports(reports: &[WorkerReport]) {
    let applied: u64 = reports.iter().map(|r| r.stats.applied).sum();
    let dups: u64 = reports.iter().map(|r| r.stats.duplicates).sum();
    println!("consumed: {applied} events applied, {dups} duplicates skipped, {} shards", reports.len());
}

/// The addresses a running `stockflow run` serves on (`--ready-file`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Ready {
    /// The ingest API.
    pub ingest: std::net::SocketAddr,
    /// The live dashboard.
    pub dashboard: std::net::SocketAddr,
    /// The process id.
    pub pid: u32,
}

impl Ready {
    /// Writes the file atomically (a reader never sees half of it).
    pub fn write(&self, path: &std::path::Path) -> anyhow::Result<()> {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec(self)?).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
    }

    /// Reads a ready file.
    pub fn read(path: &std::path::Path) -> anyhow::Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))
    }
}
