//! Throughput, lag and end-to-end latency for the dashboard and the load tests: sampled from this
//! process's consumers or scraped from members' `/metrics` (the Prometheus text exposition).

use std::sync::Arc;

use stockflow_connectors::connector::HttpClient;
use stockflow_pipeline::Progress;

/// Where throughput and lag come from.
#[derive(Debug)]
pub enum Telemetry {
    /// The consumers of this process (`run`, `demo`).
    InProcess(Arc<Progress>),
    /// The `/metrics` of the group's members (`stockflow dashboard --scrape URL ...`).
    Scrape {
        /// Client for the scrapes.
        client: Box<HttpClient>,
        /// Metrics URLs.
        urls: Vec<String>,
    },
    /// No counters: the charts show alerts only.
    None,
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
    /// `stockflow_end_to_end_seconds` cumulative bucket counts: one per bound of
    /// [`crate::telemetry::SECONDS_BUCKETS`], then `+Inf`.
    pub end_to_end: [u64; E2E_BUCKETS],
}

/// Buckets of `stockflow_end_to_end_seconds` in a [`Sample`].
pub const E2E_BUCKETS: usize = crate::telemetry::SECONDS_BUCKETS.len() + 1;

impl Telemetry {
    /// One sample per source (a scraped member that did not answer: `None`).
    pub async fn sample(&self) -> Vec<Option<Sample>> {
        use std::sync::atomic::Ordering::Relaxed;
        match self {
            Telemetry::InProcess(p) => vec![Some(Sample {
                applied: p.applied.load(Relaxed),
                read: p.read.load(Relaxed),
                lag_bytes: Some(p.lag_bytes.load(Relaxed)),
                committed: p.committed.load(Relaxed),
                ..Sample::default()
            })],
            Telemetry::Scrape { client, urls } => {
                let mut out = Vec::with_capacity(urls.len());
                for url in urls {
                    out.push(match client.send(hyper::Method::GET, url, &[], bytes_empty()).await {
                        Ok(r) if r.status.is_success() => Some(parse_exposition(&String::from_utf8_lossy(&r.body))),
                        Ok(r) => {
                            tracing::debug!(url, status = %r.status, "scrape refused");
                            None
                        }
                        Err(e) => {
                            tracing::debug!(url, error = %e, "scrape failed");
                            None
                        }
                    });
                }
                out
            }
            Telemetry::None => Vec::new(),
        }
    }
}

/// Per second over `secs`: the sum of each source's increase between two samples, over the
/// sources that answered both times (a restarted member's counter counts from 0). `None` when no
/// source answered twice.
pub(super) fn rate(now: &[Option<Sample>], before: &[Option<Sample>], secs: f64, f: fn(&Sample) -> u64) -> Option<f64> {
    let mut any = false;
    let mut sum = 0u64;
    for (a, b) in now.iter().zip(before) {
        if let (Some(a), Some(b)) = (a, b) {
            any = true;
            let (x, y) = (f(a), f(b));
            sum += if x >= y { x - y } else { x };
        }
    }
    any.then(|| sum as f64 / secs)
}

/// The lag now, over the sources that answered: bytes and records summed, seconds the worst.
pub(super) fn lag(now: &[Option<Sample>]) -> Sample {
    let mut total = Sample::default();
    for s in now.iter().flatten() {
        total.lag_bytes = add(total.lag_bytes, s.lag_bytes);
        total.lag_records = add(total.lag_records, s.lag_records);
        total.lag_seconds = match (total.lag_seconds, s.lag_seconds) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
    }
    total
}

pub(super) fn bytes_empty() -> hyper::body::Bytes {
    hyper::body::Bytes::new()
}

pub(super) fn add(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a + b),
        (a, b) => a.or(b),
    }
}

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
            bucket if bucket.strip_suffix("_bucket") == Some("stockflow_end_to_end_seconds") => {
                let le = line.split("le=\"").nth(1).and_then(|r| r.split('"').next());
                let bound = |b: &f64| le.and_then(|l| l.parse::<f64>().ok()) == Some(*b);
                let i = match le {
                    Some("+Inf") => Some(E2E_BUCKETS - 1),
                    _ => crate::telemetry::SECONDS_BUCKETS.iter().position(bound),
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
