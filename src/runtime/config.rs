//! Configuration: a TOML file (`--config`, `STOCKFLOW_CONFIG`) with every field defaulted,
//! overridden by flags and environment variables, validated once into [`Settings`].
//!
//! Longer than most files here: every section of the file format is defined in this one place
//! (about 490 lines), and its tests — env overrides, the example file's completeness — follow it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use stockflow_pipeline::WorkerConfig;
use stockflow_pipeline::batcher::BatchConfig;
use stockflow_pipeline::group::GroupConfig;
use stockflow_state::EngineConfig;
use stockflow_state::windows::WindowConfig;

/// The configuration file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileConfig {
    /// Directory of the embedded log (`log/`) and state store (`state.redb`).
    pub data_dir: PathBuf,
    /// Shards of the embedded log; fixed when the log is created.
    pub shards: usize,
    /// Stock rules.
    pub engine: EngineSection,
    /// Commit cadence.
    pub worker: WorkerSection,
    /// The HTTP server of `stockflow run`.
    pub ingest: IngestSection,
    /// The DynamoDB state store of the AWS deployment.
    pub dynamodb: DynamoSection,
    /// The Kinesis stream of the AWS deployment.
    pub kinesis: KinesisSection,
    /// The Kafka / Amazon MSK backend (feature `kafka`).
    pub kafka: KafkaSection,
    /// The consumer group (leases) of the AWS deployment.
    pub group: GroupSection,
    /// Where effects are delivered (alerts, manufacturer, accounting).
    pub connectors: stockflow_connectors::config::ConnectorsSection,
    /// The live dashboard of `run`, `demo` and `dashboard`.
    pub dashboard: DashboardSection,
    /// How long consumed log segments and delivered effects are kept.
    pub retention: crate::runtime::retention::RetentionSection,
    /// Metrics for CloudWatch alarms (Embedded Metric Format lines on stdout).
    pub cloudwatch: CloudwatchSection,
    /// The scheduled reconciliation with Amazon and the books.
    pub reconcile: crate::reconcile::config::ReconcileSection,
}

/// `[cloudwatch]`: a consumer-group member's figures for CloudWatch alarms and autoscaling, as
/// Embedded Metric Format log lines (the awslogs driver ships them; no API calls, no extra
/// permissions). docs/deploy.md lists the metrics.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CloudwatchSection {
    /// Seconds between two lines (0 = off; 10 to 3,600).
    pub emf_interval_s: u64,
    /// The metrics' CloudWatch namespace.
    pub namespace: String,
}

impl Default for CloudwatchSection {
    fn default() -> Self {
        CloudwatchSection { emf_interval_s: 0, namespace: "stockflow".into() }
    }
}

/// `[dashboard]`: where the live dashboard listens and how fresh it keeps the stock table.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DashboardSection {
    /// Address of the dashboard (page, `/api/*`, `/metrics`); its own port, apart from the
    /// ingest's, so it can stay private while webhooks arrive on a public one.
    pub listen: SocketAddr,
    /// Pause between two reads of every SKU state, ms (100 to 60,000); staleness is at most
    /// this plus one read.
    pub refresh_ms: u64,
    /// Alerts kept for the feed's history (100 to 1,000,000).
    pub alert_capacity: usize,
    /// Pause between two reads of the outbox for new alerts, ms (50 to 60,000).
    pub alert_poll_ms: u64,
}

impl Default for DashboardSection {
    fn default() -> Self {
        DashboardSection {
            listen: SocketAddr::from(([127, 0, 0, 1], 8090)),
            refresh_ms: 500,
            alert_capacity: 10_000,
            alert_poll_ms: 200,
        }
    }
}

/// `[kinesis] mode`: how the consumers read a Kinesis stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum KinesisMode {
    /// `GetRecords` polling (shares the shard's 2 MB/s read limit with other readers).
    Polling,
    /// Enhanced fan-out (`SubscribeToShard`: a dedicated 2 MB/s per consumer).
    FanOut,
}

/// `[kinesis]`: the stream `consume` reads when `stream` is set (state then lives in DynamoDB).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct KinesisSection {
    /// Stream name; unset = the embedded log.
    pub stream: Option<String>,
    /// Endpoint override (e.g. `http://127.0.0.1:4568` for kinesis-local); unset for AWS.
    pub endpoint: Option<String>,
    /// `polling` (GetRecords) or `fan-out` (enhanced fan-out, SubscribeToShard).
    pub mode: KinesisMode,
    /// Name of the enhanced fan-out consumer (registered if missing).
    pub consumer_name: String,
    /// Wait after a GetRecords that returned less than a full batch, ms (200 to 10,000).
    pub idle_poll_ms: u64,
    /// Records per GetRecords (1 to 10,000).
    pub get_records_limit: i32,
}

impl Default for KinesisSection {
    fn default() -> Self {
        KinesisSection {
            stream: None,
            endpoint: None,
            mode: KinesisMode::Polling,
            consumer_name: "stockflow".into(),
            idle_poll_ms: 500,
            get_records_limit: 10_000,
        }
    }
}

/// `[kafka] security`: how clients authenticate to the brokers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum KafkaSecurity {
    /// No TLS, no authentication (a local broker).
    Plaintext,
    /// TLS (MSK's port 9094), no client authentication.
    Tls,
    /// SASL/SCRAM-SHA-256 over TLS.
    ScramSha256,
    /// SASL/SCRAM-SHA-512 over TLS (MSK's port 9096).
    ScramSha512,
    /// MSK IAM: SASL/OAUTHBEARER over TLS (port 9098), tokens from the AWS credentials chain.
    MskIam,
}

/// `[kafka]`: the topic `consume --kafka` reads and `ingest serve --kafka` writes (state and
/// leases then live in DynamoDB, as with Kinesis). Needs a build with the `kafka` feature.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaSection {
    /// `bootstrap.servers` (`host:port,host:port`); unset = Kafka is not used.
    pub brokers: Option<String>,
    /// The topic of canonical events, keyed by SKU.
    pub topic: String,
    /// The consumer group.
    pub group_id: String,
    /// `plaintext`, `tls`, `scram-sha-256`, `scram-sha-512` or `msk-iam`.
    pub security: KafkaSecurity,
    /// PEM file of the CAs to trust (TLS modes; unset = the system's).
    pub ca_location: Option<String>,
    /// SCRAM user name.
    pub username: Option<String>,
    /// SCRAM password (set it from the environment: `STOCKFLOW__KAFKA__PASSWORD`).
    pub password: Option<String>,
    /// MSK IAM: the cluster's region (unset = `AWS_REGION`).
    pub region: Option<String>,
    /// How long a silent member keeps its partitions, ms (1,000 to 300,000).
    pub session_timeout_ms: u64,
    /// Partitions of the topic when `setup` or `replay` creates it (0 = `shards`).
    pub partitions: u32,
    /// Further librdkafka properties, applied last.
    pub properties: std::collections::BTreeMap<String, String>,
}

impl Default for KafkaSection {
    fn default() -> Self {
        KafkaSection {
            brokers: None,
            topic: "stockflow-events".into(),
            group_id: "stockflow".into(),
            security: KafkaSecurity::Plaintext,
            ca_location: None,
            username: None,
            password: None,
            region: None,
            session_timeout_ms: 10_000,
            partitions: 0,
            properties: Default::default(),
        }
    }
}

impl KafkaSection {
    fn validate(&self) -> anyhow::Result<()> {
        in_range("kafka.session_timeout_ms", self.session_timeout_ms, 1_000, 300_000)?;
        if self.topic.is_empty() || self.group_id.is_empty() {
            bail!("kafka.topic and kafka.group_id must not be empty");
        }
        if matches!(self.security, KafkaSecurity::ScramSha256 | KafkaSecurity::ScramSha512)
            && (self.username.is_none() || self.password.is_none())
        {
            bail!("kafka.security = SCRAM needs kafka.username and kafka.password (STOCKFLOW__KAFKA__PASSWORD)");
        }
        Ok(())
    }
}

/// `[group]`: leases of the consumer group.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct GroupSection {
    /// A lease not renewed for this long is taken over, ms (1,000 to 600,000; heartbeats every third).
    pub failover_ms: u64,
    /// How often the lease table is scanned for leases to take, ms (100 to 60,000).
    pub take_interval_ms: u64,
    /// How often shards are listed, ms (1,000 to 3,600,000).
    pub shard_sync_interval_ms: u64,
    /// Most leases one process holds (0 = no limit).
    pub max_leases: usize,
    /// This process's identity; default host:pid:random.
    pub worker_id: Option<String>,
}

impl Default for GroupSection {
    fn default() -> Self {
        GroupSection {
            failover_ms: 10_000,
            take_interval_ms: 1_000,
            shard_sync_interval_ms: 60_000,
            max_leases: 0,
            worker_id: None,
        }
    }
}

/// `[dynamodb]`: where the AWS deployment keeps state, outbox, dead letters and leases.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DynamoSection {
    /// Table name prefix: tables are `{prefix}-sku-state`, `-outbox`, `-dead-letters`, `-dedup`,
    /// `-leases`, `-delivery`, `-shard-skus`.
    pub table_prefix: String,
    /// Endpoint override (e.g. `http://127.0.0.1:5001` for a local emulator); unset for AWS.
    pub endpoint: Option<String>,
    /// Dedup chunks expire (DynamoDB TTL) `engine.dedup_horizon_ms` plus this after their write;
    /// shard workers rewrite live ids when less than half of it is left (default 3 days).
    pub dedup_ttl_margin_ms: i64,
}

impl Default for DynamoSection {
    fn default() -> Self {
        DynamoSection {
            table_prefix: "stockflow".into(),
            endpoint: None,
            dedup_ttl_margin_ms: stockflow_state::dynamodb::DEFAULT_DEDUP_TTL_MARGIN_MS,
        }
    }
}

impl Default for FileConfig {
    fn default() -> Self {
        FileConfig {
            data_dir: PathBuf::from("data"),
            shards: 4,
            engine: EngineSection::default(),
            worker: WorkerSection::default(),
            ingest: IngestSection::default(),
            dynamodb: DynamoSection::default(),
            kinesis: KinesisSection::default(),
            kafka: KafkaSection::default(),
            group: GroupSection::default(),
            connectors: stockflow_connectors::config::ConnectorsSection::default(),
            dashboard: DashboardSection::default(),
            retention: crate::runtime::retention::RetentionSection::default(),
            cloudwatch: CloudwatchSection::default(),
            reconcile: Default::default(),
        }
    }
}

/// `[engine]`: the parameters of SPEC §2–§3.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineSection {
    /// Tumbling window sizes in milliseconds (default one minute and one hour).
    pub window_sizes_ms: Vec<i64>,
    /// Allowed lateness of the watermark in milliseconds (default 5 minutes).
    pub allowed_lateness_ms: i64,
    /// How long an event id is remembered, in milliseconds of event time (default 7 days).
    pub dedup_horizon_ms: i64,
    /// How long a closed order line is remembered, in milliseconds of event time (default 35
    /// days): a placement or shipment of the line re-sent within it changes nothing.
    pub line_horizon_ms: i64,
    /// Reorder point of SKUs not listed in `reorder_points` (0 = low-stock alerts off).
    pub default_reorder_point: i64,
    /// Reorder point per SKU.
    pub reorder_points: HashMap<String, i64>,
}

impl Default for EngineSection {
    fn default() -> Self {
        let d = EngineConfig::default();
        EngineSection {
            window_sizes_ms: d.windows.sizes_ms().to_vec(),
            allowed_lateness_ms: d.windows.allowed_lateness_ms(),
            dedup_horizon_ms: d.dedup_horizon_ms,
            line_horizon_ms: d.line_horizon_ms,
            default_reorder_point: 0,
            reorder_points: HashMap::new(),
        }
    }
}

/// `[worker]`: how often shard workers commit.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerSection {
    /// Commit after this many records (1 to 1,000,000).
    pub commit_every_records: usize,
    /// While records keep coming, commit at the latest this long after the oldest uncommitted
    /// one was read, in milliseconds (10 to 60,000).
    pub commit_interval_ms: u64,
    /// A caught-up shard commits what it read at once, but no sooner than this after its
    /// previous commit, in milliseconds (0 to 60,000; 0: at once). Raise it where every commit
    /// is billed (DynamoDB) and latency matters less.
    pub commit_min_interval_ms: u64,
    /// Records per read (1 to 10,000).
    pub batch_records: usize,
}

impl Default for WorkerSection {
    fn default() -> Self {
        let d = WorkerConfig::default();
        WorkerSection {
            commit_every_records: d.commit_every_records,
            commit_interval_ms: d.commit_interval.as_millis() as u64,
            commit_min_interval_ms: d.commit_min_interval.as_millis() as u64,
            batch_records: d.batch_records,
        }
    }
}

/// `[ingest]`: the HTTP server and how it batches puts.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestSection {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// How long a put batch waits for more requests after its first, ms (0: only what queued
    /// while the previous batch was written; 0 to 1000).
    pub linger_ms: u64,
    /// Put batches written at once (1 to 64).
    pub max_in_flight: usize,
    /// The SP-API marketplace whose FBA availability counts (e.g. `ATVPDKIKX0DER`); unset: the
    /// first marketplace of each notification.
    pub marketplace_id: Option<String>,
    /// An event whose `ts` is more than this many ms ahead of the ingest's clock is refused with
    /// 400 naming `ts` (default one hour; 1,000 to 604,800,000).
    pub max_future_ms: u64,
    /// Requests served at once; more are answered 503 with `Retry-After` (1 to 100,000).
    pub max_concurrent_requests: usize,
    /// Time a client has to send its whole body, ms; slower ones are answered 408 (100 to 600,000).
    pub body_timeout_ms: u64,
}

impl Default for IngestSection {
    fn default() -> Self {
        IngestSection {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            linger_ms: 0,
            max_in_flight: 2,
            max_concurrent_requests: 256,
            body_timeout_ms: 10_000,
            marketplace_id: None,
            max_future_ms: crate::ingest::DEFAULT_MAX_FUTURE_MS as u64,
        }
    }
}

/// `name = v` must lie in `lo..=hi`; the error names the setting and the range.
pub fn in_range(name: &str, v: u64, lo: u64, hi: u64) -> anyhow::Result<()> {
    Ok(stockflow_connectors::config::in_range(name, v, lo, hi)?)
}

/// Validated settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Data directory.
    pub data_dir: PathBuf,
    /// Shards of the embedded log.
    pub shards: usize,
    /// Engine parameters.
    pub engine: Arc<EngineConfig>,
    /// Worker cadence.
    pub worker: WorkerConfig,
    /// HTTP listen address.
    pub listen: SocketAddr,
    /// DynamoDB settings.
    pub dynamodb: DynamoSection,
    /// Kinesis settings (validated).
    pub kinesis: KinesisSection,
    /// Kafka settings (validated).
    pub kafka: KafkaSection,
    /// Consumer-group settings.
    pub group: GroupConfig,
    /// How ingest batches its puts.
    pub ingest_batch: BatchConfig,
    /// How SP-API notifications are read.
    pub amazon: crate::ingest::AmazonConfig,
    /// `ingest.max_future_ms`.
    pub ingest_max_future_ms: i64,
    /// What the ingest server admits (`ingest.max_concurrent_requests`, `ingest.body_timeout_ms`).
    pub ingest_limits: crate::server::Limits,
    /// Connectors (validated; credentials are read when they start).
    pub connectors: stockflow_connectors::config::ConnectorsSection,
    /// The live dashboard.
    pub dashboard: DashboardSection,
    /// Retention (validated).
    pub retention: crate::runtime::retention::Retention,
    /// CloudWatch Embedded Metric Format lines (validated).
    pub cloudwatch: CloudwatchSection,
    /// Reconciliation (validated).
    pub reconcile: crate::reconcile::config::ReconcileSection,
}

/// The prefix of the environment variables that set config fields ([`FileConfig::load_with_env`]).
pub const ENV_PREFIX: &str = "STOCKFLOW__";

/// A variable's value as TOML (`8`, `true`, `[1, 2]`, `{ env = "X" }`), else as a string.
fn env_value(text: &str) -> toml::Value {
    format!("v = {text}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(text.to_string()))
}

fn set_path(table: &mut toml::Table, keys: &[String], value: toml::Value) -> anyhow::Result<()> {
    let (last, parents) = keys.split_last().context("no field named")?;
    let mut at = table;
    for key in parents {
        let next = at.entry(key.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        at = next.as_table_mut().with_context(|| format!("`{key}` is a value, not a section"))?;
    }
    at.insert(last.clone(), value);
    Ok(())
}

impl FileConfig {
    /// Reads a TOML file.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        Self::load_with_env(Some(path), std::env::vars())
    }

    /// The configuration of a TOML file (or the defaults, without one) with every
    /// `STOCKFLOW__SECTION__FIELD` variable of `env` laid over it.
    ///
    /// The naming rule: `STOCKFLOW__` then the field's path in the file, each level separated by
    /// `__`, case-insensitive — `STOCKFLOW__CONNECTORS__ACCOUNTING__SHAPE=xero` is
    /// `[connectors.accounting] shape = "xero"`, `STOCKFLOW__SHARDS=8` is `shards = 8`. The value
    /// is read as a TOML value (`8`, `true`, `[60000, 3600000]`, `{ env = "TOKEN" }`) and, when it
    /// is not one, as a string. The environment wins over the file; unknown names are refused
    /// like unknown keys in the file.
    pub fn load_with_env(path: Option<&Path>, env: impl IntoIterator<Item = (String, String)>) -> anyhow::Result<Self> {
        let mut root = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
                text.parse::<toml::Table>().with_context(|| format!("parsing {}", path.display()))?
            }
            None => toml::Table::new(),
        };
        let mut overridden = Vec::new();
        for (name, value) in env {
            let Some(rest) = name.strip_prefix(ENV_PREFIX) else { continue };
            let keys: Vec<String> = rest.split("__").map(str::to_ascii_lowercase).collect();
            if keys.iter().any(String::is_empty) {
                bail!("{name}: empty path segment (levels are separated by `__`)");
            }
            set_path(&mut root, &keys, env_value(&value)).with_context(|| name.clone())?;
            overridden.push(name);
        }
        let from = match (path, overridden.is_empty()) {
            (Some(p), true) => p.display().to_string(),
            (Some(p), false) => format!("{} and {}", p.display(), overridden.join(", ")),
            (None, _) => overridden.join(", "),
        };
        root.try_into().with_context(|| format!("parsing {from}"))
    }

    /// Checks every field and builds the settings.
    pub fn validate(self) -> anyhow::Result<Settings> {
        in_range("shards", self.shards as u64, 1, 1024)?;
        let e = self.engine;
        let windows = WindowConfig::new(e.window_sizes_ms, e.allowed_lateness_ms).map_err(anyhow::Error::msg)?;
        if !(60_000..=30 * 86_400_000).contains(&self.dynamodb.dedup_ttl_margin_ms) {
            bail!(
                "dynamodb.dedup_ttl_margin_ms = {}: must be 60000 to 2592000000 (30 days)",
                self.dynamodb.dedup_ttl_margin_ms
            );
        }
        if e.dedup_horizon_ms < 60_000 {
            bail!("engine.dedup_horizon_ms = {}: must be at least 60000", e.dedup_horizon_ms);
        }
        if e.line_horizon_ms < 60_000 {
            bail!("engine.line_horizon_ms = {}: must be at least 60000", e.line_horizon_ms);
        }
        if e.default_reorder_point < 0 || e.reorder_points.values().any(|r| *r < 0) {
            bail!("engine reorder points must not be negative");
        }
        let w = self.worker;
        in_range("worker.commit_every_records", w.commit_every_records as u64, 1, 1_000_000)?;
        in_range("worker.commit_interval_ms", w.commit_interval_ms, 10, 60_000)?;
        in_range("worker.commit_min_interval_ms", w.commit_min_interval_ms, 0, 60_000)?;
        in_range("worker.batch_records", w.batch_records as u64, 1, 10_000)?;
        let k = self.kinesis;
        in_range("kinesis.idle_poll_ms", k.idle_poll_ms, 200, 10_000)?;
        in_range("kinesis.get_records_limit", k.get_records_limit as u64, 1, 10_000)?;
        self.kafka.validate()?;
        let g = self.group;
        in_range("group.failover_ms", g.failover_ms, 1_000, 600_000)?;
        in_range("group.take_interval_ms", g.take_interval_ms, 100, 60_000)?;
        in_range("group.shard_sync_interval_ms", g.shard_sync_interval_ms, 1_000, 3_600_000)?;
        let group = GroupConfig {
            failover: Duration::from_millis(g.failover_ms),
            take_interval: Duration::from_millis(g.take_interval_ms),
            shard_sync_interval: Duration::from_millis(g.shard_sync_interval_ms),
            max_leases: if g.max_leases == 0 { usize::MAX } else { g.max_leases },
            ..GroupConfig::new(g.worker_id.unwrap_or_else(stockflow_pipeline::group::worker_id))
        };
        let i = &self.ingest;
        in_range("ingest.linger_ms", i.linger_ms, 0, 1_000)?;
        in_range("ingest.max_in_flight", i.max_in_flight as u64, 1, 64)?;
        in_range("ingest.max_future_ms", i.max_future_ms, 1_000, 604_800_000)?;
        in_range("ingest.max_concurrent_requests", i.max_concurrent_requests as u64, 1, 100_000)?;
        in_range("ingest.body_timeout_ms", i.body_timeout_ms, 100, 600_000)?;
        self.connectors.validate()?;
        let dash = &self.dashboard;
        in_range("dashboard.refresh_ms", dash.refresh_ms, 100, 60_000)?;
        in_range("dashboard.alert_poll_ms", dash.alert_poll_ms, 50, 60_000)?;
        in_range("dashboard.alert_capacity", dash.alert_capacity as u64, 100, 1_000_000)?;
        let retention = self.retention.validate()?;
        if self.cloudwatch.emf_interval_s != 0 {
            in_range("cloudwatch.emf_interval_s", self.cloudwatch.emf_interval_s, 10, 3_600)?;
        }
        if self.cloudwatch.namespace.is_empty() || self.cloudwatch.namespace.starts_with("AWS/") {
            bail!(
                "cloudwatch.namespace = {:?}: must be non-empty and not an AWS/ namespace",
                self.cloudwatch.namespace
            );
        }
        self.reconcile.validate()?;
        Ok(Settings {
            reconcile: self.reconcile,
            retention,
            cloudwatch: self.cloudwatch,
            dashboard: self.dashboard,
            connectors: self.connectors,
            ingest_batch: BatchConfig {
                linger: Duration::from_millis(i.linger_ms),
                max_in_flight: i.max_in_flight,
                ..BatchConfig::default()
            },
            amazon: crate::ingest::AmazonConfig { marketplace_id: i.marketplace_id.clone() },
            ingest_max_future_ms: i.max_future_ms as i64,
            ingest_limits: crate::server::Limits {
                max_concurrent: i.max_concurrent_requests,
                body_timeout: Duration::from_millis(i.body_timeout_ms),
                max_body_bytes: crate::ingest::MAX_REQUEST_BYTES,
            },
            kinesis: k,
            kafka: self.kafka,
            group,
            data_dir: self.data_dir,
            shards: self.shards,
            engine: Arc::new(EngineConfig {
                windows,
                dedup_horizon_ms: e.dedup_horizon_ms,
                line_horizon_ms: e.line_horizon_ms,
                default_reorder_point: e.default_reorder_point,
                reorder_points: e.reorder_points,
            }),
            worker: WorkerConfig {
                commit_every_records: w.commit_every_records,
                commit_interval: Duration::from_millis(w.commit_interval_ms),
                commit_min_interval: Duration::from_millis(w.commit_min_interval_ms),
                batch_records: w.batch_records,
                ..WorkerConfig::default()
            },
            listen: self.ingest.listen,
            dynamodb: {
                let d = self.dynamodb;
                let ok = |c: char| c.is_ascii_alphanumeric() || "_-.".contains(c);
                if d.table_prefix.is_empty() || d.table_prefix.len() > 200 || !d.table_prefix.chars().all(ok) {
                    bail!("dynamodb.table_prefix = {:?}: 1-200 characters of a-z, A-Z, 0-9, _ - .", d.table_prefix);
                }
                d
            },
        })
    }
}

impl Settings {
    /// Where reconciliation reports go (`reconcile.out_dir`, default `{data_dir}/reconcile`).
    pub fn reconcile_dir(&self) -> PathBuf {
        self.reconcile.out_dir.clone().unwrap_or_else(|| self.data_dir.join("reconcile"))
    }

    /// The embedded log's directory.
    pub fn log_dir(&self) -> PathBuf {
        self.data_dir.join("log")
    }

    /// Path of the embedded state store.
    pub fn state_path(&self) -> PathBuf {
        self.data_dir.join("state.redb")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_unknown_fields_are_rejected() {
        let s = FileConfig::default().validate().unwrap();
        assert_eq!(s.shards, 4);
        assert_eq!(s.engine.dedup_horizon_ms, 7 * 86_400_000);
        assert_eq!(s.engine.line_horizon_ms, 35 * 86_400_000);
        let err = toml::from_str::<FileConfig>("shardz = 3").unwrap_err().to_string();
        assert!(err.contains("shardz"), "{err}");
        let parsed: FileConfig =
            toml::from_str("shards = 2\n[engine]\ndefault_reorder_point = 5\n[engine.reorder_points]\n\"MUG\" = 9\n")
                .unwrap();
        let s = parsed.validate().unwrap();
        assert_eq!((s.engine.reorder_point("MUG"), s.engine.reorder_point("X")), (9, 5));
        let example: FileConfig = toml::from_str(include_str!("../../deploy/stockflow.example.toml")).unwrap();
        assert_eq!(example.validate().unwrap().worker, WorkerConfig::default());
        let bad = FileConfig { shards: 0, ..FileConfig::default() };
        assert!(bad.validate().unwrap_err().to_string().contains("shards"));
    }

    fn env(vars: &[(&str, &str)]) -> Vec<(String, String)> {
        vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn every_field_is_settable_from_the_environment() {
        let c = FileConfig::load_with_env(
            None,
            env(&[
                ("STOCKFLOW__SHARDS", "8"),
                ("STOCKFLOW__ENGINE__WINDOW_SIZES_MS", "[60000]"),
                ("STOCKFLOW__KINESIS__MODE", "fan-out"),
                ("STOCKFLOW__CONNECTORS__ACCOUNTING__SHAPE", "xero"),
                ("STOCKFLOW__CONNECTORS__ACCOUNTING__TOKEN", r#"{ env = "XERO_TOKEN" }"#),
                ("STOCKFLOW__DASHBOARD__LISTEN", "127.0.0.1:9999"),
                ("STOCKFLOW_DATA_DIR", "ignored: one underscore is a CLI flag's variable"),
                ("PATH", "/usr/bin"),
            ]),
        )
        .unwrap();
        assert_eq!(c.shards, 8);
        assert_eq!(c.engine.window_sizes_ms, vec![60_000]);
        assert_eq!(c.kinesis.mode, KinesisMode::FanOut);
        assert_eq!(c.connectors.accounting.shape, stockflow_connectors::config::AccountingShape::Xero);
        assert_eq!(c.connectors.accounting.token.env.as_deref(), Some("XERO_TOKEN"));
        assert_eq!(c.dashboard.listen.port(), 9999);
        // The environment wins over the file.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "shards = 2\n[worker]\nbatch_records = 7\n").unwrap();
        let c = FileConfig::load_with_env(Some(&file), env(&[("STOCKFLOW__SHARDS", "3")])).unwrap();
        assert_eq!((c.shards, c.worker.batch_records), (3, 7));
        // Unknown names and bad values are refused, naming the variable and the field.
        let err = format!("{:#}", FileConfig::load_with_env(None, env(&[("STOCKFLOW__SHARDZ", "3")])).unwrap_err());
        assert!(err.contains("STOCKFLOW__SHARDZ") && err.contains("shardz"), "{err}");
        let err = format!(
            "{:#}",
            FileConfig::load_with_env(None, env(&[("STOCKFLOW__CONNECTORS__ACCOUNTING__SHAPE", "sage")])).unwrap_err()
        );
        assert!(err.contains("sage") && err.contains("quickbooks"), "{err}");
        let err = format!("{:#}", FileConfig::load_with_env(None, env(&[("STOCKFLOW__SHARDS__X", "1")])).unwrap_err());
        assert!(err.contains("STOCKFLOW__SHARDS__X"), "{err}");
        // A QuickBooks realm id is all digits: it reads as a TOML integer and stays the id's text.
        let c = FileConfig::load_with_env(
            None,
            env(&[
                ("STOCKFLOW__CONNECTORS__ACCOUNTING__REALM_ID", "9130354519123456"),
                ("STOCKFLOW__CONNECTORS__ACCOUNTING__TENANT_ID", "\"0c7f\""),
            ]),
        )
        .unwrap();
        assert_eq!(c.connectors.accounting.realm_id.as_deref(), Some("9130354519123456"));
        assert_eq!(c.connectors.accounting.tenant_id.as_deref(), Some("0c7f"));
        let err = format!(
            "{:#}",
            FileConfig::load_with_env(None, env(&[("STOCKFLOW__CONNECTORS__ACCOUNTING__REALM_ID", "-4")])).unwrap_err()
        );
        assert!(err.contains("realm_id") && err.contains("negative"), "{err}");
    }

    #[test]
    fn config_strings_are_parsed_into_choices_or_refused() {
        for (text, needle) in [
            ("[kinesis]\nmode = \"fanout\"", "fan-out"),
            ("[connectors.accounting]\nshape = \"Xero \"", "xero"),
            ("[connectors.accounting]\nposting = \"per-effect\"", "per_effect"),
            ("[connectors.accounting]\nperiod = \"1w\"", "1d"),
        ] {
            let err = toml::from_str::<FileConfig>(text).unwrap_err().to_string();
            assert!(err.contains(needle), "{text}: {err}");
        }
    }

    /// The example file names every field of the config types (commented-out lines count: they
    /// are what a seller uncomments), and with them uncommented it still parses and validates.
    #[test]
    fn the_example_config_is_complete_and_valid() {
        let example = include_str!("../../deploy/stockflow.example.toml");
        let uncommented: String = example
            .lines()
            .map(|l| {
                let t = l.trim_start();
                match t.strip_prefix("# ") {
                    Some(rest)
                        if rest.starts_with('[') || rest.split_once(" = ").is_some_and(|(k, _)| !k.contains(' ')) =>
                    {
                        rest
                    }
                    _ => l,
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        let full: toml::Table = uncommented.parse().unwrap();
        let parsed: FileConfig = full.clone().try_into().unwrap();
        parsed.validate().unwrap();
        let defaults = toml::Table::try_from(FileConfig::default()).unwrap();
        let mut missing = Vec::new();
        fn walk(defaults: &toml::Table, example: &toml::Table, path: &str, missing: &mut Vec<String>) {
            for (key, value) in defaults {
                let here = if path.is_empty() { key.clone() } else { format!("{path}.{key}") };
                match (value, example.get(key)) {
                    (_, None) => missing.push(here),
                    (toml::Value::Table(d), Some(toml::Value::Table(e))) if here != "engine.reorder_points" => {
                        walk(d, e, &here, missing)
                    }
                    _ => {}
                }
            }
        }
        walk(&defaults, &full, "", &mut missing);
        // Optional fields (unset by default) must be there too, commented out.
        for optional in [
            "ingest.marketplace_id",
            "dynamodb.endpoint",
            "kinesis.stream",
            "kinesis.endpoint",
            "kafka.brokers",
            "kafka.ca_location",
            "kafka.username",
            "kafka.password",
            "kafka.region",
            "group.worker_id",
            "connectors.alerts_webhook.url",
            "connectors.manufacturer.url",
            "connectors.accounting.url",
            "connectors.accounting.realm_id",
            "connectors.accounting.tenant_id",
            "reconcile.marketplace_id",
            "reconcile.ledger_location",
            "reconcile.out_dir",
        ] {
            let mut at = Some(&full);
            let mut found = false;
            let keys: Vec<&str> = optional.split('.').collect();
            for (i, k) in keys.iter().enumerate() {
                match at.and_then(|t| t.get(*k)) {
                    Some(toml::Value::Table(t)) => at = Some(t),
                    Some(_) if i == keys.len() - 1 => found = true,
                    _ => break,
                }
            }
            if !found {
                missing.push(optional.to_string());
            }
        }
        // And every optional field the config types declare, found by name in their sources, so
        // that a new one cannot be left out of the list above and of the example together. A
        // credential is one of `secret_id`, `file`, `env` or `value`: the example shows the first
        // and names the others in its comment.
        let mut keys = std::collections::BTreeSet::new();
        fn all_keys(t: &toml::Table, keys: &mut std::collections::BTreeSet<String>) {
            for (k, v) in t {
                keys.insert(k.clone());
                if let toml::Value::Table(t) = v {
                    all_keys(t, keys);
                }
            }
        }
        all_keys(&full, &mut keys);
        let sources = [
            include_str!("config.rs"),
            include_str!("../reconcile/config.rs"),
            include_str!("../../connectors/src/config.rs"),
        ];
        for source in sources {
            let code = source.split("#[cfg(test)]").next().unwrap_or(source);
            for line in code.lines() {
                let field = line.trim().strip_prefix("pub ").and_then(|l| l.split_once(": Option<"));
                let Some((name, _)) = field.filter(|(n, _)| n.bytes().all(|b| b == b'_' || b.is_ascii_lowercase()))
                else {
                    continue;
                };
                if !keys.contains(name) && !["file", "env", "value"].contains(&name) {
                    missing.push(name.to_owned());
                }
            }
        }
        assert!(missing.is_empty(), "deploy/stockflow.example.toml lacks {missing:?}");
    }
}
