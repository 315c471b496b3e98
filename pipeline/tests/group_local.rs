//! The group coordinator in one process: several members over the embedded log, with leases and
//! state in DynamoDB (moto) — balancing, graceful handoff, a deleted lease row recreated, and the
//! state exact; and one member over the in-process lease store and the embedded store.
//!
//! Several members need a state store that fences commits by lease epoch in the same
//! transaction as the state (DynamoDB does); the embedded store is single-process by design.

use std::sync::Arc;
use std::time::{Duration, Instant};

use stockflow_pipeline::group::{Coordinator, GroupConfig};
use stockflow_pipeline::{EmbeddedLog, OutRecord, Progress, WorkerConfig};
use stockflow_state::dynamodb::DynamoStore;
use stockflow_state::dynamodb::testing::emulator_store;
use stockflow_state::embedded::RedbStore;
use stockflow_state::lease::{LeaseStore, LocalLeases};
use stockflow_state::reference::{Outcome, straight_pass};
use stockflow_state::{EngineConfig, StateStore};
use tokio::sync::watch;

fn events(n: usize) -> Vec<(String, String)> {
    (0..n)
        .map(|i| {
            let sku = format!("SKU-{}", i % 40);
            let json = if i % 3 == 0 {
                format!(r#"{{"id":"r{i}","type":"stock_received","sku":"{sku}","ts":{},"qty":5,"unit_cost":"1.50","currency":"USD"}}"#, 1_795_737_600_000i64 + i as i64)
            } else {
                format!(r#"{{"id":"p{i}","type":"order_placed","sku":"{sku}","ts":{},"qty":2,"order_id":"o{i}"}}"#, 1_795_737_600_000i64 + i as i64)
            };
            (sku, json)
        })
        .collect()
}

type Member = (watch::Sender<bool>, tokio::task::JoinHandle<()>);

fn member<L: LeaseStore, S: StateStore>(name: &str, log: &EmbeddedLog, leases: &Arc<L>, store: &Arc<S>) -> Member {
    let mut cfg = GroupConfig::new(name.to_string());
    cfg.failover = Duration::from_millis(1500);
    cfg.take_interval = Duration::from_millis(30);
    cfg.shard_sync_interval = Duration::from_millis(200);
    let worker = WorkerConfig { commit_interval: Duration::from_millis(50), ..WorkerConfig::default() };
    let c = Coordinator::new(
        Arc::new(log.clone()),
        Arc::clone(leases),
        Arc::clone(store),
        Arc::new(EngineConfig::default()),
        worker,
        cfg,
        Arc::new(Progress::default()),
    );
    let (tx, rx) = watch::channel(false);
    (
        tx,
        tokio::spawn(async move {
            c.run(rx).await.unwrap();
        }),
    )
}

/// Lease count per owner, sorted.
async fn spread<L: LeaseStore>(leases: &L) -> Vec<(Option<String>, usize)> {
    let mut counts: std::collections::BTreeMap<Option<String>, usize> = Default::default();
    for l in leases.leases().await.unwrap() {
        *counts.entry(l.owner).or_default() += 1;
    }
    counts.into_iter().collect()
}

async fn wait_for<F: std::future::Future<Output = bool>>(what: &str, mut cond: impl FnMut() -> F) {
    let started = Instant::now();
    while !cond().await {
        assert!(started.elapsed() < Duration::from_secs(30), "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn owned_by(spread: &[(Option<String>, usize)], who: &str) -> usize {
    spread.iter().find(|(o, _)| o.as_deref() == Some(who)).map_or(0, |(_, n)| *n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_balance_hand_off_and_recreate_deleted_rows_with_the_state_exact() {
    let Some(store) = emulator_store("sf-grl-").await else { return };
    let store = Arc::new(store);
    let leases: Arc<DynamoStore> = Arc::clone(&store);
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(dir.path().join("log"), 6).unwrap();
    let evs = events(3_000);
    let put = |s: &[(String, String)]| {
        let recs: Vec<OutRecord<'_>> = s.iter().map(|(k, p)| OutRecord { key: k, payload: p.as_bytes() }).collect();
        log.append(&recs).unwrap();
    };
    put(&evs[..1_000]);

    // Three members end up with two shards each.
    let mut members: Vec<Member> = ["a", "b", "c"].iter().map(|n| member(n, &log, &leases, &store)).collect();
    wait_for("an even spread", || async {
        let s = spread(leases.as_ref()).await;
        ["a", "b", "c"].iter().all(|w| owned_by(&s, w) == 2)
    })
    .await;

    // A graceful stop releases c's leases; a and b take them without waiting for expiry.
    let (stop, handle) = members.pop().unwrap();
    stop.send(true).unwrap();
    handle.await.unwrap();
    let released = Instant::now();
    wait_for("a and b to hold three each", || async {
        let s = spread(leases.as_ref()).await;
        owned_by(&s, "a") == 3 && owned_by(&s, "b") == 3
    })
    .await;
    assert!(released.elapsed() < Duration::from_millis(1500), "handoff took {:?}: not by expiry", released.elapsed());
    put(&evs[1_000..2_000]);

    // A deleted row: its holder loses the shard, the row is recreated and the shard goes on.
    let victim = leases.leases().await.unwrap().into_iter().find(|l| l.owner.is_some()).unwrap().key;
    store
        .dynamodb()
        .delete_item()
        .table_name(&store.tables().leases)
        .key("leaseKey", aws_sdk_dynamodb::types::AttributeValue::S(victim.clone()))
        .send()
        .await
        .unwrap();
    wait_for("the deleted row to be recreated and taken", || async {
        leases.leases().await.unwrap().iter().any(|l| l.key == victim && l.owner.is_some())
    })
    .await;
    put(&evs[2_000..]);

    let cfg = Arc::new(EngineConfig::default());
    let expected = straight_pass(cfg, evs.iter().map(|(_, p)| p.as_bytes()));
    wait_for("the state to equal the straight pass", || async {
        expected.diff(&Outcome::of_store(store.as_ref()).await.unwrap(), 5).is_empty()
    })
    .await;
    for (stop, handle) in members {
        stop.send(true).unwrap();
        handle.await.unwrap();
    }
    assert!(leases.leases().await.unwrap().iter().all(|l| l.owner.is_none()), "all released at shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_member_over_in_process_leases_owns_every_shard_and_ends_exact() {
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(dir.path().join("log"), 3).unwrap();
    let store = Arc::new(RedbStore::open(dir.path().join("state.redb")).unwrap());
    let leases = Arc::new(LocalLeases::new());
    let evs = events(600);
    let recs: Vec<OutRecord<'_>> = evs.iter().map(|(k, p)| OutRecord { key: k, payload: p.as_bytes() }).collect();
    log.append(&recs).unwrap();
    let (stop, handle) = member("only", &log, &leases, &store);
    wait_for("one member to hold every shard", || async { owned_by(&spread(leases.as_ref()).await, "only") == 3 })
        .await;
    let expected = straight_pass(Arc::new(EngineConfig::default()), evs.iter().map(|(_, p)| p.as_bytes()));
    wait_for("the state to equal the straight pass", || async {
        expected.diff(&Outcome::of_store(store.as_ref()).await.unwrap(), 5).is_empty()
    })
    .await;
    stop.send(true).unwrap();
    handle.await.unwrap();
    assert_eq!(store.checkpoints().await.unwrap().len(), 3);
    assert!(leases.leases().await.unwrap().iter().all(|l| l.owner.is_none()), "released at shutdown");
}
