//! Summary posting (docs/connectors.md, "Posting policy"): the accounting connector books one
//! journal per period and currency instead of one per shipment, the way an accountant keeps a
//! ledger, and keeps the per-SKU detail behind each journal in the store's book.
//!
//! How it is exactly once without a coordinator:
//!
//! 1. **Fold.** Each shard's lane reads its journal effects after its cursor and writes their sums
//!    as *fragments* — one per (period, currency, on time or late), with the per-SKU detail — in
//!    the same atomic write that moves its cursor, under its lease's fence. A crash re-folds from
//!    the stored cursor to the same keys; a zombie's fold is refused. With the fragments the lane
//!    writes its *mark*: how far its shard's watermark (committed largest event time − lateness)
//!    is known to be folded.
//! 2. **Close.** A period is closed when every shard's mark has passed its end. Fragments folded
//!    after their shard's mark passed the period's end are late.
//! 3. **Post.** One poster (in a group, whichever member holds the book's poster claim) creates
//!    posting `n` of a closed period with a create-if-absent write: the summary (`n = 0`, every
//!    on-time fragment) and then adjustments (everything not yet covered, late or from a shard
//!    that lagged). A posting records what it covers (per shard and flag, the last fold sequence)
//!    and the exact request; it is re-sent verbatim until the receiver decides, under a key from
//!    (connector, period, currency, n). Nothing is covered twice, nothing is left out, and a late
//!    event lands in its own period's adjustment, never in the next period.
//!
//! Book keys (per connector, see `stockflow_state::book`):
//! `frag#{period}#{currency}#{shard}#{N|L}#{seq:020}`, `mark#{shard}`, `open#{period}#{currency}`,
//! `post#{period}#{currency}#{n:04}`, `poster`.

use std::collections::{BTreeMap, HashMap};

use jiff::Timestamp;
use jiff::tz::TimeZone;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use stockflow_state::effects::{JournalKind, JournalLine};
use stockflow_state::money::Currency;
use stockflow_state::outbox::Request;

/// How long a summary period is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeriodLen {
    /// A calendar day in the seller's time zone.
    Day,
    /// An hour (labelled with its local start and UTC offset).
    Hour,
}

impl PeriodLen {
    /// `"1d"` or `"1h"`.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "1d" => Ok(PeriodLen::Day),
            "1h" => Ok(PeriodLen::Hour),
            other => Err(format!("period must be \"1d\" or \"1h\", not {other:?}")),
        }
    }

    /// Nominal length in milliseconds (a DST day is an hour longer or shorter).
    pub fn nominal_ms(self) -> i64 {
        match self {
            PeriodLen::Day => 86_400_000,
            PeriodLen::Hour => 3_600_000,
        }
    }
}

/// The summary policy of an accounting connector.
#[derive(Debug, Clone)]
pub struct SummaryPolicy {
    /// Period length.
    pub period: PeriodLen,
    /// The seller's time zone (IANA name), where periods begin and end.
    pub time_zone: String,
    tz: TimeZone,
    /// A period closes when every shard's watermark (largest event time − this) passed its end.
    pub lateness_ms: i64,
}

/// One period: its label, bounds and the date journals of it carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Span {
    /// `2026-11-27` (day) or `2026-11-27T13+01:00` (hour): sorts chronologically.
    pub label: String,
    /// First millisecond (UTC).
    pub start_ms: i64,
    /// First millisecond after it (UTC).
    pub end_ms: i64,
    /// The local date (`YYYY-MM-DD`): the journal's date.
    pub date: String,
}

impl SummaryPolicy {
    /// A policy of `period` in `time_zone` (an IANA name such as `America/New_York`, or `UTC`).
    pub fn new(period: PeriodLen, time_zone: &str, lateness_ms: i64) -> Result<Self, String> {
        let tz = TimeZone::get(time_zone).map_err(|e| format!("time zone {time_zone:?}: {e}"))?;
        Ok(SummaryPolicy { period, time_zone: time_zone.to_string(), tz, lateness_ms: lateness_ms.max(0) })
    }

    /// The period holding `ts_ms`.
    pub fn span(&self, ts_ms: i64) -> Span {
        // Event times are bounded to 2000–2099 (SPEC §1): every conversion below succeeds; the
        // fallbacks only keep a corrupt value from panicking.
        let at = Timestamp::from_millisecond(ts_ms).unwrap_or(Timestamp::UNIX_EPOCH).to_zoned(self.tz.clone());
        match self.period {
            PeriodLen::Day => {
                let date = at.date();
                let start = at.start_of_day().map_or(ts_ms, |z| z.timestamp().as_millisecond());
                let end = date
                    .tomorrow()
                    .ok()
                    .and_then(|d| d.to_zoned(self.tz.clone()).ok())
                    .and_then(|z| z.start_of_day().ok())
                    .map_or(start + 86_400_000, |z| z.timestamp().as_millisecond());
                Span { label: date.to_string(), start_ms: start, end_ms: end, date: date.to_string() }
            }
            PeriodLen::Hour => {
                // Offsets of a half or quarter hour: the local hour starts off the UTC hour.
                let offset_ms = i64::from(at.offset().seconds()) * 1000;
                let start_ms = (ts_ms + offset_ms).div_euclid(3_600_000) * 3_600_000 - offset_ms;
                let start =
                    Timestamp::from_millisecond(start_ms).unwrap_or(Timestamp::UNIX_EPOCH).to_zoned(self.tz.clone());
                Span {
                    label: start.strftime("%Y-%m-%dT%H%:z").to_string(),
                    start_ms,
                    end_ms: start_ms + 3_600_000,
                    date: start.date().to_string(),
                }
            }
        }
    }
}

/// One SKU's sums of one kind inside a fragment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DetailLine {
    /// The SKU.
    pub sku: String,
    /// COGS or inventory received.
    pub kind: JournalKind,
    /// Units.
    pub qty: i64,
    /// Amount (exact: the sum of the effects' rounded amounts).
    #[serde(with = "rust_decimal::serde::str")]
    pub amount: Decimal,
    /// Journal effects summed.
    pub effects: u32,
}

/// What one fold of one shard added to one period and currency.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fragment {
    /// The shard.
    pub shard: String,
    /// The lane's fold sequence.
    pub seq: u64,
    /// Folded after the shard's watermark passed the period's end.
    pub late: bool,
    /// The period's end (UTC ms).
    pub end_ms: i64,
    /// The journal date of the period.
    pub date: String,
    /// Per SKU and kind, in SKU order.
    pub lines: Vec<DetailLine>,
}

impl Fragment {
    /// `N` (on time) or `L` (late): the flag in keys and covers.
    pub fn flag(&self) -> &'static str {
        if self.late { "L" } else { "N" }
    }

    /// The key of its shard and flag in a posting's covers.
    pub fn lane(&self) -> String {
        format!("{}#{}", self.shard, self.flag())
    }

    /// Its book key.
    pub fn key(&self, period: &str, currency: &str) -> String {
        format!("frag#{period}#{currency}#{}#{}#{:020}", self.shard, self.flag(), self.seq)
    }
}

/// A lane's mark in the book.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mark {
    /// The last fold sequence.
    pub seq: u64,
    /// Everything of the shard up to this watermark is folded.
    #[serde(default)]
    pub closed_through: Option<i64>,
    /// The shard ended and its outbox is folded: it holds no period open.
    #[serde(default)]
    pub ended: bool,
}

/// An open period in the book (`open#{period}#{currency}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Open {
    /// The period's end (UTC ms).
    pub end_ms: i64,
    /// The journal date.
    pub date: String,
    /// The last fold that touched it (`{shard}#{seq}`): a poster closes it only if unchanged.
    pub fold: String,
}

/// Summary or adjustment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PostingKind {
    /// The period's journal (`n = 0`).
    Summary,
    /// What arrived after the summary (`n ≥ 1`).
    Adjustment,
}

/// Where a posting is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PostingState {
    /// Created, not yet acknowledged: re-sent verbatim until the receiver decides.
    Pending,
    /// The receiver took it.
    Sent,
    /// Nothing to book (every amount zero): no request.
    Empty,
    /// The receiver refused it, or it could not be rendered (the reason is kept).
    Dead,
}

/// One journal posted (or to post) for a period and currency.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Posting {
    /// The period label.
    pub period: String,
    /// ISO 4217.
    pub currency: String,
    /// 0: the summary; then adjustments.
    pub n: u32,
    /// Summary or adjustment.
    pub kind: PostingKind,
    /// The journal date.
    pub date: String,
    /// Cumulative: per `{shard}#{N|L}`, the last fold sequence covered by this or an earlier posting.
    pub covers: BTreeMap<String, u64>,
    /// COGS booked by this posting.
    #[serde(with = "rust_decimal::serde::str")]
    pub cogs: Decimal,
    /// Inventory received booked by this posting.
    #[serde(with = "rust_decimal::serde::str")]
    pub received: Decimal,
    /// Journal effects it sums.
    pub effects: u64,
    /// The request, as sent (none for an empty posting).
    #[serde(default)]
    pub request: Option<Request>,
    /// State.
    pub state: PostingState,
    /// Failed attempts.
    #[serde(default)]
    pub attempts: u32,
    /// The last failure or the refusal.
    #[serde(default)]
    pub error: Option<String>,
    /// The close frontier (ms) when it was created: the next adjustment waits a period after it.
    pub frontier_ms: i64,
}

impl Posting {
    /// Its book key.
    pub fn key(&self) -> String {
        posting_key(&self.period, &self.currency, self.n)
    }

    /// The journal id (`journal:{period}:{currency}:{n}`).
    pub fn journal_id(&self) -> String {
        format!("journal:{}:{}:{}", self.period, self.currency, self.n)
    }
}

/// The book key of posting `n`.
pub fn posting_key(period: &str, currency: &str, n: u32) -> String {
    format!("post#{period}#{currency}#{n:04}")
}

/// What a summary journal books, for the connector to render.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SummaryJournal {
    /// `journal:{period}:{currency}:{n}`.
    pub id: String,
    /// The period label.
    pub period: String,
    /// Summary or adjustment.
    pub kind: PostingKind,
    /// The journal date (local).
    pub date: String,
    /// The seller's time zone.
    pub time_zone: String,
    /// ISO 4217.
    pub currency: String,
    /// COGS.
    pub cogs: Decimal,
    /// Inventory received.
    pub received: Decimal,
    /// Journal effects summed.
    pub effects: u64,
}

/// One fragment being folded: its period and its lines by SKU, one per kind (COGS, received).
type Group = (Span, HashMap<String, [Option<DetailLine>; 2]>);

/// Folds journal lines into fragments per (period, currency, late). A period is known by its
/// first millisecond, its span computed once (the label is a formatted date: the fold used to
/// format it twice a line).
#[derive(Debug, Default)]
pub struct Folder {
    groups: HashMap<(i64, Currency, bool), Group>,
    /// The span of the last line's period: consecutive lines mostly share one.
    last: Option<Span>,
}

impl Folder {
    /// Groups so far.
    pub fn groups(&self) -> usize {
        self.groups.len()
    }

    /// True if `line` would open a new group (`&mut`: it remembers the line's period for the
    /// `add` that usually follows).
    pub fn is_new_group(&mut self, policy: &SummaryPolicy, line: &JournalLine, closed_through: Option<i64>) -> bool {
        let (span, late) = period(&mut self.last, policy, line.ts, closed_through);
        let key = (span.start_ms, line.currency, late);
        !self.groups.contains_key(&key)
    }

    /// Adds one journal line; late when the shard's folded watermark already passed its period.
    pub fn add(&mut self, policy: &SummaryPolicy, line: &JournalLine, closed_through: Option<i64>) {
        let (span, late) = period(&mut self.last, policy, line.ts, closed_through);
        let key = (span.start_ms, line.currency, late);
        let lines = match self.groups.entry(key) {
            std::collections::hash_map::Entry::Occupied(e) => &mut e.into_mut().1,
            std::collections::hash_map::Entry::Vacant(e) => &mut e.insert((span.clone(), HashMap::new())).1,
        };
        let kinds = match lines.get_mut(line.sku.as_str()) {
            Some(kinds) => kinds,
            None => lines.entry(line.sku.clone()).or_default(),
        };
        let d = kinds[usize::from(line.kind == JournalKind::InventoryReceipt)].get_or_insert_with(|| DetailLine {
            sku: line.sku.clone(),
            kind: line.kind,
            qty: 0,
            amount: Decimal::ZERO,
            effects: 0,
        });
        d.qty = d.qty.saturating_add(line.qty);
        d.amount += line.amount;
        d.effects += 1;
    }

    /// The fragments of fold `seq` of `shard`, with their period, currency and span.
    pub fn finish(self, shard: &str, seq: u64) -> Vec<(String, String, Fragment)> {
        let mut out: Vec<(String, String, Fragment)> = self
            .groups
            .into_iter()
            .map(|((_, currency, late), (span, lines))| {
                let mut lines: Vec<DetailLine> = lines.into_values().flatten().flatten().collect();
                lines.sort_by(|a, b| (&a.sku, a.kind as u8).cmp(&(&b.sku, b.kind as u8)));
                let f = Fragment { shard: shard.to_string(), seq, late, end_ms: span.end_ms, date: span.date, lines };
                (span.label, currency.as_str().to_string(), f)
            })
            .collect();
        out.sort_by(|a, b| (&a.0, &a.1, a.2.late).cmp(&(&b.0, &b.1, b.2.late)));
        out
    }
}

/// The period of `ts` (the last one again when it holds `ts`) and whether it is late.
fn period<'a>(last: &'a mut Option<Span>, policy: &SummaryPolicy, ts: i64, closed: Option<i64>) -> (&'a Span, bool) {
    let span = match last.take() {
        Some(s) if (s.start_ms..s.end_ms).contains(&ts) => last.insert(s),
        _ => last.insert(policy.span(ts)),
    };
    (span, closed.is_some_and(|c| c >= span.end_ms))
}

/// Sums of fragments: (COGS, received, effects).
pub fn totals<'a>(fragments: impl IntoIterator<Item = &'a Fragment>) -> (Decimal, Decimal, u64) {
    let (mut cogs, mut received, mut n) = (Decimal::ZERO, Decimal::ZERO, 0u64);
    for f in fragments {
        for l in &f.lines {
            match l.kind {
                JournalKind::Cogs => cogs += l.amount,
                JournalKind::InventoryReceipt => received += l.amount,
            }
            n += u64::from(l.effects);
        }
    }
    (cogs, received, n)
}

/// True when `f` is covered by `covers`.
pub fn covered(covers: &BTreeMap<String, u64>, f: &Fragment) -> bool {
    covers.get(&f.lane()).is_some_and(|s| f.seq <= *s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use stockflow_state::money::Currency;

    fn line(sku: &str, kind: JournalKind, ts: i64, amount: i64) -> JournalLine {
        JournalLine {
            entry_id: format!("x:{sku}:{ts}"),
            sku: sku.into(),
            kind,
            qty: 2,
            unit_cost: Decimal::new(amount, 2) / Decimal::from(2),
            amount: Decimal::new(amount, 2),
            currency: Currency::USD,
            ts,
        }
    }

    #[test]
    fn days_follow_the_sellers_time_zone_and_its_daylight_saving() {
        let ny = SummaryPolicy::new(PeriodLen::Day, "America/New_York", 300_000).unwrap();
        // 2026-11-27T03:00Z is still the 26th in New York (UTC−5).
        let s = ny.span(1_795_748_400_000);
        assert_eq!(s.label, "2026-11-26");
        assert_eq!(s.end_ms, 1_795_755_600_000, "ends at 05:00Z");
        assert_eq!(s.end_ms - s.start_ms, 86_400_000);
        // 2026-11-01 (DST ends): 25 hours.
        let fall = ny.span(1_793_534_400_000); // 2026-11-01T12:00Z
        assert_eq!(fall.label, "2026-11-01");
        assert_eq!(fall.end_ms - fall.start_ms, 25 * 3_600_000);
        let utc = SummaryPolicy::new(PeriodLen::Day, "UTC", 0).unwrap();
        assert_eq!(utc.span(1_795_748_400_000).label, "2026-11-27");
        assert!(SummaryPolicy::new(PeriodLen::Day, "Mars/Olympus", 0).is_err());
    }

    #[test]
    fn hours_start_on_the_local_hour_even_at_odd_offsets() {
        let kathmandu = SummaryPolicy::new(PeriodLen::Hour, "Asia/Kathmandu", 0).unwrap(); // +05:45
        let s = kathmandu.span(1_795_748_400_000); // 03:00Z = 08:45 local
        assert_eq!(s.label, "2026-11-27T08+05:45");
        assert_eq!(s.start_ms, 1_795_745_700_000, "08:00 local is 02:15Z");
        assert_eq!(s.end_ms - s.start_ms, 3_600_000);
        let t = kathmandu.span(1_795_745_700_000 - 1);
        assert_eq!(t.label, "2026-11-27T07+05:45");
        assert_eq!(t.end_ms, s.start_ms);
    }

    #[test]
    fn lines_alternating_between_periods_and_kinds_fold_into_their_own_groups() {
        let p = SummaryPolicy::new(PeriodLen::Hour, "Asia/Kathmandu", 0).unwrap();
        let hour = 1_795_745_700_000; // a local hour's start (+05:45)
        let mut f = Folder::default();
        for (i, ts) in [hour + 1, hour - 1, hour + 2, hour + 3_600_000, hour + 3].into_iter().enumerate() {
            f.add(&p, &line("A", JournalKind::Cogs, ts, 100), None);
            f.add(&p, &line("A", JournalKind::InventoryReceipt, ts, 10 * i as i64 + 1), None);
        }
        let out = f.finish("s", 1);
        let summary: Vec<(&str, usize, u32)> =
            out.iter().map(|(l, _, f)| (l.as_str(), f.lines.len(), f.lines.iter().map(|d| d.effects).sum())).collect();
        assert_eq!(
            summary,
            [("2026-11-27T07+05:45", 2, 2), ("2026-11-27T08+05:45", 2, 6), ("2026-11-27T09+05:45", 2, 2)]
        );
        let middle = &out[1].2.lines;
        assert_eq!((middle[0].kind, middle[0].amount), (JournalKind::Cogs, Decimal::new(300, 2)));
        assert_eq!((middle[1].kind, middle[1].amount), (JournalKind::InventoryReceipt, Decimal::new(1 + 21 + 41, 2)));
    }

    #[test]
    fn folds_sum_exactly_per_sku_and_split_late_from_on_time() {
        let p = SummaryPolicy::new(PeriodLen::Day, "UTC", 0).unwrap();
        let day = 1_795_737_600_000; // 2026-11-27T00:00Z
        let mut f = Folder::default();
        f.add(&p, &line("A", JournalKind::Cogs, day + 1, 1_001), None);
        f.add(&p, &line("A", JournalKind::Cogs, day + 2, 2_002), None);
        f.add(&p, &line("B", JournalKind::InventoryReceipt, day + 3, 500), None);
        // Folded after the shard's watermark passed the 26th: late for the 26th.
        f.add(&p, &line("A", JournalKind::Cogs, day - 5, 7), Some(day));
        assert!(!f.is_new_group(&p, &line("C", JournalKind::Cogs, day + 9, 1), Some(day)));
        let out = f.finish("shard-0001", 4);
        assert_eq!(out.len(), 2);
        let (label, cur, on_time) = &out[1];
        assert_eq!((label.as_str(), cur.as_str(), on_time.late), ("2026-11-27", "USD", false));
        assert_eq!(
            on_time.lines[0],
            DetailLine { sku: "A".into(), kind: JournalKind::Cogs, qty: 4, amount: Decimal::new(3_003, 2), effects: 2 }
        );
        assert_eq!(totals([on_time]), (Decimal::new(3_003, 2), Decimal::new(500, 2), 3));
        let (label, _, late) = &out[0];
        assert_eq!((label.as_str(), late.late), ("2026-11-26", true));
        assert_eq!(late.key(label, "USD"), "frag#2026-11-26#USD#shard-0001#L#00000000000000000004");
        let covers = BTreeMap::from([("shard-0001#N".to_string(), 4)]);
        assert!(covered(&covers, on_time));
        assert!(!covered(&covers, late));
    }
}
