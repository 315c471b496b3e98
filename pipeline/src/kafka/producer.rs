//! The idempotent Kafka producer behind [`StreamProducer`]: key = SKU, `acks=all`,
//! `enable.idempotence=true` (librdkafka keeps each partition's order under retries: a retried
//! batch never lands behind a later one), Java-compatible `murmur2_random` partitioning so that
//! other producers of the topic map a SKU to the same partition.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use super::context::Base;
use super::msk_iam::Signer;
use super::{KafkaConfig, lock, unavailable};
use crate::source::{OutRecord, StreamError, StreamProducer};

/// Puts canonical events on a topic.
#[derive(Clone)]
pub struct KafkaProducer {
    producer: FutureProducer<Base>,
    topic: Arc<str>,
    /// When the topic was last seen in the brokers' metadata (`/readyz`).
    ready_at: Arc<Mutex<Option<Instant>>>,
}

impl std::fmt::Debug for KafkaProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaProducer").field("topic", &self.topic).finish_non_exhaustive()
    }
}

impl KafkaProducer {
    /// A producer for `cfg.topic` (`cfg.properties` may override the defaults, e.g. `linger.ms`).
    pub fn new(cfg: &KafkaConfig, signer: Option<Arc<Signer>>) -> Result<Self, StreamError> {
        let mut cc = cfg.client_config();
        cc.set("enable.idempotence", "true")
            .set("acks", "all")
            .set("partitioner", "murmur2_random")
            .set("linger.ms", "2")
            .set("message.timeout.ms", "60000");
        for (k, v) in &cfg.properties {
            cc.set(k, v);
        }
        let producer = cc
            .create_with_context(Base { signer })
            .map_err(|e| StreamError::Invalid(format!("Kafka producer config: {e}")))?;
        Ok(KafkaProducer { producer, topic: cfg.topic.as_str().into(), ready_at: Arc::default() })
    }

    /// Waits until every record handed over so far is acknowledged (or `timeout` passes).
    pub fn flush(&self, timeout: Duration) -> Result<(), StreamError> {
        self.producer.flush(timeout).map_err(unavailable)
    }
}

fn classify(e: &KafkaError) -> StreamError {
    match e.rdkafka_error_code() {
        Some(
            RDKafkaErrorCode::UnknownTopicOrPartition
            | RDKafkaErrorCode::UnknownTopic
            | RDKafkaErrorCode::TopicAuthorizationFailed
            | RDKafkaErrorCode::MessageSizeTooLarge
            | RDKafkaErrorCode::InvalidMessageSize,
        ) => StreamError::Invalid(e.to_string()),
        _ => StreamError::Unavailable(e.to_string()),
    }
}

impl StreamProducer for KafkaProducer {
    async fn put(&self, records: &[OutRecord<'_>]) -> Result<(), StreamError> {
        let mut pending = Vec::with_capacity(records.len());
        for r in records {
            let mut record = FutureRecord::to(&self.topic).key(r.key).payload(r.payload);
            loop {
                match self.producer.send_result(record) {
                    Ok(delivery) => {
                        pending.push(delivery);
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        // The local queue is full: wait for what is in flight, then go on.
                        record = back;
                        for d in pending.drain(..) {
                            d.await
                                .map_err(|_| unavailable("Kafka producer dropped a delivery"))?
                                .map_err(|(e, _)| classify(&e))?;
                        }
                        if pending.is_empty() {
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                    }
                    Err((e, _)) => return Err(classify(&e)),
                }
            }
        }
        for result in futures::future::join_all(pending).await {
            result.map_err(|_| unavailable("Kafka producer dropped a delivery"))?.map_err(|(e, _)| classify(&e))?;
        }
        Ok(())
    }

    async fn ready(&self) -> Result<(), StreamError> {
        if lock(&self.ready_at).is_some_and(|t| t.elapsed() < Duration::from_secs(10)) {
            return Ok(());
        }
        let (producer, topic) = (self.producer.clone(), Arc::clone(&self.topic));
        let md = tokio::task::spawn_blocking(move || {
            producer.client().fetch_metadata(Some(&topic), Duration::from_secs(5)).map_err(unavailable)
        })
        .await
        .map_err(unavailable)??;
        let t = md
            .topics()
            .iter()
            .find(|t| *t.name() == *self.topic)
            .filter(|t| t.error().is_none() && !t.partitions().is_empty())
            .ok_or_else(|| StreamError::Invalid(format!("topic {} not found on the brokers", self.topic)))?;
        let _ = t;
        *lock(&self.ready_at) = Some(Instant::now());
        Ok(())
    }
}
