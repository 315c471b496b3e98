//! The one HTTP client of the load tools: a lane is one HTTP/1.1 keep-alive connection (no Nagle
//! delay) sending one request at a time, reconnecting after a failure, signing each request with
//! Standard Webhooks headers when it has a key (a fresh `webhook-id` per attempt, so a retry after a
//! lost answer is not taken for a replay). `ingest load` and `replay --target http://…|local` send
//! through it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::body::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::StatusCode;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use stockflow_connectors::alerts::signature_headers;

/// `http://HOST:PORT/path` → the address, the `Host` header and the path (`/` when none).
pub async fn resolve(url: &str) -> anyhow::Result<(SocketAddr, String, String)> {
    let rest = url.strip_prefix("http://").context("only http:// is supported")?;
    let (authority, path) = rest.split_once('/').map_or((rest, "/".to_string()), |(a, p)| (a, format!("/{p}")));
    let addr = tokio::net::lookup_host(authority)
        .await
        .with_context(|| format!("resolving {authority}"))?
        .next()
        .with_context(|| format!("{authority} has no address"))?;
    Ok((addr, authority.to_string(), path))
}

/// One keep-alive connection to an HTTP endpoint.
#[derive(Debug)]
pub struct HttpLane {
    addr: SocketAddr,
    host: String,
    path: String,
    key: Option<Arc<Vec<u8>>>,
    sender: Option<SendRequest<Full<Bytes>>>,
    id_prefix: String,
    sent: u64,
    timeout: Duration,
}

impl HttpLane {
    /// A lane to `url`, signing with `key` when given; `id_prefix` makes its webhook ids unique
    /// (a run and lane number). Connects on the first request.
    pub async fn new(url: &str, key: Option<Arc<Vec<u8>>>, id_prefix: String) -> anyhow::Result<Self> {
        let (addr, host, path) = resolve(url).await?;
        Ok(HttpLane { addr, host, path, key, sender: None, id_prefix, sent: 0, timeout: Duration::from_secs(30) })
    }

    /// The path of the lane's URL.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The address it sends to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// POSTs `body` to `path` (the lane's own path when `None`): one JSON document, or NDJSON when
    /// `ndjson`. The answer's status and body; an error for a connection that failed or an answer
    /// that did not come within 30 s (the connection is dropped and the next request reconnects).
    pub async fn post(
        &mut self,
        path: Option<&str>,
        body: Vec<u8>,
        ndjson: bool,
    ) -> anyhow::Result<(StatusCode, Bytes)> {
        if self.sender.as_ref().is_none_or(SendRequest::is_closed) {
            self.sender = Some(connect(self.addr).await?);
        }
        let content_type = if ndjson { "application/x-ndjson" } else { "application/json" };
        let mut req = hyper::Request::post(path.unwrap_or(&self.path))
            .header(hyper::header::HOST, self.host.as_str())
            .header(hyper::header::CONTENT_TYPE, content_type);
        if let Some(key) = &self.key {
            self.sent += 1;
            for (name, value) in signature_headers(key, format!("{}-{}", self.id_prefix, self.sent), &body) {
                req = req.header(name, value);
            }
        }
        let req = req.body(Full::new(Bytes::from(body)))?;
        let Some(sender) = self.sender.as_mut() else { anyhow::bail!("no connection") };
        let exchange = async {
            sender.ready().await?;
            let resp = sender.send_request(req).await?;
            let status = resp.status();
            let body = resp.into_body().collect().await?.to_bytes();
            Ok::<_, hyper::Error>((status, body))
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(e)) => {
                self.sender = None;
                Err(e.into())
            }
            Err(_) => {
                self.sender = None;
                anyhow::bail!("no answer within {:?}", self.timeout)
            }
        }
    }
}

/// An HTTP/1.1 keep-alive connection to `addr` (no Nagle delay), its driver spawned.
async fn connect(addr: SocketAddr) -> anyhow::Result<SendRequest<Full<Bytes>>> {
    let stream = tokio::net::TcpStream::connect(addr).await.with_context(|| format!("connecting to {addr}"))?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender)
}
