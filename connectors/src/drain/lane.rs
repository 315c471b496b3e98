//! One lane of a drain: a shard's outbox delivered in order — scan after the cursor, batch and
//! render, save in flight, send, and decide (advance, split, retry, dead-letter) — and the
//! re-sending of dead letters an operator requeued.

use std::collections::HashMap;
use std::time::Duration;

use stockflow_state::book::BookStore;
use stockflow_state::lease::LaneGrant;
use stockflow_state::outbox::{ConnectorDeadLetter, Cursor, Fence, InFlight, OutboxEntry, OutboxPos, Request};
use stockflow_state::{Effect, StoreError};
use tokio::time::Instant;
use tracing::Instrument as _;

use crate::connector::{Connector, Delivered, DeliveryError, request_key};

use super::*;

impl<S: BookStore, C: Connector> Drain<S, C> {
    /// Delivers one shard's outbox in order, under `grant` (`None`: unfenced).
    pub(super) async fn lane(
        &self,
        shard: &str,
        grant: Option<&LaneGrant>,
        ctl: &DrainControl,
    ) -> Result<LaneEnd, StoreError> {
        let fence = grant.map(|g| &g.fence);
        let ended = grant.is_some_and(|g| g.ended);
        if let Some(g) = grant
            && !g.after.is_empty()
        {
            // A reshard: the parents' effects of the same SKUs go first.
            let mut waited = false;
            while !self.delivered(&g.after).await? {
                if !waited {
                    tracing::info!(connector = self.name(), shard, parents = ?g.after, "waiting for the parents' outboxes to be delivered");
                    waited = true;
                }
                if !self.wait_lane(self.cfg.idle_poll.max(Duration::from_millis(500)), ctl, shard, fence).await {
                    return Ok(LaneEnd::Stopped);
                }
            }
        }
        if let Some(summary) = self.connector.summary() {
            return self.fold_lane(shard, grant, ctl, summary).await;
        }
        let policy = self.connector.policy().clone();
        let mut backoff = Backoff::new(policy.backoff, xxhash_rust::xxh3::xxh3_64(shard.as_bytes()));
        // Read after the grant was established: a write of a previous holder either happened
        // before (and is read here) or is refused by the fence.
        let mut cursor = self.store.cursor(self.name(), shard).await?;
        let mut pending_since: Option<Instant> = None;
        // After a rejection, effects up to here are sent one by one to find the refused one.
        let mut single_until: Option<OutboxPos> = None;
        // The cursor moved past a delivered request but was not written yet.
        let mut unsaved = false;
        loop {
            if ctl.stopping() || !self.lanes.holds(shard, fence) {
                if unsaved {
                    self.save(shard, &cursor, fence).await?;
                }
                return Ok(LaneEnd::Stopped);
            }
            // Taken, not cloned (a request is up to `max_bytes`): every arm below leaves the
            // cursor as it should be, or returns.
            if let Some(mut flight) = cursor.in_flight.take() {
                if flight.attempts > 0 {
                    self.count(&self.stats.retried, "stockflow_connector_retried_total", 1);
                }
                match self.deliver(shard, fence, &flight.request, ctl).await {
                    Outcome::Stopped => return Ok(LaneEnd::Stopped),
                    Outcome::Delivered(d) => {
                        self.dead_letter_items(shard, fence, cursor.delivered.as_ref(), &flight, &d).await?;
                        let n = flight.request.items.len() as u64;
                        self.count(&self.stats.effects, "stockflow_connector_effects_delivered_total", n);
                        // Saved with the next in-flight request (one write per request): a crash
                        // before that re-sends this one, which its key makes harmless.
                        cursor = Cursor { delivered: Some(flight.through), in_flight: None };
                        unsaved = true;
                    }
                    Outcome::Rejected(reason) if flight.request.items.len() > 1 => {
                        tracing::warn!(connector = self.name(), shard, key = %flight.request.key, %reason,
                            "batch rejected: sending its effects one by one");
                        single_until = Some(flight.through);
                        cursor.in_flight = None;
                        self.save(shard, &cursor, fence).await?;
                    }
                    Outcome::Rejected(reason) => {
                        flight.attempts += 1;
                        cursor = self.give_up(shard, fence, flight, reason).await?;
                    }
                    Outcome::Failed(reason, retry_after) => {
                        flight.attempts += 1;
                        flight.last_error = Some(reason.clone());
                        if flight.attempts >= policy.max_attempts {
                            cursor = self.give_up(shard, fence, flight, reason).await?;
                            continue;
                        }
                        let wait =
                            backoff.delay(flight.attempts - 1).max(retry_after.unwrap_or_default().min(MAX_PAUSE));
                        tracing::debug!(connector = self.name(), shard, attempts = flight.attempts, ?wait, %reason, "delivery failed");
                        cursor.in_flight = Some(flight);
                        self.save(shard, &cursor, fence).await?;
                        if !self.wait_lane(wait, ctl, shard, fence).await {
                            return Ok(LaneEnd::Stopped);
                        }
                    }
                }
                continue;
            }

            let single = single_until.as_ref().is_some_and(|u| cursor.delivered.as_ref() < Some(u));
            if !single {
                single_until = None;
            }
            let max = if single { 1 } else { policy.max_batch.max(1) };
            // Read before the scan: finishing is set after the consumers' last commit, so a scan
            // that began after it and found nothing has seen everything. (Read after the scan,
            // a commit between the two would be left undelivered.)
            let finishing = ctl.finishing();
            let (entries, through, ended_here) = self.scan(shard, cursor.delivered.as_ref(), max).await?;
            let Some(through) = through else {
                if unsaved {
                    self.save(shard, &cursor, fence).await?;
                    unsaved = false;
                }
                if ended {
                    // An ended shard's outbox does not grow: delivered for good.
                    return Ok(LaneEnd::Done);
                }
                if finishing {
                    return Ok(LaneEnd::Stopped);
                }
                if !self.wait_lane(self.cfg.idle_poll, ctl, shard, fence).await {
                    return Ok(LaneEnd::Stopped);
                }
                continue;
            };
            let batch: Vec<&OutboxEntry> = entries.iter().collect();
            if batch.is_empty() {
                cursor.delivered = Some(through);
                unsaved = true;
                continue;
            }
            let exhausted = ended_here && batch.len() < max;
            if exhausted && !ctl.finishing() && !single && !ended {
                let since = *pending_since.get_or_insert_with(Instant::now);
                let waited = since.elapsed();
                if waited < policy.linger {
                    if !self.wait_lane((policy.linger - waited).min(self.cfg.idle_poll), ctl, shard, fence).await {
                        return Ok(LaneEnd::Stopped);
                    }
                    continue;
                }
            }
            pending_since = None;
            let Some((request, through)) = self.render_batch(shard, fence, &mut cursor, &batch, through, ctl).await?
            else {
                continue;
            };
            cursor.in_flight = Some(InFlight { request, through, attempts: 0, last_error: None });
            self.save(shard, &cursor, fence).await?;
            unsaved = false;
        }
    }

    /// Reads the outbox after `after` for the effects this connector accepts: at most `max` of
    /// them, the last position they cover (skipped effects included; `None` when nothing new),
    /// and whether the outbox ended before `max` were found. Goes over at most `SCAN_CAP`
    /// effects; effects of other kinds are passed without being decoded, and the first read
    /// goes no further than the batch lacks (what a read returns past a full batch is read and
    /// decoded again by the next scan).
    pub(super) async fn scan(
        &self,
        shard: &str,
        after: Option<&OutboxPos>,
        max: usize,
    ) -> Result<(Vec<OutboxEntry>, Option<OutboxPos>, bool), StoreError> {
        const SCAN_CAP: usize = 50_000;
        let max = max.max(1);
        let page_max = self.cfg.read_max.max(1);
        let mut batch = Vec::new();
        let mut through: Option<OutboxPos> = None;
        let mut scanned = 0;
        loop {
            // First what the batch lacks; once effects were skipped, whole pages.
            let want = if scanned == 0 { max.min(page_max) } else { page_max };
            let page = self.store.scan_outbox(shard, through.as_ref().or(after), want, self.connector.kinds()).await?;
            for e in page.entries {
                if batch.len() == max {
                    return Ok((batch, through, false));
                }
                through = Some(e.pos.clone());
                batch.push(e);
            }
            if page.through.is_some() {
                through = page.through;
            }
            let n = page.scanned;
            scanned += n;
            if n < want {
                return Ok((batch, through, true));
            }
            if batch.len() >= max || scanned >= SCAN_CAP {
                return Ok((batch, through, false));
            }
        }
    }

    /// Renders the longest prefix of `batch` within the byte limit. `None` when nothing is
    /// ready to send (render failed transiently, or its one effect was dead-lettered).
    pub(super) async fn render_batch(
        &self,
        shard: &str,
        fence: Option<&Fence>,
        cursor: &mut Cursor,
        batch: &[&OutboxEntry],
        through: OutboxPos,
        ctl: &DrainControl,
    ) -> Result<Option<(Request, OutboxPos)>, StoreError> {
        let policy = self.connector.policy();
        let mut n = batch.len();
        let mut failures = 0;
        loop {
            let effects: Vec<&Effect> = batch[..n].iter().map(|e| &e.effect).collect();
            match self.connector.render(&effects).await {
                Ok(r) if r.body.len() > policy.max_bytes && n > 1 => n = n.div_ceil(2),
                Ok(r) => {
                    let through = if n < batch.len() { batch[n - 1].pos.clone() } else { through };
                    return Ok(Some((r, through)));
                }
                Err(DeliveryError::Rejected(_)) if n > 1 => n = 1,
                Err(DeliveryError::Rejected(reason)) => {
                    let entry = batch[0];
                    let id = entry.effect.id();
                    let request = Request {
                        key: request_key(self.name(), &[id]),
                        body: serde_json::to_string(&entry.effect).unwrap_or_default(),
                        items: vec![id.to_string()],
                    };
                    let dead = ConnectorDeadLetter {
                        connector: self.name().to_string(),
                        shard: shard.to_string(),
                        request,
                        attempts: 0,
                        last_error: format!("not rendered: {reason}"),
                        at_ms: now_ms(),
                        requeued: false,
                        rendered: false,
                    };
                    *cursor = Cursor { delivered: Some(entry.pos.clone()), in_flight: None };
                    self.store.save_cursor(self.name(), shard, cursor, Some(&dead), fence).await?;
                    self.record_dead_letter(&dead);
                    return Ok(None);
                }
                Err(e) => {
                    failures += 1;
                    tracing::warn!(connector = self.name(), shard, error = %e, "rendering failed; retrying");
                    let wait = match &e {
                        DeliveryError::Throttled { retry_after, .. } | DeliveryError::Transient { retry_after, .. } => {
                            retry_after.unwrap_or_default()
                        }
                        DeliveryError::Rejected(_) => Duration::ZERO,
                    };
                    let mut backoff = Backoff::new(policy.backoff, failures.into());
                    if !self.wait_lane(backoff.delay(failures).max(wait), ctl, shard, fence).await
                        || failures >= policy.max_attempts
                    {
                        return Ok(None);
                    }
                }
            }
        }
    }

    /// Writes the lane's cursor (fenced).
    async fn save(&self, shard: &str, cursor: &Cursor, fence: Option<&Fence>) -> Result<(), StoreError> {
        self.store.save_cursor(self.name(), shard, cursor, None, fence).await
    }

    /// Moves an in-flight request to the dead letters, advancing the cursor past it.
    pub(super) async fn give_up(
        &self,
        shard: &str,
        fence: Option<&Fence>,
        flight: InFlight,
        reason: String,
    ) -> Result<Cursor, StoreError> {
        let dead = ConnectorDeadLetter {
            connector: self.name().to_string(),
            shard: shard.to_string(),
            request: flight.request,
            attempts: flight.attempts,
            last_error: reason,
            at_ms: now_ms(),
            requeued: false,
            rendered: true,
        };
        let next = Cursor { delivered: Some(flight.through), in_flight: None };
        self.store.save_cursor(self.name(), shard, &next, Some(&dead), fence).await?;
        self.record_dead_letter(&dead);
        Ok(next)
    }

    pub(super) fn record_dead_letter(&self, dead: &ConnectorDeadLetter) {
        self.count(&self.stats.dead_lettered, "stockflow_connector_dead_lettered_total", 1);
        tracing::error!(
            connector = self.name(), shard = %dead.shard, key = %dead.request.key, effects = ?dead.request.items,
            attempts = dead.attempts, error = %dead.last_error,
            "delivery given up: dead-lettered (`stockflow outbox retry` re-sends it)"
        );
    }

    /// Items a receiver refused inside a successful answer: each is rendered alone and kept as
    /// a dead letter (not sent again until requeued).
    pub(super) async fn dead_letter_items(
        &self,
        shard: &str,
        fence: Option<&Fence>,
        delivered: Option<&OutboxPos>,
        flight: &InFlight,
        answer: &Delivered,
    ) -> Result<(), StoreError> {
        if answer.rejected.is_empty() {
            return Ok(());
        }
        let mut effects: HashMap<String, Effect> = HashMap::new();
        let mut after = delivered.cloned();
        'read: loop {
            let entries = self.store.read_outbox(shard, after.as_ref(), self.cfg.read_max).await?;
            if entries.is_empty() {
                break;
            }
            for e in entries {
                if e.pos > flight.through {
                    break 'read;
                }
                after = Some(e.pos.clone());
                effects.insert(e.effect.id().to_string(), e.effect);
            }
        }
        for (id, reason) in &answer.rejected {
            let (request, rendered) = match effects.get(id) {
                Some(effect) => match self.connector.render(&[effect]).await {
                    Ok(r) => (r, true),
                    Err(_) => (
                        Request {
                            key: request_key(self.name(), &[id]),
                            body: serde_json::to_string(effect).unwrap_or_default(),
                            items: vec![id.clone()],
                        },
                        false,
                    ),
                },
                None => continue,
            };
            let dead = ConnectorDeadLetter {
                connector: self.name().to_string(),
                shard: shard.to_string(),
                request,
                attempts: 1,
                last_error: reason.clone(),
                at_ms: now_ms(),
                requeued: false,
                rendered,
            };
            self.store.put_dead_letter(&dead, fence).await?;
            self.record_dead_letter(&dead);
        }
        Ok(())
    }

    /// Re-sends dead letters flagged by `outbox retry`; returns how many are still flagged.
    pub(super) async fn redeliver_dead_letters(&self, ctl: &DrainControl) -> Result<usize, StoreError> {
        let mut left = 0;
        for mut dead in self.store.connector_dead_letters(Some(self.name())).await? {
            if !dead.requeued {
                continue;
            }
            // Only the member entitled to the shard's lane re-sends it, under the lane's fence.
            let Some(grant) = self.lanes.grant(&dead.shard) else { continue };
            let fence = grant.map(|g| g.fence);
            let fence = fence.as_ref();
            if !dead.rendered {
                let Ok(effect) = serde_json::from_str::<Effect>(&dead.request.body) else { continue };
                match self.connector.render(&[&effect]).await {
                    Ok(r) => {
                        dead.request = r;
                        dead.rendered = true;
                    }
                    Err(e) => {
                        dead.requeued = false;
                        dead.last_error = format!("not rendered: {e}");
                        self.store.put_dead_letter(&dead, fence).await?;
                        continue;
                    }
                }
            }
            match self.deliver(&dead.shard, fence, &dead.request, ctl).await {
                Outcome::Stopped => return Ok(left + 1),
                Outcome::Delivered(d) if !d.rejected.is_empty() => {
                    // Items refused inside the answer: keep the dead letter (a re-send under its
                    // key is answered, not re-applied, for the items that were taken).
                    dead.attempts += 1;
                    dead.requeued = false;
                    dead.last_error = format!("refused inside the answer: {:?}", d.rejected);
                    self.store.put_dead_letter(&dead, fence).await?;
                }
                Outcome::Delivered(_) => {
                    self.store.remove_dead_letter(&dead.connector, &dead.shard, &dead.request.key, fence).await?;
                    self.count(&self.stats.redelivered, "stockflow_connector_redelivered_total", 1);
                    let n = dead.request.items.len() as u64;
                    self.count(&self.stats.effects, "stockflow_connector_effects_delivered_total", n);
                }
                Outcome::Rejected(reason) => {
                    dead.attempts += 1;
                    dead.requeued = false;
                    dead.last_error = reason;
                    self.store.put_dead_letter(&dead, fence).await?;
                }
                Outcome::Failed(reason, _) => {
                    dead.attempts += 1;
                    dead.last_error = reason;
                    self.store.put_dead_letter(&dead, fence).await?;
                    left += 1;
                }
            }
        }
        Ok(left)
    }

    /// Sends one request through the connector's gate until the receiver decides.
    pub(super) async fn deliver(
        &self,
        shard: &str,
        fence: Option<&Fence>,
        request: &Request,
        ctl: &DrainControl,
    ) -> Outcome {
        loop {
            // Stop when told to, or when this process no longer holds the shard's grant.
            if ctl.stopping() || !self.lanes.holds(shard, fence) {
                return Outcome::Stopped;
            }
            let paused = *self.paused_until.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(until) = paused
                && until > Instant::now()
            {
                if !self.wait_lane(until - Instant::now(), ctl, shard, fence).await {
                    return Outcome::Stopped;
                }
                continue;
            }
            if let Err(wait) = self.breaker.permit() {
                self.publish_circuit();
                if !self.wait_lane(wait, ctl, shard, fence).await {
                    return Outcome::Stopped;
                }
                continue;
            }
            // Concurrency slot first, then the token: a token is spent only by a request that
            // goes right away, so queued requests cannot bunch above the rate.
            let Ok(_permit) = self.gate.acquire().await else { return Outcome::Stopped };
            if let Some(bucket) = &self.bucket {
                bucket.acquire_share(self.lanes.members()).await;
            }
            // A 429 (or a lost lease) may have come while this request queued.
            let paused = *self.paused_until.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if paused.is_some_and(|u| u > Instant::now()) || !self.lanes.holds(shard, fence) {
                self.breaker.release();
                continue;
            }
            let t0 = Instant::now();
            // One span per attempt (exported over OTLP when configured), with the idempotency key
            // the receiver sees and the effect ids the request carries.
            let span = tracing::info_span!(
                "connector.request",
                connector = self.name(),
                shard,
                idempotency_key = %request.key,
                items = request.items.len(),
                first_item = request.items.first().map(String::as_str),
                last_item = request.items.last().map(String::as_str),
                outcome = tracing::field::Empty,
            );
            let result = self.connector.send(request).instrument(span.clone()).await;
            span.record(
                "outcome",
                match &result {
                    Ok(_) => "delivered",
                    Err(DeliveryError::Throttled { .. }) => "throttled",
                    Err(DeliveryError::Transient { .. }) => "failed",
                    Err(DeliveryError::Rejected(_)) => "rejected",
                },
            );
            metrics::histogram!("stockflow_connector_request_seconds", "connector" => self.name())
                .record(t0.elapsed().as_secs_f64());
            let outcome = match result {
                Ok(d) => {
                    self.breaker.success();
                    self.count(&self.stats.sent, "stockflow_connector_sent_total", 1);
                    Outcome::Delivered(d)
                }
                Err(DeliveryError::Throttled { reason, retry_after }) => {
                    self.breaker.release();
                    self.count(&self.stats.throttled, "stockflow_connector_throttled_total", 1);
                    let wait = retry_after.unwrap_or(Duration::from_secs(1)).min(MAX_PAUSE);
                    tracing::info!(connector = self.name(), %reason, ?wait, "throttled by the receiver: pausing");
                    let mut p = self.paused_until.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    let until = Instant::now() + wait;
                    *p = Some(p.map_or(until, |u| u.max(until)));
                    continue;
                }
                Err(DeliveryError::Transient { reason, retry_after }) => {
                    self.breaker.failure();
                    self.count(&self.stats.failed, "stockflow_connector_failed_total", 1);
                    Outcome::Failed(reason, retry_after)
                }
                Err(DeliveryError::Rejected(reason)) => {
                    self.breaker.success();
                    self.count(&self.stats.rejected, "stockflow_connector_rejected_total", 1);
                    Outcome::Rejected(reason)
                }
            };
            self.publish_circuit();
            return outcome;
        }
    }
}
