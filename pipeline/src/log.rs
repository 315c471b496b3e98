//! `EmbeddedLog`: the durable partitioned log of the single-machine deployment.
//!
//! One append-only file per shard in a directory; a record goes to shard
//! `xxh3_64(sku) mod shards`, so a SKU's records stay in order in one shard. A file starts with an
//! 8-byte magic, then frames `[len: u32 LE][crc32 of payload: u32 LE][payload]`. A record's
//! position is the byte offset of its frame.
//!
//! Durability: [`EmbeddedLog::append`] writes the frames and `fdatasync`s every touched file
//! before it returns, so an acknowledged record survives `kill -9` and power loss. Readers only
//! see bytes up to the synced length. On open, a torn tail (a frame cut by a crash before its
//! sync) is truncated away.
//!
//! Files grow in preallocated steps of zeros (1 MiB doubling up to [`PREALLOC_BYTES`], written and
//! `fsync`ed once per step), so an append changes neither the file's size nor its block map: its `fdatasync` flushes
//! data only and commits no filesystem journal transaction. (Appending at the end of the file
//! instead costs a journal commit per sync; with several shard files synced per request those
//! commits contend and stall for hundreds of milliseconds under load.) A zero frame header marks
//! the end of the data: records are never empty.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use stockflow_state::Position;
use tokio::sync::Notify;
use xxhash_rust::xxh3::xxh3_64;

use crate::source::{Lag, OutRecord, ReadStatus, RecordBatch, ShardReader, StreamError, StreamProducer, StreamSource};

/// Version 2: the file may end in preallocated zeros (a zero frame header ends the data).
const MAGIC: &[u8; 8] = b"SFLOG\0\0\x02";
/// Version 1 (no preallocation): read as is, upgraded to version 2 on open, so that an older
/// binary refuses the file instead of reading the zeros as empty records.
const MAGIC_V1: &[u8; 8] = b"SFLOG\0\0\x01";
const FRAME_HEADER: u64 = 8;
/// Largest record accepted (Kinesis's limit, kept for parity).
pub const MAX_RECORD_BYTES: usize = 1 << 20;
/// Bytes read from a shard file per read call.
const READ_CHUNK: usize = 4 << 20;
/// How long a reader waits for new data before returning an empty batch.
const IDLE_WAIT: Duration = Duration::from_millis(50);

fn io(e: std::io::Error) -> StreamError {
    StreamError::Unavailable(e.to_string())
}

/// A request to a shard's sync thread: an index, and where to answer with it.
type SyncRequest = (usize, std::sync::mpsc::Sender<(usize, std::io::Result<()>)>);

/// Largest step in which shard files grow (zeros, written ahead of the data).
pub const PREALLOC_BYTES: u64 = 2 << 20;

/// The preallocated space of a shard file: data up to the shard's `len`, zeros after it.
#[derive(Debug)]
struct Space {
    file: File,
    /// File length.
    allocated: AtomicU64,
    grow: Mutex<()>,
    /// The extension thread (running or finished), joined when the log closes (it must not write zeros into a file
    /// that a later open of the same log has already truncated and appended to).
    ahead: Mutex<Option<std::thread::JoinHandle<()>>>,
    fsync: bool,
}

impl Space {
    fn step(allocated: u64) -> u64 {
        // Small logs stay small: the step doubles from 1 MiB up to PREALLOC_BYTES.
        allocated.next_power_of_two().clamp(1 << 20, PREALLOC_BYTES)
    }

    /// Extends the file with zeros (durably) to a step boundary at or past `end`.
    fn grow_to(&self, end: u64) -> std::io::Result<()> {
        let _only = self.grow.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let cur = self.allocated.load(Ordering::Acquire);
        if cur >= end {
            return Ok(());
        }
        let target = end.next_multiple_of(Self::step(cur));
        let zeros = vec![0u8; (1 << 20).min((target - cur) as usize)];
        let mut pos = cur;
        while pos < target {
            let n = ((target - pos) as usize).min(zeros.len());
            self.file.write_all_at(&zeros[..n], pos)?;
            pos += n as u64;
        }
        if self.fsync {
            self.file.sync_all()?;
        }
        self.allocated.store(target, Ordering::Release);
        Ok(())
    }

    /// Once less than half a step of zeros is left after `end`, extends by a step on a
    /// background thread, so appends rarely wait for zeros to be written.
    fn grow_ahead(self: &Arc<Self>, end: u64) {
        let cur = self.allocated.load(Ordering::Acquire);
        if cur.saturating_sub(end) >= Self::step(cur) / 2 {
            return;
        }
        let mut ahead = self.ahead.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if ahead.as_ref().is_some_and(|h| !h.is_finished()) {
            return;
        }
        if let Some(done) = ahead.take() {
            let _ = done.join();
        }
        let space = Arc::clone(self);
        let spawned = std::thread::Builder::new().name("log-prealloc".into()).spawn(move || {
            let cur = space.allocated.load(Ordering::Acquire);
            if let Err(e) = space.grow_to(cur + 1) {
                tracing::warn!(error = %e, "preallocating the log failed; appends extend it themselves");
            }
        });
        // Without a thread, appends extend the file themselves.
        *ahead = spawned.ok();
    }

    /// Waits for a running extension.
    fn finish(&self) {
        let handle = self.ahead.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        if let Some(h) = handle {
            let _ = h.join();
        }
    }
}

impl Drop for LogInner {
    fn drop(&mut self) {
        for shard in &self.shards {
            shard.space.finish();
        }
    }
}

#[derive(Debug)]
struct ShardFile {
    name: String,
    path: PathBuf,
    writer: Mutex<File>,
    space: Arc<Space>,
    /// The shard's sync thread: send it an index and a reply channel, it `fdatasync`s and answers.
    syncer: Mutex<std::sync::mpsc::Sender<SyncRequest>>,
    len: AtomicU64,
    notify: Notify,
}

#[derive(Debug)]
struct LogInner {
    dir: PathBuf,
    shards: Vec<ShardFile>,
    sealed: AtomicBool,
    fsync: bool,
}

/// The embedded durable log.
#[derive(Debug, Clone)]
pub struct EmbeddedLog {
    inner: Arc<LogInner>,
}

/// The name of shard `i` of an embedded log.
pub fn shard_name(i: usize) -> String {
    format!("shard-{i:04}")
}

impl EmbeddedLog {
    /// Opens the log in `dir`, creating it with `shards` shards if new. An existing log keeps
    /// its shard count; asking for another one is an error.
    pub fn open(dir: impl AsRef<Path>, shards: usize) -> Result<Self, StreamError> {
        Self::open_with(dir, shards, true)
    }

    /// Like [`EmbeddedLog::open`]; `fsync = false` skips `fdatasync` on append, for benchmarks
    /// that measure the pipeline rather than the disk. Never for production.
    pub fn open_with(dir: impl AsRef<Path>, shards: usize, fsync: bool) -> Result<Self, StreamError> {
        let dir = dir.as_ref().to_path_buf();
        if shards == 0 || shards > 1024 {
            return Err(StreamError::Invalid(format!("shards = {shards}: must be 1 to 1024")));
        }
        std::fs::create_dir_all(&dir).map_err(io)?;
        let meta = dir.join("log.meta");
        match std::fs::read_to_string(&meta) {
            Ok(s) => {
                let existing: usize =
                    s.trim().parse().map_err(|_| StreamError::Corrupt(format!("{}: {s:?}", meta.display())))?;
                if existing != shards {
                    return Err(StreamError::Invalid(format!(
                        "{} holds a log with {existing} shards, not {shards}",
                        dir.display()
                    )));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::write(&meta, format!("{shards}\n")).map_err(io)?;
            }
            Err(e) => return Err(io(e)),
        }
        let shards = (0..shards).map(|i| Self::open_shard(&dir, i, fsync)).collect::<Result<Vec<_>, _>>()?;
        Ok(EmbeddedLog { inner: Arc::new(LogInner { dir, shards, sealed: AtomicBool::new(false), fsync }) })
    }

    fn open_shard(dir: &Path, i: usize, fsync: bool) -> Result<ShardFile, StreamError> {
        let name = shard_name(i);
        let path = dir.join(format!("{name}.log"));
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(io)?;
        let mut len = file.metadata().map_err(io)?.len();
        if len < MAGIC.len() as u64 {
            file.set_len(0).map_err(io)?;
            file.write_all_at(MAGIC, 0).map_err(io)?;
            file.sync_all().map_err(io)?;
            len = MAGIC.len() as u64;
        } else {
            let mut magic = [0u8; 8];
            file.read_exact_at(&mut magic, 0).map_err(io)?;
            if &magic == MAGIC_V1 {
                file.write_all_at(MAGIC, 0).map_err(io)?;
                file.sync_all().map_err(io)?;
            } else if &magic != MAGIC {
                return Err(StreamError::Corrupt(format!("{}: not a stockflow log", path.display())));
            }
            let valid = Self::recover(&file, len)?;
            if valid < len {
                // Zeros after the data are preallocation; anything else is a frame cut by a crash.
                let mut header = [0u8; FRAME_HEADER as usize];
                let n = ((len - valid) as usize).min(header.len());
                file.read_exact_at(&mut header[..n], valid).map_err(io)?;
                if header[..n].iter().any(|b| *b != 0) {
                    tracing::warn!(shard = %name, offset = valid, "truncating a torn tail left by a crash");
                }
                file.set_len(valid).map_err(io)?;
                file.sync_all().map_err(io)?;
                len = valid;
            }
        }
        let space = Arc::new(Space {
            file: file.try_clone().map_err(io)?,
            allocated: AtomicU64::new(len),
            grow: Mutex::new(()),
            ahead: Mutex::new(None),
            fsync,
        });
        let (syncer, requests) = std::sync::mpsc::channel::<SyncRequest>();
        let sync_file = file.try_clone().map_err(io)?;
        std::thread::Builder::new()
            .name(format!("log-sync-{i}"))
            .spawn(move || {
                // Ends when the log (the sender) is dropped.
                for (idx, reply) in requests {
                    let _ = reply.send((idx, sync_file.sync_data()));
                }
            })
            .map_err(io)?;
        Ok(ShardFile {
            name,
            path,
            writer: Mutex::new(file),
            space,
            syncer: Mutex::new(syncer),
            len: AtomicU64::new(len),
            notify: Notify::new(),
        })
    }

    /// Scans frames from the start; returns the end of the last intact frame.
    fn recover(file: &File, len: u64) -> Result<u64, StreamError> {
        let mut reader = std::io::BufReader::with_capacity(1 << 20, file);
        let mut skip = [0u8; 8];
        reader.read_exact(&mut skip).map_err(io)?;
        let mut pos = MAGIC.len() as u64;
        let mut payload = Vec::new();
        loop {
            if pos + FRAME_HEADER > len {
                return Ok(pos);
            }
            let mut header = [0u8; 8];
            reader.read_exact(&mut header).map_err(io)?;
            let n = u64::from(u32::from_le_bytes([header[0], header[1], header[2], header[3]]));
            let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
            if n == 0 || n as usize > MAX_RECORD_BYTES || pos + FRAME_HEADER + n > len {
                return Ok(pos);
            }
            payload.resize(n as usize, 0);
            reader.read_exact(&mut payload).map_err(io)?;
            if crc32fast::hash(&payload) != crc {
                return Ok(pos);
            }
            pos += FRAME_HEADER + n;
        }
    }

    /// The directory holding the log.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Number of shards.
    pub fn shard_count(&self) -> usize {
        self.inner.shards.len()
    }

    /// The shard a key goes to.
    pub fn shard_of(&self, key: &str) -> usize {
        (xxh3_64(key.as_bytes()) % self.inner.shards.len() as u64) as usize
    }

    /// Bytes held by all shards (durable length).
    pub fn total_bytes(&self) -> u64 {
        self.inner.shards.iter().map(|s| s.len.load(Ordering::Acquire)).sum()
    }

    /// Appends records (grouped per shard, order kept per key) and syncs them to disk.
    pub fn append(&self, records: &[OutRecord<'_>]) -> Result<(), StreamError> {
        let n = self.inner.shards.len();
        let mut frames: Vec<Vec<u8>> = vec![Vec::new(); n];
        for r in records {
            if r.payload.is_empty() {
                return Err(StreamError::Invalid("empty record".into()));
            }
            if r.payload.len() > MAX_RECORD_BYTES {
                return Err(StreamError::Invalid(format!(
                    "record of {} bytes exceeds {MAX_RECORD_BYTES}",
                    r.payload.len()
                )));
            }
            let buf = &mut frames[self.shard_of(r.key)];
            buf.extend_from_slice(&(r.payload.len() as u32).to_le_bytes());
            buf.extend_from_slice(&crc32fast::hash(r.payload).to_le_bytes());
            buf.extend_from_slice(r.payload);
        }
        // Write every touched shard (in shard order, holding each writer), then sync them: on the
        // shards' own sync threads at once when several are touched, so the fdatasyncs overlap
        // without a thread spawn per append (thousands of spawns a second stalled the process).
        let mut held = Vec::with_capacity(frames.len());
        for (shard, buf) in self.inner.shards.iter().zip(&frames).filter(|(_, buf)| !buf.is_empty()) {
            let w = shard.writer.lock().map_err(|_| StreamError::Unavailable("log writer poisoned".into()))?;
            let at = shard.len.load(Ordering::Acquire);
            let end = at + buf.len() as u64;
            if end > shard.space.allocated.load(Ordering::Acquire) {
                shard.space.grow_to(end).map_err(io)?;
            }
            if let Err(e) = w.write_all_at(buf, at) {
                let _ = w.write_all_at(&vec![0u8; buf.len()], at);
                return Err(io(e));
            }
            held.push((shard, w, at, end));
        }
        let synced: Vec<std::io::Result<()>> = if !self.inner.fsync {
            held.iter().map(|_| Ok(())).collect()
        } else if held.len() == 1 {
            vec![held[0].1.sync_data()]
        } else {
            let (tx, rx) = std::sync::mpsc::channel();
            for (i, (shard, ..)) in held.iter().enumerate() {
                let sent = shard.syncer.lock().is_ok_and(|s| s.send((i, tx.clone())).is_ok());
                if !sent {
                    let _ = tx.send((i, Err(std::io::Error::other("log sync thread stopped"))));
                }
            }
            drop(tx);
            let mut out: Vec<std::io::Result<()>> =
                held.iter().map(|_| Err(std::io::Error::other("no sync answer"))).collect();
            for (i, r) in rx {
                out[i] = r;
            }
            out
        };
        let mut first_error = None;
        for ((shard, w, at, end), result) in held.into_iter().zip(synced) {
            match result {
                Ok(()) => {
                    shard.len.store(end, Ordering::Release);
                    drop(w);
                    shard.space.grow_ahead(end);
                    shard.notify.notify_waiters();
                }
                Err(e) => {
                    // Not acknowledged: leave zeros, not frames a restart could take for records.
                    let _ = w.write_all_at(&vec![0u8; (end - at) as usize], at);
                    first_error.get_or_insert(io(e));
                }
            }
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        crate::metrics::log_appended(records.len() as u64, frames.iter().map(|f| f.len() as u64).sum());
        Ok(())
    }

    /// Marks the log complete: readers report [`ReadStatus::End`] once they have read everything.
    /// Used by `demo` and `replay`-then-consume runs; a live log is never sealed.
    pub fn seal(&self) {
        self.inner.sealed.store(true, Ordering::Release);
        for s in &self.inner.shards {
            s.notify.notify_waiters();
        }
    }
}

impl StreamProducer for EmbeddedLog {
    async fn put(&self, records: &[OutRecord<'_>]) -> Result<(), StreamError> {
        // The append blocks on fdatasync: on a multi-threaded runtime, let the other tasks of this
        // worker thread move elsewhere meanwhile.
        match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
            Ok(tokio::runtime::RuntimeFlavor::MultiThread) if self.inner.fsync => {
                tokio::task::block_in_place(|| self.append(records))
            }
            _ => self.append(records),
        }
    }
}

impl StreamSource for EmbeddedLog {
    type Reader = LogReader;

    async fn shards(&self) -> Result<Vec<String>, StreamError> {
        Ok(self.inner.shards.iter().map(|s| s.name.clone()).collect())
    }

    async fn open(&self, shard: &str, after: Option<&Position>) -> Result<LogReader, StreamError> {
        let idx = self
            .inner
            .shards
            .iter()
            .position(|s| s.name == shard)
            .ok_or_else(|| StreamError::Invalid(format!("no shard {shard}")))?;
        let file = File::open(&self.inner.shards[idx].path).map_err(io)?;
        let end = self.inner.shards[idx].len.load(Ordering::Acquire);
        let pos = match after {
            None => MAGIC.len() as u64,
            Some(p) => {
                let offset =
                    p.as_u64().filter(|o| *o >= MAGIC.len() as u64 && o + FRAME_HEADER <= end).ok_or_else(|| {
                        StreamError::Corrupt(format!("checkpoint {p} is outside shard {shard} (length {end})"))
                    })?;
                let mut header = [0u8; 4];
                file.read_exact_at(&mut header, offset).map_err(io)?;
                offset + FRAME_HEADER + u64::from(u32::from_le_bytes(header))
            }
        };
        Ok(LogReader { log: Arc::clone(&self.inner), shard: idx, file, pos })
    }
}

/// Reads one shard of an [`EmbeddedLog`].
#[derive(Debug)]
pub struct LogReader {
    log: Arc<LogInner>,
    shard: usize,
    file: File,
    pos: u64,
}

impl LogReader {
    /// Byte offset of the next record.
    pub fn offset(&self) -> u64 {
        self.pos
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
        let want = ((end - self.pos) as usize).min(READ_CHUNK);
        buf.resize(want, 0);
        self.file.read_exact_at(buf, self.pos).map_err(io)?;
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
                    self.file.read_exact_at(buf, self.pos).map_err(io)?;
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
        if self.pos < end {
            self.read_available(end, batch, max.max(1))?;
            return Ok(ReadStatus::Open);
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec<'a>(key: &'a str, payload: &'a str) -> OutRecord<'a> {
        OutRecord { key, payload: payload.as_bytes() }
    }

    async fn read_all(log: &EmbeddedLog, shard: &str, after: Option<&Position>) -> Vec<(u64, String)> {
        let mut r = log.open(shard, after).await.unwrap();
        let mut batch = RecordBatch::new();
        let mut out = Vec::new();
        while r.next_batch(&mut batch, 3).await.unwrap() == ReadStatus::Open {
            out.extend(batch.iter().map(|(o, p)| (o, String::from_utf8(p.to_vec()).unwrap())));
        }
        out
    }

    #[tokio::test]
    async fn keeps_per_key_order_and_resumes_after_a_position() {
        let dir = tempfile::tempdir().unwrap();
        let log = EmbeddedLog::open(dir.path(), 2).unwrap();
        log.append(&[rec("a", "a1"), rec("b", "b1"), rec("a", "a2")]).unwrap();
        log.append(&[rec("a", "a3")]).unwrap();
        log.seal();
        let shard = shard_name(log.shard_of("a"));
        let all = read_all(&log, &shard, None).await;
        let a: Vec<_> = all.iter().filter(|(_, p)| p.starts_with('a')).map(|(_, p)| p.as_str()).collect();
        assert_eq!(a, ["a1", "a2", "a3"]);
        let first = Position::offset(all[0].0);
        let rest = read_all(&log, &shard, Some(&first)).await;
        assert_eq!(rest, all[1..].to_vec());
    }

    #[tokio::test]
    async fn a_torn_tail_is_truncated_on_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = EmbeddedLog::open(dir.path(), 1).unwrap();
            log.append(&[rec("k", "one"), rec("k", "two")]).unwrap();
        }
        let path = dir.path().join("shard-0000.log");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 1 << 20, "zeros ahead of the data");
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        // A frame cut short right after the data (magic 8 + two frames of 8 + 3 bytes).
        f.write_all_at(&[9, 0, 0, 0, 1, 2, 3, 4, b'x'], 30).unwrap();
        drop(f);
        let log = EmbeddedLog::open(dir.path(), 1).unwrap();
        log.append(&[rec("k", "three")]).unwrap();
        log.seal();
        let got: Vec<_> = read_all(&log, "shard-0000", None).await.into_iter().map(|(_, p)| p).collect();
        assert_eq!(got, ["one", "two", "three"]);
        assert!(EmbeddedLog::open(dir.path(), 3).is_err(), "shard count is fixed");
    }

    #[tokio::test]
    async fn a_version_1_log_is_read_and_upgraded() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = EmbeddedLog::open(dir.path(), 1).unwrap();
            log.append(&[rec("k", "one")]).unwrap();
        }
        // What version 1 wrote: its magic, the frames, no preallocated zeros.
        let path = dir.path().join("shard-0000.log");
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(MAGIC_V1, 0).unwrap();
        f.set_len(8 + 8 + 3).unwrap();
        drop(f);
        let log = EmbeddedLog::open(dir.path(), 1).unwrap();
        log.append(&[rec("k", "two")]).unwrap();
        log.seal();
        let got: Vec<_> = read_all(&log, "shard-0000", None).await.into_iter().map(|(_, p)| p).collect();
        assert_eq!(got, ["one", "two"]);
        let mut magic = [0u8; 8];
        File::open(&path).unwrap().read_exact_at(&mut magic, 0).unwrap();
        assert_eq!(&magic, MAGIC, "upgraded, so an older binary refuses the zeros");
    }

    #[tokio::test]
    async fn a_reader_waits_for_new_records() {
        let dir = tempfile::tempdir().unwrap();
        let log = EmbeddedLog::open(dir.path(), 1).unwrap();
        let mut r = log.open("shard-0000", None).await.unwrap();
        let mut batch = RecordBatch::new();
        assert_eq!(r.next_batch(&mut batch, 10).await.unwrap(), ReadStatus::Open);
        assert!(batch.is_empty());
        log.append(&[rec("k", "x")]).unwrap();
        r.next_batch(&mut batch, 10).await.unwrap();
        assert_eq!(batch.len(), 1);
        assert_eq!(r.lag().bytes, Some(0));
    }
}
