//! # stockflow-pipeline
//!
//! Streams and the workers that consume them:
//!
//! - [`source`]: the `StreamSource` / `ShardReader` / `StreamProducer` traits every backend
//!   implements (embedded log now; Kinesis and Kafka behind the same traits).
//! - [`log`]: `EmbeddedLog`, the durable partitioned log of the single-machine deployment.
//! - [`worker`]: `ShardWorker`, one task per shard: decode → dedup → apply → commit.
//! - [`consumer`]: running all shards of a source in one process.
//! - [`group`]: the consumer group: leases, balancing, failover, handoff, resharding.
//! - [`kinesis`]: Amazon Kinesis (polling and enhanced fan-out, KPL de-aggregation, producer).
//! - `kafka` (feature `kafka`): Kafka / Amazon MSK partitions as shards, the Kafka consumer group
//!   with store leases as fences, the idempotent producer, MSK IAM tokens.
//! - [`batcher`]: group commit of concurrent puts in front of any producer.
//! - Retries use the workspace's one backoff policy, `stockflow_state::retry`.
//! - [`metrics`]: the pipeline's named telemetry events.

pub mod batcher;
pub mod consumer;
pub mod group;
#[cfg(feature = "kafka")]
pub mod kafka;
pub mod kinesis;
pub mod log;
pub mod metrics;
pub mod source;
pub mod worker;

pub use consumer::run_all_shards;
pub use log::EmbeddedLog;
pub use source::{
    OutRecord, ReadStatus, RecordBatch, ShardInfo, ShardReader, StreamError, StreamProducer, StreamSource,
};
pub use worker::{Progress, ShardWorker, WorkerConfig, WorkerError, WorkerReport};
