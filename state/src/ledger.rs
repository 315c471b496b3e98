//! The per-SKU ledger: stock, reservations per order line, average cost and COGS, with exactly
//! the rules of SPEC §2 (v2). Pure and synchronous: no I/O, no clocks.
//!
//! **Order lines** are keyed by a 64-bit hash of their `order_id` ([`line_key`]); a line is open
//! while units remain, and once closed it is remembered (with its `shipped` count) for the line
//! horizon, so that a re-sent placement or shipment days later changes nothing. An entry is
//! 20 bytes ([`Lines`]); lookups treat an expired closed line as absent, and a sweep when the
//! SKU's event time enters a new day frees them.
//!
//! **Arithmetic is explicit** (`clippy::arithmetic_side_effects` is denied here): quantities are
//! exact within SPEC §1's bounds and saturate beyond; money is exact (see [`crate::money`]); a
//! record whose money cannot be booked within the limits is refused with [`ApplyError`] before
//! anything changes, and the caller dead-letters it.
//!
//! Longer than most files here on purpose: the rules are one unit (about 480 lines) and their
//! unit tests, one per SPEC rule, sit next to them.

#![deny(clippy::arithmetic_side_effects)]

mod lines;

pub use lines::Lines;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::effects::{
    CountDiscrepancy, Effect, JournalKind, JournalLine, LowStockAlert, OversellAlert, OversellCause, ReorderRequest,
};
use crate::event::{Event, EventBody, Shipped};
use crate::money::{self, Currency};
use crate::store::StoreError;
use crate::windows::{Contribution, OpenWindow, Velocity};

/// The key of an order line: a 64-bit hash of its `order_id` (two of one SKU's lines collide
/// with probability ~n²/2⁶⁵: below 10⁻⁹ for 200,000 lines).
pub fn line_key(order_id: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(order_id.as_bytes())
}

/// An order line: open while `remaining > 0`, then closed and remembered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Line {
    /// Units still reserved (0: closed).
    pub remaining: u32,
    /// Units shipped: while open, by `qty` or `shipped_total`; once closed, by `shipped_total`.
    pub shipped: u32,
    /// Event time the line closed (meaningful when `remaining == 0`).
    pub closed_ts: i64,
}

impl Line {
    /// True while units remain reserved.
    pub fn is_open(&self) -> bool {
        self.remaining > 0
    }

    /// Releases up to `wanted` units of the line's reservation at event time `ts` (closing it, and
    /// starting its memory, when none remain); returns the units released.
    fn release(&mut self, wanted: i64, ts: i64) -> i64 {
        let remaining = i64::from(self.remaining);
        let released = wanted.clamp(0, remaining);
        self.remaining = units(remaining.saturating_sub(released));
        if released > 0 && !self.is_open() {
            self.closed_ts = ts;
        }
        released
    }
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
    /// Order lines, open and remembered. A hash map: hot SKUs hold 100,000s of lines.
    pub lines: Lines,
    /// Moving average unit cost (rounded half to even to 10 places).
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

/// The SKU-specific parameters of the rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SkuRules {
    /// Low-stock alerts fire when `available` crosses down to this (0 = off).
    pub reorder_point: i64,
    /// How long a closed order line is remembered, in ms of the SKU's event time.
    pub line_horizon_ms: i64,
}

/// What applying one event did, beyond the state and effects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ApplyOutcome {
    /// The event's contribution to its windows.
    pub contribution: Contribution,
    /// A cancellation without an open line.
    pub unmatched: bool,
    /// A placement of a line that exists (open or remembered): nothing changed.
    pub resent: bool,
    /// The order line the event created or changed (its [`line_key`]).
    pub line: Option<u64>,
    /// The event moved the SKU's time into a new day and closed lines expired at this event time
    /// were forgotten ([`SkuState::forget_lines`]).
    pub swept: Option<i64>,
}

/// Why a valid event cannot be applied to the SKU's state (permanent: dead-letter the record).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("field `{field}`: {reason}")]
pub struct ApplyError {
    /// The field to blame.
    pub field: &'static str,
    /// What cannot be done.
    pub reason: String,
}

const DAY_MS: i64 = 86_400_000;

/// Magic prefix of the versioned encoding: five 0xFF bytes never begin a valid v1 encoding
/// (its first field is a `u32` varint, at most five bytes, the fifth without a continuation bit).
const MAGIC: [u8; 5] = [0xFF; 5];
/// The encoding with every order line inside (SPEC v2 order lines): stores that rewrite a SKU's
/// state whole (DynamoDB).
const VERSION: u8 = 2;
/// The same layout with the order lines kept apart (their map is empty here): stores that append
/// line changes to a log of their own (the embedded store, [`crate::linelog`]).
const VERSION_APART: u8 = 3;

/// An effect's id: its kind's prefix and the event's id, in one allocation of the exact size
/// (`format!` grew its buffer on the way: an extra allocation per effect).
fn effect_id(prefix: &str, id: &str) -> String {
    let mut s = String::with_capacity(prefix.len().saturating_add(id.len()));
    s.push_str(prefix);
    s.push_str(id);
    s
}

fn units(v: i64) -> u32 {
    u32::try_from(v.max(0)).unwrap_or(u32::MAX)
}

impl SkuState {
    /// The storage encoding: a versioned postcard document (compact and fast).
    pub fn encode(&self) -> Result<Vec<u8>, StoreError> {
        let mut out = Vec::with_capacity(64);
        self.encode_into(&mut out)?;
        Ok(out)
    }

    /// [`SkuState::encode`], appended to `out` (left as it was on an error).
    pub fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), StoreError> {
        Self::encode_with(out, VERSION, |out| postcard::to_io(self, out).map(drop))
    }

    /// The encoding without the order lines, which the store keeps apart
    /// ([`crate::linelog`]): what one commit writes for a SKU stays the size of its scalars and
    /// windows, however many lines a hot SKU remembers. (The lines are set aside for the call:
    /// moving the map out and back costs nothing.)
    pub fn encode_head(&mut self) -> Result<Vec<u8>, StoreError> {
        let mut out = Vec::with_capacity(64);
        self.encode_head_into(&mut out)?;
        Ok(out)
    }

    /// [`SkuState::encode_head`], appended to `out` (left as it was on an error).
    pub fn encode_head_into(&mut self, out: &mut Vec<u8>) -> Result<(), StoreError> {
        let lines = std::mem::take(&mut self.lines);
        let encoded = Self::encode_with(out, VERSION_APART, |out| postcard::to_io(&*self, out).map(drop));
        self.lines = lines;
        encoded
    }

    fn encode_with(
        out: &mut Vec<u8>,
        version: u8,
        body: impl FnOnce(&mut Vec<u8>) -> postcard::Result<()>,
    ) -> Result<(), StoreError> {
        let start = out.len();
        out.extend_from_slice(&MAGIC);
        out.push(version);
        body(out).map_err(|e| {
            out.truncate(start);
            StoreError::Corrupt(format!("encoding a SKU state: {e}"))
        })
    }

    /// True for [`SkuState::encode_head`]'s bytes: the order lines are elsewhere.
    pub fn lines_apart(bytes: &[u8]) -> bool {
        matches!(bytes.strip_prefix(&MAGIC), Some([VERSION_APART, ..]))
    }

    /// Decodes [`SkuState::encode`]'s or [`SkuState::encode_head`]'s bytes (the latter without
    /// lines: the caller adds them), and upgrades what stockflow wrote before SPEC v2
    /// (unversioned; lines by order id): see [`v1`].
    pub fn decode(bytes: &[u8]) -> Result<Self, StoreError> {
        match bytes.strip_prefix(&MAGIC) {
            Some([VERSION | VERSION_APART, rest @ ..]) => {
                postcard::from_bytes(rest).map_err(|e| StoreError::Corrupt(format!("decoding a SKU state: {e}")))
            }
            Some(other) => Err(StoreError::Corrupt(format!(
                "SKU state encoding version {:?} is newer than this stockflow understands (≤ {VERSION_APART}): upgrade stockflow",
                other.first()
            ))),
            None => v1::decode(bytes),
        }
    }

    /// `on_hand − reserved`.
    pub fn available(&self) -> i64 {
        self.on_hand.saturating_sub(self.reserved)
    }

    /// Sum of the open lines' remaining units (equals `reserved`, an invariant the tests check).
    pub fn open_line_units(&self) -> i64 {
        self.lines.values().fold(0i64, |acc, l| acc.saturating_add(i64::from(l.remaining)))
    }

    /// Number of open lines.
    pub fn open_lines(&self) -> usize {
        self.lines.values().filter(|l| l.is_open()).count()
    }

    /// The line of an order, if it exists: open, or closed and still remembered at event time
    /// `last` (the SKU's largest event time before the event looking it up).
    fn live_line(&self, key: u64, last: Option<i64>, horizon: i64) -> Option<Line> {
        let line = self.lines.get(key)?;
        let live = line.is_open() || last.is_none_or(|l| line.closed_ts.saturating_add(horizon) >= l);
        live.then_some(line)
    }

    /// Applies one event (already deduplicated) to this SKU, pushing the effects it produces and
    /// moving the SKU's event time. On `Err` nothing changed.
    pub fn apply(
        &mut self,
        ev: &Event<'_>,
        rules: &SkuRules,
        effects: &mut Vec<Effect>,
    ) -> Result<ApplyOutcome, ApplyError> {
        let before = self.available();
        let last = self.max_ts;
        let horizon = rules.line_horizon_ms;
        let mut out = ApplyOutcome::default();
        match &ev.body {
            EventBody::OrderPlaced { order_id, qty, unit_price } => {
                let key = line_key(order_id);
                if self.live_line(key, last, horizon).is_some() {
                    out.resent = true;
                } else {
                    let qty = *qty;
                    let shortfall = qty.saturating_sub(before.max(0));
                    if shortfall > 0 {
                        self.oversells = self.oversells.saturating_add(1);
                        effects.push(Effect::Oversell(OversellAlert {
                            alert_id: effect_id("oversell:", &ev.id),
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
                    self.lines.insert(key, Line { remaining: units(qty), shipped: 0, closed_ts: 0 });
                    out.line = Some(key);
                    self.velocity.record(ev.ts, qty);
                    out.contribution = Contribution {
                        ordered: qty.unsigned_abs(),
                        orders: 1,
                        revenue: unit_price.and_then(|p| Some((p.currency, p.amount.checked_mul(Decimal::from(qty))?))),
                        ..Contribution::default()
                    };
                }
            }
            EventBody::OrderCancelled { order_id, qty } => {
                let key = line_key(order_id);
                let released = self.lines.modify(key, |line| {
                    line.is_open().then(|| line.release(qty.unwrap_or(i64::from(line.remaining)), ev.ts))
                });
                match released.flatten() {
                    Some(released) => {
                        self.reserved = self.reserved.saturating_sub(released);
                        out.contribution.cancelled = released.unsigned_abs();
                        out.line = Some(key);
                    }
                    _ => out.unmatched = true,
                }
            }
            EventBody::OrderShipped { order_id, shipped } => {
                let key = line_key(order_id);
                let line = self.live_line(key, last, horizon);
                // (units shipped, the line with its `shipped` count updated); a line that does
                // not exist is created closed, remembered from now.
                let step = match (shipped, line) {
                    (Shipped::Qty(q), Some(line)) => {
                        let q = q.unwrap_or(i64::from(line.remaining));
                        let shipped = if line.is_open() { line.shipped.saturating_add(units(q)) } else { line.shipped };
                        (q > 0).then_some((q, Line { shipped, ..line }))
                    }
                    (Shipped::Qty(q), None) => {
                        q.filter(|q| *q > 0).map(|q| (q, Line { remaining: 0, shipped: units(q), closed_ts: ev.ts }))
                    }
                    (Shipped::Total(total), Some(line)) => {
                        let q = total.saturating_sub(i64::from(line.shipped));
                        (q > 0).then_some((q, Line { shipped: units(*total), ..line }))
                    }
                    (Shipped::Total(total), None) => {
                        Some((*total, Line { remaining: 0, shipped: units(*total), closed_ts: ev.ts }))
                    }
                };
                if let Some((q, mut line)) = step {
                    let journal = self.cogs_line(ev, q)?;
                    let released = line.release(q, ev.ts);
                    self.reserved = self.reserved.saturating_sub(released);
                    self.lines.insert(key, line);
                    out.line = Some(key);
                    self.on_hand = self.on_hand.saturating_sub(q);
                    if let Some(j) = journal {
                        self.cogs = money::add_capped(self.cogs, j.amount);
                        effects.push(Effect::Journal(j));
                    }
                    out.contribution.shipped = q.unsigned_abs();
                }
            }
            EventBody::StockReceived { qty, unit_cost } => {
                let before_on_hand = self.on_hand;
                let costed = match unit_cost {
                    None => None,
                    Some(cost) => {
                        let same_currency = self.cost_currency.is_none_or(|c| c == cost.currency);
                        let avg = if before_on_hand >= 0 && same_currency {
                            money::average_cost(before_on_hand, self.avg_cost, *qty, cost.amount)
                        } else {
                            money::round_cost(cost.amount)
                        };
                        let refuse = |what: &str| ApplyError {
                            field: "unit_cost",
                            reason: format!("{what} exceeds what stockflow books (see docs/state.md, money limits)"),
                        };
                        let avg = avg.ok_or_else(|| refuse("the average cost (limit 10^18)"))?;
                        let amount = money::line_amount(cost.amount, *qty, cost.currency)
                            .ok_or_else(|| refuse("qty × unit_cost (limit 10^20)"))?;
                        Some((cost, avg, amount))
                    }
                };
                self.on_hand = self.on_hand.saturating_add(*qty);
                if let Some((cost, avg, amount)) = costed {
                    self.avg_cost = avg;
                    self.cost_currency = Some(cost.currency);
                    if !amount.is_zero() {
                        effects.push(Effect::Journal(JournalLine {
                            entry_id: effect_id("inventory:", &ev.id),
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
                        id: effect_id("count:", &ev.id),
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
                    self.oversells = self.oversells.saturating_add(1);
                    effects.push(Effect::Oversell(OversellAlert {
                        alert_id: effect_id("oversell:", &ev.id),
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
        let reorder_point = rules.reorder_point;
        if reorder_point > 0 && before > reorder_point && after <= reorder_point {
            effects.push(Effect::LowStock(LowStockAlert {
                alert_id: effect_id("low_stock:", &ev.id),
                sku: ev.sku.to_string(),
                available: after,
                reorder_point,
                ts: ev.ts,
            }));
            effects.push(Effect::Reorder(ReorderRequest {
                request_id: effect_id("reorder:", &ev.id),
                sku: ev.sku.to_string(),
                available: after,
                reorder_point,
                units_ordered_24h: self.velocity.units_24h(),
                ts: ev.ts,
            }));
        }
        let max_ts = last.map_or(ev.ts, |m| m.max(ev.ts));
        self.max_ts = Some(max_ts);
        if last.is_some_and(|l| l.div_euclid(DAY_MS) != max_ts.div_euclid(DAY_MS)) {
            self.forget_lines(max_ts, horizon);
            out.swept = Some(max_ts);
        }
        Ok(out)
    }

    /// Drops closed lines no longer remembered at event time `now` (lookups already ignore them).
    pub fn forget_lines(&mut self, now: i64, horizon: i64) {
        self.lines.retain(|_, l| l.is_open() || l.closed_ts.saturating_add(horizon) >= now);
    }

    /// The COGS journal line of shipping `q` units, if a cost is known and it is not zero.
    fn cogs_line(&self, ev: &Event<'_>, q: i64) -> Result<Option<JournalLine>, ApplyError> {
        let Some(currency) = self.cost_currency else { return Ok(None) };
        let amount = money::line_amount(self.avg_cost, q, currency).ok_or_else(|| ApplyError {
            field: "qty",
            reason: format!("COGS of {q} units at {} exceeds 10^20 (see docs/state.md, money limits)", self.avg_cost),
        })?;
        Ok((!amount.is_zero()).then(|| JournalLine {
            entry_id: effect_id("cogs:", &ev.id),
            sku: ev.sku.to_string(),
            kind: JournalKind::Cogs,
            qty: q,
            unit_cost: self.avg_cost,
            amount,
            currency,
            ts: ev.ts,
        }))
    }
}

/// The encoding stockflow wrote before SPEC v2: no version prefix, open lines by order id,
/// closed lines forgotten. Read once and upgraded: each open line keeps its units under its
/// [`line_key`]; lines that closed before the upgrade are not remembered (v1 had forgotten them).
pub mod v1 {
    use std::collections::HashMap;

    use rust_decimal::Decimal;
    use serde::{Deserialize, Serialize};

    use super::{Line, SkuState, line_key, units};
    use crate::money::Currency;
    use crate::store::StoreError;
    use crate::windows::{OpenWindow, Velocity};

    /// An open line as v1 kept it.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
    pub struct LineV1 {
        /// Units still reserved.
        pub remaining: i64,
        /// Units shipped while open.
        pub shipped: i64,
    }

    /// A SKU state as v1 encoded it.
    #[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
    pub struct SkuStateV1 {
        /// See [`SkuState`].
        pub ordinal: u32,
        /// See [`SkuState`].
        pub on_hand: i64,
        /// See [`SkuState`].
        pub reserved: i64,
        /// Open lines by order id.
        pub lines: HashMap<Box<str>, LineV1>,
        /// See [`SkuState`].
        pub avg_cost: Decimal,
        /// See [`SkuState`].
        pub cost_currency: Option<Currency>,
        /// See [`SkuState`].
        pub cogs: Decimal,
        /// See [`SkuState`].
        pub oversells: u32,
        /// See [`SkuState`].
        pub max_ts: Option<i64>,
        /// See [`SkuState`].
        pub windows: Vec<OpenWindow>,
        /// See [`SkuState`].
        pub velocity: Velocity,
    }

    impl SkuStateV1 {
        /// v1's encoding (tests write stores as an earlier stockflow did).
        pub fn encode(&self) -> Result<Vec<u8>, StoreError> {
            postcard::to_allocvec(self).map_err(|e| StoreError::Corrupt(format!("encoding a v1 SKU state: {e}")))
        }
    }

    /// Decodes v1 bytes into the current state.
    pub fn decode(bytes: &[u8]) -> Result<SkuState, StoreError> {
        let old: SkuStateV1 = postcard::from_bytes(bytes)
            .map_err(|e| StoreError::Corrupt(format!("decoding a SKU state (unversioned, v1): {e}")))?;
        let lines = old
            .lines
            .iter()
            .filter(|(_, l)| l.remaining > 0)
            .map(|(id, l)| {
                (line_key(id), Line { remaining: units(l.remaining), shipped: units(l.shipped), closed_ts: 0 })
            })
            .collect();
        Ok(SkuState {
            ordinal: old.ordinal,
            on_hand: old.on_hand,
            reserved: old.reserved,
            lines,
            avg_cost: old.avg_cost,
            cost_currency: old.cost_currency,
            cogs: old.cogs,
            oversells: old.oversells,
            max_ts: old.max_ts,
            windows: old.windows,
            velocity: old.velocity,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::decode;

    const RULES: SkuRules = SkuRules { reorder_point: 0, line_horizon_ms: 35 * DAY_MS };
    /// 2026-11-27T00:00:00Z.
    const T0: i64 = 1_795_737_600_000;
    const HOUR: i64 = 3_600_000;

    fn run(state: &mut SkuState, events: &[&str]) -> Vec<Effect> {
        let mut fx = Vec::new();
        for e in events {
            state.apply(&decode(e.as_bytes()).unwrap(), &RULES, &mut fx).unwrap();
        }
        fx
    }

    fn ev(id: &str, body: &str) -> String {
        at(id, T0, body)
    }

    fn at(id: &str, ts: i64, body: &str) -> String {
        format!(r#"{{"id":"{id}","sku":"S","ts":{ts},{body}}}"#)
    }

    fn line(s: &SkuState, order_id: &str) -> Line {
        s.lines.get(line_key(order_id)).expect("the order's line")
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
        assert_eq!((s.on_hand, s.reserved, line(&s, "o").remaining), (9, 2, 2));
        run(&mut s, &[&ev("s2", r#""type":"order_shipped","order_id":"o""#)]);
        assert_eq!((s.on_hand, s.reserved), (7, 0));
        assert_eq!((s.open_lines(), line(&s, "o").closed_ts), (0, T0), "closed and remembered");
        let mut fx = Vec::new();
        let out = s
            .apply(&decode(ev("c2", r#""type":"order_cancelled","order_id":"o""#).as_bytes()).unwrap(), &RULES, &mut fx)
            .unwrap();
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
        assert_eq!((s.on_hand, s.reserved, line(&s, "o").shipped), (9, 2, 1));
        run(&mut s, &[&ev("t3", r#""type":"order_shipped","order_id":"o","shipped_total":3"#)]);
        assert_eq!((s.on_hand, s.reserved), (7, 0));
        // Without a line, shipped_total ships that many and remembers the line closed: its
        // re-sent shipment and a late placement change nothing.
        run(&mut s, &[&ev("x", r#""type":"order_shipped","order_id":"other","shipped_total":2"#)]);
        assert_eq!((s.on_hand, s.reserved), (5, 0));
        run(
            &mut s,
            &[
                &ev("x2", r#""type":"order_shipped","order_id":"other","shipped_total":2"#),
                &ev("xp", r#""type":"order_placed","order_id":"other","qty":2"#),
            ],
        );
        assert_eq!((s.on_hand, s.reserved), (5, 0));
    }

    #[test]
    fn a_placement_re_sent_past_the_dedup_horizon_reserves_once() {
        // The issue's reproduction: X placed at t, Y at t+25 h, X re-sent (same id) at t+25 h+1 ms,
        // X shipped: one unit stays reserved, Y's.
        let mut s = SkuState::default();
        let mut fx = Vec::new();
        let mut apply = |s: &mut SkuState, e: String| s.apply(&decode(e.as_bytes()).unwrap(), &RULES, &mut fx).unwrap();
        apply(&mut s, at("r", T0, r#""type":"stock_received","qty":10"#));
        apply(&mut s, at("ord:X:placed", T0, r#""type":"order_placed","order_id":"X","qty":1"#));
        apply(&mut s, at("ord:Y:placed", T0 + 25 * HOUR, r#""type":"order_placed","order_id":"Y","qty":1"#));
        let again =
            apply(&mut s, at("ord:X:placed", T0 + 25 * HOUR + 1, r#""type":"order_placed","order_id":"X","qty":1"#));
        assert!(again.resent && again.contribution.is_empty());
        apply(
            &mut s,
            at("ord:X:shipped:1", T0 + 26 * HOUR, r#""type":"order_shipped","order_id":"X","shipped_total":1"#),
        );
        assert_eq!((s.on_hand, s.reserved, s.open_line_units()), (9, 1, 1));
        // Re-sent after the line closed, days later: nothing moves.
        let day = 24 * HOUR;
        apply(&mut s, at("ord:X:placed", T0 + 10 * day, r#""type":"order_placed","order_id":"X","qty":1"#));
        apply(
            &mut s,
            at("ord:X:shipped:1", T0 + 10 * day, r#""type":"order_shipped","order_id":"X","shipped_total":1"#),
        );
        assert_eq!((s.on_hand, s.reserved), (9, 1));
        // Past the line horizon (35 days after it closed) the line is forgotten and freed.
        apply(&mut s, at("late", T0 + 26 * HOUR + 35 * day + 1, r#""type":"stock_adjusted","delta":1"#));
        assert!(!s.lines.contains_key(line_key("X")), "swept when the SKU's time entered a new day");
        assert!(s.lines.contains_key(line_key("Y")), "open lines stay");
        let placed =
            apply(&mut s, at("ord:X:placed", T0 + 40 * day, r#""type":"order_placed","order_id":"X","qty":1"#));
        assert!(!placed.resent, "a forgotten line is a new line");
        assert_eq!(s.reserved, 2);
    }

    #[test]
    fn lookups_ignore_expired_lines_before_any_sweep() {
        let mut s = SkuState::default();
        let h = 10 * HOUR;
        let rules = SkuRules { line_horizon_ms: h, ..RULES };
        let mut fx = Vec::new();
        let mut apply = |s: &mut SkuState, e: String| s.apply(&decode(e.as_bytes()).unwrap(), &rules, &mut fx).unwrap();
        // All within one day of event time: no sweep runs.
        apply(&mut s, at("p", T0, r#""type":"order_placed","order_id":"o","qty":2"#));
        apply(&mut s, at("c", T0 + HOUR, r#""type":"order_cancelled","order_id":"o""#));
        apply(&mut s, at("x", T0 + HOUR + h, r#""type":"stock_adjusted","delta":1"#));
        // closed_ts + h = max_ts: still remembered.
        assert!(apply(&mut s, at("p2", T0 + HOUR + h, r#""type":"order_placed","order_id":"o","qty":2"#)).resent);
        apply(&mut s, at("y", T0 + HOUR + h + 1, r#""type":"stock_adjusted","delta":1"#));
        assert!(s.lines.contains_key(line_key("o")), "not swept yet");
        assert!(!apply(&mut s, at("p3", T0 + HOUR + h + 1, r#""type":"order_placed","order_id":"o","qty":2"#)).resent);
        assert_eq!(s.reserved, 2);
    }

    #[test]
    fn money_that_cannot_be_booked_refuses_the_record_and_changes_nothing() {
        let mut s = SkuState::default();
        run(&mut s, &[&ev("r", r#""type":"stock_received","qty":2,"unit_cost":"1.25","currency":"USD""#)]);
        let before = s.clone();
        let mut fx = Vec::new();
        let huge =
            ev("h", r#""type":"stock_received","qty":1000000000,"unit_cost":"100000000000000","currency":"USD""#);
        let err = s.apply(&decode(huge.as_bytes()).unwrap(), &RULES, &mut fx).unwrap_err();
        assert_eq!(err.field, "unit_cost");
        assert_eq!((s.clone(), fx.len()), (before, 0));
        // A shipment's COGS: cost 10^17 (allowed) × 10^9 units is past 10^20.
        run(
            &mut s,
            &[&ev("big", r#""type":"stock_received","qty":1,"unit_cost":"100000000000000000","currency":"USD""#)],
        );
        let before = s.clone();
        let ship = ev("s", r#""type":"order_shipped","order_id":"o","qty":1000000000"#);
        let err = s.apply(&decode(ship.as_bytes()).unwrap(), &RULES, &mut fx).unwrap_err();
        assert_eq!(err.field, "qty");
        assert_eq!(s, before);
    }

    #[test]
    fn an_exact_tie_books_half_to_even() {
        // 5 × 4.825 = 24.125 exactly: 24.12.
        let mut s = SkuState::default();
        let fx = run(
            &mut s,
            &[
                &ev("r", r#""type":"stock_received","qty":5,"unit_cost":"4.825","currency":"USD""#),
                &ev("s", r#""type":"order_shipped","order_id":"o","qty":5"#),
            ],
        );
        let Effect::Journal(cogs) = &fx[1] else { panic!("{fx:?}") };
        assert_eq!(cogs.amount.to_string(), "24.12");
        assert_eq!(s.cogs.to_string(), "24.12");
    }

    #[test]
    fn states_round_trip_and_v1_states_are_upgraded() {
        let mut s = SkuState::default();
        run(
            &mut s,
            &[
                &ev("r", r#""type":"stock_received","qty":5,"unit_cost":"2.5","currency":"USD""#),
                &ev("p", r#""type":"order_placed","order_id":"a","qty":2"#),
                &ev("q", r#""type":"order_placed","order_id":"b","qty":1"#),
                &ev("c", r#""type":"order_cancelled","order_id":"b""#),
            ],
        );
        assert_eq!(SkuState::decode(&s.encode().unwrap()).unwrap(), s);
        // The head leaves the lines out (the store keeps them apart) and says so.
        let mut apart = s.clone();
        let head = apart.encode_head().unwrap();
        assert_eq!(apart, s, "encoding the head leaves the state as it was");
        assert!(SkuState::lines_apart(&head) && !SkuState::lines_apart(&s.encode().unwrap()));
        assert_eq!(SkuState::decode(&head).unwrap(), SkuState { lines: Lines::default(), ..s.clone() });
        let old = v1::SkuStateV1 {
            ordinal: 7,
            on_hand: 5,
            reserved: 2,
            lines: [("a".into(), v1::LineV1 { remaining: 2, shipped: 1 })].into_iter().collect(),
            avg_cost: Decimal::new(25, 1),
            cost_currency: Some(Currency::USD),
            max_ts: Some(T0),
            ..v1::SkuStateV1::default()
        };
        let up = SkuState::decode(&old.encode().unwrap()).unwrap();
        assert_eq!((up.ordinal, up.on_hand, up.reserved, up.open_line_units()), (7, 5, 2, 2));
        assert_eq!(line(&up, "a"), Line { remaining: 2, shipped: 1, closed_ts: 0 });
        // An encoding from a newer stockflow is refused, not misread.
        let mut newer = s.encode().unwrap();
        newer[MAGIC.len()] = VERSION_APART + 1;
        assert!(SkuState::decode(&newer).unwrap_err().to_string().contains("upgrade stockflow"));
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
        // avg = (2·1 + 1·2) / 3 = 1.333…, kept to 10 places; COGS of 1 unit rounds to 1.33.
        assert_eq!(s.avg_cost.to_string(), "1.3333333333");
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
        assert_eq!(s.avg_cost.to_string(), "3.5");
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
        // Decoding bounds quantities (SPEC v2); the ledger still saturates whatever it is given.
        let mut s = SkuState { on_hand: i64::MIN + 1, reserved: i64::MAX - 1, ..SkuState::default() };
        let big = crate::event::MAX_UNITS;
        let mut fx = Vec::new();
        for (i, body) in [
            format!(r#""type":"stock_adjusted","delta":{}"#, -big),
            format!(r#""type":"order_placed","order_id":"o","qty":{big}"#),
            format!(r#""type":"order_cancelled","order_id":"o","qty":{big}"#),
            format!(r#""type":"stock_received","qty":{big},"unit_cost":"1","currency":"USD""#),
            format!(r#""type":"order_shipped","order_id":"z","shipped_total":{big}"#),
            r#""type":"stock_counted","on_hand":0"#.to_string(),
        ]
        .iter()
        .enumerate()
        {
            s.apply(&decode(ev(&i.to_string(), body).as_bytes()).unwrap(), &RULES, &mut fx).unwrap();
        }
        assert_eq!(s.reserved, i64::MAX - big);
        assert_eq!(s.on_hand, 0);
        let mut s = SkuState { on_hand: i64::MAX, ..SkuState::default() };
        run(&mut s, &[&ev("r", &format!(r#""type":"stock_received","qty":{big}"#))]);
        assert_eq!(s.on_hand, i64::MAX);
    }

    #[test]
    fn low_stock_is_edge_triggered() {
        let mut s = SkuState::default();
        let mut fx = Vec::new();
        let rules = SkuRules { reorder_point: 3, ..RULES };
        let apply = |s: &mut SkuState, fx: &mut Vec<Effect>, e: String| {
            s.apply(&decode(e.as_bytes()).unwrap(), &rules, fx).unwrap();
        };
        apply(&mut s, &mut fx, ev("r", r#""type":"stock_received","qty":5"#));
        apply(&mut s, &mut fx, ev("p1", r#""type":"order_placed","order_id":"a","qty":2"#));
        apply(&mut s, &mut fx, ev("p2", r#""type":"order_placed","order_id":"b","qty":1"#));
        let ids: Vec<_> = fx.iter().map(|e| e.id().to_string()).collect();
        assert_eq!(ids, ["low_stock:p1", "reorder:p1"]);
    }
}
