//! The `[connectors]` configuration section: what a seller writes in the TOML file (or the
//! environment), parsed into typed values — a bad shape, posting policy or period is refused when
//! the file is read, naming the field — and validated into [`DeliveryPolicy`]s and a
//! [`SummaryPolicy`]. Reading credentials is the binary's business (Secrets Manager, files,
//! environment); this module only says where they are.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};
use stockflow_state::money::Currency;

use crate::journals::{PeriodLen, SummaryPolicy};
use crate::policy::{BackoffConfig, BreakerConfig, DeliveryPolicy};

/// A configuration value out of its range or inconsistent with another; the message names the
/// field (`connectors.delivery.max_batch = 0: must be 1 to 1000`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

macro_rules! bail {
    ($($t:tt)*) => { return Err(ConfigError(format!($($t)*))) };
}

/// `[connectors.accounting] shape`: which accounting API the journals are rendered for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AccountingShape {
    /// stockflow's own JSON journal API (docs/connectors.openapi.json).
    Generic,
    /// QuickBooks Online `JournalEntry` batches.
    Quickbooks,
    /// Xero `ManualJournals`.
    Xero,
}

/// `[connectors.accounting] posting`: how journals are grouped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Posting {
    /// One journal per period and currency (the default).
    Summary,
    /// One journal per shipment or receipt.
    PerEffect,
}

fn period_text<'de, D: Deserializer<'de>>(d: D) -> Result<PeriodLen, D::Error> {
    let s = String::deserialize(d)?;
    PeriodLen::parse(&s).map_err(serde::de::Error::custom)
}

/// An identifier given as a string or as an integer (an all-digit id set from the environment
/// parses as a TOML integer); kept as its decimal text.
fn id_text<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    struct IdText;
    impl serde::de::Visitor<'_> for IdText {
        type Value = Option<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an id as a string or a non-negative integer")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Self::Value, E> {
            u64::try_from(v).map(|v| Some(v.to_string())).map_err(|_| E::custom(format!("id {v} is negative")))
        }
    }
    d.deserialize_any(IdText)
}

/// `lo ≤ v ≤ hi`, or an error naming `name`.
pub fn in_range(name: &str, v: u64, lo: u64, hi: u64) -> Result<(), ConfigError> {
    if (lo..=hi).contains(&v) { Ok(()) } else { bail!("{name} = {v}: must be {lo} to {hi}") }
}

/// `[connectors]`: where effects are delivered. Each HTTP connector is off until its `url` is set.
#[derive(Debug, Clone, Deserialize, Serialize)]
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
#[derive(Debug, Clone, Deserialize, Serialize)]
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
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
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
    /// Whether any source is configured.
    pub fn is_set(&self) -> bool {
        self.secret_id.is_some() || self.file.is_some() || self.env.is_some() || self.value.is_some()
    }
}

/// `[connectors.alerts_webhook]`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhookSection {
    /// Endpoint; unset = off.
    pub url: Option<String>,
    /// The signing secret (`whsec_<base64>`).
    pub secret: CredentialSource,
}

/// `[connectors.manufacturer]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
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
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccountingSection {
    /// `generic`, `quickbooks` or `xero`.
    pub shape: AccountingShape,
    /// Base URL (generic: the journal API; QuickBooks: `https://quickbooks.api.intuit.com`;
    /// Xero: `https://api.xero.com`); unset = off.
    pub url: Option<String>,
    /// QuickBooks company (realm) id — digits, so also accepted as a TOML integer (which is how
    /// `STOCKFLOW__CONNECTORS__ACCOUNTING__REALM_ID=9130354519123456` reads).
    #[serde(deserialize_with = "id_text")]
    pub realm_id: Option<String>,
    /// QuickBooks `minorversion`.
    pub minor_version: u32,
    /// Xero tenant id.
    #[serde(deserialize_with = "id_text")]
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
    pub posting: Posting,
    /// Summary period: `1d` (default) or `1h`.
    #[serde(deserialize_with = "period_text")]
    pub period: PeriodLen,
    /// The seller's time zone (IANA name) where summary periods begin and end.
    pub time_zone: String,
}

impl AccountingSection {
    /// The summary policy (`None` for per-effect posting); `lateness_ms` is the engine's.
    pub fn summary(&self, lateness_ms: i64) -> Result<Option<SummaryPolicy>, ConfigError> {
        match self.posting {
            Posting::PerEffect => Ok(None),
            Posting::Summary => SummaryPolicy::new(self.period, &self.time_zone, lateness_ms)
                .map(Some)
                .map_err(|e| ConfigError(format!("connectors.accounting.time_zone: {e}"))),
        }
    }
}

impl Default for AccountingSection {
    fn default() -> Self {
        AccountingSection {
            shape: AccountingShape::Generic,
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
            posting: Posting::Summary,
            period: PeriodLen::Day,
            time_zone: "UTC".into(),
        }
    }
}

impl DeliverySection {
    /// Checks ranges and builds the policy.
    pub fn policy(&self) -> Result<DeliveryPolicy, ConfigError> {
        let check = |name: &str, v: u64, lo: u64, hi: u64| in_range(&format!("connectors.delivery.{name}"), v, lo, hi);
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
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.delivery.policy()?;
        if self.alerts_webhook.url.is_some() && !self.alerts_webhook.secret.is_set() {
            bail!("connectors.alerts_webhook.secret: required with a url (receivers verify the signature)");
        }
        if self.manufacturer.cache_ttl_s > 86_400 || self.manufacturer.stock_sync_interval_s > 86_400 {
            bail!("connectors.manufacturer: cache_ttl_s and stock_sync_interval_s must be at most 86400");
        }
        let a = &self.accounting;
        match a.shape {
            AccountingShape::Generic => {}
            AccountingShape::Quickbooks if a.url.is_some() && a.realm_id.is_none() => {
                bail!("connectors.accounting.realm_id: required for quickbooks")
            }
            AccountingShape::Quickbooks => {}
            AccountingShape::Xero if a.url.is_some() && a.tenant_id.is_none() => {
                bail!("connectors.accounting.tenant_id: required for xero")
            }
            AccountingShape::Xero => {}
        }
        if Currency::parse(&a.base_currency).is_none() {
            bail!("connectors.accounting.base_currency = {:?}: an ISO 4217 code", a.base_currency);
        }
        a.summary(0)?;
        Ok(())
    }
}
