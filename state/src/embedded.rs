//! `RedbStore`: the embedded, durable, single-machine state store (an ACID redb file).
//!
//! Tables (keys are tuples so a shard's rows are contiguous):
//!
//! | table | key | value |
//! |---|---|---|
//! | `sku_state` | `(shard, sku)` | postcard `SkuState` without its order lines ([`SkuState::encode_head`]) |
//! | `line_log` | `(shard, row)` | the shard's order lines as a log of changes ([`crate::linelog`]), replayed over the states at load |
//! | `outbox` | `(shard, row)` | up to 256 effects of one commit, binary (`effects::codec`; connectors keep a cursor per shard) |
//! | `dead_letters` | `(shard, seq)` | JSON `DeadLetter` |
//! | `dedup` | `(shard, chunk)` | packed dedup entries |
//! | `shard_meta` | `shard` | postcard `ShardMeta` (checkpoint, max ts, sequence counters) |
//! | `delivery` | `(connector, shard)` | JSON [`Cursor`]: what the connector delivered, its in-flight request |
//! | `connector_dlq` | `(connector, shard, key)` | JSON [`ConnectorDeadLetter`] |
//! | `outbox_written` | `(shard, row)` | Unix ms when the commit whose first outbox row this is was written (retention) |
//! | `store_meta` | name | `freed_bytes`: bytes retention and rewrites (line log, dedup rows) removed since the last compaction; `layout`: 3 once every state keeps its lines in `line_log` |
//!
//! A commit is one redb write transaction with `Durability::Immediate`: states, effects, dead
//! letters, dedup entries and the checkpoint become durable together or not at all.
//!
//! One file because every method is one redb transaction over the same tables; splitting it by
//! trait would scatter the table layout described here.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::book::{BookStore, BookWrite, CursorWrite, Expect};
use crate::dedup::{DedupEntry, sku_id};
use crate::effects::codec::push_effect;
use crate::effects::{Effect, EffectKinds};
use crate::engine::{DedupDelta, ShardSnapshot};
use crate::ledger::SkuState;
use crate::linelog::{LineDelta, LineLogWriter};
use crate::outbox::{
    ConnectorDeadLetter, Cursor, CursorPosition, Fence, OutboxPos, OutboxScan, OutboxStore, row_effects, row_entries,
};
use crate::store::{DeadLetter, Position, ShardCommit, StateStore, StoreError, StoredShard};

/// Largest `dedup` row: 65,536 entries (a whole number of them).
const DEDUP_ROW_BYTES: usize = (1 << 16) * crate::dedup::ENTRY_BYTES;

const SKU_STATE: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("sku_state");
const LINE_LOG: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("line_log");
const OUTBOX: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("outbox");
const DEAD_LETTERS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("dead_letters");
const DEDUP: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("dedup");
const SHARD_META: TableDefinition<&str, &[u8]> = TableDefinition::new("shard_meta");
const DELIVERY: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("delivery");
const CONNECTOR_DLQ: TableDefinition<(&str, &str, &str), &[u8]> = TableDefinition::new("connector_dlq");
const OUTBOX_WRITTEN: TableDefinition<(&str, u64), i64> = TableDefinition::new("outbox_written");
/// Store-wide counters: `freed_bytes` (bytes removed by retention and by rewrites of the line log
/// and the dedup rows since the last compaction), `layout` ([`LAYOUT_LINES_APART`] once states keep their lines apart).
const STORE_META: TableDefinition<&str, u64> = TableDefinition::new("store_meta");
/// The connectors' book: `(connector, key) → JSON` (see [`crate::book`]).
const BOOK: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("book");

/// `layout` of a store whose states all keep their order lines in `line_log`.
const LAYOUT_LINES_APART: u64 = 3;

/// Most effects in one outbox row.
const OUTBOX_ROW_EFFECTS: usize = 256;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct ShardMeta {
    checkpoint: Option<Position>,
    max_ts: Option<i64>,
    /// Next outbox batch number.
    next_effect: u64,
    next_dead_letter: u64,
    next_dedup_chunk: u64,
}

/// The embedded state store.
#[derive(Debug, Clone)]
pub struct RedbStore {
    db: Arc<Database>,
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn corrupt(e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

/// redb's page cache. Its default, 1 GiB, let a 1 M-event replay grow to ~650 MB of RSS, and the
/// kernel zeroing those fresh pages was 27 % of the run's samples (issue 24's profile). The hot
/// set — shard metadata, the dedup chunks and SKU states being rewritten — is far smaller: the
/// workers keep state in memory and write it, they do not read it back.
pub const CACHE_BYTES: usize = 64 << 20;

impl RedbStore {
    /// Opens (or creates) the store file and its tables.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        let path = path.as_ref();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(unavailable)?;
        }
        let mut db = Database::builder().set_cache_size(CACHE_BYTES).create(path).map_err(unavailable)?;
        Self::compact_if_sparse(&mut db, path)?;
        let txn = db.begin_write().map_err(unavailable)?;
        txn.open_table(SKU_STATE).map_err(unavailable)?;
        txn.open_table(LINE_LOG).map_err(unavailable)?;
        txn.open_table(OUTBOX).map_err(unavailable)?;
        txn.open_table(DEAD_LETTERS).map_err(unavailable)?;
        txn.open_table(DEDUP).map_err(unavailable)?;
        txn.open_table(SHARD_META).map_err(unavailable)?;
        txn.open_table(DELIVERY).map_err(unavailable)?;
        txn.open_table(CONNECTOR_DLQ).map_err(unavailable)?;
        txn.open_table(OUTBOX_WRITTEN).map_err(unavailable)?;
        txn.open_table(STORE_META).map_err(unavailable)?;
        txn.open_table(BOOK).map_err(unavailable)?;
        Self::keep_lines_apart(&txn)?;
        txn.commit().map_err(unavailable)?;
        Ok(RedbStore { db: Arc::new(db) })
    }

    /// Moves the order lines of states written whole (by stockflow before the line log) into
    /// the line log, once: afterwards a commit that writes a SKU's head and only its changed
    /// lines cannot lose the lines its stored state held.
    fn keep_lines_apart(txn: &redb::WriteTransaction) -> Result<(), StoreError> {
        let mut meta = txn.open_table(STORE_META).map_err(unavailable)?;
        if meta.get("layout").map_err(unavailable)?.is_some_and(|v| v.value() >= LAYOUT_LINES_APART) {
            return Ok(());
        }
        let mut heads = txn.open_table(SKU_STATE).map_err(unavailable)?;
        let mut log = txn.open_table(LINE_LOG).map_err(unavailable)?;
        let mut whole: Vec<(String, String, SkuState)> = Vec::new();
        for row in heads.iter().map_err(unavailable)? {
            let (k, v) = row.map_err(unavailable)?;
            if !SkuState::lines_apart(v.value()) {
                let (shard, sku) = k.value();
                whole.push((shard.to_string(), sku.to_string(), SkuState::decode(v.value())?));
            }
        }
        let (t0, moved) = (std::time::Instant::now(), whole.len());
        // Rows come sorted by (shard, SKU): one writer per shard.
        let mut w = LineLogWriter::default();
        let mut rows = whole.into_iter().peekable();
        while let Some((shard, sku, mut state)) = rows.next() {
            let head = Self::split_whole(&sku, &mut state, &mut w)?;
            heads.insert((shard.as_str(), sku.as_str()), head.as_slice()).map_err(unavailable)?;
            if rows.peek().is_none_or(|(next, _, _)| *next != shard) {
                Self::append_log(&mut log, &shard, &std::mem::take(&mut w).finish(false).rows)?;
            }
        }
        if moved > 0 {
            tracing::info!(states = moved, elapsed = ?t0.elapsed(), "moved the stored SKU states' order lines to the line log");
        }
        meta.insert("layout", LAYOUT_LINES_APART).map_err(unavailable)?;
        Ok(())
    }

    /// A state written whole, split: its lines go to `w` as a reset of the SKU's lines; its head
    /// (the state without lines) is returned for `sku_state`.
    fn split_whole(sku: &str, state: &mut SkuState, w: &mut LineLogWriter) -> Result<Vec<u8>, StoreError> {
        w.reset(sku_id(sku), &state.lines)?;
        state.encode_head()
    }

    /// Appends rows after the shard's last line-log row.
    fn append_log(log: &mut redb::Table<(&str, u64), &[u8]>, shard: &str, rows: &[Vec<u8>]) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        let next = match log.range((shard, 0)..=(shard, u64::MAX)).map_err(unavailable)?.next_back() {
            Some(row) => row.map_err(unavailable)?.0.value().1 + 1,
            None => 0,
        };
        for (seq, row) in (next..).zip(rows) {
            log.insert((shard, seq), row.as_slice()).map_err(unavailable)?;
        }
        Ok(())
    }

    /// A shard's SKU states, sorted by SKU, with their order lines replayed from the line log;
    /// and the log's size in bytes.
    fn read_states(
        heads: &impl ReadableTable<(&'static str, &'static str), &'static [u8]>,
        log: &impl ReadableTable<(&'static str, u64), &'static [u8]>,
        shard: &str,
    ) -> Result<(Vec<(String, SkuState)>, u64), StoreError> {
        let mut states = Vec::new();
        for row in heads.range((shard, "")..).map_err(unavailable)? {
            let (k, v) = row.map_err(unavailable)?;
            let (row_shard, sku) = k.value();
            if row_shard != shard {
                break;
            }
            states.push((sku.to_string(), SkuState::decode(v.value())?));
        }
        let bytes = Self::replay_lines(log, shard, &mut states)?;
        Ok((states, bytes))
    }

    /// Applies the shard's line log to its `states` (heads, read before); returns the log's bytes.
    fn replay_lines(
        log: &impl ReadableTable<(&'static str, u64), &'static [u8]>,
        shard: &str,
        states: &mut [(String, SkuState)],
    ) -> Result<u64, StoreError> {
        let index: HashMap<u64, usize> = states.iter().enumerate().map(|(i, (sku, _))| (sku_id(sku), i)).collect();
        let mut bytes = 0u64;
        for row in log.range((shard, 0)..=(shard, u64::MAX)).map_err(unavailable)? {
            let (_, v) = row.map_err(unavailable)?;
            bytes += v.value().len() as u64;
            crate::linelog::apply_row(v.value(), states, &index)?;
        }
        Ok(bytes)
    }

    /// Retention frees pages inside the file, which redb reuses but does not give back. When the
    /// bytes retention removed since the last compaction are at least a quarter of a file of 32 MiB or
    /// more, compact it at open (before anything else holds the database): the work is about the
    /// live data, like the restore that follows, and the file shrinks to about the state. (The
    /// count is kept by the store: measuring free space would walk every page at every open.)
    fn compact_if_sparse(db: &mut Database, path: &Path) -> Result<(), StoreError> {
        let file_len = std::fs::metadata(path).map_err(unavailable)?.len();
        if file_len < 32 << 20 {
            return Ok(());
        }
        let freed = {
            let txn = db.begin_read().map_err(unavailable)?;
            match txn.open_table(STORE_META) {
                Ok(t) => t.get("freed_bytes").map_err(unavailable)?.map_or(0, |v| v.value()),
                Err(redb::TableError::TableDoesNotExist(_)) => 0,
                Err(e) => return Err(unavailable(e)),
            }
        };
        if freed.saturating_mul(4) < file_len {
            return Ok(());
        }
        let t0 = std::time::Instant::now();
        for _ in 0..8 {
            if !db.compact().map_err(unavailable)? {
                break;
            }
        }
        let txn = db.begin_write().map_err(unavailable)?;
        txn.open_table(STORE_META).map_err(unavailable)?.insert("freed_bytes", 0).map_err(unavailable)?;
        txn.commit().map_err(unavailable)?;
        let after = std::fs::metadata(path).map_err(unavailable)?.len();
        tracing::info!(before = file_len, after, elapsed = ?t0.elapsed(), "compacted the state store (space freed by retention)");
        Ok(())
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let db = Arc::clone(&self.db);
        tokio::task::spawn_blocking(move || f(&db)).await.map_err(unavailable)?
    }

    fn load_shard_sync(db: &Database, shard: &str) -> Result<StoredShard, StoreError> {
        let txn = db.begin_read().map_err(unavailable)?;
        let meta: ShardMeta = match txn.open_table(SHARD_META).map_err(unavailable)?.get(shard).map_err(unavailable)? {
            Some(v) => postcard::from_bytes(v.value()).map_err(corrupt)?,
            None => ShardMeta::default(),
        };
        let heads = txn.open_table(SKU_STATE).map_err(unavailable)?;
        let log = txn.open_table(LINE_LOG).map_err(unavailable)?;
        let (skus, lines_log_bytes) = Self::read_states(&heads, &log, shard)?;
        let mut dedup = Vec::new();
        let chunks = txn.open_table(DEDUP).map_err(unavailable)?;
        for row in chunks.range((shard, 0)..=(shard, u64::MAX)).map_err(unavailable)? {
            let (_, v) = row.map_err(unavailable)?;
            DedupEntry::decode_row(v.value(), &mut dedup).map_err(StoreError::Corrupt)?;
        }
        Ok(StoredShard {
            checkpoint: meta.checkpoint,
            snapshot: ShardSnapshot { max_ts: meta.max_ts, skus, dedup },
            floors: Vec::new(),
            dedup_expires_at_ms: None,
            lines_log_bytes,
        })
    }

    fn commit_sync(db: &Database, c: &ShardCommit) -> Result<(), StoreError> {
        let t0 = std::time::Instant::now();
        let txn = db.begin_write().map_err(unavailable)?;
        let waited = t0.elapsed();
        let mut outbox_bytes = 0usize;
        {
            let mut metas = txn.open_table(SHARD_META).map_err(unavailable)?;
            let mut meta: ShardMeta = match metas.get(c.shard.as_str()).map_err(unavailable)? {
                Some(v) => postcard::from_bytes(v.value()).map_err(corrupt)?,
                None => ShardMeta::default(),
            };
            if let Some(stored) = &meta.checkpoint
                && (*stored > c.checkpoint || (*stored == c.checkpoint && !c.keep_checkpoint))
            {
                return Err(StoreError::CheckpointRegression {
                    shard: c.shard.clone(),
                    stored: stored.clone(),
                    new: c.checkpoint.clone(),
                });
            }
            let mut states = txn.open_table(SKU_STATE).map_err(unavailable)?;
            let mut log = txn.open_table(LINE_LOG).map_err(unavailable)?;
            // Bytes that rewrites free inside the file (counted toward compaction at open).
            let mut freed = 0u64;
            if c.lines.as_ref().is_some_and(|l| l.replace) {
                log.retain_in((c.shard.as_str(), 0)..=(c.shard.as_str(), u64::MAX), |_, v| {
                    freed += v.len() as u64;
                    false
                })
                .map_err(unavailable)?;
            }
            if let Some(lines) = &c.lines {
                Self::append_log(&mut log, &c.shard, &lines.rows)?;
            }
            // A state written whole (a caller that does not keep lines apart): its lines go to
            // the log as a reset of the SKU's lines, its head to `sku_state`.
            let mut whole = LineLogWriter::default();
            for (sku, state) in &c.states {
                if SkuState::lines_apart(state) {
                    states.insert((c.shard.as_str(), sku), state).map_err(unavailable)?;
                } else {
                    let head = Self::split_whole(sku, &mut SkuState::decode(state)?, &mut whole)?;
                    states.insert((c.shard.as_str(), sku), head.as_slice()).map_err(unavailable)?;
                }
            }
            Self::append_log(&mut log, &c.shard, &whole.finish(false).rows)?;
            if !c.effects.is_empty() {
                // Rows of up to OUTBOX_ROW_EFFECTS effects: inserting effects one by one cost ~4 µs
                // each, and whole-commit rows (tens of thousands) made every connector read scan
                // megabytes to find its place.
                let mut outbox = txn.open_table(OUTBOX).map_err(unavailable)?;
                txn.open_table(OUTBOX_WRITTEN)
                    .map_err(unavailable)?
                    .insert((c.shard.as_str(), meta.next_effect), crate::now_ms())
                    .map_err(unavailable)?;
                let mut row = Vec::with_capacity(OUTBOX_ROW_EFFECTS * 80);
                for chunk in c.effects.chunks(OUTBOX_ROW_EFFECTS) {
                    row.clear();
                    for effect in chunk {
                        push_effect(&mut row, effect);
                    }
                    outbox.insert((c.shard.as_str(), meta.next_effect), row.as_slice()).map_err(unavailable)?;
                    outbox_bytes += row.len();
                    meta.next_effect += 1;
                }
            }
            let mut dlq = txn.open_table(DEAD_LETTERS).map_err(unavailable)?;
            for dl in &c.dead_letters {
                let json = serde_json::to_vec(dl).map_err(corrupt)?;
                dlq.insert((c.shard.as_str(), meta.next_dead_letter), json.as_slice()).map_err(unavailable)?;
                meta.next_dead_letter += 1;
            }
            let mut dedup = txn.open_table(DEDUP).map_err(unavailable)?;
            let bytes = match &c.dedup {
                DedupDelta::Append(bytes) => bytes,
                DedupDelta::Replace(bytes) => {
                    dedup
                        .retain_in((c.shard.as_str(), 0)..=(c.shard.as_str(), u64::MAX), |_, v| {
                            freed += v.len() as u64;
                            false
                        })
                        .map_err(unavailable)?;
                    bytes
                }
            };
            // Rows of at most DEDUP_ROW_BYTES: a compaction of millions of live ids is not one
            // value of hundreds of MB (redb would place and buffer it whole).
            for chunk in bytes.chunks(DEDUP_ROW_BYTES) {
                dedup
                    .insert((c.shard.as_str(), meta.next_dedup_chunk), DedupEntry::row(chunk).as_slice())
                    .map_err(unavailable)?;
                meta.next_dedup_chunk += 1;
            }
            if freed > 0 {
                let mut store_meta = txn.open_table(STORE_META).map_err(unavailable)?;
                let before = store_meta.get("freed_bytes").map_err(unavailable)?.map_or(0, |v| v.value());
                store_meta.insert("freed_bytes", before.saturating_add(freed)).map_err(unavailable)?;
            }
            meta.checkpoint = Some(c.checkpoint.clone());
            meta.max_ts = c.max_ts;
            let meta_bytes = postcard::to_allocvec(&meta).map_err(corrupt)?;
            metas.insert(c.shard.as_str(), meta_bytes.as_slice()).map_err(unavailable)?;
        }
        let written = t0.elapsed();
        txn.commit().map_err(unavailable)?;
        tracing::debug!(
            shard = %c.shard, ?waited, ?written, total = ?t0.elapsed(), states = c.states.len(),
            state_bytes = c.states.state_bytes(),
            line_bytes = c.lines.as_ref().map_or(0, LineDelta::len),
            dedup_bytes = match &c.dedup { DedupDelta::Append(b) | DedupDelta::Replace(b) => b.len() },
            dedup_replace = matches!(c.dedup, DedupDelta::Replace(_)),
            effects = c.effects.len(),
            outbox_bytes,
            "redb commit"
        );
        Ok(())
    }

    fn scan_json<T: serde::de::DeserializeOwned>(
        db: &Database,
        table: TableDefinition<(&str, u64), &[u8]>,
    ) -> Result<Vec<T>, StoreError> {
        let txn = db.begin_read().map_err(unavailable)?;
        let t = txn.open_table(table).map_err(unavailable)?;
        let mut out = Vec::new();
        for row in t.iter().map_err(unavailable)? {
            let (_, v) = row.map_err(unavailable)?;
            out.push(serde_json::from_slice(v.value()).map_err(corrupt)?);
        }
        Ok(out)
    }
}

impl StateStore for RedbStore {
    fn keeps_lines_apart(&self) -> bool {
        true
    }

    async fn load_shard(&self, shard: &str) -> Result<StoredShard, StoreError> {
        let shard = shard.to_string();
        self.blocking(move |db| Self::load_shard_sync(db, &shard)).await
    }

    async fn commit(&self, commit: Arc<ShardCommit>) -> Result<(), StoreError> {
        self.blocking(move |db| Self::commit_sync(db, &commit)).await
    }

    async fn sku_states(&self) -> Result<Vec<(String, SkuState)>, StoreError> {
        self.blocking(|db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let heads = txn.open_table(SKU_STATE).map_err(unavailable)?;
            let log = txn.open_table(LINE_LOG).map_err(unavailable)?;
            // One pass over the heads (sorted by shard): each shard's lines are replayed once
            // its heads are read.
            let mut out: Vec<(String, SkuState)> = Vec::new();
            let mut shard: Option<String> = None;
            let mut from = 0;
            for row in heads.iter().map_err(unavailable)? {
                let (k, v) = row.map_err(unavailable)?;
                let (row_shard, sku) = k.value();
                if shard.as_deref() != Some(row_shard) {
                    if let Some(done) = shard.replace(row_shard.to_string()) {
                        Self::replay_lines(&log, &done, &mut out[from..])?;
                    }
                    from = out.len();
                }
                out.push((sku.to_string(), SkuState::decode(v.value())?));
            }
            if let Some(done) = shard {
                Self::replay_lines(&log, &done, &mut out[from..])?;
            }
            out.sort_by(|a, b| a.0.cmp(&b.0));
            Ok(out)
        })
        .await
    }

    async fn effects(&self) -> Result<Vec<Effect>, StoreError> {
        self.blocking(|db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let t = txn.open_table(OUTBOX).map_err(unavailable)?;
            let mut out = Vec::new();
            for row in t.iter().map_err(unavailable)? {
                let (_, v) = row.map_err(unavailable)?;
                row_effects(v.value(), &mut out)?;
            }
            Ok(out)
        })
        .await
    }

    async fn dead_letters(&self) -> Result<Vec<DeadLetter>, StoreError> {
        self.blocking(|db| Self::scan_json(db, DEAD_LETTERS)).await
    }

    async fn remove_dead_letters(&self, select: &(dyn Fn(&DeadLetter) -> bool + Sync)) -> Result<u64, StoreError> {
        // Pick the keys on this task (the predicate is borrowed), delete them in one transaction.
        let all: Vec<((String, u64), DeadLetter)> = self
            .blocking(|db| {
                let txn = db.begin_read().map_err(unavailable)?;
                let t = txn.open_table(DEAD_LETTERS).map_err(unavailable)?;
                let mut out = Vec::new();
                for row in t.iter().map_err(unavailable)? {
                    let (k, v) = row.map_err(unavailable)?;
                    let (shard, seq) = k.value();
                    out.push(((shard.to_string(), seq), serde_json::from_slice(v.value()).map_err(corrupt)?));
                }
                Ok(out)
            })
            .await?;
        let keys: Vec<(String, u64)> = all.into_iter().filter(|(_, d)| select(d)).map(|(k, _)| k).collect();
        let n = keys.len() as u64;
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(unavailable)?;
            {
                let mut t = txn.open_table(DEAD_LETTERS).map_err(unavailable)?;
                for (shard, seq) in &keys {
                    t.remove((shard.as_str(), *seq)).map_err(unavailable)?;
                }
            }
            txn.commit().map_err(unavailable)
        })
        .await?;
        Ok(n)
    }

    async fn shard_sku_states(&self, shard: &str) -> Result<Vec<(String, SkuState)>, StoreError> {
        let shard = shard.to_string();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let heads = txn.open_table(SKU_STATE).map_err(unavailable)?;
            let log = txn.open_table(LINE_LOG).map_err(unavailable)?;
            Ok(Self::read_states(&heads, &log, &shard)?.0)
        })
        .await
    }

    async fn checkpoints(&self) -> Result<Vec<(String, Position)>, StoreError> {
        self.blocking(|db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let t = txn.open_table(SHARD_META).map_err(unavailable)?;
            let mut out = Vec::new();
            for row in t.iter().map_err(unavailable)? {
                let (k, v) = row.map_err(unavailable)?;
                let meta: ShardMeta = postcard::from_bytes(v.value()).map_err(corrupt)?;
                if let Some(cp) = meta.checkpoint {
                    out.push((k.value().to_string(), cp));
                }
            }
            Ok(out)
        })
        .await
    }
}

/// Outbox rows are keyed by a batch number; as an [`OutboxPos`] row it is zero-padded to 20
/// digits so that string order is numeric order.
fn outbox_row(batch: u64) -> String {
    format!("{batch:020}")
}

impl OutboxStore for RedbStore {
    async fn outbox_shards(&self) -> Result<Vec<String>, StoreError> {
        self.blocking(|db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let t = txn.open_table(SHARD_META).map_err(unavailable)?;
            let mut out = Vec::new();
            for row in t.iter().map_err(unavailable)? {
                let (k, _) = row.map_err(unavailable)?;
                out.push(k.value().to_string());
            }
            Ok(out)
        })
        .await
    }

    async fn scan_outbox(
        &self,
        shard: &str,
        after: Option<&OutboxPos>,
        max: usize,
        kinds: EffectKinds,
    ) -> Result<OutboxScan, StoreError> {
        let shard = shard.to_string();
        let after = match after {
            Some(p) => {
                let batch =
                    p.row.parse::<u64>().map_err(|_| corrupt(format!("outbox position {} is not embedded", p.row)))?;
                Some((batch, p.line))
            }
            None => None,
        };
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let t = txn.open_table(OUTBOX).map_err(unavailable)?;
            let from = after.map_or(0, |(batch, _)| batch);
            let mut out = OutboxScan::default();
            for row in t.range((shard.as_str(), from)..=(shard.as_str(), u64::MAX)).map_err(unavailable)? {
                if out.scanned >= max {
                    break;
                }
                let (k, v) = row.map_err(unavailable)?;
                let batch = k.value().1;
                let skip = after.filter(|(b, _)| *b == batch).map(|(_, line)| line);
                row_entries(&outbox_row(batch), v.value(), skip, max, kinds, &mut out)?;
            }
            Ok(out)
        })
        .await
    }

    async fn cursor(&self, connector: &str, shard: &str) -> Result<Cursor, StoreError> {
        let (connector, shard) = (connector.to_string(), shard.to_string());
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let t = txn.open_table(DELIVERY).map_err(unavailable)?;
            match t.get((connector.as_str(), shard.as_str())).map_err(unavailable)? {
                Some(v) => serde_json::from_slice(v.value()).map_err(corrupt),
                None => Ok(Cursor::default()),
            }
        })
        .await
    }

    async fn save_cursor(
        &self,
        connector: &str,
        shard: &str,
        cursor: &Cursor,
        dead: Option<&ConnectorDeadLetter>,
        _fence: Option<&Fence>,
    ) -> Result<(), StoreError> {
        // One process owns the embedded store (the data directory is locked): no lease to check.
        let (connector, shard) = (connector.to_string(), shard.to_string());
        let delivered = cursor.delivered.clone();
        let cursor = serde_json::to_vec(cursor).map_err(corrupt)?;
        let dead = dead.map(|d| Ok::<_, StoreError>((d.request.key.clone(), serde_json::to_vec(d).map_err(corrupt)?)));
        let dead = dead.transpose()?;
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(unavailable)?;
            {
                let mut t = txn.open_table(DELIVERY).map_err(unavailable)?;
                let stored = t.get((connector.as_str(), shard.as_str())).map_err(unavailable)?;
                // Only its position: the in-flight request beside it is skipped, not built.
                let stored: Option<CursorPosition> =
                    stored.map(|v| serde_json::from_slice(v.value())).transpose().map_err(corrupt)?;
                if stored.is_some_and(|c| c.delivered > delivered) {
                    return Err(StoreError::CursorRegression { connector, shard });
                }
                t.insert((connector.as_str(), shard.as_str()), cursor.as_slice()).map_err(unavailable)?;
                if let Some((key, json)) = &dead {
                    let mut d = txn.open_table(CONNECTOR_DLQ).map_err(unavailable)?;
                    d.insert((connector.as_str(), shard.as_str(), key.as_str()), json.as_slice())
                        .map_err(unavailable)?;
                }
            }
            txn.commit().map_err(unavailable)
        })
        .await
    }

    async fn connector_dead_letters(&self, connector: Option<&str>) -> Result<Vec<ConnectorDeadLetter>, StoreError> {
        let connector = connector.map(str::to_string);
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let t = txn.open_table(CONNECTOR_DLQ).map_err(unavailable)?;
            let mut out = Vec::new();
            for row in t.iter().map_err(unavailable)? {
                let (k, v) = row.map_err(unavailable)?;
                if connector.as_deref().is_none_or(|c| c == k.value().0) {
                    out.push(serde_json::from_slice(v.value()).map_err(corrupt)?);
                }
            }
            Ok(out)
        })
        .await
    }

    async fn put_dead_letter(&self, dead: &ConnectorDeadLetter, _fence: Option<&Fence>) -> Result<(), StoreError> {
        let json = serde_json::to_vec(dead).map_err(corrupt)?;
        let key = (dead.connector.clone(), dead.shard.clone(), dead.request.key.clone());
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(unavailable)?;
            txn.open_table(CONNECTOR_DLQ)
                .map_err(unavailable)?
                .insert((key.0.as_str(), key.1.as_str(), key.2.as_str()), json.as_slice())
                .map_err(unavailable)?;
            txn.commit().map_err(unavailable)
        })
        .await
    }

    async fn prune_delivered(
        &self,
        shard: &str,
        through: &crate::outbox::Delivered,
        written_before_ms: i64,
    ) -> Result<u64, StoreError> {
        use crate::outbox::Delivered;
        let limit = match through {
            Delivered::Nothing => return Ok(0),
            Delivered::All => None,
            Delivered::Before(pos) => Some(
                pos.row.parse::<u64>().map_err(|_| corrupt(format!("outbox position {} is not embedded", pos.row)))?,
            ),
        };
        let shard = shard.to_string();
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(unavailable)?;
            let removed;
            {
                let meta: ShardMeta =
                    match txn.open_table(SHARD_META).map_err(unavailable)?.get(shard.as_str()).map_err(unavailable)? {
                        Some(v) => postcard::from_bytes(v.value()).map_err(corrupt)?,
                        None => return Ok(0),
                    };
                let mut bound = limit.unwrap_or(meta.next_effect).min(meta.next_effect);
                let mut written = txn.open_table(OUTBOX_WRITTEN).map_err(unavailable)?;
                // Commits are written in time order: the first too young one bounds the sweep. Rows
                // with no time before them (written by an older version) count as old.
                for row in written.range((shard.as_str(), 0)..(shard.as_str(), bound)).map_err(unavailable)? {
                    let (k, at) = row.map_err(unavailable)?;
                    if at.value() > written_before_ms {
                        bound = k.value().1;
                        break;
                    }
                }
                if bound == 0 {
                    return Ok(0);
                }
                let (mut n, mut bytes) = (0u64, 0u64);
                txn.open_table(OUTBOX)
                    .map_err(unavailable)?
                    .retain_in((shard.as_str(), 0)..(shard.as_str(), bound), |_, v| {
                        n += 1;
                        bytes += v.len() as u64;
                        false
                    })
                    .map_err(unavailable)?;
                written.retain_in((shard.as_str(), 0)..(shard.as_str(), bound), |_, _| false).map_err(unavailable)?;
                let mut meta = txn.open_table(STORE_META).map_err(unavailable)?;
                let freed = meta.get("freed_bytes").map_err(unavailable)?.map_or(0, |v| v.value());
                meta.insert("freed_bytes", freed + bytes).map_err(unavailable)?;
                removed = n;
            }
            txn.commit().map_err(unavailable)?;
            Ok(removed)
        })
        .await
    }

    async fn remove_dead_letter(
        &self,
        connector: &str,
        shard: &str,
        key: &str,
        _fence: Option<&Fence>,
    ) -> Result<(), StoreError> {
        let key = (connector.to_string(), shard.to_string(), key.to_string());
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(unavailable)?;
            txn.open_table(CONNECTOR_DLQ)
                .map_err(unavailable)?
                .remove((key.0.as_str(), key.1.as_str(), key.2.as_str()))
                .map_err(unavailable)?;
            txn.commit().map_err(unavailable)
        })
        .await
    }
}

impl BookStore for RedbStore {
    async fn committed_max_ts(&self, shard: &str) -> Result<Option<i64>, StoreError> {
        let shard = shard.to_string();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let t = txn.open_table(SHARD_META).map_err(unavailable)?;
            match t.get(shard.as_str()).map_err(unavailable)? {
                Some(v) => Ok(postcard::from_bytes::<ShardMeta>(v.value()).map_err(corrupt)?.max_ts),
                None => Ok(None),
            }
        })
        .await
    }

    async fn book_get(&self, connector: &str, key: &str) -> Result<Option<String>, StoreError> {
        let (connector, key) = (connector.to_string(), key.to_string());
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let t = txn.open_table(BOOK).map_err(unavailable)?;
            let v = t.get((connector.as_str(), key.as_str())).map_err(unavailable)?;
            v.map(|v| String::from_utf8(v.value().to_vec()).map_err(corrupt)).transpose()
        })
        .await
    }

    async fn book_range(
        &self,
        connector: &str,
        prefix: &str,
        after: Option<&str>,
        max: usize,
    ) -> Result<Vec<(String, String)>, StoreError> {
        let (connector, prefix, after) = (connector.to_string(), prefix.to_string(), after.map(str::to_string));
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let t = txn.open_table(BOOK).map_err(unavailable)?;
            let from = after.as_deref().filter(|a| *a >= prefix.as_str()).unwrap_or(prefix.as_str());
            let mut out = Vec::new();
            for row in t.range((connector.as_str(), from)..).map_err(unavailable)? {
                let (k, v) = row.map_err(unavailable)?;
                let (c, key) = k.value();
                if c != connector || !key.starts_with(prefix.as_str()) || out.len() >= max {
                    break;
                }
                if after.as_deref().is_some_and(|a| key <= a) {
                    continue;
                }
                out.push((key.to_string(), String::from_utf8(v.value().to_vec()).map_err(corrupt)?));
            }
            Ok(out)
        })
        .await
    }

    async fn book_write(
        &self,
        connector: &str,
        writes: &[BookWrite],
        cursor: Option<CursorWrite<'_>>,
        _fence: Option<&Fence>,
    ) -> Result<(), StoreError> {
        // One process owns the embedded store: no lease to check (as in `save_cursor`).
        let connector = connector.to_string();
        let writes = writes.to_vec();
        let cursor = cursor
            .map(|c| {
                Ok::<_, StoreError>((
                    c.shard.to_string(),
                    c.cursor.delivered.clone(),
                    serde_json::to_vec(c.cursor).map_err(corrupt)?,
                ))
            })
            .transpose()?;
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(unavailable)?;
            {
                let mut t = txn.open_table(BOOK).map_err(unavailable)?;
                for w in &writes {
                    let stored =
                        t.get((connector.as_str(), w.key.as_str())).map_err(unavailable)?.map(|v| v.value().to_vec());
                    let ok = match &w.expect {
                        Expect::Any => true,
                        Expect::Absent => stored.is_none(),
                        Expect::Equals(old) => stored.as_deref() == Some(old.as_bytes()),
                    };
                    if !ok {
                        // Dropping the transaction aborts it: nothing of this write lands.
                        return Err(StoreError::Conflict { key: w.key.clone() });
                    }
                    match &w.value {
                        Some(v) => {
                            t.insert((connector.as_str(), w.key.as_str()), v.as_bytes()).map_err(unavailable)?;
                        }
                        None => {
                            t.remove((connector.as_str(), w.key.as_str())).map_err(unavailable)?;
                        }
                    }
                }
                if let Some((shard, delivered, json)) = &cursor {
                    let mut d = txn.open_table(DELIVERY).map_err(unavailable)?;
                    let stored = d.get((connector.as_str(), shard.as_str())).map_err(unavailable)?;
                    let stored: Option<Cursor> =
                        stored.map(|v| serde_json::from_slice(v.value())).transpose().map_err(corrupt)?;
                    if stored.is_some_and(|c| c.delivered > *delivered) {
                        return Err(StoreError::CursorRegression { connector, shard: shard.clone() });
                    }
                    d.insert((connector.as_str(), shard.as_str()), json.as_slice()).map_err(unavailable)?;
                }
            }
            txn.commit().map_err(unavailable)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::{Line, line_key};

    /// A store as stockflow wrote it before the line log: states with their lines inside, no
    /// `layout`. Opening it moves the lines to the log once; loads read them whole.
    #[tokio::test]
    async fn opening_a_store_written_before_the_line_log_moves_the_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let mut state = SkuState { on_hand: 5, reserved: 2, ..SkuState::default() };
        state.lines.insert(line_key("open"), Line { remaining: 2, shipped: 0, closed_ts: 0 });
        state.lines.insert(line_key("closed"), Line { remaining: 0, shipped: 3, closed_ts: 1_795_773_600_000 });
        {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            let mut heads = txn.open_table(SKU_STATE).unwrap();
            heads.insert(("s", "A"), state.encode().unwrap().as_slice()).unwrap();
            // A second shard: each shard's lines go to its own log.
            heads.insert(("t", "B"), state.encode().unwrap().as_slice()).unwrap();
            drop(heads);
            txn.commit().unwrap();
        }
        let store = RedbStore::open(&path).unwrap();
        let loaded = store.load_shard("s").await.unwrap();
        assert_eq!(loaded.snapshot.skus, vec![("A".to_string(), state.clone())]);
        assert!(loaded.lines_log_bytes > 0, "the lines are in the log");
        let other = store.load_shard("t").await.unwrap();
        assert_eq!(other.snapshot.skus, vec![("B".to_string(), state.clone())]);
        assert!(other.lines_log_bytes > 0, "shard t's lines are in its own log");
        {
            let txn = store.db.begin_read().unwrap();
            let heads = txn.open_table(SKU_STATE).unwrap();
            assert!(SkuState::lines_apart(heads.get(("s", "A")).unwrap().unwrap().value()));
            let meta = txn.open_table(STORE_META).unwrap();
            assert_eq!(meta.get("layout").unwrap().map(|v| v.value()), Some(LAYOUT_LINES_APART));
        }
        drop(store);
        // Opened again: nothing to move, the same states.
        let store = RedbStore::open(&path).unwrap();
        assert_eq!(store.sku_states().await.unwrap(), vec![("A".to_string(), state.clone()), ("B".to_string(), state)]);
    }

    #[tokio::test]
    async fn dedup_rows_of_32_byte_entries_are_restored_beside_versioned_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let old = DedupEntry { key: 11, ts: 1_000, sku: sku_id("A") };
        let new = DedupEntry { key: 12, ts: 2_000, sku: sku_id("A") };
        {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            let mut dedup = txn.open_table(DEDUP).unwrap();
            let mut legacy = Vec::new();
            legacy.extend_from_slice(&u128::from(old.key).to_le_bytes());
            legacy.extend_from_slice(&old.ts.to_le_bytes());
            legacy.extend_from_slice(&old.sku.to_le_bytes());
            dedup.insert(("s", 0), legacy.as_slice()).unwrap();
            let mut entries = Vec::new();
            new.encode_into(&mut entries);
            dedup.insert(("s", 1), DedupEntry::row(&entries).as_slice()).unwrap();
            drop(dedup);
            txn.commit().unwrap();
        }
        let store = RedbStore::open(&path).unwrap();
        assert_eq!(store.load_shard("s").await.unwrap().snapshot.dedup, vec![old, new]);
    }

    #[tokio::test]
    async fn outbox_rows_written_as_json_lines_are_read_beside_binary_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let effects = crate::effects::tests::one_of_each();
        {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            let mut outbox = txn.open_table(OUTBOX).unwrap();
            // Row 0 as an older version wrote it; row 1 in the binary encoding.
            let mut json = Vec::new();
            for e in &effects[..3] {
                json.extend_from_slice(&serde_json::to_vec(e).unwrap());
                json.push(b'\n');
            }
            outbox.insert(("s", 0), json.as_slice()).unwrap();
            let mut binary = Vec::new();
            for e in &effects[3..] {
                push_effect(&mut binary, e);
            }
            outbox.insert(("s", 1), binary.as_slice()).unwrap();
            drop(outbox);
            txn.commit().unwrap();
        }
        let store = RedbStore::open(&path).unwrap();
        assert_eq!(store.effects().await.unwrap(), effects);
        let all = store.read_outbox("s", None, 100).await.unwrap();
        let at = |row: u64, line: u32| OutboxPos { row: outbox_row(row).into(), line };
        let positions: Vec<OutboxPos> = all.iter().map(|e| e.pos.clone()).collect();
        assert_eq!(positions, vec![at(0, 0), at(0, 1), at(0, 2), at(1, 0), at(1, 1)]);
        assert_eq!(all.into_iter().map(|e| e.effect).collect::<Vec<_>>(), effects);
        // From a position inside either row, and with a page size that ends inside one.
        let after = store.read_outbox("s", Some(&at(0, 1)), 2).await.unwrap();
        assert_eq!(after.iter().map(|e| e.pos.clone()).collect::<Vec<_>>(), vec![at(0, 2), at(1, 0)]);
        let last = store.read_outbox("s", Some(&at(1, 0)), 100).await.unwrap();
        assert_eq!(last.into_iter().map(|e| e.effect).collect::<Vec<_>>(), effects[4..].to_vec());

        // A scan for some kinds goes over every effect, JSON or binary, and keeps those.
        for kind in effects.iter().map(Effect::kind) {
            let want: Vec<&Effect> = effects.iter().filter(|e| e.kind() == kind).collect();
            let scan = store.scan_outbox("s", None, 100, EffectKinds::of(kind)).await.unwrap();
            assert_eq!(scan.entries.iter().map(|e| &e.effect).collect::<Vec<_>>(), want, "{kind:?}");
            assert_eq!((scan.scanned, scan.through.clone()), (5, Some(at(1, 1))), "{kind:?}");
        }
        let alerts = store.scan_outbox("s", Some(&at(0, 0)), 3, EffectKinds::ALERTS).await.unwrap();
        assert_eq!((alerts.scanned, alerts.through), (3, Some(at(1, 0))), "at most 3 gone over");
        assert!(alerts.entries.iter().all(|e| e.effect.is_alert() && e.pos > at(0, 0)));
        let none = store.scan_outbox("s", Some(&at(1, 1)), 100, EffectKinds::ALL).await.unwrap();
        assert_eq!(none, OutboxScan::default(), "nothing after the last effect");
    }
}
