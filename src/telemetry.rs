//! Logging (`tracing`, filtered by `STOCKFLOW_LOG`, else the command's default level; text, or
//! one JSON object per line with `STOCKFLOW_LOG_FORMAT=json`), span export over OTLP when an
//! endpoint is configured ([`otlp`]), and the Prometheus recorder.
//! Only the binary installs a recorder; the library crates emit through the `metrics` facade.
//! Every metric is listed in `docs/metrics.md` (a test keeps the two in step).

use std::time::Duration;

use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::EnvFilter;

pub mod otlp;

/// Bucket bounds (seconds) of every `_seconds` histogram: 1 ms to 2 minutes (1.5 and 2 s for the
/// dashboard's 2 s staleness bound). Real Prometheus
/// histograms, so `histogram_quantile` aggregates them across shards and processes.
pub const SECONDS_BUCKETS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];

/// Bucket bounds of the size histograms (records or requests per call).
const COUNT_BUCKETS: &[f64] = &[1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0];

/// How often histogram samples are folded into their buckets when nobody scrapes.
const UPKEEP: Duration = Duration::from_secs(5);

/// What [`init_at`] installed: the Prometheus handle (`None` when a recorder was already
/// installed) and the span exporter, which must be shut down (flushed) before the runtime stops.
#[derive(Debug, Default)]
pub struct Telemetry {
    /// The Prometheus recorder's handle.
    pub metrics: Option<PrometheusHandle>,
    tracer: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports the buffered spans now (waits for the export); a no-op when export is off. For a
    /// Lambda function, whose process is frozen between invocations.
    pub async fn flush(&self) {
        if let Some(provider) = self.tracer.clone() {
            // The SDK's flush blocks its caller until the export thread is done.
            let flushed = tokio::task::spawn_blocking(move || provider.force_flush()).await;
            if let Ok(Err(e)) = flushed {
                tracing::warn!(error = %e, "spans not exported");
            }
        }
    }

    /// Exports the spans still buffered and stops the exporter (bounded by its export timeout).
    /// Call it from outside the runtime's worker threads, while the runtime still runs.
    pub fn shutdown(&mut self) {
        if let Some(provider) = self.tracer.take()
            && let Err(e) = provider.shutdown()
        {
            eprintln!("warning: spans not exported at exit: {e}");
        }
    }
}

/// Installs the log subscriber (stderr, INFO unless `STOCKFLOW_LOG` says otherwise) and the
/// Prometheus recorder, logging at INFO.
pub fn init(runtime: &tokio::runtime::Handle) -> Telemetry {
    init_at("info", runtime)
}

/// Installs the log subscriber, at `default_level` (`warn`, `info`, `debug`, or any `EnvFilter`
/// directive) unless `STOCKFLOW_LOG` is set; the span exporter when an OTLP endpoint is
/// configured ([`otlp`]; its HTTP requests run on `runtime`); and the Prometheus recorder.
pub fn init_at(default_level: &str, runtime: &tokio::runtime::Handle) -> Telemetry {
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let filter = EnvFilter::try_from_env("STOCKFLOW_LOG").unwrap_or_else(|_| EnvFilter::new(default_level));
    let format = std::env::var("STOCKFLOW_LOG_FORMAT").ok();
    let json = format.as_deref().is_some_and(|f| f.eq_ignore_ascii_case("json"));
    let unknown_format = format.filter(|f| !json && !f.eq_ignore_ascii_case("text"));
    let (tracer, otlp_error) = match otlp::provider(runtime) {
        Ok(provider) => (provider, None),
        Err(e) => (None, Some(e)),
    };
    match &tracer {
        // Without export the log filter is global: callsites it disables cost nothing.
        None => tracing_subscriber::registry().with(filter).with(log_layer(json)).init(),
        Some(provider) => {
            use opentelemetry::trace::TracerProvider as _;
            // Spans of stockflow's own crates at INFO, whatever the log level says.
            let targets = tracing_subscriber::filter::Targets::new()
                .with_target("stockflow", tracing::Level::INFO)
                .with_target("stockflow_pipeline", tracing::Level::INFO)
                .with_target("stockflow_connectors", tracing::Level::INFO)
                .with_target("stockflow_state", tracing::Level::INFO);
            let spans = tracing_opentelemetry::layer().with_tracer(provider.tracer("stockflow")).with_filter(targets);
            tracing_subscriber::registry().with(log_layer(json).with_filter(filter)).with(spans).init();
        }
    }
    if let Some(format) = unknown_format {
        tracing::warn!(%format, "STOCKFLOW_LOG_FORMAT is `json` or `text`; logging as text");
    }
    if let Some(e) = otlp_error {
        tracing::warn!(error = %e, "OTLP span export is off");
    } else if tracer.is_some() {
        tracing::info!(endpoint = %otlp::endpoint().unwrap_or_default(), "exporting spans over OTLP/HTTP (JSON)");
    }
    let metrics = match recorder().and_then(|b| b.install_recorder()) {
        Ok(handle) => {
            // Histogram samples wait in a queue until a render or an upkeep folds them into the
            // buckets: without upkeep an unscraped process grows without bound.
            let upkeep = handle.clone();
            let spawned = std::thread::Builder::new().name("metrics-upkeep".into()).spawn(move || {
                loop {
                    std::thread::sleep(UPKEEP);
                    upkeep.run_upkeep();
                }
            });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "metrics upkeep thread not started");
            }
            describe();
            Some(handle)
        }
        Err(e) => {
            tracing::warn!(error = %e, "metrics recorder not installed");
            None
        }
    };
    Telemetry { metrics, tracer }
}

/// The log lines: one JSON object per line (timestamp, level, target, fields, span context — what
/// CloudWatch Logs Insights and Loki parse without a pattern), or text.
fn log_layer<S>(json: bool) -> Box<dyn tracing_subscriber::Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    use std::io::IsTerminal;
    use tracing_subscriber::{Layer as _, fmt};
    if json {
        fmt::layer().json().with_current_span(false).with_writer(std::io::stderr).boxed()
    } else {
        fmt::layer().with_ansi(std::io::stderr().is_terminal()).with_writer(std::io::stderr).boxed()
    }
}

fn recorder() -> Result<PrometheusBuilder, metrics_exporter_prometheus::BuildError> {
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full("stockflow_put_batch_requests".into()), COUNT_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full("stockflow_put_batch_records".into()), COUNT_BUCKETS)
}

/// `# HELP` lines for the metrics scraped most (the rest are documented in docs/metrics.md).
fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!("stockflow_events_applied_total", "Events applied to SKU state, per shard.");
    describe_counter!("stockflow_events_deduplicated_total", "Events skipped as already applied, per shard.");
    describe_counter!("stockflow_dead_letters_total", "Records dead-lettered as bad, per shard.");
    describe_counter!("stockflow_alerts_total", "Alerts committed, by kind (oversell, low_stock).");
    describe_gauge!("stockflow_shard_lag_records", "Records of the shard not yet read.");
    describe_gauge!(
        "stockflow_shard_lag_seconds",
        Unit::Seconds,
        "How far the shard's reader is behind the newest record."
    );
    describe_histogram!("stockflow_commit_duration_seconds", Unit::Seconds, "Time of one state commit.");
    describe_histogram!(
        "stockflow_end_to_end_seconds",
        Unit::Seconds,
        "From the ingest accepting an event to its commit in the consumer."
    );
    describe_gauge!("process_resident_memory_bytes", Unit::Bytes, "Resident memory of the process.");
}

/// Reads the process's memory, threads and file descriptors into the `process_*` gauges (Linux
/// `/proc`; elsewhere nothing is set). Called before each render.
pub fn update_process_metrics() {
    let page = 4096.0;
    if let Ok(statm) = std::fs::read_to_string("/proc/self/statm") {
        let mut it = statm.split_whitespace().map(|v| v.parse::<f64>().unwrap_or(0.0));
        let (virt, rss) = (it.next().unwrap_or(0.0), it.next().unwrap_or(0.0));
        metrics::gauge!("process_virtual_memory_bytes").set(virt * page);
        metrics::gauge!("process_resident_memory_bytes").set(rss * page);
    }
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
        // Fields after the command (which may hold spaces) start at state (field 3).
        if let Some((_, rest)) = stat.rsplit_once(')') {
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
            // num_threads is field 20, i.e. 17 after the state.
            metrics::gauge!("process_threads").set(ticks(17));
        }
    }
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        metrics::gauge!("process_open_fds").set(dir.count() as f64);
    }
}

/// The text exposition of `handle` after refreshing the process metrics, as an HTTP response
/// (404 with a JSON error when the process runs without a recorder).
pub fn render(handle: Option<&PrometheusHandle>) -> Response {
    match handle {
        Some(h) => {
            update_process_metrics();
            ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], h.render()).into_response()
        }
        None => (
            StatusCode::NOT_FOUND,
            [(header::CONTENT_TYPE, "application/json")],
            r#"{"error":"metrics are not enabled in this process"}"#,
        )
            .into_response(),
    }
}

/// Counters read at one instant (sums over shards and members).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Sample {
    /// Events applied so far.
    pub applied: u64,
    /// Records read so far.
    pub read: u64,
    /// Bytes not yet read (embedded log).
    pub lag_bytes: Option<u64>,
    /// Records not yet read.
    pub lag_records: Option<u64>,
    /// Largest time behind the newest record over the shards (Kinesis).
    pub lag_seconds: Option<f64>,
    /// Records covered by durable commits so far.
    pub committed: u64,
    /// Oversell alerts committed so far (`stockflow_alerts_total{kind="oversell"}`).
    pub oversell_alerts: u64,
    /// Connector requests dead-lettered so far (`stockflow_connector_dead_lettered_total`).
    pub connector_dead_letters: u64,
    /// `stockflow_end_to_end_seconds` cumulative bucket counts: one per bound of
    /// [`SECONDS_BUCKETS`], then `+Inf`.
    pub end_to_end: [u64; E2E_BUCKETS],
}

/// Buckets of `stockflow_end_to_end_seconds` in a [`Sample`].
pub const E2E_BUCKETS: usize = SECONDS_BUCKETS.len() + 1;

/// The pipeline counters of one Prometheus text exposition (summed over their label sets).
pub fn parse_exposition(text: &str) -> Sample {
    let mut s = Sample::default();
    for line in text.lines() {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let Some(value) = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) else { continue };
        match &line[..name_end] {
            "stockflow_events_applied_total" => s.applied += value as u64,
            "stockflow_records_read_total" => s.read += value as u64,
            "stockflow_shard_lag_bytes" => s.lag_bytes = Some(s.lag_bytes.unwrap_or(0) + value as u64),
            "stockflow_shard_lag_records" => s.lag_records = Some(s.lag_records.unwrap_or(0) + value as u64),
            "stockflow_shard_lag_seconds" => s.lag_seconds = Some(s.lag_seconds.unwrap_or(0.0).max(value)),
            "stockflow_records_committed_total" => s.committed += value as u64,
            "stockflow_alerts_total" if line.contains("kind=\"oversell\"") => s.oversell_alerts += value as u64,
            "stockflow_connector_dead_lettered_total" => s.connector_dead_letters += value as u64,
            bucket if bucket.strip_suffix("_bucket") == Some("stockflow_end_to_end_seconds") => {
                let le = line.split("le=\"").nth(1).and_then(|r| r.split('"').next());
                let bound = |b: &f64| le.and_then(|l| l.parse::<f64>().ok()) == Some(*b);
                let i = match le {
                    Some("+Inf") => Some(E2E_BUCKETS - 1),
                    _ => SECONDS_BUCKETS.iter().position(bound),
                };
                if let Some(slot) = i.and_then(|i| s.end_to_end.get_mut(i)) {
                    *slot += value as u64;
                }
            }
            _ => {}
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::parse_exposition;

    #[test]
    fn the_exposition_is_summed_over_shards_and_members() {
        let text = "# HELP x\n# TYPE stockflow_events_applied_total counter\n\
            stockflow_events_applied_total{shard=\"a\"} 10\n\
            stockflow_events_applied_total{shard=\"b\"} 5\n\
            stockflow_events_applied_totals 99\n\
            stockflow_records_read_total{shard=\"a\"} 17\n\
            stockflow_shard_lag_seconds{shard=\"a\"} 1.5\n\
            stockflow_shard_lag_seconds{shard=\"b\"} 0.25\n\
            stockflow_shard_lag_records{shard=\"a\"} 3\n";
        let s = parse_exposition(text);
        assert_eq!((s.applied, s.read, s.lag_records, s.lag_seconds, s.lag_bytes), (15, 17, Some(3), Some(1.5), None));
    }
}
