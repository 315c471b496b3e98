//! `KinesisProducer`: puts records on a stream with the SKU as partition key, keeping each SKU's
//! order even when `PutRecords` accepts only part of a call.
//!
//! A `PutRecords` call may succeed for some entries and fail for others (throttling). If a SKU had
//! two entries in the call and the first failed, retrying it would land it *after* the second: the
//! consumer would apply the SKU's events out of order. So a call never holds two entries of one
//! SKU: records are queued per SKU, and each call ("round") takes at most the head of every queue
//! (≤ 500 entries, ≤ 5 MiB). A failed head stays at the head and is retried, with capped
//! exponential backoff and full jitter, before anything behind it.
//!
//! To keep a hot SKU from needing one call per event, a SKU's records in one `put` are packed into
//! KPL aggregated records (≤ 1 MiB each; [`super::kpl`]), which Kinesis accepts or refuses whole;
//! the consumer de-aggregates them with sub-sequence numbers. A SKU with a single record is put
//! plain. `aggregate = false` puts every record plain (one call per record of the hottest SKU).
//!
//! `Ok` means every record is durably on the stream; after the retry budget the error is
//! `Unavailable` and the caller (the ingest app) must not acknowledge.
//! Fault injection ([`PutFaults`]) throttles calls or refuses entries without sending them, to
//! test this against an emulator that never throttles.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use aws_sdk_kinesis::Client;
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;

use super::{kpl, sdk_err};
use crate::source::{OutRecord, StreamError, StreamProducer};
use stockflow_state::retry::{Backoff, BackoffConfig};

/// `PutRecords` limits.
const MAX_PUT_RECORDS: usize = 500;
const MAX_PUT_BYTES: usize = 5 << 20;
/// Largest record (data + partition key).
pub const MAX_RECORD_BYTES: usize = 1 << 20;

/// Producer settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProducerConfig {
    /// Pack a SKU's records of one `put` into KPL aggregated records.
    pub aggregate: bool,
    /// Rounds with failures allowed before giving up.
    pub attempts: u32,
    /// First backoff.
    pub base_backoff: Duration,
    /// Largest backoff.
    pub max_backoff: Duration,
}

impl Default for ProducerConfig {
    fn default() -> Self {
        ProducerConfig {
            aggregate: true,
            attempts: 8,
            base_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(2),
        }
    }
}

/// Faults injected into the next `PutRecords` calls (tests).
#[derive(Debug, Default)]
pub struct PutFaults {
    plan: Mutex<VecDeque<Fault>>,
}

/// One injected fault, consumed by one call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// The whole call is throttled (`ProvisionedThroughputExceededException`); nothing is sent.
    Throttle,
    /// The entries at these indices of the call are refused; the others are sent.
    Refuse(Vec<usize>),
}

impl PutFaults {
    /// Queues a fault for the next call without one.
    pub fn push(&self, fault: Fault) {
        self.plan.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push_back(fault);
    }

    fn next(&self) -> Option<Fault> {
        self.plan.lock().unwrap_or_else(std::sync::PoisonError::into_inner).pop_front()
    }
}

/// Puts records on a Kinesis stream (see the module docs).
#[derive(Debug)]
pub struct KinesisProducer {
    client: Client,
    stream: String,
    cfg: ProducerConfig,
    faults: PutFaults,
    /// The last readiness check and when it was made (checks are cached for [`READY_TTL`]).
    readiness: Mutex<Option<(std::time::Instant, Result<(), String>)>>,
}

/// How long a readiness answer is reused: `DescribeStreamSummary` allows 20 calls a second per
/// account, and every ingest instance's health checks share them.
const READY_TTL: Duration = Duration::from_secs(10);

impl KinesisProducer {
    /// A producer for `stream` with default settings.
    pub fn new(client: Client, stream: &str) -> Self {
        Self::with_config(client, stream, ProducerConfig::default())
    }

    /// A producer with explicit settings.
    pub fn with_config(client: Client, stream: &str, cfg: ProducerConfig) -> Self {
        KinesisProducer {
            client,
            stream: stream.to_string(),
            cfg,
            faults: PutFaults::default(),
            readiness: Mutex::new(None),
        }
    }

    /// Fault injection for tests.
    pub fn faults(&self) -> &PutFaults {
        &self.faults
    }

    /// One call; returns which entries failed (by index).
    async fn call(&self, entries: Vec<PutRecordsRequestEntry>) -> Result<Vec<bool>, StreamError> {
        let n = entries.len();
        let (entries, refused): (Vec<PutRecordsRequestEntry>, Vec<usize>) = match self.faults.next() {
            Some(Fault::Throttle) => return Ok(vec![true; n]),
            Some(Fault::Refuse(idx)) => {
                let sent = entries.into_iter().enumerate().filter(|(i, _)| !idx.contains(i)).map(|(_, e)| e).collect();
                (sent, idx)
            }
            None => (entries, Vec::new()),
        };
        let mut failed = vec![false; n];
        for i in &refused {
            if let Some(f) = failed.get_mut(*i) {
                *f = true;
            }
        }
        let sent_index: Vec<usize> = (0..n).filter(|i| !refused.contains(i)).collect();
        if entries.is_empty() {
            return Ok(failed);
        }
        match self.client.put_records().stream_name(&self.stream).set_records(Some(entries)).send().await {
            Ok(out) => {
                for (r, &i) in out.records().iter().zip(&sent_index) {
                    if r.error_code().is_some() {
                        failed[i] = true;
                    }
                }
                Ok(failed)
            }
            Err(e) => {
                let err = sdk_err("PutRecords", e);
                if err.is_transient() { Ok(vec![true; n]) } else { Err(err) }
            }
        }
    }
}

/// Splits a SKU's payloads into Kinesis record bodies: KPL aggregates of ≤ 1 MiB, or one plain
/// body per record.
fn bodies(key: &str, payloads: &[&[u8]], aggregate: bool) -> Result<Vec<Vec<u8>>, StreamError> {
    for p in payloads {
        if p.len() + key.len() > MAX_RECORD_BYTES {
            return Err(StreamError::Invalid(format!("a record of {} bytes exceeds Kinesis' 1 MiB", p.len())));
        }
    }
    if !aggregate || payloads.len() == 1 {
        return Ok(payloads.iter().map(|p| p.to_vec()).collect());
    }
    let budget = MAX_RECORD_BYTES - key.len() - 64;
    let mut out = Vec::new();
    let mut group: Vec<(&str, &[u8])> = Vec::new();
    let mut size = 0;
    for p in payloads {
        // Per user record: the data, its length varint and tags (≤ 16 bytes).
        let cost = p.len() + 16;
        if !group.is_empty() && size + cost > budget {
            out.push(body_of(&group));
            group.clear();
            size = 0;
        }
        group.push((key, p));
        size += cost;
    }
    if !group.is_empty() {
        out.push(body_of(&group));
    }
    Ok(out)
}

fn body_of(group: &[(&str, &[u8])]) -> Vec<u8> {
    if group.len() == 1 { group[0].1.to_vec() } else { kpl::aggregate(group) }
}

impl StreamProducer for KinesisProducer {
    async fn ready(&self) -> Result<(), StreamError> {
        let cached = self.readiness.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        if let Some((at, answer)) = cached
            && at.elapsed() < READY_TTL
        {
            return answer.map_err(StreamError::Unavailable);
        }
        let answer = match self.client.describe_stream_summary().stream_name(&self.stream).send().await {
            Ok(out) => match out.stream_description_summary().map(|d| d.stream_status().as_str()) {
                // UPDATING (a reshard in progress) still takes puts.
                Some("ACTIVE" | "UPDATING") => Ok(()),
                status => Err(format!("the Kinesis stream {} is {}", self.stream, status.unwrap_or("unknown"))),
            },
            Err(e) => {
                Err(format!("the Kinesis stream {}: {}", self.stream, aws_sdk_kinesis::error::DisplayErrorContext(e)))
            }
        };
        *self.readiness.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some((std::time::Instant::now(), answer.clone()));
        answer.map_err(StreamError::Unavailable)
    }

    async fn put(&self, records: &[OutRecord<'_>]) -> Result<(), StreamError> {
        // Per-SKU queues in first-appearance order.
        let mut order: Vec<&str> = Vec::new();
        let mut by_key: HashMap<&str, Vec<&[u8]>> = HashMap::new();
        for r in records {
            if r.key.is_empty() || r.key.len() > 256 {
                return Err(StreamError::Invalid("partition key must be 1 to 256 characters".into()));
            }
            by_key.entry(r.key).or_insert_with(|| {
                order.push(r.key);
                Vec::new()
            });
            if let Some(v) = by_key.get_mut(r.key) {
                v.push(r.payload);
            }
        }
        let mut queues: Vec<(&str, VecDeque<Vec<u8>>)> = Vec::with_capacity(order.len());
        for key in order {
            let payloads = by_key.remove(key).unwrap_or_default();
            queues.push((key, bodies(key, &payloads, self.cfg.aggregate)?.into()));
        }
        let mut backoff = Backoff::from_clock(BackoffConfig::new(self.cfg.base_backoff, self.cfg.max_backoff))
            .limited(self.cfg.attempts);
        while queues.iter().any(|(_, q)| !q.is_empty()) {
            // One round: the head of each SKU's queue, within the call's limits.
            let mut entries = Vec::new();
            let mut owners = Vec::new();
            let mut bytes = 0;
            for (qi, (key, q)) in queues.iter().enumerate() {
                let Some(body) = q.front() else { continue };
                let size = body.len() + key.len();
                if entries.len() == MAX_PUT_RECORDS || (!entries.is_empty() && bytes + size > MAX_PUT_BYTES) {
                    break;
                }
                let entry = PutRecordsRequestEntry::builder()
                    .partition_key(*key)
                    .data(Blob::new(body.clone()))
                    .build()
                    .map_err(|e| StreamError::Invalid(e.to_string()))?;
                entries.push(entry);
                owners.push(qi);
                bytes += size;
            }
            let failed = self.call(entries).await?;
            let mut any_failed = 0;
            for (&qi, &f) in owners.iter().zip(&failed) {
                if f {
                    any_failed += 1;
                } else {
                    queues[qi].1.pop_front();
                }
            }
            queues.retain(|(_, q)| !q.is_empty());
            if any_failed > 0 {
                crate::metrics::put_retried(any_failed);
                let Some(delay) = backoff.next_delay() else {
                    let left: usize = queues.iter().map(|(_, q)| q.len()).sum();
                    return Err(StreamError::Unavailable(format!(
                        "{left} Kinesis records not accepted after {} attempts",
                        self.cfg.attempts
                    )));
                };
                tokio::time::sleep(delay).await;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_skus_records_pack_into_aggregates_under_one_mebibyte() {
        let small: Vec<Vec<u8>> = (0..10).map(|i| format!("e{i}").into_bytes()).collect();
        let refs: Vec<&[u8]> = small.iter().map(Vec::as_slice).collect();
        let b = bodies("K", &refs, true).unwrap();
        assert_eq!(b.len(), 1);
        let mut got = Vec::new();
        assert!(kpl::for_each_user_record(&b[0], |_, d| got.push(d.to_vec())));
        assert_eq!(got, small);
        assert_eq!(bodies("K", &refs, false).unwrap().len(), 10);
        let big = vec![b'x'; 400_000];
        let refs: Vec<&[u8]> = vec![&big, &big, &big];
        let b = bodies("K", &refs, true).unwrap();
        assert_eq!(b.len(), 2, "800 KB fit one record, the third starts another");
        assert!(b.iter().all(|r| r.len() <= MAX_RECORD_BYTES));
        let huge = vec![b'x'; MAX_RECORD_BYTES];
        assert!(matches!(bodies("K", &[&huge], true), Err(StreamError::Invalid(_))));
    }
}
