//! A quantized frozen base (QLoRA-style): every variant over Q8_0 / Q4_K / Q5_K / Q6_K / NF4
//! blocks computes exactly what it computes over the dequantized float weight (the
//! reference: the same layer over `FrozenLinear::new(dequantized W)`, through the float
//! fused kernel, itself tested against candle's composed ops), forward and gradients, to
//! 1e-5 relative in f32; identity at init; training lowers a loss; merges dequantize; what
//! cannot work over blocks is refused.

use crate::common::*;
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use lorakit::quant::{Bnb4Type, QuantFormat};
use lorakit::*;

const TYPES: [QuantFormat; 5] = [
    QuantFormat::Ggml(GgmlDType::Q8_0),
    QuantFormat::Ggml(GgmlDType::Q4K),
    QuantFormat::Ggml(GgmlDType::Q5K),
    QuantFormat::Ggml(GgmlDType::Q6K),
    QuantFormat::Bnb4(Bnb4Type::Nf4),
];
const VARIANTS: [Variant; 6] = [
    Variant::Lora,
    Variant::LoraFa,
    Variant::LoraDrop,
    Variant::AdaLora,
    Variant::Vera,
    Variant::Dora,
];
const TOL: f64 = 1e-5;

/// A float base `(d_out, d_in)` with a bias, and the same base quantized to `ty`.
fn bases(
    seed: u64,
    d_out: usize,
    d_in: usize,
    ty: impl Into<QuantFormat>,
) -> (FrozenLinear, FrozenLinear) {
    let mut g = rng(seed);
    let w = randn(&mut g, &[d_out, d_in], DType::F32);
    let bias = rand(&mut g, &[d_out], DType::F32);
    let q = FrozenLinear::new(w, Some(bias.clone()))
        .unwrap()
        .quantize("proj", ty)
        .unwrap();
    assert!(q.is_quantized());
    let float = FrozenLinear::new(q.dequantized_weight().unwrap(), Some(bias)).unwrap();
    (q, float)
}

/// A fresh layer of `variant` over `base` (the same seeded init for the same arguments).
fn build(variant: Variant, base: FrozenLinear, vb: VarBuilder) -> Box<dyn Adapter> {
    let (d_out, d_in) = (base.d_out(), base.d_in());
    let lora = LoraConfig::new(4, 8.0);
    let vb = vb.pp("proj");
    match variant {
        Variant::Lora => Box::new(LoraLinear::new(base, &lora, vb).unwrap()),
        Variant::LoraFa => Box::new(LoraFaLinear::new(base, &lora, vb).unwrap()),
        Variant::LoraDrop => Box::new(LoraDropLinear::new(base, &lora, vb).unwrap()),
        Variant::AdaLora => {
            Box::new(AdaLoraLinear::new(base, &AdaLoraConfig::new(4, 8.0), vb).unwrap())
        }
        Variant::Dora => Box::new(DoraLinear::new(base, &lora, vb).unwrap()),
        Variant::Vera => {
            let pair =
                VeraShared::covering(8, 3, [(d_in, d_out)], DType::F32, &Device::Cpu).unwrap();
            Box::new(VeraLinear::new(base, &VeraConfig::new(pair), vb).unwrap())
        }
        v => panic!("no builder for {v}"),
    }
}

/// Sets every trainable variable of both layers to the same random values (so that the
/// adapter term is not zero).
fn randomize_alike(seed: u64, a: &dyn Adapter, b: &dyn Adapter) {
    let mut g = rng(seed);
    let (va, vb) = (a.trainable_vars(), b.trainable_vars());
    assert_eq!(va.len(), vb.len());
    for (x, y) in va.iter().zip(&vb) {
        assert_eq!(x.name, y.name);
        let t = rand(&mut g, x.var.dims(), DType::F32);
        let t = (t * 0.5).unwrap();
        x.var.set(&t).unwrap();
        y.var.set(&t).unwrap();
    }
}

/// `y` and the gradients of `Σ y ⊙ probe` for `x` and every trainable variable.
fn forward_and_grads(layer: &dyn Adapter, x: &Var, probe: &Tensor) -> Vec<(String, Tensor)> {
    let y = layer.forward_t(x.as_tensor(), false).unwrap();
    let grads = (&y * probe).unwrap().sum_all().unwrap().backward().unwrap();
    let mut out = vec![
        ("y".to_string(), y),
        ("dx".to_string(), grads.get(x).unwrap().clone()),
    ];
    for v in layer.trainable_vars() {
        let g = grads
            .get(&v.var)
            .unwrap_or_else(|| panic!("no gradient for {}", v.name));
        out.push((format!("d{}", v.name), g.clone()));
    }
    out
}

fn compare(label: &str, got: &[(String, Tensor)], want: &[(String, Tensor)]) {
    assert_eq!(got.len(), want.len(), "{label}");
    for ((name, g), (_, w)) in got.iter().zip(want) {
        let diff = max_rel_diff(g, w);
        assert!(
            diff <= TOL,
            "{label}: {name} differs by {diff:e} (relative)"
        );
    }
}

/// Forward, input gradient and parameter gradients equal the dequantized-weight reference
/// for every quant type and variant (LoRA+ trains LoRA's layer).
#[test]
fn every_variant_matches_the_dequantized_reference() {
    let (d_in, d_out) = (256, 24);
    for (t, &ty) in TYPES.iter().enumerate() {
        let (qbase, fbase) = bases(10 + t as u64, d_out, d_in, ty);
        check_every_variant(&format!("{ty:?}"), &qbase, &fbase);
    }
}

/// The same over bitsandbytes 4-bit blocks read from a checkpoint (NF4 with double
/// quantization; FP4 with rows of 96 straddling its blocks of 64), with a bias.
#[test]
fn every_variant_over_bitsandbytes_blocks_matches_the_dequantized_reference() {
    let cases = [
        ("nf4_dq", "model.layers.0.mlp.down_proj.weight"),
        ("fp4_f16", "model.layers.0.self_attn.q_proj.weight"),
    ];
    for (case, name) in cases {
        let dir = crate::peft_common::fixture(&format!("bnb/{case}/model"));
        let w = lorakit::checkpoint::Checkpoint::open(dir)
            .unwrap()
            .load_bnb4(name)
            .unwrap();
        let bias = rand(&mut rng(3), &[w.d_out()], DType::F32);
        let float = FrozenLinear::new(w.dequantize().unwrap(), Some(bias.clone())).unwrap();
        let blocks = FrozenLinear::from_quantized(w, Some(bias), DType::F32).unwrap();
        check_every_variant(&format!("{case} {name}"), &blocks, &float);
    }
}

/// Every variant over `qbase` against the same over `fbase`, its dequantized weight:
/// identity at init, then forward and gradients with random adapter weights.
fn check_every_variant(what: &str, qbase: &FrozenLinear, fbase: &FrozenLinear) {
    let (n, d_in, d_out) = (5, qbase.d_in(), qbase.d_out());
    let mut g = rng(99);
    let x = Var::from_tensor(&rand(&mut g, &[2, n, d_in], DType::F32)).unwrap();
    let probe = rand(&mut g, &[2, n, d_out], DType::F32);
    for variant in VARIANTS {
        let label = format!("{variant} over {what}");
        let (m1, m2) = (VarMap::new(), VarMap::new());
        let dev = Device::Cpu;
        let q = build(
            variant,
            qbase.clone(),
            VarBuilder::from_varmap(&m1, DType::F32, &dev),
        );
        let f = build(
            variant,
            fbase.clone(),
            VarBuilder::from_varmap(&m2, DType::F32, &dev),
        );
        // Identity at init: the base alone.
        let y0 = q.forward_t(x.as_tensor(), false).unwrap();
        let base_y = fbase.forward(x.as_tensor()).unwrap();
        let diff = max_rel_diff(&y0, &base_y);
        assert!(
            diff <= TOL,
            "{label}: init output differs from the base by {diff:e}"
        );
        randomize_alike(7, q.as_ref(), f.as_ref());
        compare(
            &label,
            &forward_and_grads(q.as_ref(), &x, &probe),
            &forward_and_grads(f.as_ref(), &x, &probe),
        );
    }
}

/// Decode-sized forwards (1 to 5 rows: the fused dequantize-and-dot kernels up to 4, the
/// tiled product at 5) over every type equal the dequantized float layer, with a strided
/// input (every other column of a wider tensor) and an odd number of output rows.
#[test]
fn few_row_forwards_match_the_reference() {
    let (d_in, d_out) = (512, 7);
    for (t, &ty) in TYPES.iter().enumerate() {
        let (qbase, fbase) = bases(40 + t as u64, d_out, d_in, ty);
        let dev = Device::Cpu;
        let (m1, m2) = (VarMap::new(), VarMap::new());
        let q = build(
            Variant::Lora,
            qbase,
            VarBuilder::from_varmap(&m1, DType::F32, &dev),
        );
        let f = build(
            Variant::Lora,
            fbase,
            VarBuilder::from_varmap(&m2, DType::F32, &dev),
        );
        randomize_alike(9, q.as_ref(), f.as_ref());
        let mut g = rng(50 + t as u64);
        for n in 1..=5 {
            let wide = rand(&mut g, &[n, d_in, 2], DType::F32);
            let x = wide.narrow(2, 0, 1).unwrap().squeeze(2).unwrap(); // strided
            assert!(!x.is_contiguous());
            let (yq, yf) = (
                q.forward_t(&x, false).unwrap(),
                f.forward_t(&x, false).unwrap(),
            );
            let diff = max_rel_diff(&yq, &yf);
            assert!(diff <= TOL, "{ty:?}, {n} rows: differs by {diff:e}");
        }
    }
}

/// A weight of several row tiles (the tiled product's tile boundaries), f64 activations
/// (the tile converted from f32), and a dropout forward (the base and the branch apart).
#[test]
fn tiles_f64_and_dropout_match_the_reference() {
    // 300 rows of 2048: a tile holds 128 rows (1 MiB) or the chunked route's minimum width
    // if that is more (256 f32 with AVX-512, 128 with AVX2), so two or three tiles.
    let (qbase, fbase) = bases(3, 300, 2048, GgmlDType::Q4K);
    let mut g = rng(5);
    let x = Var::from_tensor(&rand(&mut g, &[3, 2048], DType::F32)).unwrap();
    let probe = rand(&mut g, &[3, 300], DType::F32);
    let dev = Device::Cpu;
    let (m1, m2) = (VarMap::new(), VarMap::new());
    let q = build(
        Variant::Dora,
        qbase.clone(),
        VarBuilder::from_varmap(&m1, DType::F32, &dev),
    );
    let f = build(
        Variant::Dora,
        fbase.clone(),
        VarBuilder::from_varmap(&m2, DType::F32, &dev),
    );
    randomize_alike(8, q.as_ref(), f.as_ref());
    compare(
        "DoRA, two tiles",
        &forward_and_grads(q.as_ref(), &x, &probe),
        &forward_and_grads(f.as_ref(), &x, &probe),
    );

    // f64 layers over the same blocks.
    let bias64 = fbase.bias().unwrap().to_dtype(DType::F64).unwrap();
    let q64 = FrozenLinear::from_quantized(
        qbase.quantized().unwrap().clone(),
        Some(bias64.clone()),
        DType::F64,
    )
    .unwrap();
    let f64_base =
        FrozenLinear::new(fbase.weight().to_dtype(DType::F64).unwrap(), Some(bias64)).unwrap();
    let x64 = x.as_tensor().to_dtype(DType::F64).unwrap();
    let diff = max_rel_diff(
        &q64.forward(&x64).unwrap(),
        &f64_base.forward(&x64).unwrap(),
    );
    assert!(diff <= 1e-12, "f64 over Q4_K blocks differs by {diff:e}");

    // Training-mode dropout: the same mask is not reproducible across layers, so compare
    // the base part alone (the branch is the float path's own).
    let cfg = LoraConfig {
        dropout: 0.5,
        ..LoraConfig::new(4, 8.0)
    };
    let m = VarMap::new();
    let layer = LoraLinear::new(
        qbase,
        &cfg,
        VarBuilder::from_varmap(&m, DType::F32, &dev).pp("p"),
    )
    .unwrap();
    let y = layer.forward_t(x.as_tensor(), true).unwrap(); // B = 0: the base alone
    let diff = max_rel_diff(&y, &fbase.forward(x.as_tensor()).unwrap());
    assert!(diff <= TOL, "dropout forward differs by {diff:e}");
}

/// A few AdamW steps of LoRA over a Q4_K base lower a regression loss (the target: the
/// base's output plus a rank-1 map of the input).
#[test]
fn training_over_a_q4k_base_lowers_the_loss() {
    let (qbase, _) = bases(21, 16, 256, GgmlDType::Q4K);
    let mut g = rng(4);
    let x = rand(&mut g, &[32, 256], DType::F32);
    let (u, v) = (
        rand(&mut g, &[16, 1], DType::F32),
        rand(&mut g, &[1, 256], DType::F32),
    );
    let shift = x
        .matmul(&(u.matmul(&v).unwrap() * 0.1).unwrap().t().unwrap())
        .unwrap();
    let target = (qbase.forward(&x).unwrap() + shift).unwrap();
    let m = VarMap::new();
    let vb = VarBuilder::from_varmap(&m, DType::F32, &Device::Cpu);
    let layer = LoraLinear::new(qbase, &LoraConfig::new(4, 8.0), vb.pp("p")).unwrap();
    let mut opt = candle_nn::AdamW::new_lr(m.all_vars(), 1e-2).unwrap();
    let loss = || {
        let y = layer.forward_t(&x, true).unwrap();
        (y - &target).unwrap().sqr().unwrap().mean_all().unwrap()
    };
    let first = loss().to_scalar::<f32>().unwrap();
    for _ in 0..20 {
        opt.backward_step(&loss()).unwrap();
    }
    let last = loss().to_scalar::<f32>().unwrap();
    assert!(last < 0.5 * first, "loss {first} -> {last}");
    assert!(layer.base().is_quantized());
}

/// Merging dequantizes: the base becomes the float weight plus ΔW, the output is kept;
/// unmerging gives back the dequantized weight (in float).
#[test]
fn merge_dequantizes_into_a_float_weight() {
    let (qbase, fbase) = bases(31, 24, 256, GgmlDType::Q6K);
    let m = VarMap::new();
    let vb = VarBuilder::from_varmap(&m, DType::F32, &Device::Cpu);
    let cfg = LoraConfig {
        init: LoraInit::BothRandom,
        ..LoraConfig::new(4, 8.0)
    };
    let mut layer = LoraLinear::new(qbase, &cfg, vb.pp("p")).unwrap();
    let x = rand(&mut rng(2), &[3, 256], DType::F32);
    let before = layer.forward_t(&x, false).unwrap();
    layer.merge(true).unwrap();
    assert!(!layer.base().is_quantized());
    let want_w = (fbase.weight() + layer.delta_weight().unwrap()).unwrap();
    assert!(max_rel_diff(layer.base().weight(), &want_w) <= TOL);
    assert!(max_rel_diff(&layer.forward_t(&x, false).unwrap(), &before) <= TOL);
    layer.unmerge().unwrap();
    assert!(max_rel_diff(layer.base().weight(), fbase.weight()) <= TOL);
    assert!(max_rel_diff(&layer.forward_t(&x, false).unwrap(), &before) <= TOL);
}

/// What cannot work over blocks is refused with an error naming the layer: Delta-LoRA
/// (it updates W), a `d_in` that is not a whole number of blocks, an embedding.
#[test]
fn refusals_name_what_is_wrong() {
    let (qbase, _) = bases(41, 8, 256, GgmlDType::Q8_0);
    let m = VarMap::new();
    let vb = VarBuilder::from_varmap(&m, DType::F32, &Device::Cpu);
    let err = DeltaLoraLinear::new(qbase, &LoraConfig::new(2, 4.0), vb.pp("attn.q"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("attn.q") && err.contains("quantized") && err.contains("Delta-LoRA"),
        "{err}"
    );

    let w = Tensor::zeros((8, 96), DType::F32, &Device::Cpu).unwrap();
    let err = FrozenLinear::new(w, None)
        .unwrap()
        .quantize("mlp.up", GgmlDType::Q4K)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("mlp.up") && err.contains("d_in = 96") && err.contains("256"),
        "{err}"
    );

    let table = Tensor::zeros((10, 256), DType::F32, &Device::Cpu).unwrap();
    let err = FrozenLinear::embedding(table)
        .unwrap()
        .quantize("embed", GgmlDType::Q8_0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("embed") && err.contains("embedding"), "{err}");
}

/// Quantize-on-load through a model's plan: a Qwen2 (transformers fixture) with a PEFT LoRA
/// and every decoder linear quantized to Q8_0 gives the logits of the same model loaded in
/// float from a checkpoint whose linear weights went through candle's own
/// quantize-dequantize; embeddings, norms and the (tied) head stay float; the adapter
/// trains over the blocks.
#[test]
fn a_model_quantized_on_load_equals_the_dequantized_checkpoint() {
    use candle_core::quantized::QTensor;
    use lorakit::model::Quantize;
    use lorakit::models::llama::{LlamaConfig, LlamaForCausalLM};
    use lorakit::peft::PeftAdapter;
    let dir = "tests/fixtures/models/llama/qwen2";
    let dev = Device::Cpu;
    let config = LlamaConfig::from_file(format!("{dir}/base/config.json")).unwrap();
    let tensors =
        candle_core::safetensors::load(format!("{dir}/base/model.safetensors"), &dev).unwrap();
    let mut rounded = std::collections::HashMap::new();
    let mut quantized = 0;
    for (name, t) in tensors {
        let t = t.to_dtype(DType::F32).unwrap();
        let t = if name.ends_with("_proj.weight") {
            quantized += 1;
            QTensor::quantize(&t, GgmlDType::Q8_0)
                .unwrap()
                .dequantize(&dev)
                .unwrap()
        } else {
            t
        };
        rounded.insert(name, t);
    }
    assert_eq!(quantized, 7 * config.num_hidden_layers);
    let ids = Tensor::new(&[[1u32, 17, 42, 5, 9]], &dev).unwrap();

    let plan = PeftAdapter::load(format!("{dir}/lora"), &dev)
        .unwrap()
        .plan()
        .unwrap();
    let vb = VarBuilder::from_tensors(rounded, DType::F32, &dev);
    let reference = LlamaForCausalLM::load(&config, vb, &plan)
        .unwrap()
        .forward(&ids)
        .unwrap();

    let plan = PeftAdapter::load(format!("{dir}/lora"), &dev)
        .unwrap()
        .plan()
        .unwrap()
        .with_quantize(Quantize::new(GgmlDType::Q8_0));
    let model =
        LlamaForCausalLM::from_pretrained(format!("{dir}/base"), DType::F32, &dev, &plan).unwrap();
    let set = plan.finish().unwrap();
    for (path, layer) in set.layers() {
        assert!(layer.read().base().is_quantized(), "{path}");
    }
    let logits = model.forward(&ids).unwrap();
    let diff = max_rel_diff(&logits, &reference);
    assert!(diff <= TOL, "logits differ by {diff:e}");
}
