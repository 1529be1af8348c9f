//! bitsandbytes 4-bit checkpoints (`tests/fixtures/bnb/`, made by
//! `scripts/make_bnb_fixtures.py` with transformers, bitsandbytes and PEFT): the blocks read
//! and dequantized bit for bit as bitsandbytes does, and the errors for blocks that do not
//! fit together.

use candle_core::{DType, Device, Module, Tensor};
use lorakit::checkpoint::Checkpoint;
use lorakit::model::AdapterPlan;
use lorakit::models::llama::LlamaForCausalLM;
use lorakit::peft::PeftAdapter;
use lorakit::quant::{Bnb4Type, QuantFormat};

use std::collections::HashMap;

use crate::peft_common::{assert_bit_identical, fixture, load, rel_err, temp_dir, TempDir};
use lorakit::peft::merge_checkpoint;

/// (case, code book, dtype the quant state records).
const CASES: [(&str, Bnb4Type, DType); 2] = [
    ("nf4_dq", Bnb4Type::Nf4, DType::BF16),
    ("fp4_f16", Bnb4Type::Fp4, DType::F16),
];

fn model_dir(case: &str) -> std::path::PathBuf {
    fixture(&format!("bnb/{case}/model"))
}

#[test]
fn every_4bit_weight_dequantizes_to_bitsandbytes_values_bit_for_bit() {
    for (case, quant_type, dtype) in CASES {
        let ckpt = Checkpoint::open(model_dir(case)).unwrap();
        let expected = load(&fixture(&format!("bnb/{case}/dequantized.safetensors")));
        assert_eq!(expected.len(), 7, "{case}: every linear of the layer");
        for (name, want) in &expected {
            assert!(ckpt.is_bnb4(name), "{case} {name}");
            let w = ckpt.load_bnb4(name).unwrap();
            assert_eq!(w.format(), QuantFormat::Bnb4(quant_type));
            assert_eq!([w.d_out(), w.d_in()], want.dims(), "{case} {name}");
            assert_eq!(want.dtype(), dtype);
            let got = ckpt.load_bnb4_dequantized(name).unwrap();
            assert_eq!(got.dtype(), dtype);
            assert_bit_identical(&got, want, &format!("{case} {name}"));
            // The f32 values the kernels use are the same values.
            let f32_values = w.dequantize().unwrap().to_dtype(dtype).unwrap();
            assert_bit_identical(&f32_values, want, &format!("{case} {name} (f32 blocks)"));
        }
        assert!(!ckpt.is_bnb4("model.embed_tokens.weight"));
        assert!(ckpt.has_bnb4());
        // A VarBuilder (any candle model) gets the dequantized weights, shape-checked.
        let vb = ckpt.var_builder(DType::F32, &Device::Cpu);
        let name = "model.layers.0.self_attn.o_proj.weight";
        let want = &expected[name];
        let got = vb.get(want.dims(), name).unwrap().to_dtype(dtype).unwrap();
        assert_bit_identical(&got, want, &format!("{case} var_builder"));
        let err = vb.get((3, 3), name).unwrap_err().to_string();
        assert!(
            err.contains("shape mismatch") && err.contains(name),
            "{err}"
        );
    }
}

#[test]
fn row_ranges_of_4bit_blocks_dequantize_to_the_same_rows() {
    // fp4_f16's rows of 96 values straddle its blocks of 64.
    let ckpt = Checkpoint::open(model_dir("fp4_f16")).unwrap();
    let name = "model.layers.0.self_attn.q_proj.weight";
    let whole = ckpt.load_bnb4(name).unwrap().dequantize().unwrap();
    let w = ckpt.load_bnb4(name).unwrap();
    let x = Tensor::eye(96, DType::F32, &Device::Cpu).unwrap();
    // The fused base product over the blocks (x = I gives Wᵀ), against the whole weight.
    let base = lorakit::FrozenLinear::from_quantized(w, None, DType::F32).unwrap();
    let product = base.forward(&x).unwrap();
    let diff = (product - whole.t().unwrap()).unwrap().abs().unwrap();
    assert_eq!(diff.max_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
}

/// A 4-bit checkpoint loads as transformers' model does after `model.dequantize()`: the
/// logits of the f32 model, without and with the PEFT LoRA, equal transformers + PEFT's;
/// the quantized modules keep their blocks (on the CPU), the others are float.
#[test]
fn a_4bit_checkpoint_gives_transformers_logits_with_and_without_a_lora() {
    let dev = Device::Cpu;
    for (case, quant_type, _) in CASES {
        let expected = load(&fixture(&format!("bnb/{case}/logits.safetensors")));
        let ids = &expected["input_ids"];
        let base = LlamaForCausalLM::from_pretrained(
            model_dir(case),
            DType::F32,
            &dev,
            &AdapterPlan::none(),
        )
        .unwrap();
        let diff = rel_err(&base.forward(ids).unwrap(), &expected["logits_base"]);
        assert!(diff < 1e-5, "{case} base: {diff:e}");

        let plan = PeftAdapter::load(fixture(&format!("bnb/{case}/lora")), &dev)
            .unwrap()
            .plan()
            .unwrap();
        let model =
            LlamaForCausalLM::from_pretrained(model_dir(case), DType::F32, &dev, &plan).unwrap();
        let layers = plan.finish().unwrap();
        assert_eq!(
            layers.layers().len(),
            2,
            "{case}: q_proj and down_proj adapted"
        );
        for (path, layer) in layers.layers() {
            let format = layer.read().base().quantized().map(|q| q.format());
            assert_eq!(format, Some(QuantFormat::Bnb4(quant_type)), "{case} {path}");
        }
        let logits = model.forward(ids).unwrap();
        let diff = rel_err(&logits, &expected["logits_lora"]);
        assert!(diff < 1e-5, "{case} lora: {diff:e}");
        // One token at a time (the decode product) gives the same last position.
        let one = model.forward(&ids.narrow(1, 0, 1).unwrap()).unwrap();
        let diff = rel_err(&one, &logits.narrow(1, 0, 1).unwrap());
        assert!(diff < 1e-5, "{case} one token: {diff:e}");
    }
}

/// `merge_checkpoint` of a 4-bit checkpoint writes what a PEFT user writes after QLoRA
/// training: transformers' `model.dequantize()`, the LoRA merged by PEFT, saved. Every
/// tensor (names, dtypes, shapes, bits) and the config (its `quantization_config`
/// removed) are PEFT's; the block scales, code books and quant states are gone.
#[test]
fn merging_a_lora_into_a_4bit_checkpoint_gives_pefts_dequantized_merge() {
    for (case, _, _) in CASES {
        let out = temp_dir(&format!("bnb-merge-{case}"));
        let out = out.join("merged");
        let adapter = fixture(&format!("bnb/{case}/lora"));
        let report =
            merge_checkpoint(&model_dir(case), &adapter, &out, Default::default()).unwrap();
        assert_eq!(report.merged.len(), 2, "{case}: q_proj and down_proj");
        assert!(
            report
                .config_changes
                .iter()
                .any(|c| c.contains("quantization_config")),
            "{case}: {:?}",
            report.config_changes
        );
        let got = load(&out.join("model.safetensors"));
        let want = load(&fixture(&format!("bnb/{case}/merged.safetensors")));
        let mut names: Vec<&String> = got.keys().collect();
        names.sort();
        let mut want_names: Vec<&String> = want.keys().collect();
        want_names.sort();
        assert_eq!(names, want_names, "{case}");
        for (name, w) in &want {
            assert_bit_identical(&got[name], w, &format!("{case} {name}"));
        }
        let config = |path: std::path::PathBuf| -> serde_json::Value {
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
        };
        assert_eq!(
            config(out.join("config.json")),
            config(fixture(&format!("bnb/{case}/merged_config.json"))),
            "{case}"
        );
    }
}

/// A copy of the nf4_dq (`double`) or fp4_f16 checkpoint with `edit` applied to its
/// tensors and `config_edit` to its config, in a fresh folder.
fn edited_copy(
    name: &str,
    double: bool,
    edit: impl FnOnce(&mut HashMap<String, Tensor>),
    config_edit: impl FnOnce(&mut serde_json::Value),
) -> TempDir {
    let case = if double { "nf4_dq" } else { "fp4_f16" };
    let dir = temp_dir(name);
    let mut tensors = load(&model_dir(case).join("model.safetensors"));
    edit(&mut tensors);
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
    let text = std::fs::read_to_string(model_dir(case).join("config.json")).unwrap();
    let mut config: serde_json::Value = serde_json::from_str(&text).unwrap();
    config_edit(&mut config);
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    dir
}

/// Broken 4-bit checkpoints are refused by the model loader and by the merge (which
/// leaves no output), each error naming the weight, the file and what is wrong.
#[test]
fn broken_4bit_checkpoints_are_refused_naming_the_tensor_and_the_fault() {
    const Q: &str = "model.layers.0.self_attn.q_proj.weight";
    let bytes = |s: &str| Tensor::new(s.as_bytes(), &Device::Cpu).unwrap();
    let no_config_edit = |_: &mut serde_json::Value| {};
    type Edit = Box<dyn FnOnce(&mut HashMap<String, Tensor>)>;
    let cases: Vec<(&str, bool, Edit, &str)> = vec![
        (
            "no-absmax",
            true,
            Box::new(|t| drop(t.remove(&format!("{Q}.absmax")))),
            "absmax` is missing",
        ),
        (
            "bad-json",
            true,
            Box::new(move |t| {
                let key = format!("{Q}.quant_state.bitsandbytes__nf4");
                t.insert(key, bytes("{\"quant_type\": "));
            }),
            "is not JSON",
        ),
        (
            "wrong-type",
            true,
            Box::new(move |t| {
                let key = format!("{Q}.quant_state.bitsandbytes__nf4");
                let json = r#"{"quant_type": "fp4", "blocksize": 64, "dtype": "bfloat16", "shape": [128, 128]}"#;
                t.insert(key, bytes(json));
            }),
            "says quant_type fp4",
        ),
        (
            "bad-code-book",
            false,
            Box::new(|t| {
                let key = format!("{Q}.quant_map");
                let map = (t[&key].clone() * 1.5).unwrap();
                t.insert(key, map);
            }),
            "is not bitsandbytes' fp4 code book",
        ),
        (
            "nan-scale",
            false,
            Box::new(|t| {
                let key = format!("{Q}.absmax");
                let mut v = t[&key].to_vec1::<f32>().unwrap();
                v[3] = f32::NAN;
                t.insert(key, Tensor::new(v, &Device::Cpu).unwrap());
            }),
            "block 3's scale is not finite",
        ),
        (
            "short-codes",
            false,
            Box::new(|t| {
                let short = t[Q].narrow(0, 0, 100).unwrap();
                t.insert(Q.to_string(), short);
            }),
            "100 packed bytes",
        ),
    ];
    for (name, double, edit, expected) in cases {
        let dir = edited_copy(name, double, edit, no_config_edit);
        let err = LlamaForCausalLM::from_pretrained(
            &*dir,
            DType::F32,
            &Device::Cpu,
            &AdapterPlan::none(),
        )
        .err()
        .unwrap_or_else(|| panic!("{name}: loaded"))
        .to_string();
        assert!(err.contains(expected) && err.contains(Q), "{name}: {err}");
        assert!(err.contains("model.safetensors"), "{name}: {err}");
        let out = dir.join("merged");
        let case = if double { "nf4_dq" } else { "fp4_f16" };
        let adapter = fixture(&format!("bnb/{case}/lora"));
        let err = merge_checkpoint(&dir, &adapter, &out, Default::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(expected) && err.contains(Q),
            "{name} merge: {err}"
        );
        assert!(
            !out.exists(),
            "{name}: a failed merge left {}",
            out.display()
        );
    }
}

/// bitsandbytes 8-bit (LLM.int8) configs are refused by name.
#[test]
fn an_8bit_bitsandbytes_config_is_refused_by_name() {
    let dir = edited_copy(
        "int8-config",
        true,
        |_| {},
        |c| {
            let q = &mut c["quantization_config"];
            q["load_in_4bit"] = false.into();
            q["_load_in_4bit"] = false.into();
            q["load_in_8bit"] = true.into();
        },
    );
    let err =
        LlamaForCausalLM::from_pretrained(&*dir, DType::F32, &Device::Cpu, &AdapterPlan::none())
            .err()
            .unwrap()
            .to_string();
    assert!(err.contains("8-bit (LLM.int8)"), "{err}");
}
