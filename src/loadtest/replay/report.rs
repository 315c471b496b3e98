//! The replay's verdict: the verification against the straight pass, the figures, the JSON
//! report and its picture.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use hdrhistogram::Histogram;
use serde::Serialize;
use stockflow_state::reference::Outcome;

use super::drive::{Buckets, Driven, Options, Point, Rejection};
use super::{Pace, Target, Workload};
use crate::loadtest::load::Percentiles;

/// The final state against the straight pass.
#[derive(Debug, Clone, Serialize)]
pub struct Verification {
    /// Equal, SKU by SKU and alert by alert, and every bad record accounted for.
    pub ok: bool,
    /// SKUs in the straight pass.
    pub skus: usize,
    /// Alerts in the straight pass (oversell and low stock).
    pub alerts: usize,
    /// Oversell alerts in the straight pass.
    pub oversell_alerts: usize,
    /// Bad records in the stream.
    pub bad_records: usize,
    /// Of which the consumers dead-lettered …
    pub dead_lettered: usize,
    /// … and the ingest API refused.
    pub rejected_at_ingest: u64,
    /// What differs (at most 20 lines).
    pub differences: Vec<String>,
}

impl Verification {
    /// Compares `actual` with `expected`; records refused at the ingest count as dead letters.
    pub fn compare(expected: &Outcome, mut actual: Outcome, rejected: u64) -> Self {
        let dead_lettered = actual.dead_letters;
        actual.dead_letters += rejected as usize;
        let differences = expected.diff(&actual, 20);
        Verification {
            ok: differences.is_empty(),
            dead_lettered,
            rejected_at_ingest: rejected,
            differences,
            ..Self::of(expected)
        }
    }

    /// The final state could not be read.
    pub fn unreadable(expected: &Outcome, reason: String) -> Self {
        Verification { ok: false, differences: vec![reason], ..Self::of(expected) }
    }

    fn of(expected: &Outcome) -> Self {
        Verification {
            ok: false,
            skus: expected.skus.len(),
            alerts: expected.alerts.len(),
            oversell_alerts: expected.oversell_alerts(),
            bad_records: expected.dead_letters,
            dead_lettered: 0,
            rejected_at_ingest: 0,
            differences: Vec::new(),
        }
    }
}

fn of_hdr(h: &Histogram<u64>) -> Option<Percentiles> {
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    (!h.is_empty()).then(|| Percentiles {
        p50: ms(0.5),
        p90: ms(0.9),
        p99: ms(0.99),
        p999: ms(0.999),
        max: h.max() as f64 / 1000.0,
    })
}

fn of_buckets(b: &Buckets) -> Option<Percentiles> {
    Some(Percentiles {
        p50: b.quantile_ms(0.5)?,
        p90: b.quantile_ms(0.9)?,
        p99: b.quantile_ms(0.99)?,
        p999: b.quantile_ms(0.999)?,
        max: b.quantile_ms(1.0)?,
    })
}

/// `report.json`.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Verified, caught up, and (paced) never further behind than `--max-lag`.
    pub passed: bool,
    /// Why not.
    pub failures: Vec<String>,
    /// The target.
    pub target: String,
    /// The stream file.
    pub stream: String,
    /// The loadgen profile, when there is one.
    pub profile: Option<String>,
    /// Its baseline, events a second.
    pub base_rate: Option<f64>,
    /// `max`, `rate N` or `speedup X`.
    pub pace: String,
    /// Records per request at most, and lanes.
    pub batch: usize,
    /// Lanes (connections or producers).
    pub lanes: usize,
    /// Records in the stream.
    pub records: usize,
    /// Records accepted.
    pub accepted_records: u64,
    /// Events put on the stream.
    pub accepted_events: u64,
    /// Records refused for their content.
    pub rejected: u64,
    /// The first refusals.
    pub rejections: Vec<Rejection>,
    /// Failed attempts, retried.
    pub errors: u64,
    /// Successful requests or puts.
    pub requests: u64,
    /// Seconds from the first due record to the last answer.
    pub send_seconds: f64,
    /// Seconds from the last answer until everything was committed.
    pub drain_seconds: f64,
    /// The schedule's average, events a second (paced runs).
    pub offered_rate: Option<f64>,
    /// Accepted records over `send_seconds`.
    pub achieved_rate: f64,
    /// Highest one-second offered rate.
    pub peak_offered_rate: f64,
    /// Highest one-second accepted rate.
    pub peak_achieved_rate: f64,
    /// The highest one-second accepted rate after the first second (which carries the opening
    /// stock counts) over the profile's baseline (paced by a profile).
    pub peak_multiple_of_baseline: Option<f64>,
    /// Due → accepted, per record (HDR histogram).
    pub ingest_latency_ms: Option<Percentiles>,
    /// Accepted → committed by a consumer, from the consumers' `stockflow_end_to_end_seconds`
    /// buckets (interpolated inside a bucket).
    pub end_to_end_ms: Option<Percentiles>,
    /// Most records accepted but not yet committed.
    pub max_lag_records: u64,
    /// Longest an accepted record waited uncommitted (at one-second resolution).
    pub max_lag_seconds: f64,
    /// Furthest a lane fell behind the schedule.
    pub max_behind_seconds: f64,
    /// AWS calls made by the consumers and producers, and per 1,000 events.
    pub calls: Option<serde_json::Value>,
    /// The final state against the straight pass.
    pub verification: Verification,
    /// Per second.
    pub series: Vec<Point>,
}

impl Report {
    /// Puts the pieces together and decides.
    pub fn build(
        target: &Target,
        w: &Workload,
        opts: &Options,
        d: Driven,
        verification: Verification,
        calls: Option<serde_json::Value>,
    ) -> Self {
        let mut failures = Vec::new();
        if !verification.ok {
            failures
                .push(format!("the final state differs from the straight pass ({})", verification.differences.len()));
        }
        if !d.caught_up {
            failures.push(format!(
                "the consumers had not committed everything {} s after the last record",
                opts.drain_timeout.as_secs()
            ));
        }
        if opts.pace.paced() {
            if d.max_lag_seconds > opts.max_lag {
                failures
                    .push(format!("the consumers fell {:.1} s behind (--max-lag {})", d.max_lag_seconds, opts.max_lag));
            }
            if d.max_behind_seconds > opts.max_lag {
                failures.push(format!(
                    "the target fell {:.1} s behind the schedule (--max-lag {})",
                    d.max_behind_seconds, opts.max_lag
                ));
            }
        }
        let schedule_seconds = match opts.pace {
            Pace::Max => None,
            Pace::Rate(r) => Some(w.len() as f64 / r),
            Pace::Speedup(x) => w.schedule.as_ref().map(|s| s.hours.len() as f64 * 3600.0 / x),
        };
        let peak_achieved = d.series.iter().map(|p| p.achieved).fold(0.0, f64::max);
        let base_rate = w.schedule.as_ref().map(|s| s.base_rate);
        let calls = calls.map(|mut c| {
            if let Some(obj) = c.as_object_mut() {
                let per: serde_json::Map<String, serde_json::Value> = obj
                    .iter()
                    .filter_map(|(k, v)| {
                        v.as_u64().map(|n| (k.clone(), (n as f64 * 1000.0 / d.accepted_events.max(1) as f64).into()))
                    })
                    .collect();
                obj.insert("per_1000_events".into(), per.into());
            }
            c
        });
        Report {
            passed: failures.is_empty(),
            failures,
            target: target.to_string(),
            stream: w.source.clone(),
            profile: w
                .schedule
                .as_ref()
                .and_then(|s| serde_json::to_value(s.profile).ok())
                .and_then(|v| v.as_str().map(str::to_string)),
            base_rate,
            pace: match opts.pace {
                Pace::Max => "max".into(),
                Pace::Rate(r) => format!("rate {r}"),
                Pace::Speedup(x) => format!("speedup {x}"),
            },
            batch: opts.batch,
            lanes: opts.lanes,
            records: w.len(),
            accepted_records: d.accepted_records,
            accepted_events: d.accepted_events,
            rejected: d.rejected,
            rejections: d.rejections,
            errors: d.errors,
            requests: d.requests,
            send_seconds: d.send_seconds,
            drain_seconds: d.drain_seconds,
            offered_rate: schedule_seconds.map(|s| w.len() as f64 / s),
            achieved_rate: d.accepted_records as f64 / d.send_seconds.max(1e-3),
            peak_offered_rate: d.series.iter().map(|p| p.offered).fold(0.0, f64::max),
            peak_achieved_rate: peak_achieved,
            peak_multiple_of_baseline: match (opts.pace, base_rate) {
                // Not the first second: it carries the opening stock counts, all due at the start.
                (Pace::Speedup(_), Some(b)) => {
                    Some(d.series.iter().skip(1).map(|p| p.achieved).fold(0.0, f64::max) / b)
                }
                _ => None,
            },
            ingest_latency_ms: of_hdr(&d.ingest),
            end_to_end_ms: of_buckets(&d.e2e),
            max_lag_records: d.max_lag_records,
            max_lag_seconds: d.max_lag_seconds,
            max_behind_seconds: d.max_behind_seconds,
            calls,
            verification,
            series: d.series,
        }
    }

    /// Writes `report.json` and `report.svg` into `dir`.
    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        let json = dir.join("report.json");
        let mut bytes = serde_json::to_vec_pretty(self)?;
        bytes.push(b'\n');
        std::fs::write(&json, bytes).with_context(|| format!("writing {}", json.display()))?;
        let svg = dir.join("report.svg");
        std::fs::write(&svg, self.svg()).with_context(|| format!("writing {}", svg.display()))
    }

    /// The summary on stdout.
    pub fn print(&self, dir: &Path) {
        let pct = |p: &Option<Percentiles>| {
            p.map_or("n/a".into(), |p| {
                format!("p50 {:.1} p99 {:.1} p99.9 {:.1} max {:.1}", p.p50, p.p99, p.p999, p.max)
            })
        };
        println!(
            "replay: {} records to {} ({}, {} lanes × ≤{} per request): {} accepted, {} refused, {} retried errors; \
             {:.0} events/s over {:.2} s (peak {:.0}/s{}), drained in {:.2} s",
            self.records,
            self.target,
            self.pace,
            self.lanes,
            self.batch,
            self.accepted_records,
            self.rejected,
            self.errors,
            self.achieved_rate,
            self.send_seconds,
            self.peak_achieved_rate,
            self.peak_multiple_of_baseline.map(|m| format!(", {m:.0}× baseline")).unwrap_or_default(),
            self.drain_seconds,
        );
        println!("ingest latency ms: {}", pct(&self.ingest_latency_ms));
        println!("end-to-end ms:     {}", pct(&self.end_to_end_ms));
        println!(
            "lag: at most {} records, {:.1} s behind; lanes at most {:.1} s behind the schedule",
            self.max_lag_records, self.max_lag_seconds, self.max_behind_seconds
        );
        if let Some(c) = &self.calls {
            println!("calls: {c}");
        }
        let v = &self.verification;
        if v.ok {
            println!(
                "verified: {} SKUs and {} alerts ({} oversell) equal the straight pass; {} bad records ({} refused at ingest, {} dead-lettered)",
                v.skus, v.alerts, v.oversell_alerts, v.bad_records, v.rejected_at_ingest, v.dead_lettered
            );
        } else {
            println!("MISMATCH against the straight pass:");
            for d in &v.differences {
                println!("  {d}");
            }
        }
        for f in &self.failures {
            println!("FAILED: {f}");
        }
        println!(
            "report: {} and {} — {}",
            dir.join("report.json").display(),
            dir.join("report.svg").display(),
            if self.passed { "PASSED" } else { "FAILED" }
        );
    }

    /// Three charts over time: offered vs achieved rate, lag, latency percentiles.
    pub fn svg(&self) -> String {
        const W: f64 = 960.0;
        const PANEL: f64 = 230.0;
        let mut s = String::new();
        let height = 70.0 + 3.0 * (PANEL + 40.0);
        let _ = write!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{height}" viewBox="0 0 {W} {height}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="20" y="28" font-size="16" font-weight="bold">{}</text>
<text x="20" y="50" fill="{}">{}</text>
"#,
            esc(&format!(
                "stockflow replay: {} records{} → {} ({})",
                self.records,
                self.profile.as_ref().map(|p| format!(" of {p}")).unwrap_or_default(),
                self.target,
                self.pace
            )),
            if self.passed { "#2a7d2e" } else { "#c62828" },
            esc(&format!(
                "{} — {:.0} events/s, peak {:.0}/s, ingest p99 {} ms, end-to-end p99 {} ms, verified {}",
                if self.passed { "PASSED" } else { "FAILED" },
                self.achieved_rate,
                self.peak_achieved_rate,
                self.ingest_latency_ms.map_or("n/a".into(), |p| format!("{:.1}", p.p99)),
                self.end_to_end_ms.map_or("n/a".into(), |p| format!("{:.1}", p.p99)),
                if self.verification.ok { "exact" } else { "MISMATCH" },
            )),
        );
        let t: Vec<f64> = self.series.iter().map(|p| p.t).collect();
        let line = |f: fn(&Point) -> Option<f64>| -> Vec<(f64, Option<f64>)> {
            self.series.iter().map(|p| (p.t, f(p))).collect()
        };
        let panels: [(&str, bool, Vec<Line>); 3] = [
            (
                "events per second",
                false,
                vec![
                    Line {
                        label: "offered",
                        color: "#bdbdbd",
                        dash: false,
                        width: 5.0,
                        points: line(|p| Some(p.offered)),
                    },
                    Line {
                        label: "achieved",
                        color: "#1565c0",
                        dash: false,
                        width: 1.6,
                        points: line(|p| Some(p.achieved)),
                    },
                ],
            ),
            (
                "consumer lag and schedule lateness, seconds",
                false,
                vec![
                    Line {
                        label: "consumer lag",
                        color: "#c62828",
                        dash: false,
                        width: 1.6,
                        points: line(|p| Some(p.lag_seconds)),
                    },
                    Line {
                        label: "behind schedule",
                        color: "#ef6c00",
                        dash: true,
                        width: 1.6,
                        points: line(|p| Some(p.behind_seconds)),
                    },
                ],
            ),
            (
                "latency, ms (log scale)",
                true,
                vec![
                    Line {
                        label: "ingest p50",
                        color: "#64b5f6",
                        dash: false,
                        width: 1.6,
                        points: line(|p| p.ingest_p50_ms),
                    },
                    Line {
                        label: "ingest p99",
                        color: "#1565c0",
                        dash: false,
                        width: 1.6,
                        points: line(|p| p.ingest_p99_ms),
                    },
                    Line {
                        label: "end-to-end p50",
                        color: "#81c784",
                        dash: true,
                        width: 1.6,
                        points: line(|p| p.e2e_p50_ms),
                    },
                    Line {
                        label: "end-to-end p99",
                        color: "#2e7d32",
                        dash: true,
                        width: 1.6,
                        points: line(|p| p.e2e_p99_ms),
                    },
                ],
            ),
        ];
        let t_max = t.last().copied().unwrap_or(1.0).max(1e-3);
        for (k, (title, log, lines)) in panels.iter().enumerate() {
            let top = 70.0 + k as f64 * (PANEL + 40.0);
            panel(&mut s, top, PANEL, W, title, *log, t_max, lines);
        }
        s.push_str("</svg>\n");
        s
    }
}

struct Line {
    label: &'static str,
    color: &'static str,
    dash: bool,
    width: f64,
    points: Vec<(f64, Option<f64>)>,
}

#[allow(clippy::too_many_arguments)]
fn panel(s: &mut String, top: f64, h: f64, w: f64, title: &str, log: bool, t_max: f64, lines: &[Line]) {
    let (left, right) = (70.0, w - 20.0);
    let (y0, y1) = (top + 20.0, top + h);
    let values = lines.iter().flat_map(|l| l.points.iter().filter_map(|p| p.1)).filter(|v| v.is_finite());
    let v_max = values.clone().fold(0.0f64, f64::max);
    let (lo, hi) = if log {
        let v_min = values.filter(|v| *v > 0.0).fold(f64::INFINITY, f64::min);
        let lo = if v_min.is_finite() { v_min.log10().floor() } else { 0.0 };
        (lo, (v_max.max(10f64.powf(lo + 1.0))).log10().ceil().max(lo + 1.0))
    } else {
        // Rates and seconds: an axis of at least 1, so a lag of milliseconds reads as ~0.
        (0.0, nice(v_max.max(1.0)))
    };
    let y = |v: f64| {
        let f = if log { (v.max(10f64.powf(lo)).log10() - lo) / (hi - lo) } else { v / hi };
        y1 - f.clamp(0.0, 1.0) * (y1 - y0)
    };
    let x = |t: f64| left + (t / t_max) * (right - left);
    let _ = writeln!(s, r#"<text x="{left}" y="{}" font-weight="bold">{}</text>"#, top + 12.0, esc(title));
    let _ = writeln!(
        s,
        r##"<rect x="{left}" y="{y0}" width="{}" height="{}" fill="none" stroke="#bdbdbd"/>"##,
        right - left,
        y1 - y0
    );
    let ticks: Vec<f64> = if log {
        (lo as i32..=hi as i32).map(|e| 10f64.powi(e)).collect()
    } else {
        (0..=4).map(|i| hi * f64::from(i) / 4.0).collect()
    };
    for v in ticks {
        let yy = y(v);
        let _ = writeln!(
            s,
            r##"<line x1="{left}" y1="{yy:.1}" x2="{right}" y2="{yy:.1}" stroke="#eeeeee"/><text x="{}" y="{:.1}" text-anchor="end" fill="#616161">{}</text>"##,
            left - 6.0,
            yy + 4.0,
            short(v)
        );
    }
    for i in 0..=5 {
        let t = t_max * f64::from(i) / 5.0;
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{}" text-anchor="middle" fill="#616161">{:.0} s</text>"##,
            x(t),
            y1 + 16.0,
            t
        );
    }
    for (n, l) in lines.iter().enumerate() {
        let mut d = String::new();
        let mut pen_up = true;
        for (t, v) in &l.points {
            match v {
                Some(v) if v.is_finite() && (!log || *v > 0.0) => {
                    let _ = write!(d, "{}{:.1},{:.1} ", if pen_up { "M" } else { "L" }, x(*t), y(*v));
                    pen_up = false;
                }
                _ => pen_up = true,
            }
        }
        if !d.is_empty() {
            let _ = writeln!(
                s,
                r#"<path d="{}" fill="none" stroke="{}" stroke-width="{}"{}/>"#,
                d.trim_end(),
                l.color,
                l.width,
                if l.dash { r#" stroke-dasharray="5,3""# } else { "" }
            );
        }
        let lx = left + 10.0 + n as f64 * 150.0;
        let _ = writeln!(
            s,
            r#"<line x1="{lx}" y1="{}" x2="{}" y2="{}" stroke="{}" stroke-width="2"{}/><text x="{}" y="{}">{}</text>"#,
            y0 + 12.0,
            lx + 18.0,
            y0 + 12.0,
            l.color,
            if l.dash { r#" stroke-dasharray="5,3""# } else { "" },
            lx + 22.0,
            y0 + 16.0,
            l.label
        );
    }
}

/// A round axis maximum at or above `v`.
fn nice(v: f64) -> f64 {
    let e = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0].iter().map(|m| m * e).find(|c| *c >= v).unwrap_or(10.0 * e)
}

fn short(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else if v >= 1.0 || v == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axes_are_round() {
        assert_eq!(nice(7.3), 10.0);
        assert_eq!(nice(230.0), 250.0);
        assert_eq!(nice(0.4), 0.5);
        assert_eq!(short(12_500.0), "12.5k");
        assert_eq!(esc("a<b&c"), "a&lt;b&amp;c");
    }
}
