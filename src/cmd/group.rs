//! `stockflow group status`: the consumer group's shards, owners, epochs and lag from the lease table.

use std::process::ExitCode;

use anyhow::Context;

use crate::cmd::store::StoreArgs;
use crate::runtime::config::Settings;

/// Arguments of `stockflow group`.
#[derive(Debug, clap::Args)]
pub struct GroupArgs {
    #[command(subcommand)]
    action: GroupAction,
    #[command(flatten)]
    store: StoreArgs,
}

#[derive(Debug, clap::Subcommand)]
enum GroupAction {
    /// One line per shard: state (live, ended, free), owner, epoch, checkpoint, last commit's
    /// age and the reader's lag then, parents and children.
    Status,
}

/// `stockflow group status`: the lease table, read consistently, one line per shard.
pub async fn run(args: GroupArgs, settings: Settings) -> anyhow::Result<ExitCode> {
    let GroupAction::Status = args.action;
    let store = args.store.dynamo(&settings).await;
    let rows = store.group_status().await.context("reading the lease table")?;
    let now = stockflow_state::now_ms();
    println!(
        "{:<24} {:<6} {:<40} {:>17} {:<28} {:>10} {:>9}  lineage",
        "shard", "state", "owner", "epoch", "checkpoint", "committed", "lag"
    );
    let mut owners = std::collections::BTreeSet::new();
    for r in &rows {
        let l = &r.lease;
        let state = if l.ended {
            "ended"
        } else if l.owner.is_some() {
            "live"
        } else {
            "free"
        };
        if !l.ended
            && let Some(o) = &l.owner
        {
            owners.insert(o.clone());
        }
        let checkpoint = l.checkpoint.as_ref().map_or_else(|| "-".to_string(), ToString::to_string);
        let checkpoint =
            if checkpoint.len() > 28 { format!("…{}", &checkpoint[checkpoint.len() - 27..]) } else { checkpoint };
        let committed =
            r.committed_at_ms.map_or_else(|| "-".to_string(), |t| format!("{:.1}s ago", (now - t) as f64 / 1000.0));
        let lag = r.lag_ms.map_or_else(|| "-".to_string(), |ms| format!("{:.1}s", ms as f64 / 1000.0));
        let mut lineage = String::new();
        if !l.parents.is_empty() {
            lineage.push_str(&format!("parents {}", l.parents.join(",")));
        }
        if !l.children.is_empty() {
            lineage.push_str(&format!(
                "{}children {}",
                if lineage.is_empty() { "" } else { "; " },
                l.children.join(",")
            ));
        }
        println!(
            "{:<24} {:<6} {:<40} {:>17} {:<28} {:>10} {:>9}  {lineage}",
            l.key,
            state,
            l.owner.as_deref().unwrap_or("-"),
            l.epoch,
            checkpoint,
            committed,
            lag
        );
    }
    println!("{} shards, {} live members", rows.len(), owners.len());
    Ok(ExitCode::SUCCESS)
}
