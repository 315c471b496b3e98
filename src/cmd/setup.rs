//! `stockflow setup`: creates or validates the DynamoDB tables of the AWS deployment; `--validate`
//! only checks them (and the stream), changing nothing — what an operator runs against a stack
//! CloudFormation made, and what the scheduled task runs until the reconciliation job exists.

use std::process::ExitCode;

use anyhow::Context;

use crate::runtime::config::Settings;

/// Arguments of `stockflow setup`.
#[derive(Debug, clap::Args)]
pub struct SetupArgs {
    /// Only check: every table exists, is ACTIVE, has its key schema and TTL; the stream (when one
    /// is named) exists. Exits 1 naming what is wrong; needs only Describe* permissions.
    #[arg(long)]
    validate: bool,
    /// DynamoDB endpoint override (overrides `dynamodb.endpoint`), e.g. a local emulator.
    #[arg(long, env = "DYNAMODB_ENDPOINT", value_name = "URL")]
    dynamodb_endpoint: Option<String>,
    /// Table name prefix (overrides `dynamodb.table_prefix`).
    #[arg(long, env = "STOCKFLOW_TABLE_PREFIX", value_name = "PREFIX")]
    table_prefix: Option<String>,
    /// With --validate, also check this Kinesis stream (overrides `kinesis.stream`).
    #[arg(long, env = "STOCKFLOW_STREAM", value_name = "NAME")]
    stream: Option<String>,
    /// Kinesis endpoint override (overrides `kinesis.endpoint`).
    #[arg(long, env = "KINESIS_ENDPOINT", value_name = "URL")]
    kinesis_endpoint: Option<String>,
}

pub async fn run(args: SetupArgs, settings: Settings) -> anyhow::Result<ExitCode> {
    use stockflow_state::dynamodb::{DynamoStore, TableOutcome};
    let endpoint = args.dynamodb_endpoint.or(settings.dynamodb.endpoint);
    let prefix = args.table_prefix.unwrap_or(settings.dynamodb.table_prefix);
    let store = DynamoStore::new(DynamoStore::client(endpoint.as_deref()).await, &prefix);
    if args.validate {
        let mut ok = true;
        for check in store.validate().await.context("validating the DynamoDB tables")? {
            match check.problem {
                None => println!("valid    {}", check.table),
                Some(p) => {
                    ok = false;
                    println!("INVALID  {}: {p}", check.table);
                }
            }
        }
        if let Some(stream) = args.stream.or(settings.kinesis.stream) {
            let endpoint = args.kinesis_endpoint.or(settings.kinesis.endpoint);
            let client = stockflow_pipeline::kinesis::client(endpoint.as_deref(), false).await;
            match stockflow_pipeline::kinesis::admin::describe(&client, &stream).await? {
                Some((status, shards)) if status == "ACTIVE" || status == "UPDATING" => {
                    println!("valid    stream {stream} ({status}, {shards} open shards)");
                }
                Some((status, _)) => {
                    ok = false;
                    println!("INVALID  stream {stream}: status {status}");
                }
                None => {
                    ok = false;
                    println!("INVALID  stream {stream}: missing");
                }
            }
        }
        return Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE });
    }
    for outcome in store.setup().await.context("setting up the DynamoDB tables")? {
        match outcome {
            TableOutcome::Created(t) => println!("created  {t}"),
            TableOutcome::Valid(t) => println!("valid    {t}"),
        }
    }
    println!("TTL enabled on {} (expires_at)", store.tables().dedup);
    Ok(ExitCode::SUCCESS)
}
