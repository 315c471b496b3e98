//! Connectors end to end (SPEC §4): the `stockflow` binary replays a generated stream and its
//! drains deliver every effect to local receivers that inject faults (500s, 429 + Retry-After,
//! accept-then-500, accept-then-hang past the client timeout, slow answers, connection resets).
//! The drainer is killed with SIGKILL mid-delivery and restarted. Whatever happens, each alert,
//! reorder and journal must be accepted exactly once (by effect id, under one idempotency key),
//! per-SKU order kept, journal totals equal to the straight pass's COGS and inventory, the
//! manufacturer's stock levels equal to the final state, and no dead letters.

mod support;

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use stockflow::loadtest::generate::{GenConfig, generate};
use stockflow_connectors::testing::{FaultPlan, Log, Receivers, Routes, check_deliveries};
use stockflow_state::EngineConfig;
use stockflow_state::reference::straight_pass_full;

const KEY: &[u8] = b"connector-test-signing-key-32byt";

fn config(base: &str, shape: &str) -> String {
    format!(
        "shards = 2\n[engine]\ndefault_reorder_point = 3\n\
         [worker]\ncommit_every_records = 500\ncommit_interval_ms = 20\n{}",
        support::connectors_config(base, shape, KEY, 10)
    )
}

fn stockflow(dir: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_stockflow"));
    cmd.args([
        "--config",
        dir.join("stockflow.toml").to_str().unwrap(),
        "--data-dir",
        dir.join("data").to_str().unwrap(),
    ])
    .args(args)
    .env("STOCKFLOW_LOG", "warn")
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    cmd
}

struct Setup {
    dir: tempfile::TempDir,
    receivers: Arc<Receivers>,
    effects: Vec<stockflow_state::Effect>,
    levels: Vec<(String, (i64, i64))>,
    _stop: tokio::sync::watch::Sender<bool>,
}

/// Receivers with `percent`% faults, a generated stream appended to the embedded log (not yet
/// consumed), and the straight pass's effects and final stock levels.
async fn setup(shape: &str, events: usize, percent: u32) -> Setup {
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let receivers = Receivers::new(FaultPlan::chaos(percent, Duration::from_millis(400), 11), Some(KEY.to_vec()));
    let (base, _) = receivers.start(stop_rx).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("stockflow.toml"), config(&base, shape)).unwrap();
    let stream = generate(&GenConfig { events, skus: 150, seed: 5, ..GenConfig::default() });
    let file = dir.path().join("events.ndjson");
    stream.write_ndjson(std::fs::File::create(&file).unwrap()).unwrap();
    let cfg = EngineConfig { default_reorder_point: 3, ..EngineConfig::default() };
    let (outcome, effects) = straight_pass_full(Arc::new(cfg), stream.iter().map(|(_, p)| p));
    let levels = outcome.skus.iter().map(|s| (s.sku.clone(), (s.on_hand, s.reserved))).collect();
    let out = stockflow(dir.path(), &["replay", "--file", file.to_str().unwrap(), "--no-consume"]).output().unwrap();
    assert!(out.status.success());
    Setup { dir, receivers, effects, levels, _stop: stop }
}

fn assert_exact(log: &Log, s: &Setup, accounting: &'static str) {
    let routes = Routes { alerts: true, reorders: true, accounting: Some(accounting) };
    let problems = check_deliveries(log, &s.effects, routes, 20);
    assert!(problems.is_empty(), "delivery differs from the straight pass:\n{}", problems.join("\n"));
    let journals = s.effects.iter().filter(|e| matches!(e, stockflow_state::Effect::Journal(_))).count();
    assert!(journals > 100 && log.order[accounting].len() == journals, "journals were delivered");
    let levels: Vec<(String, (i64, i64))> = log.stock_levels.clone().into_iter().collect();
    assert_eq!(levels, s.levels, "the manufacturer holds the final stock levels");
    let dead = stockflow(s.dir.path(), &["outbox", "dead-letters"]).output().unwrap();
    assert!(dead.status.success());
    assert_eq!(String::from_utf8_lossy(&dead.stdout), "", "no connector dead letters");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_drainer_under_faults_delivers_every_effect_exactly_once() {
    let s = setup("generic", 20_000, 20).await;
    let mut accepted = s.receivers.accepted();
    // Kill the consumer + drainer after k more effects were accepted, three times.
    let mut killed = 0;
    for k in [1u64, 37, 400] {
        let target = *accepted.borrow() + k;
        let mut child = stockflow(s.dir.path(), &["consume", "--drain"]).stdout(Stdio::null()).spawn().unwrap();
        let reached = tokio::time::timeout(Duration::from_secs(120), accepted.wait_for(|n| *n >= target)).await;
        assert!(reached.is_ok(), "the receivers accepted {k} more effects");
        child.kill().unwrap(); // SIGKILL
        let status = child.wait().unwrap();
        if status.signal() == Some(9) {
            killed += 1;
        }
    }
    assert!(killed >= 2, "the drainer was killed mid-delivery");
    let out = stockflow(s.dir.path(), &["consume", "--drain"]).output().unwrap();
    assert!(out.status.success(), "the last run finishes");
    let log = s.receivers.log();
    assert!(
        log.faults > 50 && log.replays > 0,
        "faults were injected ({}) and re-sends answered from the key ({})",
        log.faults,
        log.replays
    );
    assert_exact(&log, &s, "generic");

    // A status of the outbox after everything is delivered: nothing behind, nothing in flight.
    let status = stockflow(s.dir.path(), &["outbox", "status"]).output().unwrap();
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        text.contains("accounting")
            && text.lines().all(|l| l.contains("effects after the cursor        0  in flight -")),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quickbooks_and_xero_shapes_book_the_straight_pass_exactly_once_within_their_limits() {
    for (shape, route) in [("quickbooks", "quickbooks"), ("xero", "xero")] {
        let s = setup(shape, 2_500, 15).await;
        let out = stockflow(s.dir.path(), &["consume", "--drain"]).output().unwrap();
        assert!(out.status.success(), "{shape}: the run finishes");
        let log = s.receivers.log();
        assert!(log.faults > 0, "{shape}: faults were injected");
        assert_exact(&log, &s, route);
        // Batches within the documented limits: QuickBooks ≤ 30 operations, Xero ≤ 50 journals;
        // and the receivers, which enforce the vendors' rates (QuickBooks 40 batch requests a
        // minute, Xero 60 calls a minute and its daily budget), never had to refuse one.
        assert_eq!(log.limit_refusals, 0, "{shape}: the delivery stayed inside the vendor's limits");
        let journals = log.order[route].len() as u64;
        let requests = log.accepted_requests[route];
        let most = if shape == "quickbooks" { 30 } else { 50 };
        assert!(journals <= requests * most, "{shape}: {journals} journals in {requests} requests");
    }
}

/// Summary posting (the default): one journal per day and currency in the seller's time zone,
/// exactly once through SIGKILLs of the drainer under receiver faults; a late receipt for a
/// closed day lands in that day's adjustment journal, never in the next day; per day the
/// journals equal the straight pass to the cent, and `journals show` gives the per-SKU detail
/// behind them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn summary_journals_are_exactly_once_through_kill_9_and_a_late_receipt_is_an_adjustment() {
    use stockflow_connectors::accounting::Accounts;
    use stockflow_connectors::journals::{PeriodLen, PostingKind, SummaryPolicy};
    use stockflow_connectors::testing::check_summaries;
    let (_stop, stop_rx) = tokio::sync::watch::channel(false);
    let receivers = Receivers::new(FaultPlan::chaos(15, Duration::from_millis(400), 3), Some(KEY.to_vec()));
    let (base, _) = receivers.start(stop_rx).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&base, "generic").replace(
        "posting = \"per_effect\"",
        "posting = \"summary\"\nperiod = \"1d\"\ntime_zone = \"America/New_York\"",
    );
    std::fs::write(dir.path().join("stockflow.toml"), cfg).unwrap();
    // Four days of event time from Black Friday 00:00Z.
    let stream = generate(&GenConfig {
        events: 12_000,
        skus: 150,
        seed: 9,
        hour_weights: vec![1.0; 96],
        ..GenConfig::default()
    });
    let file = dir.path().join("events.ndjson");
    stream.write_ndjson(std::fs::File::create(&file).unwrap()).unwrap();
    let out = stockflow(dir.path(), &["replay", "--file", file.to_str().unwrap(), "--no-consume"]).output().unwrap();
    assert!(out.status.success());
    let mut accepted = receivers.accepted();
    let mut killed = 0;
    for k in [1u64, 150] {
        let target = *accepted.borrow() + k;
        let mut child = stockflow(dir.path(), &["consume", "--drain"]).stdout(Stdio::null()).spawn().unwrap();
        let reached = tokio::time::timeout(Duration::from_secs(120), accepted.wait_for(|n| *n >= target)).await;
        assert!(reached.is_ok(), "the receivers accepted {k} more effects");
        child.kill().unwrap();
        killed += i32::from(child.wait().unwrap().signal() == Some(9));
    }
    assert!(killed >= 1, "the drainer was killed mid-delivery");
    let out = stockflow(dir.path(), &["consume", "--drain"]).output().unwrap();
    assert!(out.status.success(), "the run finishes");

    // A receipt for Black Friday (New York) arrives after that day closed.
    let late = r#"{"id":"late-receipt","type":"stock_received","sku":"LATE-SKU","ts":1795773600000,"qty":5,"unit_cost":"2.00","currency":"USD"}"#;
    let late_file = dir.path().join("late.ndjson");
    std::fs::write(&late_file, format!("{late}\n")).unwrap();
    let out =
        stockflow(dir.path(), &["replay", "--file", late_file.to_str().unwrap(), "--no-consume"]).output().unwrap();
    assert!(out.status.success());
    let out = stockflow(dir.path(), &["consume", "--drain"]).output().unwrap();
    assert!(out.status.success(), "the late run finishes");

    let cfg = EngineConfig { default_reorder_point: 3, ..EngineConfig::default() };
    let lines: Vec<Vec<u8>> = stream.iter().map(|(_, p)| p.to_vec()).chain([late.as_bytes().to_vec()]).collect();
    let (_, effects) = straight_pass_full(Arc::new(cfg), lines.iter().map(Vec::as_slice));
    let store = stockflow_state::embedded::RedbStore::open(dir.path().join("data").join("state.redb")).unwrap();
    let postings = stockflow::cmd::journals::postings(&store).await.unwrap();
    let policy = SummaryPolicy::new(PeriodLen::Day, "America/New_York", 300_000).unwrap();
    let accounts = Accounts { cogs: "5000".into(), inventory: "1300".into(), clearing: "2100".into() };
    let log = receivers.log();
    assert!(log.faults > 0, "faults were injected");
    let books = check_summaries(&log, &postings, &effects, &policy, &accounts);
    assert!(books.problems.is_empty(), "the books differ:\n{}", books.problems.join("\n"));
    assert!(books.posted_periods >= 3, "days posted: {}", books.posted_periods);
    let summaries = postings.iter().filter(|p| p.kind == PostingKind::Summary).count();
    assert_eq!(summaries, books.posted_periods, "one summary per day and currency");
    // The late receipt: an adjustment of Black Friday (New York), 5 × 2.00 received.
    let adjustment = postings.iter().find(|p| p.kind == PostingKind::Adjustment && p.period == "2026-11-27");
    let adjustment = adjustment.unwrap_or_else(|| panic!("no adjustment for the late receipt: {postings:#?}"));
    assert_eq!(adjustment.received, rust_decimal::Decimal::new(1000, 2));
    drop(store);

    // The detail behind Black Friday's journals adds up to them.
    let out = stockflow(dir.path(), &["journals", "show", "--period", "2026-11-27"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let csv = String::from_utf8(out.stdout).unwrap();
    let (mut cogs, mut received) = (rust_decimal::Decimal::ZERO, rust_decimal::Decimal::ZERO);
    for row in csv.lines().skip(1) {
        let f: Vec<&str> = row.split(',').collect();
        let amount: rust_decimal::Decimal = f[6].parse().unwrap();
        match f[4] {
            "cogs" => cogs += amount,
            _ => received += amount,
        }
    }
    assert!(csv.contains(",1,LATE-SKU,inventory_receipt,5,10.00,1"), "the late receipt is in adjustment 1:\n{csv}");
    let day: Vec<_> = postings.iter().filter(|p| p.period == "2026-11-27").collect();
    assert_eq!(cogs, day.iter().map(|p| p.cogs).sum::<rust_decimal::Decimal>());
    assert_eq!(received, day.iter().map(|p| p.received).sum::<rust_decimal::Decimal>());
}

/// `stockflow accounts check` reads the configured accounts back from the vendor: QuickBooks by
/// Id (account numbers are not Ids), Xero by code (an INVENTORY-type or system account cannot
/// take manual journals); exit 1 names what is wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_check_names_missing_and_wrongly_typed_accounts() {
    let (_stop, stop_rx) = tokio::sync::watch::channel(false);
    let receivers = Receivers::new(FaultPlan::none(), Some(KEY.to_vec()));
    let (base, _) = receivers.start(stop_rx).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let check = |shape: &str, accounts: [&str; 3]| {
        let cfg = format!(
            "{}cogs_account = \"{}\"\ninventory_account = \"{}\"\nclearing_account = \"{}\"\n",
            config(&base, shape),
            accounts[0],
            accounts[1],
            accounts[2]
        );
        std::fs::write(dir.path().join("stockflow.toml"), cfg).unwrap();
        let out = stockflow(dir.path(), &["accounts", "check"]).output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).to_string())
    };
    let (code, text) = check("quickbooks", ["80", "81", "82"]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("cogs       80         Cost of Goods Sold") && text.matches(" ok").count() == 3, "{text}");
    // Account numbers where Ids belong, and an inactive account.
    let (code, text) = check("quickbooks", ["5000", "90", "82"]);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("no account with Id \"5000\" in the books"), "{text}");
    assert!(text.contains("inactive"), "{text}");
    let (code, text) = check("xero", ["500", "631", "820"]);
    assert_eq!(code, Some(0), "{text}");
    let (code, text) = check("xero", ["500", "630", "800"]);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("type \"INVENTORY\" is not one journals use for inventory (expected CURRENT)"), "{text}");
    assert!(text.contains("system account CREDITORS"), "{text}");
}
