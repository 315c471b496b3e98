//! Summary posting on the AWS store (DynamoDB, moto): two consumer-group members, each holding
//! one shard's lease, fold their shards' journal effects into the shared book under their fences
//! and contend for the one poster claim; whatever order they finish in, every closed hour is
//! posted once, and per hour the journals equal the straight pass to the cent.
//!
//! Reads `DYNAMODB_ENDPOINT` (default `http://127.0.0.1:5001`); under CI (`CI=true`) an
//! unreachable emulator fails the test instead of skipping it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use stockflow::loadtest::generate::{GenConfig, generate};
use stockflow_connectors::accounting::{Accounting, Accounts, Shape};
use stockflow_connectors::drain::Lanes;
use stockflow_connectors::journals::{PeriodLen, PostingKind, SummaryPolicy};
use stockflow_connectors::testing::{FaultPlan, Receivers, check_summaries};
use stockflow_connectors::{DeliveryPolicy, Drain, DrainConfig, DrainControl, Secret};
use stockflow_state::dynamodb::testing::emulator_store;
use stockflow_state::lease::{Assignment, LaneGrant, LeaseStore, NewLease};
use stockflow_state::outbox::Fence;
use stockflow_state::reference::straight_pass_full;
use stockflow_state::{EngineConfig, Position, ShardCommit, ShardEngine, StateStore, decode};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_members_fold_and_post_each_hour_once_on_dynamodb() {
    let Some(store) = emulator_store("sf-journals-").await else { return };
    let store = Arc::new(store);
    // Two days of event time, split over two shards by SKU (a SKU's events keep their order).
    let stream =
        generate(&GenConfig { events: 3_000, skus: 60, seed: 3, hour_weights: vec![1.0; 48], ..GenConfig::default() });
    let records: Vec<Vec<u8>> = stream.iter().map(|(_, p)| p.to_vec()).collect();
    let shards = ["shardId-000000000000", "shardId-000000000001"];
    let mut epochs = Vec::new();
    for (i, shard) in shards.iter().enumerate() {
        assert!(
            store.create_lease(&NewLease { key: (*shard).into(), parents: vec![], hash_range: None }).await.unwrap()
        );
        let epoch = store.take_lease(shard, if i == 0 { "member-a" } else { "member-b" }).await.unwrap();
        epochs.push(epoch);
        let mut engine = ShardEngine::new(Arc::new(EngineConfig::default()));
        let mine: Vec<&Vec<u8>> = records
            .iter()
            .filter(|r| {
                let sku = stockflow::loadtest::ndjson::partition_key(r);
                (sku.bytes().fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b))) % 2) as usize == i
            })
            .collect();
        // Committed in four parts, as a worker would.
        for (part, chunk) in mine.chunks(mine.len().div_ceil(4)).enumerate() {
            for r in chunk {
                if let Ok(ev) = decode(r) {
                    engine.apply(&ev);
                }
            }
            let d = engine.take_delta().unwrap();
            let commit = ShardCommit::of_delta(shard, epoch, Position::offset(part as u64 + 1), d);
            store.commit(Arc::new(commit)).await.unwrap();
        }
    }
    let (_, effects) = straight_pass_full(Arc::new(EngineConfig::default()), records.iter().map(Vec::as_slice));

    let (_stop, stop_rx) = tokio::sync::watch::channel(false);
    let receivers = Receivers::new(FaultPlan::chaos(15, Duration::from_millis(300), 5), None);
    let (base, _) = receivers.start(stop_rx).await.unwrap();
    let policy = SummaryPolicy::new(PeriodLen::Hour, "UTC", 300_000).unwrap();
    let accounts = Accounts { cogs: "5000".into(), inventory: "1300".into(), clearing: "2100".into() };
    let delivery = DeliveryPolicy {
        timeout: Duration::from_millis(300),
        max_attempts: 100_000,
        backoff: stockflow_connectors::policy::BackoffConfig {
            base: Duration::from_millis(5),
            cap: Duration::from_millis(100),
        },
        ..DeliveryPolicy::default()
    };
    let accounting = Arc::new(
        Accounting::new(
            Shape::Generic { url: format!("{base}/generic") },
            accounts.clone(),
            Secret::default(),
            delivery,
        )
        .with_summary(policy.clone()),
    );
    let (_shutdown, shutdown) = tokio::sync::watch::channel(false);
    let (_finish, finish) = tokio::sync::watch::channel(true);
    let mut members = Vec::new();
    for (i, shard) in shards.iter().enumerate() {
        let grant =
            LaneGrant { fence: Fence { lease: (*shard).into(), epoch: epochs[i] }, after: vec![], ended: false };
        let assignment = Assignment { lanes: BTreeMap::from([((*shard).to_string(), grant)]), members: 2 };
        let (_tx, rx) = tokio::sync::watch::channel(Arc::new(assignment));
        let cfg =
            DrainConfig { idle_poll: Duration::from_millis(20), rescan: Duration::from_millis(200), read_max: 1000 };
        let drain =
            Arc::new(Drain::new(Arc::clone(&store), Arc::clone(&accounting), cfg).with_lanes(Lanes::Assigned(rx)));
        let ctl = DrainControl::new(shutdown.clone(), finish.clone());
        members.push(tokio::spawn(async move {
            let _keep = _tx;
            drain.run(ctl).await
        }));
    }
    for m in members {
        tokio::time::timeout(Duration::from_secs(180), m).await.expect("members finish").unwrap().unwrap();
    }
    let postings = stockflow::cmd::journals::postings(&*store).await.unwrap();
    let log = receivers.log();
    let books = check_summaries(&log, &postings, &effects, &policy, &accounts);
    assert!(books.problems.is_empty(), "the books differ:\n{}", books.problems.join("\n"));
    assert!(books.posted_periods >= 40, "hours posted: {} (open {})", books.posted_periods, books.open_periods);
    let summaries = postings.iter().filter(|p| p.kind == PostingKind::Summary).count();
    assert_eq!(summaries, books.posted_periods, "one summary per hour and currency");
    assert!(log.faults > 0 && log.duplicates().is_empty(), "faults injected, nothing booked twice");
}
