//! The CLI on adapters with PEFT's LoRA options (`tests/fixtures/peft_options`, made by PEFT
//! 0.21): `merge` gives PEFT's `merge_and_unload()` tensors, `inspect` shows the options and
//! flags keys it does not understand.

use super::{assert_success, lorakit};
use crate::peft_common::{assert_close, load, temp_dir};
use crate::peft_options::case_dir;

#[test]
fn merge_of_a_gpt2_adapter_with_embedding_lora_equals_pefts() {
    let dir = case_dir("gpt2_lora");
    let out_dir = temp_dir("cli-options-merge");
    let out = out_dir.join("merged");
    let result = lorakit(&[
        &"merge",
        &"--base",
        &dir.join("base"),
        &"--adapter",
        &dir.join("adapter"),
        &"--out",
        &out,
        &"--quiet",
    ]);
    assert_success(&result);
    let ours = load(&out.join("model.safetensors"));
    let pefts = load(&dir.join("merged/model.safetensors"));
    assert_eq!(ours.len(), pefts.len());
    for (name, t) in &pefts {
        assert_close(&ours[name], t, 1e-5, name);
    }
    // The companion files are copied beside it.
    assert!(out.join("config.json").exists());
    std::fs::remove_dir_all(out.parent().unwrap()).ok();
}

#[test]
fn inspect_shows_options_base_tensors_and_unknown_keys() {
    let out = lorakit(&[&"inspect", &case_dir("llama_bias").join("adapter")]);
    assert_success(&out);
    let text = String::from_utf8_lossy(&out.stdout);
    for line in [
        "lora_bias: true",
        "bias: lora_only",
        "layers_to_transform: [0], layers_pattern: layers",
        "model.layers.0.self_attn.q_proj  rank 4  scale 2  +lora_B.bias",
        "model.layers.0.self_attn.q_proj.base_layer.bias",
    ] {
        assert!(text.contains(line), "missing `{line}` in\n{text}");
    }
    let out = lorakit(&[&"inspect", &case_dir("gpt2_lora").join("adapter")]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("fan_in_fan_out: true"), "{text}");
    assert!(
        text.contains("transformer.wte  rank 4  scale 2  embedding"),
        "{text}"
    );

    // An adapter with a key of no known kind: inspect lists it, merge refuses it by name.
    let tmp = temp_dir("cli-options-unknown");
    let adapter = tmp.join("adapter");
    std::fs::create_dir_all(&adapter).unwrap();
    let src = case_dir("llama_embed").join("adapter");
    std::fs::copy(
        src.join("adapter_config.json"),
        adapter.join("adapter_config.json"),
    )
    .unwrap();
    let mut tensors = load(&src.join("adapter_model.safetensors"));
    let extra = tensors["base_model.model.lm_head.lora_A.weight"].clone();
    tensors.insert("base_model.model.lm_head.lora_C.weight".into(), extra);
    candle_core::safetensors::save(&tensors, adapter.join("adapter_model.safetensors")).unwrap();
    let out = lorakit(&[&"inspect", &adapter]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("NOT UNDERSTOOD (1"), "{text}");
    assert!(text.contains("lm_head.lora_C.weight"), "{text}");
    let merged = tmp.join("merged");
    let out = lorakit(&[
        &"merge",
        &"--base",
        &case_dir("llama_embed").join("base"),
        &"--adapter",
        &adapter,
        &"--out",
        &merged,
        &"--quiet",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("lm_head.lora_C.weight"), "{err}");
    assert!(!merged.exists(), "nothing is written");
    std::fs::remove_dir_all(&tmp).ok();
}
