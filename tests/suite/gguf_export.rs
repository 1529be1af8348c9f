//! `lorakit::gguf`: PEFT LoRA adapters exported as llama.cpp LoRA adapters, and GGUF models
//! read under Hugging Face names, against references made by llama.cpp's own gguf-py and
//! the logic of its converters (`scripts/make_gguf_fixtures.py`, `tests/fixtures/gguf/`):
//! adapters converted as `convert_lora_to_gguf.py` converts them, PEFT's own delta weights
//! for the rsLoRA / pattern case the converter mis-scales, and GGUF models written as
//! `convert_hf_to_gguf.py` writes them (q/k rows permuted, one tensor Q8_0).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use lorakit::gguf::names::hf_module;
use lorakit::gguf::{export_gguf, GgufDType, GgufExportOptions, GgufModel};
use lorakit::models::llama::{LlamaConfig, LlamaFamily};

use crate::peft_common::{fixture, listing, load, rel_err, temp_dir};

/// A GGUF file read with candle's reader: metadata and every tensor dequantized to f32.
struct Read {
    meta: BTreeMap<String, Value>,
    tensors: BTreeMap<String, (GgmlDType, Tensor)>,
}

fn read(path: &Path) -> Read {
    let mut f = File::open(path).unwrap();
    let content = Content::read(&mut f).unwrap();
    let mut tensors = BTreeMap::new();
    for name in content.tensor_infos.keys() {
        let q = content.tensor(&mut f, name, &Device::Cpu).unwrap();
        let t = q.dequantize(&Device::Cpu).unwrap();
        tensors.insert(name.clone(), (q.dtype(), t));
    }
    Read {
        meta: content.metadata.into_iter().collect(),
        tensors,
    }
}

fn string(r: &Read, key: &str) -> String {
    r.meta[key].to_string().unwrap().clone()
}

/// The adapter folder and base model folder of a fixture case.
fn case(name: &str) -> (PathBuf, PathBuf) {
    match name {
        "llama_embed" => {
            let d = fixture("peft_options/llama_embed");
            (d.join("adapter"), d.join("base"))
        }
        _ => {
            let d = fixture("models/llama").join(name);
            (d.join("lora"), d.join("base"))
        }
    }
}

fn export(name: &str, dtype: GgufDType, out: &Path) -> lorakit::gguf::GgufExportReport {
    let (adapter, base) = case(name);
    export_gguf(&adapter, &base, out, &GgufExportOptions { dtype }).unwrap()
}

#[test]
fn export_equals_the_converters_file() {
    let dir = temp_dir("gguf-ref");
    for name in ["mistral", "qwen3", "llama_embed"] {
        let out = dir.join(format!("{name}.gguf"));
        let report = export(name, GgufDType::F32, &out);
        assert!(report.notes.is_empty(), "{name}: {:?}", report.notes);
        let got = read(&out);
        let want = read(&fixture("gguf").join(format!("adapter_{name}.gguf")));
        for key in [
            "general.architecture",
            "general.type",
            "adapter.type",
            "general.file_type",
            "general.quantization_version",
        ] {
            assert_eq!(
                format!("{:?}", got.meta[key]),
                format!("{:?}", want.meta[key]),
                "{name}: {key}"
            );
        }
        assert_eq!(
            got.meta["adapter.lora.alpha"].to_f32().unwrap(),
            want.meta["adapter.lora.alpha"].to_f32().unwrap(),
            "{name}"
        );
        assert_eq!(string(&got, "general.type"), "adapter");
        let names = |r: &Read| r.tensors.keys().cloned().collect::<Vec<_>>();
        assert_eq!(names(&got), names(&want), "{name}");
        assert_eq!(report.pairs * 2, got.tensors.len());
        for (t, (dtype, value)) in &got.tensors {
            let (want_dtype, want_value) = &want.tensors[t];
            assert_eq!(
                (dtype, value.dims()),
                (want_dtype, want_value.dims()),
                "{name} {t}"
            );
            assert_eq!(
                value.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                want_value.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                "{name} {t}"
            );
        }
    }
    assert_eq!(listing(&dir).len(), 3, "no temporaries left");
}

#[test]
fn half_precision_exports_round_the_f32_values() {
    let dir = temp_dir("gguf-half");
    let want = read(&fixture("gguf/adapter_mistral.gguf"));
    for (dtype, ggml, candle) in [
        (GgufDType::F16, GgmlDType::F16, DType::F16),
        (GgufDType::BF16, GgmlDType::BF16, DType::BF16),
    ] {
        let out = dir.join("a.gguf");
        export("mistral", dtype, &out);
        let got = read(&out);
        for (t, (d, value)) in &got.tensors {
            assert_eq!(*d, ggml, "{t}");
            let rounded = want.tensors[t].1.to_dtype(candle).unwrap();
            let rounded = rounded.to_dtype(DType::F32).unwrap();
            assert_eq!(
                value.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                rounded.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                "{t}"
            );
        }
        let file_type = got.meta["general.file_type"].to_u32().unwrap();
        assert_eq!(file_type, if ggml == GgmlDType::F16 { 1 } else { 32 });
    }
}

/// The qwen2 adapter has rsLoRA, a rank_pattern and an alpha_pattern: llama.cpp's
/// `alpha / rank · lora_b @ lora_a` from the exported file must equal PEFT's own delta.
#[test]
fn rslora_and_patterns_scale_as_peft_does() {
    let dir = temp_dir("gguf-qwen2");
    let out = dir.join("qwen2.gguf");
    let report = export("qwen2", GgufDType::F32, &out);
    assert!(
        report.notes.iter().any(|n| n.contains("use_rslora")),
        "{:?}",
        report.notes
    );
    assert!(
        report
            .notes
            .iter()
            .any(|n| n.contains("o_proj") && n.contains("multiplied")),
        "{:?}",
        report.notes
    );
    let got = read(&out);
    let alpha = f64::from(got.meta["adapter.lora.alpha"].to_f32().unwrap());
    let deltas = load(&fixture("gguf/qwen2_delta.safetensors"));
    let mut seen = BTreeSet::new();
    for (name, (_, a)) in got.tensors.iter().filter(|(n, _)| n.ends_with(".lora_a")) {
        let base = name.strip_suffix(".weight.lora_a").unwrap();
        let b = &got.tensors[&format!("{base}.weight.lora_b")].1;
        let rank = b.dims()[1] as f64;
        let delta = (b.matmul(a).unwrap() * (alpha / rank)).unwrap();
        let module = hf_module(base).unwrap();
        assert!(rel_err(&delta, &deltas[&module]) < 1e-5, "{module}");
        seen.insert(module);
    }
    assert_eq!(seen, deltas.keys().cloned().collect());
}

/// An export that must fail: the error contains `want`, and `out` is as it was.
fn refused(adapter: &Path, base: &Path, want: &str) {
    let dir = temp_dir(&format!("gguf-refused-{}", want.replace(' ', "_")));
    let out = dir.join("adapter.gguf");
    std::fs::write(&out, b"previous").unwrap();
    let err = export_gguf(adapter, base, &out, &GgufExportOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains(want), "`{want}` not in: {err}");
    assert_eq!(std::fs::read(&out).unwrap(), b"previous");
    assert_eq!(listing(&dir), ["adapter.gguf"]);
}

/// A LoRA adapter folder with one pair on `module` and `config` merged into a plain config.
fn write_adapter(dir: &Path, module: &str, extra_config: &str) {
    std::fs::create_dir_all(dir).unwrap();
    let config = format!(
        r#"{{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["{}"]{extra_config}}}"#,
        module.rsplit('.').next().unwrap()
    );
    std::fs::write(dir.join("adapter_config.json"), config).unwrap();
    let t = Tensor::ones((2, 32), DType::F32, &Device::Cpu).unwrap();
    let b = Tensor::ones((32, 2), DType::F32, &Device::Cpu).unwrap();
    let tensors = [
        (format!("base_model.model.{module}.lora_A.weight"), t),
        (format!("base_model.model.{module}.lora_B.weight"), b),
    ];
    candle_core::safetensors::save(
        &tensors.into_iter().collect(),
        dir.join("adapter_model.safetensors"),
    )
    .unwrap();
}

#[test]
fn what_llama_cpp_cannot_hold_is_refused_and_nothing_is_written() {
    let (_, mistral) = case("mistral");
    // DoRA, VeRA: no place in llama.cpp's format.
    refused(&fixture("dora/adapter"), &mistral, "DoRA");
    refused(&fixture("vera/adapter"), &mistral, "VERA");
    // lm_head on tied embeddings: llama.cpp's model has no output tensor.
    let (adapter, base) = case("linear_rope");
    refused(&adapter, &base, "tied embeddings");
    // The adapter of another model (qwen3's heads are 16 wide, mistral's 12).
    let (qwen3, _) = case("qwen3");
    refused(&qwen3, &mistral, "wrong --base");
    // A module llama.cpp has no tensor for, named.
    let dir = temp_dir("gguf-bad-adapters");
    let unknown = dir.join("unknown");
    write_adapter(&unknown, "model.layers.0.mlp.fc1", "");
    refused(&unknown, &mistral, "model.layers.0.mlp.fc1");
    // A missing weights file, named.
    let missing = dir.join("missing");
    write_adapter(&missing, "model.layers.0.self_attn.o_proj", "");
    std::fs::remove_file(missing.join("adapter_model.safetensors")).unwrap();
    refused(&missing, &mistral, "adapter_model.safetensors");
    // lora_bias.
    let bias = dir.join("bias");
    write_adapter(
        &bias,
        "model.layers.0.self_attn.o_proj",
        r#", "lora_bias": true"#,
    );
    refused(&bias, &mistral, "lora_bias");
}

#[test]
fn a_gguf_model_reads_back_as_the_hf_checkpoint() {
    for name in ["mistral", "qwen2"] {
        let base = fixture("models/llama").join(name).join("base");
        let model = GgufModel::open(fixture("gguf").join(format!("model_{name}.gguf"))).unwrap();
        let hf = load(&base.join("model.safetensors"));
        let hf_names: Vec<String> = {
            let mut v: Vec<String> = hf.keys().cloned().collect();
            v.sort();
            v
        };
        assert_eq!(model.hf_names(), hf_names, "{name}");
        for (key, want) in &hf {
            let q = model.qtensor(key, &Device::Cpu).unwrap();
            let got = q.dequantize(&Device::Cpu).unwrap();
            assert_eq!(got.dims(), want.dims(), "{name} {key}");
            if q.dtype() == GgmlDType::Q8_0 {
                // Q8_0 rounds; a wrong row order would be off by O(1), not O(1e-2).
                assert!(rel_err(&got, want) < 1e-2, "{name} {key}");
            } else {
                let want = want.to_dtype(DType::F32).unwrap();
                assert_eq!(
                    got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    "{name} {key}"
                );
            }
        }
        assert!(model
            .qtensor("model.layers.9.mlp.up_proj.weight", &Device::Cpu)
            .is_err());

        let got = model.config().unwrap();
        let mut want = LlamaConfig::from_file(&base).unwrap();
        // GGUF stores eps as f32; llama.cpp converts Mistral to the llama architecture,
        // without its sliding window.
        assert!((got.rms_norm_eps - want.rms_norm_eps).abs() < 1e-12);
        want.rms_norm_eps = got.rms_norm_eps;
        if want.family == LlamaFamily::Mistral {
            want.family = LlamaFamily::Llama;
            want.layer_attention = got.layer_attention.clone();
        }
        assert_eq!(got, want, "{name}");
    }
}

#[test]
fn an_adapter_is_not_a_model() {
    let err = GgufModel::open(fixture("gguf/adapter_qwen3.gguf"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("adapter"), "{err}");
    let err = GgufModel::open(fixture("gguf/qwen2_delta.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("GGUF"), "{err}");
}

/// An activated LoRA's invocation tokens go to the key llama.cpp's loader reads
/// (`adapter.alora.invocation_tokens`, u32 array), as convert_lora_to_gguf.py writes them.
#[test]
fn alora_invocation_tokens_are_written() {
    let dir = temp_dir("gguf-alora");
    let adapter = dir.join("alora");
    // qwen2's o_proj is 32 → 32, the shape write_adapter makes.
    write_adapter(
        &adapter,
        "model.layers.0.self_attn.o_proj",
        r#", "alora_invocation_tokens": [5, 7]"#,
    );
    let out = dir.join("a.gguf");
    let (_, qwen2) = case("qwen2");
    export_gguf(&adapter, &qwen2, &out, &GgufExportOptions::default()).unwrap();
    let got = read(&out);
    let tokens: Vec<u32> = got.meta["adapter.alora.invocation_tokens"]
        .to_vec()
        .unwrap()
        .iter()
        .map(|v| v.to_u32().unwrap())
        .collect();
    assert_eq!(tokens, [5, 7]);
    assert_eq!(got.meta["adapter.lora.alpha"].to_f32().unwrap(), 4.0);
    // A string the converter would tokenize with the base tokenizer: refused, by name.
    let s = dir.join("string");
    write_adapter(
        &s,
        "model.layers.0.self_attn.o_proj",
        r#", "invocation_string": "<|assistant|>""#,
    );
    refused(&s, &qwen2, "invocation_string");
}
