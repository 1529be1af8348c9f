//! The decode kernel over weights that do not fit in the caches, as in decoding a real model:
//! the forward of a stack of frozen `2048 × 2048` `f32` layers (no bias) for 1, 2, 4 and 8
//! rows, each row count timed per layer. Two stacks: linear layers (`W` stored
//! `(out, in)`, the kernel's column-major form) and GPT-2 `Conv1D` layers (stored
//! `(in, out)`, its row-major form).
//!
//! `cargo bench --bench decode_rows` (set `RAYON_NUM_THREADS` to fix the thread count). A
//! stack holds at least four times the last-level cache the CPU reports (sysfs; 64 MiB
//! assumed where it reports none), at least 8 layers (128 MiB) and at most 64 (1 GiB), so
//! every layer's weight comes from memory on any CPU with less than 256 MiB of it. A bench over one weight in the caches is `cargo bench --bench fused`
//! (`fwd/n1_d2048_r16`).

use std::time::{Duration, Instant};

use candle_core::{DType, Device, Module, Tensor};
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

/// A frozen layer from a `D × D` weight: a linear layer or a GPT-2 `Conv1D`.
type Build = fn(Tensor) -> FrozenLinear;

fn bench(c: &mut Criterion) {
    println!(
        "lorakit kernels: {}",
        lorakit::kernels::CpuReport::current()
    );
    let dev = Device::Cpu;
    let layer_bytes = D * D * std::mem::size_of::<f32>();
    let cache = last_level_cache().unwrap_or(64 << 20);
    // Four times the cache, at least 8 layers, and at most 64 (1 GiB of weights, for CPUs
    // with very large caches).
    let layers = (4 * cache).div_ceil(layer_bytes).clamp(8, 64);
    let mut rng = SeededRng::new(0);
    let bound = 1.0 / (D as f64).sqrt();
    let kinds: [(&str, Build); 2] = [
        ("linear", |w| FrozenLinear::new(w, None).unwrap()),
        ("conv1d", |w| FrozenLinear::conv1d(w, None).unwrap()),
    ];
    for (kind, build) in kinds {
        let stack: Vec<FrozenLinear> = (0..layers)
            .map(|_| {
                build(
                    rng.uniform(&[D, D], -bound, bound, DType::F32, &dev)
                        .unwrap(),
                )
            })
            .collect();
        let mut g = c.benchmark_group(format!("decode_rows/{kind}_d{D}_{layers}_layers"));
        g.sample_size(10)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(3));
        for m in ROWS {
            let x = rng.uniform(&[m, D], -1.0, 1.0, DType::F32, &dev).unwrap();
            g.bench_function(BenchmarkId::from_parameter(format!("rows_{m}")), |b| {
                b.iter_custom(|iters| per_layer(&stack, &x, iters))
            });
        }
        g.finish();
    }
}

/// The time of `iters` forwards of `x` through every layer of `stack`, per layer, on one
/// of rayon's workers (as a decoding loop runs: `generate` does it).
fn per_layer(stack: &[FrozenLinear], x: &Tensor, iters: u64) -> Duration {
    lorakit::threads::on_worker(|| {
        let start = Instant::now();
        for _ in 0..iters {
            for layer in stack {
                black_box(layer.forward(x).unwrap());
            }
        }
        start.elapsed() / stack.len().max(1) as u32
    })
}

criterion_group!(benches, bench);
criterion_main!(benches);
