//! Alert sinks: the structured log, the dashboard's live feed, and a signed webhook (Standard
//! Webhooks: `webhook-id` = the batch's idempotency key, so a receiver dedupes re-sends).

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use hyper::Method;
use hyper::body::Bytes;
use serde::{Deserialize, Serialize};
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

fn parse_alerts(request: &Request) -> Result<Vec<Effect>, DeliveryError> {
    serde_json::from_str::<AlertBatch<Effect>>(&request.body)
        .map(|b| b.alerts)
        .map_err(|e| DeliveryError::Rejected(format!("not an alert batch: {e}")))
}

/// Writes alerts to the structured log (`tracing`), at INFO under their own target
/// [`ALERT_LOG_TARGET`]: an oversell is business news, not a fault of stockflow, so it must not
/// bury real warnings (route or silence it with `STOCKFLOW_LOG=…,stockflow::alerts=off`).
/// The log target of alerts.
pub const ALERT_LOG_TARGET: &str = "stockflow::alerts";

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
        for effect in parse_alerts(request)? {
            match &effect {
                Effect::Oversell(a) => tracing::info!(
                    target: "stockflow::alerts",
                    alert_id = %a.alert_id, sku = %a.sku, order_id = ?a.order_id, shortfall = a.shortfall,
                    available_before = a.available_before, cause = ?a.cause, "oversell"
                ),
                Effect::LowStock(a) => tracing::info!(
                    target: "stockflow::alerts",
                    alert_id = %a.alert_id, sku = %a.sku, available = a.available, reorder_point = a.reorder_point,
                    "low stock"
                ),
                _ => continue,
            }
            metrics::counter!("stockflow_alerts_delivered_total", "sink" => "log", "kind" => effect.kind_label())
                .increment(1);
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
        for effect in parse_alerts(request)? {
            // No subscriber is not a failure: nobody is watching.
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
