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
    tokio::spawn(async move {
        let stop = async move { stopped(&mut shutdown).await };
        if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(stop).await {
            tracing::error!(error = %e, "dashboard server stopped");
        }
    });
    Ok(bound)
}
