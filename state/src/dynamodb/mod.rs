//! `DynamoStore`: the state store of the AWS deployment (DynamoDB), shared by the processes of a
//! consumer group. Schema, item sizes and access patterns: `docs/state.md`.
//!
//! - [`schema`]: table names, `setup` (create/validate, idempotent).
//! - [`commit`]: fenced, split, idempotent commits.
//! - `delivery`: the outbox as connectors read it, delivery cursors, connector dead letters.
//! - this file: the client, loading a shard, the dumps, leases' fencing epoch.
//!
//! A commit larger than one `TransactWriteItems` (100 items, 4 MB) is split into parts, each
//! fenced by a `ConditionCheck` on the shard's lease epoch; every SKU item records the position
//! it reflects, so after a crash between parts a replay skips what is already in it; the
//! checkpoint is written last, conditioned on the epoch and on moving forward.

mod commit;
mod delivery;
mod leases;
pub mod schema;
pub mod testing;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::primitives::Blob;
use aws_sdk_dynamodb::types::{AttributeValue, KeysAndAttributes};

pub use schema::{TableNames, TableOutcome, setup};

use crate::dedup::DedupEntry;
use crate::effects::Effect;
use crate::engine::ShardSnapshot;
use crate::ledger::SkuState;
use crate::store::{DeadLetter, Position, ShardCommit, StateStore, StoreError, StoredShard};

/// Largest slice of a blob stored in one item (DynamoDB items are at most 400 KB).
pub const MAX_PART_BYTES: usize = 350_000;

pub(crate) type Item = HashMap<String, AttributeValue>;

pub(crate) fn sdk_error(e: impl std::fmt::Display + std::fmt::Debug) -> StoreError {
    StoreError::Unavailable(format!("{e}: {e:?}"))
}

/// A sortable key for a position: 64 digits, zero-padded, then the sub-sequence number.
pub fn position_key(p: &Position) -> String {
    let digits = p.sequence.trim_start_matches('0');
    format!("{digits:0>64}:{:020}", p.sub)
}

pub(crate) fn parse_position_key(key: &str) -> Option<Position> {
    let (seq, sub) = key.split_once(':')?;
    let trimmed = seq.trim_start_matches('0');
    Some(Position { sequence: if trimmed.is_empty() { "0".into() } else { trimmed.into() }, sub: sub.parse().ok()? })
}

/// Calls, items and bytes written (for the cost figures in docs/BENCHMARKS.md).
#[derive(Debug, Default)]
pub struct WriteStats {
    /// `TransactWriteItems` calls.
    pub transactions: AtomicU64,
    /// Items put, updated or deleted (condition checks excluded).
    pub items: AtomicU64,
    /// Bytes of attribute values written.
    pub bytes: AtomicU64,
    /// Read calls (Query, BatchGetItem, GetItem, Scan).
    pub reads: AtomicU64,
    /// Lease-table writes (create, take, renew, release, end).
    pub lease_calls: AtomicU64,
    /// Of which heartbeats.
    pub lease_renewals: AtomicU64,
    /// Lease-table scans (each may page).
    pub lease_scans: AtomicU64,
}

/// Fault injection for tests: fail a commit after this many of its transactions succeeded, once.
#[derive(Debug, Default)]
pub struct FaultPlan {
    fail_after_parts: AtomicUsize,
}

impl FaultPlan {
    /// The next commit fails (as if the process died) after `parts` transactions.
    pub fn fail_next_commit_after(&self, parts: usize) {
        self.fail_after_parts.store(parts + 1, Ordering::SeqCst);
    }

    fn take(&self) -> Option<usize> {
        match self.fail_after_parts.swap(0, Ordering::SeqCst) {
            0 => None,
            n => Some(n - 1),
        }
    }
}

/// The DynamoDB state store.
#[derive(Debug, Clone)]
pub struct DynamoStore {
    client: Client,
    tables: Arc<TableNames>,
    stats: Arc<WriteStats>,
    faults: Arc<FaultPlan>,
    /// TTL of dedup chunks past their write, seconds (a safety net; compaction removes them).
    dedup_ttl_secs: u64,
}

/// Loading strategy of a shard's SKUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadMode {
    /// GSI query of the shard's SKUs, then `BatchGetItem` 100 keys at a time.
    Bulk,
    /// One `GetItem` per SKU (what a lazy, per-SKU load costs).
    PerSku,
}

impl DynamoStore {
    /// A store over `client` with tables named from `prefix`.
    pub fn new(client: Client, prefix: &str) -> Self {
        DynamoStore {
            client,
            tables: Arc::new(TableNames::with_prefix(prefix)),
            stats: Arc::default(),
            faults: Arc::default(),
            dedup_ttl_secs: Self::dedup_ttl_for(crate::engine::DEFAULT_DEDUP_HORIZON_MS),
        }
    }

    /// Dedup chunks expire (DynamoDB TTL, wall clock) the horizon plus 3 days after their write.
    fn dedup_ttl_for(horizon_ms: i64) -> u64 {
        u64::try_from(horizon_ms / 1000).unwrap_or(0).saturating_add(3 * 24 * 3600)
    }

    /// The same store, with dedup chunks kept for `horizon_ms` of dedup horizon (plus 3 days).
    pub fn with_dedup_horizon(mut self, horizon_ms: i64) -> Self {
        self.dedup_ttl_secs = Self::dedup_ttl_for(horizon_ms);
        self
    }

    /// A client from the environment's AWS configuration, with an optional endpoint override
    /// (e.g. `http://127.0.0.1:5001` for moto).
    pub async fn client(endpoint: Option<&str>) -> Client {
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
        if let Some(url) = endpoint {
            loader = loader.endpoint_url(url);
        }
        Client::new(&loader.load().await)
    }

    /// A client for a local emulator (moto, dynalite): static credentials `test/test`, region
    /// `us-east-1`, the given endpoint. Never for AWS.
    pub async fn emulator_client(endpoint: &str) -> Client {
        let conf = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new("us-east-1"))
            .credentials_provider(aws_sdk_dynamodb::config::Credentials::new("test", "test", None, None, "emulator"))
            .endpoint_url(endpoint)
            .load()
            .await;
        Client::new(&conf)
    }

    /// The table names.
    pub fn tables(&self) -> &TableNames {
        &self.tables
    }

    /// The DynamoDB client.
    pub fn dynamodb(&self) -> &Client {
        &self.client
    }

    /// Write and read counters.
    pub fn stats(&self) -> &WriteStats {
        &self.stats
    }

    /// Fault injection (tests).
    pub fn faults(&self) -> &FaultPlan {
        &self.faults
    }

    /// Creates or validates the tables.
    pub async fn setup(&self) -> Result<Vec<TableOutcome>, StoreError> {
        setup(&self.client, &self.tables).await
    }

    /// Takes the lease of `shard` for `owner`: creates it, or moves it to `owner` with a new
    /// epoch. Returns the epoch every commit of this owner must carry. (The lease coordinator
    /// decides *when* to take a lease; this is the fenced write it uses.)
    pub async fn take_lease(&self, shard: &str, owner: &str) -> Result<u64, StoreError> {
        let out = self
            .client
            .update_item()
            .table_name(&self.tables.leases)
            .key("leaseKey", AttributeValue::S(shard.into()))
            .update_expression(
                "SET leaseOwner = :o, leaseEpoch = if_not_exists(leaseEpoch, :zero) + :one, \
                 leaseCounter = if_not_exists(leaseCounter, :zero) + :one, \
                 ownerSwitchesSinceCheckpoint = if_not_exists(ownerSwitchesSinceCheckpoint, :zero) + :one",
            )
            .expression_attribute_values(":o", AttributeValue::S(owner.into()))
            .expression_attribute_values(":zero", AttributeValue::N("0".into()))
            .expression_attribute_values(":one", AttributeValue::N("1".into()))
            .return_values(aws_sdk_dynamodb::types::ReturnValue::UpdatedNew)
            .send()
            .await
            .map_err(sdk_error)?;
        self.stats.items.fetch_add(1, Ordering::Relaxed);
        out.attributes()
            .and_then(|a| a.get("leaseEpoch"))
            .and_then(|v| v.as_n().ok())
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| StoreError::Corrupt(format!("lease {shard}: no leaseEpoch after update")))
    }

    async fn lease_item(&self, shard: &str) -> Result<Option<Item>, StoreError> {
        self.stats.reads.fetch_add(1, Ordering::Relaxed);
        let out = self
            .client
            .get_item()
            .table_name(&self.tables.leases)
            .key("leaseKey", AttributeValue::S(shard.into()))
            .consistent_read(true)
            .send()
            .await
            .map_err(sdk_error)?;
        Ok(out.item().cloned())
    }

    pub(crate) async fn query_all(
        &self,
        mut query: aws_sdk_dynamodb::operation::query::builders::QueryFluentBuilder,
    ) -> Result<Vec<Item>, StoreError> {
        let mut items = Vec::new();
        loop {
            self.stats.reads.fetch_add(1, Ordering::Relaxed);
            let out = query.clone().send().await.map_err(sdk_error)?;
            items.extend(out.items().iter().cloned());
            match out.last_evaluated_key() {
                Some(k) if !k.is_empty() => query = query.set_exclusive_start_key(Some(k.clone())),
                _ => return Ok(items),
            }
        }
    }

    pub(crate) async fn scan_all(&self, table: &str) -> Result<Vec<Item>, StoreError> {
        let mut items = Vec::new();
        let mut start = None;
        loop {
            self.stats.reads.fetch_add(1, Ordering::Relaxed);
            let out = self
                .client
                .scan()
                .table_name(table)
                .consistent_read(true)
                .set_exclusive_start_key(start)
                .send()
                .await
                .map_err(sdk_error)?;
            items.extend(out.items().iter().cloned());
            match out.last_evaluated_key() {
                Some(k) if !k.is_empty() => start = Some(k.clone()),
                _ => return Ok(items),
            }
        }
    }

    /// The SKUs of a shard with their part counts and positions (GSI query).
    async fn shard_skus(&self, shard: &str) -> Result<Vec<(String, u32, Option<Position>)>, StoreError> {
        let q = self
            .client
            .query()
            .table_name(&self.tables.sku_state)
            .index_name(schema::BY_SHARD_INDEX)
            .key_condition_expression("#s = :s")
            .expression_attribute_names("#s", "shard")
            .expression_attribute_values(":s", AttributeValue::S(shard.into()));
        let items = self.query_all(q).await?;
        Ok(items
            .iter()
            .filter_map(|i| {
                let sku = i.get("sku")?.as_s().ok()?.clone();
                let parts = i.get("parts").and_then(|v| v.as_n().ok()).and_then(|n| n.parse().ok()).unwrap_or(1);
                let pos = i.get("pos").and_then(|v| v.as_s().ok()).and_then(|s| parse_position_key(s));
                Some((sku, parts, pos))
            })
            .collect())
    }

    /// Loads SKU states by key: `(sku, parts)` pairs.
    pub async fn load_skus(
        &self,
        skus: &[(String, u32)],
        mode: LoadMode,
    ) -> Result<Vec<(String, SkuState)>, StoreError> {
        let keys: Vec<Item> = skus
            .iter()
            .flat_map(|(sku, parts)| {
                (0..*parts).map(move |p| {
                    HashMap::from([
                        ("sku".to_string(), AttributeValue::S(sku.clone())),
                        ("part".to_string(), AttributeValue::N(p.to_string())),
                    ])
                })
            })
            .collect();
        let mut items = Vec::with_capacity(keys.len());
        match mode {
            LoadMode::PerSku => {
                for key in keys {
                    self.stats.reads.fetch_add(1, Ordering::Relaxed);
                    let out = self
                        .client
                        .get_item()
                        .table_name(&self.tables.sku_state)
                        .set_key(Some(key))
                        .consistent_read(true)
                        .send()
                        .await
                        .map_err(sdk_error)?;
                    items.extend(out.item().cloned());
                }
            }
            LoadMode::Bulk => {
                for chunk in keys.chunks(100) {
                    let mut pending = chunk.to_vec();
                    while !pending.is_empty() {
                        self.stats.reads.fetch_add(1, Ordering::Relaxed);
                        let req = KeysAndAttributes::builder()
                            .set_keys(Some(pending))
                            .consistent_read(true)
                            .build()
                            .map_err(sdk_error)?;
                        let out = self
                            .client
                            .batch_get_item()
                            .request_items(&self.tables.sku_state, req)
                            .send()
                            .await
                            .map_err(sdk_error)?;
                        if let Some(rows) = out.responses().and_then(|r| r.get(&self.tables.sku_state)) {
                            items.extend(rows.iter().cloned());
                        }
                        pending = out
                            .unprocessed_keys()
                            .and_then(|u| u.get(&self.tables.sku_state))
                            .map(|k| k.keys().to_vec())
                            .unwrap_or_default();
                    }
                }
            }
        }
        assemble_states(items)
    }
}

/// Joins the parts of each SKU's state blob and decodes it.
fn assemble_states(items: Vec<Item>) -> Result<Vec<(String, SkuState)>, StoreError> {
    let mut parts: HashMap<String, Vec<(u32, Vec<u8>)>> = HashMap::new();
    let mut expected: HashMap<String, u32> = HashMap::new();
    for item in items {
        let sku = item
            .get("sku")
            .and_then(|v| v.as_s().ok())
            .cloned()
            .ok_or_else(|| StoreError::Corrupt("SKU item without sku".into()))?;
        let part: u32 = item.get("part").and_then(|v| v.as_n().ok()).and_then(|n| n.parse().ok()).unwrap_or(0);
        if part == 0 {
            let n = item.get("parts").and_then(|v| v.as_n().ok()).and_then(|n| n.parse().ok()).unwrap_or(1);
            expected.insert(sku.clone(), n);
        }
        let data = item.get("data").and_then(|v| v.as_b().ok()).map(|b| b.as_ref().to_vec()).unwrap_or_default();
        parts.entry(sku).or_default().push((part, data));
    }
    let mut out = Vec::with_capacity(parts.len());
    for (sku, mut ps) in parts {
        let Some(&n) = expected.get(&sku) else { continue };
        ps.sort_by_key(|(p, _)| *p);
        ps.truncate(n as usize);
        if ps.len() != n as usize {
            return Err(StoreError::Corrupt(format!("SKU {sku}: {} of {n} parts found", ps.len())));
        }
        let bytes: Vec<u8> = ps.into_iter().flat_map(|(_, d)| d).collect();
        out.push((sku, SkuState::decode(&bytes)?));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

pub(crate) fn blob(item: &Item, name: &str) -> Vec<u8> {
    item.get(name).and_then(|v| v.as_b().ok()).map(|b| b.as_ref().to_vec()).unwrap_or_default()
}

impl StateStore for DynamoStore {
    async fn load_shard(&self, shard: &str) -> Result<StoredShard, StoreError> {
        let lease = self.lease_item(shard).await?;
        let checkpoint = lease
            .as_ref()
            .and_then(|l| l.get("checkpointKey"))
            .and_then(|v| v.as_s().ok())
            .and_then(|s| parse_position_key(s));
        let max_ts =
            lease.as_ref().and_then(|l| l.get("maxTs")).and_then(|v| v.as_n().ok()).and_then(|n| n.parse().ok());
        let listed = self.shard_skus(shard).await?;
        let floors: Vec<(String, Position)> = listed
            .iter()
            .filter_map(|(sku, _, pos)| {
                let pos = pos.clone()?;
                checkpoint.as_ref().is_none_or(|cp| pos > *cp).then(|| (sku.clone(), pos))
            })
            .collect();
        let keys: Vec<(String, u32)> = listed.into_iter().map(|(s, p, _)| (s, p)).collect();
        let skus = self.load_skus(&keys, LoadMode::Bulk).await?;
        let q = self
            .client
            .query()
            .table_name(&self.tables.dedup)
            .key_condition_expression("#s = :s")
            .expression_attribute_names("#s", "shard")
            .expression_attribute_values(":s", AttributeValue::S(shard.into()))
            .consistent_read(true);
        let mut dedup = Vec::new();
        for item in self.query_all(q).await? {
            dedup.extend(DedupEntry::decode_all(&blob(&item, "data")).map_err(StoreError::Corrupt)?);
        }
        Ok(StoredShard { checkpoint, snapshot: ShardSnapshot { max_ts, skus, dedup }, floors })
    }

    async fn commit(&self, commit: Arc<ShardCommit>) -> Result<(), StoreError> {
        commit::commit(self, &commit).await
    }

    async fn sku_states(&self) -> Result<Vec<(String, SkuState)>, StoreError> {
        assemble_states(self.scan_all(&self.tables.sku_state).await?)
    }

    async fn effects(&self) -> Result<Vec<Effect>, StoreError> {
        let mut items = self.scan_all(&self.tables.outbox).await?;
        let key = |i: &Item| {
            let s = |n: &str| i.get(n).and_then(|v| v.as_s().ok()).cloned().unwrap_or_default();
            (s("shard"), s("seq"))
        };
        items.sort_by_key(key);
        // A commit part's NDJSON may span several items (`{checkpoint}#{part}#{chunk}`, cut at
        // byte boundaries): join the chunks of a part before splitting lines.
        let mut out = Vec::new();
        let mut joined: Vec<u8> = Vec::new();
        let mut current: Option<(String, String)> = None;
        let flush = |buf: &mut Vec<u8>, out: &mut Vec<Effect>| -> Result<(), StoreError> {
            for line in buf.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                out.push(serde_json::from_slice(line).map_err(|e| StoreError::Corrupt(e.to_string()))?);
            }
            buf.clear();
            Ok(())
        };
        for item in items {
            let (shard, seq) = key(&item);
            let part = seq.rsplit_once('#').map_or(seq.as_str(), |(p, _)| p).to_string();
            if current.as_ref() != Some(&(shard.clone(), part.clone())) {
                flush(&mut joined, &mut out)?;
                current = Some((shard, part));
            }
            joined.extend_from_slice(&blob(&item, "data"));
        }
        flush(&mut joined, &mut out)?;
        Ok(out)
    }

    async fn dead_letters(&self) -> Result<Vec<DeadLetter>, StoreError> {
        let mut out = Vec::new();
        for item in self.scan_all(&self.tables.dead_letters).await? {
            let json = item.get("data").and_then(|v| v.as_s().ok()).cloned().unwrap_or_default();
            out.push(serde_json::from_str(&json).map_err(|e| StoreError::Corrupt(e.to_string()))?);
        }
        out.sort_by(|a: &DeadLetter, b| (&a.shard, &a.position).cmp(&(&b.shard, &b.position)));
        Ok(out)
    }

    async fn checkpoints(&self) -> Result<Vec<(String, Position)>, StoreError> {
        let mut out = Vec::new();
        for item in self.scan_all(&self.tables.leases).await? {
            let shard = item.get("leaseKey").and_then(|v| v.as_s().ok()).cloned().unwrap_or_default();
            if let Some(cp) = item.get("checkpointKey").and_then(|v| v.as_s().ok()).and_then(|s| parse_position_key(s))
            {
                out.push((shard, cp));
            }
        }
        out.sort();
        Ok(out)
    }
}

pub(crate) fn b(bytes: Vec<u8>) -> AttributeValue {
    AttributeValue::B(Blob::new(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn position_keys_sort_like_positions() {
        let p = |s: &str, sub| Position { sequence: s.into(), sub };
        let ps = [p("9", 0), p("10", 0), p("10", 3), p("49590338271490256608559692538361571095921575989136588898", 0)];
        for w in ps.windows(2) {
            assert!(position_key(&w[0]) < position_key(&w[1]));
        }
        for x in ps {
            assert_eq!(parse_position_key(&position_key(&x)), Some(x));
        }
    }
}
