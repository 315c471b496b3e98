//! The templates deployed: `deploy/cloudformation`'s state-tables, stream and consumers stacks
//! created on moto's CloudFormation, then `stockflow setup --validate` and a consumer-group member
//! run against what they made — the state equal to the straight pass over the events put on the
//! stack's stream, the member's Embedded Metric Format lines counting every record.
//!
//! moto skips resource types it does not support (and still says CREATE_COMPLETE); the test lists
//! what it skipped and fails if anything the runtime needs is among them. It does not create the
//! ingest and alarms stacks: moto cannot (WAFv2 and KMS key tags), see docs/deploy.md.

mod support;

use std::collections::BTreeSet;
use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use stockflow::loadtest::generate::{GenConfig, generate};
use stockflow::loadtest::ndjson::partition_key;
use stockflow_pipeline::kinesis::KinesisProducer;
use stockflow_pipeline::{OutRecord, StreamProducer};
use stockflow_state::dynamodb::DynamoStore;
use stockflow_state::reference::{Outcome, straight_pass_full};
use stockflow_state::{EngineConfig, StateStore};

/// The Python of the emulators' venv (scripts/services.sh installs moto[server] with boto3 there).
fn emulator_python() -> String {
    std::env::var("STOCKFLOW_EMU_PYTHON").unwrap_or_else(|_| {
        let emu = std::env::var("EMU_DIR").unwrap_or_else(|_| {
            let cache = std::env::var("XDG_CACHE_HOME")
                .unwrap_or_else(|_| format!("{}/.cache", std::env::var("HOME").unwrap()));
            format!("{cache}/stockflow-emu")
        });
        format!("{emu}/venv/bin/python")
    })
}

fn template_types(name: &str) -> BTreeSet<String> {
    let path = format!("{}/deploy/cloudformation/{name}.json", env!("CARGO_MANIFEST_DIR"));
    let tpl: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    tpl["Resources"].as_object().unwrap().values().map(|r| r["Type"].as_str().unwrap().to_string()).collect()
}

fn stockflow(endpoint: &str, args: &[&str], extra_env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_stockflow"));
    cmd.args(args)
        .env("DYNAMODB_ENDPOINT", endpoint)
        .env("KINESIS_ENDPOINT", endpoint)
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_REGION", "us-east-1")
        .env_remove("STOCKFLOW_CONFIG");
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stacks_on_moto_run_setup_validate_and_a_consumer() {
    let endpoint = std::env::var("DYNAMODB_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:5001".into());
    let python = emulator_python();
    if !std::path::Path::new(&python).exists() {
        assert!(
            std::env::var("CI").map_or(true, |v| v != "true"),
            "{python} is required under CI (scripts/services.sh install)"
        );
        eprintln!("skipping: no {python}; run scripts/services.sh install");
        return;
    }
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let prefix = format!("cfn{:x}", nanos % (1 << 40));
    let stacks = ["state-tables", "stream", "consumers"];
    let out = Command::new(&python)
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/cfn_on_moto.py"))
        .args([&endpoint, concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/cloudformation"), &prefix, &stacks.join(",")])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let made: Value = serde_json::from_slice(&out.stdout).unwrap();
    // What moto 5.2.5 skips silently: none of it is something the runtime reads or writes.
    let moto_skips: BTreeSet<&str> = [
        "AWS::SecretsManager::Secret",
        "AWS::ApplicationAutoScaling::ScalableTarget",
        "AWS::ApplicationAutoScaling::ScalingPolicy",
        "AWS::CloudWatch::Alarm",
        "AWS::Scheduler::Schedule",
        "AWS::Kinesis::StreamConsumer",  // conditional: fan-out only
        "AWS::EC2::SecurityGroupEgress", // conditional: Kafka only (KafkaBootstrap set)
    ]
    .into();
    for name in stacks {
        let stack = &made[name];
        assert_eq!(stack["status"], "CREATE_COMPLETE", "{name}: {stack}");
        let created: BTreeSet<String> =
            stack["types"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_string()).collect();
        let skipped: Vec<String> = template_types(name).difference(&created).cloned().collect();
        for t in &skipped {
            assert!(moto_skips.contains(t.as_str()), "{name}: moto did not create {t}");
        }
        eprintln!("{name}: created {created:?}; skipped by moto: {skipped:?}");
    }
    let stream = format!("{prefix}-events");

    // moto's CloudFormation ignores TimeToLiveSpecification: the validation says so, `setup`
    // repairs it, and the validation then passes.
    let out = stockflow(&endpoint, &["setup", "--validate", "--table-prefix", &prefix, "--stream", &stream], &[])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "{text}{}", String::from_utf8_lossy(&out.stderr));
    let invalid: Vec<&str> = text.lines().filter(|l| l.starts_with("INVALID")).collect();
    assert_eq!(invalid.len(), 2, "{text}");
    assert!(invalid.iter().all(|l| l.contains("TTL")) && text.contains(&format!("INVALID  {prefix}-dedup")), "{text}");
    assert!(text.contains(&format!("valid    stream {stream} (ACTIVE, 2 open shards)")), "{text}");
    let out = stockflow(&endpoint, &["setup", "--table-prefix", &prefix], &[]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = stockflow(&endpoint, &["setup", "--validate", "--table-prefix", &prefix, "--stream", &stream], &[])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}");
    assert_eq!(text.lines().filter(|l| l.starts_with("valid")).count(), 8, "{text}");

    // A member on the stack's stream and tables, configured as the task definition configures it
    // (EMF lines on), reads what is put and commits the straight pass.
    let mut member = stockflow(
        &endpoint,
        &["consume", "--stream", &stream, "--table-prefix", &prefix],
        &[
            ("STOCKFLOW__CLOUDWATCH__EMF_INTERVAL_S", "3600"),
            ("STOCKFLOW__KINESIS__IDLE_POLL_MS", "200"),
            ("STOCKFLOW_LOG", "warn"),
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit())
    .spawn()
    .unwrap();
    let events: Vec<(String, Vec<u8>)> =
        generate(&GenConfig { events: 400, skus: 40, seed: 5, ..GenConfig::default() })
            .iter()
            .map(|(_, p)| {
                let key = partition_key(p);
                (if key.is_empty() { "no-sku".to_string() } else { key.into_owned() }, p.to_vec())
            })
            .collect();
    let (expected, _) = straight_pass_full(Arc::new(EngineConfig::default()), events.iter().map(|(_, p)| p.as_slice()));
    let client = stockflow_pipeline::kinesis::client(Some(&endpoint), true).await;
    let producer = KinesisProducer::new(client, &stream);
    for chunk in events.chunks(200) {
        let recs: Vec<OutRecord<'_>> = chunk.iter().map(|(k, p)| OutRecord { key: k, payload: p }).collect();
        producer.put(&recs).await.unwrap();
    }
    let store = DynamoStore::new(DynamoStore::emulator_client(&endpoint).await, &prefix);
    let started = Instant::now();
    loop {
        if let Some(status) = member.try_wait().unwrap() {
            panic!("the member exited: {status}");
        }
        let now = Outcome::from_parts(&store.sku_states().await.unwrap(), Vec::new(), 0);
        if now.skus == expected.skus {
            break;
        }
        // The deadline bounds a hang; the poll of the store is the synchronisation.
        let partial = Outcome { skus: expected.skus.clone(), ..Outcome::default() };
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "state differs after 120 s:\n{}",
            partial.diff(&now, 5).join("\n")
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let full = Outcome::of_store(&store).await.unwrap();
    assert!(expected.diff(&full, 10).is_empty(), "{}", expected.diff(&full, 10).join("\n"));
    // SIGTERM: the member hands off and prints its last EMF line, which counts every record.
    assert!(Command::new("kill").args(["-TERM", &member.id().to_string()]).status().unwrap().success());
    let status = member.wait().unwrap();
    let mut stdout = String::new();
    member.stdout.take().unwrap().read_to_string(&mut stdout).unwrap();
    assert!(status.success(), "{status}\n{stdout}");
    let lines: Vec<Value> =
        stdout.lines().filter(|l| l.starts_with('{')).map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(!lines.is_empty(), "no EMF line:\n{stdout}");
    let committed: u64 = lines.iter().map(|l| l["RecordsCommitted"].as_u64().unwrap()).sum();
    assert_eq!(committed, events.len() as u64, "{stdout}");
    assert!(lines.iter().all(
        |l| l["ConsumerGroup"] == stream.as_str() && l["_aws"]["CloudWatchMetrics"][0]["Namespace"] == "stockflow"
    ));
}
