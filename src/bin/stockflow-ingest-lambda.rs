//! `stockflow-ingest-lambda`: the ingest app as an AWS Lambda function behind API Gateway, an SQS
//! queue (SP-API notifications) and an EventBridge rule (listings notifications); see
//! `stockflow::ingest::lambda` and `docs/ingest.md`.
//!
//! Environment: `STOCKFLOW_STREAM` (the Kinesis stream, required), `STOCKFLOW_WEBHOOK_SECRET_ID`
//! (a Secrets Manager secret holding the webhook secrets; unset: `STOCKFLOW_WEBHOOK_SECRETS`, or
//! unsigned), `STOCKFLOW_LOG`, `KINESIS_ENDPOINT` / `SECRETSMANAGER_ENDPOINT` (emulators). The
//! `[ingest]` fields follow the config's naming rule (`STOCKFLOW__INGEST__MARKETPLACE_ID`,
//! `STOCKFLOW__INGEST__MAX_FUTURE_MS`), with `STOCKFLOW_MARKETPLACE_ID` and
//! `STOCKFLOW_MAX_FUTURE_MS` kept as their older names; a bad value stops the function at its
//! start, naming the field, instead of falling back to a default. In a build with the `kafka` feature,
//! `STOCKFLOW__KAFKA__BROKERS` (and the other `STOCKFLOW__KAFKA__*` fields of `[kafka]`, e.g.
//! `SECURITY=msk-iam`, `TOPIC`) puts onto a Kafka / MSK topic instead of Kinesis.

use std::sync::Arc;
use std::time::Duration;

use lambda_runtime::{LambdaEvent, service_fn};
use serde_json::Value;
use stockflow::ingest::{IngestState, lambda, public_app};
use stockflow::runtime::config::{FileConfig, Settings};
use stockflow::telemetry::Telemetry;
use stockflow_pipeline::StreamProducer;
use stockflow_pipeline::kinesis::{KinesisProducer, client};

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    // Spans go to an OTLP endpoint when one is configured (e.g. the ADOT Lambda layer's collector
    // on localhost:4318); the function's own X-Ray segment comes from active tracing.
    let telemetry = Arc::new(stockflow::telemetry::init(&tokio::runtime::Handle::current()));
    let settings = settings(std::env::vars())?;
    #[cfg(feature = "kafka")]
    if std::env::var_os("STOCKFLOW__KAFKA__BROKERS").is_some() {
        let target = stockflow::runtime::kafka::KafkaTarget::resolve(&settings.kafka, true, None, None)
            .map_err(|e| format!("{e:#}"))?
            .ok_or("STOCKFLOW__KAFKA__BROKERS is not set")?;
        let producer =
            stockflow::runtime::kafka::producer(&settings.kafka, &target).await.map_err(|e| format!("{e:#}"))?;
        return serve(producer, telemetry, &settings).await;
    }
    let stream = std::env::var("STOCKFLOW_STREAM").map_err(|_| "STOCKFLOW_STREAM is not set")?;
    let kinesis = client(std::env::var("KINESIS_ENDPOINT").ok().as_deref(), false).await;
    serve(KinesisProducer::new(kinesis, &stream), telemetry, &settings).await
}

/// The function's settings from its environment, read and validated like every command's config.
fn settings(env: impl Iterator<Item = (String, String)>) -> Result<Settings, lambda_runtime::Error> {
    let file = FileConfig::load_with_env(None, with_old_names(env)).map_err(|e| format!("{e:#}"))?;
    Ok(file.validate().map_err(|e| format!("{e:#}"))?)
}

/// The environment with the function's older variable names mapped onto the config's naming
/// rule; a variable under the rule's own name wins.
fn with_old_names(env: impl Iterator<Item = (String, String)>) -> Vec<(String, String)> {
    const OLD: [(&str, &str); 2] = [
        ("STOCKFLOW_MARKETPLACE_ID", "STOCKFLOW__INGEST__MARKETPLACE_ID"),
        ("STOCKFLOW_MAX_FUTURE_MS", "STOCKFLOW__INGEST__MAX_FUTURE_MS"),
    ];
    let mut vars: Vec<(String, String)> = env.collect();
    for (old, new) in OLD {
        let value = vars.iter().find(|(k, _)| k == old).map(|(_, v)| v.clone());
        if let Some(value) = value.filter(|_| !vars.iter().any(|(k, _)| k == new)) {
            vars.push((new.to_owned(), value));
        }
    }
    vars
}

/// Answers invocations, putting events through `producer`.
async fn serve<P: StreamProducer>(
    producer: P,
    telemetry: Arc<Telemetry>,
    settings: &Settings,
) -> Result<(), lambda_runtime::Error> {
    let metrics = telemetry.metrics.clone();
    let verifier = stockflow::ingest::webhook::load(Duration::from_secs(300)).await.map_err(|e| format!("{e:#}"))?;
    let state = Arc::new(IngestState {
        producer: Arc::new(producer),
        metrics,
        verifier,
        amazon: settings.amazon.clone(),
        max_future_ms: settings.ingest_max_future_ms,
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

#[cfg(test)]
mod tests {
    use super::{Settings, settings};

    fn options(vars: &[(&str, &str)]) -> Result<Settings, String> {
        settings(vars.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))).map_err(|e| e.to_string())
    }

    #[test]
    fn older_names_still_configure_the_function_and_the_rule_s_names_win() -> Result<(), String> {
        let o = options(&[("STOCKFLOW_MARKETPLACE_ID", "A1PA6795UKMFR9"), ("STOCKFLOW_MAX_FUTURE_MS", "60000")])?;
        assert_eq!((o.amazon.marketplace_id.as_deref(), o.ingest_max_future_ms), (Some("A1PA6795UKMFR9"), 60_000));
        let o = options(&[("STOCKFLOW_MAX_FUTURE_MS", "60000"), ("STOCKFLOW__INGEST__MAX_FUTURE_MS", "120000")])?;
        assert_eq!(o.ingest_max_future_ms, 120_000);
        assert_eq!(options(&[])?.ingest_max_future_ms, stockflow::ingest::DEFAULT_MAX_FUTURE_MS);
        Ok(())
    }

    #[test]
    fn a_bad_value_stops_the_function_naming_the_field() {
        for bad in ["soon", "10"] {
            let err = options(&[("STOCKFLOW_MAX_FUTURE_MS", bad)]).err().unwrap_or_default();
            assert!(err.contains("max_future_ms"), "{bad} was accepted or refused without naming the field: {err:?}");
        }
    }
}
