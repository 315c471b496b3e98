//! `stockflow reconcile`: stockflow's state against Amazon's FBA inventory and the books, once or
//! `--every DURATION` (docs/reconcile.md). Exit status of a one-shot run: 0 within the
//! thresholds, 2 past one (alerted), 1 when the run failed.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use metrics_exporter_prometheus::PrometheusHandle;
use stockflow_connectors::Secret;
use stockflow_connectors::amazon::ledger::LedgerFilter;
use stockflow_connectors::amazon::{InventoryApi, Lwa, LwaCredentials};
use stockflow_pipeline::EmbeddedLog;

use crate::cmd::store::StoreArgs;
use crate::reconcile::report::{Outcome, Report};
use crate::reconcile::{AmazonSource, Job};
use crate::runtime::config::Settings;
use crate::runtime::{Embedded, shutdown_signal};

/// Arguments of `stockflow reconcile`.
#[derive(Debug, clap::Args)]
pub struct ReconcileArgs {
    /// Read Amazon's counts from this FBA inventory ledger summary report
    /// (`GET_LEDGER_SUMMARY_VIEW_DATA`, tab-separated, plain or gzip) instead of the Inventory API.
    #[arg(long, value_name = "FILE")]
    ledger: Option<PathBuf>,
    /// Put a `stock_counted` event (id `recon:{as_of}:{sku}`) for every unexplained SKU Amazon
    /// lists, setting stockflow's on_hand to Amazon's count. Off by default: read-only.
    #[arg(long)]
    apply: bool,
    /// Run again every DURATION (`15m`, `1h`, `1d`) until SIGINT/SIGTERM.
    #[arg(long, value_name = "DURATION")]
    pub(crate) every: Option<String>,
    /// The instant compared (RFC 3339) instead of Amazon's newest `lastUpdatedTime`.
    #[arg(long, value_name = "TIME")]
    as_of: Option<String>,
    /// Where reconcile.json, reconcile.csv and reconcile.html go (overrides `reconcile.out_dir`).
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Serve /metrics (and /healthz) here while `--every` runs.
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
    /// With --apply on DynamoDB: the Kinesis stream the counts go to (overrides `kinesis.stream`).
    #[arg(long, env = "STOCKFLOW_STREAM", value_name = "NAME")]
    stream: Option<String>,
    /// Kinesis endpoint override (overrides `kinesis.endpoint`).
    #[arg(long, env = "KINESIS_ENDPOINT", value_name = "URL")]
    kinesis_endpoint: Option<String>,
    #[command(flatten)]
    kafka: crate::runtime::kafka::KafkaArgs,
    #[command(flatten)]
    store: StoreArgs,
}

#[derive(serde::Deserialize)]
struct LwaSecret {
    client_id: String,
    client_secret: String,
    refresh_token: String,
}

/// The LWA credentials from `reconcile.credentials`.
async fn read_lwa(settings: &Settings) -> anyhow::Result<LwaSecret> {
    let source = &settings.reconcile.credentials;
    if !source.is_set() {
        bail!("reconcile.credentials is not set: the LWA client id, secret and refresh token (docs/reconcile.md)");
    }
    let raw = crate::runtime::connectors::load_credential(source, "reconcile.credentials").await?;
    serde_json::from_str(&raw.expose())
        .context("reconcile.credentials: expected JSON {\"client_id\", \"client_secret\", \"refresh_token\"}")
}

/// Re-reads the LWA credentials before a scheduled run, so a rotated client secret (every 180
/// days) or a new refresh token reaches a running schedule; a failed read keeps the old ones.
async fn refresh_lwa(job: &Job, settings: &Settings) {
    let AmazonSource::Api(api) = &job.amazon else { return };
    match read_lwa(settings).await {
        Ok(fresh) => {
            let c = api.lwa().credentials();
            let changed = c.client_id.expose() != fresh.client_id
                || c.client_secret.expose() != fresh.client_secret
                || c.refresh_token.expose() != fresh.refresh_token;
            if changed {
                c.client_id.replace(fresh.client_id);
                c.client_secret.replace(fresh.client_secret);
                c.refresh_token.replace(fresh.refresh_token);
                api.lwa().invalidate().await;
                tracing::info!("the LWA credentials changed: a new access token will be fetched");
            }
        }
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "re-reading the LWA credentials failed; keeping the old ones")
        }
    }
}

/// The job the settings and arguments describe.
async fn job(args: &ReconcileArgs, settings: &Settings) -> anyhow::Result<Job> {
    let r = &settings.reconcile;
    let timeout = Duration::from_millis(r.timeout_ms);
    let amazon = match &args.ledger {
        Some(path) => AmazonSource::Ledger(path.clone(), LedgerFilter { location: r.ledger_location.clone() }),
        None => {
            let marketplace = r.marketplace_id.clone().or_else(|| settings.amazon.marketplace_id.clone()).context(
                "reconcile.marketplace_id (or ingest.marketplace_id) is required to read the Inventory API; \
                 or pass --ledger FILE",
            )?;
            let secret = read_lwa(settings).await?;
            let lwa = Lwa::new(
                r.lwa_endpoint.clone(),
                LwaCredentials {
                    client_id: Secret::new(secret.client_id),
                    client_secret: Secret::new(secret.client_secret),
                    refresh_token: Secret::new(secret.refresh_token),
                },
                timeout,
            );
            AmazonSource::Api(Box::new(InventoryApi::new(r.endpoint.clone(), marketplace, lwa, timeout)))
        }
    };
    // Only the books and the alert webhook: the manufacturer's credentials are not read.
    let mut section = settings.connectors.clone();
    section.manufacturer.url = None;
    let connectors =
        crate::runtime::connectors::Connectors::build(&section, settings.engine.windows.allowed_lateness_ms()).await?;
    let as_of_ms = match &args.as_of {
        Some(t) => Some(
            t.parse::<jiff::Timestamp>().with_context(|| format!("--as-of {t:?}: expected RFC 3339"))?.as_millisecond(),
        ),
        None => None,
    };
    Ok(Job {
        amazon,
        books: connectors.accounting.clone(),
        webhook: connectors.webhook.clone(),
        currency: settings.connectors.accounting.base_currency.clone(),
        books_since: r.books_since.clone(),
        opening_value: r.opening_inventory_value,
        thresholds: r.thresholds(),
        out_dir: args.out.clone().unwrap_or_else(|| settings.reconcile_dir()),
        as_of_ms,
    })
}

/// One run against the store (and stream) the arguments name.
async fn once(job: &Job, args: &ReconcileArgs, settings: &Settings) -> anyhow::Result<Report> {
    if !args.store.dynamodb {
        // The data directory is locked for the run only, so `--every` leaves it free in between.
        let backend = Embedded::open(settings, true)?;
        let source = format!("embedded:{}", settings.data_dir.display());
        let producer = args.apply.then_some(&backend.log);
        return job.run(backend.store.as_ref(), &source, producer).await;
    }
    let store = args.store.dynamo(settings).await;
    let source = format!("dynamodb:{}", args.store.table_prefix.as_deref().unwrap_or(&settings.dynamodb.table_prefix));
    if !args.apply {
        return job.run(&store, &source, None::<&EmbeddedLog>).await;
    }
    if let Some(target) = args.kafka.clone().target(&settings.kafka)? {
        crate::runtime::kafka::require()?;
        #[cfg(feature = "kafka")]
        {
            let producer = crate::runtime::kafka::producer(&settings.kafka, &target).await?;
            return job.run(&store, &source, Some(&producer)).await;
        }
        #[cfg(not(feature = "kafka"))]
        let _ = target;
    }
    let stream = args
        .stream
        .clone()
        .or_else(|| settings.kinesis.stream.clone())
        .context("--apply on DynamoDB needs the stream the counts go to: --stream or kinesis.stream")?;
    let endpoint = args.kinesis_endpoint.clone().or_else(|| settings.kinesis.endpoint.clone());
    let client = stockflow_pipeline::kinesis::client(endpoint.as_deref(), false).await;
    let producer = stockflow_pipeline::kinesis::KinesisProducer::new(client, &stream);
    job.run(&store, &source, Some(&producer)).await
}

fn summary(r: &Report) {
    let t = &r.totals;
    let c = |name: &str| t.classes.get(name).copied().unwrap_or(0);
    println!(
        "reconcile as of {}: {} SKUs — {} match, {} timing, {} explained, {} unexplained ({} units, value {})",
        r.as_of,
        t.skus,
        c("match"),
        c("timing"),
        c("explained"),
        c("unexplained"),
        t.unexplained_units,
        t.unexplained_value
    );
    if let Some(v) = &r.value {
        let show = |d: Option<rust_decimal::Decimal>| d.map_or_else(|| "-".into(), |d| d.to_string());
        println!(
            "  value {}: stockflow {} (+ opening {}), books {} (difference {}); COGS stockflow {}, books {} (difference {})",
            v.currency,
            v.computed_value,
            v.opening_value,
            show(v.book_inventory),
            show(v.inventory_difference),
            v.stockflow_cogs,
            show(v.book_cogs),
            show(v.cogs_difference)
        );
    }
    for reason in &r.reasons {
        println!("  over threshold: {reason}");
    }
    if !r.applied.is_empty() {
        println!("  applied: {} stock_counted events on the stream", r.applied.len());
    }
}

/// Runs `stockflow reconcile`.
pub async fn run(
    args: ReconcileArgs,
    settings: Settings,
    metrics: Option<PrometheusHandle>,
) -> anyhow::Result<ExitCode> {
    let job = job(&args, &settings).await?;
    let Some(every) = &args.every else {
        let report = once(&job, &args, &settings).await?;
        summary(&report);
        println!("  report: {}", job.out_dir.join("reconcile.html").display());
        return Ok(if report.outcome == Outcome::Ok { ExitCode::SUCCESS } else { ExitCode::from(2) });
    };
    let every = crate::runtime::retention::parse_duration(every).context("--every")?;
    if every < Duration::from_secs(60) {
        bail!("--every: at least 1m (the Inventory API allows 2 requests a second)");
    }
    let mut stop = shutdown_signal();
    if let Some(addr) = args.metrics_listen {
        let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?;
        let bound = listener.local_addr()?;
        let handle = metrics.clone();
        let app = axum::Router::new()
            .route(
                "/metrics",
                axum::routing::get(move || std::future::ready(crate::telemetry::render(handle.as_ref()))),
            )
            .route("/healthz", axum::routing::get(|| std::future::ready("ok")));
        let mut server_stop = stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move { crate::server::stopped(&mut server_stop).await })
                .await;
        });
        println!("stockflow: reconcile every {every:?}, metrics on http://{bound}/metrics");
    }
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut first = true;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = crate::server::stopped(&mut stop) => return Ok(ExitCode::SUCCESS),
        }
        // The first run uses what `job` just read; later ones re-read the secret.
        if !std::mem::take(&mut first) {
            refresh_lwa(&job, &settings).await;
        }
        // A failed run is logged and counted (`stockflow_reconcile_last_outcome{outcome="failed"}`);
        // the schedule goes on.
        match once(&job, &args, &settings).await {
            Ok(report) => summary(&report),
            Err(e) => eprintln!("reconcile failed: {e:#}"),
        }
    }
}
