//! Streams that look like weeks: order lifecycles over days, as a seller's consumer meets them.
//!
//! An order is placed, re-notified with the same id (Amazon re-sends the whole order on every
//! status change: Pending → Unshipped, address changes), shipped one to five days later — partly
//! first for some, as cumulative `shipped_total` — and now and then re-notified again weeks later
//! (placed and shipped, same ids), past the dedup horizon and inside the line horizon. Some orders
//! are cancelled before they ship. Receipts are re-sent by the manufacturer's webhook within three
//! days (the same document, byte for byte). One SKU, a pre-order, piles up open lines that ship
//! only after three weeks. Counts, adjustments, byte-identical duplicates, stragglers and bad
//! records as in [`crate::loadtest::generate`]. Records are in arrival order: a follow-up is emitted at the
//! first slot at or after its due time, with its due time as event time. The same seed always
//! gives the same bytes.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::Write;

use crate::loadtest::generate::{GenConfig, Rng, Stream, order_size};

const MINUTE: i64 = 60_000;
const HOUR: i64 = 60 * MINUTE;
const DAY: i64 = 24 * HOUR;

/// What a due follow-up emits.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum FollowUp {
    /// The placement again, same id (a status-change notification).
    Renotify { order: u64 },
    /// A shipment bringing the line's cumulative shipped units to `total`.
    Ship { order: u64, total: i64 },
    /// The whole line cancelled.
    Cancel { order: u64 },
    /// Weeks later: the placement again, same id; its shipment follows in the next slot.
    LateRenotify { order: u64 },
    /// A shipment notification re-sent (same id): nothing more ships.
    ShipAgain { order: u64 },
    /// A receipt webhook re-sent: record `index` again, byte for byte.
    Resend { index: usize },
}

#[derive(Debug, Clone, Copy)]
struct Order {
    sku: u32,
    qty: i64,
    shipped: i64,
}

/// Share of new events (not follow-ups) that are placements, receipts, adjustments; the rest counts.
const PLACE: f64 = 0.80;
const RECEIVE: f64 = 0.10;
const ADJUST: f64 = 0.05;

/// Generates a lifecycle stream described by `cfg` (its hour weights span the days).
pub fn generate(cfg: &GenConfig) -> Stream {
    let mut rng = Rng::new(cfg.seed);
    let mut out = Stream::with_skus(cfg);
    let zipf = out.zipf(cfg);
    let total_weight: f64 = zipf.weights.iter().sum();
    let price = |sku: u32| 5 + i64::from(sku % 45);
    let preorder = (cfg.skus as u32).saturating_sub(1);
    let body_events = cfg.events.saturating_sub(cfg.skus);
    // New events are ~1/2.6 of the records (each placement brings ~2 follow-ups).
    let placements = body_events as f64 / 2.6 * PLACE;

    // Units on hand per SKU, as the generator believes (what its counts report, ± 2).
    let mut on_hand = vec![0i64; cfg.skus];
    for (sku, (held, weight)) in on_hand.iter_mut().zip(&zipf.weights).enumerate() {
        if out.len() >= cfg.events {
            break;
        }
        let sku = sku as u32;
        // Opening stock: ~10 days of the SKU's demand (1.5 units an order).
        let demand = placements * 1.5 * weight / total_weight;
        let n = (demand * 10.0 / 28.0).ceil() as i64 + 5;
        *held = n;
        let ts = cfg.start_ts;
        out.emit(sku, |b| {
            let _ = write!(
                b,
                r#"{{"id":"cnt:open:{sku}","type":"stock_counted","sku":"SKU-{sku:05}","ts":{ts},"on_hand":{n},"source":"fc-report"}}"#
            );
        });
    }

    let mut orders: std::collections::HashMap<u64, Order> = std::collections::HashMap::new();
    let mut due: BinaryHeap<Reverse<(i64, u64, FollowUp)>> = BinaryHeap::new();
    let mut tie = 0u64;
    let mut schedule = |due: &mut BinaryHeap<Reverse<(i64, u64, FollowUp)>>, at: i64, f: FollowUp| {
        tie += 1;
        due.push(Reverse((at, tie, f)));
    };
    let mut next_order = 1u64;
    let mut seq = 0u64;
    let order_id = |o: u64| format!("114-{:07}-{:07}:1", o / 10_000_000, o % 10_000_000);

    let hours = cfg.hour_weights.len().max(1);
    let total_hours: f64 = cfg.hour_weights.iter().map(|w| w.max(0.0)).sum::<f64>().max(f64::MIN_POSITIVE);
    let mut produced = 0usize;
    let mut cumulative = 0.0;
    for h in 0..hours {
        out.hour_starts.push(out.len());
        cumulative += cfg.hour_weights.get(h).copied().unwrap_or(1.0).max(0.0);
        let n_hour = if h == hours - 1 {
            body_events - produced
        } else {
            ((body_events as f64 * cumulative / total_hours).round() as usize).min(body_events) - produced
        };
        produced += n_hour;
        let hour_start = cfg.start_ts + h as i64 * HOUR;
        for i in 0..n_hour {
            seq += 1;
            let slot_ts = hour_start + (i as i64 * HOUR) / n_hour.max(1) as i64 + rng.below(2000) as i64;
            // A follow-up that is due goes first.
            if due.peek().is_some_and(|Reverse((at, _, _))| *at <= slot_ts) {
                let Some(Reverse((at, _, f))) = due.pop() else { continue };
                match f {
                    // Orders are inserted before any follow-up of theirs is scheduled and never
                    // removed, so the look-ups below always find them.
                    FollowUp::Renotify { order } => {
                        let Some(&o) = orders.get(&order) else { continue };
                        let id = order_id(order);
                        emit_placed(&mut out, o.sku, &id, at, o.qty, price(o.sku));
                    }
                    FollowUp::Ship { order, total } => {
                        let Some(o) = orders.get_mut(&order) else { continue };
                        add(&mut on_hand, o.sku, o.shipped - total);
                        o.shipped = total;
                        let (sku, id) = (o.sku, order_id(order));
                        emit_shipped(&mut out, sku, &id, at, total);
                    }
                    FollowUp::Cancel { order } => {
                        let Some(&o) = orders.get(&order) else { continue };
                        let id = order_id(order);
                        out.emit(o.sku, |b| {
                            let _ = write!(
                                b,
                                r#"{{"id":"ord:{id}:cancelled","type":"order_cancelled","sku":"SKU-{sku:05}","ts":{at},"order_id":"{id}"}}"#,
                                sku = o.sku
                            );
                        });
                    }
                    FollowUp::LateRenotify { order } => {
                        let Some(&o) = orders.get(&order) else { continue };
                        let id = order_id(order);
                        emit_placed(&mut out, o.sku, &id, at, o.qty, price(o.sku));
                        if o.shipped > 0 {
                            schedule(&mut due, at, FollowUp::ShipAgain { order });
                        }
                    }
                    FollowUp::ShipAgain { order } => {
                        let Some(&o) = orders.get(&order) else { continue };
                        emit_shipped(&mut out, o.sku, &order_id(order), at, o.shipped);
                    }
                    FollowUp::Resend { index } => out.repeat(index),
                }
                continue;
            }
            let mut ts = slot_ts;
            if rng.unit() < 0.002 {
                ts -= 10 * MINUTE; // a straggler: late for its minute window
            }
            let r = rng.unit();
            if r < cfg.duplicate_rate && out.len() > 1 {
                let back = 1 + rng.below(out.len().min(1000) as u64) as usize;
                out.repeat(out.len() - back);
                continue;
            }
            if r < cfg.duplicate_rate + cfg.bad_rate {
                let sku = zipf.pick(&mut rng);
                out.emit(sku, |b| {
                    let _ = write!(
                        b,
                        r#"{{"id":"bad:{seq}","type":"order_placed","sku":"SKU-{sku:05}","ts":{ts},"qty":0,"order_id":"x-{seq}"}}"#
                    );
                });
                continue;
            }
            let k = rng.unit();
            if k < PLACE {
                let is_preorder = rng.unit() < 0.02;
                let sku = if is_preorder { preorder } else { zipf.pick(&mut rng) };
                let qty = order_size(&mut rng);
                let order = next_order;
                next_order += 1;
                orders.insert(order, Order { sku, qty, shipped: 0 });
                emit_placed(&mut out, sku, &order_id(order), ts, qty, price(sku));
                if rng.unit() < 0.7 {
                    schedule(
                        &mut due,
                        ts + 10 * MINUTE + rng.below(36 * HOUR as u64) as i64,
                        FollowUp::Renotify { order },
                    );
                }
                if !is_preorder && rng.unit() < 0.05 {
                    schedule(&mut due, ts + HOUR + rng.below(47 * HOUR as u64) as i64, FollowUp::Cancel { order });
                    continue;
                }
                let ship_at = if is_preorder {
                    ts + 20 * DAY + rng.below(7 * DAY as u64) as i64
                } else {
                    ts + DAY + rng.below(4 * DAY as u64) as i64
                };
                let mut last = ship_at;
                if qty >= 2 && rng.unit() < 0.3 {
                    let first = 1 + rng.below((qty - 1) as u64) as i64;
                    schedule(&mut due, ship_at, FollowUp::Ship { order, total: first });
                    last = ship_at + 6 * HOUR + rng.below(42 * HOUR as u64) as i64;
                    schedule(&mut due, last, FollowUp::Ship { order, total: qty });
                } else {
                    schedule(&mut due, ship_at, FollowUp::Ship { order, total: qty });
                }
                if rng.unit() < 0.08 {
                    schedule(
                        &mut due,
                        last + 7 * DAY + rng.below(23 * DAY as u64) as i64,
                        FollowUp::LateRenotify { order },
                    );
                }
            } else if k < PLACE + RECEIVE {
                let sku = zipf.pick(&mut rng);
                let qty = 6 + rng.below(15) as i64;
                add(&mut on_hand, sku, qty);
                let cost = price(sku) * 40;
                let index = out.len();
                out.emit(sku, |b| {
                    let _ = write!(
                        b,
                        r#"{{"id":"rcv:{seq}","type":"stock_received","sku":"SKU-{sku:05}","ts":{ts},"qty":{qty},"unit_cost":"{}.{:02}","currency":"USD"}}"#,
                        cost / 100,
                        cost % 100
                    );
                });
                if rng.unit() < 0.1 {
                    schedule(&mut due, ts + MINUTE + rng.below(3 * DAY as u64) as i64, FollowUp::Resend { index });
                }
            } else if k < PLACE + RECEIVE + ADJUST {
                let sku = zipf.pick(&mut rng);
                let delta = if rng.below(2) == 0 { -1 - rng.below(3) as i64 } else { 1 + rng.below(3) as i64 };
                add(&mut on_hand, sku, delta);
                out.emit(sku, |b| {
                    let _ = write!(
                        b,
                        r#"{{"id":"adj:{seq}","type":"stock_adjusted","sku":"SKU-{sku:05}","ts":{ts},"delta":{delta},"reason":"damaged"}}"#
                    );
                });
            } else {
                let sku = zipf.pick(&mut rng);
                let held = on_hand.get(sku as usize).copied().unwrap_or(0);
                let counted = (held + rng.below(5) as i64 - 2).max(0);
                add(&mut on_hand, sku, counted - held);
                out.emit(sku, |b| {
                    let _ = write!(
                        b,
                        r#"{{"id":"cnt:{seq}","type":"stock_counted","sku":"SKU-{sku:05}","ts":{ts},"on_hand":{counted}}}"#
                    );
                });
            }
        }
    }
    out
}

/// Moves the generator's belief of a SKU's stock by `delta`.
fn add(on_hand: &mut [i64], sku: u32, delta: i64) {
    if let Some(held) = on_hand.get_mut(sku as usize) {
        *held += delta;
    }
}

fn emit_placed(out: &mut Stream, sku: u32, id: &str, ts: i64, qty: i64, price: i64) {
    out.emit(sku, |b| {
        let _ = write!(
            b,
            r#"{{"id":"ord:{id}:placed","type":"order_placed","sku":"SKU-{sku:05}","ts":{ts},"qty":{qty},"order_id":"{id}","unit_price":"{price}.99","currency":"USD"}}"#
        );
    });
}

fn emit_shipped(out: &mut Stream, sku: u32, id: &str, ts: i64, total: i64) {
    out.emit(sku, |b| {
        let _ = write!(
            b,
            r#"{{"id":"ord:{id}:shipped:{total}","type":"order_shipped","sku":"SKU-{sku:05}","ts":{ts},"order_id":"{id}","shipped_total":{total}}}"#
        );
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifecycles_span_days_and_re_send_past_the_dedup_horizon() {
        let cfg = GenConfig { events: 60_000, skus: 300, hour_weights: vec![1.0; 28 * 24], ..GenConfig::default() };
        let a = generate(&cfg);
        let b = generate(&cfg);
        assert!(a.iter().zip(b.iter()).all(|(x, y)| x == y), "deterministic");
        assert_eq!(a.len(), 60_000);
        // Placement ids seen more than 7 days apart: re-sends the dedup horizon no longer covers.
        let mut first: std::collections::HashMap<String, i64> = std::collections::HashMap::new();
        let (mut late, mut soon) = (0, 0);
        for (_, p) in a.iter() {
            let Ok(ev) = stockflow_state::decode(p) else { continue };
            if !ev.id.ends_with(":placed") {
                continue;
            }
            match first.get(ev.id.as_ref()) {
                Some(t) if ev.ts - t > 7 * DAY => late += 1,
                Some(_) => soon += 1,
                None => {
                    first.insert(ev.id.to_string(), ev.ts);
                }
            }
        }
        assert!(late > 50 && soon > 1000, "{late} late re-sends, {soon} within the horizon");
        // The pre-order SKU piles up open lines.
        let engine = std::sync::Arc::new(stockflow_state::EngineConfig::default());
        let out = stockflow_state::reference::straight_pass(engine, a.iter().map(|(_, p)| p));
        let pre = out.skus.iter().find(|s| s.sku == "SKU-00299").unwrap();
        assert!(pre.reserved > 100, "{pre:?}");
    }
}
