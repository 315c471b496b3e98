//! Alert sinks: the structured log, the dashboard's live feed, and a signed webhook (Standard
//! Webhooks: `webhook-id` = the batch's idempotency key, so a receiver dedupes re-sends).

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use hyper::Method;
use hyper::body::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sha2::Sha256;
use stockflow_state::Effect;
use stockflow_state::effects::{EffectKind, EffectKinds};
use stockflow_state::outbox::Request;
use tokio::sync::broadcast;

use crate::connector::{Connector, Delivered, DeliveryError, HttpClient, Secret, classify, request_key};
use crate::policy::DeliveryPolicy;

/// The body of an alert request: `{"type":"stockflow.alerts","alerts":[…]}`.
#[derive(Debug, Serialize, Deserialize)]
pub struct AlertBatch<E> {
    /// Always `stockflow.alerts`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The alerts, in outbox order (oversell and low-stock effects as stored).
    pub alerts: Vec<E>,
}

fn render_alerts(name: &str, batch: &[&Effect]) -> Result<Request, DeliveryError> {
    let ids: Vec<&str> = batch.iter().map(|e| e.id()).collect();
    let body = serde_json::to_string(&AlertBatch { kind: "stockflow.alerts".into(), alerts: batch.to_vec() })
        .map_err(|e| DeliveryError::Rejected(e.to_string()))?;
    Ok(Request { key: request_key(name, &ids), body, items: ids.into_iter().map(str::to_string).collect() })
}

/// The alerts of a rendered batch, each left as its JSON text: the in-process sinks decode only
/// what they use (the log sink nothing but the kind while its target is off, the feed nothing
/// while no one subscribes), and what they decode skips serde's buffered tagged-enum path
/// ([`Effect::from_json`]).
fn batch_alerts(request: &Request) -> Result<Vec<&RawValue>, DeliveryError> {
    serde_json::from_str::<AlertBatch<&RawValue>>(&request.body)
        .map(|b| b.alerts)
        .map_err(|e| DeliveryError::Rejected(format!("not an alert batch: {e}")))
}

fn decode_alert(alert: &RawValue) -> Result<Effect, DeliveryError> {
    Effect::from_json(alert.get().as_bytes()).map_err(|e| DeliveryError::Rejected(format!("not an alert: {e}")))
}

fn log_alert(effect: &Effect) {
    match effect {
        Effect::Oversell(a) => tracing::info!(
            target: ALERT_LOG_TARGET,
            alert_id = %a.alert_id, sku = %a.sku, order_id = ?a.order_id, shortfall = a.shortfall,
            available_before = a.available_before, cause = ?a.cause, "oversell"
        ),
        Effect::LowStock(a) => tracing::info!(
            target: ALERT_LOG_TARGET,
            alert_id = %a.alert_id, sku = %a.sku, available = a.available, reorder_point = a.reorder_point,
            "low stock"
        ),
        _ => {}
    }
}

/// The log target of alerts.
pub const ALERT_LOG_TARGET: &str = "stockflow::alerts";

/// Writes alerts to the structured log (`tracing`), at INFO under their own target
/// [`ALERT_LOG_TARGET`]: an oversell is business news, not a fault of stockflow, so it must not
/// bury real warnings (route or silence it with `STOCKFLOW_LOG=…,stockflow::alerts=off`).
#[derive(Debug)]
pub struct LogSink {
    policy: DeliveryPolicy,
}

impl Default for LogSink {
    fn default() -> Self {
        LogSink { policy: DeliveryPolicy { max_batch: 500, linger: Duration::ZERO, ..DeliveryPolicy::default() } }
    }
}

impl Connector for LogSink {
    fn name(&self) -> &'static str {
        "log"
    }

    fn kinds(&self) -> EffectKinds {
        EffectKinds::ALERTS
    }

    fn policy(&self) -> &DeliveryPolicy {
        &self.policy
    }

    async fn render(&self, batch: &[&Effect]) -> Result<Request, DeliveryError> {
        render_alerts(self.name(), batch)
    }

    async fn send(&self, request: &Request) -> Result<Delivered, DeliveryError> {
        // Every alert is read before any is logged or counted: a batch that fails is retried
        // whole, and must not have logged half of itself first.
        let alerts = batch_alerts(request)?;
        let kinds: Vec<EffectKind> = if tracing::enabled!(target: ALERT_LOG_TARGET, tracing::Level::INFO) {
            let effects = alerts.into_iter().map(decode_alert).collect::<Result<Vec<_>, _>>()?;
            effects.iter().for_each(log_alert);
            effects.iter().map(Effect::kind).collect()
        } else {
            let kind = |a: &RawValue| {
                EffectKind::of_json(a.get().as_bytes()).map_or_else(|| decode_alert(a).map(|e| e.kind()), Ok)
            };
            alerts.into_iter().map(kind).collect::<Result<_, _>>()?
        };
        // One counter update per kind and batch, not a registry lookup per alert.
        for kind in [EffectKind::Oversell, EffectKind::LowStock] {
            let n = kinds.iter().filter(|&&k| k == kind).count() as u64;
            if n > 0 {
                metrics::counter!("stockflow_alerts_delivered_total", "sink" => "log", "kind" => kind.label())
                    .increment(n);
            }
        }
        Ok(Delivered::default())
    }
}

/// Publishes oversell alerts to in-process subscribers (the dashboard's live feed). Lagging
/// subscribers miss alerts (they re-read the store); the feed itself never blocks delivery.
#[derive(Debug)]
pub struct AlertFeed {
    tx: broadcast::Sender<Effect>,
    policy: DeliveryPolicy,
}

impl AlertFeed {
    /// A feed keeping up to `capacity` alerts for slow subscribers.
    pub fn new(capacity: usize) -> Self {
        let (tx, _) = broadcast::channel(capacity.max(1));
        AlertFeed { tx, policy: DeliveryPolicy { max_batch: 500, linger: Duration::ZERO, ..DeliveryPolicy::default() } }
    }

    /// A new subscriber.
    pub fn subscribe(&self) -> broadcast::Receiver<Effect> {
        self.tx.subscribe()
    }
}

impl Connector for AlertFeed {
    fn name(&self) -> &'static str {
        "feed"
    }

    fn kinds(&self) -> EffectKinds {
        EffectKinds::of(EffectKind::Oversell)
    }

    fn policy(&self) -> &DeliveryPolicy {
        &self.policy
    }

    async fn render(&self, batch: &[&Effect]) -> Result<Request, DeliveryError> {
        render_alerts(self.name(), batch)
    }

    async fn send(&self, request: &Request) -> Result<Delivered, DeliveryError> {
        // No subscriber is not a failure: nobody is watching, and nothing need be decoded.
        if self.tx.receiver_count() == 0 {
            return Ok(Delivered::default());
        }
        // All decoded before any is published: a failed batch is retried whole.
        let effects = batch_alerts(request)?.into_iter().map(decode_alert).collect::<Result<Vec<_>, _>>()?;
        for effect in effects {
            let _ = self.tx.send(effect);
        }
        Ok(Delivered::default())
    }
}

/// Standard Webhooks signature: `v1,` + base64 HMAC-SHA256 of `{id}.{timestamp}.{body}`.
pub fn sign(secret: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body);
    format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
}

/// The three Standard Webhooks headers of a request signed now: `webhook-id`,
/// `webhook-timestamp`, `webhook-signature`.
pub fn signature_headers(secret: &[u8], id: String, body: &[u8]) -> [(&'static str, String); 3] {
    let ts = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    let signature = sign(secret, &id, ts, body);
    [("webhook-id", id), ("webhook-timestamp", ts.to_string()), ("webhook-signature", signature)]
}

/// Decodes a `whsec_<base64>` (or raw base64) signing secret of at least 16 bytes.
pub fn decode_secret(secret: &str) -> Result<Vec<u8>, String> {
    let s = secret.trim();
    let key = STANDARD.decode(s.strip_prefix("whsec_").unwrap_or(s)).map_err(|_| "not base64")?;
    if key.len() < 16 {
        return Err("shorter than 16 bytes".into());
    }
    Ok(key)
}

/// POSTs alert batches to a URL, signed with Standard Webhooks headers.
#[derive(Debug)]
pub struct AlertWebhook {
    url: String,
    secret: Secret,
    http: HttpClient,
    policy: DeliveryPolicy,
}

impl AlertWebhook {
    /// A webhook to `url` signed with `secret` (`whsec_…`).
    pub fn new(url: String, secret: Secret, policy: DeliveryPolicy) -> Result<Self, String> {
        decode_secret(&secret.expose())?;
        Ok(AlertWebhook { url, secret, http: HttpClient::new(policy.timeout), policy })
    }

    /// Sends one alert that does not come from the outbox (a reconciliation's), as a batch of
    /// one under the webhook id `id` (the receiver dedupes re-sends by it): `alert` must carry
    /// `alert_id`. Retried with the policy's backoff while the failure is transient or throttled,
    /// at most `attempts` times.
    pub async fn notify(&self, id: &str, alert: serde_json::Value, attempts: u32) -> Result<(), DeliveryError> {
        let body = serde_json::json!({"type": "stockflow.alerts", "alerts": [alert]}).to_string();
        let key = decode_secret(&self.secret.expose()).map_err(DeliveryError::Rejected)?;
        let mut backoff = stockflow_state::retry::Backoff::from_clock(self.policy.backoff).limited(attempts.max(1) - 1);
        loop {
            let headers = signature_headers(&key, id.to_string(), body.as_bytes());
            let sent = self.http.send(Method::POST, &self.url, &headers, Bytes::from(body.clone())).await;
            let err = match sent.and_then(|resp| classify(resp, Duration::from_secs(5))) {
                Ok(_) => return Ok(()),
                Err(DeliveryError::Rejected(m)) => return Err(DeliveryError::Rejected(m)),
                Err(e) => e,
            };
            let wait = match &err {
                DeliveryError::Transient { retry_after, .. } | DeliveryError::Throttled { retry_after, .. } => {
                    *retry_after
                }
                DeliveryError::Rejected(_) => None,
            };
            let Some(delay) = backoff.next_delay() else { return Err(err) };
            tokio::time::sleep(wait.unwrap_or(delay).min(Duration::from_secs(60))).await;
        }
    }
}

impl Connector for AlertWebhook {
    fn name(&self) -> &'static str {
        "alerts-webhook"
    }

    fn kinds(&self) -> EffectKinds {
        EffectKinds::ALERTS
    }

    fn policy(&self) -> &DeliveryPolicy {
        &self.policy
    }

    async fn render(&self, batch: &[&Effect]) -> Result<Request, DeliveryError> {
        render_alerts(self.name(), batch)
    }

    async fn send(&self, request: &Request) -> Result<Delivered, DeliveryError> {
        let key = decode_secret(&self.secret.expose()).map_err(DeliveryError::Rejected)?;
        let headers = signature_headers(&key, request.key.clone(), request.body.as_bytes());
        let resp =
            self.http.send(Method::POST, &self.url, &headers, Bytes::from(request.body.clone().into_bytes())).await?;
        classify(resp, Duration::from_secs(5))?;
        Ok(Delivered::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    /// Effects as the engine stores them (JSON, the tag first), decoded by serde's general path.
    fn effects(json: &[&str]) -> serde_json::Result<Vec<Effect>> {
        json.iter().map(|j| serde_json::from_str(j)).collect()
    }

    /// `effects` rendered by `sink` into one request.
    async fn rendered(sink: &impl Connector, effects: &[Effect]) -> Result<Request, DeliveryError> {
        sink.render(&effects.iter().collect::<Vec<_>>()).await
    }

    const OVERSELL: &str = r#"{"effect":"oversell","alert_id":"oversell:e1","sku":"SKU \"quoted\"","order_id":"o-1","requested":3,"available_before":1,"shortfall":2,"cause":"order","ts":1}"#;
    const LOW_STOCK: &str =
        r#"{"effect":"low_stock","alert_id":"low_stock:e2","sku":"B","available":1,"reorder_point":5,"ts":2}"#;
    const REORDER: &str = r#"{"effect":"reorder","request_id":"reorder:e2","sku":"B","available":1,"reorder_point":5,"units_ordered_24h":9,"ts":2}"#;

    #[tokio::test]
    async fn the_feed_hands_subscribers_the_alerts_as_rendered_and_needs_none() -> TestResult {
        let feed = AlertFeed::new(8);
        let effects = effects(&[OVERSELL, LOW_STOCK])?;
        let request = rendered(&feed, &effects).await?;
        assert!(feed.send(&request).await.is_ok(), "no subscriber is not a failure");
        let mut rx = feed.subscribe();
        feed.send(&request).await?;
        for want in &effects {
            assert_eq!(&rx.try_recv()?, want);
        }
        assert!(rx.try_recv().is_err(), "one delivery per alert");
        let body = format!(r#"{{"type":"stockflow.alerts","alerts":[{LOW_STOCK},{{"effect":"oversell"}}]}}"#);
        let bad = Request { body, ..request };
        assert!(matches!(feed.send(&bad).await, Err(DeliveryError::Rejected(e)) if e.contains("not an alert")));
        assert!(rx.try_recv().is_err(), "a batch that fails publishes none of its alerts");
        Ok(())
    }

    /// Counts the events logged under [`ALERT_LOG_TARGET`].
    struct AlertLog(std::sync::Arc<std::sync::atomic::AtomicUsize>);

    impl tracing::Subscriber for AlertLog {
        fn enabled(&self, meta: &tracing::Metadata<'_>) -> bool {
            meta.target() == ALERT_LOG_TARGET
        }
        fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
            tracing::span::Id::from_u64(1)
        }
        fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
        fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
        fn event(&self, _: &tracing::Event<'_>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        fn enter(&self, _: &tracing::span::Id) {}
        fn exit(&self, _: &tracing::span::Id) {}
    }

    #[tokio::test(flavor = "current_thread")]
    async fn the_log_sink_logs_each_alert_once_and_nothing_of_a_bad_batch() -> TestResult {
        let logged = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let _default = tracing::subscriber::set_default(AlertLog(logged.clone()));
        let sink = LogSink::default();
        let request = rendered(&sink, &effects(&[OVERSELL, LOW_STOCK])?).await?;
        sink.send(&request).await?;
        assert_eq!(logged.load(std::sync::atomic::Ordering::SeqCst), 2, "one line per alert");
        let body = format!(r#"{{"type":"stockflow.alerts","alerts":[{OVERSELL},{{"effect":"low_stock"}}]}}"#);
        assert!(sink.send(&Request { body, ..request }).await.is_err());
        assert_eq!(logged.load(std::sync::atomic::Ordering::SeqCst), 2, "a batch that fails logs nothing");
        Ok(())
    }

    #[tokio::test]
    async fn the_log_sink_refuses_what_is_not_an_alert_batch() -> TestResult {
        let sink = LogSink::default();
        let request = rendered(&sink, &effects(&[OVERSELL, LOW_STOCK, REORDER])?).await?;
        assert!(sink.send(&request).await.is_ok());
        let bad = Request { body: "[1,2]".into(), ..request };
        assert!(matches!(sink.send(&bad).await, Err(DeliveryError::Rejected(e)) if e.contains("not an alert batch")));
        Ok(())
    }
}
