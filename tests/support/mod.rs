//! What the end-to-end tests that drive the `stockflow` binary share: starting `stockflow run`,
//! plain HTTP/1.1 over loopback, and waiting for a condition with a deadline.

#![allow(dead_code)] // each test binary uses its own part

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Spawns `cmd` with its stdout piped and returns it with its first line: the banner a server
/// prints once it listens, naming its addresses.
pub fn spawn_announced(cmd: &mut Command) -> (Child, String) {
    let mut child = cmd.stdout(Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    (child, line)
}

/// The `host:port` of the `n`th `http://` address in a banner (1 for the first).
pub fn banner_addr(banner: &str, n: usize) -> String {
    banner.split("http://").nth(n).and_then(|r| r.split('/').next()).unwrap_or_else(|| panic!("{banner}")).to_string()
}

/// `stockflow run` on free loopback ports, stopped (SIGTERM, then kill) when dropped.
pub struct Run {
    pub child: Child,
    /// host:port of the ingest API.
    pub ingest: String,
    /// host:port of the dashboard.
    pub dashboard: String,
}

impl Run {
    /// Starts `stockflow run` over `dir` with `config` (TOML) and waits for its first line.
    pub fn start(dir: &Path, config: &str) -> Run {
        Run::start_with_env(dir, config, &[])
    }

    /// As [`Run::start`], with extra environment variables.
    pub fn start_with_env(dir: &Path, config: &str, env: &[(&str, &str)]) -> Run {
        let cfg = dir.join("run.toml");
        std::fs::write(&cfg, config).unwrap();
        let (child, line) = spawn_announced(
            Command::new(env!("CARGO_BIN_EXE_stockflow"))
                .args(["--config", cfg.to_str().unwrap(), "--data-dir", dir.join("data").to_str().unwrap()])
                .args(["run", "--listen", "127.0.0.1:0", "--dashboard-listen", "127.0.0.1:0"])
                .env("STOCKFLOW_LOG", "warn")
                .envs(env.iter().copied()),
        );
        assert!(line.contains("dashboard on"), "{line}");
        let (ingest, dashboard) = (banner_addr(&line, 1), banner_addr(&line, 2));
        Run { child, ingest, dashboard }
    }

    /// SIGTERM and wait; true when it exited successfully.
    pub fn stop(&mut self) -> bool {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        self.child.wait().map(|s| s.success()).unwrap_or(false)
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One request with `Connection: close`: (status, headers and body as text).
pub fn http(addr: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
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

/// The body of a 200 answer as JSON.
pub fn get_json(addr: &str, path: &str) -> serde_json::Value {
    let (status, resp) = http(addr, "GET", path, "");
    assert_eq!(status, 200, "GET {path}: {resp}");
    body_json(&resp)
}

/// The JSON body of a response (any status).
pub fn body_json(resp: &str) -> serde_json::Value {
    let body = resp.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {resp}"))
}

/// POSTs NDJSON events to the ingest; asserts 202.
pub fn post_events(addr: &str, events: &[String]) {
    let body = events.join("\n");
    let (status, resp) = http(addr, "POST", "/v1/events", &body);
    assert_eq!(status, 202, "{resp}");
}

/// Polls `check` every 20 ms until it returns `Some` or `within` passes (then panics with `what`).
pub fn wait_for<T>(what: &str, within: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {within:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A canonical `stock_received` event.
pub fn received(id: &str, sku: &str, qty: i64) -> String {
    format!(
        r#"{{"id":"{id}","type":"stock_received","sku":"{sku}","ts":1795773600000,"qty":{qty},"unit_cost":"4.00","currency":"USD"}}"#
    )
}

/// A canonical `order_placed` event.
pub fn placed(id: &str, sku: &str, qty: i64, order: &str) -> String {
    format!(
        r#"{{"id":"{id}","type":"order_placed","sku":"{sku}","ts":1795773660000,"qty":{qty},"order_id":"{order}"}}"#
    )
}

/// Runs the `stockflow` binary with `args` (logs at warn) to completion.
pub fn stockflow(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_stockflow")).args(args).env("STOCKFLOW_LOG", "warn").output().unwrap()
}

/// What a finished command printed, stdout then stderr.
pub fn text(out: &std::process::Output) -> String {
    format!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// A JSON file, parsed (panics naming the file).
pub fn json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

/// `stockflow replay --dir DIR --target kinesis:STREAM` with the group's tables under
/// `STREAM-`, run off the async runtime; asserts it succeeded and returns its `report.json`.
pub async fn replay_onto_kinesis(dir: &Path, stream: &str) -> serde_json::Value {
    let prefix = format!("{stream}-");
    let target = format!("kinesis:{stream}");
    let args: Vec<String> = ["replay", "--dir", dir.to_str().unwrap(), "--target", &target, "--table-prefix", &prefix]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let out = tokio::task::spawn_blocking(move || stockflow(&args.iter().map(String::as_str).collect::<Vec<_>>()))
        .await
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    json(&dir.join("report").join("report.json"))
}

/// Writes a loadgen stream into `dir/name`; returns its directory.
pub fn loadgen(dir: &Path, name: &str, args: &[&str]) -> std::path::PathBuf {
    let out_dir = dir.join(name);
    let mut all = vec!["loadgen", "--out", out_dir.to_str().unwrap()];
    all.extend_from_slice(args);
    let out = stockflow(&all);
    assert!(out.status.success(), "{}", text(&out));
    out_dir
}

/// Points a `stockflow` command at the local emulators (moto, kinesis-local) with their static
/// credentials: `DYNAMODB_ENDPOINT` (and `KINESIS_ENDPOINT`) from the environment or the defaults
/// of `scripts/services.sh`.
pub fn emulator_env(cmd: &mut Command) -> &mut Command {
    cmd.env("DYNAMODB_ENDPOINT", std::env::var("DYNAMODB_ENDPOINT").unwrap_or("http://127.0.0.1:5001".into()))
        .env("KINESIS_ENDPOINT", std::env::var("KINESIS_ENDPOINT").unwrap_or("http://127.0.0.1:4568".into()))
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_REGION", "us-east-1")
}

/// The `[connectors]` sections of a test that delivers to `connectors::testing::Receivers` at
/// `base`: every HTTP connector on, accounting in `shape` (`generic`, `quickbooks`, `xero`),
/// alert webhooks signed with `key`, short timeouts and backoffs, attempts without limit (a
/// fault never dead-letters), stock levels synced every second, idle lanes polling every `poll_ms`.
pub fn connectors_config(base: &str, shape: &str, key: &[u8], poll_ms: u64) -> String {
    use base64::Engine as _;
    let secret = base64::engine::general_purpose::STANDARD.encode(key);
    let accounting = match shape {
        "quickbooks" => format!("url = \"{base}/qbo\"\nrealm_id = \"9130\"\n"),
        "xero" => format!("url = \"{base}/xero\"\ntenant_id = \"tenant-1\"\nbase_currency = \"USD\"\n"),
        _ => format!("url = \"{base}/generic\"\n"),
    };
    format!(
        "[connectors]\nlog = false\n\
         [connectors.delivery]\nmax_batch = 40\nlinger_ms = 0\nmax_attempts = 100000\ntimeout_ms = 300\n\
         backoff_base_ms = 5\nbackoff_cap_ms = 100\nbreaker_failures = 5\nbreaker_open_ms = 50\n\
         breaker_max_open_ms = 200\npoll_ms = {poll_ms}\n\
         [connectors.alerts_webhook]\nurl = \"{base}/alerts\"\nsecret = {{ value = \"whsec_{secret}\" }}\n\
         [connectors.manufacturer]\nurl = \"{base}/manufacturer\"\nstock_sync_interval_s = 1\n\
         [connectors.accounting]\nshape = \"{shape}\"\nposting = \"per_effect\"\n{accounting}"
    )
}

/// How the stored outcome differs from `expected` (at most 10 lines; empty when equal). The SKU
/// table is small and the outbox grows with every commit, so the outbox (on an emulator the
/// members share) is read only once the SKUs agree.
pub async fn stored_diff<S>(store: &S, expected: &stockflow_state::reference::Outcome) -> Vec<String>
where
    S: stockflow_state::StateStore + stockflow_state::outbox::OutboxStore,
{
    use stockflow_state::reference::Outcome;
    let states = store.sku_states().await.unwrap();
    if Outcome::from_parts(&states, Vec::new(), 0).skus == expected.skus {
        expected.diff(&Outcome::of_store(store).await.unwrap(), 10)
    } else {
        let partial = Outcome { skus: expected.skus.clone(), ..Outcome::default() };
        partial.diff(&Outcome::from_parts(&states, Vec::new(), 0), 10)
    }
}

/// Polls `cond` (e.g. over members' logs) until it holds; fails the test after `limit`.
pub async fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let started = Instant::now();
    while !cond() {
        assert!(started.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
