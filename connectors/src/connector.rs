//! The `Connector` trait, delivery errors, idempotency keys, and the HTTP client every HTTP
//! connector sends through (hyper + rustls, a timeout per request, responses classified once).

use std::fmt;
use std::future::Future;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{HeaderMap, Method, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use stockflow_state::Effect;
use stockflow_state::effects::EffectKinds;
use stockflow_state::outbox::Request;

use crate::policy::{DeliveryPolicy, parse_retry_after};

/// A delivery failure, classified by what the drain should do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeliveryError {
    /// The receiver failed or did not answer (5xx, timeout, reset): retry with backoff; counts
    /// as an attempt and as a failure for the circuit breaker.
    #[error("{reason}")]
    Transient {
        /// What happened.
        reason: String,
        /// The receiver's `Retry-After`, if it sent one.
        retry_after: Option<Duration>,
    },
    /// The receiver is rate-limiting (429): wait, then retry; counts as neither.
    #[error("throttled: {reason}")]
    Throttled {
        /// What happened.
        reason: String,
        /// How long to wait (`Retry-After`, or the target's documented wait).
        retry_after: Option<Duration>,
    },
    /// The receiver refused the request (4xx): retrying it will not help.
    #[error("rejected: {0}")]
    Rejected(String),
}

impl DeliveryError {
    /// A transient failure without `Retry-After`.
    pub fn transient(reason: impl Into<String>) -> Self {
        DeliveryError::Transient { reason: reason.into(), retry_after: None }
    }
}

/// How a receiver answered a request that it took.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Delivered {
    /// Items the receiver refused inside an otherwise successful answer (QuickBooks batch
    /// faults, Xero element errors), as `(effect id, reason)`: they are dead-lettered alone.
    pub rejected: Vec<(String, String)>,
}

/// One destination for effects. The drain batches what [`Connector::accepts`], asks the
/// connector to [`render`](Connector::render) a batch into a [`Request`], saves it, and then
/// [`send`](Connector::send)s exactly those bytes until the receiver decides.
pub trait Connector: Send + Sync + 'static {
    /// A low-cardinality name (metrics label, cursor key).
    fn name(&self) -> &'static str;

    /// The kinds of effects this connector delivers (the outbox is read for those only).
    fn kinds(&self) -> EffectKinds;

    /// True for the effects this connector delivers.
    fn accepts(&self, effect: &Effect) -> bool {
        self.kinds().contains(effect.kind())
    }

    /// Batching, retries, limits.
    fn policy(&self) -> &DeliveryPolicy;

    /// Renders a batch into one request. Deterministic for a given batch, except for answers
    /// it may look up (a lead time), which is why the result is saved before it is sent.
    fn render(&self, batch: &[&Effect]) -> impl Future<Output = Result<Request, DeliveryError>> + Send;

    /// Sends a rendered request. Must be safe to repeat: the key makes it idempotent.
    fn send(&self, request: &Request) -> impl Future<Output = Result<Delivered, DeliveryError>> + Send;

    /// `Some` when the connector books summaries per period instead of sending each effect
    /// ([`crate::journals`]): its drain lanes fold, and one poster sends the summaries.
    fn summary(&self) -> Option<&crate::journals::SummaryPolicy> {
        None
    }

    /// Renders a summary journal into one request (only for connectors with a [`Self::summary`]).
    fn render_summary(&self, journal: &crate::journals::SummaryJournal) -> Result<Request, DeliveryError> {
        Err(DeliveryError::Rejected(format!("{} does not post summaries ({})", self.name(), journal.id)))
    }
}

/// The idempotency key of a batch: `sf` + 32 hex digits of xxh3-128 over the connector name
/// and the effect ids. 34 characters: within QuickBooks' batch `requestid` (36), Xero's
/// `Idempotency-Key` (128) and Standard Webhooks' `webhook-id`.
pub fn request_key(connector: &str, items: &[&str]) -> String {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(connector.as_bytes());
    for id in items {
        // Length-prefixed, so no choice of ids can collide by concatenation.
        h.update(&(id.len() as u64).to_le_bytes());
        h.update(id.as_bytes());
    }
    format!("sf{:032x}", h.digest128())
}

/// A credential (bearer token, signing secret). `Debug` and `Display` never show it; it can be
/// replaced while running (a rotated secret re-read from Secrets Manager).
#[derive(Clone, Default)]
pub struct Secret(Arc<RwLock<String>>);

impl Secret {
    /// Wraps a value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(Arc::new(RwLock::new(value.into())))
    }

    /// The value.
    pub fn expose(&self) -> String {
        self.0.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Replaces the value (every clone sees it).
    pub fn replace(&self, value: String) {
        *self.0.write().unwrap_or_else(std::sync::PoisonError::into_inner) = value;
    }

    /// True when no value is set.
    pub fn is_empty(&self) -> bool {
        self.0.read().unwrap_or_else(std::sync::PoisonError::into_inner).is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// An answer read whole.
#[derive(Debug)]
pub struct HttpResponse {
    /// Status.
    pub status: StatusCode,
    /// Headers.
    pub headers: HeaderMap,
    /// Body.
    pub body: Bytes,
}

/// The HTTP client of the connectors: pooled, HTTP/1.1, `https` via rustls with the system's
/// roots (plain `http` for local receivers), a timeout on the whole exchange.
#[derive(Clone)]
pub struct HttpClient {
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
    timeout: Duration,
    max_response: usize,
}

impl fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpClient").field("timeout", &self.timeout).finish_non_exhaustive()
    }
}

impl HttpClient {
    /// A client whose requests time out after `timeout`.
    pub fn new(timeout: Duration) -> Self {
        let builder = hyper_rustls::HttpsConnectorBuilder::new().with_native_roots().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "no system TLS roots: https receivers will fail, http works");
            let empty = rustls::RootCertStore::empty();
            hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config(rustls::ClientConfig::builder().with_root_certificates(empty).with_no_client_auth())
        });
        let https = builder.https_or_http().enable_http1().build();
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(16)
            .build(https);
        HttpClient { client, timeout, max_response: MAX_RESPONSE_BYTES }
    }

    /// The same client reading answers up to `bytes` instead of [`MAX_RESPONSE_BYTES`] (a
    /// trusted reader of large documents, e.g. a load test reading a whole store's outcome).
    pub fn with_max_response(mut self, bytes: usize) -> Self {
        self.max_response = bytes;
        self
    }

    /// Sends a request and reads the answer (at most [`MAX_RESPONSE_BYTES`] unless
    /// [`HttpClient::with_max_response`] says otherwise), within the timeout; a body
    /// goes as JSON unless `headers` name another `content-type`. Network failures and
    /// the timeout are [`DeliveryError::Transient`].
    pub async fn send(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, String)],
        body: Bytes,
    ) -> Result<HttpResponse, DeliveryError> {
        let mut req = hyper::Request::builder().method(method).uri(url);
        for (name, value) in headers {
            req = req.header(*name, value.as_str());
        }
        if !body.is_empty() && !headers.iter().any(|(name, _)| name.eq_ignore_ascii_case("content-type")) {
            req = req.header("content-type", "application/json");
        }
        let req =
            req.body(Full::new(body)).map_err(|e| DeliveryError::Rejected(format!("bad request to {url}: {e}")))?;
        let exchange = async {
            let resp = self.client.request(req).await.map_err(|e| DeliveryError::transient(error_chain(&e)))?;
            let (parts, body) = resp.into_parts();
            // A receiver's answer is read up to a limit: a huge or endless body must not fill
            // memory (it is a failed exchange, retried like a network failure).
            let body = http_body_util::Limited::new(body, self.max_response)
                .collect()
                .await
                .map_err(|e| DeliveryError::transient(format!("reading the answer of {url}: {e}")))?
                .to_bytes();
            Ok(HttpResponse { status: parts.status, headers: parts.headers, body })
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(r) => r,
            Err(_) => Err(DeliveryError::transient(format!("no answer within {:?}", self.timeout))),
        }
    }
}

/// Largest answer body read from a receiver (QuickBooks' batch answers are the largest legitimate
/// ones, well under this).
pub const MAX_RESPONSE_BYTES: usize = 4 << 20;

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

/// Classifies an answer: 2xx → `Ok`; 429 (and QuickBooks' `ThrottleExceeded`) → throttled,
/// waiting `Retry-After` (at most a day) or `default_throttle`; 401, 408 and 5xx → transient;
/// other 4xx → rejected.
pub fn classify(resp: HttpResponse, default_throttle: Duration) -> Result<HttpResponse, DeliveryError> {
    let status = resp.status;
    if status.is_success() {
        return Ok(resp);
    }
    let retry_after = resp
        .headers
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v, std::time::SystemTime::now()))
        .map(|d| d.min(crate::drain::MAX_PAUSE));
    let excerpt = excerpt(&resp.body);
    let throttled = status == StatusCode::TOO_MANY_REQUESTS
        || (status == StatusCode::FORBIDDEN && excerpt.contains("ThrottleExceeded"));
    if throttled {
        let problem = resp.headers.get("x-rate-limit-problem").and_then(|v| v.to_str().ok()).unwrap_or("");
        return Err(DeliveryError::Throttled {
            reason: format!("HTTP {status} {problem}").trim_end().to_string(),
            retry_after: Some(retry_after.unwrap_or(default_throttle)),
        });
    }
    if status == StatusCode::UNAUTHORIZED {
        // Expired or rotated credentials: the receiver is fine, our token is not. Delay (the
        // secret is re-read periodically) rather than dead-letter everything.
        return Err(DeliveryError::Transient {
            reason: format!("HTTP 401 (credentials refused): {excerpt}"),
            retry_after,
        });
    }
    if status.is_server_error() || status == StatusCode::REQUEST_TIMEOUT {
        return Err(DeliveryError::Transient { reason: format!("HTTP {status}: {excerpt}"), retry_after });
    }
    Err(DeliveryError::Rejected(format!("HTTP {status}: {excerpt}")))
}

/// At most 300 characters of a body, for error messages.
pub fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let mut end = text.len().min(300);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resp(status: u16, headers: &[(&str, &str)], body: &str) -> HttpResponse {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.insert(hyper::header::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
        }
        HttpResponse {
            status: StatusCode::from_u16(status).unwrap(),
            headers: map,
            body: Bytes::from(body.to_string()),
        }
    }

    #[test]
    fn answers_are_classified_by_what_the_drain_should_do() {
        let d = Duration::from_secs(60);
        assert!(classify(resp(201, &[], ""), d).is_ok());
        assert_eq!(
            classify(resp(429, &[("retry-after", "7"), ("x-rate-limit-problem", "minute")], ""), d).unwrap_err(),
            DeliveryError::Throttled {
                reason: "HTTP 429 Too Many Requests minute".into(),
                retry_after: Some(Duration::from_secs(7))
            }
        );
        // QuickBooks throttles without Retry-After, in XML, sometimes as 403.
        let qbo = "<IntuitResponse><Fault><Error><Message>message=ThrottleExceeded; errorCode=003001</Message></Error></Fault></IntuitResponse>";
        for status in [429, 403] {
            assert!(matches!(
                classify(resp(status, &[], qbo), d),
                Err(DeliveryError::Throttled { retry_after: Some(w), .. }) if w == d
            ));
        }
        assert!(matches!(classify(resp(403, &[], "forbidden"), d), Err(DeliveryError::Rejected(_))));
        assert!(matches!(classify(resp(401, &[], "token expired"), d), Err(DeliveryError::Transient { .. })));
        assert!(matches!(
            classify(resp(429, &[("retry-after", "18446744073709551615")], ""), d),
            Err(DeliveryError::Throttled { retry_after: Some(w), .. }) if w == crate::drain::MAX_PAUSE
        ));
        assert!(matches!(
            classify(resp(503, &[("retry-after", "3")], "busy"), d),
            Err(DeliveryError::Transient { retry_after: Some(w), .. }) if w == Duration::from_secs(3)
        ));
        assert!(
            matches!(classify(resp(400, &[], "{\"error\":\"x\"}"), d), Err(DeliveryError::Rejected(m)) if m.contains("\"x\""))
        );
    }

    #[tokio::test]
    async fn an_answer_larger_than_the_cap_is_a_transient_failure_not_memory() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut req = [0u8; 4096];
            let _ = sock.read(&mut req).await.unwrap();
            // Declares 64 MiB and keeps sending: the client must stop at the cap.
            let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", 64 << 20);
            sock.write_all(head.as_bytes()).await.unwrap();
            let chunk = vec![b'x'; 1 << 16];
            for _ in 0..1024 {
                if sock.write_all(&chunk).await.is_err() {
                    return;
                }
            }
        });
        let client = HttpClient::new(Duration::from_secs(30));
        let err =
            client.send(Method::POST, &format!("http://{addr}/"), &[], Bytes::from_static(b"{}")).await.unwrap_err();
        assert!(matches!(err, DeliveryError::Transient { .. }), "{err:?}");
        assert!(err.to_string().contains("length limit"), "{err}");
    }

    #[test]
    fn keys_are_deterministic_short_and_distinct() {
        let a = request_key("accounting", &["cogs:e1", "cogs:e2"]);
        assert_eq!(a, request_key("accounting", &["cogs:e1", "cogs:e2"]));
        assert_eq!(a.len(), 34);
        assert_ne!(a, request_key("accounting", &["cogs:e1"]));
        assert_ne!(a, request_key("alerts", &["cogs:e1", "cogs:e2"]));
        assert_ne!(request_key("x", &["a\nb"]), request_key("x", &["a", "b"]));
        assert_ne!(request_key("x", &["ab", ""]), request_key("x", &["a", "b"]));
    }

    #[test]
    fn secrets_never_print() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?}"), "Secret(***)");
        s.replace("new".into());
        assert_eq!(s.clone().expose(), "new");
    }
}
