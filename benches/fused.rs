//! Base linear vs composed LoRA vs fused LoRA, forward and forward+backward, f32 on the CPU.
//!
//! `cargo bench --bench fused` (set `RAYON_NUM_THREADS` to fix the thread count). The
//! forwards of the small batches are evaluation ([`common::Setup::fwd_row`]).

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};
use std::time::Duration;

mod common;
use common::{Path, Setup, SHAPES};

fn bench(c: &mut Criterion) {
    println!(
        "lorakit kernels: {}",
        lorakit::kernels::CpuReport::current()
    );
    for shape in SHAPES {
        let setup = Setup::new(shape);
        let label = format!("n{}_d{}_r{}", shape.n, shape.d, shape.r);
        let mut g = c.benchmark_group(format!("fwd/{label}"));
        g.sample_size(10)
            .warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_secs(2));
        for path in Path::ALL {
            g.bench_function(BenchmarkId::from_parameter(path.name()), |b| {
                b.iter(|| black_box(setup.fwd_row(path)))
            });
        }
        g.finish();
        let mut g = c.benchmark_group(format!("fwd_bwd/{label}"));
        g.sample_size(10)
            .warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_secs(3));
        for path in Path::ALL {
            g.bench_function(BenchmarkId::from_parameter(path.name()), |b| {
                b.iter(|| black_box(setup.forward_backward(path)))
            });
        }
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
