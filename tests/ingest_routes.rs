//! Every ingest route and the Lambda entry points, over the embedded log, with the fixtures of
//! `tests/fixtures/` (SP-API notifications following the published schemas, manufacturer
//! documents, API Gateway REST and HTTP API events, an SQS batch, an EventBridge event).

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use serde_json::{Value, json};
use stockflow::ingest::lambda::{Trigger, invoke};
use stockflow::ingest::{AmazonConfig, IngestState, app_shared};
use stockflow_pipeline::{
    EmbeddedLog, OutRecord, ReadStatus, RecordBatch, ShardReader, StreamError, StreamProducer, StreamSource,
};
use stockflow_state::EngineConfig;
use stockflow_state::reference::straight_pass;
use tower::ServiceExt;

fn fixture(path: &str) -> String {
    std::fs::read_to_string(format!("{}/tests/fixtures/{path}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

struct Setup {
    _dir: tempfile::TempDir,
    log: Arc<EmbeddedLog>,
    state: Arc<IngestState<EmbeddedLog>>,
    router: Router,
}

fn setup(marketplace: Option<&str>) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(EmbeddedLog::open(dir.path(), 1).unwrap());
    let amazon = AmazonConfig { marketplace_id: marketplace.map(str::to_string) };
    let state = Arc::new(IngestState { amazon, ..IngestState::new(Arc::clone(&log)) });
    let router = app_shared(Arc::clone(&state));
    Setup { _dir: dir, log, state, router }
}

/// Every record on the (sealed) one-shard log, in order, without the ingest's `ingested_at`
/// stamp (checked here: present, and within the last minute).
async fn records(log: &EmbeddedLog) -> Vec<Value> {
    log.seal();
    let mut reader = log.open("shard-0000", None).await.unwrap();
    let mut batch = RecordBatch::new();
    let mut out = Vec::new();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    loop {
        let status = reader.next_batch(&mut batch, 100).await.unwrap();
        out.extend(batch.iter().map(|(_, p)| {
            let mut v = serde_json::from_slice::<Value>(p).unwrap();
            let stamp = v.as_object_mut().unwrap().remove("ingested_at").and_then(|s| s.as_i64());
            assert!(stamp.is_some_and(|s| (now - 60_000..=now + 1_000).contains(&s)), "stamp {stamp:?} of {v}");
            v
        }));
        if status != ReadStatus::Open {
            return out;
        }
    }
}

async fn post(router: &Router, path: &str, body: &str) -> (StatusCode, Value) {
    let req = Request::post(path).header("content-type", "application/json").body(Body::from(body.to_string()));
    let resp = router.clone().oneshot(req.unwrap()).await.unwrap();
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap();
    (status, serde_json::from_slice(&bytes).unwrap())
}

fn ids(events: &[Value]) -> Vec<&str> {
    events.iter().map(|e| e["id"].as_str().unwrap()).collect()
}

#[tokio::test]
async fn sp_api_notifications_map_to_canonical_events_and_resends_deduplicate() {
    let s = setup(Some("ATVPDKIKX0DER"));
    for (name, accepted, ignored) in [
        ("fba_inventory_availability_changes", 1, 0),
        ("order_change_order_level", 2, 0),
        ("order_change_order_level_resent", 2, 0),
        ("order_change_item_level_shipped", 2, 0),
        ("listings_item_mfn_quantity_change", 1, 0),
        ("any_offer_changed", 0, 1),
        ("order_change_canceled", 2, 0),
    ] {
        let (status, body) =
            post(&s.router, "/v1/amazon/notifications", &fixture(&format!("amazon/{name}.json"))).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{name}: {body}");
        assert_eq!((body["accepted"].as_u64(), body["ignored"].as_u64()), (Some(accepted), Some(ignored)), "{name}");
    }
    let events = records(&s.log).await;
    assert_eq!(
        ids(&events),
        [
            "fba:MUG-BLUE-12OZ:ATVPDKIKX0DER:1795773600000:60",
            "ord:903-8868176-2219830:OIID34853450:placed",
            "ord:903-8868176-2219830:OIID34853451:placed",
            // The re-sent notification carries the same business keys: the same ids.
            "ord:903-8868176-2219830:OIID34853450:placed",
            "ord:903-8868176-2219830:OIID34853451:placed",
            "ord:903-8868176-2219830:OIID34853450:placed",
            "ord:903-8868176-2219830:OIID34853450:shipped:1",
            "mfn:NLS-SHOES-03:1795780770194:99",
            "ord:903-8868176-2219830:OIID34853450:cancelled",
            "ord:903-8868176-2219830:OIID34853451:cancelled",
        ]
    );
    assert_eq!(
        events[1],
        json!({"id": "ord:903-8868176-2219830:OIID34853450:placed", "type": "order_placed", "sku": "MUG-BLUE-12OZ",
               "ts": 1_795_766_993_109i64, "order_id": "903-8868176-2219830:OIID34853450", "qty": 2})
    );
    assert_eq!(events[6]["shipped_total"], 1);
    assert_eq!((events[0]["type"].as_str(), events[0]["on_hand"].as_i64()), (Some("stock_counted"), Some(60)));
    // What the consumers make of it: the count (Fulfillable 50 + PendingCustomerOrder 10) sets on
    // hand to 60; each order line is reserved once despite the re-send and the item-level repeat
    // (3 units); one unit ships; the cancellation releases the 2 still open. No oversell.
    let raw: Vec<Vec<u8>> = events.iter().map(|e| serde_json::to_vec(e).unwrap()).collect();
    let outcome = straight_pass(Arc::new(EngineConfig::default()), raw.iter().map(Vec::as_slice));
    let mug = outcome.skus.iter().find(|k| k.sku == "MUG-BLUE-12OZ").unwrap();
    assert_eq!((mug.on_hand, mug.reserved, mug.oversells), (59, 0, 0), "{mug:?}");
    let shoes = outcome.skus.iter().find(|k| k.sku == "NLS-SHOES-03").unwrap();
    assert_eq!((shoes.on_hand, shoes.reserved, shoes.oversells), (99, 0, 0));
}

#[tokio::test]
async fn a_bad_notification_is_named_and_rejects_the_whole_request() {
    let s = setup(None);
    let good: Value = serde_json::from_str(&fixture("amazon/order_change_order_level.json")).unwrap();
    let mut bad = good.clone();
    bad["Payload"]["OrderChangeNotification"]["Summary"]["OrderItems"][1]["Quantity"] = json!("two");
    let (status, body) = post(&s.router, "/v1/amazon/notifications", &json!([good, bad]).to_string()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["index"], 1);
    assert_eq!(body["field"], "Payload.OrderChangeNotification.Summary.OrderItems[1].Quantity");
    let (status, body) = post(&s.router, "/v1/amazon/notifications", "{\"NotificationType\": 1}").await;
    assert_eq!((status, body["field"].as_str()), (StatusCode::BAD_REQUEST, Some("NotificationType")));
    assert!(records(&s.log).await.is_empty(), "nothing of a rejected request reaches the stream");
}

#[tokio::test]
async fn manufacturer_receipts_and_reports_become_received_and_counted_stock() {
    let s = setup(None);
    let body = format!(
        "{}\n{}\n",
        fixture("manufacturer/goods_received.json").replace('\n', ""),
        fixture("manufacturer/stock_report.json").replace('\n', "")
    );
    let req =
        Request::post("/v1/manufacturer/events").header("content-type", "application/x-ndjson").body(Body::from(body));
    let resp = s.router.clone().oneshot(req.unwrap()).await.unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let events = records(&s.log).await;
    assert_eq!(
        ids(&events),
        [
            "mfr:rcv:GRN-2026-1001:1",
            "mfr:rcv:GRN-2026-1001:2",
            "mfr:cnt:RPT-2026-11-27:MUG-BLUE-12OZ",
            "mfr:cnt:RPT-2026-11-27:NLS-SHOES-03"
        ]
    );
    assert_eq!(
        events[1],
        json!({"id": "mfr:rcv:GRN-2026-1001:2", "type": "stock_received", "sku": "NLS-SHOES-03", "ts": 1_795_765_500_000i64,
               "qty": 24, "unit_cost": "18.05", "currency": "USD"})
    );
    let (status, body) = post(&s.router, "/v1/manufacturer/events", r#"{"type":"stock_report","report_id":"R","counted_at":"2026-11-27T06:00:00Z","counts":[{"sku":"A","on_hand":-4}]}"#).await;
    assert_eq!((status, body["field"].as_str()), (StatusCode::BAD_REQUEST, Some("counts[0].on_hand")));
}

fn event(path: &str) -> lambda_runtime::LambdaEvent<Value> {
    let payload: Value = serde_json::from_str(&fixture(path)).unwrap();
    lambda_runtime::LambdaEvent::new(payload, lambda_runtime::Context::default())
}

#[tokio::test]
async fn lambda_serves_api_gateway_rest_and_http_api_requests_through_the_router() {
    let s = setup(None);
    assert_eq!(Trigger::of(&event("lambda/apigw_rest_manufacturer.json").payload), Trigger::Http);
    let out = invoke(&s.router, &s.state, event("lambda/apigw_rest_manufacturer.json")).await.unwrap();
    assert_eq!(out["statusCode"], 202, "{out}");
    let body: Value = serde_json::from_str(out["body"].as_str().unwrap()).unwrap();
    assert_eq!(body["accepted"], 2);
    assert_eq!(out["multiValueHeaders"]["content-type"][0], "application/json", "REST answers use multiValueHeaders");
    // The HTTP API request has a base64 body (isBase64Encoded).
    let out = invoke(&s.router, &s.state, event("lambda/apigw_http_amazon.json")).await.unwrap();
    assert_eq!(out["statusCode"], 202, "{out}");
    assert_eq!(out["headers"]["content-type"], "application/json");
    let events = records(&s.log).await;
    assert_eq!(
        ids(&events),
        [
            "mfr:rcv:GRN-2026-1001:1",
            "mfr:rcv:GRN-2026-1001:2",
            "ord:903-8868176-2219830:OIID34853450:placed",
            "ord:903-8868176-2219830:OIID34853451:placed"
        ]
    );
}

#[tokio::test]
async fn lambda_signed_routes_refuse_an_unsigned_api_gateway_request() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(EmbeddedLog::open(dir.path(), 1).unwrap());
    let verifier = stockflow::ingest::webhook::Verifier::new(&["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"]).unwrap();
    let state = Arc::new(IngestState { verifier: Some(Arc::new(verifier)), ..IngestState::new(Arc::clone(&log)) });
    let out =
        invoke(&app_shared(Arc::clone(&state)), &state, event("lambda/apigw_rest_manufacturer.json")).await.unwrap();
    assert_eq!(out["statusCode"], 401, "{out}");
    assert!(records(&log).await.is_empty());
}

#[tokio::test]
async fn lambda_sqs_batch_reports_exactly_the_messages_that_failed() {
    let s = setup(Some("ATVPDKIKX0DER"));
    let e = event("lambda/sqs_notifications.json");
    assert_eq!(Trigger::of(&e.payload), Trigger::Sqs);
    let out = invoke(&s.router, &s.state, e).await.unwrap();
    // Message 2 lacks SellerSKU: reported, so SQS retries it and then dead-letters it. Message 3
    // (ANY_OFFER_CHANGED) is ignored: acknowledged.
    assert_eq!(out, json!({"batchItemFailures": [{"itemIdentifier": "059f36b4-87a3-44ab-83d2-661975830a72"}]}));
    // A record without messageId cannot be reported: the whole batch fails (and is redelivered).
    let mut unnamed = event("lambda/sqs_notifications.json");
    unnamed.payload["Records"][3].as_object_mut().unwrap().remove("messageId");
    assert!(invoke(&s.router, &s.state, unnamed).await.is_err());
    let events = records(&s.log).await;
    assert_eq!(
        ids(&events),
        [
            "ord:903-8868176-2219830:OIID34853450:placed",
            "ord:903-8868176-2219830:OIID34853451:placed",
            "fba:MUG-BLUE-12OZ:ATVPDKIKX0DER:1795773600000:60"
        ]
    );
}

/// A stream that refuses every put (the producer's retry budget spent).
struct Down;

impl StreamProducer for Down {
    async fn put(&self, _: &[OutRecord<'_>]) -> Result<(), StreamError> {
        Err(StreamError::Unavailable("throttled past the retry budget".into()))
    }
}

#[tokio::test]
async fn lambda_reports_every_carried_message_when_the_stream_is_down() {
    let amazon = AmazonConfig { marketplace_id: Some("ATVPDKIKX0DER".into()) };
    let state = Arc::new(IngestState { amazon, ..IngestState::new(Arc::new(Down)) });
    let router = app_shared(Arc::clone(&state));
    let out = invoke(&router, &state, event("lambda/sqs_notifications.json")).await.unwrap();
    let failed: Vec<&str> =
        out["batchItemFailures"].as_array().unwrap().iter().map(|f| f["itemIdentifier"].as_str().unwrap()).collect();
    // The invalid one and the two whose events were not put; the ignored one is done.
    assert_eq!(
        failed,
        [
            "059f36b4-87a3-44ab-83d2-661975830a72",
            "059f36b4-87a3-44ab-83d2-661975830a70",
            "059f36b4-87a3-44ab-83d2-661975830a71"
        ]
    );
    // EventBridge: an error, so Lambda retries the event.
    assert!(invoke(&router, &state, event("lambda/eventbridge_mfn_quantity.json")).await.is_err());
    // API Gateway: 503 with Retry-After.
    let out = invoke(&router, &state, event("lambda/apigw_rest_manufacturer.json")).await.unwrap();
    assert_eq!(out["statusCode"], 503);
    assert_eq!(out["multiValueHeaders"]["retry-after"][0], "1");
}

#[tokio::test]
async fn lambda_eventbridge_detail_is_the_notification() {
    let s = setup(None);
    let e = event("lambda/eventbridge_mfn_quantity.json");
    assert_eq!(Trigger::of(&e.payload), Trigger::EventBridge);
    let out = invoke(&s.router, &s.state, e).await.unwrap();
    assert_eq!(out, json!({"accepted": 1}));
    let mut bad = event("lambda/eventbridge_mfn_quantity.json");
    bad.payload["detail"]["Payload"]["Quantity"] = json!(-3);
    let err = invoke(&s.router, &s.state, bad).await.unwrap_err().to_string();
    assert!(err.contains("Payload.Quantity"), "{err}");
    let events = records(&s.log).await;
    assert_eq!(
        events,
        [
            json!({"id": "mfn:NLS-SHOES-03:1795780770194:99", "type": "stock_counted", "sku": "NLS-SHOES-03", "ts": 1_795_780_770_194i64, "on_hand": 99})
        ]
    );
}

#[tokio::test]
async fn mapped_events_ahead_of_the_ingest_clock_are_refused_naming_ts() {
    let s = setup(None);
    // The same documents dated 2099: more than `ingest.max_future_ms` (1 h) ahead.
    let order =
        fixture("amazon/order_change_canceled.json").replace("2026-11-27T09:12:04.500Z", "2099-01-01T00:00:00Z");
    let (status, body) = post(&s.router, "/v1/amazon/notifications", &order).await;
    assert_eq!(
        (status, body["field"].as_str(), body["index"].as_u64()),
        (StatusCode::BAD_REQUEST, Some("ts"), Some(0))
    );
    let grn = fixture("manufacturer/goods_received.json").replace("2026-11-27T07:45:00Z", "2099-01-01T00:00:00Z");
    let (status, body) = post(&s.router, "/v1/manufacturer/events", &grn).await;
    assert_eq!((status, body["field"].as_str()), (StatusCode::BAD_REQUEST, Some("ts")), "{body}");
    assert!(records(&s.log).await.is_empty(), "nothing of a refused request reaches the stream");
}
