//! The SP-API form of a generated stream: each canonical record as the webhook a seller's systems
//! would actually receive — Amazon's `ORDER_CHANGE` and `FBA_INVENTORY_AVAILABILITY_CHANGES`
//! notifications, the manufacturer's `goods_received` documents — and, for what has no such form
//! (adjustments, bad records), the canonical event itself.
//!
//! One line per delivery: `{"route":"amazon"|"manufacturer"|"events","key":SKU,"body":"…"}`, the
//! body as the sender's JSON text (a string, so a truncated bad record stays as it was). The ingest
//! maps each notification to canonical events with ids from business keys (`ord:{order}:{item}:…`),
//! so a notification can become two events (placed and shipped) and a re-sent one deduplicates.
//! The expected result is the straight pass over what the ingest's own mappings make of the lines.

use std::borrow::Cow;
use std::collections::HashMap;
use std::io::Write;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::ingest::AmazonConfig;
use crate::ingest::amazon::{Mapped, map_notification};
use crate::loadtest::generate::Stream;

/// The file name of the SP-API form.
pub const FILE: &str = "webhooks.ndjson";

/// The marketplace the generated FBA notifications report.
const MARKETPLACE: &str = "ATVPDKIKX0DER";

/// One webhook delivery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery<'a> {
    /// `amazon`, `manufacturer` or `events`.
    #[serde(borrow)]
    pub route: Cow<'a, str>,
    /// The SKU (the replay's lane; the ingest keys the stream by it too).
    #[serde(borrow)]
    pub key: Cow<'a, str>,
    /// The body as sent.
    #[serde(borrow)]
    pub body: Cow<'a, str>,
}

/// The ingest path of a route.
pub fn path(route: &str) -> &'static str {
    match route {
        "amazon" => "/v1/amazon/notifications",
        "manufacturer" => "/v1/manufacturer/events",
        _ => "/v1/events",
    }
}

/// Writes the stream's deliveries as NDJSON.
pub fn write(stream: &Stream, mut out: impl Write) -> std::io::Result<()> {
    let mut open: HashMap<String, (i64, i64)> = HashMap::new();
    for (key, payload) in stream.iter() {
        let (route, body) = convert(payload, &mut open);
        serde_json::to_writer(&mut out, &Delivery { route: route.into(), key: key.into(), body: body.into() })?;
        out.write_all(b"\n")?;
    }
    out.flush()
}

/// One canonical record as a webhook: (route, body). `open` remembers each order line's quantity
/// and units shipped (an ORDER_CHANGE states both with every status; a placement seen again is
/// Amazon re-notifying the order in its current status).
fn convert(payload: &[u8], open: &mut HashMap<String, (i64, i64)>) -> (&'static str, String) {
    let as_is = || ("events", String::from_utf8_lossy(payload).into_owned());
    let Ok(v) = serde_json::from_slice::<Value>(payload) else { return as_is() };
    let (Some(kind), Some(sku), Some(ts)) = (v["type"].as_str(), v["sku"].as_str(), v["ts"].as_i64()) else {
        return as_is();
    };
    let order = v["order_id"].as_str().and_then(|o| o.rsplit_once(':').map(|(o, i)| (o.to_string(), i.to_string())));
    match (kind, order) {
        ("order_placed", Some((o, i))) => {
            let Some(qty) = v["qty"].as_i64().filter(|q| *q >= 1) else { return as_is() };
            let (qty, shipped) = *open.entry(format!("{o}:{i}")).or_insert((qty, 0));
            let status = match shipped {
                0 => "Unshipped",
                s if s < qty => "PartiallyShipped",
                _ => "Shipped",
            };
            ("amazon", order_change(&o, &i, sku, ts, status, qty, shipped))
        }
        ("order_shipped", Some((o, i))) => {
            let Some(line) = open.get_mut(&format!("{o}:{i}")) else { return as_is() };
            let qty = line.0;
            let shipped = v["shipped_total"].as_i64().unwrap_or(qty);
            line.1 = line.1.max(shipped);
            let status = if shipped < qty { "PartiallyShipped" } else { "Shipped" };
            ("amazon", order_change(&o, &i, sku, ts, status, qty, shipped))
        }
        ("order_cancelled", Some((o, i))) => {
            let qty = open.get(&format!("{o}:{i}")).map_or(1, |l| l.0);
            ("amazon", order_change(&o, &i, sku, ts, "Canceled", qty, 0))
        }
        ("stock_counted", _) => {
            let Some(on_hand) = v["on_hand"].as_i64() else { return as_is() };
            let n = json!({
                "NotificationVersion": "1.0",
                "NotificationType": "FBA_INVENTORY_AVAILABILITY_CHANGES",
                "PayloadVersion": "1.0",
                "EventTime": iso(ts),
                "Payload": {
                    "SKU": sku,
                    "FNSKU": format!("X00{:07}", fnv(sku) % 10_000_000),
                    "ASIN": format!("B0{:08}", fnv(sku) % 100_000_000),
                    "FulfillmentInventoryByMarketplace": [{
                        "MarketplaceId": MARKETPLACE,
                        "FulfillmentInventory": {
                            "Fulfillable": on_hand,
                            "ReservedQuantityBreakdown": { "PendingCustomerOrder": 0 }
                        }
                    }]
                },
                "NotificationMetadata": metadata(ts, payload),
            });
            ("amazon", n.to_string())
        }
        ("stock_received", _) => {
            let Some(qty) = v["qty"].as_i64() else { return as_is() };
            let mut line = json!({ "sku": sku, "qty": qty });
            if let Some(c) = v["unit_cost"].as_str() {
                line["unit_cost"] = json!(c);
            }
            let mut doc = json!({
                "type": "goods_received",
                "receipt_id": v["id"].as_str().unwrap_or("grn"),
                "received_at": iso(ts),
                "lines": [line],
            });
            if let Some(c) = v["currency"].as_str() {
                doc["currency"] = json!(c);
            }
            ("manufacturer", doc.to_string())
        }
        _ => as_is(),
    }
}

fn order_change(order: &str, item: &str, sku: &str, ts: i64, status: &str, qty: i64, shipped: i64) -> String {
    json!({
        "NotificationVersion": "1.0",
        "NotificationType": "ORDER_CHANGE",
        "PayloadVersion": "1.0",
        "EventTime": iso(ts),
        "Payload": {
            "OrderChangeNotification": {
                "NotificationLevel": "OrderLevel",
                "SellerId": "A3STOCKFLOWDEMO",
                "AmazonOrderId": order,
                "OrderChangeType": "OrderStatusChange",
                "OrderChangeTrigger": { "TimeOfOrderChange": iso(ts), "ChangeReason": "OrderStatusChange" },
                "Summary": {
                    "MarketplaceId": MARKETPLACE,
                    "OrderStatus": status,
                    "FulfillmentType": "MFN",
                    "OrderItems": [{
                        "OrderItemId": item,
                        "SellerSKU": sku,
                        "Quantity": qty,
                        "QuantityShipped": shipped
                    }]
                }
            }
        },
        "NotificationMetadata": metadata(ts, format!("{order}:{item}:{status}:{shipped}").as_bytes()),
    })
    .to_string()
}

fn metadata(ts: i64, seed: &[u8]) -> Value {
    json!({
        "ApplicationId": "amzn1.sellerapps.app.stockflow-loadgen",
        "SubscriptionId": "7d0c2a4e-0000-4000-8000-000000000001",
        "PublishTime": iso(ts),
        "NotificationId": format!("{:016x}-{:016x}", fnv(&String::from_utf8_lossy(seed)), ts),
    })
}

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// Epoch milliseconds as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub fn iso(ms: i64) -> String {
    let rem = ms.rem_euclid(86_400_000);
    format!(
        "{}T{:02}:{:02}:{:02}.{:03}Z",
        stockflow_connectors::accounting::date_of(ms),
        rem / 3_600_000,
        rem / 60_000 % 60,
        rem / 1000 % 60,
        rem % 1000
    )
}

/// What the ingest puts on the stream for each delivery, in order: the canonical events of a
/// mapped notification or document (none for an ignored one), the body of a canonical event, and
/// for a delivery the ingest refuses, its body as is (the straight pass counts it as bad).
pub fn canonical_records(deliveries: &[Delivery<'_>], amazon: &AmazonConfig) -> Vec<Vec<u8>> {
    let mut out = Vec::with_capacity(deliveries.len() * 2);
    for d in deliveries {
        let refused = || vec![d.body.as_bytes().to_vec()];
        let mapped: Vec<Vec<u8>> = match d.route.as_ref() {
            "amazon" => match serde_json::from_str::<Value>(&d.body).map(|v| map_notification(&v, amazon)) {
                Ok(Ok(Mapped::Events(events))) => events.into_iter().map(|c| c.json.into_bytes()).collect(),
                Ok(Ok(Mapped::Ignored(_))) => Vec::new(),
                _ => refused(),
            },
            "manufacturer" => {
                match serde_json::from_str::<Value>(&d.body).map(|v| crate::ingest::manufacturer::map_document(&v)) {
                    Ok(Ok(events)) => events.into_iter().map(|c| c.json.into_bytes()).collect(),
                    _ => refused(),
                }
            }
            _ => refused(),
        };
        out.extend(mapped);
    }
    out
}

/// The straight pass over what the ingest makes of the deliveries: the expected result of the
/// SP-API form.
pub fn straight_pass(
    deliveries: &[Delivery<'_>],
    engine: std::sync::Arc<stockflow_state::EngineConfig>,
    amazon: &AmazonConfig,
) -> stockflow_state::reference::Outcome {
    let records = canonical_records(deliveries, amazon);
    stockflow_state::reference::straight_pass(engine, records.iter().map(Vec::as_slice))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loadtest::generate::{GenConfig, generate};

    #[test]
    fn iso_round_trips_through_the_ingest_parser() {
        for ms in [0, 1_795_737_600_000, 1_795_824_000_123, 951_782_400_000 /* 2000-02-29 */, -86_400_001] {
            assert_eq!(crate::ingest::time::parse_millis(&iso(ms)), Some(ms), "{}", iso(ms));
        }
        assert_eq!(iso(1_795_737_600_000), "2026-11-27T00:00:00.000Z");
    }

    #[test]
    fn the_sp_api_form_maps_to_the_same_stock_as_the_canonical_stream() {
        let stream = generate(&GenConfig { events: 6_000, skus: 60, seed: 4, ..GenConfig::default() });
        let mut buf = Vec::new();
        write(&stream, &mut buf).unwrap();
        let deliveries: Vec<Delivery<'_>> =
            buf.split(|b| *b == b'\n').filter(|l| !l.is_empty()).map(|l| serde_json::from_slice(l).unwrap()).collect();
        assert_eq!(deliveries.len(), stream.len());
        let amazon = deliveries.iter().filter(|d| d.route == "amazon").count();
        let manufacturer = deliveries.iter().filter(|d| d.route == "manufacturer").count();
        assert!(amazon > stream.len() / 2 && manufacturer > 100, "{amazon} amazon, {manufacturer} manufacturer");
        let engine = std::sync::Arc::new(stockflow_state::EngineConfig::default());
        let mapped = straight_pass(&deliveries, engine.clone(), &AmazonConfig::default());
        let canonical = stockflow_state::reference::straight_pass(engine, stream.iter().map(|(_, p)| p));
        // Same units per SKU (ids, prices and count sources differ by form; stock must not).
        let units = |o: &stockflow_state::reference::Outcome| {
            o.skus.iter().map(|s| (s.sku.clone(), s.on_hand, s.reserved)).collect::<Vec<_>>()
        };
        assert_eq!(units(&mapped), units(&canonical));
        assert_eq!(mapped.dead_letters, canonical.dead_letters, "the bad records stay bad");
    }
}
