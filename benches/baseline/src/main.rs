//! The baseline: what one core does with the canonical events when nothing else is asked of it.
//!
//! `cargo run --release --manifest-path benches/baseline/Cargo.toml -- EVENTS.ndjson`
//!
//! One thread reads the whole file, decodes each line with serde_json into borrowed fields, keeps
//! per SKU (interned) `on_hand`, `reserved` and the open order lines, dedups by event id (64-bit
//! hash), and counts units ordered into 1-minute and 1-hour tumbling windows — the subset of
//! SPEC v2's rules that stockflow's engine also runs, without decimals, effects, bounds,
//! remembered lines, watermarks or any durability. It prints events/s and per-SKU totals (so the
//! work cannot be optimised away). docs/BENCHMARKS.md reports every stockflow figure as a ratio to
//! this loop measured in the same run.

use std::hash::BuildHasher;
use std::time::Instant;

use hashbrown::HashMap;
use serde::Deserialize;

#[derive(Deserialize)]
struct Event<'a> {
    #[serde(borrow)]
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    sku: &'a str,
    ts: i64,
    qty: Option<i64>,
    order_id: Option<&'a str>,
    delta: Option<i64>,
    on_hand: Option<i64>,
}

#[derive(Default)]
struct Sku {
    on_hand: i64,
    reserved: i64,
    lines: HashMap<u64, i64>,
    minute: HashMap<i64, i64>,
    hour: HashMap<i64, i64>,
}

fn main() -> std::process::ExitCode {
    let Some(path) = std::env::args().nth(1) else {
        eprintln!("usage: stockflow-baseline EVENTS.ndjson");
        return std::process::ExitCode::from(2);
    };
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("error: reading {path}: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let started = Instant::now();
    let hasher = foldhash::fast::FixedState::with_seed(7);
    let mut index: HashMap<&str, u32> = HashMap::new();
    let mut skus: Vec<Sku> = Vec::new();
    let mut seen: hashbrown::HashSet<u64> = hashbrown::HashSet::new();
    let (mut events, mut bad, mut duplicates) = (0u64, 0u64, 0u64);
    for line in bytes.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        events += 1;
        let Ok(e) = serde_json::from_slice::<Event<'_>>(line) else {
            bad += 1;
            continue;
        };
        if !seen.insert(hasher.hash_one(e.id)) {
            duplicates += 1;
            continue;
        }
        let next = skus.len() as u32;
        let slot = *index.entry(e.sku).or_insert(next) as usize;
        if slot == skus.len() {
            skus.push(Sku::default());
        }
        let s = &mut skus[slot];
        let line = e.order_id.map(|o| hasher.hash_one(o));
        match (e.kind, e.qty, line) {
            ("order_placed", Some(q), Some(l)) => {
                if !s.lines.contains_key(&l) {
                    s.lines.insert(l, q);
                    s.reserved += q;
                    *s.minute.entry(e.ts / 60_000).or_default() += q;
                    *s.hour.entry(e.ts / 3_600_000).or_default() += q;
                }
            }
            ("order_cancelled", q, Some(l)) => {
                if let Some(open) = s.lines.get_mut(&l) {
                    let n = q.unwrap_or(*open).min(*open);
                    *open -= n;
                    s.reserved -= n;
                }
            }
            ("order_shipped", q, Some(l)) => {
                let open = s.lines.entry(l).or_insert(0);
                let n = q.unwrap_or(*open);
                let released = n.min(*open);
                *open -= released;
                s.reserved -= released;
                s.on_hand -= n;
            }
            ("stock_received", Some(q), _) => s.on_hand += q,
            ("stock_adjusted", _, _) => s.on_hand += e.delta.unwrap_or(0),
            ("stock_counted", _, _) => s.on_hand = e.on_hand.unwrap_or(s.on_hand),
            _ => bad += 1,
        }
        // Windows older than a day are final: dropped, as stockflow emits and forgets them.
        if s.hour.len() > 48 {
            let newest = e.ts / 3_600_000;
            s.hour.retain(|h, _| newest - *h <= 24);
            s.minute.retain(|m, _| newest * 60 - *m <= 24 * 60);
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let (on_hand, reserved): (i64, i64) = skus.iter().fold((0, 0), |a, s| (a.0 + s.on_hand, a.1 + s.reserved));
    println!(
        "baseline: {events} events in {secs:.3} s = {:.0} events/s ({} SKUs, {duplicates} duplicates, {bad} bad; Σ on_hand {on_hand}, Σ reserved {reserved})",
        events as f64 / secs,
        skus.len()
    );
    std::process::ExitCode::SUCCESS
}
