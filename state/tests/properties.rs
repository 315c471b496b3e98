//! Property tests of the engine's invariants (SPEC §2–§3).

use std::sync::Arc;

use proptest::prelude::*;
use stockflow_state::engine::ShardSnapshot;
use stockflow_state::{Effect, EngineConfig, ShardEngine, SkuState, decode};

mod common;
use common::render;

/// One generated event as canonical JSON.
fn event() -> impl Strategy<Value = (u8, u8, u8, i64, i64)> {
    // (type, sku, order, qty/delta, ts step)
    (0u8..8, 0u8..3, 0u8..5, 1i64..6, -90_000i64..200_000)
}

fn config() -> Arc<EngineConfig> {
    Arc::new(EngineConfig { default_reorder_point: 2, ..EngineConfig::default() })
}

fn run(engine: &mut ShardEngine, lines: &[String], effects: &mut Vec<Effect>) {
    for l in lines {
        engine.apply(&decode(l.as_bytes()).unwrap());
    }
    effects.extend(engine.take_delta().unwrap().effects);
}

/// A snapshot through the store's codec, as a restart would see it.
fn through_codec(s: ShardSnapshot) -> ShardSnapshot {
    let skus = s.skus.into_iter().map(|(k, st)| (k, SkuState::decode(&st.encode().unwrap()).unwrap())).collect();
    ShardSnapshot { skus, ..s }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn reserved_equals_the_sum_of_open_lines(events in prop::collection::vec(event(), 1..200)) {
        let mut engine = ShardEngine::new(config());
        for l in render(&events) {
            let ev = decode(l.as_bytes()).unwrap();
            engine.apply(&ev);
            let s = engine.sku(&ev.sku).unwrap();
            prop_assert_eq!(s.reserved, s.open_line_units());
            prop_assert!(s.lines.values().all(|l| l.is_open() || l.closed_ts <= s.max_ts.unwrap_or(i64::MAX)));
        }
    }

    #[test]
    fn a_snapshot_restore_cut_anywhere_equals_one_straight_pass(
        events in prop::collection::vec(event(), 1..200),
        cut in any::<prop::sample::Index>(),
    ) {
        let lines = render(&events);
        let cut = cut.index(lines.len() + 1);
        let mut straight_fx = Vec::new();
        let mut straight = ShardEngine::new(config());
        run(&mut straight, &lines, &mut straight_fx);

        let mut fx = Vec::new();
        let mut first = ShardEngine::new(config());
        run(&mut first, &lines[..cut], &mut fx);
        let mut second = ShardEngine::restore(config(), through_codec(first.snapshot()));
        run(&mut second, &lines[cut..], &mut fx);

        let (a, b) = (straight.snapshot(), second.snapshot());
        prop_assert_eq!(&a.skus, &b.skus);
        prop_assert_eq!(a.max_ts, b.max_ts);
        prop_assert_eq!(a.dedup, b.dedup);
        prop_assert_eq!(straight_fx, fx);
    }

    #[test]
    fn duplicates_never_change_state(
        events in prop::collection::vec(event(), 1..150),
        dups in prop::collection::vec((any::<prop::sample::Index>(), any::<prop::sample::Index>()), 0..40),
    ) {
        let lines = render(&events);
        let mut with_dups = lines.clone();
        for (src, at) in dups {
            // Re-send an earlier event somewhere after it.
            let i = src.index(lines.len());
            let first = with_dups.iter().position(|l| *l == lines[i]).unwrap_or(0);
            let pos = first + 1 + at.index(with_dups.len() - first);
            with_dups.insert(pos, lines[i].clone());
        }
        let (mut fx_a, mut fx_b) = (Vec::new(), Vec::new());
        let mut a = ShardEngine::new(config());
        run(&mut a, &lines, &mut fx_a);
        let mut b = ShardEngine::new(config());
        run(&mut b, &with_dups, &mut fx_b);
        prop_assert_eq!(a.snapshot().skus, b.snapshot().skus);
        prop_assert_eq!(fx_a, fx_b);
        prop_assert_eq!(b.stats().duplicates as usize, with_dups.len() - lines.len());
    }
}
