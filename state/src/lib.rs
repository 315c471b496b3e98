//! # stockflow-state
//!
//! The domain of stockflow, free of stream and network I/O:
//!
//! - [`event`]: the canonical event of SPEC §1, decoded with borrowed strings and validated
//!   strictly (errors name the field).
//! - [`ledger`]: per-SKU stock, reservations per open order line, average cost and COGS (SPEC §2).
//! - [`linelog`]: order lines kept apart from SKU states, as a log of changes (embedded store).
//! - [`windows`]: event-time tumbling windows, the per-shard watermark and sales velocity (§3).
//! - [`dedup`]: dedup by event id within a horizon of event time.
//! - [`effects`]: alerts, reorder requests, journal lines and discrepancies with deterministic ids.
//! - [`engine`]: `ShardEngine`, one shard's state in memory, its snapshot and its commit delta.
//! - [`store`]: the `StateStore` trait — state, outbox, dead letters and checkpoints together.
//! - [`outbox`]: the outbox as connectors read it, delivery cursors and connector dead letters.
//! - [`lease`]: leases of shards with a fencing epoch, the `LeaseStore` trait, in-process leases.
//! - [`embedded`]: `RedbStore`, the durable single-machine store.
//! - [`dynamodb`]: `DynamoStore`, the store of the AWS deployment: fenced, split commits.
//! - [`reference`]: the straight pass that every backend must agree with.

pub mod book;
pub mod dedup;
pub mod dynamodb;
pub mod effects;
pub mod embedded;
pub mod engine;
pub mod event;
pub mod lease;
pub mod ledger;
pub mod linelog;
pub mod money;
pub mod outbox;
pub mod reference;
pub mod retry;
pub mod store;
pub mod windows;

pub use effects::Effect;
pub use engine::{Applied, EngineConfig, ShardEngine};
pub use event::{DecodeError, Event, EventKind, decode};
pub use ledger::SkuState;
pub use outbox::{ConnectorDeadLetter, Cursor, OutboxEntry, OutboxPos, OutboxStore};
pub use store::{DeadLetter, Position, ShardCommit, StateStore, StoreError, StoredShard};

/// Wall-clock milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}
