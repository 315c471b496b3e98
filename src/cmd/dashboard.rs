//! `stockflow dashboard`: the live dashboard over a stopped embedded store or the AWS tables.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

use metrics_exporter_prometheus::PrometheusHandle;

use crate::runtime::config::Settings;
use crate::runtime::{Embedded, shutdown_signal};

/// Arguments of `stockflow dashboard`.
#[derive(Debug, clap::Args)]
pub struct DashboardArgs {
    /// Address to serve on (overrides `dashboard.listen`).
    #[arg(long, env = "STOCKFLOW_DASHBOARD_LISTEN", value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// Read the AWS deployment's DynamoDB tables (every consumer-group member's SKUs) instead of
    /// the embedded store of the data directory.
    #[arg(long)]
    dynamodb: bool,
    /// DynamoDB endpoint override (overrides `dynamodb.endpoint`), e.g. a local emulator.
    #[arg(long, env = "DYNAMODB_ENDPOINT", value_name = "URL")]
    dynamodb_endpoint: Option<String>,
    /// Table name prefix (overrides `dynamodb.table_prefix`).
    #[arg(long, env = "STOCKFLOW_TABLE_PREFIX", value_name = "PREFIX")]
    table_prefix: Option<String>,
    /// A group member's metrics URL (`consume --metrics-listen`), for the throughput and lag
    /// charts; repeat for each member.
    #[arg(long, value_name = "URL")]
    scrape: Vec<String>,
    /// Pause between two reads of every SKU state, ms (overrides `dashboard.refresh_ms`; with
    /// --dynamodb the default is 10,000: each read is a Scan of the state table).
    #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(100..=3_600_000))]
    refresh_ms: Option<u64>,
}

/// `stockflow dashboard`: the dashboard alone, over the embedded store of a stopped stockflow
/// (`run` serves its own) or over the AWS deployment's tables, until SIGINT/SIGTERM.
pub async fn run(
    args: DashboardArgs,
    settings: Settings,
    metrics: Option<PrometheusHandle>,
) -> anyhow::Result<ExitCode> {
    let shutdown = shutdown_signal();
    let listen = args.listen.unwrap_or(settings.dashboard.listen);
    let sizes = settings.engine.windows.sizes_ms().to_vec();
    let telemetry = if args.scrape.is_empty() {
        crate::dashboard::Telemetry::None
    } else {
        crate::dashboard::Telemetry::Scrape {
            client: Box::new(stockflow_connectors::connector::HttpClient::new(std::time::Duration::from_secs(2))),
            urls: args.scrape.clone(),
        }
    };
    let mut cfg = crate::dashboard::DashboardConfig::from_section(&settings.dashboard);
    cfg.reconcile_report = Some(settings.reconcile_dir().join("reconcile.json"));
    cfg.refresh = std::time::Duration::from_millis(args.refresh_ms.unwrap_or(if args.dynamodb {
        10_000.max(settings.dashboard.refresh_ms)
    } else {
        settings.dashboard.refresh_ms
    }));
    if args.dynamodb {
        cfg.alert_poll = cfg.alert_poll.max(std::time::Duration::from_secs(2));
    }
    let (dashboard, _embedded) = if args.dynamodb {
        let endpoint = args.dynamodb_endpoint.or_else(|| settings.dynamodb.endpoint.clone());
        let prefix = args.table_prefix.unwrap_or_else(|| settings.dynamodb.table_prefix.clone());
        let store = Arc::new(stockflow_state::dynamodb::DynamoStore::new(
            stockflow_state::dynamodb::DynamoStore::client(endpoint.as_deref()).await,
            &prefix,
        ));
        let d = crate::dashboard::Dashboard::start(Arc::clone(&store), telemetry, sizes, cfg, shutdown.clone());
        d.follow_group(store, std::time::Duration::from_secs(2));
        (d, None)
    } else {
        if !settings.state_path().exists() {
            anyhow::bail!("no stockflow store in {} (--data-dir, or --dynamodb for AWS)", settings.data_dir.display());
        }
        let backend = Embedded::open(&settings, false).map_err(|e| {
            e.context("the dashboard of a running `stockflow run` is served by that process (see its first line)")
        })?;
        let store = Arc::clone(&backend.store);
        let d = crate::dashboard::Dashboard::start(store, telemetry, sizes, cfg, shutdown.clone());
        (d, Some(backend))
    };
    let at =
        crate::server::serve(listen, false, crate::dashboard::router(dashboard, metrics), shutdown.clone()).await?;
    println!("stockflow: dashboard on http://{at}/");
    let mut stop = shutdown;
    crate::server::stopped(&mut stop).await;
    Ok(ExitCode::SUCCESS)
}
