//! The consumer group: several processes share a stream's shards through leases (the KCL model),
//! without the KCL's known failure modes.
//!
//! One [`Coordinator`] per process runs three timers:
//! - **renew** (every `failover / 3`, in its own task so a slow scan never delays it): one
//!   conditional heartbeat per owned lease, concurrently, touching only `leaseCounter`. A refused
//!   heartbeat means the lease moved: the shard's worker is aborted at once (its commits would
//!   be fenced anyway). A lease not renewed for `failover` (store unreachable) is given up the
//!   same way.
//! - **take** (every `take_interval`, 1 s by default): one scan of the lease table. A lease is
//!   takeable when it has no owner (released on a graceful shutdown, never taken, or ended
//!   parents' children) or when its counter has not moved for `failover` as seen by *this*
//!   process's clock (no clock agreement needed). The process takes leases up to its fair share
//!   (`⌈eligible / workers⌉`, half the missing ones per pass), then, still below its share,
//!   steals at most one lease per pass from the most loaded worker if that one holds at least two
//!   more than this process.
//! - **sync** (at start, every `shard_sync_interval`, and whenever a shard ends): `ListShards`,
//!   creating the rows of shards without one (a deleted row is recreated).
//!
//! A shard is eligible only when all its parents ended (`checkpoint = SHARD_END`, written after
//! the parent's last commit) or are gone from both the lease table and the stream. Children are
//! learned from the shard's last read (`ChildShards`), not only from `ListShards`.
//!
//! On shutdown every worker finishes its batch and commits, then its lease is released, so
//! another process takes it on its next take pass instead of waiting for expiry.
//!
//! The coordinator also publishes this member's [`Assignment`] (after every event of its loop):
//! the outboxes its connectors' drains deliver, each fenced by a lease it holds, and the number of
//! live members that share the connectors' rate limits.
//!
//! One file because the coordinator's three timers share one state machine; lease storage is in
//! `stockflow_state::lease`, the shard workers in `worker.rs`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use stockflow_state::lease::{Assignment, Lease, LeaseStore, NewLease};
use stockflow_state::{EngineConfig, StateStore, StoreError};
use tokio::sync::watch;
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::MissedTickBehavior;

use crate::metrics;
use crate::source::{ShardInfo, StreamSource};
use crate::worker::{Lineage, Progress, ShardWorker, WorkerConfig, WorkerError, WorkerReport};

/// Timings and limits of a group member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupConfig {
    /// This process's identity (`leaseOwner`).
    pub worker_id: String,
    /// A lease whose counter has not moved for this long is taken over.
    pub failover: Duration,
    /// How often the lease table is scanned for leases to take.
    pub take_interval: Duration,
    /// How often `ListShards` runs (shard ends trigger it too).
    pub shard_sync_interval: Duration,
    /// Most leases this process holds.
    pub max_leases: usize,
}

impl GroupConfig {
    /// Defaults: a 10 s failover, a take pass every second, a shard sync every minute.
    pub fn new(worker_id: String) -> Self {
        GroupConfig {
            worker_id,
            failover: Duration::from_secs(10),
            take_interval: Duration::from_secs(1),
            shard_sync_interval: Duration::from_secs(60),
            max_leases: usize::MAX,
        }
    }

    /// Heartbeat period: a third of the failover time.
    pub fn renew_interval(&self) -> Duration {
        self.failover / 3
    }
}

/// A worker identity: host, pid and a random suffix (two processes never share one, even on a
/// host that reuses pids).
pub fn worker_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into());
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let suffix =
        xxhash_rust::xxh3::xxh3_64(&[nanos.to_le_bytes().as_slice(), &std::process::id().to_le_bytes()].concat());
    format!("{host}:{}:{:08x}", std::process::id(), suffix as u32)
}

/// What a coordinator did, when it stops.
#[derive(Debug, Default)]
pub struct GroupReport {
    /// Reports of the workers that finished here (ended shards, and all at shutdown).
    pub workers: Vec<WorkerReport>,
    /// Leases taken (including steals).
    pub taken: u64,
    /// Leases lost to another process.
    pub lost: u64,
}

struct Owned {
    epoch: u64,
    stop: watch::Sender<bool>,
    abort: AbortHandle,
}

/// The leases the heartbeat task renews: key → epoch (shared with the coordinator loop).
type Held = Arc<std::sync::Mutex<HashMap<String, u64>>>;

fn lock(held: &Held) -> std::sync::MutexGuard<'_, HashMap<String, u64>> {
    held.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Heartbeats, in their own task so that a slow scan or take never delays them: every
/// `failover / 3`, all held leases are renewed concurrently. A refused heartbeat, or none
/// accepted for `failover` (store unreachable), reports the lease lost.
async fn heartbeats<L: LeaseStore>(
    leases: Arc<L>,
    owner: String,
    renew_every: Duration,
    failover: Duration,
    held: Held,
    lost: tokio::sync::mpsc::UnboundedSender<(String, u64)>,
) {
    let mut tick = tokio::time::interval(renew_every);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut renewed: HashMap<String, Instant> = HashMap::new();
    loop {
        tick.tick().await;
        let now = Instant::now();
        let batch: Vec<(String, u64)> = lock(&held).iter().map(|(k, e)| (k.clone(), *e)).collect();
        renewed.retain(|k, _| batch.iter().any(|(b, _)| b == k));
        let results = futures::future::join_all(batch.iter().map(|(k, e)| leases.renew_lease(k, &owner, *e))).await;
        for ((key, epoch), result) in batch.into_iter().zip(results) {
            let last = *renewed.entry(key.clone()).or_insert(now);
            match result {
                Ok(true) => {
                    renewed.insert(key, Instant::now());
                }
                Ok(false) => {
                    let _ = lost.send((key, epoch));
                }
                Err(e) => {
                    metrics::lease_error("renew");
                    tracing::warn!(shard = %key, error = %e, "heartbeat failed");
                    if now.duration_since(last) >= failover {
                        // Others may have taken it by now: stop before a write could race them.
                        let _ = lost.send((key, epoch));
                    }
                }
            }
        }
    }
}

type Joined = (String, u64, Result<WorkerReport, WorkerError>);

/// Publishes a member's assignment to its drains when it changed (the Kinesis coordinator's and
/// the Kafka member's): the leases it `owned` (key → epoch) against the lease `table`.
pub(crate) fn publish_assignment(
    to: &watch::Sender<Arc<Assignment>>,
    table: &[Lease],
    owned: std::collections::BTreeMap<String, u64>,
    members: u32,
) {
    let next = Assignment::of(table, &owned, members);
    to.send_if_modified(|a| {
        if **a == next {
            return false;
        }
        *a = Arc::new(next);
        true
    });
}

/// One member of a consumer group.
#[derive(Debug)]
pub struct Coordinator<Src, L, S> {
    source: Arc<Src>,
    leases: Arc<L>,
    store: Arc<S>,
    engine_cfg: Arc<EngineConfig>,
    worker_cfg: WorkerConfig,
    cfg: GroupConfig,
    progress: Arc<Progress>,
    assignment: watch::Sender<Arc<Assignment>>,
}

impl<Src: StreamSource, L: LeaseStore, S: StateStore> Coordinator<Src, L, S> {
    /// What this member delivers, kept current while it runs (empty before and after).
    pub fn assignment(&self) -> watch::Receiver<Arc<Assignment>> {
        self.assignment.subscribe()
    }

    /// A member over these stores.
    pub fn new(
        source: Arc<Src>,
        leases: Arc<L>,
        store: Arc<S>,
        engine_cfg: Arc<EngineConfig>,
        worker_cfg: WorkerConfig,
        cfg: GroupConfig,
        progress: Arc<Progress>,
    ) -> Self {
        let assignment = watch::channel(Arc::new(Assignment::default())).0;
        Coordinator { source, leases, store, engine_cfg, worker_cfg, cfg, progress, assignment }
    }

    /// Runs until `shutdown` turns true: takes, renews and balances leases and runs a worker
    /// per owned shard; at shutdown commits and releases every lease.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) -> Result<GroupReport, WorkerError> {
        let held: Held = Arc::default();
        let (lost_tx, mut lost_rx) = tokio::sync::mpsc::unbounded_channel();
        let heart = tokio::spawn(heartbeats(
            Arc::clone(&self.leases),
            self.cfg.worker_id.clone(),
            self.cfg.renew_interval(),
            self.cfg.failover,
            Arc::clone(&held),
            lost_tx,
        ));
        let mut run = Run {
            c: &self,
            held,
            owned: HashMap::new(),
            tasks: JoinSet::new(),
            observed: HashMap::new(),
            known_shards: HashSet::new(),
            report: GroupReport::default(),
            table: Vec::new(),
            members: std::sync::atomic::AtomicU32::new(1),
            closing: false,
        };
        tracing::info!(worker = %self.cfg.worker_id, failover = ?self.cfg.failover, "joining the consumer group");
        run.sync_shards().await;
        let mut take = tokio::time::interval(self.cfg.take_interval);
        let mut sync = tokio::time::interval(self.cfg.shard_sync_interval);
        for t in [&mut take, &mut sync] {
            t.set_missed_tick_behavior(MissedTickBehavior::Delay);
        }
        sync.tick().await; // the first sync ran above
        let result = loop {
            tokio::select! {
                biased;
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        break Ok(());
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
                        Err(j) => std::panic::resume_unwind(j.into_panic()),
                    }
                }
                Some((key, epoch)) = lost_rx.recv() => {
                    if run.owned.get(&key).is_some_and(|o| o.epoch == epoch) {
                        run.lose(&key);
                    }
                }
                _ = take.tick() => run.take_pass().await,
                _ = sync.tick() => run.sync_shards().await,
            }
            run.publish();
        };
        run.shutdown().await;
        heart.abort();
        metrics::leases_owned(0);
        result.map(|()| run.report)
    }
}

struct Run<'a, Src, L, S> {
    c: &'a Coordinator<Src, L, S>,
    /// What the heartbeat task renews (kept equal to `owned`).
    held: Held,
    owned: HashMap<String, Owned>,
    tasks: JoinSet<Joined>,
    /// Each lease's counter and when this process last saw it change.
    observed: HashMap<String, (u64, Instant)>,
    /// Shards `ListShards` returned last.
    known_shards: HashSet<String>,
    report: GroupReport,
    /// The lease table as the last take pass scanned it.
    table: Vec<Lease>,
    /// Live members by that scan (this one included).
    members: std::sync::atomic::AtomicU32,
    /// Shutting down: nothing is granted any more.
    closing: bool,
}

impl<'a, Src: StreamSource, L: LeaseStore, S: StateStore> Run<'a, Src, L, S> {
    fn me(&self) -> &'a str {
        &self.c.cfg.worker_id
    }

    async fn sync_shards(&mut self) {
        let infos = match self.c.source.shard_infos().await {
            Ok(i) => i,
            Err(e) => {
                tracing::warn!(error = %e, "listing shards failed; retrying on the next sync");
                return;
            }
        };
        let existing: HashSet<String> = match self.c.leases.leases().await {
            Ok(ls) => ls.into_iter().map(|l| l.key).collect(),
            Err(e) => {
                metrics::lease_error("scan");
                tracing::warn!(error = %e, "scanning leases failed");
                return;
            }
        };
        self.known_shards = infos.iter().map(|i| i.id.clone()).collect();
        for info in infos.iter().filter(|i| !existing.contains(&i.id)) {
            self.create(info).await;
        }
    }

    async fn create(&self, info: &ShardInfo) {
        let new = NewLease { key: info.id.clone(), parents: info.parents.clone(), hash_range: info.hash_range };
        match self.c.leases.create_lease(&new).await {
            Ok(true) => {
                metrics::lease_event("created");
                tracing::info!(shard = %info.id, parents = ?info.parents, "created the lease");
            }
            Ok(false) => {}
            Err(e) => {
                metrics::lease_error("create");
                tracing::warn!(shard = %info.id, error = %e, "creating the lease failed");
            }
        }
    }

    fn forget(&mut self, key: &str) -> Option<Owned> {
        lock(&self.held).remove(key);
        metrics::shard_owned(key, false);
        let owned = self.owned.remove(key);
        // Drains stop the shard's lanes before anything else happens to the lease.
        self.publish();
        owned
    }

    /// Publishes the drains' assignment (when it changed).
    fn publish(&self) {
        let owned: std::collections::BTreeMap<String, u64> = if self.closing {
            Default::default()
        } else {
            self.owned.iter().map(|(k, o)| (k.clone(), o.epoch)).collect()
        };
        let members = self.members.load(std::sync::atomic::Ordering::Relaxed);
        publish_assignment(&self.c.assignment, &self.table, owned, members);
    }

    fn lose(&mut self, key: &str) {
        if let Some(o) = self.forget(key) {
            o.abort.abort();
            self.report.lost += 1;
            metrics::lease_event("lost");
            metrics::leases_owned(self.owned.len());
            tracing::warn!(shard = %key, "lease lost to another worker; stopped the shard");
        }
    }

    async fn take_pass(&mut self) {
        let scan_started = Instant::now();
        let leases = match self.c.leases.leases().await {
            Ok(l) => l,
            Err(e) => {
                metrics::lease_error("scan");
                tracing::warn!(error = %e, "scanning leases failed");
                return;
            }
        };
        // A counter value first seen in a scan is dated to that scan's *end*, and an unchanged one
        // is checked at this scan's *start*: the owner has certainly not renewed for at least the
        // time between the two, however slow the scans (a slow store never expires live leases).
        let scanned = Instant::now();
        self.table = leases.clone();
        for l in &leases {
            let e = self.observed.entry(l.key.clone()).or_insert((l.counter, scanned));
            if e.0 != l.counter {
                *e = (l.counter, scanned);
            }
        }
        let by_key: HashMap<&str, &Lease> = leases.iter().map(|l| (l.key.as_str(), l)).collect();
        // Our own leases that vanished (a deleted row) or moved: stop them.
        let gone: Vec<String> = self
            .owned
            .iter()
            .filter(|(k, o)| {
                by_key.get(k.as_str()).is_none_or(|l| l.owner.as_deref() != Some(self.me()) || l.epoch != o.epoch)
            })
            .map(|(k, _)| k.clone())
            .collect();
        for k in gone {
            self.lose(&k);
        }
        if let Some(id) = self.known_shards.iter().find(|id| !by_key.contains_key(id.as_str())) {
            tracing::warn!(shard = %id, "lease row missing; recreating it");
            self.sync_shards().await;
        }
        let parent_done = |p: &String| match by_key.get(p.as_str()) {
            Some(l) => l.ended,
            None => !self.known_shards.contains(p),
        };
        let eligible: Vec<&Lease> = leases.iter().filter(|l| !l.ended && l.parents.iter().all(parent_done)).collect();
        let expired = |l: &Lease| match &l.owner {
            None => true,
            Some(o) if o == self.me() => !self.owned.contains_key(&l.key),
            Some(_) => self
                .observed
                .get(&l.key)
                .is_some_and(|(_, t)| scan_started.saturating_duration_since(*t) >= self.c.cfg.failover),
        };
        let mut load: HashMap<&str, Vec<&Lease>> = HashMap::new();
        for l in eligible.iter().filter(|l| !expired(l)) {
            if let Some(o) = &l.owner {
                load.entry(o.as_str()).or_default().push(l);
            }
        }
        load.entry(self.me()).or_default();
        let workers = load.len();
        self.members.store(u32::try_from(workers).unwrap_or(u32::MAX), std::sync::atomic::Ordering::Relaxed);
        let target = eligible.len().div_ceil(workers.max(1)).min(self.c.cfg.max_leases);
        let mut need = target.saturating_sub(self.owned.len());
        if need == 0 {
            return;
        }
        // Half of what is missing per pass: members starting together each see themselves alone
        // and would otherwise grab everything, then steal back and forth.
        let mut takes = need.div_ceil(2);
        // Unowned first (no one is working on them), then expired ones.
        let mut free: Vec<&Lease> = eligible.iter().copied().filter(|l| expired(l)).collect();
        free.sort_by_key(|l| (l.owner.is_some(), l.key.clone()));
        let any_free = !free.is_empty();
        tracing::debug!(
            eligible = eligible.len(),
            workers,
            target,
            owned = self.owned.len(),
            free = free.len(),
            scan_ms = scanned.duration_since(scan_started).as_millis() as u64,
            "take pass"
        );
        for l in free {
            if takes == 0 {
                break;
            }
            if self.take(l, &by_key, "taken").await {
                need -= 1;
                takes -= 1;
            }
        }
        if need == 0 || any_free {
            return;
        }
        // Still below the fair share: steal one lease from the most loaded worker, if moving it
        // makes the spread smaller (it holds at least two more than this process).
        let mine = self.owned.len();
        let victim = load
            .iter()
            .filter(|(o, ls)| **o != self.me() && ls.len() >= mine + 2)
            .max_by_key(|(o, ls)| (ls.len(), *o))
            .and_then(|(_, ls)| ls.iter().max_by_key(|l| l.key.clone()).copied());
        if let Some(l) = victim {
            tracing::info!(shard = %l.key, from = ?l.owner, target, "stealing a lease to balance the group");
            self.take(l, &by_key, "stolen").await;
        }
    }

    /// Takes one lease and starts its worker; false when another process moved it first.
    async fn take(&mut self, l: &Lease, by_key: &HashMap<&str, &Lease>, event: &'static str) -> bool {
        let epoch = match self.c.leases.take_lease(&l.key, self.me(), l.counter).await {
            Ok(Some(e)) => e,
            Ok(None) => return false,
            Err(e) => {
                metrics::lease_error("take");
                tracing::warn!(shard = %l.key, error = %e, "taking the lease failed");
                return false;
            }
        };
        metrics::lease_event(event);
        self.report.taken += 1;
        tracing::info!(shard = %l.key, epoch, previous = ?l.owner, checkpoint = ?l.checkpoint, "took the lease");
        // Ancestors, nearest first: a child takes over their SKUs in its range.
        let mut ancestors = Vec::new();
        let mut frontier = l.parents.clone();
        while let Some(p) = frontier.pop() {
            if ancestors.contains(&p) {
                continue;
            }
            if let Some(pl) = by_key.get(p.as_str()) {
                frontier.extend(pl.parents.iter().cloned());
            }
            ancestors.push(p);
        }
        let lineage = Lineage { ancestors, range: l.hash_range };
        let (stop, stop_rx) = watch::channel(false);
        let (source, store, engine_cfg, progress) = (
            Arc::clone(&self.c.source),
            Arc::clone(&self.c.store),
            Arc::clone(&self.c.engine_cfg),
            Arc::clone(&self.c.progress),
        );
        let (key, cfg) = (l.key.clone(), self.c.worker_cfg);
        let abort = self.tasks.spawn(async move {
            let result = async {
                let worker =
                    ShardWorker::start_with(&*source, &key, &lineage, store, engine_cfg, cfg, epoch, progress).await?;
                worker.run(stop_rx).await
            }
            .await;
            (key, epoch, result)
        });
        lock(&self.held).insert(l.key.clone(), epoch);
        self.owned.insert(l.key.clone(), Owned { epoch, stop, abort });
        metrics::leases_owned(self.owned.len());
        metrics::shard_owned(&l.key, true);
        self.publish();
        true
    }

    /// A worker stopped on its own: the shard ended, or it failed.
    async fn finished(&mut self, (key, epoch, result): Joined) -> Result<(), WorkerError> {
        let still_ours = self.owned.get(&key).is_some_and(|o| o.epoch == epoch);
        match result {
            Ok(report) => {
                if still_ours {
                    self.forget(&key);
                }
                metrics::leases_owned(self.owned.len());
                if report.ended && still_ours {
                    self.end(&key, epoch, &report.children).await;
                    for child in &report.children {
                        self.create(child).await;
                    }
                    self.report.workers.push(report);
                    self.take_pass().await;
                } else {
                    self.report.workers.push(report);
                }
                Ok(())
            }
            Err(WorkerError::Store(StoreError::Fenced { .. })) => {
                self.lose(&key);
                Ok(())
            }
            Err(e) => {
                tracing::error!(shard = %key, error = %e, "shard worker failed");
                if still_ours {
                    self.forget(&key);
                    let _ = self.c.leases.release_lease(&key, self.me(), epoch).await;
                }
                Err(e)
            }
        }
    }

    async fn end(&self, key: &str, epoch: u64, children: &[ShardInfo]) {
        let ids: Vec<String> = children.iter().map(|c| c.id.clone()).collect();
        match self.c.leases.end_lease(key, self.me(), epoch, &ids).await {
            Ok(true) => {
                metrics::lease_event("ended");
                tracing::info!(shard = %key, children = ?ids, "shard ended and committed");
            }
            Ok(false) => tracing::warn!(shard = %key, "lease moved before the shard's end was recorded"),
            Err(e) => {
                metrics::lease_error("end");
                tracing::warn!(shard = %key, error = %e, "recording the shard's end failed; the next owner will");
            }
        }
    }

    /// Graceful handoff: stop the drains' lanes and every worker (each commits), then release
    /// or end its lease.
    async fn shutdown(&mut self) {
        self.closing = true;
        self.publish();
        for o in self.owned.values() {
            let _ = o.stop.send(true);
        }
        while let Some(joined) = self.tasks.join_next().await {
            let Ok((key, epoch, result)) = joined else { continue };
            let still_ours = self.owned.get(&key).is_some_and(|o| o.epoch == epoch);
            if still_ours {
                self.forget(&key);
            }
            match result {
                Ok(report) if still_ours => {
                    if report.ended {
                        self.end(&key, epoch, &report.children).await;
                    } else {
                        match self.c.leases.release_lease(&key, self.me(), epoch).await {
                            Ok(true) => {
                                metrics::lease_event("released");
                                tracing::info!(shard = %key, "committed and released the lease");
                            }
                            Ok(false) => tracing::warn!(shard = %key, "lease moved before it was released"),
                            Err(e) => {
                                tracing::warn!(shard = %key, error = %e, "releasing the lease failed; it expires")
                            }
                        }
                    }
                    self.report.workers.push(report);
                }
                Ok(report) => self.report.workers.push(report),
                Err(e) => tracing::warn!(shard = %key, error = %e, "shard worker failed during shutdown"),
            }
        }
    }
}
