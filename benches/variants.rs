//! DoRA, VeRA and LoRA-FA against LoRA (f32, CPU). Targets (issue 4):
//! - DoRA forward+backward ≤ 1.15 × LoRA forward+backward at n = 512, d = 1024, r = 16;
//! - DoRA evaluation at n = 1, d = 2048 ≤ 1.5 × LoRA;
//! - VeRA (r = 256) forward+backward faster than PEFT's VeRA on the same shape.
//!
//! The input is a `Var` so backward computes `dx`, as inside a network.
//! Run: `cargo bench --bench variants` (sample sizes are small; the machine is shared).

use std::time::Duration;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use lorakit::init::SeededRng;
use lorakit::{
    lora_fa, Adapter, DoraLinear, FrozenLinear, LoraConfig, LoraInit, LoraLinear, VeraBuilder,
    VeraConfig,
};

fn base(d: usize, rng: &mut SeededRng) -> FrozenLinear {
    let w = rng
        .uniform((d, d), -0.05, 0.05, DType::F32, &Device::Cpu)
        .unwrap();
    let b = rng.uniform(d, -0.1, 0.1, DType::F32, &Device::Cpu).unwrap();
    FrozenLinear::new(w, Some(b)).unwrap()
}

fn input(n: usize, d: usize, rng: &mut SeededRng) -> Var {
    Var::from_tensor(
        &rng.uniform((n, d), -1.0, 1.0, DType::F32, &Device::Cpu)
            .unwrap(),
    )
    .unwrap()
}

fn lora_config(r: usize) -> LoraConfig {
    LoraConfig {
        init: LoraInit::BothRandom,
        ..LoraConfig::new(r, 2.0 * r as f64)
    }
}

fn vb(varmap: &VarMap) -> VarBuilder<'static> {
    VarBuilder::from_varmap(varmap, DType::F32, &Device::Cpu)
}

fn fwd_bwd(layer: &dyn Adapter, x: &Var) {
    let y = layer.forward_t(x.as_tensor(), true).unwrap();
    let grads = y.sum_all().unwrap().backward().unwrap();
    std::hint::black_box(grads);
}

fn eval(layer: &dyn Adapter, x: &Tensor) {
    std::hint::black_box(layer.forward_t(x, false).unwrap());
}

fn train_step(c: &mut Criterion) {
    let (n, d, r) = (512, 1024, 16);
    let mut rng = SeededRng::new(0);
    let x = input(n, d, &mut rng);
    let varmap = VarMap::new();
    let layers: Vec<(&str, Box<dyn Adapter>)> = vec![
        (
            "lora",
            Box::new(
                LoraLinear::new(base(d, &mut rng), &lora_config(r), vb(&varmap).pp("l")).unwrap(),
            ),
        ),
        (
            "dora",
            Box::new(
                DoraLinear::new(base(d, &mut rng), &lora_config(r), vb(&varmap).pp("d")).unwrap(),
            ),
        ),
        (
            "lora_fa",
            Box::new(
                lora_fa::new(base(d, &mut rng), &lora_config(r), vb(&varmap).pp("f")).unwrap(),
            ),
        ),
    ];
    let mut group = c.benchmark_group(format!("fwd_bwd_n{n}_d{d}_r{r}"));
    for (name, layer) in &layers {
        group.bench_function(*name, |b| b.iter(|| fwd_bwd(layer.as_ref(), &x)));
    }
    group.finish();
}

fn decode(c: &mut Criterion) {
    let (d, r) = (2048, 16);
    let mut rng = SeededRng::new(1);
    let x = input(1, d, &mut rng).as_tensor().detach();
    let varmap = VarMap::new();
    let frozen = base(d, &mut rng);
    let lora = LoraLinear::new(frozen.clone(), &lora_config(r), vb(&varmap).pp("l")).unwrap();
    let dora = DoraLinear::new(frozen.clone(), &lora_config(r), vb(&varmap).pp("d")).unwrap();
    dora.prepare_for_inference().unwrap();
    let mut group = c.benchmark_group(format!("eval_n1_d{d}_r{r}"));
    group.bench_function("base", |b| {
        b.iter(|| std::hint::black_box(frozen.forward_checked("base", &x).unwrap()))
    });
    group.bench_function("lora", |b| b.iter(|| eval(&lora, &x)));
    group.bench_function("dora", |b| b.iter(|| eval(&dora, &x)));
    group.finish();
}

fn vera(c: &mut Criterion) {
    let (n, d, r) = (512, 1024, 256);
    let mut rng = SeededRng::new(2);
    let x = input(n, d, &mut rng);
    let varmap = VarMap::new();
    let frozen = base(d, &mut rng);
    let mut builder = VeraBuilder::new(VeraConfig {
        r,
        ..VeraConfig::default()
    });
    builder.reserve_for(&frozen).unwrap();
    let layer = builder.build(frozen, vb(&varmap).pp("v")).unwrap();
    // Non-zero λ_b so the low-rank branch is not trivially zero.
    layer
        .lambda_b()
        .set(&Tensor::ones(d, DType::F32, &Device::Cpu).unwrap())
        .unwrap();
    let mut group = c.benchmark_group("vera");
    group.bench_function(
        BenchmarkId::new("fwd_bwd", format!("n{n}_d{d}_r{r}")),
        |b| b.iter(|| fwd_bwd(&layer, &x)),
    );
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = train_step, decode, vera
}
criterion_main!(benches);
