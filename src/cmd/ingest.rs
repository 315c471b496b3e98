//! `stockflow ingest serve` (the ingest HTTP server alone) and `ingest load` (the HTTP load tool).

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};
use metrics_exporter_prometheus::PrometheusHandle;

use crate::runtime::config::Settings;
use crate::runtime::{Embedded, shutdown_signal};

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
    #[command(flatten)]
    kafka: crate::runtime::kafka::KafkaArgs,
    /// Serve without webhook secrets on a non-loopback address (refused otherwise).
    #[arg(long)]
    allow_unsigned: bool,
}

/// Refuses to serve unsigned ingest on a non-loopback address unless asked to; returns the
/// word for the banner.
pub(crate) fn signing_mode(verifier: bool, listen: SocketAddr, allow_unsigned: bool) -> anyhow::Result<&'static str> {
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

pub async fn serve(args: ServeArgs, settings: Settings, metrics: Option<PrometheusHandle>) -> anyhow::Result<ExitCode> {
    let listen = args.listen.unwrap_or(settings.listen);
    let verifier = crate::ingest::webhook::load(std::time::Duration::from_secs(300)).await?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding the ingest server to {listen}"))?;
    let mut stop = shutdown_signal();
    let graceful = async move { crate::server::stopped(&mut stop).await };
    let signed = signing_mode(verifier.is_some(), listen, args.allow_unsigned)?;
    let bound = listener.local_addr()?;
    let kafka = args.kafka.target(&settings.kafka)?;
    if let Some(target) = kafka {
        crate::runtime::kafka::require()?;
        #[cfg(feature = "kafka")]
        {
            let producer = crate::runtime::kafka::producer(&settings.kafka, &target).await?;
            println!(
                "stockflow: ingest ({signed}) on http://{bound}/v1/events -> Kafka topic {} ({})",
                target.topic, target.brokers
            );
            let flush = producer.clone();
            let app = crate::ingest::app(crate::ingest::IngestState {
                metrics,
                verifier,
                ..ingest_state(&settings, producer)
            });
            let app = crate::server::guarded(app, bound, settings.ingest_limits);
            axum::serve(listener, app).with_graceful_shutdown(graceful).await?;
            // Every accepted request was acknowledged by the brokers before its 202; this only
            // bounds the exit when a request was cut off mid-put.
            let _ = tokio::task::spawn_blocking(move || flush.flush(std::time::Duration::from_secs(10))).await;
        }
        #[cfg(not(feature = "kafka"))]
        let _ = target;
    } else if let Some(stream) = args.stream.or_else(|| settings.kinesis.stream.clone()) {
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
pub(crate) fn ingest_state<P: stockflow_pipeline::StreamProducer>(
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

/// `stockflow ingest load`: exits 1 when any request failed.
pub async fn load(args: crate::loadtest::load::LoadArgs) -> anyhow::Result<ExitCode> {
    let summary = crate::loadtest::load::run(args).await?;
    Ok(if summary.errors == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
