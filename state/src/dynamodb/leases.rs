//! The lease table as a [`LeaseStore`]: KCL attribute names plus `leaseEpoch`. Every write is a
//! single conditional `UpdateItem`; a failed condition is an answer (`false`/`None`), not an error.
//!
//! | call | condition | sets |
//! |---|---|---|
//! | create | row absent | `checkpoint = TRIM_HORIZON`, counter 0, epoch = creation µs, parents, hash keys |
//! | take | `leaseCounter` as observed, not ended | owner, counter + 1, epoch + 1, switches + 1 |
//! | renew (heartbeat) | owner and epoch | counter + 1 — nothing else, so it never races a commit |
//! | release | owner and epoch | owner removed, counter + 1, epoch + 1 |
//! | end | owner and epoch | `checkpoint = SHARD_END`, children, owner removed, epoch + 1 |

use std::sync::atomic::Ordering;

use aws_sdk_dynamodb::operation::update_item::UpdateItemError;
use aws_sdk_dynamodb::operation::update_item::builders::UpdateItemFluentBuilder;
use aws_sdk_dynamodb::types::AttributeValue;

use super::{DynamoStore, Item, parse_position_key, sdk_error};
use crate::lease::{HashRange, Lease, LeaseStore, NewLease, SHARD_END, initial_epoch};
use crate::store::{Position, StoreError};

fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}

fn n(v: u64) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

fn text<'a>(item: &'a Item, name: &str) -> Option<&'a str> {
    item.get(name).and_then(|v| v.as_s().ok()).map(String::as_str)
}

fn number(item: &Item, name: &str) -> Option<u64> {
    item.get(name).and_then(|v| v.as_n().ok()).and_then(|v| v.parse().ok())
}

fn set(item: &Item, name: &str) -> Vec<String> {
    let mut v = item.get(name).and_then(|v| v.as_ss().ok()).cloned().unwrap_or_default();
    v.sort();
    v
}

/// Reads a lease row.
pub(crate) fn lease_of(item: &Item) -> Option<Lease> {
    let key = text(item, "leaseKey")?.to_string();
    let ended = text(item, "checkpoint") == Some(SHARD_END);
    let checkpoint = text(item, "checkpointKey").and_then(parse_position_key).or_else(|| {
        // A row written by the KCL has no checkpointKey: read its sequence number.
        let seq = text(item, "checkpoint").filter(|c| c.bytes().all(|b| b.is_ascii_digit()))?;
        Some(Position { sequence: seq.to_string(), sub: number(item, "checkpointSubSequenceNumber").unwrap_or(0) })
    });
    Some(Lease {
        key,
        owner: text(item, "leaseOwner").map(str::to_string),
        counter: number(item, "leaseCounter").unwrap_or(0),
        epoch: number(item, "leaseEpoch").unwrap_or(0),
        checkpoint,
        ended,
        parents: set(item, "parentShardIds"),
        children: set(item, "childShardIds"),
        hash_range: text(item, "startingHashKey")
            .zip(text(item, "endingHashKey"))
            .and_then(|(a, b)| HashRange::parse(a, b)),
        owner_switches: number(item, "ownerSwitchesSinceCheckpoint").unwrap_or(0),
    })
}

/// One row of `stockflow group status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupRow {
    /// The lease.
    pub lease: Lease,
    /// When its shard last committed (wall clock, ms).
    pub committed_at_ms: Option<i64>,
    /// How far its reader was behind the stream's tip at that commit (ms).
    pub lag_ms: Option<u64>,
}

impl DynamoStore {
    /// Every lease row with its last commit's time and lag, by shard (a consistent scan).
    pub async fn group_status(&self) -> Result<Vec<GroupRow>, StoreError> {
        let items = self.scan_all(&self.tables.leases).await?;
        let mut rows: Vec<GroupRow> = items
            .iter()
            .filter_map(|item| {
                Some(GroupRow {
                    lease: lease_of(item)?,
                    committed_at_ms: number(item, "committedAt").and_then(|n| i64::try_from(n).ok()),
                    lag_ms: number(item, "lagMs"),
                })
            })
            .collect();
        rows.sort_by(|a, b| a.lease.key.cmp(&b.lease.key));
        Ok(rows)
    }

    fn lease_update(&self, key: &str) -> UpdateItemFluentBuilder {
        self.stats.lease_calls.fetch_add(1, Ordering::Relaxed);
        self.client.update_item().table_name(&self.tables.leases).key("leaseKey", s(key))
    }

    /// Sends a conditional update: `Ok(false)` when the condition failed.
    async fn conditional(&self, update: UpdateItemFluentBuilder) -> Result<bool, StoreError> {
        match update.send().await {
            Ok(_) => Ok(true),
            Err(e) if matches!(e.as_service_error(), Some(UpdateItemError::ConditionalCheckFailedException(_))) => {
                Ok(false)
            }
            Err(e) => Err(sdk_error(e)),
        }
    }

    fn held(update: UpdateItemFluentBuilder, owner: &str, epoch: u64) -> UpdateItemFluentBuilder {
        update
            .condition_expression("leaseOwner = :o AND leaseEpoch = :e")
            .expression_attribute_values(":o", s(owner))
            .expression_attribute_values(":e", n(epoch))
    }
}

impl LeaseStore for DynamoStore {
    async fn leases(&self) -> Result<Vec<Lease>, StoreError> {
        self.stats.lease_scans.fetch_add(1, Ordering::Relaxed);
        let items = self.scan_all(&self.tables.leases).await?;
        Ok(items.iter().filter_map(lease_of).collect())
    }

    async fn create_lease(&self, new: &NewLease) -> Result<bool, StoreError> {
        let mut expr = String::from(
            "SET checkpoint = :th, checkpointSubSequenceNumber = :zero, leaseCounter = :zero, leaseEpoch = :epoch, \
             ownerSwitchesSinceCheckpoint = :zero",
        );
        let mut update = self
            .lease_update(&new.key)
            .condition_expression("attribute_not_exists(leaseKey)")
            .expression_attribute_values(":th", s("TRIM_HORIZON"))
            .expression_attribute_values(":zero", n(0))
            .expression_attribute_values(":epoch", n(initial_epoch()));
        if !new.parents.is_empty() {
            expr.push_str(", parentShardIds = :parents");
            update = update.expression_attribute_values(":parents", AttributeValue::Ss(new.parents.clone()));
        }
        if let Some(range) = new.hash_range {
            expr.push_str(", startingHashKey = :hs, endingHashKey = :he");
            update = update
                .expression_attribute_values(":hs", s(range.start.to_string()))
                .expression_attribute_values(":he", s(range.end.to_string()));
        }
        self.conditional(update.update_expression(expr)).await
    }

    async fn take_lease(&self, key: &str, owner: &str, observed_counter: u64) -> Result<Option<u64>, StoreError> {
        let update = self
            .lease_update(key)
            .update_expression(
                "SET leaseOwner = :o, leaseCounter = leaseCounter + :one, leaseEpoch = leaseEpoch + :one, \
                 ownerSwitchesSinceCheckpoint = ownerSwitchesSinceCheckpoint + :one",
            )
            .condition_expression("leaseCounter = :c AND checkpoint <> :end")
            .expression_attribute_values(":o", s(owner))
            .expression_attribute_values(":one", n(1))
            .expression_attribute_values(":c", n(observed_counter))
            .expression_attribute_values(":end", s(SHARD_END))
            .return_values(aws_sdk_dynamodb::types::ReturnValue::UpdatedNew);
        match update.send().await {
            Ok(out) => Ok(out.attributes().and_then(|a| number(a, "leaseEpoch"))),
            Err(e) if matches!(e.as_service_error(), Some(UpdateItemError::ConditionalCheckFailedException(_))) => {
                Ok(None)
            }
            Err(e) => Err(sdk_error(e)),
        }
    }

    async fn renew_lease(&self, key: &str, owner: &str, epoch: u64) -> Result<bool, StoreError> {
        self.stats.lease_renewals.fetch_add(1, Ordering::Relaxed);
        let update = self
            .lease_update(key)
            .update_expression("SET leaseCounter = leaseCounter + :one")
            .expression_attribute_values(":one", n(1));
        self.conditional(Self::held(update, owner, epoch)).await
    }

    async fn release_lease(&self, key: &str, owner: &str, epoch: u64) -> Result<bool, StoreError> {
        let update = self
            .lease_update(key)
            .update_expression(
                "REMOVE leaseOwner SET leaseCounter = leaseCounter + :one, leaseEpoch = leaseEpoch + :one",
            )
            .expression_attribute_values(":one", n(1));
        self.conditional(Self::held(update, owner, epoch)).await
    }

    async fn end_lease(&self, key: &str, owner: &str, epoch: u64, children: &[String]) -> Result<bool, StoreError> {
        let mut expr = String::from(
            "REMOVE leaseOwner SET checkpoint = :end, leaseCounter = leaseCounter + :one, leaseEpoch = leaseEpoch + :one",
        );
        let mut update = self
            .lease_update(key)
            .expression_attribute_values(":one", n(1))
            .expression_attribute_values(":end", s(SHARD_END));
        if !children.is_empty() {
            expr.push_str(", childShardIds = :children");
            update = update.expression_attribute_values(":children", AttributeValue::Ss(children.to_vec()));
        }
        self.conditional(Self::held(update.update_expression(expr), owner, epoch)).await
    }
}
