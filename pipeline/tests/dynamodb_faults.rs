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
    records_with(|i| (i * 7919) % 300)
}

/// The same stream shape, with record `i` on SKU `sku_of(i)`.
fn records_with(sku_of: fn(u64) -> u64) -> Vec<(String, String)> {
    let mut v = Vec::new();
    for i in 0..700u64 {
        let sku = format!("SKU-{:03}", sku_of(i));
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
                format_args!("SKU-{:03}", sku_of(i - 5)),
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

/// Worker A in the background over `log` with `cfg`: returns its task, its shutdown and its
/// lease epoch, once it committed at least once.
async fn worker_a(
    log: &EmbeddedLog,
    store: &DynamoStore,
    engine: Arc<EngineConfig>,
    cfg: WorkerConfig,
) -> (tokio::task::JoinHandle<Result<stockflow_pipeline::WorkerReport, WorkerError>>, watch::Sender<bool>, u64) {
    let epoch = store.take_lease(SHARD, "worker-a").await.unwrap();
    let progress = Arc::new(Progress::default());
    let (stop, rx) = watch::channel(false);
    let task = {
        let (log, store, progress) = (log.clone(), store.clone(), Arc::clone(&progress));
        tokio::spawn(async move {
            let w = ShardWorker::start(&log, SHARD, Arc::new(store), engine, cfg, epoch, progress).await?;
            w.run(rx).await
        })
    };
    while progress.commits.load(Ordering::Relaxed) < 1 {
        tokio::task::yield_now().await;
    }
    (task, stop, epoch)
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
    let (a, _tx_a, epoch_a) = worker_a(&log, &store, Arc::new(EngineConfig::default()), worker_cfg()).await;
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

/// The restore after an interrupted commit lists the shard's SKUs and their floors from
/// consistently read items (the `-shard-skus` listing written with each SKU's first state, then
/// the SKU items), never from an index: a second commit that brings 150 new SKUs dies after its
/// first transaction, another member takes over at once, and nothing is lost or applied twice.
#[tokio::test]
async fn a_takeover_right_after_an_interrupted_commit_of_new_skus_applies_nothing_twice() {
    let Some(store) = emulator_store("f").await else { return };
    // The first 350 records touch SKU-000..149; the next 350 bring SKU-150..299, new to the shard.
    let recs = records_with(|i| if i < 350 { (i * 7919) % 150 } else { 150 + (i * 7919) % 150 });
    let (first, second) = recs.split_at(350);
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(dir.path(), 1).unwrap();
    append(&log, first);
    let cfg = WorkerConfig { commit_every_records: 350, ..worker_cfg() };
    let (a, _tx_a, _) = worker_a(&log, &store, Arc::new(EngineConfig::default()), cfg).await;
    let first_checkpoint = store.load_shard(SHARD).await.unwrap().checkpoint;
    // The next commit dies after its first transaction (as a process killed between them).
    store.faults().fail_next_commit_after(1);
    append(&log, second);
    log.seal();
    let err = a.await.unwrap().unwrap_err();
    assert!(matches!(&err, WorkerError::Store(StoreError::Unavailable(m)) if m.contains("injected crash")), "{err}");

    // Another member takes over right away and restores.
    let stored = store.load_shard(SHARD).await.unwrap();
    assert_eq!(stored.checkpoint, first_checkpoint, "the interrupted commit did not move the checkpoint");
    assert!(!stored.floors.is_empty(), "the first transaction stored SKUs ahead of the checkpoint");
    assert!(stored.floors.iter().any(|(sku, _)| sku.as_str() >= "SKU-150"), "a new SKU's floor is listed");
    for (sku, _) in &stored.floors {
        assert!(stored.snapshot.skus.iter().any(|(s, _)| s == sku), "{sku}: a floor's SKU is restored with it");
    }
    let epoch_b = store.take_lease(SHARD, "worker-b").await.unwrap();
    let (_tx, rx) = watch::channel(false);
    run_worker(&log, &store, epoch_b, rx, Arc::default()).await.unwrap();
    assert_equals_straight_pass(&store, &recs).await;
    // No effect was written twice (the straight pass comparison sees alerts; this sees them all).
    let effects = store.effects().await.unwrap();
    let mut ids: Vec<&str> = effects.iter().map(|e| e.id()).collect();
    ids.sort_unstable();
    let before = ids.len();
    ids.dedup();
    assert_eq!(ids.len(), before, "an effect id is stored twice");
}

/// Dedup ids follow the horizon, not a fixed TTL: with a 2 s horizon and an 8 s margin (chunks
/// expire 10 s after their write, rewritten when less than 4 s is left), a shard that stays quiet
/// for 24 s keeps every live id, because its worker rewrites them before they expire. (A tighter
/// margin made the test a race against a loaded emulator: moto on 2 busy cores has taken 3 s to
/// answer one scan.) The test plays DynamoDB's TTL process: it deletes
/// every chunk whose `expires_at` has passed. Then the shard moves to another worker, the same
/// events are re-sent, and every one is a duplicate.
#[tokio::test]
async fn a_quiet_shard_keeps_its_live_dedup_ids_past_their_ttl() {
    let Some(store) = emulator_store("ttl").await else { return };
    let store = store.with_dedup_horizon(2_000).with_dedup_margin(8_000);
    let engine = Arc::new(EngineConfig { dedup_horizon_ms: 2_000, ..EngineConfig::default() });
    // 40 events on 20 SKUs at one event time: live for as long as the SKUs see nothing newer.
    let recs: Vec<(String, String)> = (0..40)
        .map(|i| {
            let sku = format!("Q-{:02}", i % 20);
            let json = format!(r#"{{"id":"q{i}","type":"stock_adjusted","sku":"{sku}","ts":1795773600000,"delta":1}}"#);
            (sku, json)
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(dir.path(), 1).unwrap();
    append(&log, &recs);
    let cfg = WorkerConfig { commit_interval: std::time::Duration::from_millis(100), ..worker_cfg() };
    let (a, stop_a, _) = worker_a(&log, &store, Arc::clone(&engine), cfg).await;
    // Quiet for 24 s while "TTL" deletes what expired.
    let client = store.dynamodb().clone();
    let table = store.tables().dedup.clone();
    let (mut deleted, mut seen) = (0, std::collections::BTreeSet::new());
    let until = std::time::Instant::now() + std::time::Duration::from_secs(24);
    while std::time::Instant::now() < until {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        let items = client.scan().table_name(&table).consistent_read(true).send().await.unwrap();
        for item in items.items() {
            let expires: u64 = item["expires_at"].as_n().unwrap().parse().unwrap();
            seen.insert(expires);
            if expires < now {
                let key = [("shard", item["shard"].clone()), ("chunk", item["chunk"].clone())];
                client
                    .delete_item()
                    .table_name(&table)
                    .set_key(Some(key.into_iter().map(|(k, v)| (k.to_string(), v)).collect()))
                    .send()
                    .await
                    .unwrap();
                deleted += 1;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    // No chunk ever outlived its TTL (what TTL could have deleted, the sweep did), and the worker
    // rewrote the live ids again and again: 24 s of quiet over a 10 s TTL.
    assert_eq!(deleted, 0, "a chunk holding live ids expired");
    assert!(seen.len() >= 2, "the ids were rewritten with fresh expiries: {seen:?}");
    // 24 s after the first write, with a 10 s TTL: what is stored now was written within the last 10 s.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let items = client.scan().table_name(&table).consistent_read(true).send().await.unwrap();
    assert!(!items.items().is_empty());
    for item in items.items() {
        let expires: u64 = item["expires_at"].as_n().unwrap().parse().unwrap();
        assert!(expires >= now, "a chunk past its TTL: {expires} < {now}");
    }
    stop_a.send(true).unwrap();
    a.await.unwrap().unwrap();

    // Another worker restores, and every re-sent event is a duplicate.
    let stored = store.load_shard(SHARD).await.unwrap();
    assert_eq!(stored.snapshot.dedup.len(), 40, "every live id survived its chunks' TTL");
    let epoch_b = store.take_lease(SHARD, "worker-b").await.unwrap();
    append(&log, &recs);
    log.seal();
    let progress_b = Arc::new(Progress::default());
    let (_tx, rx) = watch::channel(false);
    let w = ShardWorker::start(&log, SHARD, Arc::new(store.clone()), engine, cfg, epoch_b, Arc::clone(&progress_b))
        .await
        .unwrap();
    w.run(rx).await.unwrap();
    assert_eq!(progress_b.duplicates.load(Ordering::Relaxed), 40);
    assert_eq!(progress_b.applied.load(Ordering::Relaxed), 0);
    let states = store.sku_states().await.unwrap();
    assert!(states.len() == 20 && states.iter().all(|(_, s)| s.on_hand == 2), "each SKU adjusted twice, once each id");
}
