//! Four weeks of a seller's order lifecycles (`stockflow loadgen --profile four-weeks`, ≥ 200,000
//! events): placements re-notified with the same ids days apart, shipments 1–5 days later (partly,
//! cumulative), re-notifications weeks later, receipts re-sent within 3 days, a pre-order SKU with a
//! pile of open lines. What loadgen writes as the expected result (the engine's straight pass, which
//! `replay` verifies every backend against) is first checked against the independent model of SPEC
//! v2 (`tests/model`), SKU by SKU and alert by alert; then the stream is replayed onto the embedded
//! backend and onto Kinesis with the consumer group's state in DynamoDB, and each must verify.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;
use stockflow_model::{Config, Outcome, canonical_effect, decimal_value};

use support::{json, stockflow, text};

fn ndjson(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// Four weeks at `rate` events a second of baseline, `skus` SKUs, in `dir/name`.
fn four_weeks(dir: &Path, name: &str, rate: &str, skus: &str, extra: &[&str]) -> PathBuf {
    let mut args = vec!["--profile", "four-weeks", "--base-rate", rate, "--skus", skus, "--seed", "28"];
    args.extend_from_slice(extra);
    support::loadgen(dir, name, &args)
}

fn model_of(events: &Path) -> Outcome {
    let bytes = std::fs::read(events).unwrap();
    stockflow_model::run(&Config::default(), bytes.split(|b| *b == b'\n').filter(|l| !l.is_empty()))
}

/// The expected files loadgen wrote (the straight pass) equal the model's outcome.
fn assert_expected_is_the_model(dir: &Path, model: &Outcome) {
    let expected = json(&dir.join("expected.json"));
    assert_eq!(expected["bad_records"].as_u64(), Some(model.dead_letters as u64));
    let states = ndjson(&dir.join("expected-state.ndjson"));
    assert_eq!(states.len(), model.skus.len());
    for s in &states {
        let sku = s["sku"].as_str().unwrap();
        let m = &model.skus[sku];
        let got = (
            s["on_hand"].as_i64().unwrap(),
            s["reserved"].as_i64().unwrap(),
            s["available"].as_i64().unwrap(),
            s["oversells"].as_u64().unwrap(),
            decimal_value(s["avg_cost"].as_str().unwrap()).unwrap(),
            decimal_value(s["cogs"].as_str().unwrap()).unwrap(),
        );
        let want = (m.on_hand, m.reserved, m.available, m.oversells, m.avg_cost.clone(), m.cogs.clone());
        assert_eq!(got, want, "SKU {sku}: straight pass vs model");
    }
    let alerts: BTreeMap<String, Value> = ndjson(&dir.join("expected-alerts.ndjson"))
        .into_iter()
        .map(|a| (a["alert_id"].as_str().unwrap().to_string(), canonical_effect(&a)))
        .collect();
    let model_alerts: BTreeMap<String, Value> = model
        .effects
        .iter()
        .filter(|(_, e)| matches!(e["effect"].as_str(), Some("oversell" | "low_stock")))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    assert_eq!(alerts.len(), model_alerts.len());
    assert!(alerts == model_alerts, "alerts differ from the model");
}

#[test]
fn four_weeks_verify_against_the_model_on_the_embedded_backend() {
    let dir = tempfile::tempdir().unwrap();
    let month = four_weeks(dir.path(), "month", "0.09", "1000", &[]);
    let expected = json(&month.join("expected.json"));
    let records = expected["records"].as_u64().unwrap();
    assert!(records >= 200_000, "{records} records");
    let model = model_of(&month.join("events.ndjson"));
    // The stream exercises what SPEC v2 is about: re-sent placements past the dedup horizon.
    eprintln!(
        "four weeks: {records} records, {} duplicates, {} re-sent placements, {} dead letters",
        model.duplicates, model.resent_placements, model.dead_letters
    );
    assert!(model.resent_placements > 1_000, "{} re-sent placements", model.resent_placements);
    assert!(model.duplicates > 10_000, "{} duplicates", model.duplicates);
    let preorder = &model.skus["SKU-00999"];
    assert!(preorder.reserved > 100, "a pile of open lines: {preorder:?}");
    assert_expected_is_the_model(&month, &model);
    let out = stockflow(&["replay", "--dir", month.to_str().unwrap(), "--target", "embedded"]);
    assert!(out.status.success(), "{}", text(&out));
    let report = json(&month.join("report").join("report.json"));
    assert_eq!(report["passed"], true, "{report:#}");
    assert_eq!(report["accepted_records"].as_u64(), Some(records));
    assert_eq!(report["verification"]["dead_lettered"], expected["bad_records"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_weeks_verify_on_kinesis_with_the_groups_state_in_dynamodb() {
    let Some((_client, stream)) = stockflow_pipeline::kinesis::testing::emulator_stream("sf-4w-", 2).await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let month = four_weeks(dir.path(), "month", "0.09", "1000", &[]);
    let expected = json(&month.join("expected.json"));
    assert!(expected["records"].as_u64().unwrap() >= 200_000);
    let model = model_of(&month.join("events.ndjson"));
    assert_expected_is_the_model(&month, &model);
    let report = support::replay_onto_kinesis(&month, &stream).await;
    assert_eq!(report["passed"], true, "{report:#}");
    assert_eq!(report["verification"]["dead_lettered"], expected["bad_records"]);
}

#[test]
fn the_sp_api_form_of_four_weeks_keeps_every_sku_exact() {
    let dir = tempfile::tempdir().unwrap();
    // The same four weeks, lighter, as Amazon and the manufacturer send them.
    let canonical = four_weeks(dir.path(), "canonical", "0.02", "200", &[]);
    let hooks = four_weeks(dir.path(), "hooks", "0.02", "200", &["--format", "sp-api"]);
    let model = model_of(&canonical.join("events.ndjson"));
    assert_expected_is_the_model(&canonical, &model);
    // Ids, prices and count sources differ by form; stock and cost must not.
    for s in ndjson(&hooks.join("expected-state.ndjson")) {
        let m = &model.skus[s["sku"].as_str().unwrap()];
        assert_eq!((s["on_hand"].as_i64().unwrap(), s["reserved"].as_i64().unwrap()), (m.on_hand, m.reserved), "{s}");
        assert_eq!(decimal_value(s["avg_cost"].as_str().unwrap()).unwrap(), m.avg_cost, "{s}");
    }
    let report_dir = dir.path().join("report");
    let out = stockflow(&[
        "replay",
        "--dir",
        hooks.to_str().unwrap(),
        "--target",
        "local",
        "--report",
        report_dir.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let report = json(&report_dir.join("report.json"));
    assert_eq!(report["passed"], true, "{report:#}");
}
