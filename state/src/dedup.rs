//! Deduplication by event id (SPEC §2): an event whose `(sku, id)` was applied within the
//! horizon is skipped.
//!
//! The rule is per SKU, so that it gives the same answer however SKUs are spread over shards: an
//! entry is live while `entry.ts + horizon ≥ sku.max_ts` (the SKU's largest event time before the
//! event). Pruning only removes entries that rule already ignores, so it never changes a decision.
//! Keys are 128-bit xxh3 hashes of sku and id: a collision among a billion ids has probability
//! below 10⁻²⁰. Stored entries name their SKU by a 64-bit hash of its name ([`sku_id`]), not by
//! a shard-local ordinal, so that they follow the SKU into whichever shard holds it after a
//! reshard.

use std::collections::HashMap;

use foldhash::fast::FixedState;
use xxhash_rust::xxh3::{xxh3_64, xxh3_128_with_seed};

/// One remembered event id, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DedupEntry {
    /// Hash of `(sku, id)`.
    pub key: u128,
    /// Event time of the applied event.
    pub ts: i64,
    /// The SKU, by [`sku_id`].
    pub sku: u64,
}

/// Bytes of one encoded entry.
pub const ENTRY_BYTES: usize = 32;

/// A SKU's shard-independent 64-bit id (also the seed of its events' dedup keys).
pub fn sku_id(sku: &str) -> u64 {
    xxh3_64(sku.as_bytes())
}

impl DedupEntry {
    /// The dedup key of an event.
    pub fn key(sku: &str, id: &str) -> u128 {
        xxh3_128_with_seed(id.as_bytes(), sku_id(sku))
    }

    /// Appends the fixed-size little-endian encoding.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.key.to_le_bytes());
        out.extend_from_slice(&self.ts.to_le_bytes());
        out.extend_from_slice(&self.sku.to_le_bytes());
    }

    /// Decodes a buffer of entries; a trailing partial entry is an error.
    pub fn decode_all(bytes: &[u8]) -> Result<Vec<DedupEntry>, String> {
        if !bytes.len().is_multiple_of(ENTRY_BYTES) {
            return Err(format!("dedup chunk of {} bytes is not a multiple of {ENTRY_BYTES}", bytes.len()));
        }
        Ok(bytes
            .chunks_exact(ENTRY_BYTES)
            .map(|c| DedupEntry {
                key: u128::from_le_bytes(c[0..16].try_into().unwrap_or_default()),
                ts: i64::from_le_bytes(c[16..24].try_into().unwrap_or_default()),
                sku: u64::from_le_bytes(c[24..32].try_into().unwrap_or_default()),
            })
            .collect())
    }
}

/// The live dedup set of one shard plus the entries added since the last commit.
#[derive(Debug)]
pub struct DedupIndex {
    horizon_ms: i64,
    live: HashMap<u128, (i64, u32), FixedState>,
    pending: Vec<(u128, i64, u32)>,
}

impl DedupIndex {
    /// An empty index with the given horizon.
    pub fn new(horizon_ms: i64) -> Self {
        DedupIndex { horizon_ms, live: HashMap::default(), pending: Vec::new() }
    }

    /// Number of live entries.
    pub fn len(&self) -> usize {
        self.live.len()
    }

    /// True when nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }

    /// Restores `(key, ts, sku ordinal)` entries from the store (no pending entries are created).
    /// When a key comes twice (the merged stores of a reshard), the later event time is kept.
    pub fn restore(&mut self, entries: impl IntoIterator<Item = (u128, i64, u32)>) {
        for (key, ts, sku) in entries {
            let e = self.live.entry(key).or_insert((ts, sku));
            if ts > e.0 {
                *e = (ts, sku);
            }
        }
    }

    /// True if the event was already applied within the horizon of the SKU's event time.
    pub fn is_duplicate(&self, key: u128, sku_max_ts: Option<i64>) -> bool {
        self.live
            .get(&key)
            .is_some_and(|(seen_ts, _)| sku_max_ts.is_none_or(|m| seen_ts.saturating_add(self.horizon_ms) >= m))
    }

    /// Remembers an applied event.
    pub fn insert(&mut self, key: u128, ts: i64, sku: u32) {
        self.live.insert(key, (ts, sku));
        self.pending.push((key, ts, sku));
    }

    /// True if the event was already applied; otherwise remembers it and returns false.
    pub fn check_and_insert(&mut self, key: u128, ts: i64, sku: u32, sku_max_ts: Option<i64>) -> bool {
        if self.is_duplicate(key, sku_max_ts) {
            return true;
        }
        self.insert(key, ts, sku);
        false
    }

    /// Number of entries added since the last [`DedupIndex::drain_pending`].
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// Entries added since the last call, as stored; `sku_id(ordinal)` names each SKU.
    pub fn drain_pending(&mut self, sku_id: impl Fn(u32) -> u64, mut each: impl FnMut(DedupEntry)) {
        for (key, ts, sku) in self.pending.drain(..) {
            each(DedupEntry { key, ts, sku: sku_id(sku) });
        }
    }

    /// Drops entries the rule already ignores; `sku_max_ts(ordinal)` gives each SKU's max ts.
    pub fn prune(&mut self, sku_max_ts: impl Fn(u32) -> Option<i64>) {
        let horizon = self.horizon_ms;
        self.live.retain(|_, (ts, sku)| sku_max_ts(*sku).is_none_or(|m| ts.saturating_add(horizon) >= m));
    }

    /// Every live entry, in key order (for a compacted chunk and for snapshots).
    pub fn entries(&self, sku_id: impl Fn(u32) -> u64) -> Vec<DedupEntry> {
        let mut v: Vec<DedupEntry> =
            self.live.iter().map(|(k, (ts, sku))| DedupEntry { key: *k, ts: *ts, sku: sku_id(*sku) }).collect();
        v.sort_unstable_by_key(|e| e.key);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_within_the_horizon_of_the_skus_event_time() {
        let mut d = DedupIndex::new(1000);
        let k = DedupEntry::key("S", "a");
        assert!(!d.check_and_insert(k, 100, 0, None));
        assert!(d.check_and_insert(k, 100, 0, Some(100)));
        assert!(d.check_and_insert(k, 100, 0, Some(1100)));
        // The SKU moved past the horizon: the id may be applied again.
        assert!(!d.check_and_insert(k, 100, 0, Some(1101)));
        assert_ne!(DedupEntry::key("S", "a"), DedupEntry::key("T", "a"));
    }

    #[test]
    fn prune_keeps_what_the_rule_still_needs_and_encoding_round_trips() {
        let mut d = DedupIndex::new(1000);
        d.check_and_insert(1, 0, 0, None);
        d.check_and_insert(2, 5000, 1, None);
        d.prune(|sku| Some(if sku == 0 { 2000 } else { 5000 }));
        assert_eq!(d.entries(u64::from).iter().map(|e| e.key).collect::<Vec<_>>(), vec![2]);
        let mut buf = Vec::new();
        d.drain_pending(|o| u64::from(o) + 70, |e| e.encode_into(&mut buf));
        let back = DedupEntry::decode_all(&buf).unwrap();
        assert_eq!(back, vec![DedupEntry { key: 1, ts: 0, sku: 70 }, DedupEntry { key: 2, ts: 5000, sku: 71 }]);
        assert!(DedupEntry::decode_all(&buf[1..]).is_err());
    }
}
