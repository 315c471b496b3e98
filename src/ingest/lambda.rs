//! The ingest app as an AWS Lambda function (`stockflow-ingest-lambda`) with three triggers:
//!
//! - **API Gateway** (REST proxy or HTTP API payloads): the request goes through the same axum
//!   [`Router`](axum::Router) as the local server, so routes, signatures and answers are identical.
//! - **SQS** (Amazon delivers SP-API notifications such as `ORDER_CHANGE` to a queue): each message
//!   body is one notification; the answer lists in `batchItemFailures` every message whose events
//!   are not durably on the stream, so SQS redelivers exactly those (and, past the queue's
//!   `maxReceiveCount`, moves them to its dead-letter queue). Nothing is acknowledged that is not
//!   on the stream.
//! - **EventBridge** (listings notifications such as `LISTINGS_ITEM_MFN_QUANTITY_CHANGE`): `detail`
//!   is the notification; an error answer makes Lambda retry the event and then send it to the
//!   function's on-failure destination.
//!
//! The dispatch works on the raw JSON payload ([`Trigger::of`]), so one function serves all three.

use std::sync::Arc;

use lambda_http::request::LambdaRequest;
use lambda_http::tower::ServiceExt;
use lambda_http::{Adapter, LambdaEvent};
use serde_json::{Value, json};
use stockflow_pipeline::StreamProducer;

use super::{Canonical, IngestState, amazon_events};

/// What invoked the function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// An SQS batch (`Records[].eventSource == "aws:sqs"`).
    Sqs,
    /// An EventBridge event (`detail-type`, `source`, `detail`).
    EventBridge,
    /// Anything else: an API Gateway (or function URL / ALB) HTTP request.
    Http,
}

impl Trigger {
    /// Classifies an invocation payload.
    pub fn of(payload: &Value) -> Trigger {
        let sqs = payload
            .get("Records")
            .and_then(Value::as_array)
            .and_then(|r| r.first())
            .and_then(|r| r.get("eventSource"))
            .and_then(Value::as_str)
            == Some("aws:sqs");
        if sqs {
            Trigger::Sqs
        } else if payload.get("detail-type").is_some() && payload.get("detail").is_some() {
            Trigger::EventBridge
        } else {
            Trigger::Http
        }
    }
}

/// Handles an SQS batch of SP-API notifications; returns the partial-batch answer
/// `{"batchItemFailures": [{"itemIdentifier": messageId}, …]}`.
///
/// Messages that map are put in one call, in queue order. A message that does not parse or map
/// is reported failed with its reason logged (SQS retries it and then dead-letters it); if the
/// put fails, every message whose events it carried is reported failed.
pub async fn handle_sqs<P: StreamProducer>(state: &IngestState<P>, event: &Value) -> Result<Value, String> {
    let records = event.get("Records").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
    let mut failed: Vec<&str> = Vec::new();
    let mut carried: Vec<&str> = Vec::new();
    let mut events: Vec<Canonical> = Vec::new();
    for r in records {
        // A message that cannot be named cannot be reported failed: fail the whole batch rather
        // than acknowledge it unread.
        let id = r.get("messageId").and_then(Value::as_str).ok_or("SQS record without messageId")?;
        let body = r.get("body").and_then(Value::as_str).unwrap_or("");
        let mapped = serde_json::from_str::<Value>(body)
            .map_err(|e| format!("body is not JSON: {e}"))
            .and_then(|n| amazon_events(&n, &state.amazon).map_err(|e| e.to_string()));
        match mapped {
            Ok(Some(evs)) => {
                events.extend(evs);
                carried.push(id);
            }
            Ok(None) => {}
            Err(reason) => {
                tracing::warn!(message_id = id, %reason, "SQS message refused; it will be retried, then dead-lettered");
                metrics::counter!("stockflow_ingest_rejected_total", "reason" => "invalid", "route" => "sqs")
                    .increment(1);
                failed.push(id);
            }
        }
    }
    let out = Canonical::records(&events);
    if super::put(&*state.producer, "sqs", &out).await.is_err() {
        failed.extend(carried);
    }
    Ok(json!({ "batchItemFailures": failed.iter().map(|id| json!({ "itemIdentifier": id })).collect::<Vec<_>>() }))
}

/// Handles an EventBridge event whose `detail` is an SP-API notification. `Err` (a reason) makes
/// Lambda retry the event; `Ok` carries the number of events put.
pub async fn handle_eventbridge<P: StreamProducer>(state: &IngestState<P>, event: &Value) -> Result<usize, String> {
    let detail = event.get("detail").ok_or("EventBridge event without detail")?;
    let events = match amazon_events(detail, &state.amazon) {
        Ok(Some(evs)) => evs,
        Ok(None) => return Ok(0),
        Err(e) => {
            metrics::counter!("stockflow_ingest_rejected_total", "reason" => "invalid", "route" => "eventbridge")
                .increment(1);
            return Err(format!("detail is not a notification stockflow can map: {e}"));
        }
    };
    let out = Canonical::records(&events);
    super::put(&*state.producer, "eventbridge", &out).await.map_err(|e| e.to_string())?;
    Ok(out.len())
}

/// One invocation, whatever its trigger: the answer Lambda returns to the caller (the HTTP
/// response for API Gateway, `batchItemFailures` for SQS, a summary for EventBridge).
pub async fn invoke<P: StreamProducer>(
    router: &axum::Router,
    state: &Arc<IngestState<P>>,
    event: LambdaEvent<Value>,
) -> Result<Value, lambda_runtime::Error> {
    let (payload, context) = event.into_parts();
    match Trigger::of(&payload) {
        Trigger::Sqs => Ok(handle_sqs(state, &payload).await?),
        Trigger::EventBridge => {
            let put = handle_eventbridge(state, &payload).await?;
            Ok(json!({ "accepted": put }))
        }
        Trigger::Http => {
            let request: LambdaRequest = serde_json::from_value(payload)
                .map_err(|e| format!("not an API Gateway, SQS or EventBridge event: {e}"))?;
            // lambda_http's own adapter: the request converted as `lambda_http::run` converts it,
            // the answer shaped for the origin (REST: multiValueHeaders; HTTP API: headers and
            // cookies; binary bodies base64).
            // Routes are matched on the path without the API Gateway stage (`/prod/v1/events`
            // arrives as `/v1/events`).
            let service = router.clone().map_request(without_stage as fn(lambda_http::Request) -> lambda_http::Request);
            let adapter: Adapter<'_, axum::response::Response, _> = Adapter::from(service);
            let response = adapter.oneshot(LambdaEvent::new(request, context)).await?;
            Ok(serde_json::to_value(response)?)
        }
    }
}

/// The request with its URI path replaced by API Gateway's raw path (no stage prefix).
fn without_stage(mut req: lambda_http::Request) -> lambda_http::Request {
    let raw = lambda_http::RequestExt::raw_http_path(&req).to_string();
    if raw.is_empty() || raw == req.uri().path() {
        return req;
    }
    let path_and_query = match req.uri().query() {
        Some(q) => format!("{raw}?{q}"),
        None => raw,
    };
    let mut parts = req.uri().clone().into_parts();
    if let Ok(pq) = path_and_query.parse() {
        parts.path_and_query = Some(pq);
        if let Ok(uri) = lambda_http::http::Uri::from_parts(parts) {
            *req.uri_mut() = uri;
        }
    }
    req
}
