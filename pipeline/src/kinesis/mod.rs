//! Amazon Kinesis Data Streams behind the stream traits.
//!
//! - Discovery: `ListShards`, paged, with each shard's parents and hash-key range.
//! - Reading: one fetcher task per shard feeds a small bounded channel (prefetch), so the shard
//!   worker's reads are cancel-safe and a slow GetRecords never stalls a commit. Two fetchers:
//!   **polling** (`GetShardIterator` + `GetRecords`, the default) and **enhanced fan-out**
//!   (`RegisterStreamConsumer` + `SubscribeToShard`, resubscribed every 5 minutes or on error,
//!   continuing from the last continuation sequence number).
//! - A reader opened at a checkpoint starts `AT_SEQUENCE_NUMBER` and skips positions at or
//!   before it, so a checkpoint between the user records of a KPL aggregate ([`kpl`]) resumes
//!   exactly. A shard's end (`NextShardIterator` null / no continuation) is reported with the
//!   children Kinesis names in `ChildShards`.
//! - Writing: [`KinesisProducer`], `PutRecords` in ≤ 500-record / 5 MiB calls, retrying only the
//!   records Kinesis refused, never letting a SKU's later record land before an earlier one.

pub mod admin;
pub mod kpl;
mod producer;
pub mod testing;

pub use producer::{Fault, KinesisProducer, MAX_RECORD_BYTES, ProducerConfig, PutFaults};

use std::sync::Arc;
use std::time::Duration;

use aws_sdk_kinesis::Client;
use aws_sdk_kinesis::error::ProvideErrorMetadata;
use aws_sdk_kinesis::types::{ChildShard, ShardIteratorType, StartingPosition};
use stockflow_state::Position;
use stockflow_state::lease::HashRange;
use tokio::sync::mpsc;

use crate::metrics;
use crate::source::{Lag, ReadStatus, RecordBatch, ShardInfo, ShardReader, StreamError, StreamSource};
use stockflow_state::retry::{Backoff, BackoffConfig};

/// How records are read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadMode {
    /// `GetRecords` polling (shares the shard's 2 MB/s and 5 reads/s with other consumers).
    Polling,
    /// Enhanced fan-out through the named stream consumer (a dedicated 2 MB/s per shard, pushed).
    FanOut {
        /// The consumer's name (registered if missing).
        consumer_name: String,
    },
}

/// Reader settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KinesisConfig {
    /// The stream's name.
    pub stream: String,
    /// Polling or enhanced fan-out.
    pub mode: ReadMode,
    /// Records per `GetRecords` (≤ 10 000).
    pub get_records_limit: i32,
    /// Wait after a read that returned less than a full batch (Kinesis allows 5 reads/s/shard).
    pub idle_poll: Duration,
    /// Batches fetched ahead of the worker.
    pub prefetch: usize,
    /// Resubscribe an enhanced fan-out subscription after this long (Kinesis ends it at 5 min).
    pub resubscribe_after: Duration,
}

impl KinesisConfig {
    /// Defaults for `stream`: polling, 10 000 records per read, 500 ms idle poll.
    pub fn new(stream: &str) -> Self {
        KinesisConfig {
            stream: stream.to_string(),
            mode: ReadMode::Polling,
            get_records_limit: 10_000,
            idle_poll: Duration::from_millis(500),
            prefetch: 2,
            resubscribe_after: Duration::from_secs(300),
        }
    }
}

/// A Kinesis client from the environment's AWS configuration, with an optional endpoint
/// override; `emulator` uses static test credentials and `us-east-1` (never for AWS).
pub async fn client(endpoint: Option<&str>, emulator: bool) -> Client {
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
    if let Some(url) = endpoint {
        loader = loader.endpoint_url(url);
    }
    if emulator {
        loader = loader
            .region(aws_config::Region::new("us-east-1"))
            .credentials_provider(aws_sdk_kinesis::config::Credentials::new("test", "test", None, None, "emulator"));
    }
    let timeouts = aws_config::timeout::TimeoutConfig::builder().connect_timeout(Duration::from_secs(5)).build();
    Client::new(&loader.timeout_config(timeouts).load().await)
}

pub(crate) fn sdk_err<E: std::error::Error + ProvideErrorMetadata + Send + Sync + 'static>(
    op: &str,
    e: aws_sdk_kinesis::error::SdkError<E, aws_sdk_kinesis::config::http::HttpResponse>,
) -> StreamError {
    match e.as_service_error() {
        Some(se) if matches!(se.code(), Some("ResourceNotFoundException" | "InvalidArgumentException")) => {
            StreamError::Invalid(format!(
                "{op}: {}: {}",
                se.code().unwrap_or_default(),
                se.message().unwrap_or_default()
            ))
        }
        Some(se) => StreamError::Unavailable(format!(
            "{op}: {}: {}",
            se.code().unwrap_or("error"),
            se.message().unwrap_or_default()
        )),
        None => StreamError::Unavailable(format!("{op}: {}", aws_sdk_kinesis::error::DisplayErrorContext(&e))),
    }
}

fn child_infos(children: &[ChildShard]) -> Vec<ShardInfo> {
    children
        .iter()
        .map(|c| ShardInfo {
            id: c.shard_id().to_string(),
            parents: c.parent_shards().to_vec(),
            hash_range: c.hash_key_range().and_then(|r| HashRange::parse(r.starting_hash_key(), r.ending_hash_key())),
        })
        .collect()
}

/// A Kinesis stream as a [`StreamSource`].
#[derive(Debug, Clone)]
pub struct KinesisSource {
    client: Client,
    cfg: Arc<KinesisConfig>,
    /// The stream consumer's ARN in fan-out mode.
    consumer_arn: Option<String>,
}

impl KinesisSource {
    /// A source over `client`; in fan-out mode registers the stream consumer (or finds it) and
    /// waits until it is active.
    pub async fn new(client: Client, cfg: KinesisConfig) -> Result<Self, StreamError> {
        let consumer_arn = match &cfg.mode {
            ReadMode::Polling => None,
            ReadMode::FanOut { consumer_name } => Some(register_consumer(&client, &cfg.stream, consumer_name).await?),
        };
        Ok(KinesisSource { client, cfg: Arc::new(cfg), consumer_arn })
    }
}

/// Registers (or finds) the enhanced fan-out consumer and waits until it is `ACTIVE`.
async fn register_consumer(client: &Client, stream: &str, name: &str) -> Result<String, StreamError> {
    let summary = client
        .describe_stream_summary()
        .stream_name(stream)
        .send()
        .await
        .map_err(|e| sdk_err("DescribeStreamSummary", e))?;
    let stream_arn = summary.stream_description_summary().map(|s| s.stream_arn().to_string()).unwrap_or_default();
    match client.register_stream_consumer().stream_arn(&stream_arn).consumer_name(name).send().await {
        Ok(_) => tracing::info!(consumer = name, "registered the enhanced fan-out consumer"),
        Err(e) if e.as_service_error().and_then(|s| s.code()) == Some("ResourceInUseException") => {}
        Err(e) => return Err(sdk_err("RegisterStreamConsumer", e)),
    }
    let mut backoff =
        Backoff::from_clock(BackoffConfig::new(Duration::from_millis(100), Duration::from_secs(2))).limited(60);
    loop {
        let out = client
            .describe_stream_consumer()
            .stream_arn(&stream_arn)
            .consumer_name(name)
            .send()
            .await
            .map_err(|e| sdk_err("DescribeStreamConsumer", e))?;
        if let Some(c) = out.consumer_description()
            && c.consumer_status().as_str() == "ACTIVE"
        {
            return Ok(c.consumer_arn().to_string());
        }
        let Some(delay) = backoff.next_delay() else {
            return Err(StreamError::Unavailable(format!("consumer {name} did not become ACTIVE")));
        };
        tokio::time::sleep(delay).await;
    }
}

impl StreamSource for KinesisSource {
    type Reader = KinesisReader;

    async fn shards(&self) -> Result<Vec<String>, StreamError> {
        Ok(self.shard_infos().await?.into_iter().map(|s| s.id).collect())
    }

    async fn shard_infos(&self) -> Result<Vec<ShardInfo>, StreamError> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let req = match &token {
                Some(t) => self.client.list_shards().next_token(t),
                None => self.client.list_shards().stream_name(&self.cfg.stream),
            };
            let page = req.send().await.map_err(|e| sdk_err("ListShards", e))?;
            for s in page.shards() {
                let parents = s.parent_shard_id().into_iter().chain(s.adjacent_parent_shard_id()).map(str::to_string);
                out.push(ShardInfo {
                    id: s.shard_id().to_string(),
                    parents: parents.collect(),
                    hash_range: s
                        .hash_key_range()
                        .and_then(|r| HashRange::parse(r.starting_hash_key(), r.ending_hash_key())),
                });
            }
            match page.next_token() {
                Some(t) if !t.is_empty() => token = Some(t.to_string()),
                _ => return Ok(out),
            }
        }
    }

    async fn open(&self, shard: &str, after: Option<&Position>) -> Result<KinesisReader, StreamError> {
        let (tx, rx) = mpsc::channel(self.cfg.prefetch.max(1));
        let fetcher = Fetcher {
            client: self.client.clone(),
            cfg: Arc::clone(&self.cfg),
            shard: shard.to_string(),
            last: after.cloned(),
            tx,
        };
        let task = match &self.consumer_arn {
            None => tokio::spawn(fetcher.poll()),
            Some(arn) => tokio::spawn(fetcher.subscribe(arn.clone())),
        };
        Ok(KinesisReader { rx, task, pending: None, offset: 0, millis_behind: None, children: None })
    }
}

/// Records fetched by one call (or pushed by one fan-out event).
#[derive(Debug)]
struct Fetched {
    records: Vec<(Position, Vec<u8>)>,
    millis_behind: Option<u64>,
    /// Set on the shard's last batch: its children.
    end: Option<Vec<ShardInfo>>,
}

/// Reads one Kinesis shard (see the module docs).
#[derive(Debug)]
pub struct KinesisReader {
    rx: mpsc::Receiver<Result<Fetched, StreamError>>,
    task: tokio::task::JoinHandle<()>,
    pending: Option<Fetched>,
    offset: usize,
    millis_behind: Option<u64>,
    children: Option<Vec<ShardInfo>>,
}

impl Drop for KinesisReader {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ShardReader for KinesisReader {
    async fn next_batch(&mut self, batch: &mut RecordBatch, max: usize) -> Result<ReadStatus, StreamError> {
        batch.clear();
        if self.children.is_some() {
            return Ok(ReadStatus::End);
        }
        if self.pending.is_none() {
            // Cancel-safe: a message is either received whole or stays in the channel.
            match self.rx.recv().await {
                Some(Ok(f)) => {
                    self.millis_behind = f.millis_behind.or(self.millis_behind);
                    self.pending = Some(f);
                    self.offset = 0;
                }
                Some(Err(e)) => return Err(e),
                None => return Err(StreamError::Unavailable("the shard's fetcher stopped".into())),
            }
        }
        let Some(f) = &mut self.pending else { return Ok(ReadStatus::Open) };
        let take = (f.records.len() - self.offset).min(max.max(1));
        for (pos, data) in &f.records[self.offset..self.offset + take] {
            batch.push_position(pos.clone(), data);
        }
        self.offset += take;
        if self.offset < f.records.len() {
            return Ok(ReadStatus::Open);
        }
        let done = self.pending.take().and_then(|f| f.end);
        match done {
            Some(children) => {
                self.children = Some(children);
                Ok(ReadStatus::End)
            }
            None => Ok(ReadStatus::Open),
        }
    }

    fn lag(&self) -> Lag {
        Lag { millis: self.millis_behind, ..Lag::default() }
    }

    fn children(&self) -> Vec<ShardInfo> {
        self.children.clone().unwrap_or_default()
    }
}

struct Fetcher {
    client: Client,
    cfg: Arc<KinesisConfig>,
    shard: String,
    /// Records at or before this are skipped (the checkpoint, then the last record handed on).
    last: Option<Position>,
    tx: mpsc::Sender<Result<Fetched, StreamError>>,
}

impl Fetcher {
    /// Turns Kinesis records into positioned user records after `last` (de-aggregating).
    fn convert(&mut self, records: &[aws_sdk_kinesis::types::Record]) -> Vec<(Position, Vec<u8>)> {
        let mut out = Vec::with_capacity(records.len());
        for r in records {
            let seq = r.sequence_number();
            let data = r.data().as_ref();
            let mut push = |sub: u64, d: &[u8]| {
                let pos = Position { sequence: seq.to_string(), sub };
                if self.last.as_ref().is_none_or(|l| pos > *l) {
                    out.push((pos, d.to_vec()));
                }
            };
            if !kpl::for_each_user_record(data, &mut push) {
                push(0, data);
            }
        }
        if let Some((p, _)) = out.last() {
            self.last = Some(p.clone());
        }
        out
    }

    async fn send(&self, f: Result<Fetched, StreamError>) -> bool {
        self.tx.send(f).await.is_ok()
    }

    async fn iterator(&self) -> Result<String, StreamError> {
        let req = self.client.get_shard_iterator().stream_name(&self.cfg.stream).shard_id(&self.shard);
        let req = match &self.last {
            Some(p) => {
                req.shard_iterator_type(ShardIteratorType::AtSequenceNumber).starting_sequence_number(&p.sequence)
            }
            None => req.shard_iterator_type(ShardIteratorType::TrimHorizon),
        };
        let out = req.send().await.map_err(|e| sdk_err("GetShardIterator", e))?;
        out.shard_iterator().map(str::to_string).ok_or_else(|| StreamError::Unavailable("no shard iterator".into()))
    }

    /// The polling loop: GetRecords until the shard ends or the reader is dropped.
    async fn poll(mut self) {
        let mut iterator: Option<String> = None;
        let mut backoff = Backoff::from_clock(BackoffConfig::new(Duration::from_millis(200), Duration::from_secs(10)));
        loop {
            let it = match iterator.take() {
                Some(it) => it,
                None => match self.iterator().await {
                    Ok(it) => it,
                    Err(e) if e.is_transient() => {
                        metrics::stream_error(&self.shard, "GetShardIterator");
                        tracing::warn!(shard = %self.shard, error = %e, "GetShardIterator failed; retrying");
                        tokio::time::sleep(backoff.next_delay().unwrap_or_default()).await;
                        continue;
                    }
                    Err(e) => {
                        self.send(Err(e)).await;
                        return;
                    }
                },
            };
            let res = self.client.get_records().shard_iterator(&it).limit(self.cfg.get_records_limit).send().await;
            let out = match res {
                Ok(out) => out,
                Err(e) => {
                    let code = e.as_service_error().and_then(|s| s.code()).unwrap_or("error").to_string();
                    metrics::stream_error(&self.shard, "GetRecords");
                    if code == "ExpiredIteratorException" {
                        tracing::info!(shard = %self.shard, "shard iterator expired; renewing");
                        continue; // iterator is None: a new one after `last`
                    }
                    let err = sdk_err("GetRecords", e);
                    if !err.is_transient() {
                        self.send(Err(err)).await;
                        return;
                    }
                    tracing::warn!(shard = %self.shard, error = %err, "GetRecords failed; backing off");
                    iterator = Some(it);
                    tokio::time::sleep(backoff.next_delay().unwrap_or_default()).await;
                    continue;
                }
            };
            backoff.reset();
            let full = out.records().len() >= self.cfg.get_records_limit as usize;
            let records = self.convert(out.records());
            let end = out.next_shard_iterator().is_none().then(|| child_infos(out.child_shards()));
            let ended = end.is_some();
            let fetched = Fetched { records, millis_behind: out.millis_behind_latest().map(|m| m.max(0) as u64), end };
            if (!fetched.records.is_empty() || fetched.end.is_some() || fetched.millis_behind.is_some())
                && !self.send(Ok(fetched)).await
            {
                return;
            }
            if ended {
                return;
            }
            iterator = out.next_shard_iterator().map(str::to_string);
            if !full {
                tokio::time::sleep(self.cfg.idle_poll).await;
            }
        }
    }

    /// The enhanced fan-out loop: SubscribeToShard, resubscribing every `resubscribe_after`
    /// and after errors, from the last continuation sequence number.
    async fn subscribe(mut self, consumer_arn: String) {
        let mut backoff = Backoff::from_clock(BackoffConfig::new(Duration::from_millis(200), Duration::from_secs(10)));
        // Where the next subscription starts: at the checkpoint, then after each continuation.
        let mut after_continuation: Option<String> = None;
        loop {
            let start = match (&after_continuation, &self.last) {
                (Some(seq), _) => StartingPosition::builder()
                    .r#type(ShardIteratorType::AfterSequenceNumber)
                    .sequence_number(seq)
                    .build(),
                (None, Some(p)) => StartingPosition::builder()
                    .r#type(ShardIteratorType::AtSequenceNumber)
                    .sequence_number(&p.sequence)
                    .build(),
                (None, None) => StartingPosition::builder().r#type(ShardIteratorType::TrimHorizon).build(),
            };
            let start = match start {
                Ok(s) => s,
                Err(e) => {
                    self.send(Err(StreamError::Invalid(format!("starting position: {e}")))).await;
                    return;
                }
            };
            let sub = self
                .client
                .subscribe_to_shard()
                .consumer_arn(&consumer_arn)
                .shard_id(&self.shard)
                .starting_position(start)
                .send()
                .await;
            let mut out = match sub {
                Ok(out) => out,
                Err(e) => {
                    metrics::stream_error(&self.shard, "SubscribeToShard");
                    let err = sdk_err("SubscribeToShard", e);
                    if matches!(err, StreamError::Invalid(_)) {
                        self.send(Err(err)).await;
                        return;
                    }
                    tracing::warn!(shard = %self.shard, error = %err, "SubscribeToShard failed; retrying");
                    tokio::time::sleep(backoff.next_delay().unwrap_or_default()).await;
                    continue;
                }
            };
            let deadline = tokio::time::sleep(self.cfg.resubscribe_after);
            tokio::pin!(deadline);
            loop {
                let event = tokio::select! {
                    _ = &mut deadline => break,
                    ev = out.event_stream.recv() => ev,
                };
                let ev = match event {
                    Ok(Some(aws_sdk_kinesis::types::SubscribeToShardEventStream::SubscribeToShardEvent(ev))) => ev,
                    Ok(Some(_)) => continue,
                    Ok(None) => break,
                    Err(e) => {
                        metrics::stream_error(&self.shard, "SubscribeToShard");
                        tracing::warn!(shard = %self.shard, error = %e, "subscription failed; resubscribing");
                        tokio::time::sleep(backoff.next_delay().unwrap_or_default()).await;
                        break;
                    }
                };
                backoff.reset();
                let records = self.convert(ev.records());
                let continuation = ev.continuation_sequence_number();
                let end = (continuation.is_empty()).then(|| child_infos(ev.child_shards()));
                let ended = end.is_some();
                if !continuation.is_empty() {
                    after_continuation = Some(continuation.to_string());
                }
                let fetched = Fetched { records, millis_behind: Some(ev.millis_behind_latest().max(0) as u64), end };
                if !self.send(Ok(fetched)).await || ended {
                    return;
                }
            }
        }
    }
}
