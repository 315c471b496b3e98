//! The infrastructure as code declares what the code expects.

use serde_json::Value;
use stockflow_state::dynamodb::schema::TABLE_KEYS;

#[test]
fn cloudformation_tables_match_the_store_schema() {
    let tpl: Value = serde_json::from_str(include_str!("../deploy/cloudformation/state-tables.json")).unwrap();
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
    let tpl: Value = serde_json::from_str(include_str!("../deploy/cloudformation/ingest.json")).unwrap();
    let r = &tpl["Resources"];
    let f = &r["IngestFunction"]["Properties"];
    assert_eq!((f["Runtime"].as_str(), f["Architectures"][0].as_str()), (Some("provided.al2023"), Some("arm64")));
    assert!(f["Timeout"].as_i64().unwrap() < 29, "under API Gateway's 29 s integration timeout");
    let env = &f["Environment"]["Variables"];
    // The variables the binary reads (src/bin/stockflow-ingest-lambda.rs).
    let bin = include_str!("../src/bin/stockflow-ingest-lambda.rs");
    for var in env.as_object().unwrap().keys() {
        assert!(bin.contains(var.as_str()) || var == "STOCKFLOW_LOG", "{var} is not read by the function");
    }
    assert_eq!(env["STOCKFLOW_STREAM"]["Ref"], "EventStream");
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
    assert_eq!(r["IngestProxyMethod"]["Properties"]["Integration"]["Type"], "AWS_PROXY");
    // Every Ref / GetAtt names a resource, parameter or pseudo parameter of the template.
    let mut names: Vec<String> = r.as_object().unwrap().keys().cloned().collect();
    names.extend(tpl["Parameters"].as_object().unwrap().keys().cloned());
    fn walk(v: &Value, names: &[String]) {
        match v {
            Value::Object(m) => {
                if let Some(Value::String(t)) = m.get("Ref") {
                    assert!(t.starts_with("AWS::") || names.contains(t), "Ref {t}");
                }
                if let Some(t) = m.get("Fn::GetAtt").and_then(|a| a[0].as_str()) {
                    assert!(names.iter().any(|n| n == t), "GetAtt {t}");
                }
                m.values().for_each(|x| walk(x, names));
            }
            Value::Array(a) => a.iter().for_each(|x| walk(x, names)),
            _ => {}
        }
    }
    walk(r, &names);
    walk(&tpl["Outputs"], &names);
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
