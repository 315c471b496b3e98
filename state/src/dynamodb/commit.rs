//! Fenced, split, idempotent commits (docs/state.md, "Commit").
//!
//! Parts, in order, each one `TransactWriteItems` of at most 100 items and ~3.8 MB:
//! 1. SKU groups: a dirty SKU's state items (the blob split in ≤ 350 KB parts, part 0 carrying
//!    `shard`, `pos` = this commit's checkpoint and `parts`) together with the effects it produced
//!    (a blob of binary effects per part, keyed `{checkpoint}#{part}#{chunk}`) and, for a SKU new to the
//!    shard, its name in the part's `-shard-skus` item. A SKU, its effects and its listing are
//!    never split across transactions.
//! 2. Dead letters (keyed by position: a re-write is the same item) and dedup chunks.
//! 3. Last: the lease item's checkpoint, conditioned on the epoch and on moving forward.
//!
//! Every part but the last carries a `ConditionCheck` on the lease epoch, so a worker whose lease
//! was taken cannot write anything. A crash between parts leaves SKU items whose `pos` is past the
//! stored checkpoint; on restore (which lists the shard's SKUs from `-shard-skus` and reads their
//! items, all consistently — never from an index) they become "floors": the replay skips those
//! SKUs' events up to their `pos`, and does not commit until it is past every floor, so no effect
//! is written twice.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};

use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{AttributeValue, ConditionCheck, Delete, Put, TransactWriteItem, Update};

use super::{DynamoStore, Item, MAX_PART_BYTES, b, position_key, sdk_error};
use crate::engine::DedupDelta;
use crate::store::{ShardCommit, StoreError};

const MAX_ITEMS: usize = 100;
const MAX_TX_BYTES: usize = 3_800_000;
/// Per-item overhead counted on top of the data (names, keys).
const ITEM_OVERHEAD: usize = 100;

fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}

fn n(v: impl ToString) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

fn put(table: &str, item: Item) -> Result<TransactWriteItem, StoreError> {
    Ok(TransactWriteItem::builder()
        .put(Put::builder().table_name(table).set_item(Some(item)).build().map_err(sdk_error)?)
        .build())
}

struct Parts<'a> {
    store: &'a DynamoStore,
    commit: &'a ShardCommit,
    /// Prefix of this commit's row keys: the checkpoint key, plus `#r{epoch}` for a commit at the
    /// checkpoint of an interrupted one (its rows sort after, and never overwrite, the stored parts).
    row_prefix: String,
    parts: Vec<Vec<TransactWriteItem>>,
    items: Vec<TransactWriteItem>,
    bytes: usize,
    effects: Vec<u8>,
    /// SKUs new to the shard whose state is in the current part.
    listed: Vec<String>,
    part_no: usize,
}

impl<'a> Parts<'a> {
    fn blob_items(bytes: usize) -> usize {
        bytes.div_ceil(MAX_PART_BYTES)
    }

    /// Room for `items` more items and `bytes` more bytes, plus `effects` more effect bytes?
    fn has_room(&self, items: usize, bytes: usize, effects: usize) -> bool {
        // One slot stays free for the lease condition, one for the listing if the part has one.
        let listing = usize::from(!self.listed.is_empty());
        self.items.len() + items + Self::blob_items(self.effects.len() + effects) + listing < MAX_ITEMS
            && self.bytes + bytes + self.effects.len() + effects <= MAX_TX_BYTES
    }

    fn condition(&self) -> Result<TransactWriteItem, StoreError> {
        let check = ConditionCheck::builder()
            .table_name(&self.store.tables.leases)
            .key("leaseKey", s(&self.commit.shard))
            .condition_expression("leaseEpoch = :e")
            .expression_attribute_values(":e", n(self.commit.lease_epoch))
            .build()
            .map_err(sdk_error)?;
        Ok(TransactWriteItem::builder().condition_check(check).build())
    }

    /// The current part's items: what was added, its effects blob and its SKU listing.
    fn take_part(&mut self) -> Result<Vec<TransactWriteItem>, StoreError> {
        let effects = std::mem::take(&mut self.effects);
        for (chunk_no, chunk) in effects.chunks(MAX_PART_BYTES).enumerate() {
            // Cut at line ends is unnecessary: chunks are re-joined in key order before parsing.
            let seq = format!("{}#{:04}#{chunk_no:03}", self.row_prefix, self.part_no);
            let item = HashMap::from([
                ("shard".to_string(), s(&self.commit.shard)),
                ("seq".to_string(), s(seq)),
                ("data".to_string(), b(chunk.to_vec())),
                // When it was written: retention of delivered rows counts from here.
                ("at".to_string(), n(crate::now_ms())),
            ]);
            self.items.push(put(&self.store.tables.outbox, item)?);
        }
        let listed = std::mem::take(&mut self.listed);
        if !listed.is_empty() {
            let json = serde_json::to_string(&listed).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            let item = HashMap::from([
                ("shard".to_string(), s(&self.commit.shard)),
                ("chunk".to_string(), s(format!("{}#{:04}", self.row_prefix, self.part_no))),
                ("skus".to_string(), s(json)),
            ]);
            self.items.push(put(&self.store.tables.shard_skus, item)?);
        }
        self.bytes = 0;
        self.part_no += 1;
        Ok(std::mem::take(&mut self.items))
    }

    /// Closes the current part (effects blob, listing, the lease condition).
    fn flush(&mut self) -> Result<(), StoreError> {
        if self.items.is_empty() && self.effects.is_empty() && self.listed.is_empty() {
            return Ok(());
        }
        let mut items = self.take_part()?;
        items.push(self.condition()?);
        self.parts.push(items);
        Ok(())
    }

    fn add(&mut self, item: TransactWriteItem, bytes: usize) -> Result<(), StoreError> {
        if !self.has_room(1, bytes + ITEM_OVERHEAD, 0) {
            self.flush()?;
        }
        self.items.push(item);
        self.bytes += bytes + ITEM_OVERHEAD;
        Ok(())
    }
}

/// Splits a commit into transactions and writes them in order.
pub(super) async fn commit(store: &DynamoStore, c: &ShardCommit) -> Result<(), StoreError> {
    let t = &store.tables;
    if c.lines.is_some() {
        // Workers only send line changes to stores that keep lines apart.
        return Err(StoreError::Corrupt("a commit with order lines apart: DynamoDB stores whole SKU states".into()));
    }
    let cp_key = position_key(&c.checkpoint);
    let mut by_sku: HashMap<&str, Vec<u8>> = HashMap::new();
    for e in &c.effects {
        let buf = by_sku.entry(e.sku()).or_default();
        crate::effects::codec::push_effect(buf, e);
    }
    let mut parts = Parts {
        store,
        commit: c,
        row_prefix: if c.after_interrupted { format!("{cp_key}#r{:020}", c.lease_epoch) } else { cp_key.clone() },
        parts: Vec::new(),
        items: Vec::new(),
        bytes: 0,
        effects: Vec::new(),
        listed: Vec::new(),
        part_no: 0,
    };
    let new: std::collections::HashSet<&str> = c.new_skus.iter().map(String::as_str).collect();

    for (sku, state) in &c.states {
        let slices: Vec<&[u8]> = if state.is_empty() { vec![&[][..]] } else { state.chunks(MAX_PART_BYTES).collect() };
        let effects = by_sku.remove(sku).unwrap_or_default();
        let is_new = new.contains(sku);
        let bytes = state.len() + slices.len() * ITEM_OVERHEAD + if is_new { sku.len() + 3 } else { 0 };
        // The listing item (if the part has none yet) takes a slot.
        let listing = usize::from(is_new && parts.listed.is_empty());
        if slices.len() + Parts::blob_items(effects.len()) + 2 > MAX_ITEMS || bytes + effects.len() > MAX_TX_BYTES {
            return Err(StoreError::Corrupt(format!(
                "SKU {sku}: state of {} bytes and {} bytes of effects exceed one transaction",
                state.len(),
                effects.len()
            )));
        }
        if !parts.has_room(slices.len() + listing, bytes, effects.len()) {
            parts.flush()?;
        }
        if is_new {
            parts.listed.push(sku.to_string());
        }
        for (i, slice) in slices.iter().enumerate() {
            let mut item = HashMap::from([
                ("sku".to_string(), s(sku)),
                ("part".to_string(), n(i)),
                ("data".to_string(), b(slice.to_vec())),
            ]);
            if i == 0 {
                item.insert("shard".into(), s(&c.shard));
                item.insert("pos".into(), s(&cp_key));
                item.insert("parts".into(), n(slices.len()));
            }
            parts.items.push(put(&t.sku_state, item)?);
        }
        parts.bytes += bytes;
        parts.effects.extend_from_slice(&effects);
    }
    if let Some((sku, _)) = by_sku.into_iter().next() {
        return Err(StoreError::Corrupt(format!("effects for SKU {sku}, which the commit does not carry")));
    }

    for dl in &c.dead_letters {
        let json = serde_json::to_string(dl).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let len = json.len();
        let item = HashMap::from([
            ("shard".to_string(), s(&c.shard)),
            ("pos".to_string(), s(position_key(&dl.position))),
            ("data".to_string(), s(json)),
        ]);
        parts.add(put(&t.dead_letters, item)?, len)?;
    }

    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
    // Rounded up: never earlier than the worker's own estimate (write time + TTL).
    let expires = (now + u128::from(store.dedup_ttl_ms)).div_ceil(1000);
    let (dedup_bytes, replace) = match &c.dedup {
        DedupDelta::Append(bytes) => (bytes, false),
        DedupDelta::Replace(bytes) => (bytes, true),
    };
    // Whole entries per chunk, after the row's version byte.
    let per_chunk = (MAX_PART_BYTES - 1) / crate::dedup::ENTRY_BYTES * crate::dedup::ENTRY_BYTES;
    for (i, chunk) in dedup_bytes.chunks(per_chunk).enumerate() {
        let row = crate::dedup::DedupEntry::row(chunk);
        let len = row.len();
        let item = HashMap::from([
            ("shard".to_string(), s(&c.shard)),
            ("chunk".to_string(), s(format!("{}#{i:05}", parts.row_prefix))),
            ("data".to_string(), b(row)),
            ("expires_at".to_string(), n(expires)),
        ]);
        parts.add(put(&t.dedup, item)?, len)?;
    }
    if replace {
        // The new chunks are written (above, in earlier or this part) before the old ones go.
        let q = store
            .client
            .query()
            .table_name(&t.dedup)
            .key_condition_expression("#s = :s AND #c < :c")
            .expression_attribute_names("#s", "shard")
            .expression_attribute_names("#c", "chunk")
            .expression_attribute_values(":s", s(&c.shard))
            .expression_attribute_values(":c", s(format!("{cp_key}#")))
            .projection_expression("#s, #c");
        for old in store.query_all(q).await? {
            let del = Delete::builder().table_name(&t.dedup).set_key(Some(old)).build().map_err(sdk_error)?;
            parts.add(TransactWriteItem::builder().delete(del).build(), 0)?;
        }
    }

    // The checkpoint, last: it may share the final part, but not with a ConditionCheck on the
    // same item, so the final part carries the condition in the update itself.
    if !parts.has_room(1, ITEM_OVERHEAD, 0) {
        parts.flush()?;
    }
    let mut last = parts.take_part()?;
    // `committedAt` and `lagMs` are for operators (`stockflow group status`).
    let mut expr = String::from(
        "SET checkpoint = :seq, checkpointSubSequenceNumber = :sub, checkpointKey = :cp, \
         ownerSwitchesSinceCheckpoint = :zero, committedAt = :now",
    );
    let mut update = Update::builder()
        .table_name(&t.leases)
        .key("leaseKey", s(&c.shard))
        .condition_expression(if c.keep_checkpoint {
            "leaseEpoch = :e AND checkpointKey = :cp"
        } else {
            "leaseEpoch = :e AND (attribute_not_exists(checkpointKey) OR checkpointKey < :cp)"
        })
        .expression_attribute_values(":seq", s(&c.checkpoint.sequence))
        .expression_attribute_values(":sub", n(c.checkpoint.sub))
        .expression_attribute_values(":cp", s(&cp_key))
        .expression_attribute_values(":zero", n(0))
        .expression_attribute_values(":now", n(now))
        .expression_attribute_values(":e", n(c.lease_epoch));
    if let Some(ts) = c.max_ts {
        expr.push_str(", maxTs = :ts");
        update = update.expression_attribute_values(":ts", n(ts));
    }
    if let Some(lag) = c.lag_ms {
        expr.push_str(", lagMs = :lag");
        update = update.expression_attribute_values(":lag", n(lag));
    }
    update = update.update_expression(expr);
    last.push(TransactWriteItem::builder().update(update.build().map_err(sdk_error)?).build());
    parts.parts.push(last);

    let fail_after = store.faults.take();
    let count = parts.parts.len();
    for (i, items) in parts.parts.into_iter().enumerate() {
        if fail_after == Some(i) {
            return Err(StoreError::Unavailable(format!("injected crash after {i} of {count} parts")));
        }
        let is_last = i + 1 == count;
        let written = items.iter().filter(|it| it.condition_check().is_none()).count();
        let bytes: usize = items.iter().map(item_bytes).sum();
        store.stats.transactions.fetch_add(1, Ordering::Relaxed);
        store.stats.items.fetch_add(written as u64, Ordering::Relaxed);
        store.stats.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        let result = store.client.transact_write_items().set_transact_items(Some(items)).send().await;
        if let Err(e) = result {
            let condition_failed = match e.as_service_error() {
                Some(TransactWriteItemsError::TransactionCanceledException(ex)) => {
                    ex.cancellation_reasons().iter().any(|r| r.code() == Some("ConditionalCheckFailed"))
                }
                _ => false,
            };
            if !condition_failed {
                return Err(sdk_error(e));
            }
            return Err(classify_refusal(store, c, is_last).await);
        }
    }
    Ok(())
}

/// A condition failed: was the lease taken (fenced), or the checkpoint not moving forward?
async fn classify_refusal(store: &DynamoStore, c: &ShardCommit, is_last: bool) -> StoreError {
    let fenced = StoreError::Fenced { shard: c.shard.clone(), epoch: c.lease_epoch };
    if !is_last {
        return fenced;
    }
    match store.lease_item(&c.shard).await {
        Ok(Some(lease)) => {
            let epoch = lease.get("leaseEpoch").and_then(|v| v.as_n().ok()).and_then(|n| n.parse::<u64>().ok());
            let stored =
                lease.get("checkpointKey").and_then(|v| v.as_s().ok()).and_then(|k| super::parse_position_key(k));
            match (epoch, stored) {
                (Some(e), Some(stored)) if e == c.lease_epoch => {
                    StoreError::CheckpointRegression { shard: c.shard.clone(), stored, new: c.checkpoint.clone() }
                }
                _ => fenced,
            }
        }
        Ok(None) => fenced,
        Err(e) => e,
    }
}

fn item_bytes(it: &TransactWriteItem) -> usize {
    let size = |item: &Item| -> usize {
        item.iter()
            .map(|(k, v)| {
                k.len()
                    + match v {
                        AttributeValue::B(b) => b.as_ref().len(),
                        AttributeValue::S(s) => s.len(),
                        AttributeValue::N(n) => n.len(),
                        _ => 8,
                    }
            })
            .sum()
    };
    it.put().map(|p| size(p.item())).unwrap_or(0) + it.update().map(|_| 120).unwrap_or(0)
}
