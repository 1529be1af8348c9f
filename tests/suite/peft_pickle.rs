//! Adapters saved as `adapter_model.bin` (`torch.save`; PEFT before 0.6, or
//! `safe_serialization=False`), read by `lorakit::peft::weights_file` on fixtures real
//! PEFT 0.21 wrote (`tests/fixtures/peft_pickle/`, `scripts/make_pickle_fixtures.py`):
//! PEFT's logits unmerged and merged (f32 ≤ 1e-4 relative; bf16 tensors kept bf16), and
//! damaged files refused with the file named, never a panic.

use std::path::PathBuf;

use candle_core::{DType, Device};
use lorakit::peft::PeftAdapter;

use crate::models_llama::{build, check, logits};
use crate::peft_common::{fixture, load, temp_dir};
use crate::peft_extensions::{merged_mistral_logits, mistral_base};

fn case(name: &str) -> PathBuf {
    fixture(&format!("peft_pickle/{name}"))
}

#[test]
fn bin_adapters_give_pefts_logits_unmerged_and_merged() {
    let io = load(&case("logits.safetensors"));
    let ids = &io["input_ids"];
    let base = mistral_base();
    let config = base.join("config.json");
    for (name, dtype, tol) in [("f32", DType::F32, 1e-4), ("bf16", DType::BF16, 2e-2)] {
        let adapter = PeftAdapter::load(case(name), &Device::Cpu).unwrap();
        assert!(adapter.source().ends_with("adapter_model.bin"));
        let key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
        assert_eq!(adapter.tensor(key).unwrap().dtype(), dtype, "{name}");
        let plan = adapter.plan().unwrap();
        let model = build(&config, &base, dtype, &plan);
        plan.finish().unwrap();
        let want = &io[&format!("{name}_logits")];
        check(&logits(&model, ids), want, tol, &format!("{name} unmerged"));
    }
    let merged = merged_mistral_logits(&case("f32"), ids);
    check(&merged, &io["f32_logits"], 1e-4, "f32 merged");
}

#[test]
fn damaged_bin_files_are_errors_naming_the_file() {
    let err = PeftAdapter::load(case("oversized"), &Device::Cpu).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("adapter_model.bin") && msg.contains("needs more bytes"),
        "{msg}"
    );

    let good = std::fs::read(case("f32/adapter_model.bin")).unwrap();
    let config = case("f32/adapter_config.json");
    let dir = temp_dir("pickle-damaged");
    std::fs::copy(&config, dir.join("adapter_config.json")).unwrap();
    let cut_short = good[..good.len() / 2].to_vec();
    let mut flipped = good.clone();
    for i in (0..flipped.len()).step_by(97) {
        flipped[i] ^= 0x5a;
    }
    for (what, bytes) in [
        ("cut short", cut_short),
        ("bytes flipped", flipped),
        ("not a zip", b"not a pickle".to_vec()),
    ] {
        std::fs::write(dir.join("adapter_model.bin"), bytes).unwrap();
        let err = PeftAdapter::load(&dir, &Device::Cpu).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("adapter_model.bin"), "{what}: {msg}");
    }
    // Neither weights file: both names given.
    std::fs::remove_file(dir.join("adapter_model.bin")).unwrap();
    let msg = PeftAdapter::load(&dir, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("adapter_model.safetensors") && msg.contains("adapter_model.bin"),
        "{msg}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}
