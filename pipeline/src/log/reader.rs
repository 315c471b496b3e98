//! Reading a shard of the log: segment by segment from a position, frames checked by CRC, waiting
//! at the end for appends (or for the log to be sealed).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::source::{Lag, ReadStatus, RecordBatch, ShardReader, StreamError};

/// Version 2: the file may end in preallocated zeros (a zero frame header ends the data).
use super::*;

/// The segment a reader is in.
#[derive(Debug)]
pub(super) struct ReadSegment {
    pub(super) base: u64,
    /// Where it ends (the next segment's base), once closed.
    pub(super) end: Option<u64>,
    pub(super) file: File,
}

/// Reads one shard of an [`EmbeddedLog`].
#[derive(Debug)]
pub struct LogReader {
    pub(super) log: Arc<LogInner>,
    pub(super) shard: usize,
    pub(super) segment: Option<ReadSegment>,
    /// Position of the next record (or of a segment boundary before it).
    pub(super) pos: u64,
    /// The shard's length when the last read was made.
    pub(super) head: u64,
}

impl LogReader {
    /// Position of the next record.
    pub fn offset(&self) -> u64 {
        self.pos
    }

    /// Opens the segment holding `pos` (moving past a segment's header).
    pub(super) fn enter_segment(&mut self) -> Result<(), StreamError> {
        let shard = &self.log.shards[self.shard];
        if let Some(seg) = &mut self.segment {
            if seg.end.is_none() {
                // Seen active: it may have closed since (the caller read the length first).
                seg.end = shard.segment_of(seg.base).and_then(|(_, next)| next);
            }
            if seg.end.is_none_or(|e| self.pos < e) {
                return Ok(());
            }
        }
        let Some((base, end)) = shard.segment_of(self.pos) else {
            return Err(StreamError::Corrupt(format!("{}: position {} is in a deleted segment", shard.name, self.pos)));
        };
        let path = ShardFile::segment_path(&shard.dir, base);
        let file = File::open(&path).map_err(|e| {
            StreamError::Corrupt(format!(
                "{}: segment {} is gone ({e}): it was deleted by retention",
                shard.name,
                path.display()
            ))
        })?;
        self.pos = self.pos.max(base + HEADER);
        self.segment = Some(ReadSegment { base, end, file });
        Ok(())
    }

    fn read_available(&mut self, end: u64, batch: &mut RecordBatch, max: usize) -> Result<(), StreamError> {
        // Read straight into the batch's buffer; records are ranges of it (no copy).
        let mut buf = batch.take_buffer();
        let result = self.parse_into(end, &mut buf, batch, max);
        batch.set_buffer(buf);
        result
    }

    fn parse_into(
        &mut self,
        end: u64,
        buf: &mut Vec<u8>,
        batch: &mut RecordBatch,
        max: usize,
    ) -> Result<(), StreamError> {
        let Some(seg) = &self.segment else { return Ok(()) };
        let end = seg.end.map_or(end, |e| e.min(end));
        if self.pos >= end {
            return Ok(());
        }
        let file_pos = self.pos - seg.base;
        let want = ((end - self.pos) as usize).min(READ_CHUNK);
        buf.resize(want, 0);
        seg.file.read_exact_at(buf, file_pos).map_err(io)?;
        let mut at = 0usize;
        while batch.len() < max && at + FRAME_HEADER as usize <= buf.len() {
            let h = &buf[at..at + 8];
            let n = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
            let crc = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
            let body = at + 8..at + 8 + n;
            if n == 0 {
                let shard = &self.log.shards[self.shard].name;
                return Err(StreamError::Corrupt(format!("{shard}: empty frame at offset {}", self.pos + at as u64)));
            }
            if body.end > buf.len() {
                if at == 0 {
                    // One frame larger than the chunk: read exactly it.
                    buf.resize(8 + n, 0);
                    seg.file.read_exact_at(buf, file_pos).map_err(io)?;
                    continue;
                }
                break;
            }
            if crc32fast::hash(&buf[body.clone()]) != crc {
                let shard = &self.log.shards[self.shard].name;
                return Err(StreamError::Corrupt(format!(
                    "{shard}: checksum mismatch at offset {}",
                    self.pos + at as u64
                )));
            }
            batch.push_range(self.pos + at as u64, body.clone());
            at = body.end;
        }
        self.pos += at as u64;
        Ok(())
    }
}

impl ShardReader for LogReader {
    async fn next_batch(&mut self, batch: &mut RecordBatch, max: usize) -> Result<ReadStatus, StreamError> {
        batch.clear();
        let log = Arc::clone(&self.log);
        let shard = &log.shards[self.shard];
        let notified = shard.notify.notified();
        let end = shard.len.load(Ordering::Acquire);
        self.head = end;
        if self.pos < end {
            self.enter_segment()?;
            if self.pos < end {
                self.read_available(end, batch, max.max(1))?;
                return Ok(ReadStatus::Open);
            }
        }
        if log.sealed.load(Ordering::Acquire) {
            return Ok(ReadStatus::End);
        }
        let _ = tokio::time::timeout(IDLE_WAIT, notified).await;
        Ok(ReadStatus::Open)
    }

    fn lag(&self) -> Lag {
        let end = self.log.shards[self.shard].len.load(Ordering::Acquire);
        Lag { bytes: Some(end.saturating_sub(self.pos)), ..Lag::default() }
    }

    fn caught_up(&self) -> Option<bool> {
        Some(self.pos >= self.head)
    }
}
