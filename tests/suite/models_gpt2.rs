//! GPT-2 (`lorakit::models::gpt2`) against transformers and PEFT 0.21:
//!
//! - the PEFT fixtures `peft_options/gpt2_lora` (LoRA on Conv1D c_attn / c_proj / c_fc and
//!   the tied `wte`) and `gpt2_dora` (DoRA on c_attn / c_fc): PEFT's unmerged logits, and
//!   for gpt2_lora PEFT's merged logits after merging (the tied head follows the merged
//!   `wte`);
//! - `models/gpt2_base_logits.safetensors` (`scripts/make_gpt2_base_logits.py`): the base
//!   models' logits from transformers (adapter disabled, or a plan that targets nothing),
//!   and tiny random models with each activation and option transformers offers.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use lorakit::checkpoint::Checkpoint;
use lorakit::model::{AdaptedSet, AdapterPlan, BiasMode, ModuleSelector, RankAlpha, TargetSpec};
use lorakit::models::gpt2::{Gpt2Config, Gpt2LmHeadModel};
use lorakit::peft::PeftAdapter;
use lorakit::LoraConfig;

use crate::peft_common::{assert_close, fixture, load, max_abs, rel_err, temp_dir};
use crate::peft_options::case_dir;

const CASES: [&str; 2] = ["gpt2_lora", "gpt2_dora"];

/// transformers' base logits and the random option models.
fn base_file() -> HashMap<String, Tensor> {
    load(&fixture("models/gpt2_base_logits.safetensors"))
}

fn io(case: &str) -> HashMap<String, Tensor> {
    load(&case_dir(case).join("io.safetensors"))
}

fn config(case: &str) -> Gpt2Config {
    Gpt2Config::from_file(case_dir(case).join("base/config.json")).unwrap()
}

fn build(case: &str, plan: &AdapterPlan) -> lorakit::Result<Gpt2LmHeadModel> {
    let vb = Checkpoint::open(case_dir(case).join("base"))?.var_builder(DType::F32, &Device::Cpu);
    Gpt2LmHeadModel::load(&config(case), vb, plan)
}

/// The case's model with PEFT's adapter, and its adapted set.
fn with_peft_adapter(case: &str) -> (Gpt2LmHeadModel, AdaptedSet) {
    let plan = PeftAdapter::load(case_dir(case).join("adapter"), &Device::Cpu)
        .unwrap()
        .plan()
        .unwrap();
    let model = build(case, &plan).unwrap();
    let set = plan
        .finish()
        .unwrap_or_else(|e| panic!("{case}: every tensor of the adapter is used: {e}"));
    (model, set)
}

/// A fresh LoRA plan over `targets` (B starts at zero: the model is the base model).
fn fresh_lora(targets: &[&str], vars: &VarMap) -> AdapterPlan {
    AdapterPlan::lora(
        TargetSpec::new(ModuleSelector::list(targets.iter().copied())),
        RankAlpha::new(4, 8.0),
        LoraConfig::default(),
        VarBuilder::from_varmap(vars, DType::F32, &Device::Cpu),
    )
}

#[test]
fn peft_adapters_give_pefts_logits() {
    for (case, n_adapted) in [("gpt2_lora", 9), ("gpt2_dora", 4)] {
        let (model, set) = with_peft_adapter(case);
        assert_eq!(set.len(), n_adapted, "{case}: {:?}", set.paths());
        let io = io(case);
        let logits = model.forward(&io["input_ids"]).unwrap();
        assert_eq!(logits.dims(), [2, 5, 64], "{case}");
        assert_close(&logits, &io["logits"], 1e-4, &format!("{case}: logits"));
        // u32 ids give the same.
        let ids = io["input_ids"].to_dtype(DType::U32).unwrap();
        assert_close(&model.forward(&ids).unwrap(), &io["logits"], 1e-4, case);
    }
}

#[test]
fn a_disabled_adapter_gives_the_base_models_logits() {
    let base = base_file();
    for case in CASES {
        let (model, set) = with_peft_adapter(case);
        let io = io(case);
        let base_logits = &base[&format!("{case}.logits")];
        // The fixture adapters do change the logits.
        assert!(rel_err(&io["logits"], base_logits) > 1e-2, "{case}");
        set.set_enabled(false);
        let logits = model.forward(&io["input_ids"]).unwrap();
        assert_close(&logits, base_logits, 1e-5, &format!("{case}: disabled"));
        assert!(rel_err(&logits, &io["logits"]) > 1e-2, "{case}");
        set.set_enabled(true);
        let logits = model.forward(&io["input_ids"]).unwrap();
        assert_close(
            &logits,
            &io["logits"],
            1e-4,
            &format!("{case}: enabled again"),
        );
    }
}

#[test]
fn a_plan_that_targets_nothing_gives_the_base_models_logits() {
    let base = base_file();
    for case in CASES {
        let vars = VarMap::new();
        let plan = fresh_lora(&[], &vars);
        let model = build(case, &plan).unwrap();
        assert!(plan.finish().unwrap().is_empty(), "{case}");
        assert!(vars.all_vars().is_empty(), "{case}");
        let logits = model.forward(&io(case)["input_ids"]).unwrap();
        assert_close(
            &logits,
            &base[&format!("{case}.logits")],
            1e-5,
            &format!("{case}: base"),
        );
    }
}

#[test]
fn merging_gives_pefts_merged_logits_and_unmerging_undoes_it() {
    // gpt2_lora adapts the tied wte: merged, the head is the merged table too (PEFT's
    // merged_logits differ from its unmerged logits by 7.6 at most).
    for case in CASES {
        let (model, set) = with_peft_adapter(case);
        let io = io(case);
        set.merge_all(true).unwrap();
        let merged = model.forward(&io["input_ids"]).unwrap();
        assert_close(
            &merged,
            &io["merged_logits"],
            1e-4,
            &format!("{case}: merged"),
        );
        set.unmerge_all().unwrap();
        let unmerged = model.forward(&io["input_ids"]).unwrap();
        assert_close(&unmerged, &io["logits"], 1e-4, &format!("{case}: unmerged"));
    }
    let io = io("gpt2_lora");
    assert!(rel_err(&io["merged_logits"], &io["logits"]) > 1e-2);
}

#[test]
fn the_merged_checkpoint_gives_pefts_merged_logits() {
    for case in CASES {
        let vars = VarMap::new();
        let plan = fresh_lora(&[], &vars);
        let vb = Checkpoint::open(case_dir(case).join("merged"))
            .unwrap()
            .var_builder(DType::F32, &Device::Cpu);
        let model = Gpt2LmHeadModel::load(&config(case), vb, &plan).unwrap();
        let io = io(case);
        let logits = model.forward(&io["input_ids"]).unwrap();
        assert_close(&logits, &io["merged_logits"], 1e-5, case);
    }
}

#[test]
fn a_fresh_lora_starts_at_the_base_model_and_every_layer_gets_a_gradient() {
    let base = base_file();
    let case = "gpt2_lora";
    let vars = VarMap::new();
    // The tied lm_head too: adapted over wte's base table, as PEFT adapts it.
    let plan = fresh_lora(
        &["c_attn", "c_proj", "c_fc", "wte", "wpe", "lm_head"],
        &vars,
    );
    let model = build(case, &plan).unwrap();
    let set = plan.finish().unwrap();
    assert_eq!(set.len(), 11, "{:?}", set.paths());
    // B = 0: the base model's logits, through the differentiable norm and softmax (the
    // fused candle-nn kernels have no backward).
    let ids = &io(case)["input_ids"];
    let logits = model.forward(ids).unwrap();
    assert_close(
        &logits,
        &base[&format!("{case}.logits")],
        1e-5,
        "fresh LoRA",
    );
    // Cross-entropy of the next token.
    let (b, s, v) = logits.dims3().unwrap();
    let pred = logits
        .narrow(1, 0, s - 1)
        .unwrap()
        .reshape((b * (s - 1), v))
        .unwrap();
    let target = ids
        .narrow(1, 1, s - 1)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_dtype(DType::U32)
        .unwrap();
    let loss = candle_nn::loss::cross_entropy(&pred, &target).unwrap();
    let grads = loss.backward().unwrap();
    let vars = set.trainable_vars();
    assert_eq!(vars.len(), 22);
    for path in set.paths() {
        let nonzero = vars
            .iter()
            .filter(|v| v.layer == path)
            .filter_map(|v| grads.get(v.var.var.as_tensor()))
            .any(|g| max_abs(g) > 0.0);
        assert!(nonzero, "{path}: no gradient reached the adapter");
    }
}

#[test]
fn bias_all_trains_every_norm_bias() {
    let case = "gpt2_dora";
    let vars = VarMap::new();
    let plan = fresh_lora(&["c_attn"], &vars).with_bias_mode(BiasMode::All);
    let model = build(case, &plan).unwrap();
    let set = plan.finish().unwrap();
    let names: Vec<String> = set.trainable_vars().iter().map(|v| v.full_name()).collect();
    for norm in [
        "transformer.h.0.ln_1",
        "transformer.h.0.ln_2",
        "transformer.h.1.ln_1",
        "transformer.h.1.ln_2",
        "transformer.ln_f",
    ] {
        assert!(names.contains(&format!("{norm}.bias")), "{norm}: {names:?}");
    }
    let ids = &io(case)["input_ids"];
    let logits = model.forward(ids).unwrap();
    assert_close(&logits, &base_file()[&format!("{case}.logits")], 1e-5, case);
    let grads = logits
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap()
        .backward()
        .unwrap();
    for v in set.trainable_vars() {
        if v.full_name().ends_with("ln_1.bias") || v.full_name().ends_with("ln_f.bias") {
            let g = grads.get(v.var.var.as_tensor()).expect("a gradient");
            assert!(max_abs(g) > 0.0, "{}", v.full_name());
        }
    }
}

/// A random option model of `gpt2_base_logits.safetensors`.
#[derive(Clone)]
struct OptionCase {
    name: String,
    config: Gpt2Config,
    weights: HashMap<String, Tensor>,
    ids: Tensor,
    /// transformers' logits.
    logits: Tensor,
}

fn option_cases() -> Vec<OptionCase> {
    let path = fixture("models/gpt2_base_logits.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let configs = &meta.metadata().as_ref().unwrap()["configs"];
    let configs: HashMap<String, serde_json::Value> = serde_json::from_str(configs).unwrap();
    let tensors = base_file();
    let mut cases: Vec<_> = configs
        .into_iter()
        .map(|(case, json)| {
            let config: Gpt2Config = serde_json::from_value(json).unwrap();
            config.validate().unwrap();
            let prefix = format!("{case}.");
            let weights = tensors
                .iter()
                .filter_map(|(k, t)| Some((k.strip_prefix(&prefix)?.to_string(), t.clone())))
                .collect();
            let ids = tensors[&format!("{case}.input_ids")].clone();
            let logits = tensors[&format!("{case}.logits")].clone();
            OptionCase {
                name: case,
                config,
                weights,
                ids,
                logits,
            }
        })
        .collect();
    cases.sort_by(|a, b| a.name.cmp(&b.name));
    cases
}

#[test]
fn every_activation_and_attention_option_matches_transformers() {
    let cases = option_cases();
    assert_eq!(cases.len(), 10);
    let mut seen = Vec::new();
    for OptionCase {
        name: case,
        config,
        weights,
        ids,
        logits: expected,
    } in cases
    {
        seen.push(config.activation_function.clone());
        let vb = VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu);
        // Fused norm and softmax (nothing trainable).
        let plan = fresh_lora(&[], &VarMap::new());
        let model = Gpt2LmHeadModel::load(&config, vb.clone(), &plan).unwrap();
        let logits = model.forward(&ids).unwrap();
        assert_close(&logits, &expected, 1e-5, &case);
        // Differentiable norm and softmax (a fresh LoRA everywhere, B = 0), lm_head too
        // when untied.
        let vars = VarMap::new();
        let mut targets = vec!["c_attn", "c_proj", "c_fc", "wte"];
        if !config.tie_word_embeddings {
            targets.push("lm_head");
        }
        let plan = fresh_lora(&targets, &vars);
        let model = Gpt2LmHeadModel::load(&config, vb, &plan).unwrap();
        let set = plan.finish().unwrap();
        let expected_adapted = 1 + 4 * config.n_layer + usize::from(!config.tie_word_embeddings);
        assert_eq!(set.len(), expected_adapted, "{case}: {:?}", set.paths());
        let logits = model.forward(&ids).unwrap();
        assert_close(&logits, &expected, 1e-5, &format!("{case}: fresh LoRA"));
    }
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 9, "the nine activations: {seen:?}");
}

#[test]
fn gelu_10_clips_and_the_untied_head_is_its_own_module() {
    let cases = option_cases();
    // The clip is reached: the same weights with plain gelu give other logits.
    let find = |name: &str| cases.iter().find(|c| c.name == name).unwrap().clone();
    let OptionCase {
        config,
        weights,
        ids,
        logits: expected,
        ..
    } = find("opt_gelu_10");
    let unclipped = Gpt2Config {
        activation_function: "gelu".into(),
        ..config
    };
    let vb = VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu);
    let model = Gpt2LmHeadModel::load(&unclipped, vb, &fresh_lora(&[], &VarMap::new())).unwrap();
    assert!(rel_err(&model.forward(&ids).unwrap(), &expected) > 1e-3);
    // Untied: the head is `lm_head.weight`, not wte's table.
    let OptionCase {
        config,
        weights,
        ids,
        logits: expected,
        ..
    } = find("opt_untied_scales");
    assert!(!config.tie_word_embeddings);
    let vb = VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu);
    let tied = Gpt2Config {
        tie_word_embeddings: true,
        ..config
    };
    let model = Gpt2LmHeadModel::load(&tied, vb, &fresh_lora(&[], &VarMap::new())).unwrap();
    assert!(rel_err(&model.forward(&ids).unwrap(), &expected) > 1e-2);
}

#[test]
fn config_json_aliases_and_defaults() {
    let config: Gpt2Config = serde_json::from_str(
        r#"{"hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 3,
            "max_position_embeddings": 7, "vocab_size": 11, "model_type": "gpt2"}"#,
    )
    .unwrap();
    assert_eq!(
        (
            config.n_embd,
            config.n_head,
            config.n_layer,
            config.n_positions
        ),
        (32, 4, 3, 7)
    );
    assert_eq!(config.activation_function, "gelu_new");
    assert_eq!(config.inner_dim(), 128);
    assert!(config.tie_word_embeddings && config.scale_attn_weights);
    config.validate().unwrap();
    // Round trip through serde.
    let text = serde_json::to_string(&config).unwrap();
    assert_eq!(serde_json::from_str::<Gpt2Config>(&text).unwrap(), config);
}

/// `config` (the fixture's, changed by `change`) is refused, and the message names `what`.
fn refused(change: impl Fn(&mut Gpt2Config), what: &[&str]) {
    let mut config = config("gpt2_lora");
    change(&mut config);
    let message = config.validate().unwrap_err().to_string();
    for w in what {
        assert!(message.contains(w), "`{message}` names {w}");
    }
    // The model refuses it as well.
    let vb = Checkpoint::open(case_dir("gpt2_lora").join("base"))
        .unwrap()
        .var_builder(DType::F32, &Device::Cpu);
    let err = Gpt2LmHeadModel::load(&config, vb, &fresh_lora(&[], &VarMap::new())).unwrap_err();
    assert_eq!(err.to_string(), message);
}

#[test]
fn unsupported_or_invalid_configs_are_errors_naming_the_option() {
    refused(
        |c| c.activation_function = "relu".into(),
        &["activation_function", "relu", "gelu_new"],
    );
    refused(|c| c.activation_function = "silu".into(), &["silu"]);
    refused(|c| c.add_cross_attention = true, &["add_cross_attention"]);
    refused(|c| c.n_head = 3, &["n_head", "16"]);
    refused(|c| c.n_head = 0, &["n_head"]);
    refused(|c| c.vocab_size = 0, &["vocab_size"]);
    refused(|c| c.n_inner = Some(0), &["n_inner"]);
    refused(|c| c.layer_norm_epsilon = f64::NAN, &["layer_norm_epsilon"]);
    // From a file: the error names the file and the option.
    let dir = temp_dir("gpt2-config");
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(case_dir("gpt2_lora").join("base/config.json")).unwrap();
    std::fs::write(&path, text.replace("gelu_new", "mish")).unwrap();
    let message = Gpt2Config::from_file(&path).unwrap_err().to_string();
    assert!(message.contains("mish"), "{message}");
    std::fs::write(&path, r#"{"n_embd": 16, "n_head": 5}"#).unwrap();
    let message = Gpt2Config::from_file(&path).unwrap_err().to_string();
    assert!(
        message.contains("config.json") && message.contains("n_head"),
        "{message}"
    );
    std::fs::write(&path, r#"{"n_embd": "wide"}"#).unwrap();
    let message = Gpt2Config::from_file(&path).unwrap_err().to_string();
    assert!(
        message.contains("config.json") && message.contains("line 1"),
        "{message}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn plans_the_model_cannot_honour_are_refused_by_name() {
    // A trainable copy of a LayerNorm.
    let vars = VarMap::new();
    let plan = AdapterPlan::lora(
        TargetSpec::new(ModuleSelector::list(["c_attn"])).modules_to_save(["ln_f"]),
        RankAlpha::new(4, 8.0),
        LoraConfig::default(),
        VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu),
    );
    let err = build("gpt2_lora", &plan).unwrap_err();
    assert!(err.to_string().contains("transformer.ln_f"), "{err}");
    // A checkpoint of another size: the tensor is named.
    let small = Gpt2Config {
        n_embd: 8,
        n_head: 2,
        ..config("gpt2_lora")
    };
    let vb = Checkpoint::open(case_dir("gpt2_lora").join("base"))
        .unwrap()
        .var_builder(DType::F32, &Device::Cpu);
    let err = Gpt2LmHeadModel::load(&small, vb, &fresh_lora(&[], &VarMap::new())).unwrap_err();
    assert!(err.to_string().contains("transformer.wte"), "{err}");
}

#[test]
fn bad_input_ids_are_errors_not_panics() {
    let (model, _) = with_peft_adapter("gpt2_lora");
    let dev = Device::Cpu;
    let bad = [
        Tensor::new(&[[64u32, 1]], &dev).unwrap(), // not in the vocabulary
        Tensor::new(&[[-1i64, 1]], &dev).unwrap(), // negative
        Tensor::new(&[1u32, 2], &dev).unwrap(),    // 1-D
        Tensor::new(&[[1f32, 2.]], &dev).unwrap(), // floats
        Tensor::zeros((1, 17), DType::U32, &dev).unwrap(), // longer than n_positions
        Tensor::zeros((1, 0), DType::U32, &dev).unwrap(), // empty
        Tensor::zeros((1, 2, 3), DType::U32, &dev).unwrap(), // 3-D
    ];
    for ids in bad {
        assert!(model.forward(&ids).is_err(), "{ids:?}");
    }
    // The longest sequence works.
    let ids = Tensor::zeros((1, 16), DType::U32, &dev).unwrap();
    assert_eq!(model.forward(&ids).unwrap().dims(), [1, 16, 64]);
}

#[test]
fn half_precision_models_run_close_to_f32() {
    // The PEFT adapter on a bf16 / f16 base (its tensors converted to the base's dtype).
    for dtype in [DType::BF16, DType::F16] {
        let case = "gpt2_lora";
        let plan = PeftAdapter::load(case_dir(case).join("adapter"), &Device::Cpu)
            .unwrap()
            .plan()
            .unwrap();
        let vb = Checkpoint::open(case_dir(case).join("base"))
            .unwrap()
            .var_builder(dtype, &Device::Cpu);
        let model = Gpt2LmHeadModel::load(&config(case), vb, &plan).unwrap();
        plan.finish().unwrap();
        let io = io(case);
        let logits = model.forward(&io["input_ids"]).unwrap();
        assert_eq!(logits.dtype(), dtype);
        assert_close(
            &logits,
            &io["logits"],
            5e-2,
            &format!("{case} in {dtype:?}"),
        );
    }
    // The upcast attention (scores and softmax in f32) in bf16.
    let case = option_cases()
        .into_iter()
        .find(|c| c.name == "opt_untied_scales")
        .unwrap();
    assert!(case.config.reorder_and_upcast_attn);
    let vb = VarBuilder::from_tensors(case.weights, DType::BF16, &Device::Cpu);
    let model = Gpt2LmHeadModel::load(&case.config, vb, &fresh_lora(&[], &VarMap::new())).unwrap();
    let logits = model.forward(&case.ids).unwrap();
    assert_eq!(logits.dtype(), DType::BF16);
    assert_close(&logits, &case.logits, 5e-2, "opt_untied_scales in bf16");
}
