//! Stream administration the tools need: create a stream when it is missing and wait until it is
//! `ACTIVE` (after a create, a split or a merge). Production streams come from CloudFormation
//! (`deploy/`); `replay --target kinesis:NAME` and the tests create theirs here.

use std::time::Duration;

use aws_sdk_kinesis::Client;
use aws_sdk_kinesis::error::DisplayErrorContext;
use stockflow_state::retry::{Backoff, BackoffConfig};

use crate::source::StreamError;

/// Creates `name` with `shards` shards unless it exists, then waits until it is `ACTIVE`.
pub async fn ensure_stream(client: &Client, name: &str, shards: i32) -> Result<(), StreamError> {
    match client.describe_stream_summary().stream_name(name).send().await {
        Ok(_) => {}
        Err(e) if e.as_service_error().is_some_and(|s| s.is_resource_not_found_exception()) => {
            client.create_stream().stream_name(name).shard_count(shards).send().await.map_err(|e| {
                StreamError::Invalid(format!("creating the Kinesis stream {name}: {}", DisplayErrorContext(e)))
            })?;
        }
        Err(e) => {
            return Err(StreamError::Unavailable(format!(
                "describing the Kinesis stream {name}: {}",
                DisplayErrorContext(e)
            )));
        }
    }
    wait_active(client, name, Duration::from_secs(60)).await
}

/// The stream's status (`ACTIVE`, `UPDATING`, …) and open shard count, read once; `None` when it
/// does not exist.
pub async fn describe(client: &Client, name: &str) -> Result<Option<(String, i32)>, StreamError> {
    match client.describe_stream_summary().stream_name(name).send().await {
        Ok(out) => {
            Ok(out.stream_description_summary().map(|s| (s.stream_status().as_str().to_string(), s.open_shard_count())))
        }
        Err(e) if e.as_service_error().is_some_and(|s| s.is_resource_not_found_exception()) => Ok(None),
        Err(e) => Err(super::sdk_err("DescribeStreamSummary", e)),
    }
}

/// Waits until `name` is `ACTIVE`, up to `patience` (polls back off from 20 ms to 500 ms).
pub async fn wait_active(client: &Client, name: &str, patience: Duration) -> Result<(), StreamError> {
    let deadline = tokio::time::Instant::now() + patience;
    let mut backoff = Backoff::from_clock(BackoffConfig::new(Duration::from_millis(20), Duration::from_millis(500)));
    let mut attempt = 0;
    loop {
        let out = client.describe_stream_summary().stream_name(name).send().await;
        if let Ok(out) = &out
            && out.stream_description_summary().is_some_and(|s| s.stream_status().as_str() == "ACTIVE")
        {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            let why = match out {
                Ok(_) => "still not ACTIVE".to_string(),
                Err(e) => DisplayErrorContext(e).to_string(),
            };
            return Err(StreamError::Unavailable(format!("the Kinesis stream {name} after {patience:?}: {why}")));
        }
        // Each wait is at least a fifth of its ceiling, so the polls stay spread out.
        let wait = backoff.delay(attempt).max(backoff.ceiling(attempt) / 5);
        attempt += 1;
        tokio::time::sleep(wait).await;
    }
}
