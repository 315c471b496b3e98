//! The Kafka backend end to end: `stockflow consume --kafka` members share a 6-partition topic on
//! a real Kafka-protocol broker (Tansu, started by `scripts/services.sh`) with state and leases
//! in DynamoDB (moto). Every scenario ends with the stored state, alerts and dead letters equal to
//! the straight pass over the events — whatever was killed, joined or left meanwhile — and with
//! the connectors' deliveries exactly once.

#![cfg(feature = "kafka")]

mod support;

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use stockflow::loadtest::generate::{GenConfig, generate};
use stockflow::loadtest::ndjson::partition_key;
use stockflow_pipeline::kafka::{KafkaConfig, KafkaProducer, ensure_topic};
use stockflow_pipeline::{OutRecord, StreamProducer};
use stockflow_state::dynamodb::DynamoStore;
use stockflow_state::dynamodb::testing::emulator_store;
use stockflow_state::lease::LeaseStore;
use stockflow_state::reference::{Outcome, straight_pass_full};
use stockflow_state::{EngineConfig, StateStore};

const PARTITIONS: i32 = 6;

/// One scenario at a time: they share two cores, moto and the broker.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn brokers() -> String {
    std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

/// The broker, or a skip outside CI (under CI its absence fails the test).
fn broker_up() -> bool {
    let addr = brokers();
    let first = addr.split(',').next().unwrap_or_default().to_string();
    match std::net::TcpStream::connect_timeout(&first.parse().unwrap(), Duration::from_secs(2)) {
        Ok(_) => true,
        Err(e) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("the Kafka broker at {addr} is required under CI: {e}")
        }
        Err(e) => {
            eprintln!("skipping: no Kafka broker at {addr} ({e}); run scripts/services.sh start");
            false
        }
    }
}

/// A log line's field `name=value`.
fn field<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    let start = text.find(&format!("{name}="))? + name.len() + 1;
    let rest = &text[start..];
    Some(rest.split([' ', ',']).next().unwrap_or(rest).trim_matches('"'))
}

struct Member {
    name: String,
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    stdout: Option<std::process::ChildStdout>,
}

impl Member {
    fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Partitions this member holds now, by its own log.
    fn holding(&self) -> Vec<String> {
        let mut held: Vec<String> = Vec::new();
        for l in self.lines() {
            let Some(shard) = field(&l, "shard").map(str::to_string) else { continue };
            if l.contains("took the lease") {
                held.push(shard);
            } else if l.contains("released the lease") || l.contains("stopped the partition") {
                held.retain(|s| *s != shard);
            }
        }
        held
    }

    fn committed(&self) -> bool {
        self.lines().iter().any(|l| l.contains(" committed"))
    }

    fn signal(&mut self, sig: &str) {
        assert!(Command::new("kill").args([sig, &self.child.id().to_string()]).status().unwrap().success());
    }

    fn wait(&mut self) -> (Option<i32>, String) {
        let status = self.child.wait().unwrap();
        let mut out = String::new();
        if let Some(mut s) = self.stdout.take() {
            s.read_to_string(&mut out).unwrap();
        }
        (status.code(), out)
    }

    fn assert_alive(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            let tail: Vec<String> = self.lines().into_iter().rev().take(10).collect();
            panic!("member {} exited with {status}:\n{}", self.name, tail.join("\n"));
        }
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        if let Ok(dir) = std::env::var("STOCKFLOW_TEST_LOGS") {
            let _ =
                std::fs::write(format!("{dir}/kafka-{}-{}.log", self.name, self.child.id()), self.lines().join("\n"));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn stop(members: &mut [Member]) -> Vec<String> {
    for m in members.iter_mut() {
        m.signal("-TERM");
    }
    members
        .iter_mut()
        .map(|m| {
            let (code, out) = m.wait();
            assert_eq!(code, Some(0), "{} exited with {code:?}: {out}", m.name);
            out
        })
        .collect()
}

struct Topic {
    dir: tempfile::TempDir,
    topic: String,
    store: DynamoStore,
    producer: KafkaProducer,
    events: Vec<(String, Vec<u8>)>,
    expected: Outcome,
    effects: Vec<stockflow_state::Effect>,
}

impl Topic {
    async fn new(tag: &str, events: usize, config: &str, engine: EngineConfig) -> Option<Topic> {
        if !broker_up() {
            return None;
        }
        let store = emulator_store(&format!("sf-{tag}-")).await?;
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        let topic = format!("sf-{tag}-{nanos:x}");
        let cfg = KafkaConfig::new(&brokers(), &topic, "unused");
        assert_eq!(ensure_topic(&cfg, None, PARTITIONS).await.unwrap(), PARTITIONS as usize);
        let producer = KafkaProducer::new(&cfg, None).unwrap();
        producer.ready().await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let group = format!("sf-{tag}-{nanos:x}");
        std::fs::write(
            dir.path().join("stockflow.toml"),
            format!("[kafka]\ngroup_id = \"{group}\"\nsession_timeout_ms = 6000\n{config}"),
        )
        .unwrap();
        let data = generate(&GenConfig { events, skus: 300, seed: 23, ..GenConfig::default() });
        let events: Vec<(String, Vec<u8>)> = data
            .iter()
            .map(|(_, p)| {
                let key = partition_key(p);
                (if key.is_empty() { "no-sku".to_string() } else { key.into_owned() }, p.to_vec())
            })
            .collect();
        let (expected, effects) = straight_pass_full(Arc::new(engine), events.iter().map(|(_, p)| p.as_slice()));
        assert!(expected.dead_letters > 0, "the stream holds bad records to dead-letter");
        Some(Topic { dir, topic, store, producer, events, expected, effects })
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("stockflow.toml")
    }

    fn prefix(&self) -> String {
        self.store.tables().leases.trim_end_matches("-leases").to_string()
    }

    fn spawn(&self, name: &str) -> Member {
        let mut child = support::emulator_env(
            Command::new(env!("CARGO_BIN_EXE_stockflow"))
                .args(["--config", self.config().to_str().unwrap(), "consume", "--kafka"])
                .args(["--brokers", &brokers(), "--topic", &self.topic, "--table-prefix", &self.prefix()]),
        )
        .env("STOCKFLOW_LOG", "info,stockflow_pipeline::worker=debug,stockflow::alerts=off,librdkafka=warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let (sink, who) = (Arc::clone(&lines), name.to_string());
        std::thread::spawn(move || {
            for text in BufReader::new(stderr).lines().map_while(Result::ok) {
                if text.contains("ERROR") || text.contains("WARN") {
                    eprintln!("[{who}] {text}");
                }
                sink.lock().unwrap().push(text);
            }
        });
        let stdout = child.stdout.take();
        Member { name: name.into(), child, lines, stdout }
    }

    async fn put(&self, range: std::ops::Range<usize>) {
        for chunk in self.events[range].chunks(500) {
            let recs: Vec<OutRecord<'_>> = chunk.iter().map(|(k, p)| OutRecord { key: k, payload: p }).collect();
            self.producer.put(&recs).await.unwrap();
        }
    }

    /// Waits until the stored outcome equals the straight pass (`limit` bounds a hang).
    async fn wait_exact(&self, members: &mut [Member], limit: Duration) {
        let started = Instant::now();
        loop {
            members.iter_mut().for_each(Member::assert_alive);
            let diff = support::stored_diff(&self.store, &self.expected).await;
            if diff.is_empty() {
                return;
            }
            assert!(
                started.elapsed() < limit,
                "state differs from the straight pass after {limit:?}:\n{}",
                diff.join("\n")
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Every partition's lease: released (no owner) with a checkpoint, and the sum of the
    /// checkpoints + 1 equal to the events put (each offset applied once).
    async fn assert_released_at_the_end(&self) {
        let leases = self.store.leases().await.unwrap();
        assert_eq!(leases.len(), PARTITIONS as usize, "{leases:?}");
        assert!(leases.iter().all(|l| l.owner.is_none()), "all released at shutdown: {leases:?}");
        let next: u64 =
            leases.iter().map(|l| l.checkpoint.as_ref().and_then(|c| c.as_u64()).map_or(0, |c| c + 1)).sum();
        assert_eq!(next, self.events.len() as u64, "the checkpoints cover every record once");
    }
}

fn worker(commit_ms: u64) -> String {
    format!("[worker]\ncommit_interval_ms = {commit_ms}\ncommit_every_records = 100000\nbatch_records = 1000\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_share_six_partitions_and_the_state_is_exact() {
    let _serial = SERIAL.lock().await;
    let Some(t) = Topic::new("kgrp", 20_000, &worker(1000), EngineConfig::default()).await else { return };
    let mut members: Vec<Member> = ["a", "b", "c"].iter().map(|n| t.spawn(n)).collect();
    t.put(0..t.events.len()).await;
    t.wait_exact(&mut members, Duration::from_secs(240)).await;
    support::wait_until("every member to hold a partition", Duration::from_secs(60), || {
        members.iter().all(|m| !m.holding().is_empty())
    })
    .await;
    // Kafka's assignment, as the members logged it: six partitions, each held by one member.
    let mut held: Vec<String> = members.iter().flat_map(Member::holding).collect();
    held.sort();
    let want: Vec<String> = (0..PARTITIONS).map(|p| format!("{}-{p}", t.topic)).collect();
    assert_eq!(held, want, "each partition held by exactly one member");
    let outs = stop(&mut members);
    assert!(outs.iter().all(|o| o.contains("joined Kafka group")), "{outs:?}");
    t.wait_exact(&mut [], Duration::from_secs(5)).await;
    t.assert_released_at_the_end().await;
}

/// `ingest serve --kafka`: events POSTed one by one (4,000, some of them bad) land on the topic
/// (key = SKU, per-SKU order kept), bad ones are refused at the door with 400 and never put,
/// and a member consuming the topic ends at the straight pass over exactly what was accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_serve_puts_onto_the_topic_and_a_member_consumes_it_exactly() {
    let _serial = SERIAL.lock().await;
    let Some(t) = Topic::new("king", 4_000, &worker(200), EngineConfig::default()).await else { return };
    let (mut ingest, line) = support::spawn_announced(
        support::emulator_env(
            Command::new(env!("CARGO_BIN_EXE_stockflow"))
                .args(["--config", t.config().to_str().unwrap(), "ingest", "serve", "--kafka"])
                .args(["--listen", "127.0.0.1:0", "--brokers", &brokers(), "--topic", &t.topic]),
        )
        .env("STOCKFLOW_LOG", "warn"),
    );
    assert!(line.contains("-> Kafka topic"), "{line}");
    let addr = support::banner_addr(&line, 1);
    let mut accepted = Vec::new();
    for (key, payload) in &t.events {
        let Ok(body) = std::str::from_utf8(payload) else { continue };
        let (status, answer) = support::http(&addr, "POST", "/v1/events", body);
        match status {
            202 => accepted.push((key.clone(), payload.clone())),
            400 => assert!(answer.contains("\"field\""), "a refusal names the field: {answer}"),
            _ => panic!("{answer}"),
        }
    }
    assert!(accepted.len() > t.events.len() / 2 && accepted.len() < t.events.len(), "{}", accepted.len());
    let (expected, _) =
        straight_pass_full(Arc::new(EngineConfig::default()), accepted.iter().map(|(_, p)| p.as_slice()));
    // The ingest put exactly the accepted events: the state and the checkpoints are theirs.
    let t = Topic { expected, events: accepted, ..t };
    let mut members = vec![t.spawn("a")];
    t.wait_exact(&mut members, Duration::from_secs(120)).await;
    stop(&mut members);
    t.assert_released_at_the_end().await;
    let _ = Command::new("kill").args(["-TERM", &ingest.id().to_string()]).status();
    assert!(ingest.wait().unwrap().success(), "the ingest exits cleanly on SIGTERM");
}

const DELIVERY_KEY: &[u8] = b"kafka-delivery-test-signing-key!";

/// kill -9 of a member mid-stream, a member joining and one leaving with SIGTERM (rebalances
/// while events flow and effects are delivered): state exact, deliveries exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_join_and_leave_mid_stream_lose_and_double_nothing() {
    use stockflow_connectors::testing::{FaultPlan, Receivers, Routes, check_deliveries};
    let _serial = SERIAL.lock().await;
    let (_stop, stop_rx) = tokio::sync::watch::channel(false);
    let receivers = Receivers::new(FaultPlan::chaos(20, Duration::from_millis(500), 5), Some(DELIVERY_KEY.to_vec()));
    let (base, _) = receivers.start(stop_rx).await.unwrap();
    let config = format!(
        "[engine]\ndefault_reorder_point = 3\n{}[group]\ntake_interval_ms = 500\n{}",
        worker(700),
        support::connectors_config(&base, "generic", DELIVERY_KEY, 50)
    );
    let engine = EngineConfig { default_reorder_point: 3, ..EngineConfig::default() };
    let Some(t) = Topic::new("kchaos", 4_000, &config, engine).await else { return };
    let routes = Routes { alerts: true, reorders: true, accounting: Some("generic") };
    let mut a = t.spawn("a");
    let mut b = t.spawn("b");
    t.put(0..1_000).await;
    support::wait_until("both members to hold partitions and commit", Duration::from_secs(90), || {
        !a.holding().is_empty() && !b.holding().is_empty() && a.committed() && b.committed()
    })
    .await;
    let a_partitions = a.holding();

    // 1. kill -9 of a member mid-stream: after the session timeout, Kafka gives its partitions
    // to b, which takes their leases (epoch bump) and resumes at their checkpoints.
    a.signal("-KILL");
    a.wait();
    t.put(1_000..2_000).await;
    support::wait_until("the killed member's partitions to move", Duration::from_secs(60), || {
        let held = b.holding();
        a_partitions.iter().all(|p| held.contains(p))
    })
    .await;

    // 2. A member joins: the cooperative rebalance moves some partitions to it, each revoked one
    // committed and released by b before c starts on it.
    let mut c = t.spawn("c");
    t.put(2_000..3_000).await;
    support::wait_until("the joining member to get partitions", Duration::from_secs(60), || !c.holding().is_empty())
        .await;

    // 3. A member leaves with SIGTERM mid-stream: it commits and releases; c gets the rest.
    t.put(3_000..3_500).await;
    b.signal("-TERM");
    let (code, out) = b.wait();
    assert_eq!(code, Some(0), "b left cleanly: {out}");
    t.put(3_500..4_000).await;
    t.wait_exact(std::slice::from_mut(&mut c), Duration::from_secs(240)).await;
    assert_eq!(c.holding().len(), PARTITIONS as usize, "the last member holds every partition");

    let started = Instant::now();
    loop {
        c.assert_alive();
        let problems = check_deliveries(&receivers.log(), &t.effects, routes, 20);
        if problems.is_empty() {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(300), "delivery incomplete:\n{}", problems.join("\n"));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let log = receivers.log();
    stop(std::slice::from_mut(&mut c));
    t.assert_released_at_the_end().await;
    assert!(log.faults > 10, "faults were injected ({})", log.faults);
    // The moves were real ownership changes in the lease table: each partition's epoch is the
    // one of its last taker, and the killed member's partitions were taken without a release.
    let takes: usize = [&c].iter().map(|m| m.lines().iter().filter(|l| l.contains("took the lease")).count()).sum();
    assert!(takes >= 3, "c took the partitions it was given ({takes})");
    let dead = support::emulator_env(Command::new(env!("CARGO_BIN_EXE_stockflow")).args([
        "outbox",
        "dead-letters",
        "--dynamodb",
        "--table-prefix",
        &t.prefix(),
    ]))
    .output()
    .unwrap();
    assert!(dead.status.success());
    assert_eq!(String::from_utf8_lossy(&dead.stdout), "", "no connector dead letters");
    eprintln!(
        "kafka chaos: {} events, {} effects delivered exactly once through kill -9, join and leave; {} requests, {} faults",
        t.events.len(),
        t.effects.len(),
        log.requests,
        log.faults
    );
}

/// A replay onto a Kafka topic through `stockflow replay --target kafka:TOPIC` verifies itself
/// against the straight pass (the load tester's own check) and says so in its report.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_onto_a_kafka_topic_verifies() {
    let _serial = SERIAL.lock().await;
    if !broker_up() {
        return;
    }
    let Some(store) = emulator_store("sf-krep-").await else { return };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("events.ndjson");
    let made = support::stockflow(&["generate", "--events", "5000", "--skus", "200", "--out", file.to_str().unwrap()]);
    assert!(made.status.success(), "{}", support::text(&made));
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let topic = format!("sf-krep-{nanos:x}");
    let prefix = store.tables().leases.trim_end_matches("-leases").to_string();
    let out = support::emulator_env(
        Command::new(env!("CARGO_BIN_EXE_stockflow"))
            .args(["replay", "--file", file.to_str().unwrap(), "--target", &format!("kafka:{topic}"), "--shards", "3"])
            .args(["--table-prefix", &prefix, "--report", dir.path().join("report").to_str().unwrap()])
            .env("STOCKFLOW__KAFKA__BROKERS", brokers())
            .env("STOCKFLOW__KAFKA__GROUP_ID", &topic),
    )
    .output()
    .unwrap();
    let text = support::text(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("equal the straight pass"), "{text}");
    let report = support::json(&dir.path().join("report/report.json"));
    assert_eq!(report["target"], format!("kafka:{topic}"), "{report}");
}

/// A topic whose partition count no longer matches the group's leases (partitions were added:
/// SKUs now map elsewhere while their state stays behind) makes a member stop with an error
/// that names the cause, instead of applying events to the wrong state. Tansu cannot add
/// partitions, so the lease table of the smaller, consumed topic is written first. (Rows without
/// checkpoints are what members starting together create: they are not a change.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_refuses_a_topic_whose_partitions_changed() {
    let _serial = SERIAL.lock().await;
    let Some(t) = Topic::new("kgrow", 4_000, "", EngineConfig::default()).await else { return };
    for p in 0..3 {
        let new =
            stockflow_state::lease::NewLease { key: format!("{}-{p}", t.topic), parents: Vec::new(), hash_range: None };
        assert!(t.store.create_lease(&new).await.unwrap());
        // Consumed before the increase: a checkpoint as the KCL spells it (a sequence number).
        let endpoint = std::env::var("DYNAMODB_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:5001".into());
        DynamoStore::emulator_client(&endpoint)
            .await
            .update_item()
            .table_name(&t.store.tables().leases)
            .key("leaseKey", aws_sdk_dynamodb::types::AttributeValue::S(new.key.clone()))
            .update_expression("SET checkpoint = :c")
            .expression_attribute_values(":c", aws_sdk_dynamodb::types::AttributeValue::S("41".into()))
            .send()
            .await
            .unwrap();
    }
    let out = support::emulator_env(
        Command::new(env!("CARGO_BIN_EXE_stockflow"))
            .args(["--config", t.config().to_str().unwrap(), "consume", "--kafka"])
            .args(["--brokers", &brokers(), "--topic", &t.topic, "--table-prefix", &t.prefix()]),
    )
    .output()
    .unwrap();
    let text = support::text(&out);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("has 6 partitions where the group's leases know 3"), "{text}");
    assert!(text.contains("Partition increase"), "{text}");
    // Nothing was applied or leased.
    assert!(t.store.sku_states().await.unwrap().is_empty());
    assert!(t.store.leases().await.unwrap().iter().all(|l| l.owner.is_none()));
}
