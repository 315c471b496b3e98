//! One read of every SKU state, as rows with their sort orders.

use std::cmp::Ordering;

use rust_decimal::Decimal;
use serde::Serialize;
use stockflow_state::SkuState;
use stockflow_state::money::Currency;
use stockflow_state::windows::{OpenWindow, Velocity, WindowCounts};

/// One SKU as the stock table shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StockRow {
    /// Seller SKU.
    pub sku: String,
    /// Units physically in stock.
    pub on_hand: i64,
    /// Units reserved by open order lines.
    pub reserved: i64,
    /// `on_hand − reserved`; negative means oversold.
    pub available: i64,
    /// Units ordered in the last 24 hours of the SKU's event time (sales velocity per day).
    pub velocity_per_day: u64,
    /// `available / velocity per day`; `null` when nothing sold in 24 h.
    pub days_of_cover: Option<f64>,
    /// Open order lines.
    pub open_lines: usize,
    /// Oversell alerts raised for the SKU.
    pub oversells: u32,
    /// Moving average unit cost (a decimal string in JSON), once a cost was received.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub avg_cost: Option<Decimal>,
    /// Its currency.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub currency: Option<Currency>,
    /// Cost of goods sold booked (a decimal string in JSON).
    pub cogs: Decimal,
    /// Latest event time applied, epoch ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_event_ms: Option<i64>,
}

/// What `/api/stock/{sku}` adds to the row.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SkuDetail {
    /// Open (not yet final) windows, oldest first.
    pub windows: Vec<WindowView>,
    /// Units ordered per hour over the velocity's 24 hours, oldest first.
    pub hourly: Vec<HourUnits>,
}

/// An open window.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct WindowView {
    /// Window size, ms.
    pub size_ms: i64,
    /// Start, epoch ms.
    pub start: i64,
    /// Counts so far.
    pub counts: WindowCounts,
}

/// One hour of the velocity.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct HourUnits {
    /// Hour start, epoch ms.
    pub hour: i64,
    /// Units ordered.
    pub units: u32,
}

/// The sort keys of the stock table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SortKey {
    /// By SKU.
    Sku,
    /// By available units.
    Available,
    /// By days of cover (no sales: last).
    Cover,
    /// By velocity.
    Velocity,
}

impl SortKey {
    /// Parses the `sort` parameter.
    pub fn parse(s: &str) -> Option<SortKey> {
        Some(match s {
            "sku" => SortKey::Sku,
            "available" => SortKey::Available,
            "cover" | "days_of_cover" => SortKey::Cover,
            "velocity" => SortKey::Velocity,
            _ => return None,
        })
    }
}

/// What a detail is made of, kept as read (moved, not copied) until someone asks.
#[derive(Debug, Clone, Default)]
pub struct SkuExtra {
    velocity: Velocity,
    windows: Vec<OpenWindow>,
}

impl SkuExtra {
    /// The detail view; `window_sizes` maps the windows' size indices to milliseconds.
    pub fn detail(&self, window_sizes: &[i64]) -> SkuDetail {
        let mut windows: Vec<WindowView> = self
            .windows
            .iter()
            .map(|w| WindowView {
                size_ms: window_sizes.get(usize::from(w.size)).copied().unwrap_or(0),
                start: w.start,
                counts: w.counts.clone(),
            })
            .collect();
        windows.sort_by_key(|w| (w.start, w.size_ms));
        let hourly = self.velocity.hours().into_iter().map(|(hour, units)| HourUnits { hour, units }).collect();
        SkuDetail { windows, hourly }
    }
}

/// Every SKU at one instant, sorted by SKU, with the other orders as index lists.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Rows by SKU.
    pub rows: Vec<StockRow>,
    /// What the details are made of, parallel to `rows`.
    pub extra: Vec<SkuExtra>,
    /// Row indices by available units, ascending (ties by SKU).
    pub by_available: Vec<u32>,
    /// By days of cover, ascending (no sales last).
    pub by_cover: Vec<u32>,
    /// By velocity, ascending.
    pub by_velocity: Vec<u32>,
    /// SKUs with negative availability.
    pub negative: usize,
    /// When the read of the states began, epoch ms (0: nothing read yet).
    pub as_of_ms: i64,
    /// How long the read and build took, ms.
    pub build_ms: u64,
}

fn cover_cmp(a: Option<f64>, b: Option<f64>) -> Ordering {
    match (a, b) {
        (Some(a), Some(b)) => a.total_cmp(&b),
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => Ordering::Equal,
    }
}

impl Snapshot {
    /// Rows and orders of `states` (sorted by SKU, as the stores return them). Moves what it
    /// keeps out of the states: 100,000 SKUs build in tens of milliseconds.
    pub fn build(mut states: Vec<(String, SkuState)>, as_of_ms: i64) -> Snapshot {
        if !states.is_sorted_by(|a, b| a.0 <= b.0) {
            states.sort_by(|a, b| a.0.cmp(&b.0));
        }
        let mut rows = Vec::with_capacity(states.len());
        let mut extra = Vec::with_capacity(states.len());
        let mut negative = 0;
        for (sku, st) in states {
            let available = st.on_hand.saturating_sub(st.reserved);
            negative += usize::from(available < 0);
            let velocity = st.velocity.units_24h();
            rows.push(StockRow {
                days_of_cover: (velocity > 0).then(|| available.max(0) as f64 / velocity as f64),
                velocity_per_day: velocity,
                on_hand: st.on_hand,
                reserved: st.reserved,
                available,
                open_lines: st.open_lines(),
                oversells: st.oversells,
                avg_cost: st.cost_currency.map(|_| st.avg_cost),
                currency: st.cost_currency,
                cogs: st.cogs,
                last_event_ms: st.max_ts,
                sku,
            });
            extra.push(SkuExtra { velocity: st.velocity, windows: st.windows });
        }
        let index = |cmp: &dyn Fn(&StockRow, &StockRow) -> Ordering| {
            let mut idx: Vec<u32> = (0..rows.len() as u32).collect();
            // Stable over SKU order: ties stay by SKU.
            idx.sort_by(|&a, &b| cmp(&rows[a as usize], &rows[b as usize]));
            idx
        };
        let by_available = index(&|a, b| a.available.cmp(&b.available));
        let by_cover = index(&|a, b| cover_cmp(a.days_of_cover, b.days_of_cover));
        let by_velocity = index(&|a, b| a.velocity_per_day.cmp(&b.velocity_per_day));
        Snapshot { rows, extra, by_available, by_cover, by_velocity, negative, as_of_ms, build_ms: 0 }
    }

    /// The row of `sku` and its detail.
    pub fn get(&self, sku: &str, window_sizes: &[i64]) -> Option<(&StockRow, SkuDetail)> {
        let i = self.rows.binary_search_by(|r| r.sku.as_str().cmp(sku)).ok()?;
        Some((&self.rows[i], self.extra[i].detail(window_sizes)))
    }

    /// Rows in `sort` order (`desc` reverses it) whose SKU contains `q` (case-insensitive) and,
    /// with `negative_only`, whose availability is negative: `(matching count, the page)`.
    pub fn page(
        &self,
        q: &str,
        sort: SortKey,
        desc: bool,
        negative_only: bool,
        offset: usize,
        limit: usize,
    ) -> (usize, Vec<&StockRow>) {
        let needle = q.to_ascii_lowercase();
        let matches = |r: &StockRow| {
            (!negative_only || r.available < 0) && (needle.is_empty() || contains_ignore_case(&r.sku, &needle))
        };
        let order: Box<dyn Iterator<Item = usize> + '_> = match (sort, desc) {
            (SortKey::Sku, false) => Box::new(0..self.rows.len()),
            (SortKey::Sku, true) => Box::new((0..self.rows.len()).rev()),
            (key, desc) => {
                let idx = match key {
                    SortKey::Available => &self.by_available,
                    SortKey::Cover => &self.by_cover,
                    _ => &self.by_velocity,
                };
                let it = idx.iter().map(|&i| i as usize);
                if desc { Box::new(it.rev()) } else { Box::new(it) }
            }
        };
        let mut total = 0;
        let mut page = Vec::with_capacity(limit.min(1000));
        for i in order {
            let row = &self.rows[i];
            if matches(row) {
                if total >= offset && page.len() < limit {
                    page.push(row);
                }
                total += 1;
            }
        }
        (total, page)
    }
}

/// `needle` is already lower-case ASCII.
fn contains_ignore_case(haystack: &str, needle: &str) -> bool {
    let (h, n) = (haystack.as_bytes(), needle.as_bytes());
    n.len() <= h.len() && h.windows(n.len()).any(|w| w.iter().zip(n).all(|(a, b)| a.to_ascii_lowercase() == *b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use stockflow_state::{EngineConfig, ShardEngine, decode};

    fn states() -> Vec<(String, SkuState)> {
        let mut engine = ShardEngine::new(std::sync::Arc::new(EngineConfig::default()));
        let events = [
            r#"{"id":"r1","type":"stock_received","sku":"MUG-BLUE","ts":1795737600000,"qty":10}"#,
            r#"{"id":"o1","type":"order_placed","sku":"MUG-BLUE","ts":1795737600001,"qty":4,"order_id":"A"}"#,
            r#"{"id":"r2","type":"stock_received","sku":"cap-red","ts":1795737600000,"qty":2}"#,
            r#"{"id":"o2","type":"order_placed","sku":"cap-red","ts":1795737600002,"qty":5,"order_id":"B"}"#,
            r#"{"id":"r3","type":"stock_received","sku":"TEE","ts":1795737600000,"qty":1}"#,
        ];
        for e in events {
            engine.apply(&decode(e.as_bytes()).unwrap());
        }
        // Not sorted: build sorts.
        ["TEE", "cap-red", "MUG-BLUE"].iter().map(|s| (s.to_string(), engine.sku(s).unwrap().clone())).collect()
    }

    #[test]
    fn rows_sort_search_and_page() {
        let snap = Snapshot::build(states(), 1);
        let skus = |rows: Vec<&StockRow>| rows.iter().map(|r| r.sku.clone()).collect::<Vec<_>>();
        assert_eq!(skus(snap.page("", SortKey::Sku, false, false, 0, 10).1), ["MUG-BLUE", "TEE", "cap-red"]);
        let (n, by_avail) = snap.page("", SortKey::Available, false, false, 0, 10);
        assert_eq!((n, skus(by_avail)), (3, vec!["cap-red".to_string(), "TEE".into(), "MUG-BLUE".into()]));
        assert_eq!(snap.negative, 1);
        // Cover: cap-red has nothing available, 0 (never negative); MUG-BLUE 6/4; TEE sold
        // nothing: last.
        assert_eq!(skus(snap.page("", SortKey::Cover, false, false, 0, 10).1), ["cap-red", "MUG-BLUE", "TEE"]);
        assert_eq!(snap.get("cap-red", &[]).unwrap().0.days_of_cover, Some(0.0));
        assert_eq!(skus(snap.page("", SortKey::Velocity, true, false, 0, 10).1), ["cap-red", "MUG-BLUE", "TEE"]);
        assert_eq!(skus(snap.page("CAP", SortKey::Sku, false, false, 0, 10).1), ["cap-red"]);
        assert_eq!(skus(snap.page("", SortKey::Sku, false, true, 0, 10).1), ["cap-red"]);
        let (n, page) = snap.page("", SortKey::Sku, false, false, 1, 1);
        assert_eq!((n, skus(page)), (3, vec!["TEE".to_string()]));
        let (row, detail) = snap.get("MUG-BLUE", &[60_000, 3_600_000]).unwrap();
        assert_eq!((row.available, row.reserved, row.velocity_per_day, row.days_of_cover), (6, 4, 4, Some(1.5)));
        assert_eq!(detail.hourly.last().map(|h| (h.hour, h.units)), Some((1_795_737_600_000, 4)));
        assert!(detail.windows.iter().any(|w| w.size_ms == 60_000 && w.counts.units_ordered == 4), "{detail:?}");
        assert!(snap.get("MUG", &[]).is_none());
    }
}
