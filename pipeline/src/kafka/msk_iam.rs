//! MSK IAM authentication: SASL/OAUTHBEARER tokens that are presigned SigV4 URLs, the scheme of
//! AWS's own signers (`aws-msk-iam-sasl-signer-go`/`-python`/`-js`).
//!
//! The token is `base64url_nopad("https://kafka.{region}.amazonaws.com/?Action=kafka-cluster%3AConnect
//! &X-Amz-Algorithm=…&X-Amz-Credential=…&X-Amz-Date=…&X-Amz-Expires=900&X-Amz-SignedHeaders=host
//! [&X-Amz-Security-Token=…]&X-Amz-Signature=…&User-Agent=…")`, signed for the service
//! `kafka-cluster` in the cluster's region; it lives 15 minutes and librdkafka asks for a new one
//! before it expires. Signing uses the official `aws-sigv4` crate (already in the SDK's tree), and
//! the credentials come from the default AWS chain (env, profile, SSO, ECS task role, IMDS).

use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider};
use aws_sigv4::http_request::{SignableBody, SignableRequest, SignatureLocation, SigningSettings, sign};
use aws_sigv4::sign::v4;
use base64::Engine as _;
use rdkafka::client::OAuthToken;

/// How long a token is valid (the AWS signers' value).
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(900);

/// Why a token could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The credentials chain found nothing or failed.
    #[error("AWS credentials for MSK IAM: {0}")]
    Credentials(String),
    /// Signing failed.
    #[error("signing the MSK IAM token: {0}")]
    Signing(String),
}

/// Makes MSK IAM tokens from the AWS credentials chain.
pub struct Signer {
    region: String,
    credentials: SharedCredentialsProvider,
    runtime: tokio::runtime::Handle,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer").field("region", &self.region).finish_non_exhaustive()
    }
}

impl Signer {
    /// A signer for `region` with the default credentials chain (call inside the runtime).
    pub async fn from_env(region: &str) -> Result<Self, TokenError> {
        let conf = aws_config::defaults(aws_config::BehaviorVersion::latest()).load().await;
        let credentials = conf
            .credentials_provider()
            .ok_or_else(|| TokenError::Credentials("no credentials provider configured".into()))?;
        Ok(Signer { region: region.into(), credentials, runtime: tokio::runtime::Handle::current() })
    }

    /// A signer with these credentials (tests, or a caller with its own provider).
    pub fn new(region: &str, credentials: impl ProvideCredentials + 'static) -> Self {
        Signer {
            region: region.into(),
            credentials: SharedCredentialsProvider::new(credentials),
            runtime: tokio::runtime::Handle::current(),
        }
    }

    /// A fresh token. Called by librdkafka's refresh on a client thread (never a runtime thread):
    /// it may block on the credentials chain.
    pub fn token(&self) -> Result<OAuthToken, TokenError> {
        let provider = self.credentials.clone();
        let creds = if tokio::runtime::Handle::try_current().is_ok() {
            tokio::task::block_in_place(|| self.runtime.block_on(provider.provide_credentials()))
        } else {
            self.runtime.block_on(provider.provide_credentials())
        }
        .map_err(|e| TokenError::Credentials(e.to_string()))?;
        let now = SystemTime::now();
        let token = token_at(&creds, &self.region, now)?;
        let expires = now + TOKEN_LIFETIME;
        let lifetime_ms =
            expires.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(i64::MAX);
        let principal_name = creds.access_key_id().to_string();
        tracing::debug!(region = %self.region, "made an MSK IAM token");
        Ok(OAuthToken { token, principal_name, lifetime_ms })
    }
}

/// The token for `creds` in `region`, signed at `at`.
pub fn token_at(creds: &Credentials, region: &str, at: SystemTime) -> Result<String, TokenError> {
    let url = format!("https://kafka.{region}.amazonaws.com/?Action=kafka-cluster%3AConnect");
    let identity = creds.clone().into();
    let mut settings = SigningSettings::default();
    settings.signature_location = SignatureLocation::QueryParams;
    settings.expires_in = Some(TOKEN_LIFETIME);
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name("kafka-cluster")
        .time(at)
        .settings(settings)
        .build()
        .map_err(|e| TokenError::Signing(e.to_string()))?
        .into();
    let request = SignableRequest::new("GET", &url, std::iter::empty(), SignableBody::Bytes(&[]))
        .map_err(|e| TokenError::Signing(e.to_string()))?;
    let (instructions, _) = sign(request, &params).map_err(|e| TokenError::Signing(e.to_string()))?.into_parts();
    let mut signed = url;
    for (name, value) in instructions.params() {
        signed.push('&');
        signed.push_str(name);
        signed.push('=');
        encode_into(&mut signed, value);
    }
    signed.push_str("&User-Agent=");
    signed.push_str(&format!("stockflow%2F{}", env!("CARGO_PKG_VERSION")));
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(signed))
}

/// SigV4's URI encoding: everything but `A-Z a-z 0-9 - _ . ~` as `%XX`.
fn encode_into(out: &mut String, value: &str) {
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hmac::{Hmac, Mac};
    use sha2::{Digest, Sha256};

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn hmac(key: &[u8], data: &str) -> Vec<u8> {
        let mut m = Hmac::<Sha256>::new_from_slice(key).unwrap();
        m.update(data.as_bytes());
        m.finalize().into_bytes().to_vec()
    }

    /// The token checked against SigV4 query signing written out here from the specification
    /// (canonical request → string to sign → derived key), not through `aws-sigv4`.
    #[test]
    fn the_token_is_a_presigned_kafka_cluster_connect_url_with_a_valid_signature() {
        let creds = Credentials::new(
            "AKIDEXAMPLE",
            "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
            Some("IQoJb3JpZ2luX2VjE+/session=".into()),
            None,
            "test",
        );
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_704_067_200); // 2024-01-01T00:00:00Z
        let token = token_at(&creds, "eu-west-1", at).unwrap();
        assert!(!token.contains(['=', '+', '/']), "base64url without padding: {token}");
        let url = String::from_utf8(base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(&token).unwrap()).unwrap();
        let (base, query) = url.split_once('?').unwrap();
        assert_eq!(base, "https://kafka.eu-west-1.amazonaws.com/");
        let params: Vec<(&str, &str)> = query.split('&').map(|kv| kv.split_once('=').unwrap()).collect();
        let get = |k: &str| params.iter().find(|(n, _)| *n == k).map(|(_, v)| *v);
        assert_eq!(get("Action"), Some("kafka-cluster%3AConnect"));
        assert_eq!(get("X-Amz-Algorithm"), Some("AWS4-HMAC-SHA256"));
        assert_eq!(get("X-Amz-Credential"), Some("AKIDEXAMPLE%2F20240101%2Feu-west-1%2Fkafka-cluster%2Faws4_request"));
        assert_eq!(get("X-Amz-Date"), Some("20240101T000000Z"));
        assert_eq!(get("X-Amz-Expires"), Some("900"));
        assert_eq!(get("X-Amz-SignedHeaders"), Some("host"));
        assert_eq!(get("X-Amz-Security-Token"), Some("IQoJb3JpZ2luX2VjE%2B%2Fsession%3D"));
        assert!(get("User-Agent").is_some_and(|u| u.starts_with("stockflow%2F")));
        // Recompute the signature independently.
        let mut canonical: Vec<(&str, &str)> =
            params.iter().copied().filter(|(n, _)| *n != "X-Amz-Signature" && *n != "User-Agent").collect();
        canonical.sort();
        let query = canonical.iter().map(|(n, v)| format!("{n}={v}")).collect::<Vec<_>>().join("&");
        let request =
            format!("GET\n/\n{query}\nhost:kafka.eu-west-1.amazonaws.com\n\nhost\n{}", hex(&Sha256::digest(b"")));
        let scope = "20240101/eu-west-1/kafka-cluster/aws4_request";
        let to_sign =
            format!("AWS4-HMAC-SHA256\n20240101T000000Z\n{scope}\n{}", hex(&Sha256::digest(request.as_bytes())));
        let mut key = hmac(b"AWS4wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", "20240101");
        for part in ["eu-west-1", "kafka-cluster", "aws4_request"] {
            key = hmac(&key, part);
        }
        assert_eq!(get("X-Amz-Signature"), Some(hex(&hmac(&key, &to_sign)).as_str()));
    }

    #[test]
    fn sigv4_encoding_keeps_only_unreserved_characters() {
        let mut out = String::new();
        encode_into(&mut out, "a-b_c.d~e f/g+h=i:j");
        assert_eq!(out, "a-b_c.d~e%20f%2Fg%2Bh%3Di%3Aj");
    }
}
