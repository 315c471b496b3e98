//! The observability deliverables agree with the code: every metric the code emits is in the table
//! of docs/metrics.md and the table lists nothing the code no longer emits; the Grafana dashboard
//! imports and uses only documented metrics; the Prometheus rules are well formed (and pass
//! promtool where it is installed).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("reading {rel}: {e}"))
}

/// `stockflow_…` or `process_…`, then lower-case letters, digits and underscores.
fn is_metric_name(s: &str) -> bool {
    let rest = s.strip_prefix("stockflow_").or_else(|| s.strip_prefix("process_"));
    rest.is_some_and(|r| !r.is_empty() && r.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'))
}

/// Literals of the code that are whole metric names but are not metrics.
const NOT_METRICS: &[&str] = &["stockflow_state", "stockflow_pipeline", "stockflow_connectors"];

/// The metric names of PromQL (or any) text: identifiers starting `stockflow_` / `process_`, with the
/// `_bucket`, `_sum` and `_count` series of histograms folded into the histogram's name.
fn names_in(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for word in text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        if !is_metric_name(word) {
            continue;
        }
        let base = ["_bucket", "_sum", "_count"].iter().find_map(|s| word.strip_suffix(s)).unwrap_or(word);
        names.insert(base.to_string());
    }
    names
}

/// The names in the first column of docs/metrics.md's `| Metric | Type | Labels | Meaning |` table.
fn documented() -> BTreeSet<String> {
    let doc = read("docs/metrics.md");
    let mut lines = doc.lines().skip_while(|l| !l.starts_with("| Metric | Type | Labels | Meaning |"));
    assert!(lines.next().is_some(), "docs/metrics.md has a `| Metric | Type | Labels | Meaning |` table");
    let mut names = BTreeSet::new();
    for line in lines.skip(1).take_while(|l| l.starts_with('|')) {
        let cell = line.split('|').nth(1).unwrap_or("").trim();
        let name = cell.trim_matches('`');
        assert!(
            cell.starts_with('`') && cell.ends_with('`') && is_metric_name(name),
            "docs/metrics.md: the first cell of {line:?} is one metric name in backticks"
        );
        let kind = line.split('|').nth(2).unwrap_or("").trim();
        assert!(
            ["counter", "gauge", "histogram"].iter().any(|k| kind.starts_with(k)),
            "docs/metrics.md: {name} has a type (counter, gauge or histogram), not {kind:?}"
        );
        assert!(names.insert(name.to_string()), "docs/metrics.md lists {name} twice");
    }
    assert!(names.len() >= 40, "the metrics table has {} rows", names.len());
    names
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// String literals of the code that are whole metric names (`"stockflow_…"`, `"process_…"`): the
/// names given to `counter!`, `gauge!`, `histogram!` and their `describe_*!`, to helpers that pass
/// them on (`Drain::count`), to bucket matchers and to the dashboard's exposition parser.
fn emitted() -> BTreeMap<String, PathBuf> {
    let mut files = Vec::new();
    for dir in ["state/src", "pipeline/src", "connectors/src", "src"] {
        rust_files(&root().join(dir), &mut files);
    }
    assert!(files.len() > 20, "found {} Rust files", files.len());
    let mut names = BTreeMap::new();
    for file in &files {
        let code = std::fs::read_to_string(file).unwrap();
        for (i, _) in code.match_indices('"') {
            let rest = &code[i + 1..];
            // `\"stockflow_…\"` is text inside another literal (an exposition in a unit test).
            if !(rest.starts_with("stockflow_") || rest.starts_with("process_")) || code[..i].ends_with('\\') {
                continue;
            }
            let Some(end) = rest.find('"') else { continue };
            let literal = &rest[..end];
            if is_metric_name(literal) && !NOT_METRICS.contains(&literal) {
                names.entry(literal.to_string()).or_insert_with(|| file.strip_prefix(root()).unwrap().to_path_buf());
            }
        }
    }
    assert!(names.len() >= 40, "found {} metric names in the code", names.len());
    names
}

#[test]
fn every_metric_the_code_emits_is_documented_and_every_documented_metric_is_emitted() {
    let code = emitted();
    let doc = documented();
    let undocumented: Vec<String> =
        code.iter().filter(|(n, _)| !doc.contains(*n)).map(|(n, f)| format!("{n} ({})", f.display())).collect();
    assert!(undocumented.is_empty(), "emitted but not in docs/metrics.md's table: {undocumented:?}");
    let stale: Vec<&String> = doc.iter().filter(|n| !code.contains_key(*n)).collect();
    assert!(stale.is_empty(), "in docs/metrics.md's table but emitted nowhere in the code: {stale:?}");
    // The process metrics are read at scrape time and served by every process.
    for name in ["process_resident_memory_bytes", "stockflow_end_to_end_seconds", "stockflow_connector_circuit_state"] {
        assert!(code.contains_key(name), "{name} is emitted");
    }
}

fn dashboard() -> Value {
    serde_json::from_str(&read("deploy/grafana/stockflow.json")).expect("deploy/grafana/stockflow.json is JSON")
}

/// Every panel, the panels of collapsed rows included.
fn all_panels(d: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().expect("panels") {
        out.push(p);
        if let Some(inner) = p["panels"].as_array() {
            out.extend(inner);
        }
    }
    out
}

const DATASOURCE_UID: &str = "${DS_PROMETHEUS}";

#[test]
fn the_grafana_dashboard_has_the_structure_grafana_imports() {
    let d = dashboard();
    assert_eq!(d["title"], "stockflow");
    assert_eq!(d["uid"], "stockflow");
    assert_eq!(d["schemaVersion"], 39);
    assert_eq!(d["refresh"], "10s");
    assert!(d["time"]["from"].is_string() && d["time"]["to"].is_string(), "time range");
    // Import asks for the data source.
    let inputs = d["__inputs"].as_array().expect("__inputs");
    assert!(
        inputs
            .iter()
            .any(|i| i["name"] == "DS_PROMETHEUS" && i["type"] == "datasource" && i["pluginId"] == "prometheus"),
        "__inputs declares DS_PROMETHEUS"
    );
    // Variables: a data source and the shards.
    let vars = d["templating"]["list"].as_array().expect("templating.list");
    assert!(vars.iter().any(|v| v["type"] == "datasource" && v["query"] == "prometheus"), "a datasource variable");
    let shard = vars.iter().find(|v| v["name"] == "shard").expect("a shard variable");
    assert_eq!(shard["type"], "query");
    assert_eq!((&shard["multi"], &shard["includeAll"]), (&Value::Bool(true), &Value::Bool(true)));
    assert_eq!(shard["datasource"]["uid"], DATASOURCE_UID);
    let query = shard["query"]["query"].as_str().or(shard["query"].as_str()).expect("shard query");
    assert_eq!(query, "label_values(stockflow_events_applied_total, shard)");
    // Panels: unique ids, inside 24 columns, not overlapping.
    let panels = all_panels(&d);
    assert!(panels.len() >= 15, "{} panels", panels.len());
    let mut ids = HashSet::new();
    for p in &panels {
        let id = p["id"].as_u64().unwrap_or_else(|| panic!("panel {} has a numeric id", p["title"]));
        assert!(ids.insert(id), "panel id {id} is unique");
    }
    let mut cells = HashSet::new();
    for p in d["panels"].as_array().unwrap() {
        let g = &p["gridPos"];
        let [x, y, w, h] =
            ["x", "y", "w", "h"].map(|k| g[k].as_u64().unwrap_or_else(|| panic!("{} gridPos.{k}", p["title"])));
        assert!(w > 0 && h > 0 && x + w <= 24, "{}: gridPos {g} within 24 columns", p["title"]);
        for cx in x..x + w {
            for cy in y..y + h {
                assert!(cells.insert((cx, cy)), "{} overlaps another panel at ({cx}, {cy})", p["title"]);
            }
        }
    }
    // Every panel queries the imported Prometheus; every target has an expression and a refId.
    for p in &panels {
        let title = &p["title"];
        assert!(title.as_str().is_some_and(|t| !t.is_empty()), "a panel without title");
        assert!(
            ["row", "timeseries", "stat", "state-timeline", "table"].contains(&p["type"].as_str().unwrap_or("")),
            "{title}: panel type {}",
            p["type"]
        );
        assert_eq!(p["datasource"]["type"], "prometheus", "{title}");
        assert_eq!(p["datasource"]["uid"], DATASOURCE_UID, "{title}");
        if p["type"] == "row" {
            continue;
        }
        let targets = p["targets"].as_array().unwrap_or_else(|| panic!("{title}: targets"));
        assert!(!targets.is_empty(), "{title}: no targets");
        let mut refs = HashSet::new();
        for t in targets {
            assert!(t["expr"].as_str().is_some_and(|e| !e.trim().is_empty()), "{title}: a target without expr");
            let r = t["refId"].as_str().unwrap_or_else(|| panic!("{title}: a target without refId"));
            assert!(refs.insert(r), "{title}: refId {r} twice");
            if !t["datasource"].is_null() {
                assert_eq!(t["datasource"]["uid"], DATASOURCE_UID, "{title}: target datasource");
            }
        }
    }
}

/// The expressions of the dashboard: panel targets and variable queries.
fn dashboard_exprs(d: &Value) -> Vec<String> {
    let mut exprs: Vec<String> = all_panels(d)
        .into_iter()
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
        .filter_map(|t| t["expr"].as_str().map(str::to_string))
        .collect();
    for v in d["templating"]["list"].as_array().into_iter().flatten() {
        for q in [&v["definition"], &v["query"], &v["query"]["query"]] {
            exprs.extend(q.as_str().map(str::to_string));
        }
    }
    exprs
}

#[test]
fn the_dashboard_and_the_rules_use_only_documented_metrics() {
    let doc = documented();
    let d = dashboard();
    let exprs = dashboard_exprs(&d);
    let grafana = names_in(&exprs.join("\n"));
    let rules = names_in(&read("deploy/prometheus/rules.yml"));
    for (file, names) in [("deploy/grafana/stockflow.json", &grafana), ("deploy/prometheus/rules.yml", &rules)] {
        let unknown: Vec<&String> = names.iter().filter(|n| !doc.contains(*n)).collect();
        assert!(unknown.is_empty(), "{file} uses metrics docs/metrics.md does not list: {unknown:?}");
    }
    // What the issue asks the dashboard to show.
    for name in [
        "stockflow_events_applied_total",
        "stockflow_ingested_events_total",
        "stockflow_shard_lag_seconds",
        "stockflow_leases_owned",
        "stockflow_commit_duration_seconds",
        "stockflow_end_to_end_seconds",
        "stockflow_alerts_total",
        "stockflow_connector_failed_total",
        "stockflow_connector_circuit_state",
        "stockflow_connector_request_seconds",
        "process_resident_memory_bytes",
        "stockflow_dashboard_staleness_seconds",
    ] {
        assert!(grafana.contains(name), "the Grafana dashboard shows {name}");
    }
    assert!(
        exprs
            .iter()
            .any(|e| e.contains("histogram_quantile(0.99") && e.contains("stockflow_end_to_end_seconds_bucket")),
        "the dashboard shows the p99 end-to-end latency"
    );
    for name in ["stockflow_shard_lag_seconds", "stockflow_alerts_total", "stockflow_connector_circuit_state"] {
        assert!(rules.contains(name), "an alert rule watches {name}");
    }
}

#[test]
fn the_circuit_state_panels_map_the_gauge_values_the_code_sets() {
    // The encoding of the gauge: `CircuitState as u8` (connectors/src/policy.rs).
    let policy = read("connectors/src/policy.rs");
    let states = [("Closed", "0", "closed"), ("HalfOpen", "1", "half-open"), ("Open", "2", "open")];
    for (variant, value, _) in states {
        assert!(policy.contains(&format!("{variant} = {value},")), "CircuitState::{variant} = {value}");
    }
    let d = dashboard();
    let circuit: Vec<&Value> = all_panels(&d)
        .into_iter()
        .filter(|p| {
            p["targets"]
                .as_array()
                .is_some_and(|t| t.iter().any(|t| t["expr"].as_str().is_some_and(|e| e.contains("circuit_state"))))
        })
        .collect();
    assert!(!circuit.is_empty(), "a panel shows stockflow_connector_circuit_state");
    for p in circuit {
        let mappings = p["fieldConfig"]["defaults"]["mappings"].as_array().expect("value mappings");
        for (_, value, text) in states {
            assert!(
                mappings.iter().any(|m| m["options"][value]["text"] == text),
                "{}: value {value} is shown as {text}",
                p["title"]
            );
        }
    }
}

/// One `- alert:` or `- record:` entry of a rules file: its keys, and the keys under `labels:` and
/// `annotations:`.
#[derive(Debug, Default)]
struct Rule {
    name: String,
    keys: BTreeMap<String, String>,
    labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
}

fn indent(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

/// The rules of a Prometheus rules file, read line by line (no YAML parser): enough to check the
/// shape of each rule.
fn parse_rules(text: &str) -> Vec<Rule> {
    let mut rules: Vec<Rule> = Vec::new();
    // The indentation of the current rule's keys, and the map and indentation of the block being read.
    let mut key_indent = None;
    let mut section: Option<(&str, usize)> = None;
    for line in text.lines() {
        let trimmed = line.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let at = indent(line);
        if let Some(entry) = trimmed.strip_prefix("- ")
            && let Some((kind @ ("alert" | "record"), name)) = entry.split_once(':')
        {
            let mut rule = Rule { name: name.trim().to_string(), ..Rule::default() };
            rule.keys.insert(kind.to_string(), rule.name.clone());
            rules.push(rule);
            key_indent = Some(at + 2);
            section = None;
            continue;
        }
        let (Some(keys_at), Some(rule)) = (key_indent, rules.last_mut()) else { continue };
        if at < keys_at {
            // Out of the rule (a new group).
            key_indent = None;
            continue;
        }
        let Some((key, value)) = trimmed.split_once(':') else { continue };
        let value = value.trim().trim_matches('"').to_string();
        if at == keys_at {
            rule.keys.insert(key.to_string(), value);
            section = match key {
                "labels" => Some(("labels", 0)),
                "annotations" => Some(("annotations", 0)),
                _ => None,
            };
        } else if let Some((name, child_at)) = &mut section {
            // The first key under the block fixes its indentation; deeper lines continue a value.
            if *child_at == 0 {
                *child_at = at;
            }
            if at == *child_at {
                let map = if *name == "labels" { &mut rule.labels } else { &mut rule.annotations };
                map.insert(key.to_string(), value);
            }
        }
    }
    rules
}

fn is_duration(s: &str) -> bool {
    let digits = s.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let unit = &s[digits.len()..];
    !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) && ["s", "m", "h", "d"].contains(&unit)
}

#[test]
fn every_alert_rule_has_an_expression_a_duration_a_severity_and_a_summary() {
    let text = read("deploy/prometheus/rules.yml");
    assert!(text.lines().any(|l| l.trim_end() == "groups:"), "rules.yml starts with groups:");
    let rules = parse_rules(&text);
    let alerts: Vec<&Rule> = rules.iter().filter(|r| r.keys.contains_key("alert")).collect();
    assert_eq!(alerts.len(), text.matches("- alert:").count(), "every `- alert:` parsed");
    assert!(alerts.len() >= 8, "{} alerts", alerts.len());
    let mut names = HashSet::new();
    for r in &rules {
        let name = &r.name;
        assert!(!name.is_empty() && names.insert(name.clone()), "rule {name:?} is named once");
        let expr = r.keys.get("expr").unwrap_or_else(|| panic!("{name}: expr"));
        assert!(!expr.is_empty(), "{name}: empty expr");
    }
    for r in &alerts {
        let name = &r.name;
        let duration = r.keys.get("for").unwrap_or_else(|| panic!("{name}: for"));
        assert!(is_duration(duration), "{name}: for: {duration:?} is a duration");
        assert!(r.keys.contains_key("labels"), "{name}: labels");
        let severity = r.labels.get("severity").unwrap_or_else(|| panic!("{name}: labels.severity"));
        assert!(["critical", "warning", "info"].contains(&severity.as_str()), "{name}: severity {severity}");
        assert!(r.keys.contains_key("annotations"), "{name}: annotations");
        assert!(r.annotations.get("summary").is_some_and(|s| !s.is_empty()), "{name}: annotations.summary");
        assert!(r.annotations.contains_key("description"), "{name}: annotations.description");
    }
    // What the issue asks to alert on, each on its metric.
    for (alert, watches) in [
        ("StockflowConsumerLagHigh", "stockflow_shard_lag_seconds"),
        ("StockflowConsumerLagBytesGrowing", "deriv(stockflow_shard_lag_bytes"),
        ("StockflowOversellRateHigh", "stockflow_alerts_total{kind=\"oversell\"}"),
        ("StockflowConnectorCircuitOpen", "stockflow_connector_circuit_state"),
        ("StockflowConnectorDeadLetters", "stockflow_connector_dead_lettered_total"),
        ("StockflowRecordDeadLetters", "stockflow_dead_letters_total"),
    ] {
        let block = text.split("- alert: ").find(|b| b.starts_with(alert)).unwrap_or_else(|| panic!("alert {alert}"));
        assert!(block.contains(watches), "{alert} watches {watches}");
    }
}

#[test]
fn the_scrape_config_scrapes_every_stockflow_process_and_loads_the_rules() {
    let text = read("deploy/prometheus/prometheus.yml");
    let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.starts_with('#')).collect();
    assert!(lines.contains(&"scrape_interval: 15s"));
    let rules_at = lines.iter().position(|l| *l == "rule_files:").expect("rule_files");
    assert_eq!(lines[rules_at + 1], "- rules.yml");
    for job in ["stockflow-consumer", "stockflow-ingest", "stockflow-dashboard"] {
        assert!(lines.contains(&format!("- job_name: {job}").as_str()), "job {job}");
    }
    // The consumer job's name is the one the rules select on.
    assert!(read("deploy/prometheus/rules.yml").contains("job=\"stockflow-consumer\""));
}

#[test]
fn promtool_accepts_the_config_the_rules_and_the_rule_tests() {
    let installed = Command::new("promtool").arg("--version").output().is_ok_and(|o| o.status.success());
    if !installed {
        assert!(
            std::env::var_os("CI").is_none(),
            "promtool is not installed but CI is set: run scripts/install-tools.sh first"
        );
        eprintln!("promtool is not installed: skipped (the other tests parse the files)");
        return;
    }
    for args in [
        ["check", "config", "deploy/prometheus/prometheus.yml"],
        ["check", "rules", "deploy/prometheus/rules.yml"],
        ["test", "rules", "deploy/prometheus/rules_test.yml"],
    ] {
        let out = Command::new("promtool").args(args).current_dir(root()).output().unwrap();
        assert!(
            out.status.success(),
            "promtool {}:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
