//! Event-time tumbling windows per SKU, the per-shard watermark, and sales velocity (SPEC §3).
//!
//! A SKU keeps only its *open* windows; the shard keeps a min-heap of window ends so that a
//! watermark advance finalises exactly the windows it passes, without scanning every SKU.
//!
//! Arithmetic is explicit (`clippy::arithmetic_side_effects` is denied): counts saturate, times
//! saturate at the ends of `i64`.

#![deny(clippy::arithmetic_side_effects)]

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::money::Currency;

/// One minute, in milliseconds.
pub const MINUTE_MS: i64 = 60_000;
/// One hour, in milliseconds.
pub const HOUR_MS: i64 = 3_600_000;

/// Window sizes and lateness, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowConfig {
    sizes_ms: Vec<i64>,
    allowed_lateness_ms: i64,
}

impl Default for WindowConfig {
    fn default() -> Self {
        WindowConfig { sizes_ms: vec![MINUTE_MS, HOUR_MS], allowed_lateness_ms: 5 * MINUTE_MS }
    }
}

impl WindowConfig {
    /// At most this many window sizes.
    pub const MAX_SIZES: usize = 8;

    /// Validates sizes (1 to 8 sizes, each ≥ 1 s) and lateness (≥ 0).
    pub fn new(sizes_ms: Vec<i64>, allowed_lateness_ms: i64) -> Result<Self, String> {
        if sizes_ms.is_empty() || sizes_ms.len() > Self::MAX_SIZES {
            return Err(format!("window sizes: give 1 to {} sizes", Self::MAX_SIZES));
        }
        if let Some(s) = sizes_ms.iter().find(|s| **s < 1000) {
            return Err(format!("window size {s} ms: must be at least 1000 ms"));
        }
        if allowed_lateness_ms < 0 {
            return Err("allowed lateness must not be negative".into());
        }
        Ok(WindowConfig { sizes_ms, allowed_lateness_ms })
    }

    /// The window sizes in milliseconds.
    pub fn sizes_ms(&self) -> &[i64] {
        &self.sizes_ms
    }

    /// The size of window-size index `idx` (as stored in an [`OpenWindow`]), if configured.
    pub fn size_ms(&self, idx: u8) -> Option<i64> {
        self.sizes_ms.get(usize::from(idx)).copied()
    }

    /// The allowed lateness in milliseconds.
    pub fn allowed_lateness_ms(&self) -> i64 {
        self.allowed_lateness_ms
    }
}

/// Revenue per currency; nearly always one currency, kept inline.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Revenue {
    first: Option<(Currency, Decimal)>,
    // Boxed: nearly always empty, so it costs one pointer. No `skip_serializing_if`: the store's
    // codec (postcard) is not self-describing.
    #[allow(clippy::box_collection)] // 8 bytes per window instead of 24 for a rarely used list
    more: Option<Box<Vec<(Currency, Decimal)>>>,
}

impl Revenue {
    /// Adds an amount in a currency.
    pub fn add(&mut self, currency: Currency, amount: Decimal) {
        match &mut self.first {
            None => self.first = Some((currency, amount)),
            Some((c, a)) if *c == currency => *a = a.saturating_add(amount),
            Some(_) => {
                let more = self.more.get_or_insert_with(Box::default);
                match more.iter_mut().find(|(c, _)| *c == currency) {
                    Some((_, a)) => *a = a.saturating_add(amount),
                    None => more.push((currency, amount)),
                }
            }
        }
    }

    /// The amounts, unrounded, in insertion order.
    pub fn iter(&self) -> impl Iterator<Item = (Currency, Decimal)> + '_ {
        self.first.iter().copied().chain(self.more.iter().flat_map(|m| m.iter().copied()))
    }
}

/// The counts of one window.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct WindowCounts {
    /// Units on `order_placed` (saturating: one SKU's window never holds 4 billion units).
    pub units_ordered: u32,
    /// Units released by `order_cancelled`.
    pub units_cancelled: u32,
    /// Units shipped by `order_shipped`.
    pub units_shipped: u32,
    /// Number of `order_placed` events.
    pub orders: u32,
    /// Revenue of the placed orders, per currency.
    pub revenue: Revenue,
}

/// What an applied event contributes to its windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Contribution {
    /// Units ordered.
    pub ordered: u64,
    /// Units cancelled.
    pub cancelled: u64,
    /// Units shipped.
    pub shipped: u64,
    /// 1 for an order.
    pub orders: u32,
    /// Revenue of an order.
    pub revenue: Option<(Currency, Decimal)>,
}

impl Contribution {
    /// True when the event changes no window.
    pub fn is_empty(&self) -> bool {
        self.ordered == 0 && self.cancelled == 0 && self.shipped == 0 && self.orders == 0
    }

    fn add_to(&self, c: &mut WindowCounts) {
        let units = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
        c.units_ordered = c.units_ordered.saturating_add(units(self.ordered));
        c.units_cancelled = c.units_cancelled.saturating_add(units(self.cancelled));
        c.units_shipped = c.units_shipped.saturating_add(units(self.shipped));
        c.orders = c.orders.saturating_add(self.orders);
        if let Some((cur, amount)) = self.revenue {
            c.revenue.add(cur, amount);
        }
    }
}

/// An open (not yet final) window of one SKU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenWindow {
    /// Index into the configured sizes.
    pub size: u8,
    /// Window start, epoch ms.
    pub start: i64,
    /// Its counts so far.
    pub counts: WindowCounts,
}

/// A window the watermark has passed: emitted once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FinalWindow {
    /// The SKU.
    pub sku: String,
    /// Window size, ms.
    pub size_ms: i64,
    /// Window start, epoch ms.
    pub start: i64,
    /// Its counts.
    pub counts: WindowCounts,
}

/// Units ordered per hour over the last 24 hours of a SKU's event time (sales velocity).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Velocity {
    head_hour: Option<i64>,
    units: [u32; 24],
}

impl Velocity {
    /// Records `qty` units ordered at `ts`. Orders older than the 24 h ring are ignored.
    pub fn record(&mut self, ts: i64, qty: i64) {
        let hour = ts.div_euclid(HOUR_MS);
        match self.head_hour {
            None => self.head_hour = Some(hour),
            Some(head) if hour > head => {
                // Slots head+1 ..= hour hold counts from a day earlier: clear them.
                for back in 0..hour.saturating_sub(head).min(24) {
                    self.units[hour.saturating_sub(back).rem_euclid(24) as usize] = 0;
                }
                self.head_hour = Some(hour);
            }
            Some(head) if hour <= head.saturating_sub(24) => return,
            Some(_) => {}
        }
        let slot = &mut self.units[hour.rem_euclid(24) as usize];
        *slot = slot.saturating_add(u32::try_from(qty).unwrap_or(u32::MAX));
    }

    /// Units ordered in the 24 hours ending with the latest order's hour.
    pub fn units_24h(&self) -> u64 {
        self.units.iter().map(|u| u64::from(*u)).sum()
    }

    /// Units ordered per hour over those 24 hours, oldest first, each with its hour's start
    /// (epoch ms); empty before the first order.
    pub fn hours(&self) -> Vec<(i64, u32)> {
        let Some(head) = self.head_hour else { return Vec::new() };
        (0..24i64)
            .rev()
            .map(|back| {
                let hour = head.saturating_sub(back);
                (hour.saturating_mul(HOUR_MS), self.units[hour.rem_euclid(24) as usize])
            })
            .collect()
    }
}

/// The per-shard watermark and the open windows, bucketed by their end: window ends are
/// multiples of the sizes, so a handful of buckets are alive at a time and a watermark advance
/// pops whole buckets.
#[derive(Debug, Default)]
pub struct WindowClock {
    max_ts: Option<i64>,
    ends: BTreeMap<i64, Vec<(u32, u8)>>,
}

impl WindowClock {
    /// A clock that has seen `max_ts` (from a checkpoint).
    pub fn resume(max_ts: Option<i64>) -> Self {
        WindowClock { max_ts, ends: BTreeMap::new() }
    }

    /// Largest event time seen on the shard.
    pub fn max_ts(&self) -> Option<i64> {
        self.max_ts
    }

    /// `max ts seen − allowed lateness`, or `None` before the first event.
    pub fn watermark(&self, cfg: &WindowConfig) -> Option<i64> {
        self.max_ts.map(|m| m.saturating_sub(cfg.allowed_lateness_ms))
    }

    /// Registers an open window of SKU `sku` (after a restore, or when first created).
    pub fn track(&mut self, cfg: &WindowConfig, sku: u32, w: &OpenWindow) {
        // A size no longer configured (the restore drops such windows) has no end to wait for.
        let Some(size) = cfg.size_ms(w.size) else { return };
        let end = w.start.saturating_add(size);
        self.ends.entry(end).or_default().push((sku, w.size));
    }

    /// Adds `c` to the SKU's windows for event time `ts`. Returns the number of window sizes for
    /// which the event was late (its window already final).
    pub fn contribute(
        &mut self,
        cfg: &WindowConfig,
        sku: u32,
        open: &mut Vec<OpenWindow>,
        ts: i64,
        c: &Contribution,
    ) -> u32 {
        let watermark = self.watermark(cfg);
        let mut late: u32 = 0;
        for (i, &size) in cfg.sizes_ms.iter().enumerate() {
            let start = ts.div_euclid(size).saturating_mul(size);
            if watermark.is_some_and(|w| start.saturating_add(size) <= w) {
                late = late.saturating_add(1);
                continue;
            }
            if c.is_empty() {
                continue;
            }
            let size_idx = i as u8;
            match open.iter_mut().find(|w| w.size == size_idx && w.start == start) {
                Some(w) => c.add_to(&mut w.counts),
                None => {
                    let mut w = OpenWindow { size: size_idx, start, counts: WindowCounts::default() };
                    c.add_to(&mut w.counts);
                    self.track(cfg, sku, &w);
                    open.push(w);
                }
            }
        }
        late
    }

    /// Moves the clock to `ts` (if later) and returns the windows that became final, as
    /// `(sku, size index, start)`, in order of their ends.
    pub fn advance(&mut self, cfg: &WindowConfig, ts: i64, out: &mut Vec<(u32, u8, i64)>) {
        if self.max_ts.is_some_and(|m| m >= ts) {
            return;
        }
        self.max_ts = Some(ts);
        let watermark = ts.saturating_sub(cfg.allowed_lateness_ms);
        while let Some(entry) = self.ends.first_entry() {
            let end = *entry.key();
            if end > watermark {
                break;
            }
            for (sku, size) in entry.remove() {
                out.push((sku, size, end.saturating_sub(cfg.size_ms(size).unwrap_or(0))));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_sku_window_state_stays_compact() {
        // Memory per SKU is a budget (docs/BENCHMARKS.md): an open window is 64 bytes at most.
        assert!(std::mem::size_of::<OpenWindow>() <= 64, "{}", std::mem::size_of::<OpenWindow>());
        assert!(std::mem::size_of::<Velocity>() <= 112);
        let mut r = Revenue::default();
        r.add(Currency::USD, Decimal::ONE);
        r.add(Currency::parse("EUR").unwrap(), Decimal::TWO);
        r.add(Currency::USD, Decimal::ONE);
        let got: Vec<_> = r.iter().map(|(c, a)| format!("{c}:{a}")).collect();
        assert_eq!(got, ["USD:2", "EUR:2"]);
    }

    #[test]
    fn extreme_event_times_do_not_overflow() {
        let cfg = WindowConfig::default();
        let mut clock = WindowClock::default();
        let mut open = Vec::new();
        let c = Contribution { ordered: 1, orders: 1, ..Contribution::default() };
        let mut done = Vec::new();
        for ts in [i64::MIN, 0, i64::MAX] {
            clock.contribute(&cfg, 0, &mut open, ts, &c);
            clock.advance(&cfg, ts, &mut done);
        }
        let mut v = Velocity::default();
        v.record(i64::MIN, 1);
        v.record(i64::MAX, 1);
        assert_eq!(v.units_24h(), 1);
    }

    #[test]
    fn velocity_keeps_24_hours() {
        let mut v = Velocity::default();
        v.record(0, 5);
        v.record(HOUR_MS * 23, 2);
        assert_eq!(v.units_24h(), 7);
        v.record(HOUR_MS * 24, 1); // hour 0 falls out
        assert_eq!(v.units_24h(), 3);
        v.record(0, 9); // older than the ring: ignored
        assert_eq!(v.units_24h(), 3);
        let hours = v.hours();
        assert_eq!(hours.len(), 24);
        assert_eq!((hours[0], hours[22], hours[23]), ((HOUR_MS, 0), (HOUR_MS * 23, 2), (HOUR_MS * 24, 1)));
        v.record(HOUR_MS * 100, 4);
        assert_eq!(v.units_24h(), 4);
        assert_eq!(v.hours().iter().map(|h| h.1).sum::<u32>(), 4);
        assert!(Velocity::default().hours().is_empty());
    }

    #[test]
    fn windows_finalise_when_the_watermark_passes_their_end() {
        let cfg = WindowConfig::default();
        let mut clock = WindowClock::default();
        let mut open = Vec::new();
        let c = Contribution { ordered: 2, orders: 1, ..Contribution::default() };
        let mut done = Vec::new();
        clock.advance(&cfg, 10_000, &mut done);
        assert_eq!(clock.contribute(&cfg, 0, &mut open, 10_000, &c), 0);
        assert_eq!(open.len(), 2);
        // 5 min lateness: the first minute window ends at 60 000, final once max ts ≥ 360 000.
        clock.advance(&cfg, 359_999, &mut done);
        assert!(done.is_empty());
        clock.advance(&cfg, 360_000, &mut done);
        assert_eq!(done, vec![(0, 0, 0)]);
        // A late event for that minute is counted late for the minute size only.
        assert_eq!(clock.contribute(&cfg, 0, &mut open, 1_000, &c), 1);
    }
}
