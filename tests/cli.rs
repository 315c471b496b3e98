//! The CLI end to end on the embedded backend: replay, verify, the dumps, and their errors.

use std::path::Path;
use std::process::{Command, Output};

fn stockflow(data: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_stockflow"))
        .arg("--data-dir")
        .arg(data)
        .args(args)
        .env("STOCKFLOW_LOG", "warn")
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

const EVENTS: &str = r#"{"id":"c1","type":"stock_counted","sku":"MUG-BLUE-12OZ","ts":1795773600000,"on_hand":3}
{"id":"r1","type":"stock_received","sku":"MUG-BLUE-12OZ","ts":1795773600100,"qty":10,"unit_cost":"4.10","currency":"USD"}
{"id":"ord:114-1:1:placed","type":"order_placed","sku":"MUG-BLUE-12OZ","ts":1795773600123,"qty":12,"order_id":"114-1:1","unit_price":"19.99","currency":"USD"}
{"id":"ord:114-1:1:placed","type":"order_placed","sku":"MUG-BLUE-12OZ","ts":1795773600123,"qty":12,"order_id":"114-1:1","unit_price":"19.99","currency":"USD"}
{"id":"ord:114-2:1:placed","type":"order_placed","sku":"TEE-RED-M","ts":1795773600200,"qty":1,"order_id":"114-2:1"}
{"id":"ord:114-1:1:shipped","type":"order_shipped","sku":"MUG-BLUE-12OZ","ts":1795773700000,"order_id":"114-1:1","shipped_total":2}
{"id":"x","type":"order_placed","sku":"TEE-RED-M","ts":1795773600300,"qty":0,"order_id":"114-3:1"}
not json at all
"#;

#[test]
fn replay_verify_and_dumps_agree_with_the_straight_pass() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let events = dir.path().join("events.ndjson");
    std::fs::write(&events, EVENTS).unwrap();
    let ev = events.to_str().unwrap();

    let out = stockflow(&data, &["replay", "--file", ev]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout(&out).contains("appended 8 records"), "{}", stdout(&out));

    let out = stockflow(&data, &["verify", "--events", ev]);
    assert!(out.status.success(), "{}", stdout(&out));
    assert!(stdout(&out).starts_with("verified: 2 SKUs, 1 alerts and 2 dead letters"), "{}", stdout(&out));

    let states: Vec<serde_json::Value> =
        stdout(&stockflow(&data, &["state", "dump"])).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(states.len(), 2);
    assert_eq!(states[0]["sku"], "MUG-BLUE-12OZ");
    // count 3, +10 received, 12 reserved, 2 shipped: on hand 11, reserved 10.
    assert_eq!((states[0]["on_hand"].as_i64(), states[0]["reserved"].as_i64()), (Some(11), Some(10)));
    assert_eq!((states[0]["available"].as_i64(), states[0]["oversells"].as_i64()), (Some(1), Some(0)));
    // SPEC §2 averages over on_hand_before even when those units had no cost: (3·0 + 10·4.10)/13.
    assert_eq!(states[0]["cogs"], "6.31");
    assert_eq!(states[1]["sku"], "TEE-RED-M");
    assert_eq!(states[1]["available"].as_i64(), Some(-1));

    let alerts: Vec<String> = stdout(&stockflow(&data, &["alerts", "dump"])).lines().map(String::from).collect();
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert!(alerts[0].contains(r#""alert_id":"oversell:ord:114-2:1:placed""#), "{}", alerts[0]);
    assert!(alerts[0].contains(r#""shortfall":1"#));

    let dlq = stdout(&stockflow(&data, &["dlq", "dump"]));
    assert_eq!(dlq.lines().count(), 2);
    assert!(dlq.contains(r#""field":"qty""#) && dlq.contains("malformed JSON"), "{dlq}");

    // A different file does not verify: exit 1 and a diff naming the SKU.
    let other = dir.path().join("other.ndjson");
    std::fs::write(&other, EVENTS.replace(r#""qty":10"#, r#""qty":11"#)).unwrap();
    let out = stockflow(&data, &["verify", "--events", other.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).contains("sku MUG-BLUE-12OZ"), "{}", stdout(&out));

    // Dead letters stay until an operator removes them: one by position, then the rest.
    let first: serde_json::Value = serde_json::from_str(dlq.lines().next().unwrap()).unwrap();
    let (shard, pos) = (first["shard"].as_str().unwrap(), first["position"]["sequence"].as_str().unwrap());
    let removed = stockflow(&data, &["dlq", "remove", "--shard", shard, "--position", pos]);
    assert_eq!(stdout(&removed).trim(), "1 dead letters removed");
    let again = stockflow(&data, &["dlq", "remove", "--shard", shard, "--position", pos]);
    assert_eq!(again.status.code(), Some(1), "nothing matched: exit 1");
    let bad = stockflow(&data, &["dlq", "remove", "--shard", shard, "--position", "12x"]);
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("--position"));
    assert_eq!(stdout(&stockflow(&data, &["dlq", "dump"])).lines().count(), 1);
    assert_eq!(stdout(&stockflow(&data, &["dlq", "remove", "--all"])).trim(), "1 dead letters removed");
    assert_eq!(stdout(&stockflow(&data, &["dlq", "dump"])), "");
    assert_eq!(stdout(&stockflow(&data, &["outbox", "drop", "--all"])).trim(), "0 connector dead letters removed");
}

#[test]
fn errors_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let out = stockflow(&dir.path().join("none"), &["state", "dump"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no state store"));
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "shardz = 2\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_stockflow"))
        .args(["--config", cfg.to_str().unwrap(), "demo"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("shardz"));
}

#[test]
fn help_lists_every_subcommand() {
    let out = Command::new(env!("CARGO_BIN_EXE_stockflow")).arg("--help").output().unwrap();
    let help = stdout(&out);
    for cmd in ["demo", "run", "dashboard", "consume", "replay", "generate", "state", "alerts", "dlq", "verify"] {
        assert!(help.contains(cmd), "--help lacks {cmd}: {help}");
    }
}

#[test]
fn setup_creates_then_validates_the_dynamodb_tables() {
    let endpoint = std::env::var("DYNAMODB_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:5001".into());
    let prefix =
        format!("cli{:x}", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos());
    let setup = || {
        Command::new(env!("CARGO_BIN_EXE_stockflow"))
            .args(["setup", "--dynamodb-endpoint", &endpoint, "--table-prefix", &prefix])
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_REGION", "us-east-1")
            .env("STOCKFLOW_LOG", "warn")
            .output()
            .unwrap()
    };
    let first = setup();
    if !first.status.success() && std::env::var("CI").map_or(true, |v| v != "true") {
        eprintln!("skipping: no DynamoDB emulator at {endpoint}: {}", String::from_utf8_lossy(&first.stderr));
        return;
    }
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let tables = stockflow_state::dynamodb::schema::TABLE_KEYS.len();
    assert_eq!(stdout(&first).matches("created").count(), tables, "{}", stdout(&first));
    let second = setup();
    assert!(second.status.success());
    assert_eq!(stdout(&second).matches("valid").count(), tables, "{}", stdout(&second));
}
