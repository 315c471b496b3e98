//! Logging (`tracing`, filtered by `STOCKFLOW_LOG`, default `info`) and the Prometheus recorder.
//! Only the binary installs a recorder; the library crates emit through the `metrics` facade.

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

/// Installs the log subscriber (stderr) and the Prometheus recorder.
pub fn init() -> Option<PrometheusHandle> {
    let filter = EnvFilter::try_from_env("STOCKFLOW_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    match PrometheusBuilder::new().install_recorder() {
        Ok(handle) => Some(handle),
        Err(e) => {
            tracing::warn!(error = %e, "metrics recorder not installed");
            None
        }
    }
}
