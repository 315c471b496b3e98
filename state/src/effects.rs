//! Effects: what applying events asks the world to do — alerts, reorder requests, journal lines
//! and count discrepancies (SPEC §2). Each carries a deterministic id derived from the event id,
//! so a re-emitted effect is recognised downstream and delivered exactly once.

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::money::Currency;

pub mod codec;

/// Why an oversell alert fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OversellCause {
    /// An order reserved more than was available.
    Order,
    /// A physical count left the reservations uncovered.
    Count,
}

/// `oversell:<event id>`: more units are promised than exist.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OversellAlert {
    /// `oversell:` + the event id.
    pub alert_id: String,
    /// The SKU.
    pub sku: String,
    /// The order line, for cause `order`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order_id: Option<String>,
    /// Units the order asked for; for cause `count`, the units reserved at the count.
    pub requested: i64,
    /// `available` before the event.
    pub available_before: i64,
    /// Units that cannot be served from stock.
    pub shortfall: i64,
    /// What caused it.
    pub cause: OversellCause,
    /// Event time of the triggering event.
    pub ts: i64,
}

/// `low_stock:<event id>`: available crossed down to the SKU's reorder point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LowStockAlert {
    /// `low_stock:` + the event id.
    pub alert_id: String,
    /// The SKU.
    pub sku: String,
    /// `available` after the event.
    pub available: i64,
    /// The SKU's reorder point.
    pub reorder_point: i64,
    /// Event time.
    pub ts: i64,
}

/// `reorder:<event id>`: the manufacturer should make more (produced with each low-stock alert).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReorderRequest {
    /// `reorder:` + the event id.
    pub request_id: String,
    /// The SKU.
    pub sku: String,
    /// `available` after the event.
    pub available: i64,
    /// The SKU's reorder point.
    pub reorder_point: i64,
    /// Units ordered over the last 24 hours of event time (sales velocity).
    pub units_ordered_24h: u64,
    /// Event time.
    pub ts: i64,
}

/// What a journal line books.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JournalKind {
    /// Cost of goods sold on shipment: `q × avg_cost`.
    Cogs,
    /// Inventory bought on receipt: `qty × unit_cost`.
    InventoryReceipt,
}

/// `cogs:<event id>` or `inventory:<event id>`: one line for the accounting system.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalLine {
    /// `cogs:` or `inventory:` + the event id.
    pub entry_id: String,
    /// The SKU.
    pub sku: String,
    /// What is booked.
    pub kind: JournalKind,
    /// Units.
    pub qty: i64,
    /// Cost per unit used (average cost for COGS), unrounded.
    #[serde(with = "rust_decimal::serde::str")]
    pub unit_cost: Decimal,
    /// `qty × unit_cost`, rounded to the currency's minor unit, half to even.
    #[serde(with = "rust_decimal::serde::str")]
    pub amount: Decimal,
    /// Currency of the amount.
    pub currency: Currency,
    /// Event time.
    pub ts: i64,
}

/// `count:<event id>`: a physical count disagreed with the books.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CountDiscrepancy {
    /// `count:` + the event id.
    pub id: String,
    /// The SKU.
    pub sku: String,
    /// `on_hand` before the count.
    pub expected: i64,
    /// The counted units.
    pub counted: i64,
    /// `counted − expected`.
    pub discrepancy: i64,
    /// Event time.
    pub ts: i64,
}

/// The kind of an [`Effect`] (its variant).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EffectKind {
    /// [`Effect::Oversell`].
    Oversell,
    /// [`Effect::LowStock`].
    LowStock,
    /// [`Effect::Reorder`].
    Reorder,
    /// [`Effect::Journal`].
    Journal,
    /// [`Effect::Discrepancy`].
    Discrepancy,
}

impl EffectKind {
    /// Its name in JSON (the `effect` tag) and in metrics labels.
    pub const fn label(self) -> &'static str {
        match self {
            EffectKind::Oversell => "oversell",
            EffectKind::LowStock => "low_stock",
            EffectKind::Reorder => "reorder",
            EffectKind::Journal => "journal",
            EffectKind::Discrepancy => "discrepancy",
        }
    }

    /// The kind of an effect's JSON in the encoding stockflow writes, which names the variant
    /// first (`{"effect":"oversell",…}`), read without decoding the rest; `None` for any other
    /// layout (which [`Effect::from_json`] still decodes, by serde's general path).
    pub fn of_json(bytes: &[u8]) -> Option<EffectKind> {
        const TAG: &[u8] = br#"{"effect":""#;
        let rest = bytes.strip_prefix(TAG)?;
        let variant = &rest[..rest.iter().position(|&b| b == b'"')?];
        [EffectKind::Oversell, EffectKind::LowStock, EffectKind::Reorder, EffectKind::Journal, EffectKind::Discrepancy]
            .into_iter()
            .find(|kind| kind.label().as_bytes() == variant)
    }
}

/// A set of effect kinds: what a connector delivers, so that reading the outbox for it decodes
/// only those effects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EffectKinds(u8);

impl EffectKinds {
    /// Every kind.
    pub const ALL: EffectKinds = EffectKinds(0b1_1111);
    /// The alerts (oversell, low stock; see [`Effect::is_alert`]).
    pub const ALERTS: EffectKinds = EffectKinds::of(EffectKind::Oversell).with(EffectKind::LowStock);

    /// The set of one kind.
    pub const fn of(kind: EffectKind) -> Self {
        EffectKinds(1 << kind as u8)
    }

    /// This set and `kind`.
    pub const fn with(self, kind: EffectKind) -> Self {
        EffectKinds(self.0 | 1 << kind as u8)
    }

    /// True if `kind` is in the set.
    pub const fn contains(self, kind: EffectKind) -> bool {
        self.0 & 1 << kind as u8 != 0
    }
}

/// One effect in the outbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "effect", rename_all = "snake_case")]
pub enum Effect {
    /// An oversell alert.
    Oversell(OversellAlert),
    /// A low-stock alert.
    LowStock(LowStockAlert),
    /// A reorder request for the manufacturer.
    Reorder(ReorderRequest),
    /// A journal line for the accounting system.
    Journal(JournalLine),
    /// A count discrepancy for reconciliation.
    Discrepancy(CountDiscrepancy),
}

impl Effect {
    /// The deterministic id (the idempotency key downstream).
    pub fn id(&self) -> &str {
        match self {
            Effect::Oversell(a) => &a.alert_id,
            Effect::LowStock(a) => &a.alert_id,
            Effect::Reorder(r) => &r.request_id,
            Effect::Journal(j) => &j.entry_id,
            Effect::Discrepancy(d) => &d.id,
        }
    }

    /// The SKU it concerns.
    pub fn sku(&self) -> &str {
        match self {
            Effect::Oversell(a) => &a.sku,
            Effect::LowStock(a) => &a.sku,
            Effect::Reorder(r) => &r.sku,
            Effect::Journal(j) => &j.sku,
            Effect::Discrepancy(d) => &d.sku,
        }
    }

    /// Decodes one effect's JSON. The outbox's own encoding names the variant first
    /// (`{"effect":"oversell",…}`): the variant's struct is then decoded straight from the bytes
    /// (its decoder skips the tag), instead of serde's internally-tagged path, which buffers every
    /// field into an intermediate tree first (~8 % of a drain-heavy profile). Anything else takes
    /// that general path, so the result is the same for every input.
    pub fn from_json(bytes: &[u8]) -> serde_json::Result<Effect> {
        match EffectKind::of_json(bytes) {
            Some(EffectKind::Oversell) => serde_json::from_slice(bytes).map(Effect::Oversell),
            Some(EffectKind::LowStock) => serde_json::from_slice(bytes).map(Effect::LowStock),
            Some(EffectKind::Reorder) => serde_json::from_slice(bytes).map(Effect::Reorder),
            Some(EffectKind::Journal) => serde_json::from_slice(bytes).map(Effect::Journal),
            Some(EffectKind::Discrepancy) => serde_json::from_slice(bytes).map(Effect::Discrepancy),
            None => serde_json::from_slice(bytes),
        }
    }

    /// True for alerts (oversell, low stock), the records `stockflow alerts dump` lists.
    pub fn is_alert(&self) -> bool {
        EffectKinds::ALERTS.contains(self.kind())
    }

    /// Its kind.
    pub fn kind(&self) -> EffectKind {
        match self {
            Effect::Oversell(_) => EffectKind::Oversell,
            Effect::LowStock(_) => EffectKind::LowStock,
            Effect::Reorder(_) => EffectKind::Reorder,
            Effect::Journal(_) => EffectKind::Journal,
            Effect::Discrepancy(_) => EffectKind::Discrepancy,
        }
    }

    /// A low-cardinality label for metrics.
    pub fn kind_label(&self) -> &'static str {
        self.kind().label()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn one_of_each() -> Vec<Effect> {
        vec![
            Effect::Oversell(OversellAlert {
                alert_id: "oversell:e1".into(),
                sku: "S".into(),
                order_id: Some("o1".into()),
                requested: 3,
                available_before: 1,
                shortfall: 2,
                cause: OversellCause::Order,
                ts: 1,
            }),
            Effect::LowStock(LowStockAlert {
                alert_id: "low_stock:e2".into(),
                sku: "S".into(),
                available: 2,
                reorder_point: 5,
                ts: 2,
            }),
            Effect::Reorder(ReorderRequest {
                request_id: "reorder:e2".into(),
                sku: "S \"quoted\"".into(),
                available: 2,
                reorder_point: 5,
                units_ordered_24h: 40,
                ts: 2,
            }),
            Effect::Journal(JournalLine {
                entry_id: "cogs:e3".into(),
                sku: "S".into(),
                kind: JournalKind::Cogs,
                qty: 2,
                unit_cost: Decimal::new(21_000_000_001, 10),
                amount: Decimal::new(420, 2),
                currency: Currency::USD,
                ts: 3,
            }),
            Effect::Discrepancy(CountDiscrepancy {
                id: "count:e4".into(),
                sku: "S".into(),
                expected: 5,
                counted: 4,
                discrepancy: -1,
                ts: 4,
            }),
        ]
    }

    #[test]
    fn the_fast_decoder_reads_what_the_outbox_writes_as_serde_does() {
        for effect in one_of_each() {
            let json = serde_json::to_vec(&effect).unwrap();
            assert!(json.starts_with(br#"{"effect":""#), "the tag is written first");
            assert_eq!(Effect::from_json(&json).unwrap(), effect);
            assert_eq!(serde_json::from_slice::<Effect>(&json).unwrap(), effect);
            assert_eq!(EffectKind::of_json(&json), Some(effect.kind()), "the kind is read from the tag alone");
        }
    }

    #[test]
    fn other_key_orders_and_bad_tags_take_the_general_path() {
        let moved =
            r#"{"alert_id":"low_stock:e","sku":"S","available":1,"effect":"low_stock","reorder_point":2,"ts":9}"#;
        let want =
            LowStockAlert { alert_id: "low_stock:e".into(), sku: "S".into(), available: 1, reorder_point: 2, ts: 9 };
        assert_eq!(Effect::from_json(moved.as_bytes()).unwrap(), Effect::LowStock(want));
        assert_eq!(EffectKind::of_json(moved.as_bytes()), None, "the tag is not first");
        assert_eq!(EffectKind::of_json(br#"{"effect":"refund","sku":"S"}"#), None);
        assert_eq!(EffectKind::of_json(br#"{"effect":"low_stoc"#), None, "an unterminated tag");
        for bad in [r#"{"effect":"refund","sku":"S"}"#, r#"{"effect":"oversell","sku":"S"}"#, r#"{"effect":"#, ""] {
            assert!(Effect::from_json(bad.as_bytes()).is_err(), "{bad}");
            assert!(serde_json::from_slice::<Effect>(bad.as_bytes()).is_err(), "{bad}");
        }
    }
}
