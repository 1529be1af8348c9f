//! Speed of LoRA fine-tuning and generation on a small Llama-shaped model, the lorakit side
//! of `benches/llama_compare.py` (which runs PyTorch + transformers + PEFT on the same
//! shapes and prints both side by side).
//!
//! The model: [`LlamaForCausalLM`] with 4 layers, hidden 512, 8 heads, 4 KV heads, MLP 1408,
//! vocab 8000 (untied head), random base weights (N(0, 0.02), norms 1, as transformers
//! initializes them), f32, built through a fresh [`AdapterPlan::lora`] with r = 16,
//! alpha = 32 on every `q/k/v/o/gate/up/down_proj` (B = 0, as PEFT starts).
//!
//! Modes (`--mode`):
//!
//! - `train`: per step the causal-LM loss on random ids `(4, 256)`, the mean cross-entropy
//!   over the shifted positions (`logits[:, :-1]` against `ids[:, 1:]`) as
//!   `LlamaForCausalLM::loss_sum` computes it (the frozen `lm_head` and the loss as one op,
//!   as the library's trainer runs them; transformers' `model(input_ids, labels=ids)` on the
//!   other side), `loss.backward()`, one `candle_nn::AdamW` step over the adapter's
//!   variables (lr 1e-4, PyTorch's defaults otherwise). Warm-up steps, then timed steps; each
//!   phase (forward + loss, backward, optimizer) timed on its own.
//! - `gen`: `generate_greedy` (batch 1, KV cache) of `--gen-tokens` tokens after an
//!   8-token prompt, the adapter unmerged, in evaluation mode; warm-up call, then timed
//!   calls. Then `generate_batch` of as many tokens after four prompts of 8, 16, 24 and
//!   32 tokens, left-padded into one batch. For reference, the same batch-1 generation with
//!   the adapter disabled (the base alone) and merged.
//! - `ops`: the pieces a training step is made of, at the step's shapes, timed alone
//!   (forward, and forward + backward from a fixed random upstream gradient on each
//!   output, every input a variable): each LoRA linear, RMSNorm, RoPE, the attention core,
//!   the MLP's `silu(gate) · up`, residual adds, the embedding, the frozen `lm_head` and the
//!   loss as the step runs them (one op), the AdamW step; plus a few alternatives at the same
//!   shapes (the head and the loss apart, the composed candle ops, candle-nn's fused kernels
//!   without a backward, the head without a weight gradient) and the ops of one generated token
//!   (forward only). Each piece is multiplied by its count per step, to compare with the
//!   measured step (isolated pieces allocate all their memory afresh, so their sum
//!   overestimates the step; compare sides and groups, not absolute sums). RMSNorm, RoPE
//!   (with the head transpose), the attention core and `silu(gate) · up` are timed through
//!   [`lorakit::models::fused`], the ops the step runs; the candle compositions they
//!   replace are among the alternatives.
//! - `all` (default): train, gen and ops in this process (peak memory is then the
//!   largest of the three; the python driver runs each mode in its own process).
//!
//! ```text
//! cargo run --release --example llama_speed -- [--mode all|train|gen|ops] [--json]
//!     [--steps 10] [--warmup 2] [--gen-tokens 128] [--gen-rounds 3] [--threads 2]
//!     [--batch 4] [--seq 256] [--ops-budget-ms 1500]
//! ```
//!
//! Threads: `--threads N` sets `RAYON_NUM_THREADS` and `CANDLE_NUM_THREADS` before any
//! candle op runs and builds rayon's global pool with N threads. candle 0.11 reads
//! `RAYON_NUM_THREADS` for its `gemm` calls (`Parallelism::Rayon(n)` on rayon's global
//! pool) and `CANDLE_NUM_THREADS` (else `RAYON_NUM_THREADS`) for the pool its large
//! element-wise ops split over; candle-nn's softmax / RMSNorm kernels and lorakit's own
//! kernels use rayon's global pool. The output reports what each of them sees. The
//! example calls `lorakit::threads::park_idle_elementwise_workers` and
//! `lorakit::memory::retain_freed_buffers` first, as a training program should (candle's
//! element-wise workers spin 200 rounds after an op, not 25,000; MKL's OpenMP workers park
//! at once in a `mkl` build; freed step buffers stay in the process instead of being
//! faulted in again); set `CANDLE_BARRIER_POOL_SPIN_LIMIT=25000` to time candle's default
//! spin instead. (`retain_freed_buffers` since 2026-12-03: within noise on the default
//! build, 4–5% of the `mkl` build's training step on an Intel Xeon.)
//!
//! Every mode runs on one of rayon's worker threads (`lorakit::threads::on_worker`, as a
//! training or decoding loop should; generation does it by itself): from the main thread
//! every product would hand its work to sleeping workers and wait for them.
//!
//! Peak memory: `VmHWM` of `/proc/self/status` (Linux), at the end of the run.

// clippy.toml keeps the library on `crate::matmul`; code outside it may call candle's own.
#![allow(clippy::disallowed_methods)]

use std::collections::HashMap;
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Module, Tensor, Var, D};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use lorakit::init::SeededRng;
use lorakit::kernels::FusedLinear;
use lorakit::model::{
    AdapterPlan, Linear, ModuleSelector, ParameterTargets, RankAlpha, TargetSpec,
};
use lorakit::models::fused;
use lorakit::models::llama::{LlamaConfig, LlamaForCausalLM};
use lorakit::models::GenerationConfig;
use lorakit::{Adapter, FrozenLinear, LoraConfig, LoraLinear};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

type R<T> = std::result::Result<T, Box<dyn std::error::Error>>;

const TARGETS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];
/// The targets of `--family qwen3_moe`: the attention only (its experts and router are no
/// modules; PEFT reads `gate_proj` / `up_proj` / `down_proj` as the experts' parameters).
const ATTENTION_TARGETS: [&str; 4] = ["q_proj", "k_proj", "v_proj", "o_proj"];
/// `--family qwen3_moe`'s experts: 8 of them by default (`--moe-experts`), 704 wide (half
/// the dense MLP), 2 per token.
const MOE: (usize, usize, usize) = (8, 704, 2);
const RANK: usize = 16;
const ALPHA: f64 = 32.0;
const LR: f64 = 1e-4;
const PROMPT_LEN: usize = 8;
/// The prompt lengths of the batched generation case (left-padded to the longest).
const BATCH_PROMPT_LENS: [usize; 4] = [8, 16, 24, 32];

/// The benchmark's model shape (the issue's config).
#[derive(Clone, Copy)]
struct Shape {
    layers: usize,
    hidden: usize,
    heads: usize,
    kv_heads: usize,
    mlp: usize,
    vocab: usize,
}

const SHAPE: Shape = Shape {
    layers: 4,
    hidden: 512,
    heads: 8,
    kv_heads: 4,
    mlp: 1408,
    vocab: 8000,
};

impl Shape {
    fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }

    /// transformers' `LlamaConfig` defaults for everything else (θ = 10000, ε = 1e-6,
    /// 2048 positions, untied head, no biases); `gemma3`: the same sizes as a Gemma 3 text
    /// decoder ([`GEMMA3_EXTRA`]).
    fn config(&self, family: Family, experts: usize) -> R<LlamaConfig> {
        let mut json = json!({
            "model_type": "llama",
            "vocab_size": self.vocab,
            "hidden_size": self.hidden,
            "intermediate_size": self.mlp,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0,
            "tie_word_embeddings": false,
        });
        if family == Family::Olmo2 {
            json["model_type"] = json!("olmo2");
        } else if family == Family::GptOssExperts {
            let (_, width, per_token) = MOE;
            json["model_type"] = json!("gpt_oss");
            json["head_dim"] = json!(self.head_dim());
            json["num_local_experts"] = json!(experts);
            json["intermediate_size"] = json!(width);
            json["num_experts_per_tok"] = json!(per_token);
            json["sliding_window"] = json!(128);
            json["rms_norm_eps"] = json!(1e-5);
            json.as_object_mut().map(|o| o.remove("rope_theta"));
        } else if family.is_moe() {
            let (_, width, per_token) = MOE;
            json["model_type"] = json!("qwen3_moe");
            json["head_dim"] = json!(self.head_dim());
            json["num_experts"] = json!(experts);
            json["moe_intermediate_size"] = json!(width);
            json["num_experts_per_tok"] = json!(per_token);
            json["norm_topk_prob"] = json!(true);
        } else if family != Family::Llama {
            let model_type = if family == Family::Gemma3 {
                "gemma3_text"
            } else {
                "gemma2"
            };
            json["model_type"] = json!(model_type);
            json["head_dim"] = json!(self.head_dim());
            for (key, value) in GEMMA3_EXTRA {
                json[key] = value.parse::<Value>()?;
            }
        }
        Ok(LlamaConfig::from_json(&json.to_string())?)
    }

    /// `(name, d_in, d_out)` of each linear kind in a layer.
    fn linears(&self) -> [(&'static str, usize, usize); 7] {
        let (h, i, kv) = (self.hidden, self.mlp, self.kv_heads * self.head_dim());
        [
            ("q_proj", h, self.heads * self.head_dim()),
            ("k_proj", h, kv),
            ("v_proj", h, kv),
            ("o_proj", self.heads * self.head_dim(), h),
            ("gate_proj", h, i),
            ("up_proj", h, i),
            ("down_proj", i, h),
        ]
    }
}

/// The architecture the benchmark builds at [`SHAPE`].
#[derive(Clone, Copy, PartialEq, Eq)]
enum Family {
    /// transformers' `LlamaForCausalLM`.
    Llama,
    /// `Gemma3ForCausalLM`: norms times `1 + weight` (four per layer, and q/k norms), a
    /// GELU-tanh gate, sliding layers with their own RoPE θ.
    Gemma3,
    /// `Gemma2ForCausalLM`: as Gemma 3 without q/k norms or a second θ, with soft-capped
    /// attention scores (50) and logits (30).
    Gemma2,
    /// `Olmo2ForCausalLM`: norms after attention and the MLP only, q/k norms over the whole
    /// projections.
    Olmo2,
    /// `Qwen3MoeForCausalLM`: Qwen3's attention (per-head q/k norms) and a sparse mixture of
    /// [`MOE`] experts in every layer; LoRA on the attention ([`ATTENTION_TARGETS`]).
    Qwen3Moe,
    /// [`Family::Qwen3Moe`] with the LoRA on [`TARGETS`], which PEFT 0.21 (and lorakit's
    /// LoRA) reads on `qwen3_moe` as the attention and the experts' stacked parameters
    /// (`gate_up_proj` at twice the rank, `down_proj`).
    Qwen3MoeExperts,
    /// `GptOssForCausalLM` at the same sizes: biased attention with sinks, every other
    /// layer sliding over 128 positions, YaRN (GptOssConfig's default), [`MOE`] experts
    /// stored stacked with biases (clamped SwiGLU), a biased router; the LoRA on
    /// [`ATTENTION_TARGETS`] and on [`GPT_OSS_PARAMETERS`] (PEFT's `target_parameters`).
    GptOssExperts,
}

/// The stacked parameters `--family gpt_oss_experts` adapts (PEFT's `target_parameters`).
const GPT_OSS_PARAMETERS: [&str; 2] = ["experts.gate_up_proj", "experts.down_proj"];

impl Family {
    /// The modules the benchmark's LoRA adapts.
    fn targets(self) -> &'static [&'static str] {
        match self {
            Family::Qwen3Moe | Family::GptOssExperts => &ATTENTION_TARGETS,
            _ => &TARGETS,
        }
    }

    /// Whether the model is Qwen3-MoE.
    fn is_moe(self) -> bool {
        matches!(self, Family::Qwen3Moe | Family::Qwen3MoeExperts)
    }

    /// The stacked parameters the LoRA adapts by name (`target_parameters`).
    fn target_parameters(self) -> &'static [&'static str] {
        match self {
            Family::GptOssExperts => &GPT_OSS_PARAMETERS,
            _ => &[],
        }
    }
}

/// The Gemma keys the benchmark sets besides [`SHAPE`]'s (benches/llama_compare.py sets
/// the same): the usual attention scale, every other layer sliding over 128 positions
/// (Gemma 2's own alternation; Gemma 3's `sliding_window_pattern`, which Gemma 2 ignores).
const GEMMA3_EXTRA: [(&str, &str); 3] = [
    ("query_pre_attn_scalar", "64"),
    ("sliding_window", "128"),
    ("sliding_window_pattern", "2"),
];

struct Args {
    family: Family,
    mode: String,
    json: bool,
    steps: usize,
    warmup: usize,
    gen_tokens: usize,
    gen_rounds: usize,
    threads: usize,
    batch: usize,
    seq: usize,
    ops_budget_ms: f64,
    seed: u64,
    moe_experts: usize,
}

fn parse_args() -> R<Args> {
    let mut a = Args {
        family: Family::Llama,
        mode: "all".to_string(),
        json: false,
        steps: 10,
        warmup: 2,
        gen_tokens: 128,
        gen_rounds: 3,
        threads: 2,
        batch: 4,
        seq: 256,
        ops_budget_ms: 1500.0,
        seed: 0,
        moe_experts: MOE.0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--json" {
            a.json = true;
            continue;
        }
        if flag == "-h" || flag == "--help" {
            println!(
                "llama_speed [--family llama|gemma2|gemma3|olmo2|qwen3_moe|qwen3_moe_experts|gpt_oss_experts] [--mode all|train|gen|ops] [--json] \
                 [--steps N] [--warmup N] \
                 [--gen-tokens N] [--gen-rounds N] [--threads N] [--batch N] [--seq N] \
                 [--ops-budget-ms MS] [--seed N] [--moe-experts N]"
            );
            std::process::exit(0);
        }
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--mode" => a.mode = value,
            "--family" => {
                a.family = match value.as_str() {
                    "llama" => Family::Llama,
                    "gemma3" => Family::Gemma3,
                    "gemma2" => Family::Gemma2,
                    "olmo2" => Family::Olmo2,
                    "qwen3_moe" => Family::Qwen3Moe,
                    "qwen3_moe_experts" => Family::Qwen3MoeExperts,
                    "gpt_oss_experts" => Family::GptOssExperts,
                    other => {
                        return Err(format!(
                            "--family {other}: llama, gemma2, gemma3, olmo2, qwen3_moe, \
                             qwen3_moe_experts or gpt_oss_experts"
                        )
                        .into())
                    }
                }
            }
            "--steps" => a.steps = value.parse()?,
            "--warmup" => a.warmup = value.parse()?,
            "--gen-tokens" => a.gen_tokens = value.parse()?,
            "--gen-rounds" => a.gen_rounds = value.parse()?,
            "--threads" => a.threads = value.parse()?,
            "--batch" => a.batch = value.parse()?,
            "--seq" => a.seq = value.parse()?,
            "--ops-budget-ms" => a.ops_budget_ms = value.parse()?,
            "--seed" => a.seed = value.parse()?,
            "--moe-experts" => a.moe_experts = value.parse()?,
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    if !["all", "train", "gen", "ops"].contains(&a.mode.as_str()) {
        return Err(format!("--mode {}: all, train, gen or ops", a.mode).into());
    }
    if a.family != Family::Llama && ["all", "ops"].contains(&a.mode.as_str()) {
        return Err(
            "--family gemma2/3, olmo2 and qwen3_moe(_experts) run --mode train or gen (the per-op run is \
             Llama's)"
                .into(),
        );
    }
    if a.steps == 0
        || a.gen_rounds == 0
        || a.threads == 0
        || a.seq < 2
        || a.batch == 0
        || a.moe_experts < MOE.2
    {
        return Err(
            "--steps, --gen-rounds, --threads, --batch ≥ 1, --seq ≥ 2 and --moe-experts ≥ 2".into(),
        );
    }
    Ok(a)
}

/// Median, minimum and maximum of `xs`.
fn stats(xs: &[f64]) -> (f64, f64, f64) {
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    (median, v[0], v[n - 1])
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// Median and minimum wall time of `f` in ms: 2 warm-up calls, then at least 5 calls and
/// more while within `budget_ms` (at most 100).
fn time_ms(budget_ms: f64, mut f: impl FnMut() -> R<()>) -> R<(f64, f64)> {
    for _ in 0..2 {
        f()?;
    }
    let mut times = Vec::new();
    let start = Instant::now();
    while times.len() < 5 || (ms(start) < budget_ms && times.len() < 100) {
        let t = Instant::now();
        f()?;
        times.push(ms(t));
    }
    let (median, min, _) = stats(&times);
    Ok((median, min))
}

/// `(VmHWM, VmRSS)` of this process in MiB, from `/proc/self/status` (None elsewhere).
fn memory_mib() -> (Option<f64>, Option<f64>) {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return (None, None);
    };
    let field = |name: &str| {
        status.lines().find_map(|l| {
            l.strip_prefix(name)?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse::<f64>()
                .ok()
                .map(|kb| kb / 1024.0)
        })
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// The CPU's model name and widest vector extension, from `/proc/cpuinfo`.
fn cpu_info() -> (String, String) {
    let text = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let get = |key: &str| {
        text.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_default()
    };
    let flags = get("flags");
    let has = |f: &str| flags.split_whitespace().any(|x| x == f);
    let ext = if has("avx512f") {
        "AVX-512"
    } else if has("avx2") {
        if has("fma") {
            "AVX2+FMA"
        } else {
            "AVX2"
        }
    } else {
        "no AVX2"
    };
    (get("model name"), ext.to_string())
}

/// The model with random base weights and a fresh LoRA on all seven linear kinds, the
/// adapted layers and their trainable variables.
struct Built {
    model: LlamaForCausalLM,
    adapter: lorakit::model::AdaptedSet,
    vars: Vec<Var>,
    base_params: usize,
}

fn build(family: Family, experts: usize, seed: u64, dev: &Device) -> R<Built> {
    let s = SHAPE;
    let config = s.config(family, experts)?;
    let mut rng = SeededRng::new(seed);
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let mut normal = |name: String, shape: (usize, usize)| -> R<()> {
        tensors.insert(name, rng.normal(shape, 0.0, 0.02, DType::F32, dev)?);
        Ok(())
    };
    normal("model.embed_tokens.weight".into(), (s.vocab, s.hidden))?;
    normal("lm_head.weight".into(), (s.vocab, s.hidden))?;
    for i in 0..s.layers {
        for (name, d_in, d_out) in s.linears() {
            let mlp = ["gate_proj", "up_proj", "down_proj"].contains(&name);
            match (mlp, family) {
                (false, _) => normal(
                    format!("model.layers.{i}.self_attn.{name}.weight"),
                    (d_out, d_in),
                )?,
                (true, Family::Qwen3Moe | Family::Qwen3MoeExperts | Family::GptOssExperts) => {}
                (true, _) => normal(format!("model.layers.{i}.mlp.{name}.weight"), (d_out, d_in))?,
            }
        }
        if family == Family::GptOssExperts {
            gpt_oss_layer(&mut normal, i, experts)?;
        }
        if family.is_moe() {
            let (_, width, _) = MOE;
            normal(
                format!("model.layers.{i}.mlp.gate.weight"),
                (experts, s.hidden),
            )?;
            for e in 0..experts {
                let expert = format!("model.layers.{i}.mlp.experts.{e}");
                normal(format!("{expert}.gate_proj.weight"), (width, s.hidden))?;
                normal(format!("{expert}.up_proj.weight"), (width, s.hidden))?;
                normal(format!("{expert}.down_proj.weight"), (s.hidden, width))?;
            }
        }
    }
    // Norms of weight 1 (Gemma's store the offset from 1: 0).
    let mut unit_norm = |name: String, dim: usize| -> R<()> {
        let norm = match family {
            Family::Llama
            | Family::Olmo2
            | Family::Qwen3Moe
            | Family::Qwen3MoeExperts
            | Family::GptOssExperts => Tensor::ones(dim, DType::F32, dev)?,
            Family::Gemma2 | Family::Gemma3 => Tensor::zeros(dim, DType::F32, dev)?,
        };
        tensors.insert(name, norm);
        Ok(())
    };
    let norms = match family {
        Family::Llama | Family::Qwen3Moe | Family::Qwen3MoeExperts | Family::GptOssExperts => {
            vec!["input_layernorm", "post_attention_layernorm"]
        }
        Family::Olmo2 => vec!["post_attention_layernorm", "post_feedforward_layernorm"],
        Family::Gemma2 | Family::Gemma3 => vec![
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
        ],
    };
    for i in 0..s.layers {
        for norm in &norms {
            unit_norm(format!("model.layers.{i}.{norm}.weight"), s.hidden)?;
        }
        // Gemma 3's q/k norms cover a head, OLMo 2's the whole projection.
        let qk_widths = match family {
            Family::Gemma3 | Family::Qwen3Moe | Family::Qwen3MoeExperts => {
                Some((s.head_dim(), s.head_dim()))
            }
            Family::Olmo2 => Some((s.hidden, s.kv_heads * s.head_dim())),
            Family::Llama | Family::Gemma2 | Family::GptOssExperts => None,
        };
        if let Some((q, k)) = qk_widths {
            for (norm, width) in [("q_norm", q), ("k_norm", k)] {
                let name = format!("model.layers.{i}.self_attn.{norm}.weight");
                unit_norm(name, width)?;
            }
        }
    }
    unit_norm("model.norm.weight".into(), s.hidden)?;
    if family == Family::GptOssExperts {
        gpt_oss_shapes(&mut tensors, experts)?;
    }
    let base_params = tensors.values().map(|t| t.elem_count()).sum();
    // Plain tensors, not variables: the base is frozen.
    let vb = VarBuilder::from_tensors(tensors, DType::F32, dev);

    let adapter_map = VarMap::new();
    let parameters = family.target_parameters().iter().map(|p| p.to_string());
    let parameters = ParameterTargets::new(parameters.collect(), LoraConfig::new(RANK, ALPHA));
    let plan = AdapterPlan::lora(
        TargetSpec::new(ModuleSelector::list(family.targets().iter().copied())),
        RankAlpha::new(RANK, ALPHA),
        LoraConfig::new(RANK, ALPHA),
        VarBuilder::from_varmap(&adapter_map, DType::F32, dev),
    )
    .with_parameter_targets(parameters);
    let model = LlamaForCausalLM::load(&config, vb, &plan)?;
    let adapter = plan.finish()?;
    let vars = adapter.vars();
    Ok(Built {
        model,
        adapter,
        vars,
        base_params,
    })
}

/// gpt-oss's tensors of layer `i` besides its q/k/v/o weights (drawn by `normal`): the
/// attention's biases and sinks, the router and the stacked experts with their biases.
fn gpt_oss_layer(
    normal: &mut impl FnMut(String, (usize, usize)) -> R<()>,
    i: usize,
    experts: usize,
) -> R<()> {
    let s = SHAPE;
    let (_, width, _) = MOE;
    let kv = s.kv_heads * s.head_dim();
    let attention = format!("model.layers.{i}.self_attn");
    for (name, width) in [
        ("q_proj", s.hidden),
        ("k_proj", kv),
        ("v_proj", kv),
        ("o_proj", s.hidden),
    ] {
        normal(format!("{attention}.{name}.bias"), (1, width))?;
    }
    normal(format!("{attention}.sinks"), (1, s.heads))?;
    let mlp = format!("model.layers.{i}.mlp");
    normal(format!("{mlp}.router.weight"), (experts, s.hidden))?;
    normal(format!("{mlp}.router.bias"), (1, experts))?;
    // Drawn 2-D, given their shapes by `gpt_oss_shapes`.
    normal(
        format!("{mlp}.experts.gate_up_proj"),
        (experts * s.hidden, 2 * width),
    )?;
    normal(
        format!("{mlp}.experts.gate_up_proj_bias"),
        (experts, 2 * width),
    )?;
    normal(
        format!("{mlp}.experts.down_proj"),
        (experts * width, s.hidden),
    )?;
    normal(format!("{mlp}.experts.down_proj_bias"), (experts, s.hidden))?;
    Ok(())
}

/// gpt-oss's tensors drawn 2-D by [`gpt_oss_layer`] in their own shapes: biases and sinks
/// 1-D, the stacks `(experts, in, out)`.
fn gpt_oss_shapes(tensors: &mut HashMap<String, Tensor>, experts: usize) -> R<()> {
    for (name, t) in tensors.iter_mut() {
        let Ok((rows, cols)) = t.dims2() else {
            continue; // the norms
        };
        let shape: Vec<usize> = if name.ends_with(".bias") || name.ends_with(".sinks") {
            vec![rows * cols]
        } else if name.ends_with("_proj") && name.contains(".experts.") {
            vec![experts, rows / experts, cols]
        } else {
            continue;
        };
        *t = t.reshape(shape)?;
    }
    Ok(())
}

fn random_ids(
    rng: &mut rand_chacha::ChaCha8Rng,
    batch: usize,
    seq: usize,
    dev: &Device,
) -> R<Tensor> {
    let ids: Vec<u32> = (0..batch * seq)
        .map(|_| rng.random_range(0..SHAPE.vocab as u32))
        .collect();
    Ok(Tensor::from_vec(ids, (batch, seq), dev)?)
}

/// The model's causal-LM loss, mean over the `b · (t − 1)` predicted positions (transformers'
/// `model(input_ids=ids, labels=ids).loss`), as `lorakit::finetune`'s trainer computes it:
/// `LlamaForCausalLM::loss_sum` (the frozen head and the cross-entropy as one op on the CPU)
/// divided by the count.
fn causal_lm_loss(model: &LlamaForCausalLM, ids: &Tensor) -> R<Tensor> {
    let (b, t) = ids.dims2()?;
    let mask = Tensor::ones((b, t), DType::F32, ids.device())?;
    let sum = model.loss_sum(ids, &mask)?;
    Ok((sum / (b * (t - 1)) as f64)?)
}

/// The same loss from hidden states and a head (`linear_head_loss_sum`: the frozen head and
/// the cross-entropy as one op, what `loss_sum` runs): the `ops` mode's head + loss piece.
fn head_loss(hidden: &Tensor, head: &Linear, ids: &Tensor) -> R<Tensor> {
    let (b, t) = ids.dims2()?;
    let mask = Tensor::ones((b, t), DType::F32, ids.device())?;
    let sum = lorakit::finetune::loss::linear_head_loss_sum(hidden, head, ids, &mask)?;
    Ok((sum / (b * (t - 1)) as f64)?)
}

/// The same loss from given logits (`causal_lm_loss_sum`, the cross-entropy alone): an
/// alternative piece of the `ops` mode.
fn logits_loss(logits: &Tensor, ids: &Tensor) -> R<Tensor> {
    let (b, t, _) = logits.dims3()?;
    let mask = Tensor::ones((b, t), DType::F32, logits.device())?;
    let sum = lorakit::finetune::loss::causal_lm_loss_sum(logits, ids, &mask)?;
    Ok((sum / (b * (t - 1)) as f64)?)
}

fn adamw(vars: Vec<Var>) -> R<AdamW> {
    Ok(AdamW::new(
        vars,
        ParamsAdamW {
            lr: LR,
            ..ParamsAdamW::default()
        },
    )?)
}

fn train(args: &Args, dev: &Device) -> R<Value> {
    let built = build(args.family, args.moe_experts, args.seed, dev)?;
    let (_, rss_built) = memory_mib();
    built.adapter.set_training(true);
    let trainable: usize = built.vars.iter().map(|v| v.elem_count()).sum();
    let mut opt = adamw(built.vars.clone())?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(args.seed + 1);
    let ids = random_ids(&mut rng, args.batch, args.seq, dev)?;
    let mut phases: Vec<[f64; 3]> = Vec::new();
    let mut losses = Vec::new();
    for step in 0..args.warmup + args.steps {
        let t = Instant::now();
        let loss = causal_lm_loss(&built.model, &ids)?;
        let t_fwd = ms(t);
        let t = Instant::now();
        let grads = loss.backward()?;
        let t_bwd = ms(t);
        let t = Instant::now();
        opt.step(&grads)?;
        let t_opt = ms(t);
        drop(grads);
        losses.push(loss.to_scalar::<f32>()? as f64);
        if step >= args.warmup {
            phases.push([t_fwd, t_bwd, t_opt]);
        }
    }
    let steps: Vec<f64> = phases.iter().map(|p| p.iter().sum()).collect();
    let (median, min, max) = stats(&steps);
    let phase = |i: usize| stats(&phases.iter().map(|p| p[i]).collect::<Vec<_>>()).0;
    let tokens = (args.batch * args.seq) as f64;
    let (hwm, _) = memory_mib();
    Ok(json!({
        "step_ms": {"median": median, "min": min, "max": max, "all": steps},
        "tokens_per_s": tokens / median * 1e3,
        "tokens_per_s_best": tokens / min * 1e3,
        "phases_ms": {
            "forward+loss": phase(0), "backward": phase(1), "optimizer": phase(2),
        },
        "loss_first": losses[0],
        "loss_last": losses[losses.len() - 1],
        "ln_vocab": (SHAPE.vocab as f64).ln(),
        "trainable_params": trainable,
        "adapted_layers": built.adapter.len(),
        "base_params": built.base_params,
        "tokens_per_step": tokens,
        "rss_after_build_mib": rss_built,
        "peak_rss_mib": hwm,
    }))
}

fn generate(args: &Args, dev: &Device) -> R<Value> {
    let built = build(args.family, args.moe_experts, args.seed, dev)?;
    built.adapter.set_training(false);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(args.seed + 2);
    let prompt: Vec<u32> = (0..PROMPT_LEN)
        .map(|_| rng.random_range(0..SHAPE.vocab as u32))
        .collect();
    // Warm-up call.
    let first = built
        .model
        .generate_greedy(&prompt, args.gen_tokens, None)?;
    let mut times = Vec::new();
    for _ in 0..args.gen_rounds {
        let t = Instant::now();
        let out = built
            .model
            .generate_greedy(&prompt, args.gen_tokens, None)?;
        times.push(ms(t));
        assert_eq!(out, first, "greedy decoding is deterministic");
    }
    let (median, min, max) = stats(&times);
    let n = first.len() as f64;
    let batched = generate_batched(&built.model, &mut rng, args)?;
    let (hwm, _) = memory_mib();
    // References, after the peak was read: the base alone (adapter disabled: no adapter
    // variable in the graph), and the adapter merged into the weights.
    let reference = || -> R<f64> {
        let mut t = Vec::new();
        built
            .model
            .generate_greedy(&prompt, args.gen_tokens, None)?;
        for _ in 0..args.gen_rounds {
            let start = Instant::now();
            built
                .model
                .generate_greedy(&prompt, args.gen_tokens, None)?;
            t.push(ms(start));
        }
        Ok(n / stats(&t).0 * 1e3)
    };
    built.adapter.set_enabled(false);
    let disabled = reference()?;
    built.adapter.set_enabled(true);
    built.adapter.merge_all(true)?;
    let merged = reference()?;
    Ok(json!({
        "call_ms": {"median": median, "min": min, "max": max, "all": times},
        "new_tokens": first.len(),
        "prompt_len": PROMPT_LEN,
        "tokens_per_s": n / median * 1e3,
        "tokens_per_s_best": n / min * 1e3,
        "ms_per_token": median / n,
        "reference_tokens_per_s": {"adapter_disabled": disabled, "adapter_merged": merged},
        "batched": batched,
        "peak_rss_mib": hwm,
    }))
}

/// `generate_batch` (greedy, KV cache, the adapter unmerged) of `--gen-tokens` tokens after
/// each of [`BATCH_PROMPT_LENS`]' random prompts, left-padded into one batch: a warm-up
/// call, then timed calls; tokens/s counts every row's new tokens.
fn generate_batched(
    model: &LlamaForCausalLM,
    rng: &mut rand_chacha::ChaCha8Rng,
    args: &Args,
) -> R<Value> {
    let prompts: Vec<Vec<u32>> = BATCH_PROMPT_LENS
        .iter()
        .map(|&len| {
            (0..len)
                .map(|_| rng.random_range(0..SHAPE.vocab as u32))
                .collect()
        })
        .collect();
    let config = GenerationConfig::greedy(args.gen_tokens);
    let first = model.generate_batch(&prompts, &config)?;
    let mut times = Vec::new();
    for _ in 0..args.gen_rounds {
        let t = Instant::now();
        let out = model.generate_batch(&prompts, &config)?;
        times.push(ms(t));
        assert_eq!(out, first, "greedy decoding is deterministic");
    }
    let (median, min, max) = stats(&times);
    let n = first.iter().map(Vec::len).sum::<usize>() as f64;
    Ok(json!({
        "call_ms": {"median": median, "min": min, "max": max, "all": times},
        "prompt_lens": BATCH_PROMPT_LENS,
        "new_tokens_per_row": args.gen_tokens,
        "tokens_per_s": n / median * 1e3,
        "tokens_per_s_best": n / min * 1e3,
    }))
}

/// One timed piece of the step: forward and forward + backward, in ms, and how many times
/// a training step runs it.
struct Piece {
    name: String,
    count: usize,
    fwd: (f64, f64),
    fwd_bwd: Option<(f64, f64)>,
    group: &'static str,
}

fn var(rng: &mut SeededRng, shape: &[usize], dev: &Device) -> R<Var> {
    Ok(Var::from_tensor(&rng.normal(
        shape,
        0.0,
        1.0,
        DType::F32,
        dev,
    )?)?)
}

/// A piece's output: one tensor or several.
trait Outputs {
    fn tensors(self) -> Vec<Tensor>;
}

impl Outputs for Tensor {
    fn tensors(self) -> Vec<Tensor> {
        vec![self]
    }
}

impl Outputs for Vec<Tensor> {
    fn tensors(self) -> Vec<Tensor> {
        self
    }
}

/// A scalar "loss" whose gradient with respect to its input is the fixed tensor `g`: a
/// piece's backward then starts from a contiguous upstream gradient, as inside the model,
/// at no cost of its own (a `sum(y ⊙ g)` would add a multiplication whose backward, on the
/// stride-0 gradient of the sum, is slower than most pieces).
struct UpstreamGrad(Tensor);

impl candle_core::CustomOp1 for UpstreamGrad {
    fn name(&self) -> &'static str {
        "upstream-grad"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        Ok((candle_core::CpuStorage::F32(vec![0.0]), ().into()))
    }

    fn bwd(&self, _: &Tensor, _: &Tensor, _: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(self.0.clone()))
    }
}

/// Times `f` on its own and with the backward from fixed random upstream gradients `gᵢ` on
/// its outputs `yᵢ` (as PyTorch's `torch.autograd.backward(ys, gs)`).
fn piece<O: Outputs>(
    name: impl Into<String>,
    group: &'static str,
    count: usize,
    budget: f64,
    f: impl Fn() -> R<O>,
    backward: bool,
) -> R<Piece> {
    let fwd = time_ms(budget, || {
        std::hint::black_box(f()?.tensors());
        Ok(())
    })?;
    let fwd_bwd = if backward {
        let mut rng = SeededRng::new(7);
        let gs = f()?
            .tensors()
            .iter()
            .map(|y| Ok(rng.normal(y.dims(), 0.0, 1.0, y.dtype(), y.device())?))
            .collect::<R<Vec<_>>>()?;
        Some(time_ms(budget, || {
            let mut loss: Option<Tensor> = None;
            for (y, g) in f()?.tensors().iter().zip(&gs) {
                let l = y.apply_op1(UpstreamGrad(g.clone()))?;
                loss = Some(match loss {
                    Some(acc) => (acc + l)?,
                    None => l,
                });
            }
            let grads = loss.ok_or("a piece without outputs")?.backward()?;
            std::hint::black_box(grads);
            Ok(())
        })?)
    } else {
        None
    };
    Ok(Piece {
        name: name.into(),
        count,
        fwd,
        fwd_bwd,
        group,
    })
}

/// The causal mask `(t, t)`, 0 / −∞, as the model builds it.
fn causal_mask(t: usize, dev: &Device) -> R<Tensor> {
    let v: Vec<f32> = (0..t)
        .flat_map(|i| (0..t).map(move |j| if j <= i { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    Ok(Tensor::from_vec(v, (t, t), dev)?)
}

/// RoPE's cos / sin `(t, head_dim / 2)` for positions `0..t`.
fn rope_tables(t: usize, head_dim: usize, dev: &Device) -> R<(Tensor, Tensor)> {
    let half = head_dim / 2;
    let inv: Vec<f32> = (0..half)
        .map(|i| 1.0 / 10000f32.powf((2 * i) as f32 / head_dim as f32))
        .collect();
    let ang: Vec<f32> = (0..t)
        .flat_map(|p| inv.iter().map(move |f| p as f32 * f))
        .collect();
    let cos = Tensor::from_vec(ang.iter().map(|a| a.cos()).collect(), (t, half), dev)?;
    let sin = Tensor::from_vec(ang.iter().map(|a| a.sin()).collect(), (t, half), dev)?;
    Ok((cos, sin))
}

/// The pieces of a training step at its shapes, composed as `src/models/llama` composes
/// them in training mode, each input a variable (as in the model, where adapters upstream
/// make every activation track a gradient).
fn ops(args: &Args, dev: &Device) -> R<Value> {
    let s = SHAPE;
    let (b, t, hd) = (args.batch, args.seq, s.head_dim());
    let (l, budget) = (s.layers, args.ops_budget_ms);
    let mut rng = SeededRng::new(args.seed + 3);
    let mut pieces = Vec::new();

    // The seven LoRA linears (training mode, fused op), and the frozen head.
    for (name, d_in, d_out) in s.linears() {
        let w = rng.normal((d_out, d_in), 0.0, 0.02, DType::F32, dev)?;
        let map = VarMap::new();
        let layer = LoraLinear::new(
            FrozenLinear::new(w, None)?,
            &LoraConfig::new(RANK, ALPHA),
            VarBuilder::from_varmap(&map, DType::F32, dev).pp(name),
        )?;
        let x = var(&mut rng, &[b, t, d_in], dev)?;
        pieces.push(piece(
            format!("LoRA linear {name} {d_in}→{d_out}"),
            "linears (LoRA)",
            l,
            budget,
            || Ok(layer.forward_t(x.as_tensor(), true)?),
            true,
        )?);
    }
    let w_head = rng.normal((s.vocab, s.hidden), 0.0, 0.02, DType::F32, dev)?;
    let head = FrozenLinear::new(w_head.clone(), None)?;
    let xh = var(&mut rng, &[b, t, s.hidden], dev)?;

    // Norms: 2 per layer and the final one, as the step runs them (fused, with a backward).
    let xn = var(&mut rng, &[b, t, s.hidden], dev)?;
    let wn = Tensor::ones(s.hidden, DType::F32, dev)?;
    pieces.push(piece(
        "RMSNorm (fused::rms_norm)",
        "norms",
        2 * l + 1,
        budget,
        || Ok(fused::rms_norm(xn.as_tensor(), &wn, 1e-6)?),
        true,
    )?);

    // Heads: q and k from the projections' `(b, t, n·hd)` to rotated `(b, n, t, hd)` in one
    // op each (RoPE with the head transpose); v transposed by a copy.
    let (cos, sin) = rope_tables(t, hd, dev)?;
    let q_lin = var(&mut rng, &[b, t, s.heads * hd], dev)?;
    let k_lin = var(&mut rng, &[b, t, s.kv_heads * hd], dev)?;
    let v_lin = var(&mut rng, &[b, t, s.kv_heads * hd], dev)?;
    pieces.push(piece(
        "RoPE q and k with the head transpose (fused::rope_heads)",
        "RoPE",
        l,
        budget,
        || {
            let q =
                fused::rope_heads(&q_lin.as_tensor().reshape((b, t, s.heads, hd))?, &cos, &sin)?;
            let k = fused::rope_heads(
                &k_lin.as_tensor().reshape((b, t, s.kv_heads, hd))?,
                &cos,
                &sin,
            )?;
            Ok(vec![q, k])
        },
        true,
    )?);
    let heads = |x: &Var, n: usize| -> R<Tensor> {
        Ok(x.as_tensor()
            .reshape((b, t, n, hd))?
            .transpose(1, 2)?
            .contiguous()?)
    };
    pieces.push(piece(
        "v head transpose (copy)",
        "attention glue",
        l,
        budget,
        || heads(&v_lin, s.kv_heads),
        true,
    )?);

    // Attention core as the step runs it: one op (GQA without copying k/v).
    let qh = var(&mut rng, &[b, s.heads, t, hd], dev)?;
    let kh = var(&mut rng, &[b, s.kv_heads, t, hd], dev)?;
    let vh = var(&mut rng, &[b, s.kv_heads, t, hd], dev)?;
    let scale = 1.0 / (hd as f64).sqrt();
    pieces.push(piece(
        "causal attention (fused::causal_attention)",
        "attention core",
        l,
        budget,
        || {
            Ok(fused::causal_attention(
                qh.as_tensor(),
                kh.as_tensor(),
                vh.as_tensor(),
                scale,
                None,
            )?)
        },
        true,
    )?);

    // MLP glue and residuals.
    let gate = var(&mut rng, &[b, t, s.mlp], dev)?;
    let up = var(&mut rng, &[b, t, s.mlp], dev)?;
    pieces.push(piece(
        "silu(gate)·up (fused::silu_mul)",
        "MLP glue",
        l,
        budget,
        || Ok(fused::silu_mul(gate.as_tensor(), up.as_tensor())?),
        true,
    )?);
    let r1 = var(&mut rng, &[b, t, s.hidden], dev)?;
    let r2 = var(&mut rng, &[b, t, s.hidden], dev)?;
    pieces.push(piece(
        "residual add",
        "residuals",
        2 * l,
        budget,
        || Ok((r1.as_tensor() + r2.as_tensor())?),
        true,
    )?);

    // Embedding (frozen, no gradient) and the loss.
    let mut idrng = rand_chacha::ChaCha8Rng::seed_from_u64(args.seed + 4);
    let ids = random_ids(&mut idrng, b, t, dev)?;
    let table = rng.normal((s.vocab, s.hidden), 0.0, 0.02, DType::F32, dev)?;
    pieces.push(piece(
        "embedding lookup",
        "embedding",
        1,
        budget,
        || {
            Ok(table
                .index_select(&ids.flatten_all()?, 0)?
                .reshape((b, t, s.hidden))?)
        },
        false,
    )?);
    // The head and the loss as the step runs them: one op (its forward already computes the
    // head's input gradient, which PyTorch computes in its backward).
    let head_linear = Linear::Frozen(head.clone());
    pieces.push(piece(
        format!(
            "lm_head {}→{} + loss, one op (linear_head_loss_sum)",
            s.hidden, s.vocab
        ),
        "lm_head + loss",
        1,
        budget,
        || head_loss(xh.as_tensor(), &head_linear, &ids),
        true,
    )?);
    let logits = var(&mut rng, &[b, t, s.vocab], dev)?;

    // The optimizer step over the adapter's shapes.
    let mut opt_vars = Vec::new();
    let mut grads = GradStore::default();
    for (name, d_in, d_out) in s.linears() {
        let _ = name;
        for _ in 0..l {
            for shape in [[RANK, d_in], [d_out, RANK]] {
                let v = var(&mut rng, &shape, dev)?;
                grads.insert(
                    v.as_tensor(),
                    rng.normal(&shape, 0.0, 1e-3, DType::F32, dev)?,
                );
                opt_vars.push(v);
            }
        }
    }
    let mut opt = adamw(opt_vars)?;
    let opt_ms = time_ms(budget, || Ok(opt.step(&grads)?))?;
    pieces.push(Piece {
        name: format!("AdamW step ({} tensors)", 14 * l),
        count: 1,
        fwd: opt_ms,
        fwd_bwd: Some(opt_ms),
        group: "optimizer",
    });

    // Alternatives at the same shapes (not part of the step's sum).
    let mut alts = Vec::new();
    // The composed candle ops the fused ones replace (what a model without them records).
    alts.push(piece(
        "RMSNorm composed (rms_norm_slow)",
        "norms",
        2 * l + 1,
        budget,
        || Ok(candle_nn::ops::rms_norm_slow(xn.as_tensor(), &wn, 1e-6)?),
        true,
    )?);
    alts.push(piece(
        "RoPE q and k composed (head transpose copies + rope_slow)",
        "RoPE",
        l,
        budget,
        || {
            let q = candle_nn::rotary_emb::rope_slow(&heads(&q_lin, s.heads)?, &cos, &sin)?;
            let k = candle_nn::rotary_emb::rope_slow(&heads(&k_lin, s.kv_heads)?, &cos, &sin)?;
            Ok(vec![q, k])
        },
        true,
    )?);
    let (g, rep) = (s.kv_heads, s.heads / s.kv_heads);
    let mask = causal_mask(t, dev)?;
    alts.push(piece(
        "attention composed (q·kᵀ·scale, mask, softmax, probs·v, output transpose)",
        "attention core",
        l,
        budget,
        || {
            let q = qh.as_tensor().contiguous()?.reshape((b, g, rep * t, hd))?;
            let scores = (q.matmul(&kh.as_tensor().t()?)? * scale)?
                .reshape((b, g, rep, t, t))?
                .broadcast_add(&mask)?;
            let probs = candle_nn::ops::softmax(&scores, D::Minus1)?.reshape((b, g, rep * t, t))?;
            Ok(probs
                .matmul(vh.as_tensor())?
                .reshape((b, s.heads, t, hd))?
                .transpose(1, 2)?
                .reshape((b, t, s.heads * hd))?)
        },
        true,
    )?);
    alts.push(piece(
        "silu(gate)·up composed",
        "MLP glue",
        l,
        budget,
        || Ok((gate.as_tensor().silu()? * up.as_tensor())?),
        true,
    )?);
    let scores = var(&mut rng, &[b, g, rep * t, t], dev)?;
    alts.push(piece(
        format!(
            "lm_head {}→{} alone (frozen, candle matmul)",
            s.hidden, s.vocab
        ),
        "lm_head + loss",
        1,
        budget,
        || Ok(head.forward(xh.as_tensor())?),
        true,
    )?);
    alts.push(piece(
        "loss alone from logits: shift + causal_lm_loss_sum",
        "lm_head + loss",
        1,
        budget,
        || logits_loss(logits.as_tensor(), &ids),
        true,
    )?);
    alts.push(piece(
        "lm_head as FusedLinear without a low-rank term (no weight gradient)",
        "lm_head + loss",
        1,
        budget,
        || {
            Ok(FusedLinear {
                weight: &w_head,
                bias: None,
                low_rank: None,
                row_scale: None,
            }
            .forward(xh.as_tensor())?)
        },
        true,
    )?);
    let xn_c = xn.as_tensor().detach();
    alts.push(piece(
        "RMSNorm fused (candle-nn rms_norm; no backward in candle 0.11)",
        "norms",
        2 * l + 1,
        budget,
        || Ok(candle_nn::ops::rms_norm(&xn_c, &wn, 1e-6)?),
        false,
    )?);
    let (qc, kc) = (qh.as_tensor().detach(), kh.as_tensor().detach());
    alts.push(piece(
        "RoPE fused q and k (candle-nn rope; no backward)",
        "RoPE",
        l,
        budget,
        || {
            let q = candle_nn::rotary_emb::rope(&qc, &cos, &sin)?;
            let k = candle_nn::rotary_emb::rope(&kc, &cos, &sin)?;
            Ok(vec![q, k])
        },
        false,
    )?);
    let sc_c = scores.as_tensor().detach();
    alts.push(piece(
        "mask + softmax fused (softmax_last_dim; no backward)",
        "attention core",
        l,
        budget,
        || {
            let sc = sc_c.reshape((b, g, rep, t, t))?.broadcast_add(&mask)?;
            Ok(candle_nn::ops::softmax_last_dim(&sc)?)
        },
        false,
    )?);
    let logits_c = logits.as_tensor().detach();
    alts.push(piece(
        "loss fused forward (softmax_last_dim-based log-softmax, no backward)",
        "lm_head + loss",
        1,
        budget,
        || {
            let (bb, tt, v) = logits_c.dims3()?;
            let pred = logits_c.narrow(1, 0, tt - 1)?.reshape((bb * (tt - 1), v))?;
            let target = ids.narrow(1, 1, tt - 1)?.reshape(bb * (tt - 1))?;
            let lsm = candle_nn::ops::softmax_last_dim(&pred)?.log()?;
            Ok(candle_nn::loss::nll(&lsm, &target)?)
        },
        false,
    )?);

    // One generated token (batch 1, 136 cached positions), eval mode: the adapter's
    // variables make every activation track a gradient, so the model takes the composed
    // paths; the fused kernels are what a detached forward would take.
    let kv_len = PROMPT_LEN + args.gen_tokens;
    let x1 = var(&mut rng, &[1, 1, s.hidden], dev)?;
    let x1c = x1.as_tensor().detach();
    let mut decode = Vec::new();
    decode.push(piece(
        "decode RMSNorm composed ×(2L+1)",
        "norms",
        2 * l + 1,
        budget,
        || Ok(candle_nn::ops::rms_norm_slow(x1.as_tensor(), &wn, 1e-6)?),
        false,
    )?);
    decode.push(piece(
        "decode RMSNorm fused ×(2L+1)",
        "norms",
        2 * l + 1,
        budget,
        || Ok(candle_nn::ops::rms_norm(&x1c, &wn, 1e-6)?),
        false,
    )?);
    let (cos1, sin1) = rope_tables(kv_len, hd, dev)?;
    let (cos1, sin1) = (
        cos1.narrow(0, kv_len - 1, 1)?,
        sin1.narrow(0, kv_len - 1, 1)?,
    );
    let q1 = var(&mut rng, &[1, s.heads, 1, hd], dev)?;
    let q1c = q1.as_tensor().detach();
    decode.push(piece(
        "decode RoPE q composed ×L",
        "RoPE",
        l,
        budget,
        || {
            Ok(candle_nn::rotary_emb::rope_slow(
                q1.as_tensor(),
                &cos1,
                &sin1,
            )?)
        },
        false,
    )?);
    decode.push(piece(
        "decode RoPE q fused ×L",
        "RoPE",
        l,
        budget,
        || Ok(candle_nn::rotary_emb::rope(&q1c, &cos1, &sin1)?),
        false,
    )?);
    let sc1 = var(&mut rng, &[1, g, rep, 1, kv_len], dev)?;
    let sc1c = sc1.as_tensor().detach();
    decode.push(piece(
        "decode softmax composed ×L",
        "attention core",
        l,
        budget,
        || Ok(candle_nn::ops::softmax(sc1.as_tensor(), D::Minus1)?),
        false,
    )?);
    decode.push(piece(
        "decode softmax fused ×L",
        "attention core",
        l,
        budget,
        || Ok(candle_nn::ops::softmax_last_dim(&sc1c)?),
        false,
    )?);
    for (name, d_in, d_out) in s.linears() {
        let w = rng.normal((d_out, d_in), 0.0, 0.02, DType::F32, dev)?;
        let map = VarMap::new();
        let layer = LoraLinear::new(
            FrozenLinear::new(w.clone(), None)?,
            &LoraConfig::new(RANK, ALPHA),
            VarBuilder::from_varmap(&map, DType::F32, dev).pp(name),
        )?;
        let base = FrozenLinear::new(w, None)?;
        let x = rng.normal((1, 1, d_in), 0.0, 1.0, DType::F32, dev)?;
        decode.push(piece(
            format!("decode LoRA {name} (eval, unmerged) ×L"),
            "linears (LoRA)",
            l,
            budget,
            || Ok(layer.forward_t(&x, false)?),
            false,
        )?);
        decode.push(piece(
            format!("decode base {name} alone ×L"),
            "linears (LoRA)",
            l,
            budget,
            || Ok(base.forward(&x)?),
            false,
        )?);
    }
    let x1h = rng.normal((1, 1, s.hidden), 0.0, 1.0, DType::F32, dev)?;
    decode.push(piece(
        "decode lm_head ×1",
        "lm_head",
        1,
        budget,
        || Ok(head.forward(&x1h)?),
        false,
    )?);

    let to_json = |p: &Piece| {
        json!({
            "name": p.name, "group": p.group, "count": p.count,
            "fwd_ms": [p.fwd.0, p.fwd.1],
            "fwd_bwd_ms": p.fwd_bwd.map(|x| vec![x.0, x.1]),
        })
    };
    let fwd_sum: f64 = pieces
        .iter()
        .filter(|p| p.group != "optimizer")
        .map(|p| p.fwd.0 * p.count as f64)
        .sum();
    let step_sum: f64 = pieces
        .iter()
        .map(|p| p.fwd_bwd.unwrap_or(p.fwd).0 * p.count as f64)
        .sum();
    let (hwm, _) = memory_mib();
    Ok(json!({
        "pieces": pieces.iter().map(to_json).collect::<Vec<_>>(),
        "alternatives": alts.iter().map(to_json).collect::<Vec<_>>(),
        "decode": decode.iter().map(to_json).collect::<Vec<_>>(),
        "sum_forward_ms": fwd_sum,
        "sum_step_ms": step_sum,
        "peak_rss_mib": hwm,
    }))
}

fn main() -> R<()> {
    let args = parse_args()?;
    // A training program: candle's element-wise workers park instead of spinning through
    // the GEMMs (`lorakit::threads`; an explicit CANDLE_BARRIER_POOL_SPIN_LIMIT wins), and
    // freed step buffers stay resident (`lorakit::memory`).
    lorakit::threads::park_idle_elementwise_workers();
    lorakit::memory::retain_freed_buffers();
    // Before any candle op or rayon use: every pool candle and lorakit use reads these.
    std::env::set_var("RAYON_NUM_THREADS", args.threads.to_string());
    std::env::set_var("CANDLE_NUM_THREADS", args.threads.to_string());
    rayon::ThreadPoolBuilder::new()
        .num_threads(args.threads)
        .build_global()?;
    let dev = Device::Cpu;
    let (cpu, ext) = cpu_info();
    let mut out = json!({
        "side": "lorakit",
        "cpu": cpu,
        "vector_ext": ext,
        "logical_cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "threads": {
            "requested": args.threads,
            "candle_get_num_threads (gemm)": candle_core::utils::get_num_threads(),
            "rayon_global_pool": rayon::current_num_threads(),
            "CANDLE_NUM_THREADS (element-wise pool)": args.threads,
            "candle elementwise spin limit":
                std::env::var(lorakit::threads::SPIN_LIMIT_VARIABLE).unwrap_or_default(),
        },
        "candle": {"avx": candle_core::utils::with_avx(), "f16c": candle_core::utils::with_f16c(),
                   "mkl": candle_core::utils::has_mkl()},
        "config": {
            "family": match args.family {
                Family::Llama => "llama",
                Family::Gemma2 => "gemma2",
                Family::Gemma3 => "gemma3",
                Family::Olmo2 => "olmo2",
                Family::Qwen3Moe => "qwen3_moe",
                Family::Qwen3MoeExperts => "qwen3_moe_experts",
                Family::GptOssExperts => "gpt_oss_experts",
            },
            "layers": SHAPE.layers, "hidden": SHAPE.hidden, "heads": SHAPE.heads,
            "kv_heads": SHAPE.kv_heads, "mlp": SHAPE.mlp, "vocab": SHAPE.vocab,
            "batch": args.batch, "seq": args.seq, "rank": RANK, "alpha": ALPHA,
            "targets": args.family.targets(),
            "target_parameters": args.family.target_parameters(), "dtype": "f32",
        },
        "mode": args.mode,
    });
    let mode = args.mode.clone();
    // Each mode on one of rayon's workers, as `lorakit::threads::on_worker` advises a
    // training or decoding loop (generation does it by itself).
    let on_worker = |mode: fn(&Args, &Device) -> R<Value>| {
        lorakit::threads::on_worker(|| mode(&args, &dev).map_err(|e| e.to_string()))
    };
    if mode == "all" || mode == "train" {
        out["train"] = on_worker(train)?;
    }
    if mode == "all" || mode == "gen" {
        out["gen"] = on_worker(generate)?;
    }
    if mode == "all" || mode == "ops" {
        out["ops"] = on_worker(ops)?;
    }
    let (hwm, _) = memory_mib();
    out["peak_rss_mib"] = json!(hwm);
    if args.json {
        println!("{out}");
    } else {
        print_human(&out);
    }
    Ok(())
}

fn print_human(out: &Value) {
    println!(
        "lorakit llama_speed — {} ({}), threads {}",
        out["cpu"].as_str().unwrap_or("?"),
        out["vector_ext"].as_str().unwrap_or("?"),
        out["threads"]
    );
    if let Some(t) = out.get("train") {
        println!(
            "train: {:.0} tokens/s (step median {:.1} ms, min {:.1}, max {:.1}); phases ms: {}; \
             loss {:.3} → {:.3} (ln V = {:.3}); {} trainable params in {} layers; peak {:.0} MiB",
            t["tokens_per_s"].as_f64().unwrap_or(0.0),
            t["step_ms"]["median"].as_f64().unwrap_or(0.0),
            t["step_ms"]["min"].as_f64().unwrap_or(0.0),
            t["step_ms"]["max"].as_f64().unwrap_or(0.0),
            t["phases_ms"],
            t["loss_first"].as_f64().unwrap_or(0.0),
            t["loss_last"].as_f64().unwrap_or(0.0),
            t["ln_vocab"].as_f64().unwrap_or(0.0),
            t["trainable_params"],
            t["adapted_layers"],
            t["peak_rss_mib"].as_f64().unwrap_or(0.0),
        );
    }
    if let Some(g) = out.get("gen") {
        println!(
            "gen: {:.1} tokens/s ({} new tokens, call median {:.1} ms); peak {:.0} MiB; \
             references (tokens/s): {}",
            g["tokens_per_s"].as_f64().unwrap_or(0.0),
            g["new_tokens"],
            g["call_ms"]["median"].as_f64().unwrap_or(0.0),
            g["peak_rss_mib"].as_f64().unwrap_or(0.0),
            g["reference_tokens_per_s"],
        );
        let b = &g["batched"];
        println!(
            "gen, batch of prompts {} left-padded: {:.1} tokens/s (call median {:.1} ms)",
            b["prompt_lens"],
            b["tokens_per_s"].as_f64().unwrap_or(0.0),
            b["call_ms"]["median"].as_f64().unwrap_or(0.0),
        );
    }
    if let Some(o) = out.get("ops") {
        println!("ops (ms; median fwd, fwd+bwd; count per step; fwd+bwd × count):");
        for key in ["pieces", "alternatives", "decode"] {
            println!("  [{key}]");
            for p in o[key].as_array().into_iter().flatten() {
                let fb = p["fwd_bwd_ms"][0].as_f64();
                let n = p["count"].as_u64().unwrap_or(0) as f64;
                let fwd = p["fwd_ms"][0].as_f64().unwrap_or(0.0);
                println!(
                    "  {:<70} ×{:<2} fwd {:>8.3}  fwd+bwd {:>8}  total {:>8.2}",
                    p["name"].as_str().unwrap_or(""),
                    n,
                    fwd,
                    fb.map_or("–".to_string(), |x| format!("{x:.3}")),
                    fb.unwrap_or(fwd) * n,
                );
            }
        }
        println!(
            "  sum of forward pieces {:.1} ms, of the step's pieces {:.1} ms",
            o["sum_forward_ms"].as_f64().unwrap_or(0.0),
            o["sum_step_ms"].as_f64().unwrap_or(0.0),
        );
    }
}
