//! The manufacturer connector: batched reorder requests (from the low-stock effect) and a
//! batched stock-level sync, over the JSON API of `docs/connectors.md` (`docs/manufacturer.openapi.json`).
//!
//! Reorder quantity (SPEC §3, DOMAIN "inventory practice"): daily demand is the units ordered
//! over the last 24 h of event time; the manufacturer's lead time comes from its catalogue
//! (cached with a TTL); `quantity = max(ceil(demand × lead_time_days) + reorder_point −
//! available, min_order_qty, 1)`, rounded up to the case pack.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use hyper::Method;
use hyper::body::Bytes;
use serde::{Deserialize, Serialize};
use stockflow_state::effects::{EffectKind, EffectKinds, ReorderRequest};
use stockflow_state::outbox::Request;
use stockflow_state::{Effect, StateStore};
use tokio::sync::watch;

use crate::cache::TtlCache;
use crate::connector::{Connector, Delivered, DeliveryError, HttpClient, Secret, classify, excerpt, request_key};
use crate::policy::{Backoff, DeliveryPolicy};

/// What the manufacturer's catalogue says about a SKU (`GET /v1/catalog/{sku}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogItem {
    /// The SKU.
    pub sku: String,
    /// Days from order to delivery.
    pub lead_time_days: u32,
    /// Smallest order.
    #[serde(default = "one")]
    pub min_order_qty: u32,
    /// Orders are multiples of this.
    #[serde(default = "one")]
    pub case_pack: u32,
}

fn one() -> u32 {
    1
}

/// One reorder line of `POST /v1/reorders`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReorderLine {
    /// The effect id (`reorder:<event id>`): the manufacturer dedupes lines by it.
    pub id: String,
    /// The SKU.
    pub sku: String,
    /// Units to make.
    pub quantity: u64,
    /// Available when the reorder point was crossed.
    pub available: i64,
    /// The reorder point.
    pub reorder_point: i64,
    /// Units ordered over the last 24 h.
    pub units_ordered_24h: u64,
    /// The lead time used.
    pub lead_time_days: u32,
    /// Event time (Unix ms).
    pub ts: i64,
}

/// `POST /v1/reorders` body.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReorderBatch {
    /// The idempotency key (also sent as `Idempotency-Key`).
    pub batch_id: String,
    /// The lines.
    pub reorders: Vec<ReorderLine>,
}

/// One SKU of `POST /v1/stock-levels`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StockLevel {
    /// The SKU.
    pub sku: String,
    /// Units in stock.
    pub on_hand: i64,
    /// Units reserved by open orders.
    pub reserved: i64,
    /// `on_hand − reserved`.
    pub available: i64,
}

/// `POST /v1/stock-levels` body.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StockLevels {
    /// The idempotency key (also sent as `Idempotency-Key`).
    pub sync_id: String,
    /// Levels of the SKUs that changed since the last sync.
    pub levels: Vec<StockLevel>,
}

/// The answer to a batch: how many lines were taken, and the ones refused.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct BatchAnswer {
    /// Lines taken.
    #[serde(default)]
    pub accepted: usize,
    /// Lines refused, with the reason.
    #[serde(default)]
    pub rejected: Vec<LineRejection>,
}

/// A refused line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineRejection {
    /// Its id.
    pub id: String,
    /// Why.
    pub reason: String,
}

/// The reorder quantity for `r` given the catalogue entry.
pub fn reorder_quantity(r: &ReorderRequest, item: &CatalogItem) -> u64 {
    let demand = r.units_ordered_24h.saturating_mul(u64::from(item.lead_time_days));
    let need = i128::from(demand) + i128::from(r.reorder_point) - i128::from(r.available);
    let need = u64::try_from(need.max(0)).unwrap_or(u64::MAX);
    let qty = need.max(u64::from(item.min_order_qty)).max(1);
    let pack = u64::from(item.case_pack.max(1));
    qty.div_ceil(pack).saturating_mul(pack)
}

/// The manufacturer's API.
#[derive(Debug)]
pub struct Manufacturer {
    base: String,
    token: Secret,
    http: HttpClient,
    policy: DeliveryPolicy,
    catalog: TtlCache<String, CatalogItem>,
}

impl Manufacturer {
    /// A connector to the API at `base` (e.g. `https://api.maker.example`), with an optional
    /// bearer token, caching catalogue answers for `cache_ttl`.
    pub fn new(base: String, token: Secret, policy: DeliveryPolicy, cache_ttl: Duration) -> Self {
        Manufacturer {
            base: base.trim_end_matches('/').to_string(),
            token,
            http: HttpClient::new(policy.timeout),
            catalog: TtlCache::new("manufacturer", cache_ttl, 100_000),
            policy,
        }
    }

    fn headers(&self, key: Option<&str>) -> Vec<(&'static str, String)> {
        let mut h = vec![("accept", "application/json".to_string())];
        if !self.token.is_empty() {
            h.push(("authorization", format!("Bearer {}", self.token.expose())));
        }
        if let Some(k) = key {
            h.push(("idempotency-key", k.to_string()));
        }
        h
    }

    /// The catalogue entry of `sku` (cached).
    pub async fn catalog_item(&self, sku: &str) -> Result<CatalogItem, DeliveryError> {
        self.catalog
            .get_or_fetch(&sku.to_string(), || async {
                let url = format!("{}/v1/catalog/{}", self.base, percent_encode(sku));
                let resp = self.http.send(Method::GET, &url, &self.headers(None), Bytes::new()).await?;
                let resp = classify(resp, Duration::from_secs(5))?;
                serde_json::from_slice::<CatalogItem>(&resp.body).map_err(|e| {
                    DeliveryError::Rejected(format!("catalogue answer for {sku}: {e}: {}", excerpt(&resp.body)))
                })
            })
            .await
    }

    /// Posts one batch of stock levels under `key`.
    pub async fn send_levels(&self, body: &StockLevels) -> Result<BatchAnswer, DeliveryError> {
        let json = serde_json::to_vec(body).map_err(|e| DeliveryError::Rejected(e.to_string()))?;
        let url = format!("{}/v1/stock-levels", self.base);
        let resp = self.http.send(Method::POST, &url, &self.headers(Some(&body.sync_id)), Bytes::from(json)).await?;
        let resp = classify(resp, Duration::from_secs(5))?;
        Ok(serde_json::from_slice(&resp.body).unwrap_or_default())
    }
}

/// Percent-encodes a path segment (SKUs may hold `/`, spaces, anything printable).
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Connector for Manufacturer {
    fn name(&self) -> &'static str {
        "manufacturer"
    }

    fn kinds(&self) -> EffectKinds {
        EffectKinds::of(EffectKind::Reorder)
    }

    fn policy(&self) -> &DeliveryPolicy {
        &self.policy
    }

    async fn render(&self, batch: &[&Effect]) -> Result<Request, DeliveryError> {
        let mut reorders = Vec::with_capacity(batch.len());
        for effect in batch {
            let Effect::Reorder(r) = effect else {
                return Err(DeliveryError::Rejected(format!("{} is not a reorder", effect.id())));
            };
            let item = self.catalog_item(&r.sku).await?;
            reorders.push(ReorderLine {
                id: r.request_id.clone(),
                sku: r.sku.clone(),
                quantity: reorder_quantity(r, &item),
                available: r.available,
                reorder_point: r.reorder_point,
                units_ordered_24h: r.units_ordered_24h,
                lead_time_days: item.lead_time_days,
                ts: r.ts,
            });
        }
        let ids: Vec<&str> = batch.iter().map(|e| e.id()).collect();
        let key = request_key(self.name(), &ids);
        let body = serde_json::to_string(&ReorderBatch { batch_id: key.clone(), reorders })
            .map_err(|e| DeliveryError::Rejected(e.to_string()))?;
        Ok(Request { key, body, items: ids.into_iter().map(str::to_string).collect() })
    }

    async fn send(&self, request: &Request) -> Result<Delivered, DeliveryError> {
        let url = format!("{}/v1/reorders", self.base);
        let body = Bytes::from(request.body.clone().into_bytes());
        let resp = self.http.send(Method::POST, &url, &self.headers(Some(&request.key)), body).await?;
        let resp = classify(resp, Duration::from_secs(5))?;
        let answer: BatchAnswer = serde_json::from_slice(&resp.body).unwrap_or_default();
        Ok(Delivered { rejected: answer.rejected.into_iter().map(|r| (r.id, r.reason)).collect() })
    }
}

/// Counters of the stock-level sync.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SyncReport {
    /// Requests the manufacturer took.
    pub batches: u64,
    /// SKU levels in them.
    pub levels: u64,
    /// Failed attempts (retried at the next tick).
    pub failures: u64,
}

/// Every `interval`, posts the levels of SKUs that changed since the last successful sync, in
/// batches of the policy's size. Levels are state, not events: a lost sync is repaired by the
/// next one, and a restart sends every SKU once. With `once`, one full pass and return. With
/// [`Lanes::Assigned`](crate::drain::Lanes), only the SKUs of the shards this group member leases.
pub async fn sync_stock_levels<S: StateStore>(
    store: Arc<S>,
    maker: Arc<Manufacturer>,
    interval: Duration,
    mut shutdown: watch::Receiver<bool>,
    once: bool,
    lanes: crate::drain::Lanes,
) -> SyncReport {
    let mut sent: HashMap<String, (i64, i64)> = HashMap::new();
    let mut report = SyncReport::default();
    let mut backoff = Backoff::new(maker.policy.backoff, 0x57);
    // Levels repeat (10/0 → 10/1 → 10/0): a key from the levels alone would make the receiver
    // answer the third sync from memory and keep 10/1. Each pass gets its own key space.
    let started = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
    let mut pass = 0u64;
    let mut failures_in_a_row = 0u32;
    loop {
        pass += 1;
        let nonce = format!("pass={started}.{pass}");
        let mut failed = false;
        // In a consumer group, each member sends the SKUs of the shards it leases: one sender per SKU.
        let states = async {
            match lanes.owned_shards() {
                None => store.sku_states().await,
                Some(shards) => {
                    let mut all = Vec::new();
                    for shard in shards {
                        all.extend(store.shard_sku_states(&shard).await?);
                    }
                    Ok(all)
                }
            }
        };
        match states.await {
            Ok(states) => {
                let changed: Vec<StockLevel> = states
                    .iter()
                    .filter(|(sku, s)| sent.get(sku.as_str()) != Some(&(s.on_hand, s.reserved)))
                    .map(|(sku, s)| StockLevel {
                        sku: sku.clone(),
                        on_hand: s.on_hand,
                        reserved: s.reserved,
                        available: s.available(),
                    })
                    .collect();
                for chunk in changed.chunks(maker.policy.max_batch.max(1)) {
                    let parts: Vec<String> =
                        chunk.iter().map(|l| format!("{}={}/{}", l.sku, l.on_hand, l.reserved)).collect();
                    let mut refs: Vec<&str> = parts.iter().map(String::as_str).collect();
                    refs.push(&nonce);
                    let body = StockLevels { sync_id: request_key("stock-sync", &refs), levels: chunk.to_vec() };
                    match maker.send_levels(&body).await {
                        Ok(_) => {
                            report.batches += 1;
                            report.levels += chunk.len() as u64;
                            metrics::counter!("stockflow_connector_sent_total", "connector" => "stock-sync")
                                .increment(1);
                            for l in chunk {
                                sent.insert(l.sku.clone(), (l.on_hand, l.reserved));
                            }
                        }
                        Err(e) => {
                            report.failures += 1;
                            failed = true;
                            metrics::counter!("stockflow_connector_failed_total", "connector" => "stock-sync")
                                .increment(1);
                            tracing::warn!(error = %e, "stock-level sync failed; retrying");
                            break;
                        }
                    }
                }
            }
            Err(e) => {
                failed = true;
                tracing::warn!(error = %e, "stock-level sync could not read the store");
            }
        }
        failures_in_a_row = if failed { failures_in_a_row + 1 } else { 0 };
        // A final pass gives up after 20 failures in a row (reported), so `consume --drain`
        // ends even when the manufacturer is down: the next run syncs every SKU again.
        if once && (!failed || failures_in_a_row >= 20) {
            return report;
        }
        let wait =
            if failed { backoff.delay(failures_in_a_row.min(20)).max(Duration::from_millis(10)) } else { interval };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            _ = shutdown.wait_for(|s| *s) => return report,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reorder_quantity_covers_the_lead_time_and_the_reorder_point() {
        let r = |available, units_ordered_24h| ReorderRequest {
            request_id: "reorder:e".into(),
            sku: "S".into(),
            available,
            reorder_point: 5,
            units_ordered_24h,
            ts: 0,
        };
        let item = |lead_time_days, min_order_qty, case_pack| CatalogItem {
            sku: "S".into(),
            lead_time_days,
            min_order_qty,
            case_pack,
        };
        // 10/day × 7 days + 5 − 3 = 72.
        assert_eq!(reorder_quantity(&r(3, 10), &item(7, 1, 1)), 72);
        // Oversold (−4 available) adds the shortfall.
        assert_eq!(reorder_quantity(&r(-4, 10), &item(7, 1, 1)), 79);
        // No demand: at least the minimum order, at least one.
        assert_eq!(reorder_quantity(&r(5, 0), &item(7, 50, 1)), 50);
        assert_eq!(reorder_quantity(&r(9, 0), &item(7, 0, 1)), 1);
        // Rounded up to whole cases.
        assert_eq!(reorder_quantity(&r(3, 10), &item(7, 1, 12)), 72);
        assert_eq!(reorder_quantity(&r(3, 10), &item(7, 1, 10)), 80);
        assert_eq!(reorder_quantity(&r(i64::MIN, u64::MAX), &item(u32::MAX, 1, 1)), u64::MAX);
    }

    #[test]
    fn skus_are_percent_encoded_in_paths() {
        assert_eq!(percent_encode("MUG-BLUE_12oz.v2~"), "MUG-BLUE_12oz.v2~");
        assert_eq!(percent_encode("A/B C"), "A%2FB%20C");
    }
}
