//! `stockflow consume`: the embedded stream's consumers, or a Kinesis consumer-group member.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

use metrics_exporter_prometheus::PrometheusHandle;
use stockflow_pipeline::Progress;

use crate::runtime::Embedded;
use crate::runtime::config::Settings;
use crate::runtime::{consume_and_deliver, print_reports};

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
    #[command(flatten)]
    kafka: crate::runtime::kafka::KafkaArgs,
    /// Serve /metrics and /healthz on this address (Kinesis or Kafka consumer).
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
}

impl ConsumeArgs {
    /// `--drain`: consume until caught up, then stop (a one-shot command).
    pub fn drains(&self) -> bool {
        self.drain
    }
}

/// Runs `stockflow consume`.
pub async fn run(args: ConsumeArgs, settings: Settings, metrics: Option<PrometheusHandle>) -> anyhow::Result<ExitCode> {
    let kafka = args.kafka.target(&settings.kafka)?;
    let stream = match &kafka {
        Some(k) => Some(k.topic.clone()),
        None => args.stream.clone().or_else(|| settings.kinesis.stream.clone()),
    };
    if let Some(stream) = stream {
        let targets = crate::runtime::group::AwsTargets {
            kafka,
            stream,
            kinesis_endpoint: args.kinesis_endpoint.or_else(|| settings.kinesis.endpoint.clone()),
            dynamodb_endpoint: args.dynamodb_endpoint.or_else(|| settings.dynamodb.endpoint.clone()),
            table_prefix: args.table_prefix.unwrap_or_else(|| settings.dynamodb.table_prefix.clone()),
        };
        return crate::runtime::group::consume(&settings, targets, args.metrics_listen, metrics).await;
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
