//! Standard Webhooks signatures (<https://www.standardwebhooks.com>): a sender signs
//! `"{webhook-id}.{webhook-timestamp}.{body}"` with HMAC-SHA256 under a shared secret and sends
//! `webhook-signature: v1,<base64>` (several space-separated signatures while a key rotates).
//!
//! [`Verifier`] accepts a request when one signature matches one of its secrets (several at once:
//! the old and the new during a rotation), the timestamp is within the tolerance (5 minutes either
//! way), and the `webhook-id` was not already accepted within the tolerance (replay). The
//! comparison is constant-time and rejects wrong lengths, so an empty or truncated signature fails.
//! Secrets are never logged (`Debug` shows only how many there are).

use std::collections::HashMap;
use std::sync::{Mutex, RwLock};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Why a request's signature was refused (each maps to HTTP 401).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// A required header is missing or empty.
    #[error("missing header {0}")]
    Missing(&'static str),
    /// `webhook-timestamp` is not an integer number of seconds.
    #[error("webhook-timestamp is not a Unix time in seconds")]
    BadTimestamp,
    /// The timestamp is outside the tolerance.
    #[error("webhook-timestamp is more than {0} s away from now")]
    Stale(u64),
    /// No signature matches any secret.
    #[error("no valid signature")]
    Invalid,
    /// This `webhook-id` was already accepted.
    #[error("webhook-id was already received")]
    Replayed,
    /// More `v1,` signatures than a sender rotating keys ever sends.
    #[error("more than {MAX_SIGNATURES} signatures")]
    TooManySignatures,
}

impl SignatureError {
    /// The header to blame.
    pub fn field(&self) -> &'static str {
        match self {
            SignatureError::Missing(h) => h,
            SignatureError::BadTimestamp | SignatureError::Stale(_) => "webhook-timestamp",
            SignatureError::Invalid | SignatureError::TooManySignatures => "webhook-signature",
            SignatureError::Replayed => "webhook-id",
        }
    }
}

/// Most signatures a request may carry (a sender lists one per key it signs with: two while it
/// rotates). A longer list is refused before any HMAC is computed.
pub const MAX_SIGNATURES: usize = 8;

/// Verifies Standard Webhooks signatures (see the module docs).
pub struct Verifier {
    /// Replaced whole when the secret source changes (rotation without a restart).
    secrets: RwLock<Vec<Vec<u8>>>,
    tolerance: Duration,
    /// Accepted ids and their timestamps, pruned once outside the tolerance.
    seen: Mutex<HashMap<String, i64>>,
    /// HMACs computed so far (one per secret per request that reaches the check).
    macs: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.secrets.read().map_or(0, |s| s.len());
        f.debug_struct("Verifier").field("secrets", &n).field("tolerance", &self.tolerance).finish()
    }
}

impl Verifier {
    /// A verifier for secrets written `whsec_<base64>` (or raw base64), 5-minute tolerance.
    pub fn new<S: AsRef<str>>(secrets: &[S]) -> Result<Self, String> {
        let keys = decode_secrets(secrets)?;
        Ok(Verifier {
            secrets: RwLock::new(keys),
            tolerance: Duration::from_secs(300),
            seen: Mutex::new(HashMap::new()),
            macs: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// HMACs computed so far: at most one per secret per request, whatever it carries.
    pub fn macs_computed(&self) -> u64 {
        self.macs.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Replaces the secrets (a rotation read from the secret store); the replay memory stays. On
    /// error the old secrets stay in force.
    pub fn replace_secrets<S: AsRef<str>>(&self, secrets: &[S]) -> Result<(), String> {
        let keys = decode_secrets(secrets)?;
        *self.secrets.write().unwrap_or_else(std::sync::PoisonError::into_inner) = keys;
        Ok(())
    }

    /// The signature a sender computes (tests and senders).
    pub fn sign(secret: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
        stockflow_connectors::alerts::sign(secret, id, timestamp, body)
    }

    /// Checks one request at `now` (Unix seconds).
    pub fn verify(
        &self,
        id: Option<&str>,
        timestamp: Option<&str>,
        signature: Option<&str>,
        body: &[u8],
        now: i64,
    ) -> Result<(), SignatureError> {
        let id = id.filter(|s| !s.is_empty()).ok_or(SignatureError::Missing("webhook-id"))?;
        let ts_text = timestamp.filter(|s| !s.is_empty()).ok_or(SignatureError::Missing("webhook-timestamp"))?;
        let signature = signature.ok_or(SignatureError::Missing("webhook-signature"))?;
        let ts: i64 = ts_text.trim().parse().map_err(|_| SignatureError::BadTimestamp)?;
        let tol = self.tolerance.as_secs();
        if ts.abs_diff(now) > tol {
            return Err(SignatureError::Stale(tol));
        }
        let candidates: Vec<&str> = signature.split(' ').filter_map(|s| s.strip_prefix("v1,")).collect();
        if candidates.len() > MAX_SIGNATURES {
            return Err(SignatureError::TooManySignatures);
        }
        // One HMAC of the body per secret, then every candidate compared with each (constant
        // time): the work does not grow with what the sender lists.
        let expected: Vec<hmac::digest::CtOutput<Hmac<Sha256>>> = {
            let secrets = self.secrets.read().unwrap_or_else(std::sync::PoisonError::into_inner);
            secrets
                .iter()
                .map(|key| {
                    // Cannot fire: HMAC accepts keys of any length (longer ones are hashed first).
                    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
                    mac.update(id.as_bytes());
                    mac.update(b".");
                    mac.update(ts_text.trim().as_bytes());
                    mac.update(b".");
                    mac.update(body);
                    mac.finalize()
                })
                .collect()
        };
        self.macs.fetch_add(expected.len() as u64, std::sync::atomic::Ordering::Relaxed);
        let matched = candidates.iter().any(|b64| {
            let Ok(given) = STANDARD.decode(b64) else { return false };
            // A wrong length (empty, truncated) fails.
            let Ok(given) = <[u8; 32]>::try_from(given.as_slice()) else { return false };
            let given = hmac::digest::CtOutput::<Hmac<Sha256>>::new(given.into());
            expected.contains(&given) // `CtOutput` compares in constant time
        });
        if !matched {
            return Err(SignatureError::Invalid);
        }
        let mut seen = self.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if seen.len() > 100_000 {
            seen.retain(|_, t| t.abs_diff(now) <= tol);
        }
        if seen.get(id).is_some_and(|t| t.abs_diff(now) <= tol) {
            return Err(SignatureError::Replayed);
        }
        seen.insert(id.to_string(), ts);
        Ok(())
    }

    /// Forgets an accepted `webhook-id`: its request was not taken after all (invalid, or the
    /// stream unavailable), so the sender's retry with the same id must pass.
    pub fn forget(&self, id: &str) {
        self.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(id);
    }
}

/// Decodes `whsec_<base64>` (or raw base64) secrets of at least 16 bytes.
fn decode_secrets<S: AsRef<str>>(secrets: &[S]) -> Result<Vec<Vec<u8>>, String> {
    let mut keys = Vec::new();
    for (i, s) in secrets.iter().enumerate() {
        let key = stockflow_connectors::alerts::decode_secret(s.as_ref())
            .map_err(|e| format!("webhook secret #{}: {e}", i + 1))?;
        keys.push(key);
    }
    if keys.is_empty() {
        return Err("no webhook secret given".into());
    }
    Ok(keys)
}

/// The verifier of the local server: secrets from `STOCKFLOW_WEBHOOK_SECRETS` (comma-separated)
/// or the file named by `STOCKFLOW_WEBHOOK_SECRETS_FILE` (one per line); `None` when neither is
/// set (unsigned ingest, for a server reachable only from trusted hosts).
pub fn from_env() -> anyhow::Result<Option<Verifier>> {
    let text = match (std::env::var("STOCKFLOW_WEBHOOK_SECRETS"), std::env::var("STOCKFLOW_WEBHOOK_SECRETS_FILE")) {
        (Ok(list), _) => list.replace(',', "\n"),
        (_, Ok(path)) => std::fs::read_to_string(&path).map_err(|e| anyhow::anyhow!("reading {path}: {e}"))?,
        _ => return Ok(None),
    };
    let secrets: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    Verifier::new(&secrets).map(Some).map_err(anyhow::Error::msg)
}

/// The secrets held in a secret's text: a JSON array of secrets, a JSON object with a `secrets`
/// array, or secrets separated by newlines or commas.
pub fn parse_secret_text(text: &str) -> Vec<String> {
    let text = text.trim();
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(text) {
        let list = v.as_array().or_else(|| v.get("secrets").and_then(serde_json::Value::as_array));
        if let Some(list) = list {
            return list.iter().filter_map(|s| s.as_str()).map(str::to_string).collect();
        }
    }
    text.split(['\n', ',']).map(str::trim).filter(|s| !s.is_empty()).map(str::to_string).collect()
}

/// Reads webhook secrets from AWS Secrets Manager (`GetSecretValue`, the current version).
pub async fn secrets_from_manager(
    client: &aws_sdk_secretsmanager::Client,
    secret_id: &str,
) -> anyhow::Result<Vec<String>> {
    let out = client.get_secret_value().secret_id(secret_id).send().await.map_err(|e| {
        anyhow::anyhow!("GetSecretValue {secret_id}: {}", aws_sdk_secretsmanager::error::DisplayErrorContext(e))
    })?;
    let text = out.secret_string().ok_or_else(|| anyhow::anyhow!("secret {secret_id} has no SecretString"))?;
    Ok(parse_secret_text(text))
}

/// A Secrets Manager client; `endpoint` overrides the service address (a local emulator).
pub async fn secrets_client(endpoint: Option<&str>) -> aws_sdk_secretsmanager::Client {
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
    if let Some(url) = endpoint {
        loader = loader.endpoint_url(url);
    }
    aws_sdk_secretsmanager::Client::new(&loader.load().await)
}

/// The verifier of a deployed process: from Secrets Manager when `STOCKFLOW_WEBHOOK_SECRET_ID` is
/// set (re-read every `refresh`, so a rotation reaches running processes; a failed re-read keeps
/// the secrets in force and is logged), else [`from_env`]. The endpoint override is
/// `SECRETSMANAGER_ENDPOINT`.
pub async fn load(refresh: Duration) -> anyhow::Result<Option<std::sync::Arc<Verifier>>> {
    let Ok(secret_id) = std::env::var("STOCKFLOW_WEBHOOK_SECRET_ID") else {
        return Ok(from_env()?.map(std::sync::Arc::new));
    };
    let client = secrets_client(std::env::var("SECRETSMANAGER_ENDPOINT").ok().as_deref()).await;
    let verifier = std::sync::Arc::new(from_manager(&client, &secret_id).await?);
    let weak = std::sync::Arc::downgrade(&verifier);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(refresh).await;
            let Some(v) = weak.upgrade() else { return };
            match secrets_from_manager(&client, &secret_id)
                .await
                .and_then(|s| v.replace_secrets(&s).map_err(anyhow::Error::msg))
            {
                Ok(()) => tracing::debug!("webhook secrets re-read"),
                Err(e) => tracing::warn!(error = %e, "webhook secrets not re-read; the current ones stay in force"),
            }
        }
    });
    Ok(Some(verifier))
}

/// A verifier holding the secrets of `secret_id`.
pub async fn from_manager(client: &aws_sdk_secretsmanager::Client, secret_id: &str) -> anyhow::Result<Verifier> {
    let secrets = secrets_from_manager(client, secret_id).await?;
    Verifier::new(&secrets).map_err(|e| anyhow::anyhow!("secret {secret_id}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const OLD: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const NEW: &str = "whsec_dGhpcyBpcyB0aGUgbmV3IHNlY3JldCBrZXkh";

    fn key(s: &str) -> Vec<u8> {
        STANDARD.decode(s.strip_prefix("whsec_").unwrap()).unwrap()
    }

    #[test]
    fn accepts_a_valid_signature_once_and_refuses_tampering_age_replay_and_empty() {
        let v = Verifier::new(&[OLD]).unwrap();
        let now = 1_700_000_000;
        let body = br#"{"id":"e1"}"#;
        let sig = Verifier::sign(&key(OLD), "msg_1", now, body);
        let ts = now.to_string();
        assert_eq!(v.verify(Some("msg_1"), Some(&ts), Some(&sig), body, now + 10), Ok(()));
        // The same id again within the tolerance: a replay.
        assert_eq!(v.verify(Some("msg_1"), Some(&ts), Some(&sig), body, now + 20), Err(SignatureError::Replayed));
        // A tampered body.
        let sig2 = Verifier::sign(&key(OLD), "msg_2", now, body);
        assert_eq!(
            v.verify(Some("msg_2"), Some(&ts), Some(&sig2), br#"{"id":"e2"}"#, now),
            Err(SignatureError::Invalid)
        );
        // An old (or future) timestamp, even correctly signed.
        let old_ts = (now - 301).to_string();
        let sig3 = Verifier::sign(&key(OLD), "msg_3", now - 301, body);
        assert_eq!(v.verify(Some("msg_3"), Some(&old_ts), Some(&sig3), body, now), Err(SignatureError::Stale(300)));
        // Empty, truncated and missing signatures.
        for bad in ["", "v1,", "v1,AAAA", &sig2[..sig2.len() - 4]] {
            assert_eq!(
                v.verify(Some("msg_2"), Some(&ts), Some(bad), body, now),
                Err(SignatureError::Invalid),
                "{bad:?}"
            );
        }
        assert_eq!(
            v.verify(Some("msg_2"), Some(&ts), None, body, now),
            Err(SignatureError::Missing("webhook-signature"))
        );
        assert_eq!(v.verify(None, Some(&ts), Some(&sig2), body, now), Err(SignatureError::Missing("webhook-id")));
        assert_eq!(v.verify(Some("msg_2"), Some("soon"), Some(&sig2), body, now), Err(SignatureError::BadTimestamp));
    }

    #[test]
    fn a_long_signature_list_costs_no_more_than_one_hmac_per_secret() {
        let v = Verifier::new(&[OLD, NEW]).unwrap();
        let body = vec![b'x'; 1 << 20];
        let now = 1_700_000_000;
        let good = Verifier::sign(&key(NEW), "msg_1", now, &body);
        // 10,000 candidates with a 1 MiB body: refused before any HMAC.
        let many = vec!["v1,AAAA"; 10_000].join(" ");
        let ts = now.to_string();
        assert_eq!(v.verify(Some("msg_1"), Some(&ts), Some(&many), &body, now), Err(SignatureError::TooManySignatures));
        assert_eq!(v.macs_computed(), 0);
        assert_eq!(SignatureError::TooManySignatures.field(), "webhook-signature");
        // Eight candidates, the good one last: one HMAC per secret, not per candidate.
        let eight = format!("{} {good}", ["v1,AAAA"; 7].join(" "));
        assert_eq!(v.verify(Some("msg_1"), Some(&ts), Some(&eight), &body, now), Ok(()));
        assert_eq!(v.macs_computed(), 2);
    }

    #[test]
    fn rotated_keys_are_accepted_together_and_a_removed_key_is_refused() {
        let now = 1_700_000_000;
        let ts = now.to_string();
        let body = b"[]";
        let both = Verifier::new(&[OLD, NEW]).unwrap();
        let by_old = Verifier::sign(&key(OLD), "a", now, body);
        let by_new = Verifier::sign(&key(NEW), "b", now, body);
        assert_eq!(both.verify(Some("a"), Some(&ts), Some(&by_old), body, now), Ok(()));
        assert_eq!(both.verify(Some("b"), Some(&ts), Some(&by_new), body, now), Ok(()));
        // A sender listing several signatures (during its own rotation): one match suffices.
        let by_new_c = Verifier::sign(&key(NEW), "c", now, body);
        let listed = format!("v1,bm9wZQ== {by_new_c}");
        assert_eq!(both.verify(Some("c"), Some(&ts), Some(&listed), body, now), Ok(()));
        let new_only = Verifier::new(&[NEW]).unwrap();
        let by_old_d = Verifier::sign(&key(OLD), "d", now, body);
        assert_eq!(new_only.verify(Some("d"), Some(&ts), Some(&by_old_d), body, now), Err(SignatureError::Invalid));
        assert!(Verifier::new::<&str>(&[]).is_err());
        assert!(Verifier::new(&["whsec_not base64!"]).is_err());
        assert!(!format!("{both:?}").contains("MfKQ"), "secrets are never printed");
    }
}
