//! The live dashboard end to end: `stockflow run` takes events over HTTP; the dashboard's APIs
//! show every SKU of the store, sorted, searched and paged, the SKU detail, alerts (listed and
//! pushed over Server-Sent Events as they commit) and the metrics; bad parameters get a JSON 400
//! naming the parameter. Then the demo, paced, serves the dashboard while it runs and still
//! verifies its deliveries.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use support::{Run, body_json, get_json, http, placed, post_events, received, wait_for};

const CONFIG: &str = "shards = 3\n[worker]\ncommit_interval_ms = 50\n[dashboard]\nrefresh_ms = 100\n";

/// Opens `/api/stream` and sends each `event:`/`data:` pair as it arrives.
fn subscribe(addr: &str) -> mpsc::Receiver<(String, String)> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(s, "GET /api/stream HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n").unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut event = String::new();
        for line in BufReader::new(s).lines() {
            let Ok(line) = line else { return };
            if let Some(e) = line.strip_prefix("event: ") {
                event = e.to_string();
            } else if let Some(d) = line.strip_prefix("data: ")
                && tx.send((event.clone(), d.to_string())).is_err()
            {
                return;
            }
        }
    });
    rx
}

#[test]
fn the_dashboard_shows_every_sku_and_pushes_alerts_as_they_commit() {
    let dir = tempfile::tempdir().unwrap();
    let mut run = Run::start(dir.path(), CONFIG);
    let (ingest, dash) = (run.ingest.clone(), run.dashboard.clone());

    // 300 SKUs with 5 units each; SKU-007 then sells 2 (velocity, cover).
    let mut events: Vec<String> = (0..300).map(|i| received(&format!("r{i}"), &format!("SKU-{i:03}"), 5)).collect();
    events.push(placed("p1", "SKU-007", 2, "A-1"));
    post_events(&ingest, &events);
    let page = wait_for("300 SKUs in the stock table", Duration::from_secs(60), || {
        let v = get_json(&dash, "/api/stock?limit=100&offset=250");
        (v["total"] == 300).then_some(v)
    });
    assert_eq!(page["items"].as_array().unwrap().len(), 50, "the last page holds the last 50");
    assert_eq!(page["items"][0]["sku"], "SKU-250", "sorted by SKU by default");

    // A live subscriber sees the oversell that the next order causes.
    let stream = subscribe(&dash);
    let (event, _) = stream.recv_timeout(Duration::from_secs(30)).unwrap();
    assert_eq!(event, "hello");
    post_events(&ingest, &[placed("p2", "SKU-007", 7, "A-2")]);
    let pushed = wait_for("the oversell pushed over SSE", Duration::from_secs(60), || {
        let (event, data) = stream.recv_timeout(Duration::from_secs(30)).ok()?;
        (event == "alert").then(|| serde_json::from_str::<serde_json::Value>(&data).unwrap())
    });
    assert_eq!(pushed["id"], "oversell:p2");
    assert_eq!((pushed["sku"].as_str(), pushed["shortfall"].as_i64()), (Some("SKU-007"), Some(4)));
    assert_eq!(pushed["order_id"], "A-2");

    // The table follows: SKU-007 first by availability (−4), the only negative one.
    let first = wait_for("SKU-007 at −4 in the table", Duration::from_secs(30), || {
        let v = get_json(&dash, "/api/stock?sort=available&limit=3");
        (v["items"][0]["available"] == -4).then_some(v)
    });
    assert_eq!(first["items"][0]["sku"], "SKU-007");
    assert_eq!(first["negative"], 1);
    assert!(first["staleness_ms"].as_i64().unwrap() < 2_000, "{first}");
    let neg = get_json(&dash, "/api/stock?negative=true");
    assert_eq!((neg["total"].as_u64(), neg["items"][0]["sku"].as_str()), (Some(1), Some("SKU-007")));
    let by_velocity = get_json(&dash, "/api/stock?sort=velocity&order=desc&limit=1");
    assert_eq!(
        (by_velocity["items"][0]["sku"].as_str(), by_velocity["items"][0]["velocity_per_day"].as_u64()),
        (Some("SKU-007"), Some(9))
    );
    let search = get_json(&dash, "/api/stock?q=sku-00&limit=1000");
    assert_eq!(search["total"], 10, "SKU-000 to SKU-009, case-insensitive");
    let cover = get_json(&dash, "/api/stock?sort=cover&limit=1");
    assert_eq!(cover["items"][0]["sku"], "SKU-007", "negative cover first; SKUs that sold nothing last");

    let detail = get_json(&dash, "/api/stock/SKU-007");
    assert_eq!((detail["row"]["on_hand"].as_i64(), detail["row"]["reserved"].as_i64()), (Some(5), Some(9)));
    assert_eq!(detail["row"]["open_lines"], 2);
    assert_eq!(detail["hourly"].as_array().unwrap().iter().map(|h| h["units"].as_u64().unwrap()).sum::<u64>(), 9);
    assert!(detail["windows"].as_array().unwrap().iter().any(|w| w["counts"]["units_ordered"] == 9), "{detail}");
    assert_eq!(detail["alerts"][0]["id"], "oversell:p2");

    let first_page = get_json(&dash, "/api/alerts?kind=oversell&limit=1");
    assert_eq!(first_page["next_before"], serde_json::Value::Null, "one alert, one page: no next page");
    let alerts = get_json(&dash, "/api/alerts?kind=oversell");
    assert_eq!((alerts["oversell"].as_u64(), alerts["items"].as_array().unwrap().len()), (Some(1), 1));
    assert_eq!(get_json(&dash, "/api/alerts?kind=low_stock")["items"].as_array().unwrap().len(), 0);
    let overview = get_json(&dash, "/api/overview");
    assert_eq!((overview["skus"].as_u64(), overview["oversell"].as_u64()), (Some(300), Some(1)));

    // Bad parameters: 400 (404 for an unknown SKU) with a JSON body naming the parameter.
    for (path, status, field) in [
        ("/api/stock?limit=5000", 400, "limit"),
        ("/api/stock?sort=price", 400, "sort"),
        ("/api/stock?order=up", 400, "order"),
        ("/api/stock?offset=-1", 400, "offset"),
        ("/api/stock?srot=sku", 400, "srot"),
        ("/api/alerts?kind=late", 400, "kind"),
        ("/api/alerts?before=x", 400, "before"),
        ("/api/stock/NOPE", 404, "sku"),
    ] {
        let (s, resp) = http(&dash, "GET", path, "");
        assert_eq!(s, status, "{path}: {resp}");
        assert_eq!(body_json(&resp)["field"], field, "{path}");
    }

    // The page and its assets come from the binary and fetch nothing from elsewhere.
    let (s, page) = http(&dash, "GET", "/", "");
    assert_eq!(s, 200);
    assert!(page.contains("text/html") && page.contains("/assets/app.js") && page.contains("id=\"stock-body\""));
    for asset in ["/assets/app.js", "/assets/app.css"] {
        let (s, body) = http(&dash, "GET", asset, "");
        assert_eq!(s, 200, "{asset}");
        for remote in ["src=\"http", "href=\"http", "url(http", "fetch(\"http", "import "] {
            assert!(!body.contains(remote), "{asset} loads something remote: {remote}");
        }
    }

    // Metrics: real histograms, alerts by kind, the end-to-end latency of the ingested events,
    // process memory.
    let (_, metrics) = http(&dash, "GET", "/metrics", "");
    for needle in [
        "# TYPE stockflow_commit_duration_seconds histogram",
        "# TYPE stockflow_end_to_end_seconds histogram",
        "stockflow_alerts_total{kind=\"oversell\"} 1",
        "process_resident_memory_bytes ",
        "stockflow_dashboard_staleness_seconds_bucket",
    ] {
        assert!(metrics.contains(needle), "/metrics lacks {needle}");
    }
    let e2e: f64 = metrics
        .lines()
        .find(|l| l.starts_with("stockflow_end_to_end_seconds_count"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap();
    assert_eq!(e2e as u64, 302, "every ingested event's latency is recorded once");
    assert!(run.stop(), "run exits cleanly on SIGTERM with a dashboard subscriber connected");
}

#[test]
fn the_paced_demo_serves_its_dashboard_while_it_runs_and_still_verifies() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_stockflow"))
        .args(["demo", "--events", "40000", "--skus", "2000", "--rate", "10000", "--no-fsync", "--no-hold"])
        .args(["--dashboard-listen", "127.0.0.1:0"])
        .env("STOCKFLOW_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut lines = Vec::new();
    let addr = loop {
        let mut line = String::new();
        assert!(out.read_line(&mut line).unwrap() > 0, "demo ended before naming its dashboard: {lines:?}");
        if let Some(rest) = line.strip_prefix("dashboard: http://") {
            break rest.split('/').next().unwrap().to_string();
        }
        lines.push(line);
    };
    // Mid-run (the stream takes 4 s at this rate): SKUs on the table and events flowing.
    let seen = wait_for("SKUs and throughput on the dashboard", Duration::from_secs(30), || {
        let o = get_json(&addr, "/api/overview");
        let flowing = o["point"]["applied_per_s"].as_f64()? > 0.0;
        (o["skus"].as_u64()? > 0 && flowing).then_some(o)
    });
    assert!(child.try_wait().unwrap().is_none(), "the dashboard showed the stream while the demo ran: {seen}");
    assert!(seen["skus"].as_u64().unwrap() <= 2000);
    let rest: Vec<String> = out.lines().map(Result::unwrap).collect();
    let status = child.wait().unwrap();
    let text = rest.join("\n");
    assert!(status.success(), "demo failed:\n{text}");
    assert!(text.contains("delivery verified"), "{text}");
    let snapshots = text.lines().find(|l| l.starts_with("dashboard: ")).unwrap();
    assert!(snapshots.contains("snapshots of up to 2000 SKUs"), "{snapshots}");
}
