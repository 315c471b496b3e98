//! `stockflow ingest load`: an HTTP load generator for the ingest API, run as its own process.
//!
//! Each connection is one HTTP/1.1 keep-alive connection sending one request at a time. Without
//! `--rate` the load is closed (every connection sends as fast as answers come: the highest
//! throughput). With `--rate` it is open: request *n* is due at `start + n / rate` whatever the
//! server does, and its latency is measured from its due time, not from when it was sent, so a
//! server that slows down shows it in the percentiles instead of hiding it (no coordinated
//! omission) — as long as there are enough connections to keep up with the schedule. The tool's
//! own lateness (due → sent: timer ticks, CPU shared with the server) is reported separately as
//! `send_lag_p99_ms`; it is included in the latency, never subtracted. The achieved rate divides
//! by the time until the last measured answer, so a server that falls behind shows a lower rate.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::time::Instant;

use stockflow_connectors::alerts::decode_secret;

use crate::loadtest::http::HttpLane;

/// Arguments of `stockflow ingest load`.
#[derive(Debug, clap::Args)]
pub struct LoadArgs {
    /// Endpoint to POST to.
    #[arg(long, default_value = "http://127.0.0.1:8080/v1/events")]
    url: String,
    /// Measured seconds (after the warm-up).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Seconds of load before measuring.
    #[arg(long, default_value_t = 1)]
    warmup: u64,
    /// Concurrent connections.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Offered requests per second (open model); unset: as fast as the server answers.
    #[arg(long)]
    rate: Option<f64>,
    /// Events per request: 1 sends one JSON object, more send NDJSON.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Distinct SKUs the events spread over.
    #[arg(long, default_value_t = 10_000)]
    skus: usize,
    /// Sign every request with this Standard Webhooks secret (`whsec_…`).
    #[arg(long, env = "STOCKFLOW_LOAD_SECRET", hide_env_values = true)]
    secret: Option<String>,
    /// Also write the summary as JSON to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

/// What a run measured.
#[derive(Debug, Serialize)]
pub struct Summary {
    /// Offered rate (requests/s), when open.
    pub offered_rate: Option<f64>,
    /// Connections.
    pub connections: usize,
    /// Events per request.
    pub batch: usize,
    /// Measured seconds.
    pub seconds: f64,
    /// 2xx answers in the measured window.
    pub requests: u64,
    /// Other answers and transport errors in the measured window.
    pub errors: u64,
    /// Requests per second answered 2xx.
    pub requests_per_second: f64,
    /// Events per second accepted.
    pub events_per_second: f64,
    /// Latency percentiles, milliseconds (from the due time when open).
    pub latency_ms: Percentiles,
    /// 99th percentile of this tool's own lateness in sending (due → sent), milliseconds.
    pub send_lag_p99_ms: f64,
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 90th.
    pub p90: f64,
    /// 99th.
    pub p99: f64,
    /// 99.9th.
    pub p999: f64,
    /// Largest.
    pub max: f64,
}

struct Plan {
    batch: usize,
    skus: usize,
    rate: Option<f64>,
    key: Option<Arc<Vec<u8>>>,
    start: Instant,
    measure_from: Instant,
    end: Instant,
    next: AtomicU64,
    run: u64,
}

/// Runs the load and prints the summary.
pub async fn run(args: LoadArgs) -> anyhow::Result<Summary> {
    if args.batch == 0 || args.batch > crate::ingest::MAX_EVENTS_PER_REQUEST {
        bail!("--batch {}: must be 1 to {}", args.batch, crate::ingest::MAX_EVENTS_PER_REQUEST);
    }
    if args.connections == 0 || args.skus == 0 || args.rate.is_some_and(|r| r <= 0.0) {
        bail!("--connections, --skus and --rate must be positive");
    }
    let url = args.url.clone();
    crate::loadtest::http::resolve(&url).await.context("--url")?;
    let key = args
        .secret
        .as_deref()
        .map(|s| decode_secret(s).map(Arc::new))
        .transpose()
        .map_err(|e| anyhow::anyhow!("--secret: {e}"))?;
    let start = Instant::now() + Duration::from_millis(100);
    let measure_from = start + Duration::from_secs(args.warmup);
    let plan = Arc::new(Plan {
        batch: args.batch,
        skus: args.skus,
        rate: args.rate,
        key,
        start,
        measure_from,
        end: measure_from + Duration::from_secs(args.seconds),
        next: AtomicU64::new(0),
        run: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
    });
    let mut tasks = Vec::with_capacity(args.connections);
    for i in 0..args.connections {
        tasks.push(tokio::spawn(connection(url.clone(), i, Arc::clone(&plan))));
    }
    let mut hist = Histogram::<u64>::new_with_bounds(1, 120_000_000, 3)?;
    let mut lag = Histogram::<u64>::new_with_bounds(1, 120_000_000, 3)?;
    let (mut ok, mut errors) = (0u64, 0u64);
    let mut last = plan.end;
    for t in tasks {
        let m = t.await.context("load connection task")??;
        hist.add(m.latency)?;
        lag.add(m.send_lag)?;
        ok += m.ok;
        errors += m.errors;
        last = last.max(m.last);
    }
    // Until the last measured answer: a server that fell behind stretches the window.
    let seconds = last.duration_since(plan.measure_from).as_secs_f64();
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    let summary = Summary {
        offered_rate: args.rate,
        connections: args.connections,
        batch: args.batch,
        seconds,
        requests: ok,
        errors,
        requests_per_second: ok as f64 / seconds,
        events_per_second: (ok * args.batch as u64) as f64 / seconds,
        latency_ms: Percentiles {
            p50: ms(0.5),
            p90: ms(0.9),
            p99: ms(0.99),
            p999: ms(0.999),
            max: hist.max() as f64 / 1000.0,
        },
        send_lag_p99_ms: lag.value_at_quantile(0.99) as f64 / 1000.0,
    };
    println!(
        "load: {} req/s, {} events/s ({} ok, {} errors in {seconds:.2} s; {} connections, {} events/request{}); \
         latency ms p50 {:.2} p90 {:.2} p99 {:.2} p99.9 {:.2} max {:.2} (send lag p99 {:.2})",
        summary.requests_per_second.round(),
        summary.events_per_second.round(),
        ok,
        errors,
        args.connections,
        args.batch,
        args.rate.map(|r| format!(", offered {r} req/s")).unwrap_or_default(),
        summary.latency_ms.p50,
        summary.latency_ms.p90,
        summary.latency_ms.p99,
        summary.latency_ms.p999,
        summary.latency_ms.max,
        summary.send_lag_p99_ms,
    );
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&summary)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(summary)
}

/// One keep-alive connection: takes the next request number, waits for its due time (open
/// model), sends it, records the latency (µs).
async fn connection(url: String, lane: usize, plan: Arc<Plan>) -> anyhow::Result<Measured> {
    let mut http = HttpLane::new(&url, plan.key.clone(), format!("load-{}-{lane}", plan.run)).await?;
    let mut hist = Histogram::<u64>::new_with_bounds(1, 120_000_000, 3)?;
    let mut lag = Histogram::<u64>::new_with_bounds(1, 120_000_000, 3)?;
    let mut last = plan.measure_from;
    let (mut ok, mut errors) = (0u64, 0u64);
    tokio::time::sleep_until(plan.start).await;
    loop {
        let n = plan.next.fetch_add(1, Ordering::Relaxed);
        let due = match plan.rate {
            Some(rate) => plan.start + Duration::from_secs_f64(n as f64 / rate),
            None => Instant::now(),
        };
        if due >= plan.end {
            break;
        }
        tokio::time::sleep_until(due).await;
        let sent = Instant::now();
        let good = match http.post(None, request_body(&plan, n), plan.batch > 1).await {
            Ok((status, _)) => status.is_success(),
            Err(_) => false,
        };
        let done = Instant::now();
        if due >= plan.measure_from {
            hist.saturating_record(done.duration_since(due).as_micros().max(1) as u64);
            lag.saturating_record(sent.duration_since(due).as_micros().max(1) as u64);
            last = last.max(done);
            if good {
                ok += 1;
            } else {
                errors += 1;
            }
        }
    }
    Ok(Measured { latency: hist, send_lag: lag, ok, errors, last })
}

/// What one connection measured in the window.
struct Measured {
    latency: Histogram<u64>,
    send_lag: Histogram<u64>,
    ok: u64,
    errors: u64,
    /// When its last measured answer came.
    last: Instant,
}

/// Request `n`'s events: `order_placed` of one unit, ids unique per run, SKUs spread.
fn request_body(plan: &Plan, n: u64) -> Vec<u8> {
    use std::io::Write;
    let mut body = Vec::with_capacity(plan.batch * 170);
    for k in 0..plan.batch as u64 {
        let seq = n * plan.batch as u64 + k;
        let sku = seq.wrapping_mul(2_654_435_761) % plan.skus as u64;
        let _ = write!(
            body,
            r#"{{"id":"load-{run}-{seq}","type":"order_placed","sku":"SKU-{sku:06}","ts":{ts},"qty":1,"order_id":"L{run}-{seq}","unit_price":"19.99","currency":"USD"}}"#,
            run = plan.run,
            ts = plan.run + seq / 1000,
        );
        body.push(b'\n');
    }
    if plan.batch == 1 {
        body.pop();
    }
    body
}
