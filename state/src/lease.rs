//! Leases: which worker of a consumer group owns which shard, with a fencing epoch.
//!
//! The model is the Kinesis Client Library's (one row per shard, `leaseOwner`, `leaseCounter`
//! bumped by every heartbeat, a checkpoint, the shard's parents and children), plus
//! `leaseEpoch`, a fencing token that changes on every change of ownership and on nothing else.
//! Heartbeats touch only the counter, so a renewal never races a checkpoint; every state commit
//! carries the epoch, so a worker that lost its lease can never write again.
//!
//! [`LeaseStore`] is implemented by DynamoDB ([`crate::dynamodb::DynamoStore`], the lease table)
//! and by [`LocalLeases`], the in-process store of the single-process default.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Mutex;

use md5::{Digest, Md5};

use crate::store::{Position, StoreError};

/// A shard's range of 128-bit hash keys (inclusive), as Kinesis assigns partition keys to shards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HashRange {
    /// First hash key.
    pub start: u128,
    /// Last hash key.
    pub end: u128,
}

impl HashRange {
    /// The whole key space.
    pub const ALL: HashRange = HashRange { start: 0, end: u128::MAX };

    /// Parses the decimal strings Kinesis returns.
    pub fn parse(start: &str, end: &str) -> Option<HashRange> {
        Some(HashRange { start: start.parse().ok()?, end: end.parse().ok()? })
    }

    /// True when the SKU's hash key falls in the range.
    pub fn holds(&self, sku: &str) -> bool {
        (self.start..=self.end).contains(&hash_key(sku))
    }
}

/// The Kinesis hash key of a partition key: MD5 of its UTF-8 bytes as a big-endian integer.
pub fn hash_key(partition_key: &str) -> u128 {
    u128::from_be_bytes(Md5::digest(partition_key.as_bytes()).into())
}

/// The `checkpoint` value of a shard read to its end (the KCL's sentinel).
pub const SHARD_END: &str = "SHARD_END";

/// One lease row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The shard id (`leaseKey`).
    pub key: String,
    /// The worker that holds it (`leaseOwner`), `None` when released or never taken.
    pub owner: Option<String>,
    /// Bumped by every heartbeat and ownership change (`leaseCounter`).
    pub counter: u64,
    /// Fencing token, changed by every change of ownership (`leaseEpoch`).
    pub epoch: u64,
    /// Last committed position (`checkpoint` + `checkpointSubSequenceNumber`).
    pub checkpoint: Option<Position>,
    /// The shard was read to its end and its last records committed (`checkpoint = SHARD_END`).
    pub ended: bool,
    /// Parent shards (`parentShardIds`): this shard starts only after they ended.
    pub parents: Vec<String>,
    /// Child shards (`childShardIds`), known once the shard ended.
    pub children: Vec<String>,
    /// The shard's hash keys (`startingHashKey`, `endingHashKey`).
    pub hash_range: Option<HashRange>,
    /// Ownership changes since the last checkpoint (`ownerSwitchesSinceCheckpoint`).
    pub owner_switches: u64,
}

/// What a new lease row is created with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewLease {
    /// The shard id.
    pub key: String,
    /// Its parents.
    pub parents: Vec<String>,
    /// Its hash keys.
    pub hash_range: Option<HashRange>,
}

/// A lease table. Every write is conditional; `Ok(false)`/`Ok(None)` means the condition did
/// not hold (someone else moved the lease), errors are the store's trouble.
pub trait LeaseStore: Send + Sync + 'static {
    /// Every lease row.
    fn leases(&self) -> impl Future<Output = Result<Vec<Lease>, StoreError>> + Send;

    /// Creates the row if it does not exist; true when created.
    fn create_lease(&self, lease: &NewLease) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Takes `key` for `owner` if its counter is still `observed_counter` (the row is as this
    /// worker last saw it: unowned, expired or chosen to steal). Returns the new epoch.
    fn take_lease(
        &self,
        key: &str,
        owner: &str,
        observed_counter: u64,
    ) -> impl Future<Output = Result<Option<u64>, StoreError>> + Send;

    /// Heartbeat: bumps the counter if `owner` still holds `key` at `epoch`.
    fn renew_lease(&self, key: &str, owner: &str, epoch: u64) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Gives the lease up (graceful handoff): no owner, a new epoch.
    fn release_lease(
        &self,
        key: &str,
        owner: &str,
        epoch: u64,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Marks the shard read to its end (after its last commit), records its children and
    /// releases it.
    fn end_lease(
        &self,
        key: &str,
        owner: &str,
        epoch: u64,
        children: &[String],
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;
}

/// The first epoch of a new row: the creation time in microseconds, so that a row deleted and
/// recreated never hands out an epoch a zombie from before the deletion still holds.
pub fn initial_epoch() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_micros() as u64)
}

/// The in-process lease store of a single-process deployment (and of coordinator tests, where
/// several coordinators share one).
#[derive(Debug, Default)]
pub struct LocalLeases {
    rows: Mutex<BTreeMap<String, Lease>>,
}

impl LocalLeases {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    fn with<T>(&self, f: impl FnOnce(&mut BTreeMap<String, Lease>) -> T) -> T {
        let mut rows = self.rows.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut rows)
    }
}

/// The holder gives the lease up: no owner, a new epoch.
fn give_up(l: &mut Lease) {
    l.owner = None;
    l.counter += 1;
    l.epoch += 1;
}

fn held<'a>(rows: &'a mut BTreeMap<String, Lease>, key: &str, owner: &str, epoch: u64) -> Option<&'a mut Lease> {
    rows.get_mut(key).filter(|l| l.owner.as_deref() == Some(owner) && l.epoch == epoch)
}

impl LeaseStore for LocalLeases {
    async fn leases(&self) -> Result<Vec<Lease>, StoreError> {
        Ok(self.with(|rows| rows.values().cloned().collect()))
    }

    async fn create_lease(&self, new: &NewLease) -> Result<bool, StoreError> {
        Ok(self.with(|rows| {
            if rows.contains_key(&new.key) {
                return false;
            }
            let lease = Lease {
                key: new.key.clone(),
                owner: None,
                counter: 0,
                epoch: initial_epoch(),
                checkpoint: None,
                ended: false,
                parents: new.parents.clone(),
                children: Vec::new(),
                hash_range: new.hash_range,
                owner_switches: 0,
            };
            rows.insert(new.key.clone(), lease);
            true
        }))
    }

    async fn take_lease(&self, key: &str, owner: &str, observed_counter: u64) -> Result<Option<u64>, StoreError> {
        Ok(self.with(|rows| match rows.get_mut(key) {
            Some(l) if l.counter == observed_counter && !l.ended => {
                l.owner = Some(owner.to_string());
                l.counter += 1;
                l.epoch += 1;
                l.owner_switches += 1;
                Some(l.epoch)
            }
            _ => None,
        }))
    }

    async fn renew_lease(&self, key: &str, owner: &str, epoch: u64) -> Result<bool, StoreError> {
        Ok(self.with(|rows| held(rows, key, owner, epoch).map(|l| l.counter += 1).is_some()))
    }

    async fn release_lease(&self, key: &str, owner: &str, epoch: u64) -> Result<bool, StoreError> {
        Ok(self.with(|rows| held(rows, key, owner, epoch).map(give_up).is_some()))
    }

    async fn end_lease(&self, key: &str, owner: &str, epoch: u64, children: &[String]) -> Result<bool, StoreError> {
        Ok(self.with(|rows| {
            held(rows, key, owner, epoch)
                .map(|l| {
                    give_up(l);
                    l.ended = true;
                    l.children = children.to_vec();
                })
                .is_some()
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_keys_are_kinesis_md5_big_endian() {
        // MD5("") = d41d8cd98f00b204e9800998ecf8427e.
        assert_eq!(hash_key(""), 0xd41d8cd98f00b204e9800998ecf8427e);
        let half = HashRange { start: 0, end: u128::MAX / 2 };
        let other = HashRange { start: u128::MAX / 2 + 1, end: u128::MAX };
        for sku in ["A", "B", "SKU-1", "SKU-2"] {
            assert!(half.holds(sku) != other.holds(sku), "{sku} is in exactly one half");
        }
        assert_eq!(HashRange::parse("0", "340282366920938463463374607431768211455"), Some(HashRange::ALL));
    }

    #[tokio::test]
    async fn epochs_change_with_ownership_only() {
        let l = LocalLeases::new();
        let new = NewLease { key: "s".into(), parents: vec![], hash_range: None };
        assert!(l.create_lease(&new).await.unwrap());
        assert!(!l.create_lease(&new).await.unwrap());
        let e1 = l.take_lease("s", "a", 0).await.unwrap().unwrap();
        assert!(l.take_lease("s", "b", 0).await.unwrap().is_none(), "the counter moved");
        assert!(l.renew_lease("s", "a", e1).await.unwrap());
        assert_eq!(l.leases().await.unwrap()[0].epoch, e1, "a heartbeat keeps the epoch");
        let e2 = l.take_lease("s", "b", 2).await.unwrap().unwrap();
        assert_ne!(e1, e2);
        assert!(!l.renew_lease("s", "a", e1).await.unwrap(), "the old owner is fenced");
        assert!(l.release_lease("s", "b", e2).await.unwrap());
        let row = &l.leases().await.unwrap()[0];
        assert_eq!(row.owner, None);
        assert_ne!(row.epoch, e2);
        assert!(!l.release_lease("s", "b", e2).await.unwrap());
        let e3 = l.take_lease("s", "a", row.counter).await.unwrap().unwrap();
        assert!(l.end_lease("s", "a", e3, &["c".into()]).await.unwrap());
        let row = &l.leases().await.unwrap()[0];
        assert!(row.ended && row.owner.is_none() && row.children == ["c"]);
        assert!(l.take_lease("s", "a", row.counter).await.unwrap().is_none(), "an ended shard is not taken");
    }
}
