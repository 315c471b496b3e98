//! The ingest HTTP app: one axum `Router`, built by [`app`], served by `stockflow run` (and, in
//! the AWS deployment, by the Lambda). It serves the canonical-event endpoint; the Amazon and
//! manufacturer endpoints build on it.
//!
//! A 2xx answer means every event of the request is durably on the stream. Errors are JSON
//! `{error, field, index}`: 400 bad input (the first bad event is named; nothing of the request is
//! put), 401 bad or missing webhook signature (when secrets are configured, [`crate::webhook`]),
//! 413 over 500 events, 1 MiB per event or 10 MiB per request, 415 not JSON/NDJSON, 503 with
//! `Retry-After` when the stream stays unavailable past the producer's retries.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::DefaultBodyLimit;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use stockflow_pipeline::{OutRecord, StreamProducer};

use crate::webhook::Verifier;

/// Most events accepted in one request (a Kinesis PutRecords call takes 500).
pub const MAX_EVENTS_PER_REQUEST: usize = 500;
/// Largest event.
pub const MAX_EVENT_BYTES: usize = 1 << 20;
/// Largest request body.
pub const MAX_REQUEST_BYTES: usize = 10 << 20;

/// What the app serves with.
#[derive(Debug)]
pub struct IngestState<P> {
    /// Where accepted events go.
    pub producer: Arc<P>,
    /// Rendered at `/metrics` when set.
    pub metrics: Option<PrometheusHandle>,
    /// When set, every POST must carry a valid Standard Webhooks signature.
    pub verifier: Option<Arc<Verifier>>,
}

impl<P> IngestState<P> {
    /// Unsigned ingest over `producer`, without `/metrics`.
    pub fn new(producer: Arc<P>) -> Self {
        IngestState { producer, metrics: None, verifier: None }
    }
}

/// The ingest router.
pub fn app<P: StreamProducer>(state: IngestState<P>) -> Router {
    Router::new()
        .route("/v1/events", post(post_events::<P>))
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(render_metrics::<P>))
        .layer(DefaultBodyLimit::max(MAX_REQUEST_BYTES))
        .with_state(Arc::new(state))
}

fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// The signature check of a POST (401 when it fails), when secrets are configured.
fn authenticate<P>(state: &IngestState<P>, headers: &HeaderMap, body: &[u8]) -> Result<(), Box<Response>> {
    let Some(v) = &state.verifier else { return Ok(()) };
    let h = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    v.verify(h("webhook-id"), h("webhook-timestamp"), h("webhook-signature"), body, unix_now()).map_err(|e| {
        metrics::counter!("stockflow_ingest_rejected_total", "reason" => "signature").increment(1);
        Box::new(error(StatusCode::UNAUTHORIZED, e.to_string(), None, None))
    })
}

/// JSON or NDJSON, else 415.
fn content_kind(headers: &HeaderMap) -> Result<bool, Box<Response>> {
    let ct = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let mime = ct.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    match mime.as_str() {
        "application/json" => Ok(false),
        "application/x-ndjson" | "application/jsonl" => Ok(true),
        _ => Err(Box::new(error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("content type {ct:?}: send application/json or application/x-ndjson"),
            None,
            None,
        ))),
    }
}

fn error(status: StatusCode, message: String, index: Option<usize>, field: Option<&str>) -> Response {
    let body = json!({ "error": message, "index": index, "field": field });
    (status, axum::Json(body)).into_response()
}

/// Splits a body into event documents: a JSON array, NDJSON, or one object.
fn split_documents(body: &[u8], ndjson: bool) -> Result<Vec<&[u8]>, String> {
    let trimmed = body.trim_ascii();
    if trimmed.first() == Some(&b'[') {
        let items: Vec<&serde_json::value::RawValue> =
            serde_json::from_slice(trimmed).map_err(|e| format!("malformed JSON array: {e}"))?;
        return Ok(items.into_iter().map(|r| r.get().as_bytes()).collect());
    }
    if ndjson || trimmed.contains(&b'\n') {
        return Ok(trimmed.split(|b| *b == b'\n').map(<[u8]>::trim_ascii).filter(|l| !l.is_empty()).collect());
    }
    Ok(vec![trimmed])
}

async fn post_events<P: StreamProducer>(
    State(state): State<Arc<IngestState<P>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(r) = authenticate(&state, &headers, &body) {
        return *r;
    }
    let ndjson = match content_kind(&headers) {
        Ok(n) => n,
        Err(r) => return *r,
    };
    let docs = match split_documents(&body, ndjson) {
        Ok(d) => d,
        Err(e) => return error(StatusCode::BAD_REQUEST, e, None, None),
    };
    if docs.is_empty() {
        return error(StatusCode::BAD_REQUEST, "no events in the body".into(), None, None);
    }
    if docs.len() > MAX_EVENTS_PER_REQUEST {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("{} events in one request; at most {MAX_EVENTS_PER_REQUEST}", docs.len()),
            None,
            None,
        );
    }
    let mut records = Vec::with_capacity(docs.len());
    let mut keys = Vec::with_capacity(docs.len());
    for (i, doc) in docs.iter().enumerate() {
        if doc.len() > MAX_EVENT_BYTES {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("event of {} bytes; at most {MAX_EVENT_BYTES}", doc.len()),
                Some(i),
                None,
            );
        }
        match stockflow_state::decode(doc) {
            Ok(ev) => keys.push(ev.sku.into_owned()),
            Err(e) => {
                metrics::counter!("stockflow_ingest_rejected_total", "reason" => "invalid").increment(1);
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("event {i} is invalid (the request was rejected whole): {e}"),
                    Some(i),
                    e.field(),
                );
            }
        }
    }
    for (doc, key) in docs.iter().zip(&keys) {
        records.push(OutRecord { key, payload: doc });
    }
    match state.producer.put(&records).await {
        Ok(()) => {
            metrics::counter!("stockflow_ingested_events_total", "route" => "events").increment(records.len() as u64);
            (StatusCode::ACCEPTED, axum::Json(json!({ "accepted": records.len() }))).into_response()
        }
        Err(e) => {
            tracing::error!(error = %e, "stream put failed");
            let mut r = error(StatusCode::SERVICE_UNAVAILABLE, format!("stream unavailable: {e}"), None, None);
            r.headers_mut().insert(header::RETRY_AFTER, axum::http::HeaderValue::from_static("1"));
            r
        }
    }
}

async fn render_metrics<P: StreamProducer>(State(state): State<Arc<IngestState<P>>>) -> Response {
    match &state.metrics {
        Some(h) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], h.render()).into_response(),
        None => error(StatusCode::NOT_FOUND, "metrics are not enabled in this process".into(), None, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use stockflow_pipeline::{EmbeddedLog, ReadStatus, RecordBatch, ShardReader, StreamSource};
    use tower::ServiceExt;

    /// Seals the one-shard log and counts its records.
    async fn records_on(log: &EmbeddedLog) -> usize {
        log.seal();
        let mut reader = log.open("shard-0000", None).await.unwrap();
        let mut batch = RecordBatch::new();
        let mut n = 0;
        while reader.next_batch(&mut batch, 100).await.unwrap() == ReadStatus::Open {
            n += batch.len();
        }
        n
    }

    async fn call(app: Router, body: &str, content_type: &str) -> (StatusCode, serde_json::Value) {
        call_with(app, body, content_type, &[]).await
    }

    async fn call_with(
        app: Router,
        body: &str,
        content_type: &str,
        headers: &[(&str, String)],
    ) -> (StatusCode, serde_json::Value) {
        let mut req = Request::post("/v1/events").header("content-type", content_type);
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        let resp = app.oneshot(req.body(Body::from(body.to_string())).unwrap()).await.unwrap();
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap();
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    #[tokio::test]
    async fn accepts_object_array_and_ndjson_and_names_bad_fields() {
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(EmbeddedLog::open(dir.path(), 1).unwrap());
        let app = app(IngestState::new(Arc::clone(&log)));
        let ev = |id: &str| format!(r#"{{"id":"{id}","type":"stock_adjusted","sku":"S","ts":1,"delta":2}}"#);
        let (s, b) = call(app.clone(), &ev("a"), "application/json").await;
        assert_eq!((s, b["accepted"].as_u64()), (StatusCode::ACCEPTED, Some(1)));
        let (s, b) = call(app.clone(), &format!("[{},{}]", ev("b"), ev("c")), "application/json").await;
        assert_eq!((s, b["accepted"].as_u64()), (StatusCode::ACCEPTED, Some(2)));
        let (s, b) = call(app.clone(), &format!("{}\n{}\n", ev("d"), ev("e")), "application/x-ndjson").await;
        assert_eq!((s, b["accepted"].as_u64()), (StatusCode::ACCEPTED, Some(2)));
        let bad = format!(r#"[{},{{"id":"x","type":"stock_adjusted","sku":"S","ts":1,"delta":0}}]"#, ev("f"));
        let (s, b) = call(app.clone(), &bad, "application/json").await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
        assert_eq!((b["field"].as_str(), b["index"].as_u64()), (Some("delta"), Some(1)));
        let (s, _) = call(app.clone(), &ev("t"), "text/plain").await;
        assert_eq!(s, StatusCode::UNSUPPORTED_MEDIA_TYPE);
        let huge = format!(
            r#"{{"id":"h","type":"stock_adjusted","sku":"S","ts":1,"delta":2,"pad":"{}"}}"#,
            "x".repeat(MAX_EVENT_BYTES)
        );
        let (s, b) = call(app.clone(), &huge, "application/json").await;
        assert_eq!((s, b["index"].as_u64()), (StatusCode::PAYLOAD_TOO_LARGE, Some(0)));
        let (s, _) = call(app.clone(), "[1,", "application/json").await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
        let many = (0..501).map(|i| ev(&format!("m{i}"))).collect::<Vec<_>>().join("\n");
        let (s, _) = call(app, &many, "application/x-ndjson").await;
        assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
        // Exactly the five accepted events are on the stream; the rejected request added none.
        assert_eq!(records_on(&log).await, 5);
    }

    #[tokio::test]
    async fn signed_ingest_refuses_unsigned_tampered_and_replayed_requests() {
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(EmbeddedLog::open(dir.path(), 1).unwrap());
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let verifier = Arc::new(Verifier::new(&[secret]).unwrap());
        let app = app(IngestState { producer: Arc::clone(&log), metrics: None, verifier: Some(verifier) });
        let key = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, &secret[6..]).unwrap();
        let body = r#"{"id":"a","type":"stock_adjusted","sku":"S","ts":1,"delta":2}"#;
        let now = unix_now();
        let signed = |id: &str, body: &str| {
            vec![
                ("webhook-id", id.to_string()),
                ("webhook-timestamp", now.to_string()),
                ("webhook-signature", Verifier::sign(&key, id, now, body.as_bytes())),
            ]
        };
        let (s, b) = call(app.clone(), body, "application/json").await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        assert!(b["error"].as_str().unwrap().contains("webhook-id"), "{b}");
        let (s, _) = call_with(app.clone(), body, "application/json", &signed("m1", body)).await;
        assert_eq!(s, StatusCode::ACCEPTED);
        let (s, b) = call_with(app.clone(), body, "application/json", &signed("m1", body)).await;
        assert_eq!((s, b["error"].as_str()), (StatusCode::UNAUTHORIZED, Some("webhook-id was already received")));
        let tampered = body.replace("\"delta\":2", "\"delta\":200");
        let (s, _) = call_with(app.clone(), &tampered, "application/json", &signed("m2", body)).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        let mut empty = signed("m3", body);
        empty[2].1 = String::new();
        let (s, _) = call_with(app, body, "application/json", &empty).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        assert_eq!(records_on(&log).await, 1, "only the one signed request reached the stream");
    }
}
