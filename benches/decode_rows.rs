//! The decode kernel over weights that do not fit in the caches, as in decoding a real model:
//! the forward of a stack of frozen `2048 × 2048` `f32` linear layers (no bias) for 1, 2, 4
//! and 8 rows, each row count timed per layer.
//!
//! `cargo bench --bench decode_rows` (set `RAYON_NUM_THREADS` to fix the thread count). The
//! stack holds at least four times the last-level cache the CPU reports (sysfs; 64 MiB
//! assumed where it reports none), and at least 8 layers (128 MiB), so every layer's weight
//! comes from memory. A bench over one weight in the caches is `cargo bench --bench fused`
//! (`fwd/n1_d2048_r16`).

use std::time::{Duration, Instant};

use candle_core::{DType, Device, Module};
use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};
use lorakit::init::SeededRng;
use lorakit::FrozenLinear;

const D: usize = 2048;
const ROWS: [usize; 4] = [1, 2, 4, 8];

/// The last-level cache's size in bytes as sysfs reports it for CPU 0 (`index3`), if it does.
fn last_level_cache() -> Option<usize> {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/cpu0/cache/index3/size").ok()?;
    let text = text.trim();
    let (digits, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit())?);
    let scale = match unit {
        "K" => 1 << 10,
        "M" => 1 << 20,
        _ => return None,
    };
    digits.parse::<usize>().ok().map(|v| v * scale)
}

fn bench(c: &mut Criterion) {
    let dev = Device::Cpu;
    let layer_bytes = D * D * std::mem::size_of::<f32>();
    let cache = last_level_cache().unwrap_or(64 << 20);
    let layers = (4 * cache).div_ceil(layer_bytes).max(8);
    let mut rng = SeededRng::new(0);
    let bound = 1.0 / (D as f64).sqrt();
    let stack: Vec<FrozenLinear> = (0..layers)
        .map(|_| {
            let w = rng
                .uniform(&[D, D], -bound, bound, DType::F32, &dev)
                .unwrap();
            FrozenLinear::new(w, None).unwrap()
        })
        .collect();
    let mut g = c.benchmark_group(format!("decode_rows/d{D}_{layers}_layers_per_layer"));
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    for m in ROWS {
        let x = rng.uniform(&[m, D], -1.0, 1.0, DType::F32, &dev).unwrap();
        g.bench_function(BenchmarkId::from_parameter(format!("rows_{m}")), |b| {
            b.iter_custom(|iters| {
                // On one of rayon's workers, as a decoding loop runs (`generate` does it).
                lorakit::threads::on_worker(|| {
                    let start = Instant::now();
                    for _ in 0..iters {
                        for layer in &stack {
                            black_box(layer.forward(&x).unwrap());
                        }
                    }
                    start.elapsed() / layers as u32
                })
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
