//! A local stand-in of the two Amazon endpoints reconciliation reads: Login with Amazon's token
//! endpoint and the FBA Inventory API's summaries, fed with summaries in the published model's
//! shape (`models/fba-inventory-api-model/fbaInventory.json`). It checks what Amazon checks — the
//! refresh-token grant and its credentials, the access token (unknown or expired: 403), the
//! required query parameters, page tokens that expire 30 s after issue (400) — enforces the
//! operation's 2 requests/s with burst 2 (429 `QuotaExceeded`), and injects faults on demand:
//! extra 429s, a failing token endpoint, revoked access tokens, an expired page token.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// What the stand-in saw.
#[derive(Debug, Clone, Default)]
pub struct SpApiLog {
    /// Tokens granted.
    pub tokens_granted: u64,
    /// Token requests refused (bad grant or credentials).
    pub tokens_refused: u64,
    /// Token requests failed on purpose (503).
    pub tokens_failed: u64,
    /// Summary requests received.
    pub summary_requests: u64,
    /// Pages served.
    pub pages: u64,
    /// 429s for going over 2 requests/s (a well-behaved client causes none).
    pub rate_refusals: u64,
    /// 429s injected.
    pub injected_throttles: u64,
    /// 403s for an unknown, revoked or expired access token.
    pub auth_refusals: u64,
    /// 400s for an expired page token.
    pub expired_page_tokens: u64,
}

#[derive(Debug)]
struct Inner {
    summaries: Vec<Value>,
    page_size: usize,
    token_lifetime: Duration,
    tokens: HashMap<String, Instant>,
    /// page token → (offset, issued)
    pages: HashMap<String, (usize, Instant)>,
    page_token_ttl: Duration,
    /// GCRA theoretical arrival time of the rate limit.
    tat: Instant,
    throttle_next: u32,
    fail_next_tokens: u32,
    expire_next_page_token: bool,
    serial: u64,
    log: SpApiLog,
}

/// The stand-in. Credentials: client id `amzn1.application-oa2-client.test`, secret
/// `test-secret`, refresh token `Atzr|test`.
#[derive(Debug)]
pub struct SpApi {
    marketplace_id: String,
    inner: Mutex<Inner>,
}

/// The stand-in's LWA client id.
pub const CLIENT_ID: &str = "amzn1.application-oa2-client.test";
/// The stand-in's LWA client secret.
pub const CLIENT_SECRET: &str = "test-secret";
/// The stand-in's refresh token.
pub const REFRESH_TOKEN: &str = "Atzr|test";

type Shared = Arc<SpApi>;

impl SpApi {
    /// A stand-in for `marketplace_id` serving `summaries` (model-shaped `InventorySummary`
    /// objects), `page_size` a page.
    pub fn new(marketplace_id: &str, summaries: Vec<Value>, page_size: usize) -> Arc<Self> {
        Arc::new(SpApi {
            marketplace_id: marketplace_id.to_string(),
            inner: Mutex::new(Inner {
                summaries,
                page_size: page_size.max(1),
                token_lifetime: Duration::from_secs(3600),
                tokens: HashMap::new(),
                pages: HashMap::new(),
                page_token_ttl: Duration::from_secs(30),
                tat: Instant::now(),
                throttle_next: 0,
                fail_next_tokens: 0,
                expire_next_page_token: false,
                serial: 0,
                log: SpApiLog::default(),
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Replaces the summaries served.
    pub fn set_summaries(&self, summaries: Vec<Value>) {
        self.lock().summaries = summaries;
    }

    /// Access tokens granted from now on live `lifetime` (`expires_in`).
    pub fn set_token_lifetime(&self, lifetime: Duration) {
        self.lock().token_lifetime = lifetime;
    }

    /// Answers the next `n` summary requests 429.
    pub fn throttle_next(&self, n: u32) {
        self.lock().throttle_next = n;
    }

    /// Answers the next `n` token requests 503 (the token endpoint is down).
    pub fn fail_next_tokens(&self, n: u32) {
        self.lock().fail_next_tokens = n;
    }

    /// Revokes every access token granted so far (the next use is refused 403).
    pub fn revoke_tokens(&self) {
        self.lock().tokens.clear();
    }

    /// Treats the next page token presented as expired.
    pub fn expire_next_page_token(&self) {
        self.lock().expire_next_page_token = true;
    }

    /// A copy of the log.
    pub fn log(&self) -> SpApiLog {
        self.lock().log.clone()
    }

    /// Binds 127.0.0.1:0 and serves until `shutdown`; returns the base URL (the LWA endpoint is
    /// `{base}/auth/o2/token`).
    pub async fn start(self: &Arc<Self>, mut shutdown: watch::Receiver<bool>) -> std::io::Result<String> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let app = Router::new()
            .route("/auth/o2/token", post(token))
            .route("/fba/inventory/v1/summaries", get(summaries))
            .with_state(Arc::clone(self));
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = shutdown.wait_for(|s| *s).await;
                })
                .await;
        });
        Ok(format!("http://{addr}"))
    }
}

fn errors(status: StatusCode, code: &str, message: &str) -> Response {
    (status, axum::Json(json!({"errors": [{"code": code, "message": message}]}))).into_response()
}

fn form(body: &str) -> HashMap<String, String> {
    let decode = |s: &str| {
        let bytes = s.replace('+', " ").into_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'%'
                && let Some(v) = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok())
                && let Ok(b) = u8::from_str_radix(v, 16)
            {
                out.push(b);
                i += 3;
                continue;
            }
            out.push(bytes[i]);
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    body.split('&').filter_map(|kv| kv.split_once('=')).map(|(k, v)| (decode(k), decode(v))).collect()
}

async fn token(State(s): State<Shared>, headers: HeaderMap, body: String) -> Response {
    let form_type = headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default();
    let f = form(&body);
    let mut inner = s.lock();
    if inner.fail_next_tokens > 0 {
        inner.fail_next_tokens -= 1;
        inner.log.tokens_failed += 1;
        return (StatusCode::SERVICE_UNAVAILABLE, "injected failure").into_response();
    }
    let ok = form_type.starts_with("application/x-www-form-urlencoded")
        && f.get("grant_type").map(String::as_str) == Some("refresh_token")
        && f.get("refresh_token").map(String::as_str) == Some(REFRESH_TOKEN)
        && f.get("client_id").map(String::as_str) == Some(CLIENT_ID)
        && f.get("client_secret").map(String::as_str) == Some(CLIENT_SECRET);
    if !ok {
        inner.log.tokens_refused += 1;
        return (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({"error": "invalid_grant", "error_description": "The request has an invalid grant parameter : refresh_token"})),
        )
            .into_response();
    }
    inner.serial += 1;
    let access = format!("Atza|stand-in-{}", inner.serial);
    let lifetime = inner.token_lifetime;
    inner.tokens.insert(access.clone(), Instant::now() + lifetime);
    inner.log.tokens_granted += 1;
    axum::Json(json!({"access_token": access, "refresh_token": REFRESH_TOKEN, "token_type": "bearer",
                       "expires_in": lifetime.as_secs()}))
    .into_response()
}

async fn summaries(State(s): State<Shared>, headers: HeaderMap, Query(q): Query<HashMap<String, String>>) -> Response {
    let mut inner = s.lock();
    inner.log.summary_requests += 1;
    let now = Instant::now();
    // 2 requests a second, burst 2 (GCRA): a request may go when tat − 500 ms ≤ now.
    let every = Duration::from_millis(500);
    // 20 ms of slack for the two clocks' scheduling jitter.
    if inner.tat > now + every + Duration::from_millis(20) {
        inner.log.rate_refusals += 1;
        return errors(
            StatusCode::TOO_MANY_REQUESTS,
            "QuotaExceeded",
            "You exceeded your quota for the requested resource.",
        );
    }
    inner.tat = inner.tat.max(now) + every;
    if inner.throttle_next > 0 {
        inner.throttle_next -= 1;
        inner.log.injected_throttles += 1;
        return errors(
            StatusCode::TOO_MANY_REQUESTS,
            "QuotaExceeded",
            "You exceeded your quota for the requested resource.",
        );
    }
    let token = headers.get("x-amz-access-token").and_then(|v| v.to_str().ok()).unwrap_or_default();
    if inner.tokens.get(token).is_none_or(|exp| *exp <= now) {
        inner.log.auth_refusals += 1;
        return errors(StatusCode::FORBIDDEN, "Unauthorized", "Access to requested resource is denied.");
    }
    for required in ["granularityType", "granularityId", "marketplaceIds"] {
        if q.get(required).is_none_or(String::is_empty) {
            return errors(StatusCode::BAD_REQUEST, "InvalidInput", &format!("{required} is required"));
        }
    }
    if q["granularityType"] != "Marketplace"
        || q["granularityId"] != s.marketplace_id
        || q["marketplaceIds"] != s.marketplace_id
    {
        return errors(StatusCode::BAD_REQUEST, "InvalidInput", "unknown marketplace");
    }
    let offset = match q.get("nextToken") {
        None => 0,
        Some(t) => {
            let expired = std::mem::take(&mut inner.expire_next_page_token);
            match inner.pages.get(t) {
                Some((offset, issued)) if !expired && now.duration_since(*issued) < inner.page_token_ttl => *offset,
                _ => {
                    inner.log.expired_page_tokens += 1;
                    return errors(StatusCode::BAD_REQUEST, "InvalidInput", "The nextToken is invalid or has expired.");
                }
            }
        }
    };
    let offset = offset.min(inner.summaries.len());
    let end = (offset + inner.page_size).min(inner.summaries.len());
    let details = q.get("details").is_some_and(|d| d == "true");
    let page: Vec<Value> = inner.summaries[offset..end]
        .iter()
        .map(|v| {
            let mut v = v.clone();
            if !details && let Some(o) = v.as_object_mut() {
                o.remove("inventoryDetails");
            }
            v
        })
        .collect();
    let mut answer = json!({
        "payload": {
            "granularity": {"granularityType": "Marketplace", "granularityId": s.marketplace_id},
            "inventorySummaries": page
        }
    });
    if end < inner.summaries.len() {
        inner.serial += 1;
        let next = format!("page-{}-{end}", inner.serial);
        inner.pages.insert(next.clone(), (end, now));
        answer["pagination"] = json!({"nextToken": next});
    }
    inner.log.pages += 1;
    axum::Json(answer).into_response()
}
