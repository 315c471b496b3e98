//! `ShardEngine`: the in-memory state of one shard — interned SKUs, their ledgers and windows, the
//! dedup index and the watermark — and the delta a commit persists.
//!
//! Applying an event is allocation-free unless it creates a SKU, an order line, a window or an
//! effect. Everything the engine holds can be snapshotted and restored; restoring a snapshot
//! taken at any point and applying the rest gives the same state as one straight pass.
//!
//! About 510 lines of code and the unit tests of apply/commit/restore next to them; the rules
//! themselves live in `ledger.rs` and `windows.rs`.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Arc;

use foldhash::fast::FixedState;
use hashbrown::HashTable;

use crate::dedup::{DedupEntry, DedupIndex, ENTRY_BYTES, sku_id};
use crate::effects::Effect;
use crate::event::Event;
use crate::ledger::{ApplyError, Line, SkuRules, SkuState};
use crate::linelog::{LineDelta, LineLogWriter};
use crate::store::StoreError;
use crate::windows::{FinalWindow, WindowClock, WindowConfig};

/// Default dedup horizon: 7 days of event time (SPEC v2: webhook senders retry for ~3 days).
pub const DEFAULT_DEDUP_HORIZON_MS: i64 = 7 * 86_400_000;
/// Default line horizon: a closed order line is remembered for 35 days of event time (SPEC v2).
pub const DEFAULT_LINE_HORIZON_MS: i64 = 35 * 86_400_000;

/// The rules' parameters, shared by every shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineConfig {
    /// Window sizes and lateness.
    pub windows: WindowConfig,
    /// How long (event time, per SKU) an event id is remembered.
    pub dedup_horizon_ms: i64,
    /// How long (event time, per SKU) a closed order line is remembered.
    pub line_horizon_ms: i64,
    /// Reorder point of SKUs without their own (0 = low-stock alerts off).
    pub default_reorder_point: i64,
    /// Per-SKU reorder points.
    pub reorder_points: HashMap<String, i64>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            windows: WindowConfig::default(),
            dedup_horizon_ms: DEFAULT_DEDUP_HORIZON_MS,
            line_horizon_ms: DEFAULT_LINE_HORIZON_MS,
            default_reorder_point: 0,
            reorder_points: HashMap::new(),
        }
    }
}

impl EngineConfig {
    /// The reorder point of a SKU.
    pub fn reorder_point(&self, sku: &str) -> i64 {
        self.reorder_points.get(sku).copied().unwrap_or(self.default_reorder_point)
    }
}

/// Counters of what the engine did, cumulative.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EngineStats {
    /// Events applied.
    pub applied: u64,
    /// Events skipped as duplicates.
    pub duplicates: u64,
    /// Events late for at least one window.
    pub late: u64,
    /// Cancellations without an open line.
    pub unmatched: u64,
    /// Placements of an order line that exists (open or remembered): re-sent, no change.
    pub resent_placements: u64,
    /// Valid events whose money could not be booked (dead-lettered by the caller).
    pub rejected: u64,
    /// Windows finalised.
    pub windows_final: u64,
    /// Effects produced.
    pub effects: u64,
}

/// Approximate memory of a shard engine, by part.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemoryUse {
    /// SKU slots, names, index and open windows.
    pub skus: usize,
    /// Order lines, open and remembered.
    pub lines: usize,
    /// Live dedup entries.
    pub dedup: usize,
}

/// The result of applying one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// The event changed the state.
    Applied,
    /// The event id was already applied: nothing changed.
    Duplicate,
    /// The event cannot be applied (SPEC v2: dead-letter it with this reason); nothing changed.
    Rejected(ApplyError),
}

/// Everything a shard's state is made of, in a canonical order (SKUs by name).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ShardSnapshot {
    /// Largest event time seen on the shard (the watermark's base).
    pub max_ts: Option<i64>,
    /// Every SKU's state.
    pub skus: Vec<(String, SkuState)>,
    /// Live dedup entries.
    pub dedup: Vec<DedupEntry>,
}

impl ShardSnapshot {
    /// Merges the snapshots of several shards, keeping the SKUs `keep` accepts and their dedup
    /// entries (a reshard: a child takes over the SKUs of its parents whose hash keys it owns).
    pub fn merge(parts: impl IntoIterator<Item = ShardSnapshot>, keep: impl Fn(&str) -> bool) -> ShardSnapshot {
        let mut out = ShardSnapshot::default();
        let mut dedup = Vec::new();
        for part in parts {
            out.max_ts = out.max_ts.max(part.max_ts);
            out.skus.extend(part.skus.into_iter().filter(|(sku, _)| keep(sku)));
            dedup.extend(part.dedup);
        }
        out.skus.sort_by(|a, b| a.0.cmp(&b.0));
        out.skus.dedup_by(|a, b| a.0 == b.0);
        let kept: std::collections::HashSet<u64> = out.skus.iter().map(|(s, _)| sku_id(s)).collect();
        dedup.retain(|e| kept.contains(&e.sku));
        dedup.sort_unstable_by_key(|e| (e.key, std::cmp::Reverse(e.ts)));
        dedup.dedup_by_key(|e| e.key);
        out.dedup = dedup;
        out
    }
}

/// How the dedup entries of a commit are stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DedupDelta {
    /// Entries added since the previous commit.
    Append(Vec<u8>),
    /// The whole live set, replacing every earlier chunk (compaction).
    Replace(Vec<u8>),
}

/// What changed since the previous commit.
#[derive(Debug)]
pub struct EngineDelta {
    /// Dirty SKUs and their full new state, encoded with [`SkuState::encode`].
    pub states: EncodedStates,
    /// Effects produced, in order.
    pub effects: Vec<Effect>,
    /// Dedup entries to persist.
    pub dedup: DedupDelta,
    /// The shard's largest event time.
    pub max_ts: Option<i64>,
    /// SKUs in `states` whose state was never committed under this shard before (new SKUs, and
    /// every SKU a child adopts): a store that lists a shard's SKUs adds them to its listing.
    pub new_skus: Vec<String>,
    /// With lines kept apart ([`ShardEngine::keep_lines_apart`]): the order-line changes, and
    /// `states` are heads without lines. `None`: `states` carry every line.
    pub lines: Option<LineDelta>,
}

/// SKUs and their encoded states, back to back in two buffers: a commit of 25,000 dirty SKUs
/// allocates a few times, not twice a SKU (the name and the encoding were each a `String`/`Vec`,
/// allocated by the worker and freed by the store's thread).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EncodedStates {
    names: String,
    states: Vec<u8>,
    /// Where each SKU's name ends in `names` and its state in `states` (each starts where the
    /// previous one ended): lengths taken after whole pushes, so always within the buffers and,
    /// in `names`, on a character boundary.
    ends: Vec<(usize, usize)>,
}

impl EncodedStates {
    /// Number of SKUs.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// True when no SKU is in it.
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// Bytes of the encoded states (names not counted).
    pub fn state_bytes(&self) -> usize {
        self.states.len()
    }

    /// Adds a SKU whose state `encode` appends to the buffer it is given (on an error, nothing
    /// is added).
    pub fn push_with<E>(&mut self, sku: &str, encode: impl FnOnce(&mut Vec<u8>) -> Result<(), E>) -> Result<(), E> {
        let start = self.states.len();
        if let Err(e) = encode(&mut self.states) {
            self.states.truncate(start);
            return Err(e);
        }
        self.names.push_str(sku);
        self.ends.push((self.names.len(), self.states.len()));
        Ok(())
    }

    /// Adds a SKU and its encoded state.
    pub fn push(&mut self, sku: &str, state: &[u8]) {
        self.states.extend_from_slice(state);
        self.names.push_str(sku);
        self.ends.push((self.names.len(), self.states.len()));
    }

    /// The SKUs and their states, in the order they were added.
    pub fn iter(&self) -> EncodedStatesIter<'_> {
        EncodedStatesIter { of: self, next: 0, name_start: 0, state_start: 0 }
    }
}

/// The items of [`EncodedStates`], in order.
#[derive(Debug, Clone)]
pub struct EncodedStatesIter<'a> {
    of: &'a EncodedStates,
    next: usize,
    name_start: usize,
    state_start: usize,
}

impl<'a> Iterator for EncodedStatesIter<'a> {
    type Item = (&'a str, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        let &(name_end, state_end) = self.of.ends.get(self.next)?;
        // Cannot panic: the ends are lengths of the buffers after whole pushes, in increasing
        // order, and a name end follows a whole `&str` (see `EncodedStates::ends`).
        let item = (&self.of.names[self.name_start..name_end], &self.of.states[self.state_start..state_end]);
        (self.next, self.name_start, self.state_start) = (self.next + 1, name_end, state_end);
        Some(item)
    }
}

impl<'a> IntoIterator for &'a EncodedStates {
    type Item = (&'a str, &'a [u8]);
    type IntoIter = EncodedStatesIter<'a>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl<S: AsRef<str>, B: AsRef<[u8]>> FromIterator<(S, B)> for EncodedStates {
    fn from_iter<I: IntoIterator<Item = (S, B)>>(items: I) -> Self {
        let mut out = EncodedStates::default();
        for (sku, state) in items {
            out.push(sku.as_ref(), state.as_ref());
        }
        out
    }
}

#[derive(Debug)]
struct Slot {
    name: Box<str>,
    state: SkuState,
    reorder_point: i64,
    dirty: bool,
    /// Committed under this shard before (restored from it, or in an earlier delta).
    listed: bool,
}

/// The state of one shard in memory.
#[derive(Debug)]
pub struct ShardEngine {
    cfg: Arc<EngineConfig>,
    hasher: FixedState,
    table: HashTable<u32>,
    skus: Vec<Slot>,
    dirty: Vec<u32>,
    dedup: DedupIndex,
    dedup_base_bytes: usize,
    dedup_appended_bytes: usize,
    force_dedup_replace: bool,
    clock: WindowClock,
    effects: Vec<Effect>,
    finals: Vec<FinalWindow>,
    collect_finals: bool,
    stats: EngineStats,
    scratch: Vec<(u32, u8, i64)>,
    lines: LineTracking,
}

/// What the engine remembers to write order lines as changes ([`crate::linelog`]).
#[derive(Debug, Default)]
struct LineTracking {
    /// On: deltas carry heads and line changes.
    apart: bool,
    /// (SKU slot, line key) changed since the last delta (repeats allowed).
    changed: Vec<(u32, u64)>,
    /// (SKU slot, event time) of each sweep of remembered lines since the last delta.
    sweeps: Vec<(u32, i64)>,
    base_bytes: usize,
    appended_bytes: usize,
    force_replace: bool,
    scratch: Vec<(u64, Option<Line>)>,
}

/// Compact the dedup chunks once appended bytes exceed the base and this floor.
const DEDUP_COMPACT_FLOOR_BYTES: usize = 4 << 20;
/// Replace the stored line log once appended bytes exceed the last full write and this floor.
const LINES_COMPACT_FLOOR_BYTES: usize = 8 << 20;
/// About what one live line takes in a full write of the line log (key, value, framing).
const LINE_BYTES: usize = 20;

impl ShardEngine {
    /// An empty shard.
    pub fn new(cfg: Arc<EngineConfig>) -> Self {
        let horizon = cfg.dedup_horizon_ms;
        ShardEngine {
            cfg,
            hasher: FixedState::with_seed(0x5f0c_f10e),
            table: HashTable::new(),
            skus: Vec::new(),
            dirty: Vec::new(),
            dedup: DedupIndex::new(horizon),
            dedup_base_bytes: 0,
            dedup_appended_bytes: 0,
            force_dedup_replace: false,
            clock: WindowClock::default(),
            effects: Vec::new(),
            finals: Vec::new(),
            collect_finals: false,
            stats: EngineStats::default(),
            scratch: Vec::new(),
            lines: LineTracking::default(),
        }
    }

    /// A shard restored from a snapshot (nothing is dirty afterwards).
    pub fn restore(cfg: Arc<EngineConfig>, snapshot: ShardSnapshot) -> Self {
        let mut engine = ShardEngine::new(cfg);
        engine.clock = WindowClock::resume(snapshot.max_ts);
        let mut skus = snapshot.skus;
        skus.sort_by_key(|(_, s)| s.ordinal);
        // Ordinals are dense when written by one engine; SKUs merged from several shards (a
        // reshard) are renumbered. Dedup entries name SKUs by id, not ordinal.
        for (name, mut state) in skus {
            let idx = engine.skus.len() as u32;
            state.ordinal = idx;
            // Window sizes removed from the config since the snapshot: those open windows can
            // never be final under this config; they are dropped rather than tracked.
            state.windows.retain(|w| engine.cfg.windows.size_ms(w.size).is_some());
            for w in &state.windows {
                engine.clock.track(&engine.cfg.windows, idx, w);
            }
            engine.push_slot(name.into_boxed_str(), state);
        }
        let by_id: HashMap<u64, u32> =
            engine.skus.iter().enumerate().map(|(i, s)| (sku_id(&s.name), i as u32)).collect();
        let stored = snapshot.dedup.len();
        engine.dedup.restore(snapshot.dedup.into_iter().filter_map(|e| by_id.get(&e.sku).map(|&o| (e.key, e.ts, o))));
        // What is stored but no longer live (past the horizon) counts as already appended: a
        // process restarted often (a crash loop, daily deploys) must still compact, or the stored
        // chunks would grow with every id ever seen.
        let skus = &engine.skus;
        engine.dedup.prune(|ordinal| skus.get(ordinal as usize).and_then(|s| s.state.max_ts));
        let live = engine.dedup.len();
        engine.dedup_base_bytes = live * ENTRY_BYTES;
        engine.dedup_appended_bytes = stored.saturating_sub(live) * ENTRY_BYTES;
        engine
    }

    /// A shard that takes over SKUs from other shards (the parents of a reshard): restored from
    /// their merged snapshot, with every SKU dirty and the whole dedup set due, so that the
    /// first commit stores all of it under this shard.
    pub fn adopt(cfg: Arc<EngineConfig>, snapshot: ShardSnapshot) -> Self {
        let mut engine = ShardEngine::restore(cfg, snapshot);
        for idx in 0..engine.skus.len() as u32 {
            engine.skus[idx as usize].listed = false;
            engine.mark_dirty(idx);
        }
        engine.dedup_base_bytes = 0;
        engine.force_dedup_replace = true;
        engine.lines.force_replace = true;
        engine
    }

    /// Deltas from now on carry SKU heads without their order lines, and the lines' changes
    /// apart ([`crate::linelog`]; for stores that say [`crate::StateStore::keeps_lines_apart`]).
    /// `stored_log_bytes` is what the shard's stored line log holds: what it holds beyond the
    /// live lines counts as appended, so that a process restarted often still compacts it.
    pub fn keep_lines_apart(&mut self, stored_log_bytes: u64) {
        let live: usize = self.skus.iter().map(|s| s.state.lines.len()).sum();
        let t = &mut self.lines;
        t.apart = true;
        t.base_bytes = live * LINE_BYTES;
        t.appended_bytes = usize::try_from(stored_log_bytes).unwrap_or(usize::MAX).saturating_sub(t.base_bytes);
    }

    /// The next delta carries the whole live dedup set (a store whose entries expire by wall
    /// clock rewrites them before they do).
    pub fn rewrite_dedup(&mut self) {
        self.force_dedup_replace = true;
    }

    /// Keep finalised windows for [`ShardEngine::take_final_windows`] (off by default).
    pub fn collect_final_windows(&mut self, on: bool) {
        self.collect_finals = on;
    }

    /// The configuration.
    pub fn config(&self) -> &Arc<EngineConfig> {
        &self.cfg
    }

    fn push_slot(&mut self, name: Box<str>, state: SkuState) -> u32 {
        let idx = self.skus.len() as u32;
        let hash = self.hasher.hash_one(&*name);
        let (skus, hasher) = (&self.skus, &self.hasher);
        self.table.insert_unique(hash, idx, |&i| hasher.hash_one(&*skus[i as usize].name));
        let reorder_point = self.cfg.reorder_point(&name);
        // Restored SKUs are listed; `intern` marks a new one unlisted.
        self.skus.push(Slot { name, state, reorder_point, dirty: false, listed: true });
        idx
    }

    /// The SKU's slot, and whether it was just created.
    fn intern(&mut self, sku: &str) -> (u32, bool) {
        let hash = self.hasher.hash_one(sku);
        if let Some(&idx) = self.table.find(hash, |&i| &*self.skus[i as usize].name == sku) {
            return (idx, false);
        }
        let ordinal = self.skus.len() as u32;
        let idx = self.push_slot(sku.into(), SkuState { ordinal, ..SkuState::default() });
        self.skus[idx as usize].listed = false;
        (idx, true)
    }

    /// Forgets the SKU created last (its first event was rejected).
    fn drop_last_slot(&mut self) {
        if let Some(slot) = self.skus.pop() {
            let idx = self.skus.len() as u32;
            let hash = self.hasher.hash_one(&*slot.name);
            if let Ok(entry) = self.table.find_entry(hash, |&i| i == idx) {
                entry.remove();
            }
        }
    }

    fn mark_dirty(&mut self, idx: u32) {
        let slot = &mut self.skus[idx as usize];
        if !slot.dirty {
            slot.dirty = true;
            self.dirty.push(idx);
        }
    }

    /// Applies one validated event: dedup, ledger rules, windows, watermark. A rejected event
    /// changes nothing, not even the dedup index (SPEC v2: dead-letter it).
    pub fn apply(&mut self, ev: &Event<'_>) -> Applied {
        let (idx, created) = self.intern(&ev.sku);
        let key = DedupEntry::key(&ev.sku, &ev.id);
        let slot = &mut self.skus[idx as usize];
        if self.dedup.is_duplicate(key, idx, slot.state.max_ts) {
            self.stats.duplicates += 1;
            return Applied::Duplicate;
        }
        let effects_before = self.effects.len();
        let rules = SkuRules { reorder_point: slot.reorder_point, line_horizon_ms: self.cfg.line_horizon_ms };
        let out = match slot.state.apply(ev, &rules, &mut self.effects) {
            Ok(out) => out,
            Err(e) => {
                self.stats.rejected += 1;
                if created {
                    self.drop_last_slot();
                }
                return Applied::Rejected(e);
            }
        };
        self.dedup.insert(key, ev.ts, idx);
        if self.lines.apart {
            if let Some(now) = out.swept {
                self.lines.sweeps.push((idx, now));
            }
            if let Some(line) = out.line {
                self.lines.changed.push((idx, line));
            }
        }
        let late = self.clock.contribute(&self.cfg.windows, idx, &mut slot.state.windows, ev.ts, &out.contribution);
        self.stats.applied += 1;
        self.stats.late += u64::from(late > 0);
        self.stats.unmatched += u64::from(out.unmatched);
        self.stats.resent_placements += u64::from(out.resent);
        self.stats.effects += (self.effects.len() - effects_before) as u64;
        self.mark_dirty(idx);
        self.advance_clock(ev.ts);
        Applied::Applied
    }

    /// Records an event that the stored state already reflects (a replay past an interrupted,
    /// split commit): its id joins the dedup index and its time the watermark; nothing else
    /// changes. The SKU must already be known.
    pub fn remember(&mut self, ev: &Event<'_>) {
        let (idx, _) = self.intern(&ev.sku);
        let key = DedupEntry::key(&ev.sku, &ev.id);
        let max_ts = self.skus[idx as usize].state.max_ts;
        self.dedup.check_and_insert(key, ev.ts, idx, max_ts);
        self.advance_clock(ev.ts);
    }

    fn advance_clock(&mut self, ts: i64) {
        let mut done = std::mem::take(&mut self.scratch);
        self.clock.advance(&self.cfg.windows, ts, &mut done);
        for &(sku, size, start) in &done {
            let slot = &mut self.skus[sku as usize];
            if let Some(pos) = slot.state.windows.iter().position(|w| w.size == size && w.start == start) {
                let w = slot.state.windows.swap_remove(pos);
                if slot.state.windows.is_empty() {
                    // Most SKUs are idle most of the time: give their window vector back.
                    slot.state.windows = Vec::new();
                }
                self.stats.windows_final += 1;
                if self.collect_finals {
                    self.finals.push(FinalWindow {
                        sku: slot.name.to_string(),
                        size_ms: self.cfg.windows.size_ms(size).unwrap_or(0),
                        start,
                        counts: w.counts,
                    });
                }
                self.mark_dirty(sku);
            }
        }
        done.clear();
        self.scratch = done;
    }

    /// Windows finalised since the last call (when collection is on).
    pub fn take_final_windows(&mut self) -> Vec<FinalWindow> {
        std::mem::take(&mut self.finals)
    }

    /// Cumulative counters.
    pub fn stats(&self) -> EngineStats {
        self.stats
    }

    /// Number of SKUs on the shard.
    pub fn sku_count(&self) -> usize {
        self.skus.len()
    }

    /// The state of one SKU, if the shard has seen it.
    pub fn sku(&self, sku: &str) -> Option<&SkuState> {
        let hash = self.hasher.hash_one(sku);
        self.table.find(hash, |&i| &*self.skus[i as usize].name == sku).map(|&i| &self.skus[i as usize].state)
    }

    /// True when something was applied since the last [`ShardEngine::take_delta`].
    pub fn is_dirty(&self) -> bool {
        !self.dirty.is_empty() || !self.effects.is_empty()
    }

    /// Effects produced since the last delta, without taking them.
    pub fn pending_effects(&self) -> &[Effect] {
        &self.effects
    }

    /// Takes the effects produced since the last delta, leaving dirty SKUs as they are (for a
    /// straight pass that never persists: no state is encoded).
    pub fn take_effects(&mut self) -> Vec<Effect> {
        std::mem::take(&mut self.effects)
    }

    /// Takes what changed since the previous call: dirty SKUs (encoded), effects, dedup entries.
    pub fn take_delta(&mut self) -> Result<EngineDelta, StoreError> {
        let mut states = EncodedStates::default();
        let mut new_skus = Vec::new();
        for idx in self.dirty.drain(..) {
            let slot = &mut self.skus[idx as usize];
            slot.dirty = false;
            if !slot.listed {
                slot.listed = true;
                new_skus.push(slot.name.to_string());
            }
            let (apart, state) = (self.lines.apart, &mut slot.state);
            states.push_with(
                &slot.name,
                |out| if apart { state.encode_head_into(out) } else { state.encode_into(out) },
            )?;
        }
        let lines = if self.lines.apart { Some(self.take_line_delta()?) } else { None };
        self.dedup_appended_bytes += self.dedup.pending_len() * ENTRY_BYTES;
        let skus = &self.skus;
        let id_of = |ordinal: u32| skus.get(ordinal as usize).map_or(0, |s| sku_id(&s.name));
        // Once what was appended since the last look outgrows what was stored then, expired ids
        // are pruned from memory; the stored rows are rewritten only if more than half of them
        // are dead. While the history is shorter than the horizon nothing is dead, and rewriting
        // the whole set at every doubling wrote it about twice more (10 M events: ~640 MB, and
        // a transient copy of the set in memory).
        let look = self.force_dedup_replace
            || self.dedup_appended_bytes > self.dedup_base_bytes.max(DEDUP_COMPACT_FLOOR_BYTES);
        if look {
            self.dedup.prune(|ordinal| skus.get(ordinal as usize).and_then(|s| s.state.max_ts));
        }
        let stored = self.dedup_base_bytes + self.dedup_appended_bytes;
        let live = self.dedup.len() * ENTRY_BYTES;
        let dedup = if self.force_dedup_replace
            || (look && stored.saturating_sub(live) > live.max(DEDUP_COMPACT_FLOOR_BYTES))
        {
            self.force_dedup_replace = false;
            self.dedup.drain_pending(id_of, drop);
            let mut bytes = Vec::new();
            self.dedup.encode_live(id_of, &mut bytes);
            self.dedup_base_bytes = bytes.len();
            self.dedup_appended_bytes = 0;
            DedupDelta::Replace(bytes)
        } else if look {
            // Kept as stored: the next look is when appends outgrow all of it.
            let mut bytes = Vec::with_capacity(self.dedup.pending_len() * ENTRY_BYTES);
            self.dedup.drain_pending(id_of, |e| e.encode_into(&mut bytes));
            self.dedup_base_bytes = stored;
            self.dedup_appended_bytes = 0;
            DedupDelta::Append(bytes)
        } else {
            let mut bytes = Vec::with_capacity(self.dedup.pending_len() * ENTRY_BYTES);
            self.dedup.drain_pending(id_of, |e| e.encode_into(&mut bytes));
            DedupDelta::Append(bytes)
        };
        Ok(EngineDelta {
            states,
            effects: std::mem::take(&mut self.effects),
            dedup,
            max_ts: self.clock.max_ts(),
            new_skus,
            lines,
        })
    }

    /// The order-line changes since the last delta, or every live line when the log is due for
    /// a rewrite (see [`crate::linelog`]).
    fn take_line_delta(&mut self) -> Result<LineDelta, StoreError> {
        let horizon = self.cfg.line_horizon_ms;
        let t = &mut self.lines;
        let mut w = LineLogWriter::default();
        if t.force_replace || t.appended_bytes > t.base_bytes.max(LINES_COMPACT_FLOOR_BYTES) {
            t.changed.clear();
            t.sweeps.clear();
            for slot in self.skus.iter().filter(|s| !s.state.lines.is_empty()) {
                w.reset(sku_id(&slot.name), &slot.state.lines)?;
            }
            let delta = w.finish(true);
            t.force_replace = false;
            t.base_bytes = delta.len();
            t.appended_bytes = 0;
            return Ok(delta);
        }
        // By slot, in order; a slot's last sweep is its latest (a SKU's time only moves on).
        t.changed.sort_unstable();
        t.changed.dedup();
        t.sweeps.sort_by_key(|&(idx, _)| idx);
        let (mut c, mut s) = (0, 0);
        while c < t.changed.len() || s < t.sweeps.len() {
            let idx = match (t.changed.get(c), t.sweeps.get(s)) {
                (Some(&(a, _)), Some(&(b, _))) => a.min(b),
                (Some(&(a, _)), None) => a,
                (None, Some(&(b, _))) => b,
                (None, None) => break,
            };
            let mut sweep = None;
            while let Some(&(_, now)) = t.sweeps.get(s).filter(|(i, _)| *i == idx) {
                sweep = Some((now, horizon));
                s += 1;
            }
            let state = &self.skus[idx as usize].state;
            t.scratch.clear();
            while let Some(&(_, key)) = t.changed.get(c).filter(|(i, _)| *i == idx) {
                t.scratch.push((key, state.lines.get(key)));
                c += 1;
            }
            w.record(sku_id(&self.skus[idx as usize].name), false, sweep, &t.scratch)?;
        }
        t.changed.clear();
        t.sweeps.clear();
        let delta = w.finish(false);
        t.appended_bytes = t.appended_bytes.saturating_add(delta.len());
        Ok(delta)
    }

    /// A canonical snapshot of everything (SKUs sorted by name, dedup entries by key).
    pub fn snapshot(&self) -> ShardSnapshot {
        let mut skus: Vec<(String, SkuState)> =
            self.skus.iter().map(|s| (s.name.to_string(), s.state.clone())).collect();
        skus.sort_by(|a, b| a.0.cmp(&b.0));
        let id_of = |ordinal: u32| self.skus.get(ordinal as usize).map_or(0, |s| sku_id(&s.name));
        ShardSnapshot { max_ts: self.clock.max_ts(), skus, dedup: self.dedup.entries(id_of) }
    }

    /// Approximate memory held, by part.
    pub fn memory(&self) -> MemoryUse {
        let per_slot = std::mem::size_of::<Slot>() + std::mem::size_of::<u32>() + 1; // slot + index entry
        let skus = self.skus.capacity() * per_slot
            + self
                .skus
                .iter()
                .map(|s| s.name.len() + s.state.windows.capacity() * std::mem::size_of::<crate::windows::OpenWindow>())
                .sum::<usize>();
        let lines = self.skus.iter().map(|s| s.state.lines.heap_bytes()).sum();
        let dedup = self.dedup.memory_bytes();
        MemoryUse { skus, lines, dedup }
    }

    /// The dedup index's live entry count.
    pub fn dedup_len(&self) -> usize {
        self.dedup.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::decode;

    const T0: i64 = 1_795_737_600_000;

    fn engine() -> ShardEngine {
        ShardEngine::new(Arc::new(EngineConfig::default()))
    }

    #[test]
    fn encoded_states_keep_each_sku_with_its_bytes() {
        let mut s: EncodedStates = [("A", vec![1u8, 2]), ("", vec![]), ("Ünï", vec![3])].into_iter().collect();
        // A failed encoding leaves nothing behind.
        assert_eq!(
            s.push_with("X", |b| {
                b.push(9);
                Err("no")
            }),
            Err("no")
        );
        s.push("B", &[4, 5, 6]);
        let items: Vec<(&str, &[u8])> = s.iter().collect();
        assert_eq!(items, [("A", &[1u8, 2][..]), ("", &[][..]), ("Ünï", &[3][..]), ("B", &[4, 5, 6][..])]);
        assert_eq!((s.len(), s.state_bytes()), (4, 6));
        assert_eq!((&s).into_iter().count(), 4);
    }

    #[test]
    fn a_rejected_event_changes_nothing_and_can_be_sent_again() {
        let mut e = engine();
        let huge = format!(
            r#"{{"id":"h","type":"stock_received","sku":"NEW","ts":{T0},"qty":1000000000,"unit_cost":"1000000000000000","currency":"USD"}}"#
        );
        assert!(matches!(e.apply(&decode(huge.as_bytes()).unwrap()), Applied::Rejected(r) if r.field == "unit_cost"));
        assert_eq!((e.sku_count(), e.dedup_len(), e.is_dirty()), (0, 0, false), "no trace of the SKU");
        assert_eq!(e.stats().rejected, 1);
        // The same id with a sane cost is a new event, not a duplicate.
        let fixed = format!(
            r#"{{"id":"h","type":"stock_received","sku":"NEW","ts":{T0},"qty":1000000000,"unit_cost":"1","currency":"USD"}}"#
        );
        assert_eq!(e.apply(&decode(fixed.as_bytes()).unwrap()), Applied::Applied);
        assert_eq!(e.sku("NEW").unwrap().on_hand, 1_000_000_000);
    }

    #[test]
    fn sku_slot_size_is_budgeted() {
        // docs/BENCHMARKS.md reports bytes per SKU; this keeps the slot from growing unnoticed.
        let size = std::mem::size_of::<Slot>();
        assert!(size <= 320, "Slot is {size} bytes");
    }

    #[test]
    fn a_restore_under_fewer_window_sizes_drops_the_windows_it_no_longer_has() {
        let mut e = engine();
        let ev = format!(r#"{{"id":"p","type":"order_placed","sku":"S","ts":{T0},"qty":1,"order_id":"o"}}"#);
        e.apply(&decode(ev.as_bytes()).unwrap());
        assert_eq!(e.sku("S").unwrap().windows.len(), 2, "minute and hour");
        let hour_only = EngineConfig {
            windows: crate::windows::WindowConfig::new(vec![crate::windows::HOUR_MS], 0).unwrap(),
            ..EngineConfig::default()
        };
        let mut restored = ShardEngine::restore(Arc::new(hour_only), e.snapshot());
        assert!(restored.sku("S").unwrap().windows.iter().all(|w| w.size == 0));
        // A day later every window is final; nothing indexes past the configured sizes.
        let later = format!(r#"{{"id":"q","type":"stock_adjusted","sku":"S","ts":{},"delta":1}}"#, T0 + 86_400_000);
        assert_eq!(restored.apply(&decode(later.as_bytes()).unwrap()), Applied::Applied);
        assert!(restored.stats().windows_final >= 1);
    }

    #[test]
    fn duplicates_are_skipped_and_counted() {
        let mut e = engine();
        let ev = br#"{"id":"a","type":"stock_received","sku":"S","ts":1795737600000,"qty":3}"#;
        assert_eq!(e.apply(&decode(ev).unwrap()), Applied::Applied);
        assert_eq!(e.apply(&decode(ev).unwrap()), Applied::Duplicate);
        assert_eq!(e.sku("S").unwrap().on_hand, 3);
        assert_eq!(e.stats().duplicates, 1);
    }

    #[test]
    fn delta_holds_dirty_skus_once_and_resets() {
        let mut e = engine();
        for (i, sku) in ["A", "B", "A"].iter().enumerate() {
            let json =
                format!(r#"{{"id":"{i}","type":"stock_adjusted","sku":"{sku}","ts":{},"delta":1}}"#, T0 + i as i64);
            e.apply(&decode(json.as_bytes()).unwrap());
        }
        let d = e.take_delta().unwrap();
        let names: Vec<_> = d.states.iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["A", "B"]);
        let DedupDelta::Append(bytes) = d.dedup else { panic!() };
        assert_eq!(bytes.len(), 3 * ENTRY_BYTES);
        assert!(!e.is_dirty());
        assert!(e.take_delta().unwrap().states.is_empty());
        assert_eq!(d.new_skus, ["A", "B"], "both SKUs are new to the shard");
        // Touched again: listed already. A new SKU is new once; a restore lists everything.
        for (i, sku) in ["A", "C"].iter().enumerate() {
            let json = format!(r#"{{"id":"n{i}","type":"stock_adjusted","sku":"{sku}","ts":{T0},"delta":1}}"#);
            e.apply(&decode(json.as_bytes()).unwrap());
        }
        assert_eq!(e.take_delta().unwrap().new_skus, ["C"]);
        let mut restored = ShardEngine::restore(Arc::clone(e.config()), e.snapshot());
        let json = format!(r#"{{"id":"r","type":"stock_adjusted","sku":"B","ts":{T0},"delta":1}}"#);
        restored.apply(&decode(json.as_bytes()).unwrap());
        assert!(restored.take_delta().unwrap().new_skus.is_empty());
        // A child adopting SKUs lists them all under itself.
        let mut child = ShardEngine::adopt(Arc::clone(e.config()), e.snapshot());
        assert_eq!(child.take_delta().unwrap().new_skus, ["A", "B", "C"]);
    }

    #[test]
    fn live_dedup_ids_are_appended_not_rewritten_while_none_has_expired() {
        // 1.2 M ids within the horizon over 30 commits: every stored id is live, so no commit
        // rewrites them (each rewrite would copy the whole set again).
        let mut e = engine();
        for round in 0..30i64 {
            for i in 0..40_000 {
                let ts = T0 + round * 40_000 + i;
                let json = format!(
                    r#"{{"id":"r{round}-{i}","type":"stock_adjusted","sku":"S{}","ts":{ts},"delta":1}}"#,
                    i % 7
                );
                assert_eq!(e.apply(&decode(json.as_bytes()).unwrap()), Applied::Applied);
            }
            match e.take_delta().unwrap().dedup {
                DedupDelta::Append(bytes) => assert_eq!(bytes.len(), 40_000 * ENTRY_BYTES),
                DedupDelta::Replace(_) => panic!("commit {round} rewrote 1.2 M live ids"),
            }
        }
        assert_eq!(e.dedup_len(), 1_200_000);
    }

    #[test]
    fn stored_dedup_ids_stay_bounded_when_every_commit_is_followed_by_a_restart() {
        // A crash loop or daily deploys: restore, a batch of events, one commit, again. What is
        // stored must stay about the live set, not every id ever seen.
        let cfg = Arc::new(EngineConfig { dedup_horizon_ms: 60_000, ..EngineConfig::default() });
        let mut stored: Vec<crate::dedup::DedupEntry> = Vec::new();
        let mut skus = Vec::new();
        let mut max_ts = None;
        let per_round = 40_000;
        for round in 0..12i64 {
            let snapshot = ShardSnapshot { max_ts, skus: skus.clone(), dedup: stored.clone() };
            let mut e = ShardEngine::restore(Arc::clone(&cfg), snapshot);
            for i in 0..per_round {
                let ts = T0 + round * 600_000 + i;
                let json = format!(r#"{{"id":"r{round}-{i}","type":"stock_adjusted","sku":"S","ts":{ts},"delta":1}}"#);
                assert_eq!(e.apply(&decode(json.as_bytes()).unwrap()), Applied::Applied);
            }
            match e.take_delta().unwrap().dedup {
                DedupDelta::Append(bytes) => stored.extend(crate::dedup::DedupEntry::decode_all(&bytes).unwrap()),
                DedupDelta::Replace(bytes) => stored = crate::dedup::DedupEntry::decode_all(&bytes).unwrap(),
            }
            let snap = e.snapshot();
            (skus, max_ts) = (snap.skus, snap.max_ts);
        }
        let floor = DEDUP_COMPACT_FLOOR_BYTES / ENTRY_BYTES;
        assert!(
            stored.len() <= floor + 2 * per_round as usize,
            "{} ids stored after 12 restarts of {per_round} (live at most {per_round})",
            stored.len()
        );
        assert_eq!(skus[0].1.on_hand, 12 * per_round, "nothing was lost to the compactions");
    }

    #[test]
    fn a_child_adopts_its_parents_skus_and_dedup_ids_in_its_range() {
        let ev = |id: &str, sku: &str, ts: i64| {
            format!(r#"{{"id":"{id}","type":"stock_adjusted","sku":"{sku}","ts":{},"delta":1}}"#, T0 + ts)
        };
        // Two parents (a merge), each with SKUs the child keeps ("K*") and one it does not.
        let mut parents = [engine(), engine()];
        for (p, e) in parents.iter_mut().enumerate() {
            for (i, sku) in [format!("K{p}"), format!("X{p}")].iter().enumerate() {
                e.apply(&decode(ev(&format!("{p}-{i}"), sku, 10 + p as i64).as_bytes()).unwrap());
            }
        }
        let merged = ShardSnapshot::merge(parents.iter().map(ShardEngine::snapshot), |sku| sku.starts_with('K'));
        assert_eq!(merged.max_ts, Some(T0 + 11));
        assert_eq!(merged.skus.iter().map(|(s, _)| s.as_str()).collect::<Vec<_>>(), ["K0", "K1"]);
        assert_eq!(merged.dedup.len(), 2, "only the kept SKUs' ids");
        let mut child = ShardEngine::adopt(Arc::new(EngineConfig::default()), merged);
        // The parents' ids are remembered for the SKUs that moved.
        assert_eq!(child.apply(&decode(ev("1-0", "K1", 12).as_bytes()).unwrap()), Applied::Duplicate);
        assert_eq!(child.apply(&decode(ev("1-9", "K1", 12).as_bytes()).unwrap()), Applied::Applied);
        // The first delta stores everything under the child: all SKUs and the whole dedup set.
        let d = child.take_delta().unwrap();
        assert_eq!(d.states.len(), 2);
        let DedupDelta::Replace(bytes) = d.dedup else { panic!("expected a full dedup set") };
        assert_eq!(bytes.len(), 3 * ENTRY_BYTES);
        let restored = ShardEngine::restore(Arc::new(EngineConfig::default()), child.snapshot());
        assert_eq!(restored.snapshot(), child.snapshot());
        // Later deltas are incremental again.
        assert!(matches!(child.take_delta().unwrap().dedup, DedupDelta::Append(b) if b.is_empty()));
    }
}
