//! `stockflow loadgen`: deterministic order streams shaped like a seller's day, Black Friday or
//! Cyber Week, written as files a replay drives a target with.
//!
//! A profile is a rate per hour of event time, as a multiple of the seller's baseline
//! (`--base-rate` events a second). The generator (`crate::loadtest::generate`) spreads each hour's records
//! evenly over the hour, so the record index alone gives a record's place in the schedule. Next
//! to the stream go `profile.json` (the schedule a replay paces by) and the expected result of a
//! straight pass: `expected.json` (totals), `expected-state.ndjson` (per SKU) and
//! `expected-alerts.ndjson` (alerts by id).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use stockflow_state::EngineConfig;
use stockflow_state::reference::{Outcome, straight_pass};

use crate::loadtest::generate::{GenConfig, Stream, generate};

pub mod spapi;

/// How the stream's records are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    /// Canonical events (SPEC §1), one per line: `events.ndjson`.
    #[default]
    Canonical,
    /// The webhooks as senders send them: SP-API notifications, manufacturer documents, and
    /// canonical events for the rest: `webhooks.ndjson` (replayed over HTTP only).
    SpApi,
}

/// A named traffic shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProfileName {
    /// An ordinary day: quiet nights, a busy evening; averages 1× baseline.
    BaselineDay,
    /// 24 hours at 4× baseline with a 10× flash-sale hour at 20:00.
    BlackFriday,
    /// Thanksgiving to the Wednesday after: 168 hours, Black Friday and Cyber Monday at 4× with
    /// flash hours (10× and 8×), the weekend at 3×, the days around at 1.5–2×, each day shaped
    /// like a baseline day.
    CyberWeek,
    /// Four weeks (672 hours) of baseline days, with order lifecycles over days: placements
    /// re-notified with the same ids, shipped 1–5 days later (partly first, cumulative), some
    /// re-notified again weeks later, receipts re-sent within 3 days, a pre-order SKU piling up
    /// open lines (`crate::loadtest::lifecycles`).
    FourWeeks,
    /// Rates per hour from a CSV (`--rates`): one line per hour, `hour,events_per_second`.
    Custom,
}

/// The shape of an ordinary day: relative rate per hour, mean 1.
const DAY: [f64; 24] = [
    0.40, 0.30, 0.25, 0.25, 0.30, 0.45, 0.70, 0.90, 1.05, 1.15, 1.20, 1.20, 1.25, 1.25, 1.20, 1.20, 1.25, 1.35, 1.45,
    1.50, 1.45, 1.30, 1.00, 0.70,
];

/// Hourly multiples of the baseline for a named profile (not `custom`).
pub fn multiples(profile: ProfileName) -> Vec<f64> {
    let mean = DAY.iter().sum::<f64>() / 24.0;
    let day = DAY.map(|d| d / mean);
    match profile {
        ProfileName::BaselineDay => day.to_vec(),
        ProfileName::BlackFriday => (0..24).map(|h| if h == 20 { 10.0 } else { 4.0 }).collect(),
        ProfileName::CyberWeek => {
            // Thu (Thanksgiving), Fri (Black Friday), Sat, Sun, Mon (Cyber Monday), Tue, Wed.
            let days = [2.0, 4.0, 3.0, 3.0, 4.0, 2.0, 1.5];
            let mut out = Vec::with_capacity(168);
            for (d, m) in days.iter().enumerate() {
                for (h, shape) in day.iter().enumerate() {
                    out.push(match (d, h) {
                        (1, 20) => 10.0,
                        (4, 12) => 8.0,
                        _ => m * shape,
                    });
                }
            }
            out
        }
        ProfileName::FourWeeks => (0..28).flat_map(|_| day).collect(),
        ProfileName::Custom => Vec::new(),
    }
}

/// Reads a custom profile: `hour,events_per_second` per line (a header line and `#` comments
/// are skipped); hours must be 0, 1, 2, … in order.
pub fn read_rates_csv(path: &Path) -> anyhow::Result<Vec<f64>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut rates = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || (n == 0 && line.chars().next().is_some_and(char::is_alphabetic))
        {
            continue;
        }
        let at = || format!("{}:{}", path.display(), n + 1);
        let (hour, rate) =
            line.split_once(',').with_context(|| format!("{}: expected `hour,events_per_second`", at()))?;
        let hour: usize = hour.trim().parse().with_context(|| format!("{}: hour {hour:?}", at()))?;
        let rate: f64 = rate.trim().parse().with_context(|| format!("{}: rate {rate:?}", at()))?;
        if hour != rates.len() {
            bail!("{}: hour {hour} out of order (expected {})", at(), rates.len());
        }
        if !rate.is_finite() || rate < 0.0 {
            bail!("{}: rate {rate} must be ≥ 0", at());
        }
        rates.push(rate);
    }
    if rates.is_empty() || rates.iter().all(|r| *r == 0.0) {
        bail!("{}: no hour with a rate above 0", path.display());
    }
    Ok(rates)
}

/// Arguments of `stockflow loadgen`.
#[derive(Debug, Clone, clap::Args)]
pub struct LoadgenArgs {
    /// Traffic shape.
    #[arg(long, value_enum, default_value = "black-friday")]
    pub profile: ProfileName,
    /// The seller's baseline, events a second of event time (1 ≈ 30,000 orders a day).
    #[arg(long, default_value_t = 1.0)]
    pub base_rate: f64,
    /// For `--profile custom`: CSV of `hour,events_per_second`.
    #[arg(long, value_name = "FILE", required_if_eq("profile", "custom"))]
    pub rates: Option<PathBuf>,
    /// Only these hours of the profile, `FIRST-LAST` (inclusive, 0-based), e.g. `18-22`.
    #[arg(long, value_name = "FIRST-LAST")]
    pub hours: Option<String>,
    /// Number of SKUs (Zipf popularity).
    #[arg(long, default_value_t = 10_000)]
    pub skus: usize,
    /// Seed of the deterministic generator.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Canonical events, or the SP-API form (notifications and manufacturer documents).
    #[arg(long, value_enum, default_value = "canonical")]
    pub format: Format,
    /// Output directory.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
}

/// One hour of the schedule.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hour {
    /// Hour of the profile (0-based).
    pub hour: usize,
    /// Rate as a multiple of the baseline.
    pub multiple: f64,
    /// Rate in events a second of event time.
    pub events_per_second: f64,
    /// Index of the hour's first record in the stream.
    pub first_record: usize,
    /// Records in the hour.
    pub records: usize,
}

/// `profile.json`: how the stream was made and the schedule a replay paces by.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Schedule {
    /// The profile.
    pub profile: ProfileName,
    /// Baseline, events a second.
    pub base_rate: f64,
    /// Seed.
    pub seed: u64,
    /// SKUs.
    pub skus: usize,
    /// The stream file, relative to the directory.
    pub stream: String,
    /// How its records are written.
    #[serde(default)]
    pub format: Format,
    /// Total records.
    pub records: usize,
    /// Opening stock counts, one per SKU, due at the start.
    pub opening_records: usize,
    /// The hours.
    pub hours: Vec<Hour>,
}

impl Schedule {
    /// When record `i` is due, in seconds of event time from the start (opening counts at 0).
    pub fn due_seconds(&self) -> Vec<f64> {
        let mut due = vec![0.0; self.records];
        for (k, h) in self.hours.iter().enumerate() {
            let n = h.records.max(1) as f64;
            for j in 0..h.records {
                if let Some(d) = due.get_mut(h.first_record + j) {
                    *d = k as f64 * 3600.0 + j as f64 * 3600.0 / n;
                }
            }
        }
        due
    }

    /// The highest hourly rate, as a multiple of the baseline.
    pub fn peak_multiple(&self) -> f64 {
        self.hours.iter().map(|h| h.multiple).fold(0.0, f64::max)
    }
}

/// `expected.json`: the straight pass's totals.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Expected {
    /// Records in the stream.
    pub records: usize,
    /// Records that re-send an earlier record byte for byte.
    pub duplicates: usize,
    /// Bad records (dead-lettered by a consumer, or refused by the ingest API).
    pub bad_records: usize,
    /// SKUs with state.
    pub skus: usize,
    /// Units on hand, summed over SKUs.
    pub units_on_hand: i64,
    /// Units reserved, summed over SKUs.
    pub units_reserved: i64,
    /// Oversell alerts.
    pub oversell_alerts: usize,
    /// Low-stock alerts.
    pub low_stock_alerts: usize,
}

impl Expected {
    /// Totals of an outcome.
    pub fn of(outcome: &Outcome, records: usize, duplicates: usize) -> Self {
        let oversell = outcome.oversell_alerts();
        Expected {
            records,
            duplicates,
            bad_records: outcome.dead_letters,
            skus: outcome.skus.len(),
            units_on_hand: outcome.skus.iter().map(|s| s.on_hand).sum(),
            units_reserved: outcome.skus.iter().map(|s| s.reserved).sum(),
            oversell_alerts: oversell,
            low_stock_alerts: outcome.alerts.len() - oversell,
        }
    }
}

/// A generated workload: the stream and its schedule.
#[derive(Debug)]
pub struct Generated {
    /// The records.
    pub stream: Stream,
    /// The schedule.
    pub schedule: Schedule,
}

/// Builds the stream a profile describes.
pub fn build(args: &LoadgenArgs) -> anyhow::Result<Generated> {
    if !(args.base_rate > 0.0 && args.base_rate.is_finite()) {
        bail!("--base-rate {}: must be above 0", args.base_rate);
    }
    if args.skus == 0 {
        bail!("--skus must be at least 1");
    }
    let mut rates: Vec<f64> = match (args.profile, &args.rates) {
        (ProfileName::Custom, Some(path)) => read_rates_csv(path)?,
        (ProfileName::Custom, None) => bail!("--profile custom needs --rates FILE"),
        (p, _) => multiples(p).into_iter().map(|m| m * args.base_rate).collect(),
    };
    let mut first_hour = 0;
    if let Some(range) = &args.hours {
        let (a, b) = range.split_once('-').with_context(|| format!("--hours {range:?}: expected FIRST-LAST"))?;
        let (a, b): (usize, usize) = (
            a.trim().parse().with_context(|| format!("--hours {range:?}"))?,
            b.trim().parse().with_context(|| format!("--hours {range:?}"))?,
        );
        if a > b || b >= rates.len() {
            bail!("--hours {range:?}: the profile has hours 0-{}", rates.len() - 1);
        }
        rates = rates[a..=b].to_vec();
        first_hour = a;
    }
    let body: f64 = rates.iter().map(|r| r * 3600.0).sum();
    if body > 200_000_000.0 {
        bail!("{body:.0} events: too many for one file (lower --base-rate or pick --hours)");
    }
    let cfg = GenConfig {
        events: body.round() as usize + args.skus,
        skus: args.skus,
        seed: args.seed,
        hour_weights: rates.clone(),
        ..GenConfig::default()
    };
    // Four weeks end where Black Friday begins: every event time is in the past of a replay
    // through the ingest, which refuses events more than an hour ahead of its clock.
    let cfg = match args.profile {
        ProfileName::FourWeeks => GenConfig { start_ts: cfg.start_ts - 28 * 86_400_000, ..cfg },
        _ => cfg,
    };
    let stream = match args.profile {
        ProfileName::FourWeeks => crate::loadtest::lifecycles::generate(&cfg),
        _ => generate(&cfg),
    };
    let mut hours = Vec::with_capacity(rates.len());
    for (k, rate) in rates.iter().enumerate() {
        let first = stream.hour_starts.get(k).copied().unwrap_or(stream.len());
        let end = stream.hour_starts.get(k + 1).copied().unwrap_or(stream.len());
        hours.push(Hour {
            hour: first_hour + k,
            multiple: rate / args.base_rate,
            events_per_second: *rate,
            first_record: first,
            records: end - first,
        });
    }
    let schedule = Schedule {
        profile: args.profile,
        base_rate: args.base_rate,
        seed: args.seed,
        skus: args.skus,
        stream: match args.format {
            Format::Canonical => "events.ndjson".into(),
            Format::SpApi => spapi::FILE.into(),
        },
        format: args.format,
        records: stream.len(),
        opening_records: stream.hour_starts.first().copied().unwrap_or(0),
        hours,
    };
    Ok(Generated { stream, schedule })
}

/// `stockflow loadgen`: writes the stream, its schedule and the expected result.
pub fn run(
    args: &LoadgenArgs,
    engine: Arc<EngineConfig>,
    amazon: &crate::ingest::AmazonConfig,
) -> anyhow::Result<Generated> {
    let started = std::time::Instant::now();
    let generated = build(args)?;
    let (stream, schedule) = (&generated.stream, &generated.schedule);
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let file = |name: &str| -> anyhow::Result<std::fs::File> {
        let path = args.out.join(name);
        std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))
    };
    let outcome = match args.format {
        Format::Canonical => {
            stream.write_ndjson(std::io::BufWriter::new(file(&schedule.stream)?))?;
            straight_pass(engine, stream.iter().map(|(_, p)| p))
        }
        Format::SpApi => {
            let mut buf = Vec::with_capacity(stream.bytes() * 4);
            spapi::write(stream, &mut buf)?;
            file(&schedule.stream)?.write_all(&buf)?;
            let deliveries = crate::loadtest::ndjson::lines(&buf)
                .map(serde_json::from_slice::<spapi::Delivery<'_>>)
                .collect::<Result<Vec<_>, _>>()?;
            spapi::straight_pass(&deliveries, engine, amazon)
        }
    };
    write_json(&args.out.join("profile.json"), schedule)?;
    let duplicates = count_duplicates(stream);
    write_json(&args.out.join("expected.json"), &Expected::of(&outcome, stream.len(), duplicates))?;
    crate::loadtest::ndjson::write_ndjson(file("expected-state.ndjson")?, &outcome.skus)?;
    crate::loadtest::ndjson::write_ndjson(file("expected-alerts.ndjson")?, &outcome.alerts)?;
    let peak = schedule.hours.iter().map(|h| h.events_per_second).fold(0.0, f64::max);
    println!(
        "loadgen: {} records ({}) over {} hours, {} SKUs, peak {:.0}× baseline ({peak:.1} events/s), \
         {} oversell alerts expected; wrote {} in {:.2?}",
        stream.len(),
        schedule.stream,
        schedule.hours.len(),
        schedule.skus,
        schedule.peak_multiple(),
        outcome.oversell_alerts(),
        args.out.display(),
        started.elapsed(),
    );
    Ok(generated)
}

fn count_duplicates(stream: &Stream) -> usize {
    let mut seen = foldhash::HashSet::default();
    stream.iter().filter(|(_, p)| !seen.insert(*p)).count()
}

fn write_json(path: &Path, value: &impl Serialize) -> anyhow::Result<()> {
    let mut bytes = serde_json::to_vec_pretty(value)?;
    bytes.push(b'\n');
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(profile: ProfileName) -> LoadgenArgs {
        LoadgenArgs {
            profile,
            base_rate: 0.5,
            rates: None,
            hours: None,
            skus: 50,
            seed: 1,
            format: Format::Canonical,
            out: PathBuf::from("unused"),
        }
    }

    #[test]
    fn profiles_have_their_shape() {
        let day = multiples(ProfileName::BaselineDay);
        assert_eq!(day.len(), 24);
        assert!((day.iter().sum::<f64>() / 24.0 - 1.0).abs() < 1e-9);
        let bf = multiples(ProfileName::BlackFriday);
        assert_eq!((bf.len(), bf[0], bf[20]), (24, 4.0, 10.0));
        let week = multiples(ProfileName::CyberWeek);
        assert_eq!((week.len(), week[24 + 20], week[4 * 24 + 12]), (168, 10.0, 8.0));
    }

    #[test]
    fn hours_follow_the_rates_and_the_schedule_is_ordered() {
        let g = build(&LoadgenArgs { hours: Some("18-21".into()), ..args(ProfileName::BlackFriday) }).unwrap();
        let s = &g.schedule;
        assert_eq!(s.hours.iter().map(|h| h.hour).collect::<Vec<_>>(), [18, 19, 20, 21]);
        // 4× and 10× of 0.5/s over an hour: 7,200 and 18,000 records (a few fewer: cancels with
        // no open order emit nothing).
        let (plain, flash) = (s.hours[0].records as f64, s.hours[2].records as f64);
        assert!((plain - 7200.0).abs() < 100.0, "{plain}");
        assert!((flash - 18_000.0).abs() < 250.0, "{flash}");
        assert_eq!(s.opening_records, 50);
        let due = s.due_seconds();
        assert!(due.windows(2).all(|w| w[0] <= w[1]));
        assert!(due[s.hours[2].first_record] >= 7200.0 && due[s.hours[3].first_record] >= 10_800.0);
        // Same seed, same bytes.
        let again = build(&LoadgenArgs { hours: Some("18-21".into()), ..args(ProfileName::BlackFriday) }).unwrap();
        assert!(g.stream.iter().eq(again.stream.iter()));
    }

    #[test]
    fn a_custom_csv_is_read_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rates.csv");
        std::fs::write(&path, "hour,events_per_second\n0,1.5\n1,3\n# spike\n2,0.5\n").unwrap();
        assert_eq!(read_rates_csv(&path).unwrap(), [1.5, 3.0, 0.5]);
        std::fs::write(&path, "0,1\n2,1\n").unwrap();
        assert!(read_rates_csv(&path).unwrap_err().to_string().contains("out of order"));
        std::fs::write(&path, "0,-1\n").unwrap();
        assert!(read_rates_csv(&path).unwrap_err().to_string().contains("≥ 0"));
    }
}
