//! Serving HTTP until shutdown: the one place that binds a listener for a background server
//! (the dashboard, a group member's `/metrics`) and the one shutdown wait the servers and loops use.

use tokio::sync::watch;

/// Resolves once `shutdown` turns true (or its sender is gone).
pub async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

/// Binds `addr` — any free port of its host instead when `fallback` and the address is taken —
/// and serves `app` until `shutdown`; returns the bound address.
pub async fn serve(
    addr: std::net::SocketAddr,
    fallback: bool,
    app: axum::Router,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<std::net::SocketAddr> {
    use anyhow::Context;
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) if fallback && e.kind() == std::io::ErrorKind::AddrInUse => {
            tracing::info!(%addr, "dashboard address in use; taking a free port");
            tokio::net::TcpListener::bind((addr.ip(), 0)).await.context("binding the dashboard")?
        }
        Err(e) => return Err(e).with_context(|| format!("binding the dashboard to {addr}")),
    };
    let bound = listener.local_addr()?;
    // Dashboards and /metrics take no bodies worth the name.
    let app = guarded(app, bound, Limits { max_body_bytes: 64 << 10, ..Limits::default() });
    tokio::spawn(async move {
        let stop = async move { stopped(&mut shutdown).await };
        if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(stop).await {
            tracing::error!(error = %e, "dashboard server stopped");
        }
    });
    Ok(bound)
}

/// What a server admits before a handler runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Requests served at once; more are answered 503 with `Retry-After: 1`.
    pub max_concurrent: usize,
    /// Time a client has to send its whole body; a slower one is answered 408.
    pub body_timeout: std::time::Duration,
    /// Largest body; a larger one is answered 413 (read no further).
    pub max_body_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_concurrent: 256,
            body_timeout: std::time::Duration::from_secs(10),
            max_body_bytes: crate::ingest::MAX_REQUEST_BYTES,
        }
    }
}

#[derive(Clone)]
struct Guard {
    permits: std::sync::Arc<tokio::sync::Semaphore>,
    limits: Limits,
    /// Bound to a loopback address: only loopback names are accepted in `Host`.
    loopback: bool,
}

/// A JSON error naming the field (the house's error shape).
fn refuse(status: axum::http::StatusCode, field: &str, message: String) -> axum::response::Response {
    use axum::response::IntoResponse;
    let body = serde_json::json!({ "error": message, "field": field });
    (status, axum::Json(body)).into_response()
}

/// True when `host` (a `Host` header value) names this machine's loopback interface.
pub fn is_loopback_host(host: &str) -> bool {
    // `[::1]:8080`, `127.0.0.1:8080`, `localhost`, `::1`, … — the port does not matter.
    if host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback()) {
        return true;
    }
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => {
            host.rsplit_once(':').map_or(host, |(h, p)| if p.bytes().all(|b| b.is_ascii_digit()) { h } else { host })
        }
    };
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    name == "localhost"
        || name.ends_with(".localhost")
        || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Wraps `router` with the admission rules of a server bound to `addr`:
/// - at most `limits.max_concurrent` requests at once (503 + `Retry-After: 1` beyond);
/// - the body read within `limits.body_timeout` (408) and at most `limits.max_body_bytes` (413);
/// - on a loopback address, a `Host` that names loopback (403 otherwise): a web page that
///   rebinds its own DNS name to 127.0.0.1 cannot reach the server.
pub fn guarded(router: axum::Router, addr: std::net::SocketAddr, limits: Limits) -> axum::Router {
    let guard = Guard {
        permits: std::sync::Arc::new(tokio::sync::Semaphore::new(limits.max_concurrent)),
        limits,
        loopback: addr.ip().is_loopback(),
    };
    router.layer(axum::middleware::from_fn_with_state(guard, admit))
}

async fn admit(
    axum::extract::State(guard): axum::extract::State<Guard>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::http::{HeaderValue, StatusCode, header};
    if guard.loopback {
        let host = req.headers().get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("");
        if !is_loopback_host(host) {
            metrics::counter!("stockflow_http_refused_total", "reason" => "host").increment(1);
            return refuse(
                StatusCode::FORBIDDEN,
                "Host",
                format!("Host {host:?} is not this machine: a loopback server answers only localhost names"),
            );
        }
    }
    let Ok(_permit) = std::sync::Arc::clone(&guard.permits).try_acquire_owned() else {
        metrics::counter!("stockflow_http_refused_total", "reason" => "busy").increment(1);
        let mut r = refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "request",
            format!("{} requests in progress: retry shortly", guard.limits.max_concurrent),
        );
        r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return r;
    };
    let (parts, body) = req.into_parts();
    let read = tokio::time::timeout(guard.limits.body_timeout, axum::body::to_bytes(body, guard.limits.max_body_bytes));
    let bytes = match read.await {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => {
            let too_big = std::error::Error::source(&e).is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
                || e.to_string().contains("length limit");
            return if too_big {
                refuse(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body",
                    format!("request body over {} bytes", guard.limits.max_body_bytes),
                )
            } else {
                refuse(StatusCode::BAD_REQUEST, "body", format!("reading the request body: {e}"))
            };
        }
        Err(_) => {
            metrics::counter!("stockflow_http_refused_total", "reason" => "slow_body").increment(1);
            let mut r = refuse(
                StatusCode::REQUEST_TIMEOUT,
                "body",
                format!("the body did not arrive within {:?}", guard.limits.body_timeout),
            );
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
            return r;
        }
    };
    next.run(axum::extract::Request::from_parts(parts, axum::body::Body::from(bytes))).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts_are_told_from_others() {
        for ok in ["localhost", "localhost:8080", "127.0.0.1:9", "[::1]:80", "::1", "127.7.7.7", "a.localhost:1"] {
            assert!(is_loopback_host(ok), "{ok}");
        }
        for bad in ["", "evil.example", "evil.example:8080", "10.0.0.1", "localhost.evil.example", "[2001:db8::1]:80"] {
            assert!(!is_loopback_host(bad), "{bad}");
        }
    }
}
