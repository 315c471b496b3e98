//! The outbox as connectors read it: effects of one shard after a position, a delivery cursor per
//! (connector, shard), and the connector dead letters (SPEC §4).
//!
//! A connector renders a batch of effects into one request (idempotency key + body) and saves it
//! as the cursor's `in_flight` **before** sending it. A restart re-sends exactly those bytes under
//! that key until the receiver decides, so a batch regrouped after a crash can never go out under
//! a second key. Delivered → the cursor moves to `through` and `in_flight` is cleared, in one write.
//!
//! In a consumer group, every write of a lane carries a [`Fence`]: the lease (and its epoch) that
//! entitles this process to deliver the shard. A store that is shared (DynamoDB) writes only while
//! that lease still has that epoch, so a member that lost the lease cannot write a cursor, an
//! in-flight request or a dead letter; and no write moves a cursor backwards.

use std::future::Future;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::effects::codec::{RawEffect, RowEffects};
use crate::effects::{Effect, EffectKinds};
use crate::store::StoreError;

/// A position in a shard's outbox: the row (one commit, or one commit part on DynamoDB) and the
/// line within it. Ordered by `(row, line)`; rows are fixed-width or order-preserving strings.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct OutboxPos {
    /// The row key (embedded: 20-digit batch number; DynamoDB: `{checkpointKey}#{part}`), shared
    /// by the entries read from one row.
    pub row: Arc<str>,
    /// The effect's line in the row.
    pub line: u32,
}

impl OutboxPos {
    /// A string that sorts like the position (rows are fixed-width or order-preserving).
    pub fn sort_key(&self) -> String {
        format!("{}#{:010}", self.row, self.line)
    }
}

/// What entitles a drain lane to write: holding `lease` at `epoch`. For a live shard the lease is
/// the shard's own; for an ended parent it is the lease of the descendant whose owner delivers
/// the parent's outbox (docs/consumer-group.md, "Delivery").
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Fence {
    /// The lease key (a shard id).
    pub lease: String,
    /// Its epoch when this process took it.
    pub epoch: u64,
}

/// One effect read from the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEntry {
    /// Where it is.
    pub pos: OutboxPos,
    /// The effect.
    pub effect: Effect,
}

/// One rendered request: what is sent, verbatim, until the receiver decides.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// The idempotency key (deterministic from the connector and the effect ids).
    pub key: String,
    /// The body (UTF-8 JSON for every connector stockflow has).
    pub body: String,
    /// Ids of the effects it carries, in outbox order.
    pub items: Vec<String>,
}

/// A request sent (or about to be) and not yet acknowledged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InFlight {
    /// The request.
    pub request: Request,
    /// The last outbox position the request covers (skipped effects included).
    pub through: OutboxPos,
    /// Failed attempts so far (throttling and an open circuit do not count).
    pub attempts: u32,
    /// The last failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// A connector's progress through one shard's outbox.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Cursor {
    /// Everything up to and including this position is delivered (or dead-lettered).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivered: Option<OutboxPos>,
    /// The request being delivered, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_flight: Option<InFlight>,
}

/// A stored [`Cursor`] read for its position alone: the in-flight request (up to a connector's
/// `max_bytes`, with its item ids) is skipped by the parser, not built, when a write only needs
/// to check that the cursor does not move backwards.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
pub struct CursorPosition {
    /// As [`Cursor::delivered`].
    #[serde(default)]
    pub delivered: Option<OutboxPos>,
}

/// A request a connector gave up on: rejected by the receiver, or failing past the attempt limit.
/// `stockflow outbox retry` flags it `requeued`; the drain then re-sends it under its own key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectorDeadLetter {
    /// The connector.
    pub connector: String,
    /// The shard whose outbox it came from.
    pub shard: String,
    /// The request, as sent.
    pub request: Request,
    /// Failed attempts.
    pub attempts: u32,
    /// Why it was given up.
    pub last_error: String,
    /// When (Unix milliseconds).
    pub at_ms: i64,
    /// Flagged for another delivery.
    #[serde(default)]
    pub requeued: bool,
    /// False when the connector could not render it: `request.body` then holds the effect as
    /// JSON, rendered again when it is requeued.
    #[serde(default = "yes")]
    pub rendered: bool,
}

fn yes() -> bool {
    true
}

/// The outbox and delivery bookkeeping of a state store.
pub trait OutboxStore: Send + Sync + 'static {
    /// Every shard that has an outbox.
    fn outbox_shards(&self) -> impl Future<Output = Result<Vec<String>, StoreError>> + Send;

    /// Effects of `shard` strictly after `after`, in commit order, at most `max` (fewer only
    /// when the outbox ends there).
    fn read_outbox(
        &self,
        shard: &str,
        after: Option<&OutboxPos>,
        max: usize,
    ) -> impl Future<Output = Result<Vec<OutboxEntry>, StoreError>> + Send {
        async move { Ok(self.scan_outbox(shard, after, max, EffectKinds::ALL).await?.entries) }
    }

    /// Goes over at most `max` effects of `shard` strictly after `after`, in commit order (fewer
    /// only when the outbox ends there), and returns those of `kinds`: effects of other kinds
    /// are counted and passed, not decoded.
    fn scan_outbox(
        &self,
        shard: &str,
        after: Option<&OutboxPos>,
        max: usize,
        kinds: EffectKinds,
    ) -> impl Future<Output = Result<OutboxScan, StoreError>> + Send;

    /// The connector's cursor in `shard` (default: nothing delivered).
    fn cursor(&self, connector: &str, shard: &str) -> impl Future<Output = Result<Cursor, StoreError>> + Send;

    /// Writes the cursor and, in the same atomic write, a new dead letter. With a fence, only
    /// while the fence's lease still has its epoch ([`StoreError::Fenced`] otherwise). A cursor
    /// whose `delivered` is before the stored one is refused ([`StoreError::CursorRegression`]).
    fn save_cursor(
        &self,
        connector: &str,
        shard: &str,
        cursor: &Cursor,
        dead: Option<&ConnectorDeadLetter>,
        fence: Option<&Fence>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Every connector dead letter (of one connector, or all), by connector, shard and key.
    fn connector_dead_letters(
        &self,
        connector: Option<&str>,
    ) -> impl Future<Output = Result<Vec<ConnectorDeadLetter>, StoreError>> + Send;

    /// Inserts or replaces a dead letter (keyed by connector, shard and request key); with a
    /// fence, only while its lease has its epoch.
    fn put_dead_letter(
        &self,
        dead: &ConnectorDeadLetter,
        fence: Option<&Fence>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Removes a dead letter once its request was delivered; with a fence, only while its lease
    /// has its epoch.
    fn remove_dead_letter(
        &self,
        connector: &str,
        shard: &str,
        key: &str,
        fence: Option<&Fence>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Retention of delivered effects: removes (embedded) or sets to expire (DynamoDB TTL) the
    /// outbox rows of `shard` before `through` (rows wholly delivered by every connector, see
    /// [`delivered_by_all`]) that were written at or before `written_before_ms` (Unix ms). Rows
    /// are taken oldest first and the first one too young stops the sweep. Returns how many rows
    /// were removed or marked.
    fn prune_delivered(
        &self,
        shard: &str,
        through: &Delivered,
        written_before_ms: i64,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;
}

/// Effects read per page by [`for_each_effect`].
pub const PAGE: usize = 1_000;

/// Calls `f` with every effect retention has kept, shard by shard in outbox order, one page of
/// [`PAGE`] effects in memory at a time (never the whole outbox).
pub async fn for_each_effect<S: OutboxStore>(
    store: &S,
    mut f: impl FnMut(&str, OutboxEntry) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    for shard in store.outbox_shards().await? {
        let mut after: Option<OutboxPos> = None;
        loop {
            let page = store.read_outbox(&shard, after.as_ref(), PAGE).await?;
            let Some(last) = page.last() else { break };
            after = Some(last.pos.clone());
            for entry in page {
                f(&shard, entry)?;
            }
        }
    }
    Ok(())
}

/// How far every connector delivered one shard's outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivered {
    /// No connector reads the outbox: every row counts as delivered.
    All,
    /// Every connector delivered at least up to this position: rows before its row are done.
    Before(OutboxPos),
    /// Some connector delivered nothing yet.
    Nothing,
}

/// The least progress of `connectors` through `shard`'s outbox (their cursors' `delivered`).
pub async fn delivered_by_all<S: OutboxStore>(
    store: &S,
    shard: &str,
    connectors: &[&str],
) -> Result<Delivered, StoreError> {
    let mut least: Option<OutboxPos> = None;
    for connector in connectors {
        let Some(pos) = store.cursor(connector, shard).await?.delivered else {
            return Ok(Delivered::Nothing);
        };
        if least.as_ref().is_none_or(|l| pos < *l) {
            least = Some(pos);
        }
    }
    Ok(least.map_or(Delivered::All, Delivered::Before))
}

/// Flags the dead letters of `connector` (or all) for another delivery; returns how many.
pub async fn requeue_dead_letters<S: OutboxStore>(store: &S, connector: Option<&str>) -> Result<usize, StoreError> {
    let mut n = 0;
    for mut dead in store.connector_dead_letters(connector).await? {
        if !dead.requeued {
            dead.requeued = true;
            store.put_dead_letter(&dead, None).await?;
            n += 1;
        }
    }
    Ok(n)
}

/// What [`OutboxStore::scan_outbox`] found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OutboxScan {
    /// The effects of the kinds asked for, in order.
    pub entries: Vec<OutboxEntry>,
    /// The last effect gone over, of any kind (`None`: none was).
    pub through: Option<OutboxPos>,
    /// Effects gone over, of any kind.
    pub scanned: usize,
}

/// Goes over one outbox row ([`codec`](crate::effects::codec): binary effects, or JSON lines in
/// rows written before) after `skip_through` (an effect's index in the row, its "line"), until
/// `scan` went over `max` effects (a row can hold a whole commit: tens of thousands of effects),
/// keeping the effects of `kinds`. Skipped effects and binary effects of other kinds are not
/// decoded.
pub(crate) fn row_entries(
    row: &str,
    bytes: &[u8],
    skip_through: Option<u32>,
    max: usize,
    kinds: EffectKinds,
    scan: &mut OutboxScan,
) -> Result<(), StoreError> {
    let corrupt = |e: String| StoreError::Corrupt(format!("outbox row {row}: {e}"));
    let shared: Arc<str> = row.into();
    let mut last = None;
    for (line, raw) in RowEffects::new(bytes).enumerate() {
        let line = u32::try_from(line).map_err(|_| StoreError::Corrupt(format!("outbox row {row} too long")))?;
        let raw = raw.map_err(corrupt)?;
        if skip_through.is_some_and(|s| line <= s) {
            continue;
        }
        if scan.scanned >= max {
            break;
        }
        scan.scanned += 1;
        last = Some(line);
        if raw.kind().is_none_or(|k| kinds.contains(k)) {
            let effect = raw.decode().map_err(corrupt)?;
            if kinds.contains(effect.kind()) {
                scan.entries.push(OutboxEntry { pos: OutboxPos { row: Arc::clone(&shared), line }, effect });
            }
        }
    }
    if let Some(line) = last {
        scan.through = Some(OutboxPos { row: shared, line });
    }
    Ok(())
}

/// Every effect of one outbox row, decoded.
pub(crate) fn row_effects(row: &[u8], out: &mut Vec<Effect>) -> Result<(), StoreError> {
    for raw in RowEffects::new(row) {
        out.push(raw.and_then(RawEffect::decode).map_err(|e| StoreError::Corrupt(format!("an outbox row: {e}")))?);
    }
    Ok(())
}
