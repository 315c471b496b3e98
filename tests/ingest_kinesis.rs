//! The ingest app backed by Kinesis (kinesis-local): events POSTed to the app are on the stream
//! exactly — same records, partition key = SKU, each SKU's events in the order they were sent.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use stockflow::ingest::{IngestState, app};
use stockflow_pipeline::kinesis::testing::emulator_stream;
use stockflow_pipeline::kinesis::{KinesisProducer, kpl};
use tower::ServiceExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posted_events_land_on_kinesis_exactly_keyed_and_ordered_by_sku() {
    let Some((client, stream)) = emulator_stream("sf-ing-", 2).await else { return };
    let router = app(IngestState::new(Arc::new(KinesisProducer::new(client.clone(), &stream))));
    let mut sent: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for request in 0..3 {
        let mut body = String::new();
        for i in 0..40 {
            let sku = format!("SKU-{}", i % 7);
            let id = format!("r{request}-e{i}");
            body.push_str(&format!(
                r#"{{"id":"{id}","type":"stock_adjusted","sku":"{sku}","ts":{},"delta":1}}"#,
                1_795_737_600_000i64 + i
            ));
            body.push('\n');
            sent.entry(sku).or_default().push(id);
        }
        let req = Request::post("/v1/events").header("content-type", "application/x-ndjson").body(Body::from(body));
        let resp = router.clone().oneshot(req.unwrap()).await.unwrap();
        assert_eq!(resp.status(), StatusCode::ACCEPTED);
    }
    // Read every shard from its start with GetRecords; split KPL aggregates.
    let mut got: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let shards = client.list_shards().stream_name(&stream).send().await.unwrap();
    for shard in shards.shards() {
        let it = client
            .get_shard_iterator()
            .stream_name(&stream)
            .shard_id(shard.shard_id())
            .shard_iterator_type(aws_sdk_kinesis::types::ShardIteratorType::TrimHorizon)
            .send()
            .await
            .unwrap();
        let out = client.get_records().shard_iterator(it.shard_iterator().unwrap()).send().await.unwrap();
        for r in out.records() {
            let mut users = Vec::new();
            if !kpl::for_each_user_record(r.data().as_ref(), |_, d| users.push(d.to_vec())) {
                users.push(r.data().as_ref().to_vec());
            }
            for u in users {
                let ev: serde_json::Value = serde_json::from_slice(&u).unwrap();
                assert_eq!(ev["sku"].as_str(), Some(r.partition_key()), "partition key = SKU");
                got.entry(r.partition_key().to_string()).or_default().push(ev["id"].as_str().unwrap().to_string());
            }
        }
    }
    assert_eq!(got, sent, "every event once, each SKU in order");
}

async fn readyz(router: &axum::Router) -> (StatusCode, serde_json::Value) {
    let resp = router.clone().oneshot(Request::get("/readyz").body(Body::empty()).unwrap()).await.unwrap();
    let status = resp.status();
    let body = axum::body::to_bytes(resp.into_body(), 1 << 16).await.unwrap();
    (status, serde_json::from_slice(&body).unwrap())
}

/// `/readyz` asks Kinesis whether the stream takes puts: ready on a live stream, 503 naming the
/// stream when it does not exist (a deployment pointing at the wrong name never looks healthy).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_ready_only_when_the_stream_exists() {
    let Some((client, stream)) = emulator_stream("sf-ready-", 1).await else { return };
    let router = app(IngestState::new(Arc::new(KinesisProducer::new(client.clone(), &stream))));
    let (status, body) = readyz(&router).await;
    assert_eq!((status, body), (StatusCode::OK, serde_json::json!({"ready": true})));
    let missing = format!("{stream}-missing");
    let router = app(IngestState::new(Arc::new(KinesisProducer::new(client, &missing))));
    let (status, body) = readyz(&router).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["ready"], false);
    assert!(body["error"].as_str().unwrap().contains(&missing), "{body}");
    // /healthz only says the process runs.
    let resp = router.clone().oneshot(Request::get("/healthz").body(Body::empty()).unwrap()).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
}
