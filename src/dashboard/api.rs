//! The dashboard's HTTP side: the embedded page and the JSON and SSE APIs (docs/dashboard.md).

use std::collections::HashMap;
use std::convert::Infallible;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::StreamExt;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;
use serde_json::json;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;

use super::snapshot::SortKey;
use stockflow_state::now_ms;

use super::{Dashboard, Point};

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const APP_CSS: &str = include_str!("assets/app.css");

/// Most rows or alerts one request returns.
pub const MAX_LIMIT: usize = 1000;

#[derive(Clone)]
struct AppState {
    dashboard: Dashboard,
    metrics: Option<PrometheusHandle>,
}

/// The dashboard's routes: `/` and its assets, `/api/*`, `/healthz`, `/metrics`.
pub fn router(dashboard: Dashboard, metrics: Option<PrometheusHandle>) -> Router {
    Router::new()
        .route("/", get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }))
        .route("/assets/app.js", get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }))
        .route("/assets/app.css", get(|| async { asset("text/css; charset=utf-8", APP_CSS) }))
        .route("/api/overview", get(overview))
        .route("/api/stock", get(stock))
        .route("/api/stock/{sku}", get(stock_one))
        .route("/api/alerts", get(alerts))
        .route("/api/series", get(series))
        .route("/api/outcome", get(outcome))
        .route("/api/stream", get(stream))
        .route("/api/group", get(group))
        .route("/api/reconcile", get(reconcile))
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(|State(s): State<AppState>| async move { crate::telemetry::render(s.metrics.as_ref()) }))
        .fallback(|| async { bad(StatusCode::NOT_FOUND, "no such page or API", None) })
        .layer(axum::middleware::map_response(security_headers))
        .with_state(AppState { dashboard, metrics })
}

/// The page loads only its own script, style and API; no other site may frame it (clickjacking)
/// and no browser may guess content types.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

async fn security_headers(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert(header::CONTENT_SECURITY_POLICY, header::HeaderValue::from_static(CONTENT_SECURITY_POLICY));
    h.insert(header::X_FRAME_OPTIONS, header::HeaderValue::from_static("DENY"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, header::HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, header::HeaderValue::from_static("no-referrer"));
    r
}

/// `GET /api/outcome`: every SKU summary, every alert and the dead-letter count, read from the
/// store now (not the snapshot) — what a replay verifies against the straight pass.
async fn outcome(State(s): State<AppState>) -> Response {
    match s.dashboard.outcome().await {
        Ok(o) => axum::Json(o).into_response(),
        Err(e) => bad(StatusCode::SERVICE_UNAVAILABLE, format!("reading the store: {e}"), None),
    }
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "no-cache")], body).into_response()
}

/// A JSON error naming the parameter at fault.
fn bad(status: StatusCode, message: impl Into<String>, field: Option<&str>) -> Response {
    let mut body = json!({ "error": message.into() });
    if let Some(f) = field {
        body["field"] = json!(f);
    }
    (status, axum::Json(body)).into_response()
}

/// A query parameter that cannot be used: 400 with a JSON body naming it.
#[derive(Debug)]
struct BadParam {
    message: String,
    field: Option<String>,
}

impl BadParam {
    fn new(message: impl Into<String>, field: Option<&str>) -> Self {
        BadParam { message: message.into(), field: field.map(str::to_string) }
    }
}

impl IntoResponse for BadParam {
    fn into_response(self) -> Response {
        bad(StatusCode::BAD_REQUEST, self.message, self.field.as_deref())
    }
}

/// Query parameters, checked one by one so an error names the one at fault.
struct Params(HashMap<String, String>);

impl Params {
    fn new(
        q: Result<Query<HashMap<String, String>>, axum::extract::rejection::QueryRejection>,
    ) -> Result<Self, BadParam> {
        match q {
            Ok(Query(map)) => Ok(Params(map)),
            Err(e) => Err(BadParam::new(format!("unreadable query string: {e}"), None)),
        }
    }

    fn only(&self, known: &[&str]) -> Result<(), BadParam> {
        match self.0.keys().find(|k| !known.contains(&k.as_str())) {
            Some(k) => Err(BadParam::new(format!("unknown parameter; expected one of {}", known.join(", ")), Some(k))),
            None => Ok(()),
        }
    }

    fn str(&self, name: &str) -> &str {
        self.0.get(name).map_or("", String::as_str)
    }

    fn num(&self, name: &str, default: usize, max: usize) -> Result<usize, BadParam> {
        match self.0.get(name) {
            None => Ok(default),
            Some(v) => match v.parse::<usize>() {
                Ok(n) if n <= max => Ok(n),
                _ => Err(BadParam::new(format!("must be an integer from 0 to {max}"), Some(name))),
            },
        }
    }

    fn flag(&self, name: &str) -> Result<bool, BadParam> {
        match self.str(name) {
            "" | "false" | "0" => Ok(false),
            "true" | "1" => Ok(true),
            _ => Err(BadParam::new("must be true or false", Some(name))),
        }
    }
}

type QueryMap = Result<Query<HashMap<String, String>>, axum::extract::rejection::QueryRejection>;

/// The query's parameters: only `known` ones, each checked by `check`; else the 400 to answer.
fn params<T>(
    q: QueryMap,
    known: &[&str],
    check: impl FnOnce(&Params) -> Result<T, BadParam>,
) -> Result<(Params, T), BadParam> {
    let p = Params::new(q)?;
    p.only(known)?;
    let v = check(&p)?;
    Ok((p, v))
}

/// What `/api/overview` and each `tick` of the stream carry.
#[derive(Debug, Serialize)]
pub struct Tick {
    /// Epoch ms.
    pub t: i64,
    /// SKUs in the served snapshot.
    pub skus: usize,
    /// Of which with negative availability.
    pub negative: usize,
    /// Oversell alerts seen.
    pub oversell: u64,
    /// Low-stock alerts seen.
    pub low_stock: u64,
    /// Age of the served snapshot, ms.
    pub staleness_ms: Option<u64>,
    /// How long its read and build took, ms.
    pub snapshot_build_ms: u64,
    /// The newest chart point.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub point: Option<Point>,
}

impl Tick {
    pub(crate) fn of(d: &Dashboard, point: Point) -> Tick {
        Tick { point: Some(point), ..Tick::now(d) }
    }

    fn now(d: &Dashboard) -> Tick {
        let snap = d.snapshot();
        let (oversell, low_stock) = d.alert_counts();
        Tick {
            t: now_ms(),
            skus: snap.rows.len(),
            negative: snap.negative,
            oversell,
            low_stock,
            staleness_ms: (snap.as_of_ms > 0).then(|| (now_ms() - snap.as_of_ms).max(0) as u64),
            snapshot_build_ms: snap.build_ms,
            point: d.inner.series.lock().unwrap_or_else(|e| e.into_inner()).back().copied(),
        }
    }
}

async fn overview(State(s): State<AppState>) -> Response {
    let d = &s.dashboard;
    let uptime = d.inner.started.elapsed().as_secs();
    let mut body = serde_json::to_value(Tick::now(d)).unwrap_or_default();
    body["freshness"] = serde_json::to_value(d.stats()).unwrap_or_default();
    body["uptime_s"] = json!(uptime);
    axum::Json(body).into_response()
}

async fn stock(State(s): State<AppState>, q: QueryMap) -> Response {
    let known = ["q", "sort", "order", "negative", "offset", "limit"];
    let checked = params(q, &known, |p| {
        let sort = match p.str("sort") {
            "" => SortKey::Sku,
            v => SortKey::parse(v)
                .ok_or_else(|| BadParam::new("must be sku, available, cover or velocity", Some("sort")))?,
        };
        let desc = match p.str("order") {
            "" | "asc" => false,
            "desc" => true,
            _ => return Err(BadParam::new("must be asc or desc", Some("order"))),
        };
        if p.str("q").len() > stockflow_state::event::MAX_SKU_BYTES {
            return Err(BadParam::new("longer than a SKU can be (64 bytes)", Some("q")));
        }
        Ok((sort, desc, p.flag("negative")?, p.num("offset", 0, usize::MAX / 2)?, p.num("limit", 50, MAX_LIMIT)?))
    });
    let (p, (sort, desc, negative, offset, limit)) = match checked {
        Ok(v) => v,
        Err(r) => return r.into_response(),
    };
    let snap = s.dashboard.snapshot();
    let (total, items) = snap.page(p.str("q"), sort, desc, negative, offset, limit);
    axum::Json(json!({
        "total": total,
        "offset": offset,
        "limit": limit,
        "items": items,
        "skus": snap.rows.len(),
        "negative": snap.negative,
        "as_of_ms": snap.as_of_ms,
        "staleness_ms": (snap.as_of_ms > 0).then(|| (now_ms() - snap.as_of_ms).max(0)),
    }))
    .into_response()
}

async fn stock_one(State(s): State<AppState>, Path(sku): Path<String>) -> Response {
    let snap = s.dashboard.snapshot();
    let Some((row, detail)) = snap.get(&sku, &s.dashboard.inner.window_sizes) else {
        return bad(
            StatusCode::NOT_FOUND,
            format!("no SKU {sku:?} in the state store (as of the latest snapshot)"),
            Some("sku"),
        );
    };
    let recent: Vec<_> = {
        let log = s.dashboard.inner.alerts.lock().unwrap_or_else(|e| e.into_inner());
        log.ring.iter().rev().filter(|a| a.sku == sku).take(20).cloned().collect()
    };
    axum::Json(json!({
        "row": row,
        "windows": detail.windows,
        "hourly": detail.hourly,
        "alerts": recent,
        "as_of_ms": snap.as_of_ms,
    }))
    .into_response()
}

async fn alerts(State(s): State<AppState>, q: QueryMap) -> Response {
    let checked = params(q, &["kind", "sku", "before", "limit"], |p| {
        let kind = match p.str("kind") {
            "" => None,
            k @ ("oversell" | "low_stock") => Some(k.to_string()),
            _ => return Err(BadParam::new("must be oversell or low_stock", Some("kind"))),
        };
        let before = match p.0.get("before") {
            None => u64::MAX,
            Some(v) => v.parse::<u64>().map_err(|_| BadParam::new("must be an alert seq (integer)", Some("before")))?,
        };
        Ok((kind, before, p.num("limit", 50, MAX_LIMIT)?))
    });
    let (p, (kind, before, limit)) = match checked {
        Ok(v) => v,
        Err(r) => return r.into_response(),
    };
    let sku = p.str("sku");
    let log = s.dashboard.inner.alerts.lock().unwrap_or_else(|e| e.into_inner());
    let mut items: Vec<_> = log
        .ring
        .iter()
        .rev()
        .filter(|a| a.seq < before)
        .filter(|a| kind.as_deref().is_none_or(|k| a.kind == k))
        .filter(|a| sku.is_empty() || a.sku == sku)
        .take(limit + 1)
        .cloned()
        .collect();
    // One more than asked tells whether there is a next page.
    let next_before = if items.len() > limit {
        items.truncate(limit);
        items.last().map(|a| a.seq)
    } else {
        None
    };
    axum::Json(json!({
        "items": items,
        "next_before": next_before,
        "oversell": log.oversell,
        "low_stock": log.low_stock,
        "kept": log.ring.len(),
    }))
    .into_response()
}

/// The consumer group (`dashboard --dynamodb`): every shard's state, owner, epoch, checkpoint,
/// last commit and lag; `{"shards": null}` on the embedded backend.
async fn group(State(s): State<AppState>) -> Response {
    let shards = s.dashboard.group();
    axum::Json(serde_json::json!({ "shards": shards.as_deref() })).into_response()
}

/// The latest reconciliation (docs/reconcile.md): `{"report": null}` until a run wrote one.
async fn reconcile(State(s): State<AppState>) -> Response {
    let dashboard = s.dashboard.clone();
    match tokio::task::spawn_blocking(move || dashboard.reconcile()).await {
        Ok(Ok(report)) => axum::Json(json!({ "report": report.as_deref() })).into_response(),
        Ok(Err(e)) => (StatusCode::INTERNAL_SERVER_ERROR, axum::Json(json!({ "error": e }))).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, axum::Json(json!({ "error": e.to_string() }))).into_response(),
    }
}

async fn series(State(s): State<AppState>) -> Response {
    let points: Vec<Point> =
        s.dashboard.inner.series.lock().unwrap_or_else(|e| e.into_inner()).iter().copied().collect();
    axum::Json(json!({ "interval_ms": 1000, "points": points })).into_response()
}

/// Server-Sent Events: `alert` for each new alert, `tick` each second (counts, freshness and the
/// newest chart point), `resync` when this subscriber fell behind and should re-read the lists.
async fn stream(State(s): State<AppState>) -> Sse<impl futures::Stream<Item = Result<Event, Infallible>>> {
    let (rx, shutdown) = s.dashboard.subscribe();
    let hello = Event::default().event("hello").data(json!({ "t": now_ms() }).to_string());
    let first = futures::stream::once(async move { Ok::<_, Infallible>(hello) });
    // Ends at shutdown, so a graceful stop of the server does not wait for open pages.
    let rest = BroadcastStream::new(rx)
        .map(|received| {
            Ok(match received {
                Ok(push) => Event::default().event(push.event).data(&*push.json),
                Err(BroadcastStreamRecvError::Lagged(n)) => {
                    Event::default().event("resync").data(json!({ "missed": n }).to_string())
                }
            })
        })
        .take_until(async move {
            let mut shutdown = shutdown;
            crate::server::stopped(&mut shutdown).await
        });
    Sse::new(first.chain(rest)).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}
