//! The stream abstraction every backend implements: shards, readers that hand out records in
//! order, and producers that append records keyed by SKU.

use std::future::Future;
use std::ops::Range;

use stockflow_state::Position;
use stockflow_state::lease::HashRange;

/// A batch of records read from one shard, reusing its buffers between reads.
#[derive(Debug, Default)]
pub struct RecordBatch {
    buf: Vec<u8>,
    records: Vec<(u64, Range<usize>)>,
    positions: Vec<Position>,
}

impl RecordBatch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Empties the batch, keeping its capacity.
    pub fn clear(&mut self) {
        self.buf.clear();
        self.records.clear();
        self.positions.clear();
    }

    /// Number of records.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// True when the batch holds no record.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Appends a record whose position is an integer offset (embedded log, Kafka).
    pub fn push_offset(&mut self, offset: u64, payload: &[u8]) {
        let start = self.buf.len();
        self.buf.extend_from_slice(payload);
        self.records.push((offset, start..self.buf.len()));
    }

    /// Takes the (cleared) byte buffer, for a reader that fills it in place and then adds records
    /// with [`RecordBatch::push_range`] before handing it back with [`RecordBatch::set_buffer`].
    pub fn take_buffer(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buf)
    }

    /// Hands the buffer back (see [`RecordBatch::take_buffer`]).
    pub fn set_buffer(&mut self, buf: Vec<u8>) {
        self.buf = buf;
    }

    /// Adds a record whose payload is `range` of the buffer being filled (no copy).
    pub fn push_range(&mut self, offset: u64, range: Range<usize>) {
        self.records.push((offset, range));
    }

    /// Appends a record with a full position (Kinesis sequence numbers).
    pub fn push_position(&mut self, position: Position, payload: &[u8]) {
        let idx = self.positions.len() as u64;
        self.positions.push(position);
        let start = self.buf.len();
        self.buf.extend_from_slice(payload);
        self.records.push((idx, start..self.buf.len()));
    }

    /// The records' payloads with their offsets (or indices into the positions, for
    /// [`RecordBatch::push_position`] batches).
    pub fn iter(&self) -> impl Iterator<Item = (u64, &[u8])> + '_ {
        self.records.iter().map(|(o, r)| (*o, &self.buf[r.clone()]))
    }

    /// The position of the record with key `k` as yielded by [`RecordBatch::iter`].
    pub fn position(&self, k: u64) -> Position {
        if self.positions.is_empty() { Position::offset(k) } else { self.positions[k as usize].clone() }
    }
}

/// What a read found beyond the records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadStatus {
    /// More records may come.
    Open,
    /// The shard is closed and fully read (SHARD_END, or a sealed embedded log).
    End,
}

/// Errors of a stream backend.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// I/O or service trouble that may pass: retry with backoff.
    #[error("stream unavailable: {0}")]
    Unavailable(String),
    /// Stored records are damaged: stop and investigate.
    #[error("stream corrupt: {0}")]
    Corrupt(String),
    /// The request is wrong (unknown shard, bad config): do not retry.
    #[error("stream misconfigured: {0}")]
    Invalid(String),
}

impl StreamError {
    /// True when retrying may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, StreamError::Unavailable(_))
    }

    /// The same error again, for each of several waiters on one outcome.
    pub fn duplicate(&self) -> StreamError {
        match self {
            StreamError::Unavailable(m) => StreamError::Unavailable(m.clone()),
            StreamError::Corrupt(m) => StreamError::Corrupt(m.clone()),
            StreamError::Invalid(m) => StreamError::Invalid(m.clone()),
        }
    }
}

/// How far a reader is behind; each backend knows some of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Lag {
    /// Records not yet read (Kafka).
    pub records: Option<u64>,
    /// Milliseconds behind the newest record (Kinesis `MillisBehindLatest`).
    pub millis: Option<u64>,
    /// Bytes not yet read (embedded log).
    pub bytes: Option<u64>,
}

/// Reads one shard in order.
pub trait ShardReader: Send + 'static {
    /// Clears `batch` and fills it with up to `max` records. Waits a short while for data when
    /// none is available, so callers can interleave commits and shutdown checks.
    fn next_batch(
        &mut self,
        batch: &mut RecordBatch,
        max: usize,
    ) -> impl Future<Output = Result<ReadStatus, StreamError>> + Send;

    /// How far the reader is behind the head of the shard after its last read.
    fn lag(&self) -> Lag;

    /// Whether the last read took everything the shard held when the read was made — the
    /// reader is caught up, so a worker commits what it read at once. `None`: the backend cannot
    /// tell that apart from [`ShardReader::lag`], which the worker then uses.
    fn caught_up(&self) -> Option<bool> {
        None
    }

    /// After [`ReadStatus::End`]: the shards that continue this one (a reshard), if any.
    fn children(&self) -> Vec<ShardInfo> {
        Vec::new()
    }
}

/// A shard with its lineage: the shards it continues and the hash keys it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardInfo {
    /// The shard id.
    pub id: String,
    /// The shards it was split or merged from (none for an original shard).
    pub parents: Vec<String>,
    /// Its hash keys (`None` where the backend has no hash ranges).
    pub hash_range: Option<HashRange>,
}

impl ShardInfo {
    /// A shard without parents or range (embedded log, Kafka partitions).
    pub fn root(id: String) -> Self {
        ShardInfo { id, parents: Vec::new(), hash_range: None }
    }
}

/// A stream's shards, each opened at a position.
pub trait StreamSource: Send + Sync + 'static {
    /// The reader type.
    type Reader: ShardReader;

    /// The shard ids.
    fn shards(&self) -> impl Future<Output = Result<Vec<String>, StreamError>> + Send;

    /// The shards with their lineage (open and closed ones still in retention).
    fn shard_infos(&self) -> impl Future<Output = Result<Vec<ShardInfo>, StreamError>> + Send {
        async { Ok(self.shards().await?.into_iter().map(ShardInfo::root).collect()) }
    }

    /// Opens `shard` just after `after` (or at its start when `None`).
    fn open(
        &self,
        shard: &str,
        after: Option<&Position>,
    ) -> impl Future<Output = Result<Self::Reader, StreamError>> + Send;
}

/// One record to put on the stream.
#[derive(Debug, Clone, Copy)]
pub struct OutRecord<'a> {
    /// Partition key: the SKU.
    pub key: &'a str,
    /// The canonical event JSON.
    pub payload: &'a [u8],
}

/// Appends records to a stream; `Ok` means every record is durably accepted.
pub trait StreamProducer: Send + Sync + 'static {
    /// Puts records, keyed by SKU; per key, order is kept.
    fn put(&self, records: &[OutRecord<'_>]) -> impl Future<Output = Result<(), StreamError>> + Send;

    /// Whether puts can be expected to succeed now — what `/readyz` answers: the stream exists
    /// and answers. Cheap enough for a load balancer's health check (a remote check is cached).
    fn ready(&self) -> impl Future<Output = Result<(), StreamError>> + Send {
        async { Ok(()) }
    }
}
