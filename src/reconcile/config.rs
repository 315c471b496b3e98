//! `[reconcile]`: where Amazon's inventory is read, the thresholds past which a run alerts, and
//! how the books are compared (docs/reconcile.md).

use std::path::PathBuf;

use anyhow::{Context, bail};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use stockflow_connectors::config::CredentialSource;

use super::report::Thresholds;

/// `[reconcile]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReconcileSection {
    /// The marketplace compared (default: `ingest.marketplace_id`).
    pub marketplace_id: Option<String>,
    /// The Selling Partner API's regional endpoint.
    pub endpoint: String,
    /// Login with Amazon's token endpoint.
    pub lwa_endpoint: String,
    /// The LWA credentials: a JSON object `{"client_id", "client_secret", "refresh_token"}`
    /// (one Secrets Manager secret in a deployment).
    pub credentials: CredentialSource,
    /// Ledger reports: only rows of this `Location` (country code) count.
    pub ledger_location: Option<String>,
    /// Σ |unexplained units| above this alerts.
    pub max_unexplained_units: i64,
    /// Σ |unexplained value| above this alerts (decimal string).
    pub max_unexplained_value: Decimal,
    /// |inventory or COGS difference with the books| above this alerts (decimal string).
    pub max_book_difference: Decimal,
    /// COGS are compared from this date (`YYYY-MM-DD`): the day stockflow began booking.
    pub books_since: String,
    /// Inventory value in the books that stockflow never booked (opening stock), decimal string.
    pub opening_inventory_value: Decimal,
    /// Where reports are written (default: `{data_dir}/reconcile`).
    pub out_dir: Option<PathBuf>,
    /// Timeout of one HTTP request, ms.
    pub timeout_ms: u64,
}

impl Default for ReconcileSection {
    fn default() -> Self {
        ReconcileSection {
            marketplace_id: None,
            endpoint: stockflow_connectors::amazon::inventory::ENDPOINT_NA.into(),
            lwa_endpoint: stockflow_connectors::amazon::lwa::LWA_ENDPOINT.into(),
            credentials: CredentialSource::default(),
            ledger_location: None,
            max_unexplained_units: 0,
            max_unexplained_value: Decimal::ZERO,
            max_book_difference: Decimal::ONE,
            books_since: "2000-01-01".into(),
            opening_inventory_value: Decimal::ZERO,
            out_dir: None,
            timeout_ms: 30_000,
        }
    }
}

impl ReconcileSection {
    /// Checks the section.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.max_unexplained_units < 0
            || self.max_unexplained_value < Decimal::ZERO
            || self.max_book_difference < Decimal::ZERO
        {
            bail!("reconcile thresholds must not be negative");
        }
        self.books_since
            .parse::<jiff::civil::Date>()
            .with_context(|| format!("reconcile.books_since = {:?}: expected YYYY-MM-DD", self.books_since))?;
        stockflow_connectors::config::in_range("reconcile.timeout_ms", self.timeout_ms, 1_000, 300_000)
            .map_err(|e| anyhow::anyhow!(e.0))?;
        for (name, url) in [("endpoint", &self.endpoint), ("lwa_endpoint", &self.lwa_endpoint)] {
            if !(url.starts_with("https://")
                || url.starts_with("http://127.0.0.1")
                || url.starts_with("http://localhost"))
            {
                bail!("reconcile.{name} = {url:?}: must be https (or http on loopback, for tests)");
            }
        }
        Ok(())
    }

    /// The thresholds.
    pub fn thresholds(&self) -> Thresholds {
        Thresholds {
            max_unexplained_units: self.max_unexplained_units,
            max_unexplained_value: self.max_unexplained_value,
            max_book_difference: self.max_book_difference,
        }
    }
}
