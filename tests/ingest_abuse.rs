//! The ingest and dashboard servers under abuse: a full house, a client that never finishes its
//! body, a foreign `Host` on a loopback server, the public (Lambda) router, the dashboard's
//! headers, unsigned ingest on a public address, and a full disk. (The signature cases — 10,000
//! candidates, a client gone mid-request — are in `src/ingest/mod.rs` and `src/ingest/webhook.rs`.)

use std::io::{BufRead, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use futures::StreamExt;
use stockflow::ingest::{IngestState, app_shared, public_app};
use stockflow::server::{Limits, guarded};
use stockflow_pipeline::EmbeddedLog;
use tower::ServiceExt;

mod support;

const LOOPBACK: &str = "127.0.0.1:8080";

fn ingest(limits: Limits) -> (tempfile::TempDir, Router) {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(EmbeddedLog::open(dir.path(), 1).unwrap());
    let app = app_shared(Arc::new(IngestState::new(log)));
    (dir, guarded(app, LOOPBACK.parse().unwrap(), limits))
}

fn event(id: &str) -> String {
    format!(
        r#"{{"id":"{id}","sku":"S1","type":"stock_received","qty":5,"unit_cost":"2.00","currency":"USD","ts":1795737600000}}"#
    )
}

/// A body that sends its first bytes, says so, and then never finishes.
fn stalled_body() -> (Body, tokio::sync::oneshot::Receiver<()>) {
    let (started, on_start) = tokio::sync::oneshot::channel();
    let mut started = Some(started);
    let first = futures::stream::once(async move {
        if let Some(s) = started.take() {
            let _ = s.send(());
        }
        Ok::<_, std::io::Error>(axum::body::Bytes::from_static(b"{\"id\":"))
    });
    (Body::from_stream(first.chain(futures::stream::pending())), on_start)
}

async fn json(r: axum::response::Response) -> serde_json::Value {
    let bytes = axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

fn post(body: Body) -> Request<Body> {
    Request::post("/v1/events")
        .header(header::HOST, "localhost:8080")
        .header("content-type", "application/json")
        .body(body)
        .unwrap()
}

#[tokio::test]
async fn beyond_the_concurrency_limit_requests_get_503_with_retry_after_and_the_next_one_passes() {
    let limits = Limits { max_concurrent: 1, body_timeout: Duration::from_secs(60), ..Limits::default() };
    let (_dir, app) = ingest(limits);
    let (body, started) = stalled_body();
    let holder = tokio::spawn(app.clone().oneshot(post(body)));
    started.await.unwrap();
    // The one permit is held by the stalled request.
    let busy = app.clone().oneshot(post(Body::from(event("e1")))).await.unwrap();
    assert_eq!(busy.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(busy.headers().get(header::RETRY_AFTER).unwrap(), "1");
    assert_eq!(json(busy).await["field"], "request");
    holder.abort();
    let _ = holder.await;
    let ok = app.oneshot(post(Body::from(event("e1")))).await.unwrap();
    assert_eq!(ok.status(), StatusCode::ACCEPTED, "the permit came back when the client went away");
}

#[tokio::test]
async fn a_body_that_does_not_arrive_in_time_gets_408_and_frees_its_permit() {
    let limits = Limits { max_concurrent: 1, body_timeout: Duration::from_millis(200), ..Limits::default() };
    let (_dir, app) = ingest(limits);
    let (body, _started) = stalled_body();
    let slow = app.clone().oneshot(post(body)).await.unwrap();
    assert_eq!(slow.status(), StatusCode::REQUEST_TIMEOUT);
    assert!(slow.headers().contains_key(header::RETRY_AFTER));
    assert_eq!(json(slow).await["field"], "body");
    let ok = app.oneshot(post(Body::from(event("e2")))).await.unwrap();
    assert_eq!(ok.status(), StatusCode::ACCEPTED);
}

#[tokio::test]
async fn a_body_over_the_limit_is_refused_413_before_it_is_read_whole() {
    let limits = Limits { max_body_bytes: 1024, ..Limits::default() };
    let (_dir, app) = ingest(limits);
    let big = format!("[{}]", vec![event("e3"); 40].join(","));
    let r = app.oneshot(post(Body::from(big))).await.unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(json(r).await["field"], "body");
}

#[tokio::test]
async fn a_loopback_server_answers_only_loopback_host_names() {
    let (_dir, app) = ingest(Limits::default());
    for host in ["evil.example", "evil.example:8080", "192.168.1.9:8080"] {
        let req = Request::get("/healthz").header(header::HOST, host).body(Body::empty()).unwrap();
        let r = app.clone().oneshot(req).await.unwrap();
        assert_eq!(r.status(), StatusCode::FORBIDDEN, "{host}");
        assert_eq!(json(r).await["field"], "Host");
    }
    let no_host = app.clone().oneshot(Request::get("/healthz").body(Body::empty()).unwrap()).await.unwrap();
    assert_eq!(no_host.status(), StatusCode::FORBIDDEN, "no Host at all");
    for host in ["localhost:8080", "127.0.0.1:8080", "[::1]:8080"] {
        let req = Request::get("/healthz").header(header::HOST, host).body(Body::empty()).unwrap();
        assert_eq!(app.clone().oneshot(req).await.unwrap().status(), StatusCode::OK, "{host}");
    }
    // A server on a public address is reached by its public names.
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(EmbeddedLog::open(dir.path(), 1).unwrap());
    let public =
        guarded(app_shared(Arc::new(IngestState::new(log))), "0.0.0.0:8080".parse().unwrap(), Limits::default());
    let req = Request::get("/healthz").header(header::HOST, "ingest.example.com").body(Body::empty()).unwrap();
    assert_eq!(public.oneshot(req).await.unwrap().status(), StatusCode::OK);
}

#[tokio::test]
async fn the_lambda_router_serves_ingest_and_healthz_but_not_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(EmbeddedLog::open(dir.path(), 1).unwrap());
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder().handle();
    let state = Arc::new(IngestState { metrics: Some(handle), ..IngestState::new(log) });
    let public = public_app(Arc::clone(&state));
    let get = |p: &str| Request::get(p).body(Body::empty()).unwrap();
    assert_eq!(public.clone().oneshot(get("/metrics")).await.unwrap().status(), StatusCode::NOT_FOUND);
    assert_eq!(public.clone().oneshot(get("/healthz")).await.unwrap().status(), StatusCode::OK);
    let r = public
        .oneshot(
            Request::post("/v1/events")
                .header("content-type", "application/json")
                .body(Body::from(event("e4")))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert_eq!(
        app_shared(state).oneshot(get("/metrics")).await.unwrap().status(),
        StatusCode::OK,
        "local server keeps it"
    );
}

#[tokio::test]
async fn the_dashboard_forbids_framing_and_foreign_scripts() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(stockflow_state::embedded::RedbStore::open(dir.path().join("s.redb")).unwrap());
    let (_stop, stop) = tokio::sync::watch::channel(false);
    let dashboard = stockflow::dashboard::Dashboard::start(
        store,
        stockflow::dashboard::Telemetry::None,
        vec![60_000],
        stockflow::dashboard::DashboardConfig::default(),
        stop,
    );
    let app = stockflow::dashboard::router(dashboard, None);
    for path in ["/", "/api/overview", "/nope"] {
        let r = app.clone().oneshot(Request::get(path).body(Body::empty()).unwrap()).await.unwrap();
        let csp = r.headers().get(header::CONTENT_SECURITY_POLICY).unwrap().to_str().unwrap();
        assert!(csp.contains("frame-ancestors 'none'") && csp.contains("script-src 'self'"), "{path}: {csp}");
        assert_eq!(r.headers().get(header::X_FRAME_OPTIONS).unwrap(), "DENY", "{path}");
    }
}

/// `stockflow ingest serve` with the environment of a machine without secrets.
fn serve(args: &[&str], data: &std::path::Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_stockflow"));
    c.args(["--data-dir", data.to_str().unwrap(), "ingest", "serve"]).args(args);
    c.env_remove("STOCKFLOW_WEBHOOK_SECRETS").env_remove("STOCKFLOW_WEBHOOK_SECRET_ID").env_remove("STOCKFLOW_CONFIG");
    c
}

#[test]
fn unsigned_ingest_on_a_public_address_is_refused_unless_allowed_and_the_banner_says_unsigned() {
    let dir = tempfile::tempdir().unwrap();
    let out = serve(&["--listen", "0.0.0.0:0"], dir.path()).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("refusing to serve unsigned ingest") && err.contains("--allow-unsigned"), "{err}");
    for args in [&["--listen", "127.0.0.1:0"][..], &["--listen", "0.0.0.0:0", "--allow-unsigned"][..]] {
        let (mut child, banner) = support::spawn_announced(serve(args, dir.path()).stderr(Stdio::null()));
        let _ = child.kill();
        let _ = child.wait();
        assert!(banner.contains("ingest (unsigned)"), "{args:?}: {banner}");
    }
}

/// A raw HTTP/1.1 POST; returns the status code.
fn http_post(addr: &str, body: &str) -> u16 {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "POST /v1/events HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/x-ndjson\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(s).read_line(&mut line).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn a_full_disk_answers_503_and_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // Create the store and log first (they are not what fills up here).
    let st = Command::new(env!("CARGO_BIN_EXE_stockflow"))
        .args(["--data-dir", data.to_str().unwrap(), "--shards", "1", "replay", "--file", "/dev/null"])
        .output()
        .unwrap();
    assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
    // Then serve with a 3 MiB file-size limit (SIGXFSZ ignored, so writes fail with EFBIG).
    let bin = env!("CARGO_BIN_EXE_stockflow");
    let script = format!(
        "trap '' XFSZ; ulimit -f 6144; exec {bin} --data-dir {} --shards 1 ingest serve --listen 127.0.0.1:0",
        data.display()
    );
    let (child, banner) = support::spawn_announced(
        Command::new("sh")
            .args(["-c", &script])
            .env_remove("STOCKFLOW_WEBHOOK_SECRETS")
            .env_remove("STOCKFLOW_WEBHOOK_SECRET_ID")
            .stderr(Stdio::piped()),
    );
    struct Reap(std::process::Child);
    impl Drop for Reap {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let pid = child.id();
    let mut child = Reap(child);
    let addr = support::banner_addr(&banner, 1);
    // Batches of 100 events (~16 KB) until the disk is full.
    let mut accepted: Vec<String> = Vec::new();
    let mut refused = 0;
    let pad = "x".repeat(60);
    for batch in 0..400 {
        let events: Vec<String> = (0..100)
            .map(|i| {
                format!(
                    r#"{{"id":"b{batch}-{i}-{pad}","sku":"S{}","type":"stock_received","qty":1,"unit_cost":"1.00","currency":"USD","ts":1795737600000}}"#,
                    i % 7
                )
            })
            .collect();
        match http_post(&addr, &events.join("\n")) {
            202 => accepted.extend(events),
            503 => {
                refused += 1;
                if refused >= 3 {
                    break;
                }
            }
            other => panic!("batch {batch}: HTTP {other}"),
        }
    }
    let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status();
    let _ = child.0.wait();
    assert!(refused >= 3, "the limit was reached ({} events accepted)", accepted.len());
    assert!(accepted.len() >= 1_000, "{} events accepted before the disk was full", accepted.len());
    // Without the limit: everything acknowledged is there, nothing else.
    let events = dir.path().join("accepted.ndjson");
    std::fs::write(&events, accepted.join("\n")).unwrap();
    let consumed = Command::new(bin)
        .args(["--data-dir", data.to_str().unwrap(), "--shards", "1", "consume", "--drain"])
        .env_remove("STOCKFLOW_CONFIG")
        .output()
        .unwrap();
    assert!(consumed.status.success(), "{}", String::from_utf8_lossy(&consumed.stderr));
    let verified = Command::new(bin)
        .args(["--data-dir", data.to_str().unwrap(), "--shards", "1", "verify", "--events", events.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        verified.status.success(),
        "{}{}",
        String::from_utf8_lossy(&verified.stdout),
        String::from_utf8_lossy(&verified.stderr)
    );
    // And the log takes appends again.
    let _ = std::io::stdout().flush();
}
