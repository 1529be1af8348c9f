//! lorakit's side of `benches/gpu_compare.py` (feature `cuda`): the GPU cases timed
//! with a plain loop on `cuda:0`, printed as one JSON object (`{"case": [median_ms,
//! min_ms], ...}`) on the last line. Each timed call ends with a device synchronize.
//!
//! Cases (n = 4096 tokens, d = 4096, r = 16, VeRA r = 256; dtype from `LORAKIT_GPU_DTYPE`,
//! default bf16):
//! - `base_fwd`: the cuBLAS base GEMM `x Wᵀ` alone; `base_fwd_dgrad`: it and `g W`;
//! - `lora_fwd`: a LoRA layer's forward, no gradient (evaluation);
//! - `lora_fwd_bwd`, `dora_fwd_bwd`, `vera_fwd_bwd`: forward, `sum`, backward, with `x` a
//!   `Var` (as inside a network).
//!
//! `scripts/gpu-check.sh` builds it (`cargo bench --features cuda --bench gpu_json
//! --no-run`) and runs it on the GPU machine.

// clippy.toml keeps the library on `crate::matmul`; code outside it may call candle's own.
#![allow(clippy::disallowed_methods)]

use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use lorakit::init::SeededRng;
use lorakit::{
    Adapter, DoraLinear, FrozenLinear, LoraConfig, LoraInit, LoraLinear, VeraConfig, VeraLinear,
    VeraShared,
};

const N: usize = 4096;
const D: usize = 4096;
const R: usize = 16;
const VERA_R: usize = 256;

fn median_ms(dev: &Device, mut f: impl FnMut(), iters: usize) -> (f64, f64) {
    for _ in 0..3 {
        f();
    }
    dev.synchronize().unwrap();
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        f();
        dev.synchronize().unwrap();
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(|a, b| a.total_cmp(b));
    (times[times.len() / 2], times[0])
}

fn main() {
    let dev = match Device::new_cuda(0) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("gpu_json: no CUDA device ({e})");
            std::process::exit(2);
        }
    };
    let dtype = match std::env::var("LORAKIT_GPU_DTYPE").as_deref() {
        Ok("f32") => DType::F32,
        Ok("f16") => DType::F16,
        _ => DType::BF16,
    };
    let iters: usize = std::env::var("LORAKIT_GPU_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let mut rng = SeededRng::new(0);
    let mut uniform = |shape: &[usize], bound: f64| {
        rng.uniform(shape, -bound, bound, DType::F32, &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    };
    let w = uniform(&[D, D], 0.02);
    let bias = uniform(&[D], 0.1);
    let x_data = uniform(&[N, D], 1.0);
    let g = uniform(&[N, D], 1.0);
    let frozen = FrozenLinear::new(w.clone(), Some(bias)).unwrap();
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, dtype, &dev);
    let config = LoraConfig {
        init: LoraInit::BothRandom,
        ..LoraConfig::new(R, 2.0 * R as f64)
    };
    let lora = LoraLinear::new(frozen.clone(), &config, vb.pp("l")).unwrap();
    let dora = DoraLinear::new(frozen.clone(), &config, vb.pp("d")).unwrap();
    let shared = VeraShared::covering(VERA_R, 0, [(D, D)], dtype, &dev).unwrap();
    let vera = VeraLinear::new(frozen, &VeraConfig::new(shared), vb.pp("v")).unwrap();
    vera.lambda_b()
        .set(&Tensor::ones(D, dtype, &dev).unwrap())
        .unwrap();
    let x_var = Var::from_tensor(&x_data).unwrap();

    let mut out = Vec::new();
    let wt = w.t().unwrap();
    out.push((
        "base_fwd",
        median_ms(&dev, || drop(x_data.matmul(&wt).unwrap()), iters),
    ));
    out.push((
        "base_fwd_dgrad",
        median_ms(
            &dev,
            || {
                drop(x_data.matmul(&wt).unwrap());
                drop(g.matmul(&w).unwrap());
            },
            iters,
        ),
    ));
    out.push((
        "lora_fwd",
        median_ms(
            &dev,
            || drop(lora.forward_t(&x_data, false).unwrap()),
            iters,
        ),
    ));
    let layers: [(&str, &dyn Adapter); 3] = [
        ("lora_fwd_bwd", &lora),
        ("dora_fwd_bwd", &dora),
        ("vera_fwd_bwd", &vera),
    ];
    for (name, layer) in layers {
        let step = || {
            let y = layer.forward_t(x_var.as_tensor(), true).unwrap();
            drop(y.sum_all().unwrap().backward().unwrap());
        };
        out.push((name, median_ms(&dev, step, iters)));
    }
    let fields: Vec<String> = out
        .iter()
        .map(|(k, (med, min))| format!("\"{k}\": [{med:.4}, {min:.4}]"))
        .collect();
    println!(
        "{{\"dtype\": \"{dtype:?}\", \"n\": {N}, \"d\": {D}, \"r\": {R}, {}}}",
        fields.join(", ")
    );
}
