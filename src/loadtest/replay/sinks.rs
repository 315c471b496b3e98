//! A lane's way to the target: HTTP to an ingest API (through the shared [`HttpLane`]), or puts
//! on a stream; and what one send did (accepted, a record refused, retry, fatal).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use stockflow_pipeline::batcher::Batching;
use stockflow_pipeline::{OutRecord, StreamProducer};

use super::Workload;
use crate::loadtest::http::HttpLane;

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
    /// The idempotent Kafka producer (puts counted), behind the ingest's group-commit batcher.
    #[cfg(feature = "kafka")]
    Kafka(StreamSink<Batching<Counted<stockflow_pipeline::kafka::KafkaProducer>>>),
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

    fn ready(&self) -> impl std::future::Future<Output = Result<(), stockflow_pipeline::StreamError>> + Send {
        self.inner.ready()
    }
}

impl Sink {
    pub(super) async fn send(&mut self, w: &Workload, records: &[u32]) -> Sent {
        match self {
            Sink::Http(s) => s.send(w, records).await,
            Sink::Log(s) => s.send(w, records).await,
            Sink::Kinesis(s) => s.send(w, records).await,
            #[cfg(feature = "kafka")]
            Sink::Kafka(s) => s.send(w, records).await,
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

    pub(super) async fn send(&mut self, w: &Workload, records: &[u32]) -> Sent {
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

    pub(super) async fn send(&mut self, w: &Workload, records: &[u32]) -> Sent {
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
