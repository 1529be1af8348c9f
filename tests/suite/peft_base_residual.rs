//! PEFT adapters whose init makes PEFT replace the targeted base weights by a residual
//! when it loads them (`init_lora_weights` "pissa", "olora"; `lorakit::peft::base_residual`),
//! against fixtures made by PEFT 0.21 (`scripts/make_option_fixtures.py`): PiSSA on
//! GPT-2's Conv1D modules (`fan_in_fan_out`), OLoRA with rsLoRA on a square Conv1D, and
//! DoRA over OLoRA (with `rank_pattern` / `alpha_pattern`, so each module has its own
//! scale) and over PiSSA (a module whose rank covers its smaller side) on Llama.
//!
//! Each module PEFT wraps gives PEFT's output on the input PEFT's module saw, the streaming
//! merge gives PEFT's `merge_and_unload()` tensors, the Llama models give PEFT's logits,
//! and an adapter saved back by lorakit keeps its init and reloads to the same outputs.

use candle_core::{Device, Module};
use lorakit::peft::{merge_checkpoint, save_adapter, BaseResidual, MergeOptions, PeftAdapter};

use crate::models_llama::{build, check, logits, peft_plan};
use crate::peft_common::{assert_close, load, rel_err, temp_dir};
use crate::peft_options::{build_modules, case_dir, hooked, module_input};

const CASES: [(&str, BaseResidual); 4] = [
    ("gpt2_pissa", BaseResidual::Pissa),
    ("gpt2_olora", BaseResidual::Olora),
    ("llama_olora_dora", BaseResidual::Olora),
    ("llama_pissa_dora", BaseResidual::Pissa),
];

#[test]
fn every_wrapped_module_gives_pefts_output_on_the_residual() {
    for (case, residual) in CASES {
        let adapter = PeftAdapter::load(case_dir(case).join("adapter"), &Device::Cpu).unwrap();
        assert_eq!(adapter.config().base_residual().unwrap(), Some(residual));
        let plan = adapter.plan().unwrap();
        let modules = build_modules(case, &plan).unwrap();
        plan.finish().unwrap();
        let io = load(&case_dir(case).join("io.safetensors"));
        let paths = hooked(&io);
        assert!(!paths.is_empty(), "{case}");
        for path in paths {
            let module = &modules[&path];
            let x = module_input(&io[&format!("{path}.input")]);
            let want = &io[&format!("{path}.output")];
            let y = module.forward(&x).unwrap();
            assert_close(&y, want, 1e-5, &format!("{case}: {path}"));
            // On the stored base weight (what lorakit did before) the output is another.
            let base = module.adapter().unwrap().read().base().clone();
            assert!(
                rel_err(&base.forward(&x).unwrap(), want) > 1e-3,
                "{case}: {path}"
            );
        }
    }
}

#[test]
fn merged_checkpoints_equal_pefts_merge_and_unload() {
    for (case, _) in CASES {
        let dir = case_dir(case);
        let out_dir = temp_dir(&format!("residual-merge-{case}"));
        let out = out_dir.join("merged.safetensors");
        merge_checkpoint(
            &dir.join("base/model.safetensors"),
            &dir.join("adapter"),
            &out,
            MergeOptions::default(),
        )
        .unwrap_or_else(|e| panic!("{case}: {e}"));
        let ours = load(&out);
        let pefts = load(&dir.join("merged/model.safetensors"));
        assert_eq!(ours.len(), pefts.len(), "{case}: same tensors");
        for (name, want) in &pefts {
            assert_close(&ours[name], want, 1e-5, &format!("{case}: {name}"));
        }
        std::fs::remove_dir_all(out_dir).ok();
    }
}

#[test]
fn llama_models_give_pefts_logits() {
    for case in ["llama_olora_dora", "llama_pissa_dora"] {
        let dir = case_dir(case);
        let io = load(&dir.join("io.safetensors"));
        let plan = peft_plan(&dir.join("adapter"));
        let model = build(
            &dir.join("base/config.json"),
            &dir.join("base"),
            candle_core::DType::F32,
            &plan,
        );
        plan.finish().unwrap();
        let got = logits(&model, &io["input_ids"]);
        check(&got, &io["logits"], 1e-4, &format!("{case} unmerged"));
    }
}

/// A loaded adapter saved back keeps its init (PEFT recomputes the residual from the
/// original base when it loads the copy, as lorakit does).
#[test]
fn a_saved_copy_keeps_its_init_and_outputs() {
    for (case, residual) in CASES {
        let dir = case_dir(case);
        let adapter = PeftAdapter::load(dir.join("adapter"), &Device::Cpu).unwrap();
        let plan = adapter.plan().unwrap();
        let modules = build_modules(case, &plan).unwrap();
        let set = plan.finish().unwrap();
        let out = temp_dir(&format!("residual-saved-{case}"));
        save_adapter(&out, adapter.config(), &set).unwrap();
        let copy = PeftAdapter::load(&out, &Device::Cpu).unwrap();
        assert_eq!(copy.config().base_residual().unwrap(), Some(residual));
        let plan = copy.plan().unwrap();
        let reloaded = build_modules(case, &plan).unwrap();
        plan.finish().unwrap();
        let io = load(&dir.join("io.safetensors"));
        for path in hooked(&io) {
            let x = module_input(&io[&format!("{path}.input")]);
            let a = modules[&path].forward(&x).unwrap();
            let b = reloaded[&path].forward(&x).unwrap();
            assert_close(&b, &a, 1e-6, &format!("{case}: {path} reloaded"));
        }
        std::fs::remove_dir_all(out).ok();
    }
}
