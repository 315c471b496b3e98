//! `stockflow outbox status | dead-letters | retry`: the connectors' delivery.

use std::process::ExitCode;

use crate::cmd::store::{StoreArgs, with_store};
use crate::loadtest::ndjson::print_ndjson;
use crate::runtime::config::Settings;
use crate::runtime::open_store;

/// Arguments of `stockflow outbox`.
#[derive(Debug, clap::Args)]
pub struct OutboxArgs {
    #[command(subcommand)]
    action: OutboxAction,
    #[command(flatten)]
    store: StoreArgs,
}

#[derive(Debug, clap::Subcommand)]
enum OutboxAction {
    /// Per connector and shard: the delivery cursor, the request in flight, effects not yet
    /// delivered, and dead letters.
    Status,
    /// Print the connectors' dead letters (requests given up, with the last error) as NDJSON.
    DeadLetters {
        /// Only this connector (`alerts-webhook`, `manufacturer`, `accounting`, `log`, `feed`).
        #[arg(long)]
        connector: Option<String>,
    },
    /// Flag dead letters for another delivery: the next `run`/`consume` re-sends each under its
    /// own idempotency key (run it while stockflow is stopped: the store is one process's).
    Retry {
        /// Only this connector.
        #[arg(long)]
        connector: Option<String>,
    },
    /// Remove connector dead letters for good (dealt with by hand): one by `--key`, a connector's,
    /// or `--all`.
    Drop {
        /// Only this connector.
        #[arg(long, required_unless_present = "all")]
        connector: Option<String>,
        /// Only the request with this idempotency key.
        #[arg(long, requires = "connector")]
        key: Option<String>,
        /// Every connector dead letter.
        #[arg(long, conflicts_with_all = ["connector", "key"])]
        all: bool,
    },
}

async fn outbox<S: stockflow_state::outbox::OutboxStore>(
    args: OutboxArgs,
    settings: &Settings,
    store: &S,
) -> anyhow::Result<ExitCode> {
    use stockflow_state::outbox::requeue_dead_letters;
    match args.action {
        OutboxAction::Status => {
            let dead = store.connector_dead_letters(None).await?;
            for name in settings.connectors.names() {
                for shard in store.outbox_shards().await? {
                    let cursor = store.cursor(name, &shard).await?;
                    // Counted page by page: a connector far behind must not load its backlog.
                    let mut behind = 0usize;
                    let mut after = cursor.delivered.clone();
                    loop {
                        let page = store.read_outbox(&shard, after.as_ref(), stockflow_state::outbox::PAGE).await?;
                        let Some(last) = page.last() else { break };
                        after = Some(last.pos.clone());
                        behind += page.len();
                    }
                    let flight = cursor.in_flight.as_ref().map_or_else(
                        || "-".to_string(),
                        |f| {
                            format!(
                                "{} ({} effects, {} failed attempts)",
                                f.request.key,
                                f.request.items.len(),
                                f.attempts
                            )
                        },
                    );
                    let dl = dead.iter().filter(|d| d.connector == name && d.shard == shard).count();
                    println!(
                        "{name:<15} {shard:<10} effects after the cursor {behind:>8}  in flight {flight}  dead letters {dl}"
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        OutboxAction::DeadLetters { connector } => {
            print_ndjson(store.connector_dead_letters(connector.as_deref()).await?)?;
            Ok(ExitCode::SUCCESS)
        }
        OutboxAction::Drop { connector, key, all } => {
            let mut n = 0;
            for d in store.connector_dead_letters(connector.as_deref()).await? {
                if all || key.as_deref().is_none_or(|k| k == d.request.key) {
                    store.remove_dead_letter(&d.connector, &d.shard, &d.request.key, None).await?;
                    n += 1;
                }
            }
            println!("{n} connector dead letters removed");
            Ok(if n == 0 && !all { ExitCode::FAILURE } else { ExitCode::SUCCESS })
        }
        OutboxAction::Retry { connector } => {
            let n = requeue_dead_letters(store, connector.as_deref()).await?;
            println!(
                "{n} dead letters flagged for another delivery (re-sent by the next `stockflow run` or `consume`; \
                 in a consumer group, by the member that delivers the shard)"
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `stockflow outbox …` on the store the flags name.
pub async fn run(args: OutboxArgs, settings: Settings) -> anyhow::Result<ExitCode> {
    let store_args = args.store.clone();
    with_store!(settings, store_args, |store| outbox(args, &settings, &store).await)
}
