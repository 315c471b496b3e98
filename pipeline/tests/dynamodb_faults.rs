//! Fault injection against DynamoDB (moto): a crash after each part of a split commit, a zombie
//! worker whose lease was taken, a takeover mid-stream, duplicated records. After each, state,
//! alerts and dead letters must equal the straight pass exactly.
//!
//! Reads `DYNAMODB_ENDPOINT` (default `http://127.0.0.1:5001`); under CI an unreachable emulator
//! fails the tests.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use stockflow_pipeline::source::OutRecord;
use stockflow_pipeline::{EmbeddedLog, Progress, ShardWorker, WorkerConfig, WorkerError};
use stockflow_state::dynamodb::DynamoStore;
use stockflow_state::dynamodb::testing::emulator_store;
use stockflow_state::reference::{Outcome, straight_pass};
use stockflow_state::{EngineConfig, StateStore, StoreError};
use tokio::sync::watch;

const SHARD: &str = "shard-0000";

/// 700 records over 300 SKUs: orders, receipts with costs, shipments, duplicates, bad records.
fn records() -> Vec<(String, String)> {
    let mut v = Vec::new();
    for i in 0..700u64 {
        let sku = format!("SKU-{:03}", (i * 7919) % 300);
        let ts = 1_795_773_600_000 + i as i64 * 1000;
        let json = match i % 7 {
            0..=2 => format!(
                r#"{{"id":"p{i}","type":"order_placed","sku":"{sku}","ts":{ts},"qty":{},"order_id":"o{i}"}}"#,
                1 + i % 3
            ),
            3 => format!(
                r#"{{"id":"r{i}","type":"stock_received","sku":"{sku}","ts":{ts},"qty":4,"unit_cost":"2.35","currency":"USD"}}"#
            ),
            4 => format!(r#"{{"id":"s{i}","type":"order_shipped","sku":"{sku}","ts":{ts},"order_id":"o{}"}}"#, i - 4),
            5 if i % 35 == 5 => {
                format!(r#"{{"id":"bad{i}","type":"stock_adjusted","sku":"{sku}","ts":{ts},"delta":0}}"#)
            }
            5 => format!(
                r#"{{"id":"p{}","type":"order_placed","sku":"{}","ts":{},"qty":{},"order_id":"o{}"}}"#,
                i - 5,
                format_args!("SKU-{:03}", ((i - 5) * 7919) % 300),
                ts - 5000,
                1 + (i - 5) % 3,
                i - 5
            ),
            _ => format!(r#"{{"id":"c{i}","type":"stock_counted","sku":"{sku}","ts":{ts},"on_hand":{}}}"#, i % 5),
        };
        // The duplicate arm re-sends an earlier order with its original key and bytes.
        let key = serde_json::from_str::<serde_json::Value>(&json).unwrap()["sku"].as_str().unwrap().to_string();
        v.push((key, json));
    }
    v
}

fn append(log: &EmbeddedLog, recs: &[(String, String)]) {
    let out: Vec<OutRecord<'_>> = recs.iter().map(|(k, p)| OutRecord { key: k, payload: p.as_bytes() }).collect();
    log.append(&out).unwrap();
}

fn worker_cfg() -> WorkerConfig {
    // ~450 records per commit touch ~230 SKUs: three 100-item transactions.
    WorkerConfig { commit_every_records: 450, batch_records: 100, commit_attempts: 0, ..WorkerConfig::default() }
}

async fn run_worker(
    log: &EmbeddedLog,
    store: &DynamoStore,
    epoch: u64,
    shutdown: watch::Receiver<bool>,
    progress: Arc<Progress>,
) -> Result<stockflow_pipeline::WorkerReport, WorkerError> {
    let cfg = Arc::new(EngineConfig::default());
    let worker = ShardWorker::start(log, SHARD, Arc::new(store.clone()), cfg, worker_cfg(), epoch, progress).await?;
    worker.run(shutdown).await
}

async fn assert_equals_straight_pass(store: &DynamoStore, recs: &[(String, String)]) {
    let expected = straight_pass(Arc::new(EngineConfig::default()), recs.iter().map(|(_, p)| p.as_bytes()));
    let actual = Outcome::of_store(store).await.unwrap();
    assert_eq!(expected.diff(&actual, 20), Vec::<String>::new());
    assert!(!actual.alerts.is_empty() && actual.dead_letters > 0);
}

#[tokio::test]
async fn a_crash_after_any_part_of_a_split_commit_is_harmless() {
    let recs = records();
    let mut crashed_mid_commit = 0;
    for k in 0..4 {
        let Some(store) = emulator_store("f").await else { return };
        let dir = tempfile::tempdir().unwrap();
        let log = EmbeddedLog::open(dir.path(), 1).unwrap();
        append(&log, &recs);
        log.seal();
        let epoch = store.take_lease(SHARD, "worker-a").await.unwrap();
        store.faults().fail_next_commit_after(k);
        let (_tx, rx) = watch::channel(false);
        match run_worker(&log, &store, epoch, rx.clone(), Arc::default()).await {
            Err(WorkerError::Store(StoreError::Unavailable(msg))) if msg.contains("injected crash") => {
                crashed_mid_commit += usize::from(k > 0);
            }
            Ok(_) => {} // k ≥ the commit's part count: it went through whole
            Err(e) => panic!("k = {k}: {e}"),
        }
        // The process is gone; a new one takes the lease and restores from DynamoDB.
        let stored = store.load_shard(SHARD).await.unwrap();
        if k > 0 && stored.checkpoint.is_none() {
            assert!(!stored.floors.is_empty(), "k = {k}: parts were written, so SKUs are ahead of the checkpoint");
        }
        let epoch = store.take_lease(SHARD, "worker-b").await.unwrap();
        run_worker(&log, &store, epoch, rx, Arc::default()).await.unwrap();
        assert_equals_straight_pass(&store, &recs).await;
    }
    assert!(crashed_mid_commit >= 2, "the first commit should span several transactions");
}

#[tokio::test]
async fn a_zombie_is_refused_and_a_takeover_mid_stream_loses_nothing() {
    let Some(store) = emulator_store("f").await else { return };
    let recs = records();
    let (first, second) = recs.split_at(350);
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(dir.path(), 1).unwrap();
    append(&log, first);

    // Worker A owns the shard and commits the first part of the stream.
    let epoch_a = store.take_lease(SHARD, "worker-a").await.unwrap();
    let progress = Arc::new(Progress::default());
    let (_tx_a, rx_a) = watch::channel(false);
    let a = {
        let (log, store, progress) = (log.clone(), store.clone(), Arc::clone(&progress));
        tokio::spawn(async move { run_worker(&log, &store, epoch_a, rx_a, progress).await })
    };
    while progress.commits.load(Ordering::Relaxed) < 1 {
        tokio::task::yield_now().await;
    }
    let committed_by_a = store.load_shard(SHARD).await.unwrap().checkpoint;
    assert!(committed_by_a.is_some());

    // B takes the lease over (new epoch) while A still runs: A is now a zombie. The rest of
    // the stream arrives; A reads it and tries to commit with its stale epoch: refused.
    let epoch_b = store.take_lease(SHARD, "worker-b").await.unwrap();
    assert!(epoch_b > epoch_a);
    append(&log, second);
    log.seal();
    let err = a.await.unwrap().unwrap_err();
    assert!(matches!(err, WorkerError::Store(StoreError::Fenced { .. })), "{err}");
    assert_eq!(store.load_shard(SHARD).await.unwrap().checkpoint, committed_by_a, "the zombie wrote nothing");

    // B restores from A's last commit and processes the rest: nothing lost, nothing twice.
    let (_tx, rx) = watch::channel(false);
    run_worker(&log, &store, epoch_b, rx, Arc::default()).await.unwrap();
    assert_equals_straight_pass(&store, &recs).await;
}
