//! Three-way reconciliation (docs/reconcile.md): Amazon's FBA inventory, stockflow's state and
//! the books, compared as of one instant and explained per SKU.
//!
//! One run ([`Job::run`]): read Amazon's counts (the Inventory API or a ledger report file) →
//! fix the instant (`as_of`: Amazon's newest `lastUpdatedTime`, so a re-run over unchanged
//! Amazon data has the same instant and the same ids) → read every SKU state → classify
//! ([`compare`]) → value against the books → judge the thresholds → with `apply`, put a
//! `stock_counted` event (`recon:{as_of}:{sku}`) for each unexplained SKU Amazon lists → write
//! the report, publish the gauges, alert. Everything but `apply` is read-only.

pub mod compare;
pub mod config;
pub mod report;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use rust_decimal::Decimal;
use stockflow_connectors::accounting::Accounting;
use stockflow_connectors::alerts::{ALERT_LOG_TARGET, AlertWebhook};
use stockflow_connectors::amazon::ledger::LedgerFilter;
use stockflow_connectors::amazon::{FbaCount, InventoryApi};
use stockflow_pipeline::StreamProducer;
use stockflow_pipeline::source::OutRecord;
use stockflow_state::StateStore;

use compare::{Class, Ours, SkuLine};
use report::{Driver, Outcome, Report, Thresholds, ValueCheck};

/// Where Amazon's counts come from.
#[derive(Debug)]
pub enum AmazonSource {
    /// The FBA Inventory API.
    Api(Box<InventoryApi>),
    /// A ledger report file.
    Ledger(PathBuf, LedgerFilter),
}

impl AmazonSource {
    /// The counts and a label for the report.
    pub async fn read(&self) -> anyhow::Result<(Vec<FbaCount>, String)> {
        match self {
            AmazonSource::Api(api) => {
                let counts = api.summaries().await.context("reading Amazon's inventory summaries")?;
                let s = api.stats();
                tracing::info!(
                    skus = counts.len(),
                    pages = s.pages,
                    requests = s.requests,
                    throttled = s.throttled,
                    restarts = s.restarts,
                    "read Amazon's inventory"
                );
                Ok((counts, format!("inventory_api:{}", api.marketplace_id())))
            }
            AmazonSource::Ledger(path, filter) => {
                let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
                let counts = stockflow_connectors::amazon::ledger::parse(&bytes, filter)
                    .with_context(|| format!("reading {}", path.display()))?;
                Ok((counts, format!("ledger:{}", path.display())))
            }
        }
    }
}

/// One configured reconciliation.
#[derive(Debug)]
pub struct Job {
    /// Amazon's side.
    pub amazon: AmazonSource,
    /// The books, when an accounting connector is configured.
    pub books: Option<Arc<Accounting>>,
    /// The signed alert webhook, when configured.
    pub webhook: Option<Arc<AlertWebhook>>,
    /// The books' currency.
    pub currency: String,
    /// `reconcile.books_since`.
    pub books_since: String,
    /// `reconcile.opening_inventory_value`.
    pub opening_value: Decimal,
    /// Thresholds.
    pub thresholds: Thresholds,
    /// Where the report goes.
    pub out_dir: PathBuf,
    /// A fixed instant instead of Amazon's (`--as-of`), epoch ms.
    pub as_of_ms: Option<i64>,
}

/// The canonical `stock_counted` event reconciliation puts for `line`: on_hand is what leaves
/// nothing unexplained — Amazon's count plus the units Amazon's buckets explain (so a partly
/// explained SKU keeps its inbound or sidelined units).
pub fn count_event(as_of: &str, as_of_ms: i64, line: &SkuLine) -> Option<(String, String)> {
    line.amazon_count?;
    let on_hand = line.stockflow_on_hand.checked_sub(line.unexplained_units)?;
    if !(0..=1_000_000_000).contains(&on_hand) {
        return None;
    }
    let id = format!("recon:{as_of}:{}", line.sku);
    let json = serde_json::json!({
        "id": id, "type": "stock_counted", "sku": line.sku, "ts": as_of_ms, "on_hand": on_hand,
        "reason": "reconciliation",
    });
    Some((id, json.to_string()))
}

fn rfc3339(ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms).map(|t| t.to_string()).unwrap_or_else(|_| ms.to_string())
}

impl Job {
    /// One run over `store`; with `producer`, unexplained SKUs are counted on the stream.
    pub async fn run<S: StateStore, P: StreamProducer>(
        &self,
        store: &S,
        stockflow_source: &str,
        producer: Option<&P>,
    ) -> anyhow::Result<Report> {
        let outcome = self.run_inner(store, stockflow_source, producer).await;
        match &outcome {
            Ok(r) => r.record_metrics(),
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "reconciliation failed");
                report::record_outcome("failed");
            }
        }
        outcome
    }

    async fn run_inner<S: StateStore, P: StreamProducer>(
        &self,
        store: &S,
        stockflow_source: &str,
        producer: Option<&P>,
    ) -> anyhow::Result<Report> {
        let (counts, amazon_source) = self.amazon.read().await?;
        // The instant: Amazon's newest numbers, to the second.
        let now_ms = stockflow_state::now_ms();
        // Never later than now: a clock ahead at Amazon must not date counts in the future.
        let as_of_ms = self
            .as_of_ms
            .or_else(|| counts.iter().filter_map(|c| c.last_updated_ms).max())
            .unwrap_or(now_ms)
            .min(now_ms)
            .div_euclid(1000)
            * 1000;
        let as_of = rfc3339(as_of_ms);
        // Only what the comparison needs is kept: the states (order lines, windows) go at once.
        let ours: BTreeMap<String, Ours> = {
            let states = store.sku_states().await.context("reading stockflow's state")?;
            states.iter().map(|(sku, s)| (sku.to_string(), Ours::from(s))).collect()
        };
        let lines = compare::compare(&ours, &counts);
        // The books as of the run's day: stockflow's side is its state now, not at `as_of`.
        let today = rfc3339(now_ms);
        let value = self.value(&ours, &lines, today.get(..10).unwrap_or(&today)).await;
        let mut report = Report {
            as_of: as_of.clone(),
            as_of_ms,
            finished_at: String::new(),
            amazon_source,
            stockflow_source: stockflow_source.to_string(),
            totals: report::Totals::of(&lines),
            value,
            thresholds: self.thresholds.clone(),
            outcome: Outcome::Ok,
            reasons: Vec::new(),
            applied: Vec::new(),
            skus: lines,
        };
        report.judge();
        if let Some(producer) = producer {
            let events: Vec<(String, String, String)> = report
                .skus
                .iter()
                .filter(|l| l.countable)
                .filter_map(|l| count_event(&as_of, as_of_ms, l).map(|(id, json)| (id, l.sku.clone(), json)))
                .collect();
            for chunk in events.chunks(500) {
                let records: Vec<OutRecord<'_>> =
                    chunk.iter().map(|(_, sku, json)| OutRecord { key: sku, payload: json.as_bytes() }).collect();
                producer.put(&records).await.map_err(|e| anyhow::anyhow!("putting the counts on the stream: {e}"))?;
                report.applied.extend(chunk.iter().map(|(id, ..)| id.clone()));
            }
        }
        if report.outcome == Outcome::Discrepancies {
            self.alert(&report).await;
        }
        report.finished_at = rfc3339(stockflow_state::now_ms());
        report.write(&self.out_dir)?;
        Ok(report)
    }

    /// stockflow's value against the books (read as of `date`, `YYYY-MM-DD`).
    async fn value(&self, ours: &BTreeMap<String, Ours>, lines: &[SkuLine], date: &str) -> Option<ValueCheck> {
        let in_currency = |o: &Ours| o.currency.as_deref().is_none_or(|c| c == self.currency);
        let costed = ours.values().any(|o| !o.avg_cost.is_zero());
        if self.books.is_none() && !costed {
            return None;
        }
        let computed_value =
            compare::sum(ours.values().filter(|o| in_currency(o)).map(|o| compare::value(o.on_hand, o.avg_cost)));
        let stockflow_cogs = compare::sum(ours.values().filter(|o| in_currency(o)).map(|o| o.cogs));
        let mut drivers: Vec<Driver> = lines
            .iter()
            .filter(|l| l.class == Class::Unexplained && !l.unexplained_value.is_zero())
            .map(|l| Driver { sku: l.sku.clone(), units: l.unexplained_units, value: l.unexplained_value })
            .collect();
        drivers.sort_by(|a, b| b.value.abs().cmp(&a.value.abs()).then_with(|| a.sku.cmp(&b.sku)));
        drivers.truncate(10);
        let mut check = ValueCheck {
            currency: self.currency.clone(),
            computed_value,
            opening_value: self.opening_value,
            stockflow_cogs,
            books: None,
            book_inventory: None,
            inventory_difference: None,
            book_cogs: None,
            cogs_difference: None,
            since: self.books_since.clone(),
            error: None,
            drivers,
        };
        if let Some(books) = &self.books {
            match books.read_books(&self.books_since, date).await {
                Ok(b) => {
                    check.books = Some(b.source.to_string());
                    check.book_inventory = Some(b.inventory_balance);
                    check.inventory_difference = Some(b.inventory_balance - (computed_value + self.opening_value));
                    check.book_cogs = b.cogs_posted;
                    check.cogs_difference = b.cogs_posted.map(|c| c - stockflow_cogs);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "reading the books failed: the value check is partial");
                    check.error = Some(e.to_string());
                }
            }
        }
        Some(check)
    }

    async fn alert(&self, report: &Report) {
        let id = format!("reconcile:{}", report.as_of);
        let top: Vec<serde_json::Value> = report::worst(&report.skus, 20)
            .into_iter()
            .map(|l| {
                serde_json::json!({"sku": l.sku, "stockflow": l.stockflow_on_hand, "amazon": l.amazon_count,
                "unexplained_units": l.unexplained_units, "unexplained_value": l.unexplained_value.to_string()})
            })
            .collect();
        let alert = serde_json::json!({
            "alert_id": id, "kind": "reconciliation", "as_of": report.as_of,
            "reasons": report.reasons,
            "unexplained_skus": report.totals.count(Class::Unexplained),
            "unexplained_units": report.totals.unexplained_units,
            "unexplained_value": report.totals.unexplained_value.to_string(),
            "inventory_difference": report.value.as_ref().and_then(|v| v.inventory_difference).map(|d| d.to_string()),
            "cogs_difference": report.value.as_ref().and_then(|v| v.cogs_difference).map(|d| d.to_string()),
            "top": top,
        });
        tracing::warn!(target: ALERT_LOG_TARGET, alert_id = %id, reasons = ?report.reasons, "reconciliation found discrepancies");
        if let Some(w) = &self.webhook
            && let Err(e) = w.notify(&id, alert, 5).await
        {
            tracing::error!(error = %e, "the reconciliation alert could not be delivered");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_count_leaves_the_explained_units_in_place() {
        let amazon = FbaCount { sku: "A".into(), fulfillable: 10, inbound: 3, ..FbaCount::default() };
        let ours = Ours { on_hand: 15, avg_cost: Decimal::ONE, ..Ours::default() };
        let line = compare::classify("A", Some(&ours), Some(&amazon));
        assert_eq!((line.class, line.unexplained_units), (Class::Unexplained, 2));
        let (id, json) = count_event("2026-12-01T00:00:00Z", 1_796_083_200_000, &line).unwrap();
        assert_eq!(id, "recon:2026-12-01T00:00:00Z:A");
        let event = stockflow_state::decode(json.as_bytes()).unwrap();
        assert_eq!(event.sku.as_ref(), "A");
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        // Amazon's 10 plus the 3 inbound it explains; the 2 nobody explains are gone.
        assert_eq!(v["on_hand"], 13);
        // An absurd count (past SPEC's 10^9 bound) is not put: it would be a bad record.
        let absurd =
            compare::classify("C", Some(&ours), Some(&FbaCount { fulfillable: 2_000_000_000, ..amazon.clone() }));
        assert!(absurd.countable && count_event("t", 0, &absurd).is_none());
        // A SKU Amazon does not list is never counted.
        let unlisted = compare::classify("B", Some(&ours), None);
        assert!(!unlisted.countable && count_event("t", 0, &unlisted).is_none());
    }
}
