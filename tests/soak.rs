//! Soak: a compressed cyber-week (`loadgen --profile cyber-week`) sent into `stockflow run` in
//! chunks, with `kill -9` and a restart after every chunk and retention at `"0s"`. After each
//! chunk: the data directory's disk use, the process's RSS and how long the restart took to
//! serve. They are written to `report.svg` / `report.json` (in `STOCKFLOW_SOAK_REPORT`, default
//! `target/soak`) and must plateau; the final state must equal the independent model exactly.
//!
//! The short form runs in CI (`cargo test --test soak`). The long form — the same test with
//! `STOCKFLOW_SOAK_RATE=0.5 STOCKFLOW_SOAK_CYCLES=30` (855 k events) — is how docs/BENCHMARKS.md's
//! figures and `docs/soak-week.svg` were made.

mod support;

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use serde_json::Value;
use stockflow_model::{Config, decimal_value};

const DAY: i64 = 86_400_000;
const SHARDS: usize = 2;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Bytes the directory's files occupy on disk (allocated blocks, so preallocation counts).
fn disk_use(dir: &Path) -> u64 {
    let mut total = 0;
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    for e in entries.flatten() {
        let Ok(meta) = e.metadata() else { continue };
        total += if meta.is_dir() { disk_use(&e.path()) } else { meta.blocks() * 512 };
    }
    total
}

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

struct Node {
    child: Child,
    ingest: String,
}

impl Drop for Node {
    fn drop(&mut self) {
        // A failing assertion must not leave a server behind.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Starts `stockflow run`; returns it once its ingest answers, and how long that took.
fn start(config: &Path, data: &Path) -> (Node, Duration) {
    let t0 = Instant::now();
    let (child, line) = support::spawn_announced(
        Command::new(env!("CARGO_BIN_EXE_stockflow"))
            .args(["--config", config.to_str().unwrap(), "--data-dir", data.to_str().unwrap()])
            .args(["run", "--listen", "127.0.0.1:0", "--dashboard-listen", "127.0.0.1:0"])
            .env("STOCKFLOW_LOG", "warn")
            .env_remove("STOCKFLOW_WEBHOOK_SECRETS")
            .env_remove("STOCKFLOW_WEBHOOK_SECRET_ID"),
    );
    (Node { child, ingest: support::banner_addr(&line, 1) }, t0.elapsed())
}

/// Sends `batch` (NDJSON), dropping the lines the ingest refuses (the stream holds a few bad
/// records on purpose: a 400 names the first by index); returns the lines accepted.
fn send<'a>(addr: &str, batch: &[&'a str]) -> Vec<&'a str> {
    let mut lines = batch.to_vec();
    loop {
        if lines.is_empty() {
            return lines;
        }
        match post(addr, &lines.join("\n")) {
            Ok(()) => return lines,
            Err(index) => {
                lines.remove(index);
            }
        }
    }
}

/// POSTs NDJSON; retries while the server says 503 (it is catching up); a 400 gives the index of
/// the refused line; panics on anything else.
fn post(addr: &str, body: &str) -> Result<(), usize> {
    for attempt in 0..600 {
        let (status, resp) = support::http(addr, "POST", "/v1/events", body);
        match status {
            202 => return Ok(()),
            400 => {
                let body: Value = serde_json::from_str(resp.split_once("\r\n\r\n").map_or("", |(_, b)| b)).unwrap();
                return Err(body["index"].as_u64().unwrap_or_else(|| panic!("{resp}")) as usize);
            }
            503 => std::thread::sleep(Duration::from_millis(20 * (attempt + 1).min(25))),
            _ => panic!("{resp}"),
        }
    }
    panic!("ingest stayed unavailable");
}

#[derive(Debug, Clone, Copy, serde::Serialize)]
struct Sample {
    cycle: usize,
    events_sent: usize,
    disk_bytes: u64,
    rss_bytes: u64,
    restart_ms: f64,
    log_segments: usize,
}

fn log_segments(data: &Path) -> usize {
    let Ok(shards) = std::fs::read_dir(data.join("log")) else { return 0 };
    shards
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| std::fs::read_dir(e.path()).map(|d| d.count()).unwrap_or(0))
        .sum()
}

/// Max of a third of the samples.
fn third_max(samples: &[Sample], third: usize, f: impl Fn(&Sample) -> f64) -> f64 {
    let n = samples.len();
    let (lo, hi) = (n * third / 3, n * (third + 1) / 3);
    samples[lo..hi].iter().map(f).fold(0.0, f64::max)
}

fn svg(samples: &[Sample]) -> String {
    let (w, h, pad) = (720.0, 220.0, 40.0);
    type Series = (&'static str, &'static str, Box<dyn Fn(&Sample) -> f64>);
    let series: [Series; 3] = [
        ("disk MB", "#1f77b4", Box::new(|s| s.disk_bytes as f64 / 1e6)),
        ("RSS MB", "#d62728", Box::new(|s| s.rss_bytes as f64 / 1e6)),
        ("restart ms", "#2ca02c", Box::new(|s| s.restart_ms)),
    ];
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{}\" font-family=\"sans-serif\" font-size=\"12\">\n",
        3.0 * h
    );
    for (i, (name, color, f)) in series.iter().enumerate() {
        let top = i as f64 * h;
        let max = samples.iter().map(f).fold(1e-9, f64::max);
        let x = |c: usize| pad + (w - 2.0 * pad) * c as f64 / (samples.len().max(2) - 1) as f64;
        let y = |v: f64| top + h - pad - (h - 2.0 * pad) * v / max;
        let points: Vec<String> =
            samples.iter().enumerate().map(|(c, s)| format!("{:.1},{:.1}", x(c), y(f(s)))).collect();
        out += &format!(
            "<text x=\"{pad}\" y=\"{:.0}\">{name} (max {max:.1}) per restart cycle</text>\n\
             <line x1=\"{pad}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"#999\"/>\n\
             <polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>\n",
            top + 20.0,
            y(0.0),
            w - pad,
            y(0.0),
            points.join(" ")
        );
    }
    out + "</svg>\n"
}

#[test]
fn a_week_with_kill_9_restarts_and_short_retention_plateaus_and_stays_exact() {
    let rate: String = env_or("STOCKFLOW_SOAK_RATE", "0.05".to_string());
    let cycles: usize = env_or("STOCKFLOW_SOAK_CYCLES", 12);
    let report_dir: PathBuf =
        env_or("STOCKFLOW_SOAK_REPORT", PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/target/soak")));
    let dir = tempfile::tempdir().unwrap();
    let week =
        support::loadgen(dir.path(), "week", &["--profile", "cyber-week", "--base-rate", &rate, "--skus", "500"]);
    let stream = std::fs::read_to_string(week.join("events.ndjson")).unwrap();
    let lines: Vec<&str> = stream.lines().filter(|l| !l.trim().is_empty()).collect();
    // Horizons of a day: dedup ids and closed lines stop growing after the first day of the week.
    let model_cfg = Config { dedup_horizon_ms: DAY, line_horizon_ms: DAY, ..Config::default() };
    let config = dir.path().join("soak.toml");
    std::fs::write(
        &config,
        format!(
            "shards = {SHARDS}\n[engine]\ndedup_horizon_ms = {DAY}\nline_horizon_ms = {DAY}\n\
             [ingest]\nmax_future_ms = 604800000\n\
             [retention]\nstream = \"0s\"\ndelivered = \"0s\"\nsweep_every = \"200ms\"\nsegment_mib = 1\n\
             [connectors]\nlog = false\n"
        ),
    )
    .unwrap();
    let data = dir.path().join("data");
    let chunk = lines.len().div_ceil(cycles);
    let mut samples = Vec::new();
    let mut accepted: Vec<&str> = Vec::with_capacity(lines.len());
    let mut sent = 0;
    for (cycle, part) in lines.chunks(chunk).enumerate() {
        let (mut node, restart) = start(&config, &data);
        for batch in part.chunks(500) {
            accepted.extend(send(&node.ingest, batch));
        }
        sent += part.len();
        // Consumed, committed and swept: only about the active segment of each shard is left.
        support::wait_for("retention to delete the consumed segments", Duration::from_secs(120), || {
            (log_segments(&data) <= 2 * SHARDS).then_some(())
        });
        let rss = rss_bytes(node.child.id());
        // kill -9 mid-stream: whatever was acknowledged is on disk; the rest of the work resumes.
        node.child.kill().unwrap();
        node.child.wait().unwrap();
        let s = Sample {
            cycle,
            events_sent: sent,
            disk_bytes: disk_use(&data),
            rss_bytes: rss,
            restart_ms: restart.as_secs_f64() * 1e3,
            log_segments: log_segments(&data),
        };
        eprintln!("{s:?}");
        samples.push(s);
    }
    // The end: a clean start that consumes everything and stops (SIGTERM), then a final drain.
    let (mut node, _) = start(&config, &data);
    let _ = Command::new("kill").args(["-TERM", &node.child.id().to_string()]).status();
    assert!(node.child.wait().unwrap().success());
    let out = Command::new(env!("CARGO_BIN_EXE_stockflow"))
        .args(["--config", config.to_str().unwrap(), "--data-dir", data.to_str().unwrap(), "consume", "--drain"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", support::text(&out));
    let final_disk = disk_use(&data);

    std::fs::create_dir_all(&report_dir).unwrap();
    std::fs::write(report_dir.join("report.svg"), svg(&samples)).unwrap();
    let report =
        serde_json::json!({ "rate": rate, "events": lines.len(), "samples": samples, "final_disk_bytes": final_disk });
    std::fs::write(report_dir.join("report.json"), serde_json::to_string_pretty(&report).unwrap()).unwrap();
    eprintln!(
        "soak: {} events, {} restarts, final disk {final_disk} bytes; report in {}",
        lines.len(),
        cycles,
        report_dir.display()
    );

    // Exact: every SKU equals the model over the whole week.
    let refused = lines.len() - accepted.len();
    assert!(refused < lines.len() / 100, "{refused} lines refused by the ingest");
    let model = stockflow_model::run(&model_cfg, accepted.iter().map(|l| l.as_bytes()));
    let dump = Command::new(env!("CARGO_BIN_EXE_stockflow"))
        .args(["--config", config.to_str().unwrap(), "--data-dir", data.to_str().unwrap(), "state", "dump"])
        .output()
        .unwrap();
    assert!(dump.status.success(), "{}", support::text(&dump));
    let states: BTreeMap<String, Value> = String::from_utf8(dump.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .map(|v| (v["sku"].as_str().unwrap().to_string(), v))
        .collect();
    assert_eq!(states.len(), model.skus.len());
    for (sku, m) in &model.skus {
        let s = &states[sku];
        let got = (
            s["on_hand"].as_i64().unwrap(),
            s["reserved"].as_i64().unwrap(),
            s["oversells"].as_u64().unwrap(),
            decimal_value(s["avg_cost"].as_str().unwrap()).unwrap(),
            decimal_value(s["cogs"].as_str().unwrap()).unwrap(),
        );
        assert_eq!(got, (m.on_hand, m.reserved, m.oversells, m.avg_cost.clone(), m.cogs.clone()), "SKU {sku}");
    }

    // Plateaus: the last third of the run grows no further than the middle third allows.
    let mb = |s: &Sample| s.disk_bytes as f64 / 1e6;
    let (mid, last) = (third_max(&samples, 1, mb), third_max(&samples, 2, mb));
    assert!(last <= mid * 1.25 + 2.0, "disk keeps growing: {mid:.1} MB in the middle third, {last:.1} MB at the end");
    let rss = |s: &Sample| s.rss_bytes as f64 / 1e6;
    let (mid, last) = (third_max(&samples, 1, rss), third_max(&samples, 2, rss));
    assert!(last <= mid * 1.5 + 30.0, "RSS keeps growing: {mid:.1} MB then {last:.1} MB");
    let ms = |s: &Sample| s.restart_ms;
    let (first, last) = (third_max(&samples, 0, ms), third_max(&samples, 2, ms));
    assert!(last <= first * 2.0 + 500.0, "restarts slow down with history: {first:.0} ms then {last:.0} ms");
    // Retention did its work: consumed segments are gone (a handful per shard stay at most).
    assert!(samples.iter().all(|s| s.log_segments <= 2 * SHARDS), "segments pile up: {samples:?}");
    let logged: u64 = lines.iter().map(|l| l.len() as u64 + 8).sum();
    assert!(
        final_disk < logged,
        "the data directory ({final_disk} B) is smaller than the stream it consumed ({logged} B)"
    );
}
