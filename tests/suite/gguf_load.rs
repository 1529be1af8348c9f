//! `LlamaForCausalLM::from_gguf`: the GGUF models of `tests/fixtures/gguf/` (written as
//! llama.cpp's `convert_hf_to_gguf.py` writes them by `scripts/make_gguf_fixtures.py`,
//! mistral's `attn_q` in Q8_0) against the Hugging Face folders they were made from, loaded
//! in float after candle's own Q8_0 quantize→dequantize of the tensors the file stores
//! quantized, with and without the fixtures' PEFT LoRA.

use std::collections::HashMap;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use lorakit::model::{AdapterPlan, Quantize};
use lorakit::models::llama::{LlamaConfig, LlamaForCausalLM};
use lorakit::peft::PeftAdapter;

use crate::peft_common::{fixture, load, rel_err};

/// Which tensors each fixture stores quantized (the script's choice).
fn stored_q8(case: &str, name: &str) -> bool {
    case == "mistral" && name.ends_with("self_attn.q_proj.weight")
}

/// The fixture's plan: its PEFT LoRA, or nothing.
fn plan(case: &str, lora: bool) -> AdapterPlan {
    if !lora {
        return AdapterPlan::none();
    }
    let dir = fixture("models/llama").join(case).join("lora");
    PeftAdapter::load(dir, &Device::Cpu)
        .unwrap()
        .plan()
        .unwrap()
}

/// The Hugging Face model in float, its GGUF-quantized tensors rounded through Q8_0.
fn reference(case: &str, lora: bool, ids: &Tensor) -> Tensor {
    let base = fixture("models/llama").join(case).join("base");
    let config = LlamaConfig::from_file(base.join("config.json")).unwrap();
    let mut rounded = HashMap::new();
    let mut quantized = 0;
    for (name, t) in load(&base.join("model.safetensors")) {
        let t = t.to_dtype(DType::F32).unwrap();
        let t = if stored_q8(case, &name) {
            quantized += 1;
            let q = QTensor::quantize(&t, GgmlDType::Q8_0).unwrap();
            q.dequantize(&Device::Cpu).unwrap()
        } else {
            t
        };
        rounded.insert(name, t);
    }
    let want = if case == "mistral" { 2 } else { 0 };
    assert_eq!(quantized, want, "{case}");
    let vb = VarBuilder::from_tensors(rounded, DType::F32, &Device::Cpu);
    let plan = plan(case, lora);
    let logits = LlamaForCausalLM::load(&config, vb, &plan)
        .unwrap()
        .forward(ids)
        .unwrap();
    plan.finish().unwrap();
    logits
}

#[test]
fn a_gguf_model_gives_the_logits_of_its_hf_checkpoint() {
    // 4 tokens: Mistral's sliding window (4, which the GGUF file does not keep) masks
    // nothing.
    let ids = Tensor::new(&[[1u32, 17, 42, 5], [3, 0, 63, 8]], &Device::Cpu).unwrap();
    for case in ["mistral", "qwen2"] {
        for lora in [false, true] {
            let path = fixture("gguf").join(format!("model_{case}.gguf"));
            let plan = plan(case, lora);
            let model =
                LlamaForCausalLM::from_gguf(&path, DType::F32, &Device::Cpu, &plan).unwrap();
            let set = plan.finish().unwrap();
            assert_eq!(set.is_empty(), !lora, "{case}");
            for (path, layer) in set.layers() {
                let want = stored_q8(case, &format!("{path}.weight"));
                assert_eq!(layer.read().base().is_quantized(), want, "{case} {path}");
            }
            let got = model.forward(&ids).unwrap();
            let want = reference(case, lora, &ids);
            let err = rel_err(&got, &want);
            assert!(err <= 1e-5, "{case} lora={lora}: relative error {err:e}");
        }
    }
}

/// With quantize-on-load settings, the file's blocks are kept, float-stored linears are
/// quantized, and the skip list (`lm_head`; `o_proj`, whose `d_in` of 48 is no whole number
/// of Q4_0 blocks) stays float.
#[test]
fn a_gguf_model_under_quantize_settings() {
    let path = fixture("gguf/model_mistral.gguf");
    let quantize = Quantize::new(GgmlDType::Q4_0).skipping(["lm_head", "o_proj"]);
    let plan = plan("mistral", true).with_quantize(quantize);
    let model = LlamaForCausalLM::from_gguf(&path, DType::F32, &Device::Cpu, &plan).unwrap();
    let set = plan.finish().unwrap();
    for (path, layer) in set.layers() {
        let base = layer.read().base().clone();
        let q = base.quantized().and_then(|q| q.ggml_dtype());
        let want = if path.ends_with("q_proj") {
            Some(GgmlDType::Q8_0)
        } else if path.ends_with("o_proj") {
            None
        } else {
            Some(GgmlDType::Q4_0)
        };
        assert_eq!(q, want, "{path}");
    }
    let head = model.lm_head();
    assert!(matches!(head, lorakit::model::Linear::Frozen(b) if !b.is_quantized()));
}

#[test]
fn a_gguf_adapter_or_a_missing_file_is_refused() {
    let load = |p: &std::path::Path| {
        LlamaForCausalLM::from_gguf(p, DType::F32, &Device::Cpu, &AdapterPlan::none())
            .unwrap_err()
            .to_string()
    };
    let err = load(&fixture("gguf/adapter_mistral.gguf"));
    assert!(
        err.contains("adapter") && err.contains("adapter_mistral.gguf"),
        "{err}"
    );
    let err = load(&fixture("gguf/no_such_model.gguf"));
    assert!(err.contains("no_such_model.gguf"), "{err}");
}

/// Llama 3.1-style RoPE scaling as llama.cpp stores it: the `rope_freqs.weight` divisors
/// (computed as its converter computes them) give the logits of the Hugging Face model
/// with `rope_type: llama3`, with and without its PEFT LoRA; the same file without the
/// divisors would not (the counter-check), so the test sees the scaling.
#[test]
fn a_gguf_model_with_rope_freqs_gives_llama3_scaled_logits() {
    use lorakit::models::llama::RopeScaling;
    let path = fixture("gguf/model_llama3_rope.gguf");
    let config = lorakit::gguf::GgufModel::open(&path)
        .unwrap()
        .config()
        .unwrap();
    let RopeScaling::Factors(factors) = &config.rope_scaling else {
        panic!("{:?}", config.rope_scaling);
    };
    assert_eq!(factors.len(), config.head_dim / 2);
    let ids: Vec<u32> = (0..48).map(|i| (i * 13 % 61) as u32 + 1).collect();
    let ids = Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    for lora in [false, true] {
        let plan = plan("llama3_rope", lora);
        let model = LlamaForCausalLM::from_gguf(&path, DType::F32, &Device::Cpu, &plan).unwrap();
        plan.finish().unwrap();
        let got = model.forward(&ids).unwrap();
        let want = reference("llama3_rope", lora, &ids);
        let err = rel_err(&got, &want);
        assert!(err <= 1e-5, "lora={lora}: relative error {err:e}");
    }
    let base = fixture("models/llama/llama3_rope/base");
    let mut unscaled = LlamaConfig::from_file(base.join("config.json")).unwrap();
    unscaled.rope_scaling = RopeScaling::None;
    let tensors = load(&base.join("model.safetensors"));
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    let plain = LlamaForCausalLM::load(&unscaled, vb, &AdapterPlan::none()).unwrap();
    let err = rel_err(
        &plain.forward(&ids).unwrap(),
        &reference("llama3_rope", false, &ids),
    );
    assert!(err > 1e-3, "without the scaling the logits differ: {err:e}");
}
