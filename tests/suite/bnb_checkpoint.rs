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

use crate::peft_common::{fixture, load, rel_err};

/// (case, code book, dtype the quant state records).
const CASES: [(&str, Bnb4Type, DType); 2] = [
    ("nf4_dq", Bnb4Type::Nf4, DType::BF16),
    ("fp4_f16", Bnb4Type::Fp4, DType::F16),
];

fn model_dir(case: &str) -> std::path::PathBuf {
    fixture(&format!("bnb/{case}/model"))
}

/// How many values of `a` and `b` (of one dtype) differ in their bits: half-precision
/// values widen to f32 exactly.
fn bits_differ(a: &Tensor, b: &Tensor) -> usize {
    assert_eq!(a.dtype(), b.dtype());
    let bits = |t: &Tensor| -> Vec<u32> {
        let t = t.flatten_all().unwrap().to_dtype(DType::F32).unwrap();
        t.to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect()
    };
    bits(a)
        .iter()
        .zip(bits(b))
        .filter(|(x, y)| **x != *y)
        .count()
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
            assert_eq!(bits_differ(&got, want), 0, "{case} {name}");
            // The f32 values the kernels use are the same values.
            let f32_values = w.dequantize().unwrap().to_dtype(dtype).unwrap();
            assert_eq!(bits_differ(&f32_values, want), 0, "{case} {name}");
        }
        assert!(!ckpt.is_bnb4("model.embed_tokens.weight"));
        assert!(ckpt.has_bnb4());
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
