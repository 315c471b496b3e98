//! `stockflow run`: ingest, dashboard and consumers in one process on the embedded backend.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use metrics_exporter_prometheus::PrometheusHandle;
use stockflow_connectors::DrainControl;
use stockflow_pipeline::Progress;
use tokio::sync::watch;

use crate::cmd::ingest::{ingest_state, signing_mode};
use crate::runtime::config::Settings;
use crate::runtime::connectors::Connectors;
use crate::runtime::{Embedded, shutdown_signal};

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
    /// Once serving, write the bound addresses here as JSON (`{"ingest": "127.0.0.1:PORT",
    /// "dashboard": "…", "pid": N}`), before the banner: what a supervisor or `replay --target
    /// local` reads when it asked for port 0.
    #[arg(long, value_name = "FILE")]
    ready_file: Option<std::path::PathBuf>,
}

/// Runs `stockflow run` until SIGINT/SIGTERM.
pub async fn run(args: RunArgs, settings: Settings, metrics: Option<PrometheusHandle>) -> anyhow::Result<ExitCode> {
    let listen = args.listen.unwrap_or(settings.listen);
    let verifier = crate::ingest::webhook::load(std::time::Duration::from_secs(300)).await?;
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
    if let Some(path) = &args.ready_file {
        crate::runtime::Ready { ingest: listener.local_addr()?, dashboard: dashboard_at, pid: std::process::id() }
            .write(path)?;
    }
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
