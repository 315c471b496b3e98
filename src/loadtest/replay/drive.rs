//! The open-model driver: lanes that send due records, and the sampler that watches them and the
//! consumers until everything accepted is committed.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;
use stockflow_pipeline::batcher::Batching;
use stockflow_pipeline::{OutRecord, StreamProducer};
use stockflow_state::retry::{Backoff, BackoffConfig};
use tokio::time::Instant;

use super::{Pace, Workload};
use crate::dashboard::{E2E_BUCKETS, Sample, Telemetry, parse_exposition};
use crate::loadtest::http::HttpLane;

/// How to drive.
#[derive(Debug, Clone)]
pub struct Options {
    /// Pacing.
    pub pace: Pace,
    /// Records per request or put, at most.
    pub batch: usize,
    /// Lanes.
    pub lanes: usize,
    /// Paced runs fail beyond this lag (seconds).
    pub max_lag: f64,
    /// Longest wait for the consumers after the last record.
    pub drain_timeout: Duration,
}

/// What one send did.
#[derive(Debug)]
pub enum Sent {
    /// Put on the stream: how many events (an SP-API notification can become several).
    Accepted(u64),
    /// Refused for a record's content: the record at `index` of the request (when the target
    /// said which), with the reason. Not retried.
    Rejected(Option<usize>, String),
    /// Failed for the target's sake (overload, 5xx, connection lost): sent again after a backoff.
    Retry(String),
    /// Cannot go on (a refused signature, a stream that does not exist).
    Fatal(anyhow::Error),
}

/// A lane's way to the target.
#[derive(Debug)]
pub enum Sink {
    /// One keep-alive HTTP/1.1 connection.
    Http(HttpSink),
    /// The embedded log, behind the ingest's group-commit batcher.
    Log(StreamSink<Batching<stockflow_pipeline::EmbeddedLog>>),
    /// Kinesis `PutRecords` (calls counted), behind the ingest's group-commit batcher.
    Kinesis(StreamSink<Batching<Counted<stockflow_pipeline::kinesis::KinesisProducer>>>),
}

/// A producer whose `put` calls are counted.
#[derive(Debug)]
pub struct Counted<P> {
    inner: P,
    calls: Arc<AtomicU64>,
}

impl<P> Counted<P> {
    /// Counts `inner`'s puts into `calls`.
    pub fn new(inner: P, calls: Arc<AtomicU64>) -> Self {
        Counted { inner, calls }
    }
}

impl<P: StreamProducer> StreamProducer for Counted<P> {
    fn put(
        &self,
        records: &[OutRecord<'_>],
    ) -> impl std::future::Future<Output = Result<(), stockflow_pipeline::StreamError>> + Send {
        self.calls.fetch_add(1, Relaxed);
        self.inner.put(records)
    }
}

impl Sink {
    async fn send(&mut self, w: &Workload, records: &[u32]) -> Sent {
        match self {
            Sink::Http(s) => s.send(w, records).await,
            Sink::Log(s) => s.send(w, records).await,
            Sink::Kinesis(s) => s.send(w, records).await,
        }
    }
}

/// Posts records to an ingest endpoint: one JSON document, or NDJSON for several.
#[derive(Debug)]
pub struct HttpSink {
    http: HttpLane,
}

impl HttpSink {
    /// A lane to `url` (`http://HOST:PORT/path`), signing with `key` when given.
    pub async fn new(url: &str, key: Option<Arc<Vec<u8>>>, lane: usize) -> anyhow::Result<Self> {
        let run = stockflow_state::now_ms() as u64 * 1024 + lane as u64;
        Ok(HttpSink { http: HttpLane::new(url, key, format!("replay-{run}")).await? })
    }

    async fn send(&mut self, w: &Workload, records: &[u32]) -> Sent {
        let mut body = Vec::with_capacity(records.len() * 200);
        for (i, r) in records.iter().enumerate() {
            if i > 0 {
                body.push(b'\n');
            }
            body.extend_from_slice(w.record(*r as usize).1);
        }
        let path = match w.route(records[0] as usize) {
            "events" => None,
            other => Some(crate::loadtest::loadgen::spapi::path(other)),
        };
        let (status, body) = match self.http.post(path, body, records.len() > 1).await {
            Ok(answer) => answer,
            Err(e) => return Sent::Retry(format!("{}: {e:#}", self.http.addr())),
        };
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        match status.as_u16() {
            200..=299 => Sent::Accepted(json["accepted"].as_u64().unwrap_or(records.len() as u64)),
            400 | 413 | 415 | 422 => {
                let index = json["index"].as_u64().map(|i| i as usize).filter(|i| *i < records.len());
                let field = json["field"].as_str().map(|f| format!(" (field {f})")).unwrap_or_default();
                let error = json["error"].as_str().unwrap_or("refused");
                Sent::Rejected(index, format!("{status}: {error}{field}"))
            }
            401 | 403 | 404 => Sent::Fatal(anyhow::anyhow!(
                "{} answered {status}: {}",
                self.http.path(),
                String::from_utf8_lossy(&body).chars().take(300).collect::<String>()
            )),
            _ => Sent::Retry(format!("{status}")),
        }
    }
}

/// Puts records on a stream directly, each stamped with `ingested_at` (the consumers' end-to-end
/// latency starts at the put, as it does at the ingest API).
#[derive(Debug)]
pub struct StreamSink<P> {
    producer: Arc<P>,
}

impl<P: StreamProducer> StreamSink<P> {
    /// A lane putting through `producer`.
    pub fn new(producer: Arc<P>) -> Self {
        StreamSink { producer }
    }

    async fn send(&mut self, w: &Workload, records: &[u32]) -> Sent {
        let out: Vec<OutRecord<'_>> = records
            .iter()
            .map(|r| {
                let (key, payload) = w.record(*r as usize);
                OutRecord { key, payload }
            })
            .collect();
        match crate::ingest::put_stamped(&*self.producer, &out).await {
            Ok(()) => Sent::Accepted(records.len() as u64),
            Err(e) if e.is_transient() => Sent::Retry(e.to_string()),
            Err(e) => Sent::Fatal(e.into()),
        }
    }
}

/// Where the consumers' progress is read: the dashboard's telemetry (this process's consumers,
/// or the members' `/metrics`), and for consumers in this process its metrics handle (their
/// end-to-end histogram).
#[derive(Debug)]
pub struct Probe {
    /// The consumers' counters.
    pub telemetry: Telemetry,
    /// This process's metrics, when the consumers run here.
    pub metrics: Option<PrometheusHandle>,
}

/// Cumulative `stockflow_end_to_end_seconds` bucket counts (bounds: `SECONDS_BUCKETS`, `+Inf`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Buckets(pub [u64; E2E_BUCKETS]);

impl Buckets {
    /// `self − before`, bucket by bucket (a counter that went down counts from 0).
    pub fn since(&self, before: &Buckets) -> Buckets {
        let mut out = self.0;
        for (n, b) in out.iter_mut().zip(before.0) {
            *n = n.checked_sub(b).unwrap_or(*n);
        }
        Buckets(out)
    }

    /// The `q` quantile in milliseconds (see [`quantile_ms`]).
    pub fn quantile_ms(&self, q: f64) -> Option<f64> {
        quantile_ms(crate::telemetry::SECONDS_BUCKETS, &self.0, q)
    }
}

/// The `q` quantile in milliseconds of cumulative counts over `bounds` (seconds) then `+Inf`,
/// interpolated inside its bucket (as PromQL's `histogram_quantile`); a quantile in the `+Inf`
/// bucket gives the largest finite bound.
fn quantile_ms(bounds: &[f64], cumulative: &[u64], q: f64) -> Option<f64> {
    let total = cumulative.last().copied().unwrap_or(0);
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let (mut prev_le, mut prev_n) = (0.0, 0u64);
    for (i, n) in cumulative.iter().enumerate() {
        let Some(le) = bounds.get(i) else { return Some(prev_le * 1000.0) };
        if *n as f64 >= rank {
            let inside = (*n - prev_n).max(1) as f64;
            return Some((prev_le + (le - prev_le) * (rank - prev_n as f64) / inside) * 1000.0);
        }
        (prev_le, prev_n) = (*le, *n);
    }
    Some(prev_le * 1000.0)
}

impl Probe {
    /// The consumers' counters summed over the sources; `None` when one did not answer.
    async fn sample(&self) -> Option<Sample> {
        let mut total = Sample::default();
        for s in self.telemetry.sample().await {
            let s = s?;
            total.read += s.read;
            total.committed += s.committed;
            total.lag_bytes = Some(total.lag_bytes.unwrap_or(0) + s.lag_bytes.unwrap_or(0));
            total.lag_records = Some(total.lag_records.unwrap_or(0) + s.lag_records.unwrap_or(0));
            total.lag_seconds = Some(total.lag_seconds.unwrap_or(0.0).max(s.lag_seconds.unwrap_or(0.0)));
            for (t, n) in total.end_to_end.iter_mut().zip(s.end_to_end) {
                *t += n;
            }
        }
        if let Some(m) = &self.metrics {
            // The histogram, and the lag gauges a Kinesis reader sets (its progress has none).
            let here = parse_exposition(&m.render());
            total.end_to_end = here.end_to_end;
            total.lag_records = total.lag_records.max(here.lag_records);
            total.lag_seconds = Some(total.lag_seconds.unwrap_or(0.0).max(here.lag_seconds.unwrap_or(0.0)));
        }
        Some(total)
    }
}

/// Nothing left unread on any shard, as far as the consumers' lag gauges tell.
fn lag_zero(s: &Sample) -> bool {
    s.lag_bytes.unwrap_or(0) == 0 && s.lag_records.unwrap_or(0) == 0 && s.lag_seconds.unwrap_or(0.0) <= 0.0
}

/// A record the target refused, kept for the report.
#[derive(Debug, Clone, Serialize)]
pub struct Rejection {
    /// The record's number in the stream (1-based, blank lines not counted).
    pub record: usize,
    /// Why.
    pub reason: String,
}

/// One point of the time series (per second).
#[derive(Debug, Clone, Serialize)]
pub struct Point {
    /// Seconds since the start.
    pub t: f64,
    /// Events a second due in the interval.
    pub offered: f64,
    /// Events a second accepted in the interval.
    pub achieved: f64,
    /// Failed attempts (retried) in the interval.
    pub errors: u64,
    /// Accepted but not yet committed by the consumers.
    pub lag_records: u64,
    /// How long ago the oldest uncommitted accepted record was accepted.
    pub lag_seconds: f64,
    /// How far the most late lane is behind its schedule.
    pub behind_seconds: f64,
    /// Ingest latency (due → accepted) in the interval, ms.
    pub ingest_p50_ms: Option<f64>,
    /// 99th percentile of the same.
    pub ingest_p99_ms: Option<f64>,
    /// End-to-end latency (accepted → committed) in the interval, ms (bucket-interpolated).
    pub e2e_p50_ms: Option<f64>,
    /// 99th percentile of the same.
    pub e2e_p99_ms: Option<f64>,
}

/// What a drive measured.
#[derive(Debug)]
pub struct Driven {
    /// Seconds from the start to the last answer.
    pub send_seconds: f64,
    /// Seconds from the last answer until the consumers had committed everything.
    pub drain_seconds: f64,
    /// The consumers committed everything accepted.
    pub caught_up: bool,
    /// Records accepted.
    pub accepted_records: u64,
    /// Events the target put on the stream.
    pub accepted_events: u64,
    /// Records refused for their content.
    pub rejected: u64,
    /// The first refusals.
    pub rejections: Vec<Rejection>,
    /// Failed attempts (retried).
    pub errors: u64,
    /// Requests or puts that succeeded.
    pub requests: u64,
    /// Ingest latency of every accepted record, µs from its due time.
    pub ingest: Histogram<u64>,
    /// End-to-end latency buckets over the run.
    pub e2e: Buckets,
    /// Per second.
    pub series: Vec<Point>,
    /// Worst consumer lag, records and seconds.
    pub max_lag_records: u64,
    /// Worst consumer lag in seconds.
    pub max_lag_seconds: f64,
    /// Worst lateness of a lane behind the schedule.
    pub max_behind_seconds: f64,
}

struct Shared {
    accepted_records: AtomicU64,
    accepted_events: AtomicU64,
    rejected: AtomicU64,
    errors: AtomicU64,
    requests: AtomicU64,
    interval: Mutex<Histogram<u64>>,
    rejections: Mutex<Vec<Rejection>>,
    /// Per lane: due (µs) of its oldest unanswered record; `u64::MAX` when done.
    oldest_due: Vec<AtomicU64>,
    remaining: AtomicUsize,
    last_answer_us: AtomicU64,
    stop: AtomicBool,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).unwrap_or_else(|_| Histogram::new(3).expect("3 sigfig"))
}

/// Drives `lanes` through the workload, then waits for the consumers.
pub async fn drive(w: Arc<Workload>, lanes: Vec<Sink>, probe: &Probe, opts: &Options) -> anyhow::Result<Driven> {
    let due = Arc::new(opts.pace.due_us(&w));
    let n_lanes = lanes.len().max(1);
    let mut assigned: Vec<Vec<u32>> = vec![Vec::new(); n_lanes];
    for i in 0..w.len() {
        let h = u64::from(w.sku_index(i)).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32;
        assigned[(h % n_lanes as u64) as usize].push(i as u32);
    }
    let shared = Arc::new(Shared {
        accepted_records: AtomicU64::new(0),
        accepted_events: AtomicU64::new(0),
        rejected: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        requests: AtomicU64::new(0),
        interval: Mutex::new(histogram()),
        rejections: Mutex::new(Vec::new()),
        oldest_due: (0..n_lanes).map(|_| AtomicU64::new(u64::MAX)).collect(),
        remaining: AtomicUsize::new(n_lanes),
        last_answer_us: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    });
    // The consumers' counters before the first record: the target may hold earlier work.
    let mut base = None;
    for _ in 0..50 {
        if let Some(p) = probe.sample().await {
            base = Some(p);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let base = base.context("the consumers' metrics do not answer (see --metrics)")?;
    let start = Instant::now() + Duration::from_millis(100);
    let mut tasks = Vec::with_capacity(n_lanes);
    for (k, (sink, mine)) in lanes.into_iter().zip(assigned).enumerate() {
        let (w, due, shared) = (Arc::clone(&w), Arc::clone(&due), Arc::clone(&shared));
        let (batch, give_up) = (opts.batch, opts.drain_timeout);
        tasks.push(tokio::spawn(lane(sink, mine, w, due, shared, k, start, batch, give_up)));
    }
    let bar = ProgressBar::new(w.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} records  {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let mut series = Vec::new();
    let mut history: Vec<(f64, u64)> = Vec::new();
    let (mut last_t, mut last_offered, mut last_accepted, mut last_errors) = (0.0, 0u64, 0u64, 0u64);
    let mut last_e2e = Buckets(base.end_to_end);
    let mut last_probe = base;
    let (mut max_lag_records, mut max_lag_seconds, mut max_behind) = (0u64, 0.0f64, 0.0f64);
    let mut sent_done_at: Option<f64> = None;
    let mut caught_up;
    let mut previous_committed = u64::MAX;
    let mut tick = tokio::time::interval_at(start, Duration::from_millis(100));
    let mut ticks = 0u64;
    loop {
        tick.tick().await;
        ticks += 1;
        let t = start.elapsed().as_secs_f64();
        let t_us = (t * 1e6) as u64;
        // Acquire: a lane's counts are visible once its `remaining` decrement is.
        let lanes_done = shared.remaining.load(std::sync::atomic::Ordering::Acquire) == 0;
        let accepted = shared.accepted_events.load(Relaxed);
        let accepted_records = shared.accepted_records.load(Relaxed);
        if lanes_done && sent_done_at.is_none() {
            sent_done_at = Some(shared.last_answer_us.load(Relaxed) as f64 / 1e6);
        }
        if let Some(p) = probe.sample().await {
            last_probe = p;
        }
        let committed = last_probe.committed.saturating_sub(base.committed);
        // Everything put is committed, and nothing read is left uncommitted or unread: a retried
        // put whose first answer was lost counts twice in `committed`, so the count alone could
        // be reached early.
        caught_up = lanes_done
            && committed >= accepted
            && last_probe.read == last_probe.committed
            && lag_zero(&last_probe)
            && last_probe.committed == previous_committed;
        previous_committed = last_probe.committed;
        if history.last().is_none_or(|(_, a)| *a < accepted) {
            history.push((t, accepted));
        }
        let point_due = ticks.is_multiple_of(10) || caught_up;
        if !point_due {
            if lanes_done && sent_done_at.is_some_and(|s| t - s > opts.drain_timeout.as_secs_f64()) {
                break;
            }
            continue;
        }
        let lag_records = accepted.saturating_sub(committed);
        let lag_seconds = if lag_records == 0 {
            0.0
        } else {
            history.get(history.partition_point(|(_, a)| *a <= committed)).map_or(0.0, |(at, _)| t - at)
        };
        let behind = shared
            .oldest_due
            .iter()
            .map(|d| d.load(Relaxed))
            .filter(|d| *d != u64::MAX && *d < t_us)
            .map(|d| (t_us - d) as f64 / 1e6)
            .fold(0.0, f64::max);
        let offered = due.partition_point(|d| *d <= t_us) as u64;
        let errors = shared.errors.load(Relaxed);
        let secs = (t - last_t).max(1e-3);
        let interval = std::mem::replace(&mut *shared.interval.lock().unwrap_or_else(|e| e.into_inner()), histogram());
        let e2e = Buckets(last_probe.end_to_end).since(&last_e2e);
        let q = |h: &Histogram<u64>, q: f64| (!h.is_empty()).then(|| h.value_at_quantile(q) as f64 / 1000.0);
        series.push(Point {
            t,
            offered: offered.saturating_sub(last_offered) as f64 / secs,
            achieved: accepted_records.saturating_sub(last_accepted) as f64 / secs,
            errors: errors - last_errors,
            lag_records,
            lag_seconds,
            behind_seconds: behind,
            ingest_p50_ms: q(&interval, 0.5),
            ingest_p99_ms: q(&interval, 0.99),
            e2e_p50_ms: e2e.quantile_ms(0.5),
            e2e_p99_ms: e2e.quantile_ms(0.99),
        });
        (last_t, last_offered, last_accepted, last_errors) = (t, offered, accepted_records, errors);
        last_e2e = Buckets(last_probe.end_to_end);
        max_lag_records = max_lag_records.max(lag_records);
        max_lag_seconds = max_lag_seconds.max(lag_seconds);
        max_behind = max_behind.max(behind);
        let done = shared.accepted_records.load(Relaxed) + shared.rejected.load(Relaxed);
        bar.set_position(done);
        let pace = if opts.pace.paced() {
            format!("offered {:.0}/s  ", series.last().map_or(0.0, |p| p.offered))
        } else {
            String::new()
        };
        bar.set_message(format!(
            "{pace}achieved {:.0}/s  errors {errors}  lag {lag_records} ({lag_seconds:.1} s){}",
            series.last().map_or(0.0, |p| p.achieved),
            if behind > 1.0 { format!("  behind {behind:.1} s") } else { String::new() },
        ));
        if caught_up {
            break;
        }
        if lanes_done && sent_done_at.is_some_and(|s| t - s > opts.drain_timeout.as_secs_f64()) {
            break;
        }
        if shared.stop.load(Relaxed) {
            // A lane hit a fatal error: stop the rest and report it below.
            for t in &tasks {
                t.abort();
            }
            break;
        }
    }
    bar.finish_and_clear();
    let mut ingest = histogram();
    for task in tasks {
        match task.await {
            Ok(Ok(h)) => ingest.add(&h).context("merging latency histograms")?,
            Ok(Err(e)) => return Err(e),
            Err(e) if e.is_cancelled() => {}
            Err(e) => return Err(e.into()),
        }
    }
    let send_seconds = sent_done_at.unwrap_or(start.elapsed().as_secs_f64());
    let rejections = std::mem::take(&mut *shared.rejections.lock().unwrap_or_else(|e| e.into_inner()));
    Ok(Driven {
        send_seconds,
        drain_seconds: if caught_up { (start.elapsed().as_secs_f64() - send_seconds).max(0.0) } else { f64::NAN },
        caught_up,
        accepted_records: shared.accepted_records.load(Relaxed),
        accepted_events: shared.accepted_events.load(Relaxed),
        rejected: shared.rejected.load(Relaxed),
        rejections,
        errors: shared.errors.load(Relaxed),
        requests: shared.requests.load(Relaxed),
        ingest,
        e2e: Buckets(last_probe.end_to_end).since(&Buckets(base.end_to_end)),
        series,
        max_lag_records,
        max_lag_seconds,
        max_behind_seconds: max_behind,
    })
}

/// One lane: its records in file order, sent when due, as many as are due per request.
#[allow(clippy::too_many_arguments)]
async fn lane(
    mut sink: Sink,
    mut mine: Vec<u32>,
    w: Arc<Workload>,
    due: Arc<Vec<u64>>,
    shared: Arc<Shared>,
    k: usize,
    start: Instant,
    batch: usize,
    give_up: Duration,
) -> anyhow::Result<Histogram<u64>> {
    let mut hist = histogram();
    let mut pos = 0;
    let mut single_until = 0;
    let mut backoff = Backoff::new(BackoffConfig::new(Duration::from_millis(20), Duration::from_secs(2)), k as u64);
    let mut failing_since: Option<Instant> = None;
    let result = loop {
        let Some(&first) = mine.get(pos) else { break Ok(()) };
        let first_due = due[first as usize];
        shared.oldest_due[k].store(first_due, Relaxed);
        tokio::time::sleep_until(start + Duration::from_micros(first_due)).await;
        let now_us = start.elapsed().as_micros() as u64;
        let limit = if pos < single_until { 1 } else { batch };
        let mut end = pos + 1;
        let route = w.route(first as usize);
        while end < mine.len()
            && end - pos < limit
            && due[mine[end] as usize] <= now_us
            && w.route(mine[end] as usize) == route
        {
            end += 1;
        }
        match sink.send(&w, &mine[pos..end]).await {
            Sent::Accepted(events) => {
                let done = start.elapsed().as_micros() as u64;
                let mut interval = shared.interval.lock().unwrap_or_else(|e| e.into_inner());
                for r in &mine[pos..end] {
                    let us = done.saturating_sub(due[*r as usize]).max(1);
                    hist.saturating_record(us);
                    interval.saturating_record(us);
                }
                drop(interval);
                shared.accepted_records.fetch_add((end - pos) as u64, Relaxed);
                shared.accepted_events.fetch_add(events, Relaxed);
                shared.requests.fetch_add(1, Relaxed);
                shared.last_answer_us.fetch_max(done, Relaxed);
                pos = end;
                backoff.reset();
                failing_since = None;
            }
            Sent::Rejected(Some(i), reason) => {
                let r = mine.remove(pos + i);
                reject(&shared, r, reason);
            }
            Sent::Rejected(None, reason) => {
                if end - pos > 1 {
                    // Which record is at fault is unknown: send these one by one.
                    single_until = end;
                } else {
                    reject(&shared, mine[pos], reason);
                    pos += 1;
                }
            }
            Sent::Retry(reason) => {
                shared.errors.fetch_add(1, Relaxed);
                let since = *failing_since.get_or_insert_with(Instant::now);
                if since.elapsed() > give_up {
                    break Err(anyhow::anyhow!("the target kept failing for {give_up:?}: {reason}"));
                }
                let wait = backoff.next_delay().unwrap_or_default();
                tracing::debug!(lane = k, %reason, ?wait, "send failed; retrying");
                tokio::time::sleep(wait).await;
            }
            Sent::Fatal(e) => break Err(e),
        }
    };
    shared.oldest_due[k].store(u64::MAX, Relaxed);
    shared.remaining.fetch_sub(1, std::sync::atomic::Ordering::Release);
    if result.is_err() {
        shared.stop.store(true, Relaxed);
    }
    result.map(|()| hist)
}

fn reject(shared: &Shared, record: u32, reason: String) {
    shared.rejected.fetch_add(1, Relaxed);
    let mut list = shared.rejections.lock().unwrap_or_else(|e| e.into_inner());
    if list.len() < 20 {
        list.push(Rejection { record: record as usize + 1, reason });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_inside_buckets() {
        let q = |cumulative: &[u64], q: f64| quantile_ms(&[0.01, 0.1, 1.0], cumulative, q);
        let b = [50, 90, 100, 100];
        assert!((q(&b, 0.5).unwrap() - 10.0).abs() < 1e-9);
        assert!((q(&b, 0.7).unwrap() - 55.0).abs() < 1e-9);
        assert!((q(&b, 0.99).unwrap() - 910.0).abs() < 1e-6);
        assert_eq!(quantile_ms(&[0.01], &[1, 10], 0.99), Some(10.0), "beyond the last bound: the last bound");
        assert_eq!(Buckets([0; E2E_BUCKETS]).quantile_ms(0.5), None);
    }

    #[test]
    fn expositions_sum_over_shards_and_deltas_reset() {
        let text = "# TYPE x counter\nstockflow_records_committed_total{shard=\"a\"} 10\n\
                    stockflow_records_committed_total{shard=\"b\"} 5\n\
                    stockflow_end_to_end_seconds_bucket{le=\"0.1\"} 3\n\
                    stockflow_end_to_end_seconds_bucket{le=\"+Inf\"} 4\n";
        let p = parse_exposition(text);
        assert_eq!(p.committed, 15);
        let at = |b: f64| crate::telemetry::SECONDS_BUCKETS.iter().position(|x| *x == b).unwrap();
        let (tenth, inf) = (at(0.1), E2E_BUCKETS - 1);
        assert_eq!((p.end_to_end[tenth], p.end_to_end[inf]), (3, 4));
        let mut later = p.end_to_end;
        (later[tenth], later[inf]) = (5, 9);
        let d = Buckets(later).since(&Buckets(p.end_to_end));
        assert_eq!((d.0[tenth], d.0[inf]), (2, 5));
    }
}
