//! The operator's reads and repairs of the state store: `state dump`, `alerts dump`, `dlq dump |
//! remove`, `verify`; embedded by default, the AWS deployment's tables with `--dynamodb`.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::bail;
use stockflow_state::reference::{Outcome, SkuSummary, straight_pass};
use stockflow_state::{StateStore, StoreError};

use crate::loadtest::ndjson::{lines, print_ndjson, read_lines};
use crate::runtime::config::Settings;
use crate::runtime::open_store;

/// Which store an operator command reads: the embedded one of the data directory, or with
/// `--dynamodb` the AWS deployment's tables (every consumer-group member's shards).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct StoreArgs {
    /// Read the AWS deployment's DynamoDB tables instead of the embedded store.
    #[arg(long, global = true)]
    pub dynamodb: bool,
    /// DynamoDB endpoint override (overrides `dynamodb.endpoint`), e.g. a local emulator.
    #[arg(long, global = true, env = "DYNAMODB_ENDPOINT", value_name = "URL")]
    pub dynamodb_endpoint: Option<String>,
    /// Table name prefix (overrides `dynamodb.table_prefix`).
    #[arg(long, global = true, env = "STOCKFLOW_TABLE_PREFIX", value_name = "PREFIX")]
    pub table_prefix: Option<String>,
}

impl StoreArgs {
    /// The DynamoDB store these flags (and the config) name.
    pub async fn dynamo(&self, settings: &Settings) -> stockflow_state::dynamodb::DynamoStore {
        use stockflow_state::dynamodb::DynamoStore;
        let endpoint = self.dynamodb_endpoint.clone().or_else(|| settings.dynamodb.endpoint.clone());
        let prefix = self.table_prefix.clone().unwrap_or_else(|| settings.dynamodb.table_prefix.clone());
        DynamoStore::new(DynamoStore::client(endpoint.as_deref()).await, &prefix)
    }
}

/// Runs `$body` with `$store` bound to the store `$args` names: the embedded one, or DynamoDB.
macro_rules! with_store {
    ($settings:expr, $args:expr, |$store:ident| $body:expr) => {
        if $args.dynamodb {
            let $store = $args.dynamo(&$settings).await;
            $body
        } else {
            let $store = open_store(&$settings)?;
            $body
        }
    };
}

pub(crate) use with_store;

/// Arguments of `stockflow verify`.
#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// The NDJSON file whose straight pass the stored state must equal.
    #[arg(long, value_name = "FILE")]
    events: PathBuf,
    /// Differences to print at most.
    #[arg(long, default_value_t = 20)]
    max_diff: usize,
    #[command(flatten)]
    store: StoreArgs,
}

async fn dump_states<S: StateStore>(store: &S) -> anyhow::Result<ExitCode> {
    let states = store.sku_states().await?;
    print_ndjson(states.iter().map(|(sku, s)| SkuSummary::of(sku, s)))?;
    Ok(ExitCode::SUCCESS)
}

async fn dump_alerts<S: StateStore + stockflow_state::OutboxStore>(store: &S) -> anyhow::Result<ExitCode> {
    // Streamed page by page, per shard in commit order: memory stays at one page.
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    stockflow_state::outbox::for_each_effect(store, |_, entry| {
        if entry.effect.is_alert() {
            serde_json::to_writer(&mut out, &entry.effect).map_err(|e| StoreError::Unavailable(e.to_string()))?;
            out.write_all(b"\n").map_err(|e| StoreError::Unavailable(e.to_string()))?;
        }
        Ok(())
    })
    .await?;
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

async fn dead_letters<S: StateStore>(action: DlqAction, store: &S) -> anyhow::Result<ExitCode> {
    use DlqAction;
    match action {
        DlqAction::Dump => print_ndjson(store.dead_letters().await?)?,
        DlqAction::Remove { shard, position, all } => {
            let position = match position {
                // As the log prints it: `SEQUENCE` or `SEQUENCE/SUB`.
                Some(p) => {
                    let (sequence, sub) = p.split_once('/').unwrap_or((p.as_str(), "0"));
                    match (sequence.bytes().all(|b| b.is_ascii_digit()) && !sequence.is_empty(), sub.parse::<u64>()) {
                        (true, Ok(sub)) => Some(stockflow_state::Position { sequence: sequence.to_string(), sub }),
                        _ => bail!("--position {p:?}: expected SEQUENCE or SEQUENCE/SUB (digits)"),
                    }
                }
                None => None,
            };
            let n = store
                .remove_dead_letters(&|d| {
                    all || (shard.as_deref() == Some(d.shard.as_str())
                        && position.as_ref().is_none_or(|p| *p == d.position))
                })
                .await?;
            println!("{n} dead letters removed");
            if n == 0 && !all {
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn verify(args: VerifyArgs, settings: Settings) -> anyhow::Result<ExitCode> {
    let buf = read_lines(&args.events)?;
    let expected = straight_pass(Arc::clone(&settings.engine), lines(&buf));
    let actual = with_store!(settings, args.store, |store| Outcome::of_store(&store).await?);
    let diff = expected.diff(&actual, args.max_diff);
    if diff.is_empty() {
        println!(
            "verified: {} SKUs, {} alerts and {} dead letters equal the straight pass over {}",
            actual.skus.len(),
            actual.alerts.len(),
            actual.dead_letters,
            args.events.display()
        );
        Ok(ExitCode::SUCCESS)
    } else {
        println!("MISMATCH against the straight pass over {}:", args.events.display());
        for line in diff {
            println!("  {line}");
        }
        Ok(ExitCode::FAILURE)
    }
}

#[derive(Debug, clap::Args)]
pub struct DumpArgs {
    #[command(subcommand)]
    pub action: DumpAction,
    #[command(flatten)]
    pub store: StoreArgs,
}

#[derive(Debug, clap::Subcommand)]
pub enum DumpAction {
    /// Write every record as one JSON line to stdout.
    Dump,
}

#[derive(Debug, clap::Args)]
pub struct DlqArgs {
    #[command(subcommand)]
    pub action: DlqAction,
    #[command(flatten)]
    pub store: StoreArgs,
}

#[derive(Debug, clap::Subcommand)]
pub enum DlqAction {
    /// Write every dead letter as one JSON line to stdout.
    Dump,
    /// Remove dead letters (they are kept until removed): one by `--shard` and `--position`, a
    /// shard's by `--shard`, or `--all`. Run it while stockflow is stopped on the embedded store.
    Remove {
        /// The shard.
        #[arg(long, required_unless_present = "all")]
        shard: Option<String>,
        /// The record's position: its `position.sequence` from `dlq dump` (`SEQUENCE/SUB` for a
        /// sub-record of an aggregated Kinesis record).
        #[arg(long, requires = "shard")]
        position: Option<String>,
        /// Every dead letter.
        #[arg(long, conflicts_with_all = ["shard", "position"])]
        all: bool,
    },
}

/// `stockflow state dump`.
pub async fn state_dump(args: DumpArgs, settings: Settings) -> anyhow::Result<ExitCode> {
    with_store!(settings, args.store, |store| dump_states(&store).await)
}

/// `stockflow alerts dump`.
pub async fn alerts_dump(args: DumpArgs, settings: Settings) -> anyhow::Result<ExitCode> {
    with_store!(settings, args.store, |store| dump_alerts(&store).await)
}

/// `stockflow dlq dump | remove`.
pub async fn dlq(args: DlqArgs, settings: Settings) -> anyhow::Result<ExitCode> {
    let action = args.action;
    with_store!(settings, args.store, |store| dead_letters(action, &store).await)
}
