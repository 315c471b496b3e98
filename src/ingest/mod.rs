//! The ingest HTTP app: one axum `Router`, built by [`app`], served by `stockflow ingest serve`,
//! inside `stockflow run`, and in AWS by the Lambda (`stockflow-ingest-lambda`, [`lambda`]).
//!
//! Routes: canonical events (`/v1/events`), Amazon SP-API notifications
//! (`/v1/amazon/notifications`, [`amazon`]), manufacturer documents (`/v1/manufacturer/events`,
//! [`manufacturer`]), `/healthz`, `/readyz`, `/metrics`.
//!
//! A 2xx answer means every event of the request is durably on the stream. Errors are JSON
//! `{error, field, index}`: 400 bad input (the first bad document is named; nothing of the request
//! is put), 401 bad or missing webhook signature (when secrets are configured, [`webhook`]),
//! 413 over 500 events, 1 MiB per event or 10 MiB per request, 415 not JSON/NDJSON, 503 with
//! `Retry-After` when the stream stays unavailable past the producer's retries.
//!
//! One file of ~610 lines: the router, its handlers and the error answers are the HTTP contract above
//! and read top to bottom; the mappings, webhooks and the Lambda adapter are modules of their own.

pub mod amazon;
pub mod lambda;
pub mod manufacturer;
pub mod time;
pub mod webhook;

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::DefaultBodyLimit;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use stockflow_pipeline::{OutRecord, StreamError, StreamProducer};
use tracing::Instrument as _;

use crate::ingest::webhook::Verifier;
pub use amazon::AmazonConfig;

/// Most events accepted in one request (a Kinesis PutRecords call takes 500).
pub const MAX_EVENTS_PER_REQUEST: usize = 500;
/// Largest event.
pub const MAX_EVENT_BYTES: usize = 1 << 20;
/// Largest request body.
pub const MAX_REQUEST_BYTES: usize = 10 << 20;
/// Default of `ingest.max_future_ms`: an event more than an hour ahead of the ingest's clock is
/// refused (SPEC v2 §1).
pub const DEFAULT_MAX_FUTURE_MS: i64 = 3_600_000;

/// What the app serves with.
#[derive(Debug)]
pub struct IngestState<P> {
    /// Where accepted events go.
    pub producer: Arc<P>,
    /// Rendered at `/metrics` when set.
    pub metrics: Option<PrometheusHandle>,
    /// When set, every POST must carry a valid Standard Webhooks signature.
    pub verifier: Option<Arc<Verifier>>,
    /// How SP-API notifications are read.
    pub amazon: AmazonConfig,
    /// Events whose `ts` is more than this ahead of the ingest's clock are refused (400, `ts`).
    pub max_future_ms: i64,
}

impl<P> IngestState<P> {
    /// Unsigned ingest over `producer`, without `/metrics`.
    pub fn new(producer: Arc<P>) -> Self {
        IngestState {
            producer,
            metrics: None,
            verifier: None,
            amazon: AmazonConfig::default(),
            max_future_ms: DEFAULT_MAX_FUTURE_MS,
        }
    }
}

/// The latest event time a request may carry: the ingest's clock plus `max_future_ms`.
fn latest_ts(max_future_ms: i64) -> (i64, i64) {
    let now = stockflow_state::now_ms();
    (now, now.saturating_add(max_future_ms))
}

/// The 400 message for an event time past `latest` (from [`latest_ts`]), or `None`.
fn ahead_of_clock(ts: i64, (now, latest): (i64, i64), max_future_ms: i64) -> Option<String> {
    (ts > latest).then(|| {
        format!(
            "field `ts`: {ts} is {} s ahead of the ingest's clock; at most {} s (ingest.max_future_ms) — is it in seconds or microseconds, or is the sender's clock wrong?",
            ts.saturating_sub(now) / 1000,
            max_future_ms / 1000
        )
    })
}

/// A canonical event built by a mapping: its SKU (the partition key) and its JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Canonical {
    /// Partition key.
    pub sku: String,
    /// The canonical JSON document (SPEC §1), already validated.
    pub json: String,
    /// Its event time (`ts`).
    pub ts: i64,
}

/// Why a sender's document cannot be mapped: the field (a path such as
/// `Payload.OrderChangeNotification.Summary.OrderItems[0].SellerSKU`) and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct MapError {
    /// Path of the offending field in the sender's document.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl Canonical {
    /// The stream records of mapped events (key = SKU).
    pub fn records(events: &[Canonical]) -> Vec<OutRecord<'_>> {
        events.iter().map(|c| OutRecord { key: &c.sku, payload: c.json.as_bytes() }).collect()
    }
}

impl MapError {
    /// A mapping error at `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        MapError { field: field.into(), message: message.into() }
    }
}

/// The ingest router.
pub fn app<P: StreamProducer>(state: IngestState<P>) -> Router {
    app_shared(Arc::new(state))
}

/// The ingest router over state the caller shares too (the Lambda's SQS and EventBridge paths).
pub fn app_shared<P: StreamProducer>(state: Arc<IngestState<P>>) -> Router {
    routes::<P>()
        .route("/metrics", get(render_metrics::<P>))
        .layer(DefaultBodyLimit::max(MAX_REQUEST_BYTES))
        .with_state(state)
}

/// What the Lambda serves behind the public API: the ingest routes and `/healthz` only (each
/// Lambda instance's registry is its own, and metrics are no business of the public).
pub fn public_app<P: StreamProducer>(state: Arc<IngestState<P>>) -> Router {
    routes::<P>().layer(DefaultBodyLimit::max(MAX_REQUEST_BYTES)).with_state(state)
}

fn routes<P: StreamProducer>() -> Router<Arc<IngestState<P>>> {
    Router::new()
        .route("/v1/events", post(post_events::<P>))
        .route("/v1/amazon/notifications", post(post_amazon::<P>))
        .route("/v1/manufacturer/events", post(post_manufacturer::<P>))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz::<P>))
}

/// `/readyz`: 200 when the stream takes puts (exists and answers), 503 with the reason otherwise —
/// what a load balancer or an orchestrator routes by. `/healthz` says only that the process runs.
async fn readyz<P: StreamProducer>(State(state): State<Arc<IngestState<P>>>) -> Response {
    match state.producer.ready().await {
        Ok(()) => axum::Json(serde_json::json!({ "ready": true })).into_response(),
        Err(e) => {
            (StatusCode::SERVICE_UNAVAILABLE, axum::Json(serde_json::json!({ "ready": false, "error": e.to_string() })))
                .into_response()
        }
    }
}

/// A body axum refused before the handler (over 10 MiB, unreadable), as a JSON error.
fn body_refused(r: BytesRejection) -> Response {
    error(r.status(), r.body_text(), None, None)
}

/// The `webhook-id` of a signed request that passed the signature check. Unless the request is
/// taken (2xx), the id is forgotten — also when the client goes away mid-request (the handler is
/// dropped, e.g. during backpressure) — so the sender's retry of it is not refused as a replay.
/// (A request refused for its content forgets its id too: its replay is refused by its content
/// again, and the sender's corrected retry under the same id is taken.) A refused signature never
/// gets here: it cannot unlearn the id of an earlier genuine request.
struct AcceptedId {
    verifier: Option<Arc<Verifier>>,
    id: String,
}

impl AcceptedId {
    fn new(verifier: &Option<Arc<Verifier>>, headers: &HeaderMap) -> Self {
        // Unsigned ingest remembers nothing: no id to copy.
        let id = match verifier {
            Some(_) => headers.get("webhook-id").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string(),
            None => String::new(),
        };
        AcceptedId { verifier: verifier.clone(), id }
    }

    /// The request got `status`: keep the id if it was taken.
    fn settle(mut self, status: StatusCode) {
        if status.is_success() {
            self.verifier = None;
        }
    }
}

impl Drop for AcceptedId {
    fn drop(&mut self) {
        if let Some(v) = &self.verifier {
            v.forget(&self.id);
        }
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// The checks every POST shares: the signature (401, when secrets are configured), then the
/// content type (415); `Ok(true)` for NDJSON.
fn admit<P>(state: &IngestState<P>, headers: &HeaderMap, body: &[u8]) -> Result<bool, Box<Response>> {
    if let Some(v) = &state.verifier {
        let h = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        v.verify(h("webhook-id"), h("webhook-timestamp"), h("webhook-signature"), body, unix_now()).map_err(|e| {
            metrics::counter!("stockflow_ingest_rejected_total", "reason" => "signature").increment(1);
            Box::new(error(StatusCode::UNAUTHORIZED, e.to_string(), None, Some(e.field())))
        })?;
    }
    content_kind(headers)
}

/// JSON or NDJSON, else 415.
fn content_kind(headers: &HeaderMap) -> Result<bool, Box<Response>> {
    let ct = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let mime = ct.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    match mime.as_str() {
        "application/json" => Ok(false),
        "application/x-ndjson" | "application/jsonl" => Ok(true),
        _ => Err(Box::new(error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("content type {ct:?}: send application/json or application/x-ndjson"),
            None,
            None,
        ))),
    }
}

fn error(status: StatusCode, message: String, index: Option<usize>, field: Option<&str>) -> Response {
    let body = json!({ "error": message, "index": index, "field": field });
    (status, axum::Json(body)).into_response()
}

fn invalid(route: &'static str, message: String, index: Option<usize>, field: Option<&str>) -> Response {
    metrics::counter!("stockflow_ingest_rejected_total", "reason" => "invalid", "route" => route).increment(1);
    error(StatusCode::BAD_REQUEST, message, index, field)
}

/// Splits a body into documents: a JSON array, NDJSON, or one object; 400/413 when it cannot.
fn split_documents(body: &[u8], ndjson: bool) -> Result<Vec<&[u8]>, Box<Response>> {
    let trimmed = body.trim_ascii();
    let lines =
        || -> Vec<&[u8]> { trimmed.split(|b| *b == b'\n').map(<[u8]>::trim_ascii).filter(|l| !l.is_empty()).collect() };
    let docs: Vec<&[u8]> = if ndjson {
        lines()
    } else if trimmed.first() == Some(&b'[') {
        let items: Vec<&serde_json::value::RawValue> = serde_json::from_slice(trimmed)
            .map_err(|e| Box::new(error(StatusCode::BAD_REQUEST, format!("malformed JSON array: {e}"), None, None)))?;
        items.into_iter().map(|r| r.get().as_bytes()).collect()
    } else if trimmed.contains(&b'\n') {
        // One (pretty-printed) document, or NDJSON sent as application/json.
        match serde_json::from_slice::<serde::de::IgnoredAny>(trimmed) {
            Ok(_) => vec![trimmed],
            Err(_) => lines(),
        }
    } else {
        vec![trimmed]
    };
    if docs.is_empty() || docs == [b"".as_slice()] {
        return Err(Box::new(error(StatusCode::BAD_REQUEST, "no documents in the body".into(), None, None)));
    }
    if docs.len() > MAX_EVENTS_PER_REQUEST {
        return Err(Box::new(too_many(docs.len())));
    }
    if let Some(i) = docs.iter().position(|d| d.len() > MAX_EVENT_BYTES) {
        return Err(Box::new(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("document of {} bytes; at most {MAX_EVENT_BYTES}", docs[i].len()),
            Some(i),
            None,
        )));
    }
    Ok(docs)
}

fn too_many(n: usize) -> Response {
    error(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("{n} events in one request; at most {MAX_EVENTS_PER_REQUEST}"),
        None,
        None,
    )
}

/// Puts the records and answers: 202 `{accepted, ignored}` once they are durable, 503 with
/// `Retry-After` when the stream stays unavailable.
async fn put_and_answer<P: StreamProducer>(
    producer: &P,
    route: &'static str,
    records: &[OutRecord<'_>],
    ignored: usize,
) -> Response {
    match put(producer, route, records).await {
        Ok(()) => {
            (StatusCode::ACCEPTED, axum::Json(json!({ "accepted": records.len(), "ignored": ignored }))).into_response()
        }
        Err(e) => {
            let mut r = error(StatusCode::SERVICE_UNAVAILABLE, format!("stream unavailable: {e}"), None, None);
            r.headers_mut().insert(header::RETRY_AFTER, axum::http::HeaderValue::from_static("1"));
            r
        }
    }
}

/// Puts the records (nothing when empty) and counts them.
pub async fn put<P: StreamProducer>(
    producer: &P,
    route: &'static str,
    records: &[OutRecord<'_>],
) -> Result<(), StreamError> {
    if records.is_empty() {
        return Ok(());
    }
    match put_stamped(producer, records).await {
        Ok(()) => {
            metrics::counter!("stockflow_ingested_events_total", "route" => route).increment(records.len() as u64);
            Ok(())
        }
        Err(e) => {
            tracing::error!(error = %e, route, "stream put failed");
            metrics::counter!("stockflow_ingest_rejected_total", "reason" => "unavailable", "route" => route)
                .increment(1);
            Err(e)
        }
    }
}

/// Puts the records, each stamped with the ingest time ([`stamp`]): what the ingest does, and what
/// a replay straight onto the stream does in its place.
pub async fn put_stamped<P: StreamProducer>(producer: &P, records: &[OutRecord<'_>]) -> Result<(), StreamError> {
    let now = stockflow_state::now_ms();
    let stamped: Vec<Option<Vec<u8>>> = records.iter().map(|r| stamp(r.key, r.payload, now)).collect();
    let records: Vec<OutRecord<'_>> = records
        .iter()
        .zip(&stamped)
        .map(|(r, s)| OutRecord { key: r.key, payload: s.as_deref().unwrap_or(r.payload) })
        .collect();
    producer.put(&records).await
}

/// The event with `"ingested_at": now` added as its last member, for the consumers' end-to-end
/// latency (`stockflow_end_to_end_seconds`); `None` (put as is) when it already carries one, is
/// not an object, or would outgrow a stream record.
pub fn stamp(key: &str, doc: &[u8], now: i64) -> Option<Vec<u8>> {
    const FIELD: &[u8] = b"\"ingested_at\"";
    // A key may be spelled with escapes (`"ingested\u005fat"`): where any \u escape is, the
    // event may already carry one, and a second would make it undecodable. Put such events as is.
    if doc.windows(FIELD.len()).any(|w| w == FIELD) || doc.windows(2).any(|w| w == b"\\u") {
        return None;
    }
    let end = doc.iter().rposition(|b| !b.is_ascii_whitespace())?;
    if doc[end] != b'}' {
        return None;
    }
    let body = &doc[..end];
    let empty = body.iter().rposition(|b| !b.is_ascii_whitespace()).is_some_and(|i| body[i] == b'{');
    let member = format!("{}\"ingested_at\":{now}}}", if empty { "" } else { "," });
    if key.len() + body.len() + member.len() > MAX_EVENT_BYTES {
        return None;
    }
    let mut out = Vec::with_capacity(body.len() + member.len());
    out.extend_from_slice(body);
    out.extend_from_slice(member.as_bytes());
    Some(out)
}

/// The three POST routes: what their documents are.
#[derive(Debug, Clone, Copy)]
enum Route {
    /// Canonical events, put as sent.
    Events,
    /// SP-API notifications, mapped.
    Amazon,
    /// Manufacturer documents, mapped.
    Manufacturer,
}

impl Route {
    fn name(self) -> &'static str {
        match self {
            Route::Events => "events",
            Route::Amazon => "amazon",
            Route::Manufacturer => "manufacturer",
        }
    }
}

async fn post_events<P: StreamProducer>(
    state: State<Arc<IngestState<P>>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    handle(Route::Events, state, headers, body).await
}

async fn post_amazon<P: StreamProducer>(
    state: State<Arc<IngestState<P>>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    handle(Route::Amazon, state, headers, body).await
}

async fn post_manufacturer<P: StreamProducer>(
    state: State<Arc<IngestState<P>>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    handle(Route::Manufacturer, state, headers, body).await
}

/// Every POST: the body, the shared checks, the route's documents to records, the put; a signed
/// request that got no final answer has its id forgotten ([`AcceptedId`]).
async fn handle<P: StreamProducer>(
    route: Route,
    state: State<Arc<IngestState<P>>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    // One span per request (exported over OTLP when configured): the put that carries its events
    // is its child (`stream.put`).
    let span = tracing::info_span!(
        "ingest.request",
        route = route.name(),
        webhook_id = tracing::field::Empty,
        events = tracing::field::Empty,
        first_event_id = tracing::field::Empty,
        last_event_id = tracing::field::Empty,
        status = tracing::field::Empty,
    );
    if let Some(id) = headers.get("webhook-id").and_then(|v| v.to_str().ok()) {
        span.record("webhook_id", id);
    }
    let response = handle_in_span(route, state, headers, body).instrument(span.clone()).await;
    span.record("status", response.status().as_u16());
    response
}

/// Records a request's event count and its first and last event ids on its span.
fn note_events<'a>(
    count: usize,
    first: impl FnOnce() -> Option<std::borrow::Cow<'a, str>>,
    last: impl FnOnce() -> Option<std::borrow::Cow<'a, str>>,
) {
    let span = tracing::Span::current();
    if span.is_disabled() {
        return;
    }
    span.record("events", count);
    if let Some(id) = first() {
        span.record("first_event_id", &*id);
    }
    if let Some(id) = last() {
        span.record("last_event_id", &*id);
    }
}

async fn handle_in_span<P: StreamProducer>(
    route: Route,
    State(state): State<Arc<IngestState<P>>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(r) => return body_refused(r),
    };
    let kind = match admit(&state, &headers, &body) {
        Ok(kind) => kind,
        Err(r) => return *r,
    };
    // The signature passed (or none is required): from here the id is forgotten unless settled.
    let accepted = AcceptedId::new(&state.verifier, &headers);
    let response = match split_documents(&body, kind) {
        Err(r) => *r,
        Ok(docs) => match route {
            Route::Events => put_canonical(&*state.producer, &docs, state.max_future_ms).await,
            Route::Amazon => {
                let mapped = map_all(&docs, state.max_future_ms, |n| amazon_events(n, &state.amazon));
                answer_mapped(&*state.producer, "amazon", mapped).await
            }
            Route::Manufacturer => {
                let mapped = map_all(&docs, state.max_future_ms, |d| manufacturer::map_document(d).map(Some));
                answer_mapped(&*state.producer, "manufacturer", mapped).await
            }
        },
    };
    accepted.settle(response.status());
    response
}

/// Canonical events: validated, then put as sent, keyed by SKU.
async fn put_canonical<P: StreamProducer>(producer: &P, docs: &[&[u8]], max_future_ms: i64) -> Response {
    let mut keys = Vec::with_capacity(docs.len());
    let clock = latest_ts(max_future_ms);
    for (i, doc) in docs.iter().enumerate() {
        match stockflow_state::decode(doc) {
            // A stream record holds the key and the event: Kinesis takes 1 MiB for both.
            Ok(ev) if doc.len() + ev.sku.len() > MAX_EVENT_BYTES => {
                return error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("event {i}: {} bytes with its SKU; at most {MAX_EVENT_BYTES}", doc.len() + ev.sku.len()),
                    Some(i),
                    None,
                );
            }
            Ok(ev) => {
                if let Some(why) = ahead_of_clock(ev.ts, clock, max_future_ms) {
                    let msg = format!("event {i} is invalid (the request was rejected whole): {why}");
                    return invalid("events", msg, Some(i), Some("ts"));
                }
                keys.push(ev.sku.into_owned())
            }
            Err(e) => {
                let msg = format!("event {i} is invalid (the request was rejected whole): {e}");
                return invalid("events", msg, Some(i), e.field());
            }
        }
    }
    let records: Vec<OutRecord<'_>> =
        docs.iter().zip(&keys).map(|(doc, key)| OutRecord { key, payload: doc }).collect();
    let id =
        |doc: Option<&&[u8]>| doc.and_then(|d| stockflow_state::decode(d).ok()).map(|ev| ev.id.into_owned().into());
    note_events(records.len(), || id(docs.first()), || id(docs.last()));
    put_and_answer(producer, "events", &records, 0).await
}

/// Maps every document of a request, or names the first that cannot be mapped (by index).
fn map_all(
    docs: &[&[u8]],
    max_future_ms: i64,
    mut map: impl FnMut(&serde_json::Value) -> Result<Option<Vec<Canonical>>, MapError>,
) -> Result<(Vec<Canonical>, usize), (usize, MapError)> {
    let mut out = Vec::with_capacity(docs.len());
    let mut ignored = 0;
    let clock = latest_ts(max_future_ms);
    for (i, doc) in docs.iter().enumerate() {
        let value: serde_json::Value =
            serde_json::from_slice(doc).map_err(|e| (i, MapError::new("$", format!("malformed JSON: {e}"))))?;
        match map(&value).map_err(|e| (i, e))? {
            Some(events) => {
                for ev in &events {
                    if let Some(why) = ahead_of_clock(ev.ts, clock, max_future_ms) {
                        return Err((i, MapError::new("ts", why)));
                    }
                }
                out.extend(events)
            }
            None => ignored += 1,
        }
    }
    Ok((out, ignored))
}

/// Answers a mapped request: 400 naming the document and field, 413 when it maps to too many
/// events, else the put.
async fn answer_mapped<P: StreamProducer>(
    producer: &P,
    route: &'static str,
    mapped: Result<(Vec<Canonical>, usize), (usize, MapError)>,
) -> Response {
    match mapped {
        Err((i, e)) => {
            let msg = format!("document {i} is invalid (the request was rejected whole): {e}");
            invalid(route, msg, Some(i), Some(&e.field))
        }
        Ok((events, _)) if events.len() > MAX_EVENTS_PER_REQUEST => too_many(events.len()),
        Ok((events, ignored)) => {
            let id = |ev: Option<&Canonical>| {
                ev.and_then(|e| stockflow_state::decode(e.json.as_bytes()).ok()).map(|d| d.id.into_owned().into())
            };
            note_events(events.len(), || id(events.first()), || id(events.last()));
            put_and_answer(producer, route, &Canonical::records(&events), ignored).await
        }
    }
}

/// One SP-API notification's events, or `None` (counted) for a type stockflow does not act on.
pub fn amazon_events(n: &serde_json::Value, cfg: &AmazonConfig) -> Result<Option<Vec<Canonical>>, MapError> {
    match amazon::map_notification(n, cfg)? {
        amazon::Mapped::Events(events) => Ok(Some(events)),
        amazon::Mapped::Ignored(kind) => {
            let label = if kind.len() <= 64 && kind.bytes().all(|b| b.is_ascii_uppercase() || b == b'_') {
                kind
            } else {
                "other".to_string()
            };
            metrics::counter!("stockflow_ingest_ignored_total", "type" => label).increment(1);
            Ok(None)
        }
    }
}

async fn render_metrics<P: StreamProducer>(State(state): State<Arc<IngestState<P>>>) -> Response {
    crate::telemetry::render(state.metrics.as_ref())
}

#[cfg(test)]
mod tests;
