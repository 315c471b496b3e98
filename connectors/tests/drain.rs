//! The drain over the embedded store, with a scripted connector on paused tokio time: the
//! circuit opens and recovers, rate limits hold, 429 waits are honoured and not counted,
//! failures past the limit are dead-lettered and re-sent by `outbox retry` under their own key,
//! a rejected batch is split to isolate the refused effect, and a restart re-sends the saved
//! in-flight request verbatim.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rust_decimal::Decimal;
use stockflow_connectors::connector::request_key;
use stockflow_connectors::drain::{Drain, DrainConfig, DrainControl};
use stockflow_connectors::policy::{BreakerConfig, CircuitState, DeliveryPolicy, RateLimit};
use stockflow_connectors::{Connector, Delivered, DeliveryError};
use stockflow_state::effects::{EffectKind, EffectKinds, JournalKind, JournalLine};
use stockflow_state::embedded::RedbStore;
use stockflow_state::engine::DedupDelta;
use stockflow_state::money::Currency;
use stockflow_state::outbox::{OutboxStore, Request, requeue_dead_letters};
use stockflow_state::{Effect, Position, ShardCommit, StateStore};
use tokio::sync::watch;
use tokio::time::Instant;

type Answer = Result<Delivered, DeliveryError>;

#[derive(Debug)]
struct Scripted {
    policy: DeliveryPolicy,
    script: Mutex<VecDeque<Answer>>,
    calls: Mutex<Vec<(Instant, Request)>>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    latency: Duration,
}

impl Scripted {
    fn new(policy: DeliveryPolicy, script: Vec<Answer>) -> Arc<Self> {
        Arc::new(Scripted {
            policy,
            script: Mutex::new(script.into()),
            calls: Mutex::new(Vec::new()),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
            latency: Duration::from_millis(50),
        })
    }

    fn calls(&self) -> Vec<(Instant, Request)> {
        self.calls.lock().unwrap().clone()
    }
}

impl Connector for Scripted {
    fn name(&self) -> &'static str {
        "scripted"
    }
    fn kinds(&self) -> EffectKinds {
        EffectKinds::of(EffectKind::Journal)
    }
    fn policy(&self) -> &DeliveryPolicy {
        &self.policy
    }
    async fn render(&self, batch: &[&Effect]) -> Result<Request, DeliveryError> {
        let ids: Vec<&str> = batch.iter().map(|e| e.id()).collect();
        Ok(Request {
            key: request_key("scripted", &ids),
            body: ids.join(","),
            items: ids.iter().map(|s| s.to_string()).collect(),
        })
    }
    async fn send(&self, r: &Request) -> Answer {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        self.calls.lock().unwrap().push((Instant::now(), r.clone()));
        tokio::time::sleep(self.latency).await;
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        let next = self.script.lock().unwrap().pop_front();
        next.unwrap_or(Ok(Delivered::default()))
    }
}

fn journal(i: usize) -> Effect {
    Effect::Journal(JournalLine {
        entry_id: format!("cogs:e{i}"),
        sku: format!("SKU-{}", i % 7),
        kind: JournalKind::Cogs,
        qty: 1,
        unit_cost: Decimal::ONE,
        amount: Decimal::ONE,
        currency: Currency::USD,
        ts: 0,
    })
}

/// A store whose outbox holds `n` journal effects over `shards` shards, committed in commits of 7.
async fn store_with(n: usize, shards: usize) -> (tempfile::TempDir, Arc<RedbStore>) {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(RedbStore::open(dir.path().join("state.redb")).unwrap());
    let mut effects: Vec<Vec<Effect>> = vec![Vec::new(); shards];
    for i in 0..n {
        effects[i % shards].push(journal(i));
    }
    for (s, list) in effects.into_iter().enumerate() {
        for (c, chunk) in list.chunks(7).enumerate() {
            let commit = ShardCommit {
                shard: format!("shard-{s}"),
                lease_epoch: 0,
                checkpoint: Position::offset(c as u64 + 1),
                max_ts: None,
                states: Default::default(),
                lines: None,
                effects: chunk.to_vec(),
                dead_letters: Vec::new(),
                dedup: DedupDelta::Append(Vec::new()),
                new_skus: Vec::new(),
                keep_checkpoint: false,
                after_interrupted: false,
                lag_ms: None,
            };
            store.commit(Arc::new(commit)).await.unwrap();
        }
    }
    (dir, store)
}

fn finish_now() -> (DrainControl, watch::Sender<bool>, watch::Sender<bool>) {
    let (stop_tx, stop) = watch::channel(false);
    let (fin_tx, fin) = watch::channel(true);
    (DrainControl::new(stop, fin), stop_tx, fin_tx)
}

fn fast_config() -> DrainConfig {
    DrainConfig { idle_poll: Duration::from_millis(10), rescan: Duration::from_millis(20), read_max: 1000 }
}

fn delivered_ids(calls: &[(Instant, Request)]) -> Vec<String> {
    let mut seen = std::collections::BTreeMap::new();
    for (_, r) in calls {
        seen.insert(r.key.clone(), r.items.clone());
    }
    let mut ids: Vec<String> = seen.into_values().flatten().collect();
    ids.sort();
    ids
}

#[tokio::test(start_paused = true)]
async fn the_circuit_opens_after_consecutive_failures_and_a_probe_closes_it() {
    let (_dir, store) = store_with(30, 1).await;
    let breaker =
        BreakerConfig { failures: 5, open_for: Duration::from_secs(30), max_open_for: Duration::from_secs(120) };
    let policy = DeliveryPolicy {
        max_batch: 10,
        linger: Duration::ZERO,
        max_attempts: 100,
        breaker,
        ..DeliveryPolicy::default()
    };
    let fail = || Err(DeliveryError::transient("HTTP 500"));
    // 5 failures open it; the first probe fails (open 60 s); the second probe succeeds.
    let c = Scripted::new(policy, vec![fail(), fail(), fail(), fail(), fail(), fail()]);
    let drain = Arc::new(Drain::new(Arc::clone(&store), Arc::clone(&c), fast_config()));
    let (ctl, _stop, _fin) = finish_now();
    drain.clone().run(ctl).await.unwrap();

    let calls = c.calls();
    let gap = |i: usize| calls[i].0 - calls[i - 1].0;
    // Calls 1–5 are the failures in a row (backoff only between them), then the circuit holds
    // every call back for open_for, then one probe, then twice open_for, then a probe.
    assert!(gap(5) >= Duration::from_secs(30), "no call while open: {:?}", gap(5));
    assert!(gap(6) >= Duration::from_secs(60), "open twice as long after a failed probe: {:?}", gap(6));
    assert_eq!(drain.circuit(), CircuitState::Closed);
    assert_eq!(drain.stats().failed.load(Ordering::Relaxed), 6);
    assert_eq!(delivered_ids(&calls).len(), 30, "everything delivered once the receiver is back");
    assert_eq!(store.connector_dead_letters(None).await.unwrap(), vec![]);
}

#[tokio::test(start_paused = true)]
async fn xero_and_quickbooks_rate_limits_hold() {
    for (limit, window, most, concurrency) in
        [(RateLimit::XERO, Duration::from_secs(60), 60, 5), (RateLimit::QUICKBOOKS, Duration::from_secs(1), 10, 10)]
    {
        let (_dir, store) = store_with(400, 8).await;
        let policy = DeliveryPolicy {
            max_batch: 1,
            linger: Duration::ZERO,
            rate: Some(limit),
            concurrency,
            ..DeliveryPolicy::default()
        };
        let c = Scripted::new(policy, Vec::new());
        let drain = Arc::new(Drain::new(Arc::clone(&store), Arc::clone(&c), fast_config()));
        let (ctl, _stop, _fin) = finish_now();
        drain.run(ctl).await.unwrap();
        let times: Vec<Instant> = c.calls().iter().map(|(t, _)| *t).collect();
        assert_eq!(times.len(), 400);
        let mut sorted = times.clone();
        sorted.sort();
        for (i, t) in sorted.iter().enumerate() {
            let within = sorted[i..].iter().take_while(|u| **u < *t + window).count();
            assert!(within <= most, "{limit:?}: {within} calls within {window:?}");
        }
        assert!(c.max_in_flight.load(Ordering::SeqCst) <= concurrency);
    }
}

#[tokio::test(start_paused = true)]
async fn a_429_pauses_the_connector_for_retry_after_and_costs_no_attempt() {
    let (_dir, store) = store_with(5, 1).await;
    let policy = DeliveryPolicy { max_batch: 5, linger: Duration::ZERO, max_attempts: 1, ..DeliveryPolicy::default() };
    let throttled =
        || Err(DeliveryError::Throttled { reason: "HTTP 429".into(), retry_after: Some(Duration::from_secs(7)) });
    let c = Scripted::new(policy, vec![throttled(), throttled()]);
    let drain = Arc::new(Drain::new(Arc::clone(&store), Arc::clone(&c), fast_config()));
    let (ctl, _stop, _fin) = finish_now();
    drain.clone().run(ctl).await.unwrap();
    let calls = c.calls();
    assert_eq!(calls.len(), 3);
    for i in 1..3 {
        assert!(calls[i].0 - calls[i - 1].0 >= Duration::from_secs(7), "waited Retry-After");
        assert_eq!(calls[i].1, calls[0].1, "the same request, same key");
    }
    // max_attempts = 1, yet nothing was dead-lettered: throttling is not a failed attempt.
    assert_eq!(store.connector_dead_letters(None).await.unwrap(), vec![]);
    assert_eq!(drain.stats().throttled.load(Ordering::Relaxed), 2);
}

#[tokio::test(start_paused = true)]
async fn failures_past_the_limit_are_dead_lettered_and_retry_resends_the_same_key() {
    let (_dir, store) = store_with(12, 1).await;
    let policy = DeliveryPolicy { max_batch: 4, linger: Duration::ZERO, max_attempts: 3, ..DeliveryPolicy::default() };
    let fail = || Err(DeliveryError::transient("HTTP 503"));
    let c = Scripted::new(policy.clone(), vec![fail(), fail(), fail()]);
    let drain = Arc::new(Drain::new(Arc::clone(&store), Arc::clone(&c), fast_config()));
    let (ctl, _stop, _fin) = finish_now();
    drain.clone().run(ctl).await.unwrap();
    let dead = store.connector_dead_letters(Some("scripted")).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].attempts, 3);
    assert_eq!(dead[0].last_error, "HTTP 503");
    assert_eq!(dead[0].request.items, ["cogs:e0", "cogs:e1", "cogs:e2", "cogs:e3"]);
    assert_eq!(drain.stats().dead_lettered.load(Ordering::Relaxed), 1);
    // The rest went on: a failing batch delays only itself.
    assert_eq!(delivered_ids(&c.calls()).len(), 12);

    assert_eq!(requeue_dead_letters(store.as_ref(), Some("scripted")).await.unwrap(), 1);
    let again = Scripted::new(policy, Vec::new());
    let drain = Arc::new(Drain::new(Arc::clone(&store), Arc::clone(&again), fast_config()));
    let (ctl, _stop, _fin) = finish_now();
    drain.run(ctl).await.unwrap();
    let calls = again.calls();
    assert_eq!(calls.len(), 1, "only the requeued request: the cursor is past everything else");
    assert_eq!(calls[0].1, dead[0].request, "re-sent verbatim, under its own key");
    assert_eq!(store.connector_dead_letters(None).await.unwrap(), vec![]);
}

#[tokio::test(start_paused = true)]
async fn a_rejected_batch_is_split_and_only_the_refused_effect_is_dead_lettered() {
    let (_dir, store) = store_with(6, 1).await;
    let policy = DeliveryPolicy { max_batch: 6, linger: Duration::ZERO, ..DeliveryPolicy::default() };
    let reject = |m: &str| Err(DeliveryError::Rejected(m.into()));
    let ok = || Ok(Delivered::default());
    // The batch is refused; singles e0, e1 pass, e2 is refused alone, e3.. pass.
    let c = Scripted::new(policy, vec![reject("entries[2]: bad account"), ok(), ok(), reject("bad account")]);
    let drain = Arc::new(Drain::new(Arc::clone(&store), Arc::clone(&c), fast_config()));
    let (ctl, _stop, _fin) = finish_now();
    drain.run(ctl).await.unwrap();
    let calls = c.calls();
    assert_eq!(calls[0].1.items.len(), 6);
    assert!(calls[1..].iter().all(|(_, r)| r.items.len() == 1), "one by one after the rejection");
    let dead = store.connector_dead_letters(None).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].request.items, ["cogs:e2"]);
    assert_eq!(dead[0].last_error, "bad account");
    let singles: Vec<&str> = calls[1..].iter().map(|(_, r)| r.items[0].as_str()).collect();
    assert_eq!(singles, ["cogs:e0", "cogs:e1", "cogs:e2", "cogs:e3", "cogs:e4", "cogs:e5"], "in outbox order");
}

#[tokio::test(start_paused = true)]
async fn a_restart_resends_the_saved_in_flight_request_verbatim() {
    let (_dir, store) = store_with(20, 1).await;
    let policy = DeliveryPolicy { max_batch: 8, linger: Duration::ZERO, ..DeliveryPolicy::default() };
    // The first send hangs "forever": the process is stopped while it is in flight.
    let c = Arc::new(Scripted {
        latency: Duration::from_secs(3600),
        ..Arc::into_inner(Scripted::new(policy.clone(), Vec::new())).unwrap()
    });
    let drain = Arc::new(Drain::new(Arc::clone(&store), Arc::clone(&c), fast_config()));
    let (stop_tx, stop) = watch::channel(false);
    let (_fin_tx, fin) = watch::channel(false);
    let run = tokio::spawn(drain.run(DrainControl::new(stop, fin)));
    while c.calls().is_empty() {
        tokio::task::yield_now().await;
    }
    // Kill: abort the task mid-request (nothing after the send runs).
    run.abort();
    let _ = run.await;
    drop(stop_tx);
    let saved = store.cursor("scripted", "shard-0").await.unwrap();
    let flight = saved.in_flight.expect("the request was saved before it was sent");
    assert_eq!(flight.request, c.calls()[0].1);

    // With more effects committed meanwhile, a regrouped batch would get a new key: it must not.
    let restarted = Scripted::new(policy, Vec::new());
    let drain = Arc::new(Drain::new(Arc::clone(&store), Arc::clone(&restarted), fast_config()));
    let (ctl, _stop, _fin) = finish_now();
    drain.run(ctl).await.unwrap();
    let calls = restarted.calls();
    assert_eq!(calls[0].1, flight.request, "same key, same body");
    assert_eq!(delivered_ids(&calls).len(), 20);
}

/// The embedded store, counting the effects its outbox scans go over (what a drain reads, and
/// on DynamoDB pays for).
struct CountingReads {
    inner: Arc<RedbStore>,
    effects_read: AtomicUsize,
}

impl OutboxStore for CountingReads {
    async fn outbox_shards(&self) -> Result<Vec<String>, stockflow_state::store::StoreError> {
        self.inner.outbox_shards().await
    }
    async fn scan_outbox(
        &self,
        shard: &str,
        after: Option<&stockflow_state::outbox::OutboxPos>,
        max: usize,
        kinds: EffectKinds,
    ) -> Result<stockflow_state::outbox::OutboxScan, stockflow_state::store::StoreError> {
        let page = self.inner.scan_outbox(shard, after, max, kinds).await?;
        self.effects_read.fetch_add(page.scanned, Ordering::SeqCst);
        Ok(page)
    }
    async fn cursor(
        &self,
        connector: &str,
        shard: &str,
    ) -> Result<stockflow_state::outbox::Cursor, stockflow_state::store::StoreError> {
        self.inner.cursor(connector, shard).await
    }
    async fn save_cursor(
        &self,
        connector: &str,
        shard: &str,
        cursor: &stockflow_state::outbox::Cursor,
        dead: Option<&stockflow_state::outbox::ConnectorDeadLetter>,
        fence: Option<&stockflow_state::outbox::Fence>,
    ) -> Result<(), stockflow_state::store::StoreError> {
        self.inner.save_cursor(connector, shard, cursor, dead, fence).await
    }
    async fn connector_dead_letters(
        &self,
        connector: Option<&str>,
    ) -> Result<Vec<stockflow_state::outbox::ConnectorDeadLetter>, stockflow_state::store::StoreError> {
        self.inner.connector_dead_letters(connector).await
    }
    async fn put_dead_letter(
        &self,
        dead: &stockflow_state::outbox::ConnectorDeadLetter,
        fence: Option<&stockflow_state::outbox::Fence>,
    ) -> Result<(), stockflow_state::store::StoreError> {
        self.inner.put_dead_letter(dead, fence).await
    }
    async fn remove_dead_letter(
        &self,
        connector: &str,
        shard: &str,
        key: &str,
        fence: Option<&stockflow_state::outbox::Fence>,
    ) -> Result<(), stockflow_state::store::StoreError> {
        self.inner.remove_dead_letter(connector, shard, key, fence).await
    }
    async fn prune_delivered(
        &self,
        shard: &str,
        through: &stockflow_state::outbox::Delivered,
        written_before_ms: i64,
    ) -> Result<u64, stockflow_state::store::StoreError> {
        self.inner.prune_delivered(shard, through, written_before_ms).await
    }
}

impl stockflow_state::book::BookStore for CountingReads {
    async fn committed_max_ts(&self, shard: &str) -> Result<Option<i64>, stockflow_state::store::StoreError> {
        self.inner.committed_max_ts(shard).await
    }
    async fn book_get(&self, connector: &str, key: &str) -> Result<Option<String>, stockflow_state::store::StoreError> {
        self.inner.book_get(connector, key).await
    }
    async fn book_range(
        &self,
        connector: &str,
        prefix: &str,
        after: Option<&str>,
        max: usize,
    ) -> Result<Vec<(String, String)>, stockflow_state::store::StoreError> {
        self.inner.book_range(connector, prefix, after, max).await
    }
    async fn book_write(
        &self,
        connector: &str,
        writes: &[stockflow_state::book::BookWrite],
        cursor: Option<stockflow_state::book::CursorWrite<'_>>,
        fence: Option<&stockflow_state::outbox::Fence>,
    ) -> Result<(), stockflow_state::store::StoreError> {
        self.inner.book_write(connector, writes, cursor, fence).await
    }
}

/// Batches smaller than a read page: each effect is read once, not once per batch that
/// overlaps the page (a scan read 1,000 effects for a batch of 100 and dropped 900 of them).
#[tokio::test(start_paused = true)]
async fn each_effect_is_read_once_when_batches_are_smaller_than_a_page() {
    let (_dir, inner) = store_with(2_000, 1).await;
    let store = Arc::new(CountingReads { inner, effects_read: AtomicUsize::new(0) });
    let policy = DeliveryPolicy { max_batch: 100, linger: Duration::ZERO, ..DeliveryPolicy::default() };
    let c = Scripted::new(policy, vec![]);
    let drain = Arc::new(Drain::new(Arc::clone(&store), Arc::clone(&c), fast_config()));
    let (ctl, _stop, _fin) = finish_now();
    drain.clone().run(ctl).await.unwrap();
    assert_eq!(delivered_ids(&c.calls()).len(), 2_000);
    assert_eq!(c.calls().len(), 20, "batches of 100");
    assert_eq!(store.effects_read.load(Ordering::SeqCst), 2_000, "every effect read once");
}
