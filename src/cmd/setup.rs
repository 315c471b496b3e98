//! `stockflow setup`: creates or validates the DynamoDB tables of the AWS deployment.

use std::process::ExitCode;

use anyhow::Context;

use crate::runtime::config::Settings;

/// Arguments of `stockflow setup`.
#[derive(Debug, clap::Args)]
pub struct SetupArgs {
    /// DynamoDB endpoint override (overrides `dynamodb.endpoint`), e.g. a local emulator.
    #[arg(long, env = "DYNAMODB_ENDPOINT", value_name = "URL")]
    dynamodb_endpoint: Option<String>,
    /// Table name prefix (overrides `dynamodb.table_prefix`).
    #[arg(long, env = "STOCKFLOW_TABLE_PREFIX", value_name = "PREFIX")]
    table_prefix: Option<String>,
}

pub async fn run(args: SetupArgs, settings: Settings) -> anyhow::Result<ExitCode> {
    use stockflow_state::dynamodb::{DynamoStore, TableOutcome};
    let endpoint = args.dynamodb_endpoint.or(settings.dynamodb.endpoint);
    let prefix = args.table_prefix.unwrap_or(settings.dynamodb.table_prefix);
    let store = DynamoStore::new(DynamoStore::client(endpoint.as_deref()).await, &prefix);
    for outcome in store.setup().await.context("setting up the DynamoDB tables")? {
        match outcome {
            TableOutcome::Created(t) => println!("created  {t}"),
            TableOutcome::Valid(t) => println!("valid    {t}"),
        }
    }
    println!("TTL enabled on {} (expires_at)", store.tables().dedup);
    Ok(ExitCode::SUCCESS)
}
