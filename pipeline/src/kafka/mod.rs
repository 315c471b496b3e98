//! Kafka and Amazon MSK through `rdkafka` (the `kafka` feature): a topic's partitions are the
//! shards, the Kafka consumer group decides which member reads which partition, and the state
//! store's fenced commit stays the one source of truth for position and state.
//!
//! - [`KafkaSource`] / [`KafkaReader`]: a partition behind `StreamSource` / `ShardReader`. Each
//!   assigned partition has its own librdkafka queue (split off the consumer before the partition
//!   is assigned, so no record of it ever reaches the shared queue).
//! - [`member::KafkaMember`]: the group member. On **assign** it takes the partition's lease in
//!   the state store (an epoch bump fences any previous owner, dead or alive), restores the
//!   partition's state and assigns the partition at the stored checkpoint + 1. On **revoke** it
//!   stops the partitions' workers, which commit, releases their leases and commits the offsets
//!   to Kafka (for visibility only) — all before the rebalance callback returns.
//! - [`producer::KafkaProducer`]: the idempotent producer (key = SKU, `acks=all`), behind the
//!   same group-commit batcher as Kinesis.
//! - [`msk_iam`]: SASL/OAUTHBEARER tokens for MSK IAM, presigned with the official `aws-sigv4`.
//!
//! Shard ids are `{topic}-{partition}` (Kafka's own `TopicPartition` spelling).

pub mod member;
pub mod msk_iam;
pub mod producer;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::base_consumer::PartitionQueue;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::message::Message;
use stockflow_state::Position;
use tokio::sync::Notify;

use crate::source::{Lag, ReadStatus, RecordBatch, ShardReader, StreamError, StreamSource};

pub use member::KafkaMember;
pub use msk_iam::Signer;
pub use producer::KafkaProducer;

/// How clients authenticate to the brokers.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Security {
    /// No TLS, no authentication (a local broker).
    #[default]
    Plaintext,
    /// TLS; the CA bundle from this file, or the system's when unset.
    Tls {
        /// PEM file of the CAs to trust.
        ca_location: Option<String>,
    },
    /// SASL/SCRAM over TLS (MSK's `SASL/SCRAM` with a Secrets Manager secret).
    Scram {
        /// `SCRAM-SHA-256` or `SCRAM-SHA-512`.
        mechanism: String,
        /// User name.
        username: String,
        /// Password.
        password: String,
    },
    /// MSK IAM: SASL/OAUTHBEARER over TLS, tokens signed with the AWS credentials chain.
    MskIam {
        /// The cluster's region (the token is signed for `kafka-cluster` there).
        region: String,
    },
}

/// Where and how to reach the topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaConfig {
    /// `bootstrap.servers`: `host:port,host:port`.
    pub brokers: String,
    /// The topic holding canonical events keyed by SKU.
    pub topic: String,
    /// The consumer group (`group.id`).
    pub group_id: String,
    /// `client.id`, shown in broker logs.
    pub client_id: String,
    /// TLS / SASL.
    pub security: Security,
    /// `session.timeout.ms`: how long a silent member keeps its partitions.
    pub session_timeout: Duration,
    /// Further librdkafka properties, set last (they win).
    pub properties: Vec<(String, String)>,
}

impl KafkaConfig {
    /// A plaintext config with a 10 s session timeout.
    pub fn new(brokers: &str, topic: &str, group_id: &str) -> Self {
        KafkaConfig {
            brokers: brokers.into(),
            topic: topic.into(),
            group_id: group_id.into(),
            client_id: "stockflow".into(),
            security: Security::Plaintext,
            session_timeout: Duration::from_secs(10),
            properties: Vec::new(),
        }
    }

    /// The librdkafka settings shared by consumers and producers.
    pub fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers).set("client.id", &self.client_id);
        match &self.security {
            Security::Plaintext => {
                c.set("security.protocol", "plaintext");
            }
            Security::Tls { ca_location } => {
                c.set("security.protocol", "ssl");
                if let Some(ca) = ca_location {
                    c.set("ssl.ca.location", ca);
                }
            }
            Security::Scram { mechanism, username, password } => {
                c.set("security.protocol", "sasl_ssl")
                    .set("sasl.mechanism", mechanism)
                    .set("sasl.username", username)
                    .set("sasl.password", password);
            }
            Security::MskIam { .. } => {
                c.set("security.protocol", "sasl_ssl").set("sasl.mechanism", "OAUTHBEARER");
            }
        }
        for (k, v) in &self.properties {
            c.set(k, v);
        }
        c
    }
}

/// The shard id of a partition.
pub fn shard_id(topic: &str, partition: i32) -> String {
    format!("{topic}-{partition}")
}

/// The partition of a shard id of `topic`.
pub fn partition_of(topic: &str, shard: &str) -> Option<i32> {
    shard.strip_prefix(topic)?.strip_prefix('-')?.parse().ok().filter(|p| *p >= 0)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn unavailable(e: impl std::fmt::Display) -> StreamError {
    StreamError::Unavailable(e.to_string())
}

/// The partitions' queues, split off before assignment and handed to readers as they open.
type Queues = Arc<Mutex<HashMap<i32, PartitionQueue<context::Ctx>>>>;

/// Each partition's high watermark from librdkafka's statistics (`hi_offset`).
type Highs = Arc<Mutex<HashMap<i32, i64>>>;

pub(crate) mod context;

/// The topic's partitions as shards, read through one group member's consumer.
pub struct KafkaSource {
    consumer: Arc<BaseConsumer<context::Ctx>>,
    topic: String,
    queues: Queues,
    highs: Highs,
}

impl std::fmt::Debug for KafkaSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSource").field("topic", &self.topic).finish_non_exhaustive()
    }
}

impl KafkaSource {
    /// The partitions of the topic (metadata from the brokers; blocks for up to 10 s).
    pub fn partitions(&self) -> Result<Vec<i32>, StreamError> {
        partitions(&self.consumer, &self.topic)
    }
}

fn partitions<C: ConsumerContext>(consumer: &BaseConsumer<C>, topic: &str) -> Result<Vec<i32>, StreamError> {
    let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10)).map_err(unavailable)?;
    let t = md
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .ok_or_else(|| StreamError::Invalid(format!("topic {topic} not in the brokers' metadata")))?;
    if let Some(e) = t.error() {
        return Err(StreamError::Invalid(format!("topic {topic}: {:?}", rdkafka::types::RDKafkaErrorCode::from(e))));
    }
    let mut ps: Vec<i32> = t.partitions().iter().map(|p| p.id()).collect();
    ps.sort_unstable();
    Ok(ps)
}

impl StreamSource for KafkaSource {
    type Reader = KafkaReader;

    async fn shards(&self) -> Result<Vec<String>, StreamError> {
        let (consumer, topic) = (Arc::clone(&self.consumer), self.topic.clone());
        let ps = tokio::task::spawn_blocking(move || partitions(&consumer, &topic)).await.map_err(unavailable)??;
        Ok(ps.into_iter().map(|p| shard_id(&self.topic, p)).collect())
    }

    /// Takes the partition's queue (split off when the group assigned it); the member assigns
    /// the partition at the offset after `after`, which this reader then expects first.
    async fn open(&self, shard: &str, after: Option<&Position>) -> Result<KafkaReader, StreamError> {
        let partition = partition_of(&self.topic, shard)
            .ok_or_else(|| StreamError::Invalid(format!("{shard} is not a partition of {}", self.topic)))?;
        let mut queue = lock(&self.queues)
            .remove(&partition)
            .ok_or_else(|| StreamError::Invalid(format!("partition {shard} is not assigned to this member")))?;
        let next = match after {
            None => 0,
            Some(p) => {
                p.as_u64().ok_or_else(|| StreamError::Corrupt(format!("{shard}: checkpoint {p} is not an offset")))? + 1
            }
        };
        let ready = Arc::new(Notify::new());
        let wake = Arc::clone(&ready);
        queue.set_nonempty_callback(move || wake.notify_one());
        Ok(KafkaReader {
            highs: Arc::clone(&self.highs),
            topic: self.topic.clone(),
            partition,
            queue,
            ready,
            next,
            high: None,
            idle_wait: Duration::from_millis(200),
        })
    }
}

/// Reads one partition's queue.
pub struct KafkaReader {
    highs: Highs,
    topic: String,
    partition: i32,
    queue: PartitionQueue<context::Ctx>,
    ready: Arc<Notify>,
    /// The offset expected next: records below it (fetched before a seek) are skipped.
    next: u64,
    /// The partition's high watermark as the last statistics reported it (no request).
    high: Option<i64>,
    idle_wait: Duration,
}

impl std::fmt::Debug for KafkaReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaReader")
            .field("topic", &self.topic)
            .field("partition", &self.partition)
            .field("next", &self.next)
            .finish_non_exhaustive()
    }
}

impl KafkaReader {
    /// The offset this reader expects next.
    pub fn next_offset(&self) -> u64 {
        self.next
    }

    /// Moves up to `max` records from the queue into `batch`; false when the queue was empty.
    fn drain(&mut self, batch: &mut RecordBatch, max: usize) -> Result<bool, StreamError> {
        let mut any = false;
        while batch.len() < max {
            match self.queue.poll(Duration::ZERO) {
                None => break,
                Some(Err(e)) => {
                    if batch.is_empty() {
                        return Err(unavailable(format!("reading {}-{}: {e}", self.topic, self.partition)));
                    }
                    tracing::warn!(partition = self.partition, error = %e, "read error after records; returning those first");
                    break;
                }
                Some(Ok(m)) => {
                    any = true;
                    let offset = u64::try_from(m.offset()).unwrap_or(0);
                    if offset < self.next {
                        continue; // fetched before the assignment's start: already applied
                    }
                    self.next = offset + 1;
                    batch.push_offset(offset, m.payload().unwrap_or_default());
                }
            }
        }
        Ok(any)
    }
}

impl ShardReader for KafkaReader {
    async fn next_batch(&mut self, batch: &mut RecordBatch, max: usize) -> Result<ReadStatus, StreamError> {
        batch.clear();
        let ready = Arc::clone(&self.ready);
        let notified = ready.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if !self.drain(batch, max)? {
            // Nothing queued: wait a short while for the queue to fill (its callback wakes us).
            if tokio::time::timeout(self.idle_wait, notified).await.is_ok() {
                self.drain(batch, max)?;
            }
        }
        self.high = lock(&self.highs).get(&self.partition).copied().filter(|h| *h >= 0);
        Ok(ReadStatus::Open)
    }

    fn lag(&self) -> Lag {
        Lag { records: self.high.map(|h| u64::try_from(h).unwrap_or(0).saturating_sub(self.next)), ..Lag::default() }
    }
}

/// Creates `cfg.topic` with `partitions` partitions unless it exists; returns its partition count.
/// The replication factor is the brokers' default.
pub async fn ensure_topic(
    cfg: &KafkaConfig,
    signer: Option<Arc<Signer>>,
    partitions: i32,
) -> Result<usize, StreamError> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let admin: AdminClient<context::Base> = cfg
        .client_config()
        .create_with_context(context::Base { signer })
        .map_err(|e| StreamError::Invalid(format!("Kafka admin config: {e}")))?;
    let topic = NewTopic::new(&cfg.topic, partitions, TopicReplication::Fixed(-1));
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin.create_topics([&topic], &opts).await.map_err(unavailable)?;
    for r in results {
        match r {
            Ok(_) => tracing::info!(topic = %cfg.topic, partitions, "created the topic"),
            Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, code)) => return Err(StreamError::Invalid(format!("creating topic {t}: {code}"))),
        }
    }
    let topic = cfg.topic.clone();
    let n = tokio::task::spawn_blocking(move || {
        let md = admin.inner().fetch_metadata(Some(&topic), Duration::from_secs(10)).map_err(unavailable)?;
        Ok::<_, StreamError>(md.topics().iter().find(|t| t.name() == topic).map_or(0, |t| t.partitions().len()))
    })
    .await
    .map_err(unavailable)??;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_ids_round_trip_and_reject_other_topics() {
        assert_eq!(shard_id("orders", 5), "orders-5");
        assert_eq!(partition_of("orders", "orders-5"), Some(5));
        assert_eq!(partition_of("orders-eu", "orders-eu-12"), Some(12));
        assert_eq!(partition_of("orders", "orders-eu-1"), None);
        assert_eq!(partition_of("orders", "orders--1"), None);
        assert_eq!(partition_of("orders", "shardId-000000000000"), None);
    }

    #[test]
    fn security_sets_the_librdkafka_properties() {
        let mut cfg = KafkaConfig::new("b1:9098", "orders", "stockflow");
        cfg.security = Security::MskIam { region: "eu-west-1".into() };
        let c = cfg.client_config();
        assert_eq!(c.get("security.protocol"), Some("sasl_ssl"));
        assert_eq!(c.get("sasl.mechanism"), Some("OAUTHBEARER"));
        cfg.security =
            Security::Scram { mechanism: "SCRAM-SHA-512".into(), username: "u".into(), password: "p".into() };
        cfg.properties.push(("linger.ms".into(), "7".into()));
        let c = cfg.client_config();
        assert_eq!(c.get("sasl.mechanism"), Some("SCRAM-SHA-512"));
        assert_eq!(c.get("sasl.username"), Some("u"));
        assert_eq!(c.get("linger.ms"), Some("7"));
        assert_eq!(KafkaConfig::new("b", "t", "g").client_config().get("security.protocol"), Some("plaintext"));
    }
}
