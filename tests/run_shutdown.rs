//! `stockflow run`: events POSTed to the ingest API are applied, and SIGTERM commits them before
//! the process exits (the config makes the shutdown commit the only one).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};

fn http(addr: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/x-ndjson\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let status = resp.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, resp)
}

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
    let cfg = dir.path().join("run.toml");
    std::fs::write(&cfg, "shards = 2\n[worker]\ncommit_every_records = 1000000\ncommit_interval_ms = 60000\n").unwrap();
    let data = dir.path().join("data");
    let mut child = Command::new(env!("CARGO_BIN_EXE_stockflow"))
        .args([
            "--config",
            cfg.to_str().unwrap(),
            "--data-dir",
            data.to_str().unwrap(),
            "run",
            "--listen",
            "127.0.0.1:0",
            "--dashboard-listen",
            "127.0.0.1:0",
        ])
        .env("STOCKFLOW_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr = line.split("http://").nth(1).and_then(|r| r.split('/').next()).unwrap().to_string();

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
        "{\"id\":\"x\",\"type\":\"stock_received\",\"sku\":\"S\",\"ts\":1,\"qty\":0}",
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

    let term = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(term.success());
    let status = child.wait().unwrap();
    assert!(status.success(), "run exited with {status}");

    let dump = Command::new(env!("CARGO_BIN_EXE_stockflow"))
        .args(["--data-dir", data.to_str().unwrap(), "state", "dump"])
        .output()
        .unwrap();
    let states: Vec<serde_json::Value> =
        String::from_utf8_lossy(&dump.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(states.len(), 5);
    assert!(states.iter().all(|s| s["on_hand"] == 16), "{states:?}");
}
