//! `stockflow consume` on the AWS backend: a member of a consumer group reading a Kinesis stream
//! (polling or enhanced fan-out) or a Kafka / MSK topic (feature `kafka`), with leases, state,
//! outbox and checkpoints in DynamoDB.

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
use stockflow_state::lease::Assignment;

use crate::runtime::config::Settings;

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
    /// Read this Kafka topic instead of the Kinesis stream.
    pub kafka: Option<crate::runtime::kafka::KafkaTarget>,
}

/// A member of either backend's group.
#[derive(Debug)]
pub enum Member {
    /// Leases decide who reads which Kinesis shard.
    Kinesis(Coordinator<KinesisSource, DynamoStore, DynamoStore>),
    /// The Kafka group decides; leases fence.
    #[cfg(feature = "kafka")]
    Kafka(Box<stockflow_pipeline::kafka::KafkaMember<DynamoStore, DynamoStore>>),
}

impl Member {
    /// What this member delivers, kept current while it runs.
    pub fn assignment(&self) -> tokio::sync::watch::Receiver<Arc<Assignment>> {
        match self {
            Member::Kinesis(c) => c.assignment(),
            #[cfg(feature = "kafka")]
            Member::Kafka(k) => k.assignment(),
        }
    }

    /// Runs until `shutdown`, then hands off.
    pub async fn run(
        self,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> Result<stockflow_pipeline::group::GroupReport, stockflow_pipeline::WorkerError> {
        match self {
            Member::Kinesis(c) => c.run(shutdown).await,
            #[cfg(feature = "kafka")]
            Member::Kafka(k) => k.run(shutdown).await,
        }
    }
}

/// A Kafka group member of `settings` (`[kafka]`, `[worker]`, `[group]`) over `target`.
#[cfg(feature = "kafka")]
pub async fn kafka_member(
    settings: &Settings,
    target: &crate::runtime::kafka::KafkaTarget,
    store: Arc<DynamoStore>,
    progress: Arc<Progress>,
) -> anyhow::Result<stockflow_pipeline::kafka::KafkaMember<DynamoStore, DynamoStore>> {
    let signer = crate::runtime::kafka::signer(&settings.kafka).await?;
    Ok(stockflow_pipeline::kafka::KafkaMember::new(
        crate::runtime::kafka::config(&settings.kafka, target),
        signer,
        Arc::clone(&store),
        store,
        Arc::clone(&settings.engine),
        settings.worker,
        settings.group.clone(),
        progress,
    )?)
}

/// A consumer-group member of `settings` (`[kinesis]` read mode, `[worker]`, `[group]`) over
/// `stream`, with state and leases in `store`.
pub async fn member(
    settings: &Settings,
    client: aws_sdk_kinesis::Client,
    stream: &str,
    store: Arc<DynamoStore>,
    progress: Arc<Progress>,
) -> anyhow::Result<Coordinator<KinesisSource, DynamoStore, DynamoStore>> {
    let k = &settings.kinesis;
    let mut cfg = KinesisConfig::new(stream);
    cfg.idle_poll = std::time::Duration::from_millis(k.idle_poll_ms);
    cfg.get_records_limit = k.get_records_limit;
    if k.mode == crate::runtime::config::KinesisMode::FanOut {
        cfg.mode = ReadMode::FanOut { consumer_name: k.consumer_name.clone() };
    }
    let source = KinesisSource::new(client, cfg).await.context("opening the Kinesis stream")?;
    Ok(Coordinator::new(
        Arc::new(source),
        Arc::clone(&store),
        store,
        Arc::clone(&settings.engine),
        settings.worker,
        settings.group.clone(),
        progress,
    ))
}

/// Runs this process as a consumer-group member until SIGINT/SIGTERM, then hands its leases off.
pub async fn consume(
    settings: &Settings,
    targets: AwsTargets,
    metrics_listen: Option<SocketAddr>,
    metrics: Option<PrometheusHandle>,
) -> anyhow::Result<ExitCode> {
    let store = Arc::new(
        DynamoStore::new(DynamoStore::client(targets.dynamodb_endpoint.as_deref()).await, &targets.table_prefix)
            .with_dedup_horizon(settings.engine.dedup_horizon_ms)
            .with_dedup_margin(settings.dynamodb.dedup_ttl_margin_ms),
    );
    let shutdown = crate::runtime::shutdown_signal();
    // The EMF lines stop after the last commit and delivery, so the last line carries them.
    let (emf_done, emf_stop) = tokio::sync::watch::channel(false);
    let emf = crate::runtime::emf::spawn(
        &settings.cloudwatch,
        metrics.clone(),
        targets.stream.clone(),
        settings.group.worker_id.to_string(),
        emf_stop,
    );
    // Ready once the coordinator has read the lease table (its first assignment names the live
    // members); not ready again while it hands off at shutdown (the assignment empties).
    let assigned: Arc<std::sync::OnceLock<tokio::sync::watch::Receiver<Arc<Assignment>>>> = Arc::default();
    if let Some(addr) = metrics_listen {
        let readiness = Arc::clone(&assigned);
        let app = Router::new()
            .route("/healthz", get(|| async { "ok" }))
            .route(
                "/readyz",
                get(move || {
                    let members = readiness.get().map_or(0, |rx| rx.borrow().members);
                    async move {
                        if members > 0 {
                            (StatusCode::OK, axum::Json(serde_json::json!({ "ready": true, "members": members })))
                        } else {
                            let why = "the group coordinator has not read the lease table yet (or is handing off)";
                            (
                                StatusCode::SERVICE_UNAVAILABLE,
                                axum::Json(serde_json::json!({ "ready": false, "error": why })),
                            )
                        }
                    }
                }),
            )
            .route(
                "/metrics",
                get(move || {
                    let handle = metrics.clone();
                    async move { crate::telemetry::render(handle.as_ref()) }
                }),
            );
        let at = crate::server::serve(addr, false, app, shutdown.clone()).await?;
        println!("stockflow: metrics on http://{at}/metrics");
    }
    let progress = Arc::new(Progress::default());
    let coordinator = match &targets.kafka {
        None => {
            let client = kinesis::client(targets.kinesis_endpoint.as_deref(), false).await;
            Member::Kinesis(member(settings, client, &targets.stream, Arc::clone(&store), Arc::clone(&progress)).await?)
        }
        #[cfg(feature = "kafka")]
        Some(target) => {
            Member::Kafka(Box::new(kafka_member(settings, target, Arc::clone(&store), Arc::clone(&progress)).await?))
        }
        #[cfg(not(feature = "kafka"))]
        Some(_) => return Err(crate::runtime::kafka::not_built()),
    };
    let _ = assigned.set(coordinator.assignment());
    match &targets.kafka {
        None => {
            println!("stockflow: worker {} joined the group on stream {}", settings.group.worker_id, targets.stream)
        }
        Some(k) => println!(
            "stockflow: worker {} joined Kafka group {} on topic {} ({})",
            settings.group.worker_id, settings.kafka.group_id, k.topic, k.brokers
        ),
    }
    // Each member delivers the outboxes its coordinator assigns it: the shards it leases and the
    // ended ancestors it is designated for, every write fenced by one of its leases.
    let connectors = crate::runtime::connectors::Connectors::build(
        &settings.connectors,
        settings.engine.windows.allowed_lateness_ms(),
    )
    .await?;
    let (_finish, finish) = tokio::sync::watch::channel(false);
    let drains = connectors.spawn_lanes(
        Arc::clone(&store),
        stockflow_connectors::DrainControl::new(shutdown.clone(), finish),
        stockflow_connectors::drain::Lanes::Assigned(coordinator.assignment()),
    );
    let sweeps = crate::runtime::retention::spawn_group(
        Arc::clone(&store),
        coordinator.assignment(),
        settings.connectors.names(),
        settings.retention,
        shutdown.clone(),
    );
    let report = coordinator.run(shutdown).await?;
    let (delivered, _) = drains.join().await?;
    let _ = sweeps.await;
    let _ = emf_done.send(true);
    if let Some(emf) = emf {
        let _ = emf.await;
    }
    for d in delivered.iter().filter(|d| d.sent > 0) {
        println!("delivered: {} {} effects in {} requests", d.connector, d.effects, d.sent);
    }
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
        "dynamodb-calls: transactions={} reads={} lease_writes={} renewals={} lease_scans={} delivery_writes={}",
        s.transactions.load(Ordering::Relaxed),
        s.reads.load(Ordering::Relaxed),
        s.lease_calls.load(Ordering::Relaxed),
        s.lease_renewals.load(Ordering::Relaxed),
        s.lease_scans.load(Ordering::Relaxed),
        s.delivery_writes.load(Ordering::Relaxed),
    );
    Ok(ExitCode::SUCCESS)
}
