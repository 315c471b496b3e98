//! Order lines kept apart from the SKU states, as a log of changes per shard.
//!
//! A hot SKU remembers hundreds of thousands of order lines (SPEC v2: closed lines for the line
//! horizon). Rewriting them whole with the SKU's state at every commit made the commit's cost
//! grow with the history: at 10 M events the embedded store wrote ~2.4 GB of lines, most of them
//! unchanged. A store that can append (the embedded store) keeps instead, per shard, a log of
//! what changed, and the SKU states without their lines ([`SkuState::encode_head`]):
//!
//! - a commit appends one [`Record`] per SKU whose lines changed: the last sweep of its
//!   remembered lines in the commit (`forget_lines(now, horizon)`), then each changed line's
//!   value **now** (or its absence). Replaying sweeps first and values last gives exactly the state in
//!   memory: a line's final value is the one written, and every line the commit did not touch
//!   went through the same sweep in memory as in the replay;
//! - when the appended bytes outgrow the last full write (and a floor), a commit replaces the
//!   log with every live line (`reset` records): the stored bytes stay within about twice the
//!   live lines, and the work per event stays flat ([`crate::engine::ShardEngine::take_delta`]).
//!
//! Records are postcard; a row holds whole records (a SKU's lines span several records of at
//! most [`RECORD_LINES`] when it has many), so rows are read one at a time.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::ledger::{Line, Lines, SkuState};
use crate::store::StoreError;

/// A row is closed once it holds this many bytes (the record that crosses it ends the row).
pub const ROW_BYTES: usize = 1 << 20;
/// Most lines in one record (~25 bytes each).
pub const RECORD_LINES: usize = 16_384;

/// What one commit writes to a shard's line log.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LineDelta {
    /// The rows replace the shard's whole log (a compaction, or a shard's first full write).
    pub replace: bool,
    /// Rows of whole records, in order.
    pub rows: Vec<Vec<u8>>,
}

impl LineDelta {
    /// Bytes of all rows.
    pub fn len(&self) -> usize {
        self.rows.iter().map(Vec::len).sum()
    }

    /// True when nothing is written.
    pub fn is_empty(&self) -> bool {
        self.rows.iter().all(Vec::is_empty)
    }
}

/// One SKU's line changes (`Record` as written, borrowing its lines).
#[derive(Serialize)]
struct RecordRef<'a> {
    sku: u64,
    reset: bool,
    sweep: Option<(i64, i64)>,
    lines: &'a [(u64, Option<Line>)],
}

/// One SKU's line changes, in the order they are applied: `reset` clears its lines, `sweep`
/// forgets the closed lines expired at `(now, horizon)`, then each line is set (or removed).
#[derive(Debug, Deserialize)]
struct Record {
    sku: u64,
    reset: bool,
    sweep: Option<(i64, i64)>,
    lines: Vec<(u64, Option<Line>)>,
}

/// Builds the rows of a [`LineDelta`].
#[derive(Debug, Default)]
pub struct LineLogWriter {
    rows: Vec<Vec<u8>>,
    row: Vec<u8>,
    scratch: Vec<(u64, Option<Line>)>,
}

impl LineLogWriter {
    /// Appends the changes of the SKU whose id ([`crate::dedup::sku_id`]) is `sku`.
    pub fn record(
        &mut self,
        sku: u64,
        reset: bool,
        sweep: Option<(i64, i64)>,
        lines: &[(u64, Option<Line>)],
    ) -> Result<(), StoreError> {
        let mut parts = lines.chunks(RECORD_LINES);
        let first = parts.next().unwrap_or(&[]);
        self.push(&RecordRef { sku, reset, sweep, lines: first })?;
        for rest in parts {
            self.push(&RecordRef { sku, reset: false, sweep: None, lines: rest })?;
        }
        Ok(())
    }

    /// Appends records that replace the SKU's lines with `lines` (a full write of them).
    pub fn reset(&mut self, sku: u64, lines: &Lines) -> Result<(), StoreError> {
        let mut all = std::mem::take(&mut self.scratch);
        all.clear();
        all.extend(lines.iter().map(|(k, l)| (k, Some(l))));
        let written = self.record(sku, true, None, &all);
        self.scratch = all;
        written
    }

    fn push(&mut self, record: &RecordRef<'_>) -> Result<(), StoreError> {
        postcard::to_io(record, &mut self.row)
            .map_err(|e| StoreError::Corrupt(format!("encoding order-line changes: {e}")))?;
        if self.row.len() >= ROW_BYTES {
            self.rows.push(std::mem::take(&mut self.row));
        }
        Ok(())
    }

    /// The delta (`replace`: it is the whole log).
    pub fn finish(mut self, replace: bool) -> LineDelta {
        if !self.row.is_empty() {
            self.rows.push(self.row);
        }
        LineDelta { replace, rows: self.rows }
    }
}

/// Applies one stored row to the states of its shard; `index` maps a SKU id to its position in
/// `states`. A record for a SKU the shard has no state for means the store is damaged.
pub fn apply_row(row: &[u8], states: &mut [(String, SkuState)], index: &HashMap<u64, usize>) -> Result<(), StoreError> {
    let mut rest = row;
    while !rest.is_empty() {
        let (record, tail) = postcard::take_from_bytes::<Record>(rest)
            .map_err(|e| StoreError::Corrupt(format!("decoding order-line changes: {e}")))?;
        rest = tail;
        let Some(&at) = index.get(&record.sku) else {
            return Err(StoreError::Corrupt(format!(
                "order-line changes for SKU id {:#x}, which has no state",
                record.sku
            )));
        };
        let state = &mut states[at].1;
        if record.reset {
            state.lines.clear();
        }
        if let Some((now, horizon)) = record.sweep {
            state.forget_lines(now, horizon);
        }
        for (key, line) in record.lines {
            match line {
                Some(line) => state.lines.insert(key, line),
                None => {
                    state.lines.remove(key);
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dedup::sku_id;

    fn line(remaining: u32, closed_ts: i64) -> Line {
        Line { remaining, shipped: 1, closed_ts }
    }

    #[test]
    fn records_replay_resets_sweeps_then_values() {
        let mut states = vec![("A".to_string(), SkuState::default()), ("B".to_string(), SkuState::default())];
        let index: HashMap<u64, usize> = [(sku_id("A"), 0), (sku_id("B"), 1)].into_iter().collect();
        states[0].1.lines.insert(9, line(0, 10));
        let mut w = LineLogWriter::default();
        w.record(sku_id("A"), false, Some((1_000, 100)), &[(1, Some(line(2, 0))), (2, None)]).unwrap();
        w.record(sku_id("B"), true, None, &[(3, Some(line(0, 990)))]).unwrap();
        let delta = w.finish(false);
        assert_eq!(delta.rows.len(), 1);
        states[0].1.lines.insert(2, line(1, 0));
        for row in &delta.rows {
            apply_row(row, &mut states, &index).unwrap();
        }
        let a: Vec<_> = {
            let mut v: Vec<_> = states[0].1.lines.iter().collect();
            v.sort_by_key(|(k, _)| *k);
            v
        };
        assert_eq!(a, vec![(1, line(2, 0))], "line 9 expired (10 + 100 < 1000) and 2 removed");
        assert_eq!(states[1].1.lines.get(3), Some(line(0, 990)));
    }

    #[test]
    fn a_sku_with_many_lines_spans_records_and_rows_end_on_record_boundaries() {
        let lines: Vec<_> = (0..(RECORD_LINES as u64 * 5)).map(|k| (k, Some(line(1, 0)))).collect();
        let mut w = LineLogWriter::default();
        for sku in 0..4u64 {
            w.record(sku, true, None, &lines).unwrap();
        }
        let delta = w.finish(true);
        assert!(delta.rows.len() > 1, "{} bytes in one row", delta.len());
        let mut states: Vec<_> = (0..4).map(|i| (i.to_string(), SkuState::default())).collect();
        let index: HashMap<u64, usize> = (0..4u64).map(|i| (i, i as usize)).collect();
        for row in &delta.rows {
            apply_row(row, &mut states, &index).unwrap();
        }
        assert!(states.iter().all(|(_, s)| s.lines.len() == lines.len()));
    }

    #[test]
    fn a_record_for_an_unknown_sku_is_corruption() {
        let mut w = LineLogWriter::default();
        w.record(7, false, None, &[(1, None)]).unwrap();
        let err = apply_row(&w.finish(false).rows[0], &mut [], &HashMap::new()).unwrap_err();
        assert!(matches!(err, StoreError::Corrupt(_)), "{err}");
    }
}
