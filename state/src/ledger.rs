//! The per-SKU ledger: stock, reservations per open order line, average cost and COGS, with
//! exactly the rules of SPEC §2. Pure and synchronous: no I/O, no clocks.

use std::collections::HashMap;

use foldhash::fast::FixedState;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::effects::{
    CountDiscrepancy, Effect, JournalKind, JournalLine, LowStockAlert, OversellAlert, OversellCause, ReorderRequest,
};
use crate::event::{Event, EventBody, Shipped};
use crate::money::Currency;
use crate::store::StoreError;
use crate::windows::{Contribution, OpenWindow, Velocity};

/// Open order lines of a SKU.
pub type Lines = HashMap<Box<str>, Line, FixedState>;

/// An open order line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Line {
    /// Units still reserved.
    pub remaining: i64,
    /// Units shipped while the line was open (used by `shipped_total`).
    pub shipped: i64,
}

/// Everything stockflow knows about one SKU.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SkuState {
    /// Stable per-shard number of the SKU (dedup entries refer to it).
    pub ordinal: u32,
    /// Units physically in stock.
    pub on_hand: i64,
    /// Units reserved by open order lines.
    pub reserved: i64,
    /// Open order lines, by order (line) id. A hash map: hot SKUs hold thousands of open lines.
    pub lines: Lines,
    /// Moving average unit cost.
    pub avg_cost: Decimal,
    /// Currency of `avg_cost`, once a cost was received.
    pub cost_currency: Option<Currency>,
    /// Cost of goods sold booked so far (sum of rounded journal lines).
    pub cogs: Decimal,
    /// Oversell alerts raised.
    pub oversells: u32,
    /// Largest event time applied to this SKU.
    pub max_ts: Option<i64>,
    /// Windows not yet final.
    pub windows: Vec<OpenWindow>,
    /// Units ordered per hour over the last 24 h.
    pub velocity: Velocity,
}

/// What applying one event did, beyond the state and effects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ApplyOutcome {
    /// The event's contribution to its windows.
    pub contribution: Contribution,
    /// A cancellation without an open line.
    pub unmatched: bool,
}

fn times(amount: Decimal, qty: i64) -> Option<Decimal> {
    amount.checked_mul(Decimal::from(qty))
}

impl SkuState {
    /// The storage encoding (postcard: compact and fast).
    pub fn encode(&self) -> Result<Vec<u8>, StoreError> {
        postcard::to_allocvec(self).map_err(|e| StoreError::Corrupt(format!("encoding a SKU state: {e}")))
    }

    /// Decodes [`SkuState::encode`]'s bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, StoreError> {
        postcard::from_bytes(bytes).map_err(|e| StoreError::Corrupt(format!("decoding a SKU state: {e}")))
    }

    /// `on_hand − reserved`.
    pub fn available(&self) -> i64 {
        self.on_hand.saturating_sub(self.reserved)
    }

    /// Sum of the open lines' remaining units (equals `reserved`, an invariant the tests check).
    pub fn open_line_units(&self) -> i64 {
        self.lines.values().map(|l| l.remaining).sum()
    }

    /// Applies one event (already deduplicated) to this SKU, pushing the effects it produces.
    pub fn apply(&mut self, ev: &Event<'_>, reorder_point: i64, effects: &mut Vec<Effect>) -> ApplyOutcome {
        let before = self.available();
        let mut out = ApplyOutcome::default();
        match &ev.body {
            EventBody::OrderPlaced { order_id, qty, unit_price } => {
                let qty = *qty;
                let shortfall = qty.saturating_sub(before.max(0));
                if shortfall > 0 {
                    self.oversells += 1;
                    effects.push(Effect::Oversell(OversellAlert {
                        alert_id: format!("oversell:{}", ev.id),
                        sku: ev.sku.to_string(),
                        order_id: Some(order_id.to_string()),
                        requested: qty,
                        available_before: before,
                        shortfall,
                        cause: OversellCause::Order,
                        ts: ev.ts,
                    }));
                }
                self.reserved = self.reserved.saturating_add(qty);
                match self.lines.get_mut(order_id.as_ref()) {
                    Some(line) => line.remaining = line.remaining.saturating_add(qty),
                    None => {
                        self.lines.insert(order_id.as_ref().into(), Line { remaining: qty, shipped: 0 });
                    }
                }
                self.velocity.record(ev.ts, qty);
                out.contribution = Contribution {
                    ordered: qty.unsigned_abs(),
                    orders: 1,
                    revenue: unit_price.and_then(|p| Some((p.currency, times(p.amount, qty)?))),
                    ..Contribution::default()
                };
            }
            EventBody::OrderCancelled { order_id, qty } => match self.lines.get_mut(order_id.as_ref()) {
                None => out.unmatched = true,
                Some(line) => {
                    let release = qty.unwrap_or(line.remaining).min(line.remaining);
                    self.reserved -= release;
                    line.remaining -= release;
                    if line.remaining == 0 {
                        self.lines.remove(order_id.as_ref());
                    }
                    out.contribution.cancelled = release.unsigned_abs();
                }
            },
            EventBody::OrderShipped { order_id, shipped } => {
                let line = self.lines.get_mut(order_id.as_ref());
                let q = match (shipped, line) {
                    (Shipped::Qty(q), Some(line)) => {
                        let q = q.unwrap_or(line.remaining);
                        line.shipped = line.shipped.saturating_add(q);
                        Some((q, q.min(line.remaining)))
                    }
                    (Shipped::Qty(q), None) => q.map(|q| (q, 0)),
                    (Shipped::Total(total), Some(line)) => {
                        let q = total.saturating_sub(line.shipped);
                        (q > 0).then(|| {
                            line.shipped = *total;
                            (q, q.min(line.remaining))
                        })
                    }
                    (Shipped::Total(total), None) => Some((*total, 0)),
                };
                if let Some((q, release)) = q {
                    if release > 0 {
                        self.reserved -= release;
                        if let Some(line) = self.lines.get_mut(order_id.as_ref()) {
                            line.remaining -= release;
                            if line.remaining == 0 {
                                self.lines.remove(order_id.as_ref());
                            }
                        }
                    }
                    self.on_hand = self.on_hand.saturating_sub(q);
                    self.book_cogs(ev, q, effects);
                    out.contribution.shipped = q.unsigned_abs();
                }
            }
            EventBody::StockReceived { qty, unit_cost } => {
                let before_on_hand = self.on_hand;
                self.on_hand = self.on_hand.saturating_add(*qty);
                if let Some(cost) = unit_cost {
                    let same_currency = self.cost_currency.is_none_or(|c| c == cost.currency);
                    let averaged = (before_on_hand >= 0 && same_currency)
                        .then(|| {
                            let value = times(self.avg_cost, before_on_hand)?.checked_add(times(cost.amount, *qty)?)?;
                            value.checked_div(Decimal::from(before_on_hand.saturating_add(*qty)))
                        })
                        .flatten();
                    self.avg_cost = averaged.unwrap_or(cost.amount);
                    self.cost_currency = Some(cost.currency);
                    if let Some(amount) = times(cost.amount, *qty).map(|a| cost.currency.round(a))
                        && !amount.is_zero()
                    {
                        effects.push(Effect::Journal(JournalLine {
                            entry_id: format!("inventory:{}", ev.id),
                            sku: ev.sku.to_string(),
                            kind: JournalKind::InventoryReceipt,
                            qty: *qty,
                            unit_cost: cost.amount,
                            amount,
                            currency: cost.currency,
                            ts: ev.ts,
                        }));
                    }
                }
            }
            EventBody::StockAdjusted { delta } => self.on_hand = self.on_hand.saturating_add(*delta),
            EventBody::StockCounted { on_hand } => {
                let discrepancy = on_hand.saturating_sub(self.on_hand);
                if discrepancy != 0 {
                    effects.push(Effect::Discrepancy(CountDiscrepancy {
                        id: format!("count:{}", ev.id),
                        sku: ev.sku.to_string(),
                        expected: self.on_hand,
                        counted: *on_hand,
                        discrepancy,
                        ts: ev.ts,
                    }));
                }
                self.on_hand = *on_hand;
                let after = self.available();
                if before >= 0 && after < 0 {
                    self.oversells += 1;
                    effects.push(Effect::Oversell(OversellAlert {
                        alert_id: format!("oversell:{}", ev.id),
                        sku: ev.sku.to_string(),
                        order_id: None,
                        requested: self.reserved,
                        available_before: before,
                        shortfall: after.saturating_neg(),
                        cause: OversellCause::Count,
                        ts: ev.ts,
                    }));
                }
            }
        }
        let after = self.available();
        if reorder_point > 0 && before > reorder_point && after <= reorder_point {
            effects.push(Effect::LowStock(LowStockAlert {
                alert_id: format!("low_stock:{}", ev.id),
                sku: ev.sku.to_string(),
                available: after,
                reorder_point,
                ts: ev.ts,
            }));
            effects.push(Effect::Reorder(ReorderRequest {
                request_id: format!("reorder:{}", ev.id),
                sku: ev.sku.to_string(),
                available: after,
                reorder_point,
                units_ordered_24h: self.velocity.units_24h(),
                ts: ev.ts,
            }));
        }
        out
    }

    fn book_cogs(&mut self, ev: &Event<'_>, q: i64, effects: &mut Vec<Effect>) {
        let Some(currency) = self.cost_currency else { return };
        let Some(amount) = times(self.avg_cost, q).map(|a| currency.round(a)) else { return };
        if amount.is_zero() {
            return;
        }
        self.cogs = self.cogs.saturating_add(amount);
        effects.push(Effect::Journal(JournalLine {
            entry_id: format!("cogs:{}", ev.id),
            sku: ev.sku.to_string(),
            kind: JournalKind::Cogs,
            qty: q,
            unit_cost: self.avg_cost,
            amount,
            currency,
            ts: ev.ts,
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::decode;

    fn run(state: &mut SkuState, events: &[&str]) -> Vec<Effect> {
        let mut fx = Vec::new();
        for e in events {
            state.apply(&decode(e.as_bytes()).unwrap(), 0, &mut fx);
        }
        fx
    }

    fn ev(id: &str, body: &str) -> String {
        format!(r#"{{"id":"{id}","sku":"S","ts":1000,{body}}}"#)
    }

    #[test]
    fn oversell_reserves_anyway_and_alerts_with_the_shortfall() {
        let mut s = SkuState::default();
        let fx = run(
            &mut s,
            &[
                &ev("r", r#""type":"stock_received","qty":3"#),
                &ev("p1", r#""type":"order_placed","order_id":"o1","qty":2"#),
                &ev("p2", r#""type":"order_placed","order_id":"o2","qty":4"#),
            ],
        );
        assert_eq!((s.on_hand, s.reserved, s.available()), (3, 6, -3));
        let [Effect::Oversell(a)] = fx.as_slice() else { panic!("{fx:?}") };
        assert_eq!((a.alert_id.as_str(), a.requested, a.available_before, a.shortfall), ("oversell:p2", 4, 1, 3));
        // A further order with available < 0 is short by its whole quantity.
        let fx = run(&mut s, &[&ev("p3", r#""type":"order_placed","order_id":"o3","qty":1"#)]);
        let [Effect::Oversell(a)] = fx.as_slice() else { panic!("{fx:?}") };
        assert_eq!((a.available_before, a.shortfall), (-3, 1));
        assert_eq!(s.oversells, 2);
    }

    #[test]
    fn cancel_and_ship_release_their_line() {
        let mut s = SkuState::default();
        run(
            &mut s,
            &[
                &ev("r", r#""type":"stock_received","qty":10"#),
                &ev("p", r#""type":"order_placed","order_id":"o","qty":5"#),
                &ev("c", r#""type":"order_cancelled","order_id":"o","qty":2"#),
                &ev("s", r#""type":"order_shipped","order_id":"o","qty":1"#),
            ],
        );
        assert_eq!((s.on_hand, s.reserved, s.lines["o"].remaining), (9, 2, 2));
        run(&mut s, &[&ev("s2", r#""type":"order_shipped","order_id":"o""#)]);
        assert_eq!((s.on_hand, s.reserved), (7, 0));
        assert!(s.lines.is_empty());
        let mut fx = Vec::new();
        let out =
            s.apply(&decode(ev("c2", r#""type":"order_cancelled","order_id":"o""#).as_bytes()).unwrap(), 0, &mut fx);
        assert!(out.unmatched);
        assert_eq!((s.on_hand, s.reserved), (7, 0));
    }

    #[test]
    fn shipped_total_ships_only_the_increase() {
        let mut s = SkuState::default();
        run(
            &mut s,
            &[
                &ev("r", r#""type":"stock_received","qty":10"#),
                &ev("p", r#""type":"order_placed","order_id":"o","qty":3"#),
                &ev("t1", r#""type":"order_shipped","order_id":"o","shipped_total":1"#),
                &ev("t1b", r#""type":"order_shipped","order_id":"o","shipped_total":1"#),
            ],
        );
        assert_eq!((s.on_hand, s.reserved, s.lines["o"].shipped), (9, 2, 1));
        run(&mut s, &[&ev("t3", r#""type":"order_shipped","order_id":"o","shipped_total":3"#)]);
        assert_eq!((s.on_hand, s.reserved), (7, 0));
        // Without an open line, shipped_total ships that many.
        run(&mut s, &[&ev("x", r#""type":"order_shipped","order_id":"other","shipped_total":2"#)]);
        assert_eq!((s.on_hand, s.reserved), (5, 0));
    }

    #[test]
    fn moving_average_cost_and_cogs_rounded_half_even() {
        let mut s = SkuState::default();
        let fx = run(
            &mut s,
            &[
                &ev("r1", r#""type":"stock_received","qty":2,"unit_cost":"1.00","currency":"USD""#),
                &ev("r2", r#""type":"stock_received","qty":1,"unit_cost":"2.00","currency":"USD""#),
                &ev("s", r#""type":"order_shipped","order_id":"o","qty":1"#),
            ],
        );
        // avg = (2·1 + 1·2) / 3 = 1.333…; COGS of 1 unit rounds to 1.33.
        assert_eq!(s.avg_cost.round_dp(4).to_string(), "1.3333");
        assert_eq!(s.cogs.to_string(), "1.33");
        let amounts: Vec<String> = fx
            .iter()
            .map(|e| match e {
                Effect::Journal(j) => format!("{}:{}", j.entry_id, j.amount),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(amounts, ["inventory:r1:2.00", "inventory:r2:2.00", "cogs:s:1.33"]);
        // Receiving while on hand is negative restarts the average at the new cost.
        let mut s = SkuState::default();
        run(
            &mut s,
            &[
                &ev("a", r#""type":"stock_adjusted","delta":-5"#),
                &ev("r", r#""type":"stock_received","qty":2,"unit_cost":"3.50","currency":"USD""#),
            ],
        );
        assert_eq!(s.avg_cost.to_string(), "3.50");
    }

    #[test]
    fn count_sets_on_hand_and_alerts_when_available_goes_negative() {
        let mut s = SkuState::default();
        let fx = run(
            &mut s,
            &[
                &ev("r", r#""type":"stock_received","qty":5"#),
                &ev("p", r#""type":"order_placed","order_id":"o","qty":4"#),
                &ev("k", r#""type":"stock_counted","on_hand":2"#),
            ],
        );
        assert_eq!((s.on_hand, s.available()), (2, -2));
        let kinds: Vec<_> = fx.iter().map(|e| e.id().to_string()).collect();
        assert_eq!(kinds, ["count:k", "oversell:k"]);
        let Effect::Oversell(a) = &fx[1] else { panic!() };
        assert_eq!((a.cause, a.shortfall, a.available_before), (OversellCause::Count, 2, 1));
    }

    #[test]
    fn extreme_quantities_saturate_instead_of_overflowing() {
        let mut s = SkuState::default();
        let big = i64::MAX;
        run(
            &mut s,
            &[
                &ev("a", &format!(r#""type":"stock_adjusted","delta":{}"#, -big)),
                &ev("b", &format!(r#""type":"stock_adjusted","delta":{}"#, -big)),
                &ev("k", r#""type":"stock_counted","on_hand":5"#),
                &ev("p", &format!(r#""type":"order_placed","order_id":"o","qty":{big}"#)),
                &ev("r", &format!(r#""type":"stock_received","qty":{big},"unit_cost":"1","currency":"USD""#)),
            ],
        );
        assert_eq!(s.on_hand, big);
        assert_eq!(s.reserved, big);
    }

    #[test]
    fn low_stock_is_edge_triggered() {
        let mut s = SkuState::default();
        let mut fx = Vec::new();
        let apply = |s: &mut SkuState, fx: &mut Vec<Effect>, e: String| {
            s.apply(&decode(e.as_bytes()).unwrap(), 3, fx);
        };
        apply(&mut s, &mut fx, ev("r", r#""type":"stock_received","qty":5"#));
        apply(&mut s, &mut fx, ev("p1", r#""type":"order_placed","order_id":"a","qty":2"#));
        apply(&mut s, &mut fx, ev("p2", r#""type":"order_placed","order_id":"b","qty":1"#));
        let ids: Vec<_> = fx.iter().map(|e| e.id().to_string()).collect();
        assert_eq!(ids, ["low_stock:p1", "reorder:p1"]);
    }
}
