//! The canonical event of SPEC §1: decoding (borrowed, no copies of clean strings) and strict
//! validation that names the offending field.
//!
//! Over 600 lines only with its tests (~545 without); the byte scanner is a module of its own.

use std::borrow::Cow;
use std::fmt;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::money::{Currency, Money};

mod scan;

/// Longest accepted event id, in bytes.
pub const MAX_ID_BYTES: usize = 256;
/// Longest accepted SKU, in bytes.
pub const MAX_SKU_BYTES: usize = 64;
/// Largest accepted `qty`, `shipped_total`, `on_hand` and `|delta|` (SPEC v2 §1).
pub const MAX_UNITS: i64 = 1_000_000_000;
/// Earliest accepted event time: 2000-01-01T00:00:00Z, epoch ms (SPEC v2 §1).
pub const MIN_TS: i64 = 946_684_800_000;
/// First event time no longer accepted: 2100-01-01T00:00:00Z, epoch ms (SPEC v2 §1).
pub const END_TS: i64 = 4_102_444_800_000;

/// The six event types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[derive(Default)]
pub enum EventKind {
    /// A customer order line reserves stock.
    #[default]
    OrderPlaced,
    /// An order line is cancelled and releases its reservation.
    OrderCancelled,
    /// Units of an order line left the warehouse.
    OrderShipped,
    /// Goods arrived from the manufacturer.
    StockReceived,
    /// A signed correction of on-hand stock.
    StockAdjusted,
    /// An authoritative physical count.
    StockCounted,
}

impl EventKind {
    /// The wire name (`order_placed`, …).
    pub fn as_str(&self) -> &'static str {
        match self {
            EventKind::OrderPlaced => "order_placed",
            EventKind::OrderCancelled => "order_cancelled",
            EventKind::OrderShipped => "order_shipped",
            EventKind::StockReceived => "stock_received",
            EventKind::StockAdjusted => "stock_adjusted",
            EventKind::StockCounted => "stock_counted",
        }
    }
}

/// How much an `order_shipped` event ships.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shipped {
    /// `qty` units, or the whole open line when absent.
    Qty(Option<i64>),
    /// `shipped_total`: cumulative units shipped so far on this order line.
    Total(i64),
}

/// The type-specific part of an event, already validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventBody<'a> {
    /// `order_placed`.
    OrderPlaced {
        /// Order line reference.
        order_id: Cow<'a, str>,
        /// Units ordered (≥ 1).
        qty: i64,
        /// Sale price per unit.
        unit_price: Option<Money>,
    },
    /// `order_cancelled`.
    OrderCancelled {
        /// Order line reference.
        order_id: Cow<'a, str>,
        /// Units cancelled; the whole line when absent.
        qty: Option<i64>,
    },
    /// `order_shipped`.
    OrderShipped {
        /// Order line reference.
        order_id: Cow<'a, str>,
        /// Units shipped.
        shipped: Shipped,
    },
    /// `stock_received`.
    StockReceived {
        /// Units received (≥ 1).
        qty: i64,
        /// Purchase cost per unit.
        unit_cost: Option<Money>,
    },
    /// `stock_adjusted`.
    StockAdjusted {
        /// Signed correction (≠ 0).
        delta: i64,
    },
    /// `stock_counted`.
    StockCounted {
        /// Counted units (≥ 0).
        on_hand: i64,
    },
}

/// A validated canonical event. Strings borrow from the input when they hold no escapes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event<'a> {
    /// The business fact's own key; the dedup key.
    pub id: Cow<'a, str>,
    /// Seller SKU; the partition key.
    pub sku: Cow<'a, str>,
    /// Event time, Unix epoch milliseconds.
    pub ts: i64,
    /// When stockflow's ingest accepted it, Unix epoch milliseconds (stamped by the ingest, kept
    /// when already present; measures end-to-end latency, never changes state).
    pub ingested_at: Option<i64>,
    /// The type and its fields.
    pub body: EventBody<'a>,
}

impl Event<'_> {
    /// The event's type.
    pub fn kind(&self) -> EventKind {
        match self.body {
            EventBody::OrderPlaced { .. } => EventKind::OrderPlaced,
            EventBody::OrderCancelled { .. } => EventKind::OrderCancelled,
            EventBody::OrderShipped { .. } => EventKind::OrderShipped,
            EventBody::StockReceived { .. } => EventKind::StockReceived,
            EventBody::StockAdjusted { .. } => EventKind::StockAdjusted,
            EventBody::StockCounted { .. } => EventKind::StockCounted,
        }
    }

    /// Serialises the event back to its canonical JSON form.
    pub fn to_json(&self) -> String {
        let mut w = WireEvent {
            id: &self.id,
            kind: self.kind(),
            sku: &self.sku,
            ts: self.ts,
            ingested_at: self.ingested_at,
            ..WireEvent::default()
        };
        match &self.body {
            EventBody::OrderPlaced { order_id, qty, unit_price } => {
                w.order_id = Some(order_id);
                w.qty = Some(*qty);
                if let Some(p) = unit_price {
                    w.unit_price = Some(p.amount);
                    w.currency = Some(p.currency);
                }
            }
            EventBody::OrderCancelled { order_id, qty } => {
                w.order_id = Some(order_id);
                w.qty = *qty;
            }
            EventBody::OrderShipped { order_id, shipped } => {
                w.order_id = Some(order_id);
                match shipped {
                    Shipped::Qty(q) => w.qty = *q,
                    Shipped::Total(t) => w.shipped_total = Some(*t),
                }
            }
            EventBody::StockReceived { qty, unit_cost } => {
                w.qty = Some(*qty);
                if let Some(c) = unit_cost {
                    w.unit_cost = Some(c.amount);
                    w.currency = Some(c.currency);
                }
            }
            EventBody::StockAdjusted { delta } => w.delta = Some(*delta),
            EventBody::StockCounted { on_hand } => w.on_hand = Some(*on_hand),
        }
        serde_json::to_string(&w).unwrap_or_default()
    }
}

#[derive(Serialize, Default)]
struct WireEvent<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: EventKind,
    sku: &'a str,
    ts: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    order_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    qty: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    shipped_total: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    delta: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    on_hand: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none", with = "rust_decimal::serde::str_option")]
    unit_price: Option<Decimal>,
    #[serde(skip_serializing_if = "Option::is_none", with = "rust_decimal::serde::str_option")]
    unit_cost: Option<Decimal>,
    #[serde(skip_serializing_if = "Option::is_none")]
    currency: Option<Currency>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ingested_at: Option<i64>,
}

/// Why a record is not a valid canonical event. Permanent: the record goes to the dead letters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The bytes are not a JSON document.
    #[error("malformed JSON: {0}")]
    Json(String),
    /// A field is missing, has the wrong type or breaks a rule of SPEC §1.
    #[error("field `{field}`: {reason}")]
    Field {
        /// The offending field (`$` for the whole document).
        field: &'static str,
        /// What is wrong with it.
        reason: Cow<'static, str>,
    },
}

impl DecodeError {
    /// The field the error names, if any.
    pub fn field(&self) -> Option<&'static str> {
        match self {
            DecodeError::Json(_) => None,
            DecodeError::Field { field, .. } => Some(field),
        }
    }

    fn field_err(field: &'static str, reason: impl Into<Cow<'static, str>>) -> Self {
        DecodeError::Field { field, reason: reason.into() }
    }
}

#[derive(Deserialize)]
#[cfg_attr(test, derive(Debug, PartialEq))]
struct RawEvent<'a> {
    #[serde(borrow)]
    id: Cow<'a, str>,
    #[serde(rename = "type")]
    kind: EventKind,
    #[serde(borrow)]
    sku: Cow<'a, str>,
    ts: i64,
    #[serde(default)]
    qty: Option<i64>,
    #[serde(default)]
    shipped_total: Option<i64>,
    #[serde(default, borrow, deserialize_with = "borrowed")]
    order_id: Option<Cow<'a, str>>,
    #[serde(default)]
    delta: Option<i64>,
    #[serde(default)]
    on_hand: Option<i64>,
    #[serde(default, borrow, deserialize_with = "borrowed")]
    unit_price: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "borrowed")]
    unit_cost: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "borrowed")]
    currency: Option<Cow<'a, str>>,
    #[serde(default)]
    ingested_at: Option<Stamp>,
}

/// An optional string, borrowed from the input when it has no escapes. (serde borrows a
/// `Cow<str>` field, but deserializes an `Option<Cow<str>>` as owned: an allocation per field.)
fn borrowed<'de: 'a, 'a, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Cow<'a, str>>, D::Error> {
    #[derive(Deserialize)]
    struct Borrowed<'a>(#[serde(borrow)] Cow<'a, str>);
    Ok(Option::<Borrowed<'a>>::deserialize(d)?.map(|b| b.0))
}

/// `ingested_at` is informational: a value that is not an integer in `i64` is ignored, not an
/// error. (Read by a visitor that takes any value as it comes: serde's untagged enum did the same
/// by buffering the value first, an allocation per event.)
#[cfg_attr(test, derive(Debug, PartialEq))]
struct Stamp(Option<i64>);

impl<'de> Deserialize<'de> for Stamp {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Stamp;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("any value")
            }
            fn visit_i64<E>(self, v: i64) -> Result<Stamp, E> {
                Ok(Stamp(Some(v)))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Stamp, E> {
                Ok(Stamp(i64::try_from(v).ok()))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Stamp, E> {
                Ok(Stamp(None))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Stamp, E> {
                Ok(Stamp(None))
            }
            fn visit_str<E>(self, _: &str) -> Result<Stamp, E> {
                Ok(Stamp(None))
            }
            fn visit_unit<E>(self) -> Result<Stamp, E> {
                Ok(Stamp(None))
            }
            fn visit_none<E>(self) -> Result<Stamp, E> {
                Ok(Stamp(None))
            }
            fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Stamp, D::Error> {
                Stamp::deserialize(d)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Stamp, A::Error> {
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(Stamp(None))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Stamp, A::Error> {
                while map.next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?.is_some() {}
                Ok(Stamp(None))
            }
        }
        deserializer.deserialize_any(V)
    }
}

/// Decodes and validates one canonical event from JSON bytes.
///
/// A flat document of plain strings and integers (what the ingest writes) is read in one pass
/// (`scan`); anything else by serde, which borrows every string without escapes from `bytes`. On
/// failure the document is examined again, field by field, so the error names the field that is
/// wrong.
pub fn decode(bytes: &[u8]) -> Result<Event<'_>, DecodeError> {
    match scan::scan(bytes) {
        Some(raw) => validate(raw),
        None => decode_serde(bytes),
    }
}

/// The SKU of a flat canonical event, read by the same one-pass scan as [`decode`] (not
/// validated); `None` when the document is not one the scan reads.
pub fn scanned_sku(bytes: &[u8]) -> Option<Cow<'_, str>> {
    scan::scan(bytes).map(|raw| raw.sku)
}

fn decode_serde(bytes: &[u8]) -> Result<Event<'_>, DecodeError> {
    match serde_json::from_slice::<RawEvent<'_>>(bytes) {
        Ok(raw) => validate(raw),
        Err(e) => Err(diagnose(bytes, e)),
    }
}

fn positive(field: &'static str, v: Option<i64>) -> Result<Option<i64>, DecodeError> {
    match v {
        Some(q) if q < 1 => Err(DecodeError::field_err(field, "must be an integer ≥ 1")),
        Some(q) if q > MAX_UNITS => Err(DecodeError::field_err(field, "must be at most 1000000000")),
        other => Ok(other),
    }
}

fn required<T>(field: &'static str, kind: EventKind, v: Option<T>) -> Result<T, DecodeError> {
    v.ok_or_else(|| DecodeError::field_err(field, format!("required for {}", kind.as_str())))
}

fn money(
    field: &'static str,
    amount: Option<Cow<'_, str>>,
    currency: &Option<Cow<'_, str>>,
) -> Result<Option<Money>, DecodeError> {
    let Some(amount) = amount else { return Ok(None) };
    if amount.starts_with('-') {
        return Err(DecodeError::field_err(field, "must not be negative"));
    }
    let amount = parse_amount(&amount).ok_or_else(|| {
        DecodeError::field_err(
            field,
            "must be a decimal string such as \"19.99\": digits, an optional point and digits, at most 28 digits",
        )
    })?;
    let code =
        currency.as_deref().ok_or_else(|| DecodeError::field_err("currency", format!("required with `{field}`")))?;
    let currency = Currency::parse(code)
        .ok_or_else(|| DecodeError::field_err("currency", "must be an ISO 4217 code such as \"USD\""))?;
    Ok(Some(Money { amount, currency }))
}

/// Most digits of a decimal amount (from its first non-zero digit) and after its point.
pub const MAX_AMOUNT_DIGITS: usize = 28;

/// A non-negative decimal string, exactly: `[0-9]+(\.[0-9]+)?` with at most
/// [`MAX_AMOUNT_DIGITS`] digits after the point and from the first non-zero digit on (so the value
/// is held exactly; no sign, exponent, separators or rounding).
pub fn parse_amount(s: &str) -> Option<Decimal> {
    let (int, frac) = match s.split_once('.') {
        Some((i, f)) if !f.is_empty() => (i, f),
        Some(_) => return None,
        None => (s, ""),
    };
    if int.is_empty() || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit()) {
        return None;
    }
    let digits = || int.bytes().chain(frac.bytes()).skip_while(|b| *b == b'0');
    if frac.len() > MAX_AMOUNT_DIGITS || digits().count() > MAX_AMOUNT_DIGITS {
        return None;
    }
    let mantissa = digits().fold(0i128, |m, d| m.saturating_mul(10).saturating_add(i128::from(d - b'0')));
    Decimal::try_from_i128_with_scale(mantissa, frac.len() as u32).ok()
}

fn validate(raw: RawEvent<'_>) -> Result<Event<'_>, DecodeError> {
    if raw.id.is_empty() || raw.id.len() > MAX_ID_BYTES {
        return Err(DecodeError::field_err("id", "must be 1–256 bytes"));
    }
    if raw.sku.is_empty() || raw.sku.len() > MAX_SKU_BYTES {
        return Err(DecodeError::field_err("sku", "must be 1–64 bytes"));
    }
    if raw.sku.bytes().any(|b| b < 0x20 || b == 0x7f || b == 0xc2) && raw.sku.chars().any(char::is_control) {
        return Err(DecodeError::field_err("sku", "must not contain control characters"));
    }
    if !(MIN_TS..END_TS).contains(&raw.ts) {
        return Err(DecodeError::field_err(
            "ts",
            "must be Unix epoch milliseconds in the years 2000–2099 (946684800000 ≤ ts < 4102444800000)",
        ));
    }
    if let Some(c) = raw.currency.as_deref()
        && Currency::parse(c).is_none()
    {
        return Err(DecodeError::field_err("currency", "must be an ISO 4217 code such as \"USD\""));
    }
    let kind = raw.kind;
    let body = match kind {
        EventKind::OrderPlaced => EventBody::OrderPlaced {
            qty: required("qty", kind, positive("qty", raw.qty)?)?,
            unit_price: money("unit_price", raw.unit_price, &raw.currency)?,
            order_id: required("order_id", kind, raw.order_id)?,
        },
        EventKind::OrderCancelled => EventBody::OrderCancelled {
            qty: positive("qty", raw.qty)?,
            order_id: required("order_id", kind, raw.order_id)?,
        },
        EventKind::OrderShipped => {
            let shipped = match (positive("qty", raw.qty)?, positive("shipped_total", raw.shipped_total)?) {
                (Some(_), Some(_)) => {
                    return Err(DecodeError::field_err(
                        "shipped_total",
                        "give either `qty` or `shipped_total`, not both",
                    ));
                }
                (None, Some(t)) => Shipped::Total(t),
                (q, None) => Shipped::Qty(q),
            };
            EventBody::OrderShipped { order_id: required("order_id", kind, raw.order_id)?, shipped }
        }
        EventKind::StockReceived => EventBody::StockReceived {
            qty: required("qty", kind, positive("qty", raw.qty)?)?,
            unit_cost: money("unit_cost", raw.unit_cost, &raw.currency)?,
        },
        EventKind::StockAdjusted => match required("delta", kind, raw.delta)? {
            0 => return Err(DecodeError::field_err("delta", "must not be 0")),
            d if !(-MAX_UNITS..=MAX_UNITS).contains(&d) => {
                return Err(DecodeError::field_err("delta", "must be between -1000000000 and 1000000000"));
            }
            delta => EventBody::StockAdjusted { delta },
        },
        EventKind::StockCounted => match required("on_hand", kind, raw.on_hand)? {
            n if n < 0 => return Err(DecodeError::field_err("on_hand", "must be an integer ≥ 0")),
            n if n > MAX_UNITS => return Err(DecodeError::field_err("on_hand", "must be at most 1000000000")),
            on_hand => EventBody::StockCounted { on_hand },
        },
    };
    if let Some(order_id) = match &body {
        EventBody::OrderPlaced { order_id, .. }
        | EventBody::OrderCancelled { order_id, .. }
        | EventBody::OrderShipped { order_id, .. } => Some(order_id),
        _ => None,
    } && (order_id.is_empty() || order_id.len() > MAX_ID_BYTES)
    {
        return Err(DecodeError::field_err("order_id", "must be 1–256 bytes"));
    }
    let ingested_at = raw.ingested_at.and_then(|s| s.0);
    Ok(Event { id: raw.id, sku: raw.sku, ts: raw.ts, ingested_at, body })
}

/// The slow path: find which field made serde reject the document.
fn diagnose(bytes: &[u8], err: serde_json::Error) -> DecodeError {
    use serde_json::Value;
    let value: Value = match serde_json::from_slice(bytes) {
        Ok(v) => v,
        Err(e) => return DecodeError::Json(e.to_string()),
    };
    let Value::Object(map) = value else {
        return DecodeError::field_err("$", "expected a JSON object");
    };
    let string = |v: &Value| v.is_string();
    let integer = |v: &Value| v.is_i64();
    // (field, required, type check, what it must be)
    type Check = (&'static str, bool, fn(&Value) -> bool, &'static str);
    let checks: [Check; 12] = [
        ("id", true, string, "must be a string"),
        ("type", true, string, "must be a string"),
        ("sku", true, string, "must be a string"),
        ("ts", true, integer, "must be an integer (Unix epoch milliseconds)"),
        ("qty", false, integer, "must be an integer"),
        ("shipped_total", false, integer, "must be an integer"),
        ("order_id", false, string, "must be a string"),
        ("delta", false, integer, "must be an integer"),
        ("on_hand", false, integer, "must be an integer"),
        ("unit_price", false, string, "must be a decimal string such as \"19.99\""),
        ("unit_cost", false, string, "must be a decimal string such as \"4.10\""),
        ("currency", false, string, "must be a string"),
    ];
    for (field, needed, ok, reason) in checks {
        match map.get(field) {
            None if needed => return DecodeError::field_err(field, "is required"),
            Some(Value::Null) if needed => return DecodeError::field_err(field, "is required"),
            Some(Value::Null) | None => {}
            Some(v) if !ok(v) => return DecodeError::field_err(field, reason),
            Some(_) => {}
        }
    }
    if let Some(Value::String(t)) = map.get("type") {
        return DecodeError::field_err(
            "type",
            format!(
                "unknown type {t:?}; expected one of order_placed, order_cancelled, order_shipped, stock_received, stock_adjusted, stock_counted"
            ),
        );
    }
    DecodeError::field_err("$", err.to_string())
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(json: &str) -> Option<&'static str> {
        decode(json.as_bytes()).unwrap_err().field()
    }

    #[test]
    fn decodes_the_spec_example_borrowing_strings() {
        let json = r#"{"id":"ord:114-3941689-8772232:1:placed","type":"order_placed","sku":"MUG-BLUE-12OZ",
 "ts":1795773600123,"qty":2,"order_id":"114-3941689-8772232","unit_price":"19.99","currency":"USD","extra":[1]}"#;
        let ev = decode(json.as_bytes()).unwrap();
        assert!(matches!(ev.id, Cow::Borrowed(_)));
        assert_eq!(ev.sku, "MUG-BLUE-12OZ");
        assert_eq!(ev.ts, 1_795_773_600_123);
        let EventBody::OrderPlaced { qty, unit_price, order_id } = &ev.body else { panic!("{ev:?}") };
        assert!(matches!(order_id, Cow::Borrowed("114-3941689-8772232")), "optional strings borrowed too");
        assert_eq!(*qty, 2);
        assert_eq!(unit_price.unwrap().amount.to_string(), "19.99");
        let json = ev.to_json();
        let again = decode(json.as_bytes()).unwrap();
        assert_eq!(again, ev);
    }

    /// A string with an escape cannot be borrowed: it is decoded into its own, equal value.
    #[test]
    fn escaped_strings_are_owned_and_unescaped() {
        let json = r#"{"id":"a\u0031","type":"order_cancelled","sku":"S","ts":1795737600000,"order_id":"o\"1"}"#;
        let ev = decode(json.as_bytes()).unwrap();
        assert!(matches!(&ev.id, Cow::Owned(id) if id == "a1"));
        let EventBody::OrderCancelled { order_id, .. } = &ev.body else { panic!("{ev:?}") };
        assert!(matches!(order_id, Cow::Owned(o) if o == "o\"1"));
    }

    /// `ingested_at` is informational: an integer in `i64` is kept, any other value ignored
    /// (consumed whole, so the fields after it still read).
    #[test]
    fn ingested_at_is_kept_when_an_integer_and_ignored_otherwise() {
        let cases = [
            ("1795737600123", Some(1_795_737_600_123)),
            ("-5", Some(-5)),
            ("null", None),
            ("1.5", None),
            ("1e12", None),
            ("18446744073709551615", None),
            (r#""1795737600123""#, None),
            ("true", None),
            ("[1,[2,{\"a\":3}]]", None),
            (r#"{"a":{"b":[1]},"c":"d"}"#, None),
        ];
        for (value, want) in cases {
            let json = format!(
                r#"{{"id":"a","type":"stock_adjusted","ingested_at":{value},"sku":"S","ts":1795737600000,"delta":3}}"#
            );
            let ev = decode(json.as_bytes()).unwrap_or_else(|e| panic!("{value}: {e}"));
            assert_eq!(ev.ingested_at, want, "{value}");
            assert_eq!((ev.sku.as_ref(), &ev.body), ("S", &EventBody::StockAdjusted { delta: 3 }), "{value}");
        }
    }

    #[test]
    fn names_the_offending_field() {
        let base = r#""id":"a","sku":"S","ts":1795737600000"#;
        let cases = [
            (format!(r#"{{{base},"type":"order_placed","order_id":"o"}}"#), "qty"),
            (format!(r#"{{{base},"type":"order_placed","qty":0,"order_id":"o"}}"#), "qty"),
            (format!(r#"{{{base},"type":"order_placed","qty":"2","order_id":"o"}}"#), "qty"),
            (format!(r#"{{{base},"type":"order_placed","qty":1}}"#), "order_id"),
            (
                format!(r#"{{{base},"type":"order_placed","qty":1,"order_id":"o","unit_price":"x","currency":"USD"}}"#),
                "unit_price",
            ),
            (format!(r#"{{{base},"type":"order_placed","qty":1,"order_id":"o","unit_price":"1.5"}}"#), "currency"),
            (format!(r#"{{{base},"type":"stock_adjusted","delta":0}}"#), "delta"),
            (format!(r#"{{{base},"type":"stock_counted","on_hand":-1}}"#), "on_hand"),
            (format!(r#"{{{base},"type":"order_shipped","order_id":"o","qty":1,"shipped_total":2}}"#), "shipped_total"),
            (format!(r#"{{{base},"type":"stock_received","qty":1,"unit_cost":"2","currency":"usd"}}"#), "currency"),
            (format!(r#"{{{base},"type":"teleported"}}"#), "type"),
            (r#"{"id":"a","type":"stock_adjusted","sku":"S","ts":1.5,"delta":1}"#.to_string(), "ts"),
            (r#"{"id":"a","type":"stock_adjusted","ts":1795737600000,"delta":1}"#.to_string(), "sku"),
            (r#"{"id":"","type":"stock_adjusted","sku":"S","ts":1795737600000,"delta":1}"#.to_string(), "id"),
            (r#"{"id":"a","type":"stock_adjusted","sku":"S\u0007","ts":1795737600000,"delta":1}"#.to_string(), "sku"),
            (
                format!(
                    r#"{{"id":"a","type":"stock_adjusted","sku":"{}","ts":1795737600000,"delta":1}}"#,
                    "x".repeat(65)
                ),
                "sku",
            ),
            ("[1,2]".to_string(), "$"),
            // SPEC v2 bounds.
            (format!(r#"{{{base},"type":"order_placed","qty":1000000001,"order_id":"o"}}"#), "qty"),
            (format!(r#"{{{base},"type":"order_placed","qty":9223372036854775807,"order_id":"o"}}"#), "qty"),
            (
                format!(r#"{{{base},"type":"order_shipped","order_id":"o","shipped_total":1000000001}}"#),
                "shipped_total",
            ),
            (format!(r#"{{{base},"type":"order_cancelled","order_id":"o","qty":1000000001}}"#), "qty"),
            (format!(r#"{{{base},"type":"stock_counted","on_hand":1000000001}}"#), "on_hand"),
            (format!(r#"{{{base},"type":"stock_adjusted","delta":-1000000001}}"#), "delta"),
            (format!(r#"{{{base},"type":"stock_adjusted","delta":1000000001}}"#), "delta"),
            (r#"{"id":"a","type":"stock_adjusted","sku":"S","ts":1795737600,"delta":1}"#.to_string(), "ts"),
            (r#"{"id":"a","type":"stock_adjusted","sku":"S","ts":946684799999,"delta":1}"#.to_string(), "ts"),
            (r#"{"id":"a","type":"stock_adjusted","sku":"S","ts":4102444800000,"delta":1}"#.to_string(), "ts"),
            (r#"{"id":"a","type":"stock_adjusted","sku":"S","ts":-1,"delta":1}"#.to_string(), "ts"),
        ];
        for (json, field) in cases {
            assert_eq!(field_of(&json), Some(field), "{json}");
        }
        assert!(matches!(decode(b"{not json"), Err(DecodeError::Json(_))));
        // The bounds themselves are accepted.
        for ok in [
            format!(r#"{{{base},"type":"order_placed","qty":1000000000,"order_id":"o"}}"#),
            format!(r#"{{{base},"type":"stock_adjusted","delta":-1000000000}}"#),
            format!(r#"{{{base},"type":"stock_counted","on_hand":1000000000}}"#),
            r#"{"id":"a","type":"stock_adjusted","sku":"S","ts":946684800000,"delta":1}"#.to_string(),
            r#"{"id":"a","type":"stock_adjusted","sku":"S","ts":4102444799999,"delta":1}"#.to_string(),
        ] {
            assert!(decode(ok.as_bytes()).is_ok(), "{ok}");
        }
    }

    #[test]
    fn amounts_are_plain_exact_decimals() {
        for ok in ["0", "19.99", "007.50", "0.0000000000000000000000000001", "9999999999999999999999999999"] {
            assert_eq!(
                parse_amount(ok).map(|d| d.to_string()),
                Some(ok.parse::<Decimal>().unwrap().to_string()),
                "{ok}"
            );
        }
        assert_eq!(parse_amount("1.0000000000000000000000000000"), None, "29 digits");
        for bad in ["", ".99", "9.", "+9.99", "-1", "1_000", "1e3", " 1", "1.2.3", "0.00000000000000000000000000001"] {
            assert_eq!(parse_amount(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn shipped_forms() {
        let ev = decode(
            br#"{"id":"a","type":"order_shipped","sku":"S","ts":1795737600000,"order_id":"o","shipped_total":3}"#,
        )
        .unwrap();
        assert!(matches!(ev.body, EventBody::OrderShipped { shipped: Shipped::Total(3), .. }));
        let ev = decode(br#"{"id":"a","type":"order_shipped","sku":"S","ts":1795737600000,"order_id":"o"}"#).unwrap();
        assert!(matches!(ev.body, EventBody::OrderShipped { shipped: Shipped::Qty(None), .. }));
    }
}
