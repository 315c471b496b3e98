//! One store conformance suite, run against the embedded store and against DynamoDB (moto).
//!
//! The DynamoDB run reads `DYNAMODB_ENDPOINT` (default `http://127.0.0.1:5001`); under CI
//! (`CI=true`) an unreachable endpoint fails the test instead of skipping it.

use std::sync::Arc;

use stockflow_state::book::BookStore;
use stockflow_state::dynamodb::testing::emulator_store;
use stockflow_state::embedded::RedbStore;
use stockflow_state::engine::{DedupDelta, EncodedStates};
use stockflow_state::outbox::{
    ConnectorDeadLetter, Cursor, Delivered, InFlight, OutboxPos, OutboxStore, Request, delivered_by_all,
    requeue_dead_letters,
};
use stockflow_state::reference::Outcome;
use stockflow_state::{
    Applied, DeadLetter, EngineConfig, Position, ShardCommit, ShardEngine, StateStore, StoreError, decode,
};

fn events(from: usize, to: usize) -> Vec<String> {
    (from..to)
        .map(|i| {
            let sku = format!("SKU-{}", i % 13);
            match i % 4 {
                0 => format!(r#"{{"id":"r{i}","type":"stock_received","sku":"{sku}","ts":{},"qty":2,"unit_cost":"1.25","currency":"USD"}}"#, 1_795_737_600_000i64 + i as i64),
                1 | 2 => format!(r#"{{"id":"p{i}","type":"order_placed","sku":"{sku}","ts":{},"qty":1,"order_id":"o{i}"}}"#, 1_795_737_600_000i64 + i as i64),
                _ => format!(r#"{{"id":"s{i}","type":"order_shipped","sku":"{sku}","ts":{},"order_id":"o{}"}}"#, 1_795_737_600_000i64 + i as i64, i - 1),
            }
        })
        .collect()
}

fn commit_of(engine: &mut ShardEngine, shard: &str, epoch: u64, pos: u64, dead: Vec<DeadLetter>) -> Arc<ShardCommit> {
    let d = engine.take_delta().unwrap();
    Arc::new(ShardCommit {
        shard: shard.into(),
        lease_epoch: epoch,
        checkpoint: Position::offset(pos),
        max_ts: d.max_ts,
        states: d.states,
        lines: d.lines,
        effects: d.effects,
        dead_letters: dead,
        dedup: d.dedup,
        new_skus: d.new_skus,
        keep_checkpoint: false,
        after_interrupted: false,
        lag_ms: None,
    })
}

fn per_sku(effects: Vec<stockflow_state::Effect>) -> std::collections::BTreeMap<String, Vec<stockflow_state::Effect>> {
    let mut m = std::collections::BTreeMap::<String, Vec<_>>::new();
    for e in effects {
        m.entry(e.sku().to_string()).or_default().push(e);
    }
    m
}

/// The suite: what every `StateStore` must do.
async fn conformance<S: StateStore + OutboxStore>(store: &S, shard: &str, epoch: u64) {
    let cfg = Arc::new(EngineConfig::default());
    // A shard never committed is empty.
    let fresh = store.load_shard(shard).await.unwrap();
    assert_eq!(fresh.checkpoint, None);
    assert!(fresh.snapshot.skus.is_empty() && fresh.snapshot.dedup.is_empty() && fresh.floors.is_empty());

    // Commit 1: 60 events and a dead letter.
    let mut engine = ShardEngine::new(Arc::clone(&cfg));
    for e in events(0, 60) {
        engine.apply(&decode(e.as_bytes()).unwrap());
    }
    let dl =
        DeadLetter::new(shard, Position::offset(7), "field `qty`: must be an integer ≥ 1".into(), Some("qty"), b"{}");
    store.commit(commit_of(&mut engine, shard, epoch, 59, vec![dl.clone()])).await.unwrap();

    // Restore equals the engine, and the checkpoint is there.
    let stored = store.load_shard(shard).await.unwrap();
    assert_eq!(stored.checkpoint, Some(Position::offset(59)));
    assert!(stored.floors.is_empty());
    let snap = engine.snapshot();
    let mut restored_skus = stored.snapshot.skus.clone();
    restored_skus.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(restored_skus, snap.skus);
    assert_eq!(stored.snapshot.max_ts, snap.max_ts);

    // Dedup survives the restart: an already-applied event is a duplicate for the restored engine.
    let mut restored = ShardEngine::restore(Arc::clone(&cfg), stored.snapshot);
    assert_eq!(restored.apply(&decode(events(10, 11)[0].as_bytes()).unwrap()), Applied::Duplicate);

    // Commit 2 from the restored engine; the store now equals one engine over all 120 events.
    for e in events(60, 120) {
        restored.apply(&decode(e.as_bytes()).unwrap());
    }
    store.commit(commit_of(&mut restored, shard, epoch, 200, vec![])).await.unwrap();
    let mut straight = ShardEngine::new(Arc::clone(&cfg));
    let mut fx = Vec::new();
    for e in events(0, 120) {
        straight.apply(&decode(e.as_bytes()).unwrap());
    }
    fx.extend(straight.take_delta().unwrap().effects);
    let expected = Outcome::from_parts(&straight.snapshot().skus, fx.clone(), 1);
    assert_eq!(expected.diff(&Outcome::of_store(store).await.unwrap(), 10), Vec::<String>::new());
    // Every effect comes back (not only alerts), in order per SKU (the outbox's ordering promise).
    assert_eq!(per_sku(store.effects().await.unwrap()), per_sku(fx));
    assert_eq!(store.dead_letters().await.unwrap(), vec![dl]);
    assert!(store.checkpoints().await.unwrap().contains(&(shard.to_string(), Position::offset(200))));

    // Checkpoints only move forward.
    let mut again = ShardEngine::new(Arc::clone(&cfg));
    again.apply(&decode(events(500, 501)[0].as_bytes()).unwrap());
    let err = store.commit(commit_of(&mut again, shard, epoch, 200, vec![])).await.unwrap_err();
    assert!(matches!(err, StoreError::CheckpointRegression { .. }), "{err}");
    assert_eq!(store.load_shard(shard).await.unwrap().checkpoint, Some(Position::offset(200)));

    // A compacted dedup set replaces the chunks.
    let mut compact = ShardEngine::restore(Arc::clone(&cfg), store.load_shard(shard).await.unwrap().snapshot);
    let live = compact.snapshot().dedup;
    compact.apply(&decode(events(120, 121)[0].as_bytes()).unwrap());
    let mut c = Arc::try_unwrap(commit_of(&mut compact, shard, epoch, 300, vec![])).unwrap();
    let mut all = Vec::new();
    for e in compact.snapshot().dedup {
        e.encode_into(&mut all);
    }
    c.dedup = DedupDelta::Replace(all);
    store.commit(Arc::new(c)).await.unwrap();
    let after = store.load_shard(shard).await.unwrap().snapshot.dedup;
    assert_eq!(after.len(), live.len() + 1);

    // Dead letters stay until an operator removes them; the predicate picks which.
    assert_eq!(store.remove_dead_letters(&|d| d.position == Position::offset(8)).await.unwrap(), 0);
    assert_eq!(store.remove_dead_letters(&|d| d.position == Position::offset(7)).await.unwrap(), 1);
    assert_eq!(store.dead_letters().await.unwrap(), vec![]);
}

/// The outbox as connectors read it: pages after a position add up to the shard's outbox in
/// order; cursors and connector dead letters round-trip; dead letters are requeued and removed.
async fn outbox_conformance<S: StateStore + OutboxStore>(store: &S, shard: &str) {
    assert!(store.outbox_shards().await.unwrap().contains(&shard.to_string()));
    let all = store.read_outbox(shard, None, usize::MAX).await.unwrap();
    assert!(all.len() > 10, "the suite's commits produced effects ({})", all.len());
    assert!(all.windows(2).all(|w| w[0].pos < w[1].pos), "positions increase");
    // Pages of 7 after the previous page's last position give the same effects.
    let mut paged = Vec::new();
    let mut after: Option<OutboxPos> = None;
    loop {
        let page = store.read_outbox(shard, after.as_ref(), 7).await.unwrap();
        assert!(page.len() <= 7);
        let Some(last) = page.last() else { break };
        after = Some(last.pos.clone());
        paged.extend(page);
    }
    assert_eq!(paged, all);
    let mut stored: Vec<_> = store.effects().await.unwrap();
    stored.retain(|e| all.iter().any(|a| a.effect == *e));
    assert_eq!(stored.len(), all.len());

    assert_eq!(store.cursor("accounting", shard).await.unwrap(), Cursor::default());
    let request = Request { key: "sf0123".into(), body: "{}".into(), items: vec![all[3].effect.id().to_string()] };
    let cursor = Cursor {
        delivered: Some(all[2].pos.clone()),
        in_flight: Some(InFlight {
            request: request.clone(),
            through: all[3].pos.clone(),
            attempts: 2,
            last_error: Some("HTTP 503".into()),
        }),
    };
    store.save_cursor("accounting", shard, &cursor, None, None).await.unwrap();
    assert_eq!(store.cursor("accounting", shard).await.unwrap(), cursor);
    assert_eq!(store.cursor("alerts-webhook", shard).await.unwrap(), Cursor::default(), "cursors are per connector");
    let dead = ConnectorDeadLetter {
        connector: "accounting".into(),
        shard: shard.into(),
        request,
        attempts: 12,
        last_error: "HTTP 503".into(),
        at_ms: 1,
        requeued: false,
        rendered: true,
    };
    let next = Cursor { delivered: Some(all[3].pos.clone()), in_flight: None };
    store.save_cursor("accounting", shard, &next, Some(&dead), None).await.unwrap();
    assert_eq!(store.cursor("accounting", shard).await.unwrap(), next);
    // A cursor never moves back: an exit-time save of a stale copy is refused, the stored one stays.
    let stale = Cursor { delivered: Some(all[1].pos.clone()), in_flight: None };
    let err = store.save_cursor("accounting", shard, &stale, None, None).await.unwrap_err();
    assert!(matches!(err, StoreError::CursorRegression { .. }), "{err}");
    let err = store.save_cursor("accounting", shard, &Cursor::default(), None, None).await.unwrap_err();
    assert!(matches!(err, StoreError::CursorRegression { .. }), "{err}");
    assert_eq!(store.cursor("accounting", shard).await.unwrap(), next);
    assert_eq!(store.connector_dead_letters(Some("accounting")).await.unwrap(), vec![dead.clone()]);
    assert_eq!(store.connector_dead_letters(Some("manufacturer")).await.unwrap(), vec![]);
    assert_eq!(requeue_dead_letters(store, Some("accounting")).await.unwrap(), 1);
    assert_eq!(requeue_dead_letters(store, Some("accounting")).await.unwrap(), 0, "already flagged");
    let listed = store.connector_dead_letters(None).await.unwrap();
    assert!(listed.len() == 1 && listed[0].requeued);
    store.remove_dead_letter("accounting", shard, &dead.request.key, None).await.unwrap();
    assert_eq!(store.connector_dead_letters(None).await.unwrap(), vec![]);

    // Retention of delivered rows: only rows every connector delivered, only when old enough.
    let last = all.last().unwrap().pos.clone();
    store
        .save_cursor("accounting", shard, &Cursor { delivered: Some(last.clone()), in_flight: None }, None, None)
        .await
        .unwrap();
    let two = delivered_by_all(store, shard, &["accounting", "alerts-webhook"]).await.unwrap();
    assert_eq!(two, Delivered::Nothing, "the alert webhook delivered nothing");
    assert_eq!(store.prune_delivered(shard, &two, stockflow_state::now_ms()).await.unwrap(), 0);
    let one = delivered_by_all(store, shard, &["accounting"]).await.unwrap();
    assert_eq!(one, Delivered::Before(last.clone()));
    let hour_ago = stockflow_state::now_ms() - 3_600_000;
    assert_eq!(store.prune_delivered(shard, &one, hour_ago).await.unwrap(), 0, "written just now: too young");
    let pruned = store.prune_delivered(shard, &one, stockflow_state::now_ms() + 1).await.unwrap();
    assert!(pruned > 0, "rows before the cursor's row are delivered and old enough");
    assert_eq!(store.prune_delivered(shard, &one, stockflow_state::now_ms() + 1).await.unwrap(), 0, "done once");
    // Whatever is at or after the cursor's row is still read.
    let kept = store.read_outbox(shard, None, usize::MAX).await.unwrap();
    let wanted: Vec<_> = all.iter().filter(|e| e.pos.row >= last.row).cloned().collect();
    assert!(wanted.iter().all(|w| kept.contains(w)), "rows not yet prunable are kept");
}

const T0: i64 = 1_795_737_600_000;

/// A shard written by stockflow before SPEC v2 (unversioned states, open lines by order id) is
/// read and upgraded: its open line keeps its units, a re-sent placement of it reserves nothing,
/// and the next commit stores the SKU in the current encoding.
async fn v1_rows_are_upgraded<S: StateStore>(store: &S, shard: &str, epoch: u64) {
    use stockflow_state::ledger::v1::{LineV1, SkuStateV1};
    let old = SkuStateV1 {
        on_hand: 7,
        reserved: 3,
        lines: [("114-1:1".into(), LineV1 { remaining: 3, shipped: 0 })].into_iter().collect(),
        avg_cost: "2.5".parse().unwrap(),
        cost_currency: stockflow_state::money::Currency::parse("USD"),
        max_ts: Some(T0),
        ..SkuStateV1::default()
    };
    let commit = |states: EncodedStates, pos: u64| {
        Arc::new(ShardCommit {
            shard: shard.into(),
            lease_epoch: epoch,
            checkpoint: Position::offset(pos),
            max_ts: Some(T0),
            states,
            lines: None,
            effects: Vec::new(),
            dead_letters: Vec::new(),
            dedup: DedupDelta::Append(Vec::new()),
            // As an earlier stockflow wrote it: no listing (DynamoDB builds it once by a scan).
            new_skus: Vec::new(),
            keep_checkpoint: false,
            after_interrupted: false,
            lag_ms: None,
        })
    };
    store.commit(commit([("OLD-SKU", old.encode().unwrap())].into_iter().collect(), 1)).await.unwrap();
    let stored = store.load_shard(shard).await.unwrap();
    let (_, s) = stored.snapshot.skus.iter().find(|(k, _)| k == "OLD-SKU").expect("the v1 SKU is read");
    assert_eq!((s.on_hand, s.reserved, s.open_line_units()), (7, 3, 3));
    let cfg = Arc::new(EngineConfig::default());
    let mut engine = ShardEngine::restore(Arc::clone(&cfg), stored.snapshot);
    let placed = format!(
        r#"{{"id":"ord:114-1:1:placed","type":"order_placed","sku":"OLD-SKU","ts":{},"qty":3,"order_id":"114-1:1"}}"#,
        T0 + 86_400_000 * 3
    );
    assert_eq!(engine.apply(&decode(placed.as_bytes()).unwrap()), Applied::Applied);
    assert_eq!(engine.sku("OLD-SKU").unwrap().reserved, 3, "a re-sent placement of an upgraded line");
    let shipped = format!(
        r#"{{"id":"ord:114-1:1:shipped:3","type":"order_shipped","sku":"OLD-SKU","ts":{},"order_id":"114-1:1","shipped_total":3}}"#,
        T0 + 86_400_000 * 4
    );
    engine.apply(&decode(shipped.as_bytes()).unwrap());
    let d = engine.take_delta().unwrap();
    assert!(d.states.iter().all(|(_, bytes)| bytes.starts_with(&[0xFF; 5])), "written back in the current encoding");
    store.commit(commit(d.states, 2)).await.unwrap();
    let again = store.load_shard(shard).await.unwrap();
    let (_, s) = again.snapshot.skus.iter().find(|(k, _)| k == "OLD-SKU").unwrap();
    assert_eq!((s.on_hand, s.reserved, s.open_lines()), (4, 0, 0));
    assert_eq!(s, engine.sku("OLD-SKU").unwrap());
}

/// A hot SKU with `n` remembered (closed) order lines and a few open ones: it commits (split into
/// parts on DynamoDB, within one transaction) and restores whole.
async fn many_lines_commit_and_restore<S: StateStore>(store: &S, shard: &str, epoch: u64, n: usize) {
    let cfg = Arc::new(EngineConfig::default());
    let mut engine = ShardEngine::new(Arc::clone(&cfg));
    // Stock for every order (no oversell alerts: this is about the state, not the outbox).
    let count = format!(r#"{{"id":"count","type":"stock_counted","sku":"HOT","ts":{T0},"on_hand":1000000}}"#);
    engine.apply(&decode(count.as_bytes()).unwrap());
    // Orders over 30 days (within the line horizon), each placed then shipped.
    let step = 30 * 86_400_000 / n as i64;
    for i in 0..n {
        let ts = T0 + i as i64 * step;
        let order = format!("114-{i:07}-{:07}:{:014}", i * 7 % 9_999_999, i * 31);
        for (kind, extra) in [("placed", r#""qty":1"#), ("shipped:1", r#""shipped_total":1"#)] {
            let t = if kind == "placed" { "order_placed" } else { "order_shipped" };
            let ev = format!(
                r#"{{"id":"ord:{order}:{kind}","type":"{t}","sku":"HOT","ts":{ts},{extra},"order_id":"{order}"}}"#
            );
            assert_eq!(engine.apply(&decode(ev.as_bytes()).unwrap()), Applied::Applied);
        }
    }
    let hot = engine.sku("HOT").unwrap();
    assert_eq!((hot.lines.len(), hot.open_lines(), hot.on_hand), (n, 0, 1_000_000 - n as i64));
    let d = engine.take_delta().unwrap();
    let bytes = d.states.state_bytes();
    eprintln!("{n} remembered lines: {bytes} bytes encoded ({:.1} per line)", bytes as f64 / n as f64);
    assert!(bytes < 25 * n, "{bytes} bytes for {n} lines");
    store.commit(Arc::new(ShardCommit::of_delta(shard, epoch, Position::offset(2 * n as u64 + 1), d))).await.unwrap();
    let stored = store.load_shard(shard).await.unwrap();
    let restored = stored.snapshot.skus.iter().find(|(k, _)| k == "HOT").map(|(_, s)| s).unwrap();
    assert_eq!(restored, engine.sku("HOT").unwrap());
    // Every order's re-sent placement is recognised after the restore.
    let mut after = ShardEngine::restore(cfg, stored.snapshot);
    let i = 17;
    let order = format!("114-{i:07}-{:07}:{:014}", i * 7 % 9_999_999, i * 31);
    let again = format!(
        r#"{{"id":"ord:{order}:placed:again","type":"order_placed","sku":"HOT","ts":{},"qty":1,"order_id":"{order}"}}"#,
        T0 + 31 * 86_400_000
    );
    after.apply(&decode(again.as_bytes()).unwrap());
    assert_eq!(after.sku("HOT").unwrap().reserved, 0);
    assert_eq!(after.stats().resent_placements, 1);
}

#[tokio::test]
async fn embedded_store_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(dir.path().join("s.redb")).unwrap();
    conformance(&store, "shard-0000", 0).await;
    outbox_conformance(&store, "shard-0000").await;
    v1_rows_are_upgraded(&store, "shard-0001", 0).await;
    many_lines_commit_and_restore(&store, "shard-0002", 0, 100_000).await;
    many_dedup_ids_commit_and_restore(&store, "shard-0003", 0, 100_000).await;
}

/// More live ids than one stored dedup row holds (the embedded store splits them at 65,536): an
/// appended batch and a compacted rewrite both come back whole, and a restored engine still
/// knows the first and the last id.
async fn many_dedup_ids_commit_and_restore<S: StateStore>(store: &S, shard: &str, epoch: u64, n: usize) {
    let cfg = Arc::new(EngineConfig::default());
    let mut engine = ShardEngine::new(Arc::clone(&cfg));
    let ev = |i: usize| {
        format!(r#"{{"id":"a{i}","type":"stock_adjusted","sku":"SKU-{}","ts":{},"delta":1}}"#, i % 50, T0 + i as i64)
    };
    for i in 0..n {
        assert_eq!(engine.apply(&decode(ev(i).as_bytes()).unwrap()), Applied::Applied);
    }
    let first = commit_of(&mut engine, shard, epoch, n as u64, Vec::new());
    assert!(matches!(first.dedup, DedupDelta::Append(_)), "the first batch is appended");
    store.commit(first).await.unwrap();
    assert_eq!(store.load_shard(shard).await.unwrap().snapshot.dedup.len(), n);
    // A compaction: the whole live set rewritten.
    engine.rewrite_dedup();
    assert_eq!(engine.apply(&decode(ev(n).as_bytes()).unwrap()), Applied::Applied);
    let second = commit_of(&mut engine, shard, epoch, n as u64 + 1, Vec::new());
    assert!(matches!(second.dedup, DedupDelta::Replace(_)), "a rewrite replaces");
    store.commit(second).await.unwrap();
    let stored = store.load_shard(shard).await.unwrap();
    assert_eq!(stored.snapshot.dedup.len(), n + 1);
    let mut restored = ShardEngine::restore(cfg, stored.snapshot);
    for i in [0, n / 2, n] {
        assert_eq!(restored.apply(&decode(ev(i).as_bytes()).unwrap()), Applied::Duplicate, "a{i}");
    }
    assert_eq!(restored.apply(&decode(ev(n + 1).as_bytes()).unwrap()), Applied::Applied);
}

#[tokio::test]
async fn dynamodb_v1_rows_are_upgraded() {
    let Some(store) = emulator_store("v1").await else { return };
    let epoch = store.take_lease("shardId-000000000007", "worker-a").await.unwrap();
    v1_rows_are_upgraded(&store, "shardId-000000000007", epoch).await;
}

#[tokio::test]
async fn dynamodb_a_sku_with_100k_remembered_lines_commits_and_restores() {
    let Some(store) = emulator_store("lines").await else { return };
    let epoch = store.take_lease("shardId-000000000009", "worker-a").await.unwrap();
    many_lines_commit_and_restore(&store, "shardId-000000000009", epoch, 100_000).await;
}

#[tokio::test]
async fn dynamodb_store_conforms() {
    let Some(store) = emulator_store("t").await else { return };
    let epoch = store.take_lease("shardId-000000000001", "worker-a").await.unwrap();
    conformance(&store, "shardId-000000000001", epoch).await;
    outbox_conformance(&store, "shardId-000000000001").await;
    // setup is idempotent: a second run validates instead of creating.
    let again = store.setup().await.unwrap();
    assert!(again.iter().all(|o| matches!(o, stockflow_state::dynamodb::TableOutcome::Valid(_))));
}

#[tokio::test]
async fn dynamodb_effects_larger_than_one_item_read_back_whole() {
    let Some(store) = emulator_store("sf-big-").await else { return };
    let epoch = store.take_lease("s", "w").await.unwrap();
    // 4,000 orders on empty stock: 4,000 oversell alerts, well over one 350 KB outbox item, so
    // the commit's NDJSON is cut across items (mid-line).
    let mut engine = ShardEngine::new(Arc::new(EngineConfig::default()));
    for i in 0..4_000 {
        let ev = format!(
            r#"{{"id":"o{i}","type":"order_placed","sku":"SKU-{}","ts":{},"qty":1,"order_id":"o{i}"}}"#,
            i % 50,
            1_795_737_600_000i64 + i
        );
        engine.apply(&decode(ev.as_bytes()).unwrap());
    }
    let expected: Vec<_> = engine.pending_effects().to_vec();
    let bytes: usize = expected.iter().map(|e| serde_json::to_vec(e).unwrap().len() + 1).sum();
    assert!(bytes > 350_000, "the effects span items ({bytes} bytes)");
    store.commit(commit_of(&mut engine, "s", epoch, 4_000, Vec::new())).await.unwrap();
    let stored = store.effects().await.unwrap();
    assert_eq!(stored.len(), expected.len());
    // Commits store effects grouped by SKU; each SKU's order is kept.
    assert!(per_sku(stored.clone()) == per_sku(expected), "effects differ per SKU");
    // Read by connectors in pages, across the item boundaries, the same effects in the same order.
    let mut paged = Vec::new();
    let mut after: Option<OutboxPos> = None;
    loop {
        let page = store.read_outbox("s", after.as_ref(), 1_500).await.unwrap();
        let Some(last) = page.last() else { break };
        after = Some(last.pos.clone());
        paged.extend(page.into_iter().map(|e| e.effect));
    }
    assert_eq!(paged, stored);
}

/// Delivery writes are fenced by a lease: the holder writes; once the lease moved (a steal, a
/// release) every write of the old holder — cursor, in-flight request, dead letter — is refused.
#[tokio::test]
async fn dynamodb_delivery_writes_are_fenced_by_the_lease() {
    use stockflow_state::lease::{LeaseStore, NewLease};
    use stockflow_state::outbox::Fence;
    let Some(store) = emulator_store("fence").await else { return };
    let shard = "shardId-000000000003";
    assert!(store.create_lease(&NewLease { key: shard.into(), parents: vec![], hash_range: None }).await.unwrap());
    let mine = store.take_lease(shard, "worker-a").await.unwrap();
    let fence = Fence { lease: shard.into(), epoch: mine };
    let pos = |line| OutboxPos { row: "00000000000000000001#0000".into(), line };
    let request = Request { key: "sf-k".into(), body: "{}".into(), items: vec!["e1".into()] };
    let flight = Cursor {
        delivered: Some(pos(1)),
        in_flight: Some(InFlight { request: request.clone(), through: pos(2), attempts: 0, last_error: None }),
    };
    store.save_cursor("accounting", shard, &flight, None, Some(&fence)).await.unwrap();
    let dead = ConnectorDeadLetter {
        connector: "accounting".into(),
        shard: shard.into(),
        request,
        attempts: 1,
        last_error: "refused".into(),
        at_ms: 1,
        requeued: false,
        rendered: true,
    };
    store.put_dead_letter(&dead, Some(&fence)).await.unwrap();
    // Another member steals the lease: the epoch moves.
    let theirs = store.take_lease(shard, "worker-b").await.unwrap();
    assert_ne!(theirs, mine);
    let delivered = Cursor { delivered: Some(pos(2)), in_flight: None };
    for err in [
        store.save_cursor("accounting", shard, &delivered, None, Some(&fence)).await.unwrap_err(),
        store.save_cursor("accounting", shard, &delivered, Some(&dead), Some(&fence)).await.unwrap_err(),
        store.put_dead_letter(&dead, Some(&fence)).await.unwrap_err(),
        store.remove_dead_letter("accounting", shard, "sf-k", Some(&fence)).await.unwrap_err(),
    ] {
        assert!(matches!(err, StoreError::Fenced { .. }), "{err}");
    }
    // Nothing of the old holder landed: the new holder resumes its in-flight request verbatim.
    assert_eq!(store.cursor("accounting", shard).await.unwrap(), flight);
    assert_eq!(store.connector_dead_letters(None).await.unwrap(), vec![dead.clone()]);
    let new_fence = Fence { lease: shard.into(), epoch: theirs };
    store.save_cursor("accounting", shard, &delivered, None, Some(&new_fence)).await.unwrap();
    store.remove_dead_letter("accounting", shard, "sf-k", Some(&new_fence)).await.unwrap();
    assert_eq!(store.cursor("accounting", shard).await.unwrap(), delivered);
    assert!(store.connector_dead_letters(None).await.unwrap().is_empty());
}

/// The connectors' book: ordered prefix reads, create / compare-and-set / delete, and a write
/// that fails an expectation (or moves a cursor back) lands nothing at all.
async fn book_conformance<S: BookStore>(store: &S, shard: &str) {
    use stockflow_state::book::{BookWrite, CursorWrite, book_all};
    let c = "accounting";
    assert_eq!(store.book_get(c, "frag#2026-11-27#a").await.unwrap(), None);
    let writes: Vec<BookWrite> =
        (0..12).map(|i| BookWrite::create(format!("frag#2026-11-27#{i:03}"), format!("{{\"n\":{i}}}"))).collect();
    store.book_write(c, &writes, None, None).await.unwrap();
    store
        .book_write(c, &[BookWrite::put("frag#2026-11-28#000", "{}"), BookWrite::put("frag", "x")], None, None)
        .await
        .unwrap();
    // Another connector's book is apart.
    store.book_write("other", &[BookWrite::put("frag#2026-11-27#999", "{}")], None, None).await.unwrap();
    let day = book_all(store, c, "frag#2026-11-27#").await.unwrap();
    assert_eq!(day.len(), 12);
    assert!(day.windows(2).all(|w| w[0].0 < w[1].0), "in key order");
    assert_eq!(day[3], ("frag#2026-11-27#003".to_string(), "{\"n\":3}".to_string()));
    let page = store.book_range(c, "frag#2026-11-27#", Some("frag#2026-11-27#004"), 3).await.unwrap();
    assert_eq!(
        page.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
        ["frag#2026-11-27#005", "frag#2026-11-27#006", "frag#2026-11-27#007"]
    );
    assert_eq!(book_all(store, c, "frag#").await.unwrap().len(), 13);

    // A failed expectation writes nothing, not even the cursor or the other keys.
    let cursor = Cursor { delivered: Some(OutboxPos { row: "00000000000000000009".into(), line: 0 }), in_flight: None };
    let before = store.cursor(c, shard).await.unwrap();
    let err = store
        .book_write(
            c,
            &[BookWrite::put("mark#x", "1"), BookWrite::create("frag#2026-11-27#001", "dup")],
            Some(CursorWrite { shard, cursor: &cursor }),
            None,
        )
        .await
        .unwrap_err();
    assert!(matches!(&err, StoreError::Conflict { key } if key == "frag#2026-11-27#001"), "{err}");
    assert_eq!(store.book_get(c, "mark#x").await.unwrap(), None);
    assert_eq!(store.cursor(c, shard).await.unwrap(), before);
    // Compare-and-set and conditional delete.
    store
        .book_write(c, &[BookWrite::swap("frag#2026-11-27#001", "{\"n\":1}", Some("one".into()))], None, None)
        .await
        .unwrap();
    let stale = store.book_write(c, &[BookWrite::swap("frag#2026-11-27#001", "{\"n\":1}", None)], None, None).await;
    assert!(matches!(stale, Err(StoreError::Conflict { .. })));
    store.book_write(c, &[BookWrite::swap("frag#2026-11-27#001", "one", None)], None, None).await.unwrap();
    assert_eq!(store.book_get(c, "frag#2026-11-27#001").await.unwrap(), None);
    // With the cursor, together; a cursor that moves back refuses the whole write.
    store
        .book_write(c, &[BookWrite::put("mark#x", "2")], Some(CursorWrite { shard, cursor: &cursor }), None)
        .await
        .unwrap();
    assert_eq!(store.cursor(c, shard).await.unwrap(), cursor);
    let back = Cursor { delivered: Some(OutboxPos { row: "00000000000000000001".into(), line: 0 }), in_flight: None };
    let err = store
        .book_write(c, &[BookWrite::put("mark#x", "3")], Some(CursorWrite { shard, cursor: &back }), None)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::CursorRegression { .. }), "{err}");
    assert_eq!(store.book_get(c, "mark#x").await.unwrap().as_deref(), Some("2"));
}

#[tokio::test]
async fn embedded_book_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(dir.path().join("s.redb")).unwrap();
    book_conformance(&store, "shard-0000").await;
    assert_eq!(store.committed_max_ts("shard-0000").await.unwrap(), None);
    let mut engine = ShardEngine::new(Arc::new(EngineConfig::default()));
    for line in events(0, 5) {
        engine.apply(&decode(line.as_bytes()).unwrap());
    }
    store.commit(commit_of(&mut engine, "shard-0000", 0, 5, Vec::new())).await.unwrap();
    assert_eq!(store.committed_max_ts("shard-0000").await.unwrap(), Some(1_795_737_600_004));
}

#[tokio::test]
async fn dynamodb_book_conforms_and_is_fenced() {
    use stockflow_state::book::{BookWrite, CursorWrite};
    use stockflow_state::lease::{LeaseStore, NewLease};
    use stockflow_state::outbox::Fence;
    let Some(store) = emulator_store("book").await else { return };
    let shard = "shardId-000000000004";
    assert!(store.create_lease(&NewLease { key: shard.into(), parents: vec![], hash_range: None }).await.unwrap());
    let mine = store.take_lease(shard, "worker-a").await.unwrap();
    book_conformance(&store, shard).await;
    let mut engine = ShardEngine::new(Arc::new(EngineConfig::default()));
    for line in events(0, 5) {
        engine.apply(&decode(line.as_bytes()).unwrap());
    }
    store.commit(commit_of(&mut engine, shard, mine, 5, Vec::new())).await.unwrap();
    assert_eq!(store.committed_max_ts(shard).await.unwrap(), Some(1_795_737_600_004));
    let fence = Fence { lease: shard.into(), epoch: mine };
    let cursor =
        Cursor { delivered: Some(OutboxPos { row: "00000000000000000010#0000".into(), line: 0 }), in_flight: None };
    store
        .book_write(
            "accounting",
            &[BookWrite::put("mark#s", "a")],
            Some(CursorWrite { shard, cursor: &cursor }),
            Some(&fence),
        )
        .await
        .unwrap();
    store.take_lease(shard, "worker-b").await.unwrap();
    let err = store.book_write("accounting", &[BookWrite::put("mark#s", "b")], None, Some(&fence)).await.unwrap_err();
    assert!(matches!(err, StoreError::Fenced { .. }), "{err}");
    assert_eq!(store.book_get("accounting", "mark#s").await.unwrap().as_deref(), Some("a"));
}
