//! `stockflow demo`: a deterministic peak-season stream through the embedded log and shard
//! workers, with a progress bar, throughput, alerts, dead letters, lag, memory — and a check
//! of the stored result against a straight pass.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use stockflow_connectors::DrainControl;
use stockflow_connectors::testing::{FaultPlan, Receivers, Routes, check_deliveries, check_summaries};
use stockflow_pipeline::{OutRecord, Progress};
use stockflow_state::reference::{Outcome, straight_pass_full};

use crate::loadtest::generate::generate;
use crate::runtime::config::Settings;
use crate::runtime::{Embedded, shutdown_signal};

/// Arguments of `stockflow demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    #[command(flatten)]
    stream: crate::loadtest::generate::StreamArgs,
    /// Records per durable append of the producer.
    #[arg(long, default_value_t = 20_000)]
    append_batch: usize,
    /// Skip fdatasync on append (measures the pipeline, not the disk).
    #[arg(long)]
    no_fsync: bool,
    /// Reorder point for SKUs without one in the config (shows low-stock alerts; 0 = off).
    #[arg(long, default_value_t = 3)]
    reorder_point: i64,
    /// Also write the generated stream to this NDJSON file.
    #[arg(long, value_name = "FILE")]
    write_events: Option<PathBuf>,
    /// Percent of requests the local receivers fail (500s, 429s, resets, timeouts, accept-then-fail),
    /// to watch retries, the circuit breaker and idempotency keys at work (0 to 90).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=90))]
    faults: u32,
    /// Append at most this many events a second (0: as fast as possible), to watch the dashboard
    /// fill.
    #[arg(long, default_value_t = 0, value_name = "EVENTS_PER_S")]
    rate: u64,
    /// Address of the live dashboard (overrides `dashboard.listen`; a free port when taken).
    #[arg(long, env = "STOCKFLOW_DASHBOARD_LISTEN", value_name = "ADDR")]
    dashboard_listen: Option<std::net::SocketAddr>,
    /// After verifying, keep the dashboard up until Ctrl-C (the default on a terminal).
    #[arg(long, overrides_with = "no_hold")]
    hold: bool,
    /// Exit right after verifying (the default when stdout is not a terminal).
    #[arg(long)]
    no_hold: bool,
    /// Book one journal per shipment and receipt (`posting = "per_effect"`) instead of hourly
    /// summaries, to compare the two.
    #[arg(long)]
    per_effect: bool,
}

/// Runs the demo; exit code 1 when the stored state differs from the straight pass.
pub async fn run(
    args: DemoArgs,
    mut settings: Settings,
    explicit_dir: bool,
    metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
) -> anyhow::Result<ExitCode> {
    let _temp;
    if !explicit_dir {
        let dir = tempfile::Builder::new().prefix("stockflow-demo-").tempdir().context("creating a temp dir")?;
        settings.data_dir = dir.path().to_path_buf();
        _temp = dir;
    } else if settings.state_path().exists() {
        anyhow::bail!(
            "{} already holds a stockflow store: the demo needs a fresh directory",
            settings.data_dir.display()
        );
    }

    if settings.engine.default_reorder_point == 0 {
        let mut engine = (*settings.engine).clone();
        engine.default_reorder_point = args.reorder_point.max(0);
        settings.engine = Arc::new(engine);
    }
    let t = Instant::now();
    let stream = Arc::new(generate(&args.stream.to_config()));
    println!(
        "generated {} events over {} SKUs ({:.1} MB) in {:.2?}",
        stream.len(),
        stream.skus.len(),
        stream.bytes() as f64 / 1e6,
        t.elapsed()
    );
    if stream.is_empty() {
        anyhow::bail!("--events must be at least 1");
    }
    if let Some(path) = &args.write_events {
        let file = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
        stream.write_ndjson(std::io::BufWriter::new(file))?;
    }

    let backend = Arc::new(Embedded::open(&settings, !args.no_fsync)?);
    println!(
        "pipeline: embedded log with {} shards, state in {}",
        backend.log.shard_count(),
        settings.state_path().display()
    );
    let progress = Arc::new(Progress::default());
    let started = Instant::now();
    let producer = {
        let (backend, stream) = (Arc::clone(&backend), Arc::clone(&stream));
        let rate = args.rate;
        // Paced: about 20 appends a second; else the configured batch.
        let batch = if rate > 0 { (rate / 20).max(1) as usize } else { args.append_batch.max(1) };
        tokio::task::spawn_blocking(move || -> anyhow::Result<Duration> {
            let records: Vec<(&str, &[u8])> = stream.iter().collect();
            for (i, chunk) in records.chunks(batch).enumerate() {
                if rate > 0 {
                    // Open loop: a chunk is due when the records before it are, at `rate`,
                    // however long earlier appends took.
                    let due = started + Duration::from_secs_f64((i * batch) as f64 / rate as f64);
                    std::thread::sleep(due.saturating_duration_since(Instant::now()));
                }
                let out: Vec<OutRecord<'_>> = chunk.iter().map(|(k, p)| OutRecord { key: k, payload: p }).collect();
                backend.log.append(&out)?;
            }
            backend.log.seal();
            Ok(started.elapsed())
        })
    };
    // Connectors: every one not configured goes to a local receiver that behaves like the real one.
    let (_receivers_stop, receivers_stop) = tokio::sync::watch::channel(false);
    let receivers = Receivers::new(
        FaultPlan::chaos(args.faults, Duration::from_millis(400), args.stream.seed),
        Some(DEMO_WEBHOOK_KEY.to_vec()),
    );
    let (base, _) = receivers.start(receivers_stop).await.context("starting the local receivers")?;
    let (connectors, routes) = demo_connectors(&base, args.per_effect).await?;
    println!("connectors: {} (local receivers on {base}, {}% faults)", connectors.names().join(", "), args.faults);
    let (finish_tx, finish_rx) = tokio::sync::watch::channel(false);
    let drains = connectors.spawn(Arc::clone(&backend.store), DrainControl::new(shutdown_signal(), finish_rx));

    let (stop_dashboard, dashboard_stop) = tokio::sync::watch::channel(false);
    let (dashboard, dashboard_at) = crate::dashboard::start_in_process(
        Arc::clone(&backend.store),
        Arc::clone(&progress),
        &settings,
        args.dashboard_listen.unwrap_or(settings.dashboard.listen),
        true,
        metrics,
        dashboard_stop,
    )
    .await?;
    println!(
        "dashboard: http://{dashboard_at}/  (stock, alerts, throughput and lag, live{})",
        if args.rate == 0 { "; --rate 20000 paces the stream to watch it fill" } else { "" }
    );

    let consumers = {
        let (backend, settings, progress) = (Arc::clone(&backend), settings.clone(), Arc::clone(&progress));
        tokio::spawn(async move { backend.consume(&settings, shutdown_signal(), progress).await })
    };

    let bar = ProgressBar::new(stream.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} events  {per_sec}  {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let done = Arc::new(AtomicBool::new(false));
    let max_lag = {
        let (bar, progress, done) = (bar.clone(), Arc::clone(&progress), Arc::clone(&done));
        tokio::spawn(async move {
            let mut max_lag = 0u64;
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            while !done.load(Ordering::Relaxed) {
                tick.tick().await;
                let lag = progress.lag_bytes.load(Ordering::Relaxed);
                max_lag = max_lag.max(lag);
                bar.set_position(progress.read.load(Ordering::Relaxed));
                bar.set_message(format!(
                    "alerts+effects {}  dead letters {}  lag {:.1} MB",
                    progress.effects.load(Ordering::Relaxed),
                    progress.dead_letters.load(Ordering::Relaxed),
                    lag as f64 / 1e6
                ));
            }
            max_lag
        })
    };
    let append_time = producer.await.context("producer task")??;
    let reports = consumers.await.context("consumer task")??;
    let elapsed = started.elapsed();
    let _ = finish_tx.send(true);
    let (delivered, sync) = drains.join().await?;
    let delivery_time = started.elapsed();
    done.store(true, Ordering::Relaxed);
    let max_lag = max_lag.await.unwrap_or(0);
    bar.set_position(progress.read.load(Ordering::Relaxed));
    bar.finish();

    let applied: u64 = reports.iter().map(|r| r.stats.applied).sum();
    let duplicates: u64 = reports.iter().map(|r| r.stats.duplicates).sum();
    let late: u64 = reports.iter().map(|r| r.stats.late).sum();
    let windows: u64 = reports.iter().map(|r| r.stats.windows_final).sum();
    let commits: u64 = reports.iter().map(|r| r.commits).sum();
    let skus: usize = reports.iter().map(|r| r.skus).sum();
    let sku_mem: usize = reports.iter().map(|r| r.memory.skus).sum();
    let line_mem: usize = reports.iter().map(|r| r.memory.lines).sum();
    let dedup_mem: usize = reports.iter().map(|r| r.memory.dedup).sum();
    let dedup_ids: usize = reports.iter().map(|r| r.dedup_entries).sum();
    let rate = stream.len() as f64 / elapsed.as_secs_f64();
    println!(
        "processed {} events in {:.2?} ({:.0} events/s end to end; appended in {:.2?}), {} commits",
        stream.len(),
        elapsed,
        rate,
        append_time,
        commits
    );
    println!("applied {applied}, duplicates skipped {duplicates}, late for a window {late}, windows final {windows}");
    println!(
        "memory: {:.0} bytes/SKU ({skus} SKUs, incl. open windows) + {:.1} MB open order lines + {:.1} MB dedup \
         ({dedup_ids} live ids); max lag {:.1} MB",
        sku_mem as f64 / skus.max(1) as f64,
        line_mem as f64 / 1e6,
        dedup_mem as f64 / 1e6,
        max_lag as f64 / 1e6
    );

    let t = Instant::now();
    let actual = Outcome::of_store(backend.store.as_ref()).await?;
    let (expected, effects) = straight_pass_full(Arc::clone(&settings.engine), stream.iter().map(|(_, p)| p));

    let log = receivers.log();
    println!("delivery finished {:.2?} after the start:", delivery_time);
    for d in &delivered {
        if d.sent + d.failed > 0 {
            println!(
                "  {:<15} {:>8} effects in {:>6} requests ({} failed and retried, {} throttled, {} dead-lettered)",
                d.connector, d.effects, d.sent, d.failed, d.throttled, d.dead_lettered
            );
        }
    }
    let route = |r: &str| log.accepted_requests.get(r).copied().unwrap_or(0);
    println!(
        "receivers accepted: {} alerts ({} webhook calls, signatures verified); {} reorders ({} catalogue lookups); \
         {} journals; {} SKU stock levels{}",
        log.order.get("alerts").map_or(0, Vec::len),
        route("alerts"),
        log.order.get("reorders").map_or(0, Vec::len),
        log.catalog_lookups,
        log.order.get("generic").map_or(0, Vec::len),
        log.stock_levels.len(),
        if log.requests > 0 && log.faults > 0 {
            format!(
                "; {} of {} requests faulted, {} re-sends answered from the key",
                log.faults, log.requests, log.replays
            )
        } else {
            String::new()
        },
    );
    if let Some(s) = sync {
        tracing::debug!(batches = s.batches, levels = s.levels, "stock-level sync");
    }
    let mut delivery_problems = check_deliveries(&log, &effects, routes, 20);
    let postings = crate::cmd::journals::postings(backend.store.as_ref()).await?;
    let summary_policy = stockflow_connectors::journals::SummaryPolicy::new(
        stockflow_connectors::journals::PeriodLen::Hour,
        "UTC",
        settings.engine.windows.allowed_lateness_ms(),
    )
    .map_err(anyhow::Error::msg)?;
    let accounts = stockflow_connectors::accounting::Accounts {
        cogs: "5000".into(),
        inventory: "1300".into(),
        clearing: "2100".into(),
    };
    let books = check_summaries(&log, &postings, &effects, &summary_policy, &accounts);
    println!(
        "journals posted per period (summary posting, 1h in UTC; {} journal lines in {} journals, {} API calls):",
        postings.iter().map(|p| p.effects).sum::<u64>(),
        postings.len(),
        route("generic")
    );
    if args.per_effect {
        println!(
            "per-effect posting: {} journals in {} API calls",
            log.order.get("generic").map_or(0, Vec::len),
            route("generic")
        );
    }
    crate::cmd::journals::print_postings(&mut std::io::stdout().lock(), &postings)?;
    println!(
        "{} periods booked equal to the straight pass to the cent; {} not closed yet (their events are the last hour's, within the lateness)",
        books.posted_periods, books.open_periods
    );
    if !args.per_effect {
        delivery_problems.extend(books.problems);
    }
    let oversells = actual.alerts.iter().filter(|a| a.id().starts_with("oversell:")).count();
    println!(
        "alerts: {} ({} oversell, {} low stock); dead letters: {}",
        actual.alerts.len(),
        oversells,
        actual.alerts.len() - oversells,
        actual.dead_letters
    );
    let diff = expected.diff(&actual, 20);
    let fresh = dashboard_freshness(&dashboard, actual.skus.len()).await;
    println!(
        "dashboard: {} snapshots of up to {} SKUs, each read and built in ≤ {} ms; staleness ≤ {} ms; {} alerts followed",
        fresh.count,
        fresh.skus,
        fresh.max_build_ms,
        fresh.max_staleness_ms,
        {
            let (o, l) = dashboard.alert_counts();
            o + l
        }
    );
    if !delivery_problems.is_empty() {
        println!("DELIVERY MISMATCH against the straight pass's effects:");
        for line in &delivery_problems {
            println!("  {line}");
        }
    } else {
        println!(
            "delivery verified: every alert, reorder (and per-effect journal) accepted exactly once, per-SKU order kept; every summary journal once, its period's totals equal the straight pass"
        );
    }
    let ok = diff.is_empty() && delivery_problems.is_empty();
    use std::io::IsTerminal;
    let hold = args.hold || (!args.no_hold && std::io::stdout().is_terminal());
    if hold {
        println!("dashboard stays up at http://{dashboard_at}/ — Ctrl-C to exit");
        let mut stop = shutdown_signal();
        crate::server::stopped(&mut stop).await;
    }
    let _ = stop_dashboard.send(true);
    dashboard.close().await;
    if ok {
        println!(
            "verified in {:.2?}: {} SKUs, {} alerts and {} dead letters equal the straight pass",
            t.elapsed(),
            actual.skus.len(),
            actual.alerts.len(),
            actual.dead_letters
        );
        Ok(ExitCode::SUCCESS)
    } else {
        if !diff.is_empty() {
            println!("MISMATCH against the straight pass:");
        }
        for line in diff {
            println!("  {line}");
        }
        Ok(ExitCode::FAILURE)
    }
}

/// The dashboard's freshness once it has shown the final state: waits (bounded) for a snapshot
/// holding every SKU, so the figures cover the whole run.
async fn dashboard_freshness(dashboard: &crate::dashboard::Dashboard, skus: usize) -> crate::dashboard::SnapshotStats {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    loop {
        let stats = dashboard.stats();
        if stats.skus >= skus || Instant::now() >= deadline {
            return stats;
        }
        tick.tick().await;
    }
}

/// The demo's webhook signing key (its receiver verifies with the same key).
const DEMO_WEBHOOK_KEY: &[u8] = b"stockflow-demo-signing-key-32byt";

/// Every connector pointed at the local receivers, and the receiver routes to check.
async fn demo_connectors(
    base: &str,
    per_effect: bool,
) -> anyhow::Result<(crate::runtime::connectors::Connectors, Routes)> {
    use base64::Engine as _;
    // The demo's stream is synthetic: it always goes to the local receivers, never to an
    // endpoint configured for real use.
    let key = base64::engine::general_purpose::STANDARD.encode(DEMO_WEBHOOK_KEY);
    let local = |v: String| stockflow_connectors::config::CredentialSource { value: Some(v), ..Default::default() };
    let mut c = stockflow_connectors::config::ConnectorsSection { log: false, ..Default::default() };
    c.alerts_webhook.url = Some(format!("{base}/alerts"));
    c.alerts_webhook.secret = local(format!("whsec_{key}"));
    c.manufacturer.url = Some(format!("{base}/manufacturer"));
    c.manufacturer.stock_sync_interval_s = 1;
    c.accounting.url = Some(format!("{base}/generic"));
    // The demo's stream is one day: hourly summaries show periods closing (the last stays open).
    c.accounting.period = stockflow_connectors::journals::PeriodLen::Hour;
    c.delivery.max_batch = 1000;
    c.delivery.linger_ms = 20;
    c.delivery.poll_ms = 20;
    c.delivery.timeout_ms = 1000;
    c.delivery.backoff_base_ms = 20;
    c.delivery.backoff_cap_ms = 1000;
    c.delivery.breaker_open_ms = 200;
    c.delivery.breaker_max_open_ms = 2000;
    c.delivery.max_attempts = 1_000;
    // Summaries are checked per period by `check_summaries`; per-effect journals one by one.
    if per_effect {
        c.accounting.posting = stockflow_connectors::config::Posting::PerEffect;
    }
    let routes = Routes { alerts: true, reorders: true, accounting: per_effect.then_some("generic") };
    Ok((
        crate::runtime::connectors::Connectors::build(
            &c,
            stockflow_state::windows::WindowConfig::default().allowed_lateness_ms(),
        )
        .await?,
        routes,
    ))
}
