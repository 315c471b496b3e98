//! The drain of a connector in summary mode ([`crate::journals`]): lanes that fold their
//! shard's journal effects into the book, and the poster that sends one journal per closed period
//! and currency (then adjustments).

use std::collections::BTreeMap;
use std::time::Duration;

use stockflow_state::StoreError;
use stockflow_state::book::{BookStore, BookWrite, CursorWrite, MAX_BOOK_WRITES, book_all};
use stockflow_state::effects::Effect;
use stockflow_state::lease::LaneGrant;
use stockflow_state::outbox::{Cursor, Fence, InFlight};
use tokio::time::Instant;

use super::{Drain, DrainControl, LaneEnd, Outcome};
use crate::connector::Connector;
use crate::journals::{
    Folder, Fragment, Mark, Open, Posting, PostingKind, PostingState, SummaryJournal, SummaryPolicy, covered, totals,
};

/// The pseudo-lane the poster sends on (always held: the poster claim entitles it).
pub(super) const POSTER: &str = "~journals";

/// How long a poster claim lasts without renewal.
const CLAIM_MS: i64 = 30_000;

/// Most (period, currency, late) groups in one fold: each writes a fragment and an open marker.
const MAX_GROUPS: usize = (MAX_BOOK_WRITES - 1) / 2;

/// A fold waits this long for more effects unless finishing (fewer, larger fragments).
const FOLD_LINGER: Duration = Duration::from_secs(2);

fn corrupt(e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("journal book: {e}"))
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<String, StoreError> {
    serde_json::to_string(v).map_err(corrupt)
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Claim {
    holder: String,
    until_ms: i64,
}

impl<S: BookStore, C: Connector> Drain<S, C> {
    /// A lane in summary mode: folds the shard's journal effects into the book with its cursor.
    pub(super) async fn fold_lane(
        &self,
        shard: &str,
        grant: Option<&LaneGrant>,
        ctl: &DrainControl,
        policy: &SummaryPolicy,
    ) -> Result<LaneEnd, StoreError> {
        let fence = grant.map(|g| &g.fence);
        let ended = grant.is_some_and(|g| g.ended);
        let name = self.name();
        let mut cursor = self.store.cursor(name, shard).await?;
        if cursor.in_flight.is_some() {
            // Switched from per-effect posting with a request in flight: it goes first.
            cursor = self.finish_in_flight(shard, fence, cursor, ctl).await?;
            if cursor.in_flight.is_some() {
                return Ok(LaneEnd::Stopped);
            }
        }
        let mark_key = format!("mark#{shard}");
        let mut mark: Mark = match self.store.book_get(name, &mark_key).await? {
            Some(json) => serde_json::from_str(&json).map_err(corrupt)?,
            None => Mark::default(),
        };
        let mut pending_since: Option<Instant> = None;
        loop {
            if ctl.stopping() || !self.lanes.holds(shard, fence) {
                return Ok(LaneEnd::Stopped);
            }
            let finishing = ctl.finishing();
            // Read before the scan: a scan that reaches the end of the outbox has then seen
            // every effect committed with this event time.
            let max_ts = self.store.committed_max_ts(shard).await?;
            let (entries, through, exhausted) = self.scan(shard, cursor.delivered.as_ref(), self.cfg.read_max).await?;
            let watermark = max_ts.map(|m| m.saturating_sub(policy.lateness_ms));
            let Some(mut through) = through else {
                let advanced = watermark > mark.closed_through;
                if advanced || (ended && !mark.ended) {
                    mark.closed_through = mark.closed_through.max(watermark);
                    mark.ended |= ended;
                    let writes = [BookWrite::put(mark_key.clone(), to_json(&mark)?)];
                    self.store.book_write(name, &writes, None, fence).await?;
                }
                if ended {
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
            if exhausted && !finishing && !ended && !entries.is_empty() {
                let waited = pending_since.get_or_insert_with(Instant::now).elapsed();
                if waited < FOLD_LINGER {
                    let wait = (FOLD_LINGER - waited).min(self.cfg.idle_poll.max(Duration::from_millis(200)));
                    if !self.wait_lane(wait, ctl, shard, fence).await {
                        return Ok(LaneEnd::Stopped);
                    }
                    continue;
                }
            }
            pending_since = None;
            let mut folder = Folder::default();
            let mut folded = 0u64;
            let mut whole = true;
            for e in &entries {
                let Effect::Journal(j) = &e.effect else { continue };
                if folder.groups() >= MAX_GROUPS && folder.is_new_group(policy, j, mark.closed_through) {
                    // The write would be too large: the rest goes in the next fold.
                    whole = false;
                    break;
                }
                folder.add(policy, j, mark.closed_through);
                through = e.pos.clone();
                folded += 1;
            }
            let seq = mark.seq + 1;
            let fragments = folder.finish(shard, seq);
            let mut writes = Vec::with_capacity(fragments.len() * 2 + 1);
            let mut opens: BTreeMap<String, Open> = BTreeMap::new();
            for (period, currency, f) in &fragments {
                writes.push(BookWrite::create(f.key(period, currency), to_json(f)?));
                opens.insert(
                    format!("open#{period}#{currency}"),
                    Open { end_ms: f.end_ms, date: f.date.clone(), fold: format!("{shard}#{seq}") },
                );
            }
            for (key, open) in &opens {
                writes.push(BookWrite::put(key.clone(), to_json(open)?));
            }
            let mut next = mark.clone();
            if !fragments.is_empty() {
                next.seq = seq;
            }
            if exhausted && whole {
                next.closed_through = next.closed_through.max(watermark);
            }
            writes.push(BookWrite::put(mark_key.clone(), to_json(&next)?));
            let new_cursor = Cursor { delivered: Some(through), in_flight: None };
            self.store.book_write(name, &writes, Some(CursorWrite { shard, cursor: &new_cursor }), fence).await?;
            cursor = new_cursor;
            mark = next;
            if folded > 0 {
                metrics::counter!("stockflow_journal_effects_folded_total", "connector" => name).increment(folded);
            }
        }
    }

    /// Delivers a per-effect request left in flight before the switch to summary posting.
    async fn finish_in_flight(
        &self,
        shard: &str,
        fence: Option<&Fence>,
        mut cursor: Cursor,
        ctl: &DrainControl,
    ) -> Result<Cursor, StoreError> {
        let policy = self.connector.policy().clone();
        let mut backoff = crate::policy::Backoff::new(policy.backoff, 7);
        while let Some(mut flight) = cursor.in_flight.clone() {
            match self.deliver(shard, fence, &flight.request, ctl).await {
                Outcome::Stopped => return Ok(cursor),
                Outcome::Delivered(_) => {
                    cursor = Cursor { delivered: Some(flight.through), in_flight: None };
                    self.store.save_cursor(self.name(), shard, &cursor, None, fence).await?;
                }
                Outcome::Rejected(reason) => cursor = self.give_up(shard, fence, flight, reason).await?,
                Outcome::Failed(reason, _) => {
                    flight.attempts += 1;
                    if flight.attempts >= policy.max_attempts {
                        cursor = self.give_up(shard, fence, flight, reason).await?;
                        continue;
                    }
                    let wait = backoff.delay(flight.attempts - 1);
                    cursor.in_flight = Some(InFlight { last_error: Some(reason), ..flight });
                    self.store.save_cursor(self.name(), shard, &cursor, None, fence).await?;
                    if !self.wait_lane(wait, ctl, shard, fence).await {
                        return Ok(cursor);
                    }
                }
            }
        }
        Ok(cursor)
    }

    /// Takes or renews the book's poster claim; false while another process holds it.
    async fn claim_poster(&self, me: &str) -> Result<bool, StoreError> {
        let now = stockflow_state::now_ms();
        let mine = to_json(&Claim { holder: me.to_string(), until_ms: now + CLAIM_MS })?;
        if matches!(self.lanes, super::Lanes::All) {
            // This process owns the store (embedded): a claim left by a killed run is void.
            self.store.book_write(self.name(), &[BookWrite::put("poster", mine)], None, None).await?;
            return Ok(true);
        }
        let write = match self.store.book_get(self.name(), "poster").await? {
            None => BookWrite::create("poster", mine),
            Some(old) => {
                let claim: Claim = serde_json::from_str(&old).map_err(corrupt)?;
                if claim.holder != me && claim.until_ms > now {
                    return Ok(false);
                }
                BookWrite::swap("poster", old, Some(mine))
            }
        };
        match self.store.book_write(self.name(), &[write], None, None).await {
            Ok(()) => Ok(true),
            Err(StoreError::Conflict { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The close frontier: the least folded watermark over every shard with an outbox (a shard
    /// whose lane has not folded yet holds everything open; an ended, folded shard nothing).
    async fn frontier(&self) -> Result<Option<i64>, StoreError> {
        let marks: BTreeMap<String, Mark> = book_all(&*self.store, self.name(), "mark#")
            .await?
            .into_iter()
            .map(|(k, v)| Ok((k.trim_start_matches("mark#").to_string(), serde_json::from_str(&v).map_err(corrupt)?)))
            .collect::<Result<_, StoreError>>()?;
        let mut least: Option<i64> = None;
        for shard in self.store.outbox_shards().await? {
            match marks.get(&shard) {
                Some(m) if m.ended => {}
                Some(Mark { closed_through: Some(c), .. }) => least = Some(least.map_or(*c, |l| l.min(*c))),
                _ => return Ok(None),
            }
        }
        Ok(least)
    }

    /// Runs the poster until the drain stops: every `rescan`, posts what closed periods owe.
    pub(super) async fn poster(&self, policy: &SummaryPolicy, ctl: &DrainControl) -> Result<(), StoreError> {
        let me = format!(
            "{}-{}-{:x}",
            std::process::id(),
            stockflow_state::now_ms(),
            xxhash_rust::xxh3::xxh3_64(self.name().as_bytes())
        );
        let mut failures = 0u32;
        loop {
            if ctl.stopping() {
                return Ok(());
            }
            let finishing = ctl.finishing();
            let round = async {
                if !self.claim_poster(&me).await? {
                    return Ok(false);
                }
                self.post_round(policy, ctl).await
            };
            match round.await {
                Ok(busy) => {
                    failures = 0;
                    if busy {
                        continue;
                    }
                }
                Err(e) if e.is_transient() || matches!(e, StoreError::Conflict { .. }) => {
                    failures += 1;
                    tracing::warn!(connector = self.name(), error = %e, "journal poster: store failed; retrying");
                }
                Err(e) => return Err(e),
            }
            if finishing {
                // The drain's last round posts after every lane folded: leave the claim to it.
                self.release_poster(&me).await;
                return Ok(());
            }
            let wait = if failures > 0 {
                crate::policy::Backoff::new(self.connector.policy().backoff, 11).delay(failures.min(16))
            } else {
                self.cfg.rescan
            };
            if !self.wait(wait, ctl).await {
                return Ok(());
            }
        }
    }

    /// Posts until nothing closed is owed (the end of a finishing drain).
    pub(super) async fn post_closed(&self, policy: &SummaryPolicy, ctl: &DrainControl) -> Result<(), StoreError> {
        let me = format!("final-{}-{:x}", std::process::id(), xxhash_rust::xxh3::xxh3_64(self.name().as_bytes()));
        // Another member may hold the claim for a while (its own last round): wait for it, at
        // most a claim's lifetime, so the last member to finish posts what every fold closed.
        let deadline = Instant::now() + Duration::from_millis(CLAIM_MS as u64 + 2_000);
        loop {
            if self.claim_poster(&me).await? {
                while self.post_round(policy, ctl).await? {
                    self.claim_poster(&me).await?;
                }
                break;
            }
            if Instant::now() >= deadline || !self.wait(self.cfg.rescan, ctl).await {
                break;
            }
        }
        self.release_poster(&me).await;
        Ok(())
    }

    /// Gives the poster claim up if `me` holds it (a successor claims at once).
    async fn release_poster(&self, me: &str) {
        if let Ok(Some(old)) = self.store.book_get(self.name(), "poster").await
            && serde_json::from_str::<Claim>(&old).is_ok_and(|c| c.holder == me)
        {
            let _ = self.store.book_write(self.name(), &[BookWrite::swap("poster", old, None)], None, None).await;
        }
    }

    /// One pass over the open periods; true when it sent something (go again at once).
    async fn post_round(&self, policy: &SummaryPolicy, ctl: &DrainControl) -> Result<bool, StoreError> {
        let name = self.name();
        let frontier = self.frontier().await?;
        let opens = book_all(&*self.store, name, "open#").await?;
        metrics::gauge!("stockflow_journal_periods_open", "connector" => name).set(opens.len() as f64);
        let mut busy = false;
        for (key, json) in opens {
            if ctl.stopping() {
                break;
            }
            let open: Open = serde_json::from_str(&json).map_err(corrupt)?;
            let Some((period, currency)) = key.trim_start_matches("open#").split_once('#') else { continue };
            let postings: Vec<Posting> = book_all(&*self.store, name, &format!("post#{period}#{currency}#"))
                .await?
                .into_iter()
                .map(|(_, v)| serde_json::from_str(&v).map_err(corrupt))
                .collect::<Result<_, _>>()?;
            if let Some(pending) = postings.iter().find(|p| p.state == PostingState::Pending) {
                busy |= self.send_posting(pending.clone(), ctl).await?;
                continue;
            }
            let Some(frontier) = frontier.filter(|f| *f >= open.end_ms) else { continue };
            // An adjustment waits a period after the posting before it, so late events of a
            // busy period gather in one adjustment instead of one each.
            if let Some(last) = postings.last()
                && frontier < last.frontier_ms.saturating_add(policy.period.nominal_ms())
                && !ctl.finishing()
            {
                continue;
            }
            let fragments: Vec<Fragment> = book_all(&*self.store, name, &format!("frag#{period}#{currency}#"))
                .await?
                .into_iter()
                .map(|(_, v)| serde_json::from_str(&v).map_err(corrupt))
                .collect::<Result<_, _>>()?;
            let n = u32::try_from(postings.len()).unwrap_or(u32::MAX);
            let mut covers = postings.last().map(|p| p.covers.clone()).unwrap_or_default();
            let new: Vec<&Fragment> = fragments.iter().filter(|f| !covered(&covers, f) && (n > 0 || !f.late)).collect();
            if new.is_empty() && n > 0 {
                // Everything is posted: the period closes unless a fold touched it meanwhile.
                match self.store.book_write(name, &[BookWrite::swap(key.clone(), json, None)], None, None).await {
                    Ok(()) | Err(StoreError::Conflict { .. }) => {}
                    Err(e) => return Err(e),
                }
                continue;
            }
            for f in &new {
                let c = covers.entry(f.lane()).or_insert(0);
                *c = (*c).max(f.seq);
            }
            let (cogs, received, effects) = totals(new.iter().copied());
            let kind = if n == 0 { PostingKind::Summary } else { PostingKind::Adjustment };
            let mut posting = Posting {
                period: period.to_string(),
                currency: currency.to_string(),
                n,
                kind,
                date: open.date.clone(),
                covers,
                cogs,
                received,
                effects,
                request: None,
                state: PostingState::Empty,
                attempts: 0,
                error: None,
                frontier_ms: frontier,
            };
            if !(cogs.is_zero() && received.is_zero()) {
                let journal = SummaryJournal {
                    id: posting.journal_id(),
                    period: posting.period.clone(),
                    kind,
                    date: posting.date.clone(),
                    time_zone: policy.time_zone.clone(),
                    currency: posting.currency.clone(),
                    cogs,
                    received,
                    effects,
                };
                match self.connector.render_summary(&journal) {
                    Ok(r) => {
                        posting.request = Some(r);
                        posting.state = PostingState::Pending;
                    }
                    Err(e) => {
                        posting.state = PostingState::Dead;
                        posting.error = Some(format!("not rendered: {e}"));
                    }
                }
            }
            match self.store.book_write(name, &[BookWrite::create(posting.key(), to_json(&posting)?)], None, None).await
            {
                Ok(()) => {}
                // Another poster created it first (a claim that moved): read it next round.
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e),
            }
            if posting.state == PostingState::Dead {
                self.record_dead_posting(&posting);
            }
            busy = true;
            if posting.state == PostingState::Pending {
                self.send_posting(posting, ctl).await?;
            }
        }
        Ok(busy)
    }

    /// Sends a pending posting until the receiver decides (or the drain stops); true if decided.
    async fn send_posting(&self, mut posting: Posting, ctl: &DrainControl) -> Result<bool, StoreError> {
        let Some(request) = posting.request.clone() else { return Ok(false) };
        let old = to_json(&posting)?;
        let outcome = self.deliver(POSTER, None, &request, ctl).await;
        match outcome {
            Outcome::Stopped => return Ok(false),
            Outcome::Delivered(d) if d.rejected.is_empty() => {
                posting.state = PostingState::Sent;
                metrics::counter!("stockflow_journals_posted_total", "connector" => self.name(), "kind" => match posting.kind {
                    PostingKind::Summary => "summary",
                    PostingKind::Adjustment => "adjustment",
                })
                .increment(1);
                self.count(&self.stats.effects, "stockflow_connector_effects_delivered_total", posting.effects);
            }
            Outcome::Delivered(d) => {
                posting.state = PostingState::Dead;
                posting.error = Some(format!("refused inside the answer: {:?}", d.rejected));
            }
            Outcome::Rejected(reason) => {
                posting.state = PostingState::Dead;
                posting.error = Some(reason);
            }
            Outcome::Failed(reason, retry_after) => {
                posting.attempts += 1;
                posting.error = Some(reason);
                let max = self.connector.policy().max_attempts;
                if posting.attempts >= max {
                    posting.state = PostingState::Dead;
                } else {
                    let wait = crate::policy::Backoff::new(self.connector.policy().backoff, u64::from(posting.n))
                        .delay(posting.attempts - 1)
                        .max(retry_after.unwrap_or_default());
                    self.swap_posting(&posting, old).await?;
                    self.wait(wait, ctl).await;
                    return Ok(false);
                }
            }
        }
        if posting.state == PostingState::Dead {
            self.record_dead_posting(&posting);
        }
        self.swap_posting(&posting, old).await?;
        Ok(true)
    }

    /// Records a posting's new state unless another poster changed it meanwhile (a claim that
    /// moved while this one was sending): then that poster's record stands, and the same request
    /// under the same key was answered from the key.
    async fn swap_posting(&self, posting: &Posting, old: String) -> Result<(), StoreError> {
        let w = BookWrite::swap(posting.key(), old, Some(to_json(posting)?));
        match self.store.book_write(self.name(), &[w], None, None).await {
            Err(StoreError::Conflict { key }) => {
                tracing::debug!(connector = self.name(), key, "posting updated by another poster");
                Ok(())
            }
            other => other,
        }
    }

    fn record_dead_posting(&self, posting: &Posting) {
        self.count(&self.stats.dead_lettered, "stockflow_connector_dead_lettered_total", 1);
        tracing::error!(
            connector = self.name(), period = %posting.period, currency = %posting.currency, n = posting.n,
            error = ?posting.error,
            "summary journal refused: kept in the book as dead (`stockflow journals retry` sends it again)"
        );
    }
}

/// Flags the dead postings of `connector` for another attempt; returns how many.
pub async fn retry_dead_postings<S: BookStore>(store: &S, connector: &str) -> Result<usize, StoreError> {
    let mut n = 0;
    for (key, json) in book_all(store, connector, "post#").await? {
        let mut p: Posting = serde_json::from_str(&json).map_err(corrupt)?;
        if p.state != PostingState::Dead || p.request.is_none() {
            continue;
        }
        p.state = PostingState::Pending;
        p.attempts = 0;
        // The period is open again for the poster (already closed: its end is in the past).
        let open = Open { end_ms: 0, date: p.date.clone(), fold: format!("retry#{}", p.n) };
        let writes = [
            BookWrite::swap(key, json, Some(to_json(&p)?)),
            BookWrite::put(format!("open#{}#{}", p.period, p.currency), to_json(&open)?),
        ];
        store.book_write(connector, &writes, None, None).await?;
        n += 1;
    }
    Ok(n)
}
