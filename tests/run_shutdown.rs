//! `stockflow run`: events POSTed to the ingest API are applied, and SIGTERM commits them before
//! the process exits (the config makes the shutdown commit the only one).

mod support;

use std::process::Command;

use support::{Run, http};

fn applied(metrics: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("stockflow_events_applied_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[test]
fn sigterm_commits_what_was_applied_before_exit() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut run =
        Run::start(dir.path(), "shards = 2\n[worker]\ncommit_every_records = 1000000\ncommit_interval_ms = 60000\n");
    let addr = run.ingest.clone();

    let events: String = (0..40)
        .map(|i| {
            format!(
                "{{\"id\":\"e{i}\",\"type\":\"stock_received\",\"sku\":\"SKU-{}\",\"ts\":{},\"qty\":2}}\n",
                i % 5,
                1_795_773_600_000i64 + i
            )
        })
        .collect();
    let (status, resp) = http(&addr, "POST", "/v1/events", &events);
    assert_eq!(status, 202, "{resp}");
    let (status, resp) = http(
        &addr,
        "POST",
        "/v1/events",
        "{\"id\":\"x\",\"type\":\"stock_received\",\"sku\":\"S\",\"ts\":1795773600000,\"qty\":0}",
    );
    assert_eq!(status, 400);
    assert!(resp.contains("\"field\":\"qty\""), "{resp}");

    // Wait until the consumer has applied all 40, observed through /metrics (bounded by 60 s).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut seen = 0;
    while seen < 40 && std::time::Instant::now() < deadline {
        seen = applied(&http(&addr, "GET", "/metrics", "").1);
    }
    assert_eq!(seen, 40);

    assert!(run.stop(), "run exits cleanly on SIGTERM");

    let dump = Command::new(env!("CARGO_BIN_EXE_stockflow"))
        .args(["--data-dir", data.to_str().unwrap(), "state", "dump"])
        .output()
        .unwrap();
    let states: Vec<serde_json::Value> =
        String::from_utf8_lossy(&dump.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(states.len(), 5);
    assert!(states.iter().all(|s| s["on_hand"] == 16), "{states:?}");
}
