//! The state store: where per-SKU state, the outbox of effects, dead letters, dedup entries and
//! checkpoints live. One [`ShardCommit`] is written atomically (embedded) or fenced and ordered so
//! that a crash between its parts is harmless (DynamoDB).

use std::cmp::Ordering;
use std::fmt;
use std::future::Future;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::effects::Effect;
use crate::engine::{DedupDelta, EncodedStates, EngineDelta, ShardSnapshot};
use crate::ledger::SkuState;
use crate::linelog::LineDelta;

/// A position in a shard: a decimal sequence number (Kinesis sequence number, Kafka offset,
/// embedded byte offset) and a sub-sequence number (KPL aggregation). Ordered numerically.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Position {
    /// Decimal digits of the sequence number.
    pub sequence: String,
    /// Sub-sequence within an aggregated record (0 otherwise).
    #[serde(default)]
    pub sub: u64,
}

impl Position {
    /// The position of an integer offset.
    pub fn offset(offset: u64) -> Self {
        Position { sequence: offset.to_string(), sub: 0 }
    }

    /// The sequence number as `u64`, when it fits (embedded and Kafka offsets).
    pub fn as_u64(&self) -> Option<u64> {
        self.sequence.parse().ok()
    }
}

impl Ord for Position {
    fn cmp(&self, other: &Self) -> Ordering {
        let a = self.sequence.trim_start_matches('0');
        let b = other.sequence.trim_start_matches('0');
        a.len().cmp(&b.len()).then_with(|| a.cmp(b)).then_with(|| self.sub.cmp(&other.sub))
    }
}

impl PartialOrd for Position {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.sub == 0 { write!(f, "{}", self.sequence) } else { write!(f, "{}/{}", self.sequence, self.sub) }
    }
}

/// A record that could not be applied, kept with its reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// The shard it was read from.
    pub shard: String,
    /// Its stream position.
    pub position: Position,
    /// Why it was rejected.
    pub reason: String,
    /// The offending field, when one is to blame.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// The record as received (lossy UTF-8, truncated to 64 KiB).
    pub record: String,
}

impl DeadLetter {
    /// Largest record excerpt kept.
    pub const MAX_RECORD_BYTES: usize = 64 << 10;

    /// Builds a dead letter, truncating the record at a character boundary.
    pub fn new(shard: &str, position: Position, reason: String, field: Option<&str>, record: &[u8]) -> Self {
        let mut text = String::from_utf8_lossy(record).into_owned();
        if text.len() > Self::MAX_RECORD_BYTES {
            let mut cut = Self::MAX_RECORD_BYTES;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
        }
        DeadLetter { shard: shard.to_string(), position, reason, field: field.map(str::to_string), record: text }
    }
}

/// Everything one commit of a shard writes.
#[derive(Debug)]
pub struct ShardCommit {
    /// The shard.
    pub shard: String,
    /// The writer's lease epoch (fencing token); stores that fence reject stale epochs.
    pub lease_epoch: u64,
    /// Position of the last record this commit covers.
    pub checkpoint: Position,
    /// The shard's largest event time (restores the watermark).
    pub max_ts: Option<i64>,
    /// Dirty SKUs' new states, encoded with [`SkuState::encode`] (every line inside) or, when
    /// `lines` is set, [`SkuState::encode_head`].
    pub states: EncodedStates,
    /// Order-line changes, for stores that keep lines apart ([`StateStore::keeps_lines_apart`]).
    pub lines: Option<LineDelta>,
    /// New effects, in order.
    pub effects: Vec<Effect>,
    /// New dead letters.
    pub dead_letters: Vec<DeadLetter>,
    /// New dedup entries.
    pub dedup: DedupDelta,
    /// SKUs of `states` committed under this shard for the first time (see
    /// [`crate::engine::EngineDelta::new_skus`]).
    pub new_skus: Vec<String>,
    /// A commit that only rewrites the dedup entries, at the stored checkpoint (which it keeps):
    /// no records, states or effects. Stores whose entries expire use it to refresh them.
    pub keep_checkpoint: bool,
    /// The checkpoint is that of an interrupted commit whose first parts are stored (the replay
    /// after it reached exactly its end): the store must not overwrite what those parts wrote.
    pub after_interrupted: bool,
    /// How far the shard's reader was behind the stream's tip at this commit, ms (shown by
    /// `stockflow group status`).
    pub lag_ms: Option<u64>,
}

impl ShardCommit {
    /// The commit of an engine's delta at `checkpoint`: no dead letters, a checkpoint that moves
    /// forward, no lag figure (set those fields after, when there are).
    pub fn of_delta(shard: &str, lease_epoch: u64, checkpoint: Position, delta: EngineDelta) -> Self {
        ShardCommit {
            shard: shard.to_string(),
            lease_epoch,
            checkpoint,
            max_ts: delta.max_ts,
            states: delta.states,
            lines: delta.lines,
            effects: delta.effects,
            dead_letters: Vec::new(),
            dedup: delta.dedup,
            new_skus: delta.new_skus,
            keep_checkpoint: false,
            after_interrupted: false,
            lag_ms: None,
        }
    }
}

/// What a shard's stored state is.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StoredShard {
    /// Last committed position, `None` for a shard never committed.
    pub checkpoint: Option<Position>,
    /// The state at that checkpoint.
    pub snapshot: ShardSnapshot,
    /// SKUs whose stored state already reflects records after the checkpoint (a commit that was
    /// split into parts and interrupted): a replay skips their records up to this position.
    /// Always empty for stores that commit atomically.
    pub floors: Vec<(String, Position)>,
    /// When the first of the stored dedup entries expires (wall clock, ms), for stores whose
    /// entries expire ([`StateStore::dedup_expiry`]).
    pub dedup_expires_at_ms: Option<i64>,
    /// Bytes of the shard's stored line log, for stores that keep lines apart (0 otherwise).
    pub lines_log_bytes: u64,
}

/// How a store expires dedup entries by wall clock (DynamoDB TTL), and when a worker must
/// rewrite them so that no live entry expires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DedupExpiry {
    /// Entries written now expire this long after (ms).
    pub ttl_ms: i64,
    /// Rewrite them when less than this is left (ms).
    pub refresh_before_ms: i64,
}

/// Store failures. Transient ones are retried; permanent ones stop the shard worker.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// I/O or backend trouble that may pass: retry with backoff.
    #[error("state store unavailable: {0}")]
    Unavailable(String),
    /// The writer no longer owns the shard: stop processing it (do not retry).
    #[error("shard {shard}: lease lost (epoch {epoch} is stale)")]
    Fenced {
        /// The shard.
        shard: String,
        /// The stale epoch.
        epoch: u64,
    },
    /// A commit tried to move the checkpoint backwards: a bug or a zombie writer.
    #[error("shard {shard}: checkpoint {new} is not after the stored {stored}")]
    CheckpointRegression {
        /// The shard.
        shard: String,
        /// The stored checkpoint.
        stored: Position,
        /// The rejected one.
        new: Position,
    },
    /// A delivery cursor write would move the cursor backwards: a bug or a zombie writer.
    #[error("connector {connector}, shard {shard}: the delivery cursor may not move backwards")]
    CursorRegression {
        /// The connector.
        connector: String,
        /// The shard.
        shard: String,
    },
    /// Stored bytes could not be decoded: the store needs attention.
    #[error("state store corrupt: {0}")]
    Corrupt(String),
    /// A conditional book write found its key in another state (another writer got there
    /// first): read again and decide again.
    #[error("book key {key}: changed by another writer")]
    Conflict {
        /// The key.
        key: String,
    },
}

impl StoreError {
    /// True when retrying may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

/// A place to keep state. Implemented by the embedded redb store and by DynamoDB.
pub trait StateStore: Send + Sync + 'static {
    /// The stored state and checkpoint of one shard.
    fn load_shard(&self, shard: &str) -> impl Future<Output = Result<StoredShard, StoreError>> + Send;

    /// Writes one commit: states, effects, dead letters, dedup entries and the checkpoint.
    fn commit(&self, commit: Arc<ShardCommit>) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Every SKU's state across all shards, sorted by SKU.
    fn sku_states(&self) -> impl Future<Output = Result<Vec<(String, SkuState)>, StoreError>> + Send;

    /// Every effect in the outbox, in commit order per shard.
    fn effects(&self) -> impl Future<Output = Result<Vec<Effect>, StoreError>> + Send;

    /// Every dead letter, by shard and position.
    fn dead_letters(&self) -> impl Future<Output = Result<Vec<DeadLetter>, StoreError>> + Send;

    /// Removes the record dead letters that `select` picks (an operator's decision: they are
    /// kept until then); returns how many.
    fn remove_dead_letters(
        &self,
        select: &(dyn Fn(&DeadLetter) -> bool + Sync),
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Every shard's checkpoint.
    fn checkpoints(&self) -> impl Future<Output = Result<Vec<(String, Position)>, StoreError>> + Send;

    /// The SKU states a shard holds now (the SKUs whose latest commit came from it), sorted by
    /// SKU, read consistently.
    fn shard_sku_states(&self, shard: &str)
    -> impl Future<Output = Result<Vec<(String, SkuState)>, StoreError>> + Send;

    /// True for a store that keeps order lines apart from SKU states, as a log of changes
    /// ([`crate::linelog`]): workers then commit heads and line changes
    /// ([`crate::ShardEngine::keep_lines_apart`]). Such a store also takes whole states.
    fn keeps_lines_apart(&self) -> bool {
        false
    }

    /// How stored dedup entries expire, if they do (`None`: kept until compaction removes them).
    fn dedup_expiry(&self) -> Option<DedupExpiry> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_order_numerically() {
        let p = |s: &str, sub| Position { sequence: s.into(), sub };
        assert!(p("9", 0) < p("10", 0));
        assert!(p("49590338271490256608559692538361571095921575989136588898", 0) > p("4959", 0));
        assert!(p("10", 1) > p("10", 0));
    }

    #[test]
    fn dead_letters_truncate_on_a_char_boundary() {
        let big = "é".repeat(DeadLetter::MAX_RECORD_BYTES);
        let d = DeadLetter::new("s", Position::offset(1), "bad".into(), Some("qty"), big.as_bytes());
        assert!(d.record.len() <= DeadLetter::MAX_RECORD_BYTES);
        assert_eq!(d.field.as_deref(), Some("qty"));
    }
}
