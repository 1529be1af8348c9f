//! QLoRA benchmark: one LoRA layer (r = 16, alpha = 32, `d × d`) over an f32 frozen base
//! and quantized ones (Q8_0 and Q4_K by default; `--types` picks from Q8_0, Q4_K, Q5_K,
//! Q6_K and bitsandbytes' NF4), at d = 2048 and 4096.
//!
//! - resident base memory: the bytes the frozen weight takes (f32 tensor, GGML blocks, or
//!   NF4 codes and f32 block scales; `nf4` quantizes the weight rounded to bf16, as a bf16
//!   checkpoint's quant state records it, and `nf4_f16` rounded to f16, as an f16
//!   checkpoint's: its values are then rounded to f16 as they are dequantized);
//! - training step (n = 512 rows): forward, mean-square loss, backward (the input tracks a
//!   gradient, as inside a model), one AdamW step over A and B;
//! - decode (n = 1 row): the adapted forward, evaluation mode, no gradient.
//!
//! Medians over `--reps` timed runs after one warm-up (`--reps × 4` decodes). Prints a
//! Markdown table; `--decode-only` skips the training steps (their columns print NaN).
//!
//! ```text
//! cargo run --release --example qlora_speed -- [--reps 5] [--dims 2048,4096] [--threads 2] \
//!     [--types q8_0,q4_k,nf4,nf4_f16] [--decode-only]
//! ```

use std::time::Instant;

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use lorakit::init::SeededRng;
use lorakit::quant::{Bnb4Type, QuantFormat, QuantizedWeight};
use lorakit::{Adapter, FrozenLinear, LoraConfig, LoraLinear};

/// The median of `reps` timings (ms) of `f` after one warm-up call.
fn median_ms(reps: usize, mut f: impl FnMut() -> lorakit::Result<()>) -> lorakit::Result<f64> {
    f()?;
    let mut t = Vec::with_capacity(reps);
    for _ in 0..reps {
        let start = Instant::now();
        f()?;
        t.push(start.elapsed().as_secs_f64() * 1e3);
    }
    t.sort_by(f64::total_cmp);
    Ok(t[t.len() / 2])
}

struct Row {
    d: usize,
    base: String,
    bytes: usize,
    step_ms: f64,
    decode_ms: f64,
}

fn run(d: usize, quant: Option<Base>, reps: usize, steps: bool) -> lorakit::Result<Row> {
    let dev = Device::Cpu;
    let mut rng = SeededRng::new(1);
    let w = rng.normal((d, d), 0.0, 0.02, DType::F32, &dev)?;
    let mut base = FrozenLinear::new(w.clone(), None)?;
    let mut bytes = d * d * 4;
    if let Some(Base { format: ty, dtype }) = quant {
        base = match ty {
            // As a bf16 (f16) checkpoint's NF4 weights are: values rounded to bf16 (f16).
            QuantFormat::Bnb4(_) => {
                let q = QuantizedWeight::quantize("proj", &w.to_dtype(dtype)?, ty)?;
                FrozenLinear::from_quantized(q, None, DType::F32)?
            }
            QuantFormat::Ggml(_) => base.quantize("proj", ty)?,
        };
        bytes = base.quantized().map_or(bytes, |q| q.storage_bytes());
    }
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let layer = LoraLinear::new(base, &LoraConfig::new(16, 32.0), vb.pp("proj"))?;
    let mut opt = candle_nn::AdamW::new_lr(varmap.all_vars(), 1e-4)?;
    let x = Var::from_tensor(&rng.normal((512, d), 0.0, 1.0, DType::F32, &dev)?)?;
    let target = rng.normal((512, d), 0.0, 1.0, DType::F32, &dev)?;
    let step_ms = if !steps {
        f64::NAN
    } else {
        median_ms(reps, || {
            let y = layer.forward_t(x.as_tensor(), true)?;
            let loss = (y - &target)?.sqr()?.mean_all()?;
            opt.backward_step(&loss)?;
            Ok(())
        })?
    };
    let row: Tensor = rng.normal((1, d), 0.0, 1.0, DType::F32, &dev)?;
    let decode_ms = median_ms(reps * 4, || {
        layer.forward_t(&row, false)?;
        Ok(())
    })?;
    Ok(Row {
        d,
        base: quant.map_or("f32".to_string(), type_name),
        bytes,
        step_ms,
        decode_ms,
    })
}

fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A quantized base: its format, and for bitsandbytes' the dtype the weight is rounded to
/// before it is quantized (the quant state's; unused for GGML types).
#[derive(Clone, Copy)]
struct Base {
    format: QuantFormat,
    dtype: DType,
}

/// The base named `name` (`q8_0`, `q4_k`, `q5_k`, `q6_k`, or bitsandbytes' `nf4` (bf16)
/// and `nf4_f16`, any case).
fn parse_type(name: &str) -> Option<Base> {
    let ggml = |t: GgmlDType| Base {
        format: t.into(),
        dtype: DType::F32,
    };
    let nf4 = |dtype| Base {
        format: Bnb4Type::Nf4.into(),
        dtype,
    };
    match name.trim().to_ascii_lowercase().as_str() {
        "q8_0" => Some(ggml(GgmlDType::Q8_0)),
        "q4_k" => Some(ggml(GgmlDType::Q4K)),
        "q5_k" => Some(ggml(GgmlDType::Q5K)),
        "q6_k" => Some(ggml(GgmlDType::Q6K)),
        "nf4" => Some(nf4(DType::BF16)),
        "nf4_f16" => Some(nf4(DType::F16)),
        _ => None,
    }
}

/// llama.cpp's name of a GGML type (`Q4_K`), `NF4` for bitsandbytes' (`NF4 (f16)` over an
/// f16 weight).
fn type_name(base: Base) -> String {
    match base.format {
        QuantFormat::Ggml(GgmlDType::Q4K) => "Q4_K".into(),
        QuantFormat::Ggml(GgmlDType::Q5K) => "Q5_K".into(),
        QuantFormat::Ggml(GgmlDType::Q6K) => "Q6_K".into(),
        QuantFormat::Ggml(other) => format!("{other:?}"),
        QuantFormat::Bnb4(t) if base.dtype == DType::F16 => {
            format!("{} (f16)", t.name().to_uppercase())
        }
        QuantFormat::Bnb4(t) => t.name().to_uppercase(),
    }
}

fn main() -> lorakit::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let reps = arg(&args, "--reps", 5usize);
    let threads = arg(&args, "--threads", 2usize);
    let dims: String = arg(&args, "--dims", "2048,4096".to_string());
    let types: String = arg(&args, "--types", "q8_0,q4_k".to_string());
    let steps = !args.iter().any(|a| a == "--decode-only");
    let Some(types) = types.split(',').map(parse_type).collect::<Option<Vec<_>>>() else {
        eprintln!(
            "--types: a comma-separated list of q8_0, q4_k, q5_k, q6_k, nf4, nf4_f16; got {types}"
        );
        std::process::exit(2);
    };
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .ok();
    println!("threads: {threads}, reps: {reps}");
    println!("| d | base | base memory (MiB) | × f32 | step n=512 (ms) | × f32 | decode n=1 (ms) | × f32 |");
    println!("|---|---|---|---|---|---|---|---|");
    for d in dims
        .split(',')
        .filter_map(|s| s.trim().parse::<usize>().ok())
    {
        let f32_row = run(d, None, reps, steps)?;
        let mut rows = vec![];
        for &ty in &types {
            rows.push(run(d, Some(ty), reps, steps)?);
        }
        for r in std::iter::once(&f32_row).chain(&rows) {
            println!(
                "| {} | {} | {:.1} | {:.3} | {:.1} | {:.2} | {:.2} | {:.2} |",
                r.d,
                r.base,
                r.bytes as f64 / (1 << 20) as f64,
                r.bytes as f64 / f32_row.bytes as f64,
                r.step_ms,
                r.step_ms / f32_row.step_ms,
                r.decode_ms,
                r.decode_ms / f32_row.decode_ms,
            );
        }
    }
    Ok(())
}
