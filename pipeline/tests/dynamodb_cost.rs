//! What DynamoDB costs per 1,000 events (calls, items, bytes written), and restore by bulk vs per
//! SKU, measured against moto. The figures go to docs/BENCHMARKS.md (`--nocapture` prints them);
//! the assertions check that cost scales with dirty SKUs per commit, not with events.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use stockflow_pipeline::source::OutRecord;
use stockflow_pipeline::{EmbeddedLog, Progress, ShardWorker, WorkerConfig};
use stockflow_state::dynamodb::LoadMode;
use stockflow_state::dynamodb::testing::emulator_store;
use stockflow_state::{EngineConfig, StateStore};
use tokio::sync::watch;

const SHARD: &str = "shard-0000";
const EVENTS: u64 = 40_000;
const SKUS: u64 = 100;

fn records() -> Vec<(String, String)> {
    (0..EVENTS)
        .map(|i| {
            let sku = format!("SKU-{:03}", (i * 37) % SKUS);
            let ts = 1_795_773_600_000 + i as i64 * 100;
            let json = match i % 4 {
                0 => format!(r#"{{"id":"r{i}","type":"stock_received","sku":"{sku}","ts":{ts},"qty":3,"unit_cost":"2.35","currency":"USD"}}"#),
                1 | 2 => format!(r#"{{"id":"p{i}","type":"order_placed","sku":"{sku}","ts":{ts},"qty":1,"order_id":"o{i}","unit_price":"9.99","currency":"USD"}}"#),
                _ => format!(r#"{{"id":"s{i}","type":"order_shipped","sku":"{sku}","ts":{ts},"order_id":"o{}"}}"#, i - 1),
            };
            (sku, json)
        })
        .collect()
}

#[tokio::test]
async fn write_cost_scales_with_dirty_skus_not_events() {
    let recs = records();
    for commit_every in [5_000usize, 10_000, 20_000] {
        let Some(store) = emulator_store("c").await else { return };
        let dir = tempfile::tempdir().unwrap();
        let log = EmbeddedLog::open(dir.path(), 1).unwrap();
        let out: Vec<OutRecord<'_>> = recs.iter().map(|(k, p)| OutRecord { key: k, payload: p.as_bytes() }).collect();
        log.append(&out).unwrap();
        log.seal();
        let epoch = store.take_lease(SHARD, "cost").await.unwrap();
        let base_items = store.stats().items.load(Ordering::Relaxed);
        let cfg = WorkerConfig {
            commit_every_records: commit_every,
            commit_interval: std::time::Duration::from_secs(3600),
            batch_records: 1000,
            ..WorkerConfig::default()
        };
        let worker = ShardWorker::start(
            &log,
            SHARD,
            Arc::new(store.clone()),
            Arc::new(EngineConfig::default()),
            cfg,
            epoch,
            Arc::new(Progress::default()),
        )
        .await
        .unwrap();
        let (_tx, rx) = watch::channel(false);
        let report = worker.run(rx).await.unwrap();
        let s = store.stats();
        let (calls, items, bytes) = (
            s.transactions.load(Ordering::Relaxed),
            s.items.load(Ordering::Relaxed) - base_items,
            s.bytes.load(Ordering::Relaxed),
        );
        let per_k = |v: u64| v as f64 * 1000.0 / EVENTS as f64;
        eprintln!(
            "commit every {commit_every:>6} events: {} commits, {calls} TransactWriteItems, {items} items, {bytes} bytes \
             => per 1,000 events: {:.2} calls, {:.2} items, {:.0} bytes",
            report.commits,
            per_k(calls),
            per_k(items),
            per_k(bytes)
        );
        // Each commit writes at most its dirty SKUs (≤ 100) plus a handful of blob items.
        assert!(items <= report.commits * (SKUS + 12), "{items} items in {} commits", report.commits);
        if commit_every >= 20_000 {
            assert!(per_k(items) <= 10.0, "{:.2} items per 1,000 events", per_k(items));
        }

        // Restore: bulk (listing query + BatchGetItem, consistent) vs one GetItem per SKU.
        let reads = s.reads.load(Ordering::Relaxed);
        let t = Instant::now();
        let stored = store.load_shard(SHARD).await.unwrap();
        let bulk_time = t.elapsed();
        let bulk_reads = s.reads.load(Ordering::Relaxed) - reads;
        assert_eq!(stored.snapshot.skus.len() as u64, SKUS);
        let keys: Vec<(String, u32)> = stored.snapshot.skus.iter().map(|(k, _)| (k.clone(), 1)).collect();
        let reads = s.reads.load(Ordering::Relaxed);
        let t = Instant::now();
        let per_sku = store.load_skus(&keys, LoadMode::PerSku).await.unwrap();
        let per_sku_time = t.elapsed();
        let per_sku_reads = s.reads.load(Ordering::Relaxed) - reads;
        assert_eq!(per_sku, stored.snapshot.skus);
        eprintln!(
            "  restore of {SKUS} SKUs: bulk {bulk_reads} read calls in {bulk_time:.2?} (incl. lease and dedup); \
             per SKU {per_sku_reads} GetItem in {per_sku_time:.2?}"
        );
    }
}
