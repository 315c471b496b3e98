//! The engine against the independent model (`tests/model`, SPEC v2): generated streams with
//! mixed SKUs, placements re-sent days apart (past the dedup horizon, inside and past the line
//! horizon), out-of-order and cumulative shipments, counts, duplicates and poison values (i64
//! edges, the 10⁹ bounds, timestamps at the ends of the range, money past the limits), through
//! decode → apply → snapshot → store codec → restore. The model decides what is correct.

use std::collections::BTreeMap;
use std::sync::Arc;

use proptest::prelude::*;
use serde_json::Value;
use stockflow_model::{Config, canonical_effect, decimal_value};
use stockflow_state::engine::ShardSnapshot;
use stockflow_state::{Applied, Effect, EngineConfig, ShardEngine, SkuState, decode};

const T0: i64 = 1_795_737_600_000;
const HOUR: i64 = 3_600_000;
const DAY: i64 = 24 * HOUR;

/// Quantities: ordinary ones mostly, the edges sometimes.
fn qty() -> impl Strategy<Value = i64> {
    prop_oneof![
        8 => 1i64..6,
        1 => Just(1_000_000_000i64),
        1 => Just(1_000_000_001i64),
        1 => Just(i64::MAX),
        1 => Just(0i64),
        1 => Just(-1i64),
        1 => 999_999_990i64..=1_000_000_000,
    ]
}

/// Time steps: seconds to days forward, sometimes back (out of order), sometimes to the range ends.
fn step() -> impl Strategy<Value = i64> {
    prop_oneof![
        6 => -90_000i64..600_000,
        2 => HOUR..3 * DAY,
        1 => 5 * DAY..40 * DAY,
        1 => -3 * DAY..-HOUR,
    ]
}

fn cost() -> impl Strategy<Value = (String, &'static str)> {
    prop_oneof![
        6 => (1u32..5000).prop_map(|c| (format!("{}.{:02}", c / 100, c % 100), "USD")),
        1 => Just(("8.125".to_string(), "USD")),
        1 => Just(("0.3333333333333333333333333333".to_string(), "USD")),
        1 => Just(("150".to_string(), "JPY")),
        1 => Just(("0".to_string(), "USD")),
        1 => Just(("100000000000000000".to_string(), "USD")),
        1 => Just(("99999999999999999999".to_string(), "USD")),
        1 => prop_oneof![
            Just("+9.99"), Just(".99"), Just("9."), Just("1_000"), Just("1e3"),
            Just("1.0000000000000000000000000000"), Just("0.0000000000000000000000000001"),
            Just("9999999999999999999999999999"),
        ].prop_map(|s| (s.to_string(), "USD")),
    ]
}

#[derive(Debug, Clone)]
enum Gen {
    Placed { sku: u8, order: u8, qty: i64, resend_of: Option<u8> },
    Cancelled { sku: u8, order: u8, qty: Option<i64> },
    Shipped { sku: u8, order: u8, qty: Option<i64> },
    ShippedTotal { sku: u8, order: u8, total: i64 },
    Received { sku: u8, qty: i64, cost: Option<(String, &'static str)> },
    Adjusted { sku: u8, delta: i64 },
    Counted { sku: u8, n: i64 },
    TsEdge { sku: u8, ts: i64 },
    Duplicate { back: u8 },
}

fn step_of_stream() -> impl Strategy<Value = (Gen, i64)> {
    let sku = 0u8..3;
    let order = 0u8..6;
    let g = prop_oneof![
        5 => (sku.clone(), order.clone(), qty(), prop::option::of(0u8..6))
            .prop_map(|(sku, order, qty, resend_of)| Gen::Placed { sku, order, qty, resend_of }),
        2 => (sku.clone(), order.clone(), prop::option::of(qty())).prop_map(|(sku, order, qty)| Gen::Cancelled { sku, order, qty }),
        2 => (sku.clone(), order.clone(), prop::option::of(qty())).prop_map(|(sku, order, qty)| Gen::Shipped { sku, order, qty }),
        3 => (sku.clone(), order.clone(), qty()).prop_map(|(sku, order, total)| Gen::ShippedTotal { sku, order, total }),
        3 => (sku.clone(), qty(), prop::option::of(cost())).prop_map(|(sku, qty, cost)| Gen::Received { sku, qty, cost }),
        1 => (sku.clone(), prop_oneof![Just(-1_000_000_000i64), Just(1_000_000_001), Just(i64::MIN), -5i64..5])
            .prop_map(|(sku, delta)| Gen::Adjusted { sku, delta }),
        2 => (sku.clone(), prop_oneof![0i64..8, Just(1_000_000_000), Just(1_000_000_001), Just(-1)])
            .prop_map(|(sku, n)| Gen::Counted { sku, n }),
        1 => (sku.clone(), prop_oneof![Just(946_684_800_000i64), Just(4_102_444_799_999), Just(4_102_444_800_000), Just(946_684_799_999), Just(1_795_737_600)])
            .prop_map(|(sku, ts)| Gen::TsEdge { sku, ts }),
        2 => (0u8..50).prop_map(|back| Gen::Duplicate { back }),
    ];
    (g, step())
}

fn render(events: &[(Gen, i64)]) -> Vec<String> {
    let mut ts = T0;
    let mut out: Vec<String> = Vec::with_capacity(events.len());
    for (i, (g, step)) in events.iter().enumerate() {
        ts = (ts + step).clamp(946_684_800_000, 4_102_444_799_999);
        let head = |id: String, sku: u8, ts: i64| format!(r#""id":"{id}","sku":"SKU-{sku}","ts":{ts}"#);
        let line = match g {
            Gen::Placed { sku, order, qty, resend_of } => {
                // A re-send keeps the order's id: the SP-API mapping's `ord:…:placed`.
                let order = resend_of.unwrap_or(*order);
                let id = format!("ord:{sku}-{order}:placed");
                let id = if resend_of.is_some() { id } else { format!("{id}:{i}") };
                format!(
                    r#"{{{},"type":"order_placed","order_id":"{sku}-{order}","qty":{qty},"unit_price":"9.99","currency":"USD"}}"#,
                    head(id, *sku, ts)
                )
            }
            Gen::Cancelled { sku, order, qty } => {
                let q = qty.map(|q| format!(r#","qty":{q}"#)).unwrap_or_default();
                format!(
                    r#"{{{},"type":"order_cancelled","order_id":"{sku}-{order}"{q}}}"#,
                    head(format!("c{i}"), *sku, ts)
                )
            }
            Gen::Shipped { sku, order, qty } => {
                let q = qty.map(|q| format!(r#","qty":{q}"#)).unwrap_or_default();
                format!(
                    r#"{{{},"type":"order_shipped","order_id":"{sku}-{order}"{q}}}"#,
                    head(format!("s{i}"), *sku, ts)
                )
            }
            Gen::ShippedTotal { sku, order, total } => format!(
                r#"{{{},"type":"order_shipped","order_id":"{sku}-{order}","shipped_total":{total}}}"#,
                head(format!("ord:{sku}-{order}:shipped:{total}"), *sku, ts)
            ),
            Gen::Received { sku, qty, cost } => {
                let c = cost
                    .as_ref()
                    .map(|(c, cur)| format!(r#","unit_cost":"{c}","currency":"{cur}""#))
                    .unwrap_or_default();
                format!(r#"{{{},"type":"stock_received","qty":{qty}{c}}}"#, head(format!("r{i}"), *sku, ts))
            }
            Gen::Adjusted { sku, delta } => {
                // A field outside its event types is ignored, whatever its value (if its type is right).
                let extra = match delta.rem_euclid(4) {
                    0 => r#","qty":0"#,
                    1 => r#","shipped_total":-3,"on_hand":-1"#,
                    2 => r#","unit_price":"x","order_id":"""#,
                    _ => "",
                };
                format!(r#"{{{},"type":"stock_adjusted","delta":{delta}{extra}}}"#, head(format!("a{i}"), *sku, ts))
            }
            Gen::Counted { sku, n } => {
                format!(r#"{{{},"type":"stock_counted","on_hand":{n}}}"#, head(format!("k{i}"), *sku, ts))
            }
            Gen::TsEdge { sku, ts } => {
                format!(r#"{{{},"type":"stock_adjusted","delta":1}}"#, head(format!("t{i}"), *sku, *ts))
            }
            Gen::Duplicate { back } => match out.len().checked_sub(1 + usize::from(*back)) {
                Some(j) => out[j].clone(),
                None => format!(r#"{{{},"type":"stock_adjusted","delta":1}}"#, head(format!("d{i}"), 0, ts)),
            },
        };
        out.push(line);
    }
    out
}

/// What the engine ends with, in the model's terms.
struct EngineRun {
    skus: BTreeMap<String, (i64, i64, i64, u64, String, String)>,
    effects: BTreeMap<String, Value>,
    dead: usize,
    duplicates: u64,
    resent: u64,
}

fn engine_cfg(cfg: &Config) -> Arc<EngineConfig> {
    Arc::new(EngineConfig {
        dedup_horizon_ms: cfg.dedup_horizon_ms,
        line_horizon_ms: cfg.line_horizon_ms,
        default_reorder_point: cfg.reorder_point,
        ..EngineConfig::default()
    })
}

/// Runs the engine over the lines, restarting it through the store codec at `cuts`.
fn run_engine(cfg: &Config, lines: &[String], cuts: &[usize]) -> EngineRun {
    let ecfg = engine_cfg(cfg);
    let mut engine = ShardEngine::new(Arc::clone(&ecfg));
    let mut effects: Vec<Effect> = Vec::new();
    let mut dead = 0;
    let (mut duplicates, mut resent) = (0, 0);
    for (i, l) in lines.iter().enumerate() {
        if cuts.contains(&i) {
            duplicates += engine.stats().duplicates;
            resent += engine.stats().resent_placements;
            effects.extend(engine.take_delta().unwrap().effects);
            let snap = engine.snapshot();
            let skus =
                snap.skus.into_iter().map(|(k, s)| (k, SkuState::decode(&s.encode().unwrap()).unwrap())).collect();
            engine = ShardEngine::restore(Arc::clone(&ecfg), ShardSnapshot { skus, ..snap });
        }
        match decode(l.as_bytes()) {
            Err(_) => dead += 1,
            Ok(ev) => {
                if let Applied::Rejected(_) = engine.apply(&ev) {
                    dead += 1;
                }
                // The invariant after every event: reserved is the sum of the open lines.
                if let Some(s) = engine.sku(&ev.sku) {
                    assert_eq!(s.reserved, s.open_line_units(), "{l}");
                }
            }
        }
    }
    effects.extend(engine.take_delta().unwrap().effects);
    duplicates += engine.stats().duplicates;
    resent += engine.stats().resent_placements;
    let skus = engine
        .snapshot()
        .skus
        .into_iter()
        .map(|(k, s)| {
            let avg = decimal_value(&s.avg_cost.to_string()).unwrap();
            let cogs = decimal_value(&s.cogs.to_string()).unwrap();
            (k, (s.on_hand, s.reserved, s.available(), u64::from(s.oversells), avg, cogs))
        })
        .collect();
    let effects =
        effects.iter().map(|e| (e.id().to_string(), canonical_effect(&serde_json::to_value(e).unwrap()))).collect();
    EngineRun { skus, effects, dead, duplicates, resent }
}

fn check(cfg: &Config, lines: &[String], cuts: &[usize]) -> Result<(), TestCaseError> {
    let model = stockflow_model::run(cfg, lines.iter().map(|l| l.as_bytes()));
    let engine = run_engine(cfg, lines, cuts);
    let model_skus: BTreeMap<String, (i64, i64, i64, u64, String, String)> = model
        .skus
        .iter()
        .map(|(k, s)| {
            (k.clone(), (s.on_hand, s.reserved, s.available, s.oversells, s.avg_cost.clone(), s.cogs.clone()))
        })
        .collect();
    prop_assert_eq!(&engine.skus, &model_skus, "SKU figures\n{}", lines.join("\n"));
    prop_assert_eq!(&engine.effects, &model.effects, "effects\n{}", lines.join("\n"));
    prop_assert_eq!(engine.dead, model.dead_letters);
    prop_assert_eq!(engine.duplicates, model.duplicates as u64);
    prop_assert_eq!(engine.resent, model.resent_placements as u64);
    Ok(())
}

/// Short horizons so that generated streams cross them often; and the defaults.
fn configs() -> impl Strategy<Value = Config> {
    prop_oneof![
        Just(Config::default()),
        Just(Config { dedup_horizon_ms: 2 * HOUR, line_horizon_ms: 3 * DAY, reorder_point: 2 }),
        Just(Config { dedup_horizon_ms: DAY, line_horizon_ms: DAY, reorder_point: 0 }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn the_engine_agrees_with_the_model(cfg in configs(), events in prop::collection::vec(step_of_stream(), 1..250)) {
        check(&cfg, &render(&events), &[])?;
    }

    #[test]
    fn restarts_anywhere_agree_with_the_model(
        cfg in configs(),
        events in prop::collection::vec(step_of_stream(), 1..200),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 1..4),
    ) {
        let lines = render(&events);
        let cuts: Vec<usize> = cuts.iter().map(|c| c.index(lines.len())).collect();
        check(&cfg, &lines, &cuts)?;
    }
}

#[test]
fn the_issue_poison_records_are_dead_lettered_and_the_shard_goes_on() {
    let lines: Vec<String> = [
        r#"{"id":"p1","type":"order_placed","sku":"S","ts":1795737600000,"qty":9223372036854775807,"order_id":"A"}"#,
        r#"{"id":"p2","type":"order_placed","sku":"S","ts":1795737600001,"qty":9223372036854775807,"order_id":"B"}"#,
        r#"{"id":"p3","type":"order_placed","sku":"S","ts":1795737600002,"qty":2,"order_id":"C"}"#,
        r#"{"id":"c1","type":"order_cancelled","sku":"S","ts":1795737600003,"order_id":"A"}"#,
        r#"{"id":"c2","type":"order_cancelled","sku":"S","ts":1795737600004,"order_id":"B"}"#,
        r#"{"id":"c3","type":"order_cancelled","sku":"S","ts":1795737600005,"order_id":"C"}"#,
        r#"{"id":"r","type":"stock_received","sku":"S","ts":1795737600006,"qty":5}"#,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let run = run_engine(&Config::default(), &lines, &[3]);
    assert_eq!(run.dead, 2);
    assert_eq!(run.skus["S"].0, 5);
    assert_eq!(run.skus["S"].1, 0);
    check(&Config::default(), &lines, &[3]).unwrap();
}
