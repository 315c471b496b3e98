//! The load test end to end (docs/loadtest.md): `stockflow loadgen` writes a Black Friday stream,
//! `stockflow replay` drives it into a target at the profile's pace, waits for the consumers,
//! and verifies the final state against the straight pass — through signed HTTP into a local
//! `stockflow run`, straight onto the embedded log, and onto Kinesis with the consumer group's
//! state in DynamoDB. And a target whose state differs fails the replay, naming what differs.

mod support;

use std::time::Duration;

use support::{json, loadgen, stockflow, text};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

#[test]
fn black_friday_over_signed_http_into_a_local_run_is_verified_exactly() {
    let dir = tempfile::tempdir().unwrap();
    // Two hours of Black Friday: 4× then the 10× flash hour, at half an event a second of baseline.
    let bf = loadgen(
        dir.path(),
        "bf",
        &["--profile", "black-friday", "--hours", "19-20", "--base-rate", "0.5", "--skus", "500"],
    );
    let expected = json(&bf.join("expected.json"));
    let records = expected["records"].as_u64().unwrap();
    assert!(records > 20_000, "tens of thousands of events: {records}");
    assert!(expected["bad_records"].as_u64().unwrap() > 0 && expected["duplicates"].as_u64().unwrap() > 0);
    let report_dir = dir.path().join("report");
    // 2 hours of event time in 7.2 s: 2,000 events/s, then 5,000 in the flash hour.
    let out = stockflow(&[
        "replay",
        "--dir",
        bf.to_str().unwrap(),
        "--target",
        "local",
        "--speedup",
        "1000",
        "--secret",
        SECRET,
        "--connections",
        "16",
        "--report",
        report_dir.to_str().unwrap(),
    ]);
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("PASSED") && said.contains("verified:"), "{said}");
    let report = json(&report_dir.join("report.json"));
    assert_eq!(report["passed"], true, "{report:#}");
    let v = &report["verification"];
    assert_eq!(v["ok"], true);
    // Every record is accounted for: accepted, or refused at the ingest as a bad record.
    assert_eq!(report["accepted_records"].as_u64().unwrap() + report["rejected"].as_u64().unwrap(), records);
    assert_eq!(
        v["rejected_at_ingest"].as_u64().unwrap() + v["dead_lettered"].as_u64().unwrap(),
        expected["bad_records"].as_u64().unwrap()
    );
    assert_eq!(report["rejected"], v["rejected_at_ingest"]);
    assert!(report["rejections"][0]["reason"].as_str().unwrap().starts_with("400"), "{report:#}");
    // The straight pass the replay checked against is the one loadgen wrote next to the stream.
    assert_eq!(v["skus"], expected["skus"]);
    assert_eq!(v["oversell_alerts"], expected["oversell_alerts"]);
    assert!(v["oversell_alerts"].as_u64().unwrap() > 0, "a Black Friday oversells");
    // Measured: latency from the due time, end-to-end from the consumers, the series over time.
    assert!(report["ingest_latency_ms"]["p99"].as_f64().unwrap() > 0.0);
    assert!(report["end_to_end_ms"]["p50"].as_f64().unwrap() > 0.0);
    let series = report["series"].as_array().unwrap();
    assert!(series.len() >= 5, "one point a second over 7.2 s: {}", series.len());
    let offered: Vec<f64> = series.iter().map(|p| p["offered"].as_f64().unwrap()).collect();
    // The flash hour offers about 2.5× the hour before it.
    let (early, late) = (offered[1], offered[series.len() / 2 + 2]);
    assert!(late > early * 1.8, "offered {offered:?}");
    assert_eq!(report["peak_multiple_of_baseline"].as_f64().map(|m| m > 1000.0), Some(true), "{report:#}");
    let svg = std::fs::read_to_string(report_dir.join("report.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("<path") && svg.contains("PASSED"), "{svg}");
    assert!(report_dir.join("run.log").exists());
}

#[test]
fn straight_onto_the_embedded_log_bad_records_are_dead_lettered_and_the_state_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    let day = loadgen(
        dir.path(),
        "day",
        &["--profile", "baseline-day", "--base-rate", "0.3", "--skus", "300", "--seed", "9"],
    );
    let expected = json(&day.join("expected.json"));
    let out = stockflow(&["replay", "--dir", day.to_str().unwrap(), "--target", "embedded", "--connections", "8"]);
    assert!(out.status.success(), "{}", text(&out));
    let report = json(&day.join("report").join("report.json"));
    assert_eq!(report["passed"], true, "{report:#}");
    assert_eq!(report["pace"], "max");
    assert_eq!(report["rejected"], 0, "nothing is refused on the stream itself");
    assert_eq!(report["verification"]["dead_lettered"], expected["bad_records"]);
    assert_eq!(report["accepted_records"], expected["records"]);
}

#[test]
fn a_target_whose_state_differs_fails_the_replay_and_names_what_differs() {
    let dir = tempfile::tempdir().unwrap();
    let flash =
        loadgen(dir.path(), "flash", &["--hours", "20-20", "--base-rate", "0.1", "--skus", "50", "--seed", "3"]);
    let mut run = support::Run::start(dir.path(), "");
    // Someone else's receipt on a SKU of the stream, committed before the replay starts.
    support::post_events(&run.ingest, &[support::received("not-in-the-stream", "SKU-00000", 1000)]);
    support::wait_for("the extra receipt committed", Duration::from_secs(30), || {
        let (status, resp) = support::http(&run.dashboard, "GET", "/api/outcome", "");
        (status == 200 && support::body_json(&resp)["skus"].as_array().is_some_and(|s| !s.is_empty())).then_some(())
    });
    let report_dir = dir.path().join("report");
    let out = stockflow(&[
        "replay",
        "--dir",
        flash.to_str().unwrap(),
        "--target",
        &format!("http://{}", run.ingest),
        "--dashboard",
        &format!("http://{}", run.dashboard),
        "--rate",
        "4000",
        "--report",
        report_dir.to_str().unwrap(),
    ]);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(said.contains("MISMATCH") && said.contains("sku SKU-00000"), "{said}");
    let report = json(&report_dir.join("report.json"));
    assert_eq!((report["passed"].as_bool(), report["verification"]["ok"].as_bool()), (Some(false), Some(false)));
    // Everything was still delivered and committed: the difference is the state, not a loss.
    assert!(report["drain_seconds"].as_f64().is_some_and(f64::is_finite), "{report:#}");
    assert!(run.stop());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn onto_kinesis_the_group_consumes_it_into_dynamodb_and_the_state_is_exact() {
    let Some((_client, stream)) = stockflow_pipeline::kinesis::testing::emulator_stream("sf-lt-", 2).await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let hour = loadgen(
        dir.path(),
        "hour",
        &["--profile", "baseline-day", "--hours", "12-12", "--base-rate", "0.8", "--skus", "80"],
    );
    let report = support::replay_onto_kinesis(&hour, &stream).await;
    assert_eq!(report["passed"], true, "{report:#}");
    let per = &report["calls"]["per_1000_events"];
    assert!(per["dynamodb_transactions"].as_f64().unwrap() > 0.0, "{report:#}");
    // Puts are batched (group commit, KPL-aggregated per SKU: one put can carry more than 500
    // events, so the count depends on timing): far fewer calls than events, and some.
    let puts = per["kinesis_put_records"].as_f64().unwrap();
    assert!(puts > 0.0 && puts < 100.0, "batched puts: {report:#}");
}

#[test]
fn the_sp_api_form_goes_through_the_amazon_and_manufacturer_routes_and_stays_exact() {
    let dir = tempfile::tempdir().unwrap();
    let hooks = loadgen(
        dir.path(),
        "hooks",
        &["--format", "sp-api", "--hours", "20-20", "--base-rate", "0.1", "--skus", "60", "--seed", "5"],
    );
    let first = std::fs::read_to_string(hooks.join("webhooks.ndjson")).unwrap();
    assert!(first.contains(r#""route":"amazon""#) && first.contains("ORDER_CHANGE"), "SP-API notifications");
    assert!(first.contains(r#""route":"manufacturer""#) && first.contains("goods_received"));
    let expected = json(&hooks.join("expected.json"));
    // Straight onto a stream it cannot go: the notifications are mapped by the ingest API.
    let out = stockflow(&["replay", "--dir", hooks.to_str().unwrap(), "--target", "embedded"]);
    assert!(!out.status.success() && text(&out).contains("goes through the ingest API"), "{}", text(&out));
    let report_dir = dir.path().join("report");
    let out = stockflow(&[
        "replay",
        "--dir",
        hooks.to_str().unwrap(),
        "--target",
        "local",
        "--rate",
        "3000",
        "--secret",
        SECRET,
        "--report",
        report_dir.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let report = json(&report_dir.join("report.json"));
    assert_eq!(report["passed"], true, "{report:#}");
    // A shipment notification restates the order line: one delivery, two events on the stream.
    assert!(report["accepted_events"].as_u64() > report["accepted_records"].as_u64(), "{report:#}");
    assert_eq!(report["rejected"], expected["bad_records"]);
    assert_eq!(report["verification"]["oversell_alerts"], expected["oversell_alerts"]);
}
