//! `stockflow replay`, all of it. Without `--target`, a file is appended to this data directory's log
//! as fast as it goes and consumed ([`file`]). With `--target …`, it drives a target with a recorded stream at the profile's pace
//! (× `--speedup`), at a fixed rate, or as fast as it takes it; measures ingest and end-to-end
//! latency; waits until the consumers have committed everything; verifies the final state SKU by
//! SKU and the alerts by id against the straight pass over the same stream; writes a JSON report
//! and an SVG picture (docs/loadtest.md).
//!
//! The load is open: every record has a due time from the schedule, fixed before the run. Records
//! are spread over lanes (HTTP connections, or producers for the stream targets) by SKU, so a
//! SKU's records reach the stream in file order — the straight pass's order, which is what makes
//! an exact comparison possible. A lane sends what is due, as one request of up to `--batch`
//! records, and waits for the answer before its next request (order again). A target that slows
//! down makes records late; their latency is measured from their due time, never from when they
//! were finally sent, so the slowdown shows in the percentiles instead of being hidden
//! (coordinated omission), and the report shows how far behind the schedule the lanes fell.

mod drive;
pub mod file;
mod report;
mod sinks;
mod targets;

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::str::FromStr;
use std::sync::Arc;

use anyhow::{Context, bail};
use metrics_exporter_prometheus::PrometheusHandle;
use stockflow_state::reference::{Outcome, straight_pass};

use crate::loadtest::loadgen::spapi::Delivery;
use crate::loadtest::loadgen::{ProfileName, Schedule};
use crate::runtime::config::Settings;

pub use report::Report;

/// Where a replay sends the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The embedded log of a fresh data directory, consumed in this process.
    Embedded,
    /// A `stockflow run` this replay starts on a fresh data directory, over HTTP.
    Local,
    /// A running ingest API (`http://HOST:PORT`, or the full `/v1/events` URL).
    Http(String),
    /// A Kinesis stream (created when missing), consumed in this process as a consumer-group
    /// member with state and leases in DynamoDB.
    Kinesis(String),
    /// A Kafka topic of the `[kafka]` brokers (created when missing), consumed in this process as
    /// a member of its Kafka group with state and leases in DynamoDB (feature `kafka`).
    Kafka(String),
}

impl FromStr for Target {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "embedded" => Ok(Target::Embedded),
            "local" => Ok(Target::Local),
            _ if s.starts_with("http://") => Ok(Target::Http(s.to_string())),
            _ => match (s.strip_prefix("kinesis:"), s.strip_prefix("kafka:")) {
                (Some(name), _) if !name.is_empty() => Ok(Target::Kinesis(name.to_string())),
                (_, Some(topic)) if !topic.is_empty() => Ok(Target::Kafka(topic.to_string())),
                _ => Err(format!("{s:?}: expected embedded, local, http://HOST:PORT, kinesis:STREAM or kafka:TOPIC")),
            },
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Embedded => f.write_str("embedded"),
            Target::Local => f.write_str("local"),
            Target::Http(url) => f.write_str(url),
            Target::Kinesis(name) => write!(f, "kinesis:{name}"),
            Target::Kafka(topic) => write!(f, "kafka:{topic}"),
        }
    }
}

/// Arguments of `stockflow replay`.
#[derive(Debug, Clone, clap::Args)]
pub struct ReplayArgs {
    /// NDJSON file of canonical events, one per line (bad lines are dead-lettered, not dropped).
    #[arg(long, value_name = "FILE", required_unless_present_any = ["dir", "profile"])]
    pub file: Option<PathBuf>,
    /// Records per durable append (default 10,000), or with --target per request or put
    /// (default 100 over HTTP, 500 on a stream).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub batch: Option<u32>,
    /// Only append; leave consuming to `stockflow run` or `stockflow consume`.
    #[arg(long, conflicts_with = "target")]
    pub no_consume: bool,
    /// Where to send: `embedded`, `local` (a `stockflow run` this starts), `http://HOST:PORT`
    /// (a running ingest API) or `kinesis:STREAM`. Without it, the file is appended to this data
    /// directory's log as fast as possible and consumed (no pacing, no report).
    #[arg(long, value_name = "TARGET")]
    pub target: Option<Target>,
    /// A `stockflow loadgen` directory: its stream, paced by its profile.json.
    #[arg(long, value_name = "DIR", conflicts_with = "file")]
    pub dir: Option<PathBuf>,
    /// Generate this profile first (as `stockflow loadgen --profile P` with its defaults, into
    /// the report directory), then replay it.
    #[arg(long, value_enum, conflicts_with_all = ["file", "dir"])]
    pub profile: Option<ProfileName>,
    /// With --profile: only these hours of it, `FIRST-LAST` (as `loadgen --hours`).
    #[arg(long, value_name = "FIRST-LAST", requires = "profile")]
    pub hours: Option<String>,
    /// Pace by the profile's rates × this factor (needs a profile: --dir or --profile).
    #[arg(long, value_name = "X", conflicts_with = "rate")]
    pub speedup: Option<f64>,
    /// Pace at this fixed rate, events a second.
    #[arg(long, value_name = "EVENTS_PER_S")]
    pub rate: Option<f64>,
    /// Lanes: HTTP connections (or producers on the stream targets); a SKU always uses the same
    /// one.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub connections: u32,
    /// Sign every HTTP request with this Standard Webhooks secret (`whsec_…`).
    #[arg(long, env = "STOCKFLOW_LOAD_SECRET", hide_env_values = true)]
    pub secret: Option<String>,
    /// Directory of report.json and report.svg (default: `<dir>/report`, or `./stockflow-report`).
    #[arg(long, value_name = "DIR")]
    pub report: Option<PathBuf>,
    /// Fail when, paced, the consumers or the lanes fall further behind than this (seconds).
    #[arg(long, default_value_t = 30.0, value_name = "SECONDS")]
    pub max_lag: f64,
    /// Give up waiting for the consumers to commit everything after this long (seconds).
    #[arg(long, default_value_t = 600, value_name = "SECONDS")]
    pub drain_timeout: u64,
    /// With an http:// target: the dashboard the final state is read from (`/api/outcome`;
    /// default: port 8090 of the target's host).
    #[arg(long, value_name = "URL")]
    pub dashboard: Option<String>,
    /// With an http:// target: the consumers' `/metrics` (repeatable; default: the target's).
    #[arg(long = "metrics", value_name = "URL")]
    pub metrics_urls: Vec<String>,
    /// Kinesis endpoint override (kinesis target), e.g. a local emulator.
    #[arg(long, env = "KINESIS_ENDPOINT", value_name = "URL")]
    pub kinesis_endpoint: Option<String>,
    /// DynamoDB endpoint override (kinesis target).
    #[arg(long, env = "DYNAMODB_ENDPOINT", value_name = "URL")]
    pub dynamodb_endpoint: Option<String>,
    /// DynamoDB table prefix (kinesis target; overrides `dynamodb.table_prefix`).
    #[arg(long, env = "STOCKFLOW_TABLE_PREFIX", value_name = "PREFIX")]
    pub table_prefix: Option<String>,
}

/// The stream to replay: its records, their SKUs and due times.
#[derive(Debug)]
pub struct Workload {
    buf: Vec<u8>,
    /// Per record: SKU index and the line's byte range.
    records: Vec<(u32, std::ops::Range<usize>)>,
    skus: Vec<String>,
    /// Per record, in the SP-API form: its route (an index into [`ROUTES`]); `None`: canonical.
    routes: Option<Vec<u8>>,
    /// Per record: due time in event-time seconds from the start (pacing divides it).
    event_seconds: Option<Vec<f64>>,
    /// The schedule, when the stream came from loadgen.
    schedule: Option<Schedule>,
    /// Where it came from.
    source: String,
}

impl Workload {
    /// Reads an NDJSON stream (and, from a loadgen directory, its schedule): canonical events, or
    /// the SP-API form's deliveries (`{"route":…,"key":…,"body":…}` per line).
    pub fn read(file: &Path, schedule: Option<Schedule>) -> anyhow::Result<Self> {
        let raw = crate::loadtest::ndjson::read_lines(file)?;
        let mut index: foldhash::HashMap<String, u32> = foldhash::HashMap::default();
        let mut skus = Vec::new();
        let mut intern = |key: Cow<'_, str>| -> u32 {
            let key: Cow<'_, str> = if key.is_empty() { Cow::Borrowed("-") } else { key };
            match index.get(key.as_ref()) {
                Some(k) => *k,
                None => {
                    let k = skus.len() as u32;
                    index.insert(key.to_string(), k);
                    skus.push(key.into_owned());
                    k
                }
            }
        };
        let mut records = Vec::new();
        let webhooks = crate::loadtest::ndjson::lines(&raw).next().is_some_and(|l| l.starts_with(br#"{"route":"#));
        let (buf, routes) = if webhooks {
            let mut buf = Vec::with_capacity(raw.len());
            let mut routes = Vec::new();
            for (n, line) in crate::loadtest::ndjson::lines(&raw).enumerate() {
                let d: Delivery<'_> = serde_json::from_slice(line)
                    .with_context(|| format!("{}: record {} is not a webhook delivery", file.display(), n + 1))?;
                let route = ROUTES.iter().position(|r| *r == d.route).with_context(|| {
                    format!(
                        "{}: record {}: route {:?} (expected amazon, manufacturer or events)",
                        file.display(),
                        n + 1,
                        d.route
                    )
                })?;
                let start = buf.len();
                // A pretty-printed body would be split into several documents in an NDJSON request.
                match serde_json::from_str::<serde_json::Value>(&d.body) {
                    Ok(v) if d.body.contains('\n') => buf.extend_from_slice(v.to_string().as_bytes()),
                    _ => buf.extend_from_slice(d.body.replace('\n', " ").as_bytes()),
                }
                records.push((intern(d.key), start..buf.len()));
                routes.push(route as u8);
            }
            (buf, Some(routes))
        } else {
            let base = raw.as_ptr() as usize;
            for line in crate::loadtest::ndjson::lines(&raw) {
                let start = line.as_ptr() as usize - base;
                records.push((intern(crate::loadtest::ndjson::partition_key(line)), start..start + line.len()));
            }
            (raw, None)
        };
        if records.is_empty() {
            bail!("{}: no records", file.display());
        }
        let event_seconds = match &schedule {
            Some(s) if s.records == records.len() => Some(s.due_seconds()),
            Some(s) => bail!(
                "{}: {} records, but its profile.json schedules {} (regenerate it)",
                file.display(),
                records.len(),
                s.records
            ),
            None => None,
        };
        Ok(Workload { buf, records, skus, routes, event_seconds, schedule, source: file.display().to_string() })
    }

    /// The route of record `i` (`events` for a canonical stream).
    pub fn route(&self, i: usize) -> &'static str {
        self.routes.as_ref().map_or("events", |r| ROUTES[r[i] as usize])
    }

    /// True for the SP-API form (it goes through the ingest API only).
    pub fn is_webhooks(&self) -> bool {
        self.routes.is_some()
    }

    /// Number of records.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Record `i`: its partition key and bytes.
    pub fn record(&self, i: usize) -> (&str, &[u8]) {
        let (k, r) = &self.records[i];
        (&self.skus[*k as usize], &self.buf[r.clone()])
    }

    fn sku_index(&self, i: usize) -> u32 {
        self.records[i].0
    }

    /// The straight pass over every record, in file order (for the SP-API form: over what the
    /// ingest's mappings make of each delivery).
    pub fn straight_pass(&self, settings: &Settings) -> Outcome {
        let engine = Arc::clone(&settings.engine);
        match &self.routes {
            None => straight_pass(engine, self.records.iter().map(|(_, r)| &self.buf[r.clone()])),
            Some(routes) => {
                let deliveries: Vec<Delivery<'_>> = self
                    .records
                    .iter()
                    .zip(routes)
                    .map(|((k, r), route)| Delivery {
                        route: Cow::Borrowed(ROUTES[*route as usize]),
                        key: Cow::Borrowed(&self.skus[*k as usize]),
                        body: String::from_utf8_lossy(&self.buf[r.clone()]),
                    })
                    .collect();
                crate::loadtest::loadgen::spapi::straight_pass(&deliveries, engine, &settings.amazon)
            }
        }
    }
}

/// The routes of the SP-API form.
const ROUTES: [&str; 3] = ["events", "amazon", "manufacturer"];

/// Pacing: when record `i` is due, in microseconds from the start.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pace {
    /// Everything at once: as fast as the target takes it.
    Max,
    /// A fixed rate, events a second.
    Rate(f64),
    /// The profile's schedule × a speed-up.
    Speedup(f64),
}

impl Pace {
    fn due_us(self, w: &Workload) -> Vec<u64> {
        match self {
            Pace::Max => vec![0; w.len()],
            Pace::Rate(r) => (0..w.len()).map(|i| (i as f64 * 1e6 / r) as u64).collect(),
            Pace::Speedup(x) => match &w.event_seconds {
                Some(s) => s.iter().map(|t| (t * 1e6 / x) as u64).collect(),
                None => vec![0; w.len()],
            },
        }
    }

    fn paced(self) -> bool {
        !matches!(self, Pace::Max)
    }
}

/// `stockflow replay --target …`.
pub async fn run(
    args: ReplayArgs,
    settings: Settings,
    cli: CliContext,
    metrics: Option<PrometheusHandle>,
) -> anyhow::Result<ExitCode> {
    let Some(target) = args.target.clone() else { return file::append_and_consume(&args, &settings).await };
    let (file, batch) = (args.file.clone(), args.batch);
    let report_dir = args.report.clone().unwrap_or_else(|| match &args.dir {
        Some(d) => d.join("report"),
        None => PathBuf::from("stockflow-report"),
    });
    std::fs::create_dir_all(&report_dir).with_context(|| format!("creating {}", report_dir.display()))?;
    let (stream_file, schedule) = match (&file, &args.dir, args.profile) {
        (Some(f), _, _) => (f.clone(), None),
        (None, Some(dir), _) => {
            let path = dir.join("profile.json");
            let text = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            let s: Schedule = serde_json::from_slice(&text).with_context(|| format!("parsing {}", path.display()))?;
            (dir.join(&s.stream), Some(s))
        }
        (None, None, Some(profile)) => {
            let out = report_dir.join("stream");
            let gen_args = crate::loadtest::loadgen::LoadgenArgs {
                profile,
                base_rate: 1.0,
                rates: None,
                hours: args.hours.clone(),
                skus: 10_000,
                seed: 42,
                format: crate::loadtest::loadgen::Format::Canonical,
                out: out.clone(),
            };
            let g = crate::loadtest::loadgen::run(&gen_args, Arc::clone(&settings.engine), &settings.amazon)?;
            (out.join(&g.schedule.stream), Some(g.schedule))
        }
        (None, None, None) => bail!("give --file, --dir or --profile"),
    };
    let pace = match (args.speedup, args.rate) {
        (Some(x), _) if !(x > 0.0 && x.is_finite()) => bail!("--speedup {x}: must be above 0"),
        (_, Some(r)) if !(r > 0.0 && r.is_finite()) => bail!("--rate {r}: must be above 0"),
        (Some(_), _) if schedule.is_none() => bail!("--speedup paces by a profile: give --dir or --profile"),
        (Some(x), _) => Pace::Speedup(x),
        (None, Some(r)) => Pace::Rate(r),
        (None, None) => Pace::Max,
    };
    let workload = Arc::new(Workload::read(&stream_file, schedule)?);
    if workload.is_webhooks() && matches!(target, Target::Embedded | Target::Kinesis(_) | Target::Kafka(_)) {
        bail!("{}: the SP-API form goes through the ingest API: use --target local or http://…", stream_file.display());
    }
    let batch = batch.map_or(
        match target {
            Target::Embedded | Target::Kinesis(_) | Target::Kafka(_) => 500,
            Target::Local | Target::Http(_) => 100,
        },
        |b| b as usize,
    );
    if matches!(target, Target::Kinesis(_)) && batch > 500 {
        bail!("--batch {batch}: a Kinesis PutRecords carries at most 500 records");
    }
    if matches!(target, Target::Local | Target::Http(_)) && batch > crate::ingest::MAX_EVENTS_PER_REQUEST {
        bail!("--batch {batch}: an ingest request carries at most {}", crate::ingest::MAX_EVENTS_PER_REQUEST);
    }
    let opts = drive::Options {
        pace,
        batch,
        lanes: args.connections as usize,
        max_lag: args.max_lag,
        drain_timeout: std::time::Duration::from_secs(args.drain_timeout),
    };
    let setup = targets::start(&target, &args, &settings, &cli, &report_dir, metrics).await?;
    let result = drive::drive(Arc::clone(&workload), setup.lanes, &setup.probe, &opts).await;
    let (drive, outcome) = match result {
        Ok(d) => {
            let outcome = if d.caught_up { Some(setup.reader.read().await) } else { None };
            (d, outcome)
        }
        Err(e) => {
            setup.teardown.stop().await;
            return Err(e);
        }
    };
    let calls = setup.teardown.stop().await;
    let expected = workload.straight_pass(&settings);
    let verification = match outcome {
        Some(Ok(actual)) => report::Verification::compare(&expected, actual, drive.rejected),
        Some(Err(e)) => report::Verification::unreadable(&expected, format!("reading the final state: {e}")),
        None => report::Verification::unreadable(&expected, "the consumers did not commit everything in time".into()),
    };
    let report = Report::build(&target, &workload, &opts, drive, verification, calls);
    report.write(&report_dir)?;
    report.print(&report_dir);
    Ok(if report.passed { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// What the command line said beyond the replay's own flags (passed on to a `local` target).
#[derive(Debug, Clone, Default)]
pub struct CliContext {
    /// `--config`.
    pub config: Option<PathBuf>,
    /// `--shards`.
    pub shards: Option<usize>,
    /// `--data-dir`, when given explicitly.
    pub data_dir: Option<PathBuf>,
}
