//! Training LoRAs on a mixture of experts' experts and router (PEFT's `target_parameters`,
//! which PEFT 0.21's LoRA adds on Mixtral, Qwen3-MoE and OLMoE): with PEFT's factors the
//! trainable path gives PEFT's logits and saves PEFT's file byte for byte; the recipe's
//! `all-linear` adapts what PEFT's does and saves PEFT's config; gradients against finite
//! differences; merging, disabling; and the settings PEFT refuses.

use std::collections::{BTreeMap, HashMap};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use lorakit::finetune::{AdapterRecipe, TrainConfig, Trainer};
use lorakit::model::{AdapterPlan, ModuleSelector, RankAlpha, TargetSpec};
use lorakit::models::llama::{LlamaConfig, LlamaForCausalLM};
use lorakit::peft::{save_adapter, PeftConfig};
use lorakit::{LoraConfig, LoraInit, Variant};

use crate::models_llama::{
    build, build_case, check, check_finite_differences, logits, models, probe_loss,
};
use crate::peft_common::{load, temp_dir};

const TOL: f64 = 1e-4;
/// The models PEFT's `all-linear` converts into LoRAs on parameters.
const CASES: [&str; 3] = ["mixtral", "qwen3_moe", "olmoe"];
/// Those, and gpt-oss, whose fixture names its experts and router in `target_parameters`.
const PARAMETER_CASES: [&str; 4] = ["mixtral", "qwen3_moe", "olmoe", "gpt_oss"];
const PREFIX: &str = "base_model.model.";

/// Sets every trainable variable of `set` from PEFT's file `file`, decoding a LoRA on a
/// stacked parameter as PEFT's `ParamWrapper` lays it out: `lora_A` `(r · E, in)` holds
/// expert `e`'s A in rows `e·r ..`, `lora_B` `(out, r · E)` its B in the columns `j·E + e`;
/// a `gate_up_proj`'s B has the gate rows, then the up rows.
fn set_from_peft_file(set: &lorakit::model::AdaptedSet, file: &HashMap<String, Tensor>) {
    for v in set.trainable_vars() {
        let mut parts = v.var.name.split('.');
        let factor = parts.next().unwrap();
        let key = format!("{PREFIX}{}.{factor}.weight", v.layer);
        let stored = &file[&key];
        let value = match (parts.next(), parts.next()) {
            (None, _) => stored.clone(),
            (Some(e), half) => {
                let e: usize = e.parse().unwrap();
                let want = v.var.var.as_tensor().dims().to_vec();
                if factor == "lora_A" {
                    stored.narrow(0, e * want[0], want[0]).unwrap()
                } else {
                    let (out, cols) = stored.dims2().unwrap();
                    let r = want[1];
                    let b = stored.reshape((out, r, cols / r)).unwrap();
                    let b = b.narrow(2, e, 1).unwrap().squeeze(2).unwrap();
                    match half {
                        Some("gate") => b.narrow(0, 0, out / 2).unwrap(),
                        Some("up") => b.narrow(0, out / 2, out / 2).unwrap(),
                        _ => b,
                    }
                }
            }
        };
        let value = value.to_dtype(v.var.var.dtype()).unwrap();
        v.var.var.set(&value.contiguous().unwrap()).unwrap();
    }
}

#[test]
fn trainable_experts_with_peft_factors_give_peft_logits_and_save_its_file() {
    for case in PARAMETER_CASES {
        let dir = models(case);
        let io = load(&dir.join("logits.safetensors"));
        let ids = &io["input_ids"];
        let peft = PeftConfig::from_file(dir.join("experts/adapter_config.json")).unwrap();
        let vars = VarMap::new();
        let vb = VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu);
        let plan = peft.fresh_plan(vb, &LoraConfig::default()).unwrap();
        let model = build_case(&dir, DType::F32, &plan);
        let set = plan.finish().unwrap();
        assert!(!set.stacked_loras().is_empty(), "{case}");
        // Fresh, B = 0: the base model.
        check(&logits(&model, ids), &io["logits"], TOL, case);
        let file = load(&dir.join("experts/adapter_model.safetensors"));
        set_from_peft_file(&set, &file);
        let want = &io["experts_logits"];
        check(
            &logits(&model, ids),
            want,
            TOL,
            &format!("{case} trainable"),
        );
        set.merge_all(true).unwrap();
        check(&logits(&model, ids), want, TOL, &format!("{case} merged"));
        set.unmerge_all().unwrap();
        set.set_enabled(false);
        check(&logits(&model, ids), &io["logits"], TOL, case);
        set.set_enabled(true);

        // Saved, it is PEFT's file again, tensor for tensor.
        let out = temp_dir(&format!("moe-train-save-{case}"));
        save_adapter(&*out, &peft, &set).unwrap();
        let saved = load(&out.join("adapter_model.safetensors"));
        let keys = |m: &HashMap<String, Tensor>| m.keys().cloned().collect::<Vec<_>>();
        let (mut got_keys, mut want_keys) = (keys(&saved), keys(&file));
        got_keys.sort();
        want_keys.sort();
        assert_eq!(got_keys, want_keys, "{case}");
        for (key, t) in &file {
            let diff = (&saved[key] - t).unwrap().abs().unwrap();
            let diff = diff.max_all().unwrap().to_scalar::<f32>().unwrap();
            assert_eq!(diff, 0.0, "{case}: {key}");
        }
    }
}

#[test]
fn all_linear_lora_adapts_the_experts_as_peft_does_and_saves_its_config() {
    for case in CASES {
        let dir = models(case);
        let fixture = PeftConfig::from_file(dir.join("experts/adapter_config.json")).unwrap();
        let base = dir.join("base");
        let config = LlamaConfig::from_file(&base).unwrap();
        let mut recipe = AdapterRecipe::new(Variant::Lora, 4, 8.0, &["all-linear"]);
        recipe.use_rslora = fixture.use_rslora;
        let (model, set) = crate::finetune_train::with_recipe(&base, &config, &recipe);
        let trainer = Trainer::new(&model, set, recipe, TrainConfig::new(1)).unwrap();
        let saved = trainer.peft_config().unwrap();
        let sorted = |v: &serde_json::Value| {
            let mut names: Vec<String> = serde_json::from_value(v.clone()).unwrap();
            names.sort();
            names
        };
        for field in ["target_modules", "target_parameters"] {
            assert_eq!(
                sorted(&saved.raw[field]),
                sorted(&fixture.raw[field]),
                "{case}: {field}"
            );
        }
        for field in ["rank_pattern", "alpha_pattern"] {
            assert_eq!(saved.raw[field], fixture.raw[field], "{case}: {field}");
        }
        // The same tensors, by key and shape, as PEFT's all-linear adapter.
        let out = temp_dir(&format!("moe-all-linear-save-{case}"));
        trainer.save_adapter(&*out).unwrap();
        let shapes = |path: &std::path::Path| -> BTreeMap<String, Vec<usize>> {
            load(path)
                .into_iter()
                .map(|(k, t)| (k, t.dims().to_vec()))
                .collect()
        };
        assert_eq!(
            shapes(&out.join("adapter_model.safetensors")),
            shapes(&dir.join("experts/adapter_model.safetensors")),
            "{case}"
        );
        // lorakit loads it back (its LoRAs on parameters folded in): B = 0, the base.
        let plan = crate::models_llama::peft_plan(&out);
        let model = build(&base.join("config.json"), &base, DType::F32, &plan);
        plan.finish().unwrap();
        let io = load(&dir.join("logits.safetensors"));
        check(&logits(&model, &io["input_ids"]), &io["logits"], TOL, case);
    }
}

/// Mixtral with a fresh all-linear LoRA whose B is random too, in `dtype`; the set's
/// variables.
fn random_experts_lora(dtype: DType) -> (LlamaForCausalLM, Vec<Var>, lorakit::model::AdaptedSet) {
    let dir = models("mixtral");
    let vars = VarMap::new();
    let plan = AdapterPlan::lora(
        TargetSpec::new(ModuleSelector::AllLinear),
        RankAlpha::new(2, 4.0),
        LoraConfig {
            init: LoraInit::BothRandom,
            seed: 7,
            ..LoraConfig::default()
        },
        VarBuilder::from_varmap(&vars, dtype, &Device::Cpu),
    );
    let model = build_case(&dir, dtype, &plan);
    let set = plan.finish().unwrap();
    let stacked: Vec<Var> = set
        .trainable_vars()
        .into_iter()
        .filter(|v| v.layer.contains(".mlp."))
        .map(|v| v.var.var)
        .collect();
    (model, stacked, set)
}

#[test]
fn gradients_of_the_experts_and_router_loras_match_finite_differences() {
    let dev = Device::Cpu;
    let io = load(&models("mixtral").join("logits.safetensors"));
    let ids = io["input_ids"].clone();
    let r = Tensor::randn(0f64, 1., (2, 9, 64), &dev).unwrap();
    let (model, stacked, set) = random_experts_lora(DType::F64);
    // Per layer: gate_up (A and the gate and up halves of B per expert), down, router.
    let layer0: Vec<String> = set
        .trainable_vars()
        .iter()
        .filter(|v| v.layer.starts_with("model.layers.0.mlp"))
        .map(|v| v.full_name())
        .collect();
    assert_eq!(layer0.len(), 4 * 3 + 4 * 2 + 2, "{layer0:?}");
    // Layer 0's gate_up A and gate-half B of expert 1, down's B of expert 3, the router's A.
    let names = [
        "model.layers.0.mlp.experts.base_layer.lora_A.1",
        "model.layers.0.mlp.experts.base_layer.lora_B.1.gate",
        "model.layers.0.mlp.experts.base_layer.lora_B.1.up",
        "model.layers.1.mlp.experts.lora_B.3",
        "model.layers.0.mlp.gate.lora_A.0",
    ];
    for var in check_gradients_of(&model, &set, &names, (&ids, &r)) {
        assert!(stacked
            .iter()
            .any(|v| v.as_tensor().id() == var.as_tensor().id()));
    }
}

/// The variables of `set` named `names` (full names), each with a non-zero gradient of
/// `probe_loss` on `(ids, r)` that equals its finite differences at its first, middle and
/// last element.
fn check_gradients_of(
    model: &LlamaForCausalLM,
    set: &lorakit::model::AdaptedSet,
    names: &[&str],
    (ids, r): (&Tensor, &Tensor),
) -> Vec<Var> {
    let grads = probe_loss(model, ids, r).backward().unwrap();
    let mut vars = Vec::new();
    for &name in names {
        let var = set
            .trainable_vars()
            .into_iter()
            .find(|v| v.full_name() == name)
            .unwrap_or_else(|| panic!("no {name}"))
            .var
            .var;
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let g = g.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        assert!(g.iter().any(|v| v.abs() > 1e-4), "{name}: zero gradient");
        let (mid, last) = (g.len() / 2, g.len() - 1);
        check_finite_differences(model, &var, (ids, r), &g, &[0, mid, last], name);
        vars.push(var);
    }
    vars
}

/// gpt-oss's experts (interleaved gate and up columns through a clamped SwiGLU, biases) and
/// router (the softmax of the chosen logits), in f64 with PEFT's fixture factors.
#[test]
fn gpt_oss_experts_and_router_gradients_match_finite_differences() {
    let dir = models("gpt_oss");
    let io = load(&dir.join("logits.safetensors"));
    let ids = io["input_ids"].clone();
    let r = Tensor::randn(0f64, 1., (2, 9, 64), &Device::Cpu).unwrap();
    let peft = PeftConfig::from_file(dir.join("experts/adapter_config.json")).unwrap();
    let vars = VarMap::new();
    let vb = VarBuilder::from_varmap(&vars, DType::F64, &Device::Cpu);
    let plan = peft.fresh_plan(vb, &LoraConfig::default()).unwrap();
    let model = build_case(&dir, DType::F64, &plan);
    let set = plan.finish().unwrap();
    set_from_peft_file(&set, &load(&dir.join("experts/adapter_model.safetensors")));
    let names = [
        "model.layers.0.mlp.experts.base_layer.lora_A.1",
        "model.layers.0.mlp.experts.base_layer.lora_B.2",
        "model.layers.1.mlp.experts.lora_A.0",
        "model.layers.1.mlp.experts.lora_B.3",
        "model.layers.0.mlp.router.lora_A.0",
        "model.layers.1.mlp.router.lora_B.0",
    ];
    check_gradients_of(&model, &set, &names, (&ids, &r));
}

#[test]
fn training_moves_the_experts_and_router_loras_and_lowers_the_loss() {
    let dir = models("mixtral").join("base");
    let config = LlamaConfig::from_file(&dir).unwrap();
    let recipe = AdapterRecipe::new(Variant::LoraPlus, 2, 4.0, &["w1", "w3", "w2", "gate"]);
    let (model, set) = crate::finetune_train::with_recipe(&dir, &config, &recipe);
    // Only the parameters: no module is adapted.
    assert!(set.is_empty());
    assert_eq!(set.stacked_loras().len(), 6);
    train_lowering_the_loss(&model, &set, recipe, 8);
    let moved = set
        .trainable_vars()
        .iter()
        .filter(|v| v.var.name.starts_with("lora_B"))
        .all(|v| {
            let t = v.var.var.as_tensor().abs().unwrap().max_all().unwrap();
            t.to_scalar::<f32>().unwrap() > 0.0
        });
    assert!(moved, "a B stayed at zero");
}

/// A trainer of `set` on `model` after `steps` steps of `recipe` (learning rate 1e-2) on
/// toy data, checked to have lowered the evaluation loss.
pub(crate) fn train_lowering_the_loss<'m>(
    model: &'m LlamaForCausalLM,
    set: &lorakit::model::AdaptedSet,
    recipe: AdapterRecipe,
    steps: usize,
) -> Trainer<'m> {
    let data = crate::finetune_train::toy_data(8);
    let mut settings = TrainConfig::new(steps);
    settings.lr = 1e-2;
    let mut trainer = Trainer::new(model, set.clone(), recipe, settings).unwrap();
    let before = trainer.evaluate(&data).unwrap();
    trainer.train(&data, None, |_| {}).unwrap();
    let after = trainer.evaluate(&data).unwrap();
    assert!(after < before, "loss {before} → {after}");
    trainer
}

#[test]
fn experts_loras_refuse_what_peft_refuses() {
    let dir = models("mixtral").join("base");
    let config = LlamaConfig::from_file(&dir).unwrap();
    let try_build = |recipe: &AdapterRecipe| {
        let vars = VarMap::new();
        let vb = VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu);
        let plan = recipe
            .plan(vb, &config.linear_shapes(), DType::F32, &Device::Cpu)
            .unwrap();
        LlamaForCausalLM::from_pretrained(&dir, DType::F32, &Device::Cpu, &plan)
            .map(|_| plan.finish().unwrap())
    };
    // Dropout: PEFT's ParamWrapper has none.
    let mut recipe = AdapterRecipe::new(Variant::Lora, 2, 4.0, &["all-linear"]);
    recipe.dropout = 0.1;
    let err = try_build(&recipe).unwrap_err().to_string();
    assert!(
        err.contains("lora_dropout") && err.contains("gate_up_proj"),
        "{err}"
    );
    // lorakit's LoRA with lora_bias, likewise.
    let vars = VarMap::new();
    let plan = AdapterPlan::lora(
        TargetSpec::new(ModuleSelector::AllLinear),
        RankAlpha::new(2, 4.0),
        LoraConfig {
            lora_bias: true,
            ..LoraConfig::new(2, 4.0)
        },
        VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu),
    );
    let built = LlamaForCausalLM::from_pretrained(&dir, DType::F32, &Device::Cpu, &plan);
    let err = built.err().unwrap().to_string();
    assert!(err.contains("lora_bias"), "{err}");
    // target_parameters on a model without experts: refused when the model is built, as
    // PEFT refuses it, not after training at save.
    let mut config = PeftConfig::lora(2, 4.0, &["q_proj"]);
    config.target_parameters = vec!["gate_up_proj".to_string()];
    let vars = VarMap::new();
    let vb = VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu);
    let plan = config.fresh_plan(vb, &LoraConfig::default()).unwrap();
    build_case(&models("qwen2"), DType::F32, &plan);
    let err = plan.finish().unwrap_err().to_string();
    assert!(
        err.contains("target_parameters") && err.contains("gate_up_proj"),
        "{err}"
    );
    // Half of a fused pair.
    let recipe = AdapterRecipe::new(Variant::Lora, 2, 4.0, &["q_proj", "w1"]);
    let err = try_build(&recipe).unwrap_err().to_string();
    assert!(err.contains("w3") && err.contains("gate_up_proj"), "{err}");
    // Other variants adapt the modules only, and save them by name (PEFT would refuse DoRA
    // on its converted parameters).
    let recipe = AdapterRecipe::new(Variant::Dora, 2, 4.0, &["all-linear"]);
    let set = try_build(&recipe).unwrap();
    assert!(set.stacked_loras().is_empty() && set.len() == 8);
    // A config that does not name the trained parameters is refused at save.
    let recipe = AdapterRecipe::new(Variant::Lora, 2, 4.0, &["all-linear"]);
    let set = try_build(&recipe).unwrap();
    let out = temp_dir("moe-train-unnamed");
    let bare = PeftConfig::lora(2, 4.0, &["q_proj", "k_proj", "v_proj", "o_proj"]);
    let err = save_adapter(out.join("a"), &bare, &set)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("target_parameters") && err.contains("with_parameter_loras"),
        "{err}"
    );
    assert!(!out.join("a").exists());
    save_adapter(
        out.join("b"),
        &bare.with_parameter_loras(&set).unwrap(),
        &set,
    )
    .unwrap();
}
