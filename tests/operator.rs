//! The operator's view of the AWS deployment: with `--dynamodb`, `state dump`, `alerts dump`,
//! `dlq dump`, `verify --events`, `outbox status | dead-letters` read the group's tables (moto);
//! `group status` and the dashboard's group view show every shard's owner, epoch and checkpoint.

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use stockflow_state::dynamodb::testing::emulator_store;
use stockflow_state::engine::ShardEngine;
use stockflow_state::lease::{LeaseStore, NewLease};
use stockflow_state::reference::{SkuSummary, straight_pass};
use stockflow_state::{DeadLetter, EngineConfig, Position, ShardCommit, StateStore, decode};

mod support;

fn stockflow(prefix: &str, args: &[&str]) -> std::process::Output {
    support::emulator_env(Command::new(env!("CARGO_BIN_EXE_stockflow")).args(args).args([
        "--dynamodb",
        "--table-prefix",
        prefix,
    ]))
    .env("STOCKFLOW_LOG", "warn")
    .output()
    .unwrap()
}

fn ok(out: std::process::Output) -> String {
    assert!(out.status.success(), "{}", support::text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_read_the_groups_tables_and_see_who_owns_what() {
    let Some(store) = emulator_store("ops").await else { return };
    let prefix = store.tables().leases.trim_end_matches("-leases").to_string();
    let t0 = 1_795_773_600_000i64;
    let events = [
        format!(
            r#"{{"id":"r1","type":"stock_received","sku":"A","ts":{t0},"qty":2,"unit_cost":"3.10","currency":"USD"}}"#
        ),
        format!(r#"{{"id":"p1","type":"order_placed","sku":"A","ts":{},"qty":3,"order_id":"o1"}}"#, t0 + 1),
        format!(r#"{{"id":"p2","type":"order_placed","sku":"B","ts":{},"qty":1,"order_id":"o2"}}"#, t0 + 2),
    ];
    // Shard s-0 is live and committed by worker-x; s-1 is free; s-2 ended into s-0.
    for (key, parents) in [("s-2", vec![]), ("s-0", vec!["s-2".to_string()]), ("s-1", vec![])] {
        assert!(store.create_lease(&NewLease { key: key.into(), parents, hash_range: None }).await.unwrap());
    }
    let epoch = store.take_lease("s-0", "worker-x").await.unwrap();
    let mut engine = ShardEngine::new(Arc::new(EngineConfig::default()));
    for e in &events {
        engine.apply(&decode(e.as_bytes()).unwrap());
    }
    let d = engine.take_delta().unwrap();
    let dead = DeadLetter::new("s-0", Position::offset(4), "malformed JSON".into(), None, b"{oops");
    store
        .commit(Arc::new(ShardCommit {
            dead_letters: vec![dead],
            lag_ms: Some(1_500),
            ..ShardCommit::of_delta("s-0", epoch, Position::offset(4), d)
        }))
        .await
        .unwrap();
    let e2 = store.take_lease("s-2", "worker-y").await.unwrap();
    assert!(store.end_lease("s-2", "worker-y", e2, &["s-0".into()]).await.unwrap());

    // The dumps and verify, over DynamoDB.
    let mut lines: Vec<&str> = events.iter().map(String::as_str).collect();
    lines.push("{oops");
    let expected = straight_pass(Arc::new(EngineConfig::default()), lines.iter().map(|l| l.as_bytes()));
    let states = ok(stockflow(&prefix, &["state", "dump"]));
    let got: Vec<SkuSummary> = states.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(got, expected.skus);
    let alerts = ok(stockflow(&prefix, &["alerts", "dump"]));
    assert_eq!(alerts.lines().count(), expected.alerts.len());
    assert!(alerts.contains("\"oversell\"") || alerts.contains("oversell"), "{alerts}");
    let dlq = ok(stockflow(&prefix, &["dlq", "dump"]));
    assert!(dlq.contains("malformed JSON") && dlq.lines().count() == 1, "{dlq}");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("events.ndjson");
    std::fs::write(&file, lines.join("\n")).unwrap();
    let verified = ok(stockflow(&prefix, &["verify", "--events", file.to_str().unwrap()]));
    assert!(verified.starts_with("verified: 2 SKUs"), "{verified}");
    let status = ok(stockflow(&prefix, &["outbox", "status"]));
    assert!(status.contains("s-0") && status.contains("effects after the cursor"), "{status}");
    assert_eq!(ok(stockflow(&prefix, &["outbox", "dead-letters"])), "");

    // group status: owners, epochs, lineage, the last commit's lag.
    let group = ok(stockflow(&prefix, &["group", "status"]));
    let row = |shard: &str| group.lines().find(|l| l.starts_with(shard)).unwrap_or_else(|| panic!("{group}"));
    assert!(row("s-0").contains("live") && row("s-0").contains("worker-x") && row("s-0").contains(&epoch.to_string()));
    assert!(row("s-0").contains("1.5s") && row("s-0").contains("parents s-2"), "{group}");
    assert!(row("s-1").contains("free"), "{group}");
    assert!(row("s-2").contains("ended") && row("s-2").contains("children s-0"), "{group}");
    assert!(group.contains("3 shards, 1 live members"), "{group}");

    // The dashboard's group view.
    let (mut child, first) = support::spawn_announced(
        support::emulator_env(Command::new(env!("CARGO_BIN_EXE_stockflow")).args([
            "dashboard",
            "--dynamodb",
            "--table-prefix",
            &prefix,
            "--listen",
            "127.0.0.1:0",
        ]))
        .env("STOCKFLOW_LOG", "warn"),
    );
    assert!(first.contains("dashboard on"), "{first}");
    let addr = support::banner_addr(&first, 1);
    let shards = support::wait_for("the dashboard to read the lease table", Duration::from_secs(30), || {
        let v = support::get_json(&addr, "/api/group");
        v["shards"].as_array().filter(|a| a.len() == 3).cloned()
    });
    let s0 = shards.iter().find(|s| s["shard"] == "s-0").unwrap();
    assert_eq!((s0["state"].as_str(), s0["owner"].as_str()), (Some("live"), Some("worker-x")));
    assert_eq!(s0["epoch"].as_u64(), Some(epoch));
    assert_eq!(s0["lag_ms"].as_u64(), Some(1_500));
    let _ = child.kill();
    let _ = child.wait();
}
