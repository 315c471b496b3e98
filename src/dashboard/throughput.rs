//! Throughput, lag and end-to-end latency for the dashboard and the load tests: sampled from this
//! process's consumers or scraped from members' `/metrics` (the Prometheus text exposition).

use std::sync::Arc;

use stockflow_connectors::connector::HttpClient;
use stockflow_pipeline::Progress;

use crate::telemetry::{Sample, parse_exposition};

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
