//! DoRA, VeRA and LoRA-FA against LoRA (f32, CPU); the cases are in `variant_cases`.
//! Targets (issue 4):
//! - DoRA forward+backward ≤ 1.15 × LoRA forward+backward at n = 512, d = 1024, r = 16;
//! - DoRA evaluation at n = 1, d = 2048 ≤ 1.5 × LoRA;
//! - VeRA (r = 256) forward+backward faster than PEFT's VeRA on the same shape (PEFT's
//!   side: `python3 benches/peft_compare.py`, which runs the same cases side by side).
//!
//! Run: `cargo bench --bench variants` (sample sizes are small; the machine is shared).

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};

mod variant_cases;
use variant_cases::{train_rank, EvalCases, TrainCases, EVAL, TRAIN};

fn train_step(c: &mut Criterion) {
    println!(
        "lorakit kernels: {}",
        lorakit::kernels::CpuReport::current()
    );
    let cases = TrainCases::new();
    let (n, d, _) = TRAIN;
    let mut group = c.benchmark_group(format!("fwd_bwd_n{n}_d{d}"));
    for (name, layer) in &cases.layers {
        let rank = train_rank(name);
        let shown = name.trim_end_matches(&format!("_r{rank}"));
        group.bench_function(format!("{shown}_r{rank}"), |b| {
            b.iter(|| cases.step(layer.as_ref()))
        });
    }
    group.finish();
}

fn decode(c: &mut Criterion) {
    let cases = EvalCases::new();
    let (d, r) = EVAL;
    let mut group = c.benchmark_group(format!("eval_n1_d{d}_r{r}"));
    group.bench_function("base", |b| b.iter(|| cases.base()));
    for (name, layer) in &cases.layers {
        group.bench_function(*name, |b| b.iter(|| cases.eval(layer.as_ref())));
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = train_step, decode
}
criterion_main!(benches);
