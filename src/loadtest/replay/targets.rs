//! Starting a replay's target: its lanes, where the consumers' progress and the final state are
//! read, and how it is stopped.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use anyhow::{Context, bail};
use axum::body::Bytes;
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use stockflow_connectors::connector::HttpClient;
use stockflow_pipeline::Progress;
use stockflow_state::dynamodb::DynamoStore;
use stockflow_state::embedded::RedbStore;
use stockflow_state::reference::Outcome;
use tokio::io::AsyncBufReadExt;
use tokio::sync::watch;

use stockflow_pipeline::batcher::Batching;

use super::drive::{Counted, HttpSink, Probe, Sink, StreamSink};
use super::{CliContext, ReplayArgs, Target};
use crate::dashboard::Telemetry;
use crate::runtime::Embedded;
use crate::runtime::config::Settings;

/// A started target.
#[derive(Debug)]
pub struct Setup {
    /// One sink per lane.
    pub lanes: Vec<Sink>,
    /// The consumers' progress.
    pub probe: Probe,
    /// The final state.
    pub reader: Reader,
    /// Stops it.
    pub teardown: Teardown,
}

/// Where the final state is read.
#[derive(Debug)]
pub enum Reader {
    /// The embedded store of this process.
    Embedded(Arc<RedbStore>),
    /// The DynamoDB tables.
    Dynamo(Arc<DynamoStore>),
    /// A dashboard's `/api/outcome`.
    Http(Box<HttpClient>, String),
}

impl Reader {
    /// Reads every SKU summary, alert and the dead-letter count.
    pub async fn read(&self) -> anyhow::Result<Outcome> {
        match self {
            Reader::Embedded(s) => Ok(Outcome::of_store(&**s).await?),
            Reader::Dynamo(s) => Ok(Outcome::of_store(&**s).await?),
            Reader::Http(client, url) => {
                let r = client
                    .send(hyper::Method::GET, url, &[], Bytes::new())
                    .await
                    .map_err(|e| anyhow::anyhow!("GET {url}: {e}"))?;
                if !r.status.is_success() {
                    bail!("GET {url}: {} {}", r.status, String::from_utf8_lossy(&r.body));
                }
                serde_json::from_slice(&r.body).with_context(|| format!("GET {url}: not an outcome"))
            }
        }
    }
}

/// What stops a target, and what it counted.
#[derive(Debug)]
pub struct Teardown {
    shutdown: Option<watch::Sender<bool>>,
    consumers: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    child: Option<tokio::process::Child>,
    dynamo: Option<Arc<DynamoStore>>,
    /// The producer's puts, counted, under their name in the report.
    put_calls: Option<(&'static str, Arc<std::sync::atomic::AtomicU64>)>,
    _dir: Option<tempfile::TempDir>,
}

impl Teardown {
    /// Stops the consumers (or the child `stockflow run`); returns the AWS calls counted, if any.
    pub async fn stop(mut self) -> Option<serde_json::Value> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(true);
        }
        if let Some(task) = self.consumers.take() {
            match task.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "the consumers stopped with an error"),
                Err(e) => tracing::warn!(error = %e, "the consumer task failed"),
            }
        }
        if let Some(mut child) = self.child.take() {
            if let Some(pid) = child.id() {
                let _ = tokio::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status().await;
            }
            if tokio::time::timeout(Duration::from_secs(60), child.wait()).await.is_err() {
                let _ = child.kill().await;
            }
        }
        let (put_name, puts) = self.put_calls.map_or(("kinesis_put_records", 0), |(n, c)| (n, c.load(Relaxed)));
        self.dynamo.map(|s| {
            let st = s.stats();
            let mut calls = json!({
                "dynamodb_transactions": st.transactions.load(Relaxed),
                "dynamodb_reads": st.reads.load(Relaxed),
                "dynamodb_lease_writes": st.lease_calls.load(Relaxed),
                "dynamodb_lease_renewals": st.lease_renewals.load(Relaxed),
                "dynamodb_lease_scans": st.lease_scans.load(Relaxed),
            });
            calls[put_name] = json!(puts);
            calls
        })
    }
}

/// Starts `target`.
pub async fn start(
    target: &Target,
    args: &ReplayArgs,
    settings: &Settings,
    cli: &CliContext,
    report_dir: &Path,
    metrics: Option<PrometheusHandle>,
) -> anyhow::Result<Setup> {
    let lanes = args.connections as usize;
    match target {
        Target::Embedded => embedded(settings, cli, lanes, metrics),
        Target::Local => local(args, cli, report_dir, lanes).await,
        Target::Http(url) => {
            let url = ingest_url(url);
            let metrics_urls = if args.metrics_urls.is_empty() {
                vec![format!("{}/metrics", base_of(&url))]
            } else {
                args.metrics_urls.clone()
            };
            let dashboard = match &args.dashboard {
                Some(d) => d.trim_end_matches('/').to_string(),
                None => {
                    let base = base_of(&url);
                    let host = base.rsplit_once(':').map_or(base.as_str(), |(h, _)| h);
                    format!("{host}:8090")
                }
            };
            http(&url, &dashboard, metrics_urls, args.secret.as_deref(), lanes, teardown_none()).await
        }
        Target::Kinesis(stream) => kinesis(stream, args, settings, cli, lanes, metrics).await,
        #[cfg(feature = "kafka")]
        Target::Kafka(topic) => kafka(topic, args, settings, cli, lanes, metrics).await,
        #[cfg(not(feature = "kafka"))]
        Target::Kafka(_) => Err(crate::runtime::kafka::not_built()),
    }
}

fn teardown_none() -> Teardown {
    Teardown { shutdown: None, consumers: None, child: None, dynamo: None, put_calls: None, _dir: None }
}

/// `http://host:port` → `http://host:port/v1/events`; a URL with a path is kept.
fn ingest_url(url: &str) -> String {
    let rest = url.trim_end_matches('/').strip_prefix("http://").unwrap_or(url);
    if rest.contains('/') { format!("http://{rest}") } else { format!("http://{rest}/v1/events") }
}

fn base_of(url: &str) -> String {
    let rest = url.strip_prefix("http://").unwrap_or(url);
    format!("http://{}", rest.split('/').next().unwrap_or(rest))
}

fn secret_key(secret: Option<&str>) -> anyhow::Result<Option<Arc<Vec<u8>>>> {
    secret
        .map(|s| stockflow_connectors::alerts::decode_secret(s).map(Arc::new))
        .transpose()
        .map_err(|e| anyhow::anyhow!("--secret: {e}"))
}

async fn http(
    url: &str,
    dashboard: &str,
    metrics_urls: Vec<String>,
    secret: Option<&str>,
    lanes: usize,
    teardown: Teardown,
) -> anyhow::Result<Setup> {
    let key = secret_key(secret)?;
    let mut sinks = Vec::with_capacity(lanes);
    for k in 0..lanes {
        sinks.push(Sink::Http(HttpSink::new(url, key.clone(), k).await?));
    }
    Ok(Setup {
        lanes: sinks,
        probe: Probe {
            telemetry: Telemetry::Scrape {
                client: Box::new(HttpClient::new(Duration::from_secs(5))),
                urls: metrics_urls,
            },
            metrics: None,
        },
        // A whole store's outcome: ~300 bytes a SKU, ~30 MB at 100,000 SKUs.
        reader: Reader::Http(
            Box::new(HttpClient::new(Duration::from_secs(300)).with_max_response(OUTCOME_MAX_BYTES)),
            format!("{dashboard}/api/outcome"),
        ),
        teardown,
    })
}

/// Largest `/api/outcome` the verifier reads (about 3 million SKUs).
const OUTCOME_MAX_BYTES: usize = 1 << 30;

fn embedded(
    settings: &Settings,
    cli: &CliContext,
    lanes: usize,
    metrics: Option<PrometheusHandle>,
) -> anyhow::Result<Setup> {
    // A fresh directory: the explicit `--data-dir` if it holds no store yet, else a temp one.
    let mut settings = settings.clone();
    let temp = match &cli.data_dir {
        Some(dir) => {
            settings.data_dir = dir.clone();
            if settings.state_path().exists() {
                bail!("{} already holds a stockflow store: a replay needs a fresh directory", dir.display());
            }
            None
        }
        None => {
            let t = tempfile::Builder::new().prefix("stockflow-replay-").tempdir().context("creating a temp dir")?;
            settings.data_dir = t.path().to_path_buf();
            Some(t)
        }
    };
    let backend = Arc::new(Embedded::open(&settings, true)?);
    let progress = Arc::new(Progress::default());
    let (tx, rx) = watch::channel(false);
    let log = Arc::new(Batching::new(Arc::new(backend.log.clone()), settings.ingest_batch));
    let consumers = {
        let (backend, progress) = (Arc::clone(&backend), Arc::clone(&progress));
        tokio::spawn(async move { backend.consume(&settings, rx, progress).await.map(|_| ()) })
    };
    Ok(Setup {
        lanes: (0..lanes).map(|_| Sink::Log(StreamSink::new(Arc::clone(&log)))).collect(),
        probe: Probe { telemetry: Telemetry::InProcess(progress), metrics },
        reader: Reader::Embedded(Arc::clone(&backend.store)),
        teardown: Teardown {
            shutdown: Some(tx),
            consumers: Some(consumers),
            child: None,
            dynamo: None,
            put_calls: None,
            _dir: temp,
        },
    })
}

/// Starts `stockflow run` on a fresh data directory and free loopback ports; its log goes to
/// `run.log` in the report directory.
async fn local(args: &ReplayArgs, cli: &CliContext, report_dir: &Path, lanes: usize) -> anyhow::Result<Setup> {
    let temp = tempfile::Builder::new().prefix("stockflow-replay-").tempdir().context("creating a temp dir")?;
    let exe = std::env::current_exe().context("locating the stockflow binary")?;
    let log_path = report_dir.join("run.log");
    let log = std::fs::File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let mut cmd = tokio::process::Command::new(exe);
    if let Some(cfg) = &cli.config {
        cmd.arg("--config").arg(cfg);
    }
    if let Some(n) = cli.shards {
        cmd.arg("--shards").arg(n.to_string());
    }
    let ready_file = temp.path().join("ready.json");
    cmd.arg("--data-dir")
        .arg(temp.path().join("data"))
        .args(["run", "--listen", "127.0.0.1:0", "--dashboard-listen", "127.0.0.1:0", "--ready-file"])
        .arg(&ready_file)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(log)
        .kill_on_drop(true);
    if let Some(secret) = &args.secret {
        cmd.env("STOCKFLOW_WEBHOOK_SECRETS", secret);
    }
    let mut child = cmd.spawn().context("starting stockflow run")?;
    let stdout = child.stdout.take().context("stockflow run's stdout")?;
    let mut line = String::new();
    let mut reader = tokio::io::BufReader::new(stdout);
    match tokio::time::timeout(Duration::from_secs(60), reader.read_line(&mut line)).await {
        Ok(Ok(n)) if n > 0 => {}
        _ => bail!("stockflow run did not start (see {})", log_path.display()),
    }
    // The banner line says it is serving; the ready file, written before it, says where.
    let crate::runtime::Ready { ingest, dashboard, .. } = crate::runtime::Ready::read(&ready_file)
        .with_context(|| format!("stockflow run said {line:?} but left no ready file"))?;
    // Keep draining its stdout so it never blocks on a full pipe.
    tokio::spawn(async move {
        let mut sink = tokio::io::sink();
        let _ = tokio::io::copy(&mut reader, &mut sink).await;
    });
    let teardown = Teardown {
        shutdown: None,
        consumers: None,
        child: Some(child),
        dynamo: None,
        put_calls: None,
        _dir: Some(temp),
    };
    http(
        &format!("http://{ingest}/v1/events"),
        &format!("http://{dashboard}"),
        vec![format!("http://{ingest}/metrics")],
        args.secret.as_deref(),
        lanes,
        teardown,
    )
    .await
}

/// The DynamoDB tables of `--table-prefix` (created when missing), refused unless empty: the
/// result is compared with a straight pass from nothing, so earlier state would be a difference.
async fn fresh_store(args: &ReplayArgs, settings: &Settings, stream_word: &str) -> anyhow::Result<Arc<DynamoStore>> {
    let prefix = args.table_prefix.clone().unwrap_or_else(|| settings.dynamodb.table_prefix.clone());
    let dynamo_endpoint = args.dynamodb_endpoint.clone().or_else(|| settings.dynamodb.endpoint.clone());
    let store = Arc::new(DynamoStore::new(DynamoStore::client(dynamo_endpoint.as_deref()).await, &prefix));
    store.setup().await.context("creating the DynamoDB tables")?;
    let before = Outcome::of_store(&*store).await.context("reading the DynamoDB tables")?;
    if !before.skus.is_empty() || !before.alerts.is_empty() {
        bail!(
            "the tables with prefix {prefix:?} already hold {} SKUs: give a fresh --table-prefix (and a fresh {stream_word})",
            before.skus.len()
        );
    }
    Ok(store)
}

/// Puts on a Kinesis stream (created when missing) and consumes it in this process as a group
/// member, with state, checkpoints and leases in DynamoDB (tables created when missing).
async fn kinesis(
    stream: &str,
    args: &ReplayArgs,
    settings: &Settings,
    cli: &CliContext,
    lanes: usize,
    metrics: Option<PrometheusHandle>,
) -> anyhow::Result<Setup> {
    use stockflow_pipeline::kinesis::{self, KinesisProducer};
    let endpoint = args.kinesis_endpoint.clone().or_else(|| settings.kinesis.endpoint.clone());
    let client = kinesis::client(endpoint.as_deref(), false).await;
    stockflow_pipeline::kinesis::admin::ensure_stream(
        &client,
        stream,
        cli.shards.unwrap_or(settings.shards).max(1) as i32,
    )
    .await?;
    let store = fresh_store(args, settings, "stream").await?;
    let progress = Arc::new(Progress::default());
    let coordinator =
        crate::runtime::group::member(settings, client.clone(), stream, Arc::clone(&store), Arc::clone(&progress))
            .await?;
    let (tx, rx) = watch::channel(false);
    let consumers = tokio::spawn(async move { coordinator.run(rx).await.map(|_| ()).map_err(anyhow::Error::from) });
    let calls = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counted = Counted::new(KinesisProducer::new(client, stream), Arc::clone(&calls));
    let producer = Arc::new(Batching::new(Arc::new(counted), settings.ingest_batch));
    Ok(Setup {
        lanes: (0..lanes).map(|_| Sink::Kinesis(StreamSink::new(Arc::clone(&producer)))).collect(),
        probe: Probe { telemetry: Telemetry::InProcess(progress), metrics },
        reader: Reader::Dynamo(Arc::clone(&store)),
        teardown: Teardown {
            shutdown: Some(tx),
            consumers: Some(consumers),
            child: None,
            dynamo: Some(store),
            put_calls: Some(("kinesis_put_records", calls)),
            _dir: None,
        },
    })
}

/// Puts on a Kafka topic of the `[kafka]` brokers (created when missing) and consumes it in this
/// process as a member of its Kafka group, state and leases in DynamoDB (tables created when
/// missing). The tables must be fresh: the result is compared with a straight pass from nothing.
#[cfg(feature = "kafka")]
async fn kafka(
    topic: &str,
    args: &ReplayArgs,
    settings: &Settings,
    cli: &CliContext,
    lanes: usize,
    metrics: Option<PrometheusHandle>,
) -> anyhow::Result<Setup> {
    let target = crate::runtime::kafka::KafkaTarget::resolve(&settings.kafka, true, None, Some(topic.to_string()))?
        .context("kafka target")?;
    let partitions =
        crate::runtime::kafka::ensure_topic(&settings.kafka, &target, cli.shards.unwrap_or(settings.shards)).await?;
    tracing::info!(topic, partitions, brokers = %target.brokers, "replaying onto Kafka");
    let store = fresh_store(args, settings, "topic").await?;
    let progress = Arc::new(Progress::default());
    let member =
        crate::runtime::group::kafka_member(settings, &target, Arc::clone(&store), Arc::clone(&progress)).await?;
    let (tx, rx) = watch::channel(false);
    let consumers = tokio::spawn(async move { member.run(rx).await.map(|_| ()).map_err(anyhow::Error::from) });
    let calls = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counted = Counted::new(crate::runtime::kafka::producer(&settings.kafka, &target).await?, Arc::clone(&calls));
    let producer = Arc::new(Batching::new(Arc::new(counted), settings.ingest_batch));
    Ok(Setup {
        lanes: (0..lanes).map(|_| Sink::Kafka(StreamSink::new(Arc::clone(&producer)))).collect(),
        probe: Probe { telemetry: Telemetry::InProcess(progress), metrics },
        reader: Reader::Dynamo(Arc::clone(&store)),
        teardown: Teardown {
            shutdown: Some(tx),
            consumers: Some(consumers),
            child: None,
            dynamo: Some(store),
            put_calls: Some(("kafka_put_batches", calls)),
            _dir: None,
        },
    })
}
