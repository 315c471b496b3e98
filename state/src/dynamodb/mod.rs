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
//!
//! The store's trait implementations stay together (about 620 lines); the item layouts, commits,
//! delivery and the book are in the submodules listed here.

mod book;
mod commit;
mod delivery;
mod leases;
pub use leases::GroupRow;
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

/// Default margin of the dedup chunks' TTL beyond the dedup horizon: 3 days.
pub const DEFAULT_DEDUP_TTL_MARGIN_MS: i64 = 3 * 24 * 3600 * 1000;

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
    /// Delivery-table writes (cursors, in-flight requests, connector dead letters), each one
    /// `TransactWriteItems` fenced by the lane's lease.
    pub delivery_writes: AtomicU64,
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
    /// Dedup horizon (event time) the TTL is derived from, ms.
    dedup_horizon_ms: i64,
    /// Margin of the TTL beyond the horizon, ms.
    dedup_margin_ms: i64,
    /// TTL of dedup chunks past their write, ms (horizon + margin; workers rewrite live ids
    /// before it passes).
    dedup_ttl_ms: u64,
    /// Per shard, the last outbox item this process set to expire (retention resumes after it).
    pruned: Arc<std::sync::Mutex<HashMap<String, String>>>,
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
            dedup_horizon_ms: crate::engine::DEFAULT_DEDUP_HORIZON_MS,
            dedup_margin_ms: DEFAULT_DEDUP_TTL_MARGIN_MS,
            dedup_ttl_ms: 0,
            pruned: Arc::default(),
        }
        .with_ttl()
    }

    fn with_ttl(mut self) -> Self {
        self.dedup_ttl_ms = u64::try_from(self.dedup_horizon_ms.saturating_add(self.dedup_margin_ms)).unwrap_or(0);
        self
    }

    /// The same store, for an engine whose dedup horizon is `horizon_ms`: dedup chunks expire
    /// (DynamoDB TTL, wall clock) the horizon plus the margin after their write.
    pub fn with_dedup_horizon(mut self, horizon_ms: i64) -> Self {
        self.dedup_horizon_ms = horizon_ms.max(0);
        self.with_ttl()
    }

    /// The margin of the dedup TTL beyond the horizon (default 3 days); shard workers rewrite
    /// their live ids when less than half of it is left, so none expires while a member runs.
    pub fn with_dedup_margin(mut self, margin_ms: i64) -> Self {
        self.dedup_margin_ms = margin_ms.max(2);
        self.with_ttl()
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

    /// Checks the tables without changing anything ([`schema::validate`]).
    pub async fn validate(&self) -> Result<Vec<schema::TableCheck>, StoreError> {
        schema::validate(&self.client, &self.tables).await
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

    /// The SKUs listed for a shard in `-shard-skus` (consistent `Query`). A store written before
    /// the listing existed has none for a shard that committed: it is built once from a consistent
    /// `Scan` of the SKU table and written back.
    async fn listed_skus(&self, shard: &str, committed: bool) -> Result<Vec<String>, StoreError> {
        let q = self
            .client
            .query()
            .table_name(&self.tables.shard_skus)
            .consistent_read(true)
            .key_condition_expression("#s = :s")
            .expression_attribute_names("#s", "shard")
            .expression_attribute_values(":s", AttributeValue::S(shard.into()));
        let items = self.query_all(q).await?;
        let mut skus = std::collections::BTreeSet::new();
        for item in &items {
            let json = item.get("skus").and_then(|v| v.as_s().ok()).map_or("[]", String::as_str);
            let names: Vec<String> = serde_json::from_str(json).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            skus.extend(names);
        }
        if items.is_empty() && committed {
            let mut found = Vec::new();
            for item in self.scan_all(&self.tables.sku_state).await? {
                if item.get("shard").and_then(|v| v.as_s().ok()).map(String::as_str) == Some(shard)
                    && let Some(sku) = item.get("sku").and_then(|v| v.as_s().ok())
                {
                    found.push(sku.clone());
                }
            }
            let json = serde_json::to_string(&found).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            // Idempotent: a listing is a union, and this chunk key sorts before every commit's.
            self.client
                .put_item()
                .table_name(&self.tables.shard_skus)
                .item("shard", AttributeValue::S(shard.into()))
                .item("chunk", AttributeValue::S("0#listed-by-scan".into()))
                .item("skus", AttributeValue::S(json))
                .send()
                .await
                .map_err(sdk_error)?;
            tracing::info!(
                shard,
                skus = found.len(),
                "listed the shard's SKUs from a scan (store written before listings)"
            );
            skus.extend(found);
        }
        Ok(skus.into_iter().collect())
    }

    /// Consistent `BatchGetItem` of `keys` (100 per call, unprocessed keys retried).
    async fn batch_get(&self, keys: Vec<Item>) -> Result<Vec<Item>, StoreError> {
        let mut items = Vec::with_capacity(keys.len());
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
        Ok(items)
    }

    /// The states of the SKUs a shard holds (listed for it, and whose item still names it: a
    /// SKU that moved to a child after a reshard is the child's), and the floors: SKUs whose
    /// stored `pos` is past `checkpoint` (an interrupted split commit). Every read is consistent.
    async fn shard_states(
        &self,
        shard: &str,
        checkpoint: Option<&Position>,
    ) -> Result<(Vec<(String, SkuState)>, Vec<(String, Position)>), StoreError> {
        let listed = self.listed_skus(shard, checkpoint.is_some()).await?;
        let key = |sku: &str, part: u32| {
            HashMap::from([
                ("sku".to_string(), AttributeValue::S(sku.to_string())),
                ("part".to_string(), AttributeValue::N(part.to_string())),
            ])
        };
        let firsts = self.batch_get(listed.iter().map(|sku| key(sku, 0)).collect()).await?;
        let mut items = Vec::with_capacity(firsts.len());
        let mut more = Vec::new();
        let mut floors = Vec::new();
        for item in firsts {
            if item.get("shard").and_then(|v| v.as_s().ok()).map(String::as_str) != Some(shard) {
                continue;
            }
            let Some(sku) = item.get("sku").and_then(|v| v.as_s().ok()).cloned() else { continue };
            let parts: u32 = item.get("parts").and_then(|v| v.as_n().ok()).and_then(|n| n.parse().ok()).unwrap_or(1);
            more.extend((1..parts).map(|p| key(&sku, p)));
            if let Some(pos) = item.get("pos").and_then(|v| v.as_s().ok()).and_then(|s| parse_position_key(s))
                && checkpoint.is_none_or(|cp| pos > *cp)
            {
                floors.push((sku, pos));
            }
            items.push(item);
        }
        items.extend(self.batch_get(more).await?);
        Ok((assemble_states(items)?, floors))
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
            LoadMode::Bulk => items = self.batch_get(keys).await?,
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
        let (skus, floors) = self.shard_states(shard, checkpoint.as_ref()).await?;
        let q = self
            .client
            .query()
            .table_name(&self.tables.dedup)
            .key_condition_expression("#s = :s")
            .expression_attribute_names("#s", "shard")
            .expression_attribute_values(":s", AttributeValue::S(shard.into()))
            .consistent_read(true);
        let mut dedup = Vec::new();
        let mut expires: Option<i64> = None;
        for item in self.query_all(q).await? {
            DedupEntry::decode_row(&blob(&item, "data"), &mut dedup).map_err(StoreError::Corrupt)?;
            let at = item.get("expires_at").and_then(|v| v.as_n().ok()).and_then(|n| n.parse::<i64>().ok());
            if let Some(at) = at {
                let ms = at.saturating_mul(1000);
                expires = Some(expires.map_or(ms, |e| e.min(ms)));
            }
        }
        Ok(StoredShard {
            checkpoint,
            snapshot: ShardSnapshot { max_ts, skus, dedup },
            floors,
            dedup_expires_at_ms: expires,
            lines_log_bytes: 0,
        })
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
        // A commit part's effects may span several items (`{checkpoint}#{part}#{chunk}`, cut at
        // byte boundaries): join the chunks of a part before reading them.
        let mut out = Vec::new();
        let mut joined: Vec<u8> = Vec::new();
        let mut current: Option<(String, String)> = None;
        let flush = |buf: &mut Vec<u8>, out: &mut Vec<Effect>| -> Result<(), StoreError> {
            crate::outbox::row_effects(buf, out)?;
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

    async fn remove_dead_letters(&self, select: &(dyn Fn(&DeadLetter) -> bool + Sync)) -> Result<u64, StoreError> {
        let mut n = 0;
        for d in self.dead_letters().await?.into_iter().filter(|d| select(d)) {
            self.client
                .delete_item()
                .table_name(&self.tables.dead_letters)
                .key("shard", AttributeValue::S(d.shard.clone()))
                .key("pos", AttributeValue::S(position_key(&d.position)))
                .send()
                .await
                .map_err(sdk_error)?;
            n += 1;
        }
        Ok(n)
    }

    async fn shard_sku_states(&self, shard: &str) -> Result<Vec<(String, SkuState)>, StoreError> {
        let checkpoint = self
            .lease_item(shard)
            .await?
            .as_ref()
            .and_then(|l| l.get("checkpointKey"))
            .and_then(|v| v.as_s().ok())
            .and_then(|s| parse_position_key(s));
        Ok(self.shard_states(shard, checkpoint.as_ref()).await?.0)
    }

    fn dedup_expiry(&self) -> Option<crate::store::DedupExpiry> {
        let ttl_ms = i64::try_from(self.dedup_ttl_ms).unwrap_or(i64::MAX);
        Some(crate::store::DedupExpiry { ttl_ms, refresh_before_ms: self.dedup_margin_ms / 2 })
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
