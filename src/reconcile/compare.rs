//! The comparison itself, pure: Amazon's counts and stockflow's states in, one classified line
//! per SKU and the totals out (docs/reconcile.md § Classification).
//!
//! Per SKU, `difference = stockflow on_hand − Amazon's count` (count = fulfillable + pending
//! customer orders, SPEC §11):
//! - **match**: 0;
//! - **timing**: stockflow applied events newer than Amazon's `lastUpdatedTime` for the SKU —
//!   Amazon's numbers predate what stockflow knows, so the difference is not judged (the next run
//!   will);
//! - **explained**: stockflow has more, and Amazon holds at least that many units where they are
//!   not counted as sellable — FC processing, transshipment, inbound, researching, unfulfillable
//!   (allocated in that order);
//! - **unexplained**: the rest — stockflow has fewer units than Amazon, or more than the buckets
//!   explain. Its units times the SKU's `avg_cost` is its value.

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use stockflow_connectors::amazon::FbaCount;
use stockflow_state::SkuState;

/// How a SKU's difference is classified.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Class {
    /// No difference.
    Match,
    /// stockflow knows of events newer than Amazon's numbers.
    Timing,
    /// Amazon's non-sellable buckets account for the whole difference.
    Explained,
    /// A real discrepancy (or part of one).
    Unexplained,
}

impl Class {
    /// The label in reports and metrics.
    pub fn label(self) -> &'static str {
        match self {
            Class::Match => "match",
            Class::Timing => "timing",
            Class::Explained => "explained",
            Class::Unexplained => "unexplained",
        }
    }

    /// Every class, in report order.
    pub const ALL: [Class; 4] = [Class::Match, Class::Timing, Class::Explained, Class::Unexplained];
}

/// The buckets a surplus in stockflow can be explained by, in allocation order.
pub const BUCKETS: [&str; 5] = ["fc_processing", "transshipment", "inbound", "researching", "unfulfillable"];

fn bucket(c: &FbaCount, name: &str) -> i64 {
    match name {
        "fc_processing" => c.fc_processing,
        "transshipment" => c.transshipment,
        "inbound" => c.inbound,
        "researching" => c.researching,
        _ => c.unfulfillable,
    }
}

/// stockflow's side of one SKU (what reconciliation needs of a [`SkuState`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ours {
    /// Units on hand.
    pub on_hand: i64,
    /// Units reserved by open order lines.
    pub reserved: i64,
    /// Moving average unit cost.
    pub avg_cost: Decimal,
    /// Its currency.
    pub currency: Option<String>,
    /// COGS booked so far.
    pub cogs: Decimal,
    /// Largest event time applied.
    pub last_event_ms: Option<i64>,
}

impl From<&SkuState> for Ours {
    fn from(s: &SkuState) -> Self {
        Ours {
            on_hand: s.on_hand,
            reserved: s.reserved,
            avg_cost: s.avg_cost,
            currency: s.cost_currency.as_ref().map(|c| c.as_str().to_string()),
            cogs: s.cogs,
            last_event_ms: s.max_ts,
        }
    }
}

/// One SKU's line of the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkuLine {
    /// The seller SKU.
    pub sku: String,
    /// Its class.
    pub class: Class,
    /// stockflow's on_hand (0 when stockflow never saw the SKU).
    pub stockflow_on_hand: i64,
    /// stockflow's reserved units.
    pub stockflow_reserved: i64,
    /// Amazon's count (`None`: Amazon does not list the SKU).
    pub amazon_count: Option<i64>,
    /// Amazon's fulfillable units.
    pub fulfillable: i64,
    /// Amazon's units pending customer orders.
    pub pending_customer_order: i64,
    /// stockflow on_hand − Amazon's count.
    pub difference: i64,
    /// Units of the difference each bucket explains (only buckets that explain some).
    pub explained: BTreeMap<String, i64>,
    /// Units left unexplained (signed like `difference`).
    pub unexplained_units: i64,
    /// stockflow's avg_cost.
    pub avg_cost: Decimal,
    /// Its currency.
    pub currency: Option<String>,
    /// `unexplained_units × avg_cost`, to the cent.
    pub unexplained_value: Decimal,
    /// stockflow's newest event time for the SKU (epoch ms).
    pub stockflow_last_event_ms: Option<i64>,
    /// Amazon's `lastUpdatedTime` (epoch ms).
    pub amazon_updated_ms: Option<i64>,
    /// Whether `--apply` may count it (unexplained, and listed by Amazon).
    pub countable: bool,
}

/// An amount to the cent, half to even, always with two decimals (`-74.00`).
pub fn cents(d: Decimal) -> Decimal {
    let mut c = d.round_dp_with_strategy(2, rust_decimal::RoundingStrategy::MidpointNearestEven);
    c.rescale(2);
    c
}

/// `units × cost` to the cent, saturating instead of overflowing (an absurd cost in one record
/// must not stop a reconciliation).
pub fn value(units: i64, cost: Decimal) -> Decimal {
    let product = Decimal::from(units)
        .checked_mul(cost)
        .unwrap_or_else(|| if (units < 0) == cost.is_sign_negative() { Decimal::MAX } else { Decimal::MIN });
    cents(product)
}

/// The saturating sum of amounts.
pub fn sum(amounts: impl IntoIterator<Item = Decimal>) -> Decimal {
    amounts.into_iter().fold(Decimal::ZERO, |a, b| {
        a.checked_add(b).unwrap_or(if b.is_sign_negative() { Decimal::MIN } else { Decimal::MAX })
    })
}

/// Classifies one SKU.
pub fn classify(sku: &str, ours: Option<&Ours>, amazon: Option<&FbaCount>) -> SkuLine {
    let default = Ours::default();
    let o = ours.unwrap_or(&default);
    let count = amazon.map(FbaCount::count);
    let difference = o.on_hand.saturating_sub(count.unwrap_or(0));
    let mut explained = BTreeMap::new();
    let mut rest = difference;
    let updated = amazon.and_then(|a| a.last_updated_ms);
    let class = if difference == 0 {
        Class::Match
    } else if let (Some(ours_ms), Some(theirs_ms)) = (o.last_event_ms, updated)
        && ours_ms > theirs_ms
    {
        Class::Timing
    } else {
        if let Some(a) = amazon.filter(|_| difference > 0) {
            for name in BUCKETS {
                let take = rest.min(bucket(a, name).max(0));
                if take > 0 {
                    explained.insert(name.to_string(), take);
                    rest -= take;
                }
            }
        }
        if rest == 0 { Class::Explained } else { Class::Unexplained }
    };
    let unexplained_units = if class == Class::Unexplained { rest } else { 0 };
    SkuLine {
        sku: sku.to_string(),
        class,
        stockflow_on_hand: o.on_hand,
        stockflow_reserved: o.reserved,
        amazon_count: count,
        fulfillable: amazon.map_or(0, |a| a.fulfillable),
        pending_customer_order: amazon.map_or(0, |a| a.pending_customer_order),
        difference,
        explained,
        unexplained_units,
        avg_cost: o.avg_cost,
        currency: o.currency.clone(),
        unexplained_value: value(unexplained_units, o.avg_cost),
        stockflow_last_event_ms: o.last_event_ms,
        amazon_updated_ms: updated,
        countable: class == Class::Unexplained && amazon.is_some(),
    }
}

/// Every SKU either side knows, sorted by SKU.
pub fn compare(ours: &BTreeMap<String, Ours>, amazon: &[FbaCount]) -> Vec<SkuLine> {
    let theirs: BTreeMap<&str, &FbaCount> = amazon.iter().map(|c| (c.sku.as_str(), c)).collect();
    let mut skus: Vec<&str> = ours.keys().map(String::as_str).chain(theirs.keys().copied()).collect();
    skus.sort_unstable();
    skus.dedup();
    skus.into_iter().map(|sku| classify(sku, ours.get(sku), theirs.get(sku).copied())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn amazon(fulfillable: i64, pending: i64) -> FbaCount {
        FbaCount { sku: "A".into(), fulfillable, pending_customer_order: pending, ..FbaCount::default() }
    }

    fn ours(on_hand: i64) -> Ours {
        Ours { on_hand, avg_cost: Decimal::new(250, 2), last_event_ms: Some(1_000), ..Ours::default() }
    }

    #[test]
    fn each_class_and_the_bucket_allocation() {
        assert_eq!(classify("A", Some(&ours(12)), Some(&amazon(10, 2))).class, Class::Match);
        // Amazon's numbers predate stockflow's last event: timing, not judged.
        let old = FbaCount { last_updated_ms: Some(999), ..amazon(10, 0) };
        let t = classify("A", Some(&ours(12)), Some(&old));
        assert_eq!((t.class, t.unexplained_units), (Class::Timing, 0));
        // 5 more in stockflow: 2 in FC processing, 3 inbound → explained.
        let a = FbaCount { fc_processing: 2, inbound: 7, ..amazon(10, 0) };
        let e = classify("A", Some(&ours(15)), Some(&a));
        assert_eq!(e.class, Class::Explained);
        assert_eq!(e.explained, BTreeMap::from([("fc_processing".to_string(), 2), ("inbound".to_string(), 3)]));
        // 4 more, only 1 explained: 3 unexplained at 2.50.
        let a = FbaCount { researching: 1, ..amazon(10, 0) };
        let u = classify("A", Some(&ours(14)), Some(&a));
        assert_eq!((u.class, u.unexplained_units, u.unexplained_value), (Class::Unexplained, 3, Decimal::new(750, 2)));
        assert!(u.countable);
        // Fewer in stockflow: buckets never explain a shortfall.
        let a = FbaCount { inbound: 50, ..amazon(10, 0) };
        let s = classify("A", Some(&ours(8)), Some(&a));
        assert_eq!((s.class, s.difference, s.unexplained_units), (Class::Unexplained, -2, -2));
        // Not listed by Amazon: unexplained, never counted.
        let n = classify("A", Some(&ours(3)), None);
        assert_eq!((n.class, n.amazon_count, n.countable), (Class::Unexplained, None, false));
        // Listed by Amazon only.
        let m = classify("A", None, Some(&amazon(4, 0)));
        assert_eq!((m.class, m.difference, m.countable), (Class::Unexplained, -4, true));
    }
}
