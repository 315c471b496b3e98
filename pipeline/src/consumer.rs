//! Running every shard of a source in this process: one task per shard, one shutdown signal.
//! (The embedded deployment owns all shards; the DynamoDB lease coordinator assigns shards to
//! the processes of a consumer group.)

use std::sync::Arc;

use stockflow_state::{EngineConfig, StateStore};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::source::StreamSource;
use crate::worker::{Progress, ShardWorker, WorkerConfig, WorkerError, WorkerReport};

/// Runs a worker for every shard of `source` until each shard ends or `shutdown` turns true.
/// Returns the workers' reports, sorted by shard. The first failure stops the others.
pub async fn run_all_shards<Src: StreamSource, S: StateStore>(
    source: &Src,
    store: Arc<S>,
    engine_cfg: Arc<EngineConfig>,
    cfg: WorkerConfig,
    shutdown: watch::Receiver<bool>,
    progress: Arc<Progress>,
) -> Result<Vec<WorkerReport>, WorkerError> {
    let mut tasks = JoinSet::new();
    for shard in source.shards().await? {
        let worker = ShardWorker::start(
            source,
            &shard,
            Arc::clone(&store),
            Arc::clone(&engine_cfg),
            cfg,
            0,
            Arc::clone(&progress),
        )
        .await?;
        tasks.spawn(worker.run(shutdown.clone()));
    }
    let mut reports = Vec::new();
    let mut first_error = None;
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(Ok(report)) => reports.push(report),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "shard worker failed");
                first_error.get_or_insert(e);
                tasks.abort_all();
            }
            Err(join) if join.is_cancelled() => {}
            Err(join) => std::panic::resume_unwind(join.into_panic()),
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    reports.sort_by(|a, b| a.shard.cmp(&b.shard));
    Ok(reports)
}
