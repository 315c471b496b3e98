//! Wiring of the connectors (their config section is `stockflow_connectors::config`): credentials (Secrets Manager,
//! file or environment — never logged), and the drains that run next to the consumers.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use stockflow_connectors::accounting::{Accounting, Accounts, Shape};
use stockflow_connectors::alerts::{AlertFeed, AlertWebhook, LogSink};
use stockflow_connectors::config::{AccountingShape, ConnectorsSection, CredentialSource};
use stockflow_connectors::drain::{Drain, DrainConfig, DrainControl, DrainStats, Lanes};
use stockflow_connectors::manufacturer::{Manufacturer, SyncReport, sync_stock_levels};
use stockflow_connectors::{Connector, Secret};
use stockflow_state::book::BookStore;
use stockflow_state::money::Currency;
use stockflow_state::{StateStore, StoreError};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// How often credentials from Secrets Manager or a file are re-read.
const REFRESH: Duration = Duration::from_secs(300);

/// Reads a credential from where `source` says (empty when none is configured).
pub async fn load_credential(source: &CredentialSource, what: &str) -> anyhow::Result<Secret> {
    let value = if let Some(id) = &source.secret_id {
        let endpoint = std::env::var("SECRETSMANAGER_ENDPOINT").ok();
        let client = crate::ingest::webhook::secrets_client(endpoint.as_deref()).await;
        let out = client
            .get_secret_value()
            .secret_id(id)
            .send()
            .await
            .with_context(|| format!("{what}: reading secret {id}"))?;
        out.secret_string().map(str::to_string).with_context(|| format!("{what}: secret {id} has no SecretString"))?
    } else if let Some(path) = &source.file {
        std::fs::read_to_string(path).with_context(|| format!("{what}: reading {}", path.display()))?
    } else if let Some(var) = &source.env {
        std::env::var(var).with_context(|| format!("{what}: environment variable {var} is not set"))?
    } else {
        source.value.clone().unwrap_or_default()
    };
    Ok(Secret::new(value.trim().to_string()))
}

/// Loads a credential and, when it comes from Secrets Manager or a file, re-reads it every `every`
/// so a rotated token (OAuth access tokens live under an hour) reaches the running connectors; a
/// failed re-read keeps the old value.
pub async fn load_and_refresh(
    source: &CredentialSource,
    what: &'static str,
    every: Duration,
) -> anyhow::Result<Secret> {
    let secret = load_credential(source, what).await?;
    if source.secret_id.is_some() || source.file.is_some() {
        let (source, shared) = (source.clone(), secret.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                match load_credential(&source, what).await {
                    Ok(fresh) => shared.replace(fresh.expose()),
                    Err(e) => {
                        tracing::warn!(credential = what, error = %e, "re-reading a credential failed; keeping the old one")
                    }
                }
            }
        });
    }
    Ok(secret)
}

/// The configured connectors, built and holding their credentials.
#[derive(Debug)]
pub struct Connectors {
    /// Alerts to the log.
    pub log: Option<Arc<LogSink>>,
    /// Oversell alerts to in-process subscribers (the dashboard).
    pub feed: Arc<AlertFeed>,
    /// Signed alert webhook.
    pub webhook: Option<Arc<AlertWebhook>>,
    /// Manufacturer.
    pub manufacturer: Option<Arc<Manufacturer>>,
    /// Accounting.
    pub accounting: Option<Arc<Accounting>>,
    stock_sync: Option<Duration>,
    drain: DrainConfig,
}

/// What one connector's drain did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrainSummary {
    /// Connector name.
    pub connector: &'static str,
    /// Requests taken by the receiver.
    pub sent: u64,
    /// Effects in them.
    pub effects: u64,
    /// Failed requests (retried).
    pub failed: u64,
    /// Requests answered 429.
    pub throttled: u64,
    /// Requests dead-lettered.
    pub dead_lettered: u64,
}

impl DrainSummary {
    fn of(connector: &'static str, s: &DrainStats) -> Self {
        let get = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        DrainSummary {
            connector,
            sent: get(&s.sent),
            effects: get(&s.effects),
            failed: get(&s.failed),
            throttled: get(&s.throttled),
            dead_lettered: get(&s.dead_lettered),
        }
    }
}

/// Running drains.
#[derive(Debug)]
pub struct Running {
    tasks: JoinSet<Result<Option<DrainSummary>, StoreError>>,
    stock_sync: Option<tokio::task::JoinHandle<SyncReport>>,
    stop_sync: watch::Sender<bool>,
}

impl Running {
    /// Waits for every drain (after the control said stop or finish) and the stock sync.
    pub async fn join(mut self) -> anyhow::Result<(Vec<DrainSummary>, Option<SyncReport>)> {
        let mut out = Vec::new();
        while let Some(r) = self.tasks.join_next().await {
            if let Some(s) = r.context("connector drain task")?? {
                out.push(s);
            }
        }
        out.sort_by_key(|s| s.connector);
        let _ = self.stop_sync.send(true);
        let report = match self.stock_sync {
            Some(h) => Some(h.await.context("stock sync task")?),
            None => None,
        };
        Ok((out, report))
    }
}

impl Connectors {
    /// Builds the configured connectors, reading their credentials.
    pub async fn build(cfg: &ConnectorsSection, lateness_ms: i64) -> anyhow::Result<Self> {
        cfg.validate()?;
        let policy = cfg.delivery.policy()?;
        let webhook = match &cfg.alerts_webhook.url {
            Some(url) => {
                let secret =
                    load_and_refresh(&cfg.alerts_webhook.secret, "connectors.alerts_webhook.secret", REFRESH).await?;
                let hook = AlertWebhook::new(url.clone(), secret, policy.clone())
                    .map_err(|e| anyhow::anyhow!("connectors.alerts_webhook.secret: {e}"))?;
                Some(Arc::new(hook))
            }
            None => None,
        };
        let m = &cfg.manufacturer;
        let manufacturer = match &m.url {
            Some(url) => {
                let token = load_and_refresh(&m.token, "connectors.manufacturer.token", REFRESH).await?;
                Some(Arc::new(Manufacturer::new(
                    url.clone(),
                    token,
                    policy.clone(),
                    Duration::from_secs(m.cache_ttl_s),
                )))
            }
            None => None,
        };
        let a = &cfg.accounting;
        let accounting = match &a.url {
            Some(url) => {
                let shape = match a.shape {
                    AccountingShape::Quickbooks => Shape::QuickBooks {
                        base: url.clone(),
                        realm_id: a.realm_id.clone().unwrap_or_default(),
                        minor_version: a.minor_version,
                        home_currency: Currency::parse(&a.base_currency).unwrap_or(Currency::USD),
                        multi_currency: a.multi_currency,
                    },
                    AccountingShape::Xero => Shape::Xero {
                        base: url.clone(),
                        tenant_id: a.tenant_id.clone().unwrap_or_default(),
                        base_currency: Currency::parse(&a.base_currency).unwrap_or(Currency::USD),
                    },
                    AccountingShape::Generic => Shape::Generic { url: url.clone() },
                };
                let accounts = Accounts {
                    cogs: a.cogs_account.clone(),
                    inventory: a.inventory_account.clone(),
                    clearing: a.clearing_account.clone(),
                };
                let token = load_and_refresh(&a.token, "connectors.accounting.token", REFRESH).await?;
                let mut c = Accounting::new(shape, accounts, token, policy.clone());
                if let Some(summary) = a.summary(lateness_ms)? {
                    c = c.with_summary(summary);
                }
                Some(Arc::new(c))
            }
            None => None,
        };
        Ok(Connectors {
            log: cfg.log.then(|| Arc::new(LogSink::default())),
            feed: Arc::new(AlertFeed::new(1024)),
            webhook,
            stock_sync: manufacturer
                .as_ref()
                .filter(|_| m.stock_sync_interval_s > 0)
                .map(|_| Duration::from_secs(m.stock_sync_interval_s)),
            manufacturer,
            accounting,
            drain: DrainConfig { idle_poll: Duration::from_millis(cfg.delivery.poll_ms), ..DrainConfig::default() },
        })
    }

    /// Names of the connectors that will run.
    pub fn names(&self) -> Vec<&'static str> {
        let on = [
            ("log", self.log.is_some()),
            ("alerts-webhook", self.webhook.is_some()),
            ("manufacturer", self.manufacturer.is_some()),
            ("accounting", self.accounting.is_some()),
        ];
        std::iter::once("feed").chain(on.into_iter().filter(|(_, on)| *on).map(|(n, _)| n)).collect()
    }

    /// Starts a drain per connector (and the stock-level sync) over `store`, every shard.
    pub fn spawn<S: BookStore + StateStore>(&self, store: Arc<S>, ctl: DrainControl) -> Running {
        self.spawn_lanes(store, ctl, Lanes::All)
    }

    /// Starts a drain per connector over `lanes` (a consumer-group member delivers what its
    /// coordinator assigns it, fenced by its leases; the stock-level sync sends its shards' SKUs).
    pub fn spawn_lanes<S: BookStore + StateStore>(&self, store: Arc<S>, ctl: DrainControl, lanes: Lanes) -> Running {
        let mut tasks = JoinSet::new();
        fn start<S: BookStore, C: Connector>(
            tasks: &mut JoinSet<Result<Option<DrainSummary>, StoreError>>,
            store: &Arc<S>,
            c: &Arc<C>,
            cfg: &DrainConfig,
            ctl: &DrainControl,
            lanes: &Lanes,
        ) {
            let drain = Arc::new(Drain::new(Arc::clone(store), Arc::clone(c), cfg.clone()).with_lanes(lanes.clone()));
            let ctl = ctl.clone();
            tasks.spawn(async move {
                Arc::clone(&drain).run(ctl).await?;
                Ok(Some(DrainSummary::of(drain.name(), drain.stats())))
            });
        }
        start(&mut tasks, &store, &self.feed, &self.drain, &ctl, &lanes);
        if let Some(c) = &self.log {
            start(&mut tasks, &store, c, &self.drain, &ctl, &lanes);
        }
        if let Some(c) = &self.webhook {
            start(&mut tasks, &store, c, &self.drain, &ctl, &lanes);
        }
        if let Some(c) = &self.manufacturer {
            start(&mut tasks, &store, c, &self.drain, &ctl, &lanes);
        }
        if let Some(c) = &self.accounting {
            start(&mut tasks, &store, c, &self.drain, &ctl, &lanes);
        }
        let (stop_sync, stop_rx) = watch::channel(false);
        let stock_sync = match (&self.manufacturer, self.stock_sync) {
            (Some(m), Some(interval)) => {
                let (store, m) = (Arc::clone(&store), Arc::clone(m));
                let mut finish = ctl.finish.clone();
                let shutdown = ctl.shutdown.clone();
                Some(tokio::spawn(async move {
                    // Runs until shutdown; when told to finish, one last full pass after the drains.
                    let periodic = sync_stock_levels(
                        Arc::clone(&store),
                        Arc::clone(&m),
                        interval,
                        stop_rx.clone(),
                        false,
                        lanes.clone(),
                    );
                    let finished = async move { finish.wait_for(|f| *f).await.is_ok() };
                    let mut signal = shutdown.clone();
                    let stopped = async move { signal.wait_for(|s| *s).await.is_ok() };
                    tokio::select! {
                        r = periodic => r,
                        true = finished => {
                            let mut stop = stop_rx;
                            let _ = stop.wait_for(|s| *s).await.is_ok();
                            sync_stock_levels(store, m, interval, shutdown.clone(), true, lanes).await
                        }
                        _ = stopped => SyncReport::default(),
                    }
                }))
            }
            _ => None,
        };
        Running { tasks, stock_sync, stop_sync }
    }
}
