//! Telemetry of the pipeline, as named events over the `metrics` facade. Labels are
//! low-cardinality: the shard, an outcome — never a SKU.

use std::time::Duration;

use metrics::{counter, gauge, histogram};

/// Records durably appended to the embedded log.
pub fn log_appended(records: u64, bytes: u64) {
    counter!("stockflow_log_appended_records_total").increment(records);
    counter!("stockflow_log_appended_bytes_total").increment(bytes);
}

/// What one processed batch did on a shard.
#[derive(Debug, Default, Clone, Copy)]
pub struct BatchCounts {
    /// Records read.
    pub read: u64,
    /// Bytes read.
    pub bytes: u64,
    /// Events applied.
    pub applied: u64,
    /// Events skipped as duplicates.
    pub duplicates: u64,
    /// Records dead-lettered.
    pub dead_letters: u64,
    /// Events late for a window.
    pub late: u64,
    /// Placements of an order line that already exists (SPEC v2: re-sent, no change).
    pub resent_placements: u64,
    /// Windows finalised.
    pub windows_final: u64,
    /// Effects produced.
    pub effects: u64,
}

/// Counts of one batch on `shard`.
pub fn batch_processed(shard: &str, c: &BatchCounts) {
    let shard = shard.to_string();
    counter!("stockflow_records_read_total", "shard" => shard.clone()).increment(c.read);
    counter!("stockflow_records_read_bytes_total", "shard" => shard.clone()).increment(c.bytes);
    counter!("stockflow_events_applied_total", "shard" => shard.clone()).increment(c.applied);
    counter!("stockflow_events_deduplicated_total", "shard" => shard.clone()).increment(c.duplicates);
    counter!("stockflow_dead_letters_total", "shard" => shard.clone()).increment(c.dead_letters);
    counter!("stockflow_late_events_total", "shard" => shard.clone()).increment(c.late);
    counter!("stockflow_resent_placements_total", "shard" => shard.clone()).increment(c.resent_placements);
    counter!("stockflow_windows_final_total", "shard" => shard.clone()).increment(c.windows_final);
    counter!("stockflow_effects_total", "shard" => shard).increment(c.effects);
}

/// A commit finished (`outcome`: `ok`, `retry`, `fenced`, `error`).
pub fn commit(shard: &str, outcome: &'static str, elapsed: Duration) {
    counter!("stockflow_commits_total", "shard" => shard.to_string(), "outcome" => outcome).increment(1);
    if outcome == "ok" {
        histogram!("stockflow_commit_duration_seconds", "shard" => shard.to_string()).record(elapsed.as_secs_f64());
    }
}

/// End-to-end samples beyond a week are not latencies but wrong stamps.
const MAX_LATENCY_MS: i64 = 7 * 86_400_000;

/// Registers a shard's commit and alert counters at 0, so the first error or alert is an
/// increase Prometheus can see (a counter born at 1 has no `increase`).
pub fn shard_started(shard: &str) {
    for outcome in ["ok", "retry", "fenced", "error"] {
        counter!("stockflow_commits_total", "shard" => shard.to_string(), "outcome" => outcome).increment(0);
    }
    counter!("stockflow_dead_letters_total", "shard" => shard.to_string()).increment(0);
    counter!("stockflow_records_committed_total", "shard" => shard.to_string()).increment(0);
    for kind in ["oversell", "low_stock"] {
        counter!("stockflow_alerts_total", "kind" => kind).increment(0);
    }
}

/// A worker stopped reading `shard`: its lag is no longer this process's to report (a member that
/// lost or handed off the lease would otherwise keep exporting its last lag).
pub fn shard_stopped(shard: &str) {
    gauge!("stockflow_shard_lag_bytes", "shard" => shard.to_string()).set(0.0);
    gauge!("stockflow_shard_lag_records", "shard" => shard.to_string()).set(0.0);
    gauge!("stockflow_shard_lag_seconds", "shard" => shard.to_string()).set(0.0);
}

/// A commit of `shard` is durable: the records it covers, its alerts by kind, and the end-to-end
/// latency of its events that carry an ingest stamp (`stamps`: run-length encoded
/// `(ingested_at ms, events)`).
pub fn committed(shard: &str, records: u64, effects: &[stockflow_state::Effect], stamps: &[(i64, u32)]) {
    counter!("stockflow_records_committed_total", "shard" => shard.to_string()).increment(records);
    let (mut oversell, mut low_stock) = (0u64, 0u64);
    for e in effects {
        match e {
            stockflow_state::Effect::Oversell(_) => oversell += 1,
            stockflow_state::Effect::LowStock(_) => low_stock += 1,
            _ => {}
        }
    }
    if oversell > 0 {
        counter!("stockflow_alerts_total", "kind" => "oversell").increment(oversell);
    }
    if low_stock > 0 {
        counter!("stockflow_alerts_total", "kind" => "low_stock").increment(low_stock);
    }
    if stamps.is_empty() {
        return;
    }
    let now = stockflow_state::now_ms();
    let h = histogram!("stockflow_end_to_end_seconds");
    for &(at, n) in stamps {
        // A stamp from a skewed clock or a sender is kept out of the latency (≤ a week).
        let ms = now.saturating_sub(at);
        if (0..=MAX_LATENCY_MS).contains(&ms) {
            h.record_many(ms as f64 / 1000.0, n as usize);
        }
    }
}

/// How far a shard's reader is behind.
pub fn lag(shard: &str, lag: &crate::source::Lag) {
    if let Some(b) = lag.bytes {
        gauge!("stockflow_shard_lag_bytes", "shard" => shard.to_string()).set(b as f64);
    }
    if let Some(r) = lag.records {
        gauge!("stockflow_shard_lag_records", "shard" => shard.to_string()).set(r as f64);
    }
    if let Some(ms) = lag.millis {
        gauge!("stockflow_shard_lag_seconds", "shard" => shard.to_string()).set(ms as f64 / 1000.0);
    }
}

/// A stream read call failed (`op`: `GetRecords`, `GetShardIterator`, `SubscribeToShard`).
pub fn stream_error(shard: &str, op: &'static str) {
    counter!("stockflow_stream_errors_total", "shard" => shard.to_string(), "op" => op).increment(1);
}

/// Leases this worker holds now.
pub fn leases_owned(n: usize) {
    gauge!("stockflow_leases_owned").set(n as f64);
}

/// Whether this process holds the shard's lease now (1) or not (0).
pub fn shard_owned(shard: &str, owned: bool) {
    gauge!("stockflow_shard_owned", "shard" => shard.to_string()).set(if owned { 1.0 } else { 0.0 });
}

/// A lease changed hands here (`event`: `taken`, `stolen`, `lost`, `released`, `ended`, `created`).
pub fn lease_event(event: &'static str) {
    counter!("stockflow_lease_events_total", "event" => event).increment(1);
}

/// A lease-table call failed (`op`: `scan`, `renew`, `take`, ...).
pub fn lease_error(op: &'static str) {
    counter!("stockflow_lease_errors_total", "op" => op).increment(1);
}

/// Kinesis records refused by a `PutRecords` call and retried.
pub fn put_retried(n: usize) {
    counter!("stockflow_put_records_retried_total").increment(n as u64);
}

/// One batched put: how many callers' requests and records it carried.
pub fn put_batch(requests: usize, records: usize) {
    histogram!("stockflow_put_batch_requests").record(requests as f64);
    histogram!("stockflow_put_batch_records").record(records as f64);
}

/// How long one batched put took to become durable.
pub fn put_done(elapsed: Duration) {
    histogram!("stockflow_put_seconds").record(elapsed.as_secs_f64());
}

/// Closed log segments deleted by retention.
pub fn log_trimmed(shard: &str, segments: u64, bytes: u64) {
    counter!("stockflow_log_segments_deleted_total", "shard" => shard.to_string()).increment(segments);
    counter!("stockflow_log_deleted_bytes_total", "shard" => shard.to_string()).increment(bytes);
}
