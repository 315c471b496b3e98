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

use crate::outbox::Fence;
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

/// A shard outbox this process may deliver, and under which fence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaneGrant {
    /// Every write of the lane is conditioned on this lease holding this epoch.
    pub fence: Fence,
    /// Shards whose outboxes must be delivered (for the same connector) before this one's lane
    /// starts: the shard's parents, so a SKU's effects keep their order across a reshard.
    pub after: Vec<String>,
    /// The shard ended: its outbox will not grow (the lane stops once it is delivered).
    pub ended: bool,
}

/// What one member of a consumer group delivers: the outboxes of the shards it leases and of
/// the ended ancestors it is designated for, and how many members share the connectors' limits.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Assignment {
    /// Shard → grant.
    pub lanes: BTreeMap<String, LaneGrant>,
    /// Live members of the group (at least 1): each takes `1/members` of a connector's rate.
    pub members: u32,
}

impl Assignment {
    /// The lanes of `me` given the lease table and the leases it holds (`owned`: key → epoch).
    ///
    /// A live shard is delivered by its owner, fenced by its own lease. An ended shard is
    /// delivered by the owner of its **designated descendant**: follow the smallest child while
    /// the shard ended, down to a live shard; its lease fences the writes. Every process
    /// computes the same designation, so exactly one lease (hence at most one holder at a time)
    /// entitles a lane of each outbox. An ended shard without recorded children is not delivered
    /// (it cannot be: nothing fences it) — `stockflow group status` shows it.
    pub fn of(leases: &[Lease], owned: &BTreeMap<String, u64>, members: u32) -> Assignment {
        let by_key: BTreeMap<&str, &Lease> = leases.iter().map(|l| (l.key.as_str(), l)).collect();
        fn designated<'a>(start: &'a Lease, by_key: &BTreeMap<&str, &'a Lease>, bound: usize) -> Option<&'a str> {
            let mut at = start;
            // Lineage is a DAG that only grows downwards; the bound guards a corrupt table.
            for _ in 0..=bound {
                if !at.ended {
                    return Some(at.key.as_str());
                }
                let child = at.children.iter().min()?;
                at = by_key.get(child.as_str())?;
            }
            None
        }
        let mut lanes = BTreeMap::new();
        for l in leases {
            let Some(drainer) = designated(l, &by_key, leases.len()) else { continue };
            let Some(&epoch) = owned.get(drainer) else { continue };
            let fence = Fence { lease: drainer.to_string(), epoch };
            lanes.insert(l.key.clone(), LaneGrant { fence, after: l.parents.clone(), ended: l.ended });
        }
        // A shard owned but not yet in the scanned table (taken since): its own lease fences it.
        for (key, &epoch) in owned {
            lanes.entry(key.clone()).or_insert_with(|| LaneGrant {
                fence: Fence { lease: key.clone(), epoch },
                after: by_key.get(key.as_str()).map(|l| l.parents.clone()).unwrap_or_default(),
                ended: false,
            });
        }
        Assignment { lanes, members: members.max(1) }
    }
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

    fn lease(key: &str, ended: bool, parents: &[&str], children: &[&str]) -> Lease {
        Lease {
            key: key.into(),
            owner: None,
            counter: 0,
            epoch: 1,
            checkpoint: None,
            ended,
            parents: parents.iter().map(|p| p.to_string()).collect(),
            children: children.iter().map(|c| c.to_string()).collect(),
            hash_range: None,
            owner_switches: 0,
        }
    }

    #[test]
    fn ended_shards_are_delivered_by_the_owner_of_their_smallest_live_descendant() {
        // p split into c1 and c2; c1 and s3 merged into m; s4 untouched.
        let table = vec![
            lease("p", true, &[], &["c1", "c2"]),
            lease("c1", true, &["p"], &["m"]),
            lease("c2", false, &["p"], &[]),
            lease("s3", true, &[], &["m"]),
            lease("m", false, &["c1", "s3"], &[]),
            lease("s4", false, &[], &[]),
            lease("gone", true, &[], &[]),
        ];
        let owned = |keys: &[(&str, u64)]| keys.iter().map(|(k, e)| (k.to_string(), *e)).collect();
        // The owner of m delivers m, c1 (its only child is m), s3, and p (smallest child c1 → m).
        let a = Assignment::of(&table, &owned(&[("m", 7)]), 2);
        let keys: Vec<&str> = a.lanes.keys().map(String::as_str).collect();
        assert_eq!(keys, ["c1", "m", "p", "s3"]);
        assert!(a.lanes.values().all(|g| g.fence == Fence { lease: "m".into(), epoch: 7 }));
        assert_eq!(a.lanes["m"].after, ["c1", "s3"], "m starts after its parents' outboxes");
        assert!(a.lanes["p"].ended && !a.lanes["m"].ended);
        // The owner of c2 delivers only c2, after p.
        let b = Assignment::of(&table, &owned(&[("c2", 3), ("s4", 9)]), 2);
        assert_eq!(b.lanes.keys().map(String::as_str).collect::<Vec<_>>(), ["c2", "s4"]);
        assert_eq!(b.lanes["c2"].after, ["p"]);
        assert_eq!(b.lanes["s4"].fence, Fence { lease: "s4".into(), epoch: 9 });
        // Every outbox but the childless ended one has exactly one designated lease.
        let all = Assignment::of(&table, &owned(&[("m", 7), ("c2", 3), ("s4", 9)]), 1);
        assert_eq!(all.lanes.len(), 6);
        assert!(!all.lanes.contains_key("gone"));
        assert_eq!(Assignment::of(&table, &BTreeMap::new(), 0).members, 1);
    }
}
