//! Amazon Selling Partner API notifications → canonical events (SPEC §5).
//!
//! | notification | canonical events |
//! |---|---|
//! | `ORDER_CHANGE`, per order item, status ≠ `Canceled`, `Quantity` ≥ 1 | `order_placed` `ord:{order}:{item}:placed`, qty = `Quantity` |
//! | … and `QuantityShipped` ≥ 1 | also `order_shipped` `ord:{order}:{item}:shipped:{n}`, shipped_total = n |
//! | `ORDER_CHANGE`, status `Canceled` (or an item's `Quantity` 0) | `order_cancelled` `ord:{order}:{item}:cancelled` |
//! | `FBA_INVENTORY_AVAILABILITY_CHANGES` | `stock_counted`, on_hand = `Fulfillable` + `PendingCustomerOrder` of the marketplace |
//! | `LISTINGS_ITEM_MFN_QUANTITY_CHANGE` | `stock_counted`, on_hand = `Quantity` |
//! | anything else | nothing (answered 2xx and counted as ignored) |
//!
//! Ids come from business keys (order, item, transition; SKU, marketplace, time, count), never
//! from `NotificationId`, so a notification Amazon delivers twice deduplicates downstream.

use std::borrow::Cow;

use serde_json::Value;
use stockflow_state::Event;
use stockflow_state::event::{EventBody, Shipped};

use super::time::parse_millis;
use super::{Canonical, MapError};

/// How notifications are read.
#[derive(Debug, Clone, Default)]
pub struct AmazonConfig {
    /// The marketplace whose FBA availability counts (`ATVPDKIKX0DER` for amazon.com). When unset,
    /// a notification about one marketplace counts and one about several is refused (which
    /// marketplace's stock is this seller's would be a guess).
    pub marketplace_id: Option<String>,
}

/// What one notification becomes.
#[derive(Debug, PartialEq, Eq)]
pub enum Mapped {
    /// Canonical events to put, in order.
    Events(Vec<Canonical>),
    /// A notification type stockflow does not act on (named).
    Ignored(String),
}

/// The notification types stockflow maps.
pub const MAPPED_TYPES: [&str; 3] =
    ["ORDER_CHANGE", "FBA_INVENTORY_AVAILABILITY_CHANGES", "LISTINGS_ITEM_MFN_QUANTITY_CHANGE"];

/// Maps one SP-API notification (the envelope with `NotificationType` and `Payload`).
pub fn map_notification(n: &Value, cfg: &AmazonConfig) -> Result<Mapped, MapError> {
    let kind = str_at(n, "NotificationType", &["NotificationType"])?;
    let payload = at(n, "Payload", &["Payload"])?;
    let ts = event_time(n)?;
    match kind {
        "ORDER_CHANGE" => order_change(payload, ts).map(Mapped::Events),
        "FBA_INVENTORY_AVAILABILITY_CHANGES" => fba_availability(payload, ts, cfg).map(Mapped::Events),
        "LISTINGS_ITEM_MFN_QUANTITY_CHANGE" => mfn_quantity(payload, ts).map(Mapped::Events),
        other => Ok(Mapped::Ignored(other.to_string())),
    }
}

/// `EventTime`, else `NotificationMetadata.PublishTime`, in epoch milliseconds.
fn event_time(n: &Value) -> Result<i64, MapError> {
    let (field, raw) = match n.get("EventTime").and_then(Value::as_str) {
        Some(t) => ("EventTime", t),
        None => match n.pointer("/NotificationMetadata/PublishTime").and_then(Value::as_str) {
            Some(t) => ("NotificationMetadata.PublishTime", t),
            None => return Err(MapError::new("EventTime", "missing (and no NotificationMetadata.PublishTime)")),
        },
    };
    parse_millis(raw).ok_or_else(|| MapError::new(field, format!("{raw:?} is not an ISO 8601 timestamp")))
}

fn order_change(payload: &Value, ts: i64) -> Result<Vec<Canonical>, MapError> {
    const BASE: &str = "Payload.OrderChangeNotification";
    let ocn = at(payload, BASE, &["OrderChangeNotification"])?;
    let order = str_at(ocn, &format!("{BASE}.AmazonOrderId"), &["AmazonOrderId"])?;
    let status = str_at(ocn, &format!("{BASE}.Summary.OrderStatus"), &["Summary", "OrderStatus"])?;
    let items = ocn
        .pointer("/Summary/OrderItems")
        .and_then(Value::as_array)
        .ok_or_else(|| MapError::new(format!("{BASE}.Summary.OrderItems"), "missing or not an array"))?;
    let cancelled_order = status == "Canceled";
    let mut out = Vec::with_capacity(items.len() * 2);
    for (i, item) in items.iter().enumerate() {
        let path = |f: &str| format!("{BASE}.Summary.OrderItems[{i}].{f}");
        let item_id = str_at(item, &path("OrderItemId"), &["OrderItemId"])?;
        let sku = str_at(item, &path("SellerSKU"), &["SellerSKU"])?;
        let qty = count_at(item, &path("Quantity"), "Quantity")?;
        let shipped = match item.get("QuantityShipped") {
            None | Some(Value::Null) => 0,
            Some(_) => count_at(item, &path("QuantityShipped"), "QuantityShipped")?,
        };
        let order_id = format!("{order}:{item_id}");
        let id = |suffix: &str| format!("ord:{order_id}:{suffix}");
        if cancelled_order || qty == 0 {
            let body = EventBody::OrderCancelled { order_id: Cow::Borrowed(&order_id), qty: None };
            out.push(canonical(&id("cancelled"), sku, ts, body, &path("SellerSKU"))?);
            continue;
        }
        let body = EventBody::OrderPlaced { order_id: Cow::Borrowed(&order_id), qty, unit_price: None };
        out.push(canonical(&id("placed"), sku, ts, body, &path("SellerSKU"))?);
        if shipped > 0 {
            let body = EventBody::OrderShipped { order_id: Cow::Borrowed(&order_id), shipped: Shipped::Total(shipped) };
            out.push(canonical(&id(&format!("shipped:{shipped}")), sku, ts, body, &path("SellerSKU"))?);
        }
    }
    Ok(out)
}

fn fba_availability(payload: &Value, ts: i64, cfg: &AmazonConfig) -> Result<Vec<Canonical>, MapError> {
    let sku = str_at(payload, "Payload.SKU", &["SKU"])?;
    let markets = payload
        .get("FulfillmentInventoryByMarketplace")
        .and_then(Value::as_array)
        .ok_or_else(|| MapError::new("Payload.FulfillmentInventoryByMarketplace", "missing or not an array"))?;
    let chosen = match &cfg.marketplace_id {
        Some(want) => markets.iter().position(|m| m.get("MarketplaceId").and_then(Value::as_str) == Some(want)),
        None if markets.len() > 1 => {
            return Err(MapError::new(
                "Payload.FulfillmentInventoryByMarketplace",
                format!("{} marketplaces and none configured: set ingest.marketplace_id", markets.len()),
            ));
        }
        None => (!markets.is_empty()).then_some(0),
    };
    // A notification about another marketplace says nothing about this seller's stock here.
    let Some(i) = chosen else { return Ok(Vec::new()) };
    let base = format!("Payload.FulfillmentInventoryByMarketplace[{i}]");
    let market = str_at(&markets[i], &format!("{base}.MarketplaceId"), &["MarketplaceId"])?;
    let inv = at(&markets[i], &format!("{base}.FulfillmentInventory"), &["FulfillmentInventory"])?;
    let fulfillable = count_at(inv, &format!("{base}.FulfillmentInventory.Fulfillable"), "Fulfillable")?;
    let pending = match inv.pointer("/ReservedQuantityBreakdown/PendingCustomerOrder") {
        None | Some(Value::Null) => 0,
        Some(_) => count_at(
            &inv["ReservedQuantityBreakdown"],
            &format!("{base}.FulfillmentInventory.ReservedQuantityBreakdown.PendingCustomerOrder"),
            "PendingCustomerOrder",
        )?,
    };
    let on_hand = fulfillable.saturating_add(pending);
    let id = format!("fba:{sku}:{market}:{ts}:{on_hand}");
    Ok(vec![canonical(&id, sku, ts, EventBody::StockCounted { on_hand }, "Payload.SKU")?])
}

fn mfn_quantity(payload: &Value, ts: i64) -> Result<Vec<Canonical>, MapError> {
    let sku = str_at(payload, "Payload.Sku", &["Sku"])?;
    let on_hand = count_at(payload, "Payload.Quantity", "Quantity")?;
    let id = format!("mfn:{sku}:{ts}:{on_hand}");
    Ok(vec![canonical(&id, sku, ts, EventBody::StockCounted { on_hand }, "Payload.Sku")?])
}

fn canonical(id: &str, sku: &str, ts: i64, body: EventBody<'_>, sku_field: &str) -> Result<Canonical, MapError> {
    validated(Event { id: Cow::Borrowed(id), sku: Cow::Borrowed(sku), ts, ingested_at: None, body }, sku_field)
}

/// Serialises a mapped event and validates it with the stream's own decoder, so what is put is
/// exactly what the consumers accept; a SKU the decoder refuses is named by `sku_field`.
pub(super) fn validated(ev: Event<'_>, sku_field: &str) -> Result<Canonical, MapError> {
    let json = ev.to_json();
    match stockflow_state::decode(json.as_bytes()) {
        Ok(_) => Ok(Canonical { sku: ev.sku.into_owned(), json, ts: ev.ts }),
        Err(e) => {
            let field = match e.field() {
                Some("sku") => sku_field.to_string(),
                Some(f) => format!("(canonical).{f}"),
                None => "$".to_string(),
            };
            Err(MapError::new(field, e.to_string()))
        }
    }
}

fn at<'v>(v: &'v Value, path: &str, keys: &[&str]) -> Result<&'v Value, MapError> {
    let mut cur = v;
    for k in keys {
        cur = cur.get(k).filter(|x| !x.is_null()).ok_or_else(|| MapError::new(path, "missing"))?;
    }
    Ok(cur)
}

fn str_at<'v>(v: &'v Value, path: &str, keys: &[&str]) -> Result<&'v str, MapError> {
    let s = at(v, path, keys)?.as_str().ok_or_else(|| MapError::new(path, "not a string"))?;
    if s.is_empty() {
        return Err(MapError::new(path, "empty"));
    }
    Ok(s)
}

/// A non-negative integer field (Amazon sends counts as JSON numbers; some senders as strings).
fn count_at(v: &Value, path: &str, key: &str) -> Result<i64, MapError> {
    let raw = v.get(key).ok_or_else(|| MapError::new(path, "missing"))?;
    let n = match raw {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse::<i64>().ok(),
        _ => None,
    };
    match n {
        Some(n) if n >= 0 => Ok(n),
        _ => Err(MapError::new(path, format!("{raw} is not a count (an integer ≥ 0)"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn events(m: Mapped) -> Vec<serde_json::Value> {
        match m {
            Mapped::Events(v) => v.into_iter().map(|c| serde_json::from_str(&c.json).unwrap()).collect(),
            Mapped::Ignored(t) => panic!("ignored {t}"),
        }
    }

    fn order(status: &str, items: serde_json::Value) -> serde_json::Value {
        json!({
            "NotificationVersion": "1.0", "NotificationType": "ORDER_CHANGE", "PayloadVersion": "1.0",
            "EventTime": "2026-11-27T08:00:00.123Z",
            "Payload": {"OrderChangeNotification": {
                "NotificationLevel": "OrderItemLevel", "SellerId": "A3TH9S8BH6GOGM",
                "AmazonOrderId": "114-1", "OrderChangeType": "OrderStatusChange",
                "Summary": {"MarketplaceId": "ATVPDKIKX0DER", "OrderStatus": status, "OrderItems": items}}},
            "NotificationMetadata": {"NotificationId": "n-1"}
        })
    }

    #[test]
    fn order_change_places_ships_and_cancels_per_item() {
        let cfg = AmazonConfig::default();
        let items = json!([
            {"OrderItemId": "A", "SellerSKU": "MUG", "Quantity": 3, "QuantityShipped": 0},
            {"OrderItemId": "B", "SellerSKU": "MUG", "Quantity": 2, "QuantityShipped": 1}
        ]);
        let ev = events(map_notification(&order("PartiallyShipped", items.clone()), &cfg).unwrap());
        let ids: Vec<&str> = ev.iter().map(|e| e["id"].as_str().unwrap()).collect();
        assert_eq!(ids, ["ord:114-1:A:placed", "ord:114-1:B:placed", "ord:114-1:B:shipped:1"]);
        assert_eq!(ev[0]["qty"], 3);
        assert_eq!(ev[0]["order_id"], "114-1:A");
        assert_eq!(ev[2]["shipped_total"], 1);
        assert_eq!(ev[0]["ts"], 1_795_766_400_123i64);
        let ev = events(map_notification(&order("Canceled", items), &cfg).unwrap());
        let ids: Vec<&str> = ev.iter().map(|e| e["id"].as_str().unwrap()).collect();
        assert_eq!(ids, ["ord:114-1:A:cancelled", "ord:114-1:B:cancelled"]);
        assert_eq!(ev[0]["type"], "order_cancelled");
    }

    #[test]
    fn bad_notifications_name_the_field() {
        let cfg = AmazonConfig::default();
        let err = |n: serde_json::Value| map_notification(&n, &cfg).unwrap_err();
        let e = err(order("Unshipped", json!([{"OrderItemId": "A", "Quantity": 1}])));
        assert_eq!(e.field, "Payload.OrderChangeNotification.Summary.OrderItems[0].SellerSKU");
        let e = err(order("Unshipped", json!([{"OrderItemId": "A", "SellerSKU": "M", "Quantity": -1}])));
        assert_eq!(e.field, "Payload.OrderChangeNotification.Summary.OrderItems[0].Quantity");
        let long = "X".repeat(65);
        let e = err(order("Unshipped", json!([{"OrderItemId": "A", "SellerSKU": long, "Quantity": 1}])));
        assert_eq!(e.field, "Payload.OrderChangeNotification.Summary.OrderItems[0].SellerSKU");
        let mut n = order("Unshipped", json!([]));
        n["EventTime"] = json!("yesterday");
        assert_eq!(err(n).field, "EventTime");
        assert_eq!(err(json!({"Payload": {}})).field, "NotificationType");
    }

    #[test]
    fn fba_counts_add_back_pending_customer_orders_of_the_marketplace() {
        let n = json!({
            "NotificationVersion": "1.0", "NotificationType": "FBA_INVENTORY_AVAILABILITY_CHANGES",
            "PayloadVersion": "1.0", "EventTime": "2026-11-27T08:00:00Z",
            "Payload": {"SellerId": "S", "FNSKU": "X0", "ASIN": "B0", "SKU": "MUG",
                "FulfillmentInventoryByMarketplace": [
                    {"MarketplaceId": "A2EUQ1WTGCTBG2", "FulfillmentInventory": {"Fulfillable": 7}},
                    {"MarketplaceId": "ATVPDKIKX0DER", "FulfillmentInventory": {"Fulfillable": 40,
                        "ReservedQuantityBreakdown": {"PendingCustomerOrder": 5, "WarehouseProcessing": 1}}}]}
        });
        let us = AmazonConfig { marketplace_id: Some("ATVPDKIKX0DER".into()) };
        let ev = events(map_notification(&n, &us).unwrap());
        assert_eq!((ev.len(), ev[0]["on_hand"].as_i64(), ev[0]["type"].as_str()), (1, Some(45), Some("stock_counted")));
        let unset = map_notification(&n, &AmazonConfig::default()).unwrap_err();
        assert_eq!(unset.field, "Payload.FulfillmentInventoryByMarketplace", "two marketplaces, none configured");
        let mut one = n.clone();
        one["Payload"]["FulfillmentInventoryByMarketplace"].as_array_mut().unwrap().truncate(1);
        assert_eq!(events(map_notification(&one, &AmazonConfig::default()).unwrap())[0]["on_hand"], 7);
        let jp = AmazonConfig { marketplace_id: Some("A1VC38T7YXB528".into()) };
        assert_eq!(map_notification(&n, &jp).unwrap(), Mapped::Events(Vec::new()));
    }

    #[test]
    fn other_types_are_ignored_by_name() {
        let n = json!({"NotificationType": "ANY_OFFER_CHANGED", "EventTime": "2026-11-27T08:00:00Z", "Payload": {}});
        assert_eq!(
            map_notification(&n, &AmazonConfig::default()).unwrap(),
            Mapped::Ignored("ANY_OFFER_CHANGED".into())
        );
    }
}
