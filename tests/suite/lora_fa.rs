//! LoRA-FA: A frozen (a constant), B trained; identity at init, hand reference in f64,
//! merge/unmerge, training, finite differences, scale rules.

use crate::common::*;
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use lorakit::kernels::{FusedLinear, LowRankTerm};
use lorakit::low_rank::{Factor, LowRankPair};
use lorakit::{
    Adapter, FrozenLinear, LoraConfig, LoraFaConfig, LoraFaLinear, LoraInit, LoraLinear, Variant,
};

fn base(g: &mut lorakit::init::SeededRng, d_in: usize, d_out: usize, dtype: DType) -> FrozenLinear {
    FrozenLinear::new(
        rand(g, &[d_out, d_in], dtype),
        Some(rand(g, &[d_out], dtype)),
    )
    .unwrap()
}

/// A LoRA-FA layer loaded from plain tensors (as from a file): `a` frozen, `b` trained.
fn from_tensors(
    name: &str,
    base: FrozenLinear,
    a: Tensor,
    b: Tensor,
    scale: f64,
) -> lorakit::Result<LoraFaLinear> {
    let r = a.dims()[0];
    let pair = LowRankPair {
        a: Factor::Frozen(a),
        b: Factor::Frozen(b),
    };
    let config = LoraFaConfig {
        alpha: scale * r as f64, // scale = alpha / r
        ..LoraFaConfig::new(r, 1.0)
    };
    LoraFaLinear::from_weights(name, base, &config, pair)
}

/// A loaded LoRA-FA layer with non-zero B.
fn loaded(dtype: DType, seed: u64) -> (LoraFaLinear, lorakit::init::SeededRng) {
    let mut g = rng(seed);
    let b0 = base(&mut g, 9, 7, dtype);
    let a = rand(&mut g, &[3, 9], dtype);
    let b = rand(&mut g, &[7, 3], dtype);
    (from_tensors("mlp.up", b0, a, b, 2.0).unwrap(), g)
}

/// `x Wᵀ + b + s (x Aᵀ) Bᵀ` by hand.
fn reference(layer: &LoraLinear, x: &M) -> M {
    let base = layer.base();
    let pair = layer.pair();
    let low = scale(
        &linear(&linear(x, &mat(pair.a.tensor())), &mat(pair.b.tensor())),
        layer.scale(),
    );
    let bias = vec1(base.bias().unwrap());
    add(
        &add_bias(&linear(x, &mat(base.weight())), Some(&bias)),
        &low,
    )
}

#[test]
fn identity_at_init_and_only_b_is_a_variable() {
    let dev = Device::Cpu;
    let mut g = rng(30);
    let b = base(&mut g, 12, 10, DType::F32);
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let layer = LoraFaLinear::new(b.clone(), &LoraFaConfig::new(4, 8.0), vb.pp("q")).unwrap();
    assert_eq!(layer.kind(), Variant::LoraFa);
    assert!(layer.lora().pair().a.var().is_none());
    assert!(!layer.lora().pair().a.tensor().is_variable());
    let x = rand(&mut g, &[5, 12], DType::F32);
    for train in [false, true] {
        let y = layer.forward_t(&x, train).unwrap();
        assert!(max_rel_diff(&y, &b.forward(&x).unwrap()) == 0.0);
    }
    assert_eq!(layer.num_trainable_params(), 10 * 4);
    let names: Vec<String> = layer.trainable_vars().into_iter().map(|v| v.name).collect();
    assert_eq!(names, ["lora_B"]);
    assert_eq!(varmap.all_vars().len(), 1);
    // A is LoRA's init for the same layer name and seed.
    let (a_lora, _) = LoraConfig::new(4, 8.0).init_pair("q", &b).unwrap();
    assert!(bit_identical(layer.lora().pair().a.tensor(), &a_lora));
}

#[test]
fn forward_matches_hand_reference_and_composed_op() {
    let (layer, mut g) = loaded(DType::F64, 31);
    let x = rand(&mut g, &[4, 9], DType::F64);
    let want = reference(layer.lora(), &mat(&x));
    for train in [false, true] {
        let got = mat(&layer.forward_t(&x, train).unwrap());
        assert!(max_rel_diff_m(&got, &want) < 1e-12);
    }
    let composed = FusedLinear {
        weight: layer.base().weight(),
        bias: layer.base().bias(),
        low_rank: Some(LowRankTerm {
            a: layer.lora().pair().a.tensor(),
            b: layer.lora().pair().b.tensor(),
            scale: 2.0,
        }),
        row_scale: None,
    }
    .forward_composed(&x)
    .unwrap();
    assert!(max_rel_diff(&layer.forward(&x).unwrap(), &composed) < 1e-12);
}

#[test]
fn merge_equals_forward_and_unmerge_restores() {
    let (mut layer, mut g) = loaded(DType::F64, 32);
    let w0 = layer.base().weight().clone();
    let x = rand(&mut g, &[4, 9], DType::F64);
    let y0 = layer.forward(&x).unwrap();
    layer.merge(true).unwrap();
    let want_w = add(
        &mat(&w0),
        &scale(
            &matmul(
                &mat(layer.lora().pair().b.tensor()),
                &mat(layer.lora().pair().a.tensor()),
            ),
            2.0,
        ),
    );
    assert!(max_rel_diff_m(&mat(layer.base().weight()), &want_w) < 1e-14);
    assert!(max_rel_diff(&layer.forward(&x).unwrap(), &y0) < 1e-12);
    layer.unmerge().unwrap();
    assert!(max_rel_diff(layer.base().weight(), &w0) < 1e-14);
}

#[test]
fn training_changes_b_only() {
    let dev = Device::Cpu;
    let mut g = rng(33);
    let b = base(&mut g, 12, 10, DType::F32);
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let config = LoraConfig {
        dropout: 0.1,
        ..LoraConfig::new(4, 8.0)
    };
    let layer = LoraFaLinear::new(b.clone(), &config, vb.pp("q")).unwrap();
    let a0 = layer.lora().pair().a.tensor().copy().unwrap();
    let b0 = layer.lora().pair().b.tensor().copy().unwrap();
    let mut opt = candle_nn::AdamW::new_lr(varmap.all_vars(), 1e-2).unwrap();
    let x = rand(&mut g, &[16, 12], DType::F32);
    let t = rand(&mut g, &[16, 10], DType::F32);
    for _ in 0..3 {
        let y = layer.forward_t(&x, true).unwrap();
        let loss = (y - &t).unwrap().sqr().unwrap().mean_all().unwrap();
        opt.backward_step(&loss).unwrap();
    }
    assert!(!bit_identical(layer.lora().pair().b.tensor(), &b0));
    assert!(bit_identical(layer.lora().pair().a.tensor(), &a0));
    assert!(bit_identical(layer.base().weight(), b.weight()));
    assert!(bit_identical(
        layer.base().bias().unwrap(),
        b.bias().unwrap()
    ));
}

#[test]
fn gradient_of_b_matches_finite_differences() {
    let (layer, mut g) = loaded(DType::F64, 34);
    let x = rand(&mut g, &[5, 9], DType::F64);
    let rw = rand(&mut g, &[5, 7], DType::F64);
    let loss = || {
        (layer.forward_t(&x, true).unwrap() * &rw)
            .unwrap()
            .sum_all()
            .unwrap()
    };
    let grads = loss().backward().unwrap();
    let vb = layer.lora().pair().b.var().unwrap();
    let an = flat(grads.get(vb.as_tensor()).unwrap());
    let fd = fd_grad_var(vb, 1e-5, || loss().to_scalar::<f64>().unwrap());
    let err = rel_err(&an, &fd);
    assert!(err <= 1e-6, "relative error {err}");
}

#[test]
fn scale_rules_are_loras() {
    let dev = Device::Cpu;
    let mut g = rng(35);
    let b = base(&mut g, 8, 8, DType::F32);
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let plain = LoraFaLinear::new(b.clone(), &LoraConfig::new(4, 8.0), vb.pp("a")).unwrap();
    assert_eq!(plain.lora().scale(), 2.0);
    let rs = LoraConfig {
        use_rslora: true,
        init: LoraInit::Gaussian,
        ..LoraConfig::new(4, 8.0)
    };
    let rs = LoraFaLinear::new(b.clone(), &rs, vb.pp("b")).unwrap();
    assert_eq!(rs.lora().scale(), 4.0);
    assert!(LoraFaLinear::new(b.clone(), &LoraConfig::new(0, 8.0), vb.pp("c")).is_err());
    let bad_b = Tensor::zeros((8, 5), DType::F32, &dev).unwrap();
    let a = Tensor::zeros((4, 8), DType::F32, &dev).unwrap();
    let err = from_tensors("enc.q", b, a, bad_b, 1.0).unwrap_err();
    assert!(err.to_string().contains("enc.q"), "{err}");
}
