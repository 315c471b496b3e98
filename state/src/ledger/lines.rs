//! [`Lines`]: a SKU's order lines, open and remembered, by [`super::line_key`].
//!
//! A hash map whose entries are 20 bytes (key and line in 4-byte words) instead of the 24 of a
//! `HashMap<u64, Line>` (an 8-byte-aligned 16-byte line): a hot SKU remembers 100,000s of lines,
//! and a shard millions. A line keeps `shipped` and, in the same two words, its `remaining` units
//! while open or its `closed_ts` once closed — the one meaningful while the other is not
//! ([`Line`]). So an open line reads back with `closed_ts` 0, and a closed line's `closed_ts`
//! below 0 (no valid event has one: SPEC §1 bounds `ts` to 2000–2099) reads back as 0; every
//! other line reads back exactly.
//!
//! Serialised as the map `line key → Line` it stands for, so stored states read the same.

use std::collections::HashMap;
use std::fmt;
use std::hash::{Hash, Hasher};

use foldhash::fast::FixedState;
use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::Line;

/// A line key in two 4-byte words.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Key([u32; 2]);

impl Key {
    fn new(key: u64) -> Self {
        Key([key as u32, (key >> 32) as u32])
    }

    fn get(self) -> u64 {
        (u64::from(self.0[1]) << 32) | u64::from(self.0[0])
    }
}

impl Hash for Key {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.get());
    }
}

/// A line in three 4-byte words: `shipped`, then `remaining` and [`OPEN`] while open, or
/// `closed_ts` (low, high) once closed.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Packed([u32; 3]);

/// The third word of an open line (a `closed_ts` ≥ 0 never has its top bit set).
const OPEN: u32 = 1 << 31;

impl Packed {
    fn new(line: Line) -> Self {
        if line.is_open() {
            Packed([line.shipped, line.remaining, OPEN])
        } else {
            let ts = line.closed_ts.max(0) as u64;
            Packed([line.shipped, ts as u32, (ts >> 32) as u32])
        }
    }

    fn line(self) -> Line {
        match self.0 {
            [shipped, remaining, OPEN] => Line { remaining, shipped, closed_ts: 0 },
            [shipped, lo, hi] => {
                Line { remaining: 0, shipped, closed_ts: ((u64::from(hi) << 32) | u64::from(lo)) as i64 }
            }
        }
    }
}

/// Order lines of a SKU (open and remembered), by [`super::line_key`] of the order id.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Lines(HashMap<Key, Packed, FixedState>);

impl Lines {
    /// The line under `key`.
    pub fn get(&self, key: u64) -> Option<Line> {
        self.0.get(&Key::new(key)).map(|p| p.line())
    }

    /// True if a line is under `key`.
    pub fn contains_key(&self, key: u64) -> bool {
        self.0.contains_key(&Key::new(key))
    }

    /// Changes the line under `key` in place (one lookup), returning what `change` returns.
    pub fn modify<R>(&mut self, key: u64, change: impl FnOnce(&mut Line) -> R) -> Option<R> {
        let packed = self.0.get_mut(&Key::new(key))?;
        let mut line = packed.line();
        let out = change(&mut line);
        *packed = Packed::new(line);
        Some(out)
    }

    /// Puts `line` under `key`.
    pub fn insert(&mut self, key: u64, line: Line) {
        self.0.insert(Key::new(key), Packed::new(line));
    }

    /// Removes the line under `key`, returning it.
    pub fn remove(&mut self, key: u64) -> Option<Line> {
        self.0.remove(&Key::new(key)).map(Packed::line)
    }

    /// Keeps the lines for which `keep` is true.
    pub fn retain(&mut self, mut keep: impl FnMut(u64, Line) -> bool) {
        self.0.retain(|k, p| keep(k.get(), p.line()));
    }

    /// Every line with its key, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, Line)> + '_ {
        self.0.iter().map(|(k, p)| (k.get(), p.line()))
    }

    /// Every line, in no particular order.
    pub fn values(&self) -> impl Iterator<Item = Line> + '_ {
        self.0.values().map(|p| p.line())
    }

    /// Number of lines.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True without lines.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Removes every line.
    pub fn clear(&mut self) {
        self.0.clear();
    }

    /// Bytes the map holds on the heap (entries and their control bytes).
    pub fn heap_bytes(&self) -> usize {
        self.0.capacity().saturating_mul(std::mem::size_of::<(Key, Packed)>().saturating_add(1))
    }
}

impl FromIterator<(u64, Line)> for Lines {
    fn from_iter<I: IntoIterator<Item = (u64, Line)>>(iter: I) -> Self {
        Lines(iter.into_iter().map(|(k, l)| (Key::new(k), Packed::new(l))).collect())
    }
}

impl fmt::Debug for Lines {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl Serialize for Lines {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.iter())
    }
}

impl<'de> Deserialize<'de> for Lines {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct LinesVisitor;
        impl<'de> Visitor<'de> for LinesVisitor {
            type Value = Lines;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map of order lines")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Lines, A::Error> {
                // A length from the input is not trusted with more than a modest reservation.
                let hint = map.size_hint().unwrap_or(0).min(1 << 16);
                let mut lines = Lines(HashMap::with_capacity_and_hasher(hint, FixedState::default()));
                while let Some((key, line)) = map.next_entry::<u64, Line>()? {
                    lines.insert(key, line);
                }
                Ok(lines)
            }
        }
        deserializer.deserialize_map(LinesVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_is_20_bytes() {
        assert_eq!(std::mem::size_of::<(Key, Packed)>(), 20);
    }

    #[test]
    fn lines_read_back_as_they_were_put() {
        let cases = [
            Line { remaining: 1, shipped: 0, closed_ts: 0 },
            Line { remaining: u32::MAX, shipped: u32::MAX, closed_ts: 0 },
            Line { remaining: 0, shipped: 0, closed_ts: 0 },
            Line { remaining: 0, shipped: 7, closed_ts: 946_684_800_000 },
            Line { remaining: 0, shipped: u32::MAX, closed_ts: 4_102_444_799_999 },
            Line { remaining: 0, shipped: 3, closed_ts: i64::MAX },
        ];
        let mut lines = Lines::default();
        for (i, line) in cases.iter().enumerate() {
            lines.insert(u64::MAX - i as u64, *line);
        }
        for (i, line) in cases.iter().enumerate() {
            assert_eq!(lines.get(u64::MAX - i as u64), Some(*line));
        }
        assert_eq!(lines.len(), cases.len());
        assert_eq!(lines.modify(u64::MAX - 3, |l| std::mem::replace(&mut l.shipped, 8)), Some(7));
        assert_eq!(lines.get(u64::MAX - 3), Some(Line { shipped: 8, ..cases[3] }));
        assert_eq!(lines.modify(1, |_| ()), None, "no line, no change");
        assert_eq!(lines.remove(u64::MAX), Some(cases[0]));
        assert!(!lines.contains_key(u64::MAX) && lines.get(u64::MAX).is_none());
    }

    #[test]
    fn what_is_not_meaningful_is_normalised() {
        let mut lines = Lines::default();
        lines.insert(1, Line { remaining: 2, shipped: 1, closed_ts: 5 });
        lines.insert(2, Line { remaining: 0, shipped: 1, closed_ts: -5 });
        assert_eq!(lines.get(1), Some(Line { remaining: 2, shipped: 1, closed_ts: 0 }), "open: closed_ts is not kept");
        assert_eq!(lines.get(2), Some(Line { remaining: 0, shipped: 1, closed_ts: 0 }), "closed before 1970: 0");
    }

    /// The encoding of the map it replaced, byte for byte (postcard, as stored), both ways.
    #[test]
    fn serialised_as_a_map_of_lines() {
        let plain: HashMap<u64, Line> = [
            (u64::MAX, Line { remaining: 3, shipped: 1, closed_ts: 0 }),
            (42, Line { remaining: 0, shipped: 9, closed_ts: 1_795_773_600_000 }),
        ]
        .into_iter()
        .collect();
        let lines: Lines = plain.iter().map(|(k, l)| (*k, *l)).collect();
        let decoded: Lines = postcard::from_bytes(&postcard::to_allocvec(&plain).unwrap()).unwrap();
        assert_eq!(decoded, lines);
        let back: HashMap<u64, Line> = postcard::from_bytes(&postcard::to_allocvec(&lines).unwrap()).unwrap();
        assert_eq!(back, plain);
        let json = serde_json::to_value(&lines).unwrap();
        assert_eq!(json, serde_json::to_value(&plain).unwrap());
    }
}
