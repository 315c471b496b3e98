//! Crash safety of the embedded pipeline: the consumer is killed with SIGKILL at several points
//! of a replay, restarted, and the final state, alerts and dead letters must equal the straight
//! pass exactly (SPEC §4).

use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;

use stockflow::loadtest::generate::{GenConfig, generate};
use stockflow_state::EngineConfig;
use stockflow_state::embedded::RedbStore;
use stockflow_state::reference::{Outcome, straight_pass};

const CONFIG: &str = "shards = 3\n[worker]\ncommit_every_records = 400\ncommit_interval_ms = 50\nbatch_records = 200\n";

fn stockflow(dir: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_stockflow"));
    cmd.args([
        "--config",
        dir.join("stockflow.toml").to_str().unwrap(),
        "--data-dir",
        dir.join("data").to_str().unwrap(),
    ])
    .args(args)
    .env("STOCKFLOW_LOG", "warn,stockflow_pipeline::worker=debug")
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    cmd
}

/// Runs the command and kills it with SIGKILL once it has logged `commits` commits.
/// Returns true when the kill interrupted it (false if it had already finished).
fn kill_after_commits(mut cmd: Command, commits: usize) -> bool {
    let mut child = cmd.spawn().unwrap();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let mut seen = 0;
    for line in stderr.lines() {
        let line = line.unwrap();
        if line.contains("committed") {
            seen += 1;
            if seen == commits {
                child.kill().unwrap(); // SIGKILL
                break;
            }
        }
    }
    let status = child.wait().unwrap();
    status.signal() == Some(9)
}

#[test]
fn kill_9_at_several_points_loses_and_double_counts_nothing() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("stockflow.toml"), CONFIG).unwrap();
    let stream = generate(&GenConfig { events: 120_000, skus: 400, seed: 7, ..GenConfig::default() });
    let events = dir.path().join("events.ndjson");
    stream.write_ndjson(std::fs::File::create(&events).unwrap()).unwrap();
    let events_arg = events.to_str().unwrap();

    // The replay appends every record durably, then consumes; kill it mid-consumption.
    let mut interrupted = 0;
    interrupted += usize::from(kill_after_commits(stockflow(dir.path(), &["replay", "--file", events_arg]), 5));
    // Restart the consumer and kill it again, at other points.
    for commits in [1, 17, 40] {
        interrupted += usize::from(kill_after_commits(stockflow(dir.path(), &["consume", "--drain"]), commits));
    }
    eprintln!("{interrupted} of 4 runs were killed mid-run");
    assert!(interrupted >= 2, "only {interrupted} kills landed mid-run; the test needs a longer stream");

    // Finish the stream.
    let out = stockflow(dir.path(), &["consume", "--drain"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // The CLI's verdict...
    let verify = stockflow(dir.path(), &["verify", "--events", events_arg]).stdout(Stdio::piped()).output().unwrap();
    assert!(verify.status.success(), "verify failed: {}", String::from_utf8_lossy(&verify.stdout));

    // ...and our own comparison, including every alert and dead letter.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let store = RedbStore::open(dir.path().join("data").join("state.redb")).unwrap();
    let actual = rt.block_on(Outcome::of_store(&store)).unwrap();
    let expected = straight_pass(Arc::new(EngineConfig::default()), stream.iter().map(|(_, p)| p));
    assert_eq!(expected.diff(&actual, 20), Vec::<String>::new());
    assert!(!actual.alerts.is_empty() && actual.dead_letters > 0);
}
