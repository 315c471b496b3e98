//! Group commit in front of any [`StreamProducer`]: the records of concurrent `put` calls travel
//! in one call to the backend — one PutRecords instead of one per HTTP request, one `fdatasync` of
//! the embedded log instead of one per request.
//!
//! A batch is what has queued while the previous batch was being written (`linger` zero, the
//! default: no added latency when idle), or what arrives within `linger` of its first request;
//! it closes at `max_records` or `max_bytes` (a request is never split, so a batch may pass the
//! limit by one request; the backend splits what it must). Up to `max_in_flight` batches are
//! written at once. Every caller gets the outcome of the batch that carried its records: `Ok`
//! only once they are durable.
//!
//! Order: the records of one `put` keep their order; a `put` that returned before another began
//! lands first. Two calls in flight at the same time have no order between them — neither caller
//! has been told its records are on the stream — exactly as without batching.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::time::Instant;
use tracing::Instrument as _;

use crate::source::{OutRecord, StreamError, StreamProducer};

/// How batches form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchConfig {
    /// How long a batch waits for more requests after its first (zero: only what has queued).
    pub linger: Duration,
    /// A batch closes at this many records (a Kinesis PutRecords call takes 500).
    pub max_records: usize,
    /// … or this many payload bytes (PutRecords takes 5 MiB).
    pub max_bytes: usize,
    /// Batches written at once.
    pub max_in_flight: usize,
    /// Requests waiting for a batch before `put` callers wait for room.
    pub queue: usize,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig { linger: Duration::ZERO, max_records: 500, max_bytes: 5 << 20, max_in_flight: 1, queue: 4096 }
    }
}

/// One caller's records, copied once into one buffer.
struct Job {
    buf: Vec<u8>,
    /// `(key end, payload end)` offsets into `buf`, consecutive.
    bounds: Vec<(usize, usize)>,
    done: oneshot::Sender<Result<(), StreamError>>,
    /// The caller's span (e.g. `ingest.request`): the put's parent, or one of its links.
    span: tracing::Span,
}

impl Job {
    fn records(&self) -> impl Iterator<Item = OutRecord<'_>> {
        let mut start = 0;
        self.bounds.iter().map(move |&(key_end, end)| {
            let key = std::str::from_utf8(&self.buf[start..key_end]).unwrap_or_default();
            let r = OutRecord { key, payload: &self.buf[key_end..end] };
            start = end;
            r
        })
    }
}

/// A [`StreamProducer`] that batches concurrent puts into calls of the inner producer.
#[derive(Debug)]
pub struct Batching<P> {
    tx: mpsc::Sender<Job>,
    /// The batches go to this producer (also asked whether it is ready).
    inner: Arc<P>,
    /// Requests handed to the batching task so far.
    submitted: std::sync::atomic::AtomicU64,
}

impl<P: StreamProducer> Batching<P> {
    /// Starts the batching task (on the current tokio runtime) in front of `inner`.
    pub fn new(inner: Arc<P>, cfg: BatchConfig) -> Self {
        let (tx, rx) = mpsc::channel(cfg.queue.max(1));
        tokio::spawn(run(Arc::clone(&inner), rx, cfg));
        Batching { tx, inner, submitted: std::sync::atomic::AtomicU64::new(0) }
    }
}

impl<P: StreamProducer> StreamProducer for Batching<P> {
    async fn ready(&self) -> Result<(), StreamError> {
        if self.tx.is_closed() {
            return Err(StreamError::Unavailable("the batching task has stopped".into()));
        }
        self.inner.ready().await
    }

    async fn put(&self, records: &[OutRecord<'_>]) -> Result<(), StreamError> {
        if records.is_empty() {
            return Ok(());
        }
        let size = records.iter().map(|r| r.key.len() + r.payload.len()).sum();
        let mut buf = Vec::with_capacity(size);
        let mut bounds = Vec::with_capacity(records.len());
        for r in records {
            buf.extend_from_slice(r.key.as_bytes());
            let key_end = buf.len();
            buf.extend_from_slice(r.payload);
            bounds.push((key_end, buf.len()));
        }
        let (done, answer) = oneshot::channel();
        self.tx
            .send(Job { buf, bounds, done, span: tracing::Span::current() })
            .await
            .map_err(|_| StreamError::Unavailable("the batching task has stopped".into()))?;
        self.submitted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        answer.await.map_err(|_| StreamError::Unavailable("the batch was dropped before it was written".into()))?
    }
}

async fn run<P: StreamProducer>(inner: Arc<P>, mut rx: mpsc::Receiver<Job>, cfg: BatchConfig) {
    let slots = Arc::new(Semaphore::new(cfg.max_in_flight.max(1)));
    while let Some(first) = rx.recv().await {
        let deadline = Instant::now() + cfg.linger;
        // Waiting for a slot lets the batch grow meanwhile: the group commit.
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else { return };
        let (mut records, mut bytes) = (first.bounds.len(), first.buf.len());
        let mut jobs = vec![first];
        while records < cfg.max_records && bytes < cfg.max_bytes {
            let next = match rx.try_recv() {
                Ok(job) => job,
                Err(mpsc::error::TryRecvError::Disconnected) => break,
                Err(mpsc::error::TryRecvError::Empty) if cfg.linger.is_zero() => break,
                Err(mpsc::error::TryRecvError::Empty) => match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(job)) => job,
                    Ok(None) | Err(_) => break,
                },
            };
            records += next.bounds.len();
            bytes += next.buf.len();
            jobs.push(next);
        }
        let inner = Arc::clone(&inner);
        tokio::spawn(async move {
            let outcome = put_jobs(&*inner, &jobs).await;
            match outcome {
                // A permanent refusal (a record the backend cannot take) belongs to one request,
                // not to the batch: put each request alone so only the offender hears it.
                Err(StreamError::Invalid(_)) if jobs.len() > 1 => {
                    for job in jobs {
                        let alone = put_jobs(&*inner, std::slice::from_ref(&job)).await;
                        let _ = job.done.send(alone);
                    }
                }
                outcome => {
                    for job in jobs {
                        let _ = job.done.send(outcome.as_ref().map(|_| ()).map_err(StreamError::duplicate));
                    }
                }
            }
            drop(slot);
        });
    }
}

/// Numbers the puts of the process: the `batch` of a `stream.put` span.
static BATCHES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// One put of the jobs' records, measured, in a `stream.put` span: a child of the first job's
/// span, following from the others' (one group commit serves several requests).
async fn put_jobs<P: StreamProducer>(inner: &P, jobs: &[Job]) -> Result<(), StreamError> {
    let batch: Vec<OutRecord<'_>> = jobs.iter().flat_map(Job::records).collect();
    crate::metrics::put_batch(jobs.len(), batch.len());
    let span = tracing::info_span!(
        parent: &jobs[0].span,
        "stream.put",
        batch = BATCHES.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1,
        records = batch.len(),
        requests = jobs.len(),
        outcome = tracing::field::Empty,
    );
    for job in &jobs[1..] {
        span.follows_from(&job.span);
    }
    let started = std::time::Instant::now();
    let outcome = inner.put(&batch).instrument(span.clone()).await;
    crate::metrics::put_done(started.elapsed());
    span.record("outcome", if outcome.is_ok() { "ok" } else { "error" });
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// One backend call: (key, payload) per record.
    type Call = Vec<(String, Vec<u8>)>;

    /// Records every call; fails the calls whose number is listed.
    #[derive(Default)]
    struct Recorder {
        calls: Mutex<Vec<Call>>,
        fail: Mutex<Vec<usize>>,
        gate: tokio::sync::Notify,
        hold_first: bool,
        /// Refuses (as invalid) any call carrying this payload.
        refuse: Option<&'static [u8]>,
    }

    impl StreamProducer for Recorder {
        async fn put(&self, records: &[OutRecord<'_>]) -> Result<(), StreamError> {
            let n = {
                let mut calls = self.calls.lock().unwrap();
                calls.push(records.iter().map(|r| (r.key.to_string(), r.payload.to_vec())).collect());
                calls.len()
            };
            if self.hold_first && n == 1 {
                self.gate.notified().await;
            }
            if self.refuse.is_some_and(|bad| records.iter().any(|r| r.payload == bad)) {
                return Err(StreamError::Invalid("record too large".into()));
            }
            if self.fail.lock().unwrap().contains(&n) {
                return Err(StreamError::Unavailable(format!("call {n} refused")));
            }
            Ok(())
        }
    }

    #[tokio::test]
    async fn requests_queued_behind_a_write_share_the_next_call_and_its_outcome() {
        let rec = Arc::new(Recorder { hold_first: true, ..Recorder::default() });
        rec.fail.lock().unwrap().push(2);
        let b = Arc::new(Batching::new(Arc::clone(&rec), BatchConfig::default()));
        let put = |key: &'static str, body: &'static str| {
            let b = Arc::clone(&b);
            tokio::spawn(async move { b.put(&[OutRecord { key, payload: body.as_bytes() }]).await })
        };
        let first = put("A", "1");
        // Wait until the first call is in the backend, then queue three more behind it.
        while rec.calls.lock().unwrap().is_empty() {
            tokio::task::yield_now().await;
        }
        let queued: Vec<_> = [("A", "2"), ("B", "3"), ("A", "4")].into_iter().map(|(k, v)| put(k, v)).collect();
        // All three are with the batching task (queued, or holding the batch that waits for the
        // backend's one slot) before the first call returns.
        while b.submitted.load(std::sync::atomic::Ordering::Relaxed) != 4 {
            tokio::task::yield_now().await;
        }
        rec.gate.notify_one();
        assert!(first.await.unwrap().is_ok());
        for q in queued {
            assert!(q.await.unwrap().is_err(), "the second call failed, so all three callers hear it");
        }
        let calls = rec.calls.lock().unwrap();
        assert_eq!(calls.len(), 2, "three requests, one call: {calls:?}");
        let second: Vec<(&str, &[u8])> = calls[1].iter().map(|(k, v)| (k.as_str(), v.as_slice())).collect();
        assert_eq!(second, [("A", b"2".as_slice()), ("B", b"3"), ("A", b"4")]);
    }

    #[tokio::test]
    async fn a_request_the_backend_refuses_fails_alone() {
        let rec = Arc::new(Recorder { hold_first: true, refuse: Some(b"BAD"), ..Recorder::default() });
        let b = Arc::new(Batching::new(Arc::clone(&rec), BatchConfig::default()));
        let put = |body: &'static str| {
            let b = Arc::clone(&b);
            tokio::spawn(async move { b.put(&[OutRecord { key: "K", payload: body.as_bytes() }]).await })
        };
        let first = put("1");
        while rec.calls.lock().unwrap().is_empty() {
            tokio::task::yield_now().await;
        }
        let queued: Vec<_> = ["2", "BAD", "4"].into_iter().map(put).collect();
        while b.submitted.load(std::sync::atomic::Ordering::Relaxed) != 4 {
            tokio::task::yield_now().await;
        }
        rec.gate.notify_one();
        assert!(first.await.unwrap().is_ok());
        let outcomes: Vec<bool> = futures_join(queued).await;
        assert_eq!(outcomes, [true, false, true], "only the refused request fails");
        // The batch of three, then each of them alone.
        let sizes: Vec<usize> = rec.calls.lock().unwrap().iter().map(Vec::len).collect();
        assert_eq!(sizes, [1, 3, 1, 1, 1]);
    }

    async fn futures_join(tasks: Vec<tokio::task::JoinHandle<Result<(), StreamError>>>) -> Vec<bool> {
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap().is_ok());
        }
        out
    }

    #[tokio::test(start_paused = true)]
    async fn linger_gathers_requests_until_the_batch_is_full_or_old() {
        let rec = Arc::new(Recorder::default());
        let cfg = BatchConfig { linger: Duration::from_millis(5), max_records: 3, ..BatchConfig::default() };
        let b = Arc::new(Batching::new(Arc::clone(&rec), cfg));
        let mut tasks = Vec::new();
        for i in 0..4u8 {
            let b = Arc::clone(&b);
            let payload = vec![b'0' + i];
            tasks.push(tokio::spawn(async move { b.put(&[OutRecord { key: "K", payload: &payload }]).await }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let sizes: Vec<usize> = rec.calls.lock().unwrap().iter().map(Vec::len).collect();
        assert_eq!(sizes, [3, 1], "full at three records, then the fourth alone after the linger");
        let order: Vec<u8> = rec.calls.lock().unwrap().iter().flatten().map(|(_, p)| p[0]).collect();
        assert_eq!(order, b"0123");
    }
}
