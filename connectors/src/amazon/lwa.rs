//! Login with Amazon: `POST {endpoint}` (`https://api.amazon.com/auth/o2/token`), form
//! `grant_type=refresh_token`, `refresh_token`, `client_id`, `client_secret` → `access_token`
//! valid `expires_in` seconds (3600). The token is cached and refreshed once less than
//! [`REFRESH_BEFORE`] of its life is left, so no request goes out with a token about to expire;
//! a 401/403 from the API drops it ([`Lwa::invalidate`]) and the next call fetches a new one.

use std::time::{Duration, Instant};

use hyper::Method;
use hyper::body::Bytes;
use serde::Deserialize;

use super::AmazonError;
use crate::accounting::encode as form_encode;
use crate::connector::{DeliveryError, HttpClient, Secret, excerpt};

/// The production token endpoint.
pub const LWA_ENDPOINT: &str = "https://api.amazon.com/auth/o2/token";

/// A cached token is replaced once less than this is left of its lifetime.
pub const REFRESH_BEFORE: Duration = Duration::from_secs(300);

/// The application's LWA credentials (from Secrets Manager in a deployment; docs/reconcile.md).
#[derive(Debug, Clone)]
pub struct LwaCredentials {
    /// The app's client id (`amzn1.application-oa2-client.…`).
    pub client_id: Secret,
    /// The app's client secret (rotates every 180 days).
    pub client_secret: Secret,
    /// The seller's refresh token (`Atzr|…`).
    pub refresh_token: Secret,
}

#[derive(Debug, Deserialize)]
struct TokenAnswer {
    access_token: String,
    expires_in: u64,
}

struct Cached {
    token: String,
    expires: Instant,
}

impl std::fmt::Debug for Cached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cached").field("token", &"<redacted>").field("expires", &self.expires).finish()
    }
}

/// The longest lifetime believed from an answer (Amazon says 3,600 s).
const MAX_LIFETIME: Duration = Duration::from_secs(86_400);

/// An access-token source.
#[derive(Debug)]
pub struct Lwa {
    endpoint: String,
    credentials: LwaCredentials,
    http: HttpClient,
    cached: tokio::sync::Mutex<Option<Cached>>,
    refreshes: std::sync::atomic::AtomicU64,
}

impl Lwa {
    /// A token source at `endpoint` (see [`LWA_ENDPOINT`]).
    pub fn new(endpoint: impl Into<String>, credentials: LwaCredentials, timeout: Duration) -> Self {
        Lwa {
            endpoint: endpoint.into(),
            credentials,
            http: HttpClient::new(timeout),
            cached: tokio::sync::Mutex::new(None),
            refreshes: Default::default(),
        }
    }

    /// A valid access token: the cached one while more than [`REFRESH_BEFORE`] of it is left,
    /// else a fresh one (one refresh at a time; concurrent callers wait for it).
    pub async fn token(&self) -> Result<String, AmazonError> {
        let mut cached = self.cached.lock().await;
        if let Some(c) = cached.as_ref().filter(|c| c.expires > Instant::now() + REFRESH_BEFORE) {
            return Ok(c.token.clone());
        }
        let fresh = self.refresh().await?;
        let token = fresh.token.clone();
        *cached = Some(fresh);
        Ok(token)
    }

    /// Forgets the cached token (the API answered 401/403 to it).
    pub async fn invalidate(&self) {
        *self.cached.lock().await = None;
    }

    /// The credentials, shared: replacing a value ([`Secret::replace`]) takes effect at the
    /// next refresh (call [`Lwa::invalidate`] to force one).
    pub fn credentials(&self) -> &LwaCredentials {
        &self.credentials
    }

    /// Tokens fetched so far.
    pub fn refreshes(&self) -> u64 {
        self.refreshes.load(std::sync::atomic::Ordering::Relaxed)
    }

    async fn refresh(&self) -> Result<Cached, AmazonError> {
        let c = &self.credentials;
        let form = format!(
            "grant_type=refresh_token&refresh_token={}&client_id={}&client_secret={}",
            form_encode(&c.refresh_token.expose()),
            form_encode(&c.client_id.expose()),
            form_encode(&c.client_secret.expose())
        );
        let headers = [
            ("content-type", "application/x-www-form-urlencoded;charset=UTF-8".to_string()),
            ("accept", "application/json".to_string()),
        ];
        let started = Instant::now();
        let resp =
            self.http.send(Method::POST, &self.endpoint, &headers, Bytes::from(form)).await.map_err(|e| match e {
                DeliveryError::Rejected(m) => AmazonError::Auth(m),
                other => AmazonError::Unavailable(format!("token endpoint: {other}")),
            })?;
        if resp.status.is_server_error() || resp.status.as_u16() == 429 {
            return Err(AmazonError::Unavailable(format!("token endpoint answered {}", resp.status)));
        }
        if !resp.status.is_success() {
            // `{"error":"invalid_grant","error_description":"…"}`: never retried.
            return Err(AmazonError::Auth(format!("{} {}", resp.status, excerpt(&resp.body))));
        }
        let answer: TokenAnswer = serde_json::from_slice(&resp.body)
            .map_err(|e| AmazonError::Malformed(format!("token endpoint answer: {e}")))?;
        self.refreshes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // The lifetime counts from the request, not the answer: never later than Amazon's clock.
        let lifetime = Duration::from_secs(answer.expires_in).min(MAX_LIFETIME);
        Ok(Cached { token: answer.access_token, expires: started + lifetime })
    }
}
