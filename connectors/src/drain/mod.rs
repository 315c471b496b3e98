//! The outbox drain: for each connector, one lane per shard reads undelivered effects after the
//! connector's cursor, batches what the connector accepts, renders the batch into one request,
//! **saves it as in flight**, then sends it through the connector's shared gate (rate limit,
//! concurrency, circuit breaker) until the receiver decides:
//!
//! - delivered → the cursor moves past the batch (items refused inside the answer are
//!   dead-lettered alone);
//! - rejected (4xx) → the batch is split and re-sent one effect at a time, and the effect the
//!   receiver refuses alone is dead-lettered;
//! - failed (5xx, timeout, reset) → retried with full-jitter backoff under the same key, and
//!   dead-lettered after `max_attempts` (throttling and an open circuit do not count);
//! - throttled (429) → every lane of the connector waits `Retry-After`.
//!
//! A lane sends one request at a time, so effects of one SKU (one shard) reach the receiver in
//! outbox order. After a crash the saved in-flight request is re-sent verbatim: the receiver
//! sees the same idempotency key and the same body, never a regrouped batch under a new key.
//! Dead letters flagged by `stockflow outbox retry` are re-sent under their own keys.
//!
//! In a consumer group ([`Lanes::Assigned`]) a member runs the lanes its coordinator grants it:
//! every write of a lane is fenced by the grant's lease epoch, so a lane whose lease moved can no
//! longer save a cursor, an in-flight request or a dead letter — and it stops as soon as the grant
//! is withdrawn, even mid-wait. A child shard's lane starts only once its parents' outboxes are
//! delivered (per SKU order across a reshard), and each member sends at `1/members` of a
//! connector's rate, so the group together stays within the receiver's limit.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use stockflow_state::StoreError;
use stockflow_state::book::BookStore;
use stockflow_state::lease::{Assignment, LaneGrant};
use stockflow_state::outbox::Fence;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::connector::{Connector, Delivered};

mod lane;
mod summary;
use crate::policy::{Backoff, CircuitBreaker, CircuitState, Sleeper, TokenBucket, TokioSleeper};
pub use summary::retry_dead_postings;

/// The longest a receiver's `Retry-After` pauses a connector.
pub const MAX_PAUSE: Duration = Duration::from_secs(24 * 3600);

/// How the drain polls.
#[derive(Debug, Clone)]
pub struct DrainConfig {
    /// Wait when a lane has nothing to send.
    pub idle_poll: Duration,
    /// How often shards are listed and requeued dead letters looked for.
    pub rescan: Duration,
    /// Effects read from the outbox at a time.
    pub read_max: usize,
}

impl Default for DrainConfig {
    fn default() -> Self {
        DrainConfig { idle_poll: Duration::from_millis(100), rescan: Duration::from_secs(2), read_max: 1000 }
    }
}

/// When a drain stops.
#[derive(Debug, Clone)]
pub struct DrainControl {
    /// `true`: stop after the request in progress.
    pub shutdown: watch::Receiver<bool>,
    /// `true`: deliver everything in the outbox (and requeued dead letters), then stop.
    pub finish: watch::Receiver<bool>,
}

impl DrainControl {
    /// A control driven by one shutdown signal and a separate "finish" signal.
    pub fn new(shutdown: watch::Receiver<bool>, finish: watch::Receiver<bool>) -> Self {
        DrainControl { shutdown, finish }
    }

    fn stopping(&self) -> bool {
        *self.shutdown.borrow()
    }

    fn finishing(&self) -> bool {
        *self.finish.borrow()
    }
}

/// Counters of one connector's drain (also exported as metrics).
#[derive(Debug, Default)]
pub struct DrainStats {
    /// Requests the receiver took.
    pub sent: AtomicU64,
    /// Effects delivered in them.
    pub effects: AtomicU64,
    /// Requests that failed (5xx, timeout, reset).
    pub failed: AtomicU64,
    /// Re-sends after a failure.
    pub retried: AtomicU64,
    /// Requests answered 429.
    pub throttled: AtomicU64,
    /// Requests the receiver refused (4xx).
    pub rejected: AtomicU64,
    /// Requests dead-lettered.
    pub dead_lettered: AtomicU64,
    /// Requeued dead letters delivered.
    pub redelivered: AtomicU64,
}

/// Which shards a drain delivers.
#[derive(Debug, Clone)]
pub enum Lanes {
    /// Every shard with an outbox, unfenced: one process owns the store (the embedded backend).
    All,
    /// The lanes a consumer-group member's coordinator grants it, kept current.
    Assigned(watch::Receiver<Arc<Assignment>>),
}

impl Lanes {
    /// The grant of `shard` now (`Some(None)`: unfenced, every shard; `None`: not this process's).
    fn grant(&self, shard: &str) -> Option<Option<LaneGrant>> {
        match self {
            Lanes::All => Some(None),
            Lanes::Assigned(rx) => rx.borrow().lanes.get(shard).cloned().map(Some),
        }
    }

    /// True while `shard` is still granted under `fence` (the summary poster's pseudo-lane is
    /// entitled by its claim in the book, not by a lease).
    fn holds(&self, shard: &str, fence: Option<&Fence>) -> bool {
        if shard == summary::POSTER {
            return true;
        }
        match self {
            Lanes::All => true,
            Lanes::Assigned(rx) => rx.borrow().lanes.get(shard).is_some_and(|g| Some(&g.fence) == fence),
        }
    }

    /// The live shards whose leases this process holds (`None` for `All`: every shard).
    pub fn owned_shards(&self) -> Option<Vec<String>> {
        match self {
            Lanes::All => None,
            Lanes::Assigned(rx) => Some(
                rx.borrow()
                    .lanes
                    .iter()
                    .filter(|(s, g)| !g.ended && g.fence.lease == **s)
                    .map(|(s, _)| s.clone())
                    .collect(),
            ),
        }
    }

    /// How many members share the connector's rate.
    fn members(&self) -> u32 {
        match self {
            Lanes::All => 1,
            Lanes::Assigned(rx) => rx.borrow().members.max(1),
        }
    }

    /// Resolves when the assignment changes (never, for `All`).
    async fn changed(&mut self) {
        match self {
            Lanes::All => std::future::pending().await,
            Lanes::Assigned(rx) => {
                if rx.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        }
    }
}

/// How a lane ended without error.
enum LaneEnd {
    /// Told to stop, or its grant was withdrawn.
    Stopped,
    /// An ended shard's outbox is delivered: nothing more will come.
    Done,
}

/// One connector's drain over a store's outbox.
pub struct Drain<S, C> {
    store: Arc<S>,
    connector: Arc<C>,
    cfg: DrainConfig,
    sleeper: Arc<dyn Sleeper>,
    lanes: Lanes,
    breaker: CircuitBreaker,
    bucket: Option<TokenBucket>,
    gate: Semaphore,
    paused_until: Mutex<Option<Instant>>,
    stats: DrainStats,
}

impl<S, C: Connector> std::fmt::Debug for Drain<S, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Drain").field("connector", &self.connector.name()).field("stats", &self.stats).finish()
    }
}

enum Outcome {
    Delivered(Delivered),
    Rejected(String),
    Failed(String, Option<Duration>),
    Stopped,
}

use stockflow_state::now_ms;

impl<S: BookStore, C: Connector> Drain<S, C> {
    /// A drain of `connector` over `store`.
    pub fn new(store: Arc<S>, connector: Arc<C>, cfg: DrainConfig) -> Self {
        let policy = connector.policy().clone();
        let name = connector.name();
        metrics::gauge!("stockflow_connector_circuit_state", "connector" => name).set(0.0);
        Drain {
            store,
            cfg,
            sleeper: Arc::new(TokioSleeper),
            lanes: Lanes::All,
            breaker: CircuitBreaker::new(policy.breaker),
            bucket: policy.rate.map(TokenBucket::new),
            gate: Semaphore::new(policy.concurrency.max(1)),
            paused_until: Mutex::new(None),
            stats: DrainStats::default(),
            connector,
        }
    }

    /// Waits through `sleeper` instead of `tokio::time`.
    pub fn with_sleeper(mut self, sleeper: Arc<dyn Sleeper>) -> Self {
        self.sleeper = sleeper;
        self
    }

    /// Drains the lanes a consumer-group coordinator grants (default: every shard, unfenced).
    pub fn with_lanes(mut self, lanes: Lanes) -> Self {
        self.lanes = lanes;
        self
    }

    /// The counters.
    pub fn stats(&self) -> &DrainStats {
        &self.stats
    }

    /// The circuit's state.
    pub fn circuit(&self) -> CircuitState {
        self.breaker.state()
    }

    /// The connector's name.
    pub fn name(&self) -> &'static str {
        self.connector.name()
    }

    fn count(&self, counter: &AtomicU64, metric: &'static str, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
        metrics::counter!(metric, "connector" => self.name()).increment(n);
    }

    fn publish_circuit(&self) {
        let state = self.breaker.state() as u8;
        metrics::gauge!("stockflow_connector_circuit_state", "connector" => self.name()).set(f64::from(state));
    }

    /// Sleeps `d` unless told to stop first; false when stopping.
    async fn wait(&self, d: Duration, ctl: &DrainControl) -> bool {
        let mut stop = ctl.shutdown.clone();
        tokio::select! {
            () = self.sleeper.sleep(d) => !ctl.stopping(),
            _ = stop.wait_for(|s| *s) => false,
        }
    }

    /// Sleeps `d` for a lane: false as soon as the drain stops or the lane's grant is withdrawn
    /// (a lease that moves stops the lane mid-wait, not after it).
    async fn wait_lane(&self, d: Duration, ctl: &DrainControl, shard: &str, fence: Option<&Fence>) -> bool {
        let mut stop = ctl.shutdown.clone();
        let mut lanes = self.lanes.clone();
        let sleep = self.sleeper.sleep(d);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                () = &mut sleep => return !ctl.stopping() && self.lanes.holds(shard, fence),
                _ = stop.wait_for(|s| *s) => return false,
                () = lanes.changed() => {
                    if !self.lanes.holds(shard, fence) {
                        return false;
                    }
                }
            }
        }
    }

    /// Runs every lane until `ctl` says stop (or, with `finish`, until everything is delivered).
    pub async fn run(self: Arc<Self>, ctl: DrainControl) -> Result<(), StoreError> {
        type LaneResult = (String, Option<Fence>, Result<LaneEnd, StoreError>);
        let mut lanes: JoinSet<LaneResult> = JoinSet::new();
        // Running lanes by shard, with the fence they write under.
        let mut running: HashMap<String, Option<Fence>> = HashMap::new();
        // Ended shards delivered under a fence: not started again.
        let mut done: std::collections::HashSet<(String, Option<Fence>)> = Default::default();
        let mut backoff = Backoff::new(self.connector.policy().backoff, 0x5eed);
        let mut store_failures = 0u32;
        let mut finish = ctl.finish.clone();
        let mut assignment = self.lanes.clone();
        // Born at 0: the first failure or dead letter is then an increase Prometheus sees.
        for metric in [
            "stockflow_connector_failed_total",
            "stockflow_connector_dead_lettered_total",
            "stockflow_connector_rejected_total",
            "stockflow_connector_throttled_total",
        ] {
            metrics::counter!(metric, "connector" => self.name()).increment(0);
        }
        self.publish_circuit();
        // Summary posting: one poster beside the folding lanes.
        let poster = self.connector.summary().is_some().then(|| {
            let (me, ctl) = (Arc::clone(&self), ctl.clone());
            tokio::spawn(async move {
                let Some(policy) = me.connector.summary() else { return Ok(()) };
                me.poster(policy, &ctl).await
            })
        });
        loop {
            if ctl.stopping() {
                break;
            }
            // Read before the scan: once finishing, the scan sees every shard there will be.
            let finishing = ctl.finishing();
            let scan = async {
                let shards: Vec<(String, Option<LaneGrant>)> = match &self.lanes {
                    Lanes::All => self.store.outbox_shards().await?.into_iter().map(|s| (s, None)).collect(),
                    Lanes::Assigned(rx) => {
                        let a = Arc::clone(&rx.borrow());
                        a.lanes.iter().map(|(s, g)| (s.clone(), Some(g.clone()))).collect()
                    }
                };
                let requeued = self.redeliver_dead_letters(&ctl).await?;
                Ok::<_, StoreError>((shards, requeued))
            };
            let (shards, requeued_left) = match scan.await {
                Ok(v) => {
                    store_failures = 0;
                    v
                }
                // A requeued dead letter's lease moved while it was re-sent: the new holder goes on.
                Err(StoreError::Fenced { .. }) => continue,
                Err(e) if e.is_transient() => {
                    tracing::warn!(connector = self.name(), error = %e, "outbox scan failed; retrying");
                    store_failures += 1;
                    if !self.wait(backoff.delay(store_failures), &ctl).await {
                        break;
                    }
                    continue;
                }
                Err(e) => return Err(e),
            };
            for (shard, grant) in shards {
                let fence = grant.as_ref().map(|g| g.fence.clone());
                // A lane of the shard under an older fence is still stopping: start after it.
                if running.contains_key(&shard) || done.contains(&(shard.clone(), fence.clone())) {
                    continue;
                }
                running.insert(shard.clone(), fence.clone());
                let (me, ctl) = (Arc::clone(&self), ctl.clone());
                lanes.spawn(async move {
                    let r = me.lane(&shard, grant.as_ref(), &ctl).await;
                    (shard, fence, r)
                });
            }
            if finishing && lanes.is_empty() && requeued_left == 0 {
                break;
            }
            let mut stop = ctl.shutdown.clone();
            tokio::select! {
                Ok(()) = finish.changed(), if !finishing => {}
                () = assignment.changed() => {}
                Some(joined) = lanes.join_next(), if !lanes.is_empty() => {
                    let (shard, fence, result) = joined.map_err(|e| StoreError::Unavailable(format!("drain lane: {e}")))?;
                    match result {
                        Ok(LaneEnd::Done) => {
                            running.remove(&shard);
                            done.insert((shard, fence));
                        }
                        Ok(LaneEnd::Stopped) => {
                            if !ctl.finishing() {
                                running.remove(&shard);
                            }
                        }
                        // The lease moved (or a zombie's write was refused): the lane stops; if the
                        // shard is granted again, a new lane resumes from the stored cursor.
                        Err(e @ (StoreError::Fenced { .. } | StoreError::CursorRegression { .. })) => {
                            tracing::info!(connector = self.name(), shard, error = %e, "drain lane stopped: its lease moved");
                            running.remove(&shard);
                        }
                        // A store hiccup (a throttled write) must not stop delivery: the lane
                        // restarts from its saved cursor after a backoff.
                        Err(e) if e.is_transient() => {
                            tracing::warn!(connector = self.name(), shard, error = %e, "drain lane failed; restarting it");
                            running.remove(&shard);
                            store_failures += 1;
                            if !self.wait(backoff.delay(store_failures.min(16)), &ctl).await {
                                break;
                            }
                        }
                        Err(e) => return Err(e),
                    }
                }
                () = self.sleeper.sleep(self.cfg.rescan) => {}
                _ = async { stop.wait_for(|s| *s).await.is_ok() } => break,
            }
        }
        while let Some(joined) = lanes.join_next().await {
            let (shard, _, result) = joined.map_err(|e| StoreError::Unavailable(format!("drain lane: {e}")))?;
            match result {
                Err(e) if e.is_transient() || matches!(e, StoreError::Fenced { .. }) => {
                    tracing::warn!(connector = self.name(), shard, error = %e, "drain lane failed at shutdown")
                }
                other => {
                    other?;
                }
            }
        }
        if let Some(poster) = poster {
            poster.await.map_err(|e| StoreError::Unavailable(format!("journal poster: {e}")))??;
            // Finishing: every lane folded everything, so post what the closed periods owe.
            if let Some(policy) = self.connector.summary()
                && ctl.finishing()
                && !ctl.stopping()
            {
                self.post_closed(policy, &ctl).await?;
            }
        }
        Ok(())
    }

    /// True once every shard of `parents` has its outbox delivered for this connector (nothing
    /// in flight, nothing this connector takes after its cursor).
    async fn delivered(&self, parents: &[String]) -> Result<bool, StoreError> {
        for p in parents {
            let cursor = self.store.cursor(self.name(), p).await?;
            if cursor.in_flight.is_some() {
                return Ok(false);
            }
            let (batch, _, _) = self.scan(p, cursor.delivered.as_ref(), 1).await?;
            if !batch.is_empty() {
                return Ok(false);
            }
        }
        Ok(true)
    }
}
