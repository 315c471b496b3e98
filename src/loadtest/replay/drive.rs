//! The open-model driver: lanes that send due records, and the sampler that watches them and the
//! consumers until everything accepted is committed.
//!
//! Over 600 lines only with its tests (~570 without): the lanes and the sampler share the counters
//! defined here.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;
use stockflow_state::retry::{Backoff, BackoffConfig};
use tokio::time::Instant;

use super::{Pace, Workload};
use crate::dashboard::Telemetry;
use crate::telemetry::{E2E_BUCKETS, Sample, parse_exposition};

pub use super::sinks::{Counted, HttpSink, Sent, Sink, StreamSink};

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

impl Shared {
    fn new(lanes: usize) -> Self {
        Shared {
            accepted_records: AtomicU64::new(0),
            accepted_events: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            interval: Mutex::new(histogram()),
            rejections: Mutex::new(Vec::new()),
            oldest_due: (0..lanes).map(|_| AtomicU64::new(u64::MAX)).collect(),
            remaining: AtomicUsize::new(lanes),
            last_answer_us: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        }
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).unwrap_or_else(|_| Histogram::new(3).expect("3 sigfig"))
}

/// Drives `lanes` through the workload, then waits for the consumers.
pub async fn drive(w: Arc<Workload>, lanes: Vec<Sink>, probe: &Probe, opts: &Options) -> anyhow::Result<Driven> {
    let due = Arc::new(opts.pace.due_us(&w));
    let assigned = assign_lanes(&w, lanes.len().max(1));
    let shared = Arc::new(Shared::new(assigned.len()));
    let base = baseline(probe).await?;
    let start = Instant::now() + Duration::from_millis(100);
    let tasks: Vec<_> = lanes
        .into_iter()
        .zip(assigned)
        .enumerate()
        .map(|(k, (sink, mine))| {
            let ctx = LaneCtx {
                w: Arc::clone(&w),
                due: Arc::clone(&due),
                shared: Arc::clone(&shared),
                k,
                start,
                batch: opts.batch,
                give_up: opts.drain_timeout,
            };
            tokio::spawn(lane(sink, mine, ctx))
        })
        .collect();
    let bar = progress_bar(w.len() as u64);
    let mut sampler = Sampler::new(&shared, &due, base);
    let mut sent_done_at: Option<f64> = None;
    let mut tick = tokio::time::interval_at(start, Duration::from_millis(100));
    let caught_up = 'watch: {
        for ticks in 1u64.. {
            tick.tick().await;
            let t = start.elapsed().as_secs_f64();
            // Acquire: a lane's counts are visible once its `remaining` decrement is.
            let lanes_done = shared.remaining.load(std::sync::atomic::Ordering::Acquire) == 0;
            if lanes_done && sent_done_at.is_none() {
                sent_done_at = Some(shared.last_answer_us.load(Relaxed) as f64 / 1e6);
            }
            let caught_up = sampler.observe(probe.sample().await, t, lanes_done);
            if ticks.is_multiple_of(10) || caught_up {
                let point = sampler.point(t);
                bar.set_position(shared.accepted_records.load(Relaxed) + shared.rejected.load(Relaxed));
                bar.set_message(point.describe(opts.pace.paced()));
            }
            if caught_up {
                break 'watch true;
            }
            if lanes_done && sent_done_at.is_some_and(|s| t - s > opts.drain_timeout.as_secs_f64()) {
                break 'watch false;
            }
            if shared.stop.load(Relaxed) {
                // A lane hit a fatal error: stop the rest and report it below.
                tasks.iter().for_each(tokio::task::JoinHandle::abort);
                break 'watch false;
            }
        }
        false
    };
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
        e2e: Buckets(sampler.last_probe.end_to_end).since(&Buckets(sampler.base.end_to_end)),
        max_lag_records: sampler.max_lag_records,
        max_lag_seconds: sampler.max_lag_seconds,
        max_behind_seconds: sampler.max_behind,
        series: sampler.series,
    })
}

/// Records spread over `n` lanes by SKU (a SKU always on the same lane: its order is kept).
fn assign_lanes(w: &Workload, n: usize) -> Vec<Vec<u32>> {
    let mut assigned: Vec<Vec<u32>> = vec![Vec::new(); n];
    for i in 0..w.len() {
        let h = u64::from(w.sku_index(i)).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32;
        assigned[(h % n as u64) as usize].push(i as u32);
    }
    assigned
}

/// The consumers' counters before the first record (the target may hold earlier work); waits up
/// to 5 s for their metrics to answer.
async fn baseline(probe: &Probe) -> anyhow::Result<Sample> {
    let mut backoff = Backoff::new(BackoffConfig::new(Duration::from_millis(50), Duration::from_millis(500)), 1);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(p) = probe.sample().await {
            return Ok(p);
        }
        if Instant::now() >= deadline {
            anyhow::bail!("the consumers' metrics do not answer (see --metrics)");
        }
        tokio::time::sleep(backoff.next_delay().unwrap_or_default().max(Duration::from_millis(10))).await;
    }
}

fn progress_bar(len: u64) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} records  {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar
}

impl Point {
    /// The progress bar's message.
    fn describe(&self, paced: bool) -> String {
        let pace = if paced { format!("offered {:.0}/s  ", self.offered) } else { String::new() };
        let behind =
            if self.behind_seconds > 1.0 { format!("  behind {:.1} s", self.behind_seconds) } else { String::new() };
        format!(
            "{pace}achieved {:.0}/s  errors {}  lag {} ({:.1} s){behind}",
            self.achieved, self.errors, self.lag_records, self.lag_seconds
        )
    }
}

/// The time series of a run: the consumers' counters against what the lanes sent, a point every
/// second, and the run's worst lag.
struct Sampler<'a> {
    shared: &'a Shared,
    due: &'a [u64],
    base: Sample,
    last_probe: Sample,
    previous_committed: u64,
    /// (time, events accepted) whenever the count grew: when a record was accepted, for lag.
    history: Vec<(f64, u64)>,
    /// The previous point's time, offered, accepted and errors.
    last: (f64, u64, u64, u64),
    last_e2e: Buckets,
    series: Vec<Point>,
    max_lag_records: u64,
    max_lag_seconds: f64,
    max_behind: f64,
}

impl<'a> Sampler<'a> {
    fn new(shared: &'a Shared, due: &'a [u64], base: Sample) -> Self {
        Sampler {
            shared,
            due,
            last_e2e: Buckets(base.end_to_end),
            last_probe: base,
            base,
            previous_committed: u64::MAX,
            history: Vec::new(),
            last: (0.0, 0, 0, 0),
            series: Vec::new(),
            max_lag_records: 0,
            max_lag_seconds: 0.0,
            max_behind: 0.0,
        }
    }

    /// Takes a probe (`None`: it did not answer, the last one stands) at `t`; true once
    /// everything accepted is committed.
    fn observe(&mut self, probe: Option<Sample>, t: f64, lanes_done: bool) -> bool {
        if let Some(p) = probe {
            self.last_probe = p;
        }
        let accepted = self.shared.accepted_events.load(Relaxed);
        let committed = self.last_probe.committed.saturating_sub(self.base.committed);
        // Everything put is committed, and nothing read is left uncommitted or unread: a retried
        // put whose first answer was lost counts twice in `committed`, so the count alone could
        // be reached early.
        let caught_up = lanes_done
            && committed >= accepted
            && self.last_probe.read == self.last_probe.committed
            && lag_zero(&self.last_probe)
            && self.last_probe.committed == self.previous_committed;
        self.previous_committed = self.last_probe.committed;
        if self.history.last().is_none_or(|(_, a)| *a < accepted) {
            self.history.push((t, accepted));
        }
        caught_up
    }

    /// A point of the series at `t`: rates since the previous point, lag now.
    fn point(&mut self, t: f64) -> &Point {
        let t_us = (t * 1e6) as u64;
        let accepted = self.shared.accepted_events.load(Relaxed);
        let accepted_records = self.shared.accepted_records.load(Relaxed);
        let committed = self.last_probe.committed.saturating_sub(self.base.committed);
        let lag_records = accepted.saturating_sub(committed);
        let lag_seconds = if lag_records == 0 {
            0.0
        } else {
            self.history.get(self.history.partition_point(|(_, a)| *a <= committed)).map_or(0.0, |(at, _)| t - at)
        };
        let behind = self
            .shared
            .oldest_due
            .iter()
            .map(|d| d.load(Relaxed))
            .filter(|d| *d != u64::MAX && *d < t_us)
            .map(|d| (t_us - d) as f64 / 1e6)
            .fold(0.0, f64::max);
        let offered = self.due.partition_point(|d| *d <= t_us) as u64;
        let errors = self.shared.errors.load(Relaxed);
        let (last_t, last_offered, last_accepted, last_errors) = self.last;
        let secs = (t - last_t).max(1e-3);
        let interval =
            std::mem::replace(&mut *self.shared.interval.lock().unwrap_or_else(|e| e.into_inner()), histogram());
        let e2e = Buckets(self.last_probe.end_to_end).since(&self.last_e2e);
        let q = |h: &Histogram<u64>, q: f64| (!h.is_empty()).then(|| h.value_at_quantile(q) as f64 / 1000.0);
        self.last = (t, offered, accepted_records, errors);
        self.last_e2e = Buckets(self.last_probe.end_to_end);
        self.max_lag_records = self.max_lag_records.max(lag_records);
        self.max_lag_seconds = self.max_lag_seconds.max(lag_seconds);
        self.max_behind = self.max_behind.max(behind);
        self.series.push(Point {
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
        self.series.last().expect("just pushed")
    }
}

/// What a lane task needs besides its sink and records.
struct LaneCtx {
    w: Arc<Workload>,
    due: Arc<Vec<u64>>,
    shared: Arc<Shared>,
    /// The lane's number.
    k: usize,
    start: Instant,
    batch: usize,
    give_up: Duration,
}

/// One lane: its records in file order, sent when due, as many as are due per request.
async fn lane(mut sink: Sink, mut mine: Vec<u32>, ctx: LaneCtx) -> anyhow::Result<Histogram<u64>> {
    let LaneCtx { w, due, shared, k, start, batch, give_up } = ctx;
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
