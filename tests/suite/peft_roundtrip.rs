//! save → load gives the same outputs, for every supported adapter type.
//!
//! With `LORAKIT_REVERSE_DIR=DIR`, the saved adapters (and lorakit's outputs) are also left
//! in `DIR/<case>/` (fresh adapters in `DIR/<case>@<tag>/`) for `python scripts/make_peft_fixtures.py --check-reverse DIR`, which
//! loads them in PEFT.

use std::collections::HashMap;

use crate::peft_common::{assert_close, fixture, load, temp_dir, Chain, TempDir};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use lorakit::model::AdaptedSet;
use lorakit::peft::{save_adapter, PeftAdapter, PeftConfig};
use lorakit::{LoraConfig, LoraInit};

fn temp_dir_path(case: &str, tag: &str) -> std::path::PathBuf {
    match std::env::var_os("LORAKIT_REVERSE_DIR") {
        Some(root) if tag == "fixture" => std::path::PathBuf::from(root).join(case),
        Some(root) => std::path::PathBuf::from(root).join(format!("{case}@{tag}")),
        None => std::env::temp_dir().join(format!(
            "lorakit-test-{}-roundtrip-{case}-{tag}",
            std::process::id()
        )),
    }
}

/// Saves `set` with `config`, reloads it onto a fresh base and compares outputs.
fn save_reload_compare(
    case: &str,
    tag: &str,
    config: &PeftConfig,
    set: &AdaptedSet,
    y: &Tensor,
    x: &Tensor,
) -> Option<TempDir> {
    // Without LORAKIT_REVERSE_DIR the folder is temporary: the returned guard removes it.
    let temporary = std::env::var_os("LORAKIT_REVERSE_DIR")
        .is_none()
        .then(|| temp_dir(&format!("roundtrip-{case}-{tag}")));
    let dir = temp_dir_path(case, tag);
    let _ = std::fs::remove_dir_all(&dir);
    let adapter_dir = dir.join("adapter");
    save_adapter(&adapter_dir, config, set).unwrap();
    let loaded = PeftAdapter::load(&adapter_dir, &Device::Cpu).unwrap();
    let plan = loaded.plan().unwrap();
    let model = Chain::build(case, &plan).unwrap();
    let reloaded = plan.finish().unwrap();
    assert_eq!(
        reloaded.paths().len(),
        set.paths().len(),
        "{case}/{tag}: adapted layers"
    );
    assert_close(
        &model.forward(x),
        y,
        1e-6,
        &format!("{case}/{tag}: reloaded output"),
    );
    let out: HashMap<String, Tensor> = [
        ("input".to_string(), x.clone()),
        ("output".to_string(), y.clone()),
    ]
    .into();
    candle_core::safetensors::save(&out, dir.join("output.safetensors")).unwrap();
    temporary
}

/// Load the PEFT fixture, save it again, reload: same outputs, same tensors.
fn roundtrip_fixture(case: &str) {
    let adapter = PeftAdapter::load(fixture(case).join("adapter"), &Device::Cpu).unwrap();
    let plan = adapter.plan().unwrap();
    let model = Chain::build(case, &plan).unwrap();
    let set = plan.finish().unwrap();
    let x = load(&fixture(case).join("expected.safetensors"))["input"].clone();
    let y = model.forward(&x);
    save_reload_compare(case, "fixture", adapter.config(), &set, &y, &x);
}

#[test]
fn lora_fixture_roundtrip() {
    roundtrip_fixture("lora_mlp");
    roundtrip_fixture("llama_names");
}

#[test]
fn rslora_patterns_fixture_roundtrip() {
    roundtrip_fixture("rslora_patterns");
}

/// Fresh, random adapters from a config with rsLoRA and patterns: saved, reloaded, same
/// outputs; the reloaded layers have the ranks the patterns give.
#[test]
fn fresh_rslora_with_patterns_roundtrip() {
    let json = r#"{"peft_type": "LORA", "r": 3, "lora_alpha": 5, "use_rslora": true,
        "target_modules": ["fc1", "fc2", "head"], "exclude_modules": "blocks\\.0\\.fc1",
        "rank_pattern": {"fc2": 2}, "alpha_pattern": {"head": 7}}"#;
    let config = PeftConfig::from_json_str(json, "inline").unwrap();
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let init = LoraConfig {
        init: LoraInit::BothRandom,
        seed: 7,
        ..LoraConfig::default()
    };
    let plan = config.fresh_plan(vb, &init).unwrap();
    let model = Chain::build("rslora_patterns", &plan).unwrap();
    let set = plan.finish().unwrap();
    assert_eq!(
        set.paths(),
        ["blocks.0.fc2", "blocks.1.fc1", "blocks.1.fc2", "head"]
    );
    for (path, layer) in set.layers() {
        let r = layer.read().tensors_to_save().unwrap()[0].1.dims()[0];
        assert_eq!(r, if path.ends_with("fc2") { 2 } else { 3 }, "{path}");
    }
    let x = Tensor::randn(0f32, 1., (4, 6), &Device::Cpu).unwrap();
    let y = model.forward(&x);
    save_reload_compare("rslora_patterns", "fresh", &config, &set, &y, &x);
}

#[test]
fn dora_and_vera_fixture_roundtrip() {
    roundtrip_fixture("dora");
    roundtrip_fixture("vera");
}

/// Fresh DoRA layers with random A and B (so ΔW ≠ 0 and the magnitude matters).
#[test]
fn fresh_dora_roundtrip() {
    let json = r#"{"peft_type": "LORA", "use_dora": true, "r": 3, "lora_alpha": 5, "target_modules": ["lin0", "lin1"]}"#;
    let config = PeftConfig::from_json_str(json, "inline").unwrap();
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let init = LoraConfig {
        init: LoraInit::BothRandom,
        seed: 11,
        ..LoraConfig::default()
    };
    let plan = config.fresh_plan(vb, &init).unwrap();
    let model = Chain::build("dora", &plan).unwrap();
    let set = plan.finish().unwrap();
    // Move the magnitudes away from ‖W‖ so they are not recoverable from the base alone.
    for v in set.trainable_vars() {
        if v.var.name.contains("magnitude") {
            let t = v.var.var.as_tensor();
            v.var.var.set(&(t * 1.5).unwrap()).unwrap();
        }
    }
    let x = Tensor::randn(0f32, 1., (4, 10), &Device::Cpu).unwrap();
    let y = model.forward(&x);
    save_reload_compare("dora", "fresh", &config, &set, &y, &x);
}

#[test]
fn adalora_fixture_roundtrip() {
    roundtrip_fixture("adalora");
}

/// Fresh AdaLoRA layers, pruned by hand (E masked), saved truncated with their
/// rank_pattern, reloaded: same outputs and the same kept ranks.
#[test]
fn fresh_adalora_pruned_roundtrip() {
    let json = r#"{"peft_type": "ADALORA", "init_r": 4, "lora_alpha": 3, "total_step": 10, "target_modules": ["lin0", "lin1", "lin2"]}"#;
    let config = PeftConfig::from_json_str(json, "inline").unwrap();
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let plan = config
        .fresh_plan(
            vb,
            &LoraConfig {
                seed: 3,
                ..LoraConfig::default()
            },
        )
        .unwrap();
    let model = Chain::build("adalora", &plan).unwrap();
    let set = plan.finish().unwrap();
    // E starts at zero: give it values, then prune a different set of ranks per layer.
    let masks = [
        [true, false, true, false],
        [false, false, false, true],
        [true, true, true, true],
    ];
    for ((_, layer), keep) in set.layers().iter().zip(&masks) {
        let mut guard = layer.write();
        let ada = guard
            .as_any_mut()
            .downcast_mut::<lorakit::AdaLoraLinear>()
            .unwrap();
        ada.e()
            .set(&Tensor::new(&[[0.5f32], [-1.0], [2.0], [0.25]], &Device::Cpu).unwrap())
            .unwrap();
        ada.apply_mask(keep).unwrap();
    }
    let x = Tensor::randn(0f32, 1., (4, 10), &Device::Cpu).unwrap();
    let y = model.forward(&x);
    let _saved_dir = save_reload_compare("adalora", "fresh", &config, &set, &y, &x);
    let saved = PeftConfig::from_file(
        temp_dir_path("adalora", "fresh").join("adapter/adapter_config.json"),
    )
    .unwrap();
    for (i, path) in ["lin0", "lin1", "lin2"].iter().enumerate() {
        assert_eq!(saved.adalora_mask(path).unwrap(), masks[i], "{path}");
    }
}

/// A set whose layers do not match the config is refused rather than saved wrongly.
#[test]
fn save_refuses_inconsistent_config() {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let plan = PeftConfig::lora(2, 4.0, &["lin0"])
        .fresh_plan(vb, &LoraConfig::default())
        .unwrap();
    let _model = Chain::build("lora_mlp", &plan).unwrap();
    let set = plan.finish().unwrap();
    let dir = temp_dir("roundtrip-inconsistent");
    let err = save_adapter(&dir, &PeftConfig::lora(4, 4.0, &["lin0"]), &set).unwrap_err();
    assert!(err.to_string().contains("rank 2"), "{err}");
    let err = save_adapter(&dir, &PeftConfig::lora(2, 4.0, &["lin1"]), &set).unwrap_err();
    assert!(err.to_string().contains("target_modules"), "{err}");
}
