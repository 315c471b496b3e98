//! The infrastructure as code declares what the code expects.
//!
//! One file of ~890 lines: a dozen tests over the same templates and the same CLI share their
//! loaders; each test names the resource it checks.

use std::collections::BTreeSet;

use clap::{CommandFactory, Parser};

use serde_json::Value;
use stockflow_state::dynamodb::schema::TABLE_KEYS;

#[test]
fn cloudformation_tables_match_the_store_schema() {
    let tpl = template("state-tables");
    let resources = tpl["Resources"].as_object().unwrap();
    for keys in TABLE_KEYS {
        let name = format!("${{TablePrefix}}-{}", keys.suffix);
        let (_, table) = resources
            .iter()
            .find(|(_, r)| r["Properties"]["TableName"]["Fn::Sub"] == name.as_str())
            .unwrap_or_else(|| panic!("no table {name} in the template"));
        assert_eq!(table["Type"], "AWS::DynamoDB::Table");
        let p = &table["Properties"];
        assert_eq!(p["BillingMode"], "PAY_PER_REQUEST");
        let mut want = vec![(keys.hash.0, "HASH", keys.hash.1)];
        want.extend(keys.range.map(|(n, t)| (n, "RANGE", t)));
        let schema = p["KeySchema"].as_array().unwrap();
        assert_eq!(schema.len(), want.len(), "{name}");
        for ((attr, kind, ty), k) in want.iter().zip(schema) {
            assert_eq!((k["AttributeName"].as_str(), k["KeyType"].as_str()), (Some(*attr), Some(*kind)), "{name}");
            let def =
                p["AttributeDefinitions"].as_array().unwrap().iter().find(|d| d["AttributeName"] == *attr).unwrap();
            assert_eq!(def["AttributeType"], *ty, "{name}.{attr}");
        }
        if keys.suffix == "dedup" {
            assert_eq!(p["TimeToLiveSpecification"]["AttributeName"], "expires_at");
        }
        // Restores list a shard's SKUs from `-shard-skus`, read consistently: no index to pay for.
        assert!(p.get("GlobalSecondaryIndexes").is_none(), "{name}");
    }
}

#[test]
fn cloudformation_ingest_wires_the_lambda_to_its_three_triggers() {
    let tpl = template("ingest");
    let r = &tpl["Resources"];
    let f = &r["IngestFunction"]["Properties"];
    assert_eq!((f["Runtime"].as_str(), f["Architectures"][0].as_str()), (Some("provided.al2023"), Some("arm64")));
    assert!(f["Timeout"].as_i64().unwrap() < 29, "under API Gateway's 29 s integration timeout");
    assert_eq!(f["TracingConfig"]["Mode"], "Active");
    assert_eq!(f["LoggingConfig"]["LogFormat"], "JSON");
    assert_eq!(f["Environment"]["Variables"]["STOCKFLOW_STREAM"]["Fn::Sub"], "${Prefix}-events");
    let mapping = &r["NotificationsMapping"]["Properties"];
    assert_eq!(mapping["FunctionResponseTypes"][0], "ReportBatchItemFailures");
    let queue = &r["NotificationsQueue"]["Properties"];
    assert!(queue["RedrivePolicy"]["maxReceiveCount"].as_i64().unwrap() >= 1);
    assert!(
        queue["VisibilityTimeout"].as_i64().unwrap() >= 6 * f["Timeout"].as_i64().unwrap(),
        "AWS: ≥ 6 × function timeout"
    );
    assert_eq!(r["ListingsRule"]["Properties"]["Targets"][0]["Arn"]["Fn::GetAtt"][0], "IngestFunction");
    assert_eq!(r["IngestApi"]["Type"], "AWS::ApiGateway::RestApi", "a REST API, so WAF can attach");
    let stage = &r["IngestStage"]["Properties"];
    assert_eq!(stage["TracingEnabled"], true);
    assert!(stage["AccessLogSetting"]["DestinationArn"]["Fn::GetAtt"][0].is_string());
}

#[test]
fn the_connector_contract_documents_every_route_the_connectors_call() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/connectors.openapi.json")).unwrap();
    let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(doc["openapi"], "3.0.3");
    let paths = doc["paths"].as_object().unwrap();
    for (path, method) in [
        ("/v1/catalog/{sku}", "get"),
        ("/v1/reorders", "post"),
        ("/v1/stock-levels", "post"),
        ("/v1/journals", "post"),
        ("/v1/balances", "get"),
        ("/alerts", "post"),
    ] {
        assert!(paths.get(path).and_then(|p| p.get(method)).is_some(), "{method} {path} is documented");
    }
    // Every $ref resolves.
    let mut refs = Vec::new();
    fn walk(v: &serde_json::Value, refs: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                if let Some(r) = m.get("$ref").and_then(|r| r.as_str()) {
                    refs.push(r.to_string());
                }
                m.values().for_each(|v| walk(v, refs));
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, refs)),
            _ => {}
        }
    }
    walk(&doc, &mut refs);
    assert!(refs.len() > 10);
    for r in refs {
        let pointer = r.strip_prefix('#').unwrap();
        assert!(doc.pointer(pointer).is_some(), "{r} resolves");
    }
}

// ---------------------------------------------------------------------------------------------
// The whole deployment (deploy/cloudformation/*.json): wiring, IAM, alarms, image.

const TEMPLATES: [&str; 6] = ["state-tables", "stream", "ingest", "consumers", "alarms", "msk"];

fn template(name: &str) -> Value {
    let path = format!("{}/deploy/cloudformation/{name}.json", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(format!("{}/{rel}", env!("CARGO_MANIFEST_DIR"))).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Both branches of every `Fn::If` (a value that may be deployed either way).
fn branches(v: &Value) -> Vec<&Value> {
    match v.get("Fn::If") {
        Some(Value::Array(a)) if a.len() == 3 => branches(&a[1]).into_iter().chain(branches(&a[2])).collect(),
        _ => vec![v],
    }
}

/// `v` with every `Fn::If` replaced by its `truth` branch, and `AWS::NoValue` items dropped.
fn choose(v: &Value, truth: bool) -> Value {
    match v {
        Value::Object(m) => match m.get("Fn::If") {
            Some(Value::Array(a)) if a.len() == 3 => choose(&a[if truth { 1 } else { 2 }], truth),
            _ => Value::Object(m.iter().map(|(k, x)| (k.clone(), choose(x, truth))).collect()),
        },
        Value::Array(a) => Value::Array(
            a.iter().map(|x| choose(x, truth)).filter(|x| x.get("Ref").is_none_or(|r| r != "AWS::NoValue")).collect(),
        ),
        other => other.clone(),
    }
}

fn walk<'a>(v: &'a Value, f: &mut impl FnMut(&'a serde_json::Map<String, Value>)) {
    match v {
        Value::Object(m) => {
            f(m);
            m.values().for_each(|x| walk(x, f));
        }
        Value::Array(a) => a.iter().for_each(|x| walk(x, f)),
        _ => {}
    }
}

#[test]
fn every_reference_names_something_the_template_declares() {
    for name in TEMPLATES {
        let tpl = template(name);
        let mut names: Vec<String> = tpl["Resources"].as_object().unwrap().keys().cloned().collect();
        names.extend(tpl["Parameters"].as_object().unwrap().keys().cloned());
        let known = |t: &str| t.starts_with("AWS::") || names.iter().any(|n| n == t);
        let conditions: Vec<&String> =
            tpl.get("Conditions").and_then(Value::as_object).map(|c| c.keys().collect()).unwrap_or_default();
        let mut checked = 0;
        walk(&tpl, &mut |m| {
            if let Some(Value::String(t)) = m.get("Ref") {
                assert!(known(t), "{name}: Ref {t}");
                checked += 1;
            }
            if let Some(t) = m.get("Fn::GetAtt").and_then(|a| a[0].as_str()) {
                assert!(known(t), "{name}: GetAtt {t}");
                checked += 1;
            }
            if let Some(Value::String(s)) = m.get("Fn::Sub") {
                for var in s.split("${").skip(1).map(|r| r.split('}').next().unwrap()) {
                    let head = var.split('.').next().unwrap();
                    assert!(known(head), "{name}: ${{{var}}} in {s:?}");
                    checked += 1;
                }
            }
            if let Some(Value::Array(a)) = m.get("Fn::If") {
                assert!(conditions.iter().any(|c| Some(c.as_str()) == a[0].as_str()), "{name}: condition {}", a[0]);
            }
        });
        assert!(checked > 0, "{name}");
        for (id, r) in tpl["Resources"].as_object().unwrap() {
            if let Some(c) = r.get("Condition").and_then(Value::as_str) {
                assert!(conditions.iter().any(|k| k.as_str() == c), "{name}.{id}: condition {c}");
            }
            for d in r.get("DependsOn").and_then(Value::as_array).into_iter().flatten() {
                assert!(known(d.as_str().unwrap()), "{name}.{id}: DependsOn {d}");
            }
        }
    }
}

#[test]
fn stateful_resources_survive_a_stack_deletion_or_replacement() {
    const STATEFUL: [&str; 7] = [
        "AWS::MSK::ServerlessCluster",
        "AWS::DynamoDB::Table",
        "AWS::Kinesis::Stream",
        "AWS::SecretsManager::Secret",
        "AWS::SQS::Queue",
        "AWS::Logs::LogGroup",
        "AWS::KMS::Key",
    ];
    let mut seen = 0;
    for name in TEMPLATES {
        for (id, r) in template(name)["Resources"].as_object().unwrap() {
            if !STATEFUL.contains(&r["Type"].as_str().unwrap()) {
                continue;
            }
            seen += 1;
            assert_eq!(
                (r["DeletionPolicy"].as_str(), r["UpdateReplacePolicy"].as_str()),
                (Some("Retain"), Some("Retain")),
                "{name}.{id}"
            );
            if r["Type"] == "AWS::DynamoDB::Table" {
                let p = &r["Properties"];
                assert_eq!(p["DeletionProtectionEnabled"], true, "{id}");
                assert_eq!(p["PointInTimeRecoverySpecification"]["PointInTimeRecoveryEnabled"], true, "{id}");
                assert_eq!(p["SSESpecification"]["SSEEnabled"], true, "{id}");
            }
        }
    }
    assert!(seen >= 20, "{seen}");
}

/// A suppressed scanner finding says why, next to the resource.
#[test]
fn every_suppressed_finding_carries_its_reason() {
    let mut n = 0;
    for name in TEMPLATES {
        for (id, r) in template(name)["Resources"].as_object().unwrap() {
            for skip in r["Metadata"]["checkov"]["skip"].as_array().into_iter().flatten() {
                n += 1;
                assert!(skip["id"].as_str().is_some_and(|i| i.starts_with("CKV")), "{name}.{id}");
                assert!(skip["comment"].as_str().is_some_and(|c| c.len() > 40), "{name}.{id}: {skip}");
            }
        }
    }
    assert!(n > 0);
}

#[test]
fn the_waf_guards_the_stage_without_blocking_real_batches() {
    let tpl = template("ingest");
    let r = &tpl["Resources"];
    let assoc = &r["IngestWebAclAssociation"];
    assert!(
        assoc["DependsOn"].as_array().unwrap().iter().any(|d| d == "IngestStage"),
        "else: the stage does not exist yet"
    );
    let stage = r["IngestStage"]["Properties"]["StageName"].as_str().unwrap();
    assert!(assoc["Properties"]["ResourceArn"]["Fn::Sub"].as_str().unwrap().ends_with(&format!("/stages/{stage}")));
    assert_eq!(assoc["Properties"]["WebACLArn"]["Fn::GetAtt"][0], "IngestWebAcl");
    let acl = &r["IngestWebAcl"]["Properties"];
    assert_eq!(acl["Scope"], "REGIONAL");
    let rules = acl["Rules"].as_array().unwrap();
    let rate = rules.iter().find_map(|x| x["Statement"].get("RateBasedStatement")).expect("a rate-based rule");
    assert_eq!(rate["AggregateKeyType"], "IP");
    let groups: Vec<&Value> = rules.iter().filter_map(|x| x["Statement"].get("ManagedRuleGroupStatement")).collect();
    let names: Vec<&str> = groups.iter().map(|g| g["Name"].as_str().unwrap()).collect();
    assert!(
        names.contains(&"AWSManagedRulesCommonRuleSet") && names.contains(&"AWSManagedRulesKnownBadInputsRuleSet"),
        "{names:?}"
    );
    // The common rule set blocks bodies over 8 KB; a real batch is larger (measured below).
    let common = groups.iter().find(|g| g["Name"] == "AWSManagedRulesCommonRuleSet").unwrap();
    let overrides = common["RuleActionOverrides"].as_array().unwrap();
    assert!(overrides.iter().any(|o| o["Name"] == "SizeRestrictions_BODY" && o["ActionToUse"].get("Count").is_some()));
    // A 500-event NDJSON batch as `ingest load --batch 500` sends it.
    let stream = stockflow::loadtest::generate::generate(&stockflow::loadtest::generate::GenConfig {
        events: 600,
        skus: 100,
        ..stockflow::loadtest::generate::GenConfig::default()
    });
    let batch: usize = stream.iter().skip(100).take(500).map(|(_, line)| line.len() + 1).sum();
    assert!(batch > 8 * 1024, "a 500-event batch is {batch} bytes: the override matters");
    // Only the ingest routes and /healthz are public: no /metrics.
    let mut paths = Vec::new();
    for (_, res) in r.as_object().unwrap().iter().filter(|(_, x)| x["Type"] == "AWS::ApiGateway::Resource") {
        paths.push(res["Properties"]["PathPart"].as_str().unwrap().to_string());
    }
    assert!(!paths.iter().any(|p| p.contains("metrics") || p.contains("proxy")), "{paths:?}");
    let methods: Vec<&str> = r
        .as_object()
        .unwrap()
        .values()
        .filter(|x| x["Type"] == "AWS::ApiGateway::Method")
        .map(|m| m["Properties"]["HttpMethod"].as_str().unwrap())
        .collect();
    assert_eq!(methods.iter().filter(|m| **m == "POST").count(), 3, "{methods:?}");
    assert_eq!(methods.iter().filter(|m| **m == "GET").count(), 1, "{methods:?}");
}

/// The operations of an AWS SDK crate, as IAM actions: read from the crate's own
/// `src/operation/` (one module per API operation), located through `cargo metadata`.
fn sdk_operations(krate: &str, prefix: &str) -> Vec<(String, String)> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    // Only the host's packages: the lock file also names Windows-only crates that
    // were never downloaded, and `--offline` would stop at them.
    let host = std::process::Command::new(std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into()))
        .arg("-vV")
        .output()
        .unwrap();
    let host = String::from_utf8(host.stdout).unwrap();
    let host = host.lines().find_map(|l| l.strip_prefix("host: ")).unwrap().to_string();
    let out = std::process::Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--offline", "--filter-platform", &host, "--manifest-path"])
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let meta: Value = serde_json::from_slice(&out.stdout).unwrap();
    let manifest = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == krate)
        .unwrap_or_else(|| panic!("{krate} is not a dependency"))["manifest_path"]
        .as_str()
        .unwrap()
        .to_string();
    let dir = std::path::Path::new(&manifest).parent().unwrap().join("src/operation");
    let mut ops: Vec<(String, String)> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| {
            let e = e.unwrap();
            e.file_type().unwrap().is_dir().then(|| e.file_name().to_string_lossy().into_owned())
        })
        .map(|snake| {
            let pascal: String = snake.split('_').map(|w| w[..1].to_ascii_uppercase() + &w[1..]).collect();
            (snake, format!("{prefix}:{pascal}"))
        })
        .collect();
    assert!(ops.len() > 10, "{dir:?}");
    ops.sort();
    ops
}

/// The text of `fn name` in `src` (from its signature to the closing brace at column 0 or 4).
fn function(src: &str, name: &str) -> String {
    let start = src.find(&format!("fn {name}(")).unwrap_or_else(|| panic!("no fn {name}"));
    let end = src[start..].find("\n}\n").or_else(|| src[start..].find("\n    }\n")).unwrap();
    src[start..start + end].to_string()
}

/// The text of the method `name` of an `impl` block (up to its closing brace at four spaces).
fn method(src: &str, name: &str) -> String {
    let start = src.find(&format!("fn {name}(")).unwrap_or_else(|| panic!("no fn {name}"));
    let end = src[start..].find("\n    }\n").unwrap();
    src[start..start + end].to_string()
}

/// IAM actions the code calls: `.operation()` calls of the SDK clients in `code`. A
/// TransactWriteItems is authorised per item: PutItem, UpdateItem, DeleteItem, ConditionCheckItem.
fn called(code: &str, ops: &[(String, String)]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (snake, action) in ops {
        if !code.contains(&format!(".{snake}()")) {
            continue;
        }
        if snake == "transact_write_items" {
            for (part, action) in [
                ("Put", "dynamodb:PutItem"),
                ("Update", "dynamodb:UpdateItem"),
                ("Delete", "dynamodb:DeleteItem"),
                ("ConditionCheck", "dynamodb:ConditionCheckItem"),
            ] {
                let builder = regex_lite_contains(code, part);
                if builder {
                    out.insert(action.to_string());
                }
            }
        } else {
            out.insert(action.clone());
        }
    }
    out
}

/// `Part` followed (after whitespace) by `::builder()`.
fn regex_lite_contains(code: &str, part: &str) -> bool {
    code.match_indices(part).any(|(i, _)| {
        let before_ok = !code[..i].ends_with(|c: char| c.is_alphanumeric() || c == '_');
        before_ok && code[i + part.len()..].trim_start().starts_with("::builder()")
    })
}

fn files(dir: &str, skip: &[&str]) -> String {
    let mut text = String::new();
    let root = format!("{}/{dir}", env!("CARGO_MANIFEST_DIR"));
    let mut stack = vec![std::path::PathBuf::from(root)];
    while let Some(p) = stack.pop() {
        if p.is_dir() {
            stack.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
        } else if p.extension().is_some_and(|e| e == "rs") && !skip.iter().any(|s| p.ends_with(s)) {
            text.push_str(&std::fs::read_to_string(&p).unwrap());
        }
    }
    text
}

/// Actions the role's policies grant, with their resources.
fn grants(tpl: &Value, role: &str) -> Vec<(String, Value)> {
    let r = &tpl["Resources"][role];
    assert_eq!(r["Type"], "AWS::IAM::Role", "{role}");
    assert!(
        r["Properties"].get("ManagedPolicyArns").is_none(),
        "{role}: managed policies grant more than the code calls"
    );
    let mut out = Vec::new();
    for p in r["Properties"]["Policies"].as_array().unwrap() {
        // A conditional statement (Fn::If) counts as granted: the test checks the widest role.
        let statements = p["PolicyDocument"]["Statement"].as_array().unwrap().iter().flat_map(branches);
        for s in statements.filter(|s| s.get("Ref").is_none_or(|r| r != "AWS::NoValue")) {
            assert_eq!(s["Effect"], "Allow");
            let actions: Vec<&Value> = match &s["Action"] {
                Value::Array(a) => a.iter().collect(),
                one => vec![one],
            };
            for a in actions {
                out.push((a.as_str().unwrap().to_string(), s["Resource"].clone()));
            }
        }
    }
    out
}

#[test]
fn each_role_grants_exactly_what_its_code_calls() {
    let kinesis = sdk_operations("aws-sdk-kinesis", "kinesis");
    let dynamodb = sdk_operations("aws-sdk-dynamodb", "dynamodb");
    let secrets = sdk_operations("aws-sdk-secretsmanager", "secretsmanager");
    let reader = files("pipeline/src/kinesis", &["producer.rs", "admin.rs", "testing.rs", "tests.rs"]);
    let producer = read("pipeline/src/kinesis/producer.rs");
    let describe = function(&read("pipeline/src/kinesis/admin.rs"), "describe");
    let store = files("state/src/dynamodb", &["schema.rs", "testing.rs", "tests.rs"]);
    let schema = read("state/src/dynamodb/schema.rs");
    let webhook_secrets = read("src/ingest/webhook.rs");
    let connector_secrets = read("src/runtime/connectors.rs");
    let scan_states = method(&read("state/src/dynamodb/mod.rs"), "scan_all");
    let put = method(&producer, "call");
    // The reconciliation's own code calls no AWS API: only the store, producer and loader above.
    let reconcile_code = files("src/reconcile", &[]) + &read("src/cmd/reconcile.rs");
    for ops in [&kinesis, &dynamodb, &secrets] {
        assert!(called(&reconcile_code, ops).is_empty(), "src/reconcile calls the SDK directly");
    }
    assert!(read("src/cmd/reconcile.rs").contains("load_credential("), "the LWA secret goes through the loader");
    let union = |parts: &[(&str, &[(String, String)])]| -> BTreeSet<String> {
        parts.iter().flat_map(|(code, ops)| called(code, ops)).collect()
    };
    // What the AWS platform calls with the role (not the code's SDK calls), each with its reason.
    let platform: &[(&str, &[&str])] = &[
        // Logs and traces of the function; the SQS event source mapping polls with the function's
        // role; async invocations and the function's DLQ send failures to the failure queue.
        (
            "IngestRole",
            &[
                "logs:CreateLogStream",
                "logs:PutLogEvents",
                "xray:PutTraceSegments",
                "xray:PutTelemetryRecords",
                "sqs:ReceiveMessage",
                "sqs:DeleteMessage",
                "sqs:GetQueueAttributes",
                "sqs:SendMessage",
            ],
        ),
        // The ADOT collector sidecar sends the members' spans to X-Ray with the task role. With
        // KafkaBootstrap set, MSK IAM authorises the consumer's Kafka protocol requests (not SDK
        // calls): connect + cluster metadata, topic metadata + fetch, group join/sync/heartbeat +
        // offset commit (AlterGroup) and offset fetch (DescribeGroup) — librdkafka's consumer.
        (
            "ConsumerRole",
            &[
                "xray:PutTraceSegments",
                "xray:PutTelemetryRecords",
                "kafka-cluster:Connect",
                "kafka-cluster:DescribeCluster",
                "kafka-cluster:DescribeTopic",
                "kafka-cluster:ReadData",
                "kafka-cluster:AlterGroup",
                "kafka-cluster:DescribeGroup",
            ],
        ),
        ("OpsRole", &[]),
        ("ReconcileRole", &[]),
    ];
    let expected: Vec<(&str, BTreeSet<String>)> = vec![
        ("IngestRole", union(&[(&producer, &kinesis), (&webhook_secrets, &secrets)])),
        ("ConsumerRole", union(&[(&reader, &kinesis), (&store, &dynamodb), (&connector_secrets, &secrets)])),
        ("OpsRole", union(&[(&store, &dynamodb), (&schema, &dynamodb), (&describe, &kinesis)])),
        // `reconcile --dynamodb [--apply]`: the SKU states (one scan), the producer's put, and its
        // credentials (LWA, accounting, alert webhook) through the connectors' loader.
        ("ReconcileRole", union(&[(&scan_states, &dynamodb), (&put, &kinesis), (&connector_secrets, &secrets)])),
    ];
    let everything = union(&[
        (&reader, &kinesis),
        (&producer, &kinesis),
        (&describe, &kinesis),
        (&store, &dynamodb),
        (&schema, &dynamodb),
        (&webhook_secrets, &secrets),
        (&connector_secrets, &secrets),
    ]);
    // The derivation sees what it should (guards against a refactor hiding calls from it).
    for a in [
        "kinesis:PutRecords",
        "kinesis:GetRecords",
        "kinesis:SubscribeToShard",
        "dynamodb:ConditionCheckItem",
        "dynamodb:CreateTable",
        "secretsmanager:GetSecretValue",
    ] {
        assert!(everything.contains(a), "{a} not derived from the code");
    }
    let consumers = template("consumers");
    let ingest = template("ingest");
    for (role, code_actions) in &expected {
        let tpl = if *role == "IngestRole" { &ingest } else { &consumers };
        let granted = grants(tpl, role);
        let granted_set: BTreeSet<String> = granted.iter().map(|(a, _)| a.clone()).collect();
        let extra = platform.iter().find(|(r, _)| r == role).unwrap().1;
        let mut want = code_actions.clone();
        want.extend(extra.iter().map(|s| s.to_string()));
        assert_eq!(granted_set, want, "{role}: granted vs called (left: granted)");
        for (action, resource) in &granted {
            assert!(!action.contains('*'), "{role}: wildcard action {action}");
            check_resource(role, action, resource);
        }
    }
    // The reconciliation reads one table only: the SKU states.
    for (action, resource) in grants(&consumers, "ReconcileRole") {
        if action.starts_with("dynamodb:") {
            assert!(resource.to_string().ends_with(r#"-sku-state"}]"#), "ReconcileRole: {action} on {resource}");
        }
    }
    // The roles of the platform's own work: no wildcard actions either.
    for role in ["ExecutionRole", "SchedulerRole"] {
        for (action, resource) in grants(&consumers, role) {
            assert!(!action.contains('*'), "{role}: {action}");
            check_resource(role, &action, &resource);
        }
    }
}

/// Every statement names its resources, except the few actions AWS authorises only on `*`.
fn check_resource(role: &str, action: &str, resource: &Value) {
    const ONLY_STAR: [&str; 3] = ["xray:PutTraceSegments", "xray:PutTelemetryRecords", "ecr:GetAuthorizationToken"];
    let text = resource.to_string();
    if ONLY_STAR.contains(&action) {
        assert_eq!(resource, "*", "{role}: {action}");
        return;
    }
    assert_ne!(resource, "*", "{role}: {action} on every resource");
    let service = action.split(':').next().unwrap();
    let expect = match service {
        "kinesis" => ":stream/${Prefix}-events",
        "dynamodb" => ":table/${TablePrefix}-",
        "logs" => ":log-group:",
        "ecr" => ":repository/",
        "ecs" => ":task-definition/",
        "kafka-cluster" => ":kafka:${AWS::Region}:${AWS::AccountId}:",
        _ => "",
    };
    assert!(text.contains(expect), "{role}: {action} on {text}");
    // The reconciliation reads one table (checked where its role is); every other role all seven.
    if service == "dynamodb" && role != "ReconcileRole" {
        assert_eq!(resource.as_array().map(Vec::len), Some(TABLE_KEYS.len()), "{role}: {action} on the seven tables");
    }
}

/// A deployed value for a template expression, as CloudFormation would resolve it here.
fn resolve(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        _ if v.get("Ref").is_some() => match v["Ref"].as_str().unwrap() {
            "AWS::Region" => "us-east-1".into(),
            "TablePrefix" => "stockflow".into(),
            "ConsumerMode" => "fan-out".into(),
            "ConsumerName" => "stockflow".into(),
            "AccountingShape" => "quickbooks".into(),
            "AccountingUrl" => "https://quickbooks.api.intuit.com".into(),
            "AccountingCompanyId" => "9130354519123456".into(),
            "ManufacturerUrl" => "https://api.maker.example".into(),
            "AlertWebhookUrl" => "https://alerts.example/stockflow".into(),
            "KafkaBootstrap" => "boot-abc.c2.kafka-serverless.us-east-1.amazonaws.com:9098".into(),
            "MarketplaceId" => "ATVPDKIKX0DER".into(),
            "SellingPartnerEndpoint" => "https://sellingpartnerapi-na.amazon.com".into(),
            "CommitMinIntervalMs" => "500".into(),
            other => panic!("no test value for Ref {other}"),
        },
        _ if v.get("Fn::Sub").is_some() => {
            let s = v["Fn::Sub"].as_str().unwrap();
            s.replace("${Prefix}", "stockflow")
                .replace(
                    "${AccountingSecret}",
                    "arn:aws:secretsmanager:us-east-1:1:secret:stockflow/accounting-token-AbCdEf",
                )
                .replace(
                    "${ManufacturerSecret}",
                    "arn:aws:secretsmanager:us-east-1:1:secret:stockflow/manufacturer-token-AbCdEf",
                )
                .replace(
                    "${AlertWebhookSecret}",
                    "arn:aws:secretsmanager:us-east-1:1:secret:stockflow/alerts-webhook-secret-AbCdEf",
                )
                .replace("${AmazonLwaSecret}", "arn:aws:secretsmanager:us-east-1:1:secret:stockflow/amazon-lwa-AbCdEf")
        }
        other => panic!("unexpected value {other}"),
    }
}

fn container(tpl: &Value, task: &str) -> Value {
    tpl["Resources"][task]["Properties"]["ContainerDefinitions"][0].clone()
}

/// Every variable a container sets is read (a clap `env` of its command or a global one, a config
/// path under `STOCKFLOW__`, or the logging variables), the configuration they make is valid, and
/// the variables the command needs are set; emulator endpoints are never set.
#[test]
fn every_variable_the_binaries_read_is_set_and_every_one_set_is_read() {
    let cli = stockflow::cmd::Cli::command();
    let global: BTreeSet<String> =
        cli.get_arguments().filter_map(|a| a.get_env()).map(|e| e.to_string_lossy().into_owned()).collect();
    let telemetry = read("src/telemetry.rs");
    let otlp = read("src/telemetry/otlp.rs");
    let consumers = template("consumers");
    for (task, needs) in [
        ("ConsumerTaskDefinition", &["STOCKFLOW_STREAM", "STOCKFLOW_TABLE_PREFIX"][..]),
        ("OpsTaskDefinition", &["STOCKFLOW_TABLE_PREFIX", "STOCKFLOW_STREAM"][..]),
        ("ReconcileTaskDefinition", &["STOCKFLOW_TABLE_PREFIX"][..]),
    ] {
        let c = container(&consumers, task);
        let command: Vec<String> = match &c["Command"] {
            Value::Array(a) => a.iter().map(|x| x.as_str().unwrap().to_string()).collect(),
            r => consumers["Parameters"][r["Ref"].as_str().unwrap()]["Default"]
                .as_str()
                .unwrap()
                .split(',')
                .map(str::to_string)
                .collect(),
        };
        let sub = cli.find_subcommand(&command[0]).unwrap_or_else(|| panic!("{task}: no subcommand {}", command[0]));
        let mut reads = global.clone();
        reads.extend(sub.get_arguments().filter_map(|a| a.get_env()).map(|e| e.to_string_lossy().into_owned()));
        let mut env = Vec::new();
        for item in c["Environment"].as_array().unwrap() {
            for kv in branches(item).into_iter().filter(|kv| kv.get("Name").is_some()) {
                env.push((kv["Name"].as_str().unwrap().to_string(), resolve(&kv["Value"])));
            }
        }
        for (name, value) in &env {
            let read_here = reads.contains(name)
                || name.starts_with("STOCKFLOW__")
                || name == "AWS_REGION"
                || (name.starts_with("OTEL_") && otlp.contains(name.as_str()))
                || ((name == "STOCKFLOW_LOG" || name == "STOCKFLOW_LOG_FORMAT")
                    && telemetry.contains(&format!("\"{name}\"")));
            assert!(read_here, "{task}: {name} is set but `stockflow {}` does not read it", command[0]);
            // The OTLP endpoint is the task's own collector sidecar, the reconciliation's is
            // Amazon's (https); any other endpoint variable would point at an emulator.
            let sidecar = name == "OTEL_EXPORTER_OTLP_ENDPOINT" && value.starts_with("http://127.0.0.1:");
            let amazon = name == "STOCKFLOW__RECONCILE__ENDPOINT" && value.starts_with("https://sellingpartnerapi-");
            assert!(!name.ends_with("_ENDPOINT") || sidecar || amazon, "{task}: {name} points at an emulator");
        }
        for need in needs {
            assert!(reads.contains(*need), "{task}: `{}` does not read {need}", command[0]);
            assert!(env.iter().any(|(n, _)| n == need), "{task}: {need} is not set");
        }
        // The configuration the variables make is the one the binary accepts.
        let file = stockflow::runtime::config::FileConfig::load_with_env(None, env.clone())
            .unwrap_or_else(|e| panic!("{task}: {e:#}"));
        let settings = file.validate().unwrap_or_else(|e| panic!("{task}: {e:#}"));
        if task == "ConsumerTaskDefinition" {
            assert!(settings.cloudwatch.emf_interval_s > 0, "the alarms need the EMF lines");
            assert!(
                settings.connectors.accounting.url.is_some()
                    && settings.connectors.accounting.token.secret_id.is_some()
            );
        }
        if task == "ReconcileTaskDefinition" {
            // Its credentials from Secrets Manager, its report on the writable volume.
            assert!(settings.reconcile.credentials.secret_id.is_some());
            let mounts = c["MountPoints"].as_array().unwrap();
            let dir = settings.reconcile_dir();
            assert!(
                mounts.iter().any(|m| dir.starts_with(m["ContainerPath"].as_str().unwrap())),
                "{dir:?} is not mounted"
            );
        }
        // The command line parses with the real CLI.
        let mut argv = vec!["stockflow".to_string()];
        argv.extend(command);
        stockflow::cmd::Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{task}: {argv:?}: {e}"));
        if let Some(check) = c.get("HealthCheck") {
            let cmd: Vec<&str> = check["Command"].as_array().unwrap().iter().map(|x| x.as_str().unwrap()).collect();
            assert_eq!(cmd[0], "CMD", "exec form: the image has no shell");
            assert_eq!(cmd[1], "/usr/local/bin/stockflow", "the image's binary");
            let mut argv = vec!["stockflow"];
            argv.extend(&cmd[2..]);
            stockflow::cmd::Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{task}: {argv:?}: {e}"));
            assert!(cmd.last().unwrap().ends_with("/healthz"));
        }
    }
    // The Lambda: what its binary and the ingest read with std::env::var, each set or optional.
    let ingest = template("ingest");
    let vars =
        ingest["Resources"]["IngestFunction"]["Properties"]["Environment"]["Variables"].as_object().unwrap().clone();
    let bin = read("src/bin/stockflow-ingest-lambda.rs") + &read("src/ingest/webhook.rs");
    let read_by_lambda: BTreeSet<String> =
        bin.split("env::var(\"").skip(1).map(|r| r.split('"').next().unwrap().to_string()).collect();
    // Optional by design: an emulator endpoint (never on AWS), a default that fits, and the local
    // server's secret sources (the Lambda reads STOCKFLOW_WEBHOOK_SECRET_ID).
    let optional = [
        "KINESIS_ENDPOINT",
        "SECRETSMANAGER_ENDPOINT",
        "STOCKFLOW_MAX_FUTURE_MS",
        "STOCKFLOW_MARKETPLACE_ID",
        "STOCKFLOW_WEBHOOK_SECRETS",
        "STOCKFLOW_WEBHOOK_SECRETS_FILE",
    ];
    for var in &read_by_lambda {
        assert!(
            vars.contains_key(var) || optional.contains(&var.as_str()),
            "the function reads {var}; the template does not set it"
        );
    }
    // Config fields by the naming rule: the function reads the config from its environment.
    assert!(bin.contains("FileConfig::load_with_env"), "the function does not read the config's variables");
    let mut config_env = Vec::new();
    for (var, value) in &vars {
        let logging =
            (var == "STOCKFLOW_LOG" || var == "STOCKFLOW_LOG_FORMAT") && telemetry.contains(&format!("\"{var}\""));
        let config = var.starts_with("STOCKFLOW__");
        assert!(read_by_lambda.contains(var) || logging || config, "{var} is set but not read by the function");
        assert!(!var.ends_with("_ENDPOINT"));
        if config {
            // A parameter's placeholder value: what matters is that the field exists and parses.
            let value = value.as_str().map_or("ATVPDKIKX0DER".to_string(), str::to_string);
            config_env.push((var.clone(), value));
        }
    }
    let file = stockflow::runtime::config::FileConfig::load_with_env(None, config_env)
        .unwrap_or_else(|e| panic!("the function's config variables: {e:#}"));
    let settings = file.validate().unwrap_or_else(|e| panic!("the function's config variables: {e:#}"));
    assert!(settings.amazon.marketplace_id.is_some(), "the function counts FBA stock of the configured marketplace");
}

#[test]
fn the_consumer_service_scales_on_lag_up_to_the_shard_count_and_hands_off_gracefully() {
    let tpl = template("consumers");
    let r = &tpl["Resources"];
    let target = &r["ScalableTarget"]["Properties"];
    assert_eq!(target["MaxCapacity"]["Ref"], "ShardCount", "tasks beyond the shards add nothing");
    assert_eq!(target["ScalableDimension"], "ecs:service:DesiredCount");
    for (alarm, policy) in [("LagHighAlarm", "ScaleOutPolicy"), ("LagLowAlarm", "ScaleInPolicy")] {
        assert_eq!(r[alarm]["Properties"]["AlarmActions"][0]["Ref"], policy);
        assert_eq!(r[policy]["Properties"]["PolicyType"], "StepScaling");
    }
    let task = &r["ConsumerTaskDefinition"]["Properties"];
    assert_eq!(task["RuntimePlatform"]["CpuArchitecture"], "ARM64");
    let c = &task["ContainerDefinitions"][0];
    // SIGTERM → commit, release the leases, stop the drains. A member's handoff is bounded by one
    // commit and one delivery request (connectors.delivery.timeout_ms, 10 s by default).
    let stop = c["StopTimeout"].as_i64().unwrap();
    assert!((30..=120).contains(&stop), "StopTimeout {stop}: Fargate allows up to 120 s");
    // With the task's own settings: its delivery timeout plus 30 s for the last commit and the
    // lease release (DynamoDB calls with the SDK's retries) fit in the stop timeout.
    let params = &tpl["Parameters"];
    let env: Vec<(String, String)> = c["Environment"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|kv| {
            let name = kv.get("Name")?.as_str()?.to_string();
            let value = match &kv["Value"] {
                Value::String(v) => v.clone(),
                v => params[v.get("Ref")?.as_str()?]["Default"].as_str()?.to_string(),
            };
            name.starts_with("STOCKFLOW__").then_some((name, value))
        })
        .collect();
    let file = stockflow::runtime::config::FileConfig::load_with_env(None, env).unwrap();
    let settings = file.validate().unwrap();
    let handoff_ms = settings.connectors.delivery.timeout_ms + 30_000;
    assert!(handoff_ms <= stop as u64 * 1000, "a handoff can take {handoff_ms} ms; StopTimeout is {stop} s");
    assert_eq!(c["ReadonlyRootFilesystem"], true);
    assert_ne!(c["User"], "0");
    let deploy = &r["ConsumerService"]["Properties"]["DeploymentConfiguration"];
    assert_eq!(deploy["MinimumHealthyPercent"], 100, "new tasks start before old ones stop");
}

/// Each alarm watches a metric that exists: an AWS namespace's (from the AWS documentation, with
/// its dimensions) or one a member's EMF line carries.
#[test]
fn every_alarm_watches_a_metric_that_exists() {
    use stockflow::runtime::emf;
    let aws: &[(&str, &str, &[&str])] = &[
        ("AWS/Kinesis", "GetRecords.IteratorAgeMilliseconds", &["StreamName"]),
        ("AWS/Lambda", "Errors", &["FunctionName"]),
        ("AWS/Lambda", "Throttles", &["FunctionName"]),
        ("AWS/SQS", "ApproximateNumberOfMessagesVisible", &["QueueName"]),
        ("AWS/DynamoDB", "ReadThrottleEvents", &["TableName"]),
        ("AWS/DynamoDB", "WriteThrottleEvents", &["TableName"]),
        ("AWS/DynamoDB", "SystemErrors", &["TableName", "Operation"]),
        ("ECS/ContainerInsights", "RunningTaskCount", &["ClusterName", "ServiceName"]),
        ("ECS/ContainerInsights", "DesiredTaskCount", &["ClusterName", "ServiceName"]),
    ];
    let mut seen = BTreeSet::new();
    let mut check = |what: &str, ns: &Value, metric: &Value, dims: &Value| {
        let (ns, metric) = (ns.as_str().unwrap(), metric.as_str().unwrap());
        let names: Vec<&str> =
            dims.as_array().map_or(&[][..], Vec::as_slice).iter().map(|d| d["Name"].as_str().unwrap()).collect();
        if ns == "stockflow" {
            assert!(emf::METRICS.contains(&metric), "{what}: {metric} is not in a member's EMF line");
            assert!(names.iter().all(|n| *n == emf::DIMENSION), "{what}: {names:?}");
        } else {
            let known = aws.iter().find(|(n, m, _)| *n == ns && *m == metric);
            let (_, _, want) = known.unwrap_or_else(|| panic!("{what}: {ns} {metric} is not a metric this test knows"));
            assert!(names.iter().all(|n| want.contains(n)), "{what}: {names:?} vs {want:?}");
        }
        seen.insert(format!("{ns}/{metric}"));
    };
    let mut alarms = 0;
    for name in ["alarms", "consumers"] {
        let tpl = template(name);
        for (id, r) in tpl["Resources"].as_object().unwrap() {
            if r["Type"] != "AWS::CloudWatch::Alarm" {
                continue;
            }
            alarms += 1;
            // Each deployed shape of the alarm: every condition true, then every one false, so a
            // namespace, its metric and its dimensions are read from the same branch.
            for truth in [true, false] {
                let p = &choose(&r["Properties"], truth);
                if let Some(metrics) = p.get("Metrics").and_then(Value::as_array) {
                    for m in metrics.iter().filter_map(|m| m.get("MetricStat")) {
                        let metric = &m["Metric"];
                        check(id, &metric["Namespace"], &metric["MetricName"], &metric["Dimensions"]);
                    }
                } else {
                    check(id, &p["Namespace"], &p["MetricName"], &p["Dimensions"]);
                }
                assert!(p["AlarmActions"].as_array().is_some_and(|a| !a.is_empty()), "{id} acts on nothing");
            }
        }
    }
    assert!(alarms >= 20, "{alarms}");
    for need in [
        "stockflow/ConsumerLagMilliseconds",
        "stockflow/OversellAlerts",
        "stockflow/ConnectorDeadLetters",
        "AWS/Kinesis/GetRecords.IteratorAgeMilliseconds",
    ] {
        assert!(seen.contains(need), "no alarm on {need}");
    }
}

/// The image: every path the Dockerfile copies exists, the binary it builds is one of the crate's,
/// and the entrypoint is where it was copied.
#[test]
fn the_dockerfile_builds_a_binary_of_this_crate() {
    let docker = read("Dockerfile");
    let manifest: toml::Table = toml::from_str(&read("Cargo.toml")).unwrap();
    let bins: Vec<&str> = manifest["bin"].as_array().unwrap().iter().map(|b| b["name"].as_str().unwrap()).collect();
    let mut copied = 0;
    for line in docker.lines().map(str::trim) {
        let Some(rest) = line.strip_prefix("COPY ") else { continue };
        if rest.starts_with("--from") {
            continue;
        }
        let parts: Vec<&str> = rest.split_whitespace().collect();
        for src in &parts[..parts.len() - 1] {
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(src);
            assert!(path.exists(), "COPY {src}: not in the repository");
            copied += 1;
        }
    }
    assert!(copied >= 6);
    // Every workspace member is copied (else `cargo build --locked` fails in the image).
    for member in manifest["workspace"]["members"].as_array().unwrap() {
        let m = member.as_str().unwrap();
        assert!(docker.lines().any(|l| l.trim() == format!("COPY {m} {m}")), "workspace member {m} not copied");
    }
    let built = docker.split("--bin ").nth(1).unwrap().split_whitespace().next().unwrap();
    assert!(bins.contains(&built), "--bin {built}");
    assert!(docker.contains(&format!("target/release/{built} /{built}")));
    assert!(docker.contains(&format!("COPY --from=build /{built} /usr/local/bin/{built}")));
    assert!(docker.contains(&format!("ENTRYPOINT [\"/usr/local/bin/{built}\"]")));
    assert!(docker.contains("--locked"), "dependencies from Cargo.lock");
    assert!(docker.contains("ca-certificates"));
    let user = docker.lines().rev().find_map(|l| l.strip_prefix("USER ")).expect("a USER");
    assert!(!user.starts_with('0') && !user.starts_with("root"), "non-root: {user}");
    // The default command parses with the real CLI.
    let cmd = docker.lines().find_map(|l| l.strip_prefix("CMD ")).unwrap();
    let mut argv: Vec<String> = vec![built.to_string()];
    argv.extend(serde_json::from_str::<Vec<String>>(cmd).unwrap());
    stockflow::cmd::Cli::try_parse_from(&argv).unwrap();
}
