//! gpt-oss beyond the shared model fixtures (`models_llama`, `models_moe`,
//! `models_moe_training` run the `gpt_oss` case with the others): a checkpoint stored as
//! the released ones are (MXFP4 experts, bf16 elsewhere) against transformers, the config's
//! defaults and refusals, and training LoRAs on its experts through the recipe.

use candle_core::DType;
use lorakit::finetune::AdapterRecipe;
use lorakit::models::llama::{LayerAttention, LlamaConfig, LlamaFamily};
use lorakit::Variant;

use crate::models_llama::{build, check, logits, models, no_adapter};
use crate::peft_common::{load, rel_err, temp_dir};

#[test]
fn an_mxfp4_checkpoint_gives_transformers_logits() {
    let dir = models("gpt_oss_mxfp4");
    let io = load(&dir.join("logits.safetensors"));
    let config = dir.join("base/config.json");
    let c = LlamaConfig::from_file(&config).unwrap();
    assert_eq!(c.family, LlamaFamily::GptOss);
    // transformers dequantizes the experts on a CPU (here into f32, exactly).
    let model = build(&config, &dir.join("base"), DType::F32, &no_adapter());
    let got = logits(&model, &io["input_ids"]);
    check(&got, &io["logits"], 1e-4, "gpt_oss mxfp4");
    // In bf16 (the released checkpoints' dtype) the same, to bf16's precision.
    let model = build(&config, &dir.join("base"), DType::BF16, &no_adapter());
    let got = logits(&model, &io["input_ids"])
        .to_dtype(DType::F32)
        .unwrap();
    let err = rel_err(&got, &io["logits"]);
    assert!(err < 5e-2, "bf16: {err}");
}

#[test]
fn a_gpt_oss_config_takes_transformers_defaults_and_refuses_bad_values() {
    let minimal = r#"{"model_type": "gpt_oss", "vocab_size": 64, "hidden_size": 32,
        "intermediate_size": 32, "num_hidden_layers": 3, "num_attention_heads": 16}"#;
    let c = LlamaConfig::from_json(minimal).unwrap();
    // GptOssConfig's defaults.
    assert_eq!(
        (c.num_key_value_heads, c.head_dim, c.rope_theta),
        (8, 64, 150_000.0)
    );
    assert!(c.qkv_bias && c.o_bias && c.attention_sinks && !c.tie_word_embeddings);
    assert_eq!(
        c.layer_attention,
        [
            LayerAttention::Sliding { window: 128 },
            LayerAttention::Full,
            LayerAttention::Sliding { window: 128 },
        ]
    );
    let moe = c.moe.as_ref().unwrap();
    assert_eq!((moe.num_experts, moe.experts_per_token), (128, 4));
    let swiglu = moe.clamped_swiglu.unwrap();
    assert_eq!((swiglu.limit, swiglu.alpha), (7.0, 1.702));
    assert!(
        format!("{:?}", c.rope_scaling).contains("Yarn"),
        "{:?}",
        c.rope_scaling
    );

    let with = |extra: &str| {
        let text = minimal.replace('}', &format!(", {extra}}}"));
        LlamaConfig::from_json(&text).map_err(|e| e.to_string())
    };
    let err = with(r#""swiglu_limit": -1.0"#).unwrap_err();
    assert!(err.contains("swiglu_limit"), "{err}");
    // MXFP4 is read; another quantization is not.
    with(r#""quantization_config": {"quant_method": "mxfp4"}"#).unwrap();
    let err = with(r#""quantization_config": {"quant_method": "bitsandbytes"}"#).unwrap_err();
    assert!(err.contains("bitsandbytes"), "{err}");
}

/// openai/gpt-oss-20b's `config.json` as published (transformers 4.55 wrote it: `rope_scaling`,
/// a top-level `rope_theta`, the MXFP4 `quantization_config`, keys of the original release
/// such as `experts_per_token`) reads as transformers 5.25 reads it.
#[test]
fn the_released_gpt_oss_20b_config_reads_as_transformers_reads_it() {
    let layer_types = ["\"sliding_attention\"", "\"full_attention\""].repeat(12);
    let text = format!(
        r#"{{"architectures": ["GptOssForCausalLM"], "attention_bias": true,
        "attention_dropout": 0.0, "eos_token_id": 200002, "experts_per_token": 4,
        "head_dim": 64, "hidden_act": "silu", "hidden_size": 2880,
        "initial_context_length": 4096, "initializer_range": 0.02, "intermediate_size": 2880,
        "layer_types": [{}], "max_position_embeddings": 131072, "model_type": "gpt_oss",
        "num_attention_heads": 64, "num_experts_per_tok": 4, "num_hidden_layers": 24,
        "num_key_value_heads": 8, "num_local_experts": 32, "output_router_logits": false,
        "pad_token_id": 199999, "quantization_config": {{"modules_to_not_convert":
        ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens",
        "lm_head"], "quant_method": "mxfp4"}}, "rms_norm_eps": 1e-05, "rope_scaling":
        {{"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
        "original_max_position_embeddings": 4096, "rope_type": "yarn", "truncate": false}},
        "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128,
        "swiglu_limit": 7.0, "tie_word_embeddings": false,
        "transformers_version": "4.55.0.dev0", "use_cache": true, "vocab_size": 201088}}"#,
        layer_types.join(", ")
    );
    let c = LlamaConfig::from_json(&text).unwrap();
    assert_eq!(c.family, LlamaFamily::GptOss);
    assert_eq!(
        (c.num_attention_heads, c.num_key_value_heads, c.head_dim),
        (64, 8, 64)
    );
    assert_eq!(c.rope_theta, 150_000.0);
    let rope = format!("{:?}", c.rope_scaling);
    assert!(rope.contains("Yarn") && rope.contains("32.0"), "{rope}");
    assert_eq!(
        c.layer_attention[0],
        LayerAttention::Sliding { window: 128 }
    );
    assert_eq!(c.layer_attention[1], LayerAttention::Full);
    let moe = c.moe.as_ref().unwrap();
    assert_eq!((moe.num_experts, moe.experts_per_token), (32, 4));
    assert_eq!(moe.expert_intermediate_size, 2880);
    // output_router_logits false: no load-balancing term, so losses are allowed.
    assert_eq!(moe.router_aux_loss_coef, None);
    assert!(c.attention_sinks && c.qkv_bias && c.o_bias);
}

#[test]
fn a_recipe_trains_loras_on_the_experts_and_router_and_saves_them_for_peft() {
    let dir = models("gpt_oss").join("base");
    let config = LlamaConfig::from_file(&dir).unwrap();
    let mut recipe = AdapterRecipe::new(Variant::LoraPlus, 2, 4.0, &[]);
    recipe.target_parameters = ["experts.gate_up_proj", "experts.down_proj", "router.weight"]
        .map(String::from)
        .to_vec();
    let (model, set) = crate::finetune_train::with_recipe(&dir, &config, &recipe);
    assert!(set.is_empty(), "no module is adapted");
    assert_eq!(
        set.stacked_loras().len(),
        6,
        "two layers' experts (2) and router"
    );
    let trainer = crate::models_moe_training::train_lowering_the_loss(&model, &set, recipe, 6);
    let out = temp_dir("gpt-oss-recipe");
    trainer.save_adapter(&*out).unwrap();
    let saved = trainer.peft_config().unwrap();
    let mut names: Vec<String> =
        serde_json::from_value(saved.raw["target_parameters"].clone()).unwrap();
    names.sort();
    assert_eq!(
        names,
        ["experts.down_proj", "experts.gate_up_proj", "router.weight"]
    );
    let keys = load(&out.join("adapter_model.safetensors")).len();
    assert_eq!(keys, 12, "A and B of six LoRAs on parameters");

    // Other variants do not adapt parameters (PEFT's LoRA does, alone).
    let mut dora = AdapterRecipe::new(Variant::Dora, 2, 4.0, &["q_proj"]);
    dora.target_parameters = vec!["experts.down_proj".to_string()];
    let err = dora.peft_config(1).unwrap_err().to_string();
    assert!(err.contains("target_parameters"), "{err}");
}

#[test]
fn loras_on_parameters_are_not_dropped_where_they_cannot_apply() {
    let dir = models("gpt_oss");
    // A VarBuilder serves weights by name: it cannot run a LoRA on the stacks.
    let err = lorakit::peft::adapted_var_builder(
        dir.join("base"),
        dir.join("experts"),
        DType::F32,
        &candle_core::Device::Cpu,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("target_parameters"), "{err}");
    // Whole stacks without gpt-oss's biases are not read as gpt-oss's `(E, in, out)`.
    let tensors = load(&dir.join("base/model.safetensors"));
    let kept: std::collections::HashMap<String, candle_core::Tensor> = tensors
        .into_iter()
        .filter(|(name, _)| !name.ends_with("_proj_bias"))
        .collect();
    let out = temp_dir("gpt-oss-no-bias");
    candle_core::safetensors::save(&kept, out.join("model.safetensors")).unwrap();
    std::fs::copy(dir.join("base/config.json"), out.join("config.json")).unwrap();
    let merged = out.join("merged");
    let err = lorakit::peft::merge_checkpoint(
        &out,
        &dir.join("experts"),
        &merged,
        lorakit::peft::MergeOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("gate_up_proj_bias"), "{err}");
    assert!(!merged.exists());
}
