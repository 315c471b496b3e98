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

use stockflow_state::book::BookStore;
use stockflow_state::lease::{Assignment, LaneGrant};
use stockflow_state::outbox::{ConnectorDeadLetter, Cursor, Fence, InFlight, OutboxEntry, OutboxPos, Request};
use stockflow_state::{Effect, StoreError};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::connector::{Connector, Delivered, DeliveryError, request_key};

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

    /// Delivers one shard's outbox in order, under `grant` (`None`: unfenced).
    async fn lane(&self, shard: &str, grant: Option<&LaneGrant>, ctl: &DrainControl) -> Result<LaneEnd, StoreError> {
        let fence = grant.map(|g| &g.fence);
        let ended = grant.is_some_and(|g| g.ended);
        if let Some(g) = grant
            && !g.after.is_empty()
        {
            // A reshard: the parents' effects of the same SKUs go first.
            let mut waited = false;
            while !self.delivered(&g.after).await? {
                if !waited {
                    tracing::info!(connector = self.name(), shard, parents = ?g.after, "waiting for the parents' outboxes to be delivered");
                    waited = true;
                }
                if !self.wait_lane(self.cfg.idle_poll.max(Duration::from_millis(500)), ctl, shard, fence).await {
                    return Ok(LaneEnd::Stopped);
                }
            }
        }
        if let Some(summary) = self.connector.summary() {
            return self.fold_lane(shard, grant, ctl, summary).await;
        }
        let policy = self.connector.policy().clone();
        let mut backoff = Backoff::new(policy.backoff, xxhash_rust::xxh3::xxh3_64(shard.as_bytes()));
        // Read after the grant was established: a write of a previous holder either happened
        // before (and is read here) or is refused by the fence.
        let mut cursor = self.store.cursor(self.name(), shard).await?;
        let mut pending_since: Option<Instant> = None;
        // After a rejection, effects up to here are sent one by one to find the refused one.
        let mut single_until: Option<OutboxPos> = None;
        // The cursor moved past a delivered request but was not written yet.
        let mut unsaved = false;
        let save = |cursor: Cursor, dead: Option<ConnectorDeadLetter>| async move {
            self.store.save_cursor(self.name(), shard, &cursor, dead.as_ref(), fence).await
        };
        loop {
            if ctl.stopping() || !self.lanes.holds(shard, fence) {
                if unsaved {
                    save(cursor.clone(), None).await?;
                }
                return Ok(LaneEnd::Stopped);
            }
            if let Some(mut flight) = cursor.in_flight.clone() {
                if flight.attempts > 0 {
                    self.count(&self.stats.retried, "stockflow_connector_retried_total", 1);
                }
                match self.deliver(shard, fence, &flight.request, ctl).await {
                    Outcome::Stopped => return Ok(LaneEnd::Stopped),
                    Outcome::Delivered(d) => {
                        self.dead_letter_items(shard, fence, cursor.delivered.as_ref(), &flight, &d).await?;
                        let n = flight.request.items.len() as u64;
                        self.count(&self.stats.effects, "stockflow_connector_effects_delivered_total", n);
                        // Saved with the next in-flight request (one write per request): a crash
                        // before that re-sends this one, which its key makes harmless.
                        cursor = Cursor { delivered: Some(flight.through), in_flight: None };
                        unsaved = true;
                    }
                    Outcome::Rejected(reason) if flight.request.items.len() > 1 => {
                        tracing::warn!(connector = self.name(), shard, key = %flight.request.key, %reason,
                            "batch rejected: sending its effects one by one");
                        single_until = Some(flight.through);
                        cursor.in_flight = None;
                        save(cursor.clone(), None).await?;
                    }
                    Outcome::Rejected(reason) => {
                        flight.attempts += 1;
                        cursor = self.give_up(shard, fence, flight, reason).await?;
                    }
                    Outcome::Failed(reason, retry_after) => {
                        flight.attempts += 1;
                        flight.last_error = Some(reason.clone());
                        if flight.attempts >= policy.max_attempts {
                            cursor = self.give_up(shard, fence, flight, reason).await?;
                            continue;
                        }
                        let wait =
                            backoff.delay(flight.attempts - 1).max(retry_after.unwrap_or_default().min(MAX_PAUSE));
                        tracing::debug!(connector = self.name(), shard, attempts = flight.attempts, ?wait, %reason, "delivery failed");
                        cursor.in_flight = Some(flight);
                        save(cursor.clone(), None).await?;
                        if !self.wait_lane(wait, ctl, shard, fence).await {
                            return Ok(LaneEnd::Stopped);
                        }
                    }
                }
                continue;
            }

            let single = single_until.as_ref().is_some_and(|u| cursor.delivered.as_ref() < Some(u));
            if !single {
                single_until = None;
            }
            let max = if single { 1 } else { policy.max_batch.max(1) };
            // Read before the scan: finishing is set after the consumers' last commit, so a scan
            // that began after it and found nothing has seen everything. (Read after the scan,
            // a commit between the two would be left undelivered.)
            let finishing = ctl.finishing();
            let (entries, through, ended_here) = self.scan(shard, cursor.delivered.as_ref(), max).await?;
            let Some(through) = through else {
                if unsaved {
                    save(cursor.clone(), None).await?;
                    unsaved = false;
                }
                if ended {
                    // An ended shard's outbox does not grow: delivered for good.
                    return Ok(LaneEnd::Done);
                }
                if finishing {
                    return Ok(LaneEnd::Stopped);
                }
                if !self.wait_lane(self.cfg.idle_poll, ctl, shard, fence).await {
                    return Ok(LaneEnd::Stopped);
                }
                continue;
            };
            let batch: Vec<&OutboxEntry> = entries.iter().collect();
            if batch.is_empty() {
                cursor.delivered = Some(through);
                unsaved = true;
                continue;
            }
            let exhausted = ended_here && batch.len() < max;
            if exhausted && !ctl.finishing() && !single && !ended {
                let since = *pending_since.get_or_insert_with(Instant::now);
                let waited = since.elapsed();
                if waited < policy.linger {
                    if !self.wait_lane((policy.linger - waited).min(self.cfg.idle_poll), ctl, shard, fence).await {
                        return Ok(LaneEnd::Stopped);
                    }
                    continue;
                }
            }
            pending_since = None;
            let Some((request, through)) = self.render_batch(shard, fence, &mut cursor, &batch, through, ctl).await?
            else {
                continue;
            };
            cursor.in_flight = Some(InFlight { request, through, attempts: 0, last_error: None });
            save(cursor.clone(), None).await?;
            unsaved = false;
        }
    }

    /// Reads the outbox after `after` for the effects this connector accepts: at most `max` of
    /// them, the last position they cover (skipped effects included; `None` when nothing new),
    /// and whether the outbox ended before `max` were found. Reads at most `SCAN_CAP` effects.
    async fn scan(
        &self,
        shard: &str,
        after: Option<&OutboxPos>,
        max: usize,
    ) -> Result<(Vec<OutboxEntry>, Option<OutboxPos>, bool), StoreError> {
        const SCAN_CAP: usize = 50_000;
        let mut batch = Vec::new();
        let mut through: Option<OutboxPos> = None;
        let mut scanned = 0;
        loop {
            let page = self.store.read_outbox(shard, through.as_ref().or(after), self.cfg.read_max).await?;
            let n = page.len();
            for e in page {
                if self.connector.accepts(&e.effect) {
                    if batch.len() == max {
                        return Ok((batch, through, false));
                    }
                    through = Some(e.pos.clone());
                    batch.push(e);
                } else {
                    through = Some(e.pos);
                }
            }
            scanned += n;
            if n < self.cfg.read_max {
                return Ok((batch, through, true));
            }
            if scanned >= SCAN_CAP {
                return Ok((batch, through, false));
            }
        }
    }

    /// Renders the longest prefix of `batch` within the byte limit. `None` when nothing is
    /// ready to send (render failed transiently, or its one effect was dead-lettered).
    async fn render_batch(
        &self,
        shard: &str,
        fence: Option<&Fence>,
        cursor: &mut Cursor,
        batch: &[&OutboxEntry],
        through: OutboxPos,
        ctl: &DrainControl,
    ) -> Result<Option<(Request, OutboxPos)>, StoreError> {
        let policy = self.connector.policy();
        let mut n = batch.len();
        let mut failures = 0;
        loop {
            let effects: Vec<&Effect> = batch[..n].iter().map(|e| &e.effect).collect();
            match self.connector.render(&effects).await {
                Ok(r) if r.body.len() > policy.max_bytes && n > 1 => n = n.div_ceil(2),
                Ok(r) => {
                    let through = if n < batch.len() { batch[n - 1].pos.clone() } else { through };
                    return Ok(Some((r, through)));
                }
                Err(DeliveryError::Rejected(_)) if n > 1 => n = 1,
                Err(DeliveryError::Rejected(reason)) => {
                    let entry = batch[0];
                    let id = entry.effect.id();
                    let request = Request {
                        key: request_key(self.name(), &[id]),
                        body: serde_json::to_string(&entry.effect).unwrap_or_default(),
                        items: vec![id.to_string()],
                    };
                    let dead = ConnectorDeadLetter {
                        connector: self.name().to_string(),
                        shard: shard.to_string(),
                        request,
                        attempts: 0,
                        last_error: format!("not rendered: {reason}"),
                        at_ms: now_ms(),
                        requeued: false,
                        rendered: false,
                    };
                    *cursor = Cursor { delivered: Some(entry.pos.clone()), in_flight: None };
                    self.store.save_cursor(self.name(), shard, cursor, Some(&dead), fence).await?;
                    self.record_dead_letter(&dead);
                    return Ok(None);
                }
                Err(e) => {
                    failures += 1;
                    tracing::warn!(connector = self.name(), shard, error = %e, "rendering failed; retrying");
                    let wait = match &e {
                        DeliveryError::Throttled { retry_after, .. } | DeliveryError::Transient { retry_after, .. } => {
                            retry_after.unwrap_or_default()
                        }
                        DeliveryError::Rejected(_) => Duration::ZERO,
                    };
                    let mut backoff = Backoff::new(policy.backoff, failures.into());
                    if !self.wait_lane(backoff.delay(failures).max(wait), ctl, shard, fence).await
                        || failures >= policy.max_attempts
                    {
                        return Ok(None);
                    }
                }
            }
        }
    }

    /// Moves an in-flight request to the dead letters, advancing the cursor past it.
    async fn give_up(
        &self,
        shard: &str,
        fence: Option<&Fence>,
        flight: InFlight,
        reason: String,
    ) -> Result<Cursor, StoreError> {
        let dead = ConnectorDeadLetter {
            connector: self.name().to_string(),
            shard: shard.to_string(),
            request: flight.request,
            attempts: flight.attempts,
            last_error: reason,
            at_ms: now_ms(),
            requeued: false,
            rendered: true,
        };
        let next = Cursor { delivered: Some(flight.through), in_flight: None };
        self.store.save_cursor(self.name(), shard, &next, Some(&dead), fence).await?;
        self.record_dead_letter(&dead);
        Ok(next)
    }

    fn record_dead_letter(&self, dead: &ConnectorDeadLetter) {
        self.count(&self.stats.dead_lettered, "stockflow_connector_dead_lettered_total", 1);
        tracing::error!(
            connector = self.name(), shard = %dead.shard, key = %dead.request.key, effects = ?dead.request.items,
            attempts = dead.attempts, error = %dead.last_error,
            "delivery given up: dead-lettered (`stockflow outbox retry` re-sends it)"
        );
    }

    /// Items a receiver refused inside a successful answer: each is rendered alone and kept as
    /// a dead letter (not sent again until requeued).
    async fn dead_letter_items(
        &self,
        shard: &str,
        fence: Option<&Fence>,
        delivered: Option<&OutboxPos>,
        flight: &InFlight,
        answer: &Delivered,
    ) -> Result<(), StoreError> {
        if answer.rejected.is_empty() {
            return Ok(());
        }
        let mut effects: HashMap<String, Effect> = HashMap::new();
        let mut after = delivered.cloned();
        'read: loop {
            let entries = self.store.read_outbox(shard, after.as_ref(), self.cfg.read_max).await?;
            if entries.is_empty() {
                break;
            }
            for e in entries {
                if e.pos > flight.through {
                    break 'read;
                }
                after = Some(e.pos.clone());
                effects.insert(e.effect.id().to_string(), e.effect);
            }
        }
        for (id, reason) in &answer.rejected {
            let (request, rendered) = match effects.get(id) {
                Some(effect) => match self.connector.render(&[effect]).await {
                    Ok(r) => (r, true),
                    Err(_) => (
                        Request {
                            key: request_key(self.name(), &[id]),
                            body: serde_json::to_string(effect).unwrap_or_default(),
                            items: vec![id.clone()],
                        },
                        false,
                    ),
                },
                None => continue,
            };
            let dead = ConnectorDeadLetter {
                connector: self.name().to_string(),
                shard: shard.to_string(),
                request,
                attempts: 1,
                last_error: reason.clone(),
                at_ms: now_ms(),
                requeued: false,
                rendered,
            };
            self.store.put_dead_letter(&dead, fence).await?;
            self.record_dead_letter(&dead);
        }
        Ok(())
    }

    /// Re-sends dead letters flagged by `outbox retry`; returns how many are still flagged.
    async fn redeliver_dead_letters(&self, ctl: &DrainControl) -> Result<usize, StoreError> {
        let mut left = 0;
        for mut dead in self.store.connector_dead_letters(Some(self.name())).await? {
            if !dead.requeued {
                continue;
            }
            // Only the member entitled to the shard's lane re-sends it, under the lane's fence.
            let Some(grant) = self.lanes.grant(&dead.shard) else { continue };
            let fence = grant.map(|g| g.fence);
            let fence = fence.as_ref();
            if !dead.rendered {
                let Ok(effect) = serde_json::from_str::<Effect>(&dead.request.body) else { continue };
                match self.connector.render(&[&effect]).await {
                    Ok(r) => {
                        dead.request = r;
                        dead.rendered = true;
                    }
                    Err(e) => {
                        dead.requeued = false;
                        dead.last_error = format!("not rendered: {e}");
                        self.store.put_dead_letter(&dead, fence).await?;
                        continue;
                    }
                }
            }
            match self.deliver(&dead.shard, fence, &dead.request, ctl).await {
                Outcome::Stopped => return Ok(left + 1),
                Outcome::Delivered(d) if !d.rejected.is_empty() => {
                    // Items refused inside the answer: keep the dead letter (a re-send under its
                    // key is answered, not re-applied, for the items that were taken).
                    dead.attempts += 1;
                    dead.requeued = false;
                    dead.last_error = format!("refused inside the answer: {:?}", d.rejected);
                    self.store.put_dead_letter(&dead, fence).await?;
                }
                Outcome::Delivered(_) => {
                    self.store.remove_dead_letter(&dead.connector, &dead.shard, &dead.request.key, fence).await?;
                    self.count(&self.stats.redelivered, "stockflow_connector_redelivered_total", 1);
                    let n = dead.request.items.len() as u64;
                    self.count(&self.stats.effects, "stockflow_connector_effects_delivered_total", n);
                }
                Outcome::Rejected(reason) => {
                    dead.attempts += 1;
                    dead.requeued = false;
                    dead.last_error = reason;
                    self.store.put_dead_letter(&dead, fence).await?;
                }
                Outcome::Failed(reason, _) => {
                    dead.attempts += 1;
                    dead.last_error = reason;
                    self.store.put_dead_letter(&dead, fence).await?;
                    left += 1;
                }
            }
        }
        Ok(left)
    }

    /// Sends one request through the connector's gate until the receiver decides.
    async fn deliver(&self, shard: &str, fence: Option<&Fence>, request: &Request, ctl: &DrainControl) -> Outcome {
        loop {
            // Stop when told to, or when this process no longer holds the shard's grant.
            if ctl.stopping() || !self.lanes.holds(shard, fence) {
                return Outcome::Stopped;
            }
            let paused = *self.paused_until.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(until) = paused
                && until > Instant::now()
            {
                if !self.wait_lane(until - Instant::now(), ctl, shard, fence).await {
                    return Outcome::Stopped;
                }
                continue;
            }
            if let Err(wait) = self.breaker.permit() {
                self.publish_circuit();
                if !self.wait_lane(wait, ctl, shard, fence).await {
                    return Outcome::Stopped;
                }
                continue;
            }
            // Concurrency slot first, then the token: a token is spent only by a request that
            // goes right away, so queued requests cannot bunch above the rate.
            let Ok(_permit) = self.gate.acquire().await else { return Outcome::Stopped };
            if let Some(bucket) = &self.bucket {
                bucket.acquire_share(self.lanes.members()).await;
            }
            // A 429 (or a lost lease) may have come while this request queued.
            let paused = *self.paused_until.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if paused.is_some_and(|u| u > Instant::now()) || !self.lanes.holds(shard, fence) {
                self.breaker.release();
                continue;
            }
            let t0 = Instant::now();
            let result = self.connector.send(request).await;
            metrics::histogram!("stockflow_connector_request_seconds", "connector" => self.name())
                .record(t0.elapsed().as_secs_f64());
            let outcome = match result {
                Ok(d) => {
                    self.breaker.success();
                    self.count(&self.stats.sent, "stockflow_connector_sent_total", 1);
                    Outcome::Delivered(d)
                }
                Err(DeliveryError::Throttled { reason, retry_after }) => {
                    self.breaker.release();
                    self.count(&self.stats.throttled, "stockflow_connector_throttled_total", 1);
                    let wait = retry_after.unwrap_or(Duration::from_secs(1)).min(MAX_PAUSE);
                    tracing::info!(connector = self.name(), %reason, ?wait, "throttled by the receiver: pausing");
                    let mut p = self.paused_until.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    let until = Instant::now() + wait;
                    *p = Some(p.map_or(until, |u| u.max(until)));
                    continue;
                }
                Err(DeliveryError::Transient { reason, retry_after }) => {
                    self.breaker.failure();
                    self.count(&self.stats.failed, "stockflow_connector_failed_total", 1);
                    Outcome::Failed(reason, retry_after)
                }
                Err(DeliveryError::Rejected(reason)) => {
                    self.breaker.success();
                    self.count(&self.stats.rejected, "stockflow_connector_rejected_total", 1);
                    Outcome::Rejected(reason)
                }
            };
            self.publish_circuit();
            return outcome;
        }
    }
}
