//! Mixture-of-experts decoders (Mixtral, Qwen3-MoE) with PEFT 0.21's adapters on their
//! experts' and router's parameters (`target_parameters`, which PEFT's `all-linear` adds on
//! these models), against PEFT's logits (`tests/fixtures/models/llama/{mixtral,qwen3_moe}`,
//! `scripts/make_model_fixtures.py`); merging them into checkpoints; a MoE sequence
//! classifier; the config's refusals.

use std::fs;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use lorakit::models::llama::{LlamaConfig, LlamaForCausalLM};
use lorakit::peft::PeftAdapter;

use lorakit::finetune::{AdapterRecipe, TrainConfig, Trainer};
use lorakit::peft::{merge_checkpoint, save_adapter, MergeOptions};
use lorakit::Variant;
use serde_json::json;

use crate::checkpoint_merge::{assert_matches, merged_tensors, HalfMatch};
use crate::models_gemma3_multimodal::check_classifier_fixture;
use crate::models_llama::{build, check, logits, models, peft_plan};
use crate::peft_common::{load, rel_err, temp_dir, TempDir};

const TOL: f64 = 1e-4;

#[test]
fn adapters_on_experts_and_router_give_peft_logits_unmerged_and_merged() {
    for case in ["mixtral", "qwen3_moe", "olmoe", "gpt_oss"] {
        let dir = models(case);
        let io = load(&dir.join("logits.safetensors"));
        let ids = &io["input_ids"];
        let config = dir.join("base/config.json");
        let plan = peft_plan(&dir.join("experts"));
        let model = build(&config, &dir.join("base"), DType::F32, &plan);
        // Every tensor of the file was used; the attention's modules are adapted layers,
        // the experts' and router's LoRAs stacked ones.
        let layers = plan.finish().unwrap();
        let attention = load(&dir.join("experts/adapter_model.safetensors"))
            .keys()
            .filter(|k| k.contains(".self_attn.") && k.ends_with("lora_A.weight"))
            .count();
        assert_eq!(
            layers.paths().len(),
            attention,
            "{case}: the attention's modules"
        );
        assert!(attention >= 4, "{case}");
        let want = &io["experts_logits"];
        check(&logits(&model, ids), want, TOL, &format!("{case} experts"));
        assert!(rel_err(want, &io["logits"]) > 1e-2 && rel_err(want, &io["lora_logits"]) > 1e-2);

        // With target_parameters emptied the parameters' tensors are left unused: the
        // model takes them only as what the config names.
        let key = ("target_parameters", serde_json::json!([]));
        let tmp = edited_adapter(&dir.join("experts"), key, &format!("moe-none-{case}"));
        let plan = PeftAdapter::load(&*tmp, &Device::Cpu)
            .unwrap()
            .plan()
            .unwrap();
        build(&config, &dir.join("base"), DType::F32, &plan);
        let err = plan.finish().unwrap_err().to_string();
        assert!(
            err.contains("mlp.experts") || err.contains("mlp.gate"),
            "{err}"
        );

        // The LoRAs on parameters are trainable layers like the modules': merging keeps
        // the logits, disabling gives the base model's, and saving gives PEFT's file again.
        let adapter = PeftAdapter::load(dir.join("experts"), &Device::Cpu).unwrap();
        let plan = adapter.plan().unwrap();
        let model = build(&config, &dir.join("base"), DType::F32, &plan);
        let layers = plan.finish().unwrap();
        assert_eq!(layers.stacked_loras().len(), stacked_count(&dir), "{case}");
        layers.set_enabled(false);
        check(
            &logits(&model, ids),
            &io["logits"],
            TOL,
            &format!("{case} disabled"),
        );
        layers.set_enabled(true);
        layers.merge_all(true).unwrap();
        check(
            &logits(&model, ids),
            want,
            TOL,
            &format!("{case} experts merged"),
        );
        let out = temp_dir(&format!("moe-resave-{case}"));
        save_adapter(&*out, adapter.config(), &layers).unwrap();
        let (saved, file) = (
            load(&out.join("adapter_model.safetensors")),
            load(&dir.join("experts/adapter_model.safetensors")),
        );
        assert_eq!(saved.len(), file.len(), "{case}");
        for (key, t) in &file {
            assert_eq!(rel_err(&saved[key], t), 0.0, "{case}: {key}");
        }
    }
}

/// The number of LoRAs on parameters in the case's `experts` adapter (two per sparse
/// layer's experts, one per router): its `lora_A` keys off the attention.
fn stacked_count(dir: &Path) -> usize {
    load(&dir.join("experts/adapter_model.safetensors"))
        .keys()
        .filter(|k| k.contains(".mlp.") && k.ends_with("lora_A.weight"))
        .count()
}

#[test]
fn merging_parameter_adapters_writes_peft_merged_tensors() {
    for case in ["mixtral", "qwen3_moe", "olmoe", "gpt_oss"] {
        let dir = models(case);
        let out = temp_dir(&format!("moe-merge-{case}"));
        let merged = out.join("merged");
        let report = merge_checkpoint(
            &dir.join("base"),
            &dir.join("experts"),
            &merged,
            MergeOptions::default(),
        )
        .unwrap();
        // Every expert's three projections and the router, of both layers (Mixtral) or of
        // the sparse layer (Qwen3-MoE), besides q/k/v/o of both layers; gpt-oss's two
        // stacks and router per layer, besides q/v.
        let expected = match case {
            "qwen3_moe" => 8 + (4 * 3 + 1),
            "gpt_oss" => 4 + 2 * 3,
            _ => 8 + 2 * (4 * 3 + 1),
        };
        assert_eq!(report.merged.len(), expected, "{case}: {:?}", report.merged);
        let want = load(&dir.join("experts_merged.safetensors"));
        assert_matches(&merged_tensors(&merged), &want, case, HalfMatch::Exact);

        // The merged folder is the adapted model.
        let io = load(&dir.join("logits.safetensors"));
        let model = build(
            &merged.join("config.json"),
            &merged,
            DType::F32,
            &crate::models_llama::no_adapter(),
        );
        let ids = &io["input_ids"];
        check(
            &logits(&model, ids),
            &io["experts_logits"],
            TOL,
            &format!("{case} merged file"),
        );
    }
    // Another model's experts: refused before anything is written.
    let out = temp_dir("moe-merge-wrong");
    let merged = out.join("merged");
    let err = merge_checkpoint(
        &models("mixtral").join("base"),
        &models("qwen3_moe").join("experts"),
        &merged,
        MergeOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("mlp.experts") || err.contains("q_proj"),
        "{err}"
    );
    assert!(!merged.exists());
    // gpt-oss's MXFP4 experts are not merged into: refused, naming the format.
    let err = merge_checkpoint(
        &models("gpt_oss_mxfp4").join("base"),
        &models("gpt_oss").join("experts"),
        &merged,
        MergeOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("MXFP4"), "{err}");
    assert!(!merged.exists());
}

#[test]
fn inspect_lists_each_parameter_lora_under_its_key() {
    let summary = lorakit::peft::inspect::inspect(&models("qwen3_moe").join("experts")).unwrap();
    let rank_of = |path: &str| {
        summary
            .modules
            .iter()
            .find(|m| m.path == path)
            .map(|m| (m.rank, m.scale))
    };
    // rsLoRA: alpha / sqrt(r); PEFT's rank pattern gives gate_up_proj 2r and 2 alpha.
    let gate_up = rank_of("model.layers.0.mlp.experts.gate_up_proj (4 experts)");
    assert_eq!(gate_up, Some((8, 16.0 / 8f64.sqrt())), "{summary}");
    assert_eq!(
        rank_of("model.layers.0.mlp.experts.down_proj (4 experts)"),
        Some((4, 4.0))
    );
    assert_eq!(rank_of("model.layers.0.mlp.gate.weight"), Some((4, 4.0)));
    assert!(
        summary.targets.contains("target_parameters"),
        "{}",
        summary.targets
    );
}

#[test]
fn an_all_linear_dora_on_experts_models_is_saved_with_its_modules_named() {
    // PEFT 0.21 reads all-linear on Mixtral, Qwen3-MoE and OLMoE as LoRA on the experts and
    // the router too, which only lorakit's LoRA trains (models_moe_training): a DoRA's
    // saved config names the modules it adapted, with no target_parameters. On Qwen2-MoE
    // (not in PEFT's conversion table) all-linear stays.
    for (case, want) in [
        ("mixtral", json!(["k_proj", "o_proj", "q_proj", "v_proj"])),
        ("olmoe", json!(["k_proj", "o_proj", "q_proj", "v_proj"])),
        ("qwen2_moe", json!("all-linear")),
    ] {
        let dir = models(case).join("base");
        let config = LlamaConfig::from_file(&dir).unwrap();
        let recipe = AdapterRecipe::new(Variant::Dora, 2, 4.0, &["all-linear"]);
        let (model, set) = crate::finetune_train::with_recipe(&dir, &config, &recipe);
        let trainer = Trainer::new(&model, set, recipe, TrainConfig::new(1)).unwrap();
        let saved = trainer.peft_config().unwrap();
        assert_eq!(saved.raw["target_modules"], want, "{case}");
        assert!(saved.target_parameters.is_empty(), "{case}");
        let out = temp_dir(&format!("moe-all-linear-{case}"));
        trainer.save_adapter(&*out).unwrap();
        let plan = peft_plan(&out);
        build(&dir.join("config.json"), &dir, DType::F32, &plan);
        plan.finish().unwrap();
    }
}

#[test]
fn parameter_adapters_refuse_what_peft_refuses() {
    let dir = models("mixtral").join("experts");
    for (key, value) in [
        ("use_dora", serde_json::json!(true)),
        ("lora_dropout", serde_json::json!(0.1)),
        ("target_parameters", serde_json::json!("gate_up_proj")),
    ] {
        let tmp = edited_adapter(&dir, (key, value), &format!("moe-refused-{key}"));
        let err = PeftAdapter::load(&*tmp, &Device::Cpu)
            .and_then(|a| a.plan())
            .err()
            .unwrap_or_else(|| panic!("{key}: loaded"))
            .to_string();
        assert!(err.contains("target_parameters"), "{key}: {err}");
    }
}

#[test]
fn a_router_loss_config_keeps_its_logits_and_refuses_losses() {
    // transformers adds the router's load-balancing loss when output_router_logits is true;
    // lorakit does not compute it, so its losses refuse such a config.
    let dir = models("qwen3_moe");
    let key = ("output_router_logits", serde_json::json!(true));
    let (_tmp, config, model) = with_config_key("qwen3_moe", key, "moe-router-loss");
    let c = LlamaConfig::from_file(&config).unwrap();
    assert_eq!(c.moe.as_ref().unwrap().router_aux_loss_coef, Some(0.001));
    let io = load(&dir.join("logits.safetensors"));
    let ids = &io["input_ids"];
    let mask = Tensor::ones(ids.dims(), DType::F32, &Device::Cpu).unwrap();
    let err = model.loss_sum(ids, &mask).unwrap_err().to_string();
    assert!(err.contains("output_router_logits"), "{err}");
}

/// A copy of the adapter folder `dir` in a fresh temp folder `name` whose config has
/// `key` set to `value`.
fn edited_adapter(dir: &Path, (key, value): (&str, serde_json::Value), name: &str) -> TempDir {
    let raw = fs::read_to_string(dir.join("adapter_config.json")).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&raw).unwrap();
    json[key] = value;
    let tmp = temp_dir(name);
    fs::write(tmp.join("adapter_config.json"), json.to_string()).unwrap();
    let weights = "adapter_model.safetensors";
    fs::copy(dir.join(weights), tmp.join(weights)).unwrap();
    tmp
}

#[test]
fn moe_sequence_classifiers_give_transformers_and_peft_logits() {
    // Qwen3-MoE's, Mixtral's and Qwen2-MoE's (a shared expert) ForSequenceClassification on
    // a batch with a left-padded row (its padding goes through the router and experts too),
    // and their PEFT SEQ_CLS LoRA (q_proj / v_proj, `score` in modules_to_save).
    for case in ["qwen3_moe", "mixtral", "qwen2_moe", "gpt_oss"] {
        check_classifier_fixture(&models(case), &format!("{case} classifier"));
    }
}

#[test]
fn mixtral_router_jitter_applies_in_training_mode_only() {
    // router_jitter_noise multiplies each sparse layer's input by U(1 - j, 1 + j) in
    // training mode (transformers' MixtralSparseMoeBlock); evaluation ignores it.
    let dir = models("mixtral");
    let key = ("router_jitter_noise", serde_json::json!(0.3));
    let (_tmp, config, model) = with_config_key("mixtral", key, "moe-jitter");
    let io = load(&dir.join("logits.safetensors"));
    let ids = &io["input_ids"];
    let train = |m: &LlamaForCausalLM| m.forward_t(ids, true).unwrap();
    let (a, b) = (train(&model), train(&model));
    assert!(
        rel_err(&a, &io["logits"]) > 1e-3,
        "training mode ignored the jitter"
    );
    assert!(rel_err(&a, &b) > 1e-3, "two draws gave the same noise");
    // Without jitter, training mode is evaluation (the fixture has no dropout).
    let plain = build(
        &dir.join("base/config.json"),
        &dir.join("base"),
        DType::F32,
        &crate::models_llama::no_adapter(),
    );
    check(
        &train(&plain),
        &io["logits"],
        TOL,
        "mixtral, no jitter, training mode",
    );
    // Out of range: an error naming the key.
    let raw = fs::read_to_string(&config).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&raw).unwrap();
    json["router_jitter_noise"] = serde_json::json!(1.5);
    let err = LlamaConfig::from_json(&json.to_string())
        .unwrap_err()
        .to_string();
    assert!(err.contains("router_jitter_noise"), "{err}");
}

/// The fixture `case`'s base with its config's `key` set to `value` (a key that changes
/// training only): the temp folder `name` holding the edited config.json, its path, and
/// the model built from it, checked to give the fixture's evaluation logits.
fn with_config_key(
    case: &str,
    (key, value): (&str, serde_json::Value),
    name: &str,
) -> (TempDir, std::path::PathBuf, LlamaForCausalLM) {
    let dir = models(case);
    let raw = fs::read_to_string(dir.join("base/config.json")).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&raw).unwrap();
    json[key] = value;
    let tmp = temp_dir(name);
    let config = tmp.join("config.json");
    fs::write(&config, json.to_string()).unwrap();
    let none = crate::models_llama::no_adapter();
    let model = build(&config, &dir.join("base"), DType::F32, &none);
    let io = load(&dir.join("logits.safetensors"));
    let what = format!("{case} with {key}, evaluation");
    check(&logits(&model, &io["input_ids"]), &io["logits"], TOL, &what);
    (tmp, config, model)
}
