//! PEFT's LoRA options on real transformers models, against fixtures made by PEFT 0.21
//! (`scripts/make_option_fixtures.py`): GPT-2 (Conv1D, `fan_in_fan_out`, LoRA on `wte`,
//! DoRA), BERT for sequence classification (`modules_to_save`, `bias = "all"`), Llama
//! (LoRA on `embed_tokens` and `lm_head`; `lora_bias`, `layers_to_transform`,
//! `bias = "lora_only"`).
//!
//! For each case: every module PEFT wraps gives PEFT's output on the input PEFT's module saw
//! (loaded through the model-level API, every tensor of the adapter file used), and the
//! streaming merge gives PEFT's `merge_and_unload()` tensors.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use lorakit::model::{conv1d, embedding, linear_b, AdapterPlan, Linear};
use lorakit::peft::{merge_checkpoint, MergeOptions, PeftAdapter};

use crate::peft_common::{assert_close, load, temp_dir};

const CASES: [&str; 5] = [
    "gpt2_lora",
    "gpt2_dora",
    "bert_cls",
    "llama_embed",
    "llama_bias",
];

pub fn case_dir(case: &str) -> PathBuf {
    crate::peft_common::fixture("peft_options").join(case)
}

/// How the base checkpoint's module at `path` (weight `shape`) is built: GPT-2's attention
/// and MLP projections are Conv1D, `*embed*` / `wte` / `wpe` tables are embeddings.
fn kind_of(path: &str) -> &'static str {
    let last = path.rsplit('.').next().unwrap_or(path);
    if ["wte", "wpe", "embed_tokens"].contains(&last) || last.ends_with("_embeddings") {
        "embedding"
    } else if ["c_attn", "c_proj", "c_fc"].contains(&last) {
        "conv1d"
    } else {
        "linear"
    }
}

/// Every 2-D weight of the case's base checkpoint built through `plan` (the model-level
/// API, as model code would), plus the 1-D norm biases a `bias = "all"` adapter replaces.
pub fn build_modules(case: &str, plan: &AdapterPlan) -> lorakit::Result<HashMap<String, Linear>> {
    let tensors = load(&case_dir(case).join("base/model.safetensors"));
    let vb = VarBuilder::from_tensors(tensors.clone(), DType::F32, &Device::Cpu);
    let mut modules = HashMap::new();
    for (name, t) in &tensors {
        let Some(path) = name.strip_suffix(".weight") else {
            continue;
        };
        if t.rank() != 2 {
            // A norm: model code asks the plan for a trained bias.
            if let Some(b) = tensors.get(&format!("{path}.bias")) {
                plan.bias(path, b.clone())?;
            }
            continue;
        }
        let (rows, cols) = t.dims2().unwrap();
        let has_bias = tensors.contains_key(&format!("{path}.bias"));
        let module = match kind_of(path) {
            "embedding" => embedding(rows, cols, vb.pp(path), plan)?,
            "conv1d" => conv1d(rows, cols, vb.pp(path), plan)?,
            _ => linear_b(cols, rows, has_bias, vb.pp(path), plan)?,
        };
        modules.insert(path.to_string(), module);
    }
    Ok(modules)
}

/// The hooked module paths of a case's io file.
pub(crate) fn hooked(io: &HashMap<String, Tensor>) -> Vec<String> {
    let mut paths: Vec<String> = io
        .keys()
        .filter_map(|k| k.strip_suffix(".output"))
        .map(str::to_string)
        .collect();
    paths.sort();
    paths
}

/// An io-file input as the module takes it: ids as u32, floats as they are.
pub(crate) fn module_input(t: &Tensor) -> Tensor {
    match t.dtype() {
        DType::I64 => t.to_dtype(DType::U32).unwrap(),
        _ => t.clone(),
    }
}

#[test]
fn every_wrapped_module_gives_pefts_output() {
    for case in CASES {
        let adapter = PeftAdapter::load(case_dir(case).join("adapter"), &Device::Cpu).unwrap();
        let plan = adapter.plan().unwrap();
        let modules = build_modules(case, &plan).unwrap();
        plan.finish()
            .unwrap_or_else(|e| panic!("{case}: every tensor of the adapter is used: {e}"));
        let io = load(&case_dir(case).join("io.safetensors"));
        let paths = hooked(&io);
        assert!(!paths.is_empty(), "{case}");
        for path in paths {
            let module = &modules[&path];
            assert!(
                module.adapter().is_some() || module.trainable().is_some(),
                "{case}: {path} is adapted or trainable"
            );
            let x = module_input(&io[&format!("{path}.input")]);
            let y = module.forward(&x).unwrap();
            assert_close(
                &y,
                &io[&format!("{path}.output")],
                1e-5,
                &format!("{case}: {path}"),
            );
        }
    }
}

#[test]
fn merged_checkpoints_equal_pefts_merge_and_unload() {
    for case in CASES {
        let dir = case_dir(case);
        let out_dir = temp_dir(&format!("options-merge-{case}"));
        let out = out_dir.join("merged.safetensors");
        let report = merge_checkpoint(
            &dir.join("base/model.safetensors"),
            &dir.join("adapter"),
            &out,
            MergeOptions::default(),
        )
        .unwrap_or_else(|e| panic!("{case}: {e}"));
        assert!(!report.merged.is_empty(), "{case}");
        let ours = load(&out);
        let pefts = load(&dir.join("merged/model.safetensors"));
        let mut names: Vec<&String> = pefts.keys().collect();
        names.sort();
        assert_eq!(ours.len(), pefts.len(), "{case}: same tensors");
        for name in names {
            assert_close(&ours[name], &pefts[name], 1e-5, &format!("{case}: {name}"));
        }
        std::fs::remove_dir_all(out.parent().unwrap()).ok();
    }
}

/// Trains a fresh adapter of each case's config (a few SGD steps on the hooked modules'
/// outputs, so every tensor of those modules moves), saves it, and checks that lorakit reloads it
/// with the same outputs. With `LORAKIT_OPTIONS_CHECK_DIR` set, also writes
/// `<dir>/<case>/adapter/` and `<dir>/<case>/io.safetensors` for PEFT's side, checked by
/// hand with `python3 scripts/make_option_fixtures.py --check <case> <dir>/<case>/adapter
/// <dir>/<case>/io.safetensors`.
#[test]
fn trained_adapters_save_and_reload_with_the_same_outputs() {
    use candle_nn::{Optimizer, VarMap};
    use lorakit::peft::{save_adapter, PeftConfig};
    use lorakit::LoraConfig;

    for case in CASES {
        let dir = case_dir(case);
        let config = PeftConfig::from_file(dir.join("adapter/adapter_config.json")).unwrap();
        let vars = VarMap::new();
        let vb = VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu);
        let init = LoraConfig {
            seed: 7,
            ..LoraConfig::default()
        };
        let plan = config.fresh_plan(vb, &init).unwrap();
        let modules = build_modules(case, &plan).unwrap();
        let set = plan.finish().unwrap();
        let io = load(&dir.join("io.safetensors"));
        let paths = hooked(&io);
        let outputs = |modules: &HashMap<String, Linear>| -> Vec<Tensor> {
            paths
                .iter()
                .map(|p| {
                    let x = module_input(&io[&format!("{p}.input")]);
                    modules[p].forward(&x).unwrap()
                })
                .collect()
        };
        let before = outputs(&modules);
        let initial: Vec<Tensor> = set
            .trainable_vars()
            .iter()
            .map(|v| v.var.var.as_tensor().copy().unwrap())
            .collect();
        let mut sgd = candle_nn::SGD::new(set.vars(), 0.05).unwrap();
        for _ in 0..3 {
            let loss = outputs(&modules)
                .iter()
                .map(|y| y.sqr().unwrap().mean_all().unwrap())
                .reduce(|a, b| (a + b).unwrap())
                .unwrap();
            sgd.backward_step(&loss).unwrap();
        }
        let trained = outputs(&modules);
        // Every variable of a module the loss reaches moved; the others (norm and linear
        // biases under bias = "all" outside the hooked modules) get no gradient here.
        for (v, start) in set.trainable_vars().iter().zip(&initial) {
            if !paths.contains(&v.layer) {
                continue;
            }
            let change = crate::peft_common::rel_err(v.var.var.as_tensor(), start);
            assert!(change > 0.0, "{case}: {} did not move", v.full_name());
        }
        assert!(
            crate::peft_common::rel_err(&trained[0], &before[0]) > 0.0,
            "{case}: training changed the outputs"
        );

        let check_dir = std::env::var_os("LORAKIT_OPTIONS_CHECK_DIR").map(PathBuf::from);
        let scratch;
        let out = match &check_dir {
            Some(d) => d.join(case),
            None => {
                scratch = temp_dir(&format!("options-trained-{case}"));
                scratch.to_path_buf()
            }
        };
        save_adapter(out.join("adapter"), &config, &set).unwrap();
        let reloaded = PeftAdapter::load(out.join("adapter"), &Device::Cpu).unwrap();
        let plan = reloaded.plan().unwrap();
        let again = build_modules(case, &plan).unwrap();
        plan.finish().unwrap();
        for ((p, a), b) in paths.iter().zip(&trained).zip(outputs(&again)) {
            assert_close(&b, a, 1e-6, &format!("{case}: reloaded {p}"));
        }
        if check_dir.is_some() {
            let mut written: HashMap<String, Tensor> = HashMap::new();
            for (p, y) in paths.iter().zip(&trained) {
                written.insert(format!("{p}.input"), io[&format!("{p}.input")].clone());
                written.insert(format!("{p}.output"), y.clone());
            }
            candle_core::safetensors::save(&written, out.join("io.safetensors")).unwrap();
        } else {
            std::fs::remove_dir_all(&out).ok();
        }
    }
}
