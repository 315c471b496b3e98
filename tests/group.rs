//! The consumer group end to end: several `stockflow consume` processes share a Kinesis stream
//! (kinesis-local) with leases, state and checkpoints in DynamoDB (moto). Every scenario ends
//! with the stored state, alerts and dead letters equal to the straight pass over the events —
//! nothing lost, nothing applied twice — whatever was killed, handed off or resharded meanwhile.
//!
//! Long because each scenario starts and watches real processes; the shared harness is at the top.

mod support;

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_kinesis::Client;
use stockflow::loadtest::generate::{GenConfig, generate};
use stockflow::loadtest::ndjson::partition_key;
use stockflow_pipeline::kinesis::KinesisProducer;
use stockflow_pipeline::kinesis::testing::{emulator_stream, wait_active};
use stockflow_pipeline::{OutRecord, StreamProducer};
use stockflow_state::EngineConfig;
use stockflow_state::dynamodb::DynamoStore;
use stockflow_state::dynamodb::testing::emulator_store;
use stockflow_state::lease::LeaseStore;
use stockflow_state::reference::{Outcome, straight_pass_full};

/// Quick polls so the scenarios run in seconds on the emulators; `[worker]` comes per scenario
/// (moto runs about ten transactions a second: commits are what loads it).
const BASE_CONFIG: &str = "[kinesis]\nidle_poll_ms = 200\n";

/// Members that died on their own fail the test at once, with their last words.
fn assert_alive(members: &mut [Member]) {
    for m in members.iter_mut() {
        if let Some(status) = m.child.try_wait().unwrap() {
            let lines: Vec<String> = m.lines().into_iter().rev().take(10).map(|l| l.text).collect();
            panic!("member {} exited with {status}:\n{}", m.name, lines.join("\n"));
        }
    }
}

/// The `[worker]` section: a commit every `commit_ms` per shard.
/// Commits at most every `commit_ms` per shard, caught up or not (the deployed consumers' floor:
/// on DynamoDB every commit is a billed transaction, and the cost bounds below check it).
fn worker(commit_ms: u64) -> String {
    format!(
        "[worker]\ncommit_interval_ms = {commit_ms}\ncommit_min_interval_ms = {commit_ms}\n\
         commit_every_records = 100000\nbatch_records = 1000\n"
    )
}

/// The scenarios run one at a time: timing bounds mean nothing on two cores shared by five groups.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A log line of a member, with the time it was written (from the line's own timestamp).
#[derive(Debug, Clone)]
struct Line {
    at: f64,
    text: String,
}

impl Line {
    fn field(&self, name: &str) -> Option<&str> {
        let start = self.text.find(&format!("{name}="))? + name.len() + 1;
        let rest = &self.text[start..];
        Some(rest.split([' ', ',']).next().unwrap_or(rest).trim_matches('"'))
    }
}

/// Seconds since the epoch of a `2026-11-26T04:30:01.123456Z` timestamp.
fn parse_ts(s: &str) -> Option<f64> {
    let t: jiff::Timestamp = s.parse().ok()?;
    Some(t.as_nanosecond() as f64 / 1e9)
}

fn now_epoch() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64()
}

/// One `stockflow consume` process.
struct Member {
    name: String,
    child: Child,
    lines: Arc<Mutex<Vec<Line>>>,
    stdout: Option<std::process::ChildStdout>,
}

impl Member {
    fn lines(&self) -> Vec<Line> {
        self.lines.lock().unwrap().clone()
    }

    /// Shards whose lease this member took (in order).
    fn taken(&self) -> Vec<(String, f64)> {
        self.lines()
            .iter()
            .filter(|l| l.text.contains("took the lease"))
            .filter_map(|l| Some((l.field("shard")?.to_string(), l.at)))
            .collect()
    }

    /// Shards this member holds now, by its own log (taken minus lost/released/ended).
    fn holding(&self) -> Vec<String> {
        let mut held: Vec<String> = Vec::new();
        for l in self.lines() {
            let Some(shard) = l.field("shard").map(str::to_string) else { continue };
            if l.text.contains("took the lease") {
                held.push(shard);
            } else if l.text.contains("lease lost")
                || l.text.contains("released the lease")
                || l.text.contains("shard ended and committed")
            {
                held.retain(|s| *s != shard);
            }
        }
        held
    }

    /// The worker id it joined the group with.
    fn worker_id(&self) -> String {
        let lines = self.lines();
        let join = lines.iter().find(|l| l.text.contains("joining the consumer group")).expect("joined");
        join.field("worker").unwrap().to_string()
    }

    fn signal(&mut self, sig: &str) {
        let status = Command::new("kill").args([sig, &self.child.id().to_string()]).status().unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit; returns (exit code, stdout).
    fn wait(&mut self) -> (Option<i32>, String) {
        let status = self.child.wait().unwrap();
        let mut out = String::new();
        if let Some(mut s) = self.stdout.take() {
            s.read_to_string(&mut out).unwrap();
        }
        (status.code(), out)
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        // STOCKFLOW_TEST_LOGS=DIR keeps every member's log for a post-mortem.
        if let Ok(dir) = std::env::var("STOCKFLOW_TEST_LOGS") {
            let text: Vec<String> = self.lines().into_iter().map(|l| l.text).collect();
            let _ = std::fs::write(format!("{dir}/{}-{}.log", self.name, self.child.id()), text.join("\n"));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Group {
    dir: tempfile::TempDir,
    client: Client,
    stream: String,
    store: DynamoStore,
    events: Vec<(String, Vec<u8>)>,
    expected: Outcome,
    /// Every effect of the straight pass, in order.
    effects: Vec<stockflow_state::Effect>,
}

impl Group {
    /// `kinesis` goes into the `[kinesis]` section; `rest` follows it (other sections).
    async fn new(tag: &str, shards: i32, events: usize, kinesis: &str, rest: &str) -> Option<Group> {
        Self::with_engine(tag, shards, events, kinesis, rest, EngineConfig::default()).await
    }

    /// Like [`Group::new`], for members whose `[engine]` section (in `rest`) is `engine`.
    async fn with_engine(
        tag: &str,
        shards: i32,
        events: usize,
        kinesis: &str,
        rest: &str,
        engine: EngineConfig,
    ) -> Option<Group> {
        let (client, stream) = emulator_stream(&format!("sf-{tag}-"), shards).await?;
        let store = emulator_store(&format!("sf-{tag}-")).await?;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("stockflow.toml"), format!("{BASE_CONFIG}{kinesis}{rest}")).unwrap();
        let stream_data = generate(&GenConfig { events, skus: 300, seed: 11, ..GenConfig::default() });
        let events: Vec<(String, Vec<u8>)> =
            // Records without a SKU (the generator's bad records) still need a Kinesis key.
            stream_data
                .iter()
                .map(|(_, p)| {
                    let key = partition_key(p);
                    (if key.is_empty() { "no-sku".to_string() } else { key.into_owned() }, p.to_vec())
                })
                .collect();
        let (expected, effects) = straight_pass_full(Arc::new(engine), events.iter().map(|(_, p)| p.as_slice()));
        Some(Group { dir, client, stream, store, events, expected, effects })
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("stockflow.toml")
    }

    fn spawn(&self, name: &str) -> Member {
        let mut child = support::emulator_env(
            Command::new(env!("CARGO_BIN_EXE_stockflow"))
                .args(["--config", self.config().to_str().unwrap(), "consume", "--stream", &self.stream])
                .args(["--table-prefix", self.store.tables().leases.trim_end_matches("-leases")]),
        )
        .env("KINESIS_ENDPOINT", stockflow_pipeline::kinesis::testing::endpoint())
        .env(
            "STOCKFLOW_LOG",
            "info,stockflow_pipeline::worker=debug,stockflow_pipeline::group=debug,stockflow::alerts=off",
        )
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
                let at = text.split_whitespace().next().and_then(parse_ts).unwrap_or_else(now_epoch);
                sink.lock().unwrap().push(Line { at, text });
            }
        });
        let stdout = child.stdout.take();
        Member { name: name.to_string(), child, lines, stdout }
    }

    /// Puts events `range` on the stream (partition key = SKU).
    async fn put(&self, range: std::ops::Range<usize>) {
        let producer = KinesisProducer::new(self.client.clone(), &self.stream);
        for chunk in self.events[range].chunks(500) {
            let recs: Vec<OutRecord<'_>> = chunk.iter().map(|(k, p)| OutRecord { key: k, payload: p }).collect();
            producer.put(&recs).await.unwrap();
        }
    }

    /// Waits until the stored outcome equals the straight pass (polling the store; `limit`
    /// bounds a hang, it is not the synchronisation).
    async fn wait_exact(&self, members: &mut [Member], limit: Duration) {
        let started = Instant::now();
        loop {
            assert_alive(members);
            let diff = support::stored_diff(&self.store, &self.expected).await;
            if diff.is_empty() {
                return;
            }
            assert!(
                started.elapsed() < limit,
                "state still differs from the straight pass after {limit:?}:\n{}",
                diff.join("\n")
            );
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// Stops members with SIGTERM and checks they exit cleanly; returns their stdout.
fn stop_all(members: &mut [Member]) -> Vec<String> {
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

/// Sums `key=N` over the members' `dynamodb-calls:` summary lines.
fn calls(outs: &[String], key: &str) -> u64 {
    outs.iter()
        .flat_map(|o| o.lines().filter(|l| l.starts_with("dynamodb-calls:")))
        .flat_map(|l| l.split_whitespace())
        .filter_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .map(|v| v.parse::<u64>().unwrap())
        .sum()
}

async fn three_members_share_four_shards(mode_config: &str, tag: &str) {
    let _serial = SERIAL.lock().await;
    let Some(g) = Group::new(tag, 4, 20_000, mode_config, &worker(1500)).await else { return };
    let started = Instant::now();
    let mut members: Vec<Member> = ["a", "b", "c"].iter().map(|n| g.spawn(n)).collect();
    g.put(0..g.events.len()).await;
    g.wait_exact(&mut members, Duration::from_secs(240)).await;
    // Every member ended up with work, and every shard with one owner.
    support::wait_until("every member to hold a lease", Duration::from_secs(30), || {
        members.iter().all(|m| !m.holding().is_empty())
    })
    .await;
    let leases = g.store.leases().await.unwrap();
    assert_eq!(leases.len(), 4);
    assert!(leases.iter().all(|l| l.owner.is_some() && l.checkpoint.is_some()), "{leases:?}");
    let elapsed = started.elapsed().as_secs_f64();
    let outs = stop_all(&mut members);
    g.wait_exact(&mut [], Duration::from_secs(5)).await;
    // Cost at steady state: heartbeats ≤ 1 per lease per failover/3 (10 s / 3 by default), and
    // commits ≤ 1 per shard per commit interval (1.5 s) plus one per lease taken.
    let renewals = calls(&outs, "renewals");
    let tx = calls(&outs, "transactions");
    let takes: usize = members.iter().map(|m| m.taken().len()).sum();
    let heartbeat_bound = 4.0 * (elapsed / (10.0 / 3.0) + 1.0);
    assert!((renewals as f64) <= heartbeat_bound, "{renewals} heartbeats in {elapsed:.0} s > {heartbeat_bound:.0}");
    let commits: usize =
        members.iter().map(|m| m.lines().iter().filter(|l| l.text.contains(" committed")).count()).sum();
    let commit_bound = 4.0 * (elapsed / 1.5 + 1.0) + takes as f64;
    assert!((commits as f64) <= commit_bound, "{commits} commits in {elapsed:.0} s > {commit_bound:.0}");
    eprintln!(
        "group cost ({tag}): {} events in {elapsed:.1} s; commits {commits}, transactions {tx}, reads {}, lease writes {}, \
         heartbeats {renewals}, lease scans {}, leases taken {takes}; per 1,000 events: {:.1} transactions, {:.1} lease writes",
        g.events.len(),
        calls(&outs, "reads"),
        calls(&outs, "lease_writes"),
        calls(&outs, "lease_scans"),
        tx as f64 * 1000.0 / g.events.len() as f64,
        calls(&outs, "lease_writes") as f64 * 1000.0 / g.events.len() as f64,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_share_four_shards_and_the_state_is_exact() {
    three_members_share_four_shards("", "grp").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enhanced_fan_out_members_share_four_shards_and_the_state_is_exact() {
    three_members_share_four_shards("mode = \"fan-out\"\nconsumer_name = \"sf-efo\"\n", "efo").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_member_shards_move_within_the_failover_time() {
    let _serial = SERIAL.lock().await;
    let failover = 3.0;
    let cfg =
        format!("{}[group]\nfailover_ms = {}\ntake_interval_ms = 500\n", worker(3000), (failover * 1000.0) as u64);
    let Some(g) = Group::new("kill", 4, 6_000, "", &cfg).await else { return };
    let mut members: Vec<Member> = ["a", "b", "c"].iter().map(|n| g.spawn(n)).collect();
    g.put(0..3_000).await;
    // Kill mid-stream once the group is settled (every member holds a lease, no move for 1.5 s),
    // so what is measured is failover, not a balancing steal already under way.
    support::wait_until("the group to spread the shards and settle", Duration::from_secs(60), || {
        let last_take = members.iter().flat_map(|m| m.taken()).map(|(_, at)| at).reduce(f64::max).unwrap_or(f64::MAX);
        members.iter().all(|m| !m.holding().is_empty()) && now_epoch() - last_take > 1.5
    })
    .await;
    let victim = members.iter().position(|m| m.lines().iter().any(|l| l.text.contains(" committed"))).unwrap_or(0);
    let victim_id = members[victim].worker_id();
    let orphaned: Vec<String> = g
        .store
        .leases()
        .await
        .unwrap()
        .into_iter()
        .filter(|l| l.owner.as_deref() == Some(victim_id.as_str()))
        .map(|l| l.key)
        .collect();
    assert!(!orphaned.is_empty(), "the victim holds a lease");
    members[victim].signal("-KILL");
    let killed_at = now_epoch();
    members[victim].wait();
    g.put(3_000..6_000).await;
    // Each orphaned shard is taken and restored by a survivor within failover + 2 s.
    let survivors: Vec<usize> = (0..members.len()).filter(|i| *i != victim).collect();
    let restored_at = |shard: &str| {
        survivors
            .iter()
            .flat_map(|i| members[*i].lines())
            .filter(|l| l.at > killed_at && l.text.contains("shard restored") && l.field("shard") == Some(shard))
            .map(|l| l.at)
            .reduce(f64::min)
    };
    support::wait_until("the orphaned shards to be restored elsewhere", Duration::from_secs(30), || {
        orphaned.iter().all(|s| restored_at(s).is_some())
    })
    .await;
    for s in &orphaned {
        let took = restored_at(s).unwrap() - killed_at;
        eprintln!("failover of {s}: consumed again {took:.2} s after kill -9 (failover {failover} s)");
        assert!(took <= failover + 2.0, "{s} moved after {took:.2} s");
    }
    let mut alive: Vec<Member> =
        members.into_iter().enumerate().filter(|(i, _)| *i != victim).map(|(_, m)| m).collect();
    g.wait_exact(&mut alive, Duration::from_secs(180)).await;
    stop_all(&mut alive);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_hands_the_lease_off_without_waiting_for_expiry() {
    let _serial = SERIAL.lock().await;
    // The default 10 s failover: a handoff within 2 s cannot come from expiry.
    let Some(g) = Group::new("term", 2, 1_000, "", &format!("{}[group]\ntake_interval_ms = 500\n", worker(1500))).await
    else {
        return;
    };
    let mut a = g.spawn("a");
    let mut b = g.spawn("b");
    g.put(0..1_000).await;
    g.wait_exact(&mut [], Duration::from_secs(120)).await;
    support::wait_until("both members to hold a lease", Duration::from_secs(30), || {
        !a.holding().is_empty() && !b.holding().is_empty()
    })
    .await;
    let moving = a.holding();
    a.signal("-TERM");
    let term_at = now_epoch();
    let (code, _) = a.wait();
    assert_eq!(code, Some(0));
    assert!(a.lines().iter().any(|l| l.text.contains("committed and released the lease")));
    let taken_at = |shard: &str| {
        b.taken().iter().filter(|(s, at)| s == shard && *at > term_at).map(|(_, at)| *at).reduce(f64::min)
    };
    support::wait_until("b to take a's leases", Duration::from_secs(8), || {
        moving.iter().all(|s| taken_at(s).is_some())
    })
    .await;
    for s in &moving {
        let took = taken_at(s).unwrap() - term_at;
        eprintln!("handoff of {s}: taken {took:.2} s after SIGTERM");
        assert!(took <= 2.0, "{s} handed off after {took:.2} s");
    }
    stop_all(std::slice::from_mut(&mut b));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_and_merge_while_events_flow_lose_and_double_nothing() {
    let _serial = SERIAL.lock().await;
    let Some(g) = Group::new(
        "rsh",
        4,
        6_000,
        "",
        &format!("{}[group]\nfailover_ms = 5000\ntake_interval_ms = 500\n", worker(1500)),
    )
    .await
    else {
        return;
    };
    let mut members: Vec<Member> = ["a", "b"].iter().map(|n| g.spawn(n)).collect();
    g.put(0..2_000).await;
    let shards = g.client.list_shards().stream_name(&g.stream).send().await.unwrap();
    let mut by_start: Vec<(u128, String)> = shards
        .shards()
        .iter()
        .map(|s| (s.hash_key_range().unwrap().starting_hash_key().parse().unwrap(), s.shard_id().to_string()))
        .collect();
    by_start.sort();
    let (first, second_last, last) = (by_start[0].clone(), by_start[2].1.clone(), by_start[3].1.clone());
    let split_at = (first.0 + by_start[1].0) / 2;
    g.client
        .split_shard()
        .stream_name(&g.stream)
        .shard_to_split(&first.1)
        .new_starting_hash_key(split_at.to_string())
        .send()
        .await
        .unwrap();
    wait_active(&g.client, &g.stream).await;
    g.put(2_000..4_000).await;
    g.client
        .merge_shards()
        .stream_name(&g.stream)
        .shard_to_merge(&second_last)
        .adjacent_shard_to_merge(&last)
        .send()
        .await
        .unwrap();
    wait_active(&g.client, &g.stream).await;
    g.put(4_000..6_000).await;
    g.wait_exact(&mut members, Duration::from_secs(240)).await;

    // The lease table knows the lineage, and no child started before its parents had ended.
    let leases = g.store.leases().await.unwrap();
    assert_eq!(leases.len(), 7, "4 shards + 2 split children + 1 merged: {leases:?}");
    let parents_of_children: Vec<&stockflow_state::lease::Lease> =
        leases.iter().filter(|l| !l.parents.is_empty()).collect();
    assert_eq!(parents_of_children.len(), 3);
    let lines: Vec<Line> = members.iter().flat_map(Member::lines).collect();
    let at = |what: &str, shard: &str| {
        lines.iter().filter(|l| l.text.contains(what) && l.field("shard") == Some(shard)).map(|l| l.at).reduce(f64::min)
    };
    for child in &parents_of_children {
        let started = at("took the lease", &child.key).expect("every child was taken");
        for p in &child.parents {
            let parent = leases.iter().find(|l| &l.key == p).unwrap();
            assert!(parent.ended, "parent {p} ended");
            assert!(parent.children.contains(&child.key), "parent {p} names child {}", child.key);
            let ended = at("shard read to its end and committed", p).expect("the parent's end is logged");
            assert!(ended < started, "child {} started at {started} before parent {p} ended at {ended}", child.key);
        }
    }
    stop_all(&mut members);
}

const DELIVERY_KEY: &[u8] = b"group-delivery-test-signing-key!";

/// Every delivery cursor's position (the `pos` attribute: `delivered` as a sortable string).
async fn cursor_positions(store: &DynamoStore) -> Vec<(String, String)> {
    let out = store.dynamodb().scan().table_name(&store.tables().delivery).consistent_read(true).send().await.unwrap();
    out.items()
        .iter()
        .filter_map(|i| {
            let key = format!("{}/{}", i["connector"].as_s().ok()?, i["key"].as_s().ok()?);
            Some((key, i.get("pos")?.as_s().ok()?.clone()))
        })
        .collect()
}

/// Three members deliver to the local receivers (accounting in `shape`, the manufacturer, the
/// signed alert webhook) under 20 % injected faults of every kind, while one member is killed
/// with SIGKILL mid-delivery, a lease is stolen from another mid-delivery (a thief that never
/// renews: the group takes it back after the failover), and a shard is split with effects in
/// flight. Every effect must be accepted exactly once under one key, in per-SKU order across the
/// split, with journal totals equal to the straight pass, no cursor moving back, no dead letter,
/// and the manufacturer holding the final stock levels.
async fn delivery_is_exactly_once_through_kill_steal_and_split(shape: &'static str, tag: &str) {
    use stockflow_connectors::testing::{FaultPlan, Receivers, Routes, check_deliveries};
    let _serial = SERIAL.lock().await;
    let (_stop, stop_rx) = tokio::sync::watch::channel(false);
    let receivers = Receivers::new(FaultPlan::chaos(20, Duration::from_millis(500), 17), Some(DELIVERY_KEY.to_vec()));
    let (base, _) = receivers.start(stop_rx).await.unwrap();
    // Retention at "0s": delivered outbox items are set to expire while delivery goes on, and
    // delivery must stay exactly once.
    let rest = format!(
        "{}[group]\nfailover_ms = 3000\ntake_interval_ms = 500\n\
         [retention]\ndelivered = \"0s\"\nsweep_every = \"300ms\"\n{}",
        worker(700),
        support::connectors_config(&base, shape, DELIVERY_KEY, 50)
    );
    let engine = EngineConfig { default_reorder_point: 3, ..EngineConfig::default() };
    let rest = format!("[engine]\ndefault_reorder_point = 3\n{rest}");
    let Some(g) = Group::with_engine(tag, 3, 3_000, "", &rest, engine).await else { return };
    let routes = Routes { alerts: true, reorders: true, accounting: Some(shape) };
    // Watch every cursor: none may ever move back.
    let regressions = Arc::new(Mutex::new(Vec::<String>::new()));
    let watcher = {
        let (store, regressions) = (g.store.clone(), Arc::clone(&regressions));
        tokio::spawn(async move {
            let mut last: std::collections::HashMap<String, String> = Default::default();
            loop {
                for (key, pos) in cursor_positions(&store).await {
                    if let Some(prev) = last.get(&key)
                        && *prev > pos
                    {
                        regressions.lock().unwrap().push(format!("{key}: {prev} -> {pos}"));
                    }
                    last.insert(key, pos);
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };
    let mut members: Vec<Member> = ["a", "b", "c"].iter().map(|n| g.spawn(n)).collect();
    let accepted = receivers.accepted();
    g.put(0..1_000).await;
    let wait_accepted = |n: u64| {
        let mut accepted = accepted.clone();
        async move {
            let reached = tokio::time::timeout(Duration::from_secs(120), accepted.wait_for(|a| *a >= n)).await;
            assert!(reached.is_ok(), "the receivers accepted {n} effects");
        }
    };
    wait_accepted(60).await;
    support::wait_until("every member to hold a lease", Duration::from_secs(30), || {
        members.iter().all(|m| !m.holding().is_empty())
    })
    .await;

    // 1. kill -9 of a member while effects are being delivered.
    let victim = 0;
    members[victim].signal("-KILL");
    members[victim].wait();
    let mut alive: Vec<Member> = members.drain(1..).collect();
    g.put(1_000..2_000).await;
    let now = *accepted.borrow();
    wait_accepted(now + 40).await;

    // 2. A forced steal while delivering: a lease of a live member moves to a thief that never
    // renews; the member's lanes and worker are fenced at once, and after the failover the
    // group takes the shard back and resumes its in-flight requests. (Not a lease the killed
    // member still holds until failover: stealing that one fences nobody.)
    let live_ids: Vec<String> = alive.iter().map(Member::worker_id).collect();
    let started = Instant::now();
    let stolen = loop {
        let leases = g.store.leases().await.unwrap();
        if let Some(l) = leases.into_iter().find(|l| !l.ended && l.owner.as_ref().is_some_and(|o| live_ids.contains(o)))
        {
            break l;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "no live member holds a lease");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    g.store.take_lease(&stolen.key, "thief").await.unwrap();

    // 3. Split a shard while effects are in flight, and send the rest.
    let shards = g.client.list_shards().stream_name(&g.stream).send().await.unwrap();
    let open: Vec<_> = shards
        .shards()
        .iter()
        .filter(|s| s.sequence_number_range().and_then(|r| r.ending_sequence_number()).is_none())
        .collect();
    let target = open[0];
    let range = target.hash_key_range().unwrap();
    let (lo, hi): (u128, u128) = (range.starting_hash_key().parse().unwrap(), range.ending_hash_key().parse().unwrap());
    g.client
        .split_shard()
        .stream_name(&g.stream)
        .shard_to_split(target.shard_id())
        .new_starting_hash_key((lo + (hi - lo) / 2).to_string())
        .send()
        .await
        .unwrap();
    wait_active(&g.client, &g.stream).await;
    g.put(2_000..3_000).await;

    g.wait_exact(&mut alive, Duration::from_secs(300)).await;
    // Wait (on the receivers, polling) until everything expected was accepted.
    let started = Instant::now();
    loop {
        assert_alive(&mut alive);
        let problems = check_deliveries(&receivers.log(), &g.effects, routes, 20);
        if problems.is_empty() {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(420), "delivery incomplete:\n{}", problems.join("\n"));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The stock-level sync settles on the final state (each SKU sent by its shard's owner).
    let levels: std::collections::BTreeMap<String, (i64, i64)> =
        g.expected.skus.iter().map(|s| (s.sku.clone(), (s.on_hand, s.reserved))).collect();
    support::wait_until("the manufacturer to hold the final stock levels", Duration::from_secs(60), || {
        receivers.log().stock_levels == levels
    })
    .await;
    let outs = stop_all(&mut alive);
    watcher.abort();
    let log = receivers.log();
    assert!(
        log.faults > 30 && log.replays > 0,
        "faults injected ({}) and re-sends answered by key ({})",
        log.faults,
        log.replays
    );
    let journals = g.effects.iter().filter(|e| matches!(e, stockflow_state::Effect::Journal(_))).count();
    assert!(journals > 100 && log.order[shape].len() == journals, "{} of {journals} journals", log.order[shape].len());
    assert_eq!(regressions.lock().unwrap().clone(), Vec::<String>::new(), "a delivery cursor moved back");
    let leases = g.store.leases().await.unwrap();
    assert!(leases.iter().any(|l| l.ended && l.children.len() == 2), "the split happened: {leases:?}");
    // The members' sweeps marked delivered outbox items for DynamoDB's TTL.
    let endpoint = std::env::var("DYNAMODB_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:5001".into());
    let raw = stockflow_state::dynamodb::DynamoStore::emulator_client(&endpoint).await;
    let marked = raw
        .scan()
        .table_name(&g.store.tables().outbox)
        .filter_expression("attribute_exists(expires_at)")
        .send()
        .await
        .unwrap()
        .count();
    assert!(marked > 0, "retention set delivered outbox items to expire");
    let lost: usize = alive.iter().map(|m| m.lines().iter().filter(|l| l.text.contains("lease lost")).count()).sum();
    assert!(lost >= 1, "the steal fenced its victim");
    let dead = stockflow_connectors_dead_letters(&g);
    assert_eq!(dead, "", "no connector dead letters");
    let delivery_writes = calls(&outs, "delivery_writes");
    let requests: u64 = log.requests;
    eprintln!(
        "delivery ({shape}): {} events, {} effects; {} requests to the receivers ({} faults, {} replays); \
         delivery writes {delivery_writes} ({:.1} per 1,000 events), transactions {}, reads {}",
        g.events.len(),
        g.effects.len(),
        requests,
        log.faults,
        log.replays,
        delivery_writes as f64 * 1000.0 / g.events.len() as f64,
        calls(&outs, "transactions"),
        calls(&outs, "reads"),
    );
}

/// `stockflow outbox dead-letters --dynamodb` over the group's tables.
fn stockflow_connectors_dead_letters(g: &Group) -> String {
    let out = support::emulator_env(
        Command::new(env!("CARGO_BIN_EXE_stockflow"))
            .args(["outbox", "dead-letters", "--dynamodb"])
            .args(["--table-prefix", g.store.tables().leases.trim_end_matches("-leases")]),
    )
    .output()
    .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quickbooks_delivery_is_exactly_once_through_kill_steal_and_split() {
    delivery_is_exactly_once_through_kill_steal_and_split("quickbooks", "dqb").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xero_delivery_is_exactly_once_through_kill_steal_and_split() {
    delivery_is_exactly_once_through_kill_steal_and_split("xero", "dxr").await;
}
