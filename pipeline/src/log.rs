//! `EmbeddedLog`: the durable partitioned log of the single-machine deployment.
//!
//! A directory per shard holds the shard's **segments**; a record goes to shard
//! `xxh3_64(sku) mod shards`, so a SKU's records stay in order in one shard. A segment file
//! `{base:020}.seg` starts with an 8-byte magic, then frames `[len: u32 LE][crc32 of payload: u32
//! LE][payload]`. A record's position is `base + its frame's byte offset in the file`: positions
//! only grow, across segments, and a segment's base is where the previous one's data ended. The
//! active (last) segment is closed once it holds [`LogOptions::segment_bytes`] and a new one is
//! started; closed segments are cut to their data and never written again.
//!
//! Retention: [`EmbeddedLog::trim`] deletes closed segments that end at or before a position (the
//! shard's checkpoint) and were last written longer ago than a minimum age. The active segment is
//! never deleted.
//!
//! Durability: [`EmbeddedLog::append`] writes the frames and `fdatasync`s every touched file
//! before it returns, so an acknowledged record survives `kill -9` and power loss. Readers only
//! see bytes up to the synced length. On open, only the active segment is scanned (closed ones
//! were synced and cut when they closed), so opening takes the same time after a month as after
//! a minute; a torn tail (a frame cut by a crash before its sync) is truncated away. A failed
//! append (a full disk, an I/O error) overwrites what it wrote with zeros before it answers, so a
//! restart never takes unacknowledged frames for records.
//!
//! Segments grow in preallocated steps of zeros (1 MiB doubling up to [`PREALLOC_BYTES`], written
//! and `fsync`ed once per step), so an append changes neither the file's size nor its block map:
//! its `fdatasync` flushes data only and commits no filesystem journal transaction. (Appending at
//! the end of the file instead costs a journal commit per sync; with several shard files synced
//! per request those commits contend and stall for hundreds of milliseconds under load.) A zero
//! frame header marks the end of the data: records are never empty.
//!
//! A log written before segments (one `shard-NNNN.log` file per shard) is moved, on open, to be
//! the shard's first segment at base 0: its positions (byte offsets) stay valid.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use stockflow_state::Position;
use tokio::sync::Notify;
use xxhash_rust::xxh3::xxh3_64;

use crate::source::{Lag, OutRecord, ReadStatus, RecordBatch, ShardReader, StreamError, StreamProducer, StreamSource};

/// Version 2: the file may end in preallocated zeros (a zero frame header ends the data).
const MAGIC: &[u8; 8] = b"SFLOG\0\0\x02";
/// Version 1 (no preallocation): read as is, upgraded to version 2 on open, so that an older
/// binary refuses the file instead of reading the zeros as empty records.
const MAGIC_V1: &[u8; 8] = b"SFLOG\0\0\x01";
const HEADER: u64 = MAGIC.len() as u64;
const FRAME_HEADER: u64 = 8;
/// Largest record accepted (Kinesis's limit, kept for parity).
pub const MAX_RECORD_BYTES: usize = 1 << 20;
/// Bytes read from a shard file per read call.
const READ_CHUNK: usize = 4 << 20;
/// How long a reader waits for new data before returning an empty batch.
const IDLE_WAIT: Duration = Duration::from_millis(50);
/// Default size at which a segment is closed.
pub const DEFAULT_SEGMENT_BYTES: u64 = 8 << 20;

fn io(e: std::io::Error) -> StreamError {
    StreamError::Unavailable(e.to_string())
}

fn io_at(path: &Path) -> impl Fn(std::io::Error) -> StreamError + '_ {
    move |e| StreamError::Unavailable(format!("{}: {e}", path.display()))
}

/// A request to a shard's sync thread: an index, the file to sync, and where to answer.
type SyncRequest = (usize, Arc<File>, std::sync::mpsc::Sender<(usize, std::io::Result<()>)>);

/// Largest step in which segment files grow (zeros, written ahead of the data).
pub const PREALLOC_BYTES: u64 = 2 << 20;

/// How a log is opened.
#[derive(Debug, Clone, Copy)]
pub struct LogOptions {
    /// `fdatasync` every append (false only for benchmarks that measure the pipeline, not the disk).
    pub fsync: bool,
    /// Close the active segment once it holds this many bytes (at least 64 KiB).
    pub segment_bytes: u64,
}

impl Default for LogOptions {
    fn default() -> Self {
        LogOptions { fsync: true, segment_bytes: DEFAULT_SEGMENT_BYTES }
    }
}

/// The preallocated space of the active segment: data up to its end, zeros after it.
#[derive(Debug)]
struct Space {
    file: Arc<File>,
    /// File length.
    allocated: AtomicU64,
    grow: Mutex<()>,
    /// The extension thread (running or finished), joined when the segment closes or the log
    /// closes (it must not write zeros into a file that has since been cut or truncated).
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
            if let Err(e) = self.file.write_all_at(&zeros[..n], pos) {
                // A full disk: give back what this step took.
                let _ = self.file.set_len(cur);
                return Err(e);
            }
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
            shard.writer.lock().unwrap_or_else(std::sync::PoisonError::into_inner).space.finish();
        }
    }
}

/// The segment being appended to.
#[derive(Debug)]
struct Active {
    base: u64,
    space: Arc<Space>,
}

#[derive(Debug)]
struct ShardFile {
    name: String,
    dir: PathBuf,
    /// Bases of the segments on disk, oldest first; the last is the active one.
    segments: RwLock<Vec<u64>>,
    writer: Mutex<Active>,
    /// The shard's sync thread: send it an index, a file and a reply channel; it `fdatasync`s and answers.
    syncer: Mutex<std::sync::mpsc::Sender<SyncRequest>>,
    /// Position just past the last durable frame.
    len: AtomicU64,
    notify: Notify,
}

impl ShardFile {
    fn segment_path(dir: &Path, base: u64) -> PathBuf {
        dir.join(format!("{base:020}.seg"))
    }

    /// The segment holding position `pos`: its base and the next segment's base (None: active).
    fn segment_of(&self, pos: u64) -> Option<(u64, Option<u64>)> {
        let segs = self.segments.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        let i = segs.partition_point(|b| *b <= pos).checked_sub(1)?;
        Some((segs[i], segs.get(i + 1).copied()))
    }

    fn first_base(&self) -> u64 {
        self.segments.read().unwrap_or_else(std::sync::PoisonError::into_inner).first().copied().unwrap_or(0)
    }
}

#[derive(Debug)]
struct LogInner {
    dir: PathBuf,
    shards: Vec<ShardFile>,
    sealed: AtomicBool,
    options: LogOptions,
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

/// What [`EmbeddedLog::trim`] removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Trimmed {
    /// Segments deleted.
    pub segments: u64,
    /// Their bytes.
    pub bytes: u64,
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Checks a segment's magic, upgrading version 1.
fn check_magic(file: &File, path: &Path) -> Result<(), StreamError> {
    let mut magic = [0u8; 8];
    file.read_exact_at(&mut magic, 0).map_err(io_at(path))?;
    if &magic == MAGIC_V1 {
        file.write_all_at(MAGIC, 0).map_err(io_at(path))?;
        file.sync_all().map_err(io_at(path))?;
    } else if &magic != MAGIC {
        return Err(StreamError::Corrupt(format!("{}: not a stockflow log", path.display())));
    }
    Ok(())
}

impl EmbeddedLog {
    /// Opens the log in `dir`, creating it with `shards` shards if new. An existing log keeps
    /// its shard count; asking for another one is an error.
    pub fn open(dir: impl AsRef<Path>, shards: usize) -> Result<Self, StreamError> {
        Self::open_with_options(dir, shards, LogOptions::default())
    }

    /// Like [`EmbeddedLog::open`]; `fsync = false` skips `fdatasync` on append, for benchmarks
    /// that measure the pipeline rather than the disk. Never for production.
    pub fn open_with(dir: impl AsRef<Path>, shards: usize, fsync: bool) -> Result<Self, StreamError> {
        Self::open_with_options(dir, shards, LogOptions { fsync, ..LogOptions::default() })
    }

    /// Opens the log with explicit options.
    pub fn open_with_options(dir: impl AsRef<Path>, shards: usize, options: LogOptions) -> Result<Self, StreamError> {
        let dir = dir.as_ref().to_path_buf();
        if shards == 0 || shards > 1024 {
            return Err(StreamError::Invalid(format!("shards = {shards}: must be 1 to 1024")));
        }
        if options.segment_bytes < 64 << 10 {
            return Err(StreamError::Invalid(format!(
                "segment_bytes = {}: must be at least 64 KiB",
                options.segment_bytes
            )));
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
        let shards = (0..shards).map(|i| Self::open_shard(&dir, i, options)).collect::<Result<Vec<_>, _>>()?;
        Ok(EmbeddedLog { inner: Arc::new(LogInner { dir, shards, sealed: AtomicBool::new(false), options }) })
    }

    fn open_shard(dir: &Path, i: usize, options: LogOptions) -> Result<ShardFile, StreamError> {
        let name = shard_name(i);
        let shard_dir = dir.join(&name);
        let legacy = dir.join(format!("{name}.log"));
        std::fs::create_dir_all(&shard_dir).map_err(io_at(&shard_dir))?;
        if legacy.exists() {
            // The one file of a log written before segments becomes the first segment (base 0).
            let first = ShardFile::segment_path(&shard_dir, 0);
            std::fs::rename(&legacy, &first).map_err(io_at(&legacy))?;
            sync_dir(&shard_dir).map_err(io_at(&shard_dir))?;
            sync_dir(dir).map_err(io_at(dir))?;
        }
        let mut bases = Vec::new();
        for entry in std::fs::read_dir(&shard_dir).map_err(io_at(&shard_dir))? {
            let entry = entry.map_err(io_at(&shard_dir))?;
            let file_name = entry.file_name();
            let Some(base) =
                file_name.to_str().and_then(|n| n.strip_suffix(".seg")).and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            bases.push(base);
        }
        bases.sort_unstable();
        if bases.is_empty() {
            bases.push(0);
        }
        let base = *bases.last().unwrap_or(&0);
        let path = ShardFile::segment_path(&shard_dir, base);
        let file =
            OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(io_at(&path))?;
        let mut file_len = file.metadata().map_err(io_at(&path))?.len();
        if file_len < HEADER {
            file.set_len(0).map_err(io_at(&path))?;
            file.write_all_at(MAGIC, 0).map_err(io_at(&path))?;
            file.sync_all().map_err(io_at(&path))?;
            sync_dir(&shard_dir).map_err(io_at(&shard_dir))?;
            file_len = HEADER;
        } else {
            check_magic(&file, &path)?;
            let valid = Self::recover(&file, file_len)?;
            if valid < file_len {
                // Zeros after the data are preallocation; anything else is a frame cut by a crash.
                let mut header = [0u8; FRAME_HEADER as usize];
                let n = ((file_len - valid) as usize).min(header.len());
                file.read_exact_at(&mut header[..n], valid).map_err(io_at(&path))?;
                if header[..n].iter().any(|b| *b != 0) {
                    tracing::warn!(shard = %name, offset = base + valid, "truncating a torn tail left by a crash");
                }
                file.set_len(valid).map_err(io_at(&path))?;
                file.sync_all().map_err(io_at(&path))?;
                file_len = valid;
            }
        }
        let file = Arc::new(file);
        let space = Arc::new(Space {
            file: Arc::clone(&file),
            allocated: AtomicU64::new(file_len),
            grow: Mutex::new(()),
            ahead: Mutex::new(None),
            fsync: options.fsync,
        });
        let (syncer, requests) = std::sync::mpsc::channel::<SyncRequest>();
        std::thread::Builder::new()
            .name(format!("log-sync-{i}"))
            .spawn(move || {
                // Ends when the log (the sender) is dropped.
                for (idx, file, reply) in requests {
                    let _ = reply.send((idx, file.sync_data()));
                }
            })
            .map_err(io)?;
        Ok(ShardFile {
            name,
            dir: shard_dir,
            segments: RwLock::new(bases),
            writer: Mutex::new(Active { base, space }),
            syncer: Mutex::new(syncer),
            len: AtomicU64::new(base + file_len),
            notify: Notify::new(),
        })
    }

    /// Scans the frames of the active segment; returns the end of the last intact frame.
    fn recover(file: &File, len: u64) -> Result<u64, StreamError> {
        let mut reader = std::io::BufReader::with_capacity(1 << 20, file);
        let mut skip = [0u8; 8];
        reader.read_exact(&mut skip).map_err(io)?;
        let mut pos = HEADER;
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

    /// Bytes the shards' segments hold on disk (data, not preallocation).
    pub fn total_bytes(&self) -> u64 {
        // A segment begins where the previous one's file ends: the span is the bytes on disk.
        self.inner.shards.iter().map(|s| s.len.load(Ordering::Acquire).saturating_sub(s.first_base())).sum()
    }

    /// Segments on disk, per shard.
    pub fn segment_counts(&self) -> Vec<usize> {
        self.inner
            .shards
            .iter()
            .map(|s| s.segments.read().unwrap_or_else(std::sync::PoisonError::into_inner).len())
            .collect()
    }

    /// Closes the active segment of `shard` (it holds `file_end` bytes) and starts one at `base`.
    fn roll(&self, shard: &ShardFile, active: &mut Active, file_end: u64) -> std::io::Result<()> {
        active.space.finish();
        // Cut the preallocated zeros: a closed segment's file length is its data.
        active.space.file.set_len(file_end)?;
        if self.inner.options.fsync {
            active.space.file.sync_all()?;
        }
        let base = active.base + file_end;
        let path = ShardFile::segment_path(&shard.dir, base);
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path)?;
        let written =
            file.write_all_at(MAGIC, 0).and_then(|()| if self.inner.options.fsync { file.sync_all() } else { Ok(()) });
        let synced = written.and_then(|()| if self.inner.options.fsync { sync_dir(&shard.dir) } else { Ok(()) });
        if let Err(e) = synced {
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        let file = Arc::new(file);
        let space = Arc::new(Space {
            file: Arc::clone(&file),
            allocated: AtomicU64::new(HEADER),
            grow: Mutex::new(()),
            ahead: Mutex::new(None),
            fsync: self.inner.options.fsync,
        });
        shard.segments.write().unwrap_or_else(std::sync::PoisonError::into_inner).push(base);
        *active = Active { base, space };
        // The closed segment's end is the new base: readers at it move on.
        shard.len.store(base, Ordering::Release);
        Ok(())
    }

    /// Appends records (grouped per shard, order kept per key) and syncs them to disk. On an
    /// error nothing of this call is acknowledged, and what it wrote is overwritten with zeros.
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
        let undo = |held: &mut Vec<(&ShardFile, std::sync::MutexGuard<'_, Active>, u64, u64)>| {
            for (_, w, at, end) in held.drain(..) {
                let _ = w.space.file.write_all_at(&vec![0u8; (end - at) as usize], at);
            }
        };
        for (shard, buf) in self.inner.shards.iter().zip(&frames).filter(|(_, buf)| !buf.is_empty()) {
            let Ok(mut w) = shard.writer.lock() else {
                undo(&mut held);
                return Err(StreamError::Unavailable("log writer poisoned".into()));
            };
            let mut at = shard.len.load(Ordering::Acquire) - w.base;
            if at > HEADER && at + buf.len() as u64 > self.inner.options.segment_bytes {
                if let Err(e) = self.roll(shard, &mut w, at) {
                    undo(&mut held);
                    return Err(io(e));
                }
                at = HEADER;
            }
            let end = at + buf.len() as u64;
            let written = if end > w.space.allocated.load(Ordering::Acquire) { w.space.grow_to(end) } else { Ok(()) };
            if let Err(e) = written.and_then(|()| w.space.file.write_all_at(buf, at)) {
                let _ = w.space.file.write_all_at(&vec![0u8; buf.len()], at);
                undo(&mut held);
                return Err(io(e));
            }
            held.push((shard, w, at, end));
        }
        let synced: Vec<std::io::Result<()>> = if !self.inner.options.fsync {
            held.iter().map(|_| Ok(())).collect()
        } else if held.len() == 1 {
            vec![held[0].1.space.file.sync_data()]
        } else {
            let (tx, rx) = std::sync::mpsc::channel();
            for (i, (shard, w, ..)) in held.iter().enumerate() {
                let sent =
                    shard.syncer.lock().is_ok_and(|s| s.send((i, Arc::clone(&w.space.file), tx.clone())).is_ok());
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
                    shard.len.store(w.base + end, Ordering::Release);
                    w.space.grow_ahead(end);
                    drop(w);
                    shard.notify.notify_waiters();
                }
                Err(e) => {
                    // Not acknowledged: leave zeros, not frames a restart could take for records.
                    let _ = w.space.file.write_all_at(&vec![0u8; (end - at) as usize], at);
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

    /// Deletes the closed segments of `shard` that end at or before `before` (a position whose
    /// record was consumed: the shard's checkpoint) and were last written at least `min_age` ago.
    pub fn trim(&self, shard: &str, before: &Position, min_age: Duration) -> Result<Trimmed, StreamError> {
        let Some(s) = self.inner.shards.iter().find(|s| s.name == shard) else {
            return Err(StreamError::Invalid(format!("no shard {shard}")));
        };
        let Some(before) = before.as_u64() else {
            return Err(StreamError::Invalid(format!("{before} is not an embedded log position")));
        };
        let now = SystemTime::now();
        let mut trimmed = Trimmed::default();
        let mut segments = s.segments.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        // A segment ends where the next begins; the last (active) one is never deleted.
        let mut keep_from = 0;
        for (i, pair) in segments.windows(2).enumerate() {
            let (base, end) = (pair[0], pair[1]);
            if end > before {
                break;
            }
            let path = ShardFile::segment_path(&s.dir, base);
            let meta = std::fs::metadata(&path).map_err(io_at(&path))?;
            let age = meta.modified().ok().and_then(|m| now.duration_since(m).ok()).unwrap_or_default();
            if age < min_age {
                break;
            }
            std::fs::remove_file(&path).map_err(io_at(&path))?;
            trimmed.segments += 1;
            trimmed.bytes += meta.len();
            keep_from = i + 1;
        }
        if keep_from > 0 {
            segments.drain(..keep_from);
            drop(segments);
            sync_dir(&s.dir).map_err(io_at(&s.dir))?;
            crate::metrics::log_trimmed(shard, trimmed.segments, trimmed.bytes);
        }
        Ok(trimmed)
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
            Ok(tokio::runtime::RuntimeFlavor::MultiThread) if self.inner.options.fsync => {
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
        let sf = &self.inner.shards[idx];
        let mut reader = LogReader { log: Arc::clone(&self.inner), shard: idx, segment: None, pos: sf.first_base() };
        if let Some(p) = after {
            let end = sf.len.load(Ordering::Acquire);
            let offset = p.as_u64().filter(|o| o + FRAME_HEADER <= end).ok_or_else(|| {
                StreamError::Corrupt(format!("checkpoint {p} is outside shard {shard} (length {end})"))
            })?;
            let first = sf.first_base();
            if offset < first {
                return Err(StreamError::Corrupt(format!(
                    "checkpoint {p} of shard {shard} is in a deleted segment (the oldest starts at {first})"
                )));
            }
            reader.pos = offset;
            reader.enter_segment()?;
            let Some(seg) = &reader.segment else {
                return Err(StreamError::Corrupt(format!("checkpoint {p} is outside shard {shard}")));
            };
            if offset < seg.base + HEADER {
                return Err(StreamError::Corrupt(format!("checkpoint {p} is not a record of shard {shard}")));
            }
            let mut header = [0u8; 4];
            seg.file.read_exact_at(&mut header, offset - seg.base).map_err(io)?;
            reader.pos = offset + FRAME_HEADER + u64::from(u32::from_le_bytes(header));
        }
        Ok(reader)
    }
}

/// The segment a reader is in.
#[derive(Debug)]
struct ReadSegment {
    base: u64,
    /// Where it ends (the next segment's base), once closed.
    end: Option<u64>,
    file: File,
}

/// Reads one shard of an [`EmbeddedLog`].
#[derive(Debug)]
pub struct LogReader {
    log: Arc<LogInner>,
    shard: usize,
    segment: Option<ReadSegment>,
    /// Position of the next record (or of a segment boundary before it).
    pos: u64,
}

impl LogReader {
    /// Position of the next record.
    pub fn offset(&self) -> u64 {
        self.pos
    }

    /// Opens the segment holding `pos` (moving past a segment's header).
    fn enter_segment(&mut self) -> Result<(), StreamError> {
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
        let path = dir.path().join("shard-0000").join(format!("{:020}.seg", 0));
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
    async fn a_version_1_single_file_log_becomes_the_first_segment() {
        let dir = tempfile::tempdir().unwrap();
        let first;
        {
            let log = EmbeddedLog::open(dir.path(), 1).unwrap();
            log.append(&[rec("k", "one")]).unwrap();
            log.seal();
            first = read_all(&log, "shard-0000", None).await[0].0;
        }
        // What version 1 wrote: one file per shard, its magic, the frames, no preallocated zeros.
        let seg = dir.path().join("shard-0000").join(format!("{:020}.seg", 0));
        let legacy = dir.path().join("shard-0000.log");
        std::fs::rename(&seg, &legacy).unwrap();
        let f = OpenOptions::new().write(true).open(&legacy).unwrap();
        f.write_all_at(MAGIC_V1, 0).unwrap();
        f.set_len(8 + 8 + 3).unwrap();
        drop(f);
        let log = EmbeddedLog::open(dir.path(), 1).unwrap();
        assert!(!legacy.exists() && seg.exists(), "moved into the shard's directory");
        log.append(&[rec("k", "two")]).unwrap();
        log.seal();
        let got: Vec<_> = read_all(&log, "shard-0000", None).await.into_iter().map(|(_, p)| p).collect();
        assert_eq!(got, ["one", "two"]);
        let after_first: Vec<_> =
            read_all(&log, "shard-0000", Some(&Position::offset(first))).await.into_iter().map(|(_, p)| p).collect();
        assert_eq!(after_first, ["two"], "an old checkpoint (a byte offset) still means the same record");
        let mut magic = [0u8; 8];
        File::open(&seg).unwrap().read_exact_at(&mut magic, 0).unwrap();
        assert_eq!(&magic, MAGIC, "upgraded, so an older binary refuses the zeros");
    }

    fn small(fsync: bool) -> LogOptions {
        LogOptions { fsync, segment_bytes: 64 << 10 }
    }

    #[tokio::test]
    async fn segments_roll_positions_keep_growing_and_resume_across_them() {
        let dir = tempfile::tempdir().unwrap();
        let log = EmbeddedLog::open_with_options(dir.path(), 1, small(false)).unwrap();
        let payload = "x".repeat(1000);
        for i in 0..300 {
            let p = format!("{i:04}{payload}");
            log.append(&[rec("k", &p)]).unwrap();
        }
        log.seal();
        assert!(log.segment_counts()[0] >= 4, "{:?}", log.segment_counts());
        let all = read_all(&log, "shard-0000", None).await;
        assert_eq!(all.len(), 300);
        assert!(all.windows(2).all(|w| w[0].0 < w[1].0), "positions grow");
        assert!(all.iter().enumerate().all(|(i, (_, p))| p.starts_with(&format!("{i:04}"))), "in order");
        // Resume after any record, including the last of a segment.
        for i in [0, 63, 64, 65, 150, 298] {
            let rest = read_all(&log, "shard-0000", Some(&Position::offset(all[i].0))).await;
            assert_eq!(rest, all[i + 1..].to_vec(), "after record {i}");
        }
        let rest = read_all(&log, "shard-0000", Some(&Position::offset(all[299].0))).await;
        assert!(rest.is_empty());
        // Closed segments hold their data only.
        let disk: u64 = std::fs::read_dir(dir.path().join("shard-0000"))
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        assert!(disk < log.total_bytes() + (1 << 20) + 1, "{disk} on disk for {}", log.total_bytes());
    }

    #[tokio::test]
    async fn trim_deletes_only_closed_consumed_old_enough_segments_and_a_reopen_reads_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let payload = "y".repeat(1000);
        let all;
        {
            let log = EmbeddedLog::open_with_options(dir.path(), 1, small(true)).unwrap();
            for i in 0..300 {
                let p = format!("{i:04}{payload}");
                log.append(&[rec("k", &p)]).unwrap();
            }
            log.seal();
            all = read_all(&log, "shard-0000", None).await;
            let segments = log.segment_counts()[0];
            let checkpoint = Position::offset(all[200].0);
            assert_eq!(
                log.trim("shard-0000", &checkpoint, Duration::from_secs(3600)).unwrap(),
                Trimmed::default(),
                "too young"
            );
            let t = log.trim("shard-0000", &checkpoint, Duration::ZERO).unwrap();
            assert!(t.segments >= 2 && t.bytes > 0, "{t:?}");
            assert_eq!(log.segment_counts()[0], segments - t.segments as usize);
            // The checkpoint's record is still readable, and everything after it.
            let rest = read_all(&log, "shard-0000", Some(&checkpoint)).await;
            assert_eq!(rest, all[201..].to_vec());
            // Everything consumed: only the active segment stays.
            log.trim("shard-0000", &Position::offset(all[299].0), Duration::ZERO).unwrap();
            assert_eq!(log.segment_counts()[0], 1);
            // A position inside a deleted segment is refused with a clear error.
            let err = log.open("shard-0000", Some(&Position::offset(all[10].0))).await.unwrap_err();
            assert!(err.to_string().contains("deleted segment"), "{err}");
        }
        let log = EmbeddedLog::open_with_options(dir.path(), 1, small(true)).unwrap();
        log.append(&[rec("k", "after")]).unwrap();
        log.seal();
        let got = read_all(&log, "shard-0000", Some(&Position::offset(all[299].0))).await;
        assert_eq!(got.len(), 1);
        assert!(got[0].0 > all[299].0 && got[0].1 == "after");
        // From the beginning = from the oldest kept segment.
        let from_start = read_all(&log, "shard-0000", None).await;
        assert_eq!(from_start.last().unwrap().1, "after");
        assert!(from_start.len() < 300);
    }

    #[tokio::test]
    async fn a_reader_follows_the_log_into_a_new_segment() {
        let dir = tempfile::tempdir().unwrap();
        let log = EmbeddedLog::open_with_options(dir.path(), 1, small(false)).unwrap();
        let mut r = log.open("shard-0000", None).await.unwrap();
        let mut batch = RecordBatch::new();
        let payload = "z".repeat(1000);
        let mut seen = 0;
        for i in 0..200 {
            let p = format!("{i:04}{payload}");
            log.append(&[rec("k", &p)]).unwrap();
            r.next_batch(&mut batch, 10).await.unwrap();
            for (_, p) in batch.iter() {
                assert!(p.starts_with(format!("{seen:04}").as_bytes()));
                seen += 1;
            }
        }
        while seen < 200 {
            r.next_batch(&mut batch, 10).await.unwrap();
            seen += batch.len();
        }
        assert_eq!(seen, 200);
        assert!(log.segment_counts()[0] > 2);
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
