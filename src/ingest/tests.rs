//! The ingest app end to end through `oneshot`: routes, validation answers, signatures, limits.

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
    let ev = |id: &str| format!(r#"{{"id":"{id}","type":"stock_adjusted","sku":"S","ts":1795737600000,"delta":2}}"#);
    let (s, b) = call(app.clone(), &ev("a"), "application/json").await;
    assert_eq!((s, b["accepted"].as_u64()), (StatusCode::ACCEPTED, Some(1)));
    let (s, b) = call(app.clone(), &format!("[{},{}]", ev("b"), ev("c")), "application/json").await;
    assert_eq!((s, b["accepted"].as_u64()), (StatusCode::ACCEPTED, Some(2)));
    let (s, b) = call(app.clone(), &format!("{}\n{}\n", ev("d"), ev("e")), "application/x-ndjson").await;
    assert_eq!((s, b["accepted"].as_u64()), (StatusCode::ACCEPTED, Some(2)));
    let bad = format!(r#"[{},{{"id":"x","type":"stock_adjusted","sku":"S","ts":1795737600000,"delta":0}}]"#, ev("f"));
    let (s, b) = call(app.clone(), &bad, "application/json").await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!((b["field"].as_str(), b["index"].as_u64()), (Some("delta"), Some(1)));
    let (s, _) = call(app.clone(), &ev("t"), "text/plain").await;
    assert_eq!(s, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let huge = format!(
        r#"{{"id":"h","type":"stock_adjusted","sku":"S","ts":1795737600000,"delta":2,"pad":"{}"}}"#,
        "x".repeat(MAX_EVENT_BYTES)
    );
    let (s, b) = call(app.clone(), &huge, "application/json").await;
    assert_eq!((s, b["index"].as_u64()), (StatusCode::PAYLOAD_TOO_LARGE, Some(0)));
    let (s, _) = call(app.clone(), "[1,", "application/json").await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let many = (0..501).map(|i| ev(&format!("m{i}"))).collect::<Vec<_>>().join("\n");
    let (s, _) = call(app.clone(), &many, "application/x-ndjson").await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    // SPEC v2: a quantity over 10⁹, a time in seconds, a time two hours ahead: 400 naming the field.
    let over = r#"{"id":"q","type":"stock_received","sku":"S","ts":1795737600000,"qty":1000000001}"#;
    let (s, b) = call(app.clone(), over, "application/json").await;
    assert_eq!((s, b["field"].as_str()), (StatusCode::BAD_REQUEST, Some("qty")));
    let seconds = r#"{"id":"q","type":"stock_adjusted","sku":"S","ts":1795737600,"delta":1}"#;
    let (s, b) = call(app.clone(), seconds, "application/json").await;
    assert_eq!((s, b["field"].as_str()), (StatusCode::BAD_REQUEST, Some("ts")));
    let ahead = stockflow_state::now_ms() + 2 * 3_600_000;
    let future = format!(r#"{{"id":"q","type":"stock_adjusted","sku":"S","ts":{ahead},"delta":1}}"#);
    let (s, b) = call(app.clone(), &future, "application/json").await;
    assert_eq!((s, b["field"].as_str()), (StatusCode::BAD_REQUEST, Some("ts")), "{b}");
    assert!(b["error"].as_str().unwrap().contains("max_future"), "{b}");
    let soon =
        format!(r#"{{"id":"q","type":"stock_adjusted","sku":"S","ts":{},"delta":1}}"#, ahead - 3_600_000 - 60_000);
    let (s, _) = call(app.clone(), &soon, "application/json").await;
    assert_eq!(s, StatusCode::ACCEPTED, "within the hour is taken");
    // Exactly the six accepted events are on the stream; the rejected requests added none.
    assert_eq!(records_on(&log).await, 6);
}

#[tokio::test]
async fn signed_ingest_refuses_unsigned_tampered_and_replayed_requests() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(EmbeddedLog::open(dir.path(), 1).unwrap());
    let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let verifier = Arc::new(Verifier::new(&[secret]).unwrap());
    let app = app(IngestState { verifier: Some(verifier), ..IngestState::new(Arc::clone(&log)) });
    let key = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, &secret[6..]).unwrap();
    let body = r#"{"id":"a","type":"stock_adjusted","sku":"S","ts":1795737600000,"delta":2}"#;
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
    let (s, _) = call_with(app.clone(), body, "application/json", &empty).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    // A signed request that is refused for its content does not burn its id: the sender's
    // corrected retry with the same id is taken, not refused as a replay.
    let bad = r#"{"id":"b","type":"stock_adjusted","sku":"S","ts":1795737600000,"delta":0}"#;
    let (s, _) = call_with(app.clone(), bad, "application/json", &signed("m4", bad)).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let good = r#"{"id":"b","type":"stock_adjusted","sku":"S","ts":1795737600000,"delta":1}"#;
    let (s, _) = call_with(app, good, "application/json", &signed("m4", good)).await;
    assert_eq!(s, StatusCode::ACCEPTED);
    assert_eq!(records_on(&log).await, 2, "only the two accepted signed requests reached the stream");
}

/// A producer whose first put never finishes (a stream under backpressure); later puts go
/// through to the log.
struct StallOnce {
    log: Arc<EmbeddedLog>,
    stalled: std::sync::atomic::AtomicBool,
}

impl StreamProducer for StallOnce {
    async fn put(&self, records: &[OutRecord<'_>]) -> Result<(), StreamError> {
        if !self.stalled.swap(true, std::sync::atomic::Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        self.log.put(records).await
    }
}

#[tokio::test]
async fn a_client_that_goes_away_mid_request_does_not_burn_its_webhook_id() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(EmbeddedLog::open(dir.path(), 1).unwrap());
    let producer = Arc::new(StallOnce { log: Arc::clone(&log), stalled: false.into() });
    let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let verifier = Arc::new(Verifier::new(&[secret]).unwrap());
    let app = app(IngestState { verifier: Some(Arc::clone(&verifier)), ..IngestState::new(producer) });
    let key = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, &secret[6..]).unwrap();
    let body = r#"{"id":"a","type":"stock_adjusted","sku":"S","ts":1795737600000,"delta":2}"#;
    let now = unix_now();
    let headers = vec![
        ("webhook-id", "m1".to_string()),
        ("webhook-timestamp", now.to_string()),
        ("webhook-signature", Verifier::sign(&key, "m1", now, body.as_bytes())),
    ];
    // The first attempt stalls in the put; the client gives up (the request future is dropped).
    let first = {
        let (app, headers) = (app.clone(), headers.clone());
        tokio::spawn(async move { call_with(app, body, "application/json", &headers).await })
    };
    while verifier.macs_computed() == 0 {
        tokio::task::yield_now().await;
    }
    first.abort();
    assert!(first.await.unwrap_err().is_cancelled());
    // The sender's retry with the same id and signature is taken, once.
    let (s, b) = call_with(app.clone(), body, "application/json", &headers).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{b}");
    assert_eq!(records_on(&log).await, 1);
    let (s, b) = call_with(app, body, "application/json", &headers).await;
    assert_eq!((s, b["field"].as_str()), (StatusCode::UNAUTHORIZED, Some("webhook-id")), "a replay of a taken request");
}

#[test]
fn stamps_the_ingest_time_once_and_keeps_the_event() {
    let doc = br#"{"id":"a","type":"stock_adjusted","sku":"S","ts":1795737600000,"delta":2} "#;
    let out = stamp("S", doc, 1_795_000_000_123).unwrap();
    let ev = stockflow_state::decode(&out).unwrap();
    assert_eq!((ev.id.as_ref(), ev.ts, ev.ingested_at), ("a", 1_795_737_600_000, Some(1_795_000_000_123)));
    // Already stamped (a replayed record): kept as is.
    assert_eq!(stamp("S", &out, 5), None);
    assert_eq!(stamp("S", b"{}", 7).as_deref(), Some(&br#"{"ingested_at":7}"#[..]));
    assert_eq!(stamp("S", b"[1]", 7), None);
    let escaped = br#"{"id":"a","type":"stock_adjusted","sku":"S","ts":1795737600000,"delta":2,"ingested\u005fat":3}"#;
    assert_eq!(stockflow_state::decode(escaped).unwrap().ingested_at, Some(3));
    assert_eq!(stamp("S", escaped, 7), None, "an escaped key is the same field: not stamped twice");
    // Never past a stream record's size.
    let big = format!(r#"{{"x":"{}"}}"#, "y".repeat(MAX_EVENT_BYTES - 10));
    assert_eq!(stamp("S", big.as_bytes(), 7), None);
    // A sender's non-integer `ingested_at` is ignored, not an error.
    let odd = stockflow_state::decode(
        br#"{"id":"a","type":"stock_adjusted","sku":"S","ts":1795737600000,"delta":2,"ingested_at":"x"}"#,
    );
    assert_eq!(odd.unwrap().ingested_at, None);
}
