//! Wiring of the connectors: the `[connectors]` config section, credentials (Secrets Manager,
//! file or environment — never logged), and the drains that run next to the consumers.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Deserialize;
use stockflow_connectors::accounting::{Accounting, Accounts, Shape};
use stockflow_connectors::alerts::{AlertFeed, AlertWebhook, LogSink};
use stockflow_connectors::drain::{Drain, DrainConfig, DrainControl, DrainStats, Lanes};
use stockflow_connectors::journals::{PeriodLen, SummaryPolicy};
use stockflow_connectors::manufacturer::{Manufacturer, SyncReport, sync_stock_levels};
use stockflow_connectors::policy::{BackoffConfig, BreakerConfig, DeliveryPolicy};
use stockflow_connectors::{Connector, Secret};
use stockflow_state::book::BookStore;
use stockflow_state::money::Currency;
use stockflow_state::{StateStore, StoreError};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// How often credentials from Secrets Manager or a file are re-read.
const REFRESH: Duration = Duration::from_secs(300);

/// `[connectors]`: where effects are delivered. Each HTTP connector is off until its `url` is set.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConnectorsSection {
    /// Write alerts to the log (`tracing`).
    pub log: bool,
    /// Delivery policy defaults for every connector.
    pub delivery: DeliverySection,
    /// Signed alert webhook.
    pub alerts_webhook: WebhookSection,
    /// The manufacturer's API.
    pub manufacturer: ManufacturerSection,
    /// The accounting system.
    pub accounting: AccountingSection,
}

impl Default for ConnectorsSection {
    fn default() -> Self {
        ConnectorsSection {
            log: true,
            delivery: DeliverySection::default(),
            alerts_webhook: WebhookSection::default(),
            manufacturer: ManufacturerSection::default(),
            accounting: AccountingSection::default(),
        }
    }
}

/// `[connectors.delivery]`: batching, retries, breaker and timeouts (every connector; QuickBooks
/// and Xero are further clamped to their documented limits).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliverySection {
    /// Most effects per request (1 to 1000).
    pub max_batch: usize,
    /// Largest request body, bytes (1 KiB to 350 KB: the in-flight request is saved in the store).
    pub max_bytes: usize,
    /// How long a partial batch waits for more, ms (0 to 60,000).
    pub linger_ms: u64,
    /// Failed attempts before a request is dead-lettered (1 to 1,000,000).
    pub max_attempts: u32,
    /// Request timeout, ms (50 to 120,000).
    pub timeout_ms: u64,
    /// First backoff ceiling, ms (1 to 60,000).
    pub backoff_base_ms: u64,
    /// Largest backoff ceiling, ms (≥ backoff_base_ms, ≤ 3,600,000).
    pub backoff_cap_ms: u64,
    /// Consecutive failures that open the circuit (1 to 1000).
    pub breaker_failures: u32,
    /// How long the circuit stays open before a probe, ms (10 to 3,600,000; doubles per failed probe).
    pub breaker_open_ms: u64,
    /// Ceiling of the open time, ms.
    pub breaker_max_open_ms: u64,
    /// Requests in flight per connector (1 to 64).
    pub concurrency: usize,
    /// Idle poll of the outbox, ms (1 to 10,000).
    pub poll_ms: u64,
}

impl Default for DeliverySection {
    fn default() -> Self {
        let p = DeliveryPolicy::default();
        DeliverySection {
            max_batch: p.max_batch,
            max_bytes: p.max_bytes,
            linger_ms: p.linger.as_millis() as u64,
            max_attempts: p.max_attempts,
            timeout_ms: p.timeout.as_millis() as u64,
            backoff_base_ms: p.backoff.base.as_millis() as u64,
            backoff_cap_ms: p.backoff.cap.as_millis() as u64,
            breaker_failures: p.breaker.failures,
            breaker_open_ms: p.breaker.open_for.as_millis() as u64,
            breaker_max_open_ms: p.breaker.max_open_for.as_millis() as u64,
            concurrency: p.concurrency,
            poll_ms: 100,
        }
    }
}

/// Where a credential comes from: Secrets Manager (`secret_id`), a file, an environment
/// variable, or (for local tests only) the config itself. The value is never logged.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialSource {
    /// Secrets Manager secret id or ARN (its `SecretString`).
    pub secret_id: Option<String>,
    /// A file holding the value.
    pub file: Option<PathBuf>,
    /// An environment variable holding the value.
    pub env: Option<String>,
    /// The value itself (local testing).
    pub value: Option<String>,
}

impl CredentialSource {
    fn is_set(&self) -> bool {
        self.secret_id.is_some() || self.file.is_some() || self.env.is_some() || self.value.is_some()
    }

    /// Reads the credential (empty when none is configured).
    pub async fn load(&self, what: &str) -> anyhow::Result<Secret> {
        let value = if let Some(id) = &self.secret_id {
            let endpoint = std::env::var("SECRETSMANAGER_ENDPOINT").ok();
            let client = crate::ingest::webhook::secrets_client(endpoint.as_deref()).await;
            let out = client
                .get_secret_value()
                .secret_id(id)
                .send()
                .await
                .with_context(|| format!("{what}: reading secret {id}"))?;
            out.secret_string()
                .map(str::to_string)
                .with_context(|| format!("{what}: secret {id} has no SecretString"))?
        } else if let Some(path) = &self.file {
            std::fs::read_to_string(path).with_context(|| format!("{what}: reading {}", path.display()))?
        } else if let Some(var) = &self.env {
            std::env::var(var).with_context(|| format!("{what}: environment variable {var} is not set"))?
        } else {
            self.value.clone().unwrap_or_default()
        };
        Ok(Secret::new(value.trim().to_string()))
    }

    /// Loads the credential and, when it comes from Secrets Manager or a file, re-reads it every
    /// `every` so a rotated token (OAuth access tokens live under an hour) reaches the running
    /// connectors; a failed re-read keeps the old value.
    pub async fn load_and_refresh(&self, what: &'static str, every: Duration) -> anyhow::Result<Secret> {
        let secret = self.load(what).await?;
        if self.secret_id.is_some() || self.file.is_some() {
            let (source, shared) = (self.clone(), secret.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    match source.load(what).await {
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
}

/// `[connectors.alerts_webhook]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhookSection {
    /// Endpoint; unset = off.
    pub url: Option<String>,
    /// The signing secret (`whsec_<base64>`).
    pub secret: CredentialSource,
}

/// `[connectors.manufacturer]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ManufacturerSection {
    /// API base URL; unset = off.
    pub url: Option<String>,
    /// Bearer token (optional).
    pub token: CredentialSource,
    /// How long catalogue answers (lead times) are cached, s (0 to 86,400).
    pub cache_ttl_s: u64,
    /// How often changed stock levels are sent, s (1 to 86,400; 0 = off).
    pub stock_sync_interval_s: u64,
}

impl Default for ManufacturerSection {
    fn default() -> Self {
        ManufacturerSection {
            url: None,
            token: CredentialSource::default(),
            cache_ttl_s: 3600,
            stock_sync_interval_s: 900,
        }
    }
}

/// `[connectors.accounting]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccountingSection {
    /// `generic`, `quickbooks` or `xero`.
    pub shape: String,
    /// Base URL (generic: the journal API; QuickBooks: `https://quickbooks.api.intuit.com`;
    /// Xero: `https://api.xero.com`); unset = off.
    pub url: Option<String>,
    /// QuickBooks company (realm) id.
    pub realm_id: Option<String>,
    /// QuickBooks `minorversion`.
    pub minor_version: u32,
    /// Xero tenant id.
    pub tenant_id: Option<String>,
    /// The books' currency: Xero's organisation base currency, QuickBooks' home currency.
    /// Journals in another currency are dead-lettered with the reason (Xero always; QuickBooks
    /// unless `multi_currency`).
    pub base_currency: String,
    /// QuickBooks: the company has multicurrency on (journals carry their `CurrencyRef`).
    pub multi_currency: bool,
    /// OAuth 2 access token (refreshed outside stockflow; from Secrets Manager or a file it is
    /// re-read every 5 minutes).
    pub token: CredentialSource,
    /// Account debited with COGS.
    pub cogs_account: String,
    /// Inventory asset account.
    pub inventory_account: String,
    /// Received-not-invoiced clearing account.
    pub clearing_account: String,
    /// `summary` (one journal per period and currency, the default) or `per_effect` (one per
    /// shipment or receipt).
    pub posting: String,
    /// Summary period: `1d` (default) or `1h`.
    pub period: String,
    /// The seller's time zone (IANA name) where summary periods begin and end.
    pub time_zone: String,
}

impl AccountingSection {
    /// The summary policy (`None` for per-effect posting); `lateness_ms` is the engine's.
    pub fn summary(&self, lateness_ms: i64) -> anyhow::Result<Option<SummaryPolicy>> {
        match self.posting.as_str() {
            "per_effect" => Ok(None),
            "summary" => {
                let period =
                    PeriodLen::parse(&self.period).map_err(|e| anyhow::anyhow!("connectors.accounting.period: {e}"))?;
                let policy = SummaryPolicy::new(period, &self.time_zone, lateness_ms)
                    .map_err(|e| anyhow::anyhow!("connectors.accounting.time_zone: {e}"))?;
                Ok(Some(policy))
            }
            other => bail!("connectors.accounting.posting = {other:?}: must be \"summary\" or \"per_effect\""),
        }
    }
}

impl Default for AccountingSection {
    fn default() -> Self {
        AccountingSection {
            shape: "generic".into(),
            url: None,
            realm_id: None,
            minor_version: 75,
            tenant_id: None,
            base_currency: "USD".into(),
            multi_currency: false,
            token: CredentialSource::default(),
            cogs_account: "5000".into(),
            inventory_account: "1300".into(),
            clearing_account: "2100".into(),
            posting: "summary".into(),
            period: "1d".into(),
            time_zone: "UTC".into(),
        }
    }
}

impl DeliverySection {
    /// Checks ranges and builds the policy.
    pub fn policy(&self) -> anyhow::Result<DeliveryPolicy> {
        let check = |name: &str, v: u64, lo: u64, hi: u64| {
            crate::runtime::config::in_range(&format!("connectors.delivery.{name}"), v, lo, hi)
        };
        check("max_batch", self.max_batch as u64, 1, 1000)?;
        check("max_bytes", self.max_bytes as u64, 1024, 350_000)?;
        check("linger_ms", self.linger_ms, 0, 60_000)?;
        check("max_attempts", self.max_attempts.into(), 1, 1_000_000)?;
        check("timeout_ms", self.timeout_ms, 50, 120_000)?;
        check("backoff_base_ms", self.backoff_base_ms, 1, 60_000)?;
        check("backoff_cap_ms", self.backoff_cap_ms, self.backoff_base_ms, 3_600_000)?;
        check("breaker_failures", self.breaker_failures.into(), 1, 1000)?;
        check("breaker_open_ms", self.breaker_open_ms, 10, 3_600_000)?;
        check("breaker_max_open_ms", self.breaker_max_open_ms, self.breaker_open_ms, 86_400_000)?;
        check("concurrency", self.concurrency as u64, 1, 64)?;
        check("poll_ms", self.poll_ms, 1, 10_000)?;
        let ms = Duration::from_millis;
        Ok(DeliveryPolicy {
            max_batch: self.max_batch,
            max_bytes: self.max_bytes,
            linger: ms(self.linger_ms),
            max_attempts: self.max_attempts,
            timeout: ms(self.timeout_ms),
            backoff: BackoffConfig { base: ms(self.backoff_base_ms), cap: ms(self.backoff_cap_ms) },
            breaker: BreakerConfig {
                failures: self.breaker_failures,
                open_for: ms(self.breaker_open_ms),
                max_open_for: ms(self.breaker_max_open_ms),
            },
            rate: None,
            concurrency: self.concurrency,
        })
    }
}

impl ConnectorsSection {
    /// Names of the connectors this section turns on (the drain cursors' keys), without
    /// building them or reading credentials.
    pub fn names(&self) -> Vec<&'static str> {
        let mut v = vec!["feed"];
        if self.log {
            v.push("log");
        }
        if self.alerts_webhook.url.is_some() {
            v.push("alerts-webhook");
        }
        if self.manufacturer.url.is_some() {
            v.push("manufacturer");
        }
        if self.accounting.url.is_some() {
            v.push("accounting");
        }
        v
    }

    /// Checks the section without reading credentials (config validation).
    pub fn validate(&self) -> anyhow::Result<()> {
        self.delivery.policy()?;
        if self.alerts_webhook.url.is_some() && !self.alerts_webhook.secret.is_set() {
            bail!("connectors.alerts_webhook.secret: required with a url (receivers verify the signature)");
        }
        if self.manufacturer.cache_ttl_s > 86_400 || self.manufacturer.stock_sync_interval_s > 86_400 {
            bail!("connectors.manufacturer: cache_ttl_s and stock_sync_interval_s must be at most 86400");
        }
        let a = &self.accounting;
        match a.shape.as_str() {
            "generic" => {}
            "quickbooks" if a.url.is_some() && a.realm_id.is_none() => {
                bail!("connectors.accounting.realm_id: required for quickbooks")
            }
            "quickbooks" => {}
            "xero" if a.url.is_some() && a.tenant_id.is_none() => {
                bail!("connectors.accounting.tenant_id: required for xero")
            }
            "xero" => {
                Currency::parse(&a.base_currency).with_context(|| {
                    format!("connectors.accounting.base_currency = {:?}: an ISO 4217 code", a.base_currency)
                })?;
            }
            other => bail!("connectors.accounting.shape = {other:?}: must be \"generic\", \"quickbooks\" or \"xero\""),
        }
        a.summary(0)?;
        Ok(())
    }
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
                    cfg.alerts_webhook.secret.load_and_refresh("connectors.alerts_webhook.secret", REFRESH).await?;
                let hook = AlertWebhook::new(url.clone(), secret, policy.clone())
                    .map_err(|e| anyhow::anyhow!("connectors.alerts_webhook.secret: {e}"))?;
                Some(Arc::new(hook))
            }
            None => None,
        };
        let m = &cfg.manufacturer;
        let manufacturer = match &m.url {
            Some(url) => {
                let token = m.token.load_and_refresh("connectors.manufacturer.token", REFRESH).await?;
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
                let shape = match a.shape.as_str() {
                    "quickbooks" => Shape::QuickBooks {
                        base: url.clone(),
                        realm_id: a.realm_id.clone().unwrap_or_default(),
                        minor_version: a.minor_version,
                        home_currency: Currency::parse(&a.base_currency).unwrap_or(Currency::USD),
                        multi_currency: a.multi_currency,
                    },
                    "xero" => Shape::Xero {
                        base: url.clone(),
                        tenant_id: a.tenant_id.clone().unwrap_or_default(),
                        base_currency: Currency::parse(&a.base_currency).unwrap_or(Currency::USD),
                    },
                    _ => Shape::Generic { url: url.clone() },
                };
                let accounts = Accounts {
                    cogs: a.cogs_account.clone(),
                    inventory: a.inventory_account.clone(),
                    clearing: a.clearing_account.clone(),
                };
                let token = a.token.load_and_refresh("connectors.accounting.token", REFRESH).await?;
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
