//! The DynamoDB tables of the state store, their keys, and `setup` (create or validate them,
//! idempotently). `deploy/cloudformation/state-tables.json` declares the same tables.

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType, TableStatus,
    TimeToLiveSpecification, TimeToLiveStatus,
};

use crate::store::StoreError;

use super::sdk_error;

/// Names of the seven tables, from one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableNames {
    /// Per-SKU state: `sku` (S) + `part` (N).
    pub sku_state: String,
    /// Effects: `shard` (S) + `seq` (S), one blob of effects per commit part (`effects::codec`), written at `at`; TTL on
    /// `expires_at`, set by retention once every connector delivered it.
    pub outbox: String,
    /// Dead letters: `shard` (S) + `pos` (S).
    pub dead_letters: String,
    /// Dedup chunks: `shard` (S) + `chunk` (S), TTL on `expires_at`.
    pub dedup: String,
    /// Leases and checkpoints (KCL attribute names): `leaseKey` (S).
    pub leases: String,
    /// Connector delivery: `connector` (S) + `key` (S): `cursor#{shard}` and `dead#{shard}#{request key}`.
    pub delivery: String,
    /// Which SKUs each shard committed: `shard` (S) + `chunk` (S), written with the SKUs' first
    /// state in the same transaction and read consistently at restore (never an index).
    pub shard_skus: String,
}

/// Key schema of one table: name suffix, partition key and optional sort key, each with its
/// DynamoDB type (`S` or `N`). The CloudFormation template declares the same (checked by a test).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableKeys {
    /// `{prefix}-{suffix}`.
    pub suffix: &'static str,
    /// Partition key and type.
    pub hash: (&'static str, &'static str),
    /// Sort key and type.
    pub range: Option<(&'static str, &'static str)>,
}

/// The seven tables' key schemas.
pub const TABLE_KEYS: [TableKeys; 7] = [
    TableKeys { suffix: "sku-state", hash: ("sku", "S"), range: Some(("part", "N")) },
    TableKeys { suffix: "outbox", hash: ("shard", "S"), range: Some(("seq", "S")) },
    TableKeys { suffix: "dead-letters", hash: ("shard", "S"), range: Some(("pos", "S")) },
    TableKeys { suffix: "dedup", hash: ("shard", "S"), range: Some(("chunk", "S")) },
    TableKeys { suffix: "leases", hash: ("leaseKey", "S"), range: None },
    TableKeys { suffix: "delivery", hash: ("connector", "S"), range: Some(("key", "S")) },
    TableKeys { suffix: "shard-skus", hash: ("shard", "S"), range: Some(("chunk", "S")) },
];

impl TableNames {
    /// `{prefix}-sku-state`, `{prefix}-outbox`, `{prefix}-dead-letters`, `{prefix}-dedup`,
    /// `{prefix}-leases`, `{prefix}-delivery`, `{prefix}-shard-skus`.
    pub fn with_prefix(prefix: &str) -> Self {
        let name = |i: usize| format!("{prefix}-{}", TABLE_KEYS[i].suffix);
        TableNames {
            sku_state: name(0),
            outbox: name(1),
            dead_letters: name(2),
            dedup: name(3),
            leases: name(4),
            delivery: name(5),
            shard_skus: name(6),
        }
    }

    fn all(&self) -> [&str; 7] {
        [&self.sku_state, &self.outbox, &self.dead_letters, &self.dedup, &self.leases, &self.delivery, &self.shard_skus]
    }
}

fn attr(name: &str, t: ScalarAttributeType) -> Result<AttributeDefinition, StoreError> {
    AttributeDefinition::builder().attribute_name(name).attribute_type(t).build().map_err(sdk_error)
}

fn key(name: &str, t: KeyType) -> Result<KeySchemaElement, StoreError> {
    KeySchemaElement::builder().attribute_name(name).key_type(t).build().map_err(sdk_error)
}

/// What `validate` found wrong with one table (`None`: nothing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableCheck {
    /// The table's name.
    pub table: String,
    /// What is wrong, for a person: missing, another key, not ACTIVE, TTL off.
    pub problem: Option<String>,
}

/// Checks, without changing anything, that every table exists, is ACTIVE, has the expected key
/// schema, and (dedup, outbox) has TTL on `expires_at` — what a deployment made by CloudFormation
/// or by someone else must satisfy before consumers start. Needs only `dynamodb:DescribeTable` and
/// `dynamodb:DescribeTimeToLive`.
pub async fn validate(client: &Client, names: &TableNames) -> Result<Vec<TableCheck>, StoreError> {
    let mut out = Vec::new();
    for (table, k) in names.all().into_iter().zip(TABLE_KEYS) {
        let problem = match client.describe_table().table_name(table).send().await {
            Ok(desc) => {
                let t = desc.table();
                let have: Vec<String> = t
                    .map(|t| t.key_schema().iter().map(|k| k.attribute_name().to_string()).collect())
                    .unwrap_or_default();
                let mut want = vec![k.hash.0.to_string()];
                want.extend(k.range.map(|(r, _)| r.to_string()));
                let status = t.and_then(|t| t.table_status());
                if have != want {
                    Some(format!("key {have:?}, expected {want:?}"))
                } else if !matches!(status, Some(TableStatus::Active | TableStatus::Updating)) {
                    Some(format!("status {}", status.map_or("unknown", |s| s.as_str())))
                } else {
                    None
                }
            }
            Err(e) if e.as_service_error().is_some_and(|s| s.is_resource_not_found_exception()) => {
                Some("missing (stockflow setup creates it)".to_string())
            }
            Err(e) => return Err(sdk_error(e)),
        };
        let problem = match problem {
            None if table == names.dedup || table == names.outbox => {
                let ttl = client.describe_time_to_live().table_name(table).send().await.map_err(sdk_error)?;
                let d = ttl.time_to_live_description();
                let on = d
                    .and_then(|d| d.time_to_live_status())
                    .is_some_and(|s| matches!(s, TimeToLiveStatus::Enabled | TimeToLiveStatus::Enabling));
                let attr = d.and_then(|d| d.attribute_name());
                (!on || attr != Some("expires_at")).then(|| format!("TTL not enabled on expires_at ({attr:?})"))
            }
            other => other,
        };
        out.push(TableCheck { table: table.to_string(), problem });
    }
    Ok(out)
}

/// What `setup` did to one table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TableOutcome {
    /// The table was created.
    Created(String),
    /// The table existed with the expected key schema.
    Valid(String),
}

/// Creates the tables that do not exist (PAY_PER_REQUEST), enables TTL on the dedup and outbox tables, and
/// checks the key schema of those that do. Safe to run any number of times.
pub async fn setup(client: &Client, names: &TableNames) -> Result<Vec<TableOutcome>, StoreError> {
    let scalar = |t: &str| if t == "N" { ScalarAttributeType::N } else { ScalarAttributeType::S };
    let specs = names
        .all()
        .into_iter()
        .zip(TABLE_KEYS)
        .map(|(table, k)| (table, (k.hash.0, scalar(k.hash.1)), k.range.map(|(r, t)| (r, scalar(t)))));
    let mut out = Vec::new();
    for (table, (hash, hash_t), range) in specs {
        match client.describe_table().table_name(table).send().await {
            Ok(desc) => {
                let schema = desc.table().map(|t| t.key_schema().to_vec()).unwrap_or_default();
                let mut want = vec![hash.to_string()];
                want.extend(range.as_ref().map(|(r, _)| r.to_string()));
                let have: Vec<String> = schema.iter().map(|k| k.attribute_name().to_string()).collect();
                if have != want {
                    return Err(StoreError::Corrupt(format!(
                        "table {table} has key {have:?}, expected {want:?}: delete it or use another prefix"
                    )));
                }
                out.push(TableOutcome::Valid(table.to_string()));
                continue;
            }
            Err(e) if e.as_service_error().is_some_and(|s| s.is_resource_not_found_exception()) => {}
            Err(e) => return Err(sdk_error(e)),
        }
        let mut req = client
            .create_table()
            .table_name(table)
            .billing_mode(BillingMode::PayPerRequest)
            .attribute_definitions(attr(hash, hash_t.clone())?)
            .key_schema(key(hash, KeyType::Hash)?);
        if let Some((r, t)) = &range {
            req = req.attribute_definitions(attr(r, t.clone())?).key_schema(key(r, KeyType::Range)?);
        }
        req.send().await.map_err(sdk_error)?;
        out.push(TableOutcome::Created(table.to_string()));
    }
    for table in names.all() {
        wait_active(client, table).await?;
    }
    // Dedup chunks expire past the horizon; delivered outbox rows once retention marks them.
    for table in [&names.dedup, &names.outbox] {
        let ttl = client
            .update_time_to_live()
            .table_name(table)
            .time_to_live_specification(
                TimeToLiveSpecification::builder()
                    .enabled(true)
                    .attribute_name("expires_at")
                    .build()
                    .map_err(sdk_error)?,
            )
            .send()
            .await;
        if let Err(e) = ttl {
            // Enabling TTL twice is refused with "TimeToLive is already enabled": that is success.
            if !format!("{:?}", e.as_service_error()).contains("already enabled") {
                return Err(sdk_error(e));
            }
        }
    }
    Ok(out)
}

async fn wait_active(client: &Client, table: &str) -> Result<(), StoreError> {
    for attempt in 0..120u32 {
        let desc = client.describe_table().table_name(table).send().await.map_err(sdk_error)?;
        if desc.table().and_then(|t| t.table_status()) == Some(&TableStatus::Active) {
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(50 * u64::from(attempt.min(20)) + 50)).await;
    }
    Err(StoreError::Unavailable(format!("table {table} did not become ACTIVE")))
}
