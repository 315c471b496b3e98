//! `stockflow consume` on the AWS backend: a member of a consumer group reading a Kinesis stream
//! (polling or enhanced fan-out), with leases, state, outbox and checkpoints in DynamoDB.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use anyhow::Context;
use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use stockflow_pipeline::Progress;
use stockflow_pipeline::group::Coordinator;
use stockflow_pipeline::kinesis::{self, KinesisConfig, KinesisSource, ReadMode};
use stockflow_state::dynamodb::DynamoStore;

use crate::config::Settings;

/// Where the group member's AWS resources are (flags and environment override the config).
#[derive(Debug, Clone, Default)]
pub struct AwsTargets {
    /// Kinesis stream name.
    pub stream: String,
    /// Kinesis endpoint override.
    pub kinesis_endpoint: Option<String>,
    /// DynamoDB endpoint override.
    pub dynamodb_endpoint: Option<String>,
    /// Table name prefix.
    pub table_prefix: String,
}

/// Runs this process as a consumer-group member until SIGINT/SIGTERM, then hands its leases off.
pub async fn consume(
    settings: &Settings,
    targets: AwsTargets,
    metrics_listen: Option<SocketAddr>,
    metrics: Option<PrometheusHandle>,
) -> anyhow::Result<ExitCode> {
    let k = &settings.kinesis;
    let mut cfg = KinesisConfig::new(&targets.stream);
    cfg.idle_poll = std::time::Duration::from_millis(k.idle_poll_ms);
    cfg.get_records_limit = k.get_records_limit;
    if k.mode == "fan-out" {
        cfg.mode = ReadMode::FanOut { consumer_name: k.consumer_name.clone() };
    }
    let client = kinesis::client(targets.kinesis_endpoint.as_deref(), false).await;
    let source = KinesisSource::new(client, cfg).await.context("opening the Kinesis stream")?;
    let store = Arc::new(DynamoStore::new(
        DynamoStore::client(targets.dynamodb_endpoint.as_deref()).await,
        &targets.table_prefix,
    ));
    let shutdown = crate::commands::shutdown_signal();
    if let Some(addr) = metrics_listen {
        let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?;
        println!("stockflow: metrics on http://{}/metrics", listener.local_addr()?);
        let app = Router::new().route("/healthz", get(|| async { "ok" })).route(
            "/metrics",
            get(move || {
                let handle = metrics.clone();
                async move {
                    match handle {
                        Some(h) => (StatusCode::OK, h.render()),
                        None => (StatusCode::NOT_FOUND, "metrics are not enabled".to_string()),
                    }
                }
            }),
        );
        let mut stop = shutdown.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await;
        });
    }
    let progress = Arc::new(Progress::default());
    let coordinator = Coordinator::new(
        Arc::new(source),
        Arc::clone(&store),
        Arc::clone(&store),
        Arc::clone(&settings.engine),
        settings.worker,
        settings.group.clone(),
        Arc::clone(&progress),
    );
    println!("stockflow: worker {} joined the group on stream {}", settings.group.worker_id, targets.stream);
    let report = coordinator.run(shutdown).await?;
    let s = store.stats();
    println!(
        "consumed: {} events applied, {} duplicates skipped, {} commits; leases taken {}, lost {}",
        progress.applied.load(Ordering::Relaxed),
        progress.duplicates.load(Ordering::Relaxed),
        progress.commits.load(Ordering::Relaxed),
        report.taken,
        report.lost,
    );
    println!(
        "dynamodb-calls: transactions={} reads={} lease_writes={} renewals={} lease_scans={}",
        s.transactions.load(Ordering::Relaxed),
        s.reads.load(Ordering::Relaxed),
        s.lease_calls.load(Ordering::Relaxed),
        s.lease_renewals.load(Ordering::Relaxed),
        s.lease_scans.load(Ordering::Relaxed),
    );
    Ok(ExitCode::SUCCESS)
}
