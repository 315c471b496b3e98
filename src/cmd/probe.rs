//! `stockflow probe URL`: one GET, exit 0 on a 2xx answer — the container health check
//! (`/healthz`, `/readyz`) without a shell or curl in the image.

use std::process::ExitCode;
use std::time::Duration;

use stockflow_connectors::connector::HttpClient;

/// Arguments of `stockflow probe`.
#[derive(Debug, clap::Args)]
pub struct ProbeArgs {
    /// The URL to GET (http://127.0.0.1:9100/healthz).
    #[arg(value_name = "URL")]
    url: String,
    /// Give up after this many milliseconds.
    #[arg(long, default_value_t = 3000, value_name = "MS")]
    timeout_ms: u64,
}

/// Runs `stockflow probe`.
pub async fn run(args: ProbeArgs) -> anyhow::Result<ExitCode> {
    let client = HttpClient::new(Duration::from_millis(args.timeout_ms));
    match client.send(hyper::Method::GET, &args.url, &[], hyper::body::Bytes::new()).await {
        Ok(r) if r.status.is_success() => Ok(ExitCode::SUCCESS),
        Ok(r) => {
            eprintln!("{}: {}", args.url, r.status);
            Ok(ExitCode::FAILURE)
        }
        Err(e) => {
            eprintln!("{}: {e}", args.url);
            Ok(ExitCode::FAILURE)
        }
    }
}
