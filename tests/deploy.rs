//! The infrastructure as code declares what the code expects.

use serde_json::Value;
use stockflow_state::dynamodb::schema::{BY_SHARD_INDEX, TABLE_KEYS};

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
        if keys.suffix == "sku-state" {
            assert_eq!(p["GlobalSecondaryIndexes"][0]["IndexName"], BY_SHARD_INDEX);
        }
    }
}
