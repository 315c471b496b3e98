//! `EffectSink`: one destination for effects, and the log sink.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};

use stockflow_state::Effect;

/// A delivery failure. Transient ones are retried with backoff; permanent ones move the effect
/// to the connector's dead letters.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    /// The receiver is unavailable or throttling: retry later.
    #[error("receiver unavailable: {0}")]
    Transient(String),
    /// The receiver rejected the effect: retrying will not help.
    #[error("receiver rejected the effect: {0}")]
    Rejected(String),
}

/// A destination for effects. `deliver` must be idempotent per effect id: effects are delivered
/// at least once.
pub trait EffectSink: Send + Sync {
    /// A low-cardinality name for metrics and logs.
    fn name(&self) -> &'static str;

    /// True for the effects this sink takes.
    fn accepts(&self, effect: &Effect) -> bool;

    /// Delivers a batch (all accepted by [`EffectSink::accepts`]).
    fn deliver(&self, batch: &[Effect]) -> impl Future<Output = Result<(), DeliveryError>> + Send;
}

/// Writes alerts to the structured log (`tracing`), counting them.
#[derive(Debug, Default)]
pub struct LogSink {
    delivered: AtomicU64,
}

impl LogSink {
    /// Alerts written so far.
    pub fn delivered(&self) -> u64 {
        self.delivered.load(Ordering::Relaxed)
    }
}

impl EffectSink for LogSink {
    fn name(&self) -> &'static str {
        "log"
    }

    fn accepts(&self, effect: &Effect) -> bool {
        effect.is_alert()
    }

    async fn deliver(&self, batch: &[Effect]) -> Result<(), DeliveryError> {
        for effect in batch {
            match effect {
                Effect::Oversell(a) => tracing::warn!(
                    alert_id = %a.alert_id, sku = %a.sku, order_id = ?a.order_id, shortfall = a.shortfall,
                    available_before = a.available_before, cause = ?a.cause, "oversell"
                ),
                Effect::LowStock(a) => tracing::info!(
                    alert_id = %a.alert_id, sku = %a.sku, available = a.available, reorder_point = a.reorder_point,
                    "low stock"
                ),
                _ => continue,
            }
            metrics::counter!("stockflow_alerts_delivered_total", "sink" => "log", "kind" => effect.kind_label())
                .increment(1);
            self.delivered.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stockflow_state::effects::{JournalKind, JournalLine, OversellAlert, OversellCause};
    use stockflow_state::money::Currency;

    #[tokio::test]
    async fn the_log_sink_takes_alerts_only() {
        let alert = Effect::Oversell(OversellAlert {
            alert_id: "oversell:e1".into(),
            sku: "S".into(),
            order_id: Some("o".into()),
            requested: 2,
            available_before: 1,
            shortfall: 1,
            cause: OversellCause::Order,
            ts: 0,
        });
        let journal = Effect::Journal(JournalLine {
            entry_id: "cogs:e2".into(),
            sku: "S".into(),
            kind: JournalKind::Cogs,
            qty: 1,
            unit_cost: 1.into(),
            amount: 1.into(),
            currency: Currency::USD,
            ts: 0,
        });
        let sink = LogSink::default();
        assert!(sink.accepts(&alert) && !sink.accepts(&journal));
        sink.deliver(std::slice::from_ref(&alert)).await.unwrap();
        assert_eq!(sink.delivered(), 1);
    }
}
