//! The live dashboard: stock over every SKU of the state store (the whole consumer group, not one
//! worker's memory), oversell and low-stock alerts as they are committed, throughput and lag.
//!
//! Three loops feed it, each independent of the page:
//! - **snapshot**: every `refresh` the store's SKU states are read whole and turned into rows with
//!   three sort orders; requests page through the latest snapshot (`/api/stock`). Staleness — how
//!   old the snapshot being served is — is measured and exported.
//! - **alert tail**: the outbox of every shard is read after a cursor (the same API the connectors
//!   drain) and alerts go to a ring of the newest and to every `/api/stream` subscriber.
//! - **sampler**: once a second, the pipeline's counters (in-process, or scraped from the group
//!   members' `/metrics`) become a point of the throughput and lag charts.
//!
//! Page and scripts are compiled into the binary (`assets/`): no CDN, works offline. The JSON API
//! is documented in `docs/dashboard.md`.
//!
//! One file of ~600 lines with its tests: the three loops and the view they share are one unit; the
//! HTTP API, the snapshot rows and the throughput sampling are modules of their own.

mod api;
mod snapshot;
mod throughput;

pub use throughput::Telemetry;
use throughput::{lag, rate};

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt as _};
use serde::Serialize;
use stockflow_pipeline::Progress;
use stockflow_state::outbox::{OutboxPos, OutboxStore};
use stockflow_state::{Effect, StateStore};
use tokio::sync::{broadcast, watch};
use tokio_stream::wrappers::IntervalStream;

use crate::server::stopped;
use crate::telemetry::Sample;

pub use api::router;
pub use snapshot::{Snapshot, StockRow};

/// How the dashboard refreshes.
#[derive(Debug, Clone)]
pub struct DashboardConfig {
    /// Pause between two snapshot reads of the SKU states (staleness ≤ this + one read).
    pub refresh: Duration,
    /// Pause between two reads of the outbox for new alerts.
    pub alert_poll: Duration,
    /// Alerts kept for `/api/alerts` (the newest).
    pub alert_capacity: usize,
    /// Points of the charts (one a second).
    pub series_points: usize,
    /// Run the snapshot loop on a thread of its own (next to a busy pipeline: on its runtime the
    /// loop's ticks wait for a free worker). Call [`Dashboard::close`] after shutdown.
    pub snapshot_thread: bool,
    /// The latest reconciliation report (`reconcile.json`) the panel shows, if any.
    pub reconcile_report: Option<std::path::PathBuf>,
}

impl DashboardConfig {
    /// The configuration the `[dashboard]` section gives.
    pub fn from_section(section: &crate::runtime::config::DashboardSection) -> Self {
        DashboardConfig {
            refresh: std::time::Duration::from_millis(section.refresh_ms),
            alert_poll: std::time::Duration::from_millis(section.alert_poll_ms),
            alert_capacity: section.alert_capacity,
            ..DashboardConfig::default()
        }
    }
}

impl Default for DashboardConfig {
    fn default() -> Self {
        DashboardConfig {
            refresh: Duration::from_millis(500),
            alert_poll: Duration::from_millis(200),
            alert_capacity: 10_000,
            series_points: 600,
            snapshot_thread: false,
            reconcile_report: None,
        }
    }
}

/// One alert as the dashboard shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AlertItem {
    /// Arrival number at this dashboard (newer is larger; the `before` cursor of `/api/alerts`).
    pub seq: u64,
    /// The alert id (`oversell:…`, `low_stock:…`).
    pub id: String,
    /// `oversell` or `low_stock`.
    pub kind: &'static str,
    /// The SKU.
    pub sku: String,
    /// The order line (oversell by an order).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub order_id: Option<String>,
    /// Units that cannot be served (oversell).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shortfall: Option<i64>,
    /// Units asked for (oversell).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requested: Option<i64>,
    /// `available` before (oversell) or after (low stock) the event.
    pub available: i64,
    /// The reorder point crossed (low stock).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reorder_point: Option<i64>,
    /// `order` or `count` (oversell).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cause: Option<stockflow_state::effects::OversellCause>,
    /// Event time, epoch ms.
    pub ts: i64,
    /// When this dashboard saw it committed, epoch ms.
    pub seen_ms: i64,
}

impl AlertItem {
    fn of(effect: &Effect, seq: u64, seen_ms: i64) -> Option<AlertItem> {
        match effect {
            Effect::Oversell(a) => Some(AlertItem {
                seq,
                id: a.alert_id.clone(),
                kind: "oversell",
                sku: a.sku.clone(),
                order_id: a.order_id.clone(),
                shortfall: Some(a.shortfall),
                requested: Some(a.requested),
                available: a.available_before,
                reorder_point: None,
                cause: Some(a.cause),
                ts: a.ts,
                seen_ms,
            }),
            Effect::LowStock(a) => Some(AlertItem {
                seq,
                id: a.alert_id.clone(),
                kind: "low_stock",
                sku: a.sku.clone(),
                order_id: None,
                shortfall: None,
                requested: None,
                available: a.available,
                reorder_point: Some(a.reorder_point),
                cause: None,
                ts: a.ts,
                seen_ms,
            }),
            _ => None,
        }
    }
}

/// The newest alerts and the counts of all seen.
#[derive(Debug, Default)]
struct AlertLog {
    ring: VecDeque<Arc<AlertItem>>,
    next_seq: u64,
    oversell: u64,
    low_stock: u64,
}

/// One point of the charts.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Point {
    /// Epoch ms.
    pub t: i64,
    /// Events applied per second over the last interval.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub applied_per_s: Option<f64>,
    /// Records read per second.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub read_per_s: Option<f64>,
    /// Alerts committed per second.
    pub alerts_per_s: f64,
    /// Bytes behind (embedded).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lag_bytes: Option<u64>,
    /// Records behind.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lag_records: Option<u64>,
    /// Seconds behind (Kinesis).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lag_seconds: Option<f64>,
}

/// How fresh the served snapshots were.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct SnapshotStats {
    /// Snapshots built.
    pub count: u64,
    /// Longest build (read + rows + sorts), ms.
    pub max_build_ms: u64,
    /// Longest time a snapshot was served after its read began, ms: the worst staleness a page
    /// could see.
    pub max_staleness_ms: u64,
    /// SKUs in the latest snapshot.
    pub skus: usize,
}

/// A message for `/api/stream` subscribers: the SSE event name and its JSON.
#[derive(Debug, Clone)]
pub(crate) struct Push {
    event: &'static str,
    json: Arc<str>,
}

struct Inner {
    snapshot: RwLock<Arc<Snapshot>>,
    alerts: Mutex<AlertLog>,
    series: Mutex<VecDeque<Point>>,
    stats: Mutex<SnapshotStats>,
    pushes: broadcast::Sender<Push>,
    cfg: DashboardConfig,
    window_sizes: Vec<i64>,
    started: Instant,
    shutdown: watch::Receiver<bool>,
    snapshot_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    outcome: OutcomeReader,
    /// The consumer group's lease table (`--dynamodb`): one row per shard, or `None` (embedded).
    group: RwLock<Option<Arc<Vec<GroupShard>>>>,
    /// The reconciliation panel: the report file's modification time and its summary.
    reconcile: Mutex<Option<(std::time::SystemTime, Arc<serde_json::Value>)>>,
}

/// One shard of the consumer group, as the group view shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct GroupShard {
    /// Shard id.
    pub shard: String,
    /// `live` (owned), `free` (no owner) or `ended`.
    pub state: &'static str,
    /// The member holding it.
    pub owner: Option<String>,
    /// Its fencing epoch.
    pub epoch: u64,
    /// Last committed position.
    pub checkpoint: Option<String>,
    /// When it last committed (ms).
    pub committed_at_ms: Option<i64>,
    /// Its reader's lag at that commit (ms).
    pub lag_ms: Option<u64>,
}

/// Reads the whole outcome of the store (every SKU summary, alert and the dead-letter count).
type OutcomeReader = Box<
    dyn Fn() -> futures::future::BoxFuture<'static, Result<stockflow_state::reference::Outcome, String>> + Send + Sync,
>;

/// The dashboard's shared state; cheap to clone.
#[derive(Clone)]
pub struct Dashboard {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Dashboard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dashboard").field("stats", &self.stats()).finish_non_exhaustive()
    }
}

use stockflow_state::now_ms;

impl Dashboard {
    /// Starts the three loops over `store` until `shutdown`; serve [`router`] with the result.
    pub fn start<S: StateStore + OutboxStore>(
        store: Arc<S>,
        telemetry: Telemetry,
        window_sizes: Vec<i64>,
        cfg: DashboardConfig,
        shutdown: watch::Receiver<bool>,
    ) -> Dashboard {
        let (pushes, _) = broadcast::channel(4096);
        let dashboard = Dashboard {
            inner: Arc::new(Inner {
                snapshot: RwLock::new(Arc::new(Snapshot::default())),
                alerts: Mutex::new(AlertLog::default()),
                series: Mutex::new(VecDeque::new()),
                stats: Mutex::new(SnapshotStats::default()),
                pushes,
                cfg,
                window_sizes,
                started: Instant::now(),
                shutdown: shutdown.clone(),
                snapshot_thread: Mutex::new(None),
                outcome: {
                    let store = Arc::clone(&store);
                    Box::new(move || {
                        let store = Arc::clone(&store);
                        Box::pin(async move {
                            stockflow_state::reference::Outcome::of_store(&*store).await.map_err(|e| e.to_string())
                        })
                    })
                },
                group: RwLock::new(None),
                reconcile: Mutex::new(None),
            }),
        };
        if dashboard.inner.cfg.snapshot_thread {
            let (d, s, stop) = (dashboard.clone(), Arc::clone(&store), shutdown.clone());
            let spawned = std::thread::Builder::new().name("dashboard-snapshots".into()).spawn(move || {
                match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(rt) => rt.block_on(d.snapshots(s, stop)),
                    Err(e) => tracing::error!(error = %e, "dashboard: no runtime for the snapshot loop"),
                }
            });
            match spawned {
                Ok(handle) => *dashboard.inner.snapshot_thread.lock().unwrap_or_else(|e| e.into_inner()) = Some(handle),
                Err(e) => tracing::error!(error = %e, "dashboard: snapshot thread not started"),
            }
        } else {
            tokio::spawn(dashboard.clone().snapshots(Arc::clone(&store), shutdown.clone()));
        }
        tokio::spawn(dashboard.clone().alert_tail(store, shutdown.clone()));
        tokio::spawn(dashboard.clone().sampler(telemetry, shutdown));
        dashboard
    }

    /// Follows the consumer group's lease table every `every` (the `--dynamodb` dashboard):
    /// who owns which shard, epochs, checkpoints, last commit and lag, for `/api/group`.
    pub fn follow_group(&self, store: Arc<stockflow_state::dynamodb::DynamoStore>, every: Duration) {
        let (me, mut stop) = (self.clone(), self.inner.shutdown.clone());
        tokio::spawn(async move {
            loop {
                match store.group_status().await {
                    Ok(rows) => {
                        let shards = rows
                            .into_iter()
                            .map(|r| GroupShard {
                                state: if r.lease.ended {
                                    "ended"
                                } else if r.lease.owner.is_some() {
                                    "live"
                                } else {
                                    "free"
                                },
                                shard: r.lease.key,
                                owner: r.lease.owner,
                                epoch: r.lease.epoch,
                                checkpoint: r.lease.checkpoint.map(|c| c.to_string()),
                                committed_at_ms: r.committed_at_ms,
                                lag_ms: r.lag_ms,
                            })
                            .collect();
                        *me.inner.group.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(shards));
                    }
                    Err(e) => tracing::warn!(error = %e, "dashboard: reading the lease table failed"),
                }
                tokio::select! {
                    () = tokio::time::sleep(every) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
        });
    }

    /// The group's shards as last read (`None` without a group).
    pub fn group(&self) -> Option<Arc<Vec<GroupShard>>> {
        self.inner.group.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The reconciliation panel's data: the latest report's summary (re-read when the file
    /// changes), `Ok(None)` when no run has written one yet.
    pub fn reconcile(&self) -> Result<Option<Arc<serde_json::Value>>, String> {
        let Some(path) = &self.inner.cfg.reconcile_report else { return Ok(None) };
        let Ok(modified) = std::fs::metadata(path).and_then(|m| m.modified()) else { return Ok(None) };
        let mut cache = self.inner.reconcile.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, summary)) = cache.as_ref()
            && *at == modified
        {
            return Ok(Some(Arc::clone(summary)));
        }
        let bytes = std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
        let report: crate::reconcile::report::Report =
            serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
        let summary = Arc::new(crate::reconcile::report::panel(&report));
        *cache = Some((modified, Arc::clone(&summary)));
        Ok(Some(summary))
    }

    /// Waits for the snapshot thread to end (after shutdown), so that it no longer holds the
    /// store: an embedded store must be closed by its last owner to open cleanly next time.
    pub async fn close(&self) {
        let handle = self.inner.snapshot_thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(h) = handle {
            let _ = tokio::task::spawn_blocking(move || h.join()).await;
        }
    }

    /// The store's whole outcome, read now: what `stockflow verify` and `stockflow replay`
    /// compare with the straight pass.
    pub async fn outcome(&self) -> Result<stockflow_state::reference::Outcome, String> {
        (self.inner.outcome)().await
    }

    /// The snapshot being served.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        Arc::clone(&self.inner.snapshot.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Freshness figures so far.
    pub fn stats(&self) -> SnapshotStats {
        *self.inner.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Alerts seen so far: (oversell, low stock).
    pub fn alert_counts(&self) -> (u64, u64) {
        let log = self.inner.alerts.lock().unwrap_or_else(|e| e.into_inner());
        (log.oversell, log.low_stock)
    }

    /// A subscription to the pushes, and the shutdown that ends it.
    pub(crate) fn subscribe(&self) -> (broadcast::Receiver<Push>, watch::Receiver<bool>) {
        (self.inner.pushes.subscribe(), self.inner.shutdown.clone())
    }

    fn push(&self, event: &'static str, value: &impl Serialize) {
        if self.inner.pushes.receiver_count() == 0 {
            return;
        }
        if let Ok(json) = serde_json::to_string(value) {
            let _ = self.inner.pushes.send(Push { event, json: json.into() });
        }
    }

    /// Re-reads the SKU states every `refresh` and swaps the served snapshot.
    async fn snapshots<S: StateStore>(self, store: Arc<S>, shutdown: watch::Receiver<bool>) {
        let mut ticks = ticks(self.inner.cfg.refresh, shutdown);
        while ticks.next().await.is_some() {
            let began = Instant::now();
            let as_of = now_ms();
            let states = match store.sku_states().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "dashboard: reading SKU states failed; serving the previous snapshot");
                    continue;
                }
            };
            let read = began.elapsed();
            let mut snap = Snapshot::build(states, as_of);
            let build = began.elapsed();
            snap.build_ms = build.as_millis() as u64;
            let skus = snap.rows.len();
            tracing::debug!(skus, ?read, ?build, "dashboard snapshot");
            let previous =
                std::mem::replace(&mut *self.inner.snapshot.write().unwrap_or_else(|e| e.into_inner()), Arc::new(snap));
            // The previous snapshot was served until now: its age now is the worst a reader saw.
            let staleness = if previous.as_of_ms > 0 { (now_ms() - previous.as_of_ms).max(0) as u64 } else { 0 };
            metrics::histogram!("stockflow_dashboard_snapshot_seconds").record(build.as_secs_f64());
            metrics::histogram!("stockflow_dashboard_staleness_seconds").record(staleness as f64 / 1000.0);
            metrics::gauge!("stockflow_dashboard_skus").set(skus as f64);
            metrics::gauge!("stockflow_dashboard_snapshot_timestamp_seconds").set(as_of as f64 / 1000.0);
            let mut st = self.inner.stats.lock().unwrap_or_else(|e| e.into_inner());
            st.count += 1;
            st.max_build_ms = st.max_build_ms.max(build.as_millis() as u64);
            st.max_staleness_ms = st.max_staleness_ms.max(staleness);
            st.skus = skus;
        }
    }

    /// Follows every shard's outbox; alerts go to the ring and to the subscribers.
    async fn alert_tail<S: OutboxStore>(self, store: Arc<S>, shutdown: watch::Receiver<bool>) {
        const PAGE: usize = 2_000;
        let mut cursors: HashMap<String, Option<OutboxPos>> = HashMap::new();
        let mut first_pass = true;
        let mut ticks = ticks(self.inner.cfg.alert_poll, shutdown);
        while ticks.next().await.is_some() {
            let shards = match store.outbox_shards().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "dashboard: listing outbox shards failed");
                    continue;
                }
            };
            for shard in shards {
                let cursor = cursors.entry(shard.clone()).or_default();
                loop {
                    let page = match store.read_outbox(&shard, cursor.as_ref(), PAGE).await {
                        Ok(p) => p,
                        Err(e) => {
                            tracing::warn!(error = %e, shard, "dashboard: reading the outbox failed");
                            break;
                        }
                    };
                    let full = page.len() == PAGE;
                    if let Some(last) = page.last() {
                        *cursor = Some(last.pos.clone());
                    }
                    self.record_alerts(page.iter().map(|e| &e.effect), !first_pass);
                    if !full {
                        break;
                    }
                }
            }
            first_pass = false;
        }
    }

    fn record_alerts<'a>(&self, effects: impl Iterator<Item = &'a Effect>, live: bool) {
        let seen = now_ms();
        let mut fresh = Vec::new();
        {
            let mut log = self.inner.alerts.lock().unwrap_or_else(|e| e.into_inner());
            for effect in effects {
                let Some(item) = AlertItem::of(effect, log.next_seq, seen) else { continue };
                log.next_seq += 1;
                match item.kind {
                    "oversell" => log.oversell += 1,
                    _ => log.low_stock += 1,
                }
                let item = Arc::new(item);
                while log.ring.len() >= self.inner.cfg.alert_capacity.max(1) {
                    log.ring.pop_front();
                }
                log.ring.push_back(Arc::clone(&item));
                if live {
                    fresh.push(item);
                }
            }
        }
        for item in fresh {
            self.push("alert", &*item);
        }
    }

    /// Once a second: a point of the charts, pushed to the subscribers too.
    async fn sampler(self, telemetry: Telemetry, shutdown: watch::Receiver<bool>) {
        let mut previous: Option<(Instant, Vec<Option<Sample>>, u64)> = None;
        let mut ticks = ticks(Duration::from_secs(1), shutdown);
        while ticks.next().await.is_some() {
            let sample = telemetry.sample().await;
            let now = Instant::now();
            let alerts = {
                let (o, l) = self.alert_counts();
                o + l
            };
            if let Some((then, before, alerts_before)) = &previous {
                let secs = now.duration_since(*then).as_secs_f64().max(1e-3);
                let lag = lag(&sample);
                let point = Point {
                    t: now_ms(),
                    applied_per_s: rate(&sample, before, secs, |s| s.applied),
                    read_per_s: rate(&sample, before, secs, |s| s.read),
                    alerts_per_s: alerts.saturating_sub(*alerts_before) as f64 / secs,
                    lag_bytes: lag.lag_bytes,
                    lag_records: lag.lag_records,
                    lag_seconds: lag.lag_seconds,
                };
                {
                    let mut series = self.inner.series.lock().unwrap_or_else(|e| e.into_inner());
                    while series.len() >= self.inner.cfg.series_points.max(1) {
                        series.pop_front();
                    }
                    series.push_back(point);
                }
                self.push("tick", &api::Tick::of(&self, point));
            }
            previous = Some((now, sample, alerts));
        }
    }
}

/// A tick every `period` until `shutdown` (a late tick delays the next; none are bunched), for the
/// loops that feed the dashboard.
fn ticks(period: Duration, mut shutdown: watch::Receiver<bool>) -> impl Stream<Item = Instant> + Unpin {
    let mut interval = tokio::time::interval(period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let stop = Box::pin(async move { stopped(&mut shutdown).await });
    IntervalStream::new(interval).map(tokio::time::Instant::into_std).take_until(stop)
}

/// The dashboard of this process's own pipeline (`run`, `demo`: its consumers' counters feed the
/// charts), served on `listen` — any free port instead when `fallback` and it is taken.
pub async fn start_in_process<S: StateStore + OutboxStore>(
    store: Arc<S>,
    progress: Arc<Progress>,
    settings: &crate::runtime::config::Settings,
    listen: std::net::SocketAddr,
    fallback: bool,
    metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<(Dashboard, std::net::SocketAddr)> {
    let cfg = DashboardConfig {
        snapshot_thread: true,
        reconcile_report: Some(settings.reconcile_dir().join("reconcile.json")),
        ..DashboardConfig::from_section(&settings.dashboard)
    };
    let dashboard = Dashboard::start(
        store,
        Telemetry::InProcess(progress),
        settings.engine.windows.sizes_ms().to_vec(),
        cfg,
        shutdown.clone(),
    );
    let at = crate::server::serve(listen, fallback, router(dashboard.clone(), metrics), shutdown).await?;
    Ok((dashboard, at))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_add_each_members_increase_and_survive_a_missed_scrape() {
        let s = |applied| Some(Sample { applied, lag_seconds: Some(applied as f64), ..Sample::default() });
        let before = [s(100), None, s(50)];
        // The second member missed the previous scrape: not counted, not a spike of its total.
        let now = [s(130), s(9_000), s(20)];
        // The third restarted (counter reset): its 20 since the restart count.
        assert_eq!(rate(&now, &before, 2.0, |s| s.applied), Some(25.0));
        assert_eq!(rate(&[None], &[s(1)], 1.0, |s| s.applied), None);
        assert_eq!(lag(&now).lag_seconds, Some(9_000.0));
    }
}
