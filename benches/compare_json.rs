//! The cases of `fused.rs` and of `variants.rs` timed with a plain loop and printed as one
//! JSON object (`{"case": [median_ms, min_ms], ...}`) for `benches/peft_compare.py`.
//!
//! `cargo bench --bench compare_json` (the script sets `RAYON_NUM_THREADS`).
//!
//! Like a training program, it first calls `lorakit::threads::park_idle_elementwise_workers`
//! (candle's element-wise workers spin 200 rounds after an op instead of 25,000); a
//! `CANDLE_BARRIER_POOL_SPIN_LIMIT` set by the caller is kept; and it times every case on
//! one of rayon's worker threads (`lorakit::threads::on_worker`, as a training or decoding
//! loop should run).
//!
//! The forward rows of the small batches (`n ≤ common::EVAL_MAX_ROWS`) time evaluation: an input
//! without gradient tracking and, for the fused path, `LoraLinear::forward_t(x, false)`
//! (PEFT's side runs under `torch.no_grad()`).

use std::time::Instant;

mod common;
mod variant_cases;
use common::{Path, Setup, SHAPES};
use variant_cases::{EvalCases, TrainCases, EVAL, TRAIN};

/// Median and minimum wall time of `f` in milliseconds, after warm-up, over about
/// `budget_ms`.
fn median_ms(mut f: impl FnMut(), budget_ms: f64) -> (f64, f64) {
    for _ in 0..3 {
        f();
    }
    let mut times = Vec::new();
    let start = Instant::now();
    while times.len() < 5 || (start.elapsed().as_secs_f64() * 1e3 < budget_ms && times.len() < 200)
    {
        let t = Instant::now();
        f();
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(|a, b| a.total_cmp(b));
    (times[times.len() / 2], times[0])
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is accepted.
    lorakit::threads::park_idle_elementwise_workers();
    lorakit::threads::on_worker(run);
}

/// Every case, timed on one of rayon's workers (`main`'s `on_worker`).
fn run() {
    // What the kernels route by, for `peft_compare.py`'s machine line.
    println!(
        "lorakit kernels: {}",
        lorakit::kernels::CpuReport::current()
    );
    let mut out = Vec::new();
    for shape in SHAPES {
        let setup = Setup::new(shape);
        let label = format!("n{}_d{}_r{}", shape.n, shape.d, shape.r);
        for path in Path::ALL {
            let fwd = median_ms(|| drop(std::hint::black_box(setup.fwd_row(path))), 1500.0);
            out.push(format!(
                "\"fwd/{label}/{}\": [{:.4}, {:.4}]",
                path.name(),
                fwd.0,
                fwd.1
            ));
            let fb = median_ms(
                || {
                    std::hint::black_box(setup.forward_backward(path));
                },
                2500.0,
            );
            out.push(format!(
                "\"fwd_bwd/{label}/{}\": [{:.4}, {:.4}]",
                path.name(),
                fb.0,
                fb.1
            ));
        }
    }
    let cases = TrainCases::new();
    let (n, d, _) = TRAIN;
    for (name, layer) in &cases.layers {
        let t = median_ms(|| cases.step(layer.as_ref()), 2500.0);
        out.push(format!(
            "\"variants/fwd_bwd_n{n}_d{d}/{name}\": [{:.4}, {:.4}]",
            t.0, t.1
        ));
    }
    let cases = EvalCases::new();
    let (d, _) = EVAL;
    let t = median_ms(|| cases.base(), 1500.0);
    out.push(format!(
        "\"variants/eval_n1_d{d}/base\": [{:.4}, {:.4}]",
        t.0, t.1
    ));
    for (name, layer) in &cases.layers {
        let t = median_ms(|| cases.eval(layer.as_ref()), 1500.0);
        out.push(format!(
            "\"variants/eval_n1_d{d}/{name}\": [{:.4}, {:.4}]",
            t.0, t.1
        ));
    }
    println!("{{{}}}", out.join(", "));
}
