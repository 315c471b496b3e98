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
use stockflow_pipeline::{OutRecord, Progress};
use stockflow_state::reference::{Outcome, straight_pass};

use crate::commands::{Embedded, shutdown_signal};
use crate::config::Settings;
use crate::generate::{GenConfig, generate};

/// The generated stream's shape.
#[derive(Debug, Clone, clap::Args)]
pub struct StreamArgs {
    /// Number of events.
    #[arg(long, default_value_t = 1_000_000)]
    pub events: usize,
    /// Number of SKUs.
    #[arg(long, default_value_t = 10_000)]
    pub skus: usize,
    /// Seed of the deterministic generator.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

impl StreamArgs {
    /// The generator configuration.
    pub fn to_config(&self) -> GenConfig {
        GenConfig { events: self.events, skus: self.skus.max(1), seed: self.seed, ..GenConfig::default() }
    }
}

/// Arguments of `stockflow demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    #[command(flatten)]
    stream: StreamArgs,
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
}

/// Runs the demo; exit code 1 when the stored state differs from the straight pass.
pub async fn run(args: DemoArgs, mut settings: Settings, explicit_dir: bool) -> anyhow::Result<ExitCode> {
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
        let batch = args.append_batch.max(1);
        tokio::task::spawn_blocking(move || -> anyhow::Result<Duration> {
            let records: Vec<(&str, &[u8])> = stream.iter().collect();
            for chunk in records.chunks(batch) {
                let out: Vec<OutRecord<'_>> = chunk.iter().map(|(k, p)| OutRecord { key: k, payload: p }).collect();
                backend.log.append(&out)?;
            }
            backend.log.seal();
            Ok(started.elapsed())
        })
    };
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
    let expected = straight_pass(Arc::clone(&settings.engine), stream.iter().map(|(_, p)| p));
    let oversells = actual.alerts.iter().filter(|a| a.id().starts_with("oversell:")).count();
    println!(
        "alerts: {} ({} oversell, {} low stock); dead letters: {}",
        actual.alerts.len(),
        oversells,
        actual.alerts.len() - oversells,
        actual.dead_letters
    );
    let diff = expected.diff(&actual, 20);
    if diff.is_empty() {
        println!(
            "verified in {:.2?}: {} SKUs, {} alerts and {} dead letters equal the straight pass",
            t.elapsed(),
            actual.skus.len(),
            actual.alerts.len(),
            actual.dead_letters
        );
        Ok(ExitCode::SUCCESS)
    } else {
        println!("MISMATCH against the straight pass:");
        for line in diff {
            println!("  {line}");
        }
        Ok(ExitCode::FAILURE)
    }
}
