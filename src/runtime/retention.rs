//! Retention: what a long-running deployment deletes, and when (`[retention]`).
//!
//! - **Stream** (embedded log): a closed segment is deleted once the shard's checkpoint is past
//!   it and it was last written at least `retention.stream` ago. (Connectors read the outbox in
//!   the state store, never the log, so the checkpoint is the only reader the log has.)
//! - **Delivered effects** (outbox): a row is removed (embedded) or set to expire (DynamoDB TTL)
//!   once every connector this process runs has delivered it and it was written at least
//!   `retention.delivered` ago. A connector that has delivered nothing of a shard keeps that
//!   shard's whole outbox.
//! - **Dead letters** (records and connector requests) stay until an operator removes them
//!   (`stockflow dlq remove`, `stockflow outbox drop`).
//!
//! `"0s"` means as soon as possible. Sweeps run every `retention.sweep_every` and once more when
//! a process finishes delivering.

use std::time::Duration;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use stockflow_pipeline::log::EmbeddedLog;
use stockflow_state::outbox::{OutboxStore, delivered_by_all};
use stockflow_state::{StateStore, StoreError};
use tokio::sync::watch;

/// `[retention]` as written in the config file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionSection {
    /// Keep consumed log segments this long (`"7d"`, `"12h"`, `"30m"`, `"0s"`).
    pub stream: String,
    /// Keep delivered effects this long.
    pub delivered: String,
    /// How often to sweep.
    pub sweep_every: String,
    /// Size at which the embedded log starts a new segment, MiB (1 to 1024).
    pub segment_mib: u64,
}

impl Default for RetentionSection {
    fn default() -> Self {
        RetentionSection { stream: "7d".into(), delivered: "7d".into(), sweep_every: "1m".into(), segment_mib: 8 }
    }
}

/// Validated retention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Minimum age of a consumed log segment before it is deleted.
    pub stream: Duration,
    /// Minimum age of a delivered outbox row before it is removed.
    pub delivered: Duration,
    /// Pause between sweeps.
    pub sweep_every: Duration,
    /// Segment size of the embedded log, bytes.
    pub segment_bytes: u64,
}

impl Default for Retention {
    fn default() -> Self {
        RetentionSection::default().validate().unwrap_or(Retention {
            stream: Duration::from_secs(7 * 86_400),
            delivered: Duration::from_secs(7 * 86_400),
            sweep_every: Duration::from_secs(60),
            segment_bytes: 8 << 20,
        })
    }
}

/// Parses `"500ms"`, `"0s"`, `"30m"`, `"12h"`, `"7d"`.
pub fn parse_duration(text: &str) -> anyhow::Result<Duration> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits.parse().with_context(|| format!("{text:?}: expected a number and a unit (ms, s, m, h, d)"))?;
    let ms = match unit {
        "ms" => Some(n),
        "s" => n.checked_mul(1_000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        "d" => n.checked_mul(86_400_000),
        _ => bail!("{text:?}: unit must be ms, s, m, h or d"),
    };
    ms.map(Duration::from_millis).with_context(|| format!("{text:?} is too long"))
}

impl RetentionSection {
    /// Checks the section.
    pub fn validate(&self) -> anyhow::Result<Retention> {
        let year = Duration::from_secs(366 * 86_400);
        let field = |name: &str, v: &str| -> anyhow::Result<Duration> {
            let d = parse_duration(v).with_context(|| format!("retention.{name}"))?;
            if d > 10 * year {
                bail!("retention.{name} = {v:?}: at most 10 years");
            }
            Ok(d)
        };
        let sweep_every = field("sweep_every", &self.sweep_every)?;
        if !(Duration::from_millis(100)..=Duration::from_secs(86_400)).contains(&sweep_every) {
            bail!("retention.sweep_every = {:?}: must be 100ms to 1d", self.sweep_every);
        }
        crate::runtime::config::in_range("retention.segment_mib", self.segment_mib, 1, 1024)?;
        Ok(Retention {
            stream: field("stream", &self.stream)?,
            delivered: field("delivered", &self.delivered)?,
            sweep_every,
            segment_bytes: self.segment_mib << 20,
        })
    }
}

/// What one sweep removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Swept {
    /// Log segments deleted.
    pub segments: u64,
    /// Their bytes.
    pub segment_bytes: u64,
    /// Outbox rows removed (embedded) or set to expire (DynamoDB).
    pub outbox_rows: u64,
}

/// Sweeps the delivered outbox rows of `shards`.
pub async fn sweep_outbox<S: OutboxStore>(
    store: &S,
    shards: &[String],
    connectors: &[&str],
    retention: &Retention,
) -> Result<u64, StoreError> {
    let before = stockflow_state::now_ms() - i64::try_from(retention.delivered.as_millis()).unwrap_or(i64::MAX);
    let mut rows = 0;
    for shard in shards {
        let through = delivered_by_all(store, shard, connectors).await?;
        rows += store.prune_delivered(shard, &through, before).await?;
    }
    if rows > 0 {
        metrics::counter!("stockflow_outbox_rows_pruned_total").increment(rows);
    }
    Ok(rows)
}

/// One sweep of the embedded backend: consumed log segments and delivered outbox rows.
pub async fn sweep_embedded<S: StateStore + OutboxStore>(
    log: &EmbeddedLog,
    store: &S,
    connectors: &[&str],
    retention: &Retention,
) -> anyhow::Result<Swept> {
    let mut swept = Swept::default();
    let checkpoints = store.checkpoints().await?;
    for (shard, checkpoint) in &checkpoints {
        let t = log.trim(shard, checkpoint, retention.stream)?;
        swept.segments += t.segments;
        swept.segment_bytes += t.bytes;
    }
    let shards: Vec<String> = checkpoints.into_iter().map(|(s, _)| s).collect();
    swept.outbox_rows = sweep_outbox(store, &shards, connectors, retention).await?;
    if swept != Swept::default() {
        tracing::debug!(?swept, "retention sweep");
    }
    Ok(swept)
}

/// Sweeps the embedded backend at once and then every `retention.sweep_every` until `shutdown`
/// (the first sweep at once: a restart removes what the previous process left consumed).
pub fn spawn_embedded<S: StateStore + OutboxStore>(
    log: EmbeddedLog,
    store: std::sync::Arc<S>,
    connectors: Vec<&'static str>,
    retention: Retention,
    shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    repeat(retention.sweep_every, true, shutdown, move || {
        let (log, store, connectors) = (log.clone(), std::sync::Arc::clone(&store), connectors.clone());
        async move { sweep_embedded(&log, &*store, &connectors, &retention).await.map(|_| ()) }
    })
}

/// A consumer-group member's sweeps: the outboxes of the lanes its coordinator assigns it (its
/// shards and the ended ancestors it delivers), every `retention.sweep_every`, until `shutdown`.
/// The stream (Kinesis) keeps its own retention.
pub fn spawn_group<S: OutboxStore>(
    store: std::sync::Arc<S>,
    assignment: watch::Receiver<std::sync::Arc<stockflow_state::lease::Assignment>>,
    connectors: Vec<&'static str>,
    retention: Retention,
    shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    repeat(retention.sweep_every, false, shutdown, move || {
        let shards: Vec<String> = assignment.borrow().lanes.keys().cloned().collect();
        let (store, connectors) = (std::sync::Arc::clone(&store), connectors.clone());
        async move { Ok(sweep_outbox(&*store, &shards, &connectors, &retention).await.map(|_| ())?) }
    })
}

/// Runs `sweep` every `every` (first at once when `now`) until `shutdown`; a failed sweep is
/// logged and retried at the next.
fn repeat<F, Fut>(
    every: Duration,
    now: bool,
    mut shutdown: watch::Receiver<bool>,
    mut sweep: F,
) -> tokio::task::JoinHandle<()>
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    tokio::spawn(async move {
        let mut wait = !now;
        loop {
            if wait {
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = shutdown.wait_for(|s| *s) => return,
                }
            }
            wait = true;
            if let Err(e) = sweep().await {
                tracing::warn!(error = %format!("{e:#}"), "retention sweep failed; retrying at the next");
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_and_bad_ones_name_the_field() {
        assert_eq!(parse_duration("0s").unwrap(), Duration::ZERO);
        assert_eq!(parse_duration("7d").unwrap(), Duration::from_secs(7 * 86_400));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("90m").unwrap(), Duration::from_secs(5_400));
        assert!(parse_duration("7").is_err());
        assert!(parse_duration("d").is_err());
        assert!(parse_duration("99999999999999999999d").is_err());
        let bad = RetentionSection { stream: "soon".into(), ..RetentionSection::default() };
        assert!(format!("{:#}", bad.validate().unwrap_err()).contains("retention.stream"));
        let r = RetentionSection::default().validate().unwrap();
        assert_eq!(r.stream, Duration::from_secs(7 * 86_400));
        assert_eq!(r.segment_bytes, 8 << 20);
    }
}
