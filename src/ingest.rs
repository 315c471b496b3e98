//! The ingest HTTP app: one axum `Router`, built by [`app`], served by `stockflow run` (and, in
//! the AWS deployment, by the Lambda). This foundation serves the canonical-event endpoint; the
//! Amazon and manufacturer endpoints and webhook signatures build on it.
//!
//! A 2xx answer means every event of the request is durably on the stream.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use stockflow_pipeline::{OutRecord, StreamProducer};

/// Most events accepted in one request (a Kinesis PutRecords call takes 500).
pub const MAX_EVENTS_PER_REQUEST: usize = 500;

struct AppState<P> {
    producer: Arc<P>,
    metrics: Option<PrometheusHandle>,
}

/// The ingest router over a stream producer; `/metrics` renders `metrics` when given.
pub fn app<P: StreamProducer>(producer: Arc<P>, metrics: Option<PrometheusHandle>) -> Router {
    Router::new()
        .route("/v1/events", post(post_events::<P>))
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(render_metrics::<P>))
        .with_state(Arc::new(AppState { producer, metrics }))
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
    State(state): State<Arc<AppState<P>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let ndjson = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-ndjson"));
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
        match stockflow_state::decode(doc) {
            Ok(ev) => keys.push(ev.sku.into_owned()),
            Err(e) => {
                metrics::counter!("stockflow_ingest_rejected_total", "reason" => "invalid").increment(1);
                return error(StatusCode::UNPROCESSABLE_ENTITY, e.to_string(), Some(i), e.field());
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
            error(StatusCode::SERVICE_UNAVAILABLE, format!("stream unavailable: {e}"), None, None)
        }
    }
}

async fn render_metrics<P: StreamProducer>(State(state): State<Arc<AppState<P>>>) -> Response {
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

    async fn call(app: Router, body: &str, content_type: &str) -> (StatusCode, serde_json::Value) {
        let req = Request::post("/v1/events").header("content-type", content_type).body(Body::from(body.to_string()));
        let resp = app.oneshot(req.unwrap()).await.unwrap();
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap();
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    #[tokio::test]
    async fn accepts_object_array_and_ndjson_and_names_bad_fields() {
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(EmbeddedLog::open(dir.path(), 1).unwrap());
        let app = app(Arc::clone(&log), None);
        let ev = |id: &str| format!(r#"{{"id":"{id}","type":"stock_adjusted","sku":"S","ts":1,"delta":2}}"#);
        let (s, b) = call(app.clone(), &ev("a"), "application/json").await;
        assert_eq!((s, b["accepted"].as_u64()), (StatusCode::ACCEPTED, Some(1)));
        let (s, b) = call(app.clone(), &format!("[{},{}]", ev("b"), ev("c")), "application/json").await;
        assert_eq!((s, b["accepted"].as_u64()), (StatusCode::ACCEPTED, Some(2)));
        let (s, b) = call(app.clone(), &format!("{}\n{}\n", ev("d"), ev("e")), "application/x-ndjson").await;
        assert_eq!((s, b["accepted"].as_u64()), (StatusCode::ACCEPTED, Some(2)));
        let bad = format!(r#"[{},{{"id":"x","type":"stock_adjusted","sku":"S","ts":1,"delta":0}}]"#, ev("f"));
        let (s, b) = call(app.clone(), &bad, "application/json").await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!((b["field"].as_str(), b["index"].as_u64()), (Some("delta"), Some(1)));
        let (s, _) = call(app.clone(), "[1,", "application/json").await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
        let many = (0..501).map(|i| ev(&format!("m{i}"))).collect::<Vec<_>>().join("\n");
        let (s, _) = call(app, &many, "application/x-ndjson").await;
        assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
        // Exactly the five accepted events are on the stream; the rejected request added none.
        log.seal();
        let mut reader = log.open("shard-0000", None).await.unwrap();
        let mut batch = RecordBatch::new();
        let mut n = 0;
        while reader.next_batch(&mut batch, 100).await.unwrap() == ReadStatus::Open {
            n += batch.len();
        }
        assert_eq!(n, 5);
    }
}
