//! Local receivers that behave like the real ones — the manufacturer API, the three accounting
//! shapes and a Standard Webhooks alert endpoint — on one 127.0.0.1 port. They check what the
//! real ones check (idempotency keys and their limits, balanced journals, the tenant header,
//! signatures), remember each key's answer so a re-send is answered, not re-applied, record
//! what they accepted, and inject faults on demand: 500s, 429 with `Retry-After`, accept-then-500,
//! accept-then-hang (the client times out), slow answers and connection resets.
//!
//! `stockflow demo` runs them so a newcomer sees updates and journals flow; the connector tests
//! run them under faults and check that every effect was accepted exactly once.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use hmac::{Hmac, Mac};
use hyper_util::rt::TokioIo;
use rust_decimal::Decimal;
use serde_json::{Value, json};
use sha2::Sha256;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower::ServiceExt;

mod accounting;
mod checks;
pub mod spapi;

use accounting::{generic_balances, generic_journals, qbo, qbo_query, qbo_report, xero, xero_accounts, xero_report};
pub use checks::{Routes, SummaryCheck, check_deliveries, check_summaries};
pub use spapi::{SpApi, SpApiLog};

/// A fault a receiver can inject into one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Answer 500 without doing anything.
    Error500,
    /// Answer 429 with `Retry-After` (seconds).
    TooMany(u64),
    /// Do the work, then answer 500 (the sender must re-send; the key makes it harmless).
    AcceptThen500,
    /// Do the work, then never answer (the sender times out).
    AcceptThenHang,
    /// Answer after this long.
    Slow(Duration),
    /// Close the connection without an answer, before doing anything.
    Reset,
}

/// Which faults to inject: `percent` of requests get one of `kinds`, chosen by a seeded
/// generator; or `script`, consumed first, one per request (`None` = no fault).
#[derive(Debug, Clone, Default)]
pub struct FaultPlan {
    /// Share of requests with a fault, 0–100.
    pub percent: u32,
    /// The faults to draw from.
    pub kinds: Vec<Fault>,
    /// Faults for the next requests, in order.
    pub script: std::collections::VecDeque<Option<Fault>>,
    /// Generator state.
    pub seed: u64,
}

impl FaultPlan {
    /// No faults.
    pub fn none() -> Self {
        FaultPlan::default()
    }

    /// `percent`% of requests fail with one of every kind of fault (hangs and slow answers
    /// last `hang`).
    pub fn chaos(percent: u32, hang: Duration, seed: u64) -> Self {
        FaultPlan {
            percent,
            kinds: vec![
                Fault::Error500,
                Fault::TooMany(1),
                Fault::AcceptThen500,
                Fault::AcceptThenHang,
                Fault::Slow(hang / 4),
                Fault::Reset,
            ],
            script: Default::default(),
            seed: seed | 1,
        }
    }

    fn draw(&mut self) -> Option<Fault> {
        if let Some(f) = self.script.pop_front() {
            return f;
        }
        if self.percent == 0 || self.kinds.is_empty() {
            return None;
        }
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        let roll = self.seed % 100;
        if roll >= u64::from(self.percent) {
            return None;
        }
        Some(self.kinds[(self.seed / 100) as usize % self.kinds.len()])
    }
}

/// What a receiver saw and accepted.
#[derive(Debug, Clone, Default)]
pub struct Log {
    /// Requests received (including faulted ones and re-sends).
    pub requests: u64,
    /// Faults injected.
    pub faults: u64,
    /// Re-sends of a key already answered (answered from memory, not re-applied).
    pub replays: u64,
    /// Requests refused (bad key, bad signature, unbalanced journal, …).
    pub refused: u64,
    /// Accepted requests per route.
    pub accepted_requests: BTreeMap<&'static str, u64>,
    /// Per effect id: under how many distinct keys it was accepted (exactly once = 1).
    pub items: HashMap<String, u32>,
    /// Effect ids in the order they were first accepted, per route.
    pub order: BTreeMap<&'static str, Vec<String>>,
    /// Journal totals per shape, kind (`cogs` / `inventory`) and currency.
    pub journal_totals: BTreeMap<(&'static str, String, String), Decimal>,
    /// The latest stock level per SKU.
    pub stock_levels: BTreeMap<String, (i64, i64)>,
    /// Catalogue lookups served.
    pub catalog_lookups: u64,
    /// Reorder quantities per effect id.
    pub reorder_quantities: HashMap<String, u64>,
    /// Effective acceptances (sum of `items`).
    pub accepted: u64,
    /// Summary journals (`journal:{period}:{currency}:{n}`): account → debit − credit.
    pub summaries: BTreeMap<String, BTreeMap<String, Decimal>>,
    /// Requests refused 429 because they broke the vendor's published limit (must stay 0).
    pub limit_refusals: u64,
    /// The books: per shape, account and journal date, debit − credit of every accepted line
    /// (what the read endpoints report as balances).
    pub books: BTreeMap<(&'static str, String, String), Decimal>,
    /// Per key: the body's hash and the answer given.
    answers: HashMap<String, (u128, StatusCode, Bytes)>,
}

impl Log {
    /// Effect ids accepted under more than one key (must be empty).
    pub fn duplicates(&self) -> Vec<(&str, u32)> {
        let mut d: Vec<(&str, u32)> =
            self.items.iter().filter(|(_, n)| **n > 1).map(|(k, n)| (k.as_str(), *n)).collect();
        d.sort();
        d
    }
}

/// The receivers' shared state.
#[derive(Debug)]
pub struct Receivers {
    /// Sliding one-minute windows per vendor limit, and Xero's calls against its daily budget.
    limits: Mutex<(HashMap<&'static str, std::collections::VecDeque<std::time::Instant>>, u32)>,
    xero_day_limit: std::sync::atomic::AtomicU32,
    faults: Mutex<FaultPlan>,
    log: Mutex<Log>,
    accepted: watch::Sender<u64>,
    webhook_secret: Option<Vec<u8>>,
    hang: Duration,
}

type Shared = Arc<Receivers>;

impl Receivers {
    /// Receivers with a fault plan; alert webhooks must be signed with `webhook_secret` (raw key).
    pub fn new(faults: FaultPlan, webhook_secret: Option<Vec<u8>>) -> Arc<Self> {
        Arc::new(Receivers {
            limits: Mutex::new((HashMap::new(), 0)),
            xero_day_limit: std::sync::atomic::AtomicU32::new(5_000),
            faults: Mutex::new(faults),
            log: Mutex::new(Log::default()),
            accepted: watch::channel(0).0,
            webhook_secret,
            hang: Duration::from_secs(30),
        })
    }

    /// Replaces the fault plan.
    pub fn set_faults(&self, plan: FaultPlan) {
        *self.faults.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = plan;
    }

    /// Sets Xero's daily budget (5,000 by default) to test the budget in minutes.
    pub fn set_xero_day_limit(&self, n: u32) {
        self.xero_day_limit.store(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// Counts one call against `limit` calls in any minute (`route` names the limit); false (and
    /// a refusal logged) when it is over.
    fn within(&self, route: &'static str, limit: usize) -> bool {
        let now = std::time::Instant::now();
        let mut l = self.limits.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let w = l.0.entry(route).or_default();
        while w.front().is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(60)) {
            w.pop_front();
        }
        if w.len() >= limit {
            drop(l);
            self.lock().limit_refusals += 1;
            return false;
        }
        w.push_back(now);
        true
    }

    /// Counts one Xero call against the day; `None` when the budget is spent, else what is left.
    fn xero_day(&self) -> Option<u32> {
        let limit = self.xero_day_limit.load(std::sync::atomic::Ordering::Relaxed);
        let mut l = self.limits.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if l.1 >= limit {
            drop(l);
            self.lock().limit_refusals += 1;
            return None;
        }
        l.1 += 1;
        Some(limit - l.1)
    }

    /// A copy of the log.
    pub fn log(&self) -> Log {
        self.lock().clone()
    }

    /// Effect ids accepted so far, watchable (a test waits on it instead of sleeping).
    pub fn accepted(&self) -> watch::Receiver<u64> {
        self.accepted.subscribe()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn draw(&self) -> Option<Fault> {
        let fault = self.faults.lock().unwrap_or_else(std::sync::PoisonError::into_inner).draw();
        let mut log = self.lock();
        log.requests += 1;
        if fault.is_some() {
            log.faults += 1;
        }
        fault
    }

    /// Serves every receiver on `listener` until `shutdown`. Routes: `/alerts`,
    /// `/manufacturer/v1/…`, `/generic/v1/{journals,balances}`,
    /// `/qbo/v3/company/{realm}/{journalentry|batch|query|reports/ProfitAndLoss}`,
    /// `/xero/api.xro/2.0/{ManualJournals,Accounts,Reports/BalanceSheet,Reports/ProfitAndLoss}`.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, mut shutdown: watch::Receiver<bool>) {
        let app = router(Arc::clone(&self));
        loop {
            let (stream, _) = tokio::select! {
                r = listener.accept() => match r { Ok(c) => c, Err(_) => continue },
                _ = shutdown.wait_for(|s| *s) => return,
            };
            let (app, me) = (app.clone(), Arc::clone(&self));
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let (app, me) = (app.clone(), Arc::clone(&me));
                    async move {
                        let fault = me.draw();
                        if fault == Some(Fault::Reset) {
                            return Err(std::io::Error::other("injected connection reset"));
                        }
                        let mut req = req.map(axum::body::Body::new);
                        req.extensions_mut().insert(InjectedFault(fault));
                        Ok(app.oneshot(req).await.unwrap_or_else(|e| match e {}))
                    }
                });
                let _ =
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
            });
        }
    }

    /// Binds 127.0.0.1:0 and serves in the background; returns the base URL.
    pub async fn start(self: &Arc<Self>, shutdown: watch::Receiver<bool>) -> std::io::Result<(String, SocketAddr)> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        tokio::spawn(Arc::clone(self).serve(listener, shutdown));
        Ok((format!("http://{addr}"), addr))
    }

    /// Runs one keyed request: faults, replay of a known key, else `apply` (which records items
    /// on success). The answer is remembered under the key.
    async fn keyed(
        &self,
        fault: Option<Fault>,
        key: &str,
        body: &Bytes,
        apply: impl FnOnce(&mut Log) -> (StatusCode, Value),
    ) -> Response {
        match fault {
            Some(Fault::Error500) => return (StatusCode::INTERNAL_SERVER_ERROR, "injected failure").into_response(),
            Some(Fault::TooMany(s)) => {
                return (StatusCode::TOO_MANY_REQUESTS, [("retry-after", s.to_string())], "slow down").into_response();
            }
            Some(Fault::Slow(d)) => tokio::time::sleep(d).await,
            _ => {}
        }
        let answer = {
            let mut log = self.lock();
            let hash = xxhash_rust::xxh3::xxh3_128(body);
            match log.answers.get(key) {
                Some((stored, _, _)) if *stored != hash => {
                    log.refused += 1;
                    return refuse("Idempotency-Key", "the key was already used with a different request");
                }
                Some((_, status, answer)) => {
                    let answer = (*status, answer.clone());
                    log.replays += 1;
                    answer
                }
                None => {
                    let before = log.accepted;
                    let (status, value) = apply(&mut log);
                    let answer = Bytes::from(value.to_string());
                    if status.is_success() {
                        log.answers.insert(key.to_string(), (hash, status, answer.clone()));
                    } else {
                        log.refused += 1;
                    }
                    if log.accepted != before {
                        let added = log.accepted - before;
                        self.accepted.send_modify(|n| *n += added);
                    }
                    (status, answer)
                }
            }
        };
        match fault {
            Some(Fault::AcceptThen500) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "injected failure after accepting").into_response()
            }
            Some(Fault::AcceptThenHang) => {
                tokio::time::sleep(self.hang).await;
                (StatusCode::GATEWAY_TIMEOUT, "too late").into_response()
            }
            _ => (answer.0, [("content-type", "application/json")], answer.1).into_response(),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct InjectedFault(Option<Fault>);

fn fault_of(headers: &axum::http::Extensions) -> Option<Fault> {
    headers.get::<InjectedFault>().and_then(|f| f.0)
}

fn refuse(field: &str, message: &str) -> Response {
    (StatusCode::BAD_REQUEST, axum::Json(json!({"error": message, "field": field}))).into_response()
}

fn accept_item(log: &mut Log, route: &'static str, id: &str) {
    log.accepted += 1;
    let n = log.items.entry(id.to_string()).or_default();
    *n += 1;
    if *n == 1 {
        log.order.entry(route).or_default().push(id.to_string());
    }
}

fn router(state: Shared) -> Router {
    Router::new()
        .route("/alerts", post(alerts))
        .route("/manufacturer/v1/catalog/{sku}", get(catalog))
        .route("/manufacturer/v1/reorders", post(reorders))
        .route("/manufacturer/v1/stock-levels", post(stock_levels))
        .route("/generic/v1/journals", post(generic_journals))
        .route("/generic/v1/balances", get(generic_balances))
        .route("/qbo/v3/company/{realm}/{op}", post(qbo).get(qbo_query))
        .route("/qbo/v3/company/{realm}/reports/{report}", get(qbo_report))
        .route("/xero/api.xro/2.0/ManualJournals", put(xero))
        .route("/xero/api.xro/2.0/Accounts", get(xero_accounts))
        .route("/xero/api.xro/2.0/Reports/{report}", get(xero_report))
        .with_state(state)
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

async fn alerts(State(s): State<Shared>, req: axum::extract::Request) -> Response {
    let fault = fault_of(req.extensions());
    let headers = req.headers().clone();
    let Ok(body) = axum::body::to_bytes(req.into_body(), 10 << 20).await else { return refuse("body", "unreadable") };
    let (Some(id), Some(ts), Some(sigs)) =
        (header(&headers, "webhook-id"), header(&headers, "webhook-timestamp"), header(&headers, "webhook-signature"))
    else {
        return refuse("webhook-id", "Standard Webhooks headers missing");
    };
    if let Some(secret) = &s.webhook_secret {
        let ok = sigs.split(' ').filter_map(|sig| sig.strip_prefix("v1,")).any(|b64| {
            let Ok(expected) = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, b64) else {
                return false;
            };
            let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("any key length");
            mac.update(format!("{id}.{ts}.").as_bytes());
            mac.update(&body);
            mac.verify_slice(&expected).is_ok()
        });
        if !ok {
            s.lock().refused += 1;
            return (
                StatusCode::UNAUTHORIZED,
                axum::Json(json!({"error": "bad signature", "field": "webhook-signature"})),
            )
                .into_response();
        }
    }
    let id = id.to_string();
    s.keyed(fault, &id, &body, |log| {
        let Ok(v) = serde_json::from_slice::<Value>(&body) else {
            return (StatusCode::BAD_REQUEST, json!({"error": "not JSON"}));
        };
        let ids: Vec<String> = v["alerts"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| a["alert_id"].as_str().map(str::to_string))
            .collect();
        for a in &ids {
            accept_item(log, "alerts", a);
        }
        *log.accepted_requests.entry("alerts").or_default() += 1;
        (StatusCode::OK, json!({"accepted": ids.len()}))
    })
    .await
}

/// The lead time the fake manufacturer quotes for a SKU: 3 to 16 days, fixed per SKU.
pub fn lead_time_days(sku: &str) -> u32 {
    3 + (xxhash_rust::xxh3::xxh3_64(sku.as_bytes()) % 14) as u32
}

async fn catalog(State(s): State<Shared>, Path(sku): Path<String>) -> Response {
    s.lock().catalog_lookups += 1;
    axum::Json(json!({"sku": sku, "lead_time_days": lead_time_days(&sku), "min_order_qty": 1, "case_pack": 1}))
        .into_response()
}

async fn reorders(State(s): State<Shared>, req: axum::extract::Request) -> Response {
    let (fault, key, body) = match keyed_request(req).await {
        Ok(r) => r,
        Err(refused) => return refused,
    };
    s.keyed(fault, &key, &body, |log| {
        let Ok(v) = serde_json::from_slice::<Value>(&body) else {
            return (StatusCode::BAD_REQUEST, json!({"error": "not JSON"}));
        };
        let lines = v["reorders"].as_array().cloned().unwrap_or_default();
        for (i, l) in lines.iter().enumerate() {
            if l["id"].as_str().is_none() || l["quantity"].as_u64().is_none_or(|q| q == 0) {
                return (
                    StatusCode::BAD_REQUEST,
                    json!({"error": "id and a positive quantity required", "field": format!("reorders[{i}]")}),
                );
            }
        }
        for l in &lines {
            let id = l["id"].as_str().unwrap_or_default();
            accept_item(log, "reorders", id);
            log.reorder_quantities.insert(id.to_string(), l["quantity"].as_u64().unwrap_or_default());
        }
        *log.accepted_requests.entry("reorders").or_default() += 1;
        (StatusCode::OK, json!({"accepted": lines.len(), "rejected": []}))
    })
    .await
}

async fn stock_levels(State(s): State<Shared>, req: axum::extract::Request) -> Response {
    let (fault, key, body) = match keyed_request(req).await {
        Ok(r) => r,
        Err(refused) => return refused,
    };
    s.keyed(fault, &key, &body, |log| {
        let Ok(v) = serde_json::from_slice::<Value>(&body) else {
            return (StatusCode::BAD_REQUEST, json!({"error": "not JSON"}));
        };
        let levels = v["levels"].as_array().cloned().unwrap_or_default();
        for l in &levels {
            let sku = l["sku"].as_str().unwrap_or_default().to_string();
            log.stock_levels
                .insert(sku, (l["on_hand"].as_i64().unwrap_or_default(), l["reserved"].as_i64().unwrap_or_default()));
        }
        *log.accepted_requests.entry("stock-levels").or_default() += 1;
        (StatusCode::OK, json!({"accepted": levels.len()}))
    })
    .await
}

/// The injected fault, the `Idempotency-Key` (required) and the body of a keyed request.
async fn keyed_request(req: axum::extract::Request) -> Result<(Option<Fault>, String, Bytes), Response> {
    let fault = fault_of(req.extensions());
    let Some(key) = header(req.headers(), "idempotency-key").map(str::to_string) else {
        return Err(refuse("Idempotency-Key", "required"));
    };
    let body = axum::body::to_bytes(req.into_body(), 10 << 20).await.map_err(|_| refuse("body", "unreadable"))?;
    Ok((fault, key, body))
}
