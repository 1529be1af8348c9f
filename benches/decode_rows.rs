//! The decode kernels over weights that do not fit in the caches, as in decoding a real
//! model: the forward of a stack of frozen `2048 × 2048` layers (no bias), each row count
//! timed per layer. Stacks: `f32` linear layers (`W` stored `(out, in)`, the decode
//! kernel's column-major form) and GPT-2 `Conv1D` layers (stored `(in, out)`, its row-major
//! form), for 1, 2, 4 and 8 rows; and linear layers quantized to Q8_0, Q4_K, Q5_K and Q6_K
//! (the fused dequantize-and-dot kernels, `kernels::cpu::quant::dot`) for 1, 2 and 4 rows.
//!
//! `cargo bench --bench decode_rows` (set `RAYON_NUM_THREADS` to fix the thread count;
//! `LORAKIT_CPU_ISA=avx2` compares the narrower kernels). A stack holds at least four times
//! the last-level cache the CPU reports (sysfs; 64 MiB assumed where it reports none) and
//! at least 8 layers, at most 64 `f32` layers (1 GiB) or 256 quantized ones, so every
//! layer's weight comes from memory on any CPU with less than 256 MiB of it (a quarter of
//! that for the quantized stacks). A bench over one weight in the caches is `cargo bench
//! --bench fused` (`fwd/n1_d2048_r16`).

use std::time::{Duration, Instant};

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Module, Tensor};
use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};
use lorakit::init::SeededRng;
use lorakit::FrozenLinear;

const D: usize = 2048;

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

/// How a stack's layers store their weight.
#[derive(Clone, Copy)]
enum Kind {
    Linear,
    Conv1d,
    Quantized(GgmlDType),
}

impl Kind {
    const ALL: [Kind; 6] = [
        Kind::Linear,
        Kind::Conv1d,
        Kind::Quantized(GgmlDType::Q8_0),
        Kind::Quantized(GgmlDType::Q4K),
        Kind::Quantized(GgmlDType::Q5K),
        Kind::Quantized(GgmlDType::Q6K),
    ];

    fn name(self) -> String {
        match self {
            Kind::Linear => "linear".into(),
            Kind::Conv1d => "conv1d".into(),
            Kind::Quantized(ty) => format!("{ty:?}").to_lowercase(),
        }
    }

    /// A frozen layer over the `D × D` weight `w`.
    fn build(self, w: Tensor) -> FrozenLinear {
        match self {
            Kind::Linear => FrozenLinear::new(w, None).unwrap(),
            Kind::Conv1d => FrozenLinear::conv1d(w, None).unwrap(),
            Kind::Quantized(ty) => FrozenLinear::new(w, None)
                .unwrap()
                .quantize("layer", ty)
                .unwrap(),
        }
    }

    /// The row counts timed: up to 8 in `f32`, up to the fused quantized kernels' 4.
    fn rows(self) -> &'static [usize] {
        match self {
            Kind::Linear | Kind::Conv1d => &[1, 2, 4, 8],
            Kind::Quantized(_) => &[1, 2, 4],
        }
    }

    /// The most layers a stack holds.
    fn max_layers(self) -> usize {
        match self {
            Kind::Linear | Kind::Conv1d => 64,
            Kind::Quantized(_) => 256,
        }
    }
}

fn bench(c: &mut Criterion) {
    println!(
        "lorakit kernels: {}",
        lorakit::kernels::CpuReport::current()
    );
    let dev = Device::Cpu;
    let cache = last_level_cache().unwrap_or(64 << 20);
    let mut rng = SeededRng::new(0);
    let bound = 1.0 / (D as f64).sqrt();
    let weight = |rng: &mut SeededRng| {
        rng.uniform(&[D, D], -bound, bound, DType::F32, &dev)
            .unwrap()
    };
    for kind in Kind::ALL {
        let first = kind.build(weight(&mut rng));
        let layer_bytes = first
            .quantized()
            .map_or(D * D * std::mem::size_of::<f32>(), |q| q.storage_bytes());
        // Four times the cache, at least 8 layers, and at most `max_layers` (for CPUs with
        // very large caches).
        let layers = (4 * cache)
            .div_ceil(layer_bytes)
            .clamp(8, kind.max_layers());
        let stack: Vec<FrozenLinear> = std::iter::once(first)
            .chain((1..layers).map(|_| kind.build(weight(&mut rng))))
            .collect();
        let mut g = c.benchmark_group(format!("decode_rows/{}_d{D}_{layers}_layers", kind.name()));
        g.sample_size(10)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(3));
        for &m in kind.rows() {
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
