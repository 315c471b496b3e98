//! The librdkafka callbacks: rebalances (handed to the member's loop and waited for), statistics
//! (high watermarks for the lag), MSK IAM tokens and librdkafka's own log lines.

use std::sync::{Arc, OnceLock, Weak};

use rdkafka::client::{ClientContext, OAuthToken};
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaResult;
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;

use super::member::{Cmd, Start};
use super::msk_iam::Signer;
use super::{Highs, Queues, lock};

/// Token generation and logging, shared by consumers and producers.
#[derive(Debug, Clone, Default)]
pub struct Base {
    pub(crate) signer: Option<Arc<Signer>>,
}

impl Base {
    fn token(&self) -> Result<OAuthToken, Box<dyn std::error::Error>> {
        match &self.signer {
            Some(s) => s.token().map_err(Into::into),
            None => Err("sasl.mechanism is OAUTHBEARER but no MSK IAM signer is configured".into()),
        }
    }
}

fn log(level: RDKafkaLogLevel, fac: &str, message: &str) {
    match level {
        RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical | RDKafkaLogLevel::Error => {
            tracing::error!(target: "librdkafka", fac, "{message}")
        }
        RDKafkaLogLevel::Warning => tracing::warn!(target: "librdkafka", fac, "{message}"),
        RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => tracing::info!(target: "librdkafka", fac, "{message}"),
        RDKafkaLogLevel::Debug => tracing::debug!(target: "librdkafka", fac, "{message}"),
    }
}

impl ClientContext for Base {
    const ENABLE_REFRESH_OAUTH_TOKEN: bool = true;

    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        log(level, fac, message);
    }

    fn generate_oauth_token(&self, _: Option<&str>) -> Result<OAuthToken, Box<dyn std::error::Error>> {
        self.token()
    }
}

/// The group member's consumer context.
pub struct Ctx {
    pub(crate) base: Base,
    pub(crate) topic: String,
    pub(crate) queues: Queues,
    pub(crate) highs: Highs,
    /// The member's loop; rebalances wait for its answer.
    pub(crate) cmds: tokio::sync::mpsc::UnboundedSender<Cmd>,
    /// The consumer itself, for splitting partition queues inside the rebalance callback.
    pub(crate) consumer: OnceLock<Weak<BaseConsumer<Ctx>>>,
}

impl std::fmt::Debug for Ctx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ctx").field("topic", &self.topic).finish_non_exhaustive()
    }
}

impl ClientContext for Ctx {
    const ENABLE_REFRESH_OAUTH_TOKEN: bool = true;

    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        log(level, fac, message);
    }

    fn generate_oauth_token(&self, _: Option<&str>) -> Result<OAuthToken, Box<dyn std::error::Error>> {
        self.base.token()
    }

    fn stats(&self, statistics: Statistics) {
        if let Some(t) = statistics.topics.get(&self.topic) {
            let mut highs = lock(&self.highs);
            for (p, s) in &t.partitions {
                if *p >= 0 && s.hi_offset >= 0 {
                    highs.insert(*p, s.hi_offset);
                }
            }
        }
    }
}

impl Ctx {
    fn partitions(&self, tpl: &TopicPartitionList) -> Vec<i32> {
        tpl.elements_for_topic(&self.topic).iter().map(|e| e.partition()).collect()
    }

    /// Asks the member's loop and waits for its answer (this runs on the poll thread, never on
    /// the async runtime). `None` when the loop is gone (shutting down).
    fn ask<T>(&self, make: impl FnOnce(std::sync::mpsc::Sender<T>) -> Cmd) -> Option<T> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.cmds.send(make(tx)).ok()?;
        rx.recv().ok()
    }

    fn assign(&self, base: &BaseConsumer<Self>, tpl: &mut TopicPartitionList) {
        let partitions = self.partitions(tpl);
        // Split each partition's queue *before* assigning it: none of its records may reach the
        // consumer's shared queue.
        if let Some(consumer) = self.consumer.get().and_then(Weak::upgrade) {
            let mut queues = lock(&self.queues);
            for &p in &partitions {
                match consumer.split_partition_queue(&self.topic, p) {
                    Some(q) => {
                        queues.insert(p, q);
                    }
                    None => tracing::error!(partition = p, "could not split the partition's queue"),
                }
            }
        }
        let starts = self.ask(|reply| Cmd::Assign { partitions: partitions.clone(), reply }).unwrap_or_default();
        for p in &partitions {
            let offset = match starts.iter().find(|s| s.partition == *p) {
                Some(Start { next: Some(n), .. }) => Offset::Offset(i64::try_from(*n).unwrap_or(i64::MAX)),
                Some(Start { next: None, .. }) => Offset::Beginning,
                // No worker (its lease could not be taken): nothing reads it here; the committed
                // Kafka offset keeps the fetcher near the right place.
                None => Offset::Stored,
            };
            if let Err(e) = tpl.set_partition_offset(&self.topic, *p, offset) {
                tracing::error!(partition = p, error = %e, "setting the start offset failed");
            }
        }
        if let Err(e) = base.incremental_assign(tpl) {
            tracing::error!(error = %e, "incremental assign failed");
        }
        tracing::info!(partitions = ?partitions, "assigned");
    }

    fn revoke(&self, base: &BaseConsumer<Self>, tpl: &TopicPartitionList) {
        let partitions = self.partitions(tpl);
        let lost = base.assignment_lost();
        // Workers stop and commit (fenced: a lost partition's commit fails harmlessly), leases are
        // released; only then may another member start on them.
        let committed =
            self.ask(|reply| Cmd::Revoke { partitions: partitions.clone(), lost, reply }).unwrap_or_default();
        if !lost && !committed.is_empty() {
            let mut offsets = TopicPartitionList::new();
            for (p, next) in &committed {
                let _ =
                    offsets.add_partition_offset(&self.topic, *p, Offset::Offset(i64::try_from(*next).unwrap_or(0)));
            }
            if let Err(e) = base.commit(&offsets, rdkafka::consumer::CommitMode::Sync) {
                tracing::warn!(error = %e, "committing offsets to Kafka failed (visibility only)");
            }
        }
        {
            let mut queues = lock(&self.queues);
            for p in &partitions {
                queues.remove(p);
            }
        }
        if let Err(e) = base.incremental_unassign(tpl) {
            tracing::error!(error = %e, "incremental unassign failed");
        }
        tracing::info!(partitions = ?partitions, lost, "revoked");
    }
}

impl ConsumerContext for Ctx {
    fn rebalance(&self, base: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => self.assign(base, tpl),
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => self.revoke(base, tpl),
            other => {
                tracing::error!(error = ?other, "rebalance failed; giving up the assignment");
                self.revoke(base, tpl);
            }
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, _: &TopicPartitionList) {
        if let Err(e) = result {
            tracing::debug!(error = %e, "offset commit to Kafka failed (visibility only)");
        }
    }
}
