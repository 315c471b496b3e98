//! The reconciliation's report: totals, the value check against the books, and its three
//! renderings — `reconcile.json` (everything), `reconcile.csv` (one row per SKU) and
//! `reconcile.html` (the summary a person reads: figures, a bar chart of the largest differences,
//! the unexplained SKUs) — plus the Prometheus gauges.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;

use anyhow::Context;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::compare::{BUCKETS, Class, SkuLine};

/// The counts and sums of one run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    /// SKUs compared.
    pub skus: u64,
    /// SKUs per class.
    pub classes: BTreeMap<String, u64>,
    /// Units on hand in stockflow.
    pub stockflow_units: i64,
    /// Units Amazon counts.
    pub amazon_units: i64,
    /// Σ |unexplained units|.
    pub unexplained_units: i64,
    /// Σ |unexplained value| (in the SKUs' cost currencies, summed).
    pub unexplained_value: Decimal,
}

impl Totals {
    /// The totals of `lines`.
    pub fn of(lines: &[SkuLine]) -> Self {
        let mut t = Totals { skus: lines.len() as u64, ..Totals::default() };
        for c in Class::ALL {
            t.classes.insert(c.label().into(), 0);
        }
        for l in lines {
            *t.classes.entry(l.class.label().into()).or_default() += 1;
            t.stockflow_units = t.stockflow_units.saturating_add(l.stockflow_on_hand);
            t.amazon_units = t.amazon_units.saturating_add(l.amazon_count.unwrap_or(0));
            t.unexplained_units = t.unexplained_units.saturating_add(l.unexplained_units.saturating_abs());
        }
        t.unexplained_value = super::compare::sum(lines.iter().map(|l| l.unexplained_value.abs()));
        t
    }

    /// SKUs of `class`.
    pub fn count(&self, class: Class) -> u64 {
        self.classes.get(class.label()).copied().unwrap_or(0)
    }
}

/// A SKU that drives a value difference.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Driver {
    /// The SKU.
    pub sku: String,
    /// Its unexplained units.
    pub units: i64,
    /// Their value.
    pub value: Decimal,
}

/// stockflow's value against the books.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ValueCheck {
    /// The books' currency: only SKUs costed in it are valued.
    pub currency: String,
    /// Σ on_hand × avg_cost over those SKUs, each to the cent.
    pub computed_value: Decimal,
    /// Inventory value booked outside stockflow (`reconcile.opening_inventory_value`).
    pub opening_value: Decimal,
    /// Σ COGS stockflow booked over those SKUs.
    pub stockflow_cogs: Decimal,
    /// Which books (`generic`, `quickbooks`, `xero`), when read.
    pub books: Option<String>,
    /// The inventory account's balance.
    pub book_inventory: Option<Decimal>,
    /// `book_inventory − (computed_value + opening_value)`.
    pub inventory_difference: Option<Decimal>,
    /// COGS the books show from `since` to the as-of date.
    pub book_cogs: Option<Decimal>,
    /// `book_cogs − stockflow_cogs`.
    pub cogs_difference: Option<Decimal>,
    /// Since when COGS are compared (`reconcile.books_since`).
    pub since: String,
    /// Why the books could not be read, if they could not.
    pub error: Option<String>,
    /// The SKUs whose unexplained units carry the most value, largest first (at most 10).
    pub drivers: Vec<Driver>,
}

/// The run's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Within every threshold.
    Ok,
    /// A threshold was passed: alerted.
    Discrepancies,
}

/// The thresholds past which a run alerts (`[reconcile]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Thresholds {
    /// Σ |unexplained units| above this alerts.
    pub max_unexplained_units: i64,
    /// Σ |unexplained value| above this alerts.
    pub max_unexplained_value: Decimal,
    /// |inventory or COGS difference against the books| above this alerts.
    pub max_book_difference: Decimal,
}

/// Everything one run found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// The instant compared (RFC 3339): Amazon's newest `lastUpdatedTime`, or the ledger's last
    /// day, or the run's start.
    pub as_of: String,
    /// `as_of` in epoch ms.
    pub as_of_ms: i64,
    /// When the run finished (RFC 3339).
    pub finished_at: String,
    /// Amazon's side: `inventory_api:{marketplace}` or `ledger:{file}`.
    pub amazon_source: String,
    /// stockflow's side: `embedded:{dir}` or `dynamodb:{prefix}`.
    pub stockflow_source: String,
    /// Totals.
    pub totals: Totals,
    /// The value check (absent when no SKU has a cost and no books are configured).
    pub value: Option<ValueCheck>,
    /// Thresholds applied.
    pub thresholds: Thresholds,
    /// Verdict.
    pub outcome: Outcome,
    /// Why the verdict is what it is (one line per threshold passed).
    pub reasons: Vec<String>,
    /// Ids of the `stock_counted` events put on the stream (`--apply`).
    pub applied: Vec<String>,
    /// One line per SKU.
    pub skus: Vec<SkuLine>,
}

impl Report {
    /// Applies the thresholds: the outcome and its reasons.
    pub fn judge(&mut self) {
        let t = &self.thresholds;
        let mut reasons = Vec::new();
        if self.totals.unexplained_units > t.max_unexplained_units {
            reasons.push(format!(
                "{} unexplained units over {} SKUs (threshold {})",
                self.totals.unexplained_units,
                self.totals.count(Class::Unexplained),
                t.max_unexplained_units
            ));
        }
        if self.totals.unexplained_value > t.max_unexplained_value {
            reasons.push(format!(
                "unexplained value {} (threshold {})",
                self.totals.unexplained_value, t.max_unexplained_value
            ));
        }
        if let Some(v) = &self.value {
            for (what, d) in [("inventory", v.inventory_difference), ("COGS", v.cogs_difference)] {
                if let Some(d) = d.filter(|d| d.abs() > t.max_book_difference) {
                    reasons.push(format!(
                        "the books' {what} differs by {d} {} (threshold {})",
                        v.currency, t.max_book_difference
                    ));
                }
            }
        }
        self.outcome = if reasons.is_empty() { Outcome::Ok } else { Outcome::Discrepancies };
        self.reasons = reasons;
    }

    /// Writes `reconcile.json`, `reconcile.csv` and `reconcile.html` into `dir` (each through a
    /// temporary file and a rename, so a reader never sees half a report).
    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let put = |name: &str, write: &dyn Fn(&mut dyn std::io::Write) -> anyhow::Result<()>| -> anyhow::Result<()> {
            let tmp = dir.join(format!(".{name}.tmp"));
            let mut file = std::io::BufWriter::new(
                std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?,
            );
            write(&mut file).and_then(|()| Ok(file.flush()?)).with_context(|| format!("writing {}", tmp.display()))?;
            std::fs::rename(&tmp, dir.join(name)).with_context(|| format!("renaming into {}", dir.display()))
        };
        put("reconcile.csv", &|w| Ok(w.write_all(self.csv().as_bytes())?))?;
        put("reconcile.html", &|w| Ok(w.write_all(self.html().as_bytes())?))?;
        // Last: the dashboard reads the JSON, and the other two are then already in place. Compact
        // and streamed (pretty, 100,000 SKUs made 48 MB): people read the CSV or the page.
        put("reconcile.json", &|w| Ok(serde_json::to_writer(w, self)?))
    }

    /// One CSV row per SKU.
    pub fn csv(&self) -> String {
        let mut out = String::from(
            "sku,class,stockflow_on_hand,stockflow_reserved,amazon_count,fulfillable,pending_customer_order,difference",
        );
        for b in BUCKETS {
            let _ = write!(out, ",explained_{b}");
        }
        out.push_str(
            ",unexplained_units,avg_cost,currency,unexplained_value,stockflow_last_event_ms,amazon_updated_ms\n",
        );
        let opt = |v: Option<i64>| v.map(|v| v.to_string()).unwrap_or_default();
        for l in &self.skus {
            let _ = write!(
                out,
                "{},{},{},{},{},{},{},{}",
                csv_field(&l.sku),
                l.class.label(),
                l.stockflow_on_hand,
                l.stockflow_reserved,
                opt(l.amazon_count),
                l.fulfillable,
                l.pending_customer_order,
                l.difference
            );
            for b in BUCKETS {
                let _ = write!(out, ",{}", l.explained.get(b).copied().unwrap_or(0));
            }
            let _ = writeln!(
                out,
                ",{},{},{},{},{},{}",
                l.unexplained_units,
                l.avg_cost.normalize(),
                l.currency.as_deref().unwrap_or(""),
                l.unexplained_value,
                opt(l.stockflow_last_event_ms),
                opt(l.amazon_updated_ms)
            );
        }
        out
    }

    /// The summary page: self-contained HTML with an inline SVG chart.
    pub fn html(&self) -> String {
        let t = &self.totals;
        let mut h = String::with_capacity(16 << 10);
        let verdict = match self.outcome {
            Outcome::Ok => ("ok", "#1a7f37"),
            Outcome::Discrepancies => ("discrepancies", "#cf222e"),
        };
        let _ = write!(
            h,
            "<!doctype html><html><head><meta charset=\"utf-8\"><title>stockflow reconciliation {as_of}</title>\
<style>body{{font:14px system-ui,sans-serif;margin:2em;color:#1f2328}}.cards{{display:flex;gap:1em;flex-wrap:wrap}}\
.card{{border:1px solid #d0d7de;border-radius:6px;padding:.8em 1.2em;min-width:9em}}.card b{{display:block;font-size:1.6em}}\
table{{border-collapse:collapse;margin-top:1em}}td,th{{border-bottom:1px solid #d0d7de;padding:.3em .8em;text-align:right}}\
td:first-child,th:first-child{{text-align:left}}.verdict{{color:#fff;background:{color};border-radius:4px;padding:.1em .5em}}</style></head><body>\
<h1>Reconciliation as of {as_of} <span class=\"verdict\">{word}</span></h1>\
<p>Amazon: {amazon} · stockflow: {ours} · finished {finished}</p><div class=\"cards\">",
            as_of = esc(&self.as_of),
            color = verdict.1,
            word = verdict.0,
            amazon = esc(&self.amazon_source),
            ours = esc(&self.stockflow_source),
            finished = esc(&self.finished_at),
        );
        for (label, value) in [
            ("SKUs", t.skus.to_string()),
            ("match", t.count(Class::Match).to_string()),
            ("timing", t.count(Class::Timing).to_string()),
            ("explained", t.count(Class::Explained).to_string()),
            ("unexplained", t.count(Class::Unexplained).to_string()),
            ("unexplained units", t.unexplained_units.to_string()),
            ("unexplained value", t.unexplained_value.to_string()),
        ] {
            let _ = write!(h, "<div class=\"card\">{label}<b>{value}</b></div>");
        }
        h.push_str("</div>");
        for r in &self.reasons {
            let _ = write!(h, "<p><strong>⚠ {}</strong></p>", esc(r));
        }
        if let Some(v) = &self.value {
            let cell = |d: Option<Decimal>| d.map_or_else(|| "—".to_string(), |d| d.to_string());
            let _ = write!(
                h,
                "<h2>Value ({cur})</h2><table><tr><th></th><th>stockflow</th><th>books ({books})</th><th>difference</th></tr>\
<tr><td>inventory (+ opening {opening})</td><td>{computed}</td><td>{bi}</td><td>{di}</td></tr>\
<tr><td>COGS since {since}</td><td>{sc}</td><td>{bc}</td><td>{dc}</td></tr></table>",
                cur = esc(&v.currency),
                books = esc(v.books.as_deref().unwrap_or("not configured")),
                opening = v.opening_value,
                computed = v.computed_value + v.opening_value,
                bi = cell(v.book_inventory),
                di = cell(v.inventory_difference),
                since = esc(&v.since),
                sc = v.stockflow_cogs,
                bc = cell(v.book_cogs),
                dc = cell(v.cogs_difference),
            );
            if let Some(e) = &v.error {
                let _ = write!(h, "<p>The books could not be read: {}</p>", esc(e));
            }
        }
        // The largest differences, as bars (green explained, grey timing, red unexplained).
        let mut top: Vec<&SkuLine> = self.skus.iter().filter(|l| l.class != Class::Match).collect();
        top.sort_by_key(|l| std::cmp::Reverse(l.difference.saturating_abs()));
        top.truncate(20);
        if !top.is_empty() {
            let max = top.iter().map(|l| l.difference.saturating_abs()).max().unwrap_or(1).max(1) as f64;
            let row = 22;
            let _ = write!(
                h,
                "<h2>Largest differences (stockflow − Amazon)</h2><svg width=\"900\" height=\"{}\" font-size=\"12\">",
                top.len() * row + 10
            );
            for (i, l) in top.iter().enumerate() {
                let y = i * row + 5;
                let w = (l.difference.saturating_abs() as f64 / max * 300.0).max(1.0);
                let x = if l.difference < 0 { 460.0 - w } else { 460.0 };
                let color = match l.class {
                    Class::Unexplained => "#cf222e",
                    Class::Explained => "#1a7f37",
                    _ => "#8c959f",
                };
                let _ = write!(
                    h,
                    "<text x=\"0\" y=\"{ty}\">{sku}</text><rect x=\"{x:.1}\" y=\"{y}\" width=\"{w:.1}\" height=\"16\" fill=\"{color}\"/>\
<text x=\"{lx:.1}\" y=\"{ty}\">{d} ({class})</text>",
                    ty = y + 12,
                    sku = esc(&l.sku),
                    lx = 465.0 + if l.difference > 0 { w } else { 0.0 },
                    d = l.difference,
                    class = l.class.label(),
                );
            }
            h.push_str("<line x1=\"460\" y1=\"0\" x2=\"460\" y2=\"100%\" stroke=\"#1f2328\"/></svg>");
        }
        let unexplained: Vec<&SkuLine> = self.skus.iter().filter(|l| l.class == Class::Unexplained).collect();
        if !unexplained.is_empty() {
            h.push_str(
                "<h2>Unexplained</h2><table><tr><th>SKU</th><th>stockflow</th><th>Amazon</th><th>difference</th>\
<th>explained</th><th>unexplained</th><th>value</th></tr>",
            );
            for l in unexplained.iter().take(500) {
                let explained: Vec<String> = l.explained.iter().map(|(k, v)| format!("{k} {v}")).collect();
                let _ = write!(
                    h,
                    "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                    esc(&l.sku),
                    l.stockflow_on_hand,
                    l.amazon_count.map_or_else(|| "not listed".into(), |c| c.to_string()),
                    l.difference,
                    esc(&explained.join(", ")),
                    l.unexplained_units,
                    l.unexplained_value
                );
            }
            h.push_str("</table>");
        }
        if !self.applied.is_empty() {
            let _ = write!(h, "<p>{} counts put on the stream (<code>--apply</code>).</p>", self.applied.len());
        }
        h.push_str("</body></html>\n");
        h
    }

    /// Publishes the gauges (docs/metrics.md).
    pub fn record_metrics(&self) {
        let t = &self.totals;
        metrics::gauge!("stockflow_reconcile_unexplained_units").set(t.unexplained_units as f64);
        metrics::gauge!("stockflow_reconcile_unexplained_value").set(decimal_f64(t.unexplained_value));
        for c in Class::ALL {
            metrics::gauge!("stockflow_reconcile_skus", "class" => c.label()).set(t.count(c) as f64);
        }
        // Unknown (no books, or they could not be read) is NaN, not the previous run's figure.
        let known = |d: Option<Decimal>| d.map_or(f64::NAN, decimal_f64);
        let v = self.value.as_ref();
        metrics::gauge!("stockflow_reconcile_book_difference", "account" => "inventory")
            .set(known(v.and_then(|v| v.inventory_difference)));
        metrics::gauge!("stockflow_reconcile_book_difference", "account" => "cogs")
            .set(known(v.and_then(|v| v.cogs_difference)));
        record_outcome(match self.outcome {
            Outcome::Ok => "ok",
            Outcome::Discrepancies => "discrepancies",
        });
    }
}

/// The `n` unexplained SKUs with the most unexplained units (ties by SKU).
pub fn worst(lines: &[SkuLine], n: usize) -> Vec<&SkuLine> {
    let mut worst: Vec<&SkuLine> = lines.iter().filter(|l| l.class == Class::Unexplained).collect();
    worst.sort_by(|a, b| {
        b.unexplained_units.saturating_abs().cmp(&a.unexplained_units.saturating_abs()).then_with(|| a.sku.cmp(&b.sku))
    });
    worst.truncate(n);
    worst
}

/// What the dashboard's reconciliation panel shows of a report: everything but the per-SKU
/// lines, and the 20 unexplained SKUs with the largest differences.
pub fn panel(r: &Report) -> serde_json::Value {
    let worst = worst(&r.skus, 20);
    serde_json::json!({
        "as_of": r.as_of, "finished_at": r.finished_at, "amazon_source": r.amazon_source,
        "outcome": r.outcome, "reasons": r.reasons, "totals": r.totals, "value": r.value,
        "applied": r.applied.len(), "unexplained": worst,
    })
}

/// The last run's time and outcome (`ok`, `discrepancies`, `failed`): one series per outcome, 1
/// for the last one.
pub fn record_outcome(outcome: &'static str) {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
    metrics::gauge!("stockflow_reconcile_last_run_timestamp_seconds").set(now);
    for o in ["ok", "discrepancies", "failed"] {
        metrics::gauge!("stockflow_reconcile_last_outcome", "outcome" => o).set(if o == outcome { 1.0 } else { 0.0 });
    }
    metrics::counter!("stockflow_reconcile_runs_total", "outcome" => outcome).increment(1);
}

fn decimal_f64(d: Decimal) -> f64 {
    d.to_string().parse().unwrap_or(0.0)
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// A CSV cell: quoted when it must be, and a leading `=`, `+`, `-` or `@` defused with `'` so a
/// spreadsheet does not run a SKU as a formula.
fn csv_field(s: &str) -> String {
    let s = if s.starts_with(['=', '+', '-', '@']) { format!("'{s}") } else { s.to_string() };
    if s.contains([',', '"', '\n', '\r']) { format!("\"{}\"", s.replace('"', "\"\"")) } else { s }
}
