//! Order lines kept apart (the embedded store's line log): whatever the commit and restart
//! points, what the store gives back is exactly what an engine that never stopped holds —
//! lines changed, closed, re-sent and forgotten by the line horizon included; the log is
//! rewritten before it outgrows the live lines; states written whole, and stores written before
//! the line log, are read whole.

use std::sync::Arc;

use proptest::prelude::*;
use stockflow_state::embedded::RedbStore;
use stockflow_state::ledger::v1::SkuStateV1;
use stockflow_state::{EngineConfig, Position, ShardCommit, ShardEngine, StateStore, decode};

mod common;
use common::render;

const DAY: i64 = 86_400_000;
const SHARD: &str = "shard-0000";

fn config() -> Arc<EngineConfig> {
    // A one-day line horizon: closed lines are forgotten within the generated streams.
    Arc::new(EngineConfig { line_horizon_ms: DAY, default_reorder_point: 2, ..EngineConfig::default() })
}

/// (type, sku, order, qty, ts step) for [`render`]: steps up to ~8 h, sometimes back, so SKUs'
/// times cross days (sweeps) and late events touch lines near or past the horizon.
fn event() -> impl Strategy<Value = (u8, u8, u8, i64, i64)> {
    (0u8..8, 0u8..3, 0u8..12, 1i64..5, -4 * 3_600_000i64..8 * 3_600_000)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().build().unwrap()
}

async fn commit(store: &RedbStore, engine: &mut ShardEngine, pos: u64) {
    let d = engine.take_delta().unwrap();
    assert!(d.lines.is_some(), "an engine keeping lines apart sends line changes");
    store.commit(Arc::new(ShardCommit::of_delta(SHARD, 1, Position::offset(pos), d))).await.unwrap();
}

async fn reopen(store: &RedbStore) -> ShardEngine {
    let stored = store.load_shard(SHARD).await.unwrap();
    let mut engine = ShardEngine::restore(config(), stored.snapshot);
    engine.keep_lines_apart(stored.lines_log_bytes);
    engine
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn stored_lines_equal_an_engine_that_never_stopped(
        events in prop::collection::vec(event(), 1..300),
        cuts in prop::collection::vec((any::<prop::sample::Index>(), any::<bool>()), 0..8),
    ) {
        let lines = render(&events);
        let mut straight = ShardEngine::new(config());
        for l in &lines {
            straight.apply(&decode(l.as_bytes()).unwrap());
        }
        let mut cuts: Vec<(usize, bool)> = cuts.iter().map(|(i, restart)| (i.index(lines.len() + 1), *restart)).collect();
        cuts.sort();
        cuts.push((lines.len(), false));

        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(dir.path().join("state.redb")).unwrap();
        let rt = runtime();
        let mut engine = ShardEngine::new(config());
        engine.keep_lines_apart(0);
        let mut at = 0;
        for (commits, (cut, restart)) in (1..).zip(cuts) {
            for l in &lines[at..cut] {
                engine.apply(&decode(l.as_bytes()).unwrap());
            }
            at = cut;
            rt.block_on(commit(&store, &mut engine, commits));
            if restart {
                engine = rt.block_on(reopen(&store));
            }
        }
        let want = straight.snapshot();
        prop_assert_eq!(&engine.snapshot().skus, &want.skus);
        let stored = rt.block_on(store.load_shard(SHARD)).unwrap();
        prop_assert_eq!(&stored.snapshot.skus, &want.skus, "load_shard");
        prop_assert_eq!(&rt.block_on(store.sku_states()).unwrap(), &want.skus, "sku_states");
        prop_assert_eq!(&rt.block_on(store.shard_sku_states(SHARD)).unwrap(), &want.skus, "shard_sku_states");
    }
}

/// 20,000 orders placed a commit on 500 SKUs and shipped the commit after, for 30 commits, every
/// line remembered (35-day horizon): the log is rewritten whenever what was appended outgrows
/// the last full write (and 8 MiB), so it stays within about twice the live lines, and a
/// restart reads them all.
#[test]
fn the_line_log_is_rewritten_before_it_outgrows_the_live_lines() {
    let cfg = Arc::new(EngineConfig::default());
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(dir.path().join("state.redb")).unwrap();
    let rt = runtime();
    let mut engine = ShardEngine::new(Arc::clone(&cfg));
    engine.keep_lines_apart(0);
    let (mut replaced, mut largest, mut previous) = (0, 0u64, 0u64);
    const ORDERS: u64 = 20_000;
    let apply = |engine: &mut ShardEngine, n: u64, body: &str| {
        let (sku, ts) = (n % 500, 1_795_773_600_000 + n as i64);
        let ev = format!(r#"{{"id":"e{n}-{}","sku":"S{sku}","ts":{ts},"order_id":"o{n}",{body}}}"#, body.len());
        assert_eq!(engine.apply(&decode(ev.as_bytes()).unwrap()), stockflow_state::Applied::Applied);
    };
    for c in 0..30u64 {
        for n in c * ORDERS..(c + 1) * ORDERS {
            apply(&mut engine, n, r#""type":"order_placed","qty":1"#);
            if c > 0 {
                apply(&mut engine, n - ORDERS, r#""type":"order_shipped""#);
            }
        }
        rt.block_on(commit(&store, &mut engine, c + 1));
        let log = rt.block_on(store.load_shard(SHARD)).unwrap().lines_log_bytes;
        replaced += usize::from(log < previous);
        previous = log;
        largest = largest.max(log);
        let live = (c + 1) * ORDERS * 20;
        assert!(
            log <= 2 * live.max(8 << 20) + (1 << 20),
            "commit {c}: {log} bytes stored for {live} bytes of live lines"
        );
    }
    assert!(replaced >= 1, "the log was never rewritten (largest {largest} bytes)");
    let mut restarted = rt.block_on(reopen(&store));
    assert_eq!(restarted.snapshot().skus, engine.snapshot().skus);
    assert_eq!(restarted.snapshot().skus.iter().map(|(_, s)| s.lines.len()).sum::<usize>(), 30 * ORDERS as usize);
    // The restarted engine goes on appending, not rewriting from scratch at once.
    let ev = r#"{"id":"x","sku":"S1","ts":1795773600000,"order_id":"x","type":"order_placed","qty":1}"#;
    restarted.apply(&decode(ev.as_bytes()).unwrap());
    let d = restarted.take_delta().unwrap();
    assert!(!d.lines.unwrap().replace);
}

/// A store written before the line log (SKU states with their lines inside, as v2 and v1
/// wrote them) and a caller that commits whole states: the lines are moved to the log, and an
/// engine keeping lines apart goes on from there without losing one.
#[test]
fn states_written_whole_keep_their_lines() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let store = RedbStore::open(dir.path().join("state.redb")).unwrap();
    // A caller that does not keep lines apart (v2 states with every line).
    let mut whole = ShardEngine::new(config());
    let placed = |i: u32| {
        format!(r#"{{"id":"p{i}","sku":"A","ts":1795773600000,"type":"order_placed","order_id":"o{i}","qty":2}}"#)
    };
    for i in 0..50 {
        whole.apply(&decode(placed(i).as_bytes()).unwrap());
    }
    let mut d = whole.take_delta().unwrap();
    assert!(d.lines.is_none());
    let old = SkuStateV1 { on_hand: 7, ..SkuStateV1::default() };
    d.states.push("OLD", &old.encode().unwrap());
    rt.block_on(store.commit(Arc::new(ShardCommit::of_delta(SHARD, 1, Position::offset(1), d)))).unwrap();
    // An engine that keeps lines apart ships one of them; a restart has all 50 (one closed).
    let mut engine = rt.block_on(reopen(&store));
    let ship = r#"{"id":"s1","sku":"A","ts":1795773600001,"type":"order_shipped","order_id":"o7"}"#;
    engine.apply(&decode(ship.as_bytes()).unwrap());
    rt.block_on(commit(&store, &mut engine, 2));
    drop(store);
    let store = RedbStore::open(dir.path().join("state.redb")).unwrap();
    let back = rt.block_on(reopen(&store));
    let a = back.sku("A").unwrap();
    assert_eq!((a.lines.len(), a.open_lines(), a.reserved, a.open_line_units()), (50, 49, 98, 98));
    assert_eq!(back.sku("OLD").unwrap().on_hand, 7);
    assert_eq!(back.snapshot().skus, engine.snapshot().skus);
}
