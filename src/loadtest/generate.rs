//! A deterministic peak-season stream: Zipf SKU popularity, a spike hour, orders with realistic
//! sizes, shipments (whole and `shipped_total` partials), cancellations, restocks with costs,
//! adjustments, physical counts, a few re-sent duplicates and a few bad records.
//! The same seed always gives the same bytes.

use std::collections::VecDeque;
use std::io::Write;
use std::ops::Range;

/// Parameters of a generated stream.
#[derive(Debug, Clone)]
pub struct GenConfig {
    /// Number of records (including duplicates and bad records).
    pub events: usize,
    /// Number of SKUs.
    pub skus: usize,
    /// RNG seed.
    pub seed: u64,
    /// Event time of the first record (epoch ms).
    pub start_ts: i64,
    /// Relative rate of each hour of event time the stream spans (one entry per hour): hour
    /// *h* gets `weight[h] / sum(weights)` of the records after the opening counts.
    pub hour_weights: Vec<f64>,
    /// Zipf exponent of SKU popularity.
    pub zipf_s: f64,
    /// Share of records that re-send an earlier record.
    pub duplicate_rate: f64,
    /// Share of records that are bad.
    pub bad_rate: f64,
}

impl Default for GenConfig {
    fn default() -> Self {
        GenConfig {
            events: 1_000_000,
            skus: 10_000,
            seed: 42,
            // 2026-11-27T00:00:00Z, Black Friday.
            start_ts: 1_795_737_600_000,
            // A day whose hour 18 runs at 4x the others.
            hour_weights: (0..24).map(|h| if h == 18 { 4.0 } else { 1.0 }).collect(),
            zipf_s: 1.0,
            duplicate_rate: 0.002,
            bad_rate: 0.0002,
        }
    }
}

/// A generated stream: records (SKU index and byte range) in one buffer.
#[derive(Debug, Default)]
pub struct Stream {
    /// SKU names.
    pub skus: Vec<String>,
    buf: Vec<u8>,
    records: Vec<(u32, Range<usize>)>,
    /// Index of each hour's first record (the opening counts come before hour 0's).
    pub hour_starts: Vec<usize>,
}

impl Stream {
    /// Number of records.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Records as `(partition key, payload)`.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&str, &[u8])> + '_ {
        self.records.iter().map(|(k, r)| (self.skus[*k as usize].as_str(), &self.buf[r.clone()]))
    }

    /// Total payload bytes.
    pub fn bytes(&self) -> usize {
        self.buf.len()
    }

    /// Writes the records as NDJSON.
    pub fn write_ndjson(&self, mut out: impl Write) -> std::io::Result<()> {
        for (_, payload) in self.iter() {
            out.write_all(payload)?;
            out.write_all(b"\n")?;
        }
        out.flush()
    }
}

impl Stream {
    /// An empty stream over the config's SKUs (`SKU-00000`, …).
    pub(crate) fn with_skus(cfg: &GenConfig) -> Stream {
        Stream {
            skus: (0..cfg.skus).map(|i| format!("SKU-{i:05}")).collect(),
            buf: Vec::with_capacity(cfg.events * 190),
            records: Vec::with_capacity(cfg.events),
            hour_starts: Vec::new(),
        }
    }

    /// Appends a record of SKU `sku` written by `f`.
    pub(crate) fn emit(&mut self, sku: u32, f: impl FnOnce(&mut Vec<u8>)) {
        let start = self.buf.len();
        f(&mut self.buf);
        self.records.push((sku, start..self.buf.len()));
    }

    /// Appends record `index` again, byte for byte (a re-sent notification).
    pub(crate) fn repeat(&mut self, index: usize) {
        let Some((sku, range)) = self.records.get(index).cloned() else { return };
        let start = self.buf.len();
        self.buf.extend_from_within(range);
        self.records.push((sku, start..self.buf.len()));
    }

    /// Zipf popularity over the stream's SKUs.
    pub(crate) fn zipf(&self, cfg: &GenConfig) -> Zipf {
        let weights: Vec<f64> = (1..=cfg.skus).map(|r| 1.0 / (r as f64).powf(cfg.zipf_s)).collect();
        let total: f64 = weights.iter().sum();
        let mut cdf = Vec::with_capacity(cfg.skus);
        let mut acc = 0.0;
        for w in &weights {
            acc += w / total;
            cdf.push(acc);
        }
        Zipf { weights, cdf }
    }
}

/// SKU popularity: weight of rank *r* ∝ 1/r^s.
pub(crate) struct Zipf {
    /// Unnormalised weights by SKU index.
    pub weights: Vec<f64>,
    cdf: Vec<f64>,
}

impl Zipf {
    /// A SKU index drawn by popularity.
    pub fn pick(&self, rng: &mut Rng) -> u32 {
        self.cdf.partition_point(|c| *c < rng.unit()).min(self.cdf.len().saturating_sub(1)) as u32
    }
}

/// Units of an order: one 70 % of the time, two 20 %, three to five 10 %.
pub(crate) fn order_size(rng: &mut Rng) -> i64 {
    let q = rng.unit();
    if q < 0.7 {
        1
    } else if q < 0.9 {
        2
    } else {
        3 + rng.below(3) as i64
    }
}

/// SplitMix64: small, fast and the same everywhere.
pub(crate) struct Rng(u64);

impl Rng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    fn next(&mut self) -> u64 {
        // SplitMix64.
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in 0..n.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

struct OpenOrder {
    sku: u32,
    order: u64,
    qty: i64,
    shipped: i64,
}

/// Generates the stream described by `cfg`.
pub fn generate(cfg: &GenConfig) -> Stream {
    let mut rng = Rng::new(cfg.seed);
    let mut out = Stream::with_skus(cfg);
    let popularity = out.zipf(cfg);
    let weights = &popularity.weights;
    let total_weight: f64 = weights.iter().sum();
    let zipf = |rng: &mut Rng| popularity.pick(rng);
    let price = |sku: u32| 5 + i64::from(sku % 45);

    let mut model_on_hand = vec![0i64; cfg.skus];
    let mut open: VecDeque<OpenOrder> = VecDeque::new();
    let mut next_order = 1u64;
    let mut seq = 0u64;

    let default_weights = [1.0];
    let weights_h: &[f64] = if cfg.hour_weights.is_empty() { &default_weights } else { &cfg.hour_weights };
    let hours = weights_h.len() as u32;
    let total_hours: f64 = weights_h.iter().map(|w| w.max(0.0)).sum::<f64>().max(f64::MIN_POSITIVE);
    let body_events = cfg.events.saturating_sub(cfg.skus);

    let emit = |out: &mut Stream, sku: u32, f: &mut dyn FnMut(&mut Vec<u8>)| out.emit(sku, |b| f(b));

    // Opening physical counts: every SKU starts with ~30% of its expected demand; restocks then
    // bring ~108% of the demand, so stock mostly keeps up and oversells come from bursts.
    for sku in 0..cfg.skus as u32 {
        if out.records.len() >= cfg.events {
            break;
        }
        let demand = body_events as f64 * 0.48 * 1.5 * weights[sku as usize] / total_weight;
        let on_hand = (demand * 0.3).ceil() as i64 + 5;
        model_on_hand[sku as usize] = on_hand;
        let ts = cfg.start_ts;
        emit(&mut out, sku, &mut |b| {
            let _ = write!(
                b,
                r#"{{"id":"cnt:open:{sku}","type":"stock_counted","sku":"SKU-{sku:05}","ts":{ts},"on_hand":{on_hand},"source":"fc-report"}}"#
            );
        });
    }

    let mut produced = 0usize;
    let mut cumulative = 0.0;
    for h in 0..hours {
        out.hour_starts.push(out.records.len());
        cumulative += weights_h[h as usize].max(0.0);
        let n_hour = if h == hours - 1 {
            body_events - produced
        } else {
            ((body_events as f64 * cumulative / total_hours).round() as usize).min(body_events) - produced
        };
        let hour_start = cfg.start_ts + i64::from(h) * 3_600_000;
        produced += n_hour;
        for i in 0..n_hour {
            seq += 1;
            let mut ts = hour_start + (i as i64 * 3_600_000) / n_hour.max(1) as i64 + rng.below(2000) as i64;
            if rng.unit() < 0.002 {
                ts -= 600_000; // a straggler: late for its minute window
            }
            let r = rng.unit();
            if r < cfg.duplicate_rate && out.records.len() > 1 {
                // A re-sent notification: the same bytes again.
                let back = 1 + rng.below(out.records.len().min(1000) as u64) as usize;
                out.repeat(out.records.len() - back);
                continue;
            }
            if r < cfg.duplicate_rate + cfg.bad_rate {
                let sku = zipf(&mut rng);
                let truncated = rng.below(2) == 0;
                emit(&mut out, sku, &mut |b| {
                    if truncated {
                        let _ = write!(b, r#"{{"id":"bad:{seq}","type":"order_placed","sku":"SKU-{sku:05}","ts":"#);
                    } else {
                        let _ = write!(
                            b,
                            r#"{{"id":"bad:{seq}","type":"order_placed","sku":"SKU-{sku:05}","ts":{ts},"qty":0,"order_id":"x-{seq}"}}"#
                        );
                    }
                });
                continue;
            }
            let k = rng.unit();
            if k < 0.48 || (k < 0.86 && open.is_empty()) {
                let sku = zipf(&mut rng);
                let qty = order_size(&mut rng);
                let order = next_order;
                next_order += 1;
                let p = price(sku);
                emit(&mut out, sku, &mut |b| {
                    let _ = write!(
                        b,
                        r#"{{"id":"ord:114-{a:07}-{c:07}:1:placed","type":"order_placed","sku":"SKU-{sku:05}","ts":{ts},"qty":{qty},"order_id":"114-{a:07}-{c:07}:1","unit_price":"{p}.99","currency":"USD"}}"#,
                        a = order / 10_000_000,
                        c = order % 10_000_000
                    );
                });
                open.push_back(OpenOrder { sku, order, qty, shipped: 0 });
            } else if k < 0.86 {
                let Some(mut o) = open.pop_front() else { continue };
                let (a, c, sku) = (o.order / 10_000_000, o.order % 10_000_000, o.sku);
                if o.qty >= 2 && o.shipped == 0 && rng.unit() < 0.3 {
                    // A partial shipment reported as a cumulative total; the rest ships later.
                    o.shipped = 1;
                    model_on_hand[sku as usize] -= 1;
                    emit(&mut out, sku, &mut |b| {
                        let _ = write!(
                            b,
                            r#"{{"id":"ord:114-{a:07}-{c:07}:1:shipped:1","type":"order_shipped","sku":"SKU-{sku:05}","ts":{ts},"order_id":"114-{a:07}-{c:07}:1","shipped_total":1}}"#
                        );
                    });
                    open.push_back(o);
                } else if o.shipped > 0 {
                    let total = o.qty;
                    model_on_hand[sku as usize] -= o.qty - o.shipped;
                    emit(&mut out, sku, &mut |b| {
                        let _ = write!(
                            b,
                            r#"{{"id":"ord:114-{a:07}-{c:07}:1:shipped:{total}","type":"order_shipped","sku":"SKU-{sku:05}","ts":{ts},"order_id":"114-{a:07}-{c:07}:1","shipped_total":{total}}}"#
                        );
                    });
                } else {
                    model_on_hand[sku as usize] -= o.qty;
                    emit(&mut out, sku, &mut |b| {
                        let _ = write!(
                            b,
                            r#"{{"id":"ord:114-{a:07}-{c:07}:1:shipped","type":"order_shipped","sku":"SKU-{sku:05}","ts":{ts},"order_id":"114-{a:07}-{c:07}:1"}}"#
                        );
                    });
                }
            } else if k < 0.90 {
                if open.is_empty() {
                    continue;
                }
                let idx = open.len() - 1 - rng.below((open.len() / 4).max(1) as u64) as usize;
                let Some(o) = open.swap_remove_back(idx) else { continue };
                let (a, c, sku) = (o.order / 10_000_000, o.order % 10_000_000, o.sku);
                emit(&mut out, sku, &mut |b| {
                    let _ = write!(
                        b,
                        r#"{{"id":"ord:114-{a:07}-{c:07}:1:cancelled","type":"order_cancelled","sku":"SKU-{sku:05}","ts":{ts},"order_id":"114-{a:07}-{c:07}:1"}}"#
                    );
                });
            } else if k < 0.96 {
                let sku = zipf(&mut rng);
                let qty = 6 + rng.below(15) as i64;
                model_on_hand[sku as usize] += qty;
                let cost = price(sku) * 40; // cents: 40% of the price
                emit(&mut out, sku, &mut |b| {
                    let _ = write!(
                        b,
                        r#"{{"id":"rcv:{seq}","type":"stock_received","sku":"SKU-{sku:05}","ts":{ts},"qty":{qty},"unit_cost":"{}.{:02}","currency":"USD"}}"#,
                        cost / 100,
                        cost % 100
                    );
                });
            } else if k < 0.985 {
                let sku = zipf(&mut rng);
                let delta = if rng.below(2) == 0 { -1 - rng.below(3) as i64 } else { 1 + rng.below(3) as i64 };
                model_on_hand[sku as usize] += delta;
                emit(&mut out, sku, &mut |b| {
                    let _ = write!(
                        b,
                        r#"{{"id":"adj:{seq}","type":"stock_adjusted","sku":"SKU-{sku:05}","ts":{ts},"delta":{delta},"reason":"damaged"}}"#
                    );
                });
            } else {
                let sku = zipf(&mut rng);
                let counted = (model_on_hand[sku as usize] + rng.below(5) as i64 - 2).max(0);
                model_on_hand[sku as usize] = counted;
                emit(&mut out, sku, &mut |b| {
                    let _ = write!(
                        b,
                        r#"{{"id":"cnt:{seq}","type":"stock_counted","sku":"SKU-{sku:05}","ts":{ts},"on_hand":{counted}}}"#
                    );
                });
            }
        }
    }
    out
}

/// The generated stream's shape.
#[derive(Debug, Clone, clap::Args)]
pub struct StreamArgs {
    /// Number of events.
    #[arg(long, default_value_t = 1_000_000)]
    pub events: usize,
    /// Number of SKUs.
    #[arg(long, default_value_t = 10_000)]
    pub skus: usize,
    /// Seed of the deterministic generator.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

impl StreamArgs {
    /// The generator configuration.
    pub fn to_config(&self) -> GenConfig {
        GenConfig { events: self.events, skus: self.skus.max(1), seed: self.seed, ..GenConfig::default() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_deterministic_and_mostly_valid() {
        let cfg = GenConfig { events: 20_000, skus: 200, ..GenConfig::default() };
        let a = generate(&cfg);
        let b = generate(&cfg);
        assert!(a.len() >= 19_000 && a.len() <= 20_000, "{}", a.len());
        assert!(a.iter().zip(b.iter()).all(|(x, y)| x == y));
        let bad = a.iter().filter(|(_, p)| stockflow_state::decode(p).is_err()).count();
        assert!(bad > 0 && bad < 40, "{bad} bad records");
        let wrong_key = a.iter().filter(|(k, p)| stockflow_state::decode(p).is_ok_and(|e| e.sku != *k)).count();
        assert_eq!(wrong_key, 0);
    }
}
