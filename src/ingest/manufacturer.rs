//! Manufacturer events → canonical events.
//!
//! Two documents, sent one at a time, as a JSON array or as NDJSON:
//!
//! ```json
//! {"type":"goods_received","receipt_id":"GRN-2026-1001","received_at":"2026-11-27T08:00:00Z",
//!  "currency":"USD","lines":[{"sku":"MUG-BLUE-12OZ","qty":120,"unit_cost":"4.20"}]}
//! {"type":"stock_report","report_id":"RPT-88","counted_at":"2026-11-27T06:00:00Z",
//!  "counts":[{"sku":"MUG-BLUE-12OZ","on_hand":340}]}
//! ```
//!
//! A receipt line becomes `stock_received` with id `mfr:rcv:{receipt_id}:{line}` (`line` defaults to
//! the 1-based position); a count becomes `stock_counted` with id `mfr:cnt:{report_id}:{sku}`. Ids
//! come from the manufacturer's own document keys, so a re-sent document deduplicates.

use std::borrow::Cow;
use std::collections::HashSet;
use std::str::FromStr;

use rust_decimal::Decimal;
use serde_json::Value;
use stockflow_state::Event;
use stockflow_state::event::EventBody;
use stockflow_state::money::{Currency, Money};

use super::time::parse_millis;
use super::{Canonical, MapError};

/// Maps one manufacturer document.
pub fn map_document(doc: &Value) -> Result<Vec<Canonical>, MapError> {
    let kind =
        doc.get("type").and_then(Value::as_str).ok_or_else(|| MapError::new("type", "missing or not a string"))?;
    match kind {
        "goods_received" => goods_received(doc),
        "stock_report" => stock_report(doc),
        other => Err(MapError::new("type", format!("{other:?}: expected goods_received or stock_report"))),
    }
}

fn goods_received(doc: &Value) -> Result<Vec<Canonical>, MapError> {
    let receipt = text(doc, "receipt_id", "receipt_id")?;
    let ts = time(doc, "received_at")?;
    let currency = match doc.get("currency") {
        None | Some(Value::Null) => None,
        Some(c) => Some(
            c.as_str().and_then(Currency::parse).ok_or_else(|| MapError::new("currency", "not an ISO 4217 code"))?,
        ),
    };
    let lines = list(doc, "lines")?;
    let mut seen = HashSet::with_capacity(lines.len());
    let mut out = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        let path = |f: &str| format!("lines[{i}].{f}");
        let sku = text(line, "sku", &path("sku"))?;
        let qty = count(line, "qty", &path("qty"))?;
        if qty == 0 {
            return Err(MapError::new(path("qty"), "must be ≥ 1"));
        }
        let number = match line.get("line") {
            None | Some(Value::Null) => (i + 1) as i64,
            Some(_) => count(line, "line", &path("line"))?,
        };
        if !seen.insert(number) {
            return Err(MapError::new(path("line"), format!("line {number} appears twice in receipt {receipt}")));
        }
        let unit_cost = match line.get("unit_cost") {
            None | Some(Value::Null) => None,
            Some(v) => {
                let amount = decimal(v).ok_or_else(|| MapError::new(path("unit_cost"), "not a decimal ≥ 0"))?;
                let currency = currency.ok_or_else(|| MapError::new("currency", "required with a unit_cost"))?;
                Some(Money { amount, currency })
            }
        };
        let id = format!("mfr:rcv:{receipt}:{number}");
        out.push(canonical(&id, sku, ts, EventBody::StockReceived { qty, unit_cost }, &path("sku"))?);
    }
    Ok(out)
}

fn stock_report(doc: &Value) -> Result<Vec<Canonical>, MapError> {
    let report = text(doc, "report_id", "report_id")?;
    let ts = time(doc, "counted_at")?;
    let counts = list(doc, "counts")?;
    let mut seen = HashSet::with_capacity(counts.len());
    let mut out = Vec::with_capacity(counts.len());
    for (i, c) in counts.iter().enumerate() {
        let path = |f: &str| format!("counts[{i}].{f}");
        let sku = text(c, "sku", &path("sku"))?;
        if !seen.insert(sku) {
            return Err(MapError::new(path("sku"), format!("{sku} is counted twice in report {report}")));
        }
        let on_hand = count(c, "on_hand", &path("on_hand"))?;
        let id = format!("mfr:cnt:{report}:{sku}");
        out.push(canonical(&id, sku, ts, EventBody::StockCounted { on_hand }, &path("sku"))?);
    }
    Ok(out)
}

fn canonical(id: &str, sku: &str, ts: i64, body: EventBody<'_>, sku_field: &str) -> Result<Canonical, MapError> {
    let ev = Event { id: Cow::Borrowed(id), sku: Cow::Borrowed(sku), ts, ingested_at: None, body };
    super::amazon::validated(ev, sku_field)
}

fn text<'v>(v: &'v Value, key: &str, path: &str) -> Result<&'v str, MapError> {
    match v.get(key) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s),
        Some(Value::String(_)) => Err(MapError::new(path, "empty")),
        Some(_) => Err(MapError::new(path, "not a string")),
        None => Err(MapError::new(path, "missing")),
    }
}

fn time(doc: &Value, key: &str) -> Result<i64, MapError> {
    let raw = text(doc, key, key)?;
    parse_millis(raw).ok_or_else(|| MapError::new(key, format!("{raw:?} is not an ISO 8601 timestamp")))
}

fn list<'v>(doc: &'v Value, key: &str) -> Result<&'v Vec<Value>, MapError> {
    match doc.get(key).and_then(Value::as_array) {
        Some(l) if !l.is_empty() => Ok(l),
        Some(_) => Err(MapError::new(key, "empty")),
        None => Err(MapError::new(key, "missing or not an array")),
    }
}

fn count(v: &Value, key: &str, path: &str) -> Result<i64, MapError> {
    match v.get(key).and_then(Value::as_i64) {
        Some(n) if n >= 0 => Ok(n),
        Some(_) | None => Err(MapError::new(path, "missing or not an integer ≥ 0")),
    }
}

/// A decimal given as a string (preferred: exact) or a JSON number.
fn decimal(v: &Value) -> Option<Decimal> {
    let d = match v {
        Value::String(s) => Decimal::from_str(s.trim()).ok()?,
        Value::Number(n) => Decimal::from_str(&n.to_string()).ok()?,
        _ => return None,
    };
    (!d.is_sign_negative()).then_some(d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ids(v: &[Canonical]) -> Vec<serde_json::Value> {
        v.iter().map(|c| serde_json::from_str(&c.json).unwrap()).collect()
    }

    #[test]
    fn receipts_and_reports_become_received_and_counted() {
        let doc = json!({"type": "goods_received", "receipt_id": "GRN-1", "received_at": "2026-11-27T08:00:00Z",
            "currency": "USD", "lines": [{"sku": "MUG", "qty": 120, "unit_cost": "4.20"},
                                         {"sku": "CAP", "qty": 5, "line": 7}]});
        let ev = ids(&map_document(&doc).unwrap());
        assert_eq!(ev[0]["id"], "mfr:rcv:GRN-1:1");
        assert_eq!((ev[0]["type"].as_str(), ev[0]["qty"].as_i64()), (Some("stock_received"), Some(120)));
        assert_eq!((ev[0]["unit_cost"].as_str(), ev[0]["currency"].as_str()), (Some("4.20"), Some("USD")));
        assert_eq!(ev[1]["id"], "mfr:rcv:GRN-1:7");
        let doc = json!({"type": "stock_report", "report_id": "R-9", "counted_at": "2026-11-27T06:00:00Z",
            "counts": [{"sku": "MUG", "on_hand": 0}]});
        let ev = ids(&map_document(&doc).unwrap());
        assert_eq!((ev[0]["id"].as_str(), ev[0]["on_hand"].as_i64()), (Some("mfr:cnt:R-9:MUG"), Some(0)));
    }

    #[test]
    fn mistakes_are_named() {
        let field = |d: serde_json::Value| map_document(&d).unwrap_err().field;
        let base = json!({"type": "goods_received", "receipt_id": "G", "received_at": "2026-11-27T08:00:00Z",
            "lines": [{"sku": "MUG", "qty": 1, "unit_cost": "4.20"}]});
        assert_eq!(field(base.clone()), "currency");
        let mut d = base.clone();
        d["lines"][0]["qty"] = json!(0);
        assert_eq!(field(d), "lines[0].qty");
        let mut d = base.clone();
        d["lines"][0]["unit_cost"] = json!("-1");
        d["currency"] = json!("USD");
        assert_eq!(field(d), "lines[0].unit_cost");
        let mut d = base;
        d["received_at"] = json!(1);
        assert_eq!(field(d), "received_at");
        assert_eq!(field(json!({"type": "stock_reprot"})), "type");
        let dup = json!({"type": "stock_report", "report_id": "R", "counted_at": "2026-11-27T06:00:00Z",
            "counts": [{"sku": "A", "on_hand": 1}, {"sku": "A", "on_hand": 2}]});
        assert_eq!(field(dup), "counts[1].sku");
    }
}
