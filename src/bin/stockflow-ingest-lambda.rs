//! `stockflow-ingest-lambda`: the ingest app as an AWS Lambda function behind API Gateway, an SQS
//! queue (SP-API notifications) and an EventBridge rule (listings notifications); see
//! `stockflow::ingest::lambda` and `docs/ingest.md`.
//!
//! Environment: `STOCKFLOW_STREAM` (the Kinesis stream, required), `STOCKFLOW_WEBHOOK_SECRET_ID`
//! (a Secrets Manager secret holding the webhook secrets; unset: `STOCKFLOW_WEBHOOK_SECRETS`, or
//! unsigned), `STOCKFLOW_MARKETPLACE_ID` (FBA counts of this marketplace), `STOCKFLOW_LOG`,
//! `KINESIS_ENDPOINT` / `SECRETSMANAGER_ENDPOINT` (emulators). In a build with the `kafka` feature,
//! `STOCKFLOW__KAFKA__BROKERS` (and the other `STOCKFLOW__KAFKA__*` fields of `[kafka]`, e.g.
//! `SECURITY=msk-iam`, `TOPIC`) puts onto a Kafka / MSK topic instead of Kinesis.

use std::sync::Arc;
use std::time::Duration;

use lambda_runtime::{LambdaEvent, service_fn};
use serde_json::Value;
use stockflow::ingest::{AmazonConfig, IngestState, lambda, public_app};
use stockflow::telemetry::Telemetry;
use stockflow_pipeline::StreamProducer;
use stockflow_pipeline::kinesis::{KinesisProducer, client};

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    // Spans go to an OTLP endpoint when one is configured (e.g. the ADOT Lambda layer's collector
    // on localhost:4318); the function's own X-Ray segment comes from active tracing.
    let telemetry = Arc::new(stockflow::telemetry::init(&tokio::runtime::Handle::current()));
    #[cfg(feature = "kafka")]
    if std::env::var_os("STOCKFLOW__KAFKA__BROKERS").is_some() {
        let file = stockflow::runtime::config::FileConfig::load_with_env(None, std::env::vars())
            .map_err(|e| format!("{e:#}"))?;
        let target = stockflow::runtime::kafka::KafkaTarget::resolve(&file.kafka, true, None, None)
            .map_err(|e| format!("{e:#}"))?
            .ok_or("STOCKFLOW__KAFKA__BROKERS is not set")?;
        let producer = stockflow::runtime::kafka::producer(&file.kafka, &target).await.map_err(|e| format!("{e:#}"))?;
        return serve(producer, telemetry).await;
    }
    let stream = std::env::var("STOCKFLOW_STREAM").map_err(|_| "STOCKFLOW_STREAM is not set")?;
    let kinesis = client(std::env::var("KINESIS_ENDPOINT").ok().as_deref(), false).await;
    serve(KinesisProducer::new(kinesis, &stream), telemetry).await
}

/// Answers invocations, putting events through `producer`.
async fn serve<P: StreamProducer>(producer: P, telemetry: Arc<Telemetry>) -> Result<(), lambda_runtime::Error> {
    let metrics = telemetry.metrics.clone();
    let verifier = stockflow::ingest::webhook::load(Duration::from_secs(300)).await.map_err(|e| format!("{e:#}"))?;
    let state = Arc::new(IngestState {
        producer: Arc::new(producer),
        metrics,
        verifier,
        amazon: AmazonConfig { marketplace_id: std::env::var("STOCKFLOW_MARKETPLACE_ID").ok() },
        max_future_ms: std::env::var("STOCKFLOW_MAX_FUTURE_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(stockflow::ingest::DEFAULT_MAX_FUTURE_MS),
    });
    let router = public_app(Arc::clone(&state));
    lambda_runtime::run(service_fn(move |event: LambdaEvent<Value>| {
        let (router, state, telemetry) = (router.clone(), Arc::clone(&state), Arc::clone(&telemetry));
        async move {
            let answer = lambda::invoke(&router, &state, event).await;
            // The process freezes after the answer: the invocation's spans leave before it.
            telemetry.flush().await;
            answer
        }
    }))
    .await
}
