//! The FBA Inventory API v1: `GET {base}/fba/inventory/v1/summaries?details=true&
//! granularityType=Marketplace&granularityId={M}&marketplaceIds={M}[&nextToken=…]`, with the
//! LWA token in `x-amz-access-token` (no SigV4 since 2023-10-02).
//!
//! - **Rate:** 2 requests a second, burst 2 — a token bucket of exactly that; a 429 waits
//!   (`Retry-After` if sent, else a growing backoff) and retries the same page.
//! - **Paging:** `pagination.nextToken` (top level) until absent. A page token expires 30 s
//!   after it was issued: one wait is at most [`MAX_WAIT`], and a page stops retrying before its
//!   retries pass [`PAGE_TOKEN_BUDGET`]; then — or when Amazon refuses an expired token — the
//!   listing starts over from the first page (a SKU read twice keeps the last read) — at most
//!   [`MAX_RESTARTS`] times. A token handed out twice is an error, not an endless listing.
//! - **Auth:** a 401/403 drops the cached token and retries the page once with a fresh one.
//! - Every field of the model is optional; a summary without `sellerSku` is skipped.

use std::collections::BTreeMap;
use std::time::Duration;

use hyper::Method;
use hyper::body::Bytes;
use serde::Deserialize;
use stockflow_state::retry::{Backoff, BackoffConfig};

use super::{AmazonError, FbaCount, Lwa, parse_instant_ms};
use crate::accounting::encode as form_encode;
use crate::connector::{HttpClient, excerpt};
use crate::policy::{RateLimit, TokenBucket, parse_retry_after};

/// `getInventorySummaries`' usage plan: 2 requests a second, burst 2.
pub const SUMMARIES_RATE: RateLimit = RateLimit { capacity: 2, every: Duration::from_millis(500) };

/// The longest wait between two pages (a page token lives 30 s).
pub const MAX_WAIT: Duration = Duration::from_secs(10);

/// How often an expired page token may restart the listing.
pub const MAX_RESTARTS: u32 = 3;

/// Retries of one page (after 5xx, 429, no answer, a failing token endpoint) before giving up.
pub const MAX_ATTEMPTS: u32 = 8;

/// A page asked with a page token stops retrying once its retries would pass this much of the
/// token's 30 s life; the listing then starts over.
pub const PAGE_TOKEN_BUDGET: Duration = Duration::from_secs(25);

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

/// What one page came to.
enum Page {
    Read(Vec<FbaCount>, Option<String>),
    TokenExpired,
}

/// What one request of a page came to.
enum Attempt {
    Done(Page),
    /// Failed or throttled: retry after the answer's wait, or the backoff's.
    Retry(Option<std::time::Duration>),
    Unauthorised,
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

    /// The marketplace read.
    pub fn marketplace_id(&self) -> &str {
        &self.marketplace_id
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
            let mut seen = std::collections::HashSet::new();
            let mut next: Option<String> = None;
            loop {
                match self.page(next.as_deref()).await? {
                    Page::Read(items, token) => {
                        self.stat(|s| s.pages += 1);
                        // A SKU listed twice (a restart, or Amazon's paging) keeps the last read.
                        for c in items {
                            counts.insert(c.sku.clone(), c);
                        }
                        match token.filter(|t| !t.is_empty()) {
                            // A token handed out twice would page forever.
                            Some(t) if !seen.insert(t.clone()) => {
                                return Err(AmazonError::Malformed(format!("the page token {t:?} came back twice")));
                            }
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

    /// One page, through throttling, server errors, a failing token endpoint and one stale
    /// access token. A page asked with a token gives up (and the listing starts over) before its
    /// retries would outlive the token ([`PAGE_TOKEN_BUDGET`]).
    async fn page(&self, next: Option<&str>) -> Result<Page, AmazonError> {
        let url = self.url(next);
        let started = std::time::Instant::now();
        let mut backoff = Backoff::from_clock(self.backoff).limited(MAX_ATTEMPTS);
        let mut reauthorised = false;
        loop {
            let wait = match self.lwa.token().await {
                // The token endpoint failing (5xx, 429, no answer) is one more failed attempt.
                Err(AmazonError::Unavailable(m)) => {
                    tracing::debug!(error = %m, "the token endpoint failed");
                    None
                }
                Err(e) => return Err(e),
                Ok(token) => match self.request(&url, token).await? {
                    Attempt::Done(page) => return Ok(page),
                    Attempt::Retry(wait) => wait,
                    Attempt::Unauthorised if !reauthorised => {
                        reauthorised = true;
                        self.lwa.invalidate().await;
                        continue;
                    }
                    // Refused with a fresh token: the app is not authorised (role, seller).
                    Attempt::Unauthorised => {
                        return Err(AmazonError::Refused(
                            "403 with a fresh access token: is the app authorised \
                             for the FBA Inventory role by this seller?"
                                .into(),
                        ));
                    }
                    Attempt::TokenExpired => return Ok(Page::TokenExpired),
                },
            };
            let Some(delay) = backoff.next_delay() else {
                return Err(AmazonError::Unavailable(format!("{MAX_ATTEMPTS} retries of {url} failed")));
            };
            let delay = wait.unwrap_or(delay).min(MAX_WAIT);
            if next.is_some() && started.elapsed() + delay > PAGE_TOKEN_BUDGET {
                tracing::debug!("retrying would outlive the page token");
                return Ok(Page::TokenExpired);
            }
            tokio::time::sleep(delay).await;
        }
    }

    /// One request of a page.
    async fn request(&self, url: &str, token: String) -> Result<Attempt, AmazonError> {
        self.bucket.acquire().await;
        self.stat(|s| s.requests += 1);
        let headers = [("x-amz-access-token", token), ("accept", "application/json".to_string())];
        let resp = match self.http.send(Method::GET, url, &headers, Bytes::new()).await {
            Ok(resp) => resp,
            Err(e) => {
                tracing::debug!(error = %e, "inventory summaries: no answer");
                return Ok(Attempt::Retry(None));
            }
        };
        match resp.status.as_u16() {
            200..=299 => {
                let answer: Answer = serde_json::from_slice(&resp.body)
                    .map_err(|e| AmazonError::Malformed(format!("inventory summaries: {e}")))?;
                let items = answer.payload.map(|p| p.inventory_summaries).unwrap_or_default();
                let token = answer.pagination.and_then(|p| p.next_token);
                Ok(Attempt::Done(Page::Read(items.into_iter().filter_map(Summary::into_count).collect(), token)))
            }
            429 => {
                self.stat(|s| s.throttled += 1);
                let after = resp.headers.get("retry-after").and_then(|v| v.to_str().ok());
                Ok(Attempt::Retry(after.and_then(|v| parse_retry_after(v, std::time::SystemTime::now()))))
            }
            401 | 403 => Ok(Attempt::Unauthorised),
            408 | 500..=599 => Ok(Attempt::Retry(None)),
            status => {
                let body = excerpt(&resp.body);
                if url.contains("&nextToken=") && status == 400 && body.to_ascii_lowercase().contains("token") {
                    return Ok(Attempt::TokenExpired);
                }
                Err(AmazonError::Refused(format!("{} {body}", resp.status)))
            }
        }
    }
}
