//! `lorakit::models::llama`: one decoder for Llama, Mistral, Qwen2 and Qwen3, checked
//! against transformers 5.24 + PEFT 0.21 logits (f32, ≤ 1e-4 relative: max |Δ| / max |ref|):
//! the base model (a plan that targets nothing) and each PEFT adapter loaded with
//! `PeftAdapter::load(..).plan()` (and `plan.finish()` passing: every adapter tensor
//! used). Fixtures: `tests/fixtures/models/llama/` (`scripts/make_model_fixtures.py`:
//! Mistral with explicit head_dim and sliding window, Qwen2 with q/k/v bias and tied
//! embeddings, Qwen3 with q/k norm and a sliding layer, llama3, linear and YaRN RoPE
//! scaling (YaRN's frequencies also against transformers' own on five configs,
//! `yarn_params.json`);
//! each with a LoRA, and all but linear_rope with a second variant: Mistral VeRA, Qwen2
//! DoRA, Qwen3 AdaLoRA, llama3_rope DoRA),
//! `tests/fixtures/checkpoints/` (tiny Llama and Qwen2, f32/bf16, single/sharded; LoRA,
//! DoRA, VeRA, AdaLoRA) and `tests/fixtures/peft_options/llama_{embed,bias}`.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, IndexOp, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use lorakit::checkpoint::Checkpoint;
use lorakit::model::{AdapterPlan, ModuleSelector, RankAlpha, TargetSpec};
use lorakit::models::llama::{
    KvCache, LayerAttention, LlamaConfig, LlamaFamily, LlamaForCausalLM, NormPlacement, QkNorm,
    RopeScaling,
};
use lorakit::peft::PeftAdapter;
use lorakit::LoraConfig;

use crate::checkpoint_merge::ckpt;
use crate::peft_common::{fixture, load, rel_err};

const TOL: f64 = 1e-4;
const CASES: [&str; 22] = [
    "mistral",
    "qwen2",
    "qwen3",
    "llama3_rope",
    "linear_rope",
    "yarn_rope",
    "granite",
    "smollm3",
    "phi3",
    "phi3_longrope",
    "phi4_partial",
    "gemma",
    "gemma2",
    "gemma3",
    "gemma3_mm",
    "olmo2",
    "olmo3",
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "olmoe",
    "gpt_oss",
];

pub(crate) fn models(case: &str) -> PathBuf {
    fixture("models/llama").join(case)
}

/// A plan that adapts nothing: the plain base model.
pub(crate) fn no_adapter() -> AdapterPlan {
    AdapterPlan::lora(
        TargetSpec::new(ModuleSelector::list(Vec::<String>::new())),
        RankAlpha::new(1, 1.0),
        LoraConfig::default(),
        VarBuilder::from_varmap(&VarMap::new(), DType::F32, &Device::Cpu),
    )
}

pub(crate) fn peft_plan(dir: &Path) -> AdapterPlan {
    PeftAdapter::load(dir, &Device::Cpu)
        .unwrap()
        .plan()
        .unwrap()
}

/// The model at `base` (folder or file) with `config` (a config.json) in `dtype`.
pub(crate) fn build(
    config: &Path,
    base: &Path,
    dtype: DType,
    plan: &AdapterPlan,
) -> LlamaForCausalLM {
    let config = LlamaConfig::from_file(config).unwrap();
    let vb = Checkpoint::open(base)
        .unwrap()
        .var_builder(dtype, &Device::Cpu);
    LlamaForCausalLM::load(&config, vb, plan).unwrap()
}

/// The fixture model in the case folder `dir` (its `base`), in `dtype`, built with `plan`.
pub(crate) fn build_case(dir: &Path, dtype: DType, plan: &AdapterPlan) -> LlamaForCausalLM {
    build(
        &dir.join("base/config.json"),
        &dir.join("base"),
        dtype,
        plan,
    )
}

pub(crate) fn logits(model: &LlamaForCausalLM, ids: &Tensor) -> Tensor {
    model.forward(ids).unwrap().to_dtype(DType::F32).unwrap()
}

/// Checks `got` against `want` and returns the relative error (printed with `--nocapture`).
pub(crate) fn check(got: &Tensor, want: &Tensor, tol: f64, what: &str) -> f64 {
    let e = rel_err(got, want);
    println!("{what}: max relative error {e:.2e}");
    assert!(e <= tol, "{what}: relative error {e:.3e} > {tol:.0e}");
    e
}

#[test]
fn every_model_fixture_gives_transformers_and_peft_logits() {
    let mut worst: f64 = 0.0;
    for case in CASES {
        let dir = models(case);
        let io = load(&dir.join("logits.safetensors"));
        let ids = &io["input_ids"];
        let config = dir.join("base/config.json");

        let base = build(&config, &dir.join("base"), DType::F32, &no_adapter());
        let base_logits = logits(&base, ids);
        assert_eq!(base_logits.dims(), [2, 9, 64]);
        worst = worst.max(check(
            &base_logits,
            &io["logits"],
            TOL,
            &format!("{case} base"),
        ));
        let tied = matches!(
            case,
            "qwen2"
                | "linear_rope"
                | "granite"
                | "smollm3"
                | "phi4_partial"
                | "gemma"
                | "gemma2"
                | "gemma3"
                | "gemma3_mm"
        );
        assert_eq!(base.is_tied(), tied, "{case}");

        let plan = peft_plan(&dir.join("lora"));
        let model = build(&config, &dir.join("base"), DType::F32, &plan);
        let layers = plan.finish().unwrap();
        assert!(!layers.paths().is_empty());
        let got = logits(&model, ids);
        worst = worst.max(check(
            &got,
            &io["lora_logits"],
            TOL,
            &format!("{case} lora"),
        ));
        assert!(
            rel_err(&got, &io["logits"]) > 1e-2,
            "{case}: the adapter changes nothing"
        );
    }
    println!("model fixtures: worst relative error {worst:.2e}");
}

/// The second adapter of each case (another variant on the same base, made by PEFT:
/// `scripts/make_model_fixtures.py`'s `SECOND`): folder, and the key of its logits.
pub(crate) const SECOND: [(&str, &str); 5] = [
    ("mistral", "vera"),
    ("qwen2", "dora"),
    ("qwen3", "adalora"),
    ("llama3_rope", "dora"),
    ("phi3", "dora"),
];

#[test]
fn second_variant_adapters_give_peft_logits() {
    for (case, kind) in SECOND {
        let dir = models(case);
        let io = load(&dir.join("logits.safetensors"));
        let ids = &io["input_ids"];
        let plan = peft_plan(&dir.join(kind));
        let model = build(
            &dir.join("base/config.json"),
            &dir.join("base"),
            DType::F32,
            &plan,
        );
        let layers = plan.finish().unwrap();
        let want_kind: lorakit::Variant = kind.parse().unwrap();
        for (path, layer) in layers.layers() {
            assert_eq!(layer.read().kind(), want_kind, "{case} {path}");
        }
        let got = logits(&model, ids);
        check(
            &got,
            &io[&format!("{kind}_logits")],
            TOL,
            &format!("{case} {kind}"),
        );
        // The adapter changes the logits, and differently from the case's LoRA.
        assert!(rel_err(&got, &io["logits"]) > 1e-2, "{case} {kind}");
        assert!(rel_err(&got, &io["lora_logits"]) > 1e-2, "{case} {kind}");
    }
}

#[test]
fn the_tied_head_is_built_through_the_plan_at_lm_head() {
    // linear_rope's LoRA targets lm_head on a tied model: PEFT adapts the head (its
    // base_layer.weight is the embedding table, saved as a copy) and not the embedding.
    let dir = models("linear_rope");
    let plan = peft_plan(&dir.join("lora"));
    let model = build(
        &dir.join("base/config.json"),
        &dir.join("base"),
        DType::F32,
        &plan,
    );
    let layers = plan.finish().unwrap();
    assert!(model.is_tied());
    assert!(model.lm_head().adapter().is_some());
    assert!(model.embed_tokens().adapter().is_none());
    assert!(layers.paths().contains(&"lm_head".to_string()));
}

#[test]
fn checkpoint_llama_gives_transformers_logits_with_every_variant() {
    let io = load(&ckpt("llama_logits.safetensors"));
    let ids = &io["input_ids"];
    let config = ckpt("llama_f32_single/config.json");
    for base in ["llama_f32_single", "llama_f32_sharded"] {
        let model = build(&config, &ckpt(base), DType::F32, &no_adapter());
        check(&logits(&model, ids), &io["logits_base"], TOL, base);
    }
    for kind in ["lora", "dora", "vera", "adalora", "pissa", "olora"] {
        let plan = peft_plan(&ckpt(&format!("llama_adapters/{kind}")));
        let model = build(&config, &ckpt("llama_f32_sharded"), DType::F32, &plan);
        plan.finish().unwrap();
        let got = logits(&model, ids);
        check(
            &got,
            &io[&format!("logits_{kind}")],
            TOL,
            &format!("llama {kind}"),
        );
        assert!(rel_err(&got, &io["logits_base"]) > 1e-2, "{kind}");
    }
    // The merged checkpoint PEFT wrote, as a plain model, gives the merged logits.
    let merged = build(
        &config,
        &ckpt("llama_merged/lora_f32.safetensors"),
        DType::F32,
        &no_adapter(),
    );
    check(
        &logits(&merged, ids),
        &io["logits_lora_merged"],
        TOL,
        "llama merged lora",
    );
}

#[test]
fn checkpoint_qwen2_adapters_match_peft_merged_weights() {
    // No transformers logits for Qwen2 here: each adapter on the base must give what the
    // model built from PEFT's merge_and_unload() weights gives.
    let config = ckpt("qwen2_f32_single/config.json");
    let ids = Tensor::new(
        &[[1u32, 17, 42, 5, 63, 30, 9], [0, 2, 61, 8, 8, 33, 12]],
        &Device::Cpu,
    )
    .unwrap();
    let base = logits(
        &build(
            &config,
            &ckpt("qwen2_f32_sharded"),
            DType::F32,
            &no_adapter(),
        ),
        &ids,
    );
    for kind in ["lora", "dora", "vera", "adalora", "pissa", "olora"] {
        let plan = peft_plan(&ckpt(&format!("qwen2_adapters/{kind}")));
        let model = build(&config, &ckpt("qwen2_f32_single"), DType::F32, &plan);
        plan.finish().unwrap();
        let got = logits(&model, &ids);
        let merged = build(
            &config,
            &ckpt(&format!("qwen2_merged/{kind}_f32.safetensors")),
            DType::F32,
            &no_adapter(),
        );
        check(
            &got,
            &logits(&merged, &ids),
            TOL,
            &format!("qwen2 {kind} vs merged"),
        );
        assert!(rel_err(&got, &base) > 1e-2, "{kind}");
    }
}

#[test]
fn peft_option_fixtures_give_peft_logits() {
    for case in ["llama_embed", "llama_bias"] {
        let dir = fixture("peft_options").join(case);
        let io = load(&dir.join("io.safetensors"));
        let ids = &io["input_ids"];
        let plan = peft_plan(&dir.join("adapter"));
        let model = build(
            &dir.join("base/config.json"),
            &dir.join("base"),
            DType::F32,
            &plan,
        );
        plan.finish().unwrap();
        check(
            &logits(&model, ids),
            &io["logits"],
            TOL,
            &format!("{case} unmerged"),
        );
        // PEFT's merged model, saved, is a plain model of the same config.
        let merged = build(
            &dir.join("merged/config.json"),
            &dir.join("merged"),
            DType::F32,
            &no_adapter(),
        );
        check(
            &logits(&merged, ids),
            &io["merged_logits"],
            TOL,
            &format!("{case} merged"),
        );
    }
    // llama_embed adapts the embedding and the head (LoRA on an embedding).
    let dir = fixture("peft_options/llama_embed");
    let plan = peft_plan(&dir.join("adapter"));
    let model = build(
        &dir.join("base/config.json"),
        &dir.join("base"),
        DType::F32,
        &plan,
    );
    assert!(model.embed_tokens().adapter().is_some() && model.lm_head().adapter().is_some());
}

#[test]
fn bf16_checkpoints_load_and_give_close_logits() {
    let io = load(&ckpt("llama_logits.safetensors"));
    let ids = &io["input_ids"];
    let config = ckpt("llama_bf16_single/config.json");
    for base in ["llama_bf16_single", "llama_bf16_sharded"] {
        // Computed in bf16 (weights, activations, logits; softmax and norms in f32).
        let model = build(&config, &ckpt(base), DType::BF16, &no_adapter());
        assert_eq!(model.dtype(), DType::BF16);
        let out = model.forward(ids).unwrap();
        assert_eq!(out.dtype(), DType::BF16);
        let in_bf16 = logits(&model, ids);
        // Mostly the weights' rounding (std 0.2 random weights, a 7-token input): the f32
        // model of the same bf16 weights is as far from transformers' f32 logits.
        check(
            &in_bf16,
            &io["logits_base"],
            5e-2,
            &format!("{base} in bf16 vs f32 weights"),
        );
        let upcast = logits(&build(&config, &ckpt(base), DType::F32, &no_adapter()), ids);
        check(
            &upcast,
            &io["logits_base"],
            5e-2,
            &format!("{base} upcast vs f32 weights"),
        );
        // bf16 arithmetic itself, against the same weights in f32.
        check(
            &in_bf16,
            &upcast,
            2e-2,
            &format!("{base} in bf16 vs upcast"),
        );
    }
    // An adapter on the bf16 model.
    let plan = peft_plan(&ckpt("llama_adapters/lora"));
    let model = build(&config, &ckpt("llama_bf16_sharded"), DType::BF16, &plan);
    plan.finish().unwrap();
    check(
        &logits(&model, ids),
        &io["logits_lora"],
        5e-2,
        "bf16 + lora",
    );
}

#[test]
fn fixture_configs_resolve_as_transformers_does() {
    let cfg = |case: &str| LlamaConfig::from_file(models(case).join("base")).unwrap();
    let m = cfg("mistral");
    assert_eq!(m.family, LlamaFamily::Mistral);
    assert_eq!((m.head_dim, m.num_key_value_heads), (12, 2));
    assert_eq!(
        m.layer_attention,
        vec![LayerAttention::Sliding { window: 4 }; 2]
    );
    assert!(!m.qkv_bias && !m.o_bias && !m.mlp_bias && !m.tie_word_embeddings);
    assert_eq!(m.qk_norm, QkNorm::None);

    let q2 = cfg("qwen2");
    assert_eq!(q2.family, LlamaFamily::Qwen2);
    assert!(q2.qkv_bias && !q2.o_bias && !q2.mlp_bias && q2.tie_word_embeddings);
    assert_eq!(q2.layer_attention, vec![LayerAttention::Full; 2]);
    assert_eq!(q2.head_dim, 8);

    // OLMo 2: transformers' Olmo2Config, whose attention_bias covers q/k/v/o.
    let o2 = cfg("olmo2");
    assert_eq!(o2.family, LlamaFamily::Olmo2);
    assert_eq!(
        (o2.norm_placement, o2.qk_norm),
        (NormPlacement::Post, QkNorm::Whole)
    );
    assert!(o2.qkv_bias && o2.o_bias && !o2.mlp_bias && !o2.tie_word_embeddings);
    // OLMo 3: OLMo 2's layers, sliding layers with their own unscaled RoPE, YaRN on the
    // full-attention ones (transformers' Olmo3Config and its rotary embedding per type).
    let o3 = cfg("olmo3");
    assert_eq!(
        (o3.norm_placement, o3.qk_norm),
        (o2.norm_placement, o2.qk_norm)
    );
    assert_eq!(
        o3.layer_attention,
        [LayerAttention::Sliding { window: 4 }, LayerAttention::Full]
    );
    assert_eq!((o3.rope_theta, o3.sliding_rope_theta), (5e5, Some(1e4)));
    assert!(matches!(o3.rope_scaling, RopeScaling::Yarn(ref y) if y.factor == 2.0));

    let q3 = cfg("qwen3");
    assert!(q3.qk_norm == QkNorm::PerHead && !q3.qkv_bias);
    assert_eq!(q3.head_dim, 16);
    assert_eq!(
        q3.layer_attention,
        [LayerAttention::Full, LayerAttention::Sliding { window: 4 }]
    );

    let l3 = cfg("llama3_rope");
    assert_eq!(
        l3.rope_scaling,
        RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 64
        }
    );
    // Three regimes over head_dim 8, θ = 1e4 (wavelengths 6.3, 63, 628, 6283 against 16
    // and 64): kept, smoothed, divided by 8, divided by 8.
    let f = l3.inv_freq();
    let plain = [1.0f64, 0.1, 0.01, 0.001];
    let smooth = (64.0 / (2.0 * std::f64::consts::PI / 0.1) - 1.0) / 3.0;
    let want = [
        plain[0],
        (1.0 - smooth) * plain[1] / 8.0 + smooth * plain[1],
        plain[2] / 8.0,
        plain[3] / 8.0,
    ];
    for (g, w) in f.iter().zip(want) {
        assert!((f64::from(*g) - w).abs() <= 1e-6 * w, "{f:?} vs {want:?}");
    }

    // transformers 4.x form: top-level rope_theta and rope_scaling {"type": ...}.
    let lin = cfg("linear_rope");
    assert_eq!(lin.rope_theta, 5e5);
    assert_eq!(lin.rope_scaling, RopeScaling::Linear { factor: 2.0 });
    assert!(lin.tie_word_embeddings);
}

/// A config.json with `extra` keys over a tiny base of `model_type` (32 heads: every
/// model type's default `num_key_value_heads` divides them).
fn json(model_type: &str, extra: &str) -> String {
    let sep = if extra.is_empty() { "" } else { "," };
    format!(
        r#"{{"model_type": "{model_type}", "vocab_size": 64, "hidden_size": 128,
            "intermediate_size": 32, "num_hidden_layers": 3, "num_attention_heads": 32{sep}
            {extra}}}"#
    )
}

/// The error of [`json`]`(model_type, extra)`, which must not parse.
fn config_error(model_type: &str, extra: &str) -> String {
    LlamaConfig::from_json(&json(model_type, extra))
        .unwrap_err()
        .to_string()
}

/// [`config_error`] mentions each of `needles`.
fn assert_config_error(model_type: &str, extra: &str, needles: &[&str]) {
    let err = config_error(model_type, extra);
    for n in needles {
        assert!(err.contains(n), "{extra}: `{err}` does not mention `{n}`");
    }
}

#[test]
fn missing_keys_take_transformers_defaults_for_the_model_type() {
    let parse = |t: &str, extra: &str| LlamaConfig::from_json(&json(t, extra)).unwrap();
    let l = parse("llama", "");
    assert_eq!(
        (l.num_key_value_heads, l.head_dim, l.rope_theta),
        (32, 4, 1e4)
    );
    assert_eq!(l.rope_scaling, RopeScaling::None);
    assert_eq!(l.rms_norm_eps, 1e-6);
    assert_eq!(parse("mistral", "").num_key_value_heads, 8);
    assert_eq!(parse("qwen2", "").num_key_value_heads, 32);
    // OLMo 2 (transformers 5.25's Olmo2Config): KV heads as the query heads, ε 1e-5, θ 1e4,
    // 2048 positions, untied.
    let o = parse("olmo2", "");
    assert_eq!(
        (o.num_key_value_heads, o.rms_norm_eps, o.rope_theta),
        (32, 1e-5, 1e4)
    );
    assert_eq!(
        (o.max_position_embeddings, o.tie_word_embeddings),
        (2048, false)
    );
    // OLMo 3: θ 5e5 on both layer types, three sliding layers in four (window 4096).
    let o = LlamaConfig::from_json(
        &json("olmo3", "").replace(r#""num_hidden_layers": 3"#, r#""num_hidden_layers": 8"#),
    )
    .unwrap();
    assert_eq!((o.rope_theta, o.sliding_rope_theta), (5e5, Some(5e5)));
    let full: Vec<usize> = (0..8)
        .filter(|&i| o.layer_attention[i] == LayerAttention::Full)
        .collect();
    assert_eq!(full, [3, 7]);
    assert!(o
        .layer_attention
        .contains(&LayerAttention::Sliding { window: 4096 }));
    // `null` is "same as the query heads" for every model type.
    let null_kv = json("qwen2", r#""num_key_value_heads": null"#).replace(
        r#""num_attention_heads": 32"#,
        r#""num_attention_heads": 4"#,
    );
    assert_eq!(
        LlamaConfig::from_json(&null_kv)
            .unwrap()
            .num_key_value_heads,
        4
    );
    assert_eq!(parse("qwen3", "").head_dim, 128);
    // Mistral: a missing sliding_window is 4096, null is none.
    assert_eq!(
        parse("mistral", "").layer_attention,
        vec![LayerAttention::Sliding { window: 4096 }; 3]
    );
    assert_eq!(
        parse("mistral", r#""sliding_window": null"#).layer_attention,
        vec![LayerAttention::Full; 3]
    );
    // Qwen2.5's configs: a window with use_sliding_window false is no window.
    let q = parse(
        "qwen2",
        r#""sliding_window": 32768, "use_sliding_window": false"#,
    );
    assert_eq!(q.layer_attention, vec![LayerAttention::Full; 3]);
    // With it on, layers from max_window_layers on slide.
    let q = parse(
        "qwen2",
        r#""sliding_window": 8, "use_sliding_window": true, "max_window_layers": 1"#,
    );
    assert_eq!(
        q.layer_attention,
        [
            LayerAttention::Full,
            LayerAttention::Sliding { window: 8 },
            LayerAttention::Sliding { window: 8 }
        ]
    );
    // Llama has no sliding window, whatever the file says; its biases follow the keys.
    let l = parse(
        "llama",
        r#""sliding_window": 2, "attention_bias": true, "mlp_bias": true"#,
    );
    assert_eq!(l.layer_attention, vec![LayerAttention::Full; 3]);
    assert!(l.qkv_bias && l.o_bias && l.mlp_bias);
    // Mistral and Qwen2 ignore attention_bias (transformers hard-codes their biases).
    let m = parse("mistral", r#""attention_bias": true"#);
    assert!(!m.qkv_bias && !m.o_bias);
    let q = parse("qwen2", r#""attention_bias": false"#);
    assert!(q.qkv_bias && !q.o_bias);
    let q3 = parse("qwen3", r#""attention_bias": true"#);
    assert!(q3.qkv_bias && q3.o_bias && !q3.mlp_bias);
}

#[test]
fn rope_keys_follow_transformers_precedence() {
    let parse = |extra: &str| LlamaConfig::from_json(&json("llama", extra)).unwrap();
    // rope_parameters' theta wins over the top-level one.
    let c = parse(
        r#""rope_theta": 5.0, "rope_parameters": {"rope_type": "default", "rope_theta": 7.0}"#,
    );
    assert_eq!(c.rope_theta, 7.0);
    // A non-empty rope_scaling replaces rope_parameters; the top-level theta fills in.
    let c = parse(
        r#""rope_theta": 5.0, "rope_scaling": {"type": "linear", "factor": 3.0},
           "rope_parameters": {"rope_type": "default", "rope_theta": 7.0}"#,
    );
    assert_eq!(
        (c.rope_theta, c.rope_scaling),
        (5.0, RopeScaling::Linear { factor: 3.0 })
    );
    // `rope_type` wins over `type`; an empty or null rope_scaling is ignored.
    let c = parse(r#""rope_scaling": {"type": "dynamic", "rope_type": "linear", "factor": 2.0}"#);
    assert_eq!(c.rope_scaling, RopeScaling::Linear { factor: 2.0 });
    let c =
        parse(r#""rope_scaling": {}, "rope_parameters": {"rope_type": "linear", "factor": 4.0}"#);
    assert_eq!(c.rope_scaling, RopeScaling::Linear { factor: 4.0 });
    let c = parse(r#""rope_scaling": null"#);
    assert_eq!(c.rope_scaling, RopeScaling::None);
    // llama3's original_max_position_embeddings: a top-level key wins, else the dict's,
    // else max_position_embeddings.
    let l3 =
        r#""rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0"#;
    let orig = |c: LlamaConfig| match c.rope_scaling {
        RopeScaling::Llama3 {
            original_max_position_embeddings,
            ..
        } => original_max_position_embeddings,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        orig(parse(&format!(
            r#""max_position_embeddings": 100, "rope_parameters": {{{l3}}}"#
        ))),
        100
    );
    assert_eq!(
        orig(parse(&format!(
            r#""max_position_embeddings": 100, "rope_parameters": {{{l3}, "original_max_position_embeddings": 50}}"#
        ))),
        50
    );
    assert_eq!(
        orig(parse(&format!(
            r#""original_max_position_embeddings": 20, "rope_parameters": {{{l3}, "original_max_position_embeddings": 50}}"#
        ))),
        20
    );
    // partial_rotary_factor 1 is the plain RoPE.
    parse(r#""partial_rotary_factor": 1.0"#);
}

#[test]
fn unsupported_config_options_are_errors_naming_them() {
    let cases: [(&str, &str, &[&str]); 17] = [
        (
            "llama",
            r#""rope_scaling": {"type": "su", "factor": 4.0}"#,
            &["rope_type", "su", "llama3, yarn"],
        ),
        (
            "qwen3",
            r#""rope_scaling": {"type": "yarn", "original_max_position_embeddings": 64}"#,
            &["factor", "missing", "yarn"],
        ),
        (
            "qwen3",
            r#""rope_scaling": {"type": "yarn", "factor": 0.0}"#,
            &["factor", "must be finite and > 0", "got 0"],
        ),
        (
            "qwen3",
            r#""rope_scaling": {"type": "yarn", "factor": 4.0, "truncate": "yes"}"#,
            &["truncate", "expected a bool"],
        ),
        (
            "qwen2",
            r#""rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 0}"#,
            &["original_max_position_embeddings", "at least 1"],
        ),
        (
            "llama",
            r#""rope_scaling": {"type": "dynamic", "factor": 2.0}"#,
            &["rope_type", "dynamic"],
        ),
        (
            "qwen2",
            r#""rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}"#,
            &["rope_type", "longrope"],
        ),
        (
            "llama",
            r#""hidden_act": "gelu""#,
            &["hidden_act", "gelu", "silu"],
        ),
        (
            "llama",
            r#""partial_rotary_factor": 0.5"#,
            &["partial_rotary_factor", "0.5"],
        ),
        (
            "llama",
            r#""quantization_config": {"quant_method": "gptq", "bits": 4}"#,
            &["quantization_config", "gptq"],
        ),
        (
            "qwen2",
            r#""layer_types": ["full_attention", "sliding_attention", "full_attention"]"#,
            &["layer_types", "layer 1", "use_sliding_window"],
        ),
        (
            "qwen3",
            r#""layer_types": ["full_attention", "chunked_attention", "full_attention"]"#,
            &["layer_types", "chunked_attention"],
        ),
        (
            "qwen2",
            r#""layer_types": ["full_attention"]"#,
            &["layer_types", "1 entries for 3 layers"],
        ),
        (
            "llama",
            r#""rope_parameters": {"full_attention": {"rope_type": "default"}}"#,
            &["per-layer-type RoPE", "full_attention"],
        ),
        (
            "llama",
            r#""num_key_value_heads": 3"#,
            &["num_key_value_heads", "3 does not divide"],
        ),
        ("llama", r#""head_dim": 5"#, &["head_dim", "even"]),
        (
            "llama",
            r#""rope_scaling": {"type": "llama3", "factor": 8.0}"#,
            &["low_freq_factor", "missing"],
        ),
    ];
    for (model_type, extra, needles) in cases {
        assert_config_error(model_type, extra, needles);
    }
    let err = LlamaConfig::from_json(r#"{"model_type": "gpt2", "vocab_size": 64}"#)
        .unwrap_err()
        .to_string();
    assert!(err.contains("model_type") && err.contains("gpt2"), "{err}");
    let err = LlamaConfig::from_json(r#"{"model_type": "llama", "vocab_size": 64}"#)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("hidden_size") && err.contains("missing"),
        "{err}"
    );
    let err = LlamaConfig::from_json(r#"{"model_type": "llama", "vocab_size": "many"}"#)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("config.json") && err.contains("line 1"),
        "{err}"
    );
    // A file's errors name the file.
    let err = LlamaConfig::from_file(fixture("models/llama/nonexistent"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("nonexistent"), "{err}");
    // A config written in code is checked when the model is built.
    let mut c = LlamaConfig::from_file(models("mistral").join("base")).unwrap();
    c.layer_attention.pop();
    let vb = VarBuilder::from_varmap(&VarMap::new(), DType::F32, &Device::Cpu);
    let err = LlamaForCausalLM::load(&c, vb, &no_adapter())
        .unwrap_err()
        .to_string();
    assert!(err.contains("layer_types"), "{err}");
}

#[test]
fn granite_reads_its_multipliers_and_refuses_what_transformers_lacks() {
    // Absent multipliers take GraniteConfig's defaults: 1 each, the attention's too
    // (not 1 / √head_dim).
    let plain = LlamaConfig::from_json(&json("granite", "")).unwrap();
    assert_eq!(plain.family, LlamaFamily::Granite);
    assert_eq!(plain.multipliers.attention_scale(plain.head_dim), 1.0);
    assert_eq!(plain.num_key_value_heads, 32); // like Llama: the query heads
    let fixture_config = LlamaConfig::from_file(models("granite").join("base")).unwrap();
    let m = fixture_config.multipliers;
    assert_eq!(
        (
            m.embedding_multiplier,
            m.attention_multiplier,
            m.residual_multiplier,
            m.logits_scaling
        ),
        (3.0, Some(0.25), 0.5, 4.0)
    );
    let err = config_error("granite", r#""logits_scaling": 0"#);
    assert!(
        err.contains("logits_scaling") && err.contains("not be 0"),
        "{err}"
    );
    // A value of the wrong type names its key.
    let err = config_error("granite", r#""residual_multiplier": "half""#);
    assert!(
        err.contains("config.json") && err.contains("`residual_multiplier`"),
        "{err}"
    );

    // The loss path (the frozen tied head and the loss as one op, or the adapted head)
    // divides by logits_scaling as the logits do.
    check_loss_sum_is_the_logits_loss("granite");

    // transformers has no GraniteForSequenceClassification; llama.cpp's granite
    // architecture carries the multipliers, which the GGUF export does not map.
    let base = models("granite").join("base");
    let err = lorakit::models::AutoSequenceClassifier::head_name(&base)
        .unwrap_err()
        .to_string();
    assert!(err.contains("granite"), "{err}");
    let labels = lorakit::models::classification::ClassifierConfig::default();
    let vb = Checkpoint::open(&base)
        .unwrap()
        .var_builder(DType::F32, &Device::Cpu);
    let err = lorakit::models::llama::LlamaForSequenceClassification::load(
        &fixture_config,
        &labels,
        vb,
        &no_adapter(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("granite") && err.contains("GraniteForSequenceClassification"),
        "{err}"
    );
    let adapter = PeftAdapter::load(models("granite").join("lora"), &Device::Cpu).unwrap();
    let err = lorakit::gguf::GgufLora::from_adapter(&adapter, &fixture_config)
        .unwrap_err()
        .to_string();
    assert!(err.contains("GGUF") && err.contains("granite"), "{err}");
}

#[test]
fn smollm3_resolves_nope_layers_and_windows_as_transformers_does() {
    // SmolLM3Config's defaults: every 4th layer NoPE, θ 2e6, 4 KV heads, tied; layer_types
    // from the NoPE layers when a window is on.
    let smol = |layers: usize, extra: &str| {
        LlamaConfig::from_json(&format!(
            r#"{{"model_type": "smollm3", "vocab_size": 64, "hidden_size": 128,
                "intermediate_size": 32, "num_hidden_layers": {layers},
                "num_attention_heads": 32{extra}}}"#
        ))
    };
    let c = smol(8, "").unwrap();
    assert_eq!(c.family, LlamaFamily::SmolLm3);
    let nope: Vec<usize> = (0..8).filter(|&i| !c.layer_rope[i]).collect();
    assert_eq!(nope, [3, 7]);
    assert_eq!((c.rope_theta, c.num_key_value_heads), (2e6, 4));
    assert!(c.tie_word_embeddings);
    assert_eq!(c.layer_attention, vec![LayerAttention::Full; 8]);
    let c = smol(
        4,
        r#", "no_rope_layer_interval": 2, "use_sliding_window": true, "sliding_window": 16"#,
    )
    .unwrap();
    assert_eq!(c.layer_rope, [true, false, true, false]);
    let slide = LayerAttention::Sliding { window: 16 };
    let full = LayerAttention::Full;
    assert_eq!(c.layer_attention, [full, slide, full, slide]);
    // The saved fixture names its layers: the NoPE layer slides.
    let f = LlamaConfig::from_file(models("smollm3").join("base")).unwrap();
    assert_eq!(f.layer_rope, [true, false]);
    assert_eq!(
        f.layer_attention,
        [full, LayerAttention::Sliding { window: 4 }]
    );
    assert!(f.qkv_bias && f.o_bias && !f.mlp_bias);

    for (extra, needles) in [
        (
            r#""no_rope_layers": [1, 0]"#,
            &["no_rope_layers", "2 entries for 3 layers"][..],
        ),
        (
            r#""no_rope_layers": [1, 2, 1]"#,
            &["no_rope_layers", "got 2"][..],
        ),
        (
            r#""no_rope_layer_interval": 0"#,
            &["no_rope_layer_interval", "at least 1"][..],
        ),
    ] {
        assert_config_error("smollm3", extra, needles);
    }
}

#[test]
fn phi3_reads_fused_projections_and_refuses_what_lorakit_lacks() {
    // Phi3Config's defaults: ε 1e-5, the query heads' count of KV heads, no window.
    let c = LlamaConfig::from_json(&json("phi3", "")).unwrap();
    assert_eq!(c.family, LlamaFamily::Phi3);
    assert_eq!((c.rms_norm_eps, c.num_key_value_heads), (1e-5, 32));
    assert_eq!(c.layer_attention, vec![LayerAttention::Full; 3]);
    assert!(c.fused_projections);
    // VeRA's shared pair covers the fused shapes.
    let (d, f) = (c.hidden_size, c.intermediate_size);
    assert!(c.linear_shapes().contains(&(d, 3 * d)));
    assert!(c.linear_shapes().contains(&(d, 2 * f)));
    // resid_pdrop: evaluation ignores it, as transformers does (training applies it:
    // tests/suite/models_dropout.rs).
    let dir = models("phi3");
    let mut config = LlamaConfig::from_file(dir.join("base")).unwrap();
    config.residual_dropout = 0.1;
    let vb = Checkpoint::open(dir.join("base"))
        .unwrap()
        .var_builder(DType::F32, &Device::Cpu);
    let model = LlamaForCausalLM::load(&config, vb, &no_adapter()).unwrap();
    let ids = &load(&dir.join("logits.safetensors"))["input_ids"];
    check(
        &logits(&model, ids),
        &load(&dir.join("logits.safetensors"))["logits"],
        TOL,
        "phi3 eval",
    );
    let adapter = PeftAdapter::load(dir.join("lora"), &Device::Cpu).unwrap();
    let err = lorakit::gguf::GgufLora::from_adapter(&adapter, &config)
        .unwrap_err()
        .to_string();
    assert!(err.contains("phi3"), "{err}");
}

/// A LongRoPE fixture (`phi3_longrope`, `phi4_partial`) against transformers: 24-position
/// logits with the long factors (base and LoRA), and greedy generation with the cache across
/// the switch at position 16 (where lorakit re-runs the sequence with the long factors, as
/// transformers' Phi3ForCausalLM drops its cache). Returns the LoRA model, the prompt and
/// transformers' tokens.
fn check_longrope_case(case: &str) -> (LlamaForCausalLM, Vec<u32>, Vec<u32>) {
    let dir = models(case);
    let io = load(&dir.join("logits.safetensors"));
    let config = dir.join("base/config.json");
    let base = build(&config, &dir.join("base"), DType::F32, &no_adapter());
    let ids = &io["long_input_ids"];
    let what = |model: &str| format!("{case} {model}, 24 positions");
    check(&logits(&base, ids), &io["long_logits"], TOL, &what("base"));
    let lora = build(
        &config,
        &dir.join("base"),
        DType::F32,
        &peft_plan(&dir.join("lora")),
    );
    check(
        &logits(&lora, ids),
        &io["long_lora_logits"],
        TOL,
        &what("lora"),
    );
    let first_row = |key: &str| -> Vec<u32> {
        let row = io[key].get(0).unwrap().to_dtype(DType::U32).unwrap();
        row.to_vec1().unwrap()
    };
    let (prompt, want) = (first_row("input_ids"), first_row("greedy_ids"));
    let got = lora.generate_greedy(&prompt, want.len(), None).unwrap();
    assert_eq!(got, want, "{case}: greedy tokens across the switch");
    (lora, prompt, want)
}

#[test]
fn longrope_switches_to_its_long_factors_past_the_original_context() {
    let dir = models("phi3_longrope");
    let (lora, prompt, want) = check_longrope_case("phi3_longrope");
    // A batch takes one set of frequencies for all its rows: one that would cross the
    // switch is an error, one that stays within it gives each prompt's own tokens.
    let config = lorakit::models::generation::GenerationConfig::greedy(want.len());
    let err = lora
        .generate_batch(&[prompt.clone(), prompt[..4].to_vec()], &config)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("LongRoPE") && err.contains("one at a time"),
        "{err}"
    );
    let short = lorakit::models::generation::GenerationConfig::greedy(4);
    let batch = lora
        .generate_batch(&[prompt.clone(), prompt[..4].to_vec()], &short)
        .unwrap();
    assert_eq!(batch[0], want[..4]);
    assert_eq!(
        batch[1],
        lora.generate_greedy(&prompt[..4], 4, None).unwrap()
    );
    // Phi-3's older name `su` is read as longrope, and the factors must fit head_dim.
    let c = LlamaConfig::from_file(dir.join("base")).unwrap();
    assert!(matches!(c.rope_scaling, RopeScaling::LongRope(_)));
    let extra = r#""rope_scaling": {"type": "su", "short_factor": [1.0], "long_factor": [1.0]}"#;
    let err = config_error("phi3", extra);
    assert!(
        err.contains("short_factor") && err.contains("need 2"),
        "{err}"
    );
    // Without an original_max_position_embeddings anywhere, Phi3Config's 4096.
    let factors = r#""short_factor": [1.0, 1.0], "long_factor": [1.0, 2.0]"#;
    let extra = format!(r#""rope_scaling": {{"type": "su", {factors}}}"#);
    let c = LlamaConfig::from_json(&json("phi3", &extra)).unwrap();
    let RopeScaling::LongRope(long) = &c.rope_scaling else {
        panic!("{:?}", c.rope_scaling)
    };
    assert_eq!(long.original_max_position_embeddings, 4096);
    let extra = r#""rope_scaling": {"type": "longrope", "short_factor": [1.0, 1.0]}"#;
    let err = config_error("phi3", extra);
    assert!(
        err.contains("long_factor") && err.contains("missing"),
        "{err}"
    );
}

#[test]
fn partial_rotary_factor_rotates_the_first_part_of_each_head() {
    // Phi-4-mini's shape: RoPE on 6 of each head's 8 dimensions, longrope factors for those
    // 3 frequencies, tied embeddings.
    check_longrope_case("phi4_partial");
    let c = LlamaConfig::from_file(models("phi4_partial").join("base")).unwrap();
    assert_eq!((c.head_dim, c.rotary_dim(), c.inv_freq().len()), (8, 6, 3));
    // The form Phi-4-mini's own config.json has: a top-level factor, `rope_scaling` with
    // factors for the rotated part only.
    let factors = r#""short_factor": [1.0, 1.0, 1.0], "long_factor": [1.0, 2.0, 4.0]"#;
    let phi = |partial: &str, factors: &str| {
        json(
            "phi3",
            &format!(
                r#""partial_rotary_factor": {partial}, "rope_scaling": {{"type": "longrope", {factors}}}"#
            ),
        )
    };
    // head_dim 4 (128 / 32): 0.75 of it is 3, odd.
    let err = LlamaConfig::from_json(&phi("0.75", factors))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("partial_rotary_factor") && err.contains("even"),
        "{err}"
    );
    let wide = json(
        "phi3",
        &format!(
            r#""head_dim": 12, "partial_rotary_factor": 0.5, "rope_scaling": {{"type": "longrope", {factors}}}"#
        ),
    );
    assert_eq!(LlamaConfig::from_json(&wide).unwrap().rotary_dim(), 6);
    // Factors for the whole head where only half of it rotates.
    let whole = r#""short_factor": [1, 1, 1, 1, 1, 1], "long_factor": [1, 1, 1, 1, 1, 1]"#;
    let half = json(
        "phi3",
        &format!(
            r#""head_dim": 12, "partial_rotary_factor": 0.5, "rope_scaling": {{"type": "longrope", {whole}}}"#
        ),
    );
    let err = LlamaConfig::from_json(&half).unwrap_err().to_string();
    assert!(
        err.contains("short_factor") && err.contains("need 3"),
        "{err}"
    );
    for bad in ["0", "1.5", "-0.5"] {
        let err = config_error("phi3", &format!(r#""partial_rotary_factor": {bad}"#));
        assert!(err.contains("partial_rotary_factor"), "{bad}: {err}");
    }
    // The other families rotate whole heads: a factor below 1 is refused, in the file and
    // in a config written in code.
    let err = config_error("llama", r#""partial_rotary_factor": 0.5"#);
    assert!(
        err.contains("partial_rotary_factor") && err.contains("llama"),
        "{err}"
    );
    let mut llama = LlamaConfig::from_json(&json("llama", "")).unwrap();
    llama.partial_rotary_factor = 0.5;
    let err = llama.validate().unwrap_err().to_string();
    assert!(err.contains("only phi3"), "{err}");
}

/// Gemma 3 1B's `config.json` as the Hub has it (transformers 4.50's form).
const GEMMA3_1B: &str = r#"{"architectures": ["Gemma3ForCausalLM"], "attention_bias": false,
    "attention_dropout": 0.0, "attn_logit_softcapping": null, "bos_token_id": 2,
    "cache_implementation": "hybrid", "eos_token_id": [1, 106],
    "final_logit_softcapping": null, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 1152, "initializer_range": 0.02, "intermediate_size": 6912,
    "max_position_embeddings": 32768, "model_type": "gemma3_text", "num_attention_heads": 4,
    "num_hidden_layers": 26, "num_key_value_heads": 1, "pad_token_id": 0,
    "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000,
    "rope_scaling": null, "rope_theta": 1000000, "sliding_window": 512,
    "sliding_window_pattern": 6, "torch_dtype": "bfloat16",
    "transformers_version": "4.50.0.dev0", "use_cache": true, "vocab_size": 262144}"#;

#[test]
fn gemma3_configs_read_as_transformers_reads_them() {
    // What transformers 5.25's Gemma3TextConfig makes of it: full attention on layers 5, 11,
    // 17 and 23, θ 1e6 there and 1e4 on the sliding layers (window 512).
    let c = LlamaConfig::from_json(GEMMA3_1B).unwrap();
    assert_eq!(c.family, LlamaFamily::Gemma3);
    let full: Vec<usize> = (0..26)
        .filter(|&i| c.layer_attention[i] == LayerAttention::Full)
        .collect();
    assert_eq!(full, [5, 11, 17, 23]);
    assert!(c.layer_attention.iter().all(|k| matches!(
        k,
        LayerAttention::Full | LayerAttention::Sliding { window: 512 }
    )));
    assert_eq!((c.rope_theta, c.sliding_rope_theta), (1e6, Some(1e4)));
    assert_eq!(c.rope_scaling, RopeScaling::None);
    assert_eq!(
        c.hidden_act,
        lorakit::models::llama::GateActivation::GeluTanh
    );
    assert!(c.unit_offset_norms && c.qk_norm == QkNorm::PerHead && c.tie_word_embeddings);
    assert_eq!(c.norm_placement, NormPlacement::Sandwich);
    assert_eq!((c.head_dim, c.num_key_value_heads), (256, 1));
    assert_eq!(c.multipliers.attention_scale(c.head_dim), 1.0 / 16.0);
    assert_eq!(c.multipliers.embedding_multiplier, 1152f64.sqrt());
    // Gemma 3 4B's text config adds linear scaling, for the full-attention layers only.
    let scaled = GEMMA3_1B.replace(
        r#""rope_scaling": null"#,
        r#""rope_scaling": {"factor": 8.0, "rope_type": "linear"}"#,
    );
    let c = LlamaConfig::from_json(&scaled).unwrap();
    assert_eq!(c.rope_scaling, RopeScaling::Linear { factor: 8.0 });
    assert_eq!(c.sliding_rope_theta, Some(1e4));
    // Defaults: θ 1e6 / 1e4, five sliding layers in six, window 4096, head_dim 256.
    let c = LlamaConfig::from_json(&json("gemma3_text", "")).unwrap();
    assert_eq!((c.rope_theta, c.sliding_rope_theta), (1e6, Some(1e4)));
    assert_eq!(
        c.layer_attention,
        [LayerAttention::Sliding { window: 4096 }; 3]
    );
    assert_eq!(c.head_dim, 256);

    // A Gemma key of the wrong type is named, as the other keys are.
    let err = config_error("gemma3_text", r#""query_pre_attn_scalar": "big""#);
    assert!(err.contains("`query_pre_attn_scalar`"), "{err}");
    // Soft-capping as Gemma 2's when a Gemma 3 config sets it; none by default.
    assert_eq!(
        (c.attn_logit_softcapping, c.final_logit_softcapping),
        (None, None)
    );
    let capped = json("gemma3_text", r#""final_logit_softcapping": 30.0"#);
    let c = LlamaConfig::from_json(&capped).unwrap();
    assert_eq!(c.final_logit_softcapping, Some(30.0));

    let cases: [(&str, &[&str]); 9] = [
        (
            r#""final_logit_softcapping": 0.0"#,
            &["final_logit_softcapping", "> 0"],
        ),
        (
            r#""attn_logit_softcapping": -1.0"#,
            &["attn_logit_softcapping", "> 0"],
        ),
        (
            r#""use_bidirectional_attention": true"#,
            &["use_bidirectional_attention"],
        ),
        (
            r#""hidden_activation": "relu""#,
            &["hidden_activation", "relu"],
        ),
        (
            r#""query_pre_attn_scalar": 0"#,
            &["query_pre_attn_scalar", "> 0"],
        ),
        (
            r#""sliding_window_pattern": 0"#,
            &["sliding_window_pattern", "at least 1"],
        ),
        (
            r#""sliding_window": null"#,
            &["layer_types", "layer 0", "sliding_window is null"],
        ),
        (
            r#""rope_parameters": {"rope_type": "default", "rope_theta": 1e4}"#,
            &["rope_parameters", "full_attention", "got key"],
        ),
        (
            r#""rope_parameters": {"sliding_attention": {"rope_type": "linear", "factor": 2.0}}"#,
            &["sliding_attention", "Linear"],
        ),
    ];
    for (extra, needles) in cases {
        assert_config_error("gemma3_text", extra, needles);
    }
}

#[test]
fn gemma_and_gemma2_configs_take_their_own_defaults() {
    // Gemma 2: every other layer sliding (the first one first), soft-capping 50 / 30 unless
    // null, query_pre_attn_scalar 256, one RoPE θ (10 000), a norm after each branch.
    let c = LlamaConfig::from_json(&json("gemma2", "")).unwrap();
    let slide = LayerAttention::Sliding { window: 4096 };
    assert_eq!(c.layer_attention, [slide, LayerAttention::Full, slide]);
    assert_eq!(
        (c.attn_logit_softcapping, c.final_logit_softcapping),
        (Some(50.0), Some(30.0))
    );
    assert_eq!((c.rope_theta, c.sliding_rope_theta), (1e4, None));
    assert!(c.unit_offset_norms && c.qk_norm == QkNorm::None && c.tie_word_embeddings);
    assert_eq!(c.norm_placement, NormPlacement::Sandwich);
    assert_eq!(c.multipliers.attention_scale(c.head_dim), 1.0 / 16.0);
    let uncapped = r#""attn_logit_softcapping": null, "final_logit_softcapping": null"#;
    let c = LlamaConfig::from_json(&json("gemma2", uncapped)).unwrap();
    assert_eq!(
        (c.attn_logit_softcapping, c.final_logit_softcapping),
        (None, None)
    );
    // Its sliding_window_pattern key is Gemma 3's, not Gemma 2's.
    let c = LlamaConfig::from_json(&json("gemma2", r#""sliding_window_pattern": 3"#)).unwrap();
    assert_eq!(c.layer_attention[0], slide);

    // Gemma: full attention, the usual 1/√head_dim scale, no soft-capping or sandwich
    // norms; its legacy `hidden_act: "gelu"` is the tanh approximation (GemmaConfig).
    let c = LlamaConfig::from_json(&json("gemma", r#""hidden_act": "gelu""#)).unwrap();
    assert_eq!(
        c.hidden_act,
        lorakit::models::llama::GateActivation::GeluTanh
    );
    assert_eq!(c.layer_attention, [LayerAttention::Full; 3]);
    assert_eq!(c.multipliers.attention_scale(256), 1.0 / 16.0);
    assert_eq!(c.multipliers.embedding_multiplier, 128f64.sqrt());
    assert!(c.unit_offset_norms && c.final_logit_softcapping.is_none());
    assert_eq!(c.norm_placement, NormPlacement::Pre);
    assert_eq!((c.head_dim, c.num_key_value_heads), (256, 16));
    let err = config_error("gemma", r#""hidden_act": "silu""#);
    assert!(err.contains("hidden_act") && err.contains("silu"), "{err}");
    // Gemma 2 reads `hidden_activation`, where `gelu` is not the tanh approximation.
    let err = config_error("gemma2", r#""hidden_activation": "gelu""#);
    assert!(err.contains("hidden_activation"), "{err}");
}

/// `loss_sum` (the fused head + loss where it runs) equals the composed loss of the
/// logits (checked against transformers elsewhere) for the fixture `case`, base and LoRA.
fn check_loss_sum_is_the_logits_loss(case: &str) {
    let dir = models(case);
    let ids = &load(&dir.join("logits.safetensors"))["input_ids"];
    let mask = Tensor::ones(ids.dims(), DType::F32, &Device::Cpu).unwrap();
    for plan in [no_adapter(), peft_plan(&dir.join("lora"))] {
        let model = build(
            &dir.join("base/config.json"),
            &dir.join("base"),
            DType::F32,
            &plan,
        );
        let fused = model.loss_sum(ids, &mask).unwrap();
        let composed = lorakit::finetune::loss::causal_lm_loss_sum_composed(
            &model.forward(ids).unwrap(),
            &ids.to_dtype(DType::U32).unwrap(),
            &mask,
        )
        .unwrap();
        let (f, c) = (
            fused.to_scalar::<f32>().unwrap(),
            composed.to_scalar::<f32>().unwrap(),
        );
        assert!((f - c).abs() <= 1e-5 * c.abs(), "{case}: loss {f} vs {c}");
    }
}

#[test]
fn gemma2_loss_takes_the_soft_capped_logits() {
    check_loss_sum_is_the_logits_loss("gemma2");
}

/// One of `yarn_params.json`'s cases: a config.json and transformers' YaRN output for it.
#[derive(serde::Deserialize)]
struct YarnCase {
    name: String,
    config: serde_json::Value,
    inv_freq: Vec<f32>,
    attention_factor: f64,
}

#[test]
fn yarn_frequencies_and_attention_factor_are_transformers_own() {
    let text = std::fs::read_to_string(fixture("models/llama/yarn_params.json")).unwrap();
    let cases: Vec<YarnCase> = serde_json::from_str(&text).unwrap();
    assert_eq!(cases.len(), 6);
    for case in cases {
        let config = LlamaConfig::from_json(&case.config.to_string()).unwrap();
        let RopeScaling::Yarn(ref yarn) = config.rope_scaling else {
            panic!("{}: not read as yarn: {:?}", case.name, config.rope_scaling)
        };
        assert!(
            (yarn.attention_factor - case.attention_factor).abs() <= 1e-12,
            "{}: attention factor {} vs transformers' {}",
            case.name,
            yarn.attention_factor,
            case.attention_factor
        );
        let got = config.inv_freq();
        assert_eq!(got.len(), case.inv_freq.len(), "{}", case.name);
        // The same f32 operations in the same order; powf may round θ^(2i/d) one ulp
        // apart from PyTorch's pow.
        for (i, (g, w)) in got.iter().zip(&case.inv_freq).enumerate() {
            assert!(
                (g - w).abs() <= 4.0 * f32::EPSILON * w.abs(),
                "{}: inv_freq[{i}] {g:e} vs transformers' {w:e}",
                case.name
            );
        }
    }
}

#[test]
fn checkpoint_and_config_disagreements_are_named() {
    // An untied config over a checkpoint that has no lm_head.weight (qwen2 is tied).
    let dir = models("qwen2");
    let mut c = LlamaConfig::from_file(dir.join("base")).unwrap();
    c.tie_word_embeddings = false;
    let vb = Checkpoint::open(dir.join("base"))
        .unwrap()
        .var_builder(DType::F32, &Device::Cpu);
    let err = LlamaForCausalLM::load(&c, vb, &no_adapter())
        .unwrap_err()
        .to_string();
    assert!(err.contains("lm_head.weight"), "{err}");
    // A head_dim the weights do not have.
    let mut c = LlamaConfig::from_file(dir.join("base")).unwrap();
    c.head_dim = 4;
    let vb = Checkpoint::open(dir.join("base"))
        .unwrap()
        .var_builder(DType::F32, &Device::Cpu);
    let err = LlamaForCausalLM::load(&c, vb, &no_adapter())
        .unwrap_err()
        .to_string();
    assert!(err.contains("q_proj"), "{err}");
    // An adapter made for another model.
    let plan = peft_plan(&models("qwen3").join("lora"));
    let vb = Checkpoint::open(models("mistral").join("base"))
        .unwrap()
        .var_builder(DType::F32, &Device::Cpu);
    let c = LlamaConfig::from_file(models("mistral").join("base")).unwrap();
    let err = LlamaForCausalLM::load(&c, vb, &plan)
        .unwrap_err()
        .to_string();
    assert!(err.contains("q_proj"), "{err}");
}

#[test]
fn bad_token_ids_are_errors_naming_input_ids() {
    let dir = models("qwen3");
    let model = build(
        &dir.join("base/config.json"),
        &dir.join("base"),
        DType::F32,
        &no_adapter(),
    );
    let dev = Device::Cpu;
    let bad = [
        Tensor::new(&[1u32, 2, 3], &dev).unwrap(),
        Tensor::new(&[[1f32, 2.]], &dev).unwrap(),
        Tensor::new(&[[1u32, 64]], &dev).unwrap(),
        Tensor::new(&[[1i64, -1]], &dev).unwrap(),
        Tensor::zeros((1, 0), DType::U32, &dev).unwrap(),
    ];
    for ids in bad {
        let err = model.forward(&ids).unwrap_err().to_string();
        assert!(err.contains("input_ids"), "{err}");
    }
    // u8, u32 and i64 ids give the same logits.
    let ids = Tensor::new(&[[1u8, 5, 63]], &dev).unwrap();
    let a = logits(&model, &ids);
    for dtype in [DType::U32, DType::I64] {
        assert_eq!(
            rel_err(&a, &logits(&model, &ids.to_dtype(dtype).unwrap())),
            0.0
        );
    }
}

#[test]
fn a_batch_row_and_a_prefix_do_not_see_other_rows_or_later_tokens() {
    let dir = models("mistral");
    let model = build(
        &dir.join("base/config.json"),
        &dir.join("base"),
        DType::F32,
        &no_adapter(),
    );
    let ids = load(&dir.join("logits.safetensors"))["input_ids"].clone();
    let all = logits(&model, &ids);
    for row in 0..2 {
        let one = logits(&model, &ids.i(row..row + 1).unwrap());
        assert!(rel_err(&one, &all.i(row..row + 1).unwrap()) < 1e-5);
        // Causal: the first 5 positions alone give the same logits there.
        let prefix = logits(&model, &ids.i((row..row + 1, ..5)).unwrap());
        assert!(rel_err(&prefix, &all.i((row..row + 1, ..5)).unwrap()) < 1e-5);
    }
}

/// Loss = Σ logits ⊙ r for a fixed r.
pub(crate) fn probe_loss(model: &LlamaForCausalLM, ids: &Tensor, r: &Tensor) -> Tensor {
    (model.forward(ids).unwrap() * r.to_dtype(model.dtype()).unwrap())
        .unwrap()
        .sum_all()
        .unwrap()
}

/// A fixture `case` in `dtype` with a fresh LoRA (B = 0) on layer 0's attention projection
/// `query` (`q_proj`, or Phi-3's `qkv_proj`) and layer 1's down_proj (Qwen2-MoE: its shared
/// expert's; none in Mixtral, whose layers are all sparse, or in Qwen3-MoE, whose dense
/// layer takes none; there and in OLMoE, PEFT's conversion reads `down_proj` as the
/// experts' stacked `down_proj`, which gets a LoRA too): layer 0's attention adapter lies
/// before every norm, RoPE and softmax of the model. Returns the model and that adapter's
/// (lora_A, lora_B).
fn with_fresh_lora(case: &str, query: &str, dtype: DType) -> (LlamaForCausalLM, Var, Var) {
    let dir = models(case);
    let vars = VarMap::new();
    let plan = AdapterPlan::lora(
        TargetSpec::new(ModuleSelector::list([
            format!("model.layers.0.self_attn.{query}"),
            "model.layers.1.mlp.down_proj".to_string(),
            "model.layers.1.mlp.shared_expert.down_proj".to_string(),
        ])),
        RankAlpha::new(2, 4.0),
        LoraConfig::default(), // B = 0: the base model until B moves
        VarBuilder::from_varmap(&vars, dtype, &Device::Cpu),
    );
    let model = build(
        &dir.join("base/config.json"),
        &dir.join("base"),
        dtype,
        &plan,
    );
    // Mixtral's layers are all sparse; Qwen3-MoE's dense layer takes no adapter (as in PEFT).
    let adapted = if ["mixtral", "qwen3_moe", "olmoe"].contains(&case) {
        1
    } else {
        2
    };
    assert_eq!(plan.finish().unwrap().paths().len(), adapted);
    let data = vars.data().lock().unwrap().clone();
    let var = |part: &str| {
        data.iter()
            .find(|(k, _)| k.starts_with("model.layers.0.self_attn.") && k.contains(part))
            .map(|(_, v)| v.clone())
            .unwrap()
    };
    (model, var("lora_A"), var("lora_B"))
}

fn grad_of(model: &LlamaForCausalLM, var: &Var, ids: &Tensor, r: &Tensor) -> Vec<f64> {
    let grads = probe_loss(model, ids, r).backward().unwrap();
    let g = grads
        .get(var.as_tensor())
        .expect("no gradient for layer 0's lora_B");
    g.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

#[test]
fn gradients_reach_adapters_through_norms_rope_and_softmax() {
    // candle's fused rms_norm / rope / softmax have no backward: the model must take the
    // differentiable path wherever a gradient flows. Qwen3: q/k norms, RoPE, GQA, a sliding
    // layer; phi4_partial: RoPE on part of each head, LongRoPE, the fused qkv_proj; gemma3:
    // Gemma's norms (1 + weight, after each branch too), its GELU gate and embedding scale;
    // gemma2: soft-capped attention scores and logits; olmo2: norms after the branches only,
    // q/k norms over the whole projections.
    check_gradients("qwen3", "q_proj");
    check_gradients("phi4_partial", "qkv_proj");
    check_gradients("gemma2", "q_proj");
    check_gradients("gemma3", "q_proj");
    check_gradients("olmo2", "q_proj");
    check_gradients("olmo3", "q_proj");
    // The mixtures of experts: the gradient flows through the experts and the routing
    // weights (mixtral: renormalized f32 weights; qwen2_moe: a shared expert and its sigmoid
    // gate; qwen3_moe: weights not renormalized, a dense layer after).
    check_gradients("mixtral", "q_proj");
    check_gradients("qwen2_moe", "q_proj");
    check_gradients("qwen3_moe", "q_proj");
    // OLMoE: q/k norms over the whole projections, then clip_qkv's clamp.
    check_gradients("olmoe", "q_proj");
}

/// Asserts that the backward gradient `g` of [`probe_loss`] (probes `ids`, `r`) with respect
/// to `var` equals central finite differences at its flat `entries` (`what` names it).
pub(crate) fn check_finite_differences(
    model: &LlamaForCausalLM,
    var: &Var,
    (ids, r): (&Tensor, &Tensor),
    g: &[f64],
    entries: &[usize],
    what: &str,
) {
    let dev = var.device().clone();
    let values = var
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let shape = var.as_tensor().dims().to_vec();
    let set = |v: &[f64]| {
        var.set(&Tensor::from_vec(v.to_vec(), shape.as_slice(), &dev).unwrap())
            .unwrap()
    };
    let h = 1e-5;
    for &i in entries {
        let mut p = values.clone();
        p[i] += h;
        set(&p);
        let up = probe_loss(model, ids, r).to_scalar::<f64>().unwrap();
        p[i] -= 2.0 * h;
        set(&p);
        let down = probe_loss(model, ids, r).to_scalar::<f64>().unwrap();
        set(&values);
        let fd = (up - down) / (2.0 * h);
        // The central difference's own error (h² times the third derivative, with random
        // probes and adapter draws) reached 1.5e-6 once in f64: 1e-5 is still far below
        // what a wrong gradient gives.
        assert!(
            (fd - g[i]).abs() <= 1e-5 * fd.abs().max(1.0),
            "{what} entry {i}: backward {} vs finite difference {fd}",
            g[i]
        );
    }
}

/// In f64 (no fused rms_norm there) the backward to a fresh LoRA on layer 0's `query`
/// projection must equal finite differences; in f32 (fused kernels available) it must
/// equal the f64 one.
fn check_gradients(case: &str, query: &str) {
    let dev = Device::Cpu;
    let dir = models(case);
    let io = load(&dir.join("logits.safetensors"));
    let ids = io["input_ids"].clone();
    let r = Tensor::randn(0f64, 1., (2, 9, 64), &dev).unwrap();

    let (model, _, b) = with_fresh_lora(case, query, DType::F64);
    // With B = 0 the differentiable path gives transformers' logits too.
    check(
        &logits(&model, &ids),
        &io["logits"],
        TOL,
        &format!("{case}, differentiable path"),
    );
    let g = grad_of(&model, &b, &ids, &r);
    assert!(g.iter().any(|v| v.abs() > 1e-3), "zero gradient");
    let last = b.as_tensor().elem_count() - 1;
    check_finite_differences(&model, &b, (&ids, &r), &g, &[0, 3, last], case);

    let (model64, a64, b64) = with_fresh_lora(case, query, DType::F64);
    let (model32, a32, b32) = with_fresh_lora(case, query, DType::F32);
    a32.set(&a64.as_tensor().to_dtype(DType::F32).unwrap())
        .unwrap();
    let (g64, g32) = (
        grad_of(&model64, &b64, &ids, &r),
        grad_of(&model32, &b32, &ids, &r),
    );
    let scale = g64.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let diff = g64
        .iter()
        .zip(&g32)
        .fold(0.0f64, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        diff <= 1e-4 * scale,
        "{case}: f32 gradient differs from f64 by {diff} (scale {scale})"
    );
}

// ---- KV cache and greedy generation ----
//
// The reference is the full-sequence `forward` (checked against transformers above) re-run
// on the growing sequence: cached logits must match it at every step (≤ 1e-5 relative) and
// greedy tokens must be its argmax.

const CACHE_TOL: f64 = 1e-5;
/// Mistral (sliding window 4 on every layer, GQA), Qwen2 (q/k/v bias, tied head), Qwen3
/// (q/k norm, a sliding layer), Gemma 2 (soft-capped scores and logits), Gemma 3 (a
/// sliding layer with its own RoPE θ), OLMo 2 and 3, the mixtures of experts (Mixtral,
/// Qwen3-MoE, OLMoE with its clamp; gpt-oss with its sinks).
const CACHE_CASES: [&str; 11] = [
    "mistral",
    "qwen2",
    "qwen3",
    "gemma2",
    "gemma3",
    "olmo2",
    "olmo3",
    "mixtral",
    "qwen3_moe",
    "olmoe",
    "gpt_oss",
];

/// `(case, adapter?)` → the model: the base, then the PEFT LoRA.
fn cache_models() -> Vec<(String, LlamaForCausalLM)> {
    let mut out = Vec::new();
    for case in CACHE_CASES {
        let dir = models(case);
        let config = dir.join("base/config.json");
        out.push((
            format!("{case} base"),
            build(&config, &dir.join("base"), DType::F32, &no_adapter()),
        ));
        let plan = peft_plan(&dir.join("lora"));
        let model = build(&config, &dir.join("base"), DType::F32, &plan);
        plan.finish().unwrap();
        out.push((format!("{case} lora"), model));
    }
    out
}

fn argmax_last(logits: &Tensor) -> u32 {
    let last = logits.dim(1).unwrap() - 1;
    logits
        .i((0, last))
        .unwrap()
        .argmax(0)
        .unwrap()
        .to_scalar::<u32>()
        .unwrap()
}

#[test]
fn cached_prefill_and_decode_give_full_forward_logits() {
    let ids = Tensor::new(
        &[
            [3u32, 14, 15, 9, 26, 53, 5, 8, 9, 7, 9, 32],
            [2, 7, 1, 8, 28, 18, 28, 45, 9, 0, 4, 52],
        ],
        &Device::Cpu,
    )
    .unwrap();
    let len = ids.dim(1).unwrap();
    // Prefill 3, single steps, a chunk of 3 (crossing the window of 4), single steps.
    let chunks = [3usize, 1, 1, 3, 1, 1, 1, 1];
    assert_eq!(chunks.iter().sum::<usize>(), len);
    let mut worst: f64 = 0.0;
    let caches = |m: &LlamaForCausalLM| {
        let cache = KvCache::new(m.config());
        [
            ("", cache.clone()),
            (" for inference", cache.for_inference()),
        ]
    };
    for (what, model) in cache_models() {
        for (mode, mut cache) in caches(&model) {
            let what = format!("{what}{mode}");
            let mut start = 0;
            for (step, &n) in chunks.iter().enumerate() {
                let new = ids.narrow(1, start, n).unwrap();
                let got = model.forward_cached(&new, &mut cache).unwrap();
                assert_eq!(got.dims(), [2, n, 64]);
                assert_eq!(cache.len(), start + n);
                let full = logits(&model, &ids.narrow(1, 0, start + n).unwrap());
                let want = full.narrow(1, start, n).unwrap();
                let e = rel_err(&got, &want);
                assert!(
                    e <= CACHE_TOL,
                    "{what} step {step} (positions {start}..{}): relative error {e:.3e}",
                    start + n
                );
                worst = worst.max(e);
                start += n;
            }
        }
    }
    println!("cached vs full forward: worst relative error {worst:.2e}");
}

/// A cache's buffers grow in place; a clone must not see the other's later positions.
#[test]
fn cloned_caches_continue_independently() {
    let dev = Device::Cpu;
    let prefix = Tensor::new(&[[5u32, 9, 2, 7, 11]], &dev).unwrap();
    let tails = [[3u32, 14, 15], [60, 1, 33]];
    for (what, model) in cache_models() {
        for inference in [false, true] {
            let mut first = KvCache::new(model.config());
            if inference {
                first = first.for_inference();
            }
            model.forward_cached(&prefix, &mut first).unwrap();
            // One more position: the buffers grow and keep room, which the clone shares.
            let shared = Tensor::new(&[[21u32]], &dev).unwrap();
            model.forward_cached(&shared, &mut first).unwrap();
            let prefix = Tensor::cat(&[&prefix, &shared], 1).unwrap();
            let mut second = first.clone();
            // Alternate the two so that each writes after the other's last step.
            let mut got = [Vec::new(), Vec::new()];
            for i in 0..3 {
                for (c, (cache, tail)) in [&mut first, &mut second]
                    .into_iter()
                    .zip(&tails)
                    .enumerate()
                {
                    let step = Tensor::new(&[[tail[i]]], &dev).unwrap();
                    got[c].push(model.forward_cached(&step, cache).unwrap());
                }
            }
            for (c, tail) in tails.iter().enumerate() {
                let seq =
                    Tensor::cat(&[&prefix, &Tensor::new(&[*tail], &dev).unwrap()], 1).unwrap();
                let full = logits(&model, &seq);
                for (i, step) in got[c].iter().enumerate() {
                    let e = rel_err(step, &full.narrow(1, 6 + i, 1).unwrap());
                    assert!(
                        e <= CACHE_TOL,
                        "{what} (inference {inference}) clone {c} step {i}: relative error {e:.3e}"
                    );
                }
            }
        }
    }
}

/// A gradient through a cached step reaches the key and value projections' adapters by
/// default, and not with a cache set for inference (which reads them as stored values).
#[test]
fn cached_steps_pass_gradients_unless_set_for_inference() {
    let dev = Device::Cpu;
    let dir = models("qwen2");
    let config = dir.join("base/config.json");
    let varmap = VarMap::new();
    let plan = AdapterPlan::lora(
        TargetSpec::new(ModuleSelector::list(["k_proj", "v_proj"])),
        RankAlpha::new(2, 4.0),
        LoraConfig::default(),
        VarBuilder::from_varmap(&varmap, DType::F32, &dev),
    );
    let model = build(&config, &dir.join("base"), DType::F32, &plan);
    plan.finish().unwrap();
    let vars = varmap.all_vars();
    assert!(!vars.is_empty());
    for inference in [false, true] {
        let mut cache = KvCache::new(model.config());
        if inference {
            cache = cache.for_inference();
        }
        model
            .forward_cached(&Tensor::new(&[[1u32, 2, 3]], &dev).unwrap(), &mut cache)
            .unwrap();
        let step = model
            .forward_cached(&Tensor::new(&[[4u32]], &dev).unwrap(), &mut cache)
            .unwrap();
        let grads = step.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let reached = vars
            .iter()
            .filter(|v| grads.get(v.as_tensor()).is_some())
            .count();
        if inference {
            assert_eq!(
                reached, 0,
                "inference: {reached} adapter tensors got a gradient"
            );
        } else {
            assert_eq!(
                reached,
                vars.len(),
                "default: {reached} of {} got a gradient",
                vars.len()
            );
        }
    }
}

#[test]
fn greedy_generation_equals_argmax_by_recompute() {
    let prompt = [5u32, 9, 2, 7];
    let steps = 10; // 14 positions: well past the sliding window of 4
    for (what, model) in cache_models() {
        // Reference: re-run the full forward on the growing sequence.
        let mut seq = prompt.to_vec();
        let mut want = Vec::new();
        for _ in 0..steps {
            let full = logits(
                &model,
                &Tensor::new(&seq[..], &Device::Cpu)
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap(),
            );
            let next = argmax_last(&full);
            want.push(next);
            seq.push(next);
        }
        let got = model.generate_greedy(&prompt, steps, None).unwrap();
        assert_eq!(got, want, "{what}");

        // The same trajectory step by step with a cache: logits match at every step.
        let mut cache = KvCache::new(model.config());
        let mut input = Tensor::new(&prompt[..], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        for (i, &token) in want.iter().enumerate() {
            let cached = model.forward_cached(&input, &mut cache).unwrap();
            let upto = prompt.len() + i;
            let full = logits(
                &model,
                &Tensor::new(&seq[..upto], &Device::Cpu)
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap(),
            );
            let n = cached.dim(1).unwrap();
            let e = rel_err(&cached, &full.narrow(1, upto - n, n).unwrap());
            assert!(e <= CACHE_TOL, "{what} step {i}: relative error {e:.3e}");
            assert_eq!(argmax_last(&cached), token, "{what} step {i}");
            input = Tensor::new(&[[token]], &Device::Cpu).unwrap();
        }

        // eos: stops right after generating it (included).
        let eos = want[3];
        let first = want.iter().position(|&t| t == eos).unwrap();
        let stopped = model.generate_greedy(&prompt, steps, Some(eos)).unwrap();
        assert_eq!(stopped, want[..=first], "{what}");
        assert!(model.generate_greedy(&prompt, 0, None).unwrap().is_empty());
    }
}

#[test]
fn a_reset_cache_starts_a_new_sequence() {
    let dev = Device::Cpu;
    for (what, model) in cache_models() {
        let mut cache = KvCache::new(model.config());
        assert_eq!(cache.num_layers(), model.config().num_hidden_layers);
        let a = Tensor::new(&[[1u32, 2, 3, 4, 5, 6]], &dev).unwrap();
        model.forward_cached(&a, &mut cache).unwrap();
        assert_eq!((cache.len(), cache.batch()), (6, Some(1)));
        cache.reset();
        assert!(cache.is_empty());
        assert_eq!(cache.batch(), None);
        // After a reset: a new sequence (and batch size) from position 0.
        let b = Tensor::new(&[[9u32, 8, 7], [6, 5, 4]], &dev).unwrap();
        let got = model.forward_cached(&b, &mut cache).unwrap();
        let e = rel_err(&got, &logits(&model, &b));
        assert!(e <= CACHE_TOL, "{what}: {e:.3e}");
        let step = Tensor::new(&[[1u32], [2]], &dev).unwrap();
        let got = model.forward_cached(&step, &mut cache).unwrap();
        let full = logits(&model, &Tensor::cat(&[&b, &step], 1).unwrap());
        let e = rel_err(&got, &full.narrow(1, 3, 1).unwrap());
        assert!(e <= CACHE_TOL, "{what}: {e:.3e}");
        assert_eq!(cache.len(), 4);
    }
}

#[test]
fn cache_misuse_is_an_error_naming_it_and_leaves_the_cache_as_it_was() {
    let dir = models("mistral");
    let model = build(
        &dir.join("base/config.json"),
        &dir.join("base"),
        DType::F32,
        &no_adapter(),
    );
    let dev = Device::Cpu;
    let mut cache = KvCache::new(model.config());
    model
        .forward_cached(
            &Tensor::new(&[[1u32, 2], [3, 4]], &dev).unwrap(),
            &mut cache,
        )
        .unwrap();

    let err = model
        .forward_cached(&Tensor::new(&[[1u32]], &dev).unwrap(), &mut cache)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("batch size 1") && err.contains("holds 2"),
        "{err}"
    );
    assert_eq!((cache.len(), cache.batch()), (2, Some(2)));

    let bad = model
        .forward_cached(&Tensor::new(&[[64u32], [1]], &dev).unwrap(), &mut cache)
        .unwrap_err()
        .to_string();
    assert!(bad.contains("input_ids"), "{bad}");
    assert_eq!(cache.len(), 2);

    // max_position_embeddings is 64.
    let max = model.config().max_position_embeddings;
    assert_eq!(max, 64);
    let long = Tensor::zeros((2, max - 1), DType::U32, &dev).unwrap();
    let err = model
        .forward_cached(&long, &mut cache)
        .unwrap_err()
        .to_string();
    assert!(err.contains("max_position_embeddings 64"), "{err}");
    assert_eq!(cache.len(), 2);
    let fits = Tensor::zeros((2, max - 2), DType::U32, &dev).unwrap();
    model.forward_cached(&fits, &mut cache).unwrap();
    assert_eq!(cache.len(), max);

    let err = model
        .generate_greedy(&vec![1u32; max], 2, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("max_position_embeddings"), "{err}");
    assert!(model
        .generate_greedy(&[], 2, None)
        .unwrap_err()
        .to_string()
        .contains("prompt is empty"));

    // A cache for another layer count.
    let mut other = model.config().clone();
    other.num_hidden_layers = 3;
    let err = model
        .forward_cached(
            &Tensor::new(&[[1u32]], &dev).unwrap(),
            &mut KvCache::new(&other),
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("3 layers"), "{err}");
}
