//! A member of a Kafka consumer group (cooperative-sticky): Kafka decides who reads which
//! partition; the state store's leases fence the commits.
//!
//! librdkafka calls the rebalance callback on the thread that polls the consumer, a dedicated OS
//! thread here. The callback hands each rebalance to the member's async loop and blocks until
//! the loop answers, so that:
//! - **assign**: the loop takes each partition's lease (an epoch bump: a previous owner's late
//!   commits are refused, even one that Kafka considers gone but that still runs), restores the
//!   partition's state and answers with the offset after its checkpoint; only then is the
//!   partition assigned, at that offset.
//! - **revoke**: the loop stops the partitions' workers — each commits what it applied — and
//!   releases their leases; only then does the callback return and Kafka give the partitions to
//!   another member. The checkpoints are committed to Kafka too, for tools that show group lag.
//!
//! Records before a partition's start offset (fetched before the assignment) are skipped by the
//! reader; a commit with a checkpoint at or before the stored one is refused by the store. So a
//! `kill -9`, a member joining or leaving, or a session timeout mid-stream loses and
//! double-counts nothing.
//!
//! One file of ~600 lines: the rebalance handshake between librdkafka's thread and the async loop is
//! one protocol, and its two sides are read together.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::Message;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use stockflow_state::lease::{Assignment, Lease, LeaseStore, NewLease};
use stockflow_state::{EngineConfig, StateStore, StoreError};
use tokio::sync::{mpsc, watch};
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::MissedTickBehavior;

use super::context::{Base, Ctx};
use super::msk_iam::Signer;
use super::{KafkaConfig, KafkaSource, partition_of, shard_id};
use crate::group::{GroupConfig, GroupReport};
use crate::metrics;
use crate::source::StreamError;
use crate::worker::{Progress, ShardWorker, WorkerConfig, WorkerError, WorkerReport};

/// Where an assigned partition starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Start {
    pub partition: i32,
    /// The offset after the checkpoint; `None` = no checkpoint yet (the partition's beginning).
    pub next: Option<u64>,
}

/// A rebalance, from the poll thread to the member's loop.
#[derive(Debug)]
pub(crate) enum Cmd {
    Assign {
        partitions: Vec<i32>,
        reply: std::sync::mpsc::Sender<Vec<Start>>,
    },
    /// The reply: each stopped partition's next offset (its checkpoint + 1).
    Revoke {
        partitions: Vec<i32>,
        lost: bool,
        reply: std::sync::mpsc::Sender<Vec<(i32, u64)>>,
    },
}

struct Owned {
    partition: i32,
    epoch: u64,
    stop: watch::Sender<bool>,
    abort: AbortHandle,
}

type Joined = (String, u64, Result<WorkerReport, WorkerError>);

/// One member of the Kafka consumer group.
pub struct KafkaMember<L, S> {
    cfg: KafkaConfig,
    consumer: Arc<BaseConsumer<Ctx>>,
    source: Arc<KafkaSource>,
    cmds: mpsc::UnboundedReceiver<Cmd>,
    leases: Arc<L>,
    store: Arc<S>,
    engine_cfg: Arc<EngineConfig>,
    worker_cfg: WorkerConfig,
    group: GroupConfig,
    progress: Arc<Progress>,
    assignment: watch::Sender<Arc<Assignment>>,
}

impl<L, S> std::fmt::Debug for KafkaMember<L, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaMember")
            .field("topic", &self.cfg.topic)
            .field("group", &self.cfg.group_id)
            .field("worker", &self.group.worker_id)
            .finish_non_exhaustive()
    }
}

impl<L: LeaseStore, S: StateStore> KafkaMember<L, S> {
    /// A member of `cfg.group_id` over these stores (not yet subscribed: see [`KafkaMember::run`]).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: KafkaConfig,
        signer: Option<Arc<Signer>>,
        leases: Arc<L>,
        store: Arc<S>,
        engine_cfg: Arc<EngineConfig>,
        worker_cfg: WorkerConfig,
        group: GroupConfig,
        progress: Arc<Progress>,
    ) -> Result<Self, StreamError> {
        let (tx, cmds) = mpsc::unbounded_channel();
        let queues = super::Queues::default();
        let highs = super::Highs::default();
        let ctx = Ctx {
            base: Base { signer },
            topic: cfg.topic.clone(),
            queues: Arc::clone(&queues),
            highs: Arc::clone(&highs),
            cmds: tx,
            consumer: std::sync::OnceLock::new(),
        };
        let mut cc = cfg.client_config();
        cc.set("group.id", &cfg.group_id)
            .set("partition.assignment.strategy", "cooperative-sticky")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false")
            .set("session.timeout.ms", cfg.session_timeout.as_millis().to_string())
            .set("heartbeat.interval.ms", (cfg.session_timeout.as_millis() / 4).max(100).to_string())
            .set("statistics.interval.ms", "1000");
        for (k, v) in &cfg.properties {
            cc.set(k, v);
        }
        let consumer: Arc<BaseConsumer<Ctx>> = Arc::new(
            cc.create_with_context(ctx).map_err(|e| StreamError::Invalid(format!("Kafka consumer config: {e}")))?,
        );
        let _ = consumer.context().consumer.set(Arc::downgrade(&consumer));
        let source = Arc::new(KafkaSource { consumer: Arc::clone(&consumer), topic: cfg.topic.clone(), queues, highs });
        Ok(KafkaMember {
            cfg,
            consumer,
            source,
            cmds,
            leases,
            store,
            engine_cfg,
            worker_cfg,
            group,
            progress,
            assignment: watch::channel(Arc::new(Assignment::default())).0,
        })
    }

    /// What this member delivers, kept current while it runs (empty before and after).
    pub fn assignment(&self) -> watch::Receiver<Arc<Assignment>> {
        self.assignment.subscribe()
    }

    /// The topic's partitions as shards.
    pub fn source(&self) -> Arc<KafkaSource> {
        Arc::clone(&self.source)
    }

    /// Joins the group and runs until `shutdown` turns true; then every worker commits, every
    /// lease is released and the member leaves the group.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) -> Result<GroupReport, WorkerError> {
        let partitions = {
            let source = Arc::clone(&self.source);
            tokio::task::spawn_blocking(move || source.partitions()).await.map_err(|e| {
                WorkerError::Stream(StreamError::Unavailable(format!("listing partitions panicked: {e}")))
            })??
        };
        // A partition increase moves SKUs to other partitions while their state stays with the
        // old ones: refuse to run over it (docs/kafka.md, "Partition increase").
        // Rows without a checkpoint may be another member creating them right now; partitions
        // missing next to consumed ones, or rows of partitions the topic lacks, are a change.
        let rows: Vec<_> = self
            .leases
            .leases()
            .await?
            .into_iter()
            .filter_map(|l| partition_of(&self.cfg.topic, &l.key).map(|p| (p, l.checkpoint.is_some())))
            .collect();
        let consumed = rows.iter().any(|(_, c)| *c);
        let missing = partitions.iter().any(|p| !rows.iter().any(|(r, _)| r == p));
        let extra = rows.iter().any(|(r, _)| !partitions.contains(r));
        if extra || (consumed && missing) {
            return Err(repartitioned(&self.cfg.topic, rows.len(), partitions.len()));
        }
        for p in &partitions {
            let new = NewLease { key: shard_id(&self.cfg.topic, *p), parents: Vec::new(), hash_range: None };
            if self.leases.create_lease(&new).await? {
                metrics::lease_event("created");
            }
        }
        self.consumer.subscribe(&[&self.cfg.topic]).map_err(|e| {
            WorkerError::Stream(StreamError::Invalid(format!("subscribing to {}: {e}", self.cfg.topic)))
        })?;
        tracing::info!(
            worker = %self.group.worker_id, topic = %self.cfg.topic, group = %self.cfg.group_id,
            partitions = partitions.len(), "joining the Kafka consumer group"
        );
        let stop_polling = Arc::new(AtomicBool::new(false));
        let (polled_tx, mut polled) = tokio::sync::oneshot::channel::<()>();
        let poller = {
            let (consumer, stop) = (Arc::clone(&self.consumer), Arc::clone(&stop_polling));
            std::thread::Builder::new()
                .name("kafka-poll".into())
                .spawn(move || {
                    poll(&consumer, &stop);
                    let _ = polled_tx.send(());
                })
                .map_err(|e| WorkerError::Stream(StreamError::Unavailable(format!("starting the poll thread: {e}"))))?
        };
        let mut cmds = std::mem::replace(&mut self.cmds, mpsc::unbounded_channel().1);
        let mut run = Run {
            m: &self,
            partitions: partitions.iter().copied().collect(),
            repartitioned: None,
            owned: HashMap::new(),
            tasks: JoinSet::new(),
            table: Vec::new(),
            members: 1,
            report: GroupReport::default(),
            closing: false,
            last: HashMap::new(),
        };
        let mut scan = tokio::time::interval(self.group.take_interval);
        scan.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let result = loop {
            tokio::select! {
                biased;
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        break Ok(());
                    }
                }
                Some(cmd) = cmds.recv() => {
                    run.command(cmd).await;
                    if let Some(n) = run.repartitioned.take() {
                        break Err(repartitioned(&self.cfg.topic, partitions.len(), n));
                    }
                }
                Some(joined) = run.tasks.join_next(), if !run.tasks.is_empty() => {
                    match joined {
                        Ok(done) => {
                            if let Err(e) = run.finished(done).await {
                                break Err(e);
                            }
                        }
                        Err(j) if j.is_cancelled() => {}
                        // A worker panicked: a bug, its in-memory state is suspect. Re-raise so the
                        // process exits non-zero (the Kinesis coordinator does the same); nothing
                        // uncommitted is lost — the next owner resumes from the last commit.
                        Err(j) => std::panic::resume_unwind(j.into_panic()),
                    }
                }
                _ = scan.tick() => run.scan().await,
            }
            run.publish();
        };
        // Handoff: commit and release everything, then leave the group (the poll thread
        // unsubscribes; its revoke is answered from what was just committed).
        run.closing = true;
        run.publish();
        let all: Vec<i32> = run.owned.values().map(|o| o.partition).collect();
        run.stop(&all).await;
        stop_polling.store(true, Ordering::Relaxed);
        loop {
            tokio::select! {
                _ = &mut polled => break,
                Some(cmd) = cmds.recv() => run.command(cmd).await,
            }
        }
        let _ = poller.join();
        super::lock(&self.source.queues).clear();
        metrics::leases_owned(0);
        result.map(|()| std::mem::take(&mut run.report))
    }
}

/// The poll thread: serves rebalances, statistics and tokens; on stop, leaves the group.
fn poll(consumer: &BaseConsumer<Ctx>, stop: &AtomicBool) {
    let serve = |timeout: Duration| match consumer.poll(timeout) {
        None => {}
        Some(Ok(m)) => tracing::error!(
            partition = m.partition(),
            offset = m.offset(),
            "a record reached the shared queue (its partition queue was not split); it is read again from the partition's checkpoint"
        ),
        Some(Err(e)) => tracing::warn!(error = %e, "Kafka consumer error"),
    };
    while !stop.load(Ordering::Relaxed) {
        serve(Duration::from_millis(100));
    }
    consumer.unsubscribe();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline && consumer.assignment().is_ok_and(|a| a.count() > 0) {
        serve(Duration::from_millis(50));
    }
    // A final round so the leave-group request goes out.
    serve(Duration::from_millis(50));
}

/// The error of a topic whose partition count changed under the group.
fn repartitioned(topic: &str, was: usize, now: usize) -> WorkerError {
    WorkerError::Stream(StreamError::Invalid(format!(
        "topic {topic} has {now} partitions where the group's leases know {was}: a partition increase moves SKUs \
         to other partitions while their state stays with the old ones, so this member stops rather than \
         apply events to the wrong state (docs/kafka.md, \"Partition increase\")"
    )))
}

struct Run<'a, L, S> {
    m: &'a KafkaMember<L, S>,
    /// The topic's partitions when the member started.
    partitions: std::collections::HashSet<i32>,
    /// Set when Kafka assigned a partition the member did not start with: the partition count.
    repartitioned: Option<usize>,
    owned: HashMap<String, Owned>,
    tasks: JoinSet<Joined>,
    table: Vec<Lease>,
    members: u32,
    report: GroupReport,
    closing: bool,
    /// Each stopped partition's next offset, for the revoke that follows a shutdown.
    last: HashMap<i32, u64>,
}

impl<L: LeaseStore, S: StateStore> Run<'_, L, S> {
    fn me(&self) -> &str {
        &self.m.group.worker_id
    }

    fn publish(&self) {
        let owned: std::collections::BTreeMap<String, u64> = if self.closing {
            Default::default()
        } else {
            self.owned.iter().map(|(k, o)| (k.clone(), o.epoch)).collect()
        };
        crate::group::publish_assignment(&self.m.assignment, &self.table, owned, self.members);
    }

    async fn command(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Assign { partitions, reply } => {
                let starts = if self.closing { Vec::new() } else { self.assign(&partitions).await };
                let _ = reply.send(starts);
            }
            Cmd::Revoke { partitions, lost, reply } => {
                if lost {
                    tracing::warn!(partitions = ?partitions, "partitions lost (session timed out); their commits are fenced");
                }
                self.stop(&partitions).await;
                let offsets = partitions.iter().filter_map(|p| self.last.get(p).map(|n| (*p, *n))).collect();
                let _ = reply.send(offsets);
            }
        }
        self.publish();
    }

    /// Takes each partition's lease and starts its worker; the starts of those that succeeded.
    async fn assign(&mut self, partitions: &[i32]) -> Vec<Start> {
        let mut starts = Vec::new();
        if let Some(&p) = partitions.iter().find(|p| !self.partitions.contains(p)) {
            tracing::error!(
                partition = p,
                "assigned a partition the topic did not have at start: partitions were added"
            );
            let added = partitions.iter().filter(|p| !self.partitions.contains(p)).count();
            self.repartitioned = Some(self.partitions.len() + added);
            return Vec::new();
        }
        let mut scanned = match self.m.leases.leases().await {
            Ok(rows) => {
                self.table = rows;
                true
            }
            Err(_) => false, // take() scans (and reports) itself
        };
        for &p in partitions {
            let key = shard_id(&self.m.cfg.topic, p);
            if self.owned.contains_key(&key) {
                tracing::warn!(shard = %key, "assigned a partition this member already runs");
                continue;
            }
            let Some(epoch) = self.take(&key, scanned).await else { continue };
            scanned = true; // take() left the table it read in self.table
            match self.start(&key, p, epoch).await {
                Ok(next) => starts.push(Start { partition: p, next }),
                Err(e) => {
                    tracing::error!(shard = %key, error = %e, "restoring the partition failed; releasing it");
                    let _ = self.m.leases.release_lease(&key, self.me(), epoch).await;
                }
            }
        }
        metrics::leases_owned(self.owned.len());
        starts
    }

    /// Takes the lease whatever its owner: Kafka gave the partition to this member, and the epoch
    /// bump fences whoever had it. Retried while heartbeats of a leaving owner move the counter.
    /// `scanned`: `self.table` was just read, so the first attempt uses it instead of scanning
    /// again (one scan per rebalance, not one per partition).
    async fn take(&mut self, key: &str, scanned: bool) -> Option<u64> {
        use stockflow_state::retry::{Backoff, BackoffConfig};
        let mut backoff =
            Backoff::from_clock(BackoffConfig::new(Duration::from_millis(50), Duration::from_secs(2))).limited(20);
        let mut attempt = 0u32;
        while let Some(delay) = backoff.next_delay() {
            attempt += 1;
            let rows = if attempt == 1 && scanned {
                Ok(std::mem::take(&mut self.table))
            } else {
                self.m.leases.leases().await
            };
            let counter = match rows {
                Ok(rows) => {
                    let c = rows.iter().find(|l| l.key == key).map(|l| l.counter);
                    self.table = rows;
                    c
                }
                Err(e) => {
                    metrics::lease_error("scan");
                    tracing::warn!(shard = key, error = %e, attempt, "reading the lease failed");
                    tokio::time::sleep(delay).await;
                    continue;
                }
            };
            let counter = match counter {
                Some(c) => c,
                None => {
                    let new = NewLease { key: key.to_string(), parents: Vec::new(), hash_range: None };
                    let _ = self.m.leases.create_lease(&new).await;
                    continue;
                }
            };
            match self.m.leases.take_lease(key, self.me(), counter).await {
                Ok(Some(epoch)) => {
                    metrics::lease_event("taken");
                    self.report.taken += 1;
                    tracing::info!(shard = key, epoch, "took the lease (assigned by Kafka)");
                    return Some(epoch);
                }
                Ok(None) => {}
                Err(e) => {
                    metrics::lease_error("take");
                    tracing::warn!(shard = key, error = %e, attempt, "taking the lease failed");
                }
            }
            tokio::time::sleep(delay).await;
        }
        tracing::error!(shard = key, "could not take the lease; the partition is not read by this member");
        None
    }

    async fn start(&mut self, key: &str, partition: i32, epoch: u64) -> Result<Option<u64>, WorkerError> {
        let worker = ShardWorker::start(
            &*self.m.source,
            key,
            Arc::clone(&self.m.store),
            Arc::clone(&self.m.engine_cfg),
            self.m.worker_cfg,
            epoch,
            Arc::clone(&self.m.progress),
        )
        .await?;
        let next = worker.checkpoint().and_then(|c| c.as_u64()).map(|o| o + 1);
        let (stop, stop_rx) = watch::channel(false);
        let k = key.to_string();
        let abort = self.tasks.spawn(async move { (k, epoch, worker.run(stop_rx).await) });
        self.owned.insert(key.to_string(), Owned { partition, epoch, stop, abort });
        metrics::shard_owned(key, true);
        Ok(next)
    }

    /// Stops these partitions' workers (each commits) and releases their leases.
    async fn stop(&mut self, partitions: &[i32]) {
        let keys: Vec<String> = partitions.iter().map(|p| shard_id(&self.m.cfg.topic, *p)).collect();
        let mut waiting: Vec<(String, u64)> = Vec::new();
        for k in &keys {
            if let Some(o) = self.owned.get(k) {
                let _ = o.stop.send(true);
                waiting.push((k.clone(), o.epoch));
            }
        }
        while !waiting.is_empty() {
            let Some(joined) = self.tasks.join_next().await else { break };
            let Ok((key, epoch, result)) = joined else { continue };
            waiting.retain(|(k, e)| !(k == &key && *e == epoch));
            let still_ours = self.owned.get(&key).is_some_and(|o| o.epoch == epoch);
            if still_ours {
                self.forget(&key);
            }
            match result {
                Ok(report) => {
                    if let (Some(p), Some(next)) = (
                        partition_of(&self.m.cfg.topic, &key),
                        report.checkpoint.as_ref().and_then(|c| c.as_u64()).map(|o| o + 1),
                    ) {
                        self.last.insert(p, next);
                    }
                    if still_ours {
                        match self.m.leases.release_lease(&key, self.me(), epoch).await {
                            Ok(true) => {
                                metrics::lease_event("released");
                                tracing::info!(shard = %key, checkpoint = ?report.checkpoint, "committed and released the lease");
                            }
                            Ok(false) => tracing::warn!(shard = %key, "lease moved before it was released"),
                            Err(e) => tracing::warn!(shard = %key, error = %e, "releasing the lease failed"),
                        }
                    }
                    self.report.workers.push(report);
                }
                Err(WorkerError::Store(StoreError::Fenced { .. })) => {
                    self.report.lost += 1;
                    tracing::warn!(shard = %key, "final commit fenced: the partition already has a new owner");
                }
                Err(e) => tracing::warn!(shard = %key, error = %e, "shard worker failed while stopping"),
            }
        }
        metrics::leases_owned(self.owned.len());
    }

    fn forget(&mut self, key: &str) -> Option<Owned> {
        metrics::shard_owned(key, false);
        self.owned.remove(key)
    }

    /// A worker stopped on its own: fenced (another member has the partition) or failed.
    async fn finished(&mut self, (key, epoch, result): Joined) -> Result<(), WorkerError> {
        let still_ours = self.owned.get(&key).is_some_and(|o| o.epoch == epoch);
        if still_ours {
            self.forget(&key);
        }
        metrics::leases_owned(self.owned.len());
        match result {
            Ok(report) => {
                self.report.workers.push(report);
                Ok(())
            }
            Err(WorkerError::Store(StoreError::Fenced { .. })) => {
                self.report.lost += 1;
                metrics::lease_event("lost");
                tracing::warn!(shard = %key, "lease taken by another member; stopped the partition");
                Ok(())
            }
            Err(e) => {
                tracing::error!(shard = %key, error = %e, "shard worker failed");
                if still_ours {
                    let _ = self.m.leases.release_lease(&key, self.me(), epoch).await;
                }
                Err(e)
            }
        }
    }

    /// Reads the lease table: stops workers whose lease moved, counts the members, and commits
    /// the stored checkpoints to Kafka (visibility for `kafka-consumer-groups` and MSK's lag).
    async fn scan(&mut self) {
        let rows = match self.m.leases.leases().await {
            Ok(r) => r,
            Err(e) => {
                metrics::lease_error("scan");
                tracing::warn!(error = %e, "scanning leases failed");
                return;
            }
        };
        let topic = &self.m.cfg.topic;
        let mine: Vec<&Lease> = rows.iter().filter(|l| partition_of(topic, &l.key).is_some()).collect();
        let owners: std::collections::HashSet<&str> = mine.iter().filter_map(|l| l.owner.as_deref()).collect();
        self.members = u32::try_from(owners.len().max(1)).unwrap_or(u32::MAX);
        let moved: Vec<String> = self
            .owned
            .iter()
            .filter(|(k, o)| {
                mine.iter()
                    .find(|l| &l.key == *k)
                    .is_none_or(|l| l.owner.as_deref() != Some(self.me()) || l.epoch != o.epoch)
            })
            .map(|(k, _)| k.clone())
            .collect();
        for k in moved {
            if let Some(o) = self.forget(&k) {
                o.abort.abort();
                self.report.lost += 1;
                metrics::lease_event("lost");
                tracing::warn!(shard = %k, "lease moved to another member; stopped the partition");
            }
        }
        let mut offsets = TopicPartitionList::new();
        for l in &mine {
            if let (Some(o), Some(p), Some(cp)) =
                (self.owned.get(&l.key), partition_of(topic, &l.key), l.checkpoint.as_ref().and_then(|c| c.as_u64()))
                && l.epoch == o.epoch
            {
                let _ = offsets.add_partition_offset(topic, p, Offset::Offset(i64::try_from(cp + 1).unwrap_or(0)));
            }
        }
        if offsets.count() > 0 {
            let _ = self.m.consumer.commit(&offsets, CommitMode::Async);
        }
        self.table = rows;
        metrics::leases_owned(self.owned.len());
    }
}
