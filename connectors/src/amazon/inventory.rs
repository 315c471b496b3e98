//! The FBA Inventory API v1: `GET {base}/fba/inventory/v1/summaries?details=true&
//! granularityType=Marketplace&granularityId={M}&marketplaceIds={M}[&nextToken=…]`, with the
//! LWA token in `x-amz-access-token` (no SigV4 since 2023-10-02).
//!
//! - **Rate:** 2 requests a second, burst 2 — a token bucket of exactly that; a 429 waits
//!   (`Retry-After` if sent, else a growing backoff) and retries the same page.
//! - **Paging:** `pagination.nextToken` (top level) until absent. A page token expires 30 s
//!   after it was issued, so no wait between pages may approach that ([`MAX_WAIT`]); if Amazon
//!   refuses an expired token anyway, the listing starts over from the first page (a SKU read
//!   twice keeps its newest numbers) — at most [`MAX_RESTARTS`] times.
//! - **Auth:** a 401/403 drops the cached token and retries the page once with a fresh one.
//! - Every field of the model is optional; a summary without `sellerSku` is skipped.

use std::collections::BTreeMap;
use std::time::Duration;

use hyper::Method;
use hyper::body::Bytes;
use serde::Deserialize;
use stockflow_state::retry::{Backoff, BackoffConfig};

use super::lwa::form_encode;
use super::{AmazonError, FbaCount, Lwa, parse_instant_ms};
use crate::connector::{HttpClient, excerpt};
use crate::policy::{RateLimit, TokenBucket, parse_retry_after};

/// `getInventorySummaries`' usage plan: 2 requests a second, burst 2.
pub const SUMMARIES_RATE: RateLimit = RateLimit { capacity: 2, every: Duration::from_millis(500) };

/// The longest wait between two pages (a page token lives 30 s).
pub const MAX_WAIT: Duration = Duration::from_secs(10);

/// How often an expired page token may restart the listing.
pub const MAX_RESTARTS: u32 = 3;

/// Failed attempts (5xx, network, 429) of one page before giving up.
pub const MAX_ATTEMPTS: u32 = 8;

/// The regional endpoints: North America, Europe, Far East.
pub const ENDPOINT_NA: &str = "https://sellingpartnerapi-na.amazon.com";

/// A client of the summaries operation for one marketplace.
#[derive(Debug)]
pub struct InventoryApi {
    base: String,
    marketplace_id: String,
    lwa: Lwa,
    http: HttpClient,
    bucket: TokenBucket,
    backoff: BackoffConfig,
    stats: std::sync::Mutex<ListingStats>,
}

/// What one listing took.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ListingStats {
    /// Requests sent (every attempt).
    pub requests: u32,
    /// Pages read.
    pub pages: u32,
    /// 429 answers.
    pub throttled: u32,
    /// Listings started over after an expired page token.
    pub restarts: u32,
}

#[derive(Debug, Deserialize)]
struct Answer {
    #[serde(default)]
    payload: Option<Payload>,
    #[serde(default)]
    pagination: Option<Pagination>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Payload {
    #[serde(default)]
    inventory_summaries: Vec<Summary>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Pagination {
    #[serde(default)]
    next_token: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Summary {
    #[serde(default)]
    seller_sku: Option<String>,
    #[serde(default)]
    last_updated_time: Option<String>,
    #[serde(default)]
    inventory_details: Option<Details>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Details {
    fulfillable_quantity: Option<i64>,
    inbound_working_quantity: Option<i64>,
    inbound_shipped_quantity: Option<i64>,
    inbound_receiving_quantity: Option<i64>,
    reserved_quantity: Option<Reserved>,
    researching_quantity: Option<Researching>,
    unfulfillable_quantity: Option<Unfulfillable>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Reserved {
    pending_customer_order_quantity: Option<i64>,
    pending_transshipment_quantity: Option<i64>,
    fc_processing_quantity: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Researching {
    total_researching_quantity: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Unfulfillable {
    total_unfulfillable_quantity: Option<i64>,
}

impl Summary {
    fn into_count(self) -> Option<FbaCount> {
        let sku = self.seller_sku.filter(|s| !s.is_empty())?;
        let d = self.inventory_details.unwrap_or_default();
        let r = d.reserved_quantity.unwrap_or_default();
        let n = |v: Option<i64>| v.unwrap_or(0).max(0);
        Some(FbaCount {
            sku,
            fulfillable: n(d.fulfillable_quantity),
            pending_customer_order: n(r.pending_customer_order_quantity),
            fc_processing: n(r.fc_processing_quantity),
            transshipment: n(r.pending_transshipment_quantity),
            inbound: n(d.inbound_working_quantity)
                .saturating_add(n(d.inbound_shipped_quantity))
                .saturating_add(n(d.inbound_receiving_quantity)),
            researching: n(d.researching_quantity.and_then(|x| x.total_researching_quantity)),
            unfulfillable: n(d.unfulfillable_quantity.and_then(|x| x.total_unfulfillable_quantity)),
            last_updated_ms: self.last_updated_time.as_deref().and_then(parse_instant_ms),
        })
    }
}

/// What one page request came to.
enum Page {
    Read(Vec<FbaCount>, Option<String>),
    TokenExpired,
}

impl InventoryApi {
    /// A client of `base` (e.g. [`ENDPOINT_NA`]) for `marketplace_id`, authenticated by `lwa`.
    pub fn new(base: impl Into<String>, marketplace_id: impl Into<String>, lwa: Lwa, timeout: Duration) -> Self {
        InventoryApi {
            base: base.into().trim_end_matches('/').to_string(),
            marketplace_id: marketplace_id.into(),
            lwa,
            http: HttpClient::new(timeout),
            bucket: TokenBucket::new(SUMMARIES_RATE),
            backoff: BackoffConfig::new(Duration::from_millis(500), MAX_WAIT),
            stats: Default::default(),
        }
    }

    /// The same client with another backoff shape (tests shorten it).
    pub fn with_backoff(mut self, backoff: BackoffConfig) -> Self {
        self.backoff = BackoffConfig::new(backoff.base, backoff.cap.min(MAX_WAIT));
        self
    }

    /// The token source.
    pub fn lwa(&self) -> &Lwa {
        &self.lwa
    }

    /// What the last listing took.
    pub fn stats(&self) -> ListingStats {
        *self.stats.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Every seller SKU's summary in the marketplace, sorted by SKU.
    pub async fn summaries(&self) -> Result<Vec<FbaCount>, AmazonError> {
        *self.stats.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = ListingStats::default();
        let mut restarts = 0;
        'listing: loop {
            let mut counts: BTreeMap<String, FbaCount> = BTreeMap::new();
            let mut next: Option<String> = None;
            loop {
                match self.page(next.as_deref()).await? {
                    Page::Read(items, token) => {
                        self.stat(|s| s.pages += 1);
                        for c in items {
                            counts.insert(c.sku.clone(), c);
                        }
                        match token.filter(|t| !t.is_empty()) {
                            Some(t) => next = Some(t),
                            None => return Ok(counts.into_values().collect()),
                        }
                    }
                    Page::TokenExpired if restarts < MAX_RESTARTS => {
                        restarts += 1;
                        self.stat(|s| s.restarts += 1);
                        tracing::warn!(restarts, "an inventory page token expired: listing again from the start");
                        continue 'listing;
                    }
                    Page::TokenExpired => {
                        return Err(AmazonError::Unavailable(format!(
                            "page tokens expired {MAX_RESTARTS} times: the listing cannot keep up"
                        )));
                    }
                }
            }
        }
    }

    fn stat(&self, f: impl FnOnce(&mut ListingStats)) {
        f(&mut self.stats.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
    }

    fn url(&self, next: Option<&str>) -> String {
        let m = form_encode(&self.marketplace_id);
        let mut url = format!(
            "{}/fba/inventory/v1/summaries?details=true&granularityType=Marketplace&granularityId={m}&marketplaceIds={m}",
            self.base
        );
        if let Some(t) = next {
            url.push_str("&nextToken=");
            url.push_str(&form_encode(t));
        }
        url
    }

    /// One page, through throttling, server errors and one stale access token.
    async fn page(&self, next: Option<&str>) -> Result<Page, AmazonError> {
        let url = self.url(next);
        let mut backoff = Backoff::from_clock(self.backoff).limited(MAX_ATTEMPTS);
        let mut reauthorised = false;
        loop {
            let token = self.lwa.token().await?;
            self.bucket.acquire().await;
            self.stat(|s| s.requests += 1);
            let headers = [("x-amz-access-token", token), ("accept", "application/json".to_string())];
            let wait = match self.http.send(Method::GET, &url, &headers, Bytes::new()).await {
                Err(e) => {
                    tracing::debug!(error = %e, "inventory summaries: no answer");
                    None
                }
                Ok(resp) if resp.status.is_success() => {
                    let answer: Answer = serde_json::from_slice(&resp.body)
                        .map_err(|e| AmazonError::Malformed(format!("inventory summaries: {e}")))?;
                    let items = answer.payload.map(|p| p.inventory_summaries).unwrap_or_default();
                    let token = answer.pagination.and_then(|p| p.next_token);
                    return Ok(Page::Read(items.into_iter().filter_map(Summary::into_count).collect(), token));
                }
                Ok(resp) if resp.status.as_u16() == 429 => {
                    self.stat(|s| s.throttled += 1);
                    let after = resp.headers.get("retry-after").and_then(|v| v.to_str().ok());
                    after.and_then(|v| parse_retry_after(v, std::time::SystemTime::now()))
                }
                Ok(resp) if matches!(resp.status.as_u16(), 401 | 403) && !reauthorised => {
                    reauthorised = true;
                    self.lwa.invalidate().await;
                    continue;
                }
                Ok(resp) if resp.status.is_server_error() || resp.status.as_u16() == 408 => None,
                Ok(resp) => {
                    let body = excerpt(&resp.body);
                    if next.is_some() && resp.status.as_u16() == 400 && body.to_ascii_lowercase().contains("token") {
                        return Ok(Page::TokenExpired);
                    }
                    return Err(AmazonError::Refused(format!("{} {body}", resp.status)));
                }
            };
            let Some(delay) = backoff.next_delay() else {
                return Err(AmazonError::Unavailable(format!("{MAX_ATTEMPTS} attempts of {url} failed")));
            };
            tokio::time::sleep(wait.unwrap_or(delay).min(MAX_WAIT)).await;
        }
    }
}
