//! Hot paths of the engine on the demo stream: decode, apply, and decode + apply + windows; and
//! decode + apply over four weeks of order lifecycles (re-sent placements, remembered lines).
//!
//! `cargo bench --bench engine`; figures in docs/BENCHMARKS.md.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use stockflow::loadtest::generate::{GenConfig, generate};
use stockflow_state::{EngineConfig, ShardEngine, decode};

const EVENTS: usize = 200_000;

fn benches(c: &mut Criterion) {
    let stream = generate(&GenConfig { events: EVENTS, skus: 10_000, ..GenConfig::default() });
    let records: Vec<&[u8]> = stream.iter().map(|(_, p)| p).collect();
    let cfg = Arc::new(EngineConfig::default());
    let mut group = c.benchmark_group("engine");
    group.throughput(Throughput::Elements(records.len() as u64));
    group.sample_size(20);

    group.bench_function("decode", |b| {
        b.iter(|| {
            let mut ok = 0usize;
            for r in &records {
                ok += usize::from(decode(black_box(r)).is_ok());
            }
            ok
        })
    });

    let events: Vec<_> = records.iter().filter_map(|r| decode(r).ok()).collect();
    group.bench_function("apply", |b| {
        b.iter_batched(
            || ShardEngine::new(Arc::clone(&cfg)),
            |mut engine| {
                for ev in &events {
                    engine.apply(black_box(ev));
                }
                engine
            },
            criterion::BatchSize::LargeInput,
        )
    });

    decode_apply(&mut group, "decode_apply_windows", &records, &cfg);
    group.finish();

    // Four weeks of lifecycles: lines remembered for 35 days, placements re-sent days apart.
    let weeks = stockflow::loadtest::lifecycles::generate(&GenConfig {
        events: EVENTS,
        skus: 1_000,
        hour_weights: vec![1.0; 28 * 24],
        ..GenConfig::default()
    });
    let records: Vec<&[u8]> = weeks.iter().map(|(_, p)| p).collect();
    let mut group = c.benchmark_group("engine");
    group.throughput(Throughput::Elements(records.len() as u64));
    group.sample_size(20);
    decode_apply(&mut group, "decode_apply_four_weeks", &records, &cfg);
    group.finish();
}

/// Decode and apply every record into a fresh engine (SKU interning and map growth included).
fn decode_apply(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    records: &[&[u8]],
    cfg: &Arc<EngineConfig>,
) {
    group.bench_function(name, |b| {
        b.iter_batched(
            || ShardEngine::new(Arc::clone(cfg)),
            |mut engine| {
                for r in records {
                    if let Ok(ev) = decode(black_box(r)) {
                        engine.apply(&ev);
                    }
                }
                engine
            },
            criterion::BatchSize::LargeInput,
        )
    });
}

criterion_group!(engine, benches);
criterion_main!(engine);
