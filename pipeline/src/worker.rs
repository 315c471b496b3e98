//! `ShardWorker`: one task per shard. It restores the shard's state from the store, reads records
//! in order after the checkpoint, decodes and applies them, dead-letters bad records, and commits
//! state + effects + dead letters + checkpoint, before it stops, and at shutdown.
//!
//! Commit cadence is adaptive, so that latency follows load instead of a fixed timer: when a read
//! finds the shard caught up (it took everything the shard held), what was read is committed at
//! once (no sooner than `commit_min_interval` after the previous commit); while records keep
//! coming, a commit happens every `commit_every_records` records, and at the latest
//! `commit_interval` after the oldest uncommitted record was read whenever the reader waits for
//! data. Under load the records that arrive while one commit is written make up the next one, so
//! a commit's cost is shared by more events the faster they come (group commit) and an idle
//! stream waits for nothing. A shard draining a backlog never waits for data: it commits every
//! `commit_every_records` records (fewer, larger commits — each writes its dirty SKUs' states).
//!
//! Over 600 lines only with its tests (~550 without).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use stockflow_state::engine::EngineStats;
use stockflow_state::{
    Applied, DeadLetter, EngineConfig, Position, ShardCommit, ShardEngine, StateStore, StoreError, decode,
};
use tokio::sync::watch;
use tokio::time::MissedTickBehavior;
use tracing::Instrument as _;

use crate::metrics::{self, BatchCounts};
use crate::source::{ReadStatus, RecordBatch, ShardInfo, ShardReader, StreamError, StreamSource};
use stockflow_state::engine::ShardSnapshot;
use stockflow_state::lease::HashRange;
use stockflow_state::retry::{Backoff, BackoffConfig};

/// Commit cadence and read sizes, validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerConfig {
    /// Commit after this many records.
    pub commit_every_records: usize,
    /// Commit at the latest this long after the oldest uncommitted record was read.
    pub commit_interval: Duration,
    /// A caught-up shard commits at once, but no sooner than this after its previous commit
    /// (zero: at once; a store that bills per write may want a floor).
    pub commit_min_interval: Duration,
    /// Records per read.
    pub batch_records: usize,
    /// Transient store errors retried this many times before the worker gives up.
    pub commit_attempts: u32,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            commit_every_records: 100_000,
            commit_interval: Duration::from_millis(500),
            commit_min_interval: Duration::ZERO,
            batch_records: 4096,
            commit_attempts: 10,
        }
    }
}

/// Live counters shared by all workers of a process (progress bars, `/metrics`).
#[derive(Debug, Default)]
pub struct Progress {
    /// Records read.
    pub read: AtomicU64,
    /// Events applied.
    pub applied: AtomicU64,
    /// Duplicates skipped.
    pub duplicates: AtomicU64,
    /// Records dead-lettered.
    pub dead_letters: AtomicU64,
    /// Effects produced.
    pub effects: AtomicU64,
    /// Commits written.
    pub commits: AtomicU64,
    /// Records covered by durable commits (read, then applied, skipped or dead-lettered). A
    /// record re-read after a takeover or crash counts again.
    pub committed: AtomicU64,
    /// Sum over shards of bytes not yet read (embedded log).
    pub lag_bytes: AtomicU64,
}

/// Why a worker stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// Reading the stream failed.
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// Writing or loading state failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a worker did, when it stops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerReport {
    /// The shard.
    pub shard: String,
    /// Engine counters at the end.
    pub stats: EngineStats,
    /// Last committed position.
    pub checkpoint: Option<Position>,
    /// Commits written.
    pub commits: u64,
    /// SKUs held in memory at the end.
    pub skus: usize,
    /// Approximate engine memory at the end.
    pub memory: stockflow_state::engine::MemoryUse,
    /// Live dedup entries at the end.
    pub dedup_entries: usize,
    /// The shard was read to its end and everything committed.
    pub ended: bool,
    /// Its children, when it ended because of a reshard.
    pub children: Vec<ShardInfo>,
}

/// Sleeps until `due` (never called without one: the select branch is disabled then).
async fn sleep_until_due(due: Option<tokio::time::Instant>) {
    if let Some(at) = due {
        tokio::time::sleep_until(at).await;
    }
}

/// Where a child shard's SKUs come from before its first commit (a reshard).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Lineage {
    /// Every ancestor shard whose stored SKUs may fall in this shard's range, nearest first.
    pub ancestors: Vec<String>,
    /// The shard's hash keys: the SKUs of the ancestors it takes over.
    pub range: Option<HashRange>,
}

/// The worker of one shard.
#[derive(Debug)]
pub struct ShardWorker<R: ShardReader, S: StateStore> {
    shard: String,
    reader: R,
    store: Arc<S>,
    engine: ShardEngine,
    cfg: WorkerConfig,
    epoch: u64,
    dead: Vec<DeadLetter>,
    uncommitted: usize,
    last: Option<Position>,
    checkpoint: Option<Position>,
    last_commit: Instant,
    /// When the oldest uncommitted record was read.
    first_uncommitted: Option<Instant>,
    commits: u64,
    seen: EngineStats,
    progress: Arc<Progress>,
    lag_reported: u64,
    /// SKUs whose stored state is ahead of the checkpoint (see `StoredShard::floors`).
    floors: HashMap<String, Position>,
    /// No commit may carry a checkpoint at or before this: its effects are already stored.
    commit_floor: Option<Position>,
    /// Ingest stamps of the uncommitted events, run-length encoded (ms, events).
    stamps: Vec<(i64, u32)>,
    /// When the first stored dedup entry expires (wall ms), for stores whose entries expire.
    dedup_expires_at: Option<i64>,
}

impl<R: ShardReader, S: StateStore> ShardWorker<R, S> {
    /// Restores the shard from `store` and opens its reader after the stored checkpoint.
    pub async fn start<Src: StreamSource<Reader = R>>(
        source: &Src,
        shard: &str,
        store: Arc<S>,
        engine_cfg: Arc<EngineConfig>,
        cfg: WorkerConfig,
        epoch: u64,
        progress: Arc<Progress>,
    ) -> Result<Self, WorkerError> {
        Self::start_with(source, shard, &Lineage::default(), store, engine_cfg, cfg, epoch, progress).await
    }

    /// Like [`ShardWorker::start`], for a shard that may continue others: until its first
    /// commit (no checkpoint yet), it takes over the ancestors' SKUs in its hash range and their
    /// dedup ids, and its first commit stores them all under this shard.
    #[allow(clippy::too_many_arguments)]
    pub async fn start_with<Src: StreamSource<Reader = R>>(
        source: &Src,
        shard: &str,
        lineage: &Lineage,
        store: Arc<S>,
        engine_cfg: Arc<EngineConfig>,
        cfg: WorkerConfig,
        epoch: u64,
        progress: Arc<Progress>,
    ) -> Result<Self, WorkerError> {
        let stored = store.load_shard(shard).await?;
        let mut engine = if stored.checkpoint.is_none() && !lineage.ancestors.is_empty() {
            let mut parts = vec![stored.snapshot];
            for ancestor in &lineage.ancestors {
                parts.push(store.load_shard(ancestor).await?.snapshot);
            }
            let range = lineage.range.unwrap_or(HashRange::ALL);
            let merged = ShardSnapshot::merge(parts, |sku| range.holds(sku));
            tracing::info!(shard, ancestors = ?lineage.ancestors, skus = merged.skus.len(), "taking over the parents' SKUs");
            ShardEngine::adopt(engine_cfg, merged)
        } else {
            ShardEngine::restore(engine_cfg, stored.snapshot)
        };
        if store.keeps_lines_apart() {
            engine.keep_lines_apart(stored.lines_log_bytes);
        }
        let reader = source.open(shard, stored.checkpoint.as_ref()).await?;
        let commit_floor = stored.floors.iter().map(|(_, p)| p.clone()).max();
        tracing::info!(
            shard, checkpoint = ?stored.checkpoint, skus = engine.sku_count(), floors = stored.floors.len(),
            "shard restored"
        );
        Ok(ShardWorker {
            shard: shard.to_string(),
            reader,
            store,
            engine,
            cfg,
            epoch,
            dead: Vec::new(),
            uncommitted: 0,
            last: None,
            checkpoint: stored.checkpoint,
            last_commit: Instant::now(),
            first_uncommitted: None,
            commits: 0,
            seen: EngineStats::default(),
            progress,
            lag_reported: 0,
            floors: stored.floors.into_iter().collect(),
            commit_floor,
            stamps: Vec::new(),
            dedup_expires_at: stored.dedup_expires_at_ms,
        })
    }

    /// The stored checkpoint the worker resumes after (`None`: the shard's start).
    pub fn checkpoint(&self) -> Option<&Position> {
        self.checkpoint.as_ref()
    }

    /// Processes records until the shard ends or `shutdown` turns true, then commits.
    pub async fn run(self, shutdown: watch::Receiver<bool>) -> Result<WorkerReport, WorkerError> {
        let shard = self.shard.clone();
        metrics::shard_started(&shard);
        let result = self.run_until(shutdown).await;
        metrics::shard_stopped(&shard);
        result
    }

    async fn run_until(mut self, mut shutdown: watch::Receiver<bool>) -> Result<WorkerReport, WorkerError> {
        let mut batch = RecordBatch::new();
        let mut tick = tokio::time::interval(self.cfg.commit_interval);
        tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
        let mut ended = false;
        // When the uncommitted records are to be committed (see the module doc).
        let mut due: Option<tokio::time::Instant> = None;
        loop {
            if *shutdown.borrow() {
                break;
            }
            tokio::select! {
                biased;
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        break;
                    }
                }
                () = sleep_until_due(due), if due.is_some() => {
                    due = None;
                    self.commit().await?;
                }
                _ = tick.tick() => {
                    self.refresh_dedup().await?;
                }
                status = self.reader.next_batch(&mut batch, self.cfg.batch_records) => {
                    let status = status?;
                    self.process(&batch);
                    if self.uncommitted >= self.cfg.commit_every_records {
                        due = None;
                        self.commit().await?;
                    } else if !batch.is_empty() {
                        let caught_up = self.reader.caught_up().unwrap_or_else(|| {
                            // The backend's lag where it has one; else a short read.
                            let lag = self.reader.lag();
                            let known = [lag.records, lag.millis, lag.bytes];
                            if known.iter().any(Option::is_some) {
                                known.iter().all(|l| l.is_none_or(|l| l == 0))
                            } else {
                                batch.len() < self.cfg.batch_records
                            }
                        });
                        due = self.commit_due(caught_up).map(|at| due.map_or(at, |d| d.min(at)));
                    }
                    if status == ReadStatus::End {
                        ended = true;
                        break;
                    }
                }
            }
        }
        self.commit().await?;
        self.report_lag();
        if ended {
            tracing::info!(shard = %self.shard, checkpoint = ?self.checkpoint, "shard read to its end and committed");
        }
        Ok(WorkerReport {
            shard: self.shard.clone(),
            stats: self.engine.stats(),
            checkpoint: self.checkpoint.clone(),
            commits: self.commits,
            skus: self.engine.sku_count(),
            memory: self.engine.memory(),
            dedup_entries: self.engine.dedup_len(),
            ended,
            children: if ended { self.reader.children() } else { Vec::new() },
        })
    }

    fn process(&mut self, batch: &RecordBatch) {
        let mut counts = BatchCounts::default();
        let mut last_key = None;
        for (k, payload) in batch.iter() {
            counts.read += 1;
            counts.bytes += payload.len() as u64;
            let decoded = decode(payload);
            if let Ok(ev) = &decoded
                && let Some(at) = ev.ingested_at
            {
                match self.stamps.last_mut() {
                    Some((ms, n)) if *ms == at => *n += 1,
                    _ => self.stamps.push((at, 1)),
                }
            }
            match decoded {
                Ok(ev)
                    if !self.floors.is_empty()
                        && self.floors.get(ev.sku.as_ref()).is_some_and(|f| batch.position(k) <= *f) =>
                {
                    // Already in the SKU's stored state (an interrupted split commit).
                    self.engine.remember(&ev);
                }
                Ok(ev) => match self.engine.apply(&ev) {
                    Applied::Applied => {}
                    Applied::Duplicate => tracing::debug!(shard = %self.shard, id = %ev.id, "duplicate skipped"),
                    Applied::Rejected(e) => {
                        let position = batch.position(k);
                        tracing::debug!(shard = %self.shard, %position, error = %e, "dead-lettered an event that cannot be applied");
                        self.dead.push(DeadLetter::new(&self.shard, position, e.to_string(), Some(e.field), payload));
                        counts.dead_letters += 1;
                    }
                },
                Err(e) => {
                    let position = batch.position(k);
                    tracing::debug!(shard = %self.shard, %position, error = %e, "dead-lettered a bad record");
                    self.dead.push(DeadLetter::new(&self.shard, position, e.to_string(), e.field(), payload));
                    counts.dead_letters += 1;
                }
            }
            last_key = Some(k);
        }
        let Some(k) = last_key else {
            self.report_lag();
            return;
        };
        self.last = Some(batch.position(k));
        if self.uncommitted == 0 {
            self.first_uncommitted = Some(Instant::now());
        }
        self.uncommitted += batch.len();
        let stats = self.engine.stats();
        counts.applied = stats.applied - self.seen.applied;
        counts.duplicates = stats.duplicates - self.seen.duplicates;
        counts.late = stats.late - self.seen.late;
        counts.resent_placements = stats.resent_placements - self.seen.resent_placements;
        counts.windows_final = stats.windows_final - self.seen.windows_final;
        counts.effects = stats.effects - self.seen.effects;
        self.seen = stats;
        if counts.dead_letters > 0 {
            tracing::info!(shard = %self.shard, count = counts.dead_letters, "dead-lettered bad records (see `stockflow dlq dump`)");
        }
        metrics::batch_processed(&self.shard, &counts);
        let p = &self.progress;
        p.read.fetch_add(counts.read, Ordering::Relaxed);
        p.applied.fetch_add(counts.applied, Ordering::Relaxed);
        p.duplicates.fetch_add(counts.duplicates, Ordering::Relaxed);
        p.dead_letters.fetch_add(counts.dead_letters, Ordering::Relaxed);
        p.effects.fetch_add(counts.effects, Ordering::Relaxed);
        self.report_lag();
    }

    fn report_lag(&mut self) {
        let lag = self.reader.lag();
        metrics::lag(&self.shard, &lag);
        let bytes = lag.bytes.unwrap_or(0);
        // Keep the process-wide sum current: add this shard's change since its last report.
        if bytes >= self.lag_reported {
            self.progress.lag_bytes.fetch_add(bytes - self.lag_reported, Ordering::Relaxed);
        } else {
            self.progress.lag_bytes.fetch_sub(self.lag_reported - bytes, Ordering::Relaxed);
        }
        self.lag_reported = bytes;
    }

    /// When the uncommitted records are due: at once (or at the minimum interval after the last
    /// commit) when the shard is caught up, else the commit interval after the oldest of them.
    fn commit_due(&self, caught_up: bool) -> Option<tokio::time::Instant> {
        let first = self.first_uncommitted?;
        let at =
            if caught_up { self.last_commit + self.cfg.commit_min_interval } else { first + self.cfg.commit_interval };
        Some(tokio::time::Instant::from_std(at))
    }

    /// A store whose dedup entries expire by wall clock (DynamoDB TTL) must see the live ones
    /// rewritten before they do — a quiet shard commits nothing for days, while its ids stay
    /// live in event time. When less than the store's refresh margin is left, the live set is
    /// rewritten: with the next commit, or alone at the stored checkpoint if the shard is idle.
    async fn refresh_dedup(&mut self) -> Result<(), WorkerError> {
        let Some(expiry) = self.store.dedup_expiry() else { return Ok(()) };
        let Some(at) = self.dedup_expires_at else { return Ok(()) };
        if at.saturating_sub(stockflow_state::now_ms()) > expiry.refresh_before_ms {
            return Ok(());
        }
        self.engine.rewrite_dedup();
        if self.uncommitted > 0 {
            return self.commit().await;
        }
        let Some(checkpoint) = self.checkpoint.clone() else { return Ok(()) };
        if self.commit_floor.is_some() {
            return Ok(()); // the replay of an interrupted commit comes first
        }
        tracing::info!(shard = %self.shard, "rewriting the live dedup ids before their TTL");
        self.write(checkpoint, true, false).await
    }

    /// Writes everything applied since the last commit, with its checkpoint.
    async fn commit(&mut self) -> Result<(), WorkerError> {
        let Some(checkpoint) = self.last.clone() else { return Ok(()) };
        if self.uncommitted == 0 {
            return Ok(());
        }
        let mut after_interrupted = false;
        if let Some(floor) = &self.commit_floor {
            if checkpoint < *floor {
                // Committing here would write effects a part of the interrupted commit holds.
                return Ok(());
            }
            // At exactly the interrupted commit's checkpoint (the replay reached its end, e.g. a
            // shard that ends there), the store keeps that commit's parts and adds this one's.
            after_interrupted = checkpoint == *floor;
        }
        self.write(checkpoint, false, after_interrupted).await?;
        self.commit_floor = None;
        self.floors.clear();
        Ok(())
    }

    /// One commit at `checkpoint` (`keep`: the stored one, dedup ids only), retried while the
    /// store's trouble is transient.
    async fn write(&mut self, checkpoint: Position, keep: bool, after_interrupted: bool) -> Result<(), WorkerError> {
        let written_at = stockflow_state::now_ms();
        let delta = self.engine.take_delta()?;
        let commit = Arc::new(ShardCommit {
            dead_letters: std::mem::take(&mut self.dead),
            keep_checkpoint: keep,
            after_interrupted,
            lag_ms: self.reader.lag().millis,
            ..ShardCommit::of_delta(&self.shard, self.epoch, checkpoint.clone(), delta)
        });
        // One span per commit (exported over OTLP when configured): the shard, the lease epoch,
        // the position it makes durable and what it carries.
        let span = tracing::info_span!(
            "shard.commit",
            shard = %self.shard,
            epoch = self.epoch,
            checkpoint = %checkpoint,
            records = self.uncommitted,
            effects = commit.effects.len(),
            attempts = tracing::field::Empty,
            outcome = tracing::field::Empty,
        );
        let (store, shard, attempts) = (&self.store, &self.shard, self.cfg.commit_attempts);
        let outcome = async {
            let mut backoff =
                Backoff::from_clock(BackoffConfig::new(Duration::from_millis(50), Duration::from_secs(5)))
                    .limited(attempts);
            let mut tries = 0u32;
            loop {
                tries += 1;
                tracing::Span::current().record("attempts", tries);
                let started = Instant::now();
                match store.commit(Arc::clone(&commit)).await {
                    Ok(()) => {
                        metrics::commit(shard, "ok", started.elapsed());
                        tracing::debug!(%shard, %checkpoint, elapsed = ?started.elapsed(), "committed");
                        return Ok("ok");
                    }
                    Err(e) if e.is_transient() => {
                        metrics::commit(shard, "retry", started.elapsed());
                        let Some(delay) = backoff.next_delay() else { return Err(e) };
                        tracing::warn!(%shard, error = %e, ?delay, "commit failed; retrying");
                        tokio::time::sleep(delay).await;
                    }
                    Err(e) => {
                        let outcome = if matches!(e, StoreError::Fenced { .. }) { "fenced" } else { "error" };
                        metrics::commit(shard, outcome, started.elapsed());
                        return Err(e);
                    }
                }
            }
        }
        .instrument(span.clone())
        .await;
        span.record(
            "outcome",
            outcome
                .as_ref()
                .map_or_else(|e| if matches!(e, StoreError::Fenced { .. }) { "fenced" } else { "error" }, |o| *o),
        );
        outcome?;
        metrics::committed(&self.shard, self.uncommitted as u64, &commit.effects, &self.stamps);
        if let Some(expiry) = self.store.dedup_expiry() {
            // The earliest expiry of what is stored: a rewrite resets it; appended entries
            // expire after the ones already there.
            let fresh = written_at.saturating_add(expiry.ttl_ms);
            match &commit.dedup {
                stockflow_state::engine::DedupDelta::Replace(b) => {
                    self.dedup_expires_at = (!b.is_empty()).then_some(fresh);
                }
                stockflow_state::engine::DedupDelta::Append(b) if !b.is_empty() => {
                    self.dedup_expires_at.get_or_insert(fresh);
                }
                stockflow_state::engine::DedupDelta::Append(_) => {}
            }
        }
        self.progress.committed.fetch_add(self.uncommitted as u64, Ordering::Relaxed);
        self.stamps.clear();
        self.checkpoint = Some(checkpoint);
        self.uncommitted = 0;
        self.first_uncommitted = None;
        self.commits += 1;
        self.last_commit = Instant::now();
        self.progress.commits.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consumer::run_all_shards;
    use crate::log::EmbeddedLog;
    use crate::source::OutRecord;
    use stockflow_state::embedded::RedbStore;
    use stockflow_state::reference::{Outcome, straight_pass};

    fn events() -> Vec<(String, String)> {
        let mut v = Vec::new();
        for i in 0..300 {
            let sku = format!("SKU-{}", i % 7);
            let json = match i % 5 {
                0 => format!(
                    r#"{{"id":"r{i}","type":"stock_received","sku":"{sku}","ts":1795{i:04}00000,"qty":3,"unit_cost":"2.10","currency":"USD"}}"#
                ),
                1 | 2 => format!(
                    r#"{{"id":"p{i}","type":"order_placed","sku":"{sku}","ts":1795{i:04}00000,"qty":2,"order_id":"o{i}"}}"#
                ),
                3 => format!(
                    r#"{{"id":"s{i}","type":"order_shipped","sku":"{sku}","ts":1795{i:04}00000,"order_id":"o{}"}}"#,
                    i - 2
                ),
                _ => format!(
                    r#"{{"id":"bad{i}","type":"order_placed","sku":"{sku}","ts":1795{i:04}00000,"qty":-1,"order_id":"x"}}"#
                ),
            };
            v.push((sku, json));
        }
        v.push(("SKU-0".into(), "{not json".into()));
        v
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_replay_in_two_runs_equals_the_straight_pass() {
        let dir = tempfile::tempdir().unwrap();
        let log = EmbeddedLog::open(dir.path().join("log"), 3).unwrap();
        let store = Arc::new(RedbStore::open(dir.path().join("state.redb")).unwrap());
        let cfg = Arc::new(EngineConfig::default());
        let evs = events();
        let (first, second) = evs.split_at(120);
        let small = WorkerConfig { commit_every_records: 17, batch_records: 5, ..WorkerConfig::default() };
        let put = |s: &[(String, String)]| {
            let records: Vec<OutRecord<'_>> =
                s.iter().map(|(k, p)| OutRecord { key: k, payload: p.as_bytes() }).collect();
            log.append(&records).unwrap();
        };
        put(first);
        // First run: stop (shutdown) after the first part is consumed, as a restart would.
        let (tx, rx) = watch::channel(false);
        let progress = Arc::new(Progress::default());
        let handle = {
            let (log, store, cfg, progress) =
                (log.clone(), Arc::clone(&store), Arc::clone(&cfg), Arc::clone(&progress));
            tokio::spawn(async move { run_all_shards(&log, store, cfg, small, rx, progress).await })
        };
        // Wait (on the workers' own counter, not a guessed sleep) until the first part is read.
        while progress.read.load(Ordering::Relaxed) < first.len() as u64 {
            tokio::task::yield_now().await;
        }
        tx.send(true).unwrap();
        handle.await.unwrap().unwrap();
        put(second);
        log.seal();
        let (_tx, rx) = watch::channel(false);
        let reports =
            run_all_shards(&log, Arc::clone(&store), Arc::clone(&cfg), small, rx, Arc::new(Progress::default()))
                .await
                .unwrap();
        assert_eq!(reports.len(), 3);
        let expected = straight_pass(cfg, evs.iter().map(|(_, p)| p.as_bytes()));
        let actual = Outcome::of_store(store.as_ref()).await.unwrap();
        assert_eq!(expected.diff(&actual, 20), Vec::<String>::new());
        assert_eq!(actual.dead_letters, 61);
        assert!(!actual.alerts.is_empty(), "the stream oversells");
        let dead = store.dead_letters().await.unwrap();
        assert!(dead.iter().any(|d| d.field.as_deref() == Some("qty")));
        assert!(dead.iter().any(|d| d.reason.starts_with("malformed JSON")));
    }

    /// Appends the test events to a one-shard embedded log and runs its worker with `cfg` in the
    /// background; returns the workers' progress counters, the sender that stops them, the task
    /// to await, and how many events were appended.
    async fn caught_up_run(
        cfg: WorkerConfig,
    ) -> (Arc<Progress>, watch::Sender<bool>, tokio::task::JoinHandle<()>, usize) {
        let dir = tempfile::tempdir().unwrap();
        let log = EmbeddedLog::open(dir.path().join("log"), 1).unwrap();
        let store = Arc::new(RedbStore::open(dir.path().join("state.redb")).unwrap());
        let evs = events();
        let records: Vec<OutRecord<'_>> =
            evs.iter().map(|(k, p)| OutRecord { key: k, payload: p.as_bytes() }).collect();
        log.append(&records).unwrap();
        let (tx, rx) = watch::channel(false);
        let progress = Arc::new(Progress::default());
        let handle = {
            let progress = Arc::clone(&progress);
            tokio::spawn(async move {
                let _dir = dir; // the data outlives the workers
                run_all_shards(&log, store, Arc::new(EngineConfig::default()), cfg, rx, progress).await.unwrap();
            })
        };
        (progress, tx, handle, evs.len())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_caught_up_shard_commits_at_once_not_at_the_interval() {
        // An hour's interval and a huge record count: only "caught up" can commit before the end.
        let cfg = WorkerConfig {
            commit_every_records: 1_000_000,
            commit_interval: Duration::from_secs(3600),
            batch_records: 64,
            ..WorkerConfig::default()
        };
        let (progress, tx, handle, n) = caught_up_run(cfg).await;
        let deadline = Instant::now() + Duration::from_secs(60);
        while progress.committed.load(Ordering::Relaxed) < n as u64 {
            assert!(Instant::now() < deadline, "the caught-up shard never committed");
            tokio::task::yield_now().await;
        }
        // Everything read is committed while the log stays open (not sealed, no shutdown).
        assert_eq!(progress.read.load(Ordering::Relaxed), n as u64);
        tx.send(true).unwrap();
        handle.await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_minimum_interval_holds_a_caught_up_commit_back() {
        let cfg = WorkerConfig {
            commit_every_records: 1_000_000,
            commit_interval: Duration::from_secs(3600),
            commit_min_interval: Duration::from_secs(3600),
            batch_records: 64,
            ..WorkerConfig::default()
        };
        let (progress, tx, handle, n) = caught_up_run(cfg).await;
        while progress.read.load(Ordering::Relaxed) < n as u64 {
            tokio::task::yield_now().await;
        }
        assert_eq!(progress.commits.load(Ordering::Relaxed), 0, "committed inside the minimum interval");
        tx.send(true).unwrap();
        handle.await.unwrap();
        // Shutdown commits what was held back.
        assert_eq!(progress.committed.load(Ordering::Relaxed), n as u64);
        assert_eq!(progress.commits.load(Ordering::Relaxed), 1);
    }
}
