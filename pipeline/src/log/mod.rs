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
//!
//! One file of ~690 lines: the segment format, appends, sealing and retention share a shard's file
//! handle and positions; the reader and the tests are modules of their own.

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

use crate::source::{OutRecord, StreamError, StreamProducer, StreamSource};

/// Version 2: the file may end in preallocated zeros (a zero frame header ends the data).
const MAGIC: &[u8; 8] = b"SFLOG\0\0\x02";
/// Version 1 (no preallocation): read as is, upgraded to version 2 on open, so that an older
/// binary refuses the file instead of reading the zeros as empty records.
const MAGIC_V1: &[u8; 8] = b"SFLOG\0\0\x01";
const HEADER: u64 = MAGIC.len() as u64;
const FRAME_HEADER: u64 = 8;
/// Largest record accepted (Kinesis's limit, kept for parity).
pub const MAX_RECORD_BYTES: usize = 1 << 20;
/// Bytes read from a shard file per read call, at most: a read stops at the batch's record count
/// (4,096 records of ~160 bytes are ~650 KB) and what was read past it is read again next time, so
/// a larger chunk only copies more (4 MiB copied ~6× the bytes used and held 4 MiB per reader).
const READ_CHUNK: usize = 1 << 20;
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
        let mut reader =
            LogReader { log: Arc::clone(&self.inner), shard: idx, segment: None, pos: sf.first_base(), head: 0 };
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

mod reader;
#[cfg(test)]
mod tests;

pub use reader::LogReader;
