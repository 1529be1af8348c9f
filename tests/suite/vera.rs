//! VeRA: identity at init, PEFT's math by hand in f64, one shared pair, trainable counts,
//! merge/unmerge, training, finite differences, errors.

use crate::common::*;
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use lorakit::kernels::{FusedLinear, LowRankTerm};
use lorakit::{Adapter, FrozenLinear, Variant, VeraConfig, VeraLinear, VeraShared, VeraWeights};

/// A pair of rank `r` covering `bases` (seed 0, PEFT's default), in f32.
fn covering(r: usize, bases: &[FrozenLinear]) -> VeraShared {
    let shapes = bases.iter().map(|b| (b.d_in(), b.d_out()));
    VeraShared::covering(r, 0, shapes, DType::F32, &Device::Cpu).unwrap()
}

/// A layer from given vectors over `shared`.
fn from_vectors(
    name: &str,
    base: FrozenLinear,
    shared: &VeraShared,
    lambda_d: Tensor,
    lambda_b: Tensor,
) -> lorakit::Result<VeraLinear> {
    let weights = VeraWeights { lambda_d, lambda_b };
    VeraLinear::from_weights(name, base, &VeraConfig::new(shared.clone()), weights)
}

fn base(g: &mut lorakit::init::SeededRng, d_in: usize, d_out: usize, dtype: DType) -> FrozenLinear {
    let w = rand(g, &[d_out, d_in], dtype);
    let b = rand(g, &[d_out], dtype);
    FrozenLinear::new(w, Some(b)).unwrap()
}

/// PEFT's forward by hand: `x Wᵀ + b + λ_b ⊙ ((λ_d ⊙ (x A[:, :d_in]ᵀ)) B[:d_out]ᵀ)`.
fn reference(layer: &VeraLinear, x: &M) -> M {
    let base = layer.base();
    let (d_in, d_out) = (base.d_in(), base.d_out());
    let a: M = mat(layer.shared().a())
        .iter()
        .map(|r| r[..d_in].to_vec())
        .collect();
    let b: M = mat(layer.shared().b())[..d_out].to_vec();
    let ld = vec1(layer.lambda_d().as_tensor());
    let lb = vec1(layer.lambda_b().as_tensor());
    let low = scale_cols(&linear(&scale_cols(&linear(x, &a), &ld), &b), &lb);
    let bias = vec1(base.bias().unwrap());
    add(
        &add_bias(&linear(x, &mat(base.weight())), Some(&bias)),
        &low,
    )
}

/// Layers of three shapes over one pair, with random λ's (built from tensors).
fn layers(dtype: DType) -> (VeraShared, Vec<VeraLinear>, lorakit::init::SeededRng) {
    let mut g = rng(20);
    let shapes = [(12, 10), (8, 16), (12, 16)];
    let shared = VeraShared::new(4, 12, 16, 7, dtype, &Device::Cpu).unwrap();
    let layers = shapes
        .iter()
        .enumerate()
        .map(|(i, &(d_in, d_out))| {
            let b = base(&mut g, d_in, d_out, dtype);
            let ld = rand(&mut g, &[4], dtype);
            let lb = rand(&mut g, &[d_out], dtype);
            from_vectors(&format!("l{i}"), b, &shared, ld, lb).unwrap()
        })
        .collect();
    (shared, layers, g)
}

#[test]
fn identity_at_init_and_parameter_counts() {
    let dev = Device::Cpu;
    let mut g = rng(21);
    let bases = [
        base(&mut g, 12, 10, DType::F32),
        base(&mut g, 8, 16, DType::F32),
    ];
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let shared = covering(6, &bases);
    let config = VeraConfig::new(shared.clone());
    let built: Vec<VeraLinear> = bases
        .iter()
        .enumerate()
        .map(|(i, b)| VeraLinear::new(b.clone(), &config, vb.pp(format!("l{i}"))).unwrap())
        .collect();
    assert_eq!(
        (shared.max_d_in(), shared.max_d_out(), shared.rank()),
        (12, 16, 6)
    );
    for (layer, b) in built.iter().zip(&bases) {
        assert_eq!(layer.kind(), Variant::Vera);
        let x = rand(&mut g, &[3, b.d_in()], DType::F32);
        let got = layer.forward_t(&x, true).unwrap();
        assert!(max_rel_diff(&got, &b.forward(&x).unwrap()) == 0.0);
        assert!(vec1(layer.lambda_d().as_tensor())
            .iter()
            .all(|&v| (v - 0.1).abs() < 1e-7));
    }
    let total: usize = built.iter().map(|l| l.num_trainable_params()).sum();
    assert_eq!(total, (10 + 6) + (16 + 6));
    assert_eq!(varmap.all_vars().len(), 4);
}

#[test]
fn all_layers_hold_the_same_shared_storage() {
    let (shared, layers, _) = layers(DType::F32);
    let (sa, _) = shared.a().storage_and_layout();
    let (sb, _) = shared.b().storage_and_layout();
    for layer in &layers {
        assert!(layer.shared().ptr_eq(&shared));
        let (la, _) = layer.shared().a().storage_and_layout();
        let (lb, _) = layer.shared().b().storage_and_layout();
        assert!(std::ptr::eq(&*la, &*sa));
        assert!(std::ptr::eq(&*lb, &*sb));
    }
    // The per-layer A slice used by the forward reads that storage (d_in = max d_in).
    let sliced = layers[0].sliced_a().unwrap();
    let (ss, _) = sliced.storage_and_layout();
    assert!(std::ptr::eq(&*ss, &*sa));
}

#[test]
fn forward_matches_pefts_math_and_the_composed_reference() {
    let (_, layers, mut g) = layers(DType::F64);
    for layer in &layers {
        let x = rand(&mut g, &[5, layer.base().d_in()], DType::F64);
        let want = reference(layer, &mat(&x));
        for train in [false, true] {
            let got = mat(&layer.forward_t(&x, train).unwrap());
            assert!(
                max_rel_diff_m(&got, &want) < 1e-12,
                "{} train {train}",
                layer.name()
            );
        }
        // The composed op with PEFT's own factorization, A_eff = λ_d ⊙ A_s, B_eff = λ_b ⊙ B_s.
        let a_eff = layer
            .sliced_a()
            .unwrap()
            .broadcast_mul(&layer.lambda_d().as_tensor().unsqueeze(1).unwrap())
            .unwrap();
        let b_eff = layer
            .sliced_b()
            .unwrap()
            .broadcast_mul(&layer.lambda_b().as_tensor().unsqueeze(1).unwrap())
            .unwrap();
        let composed = FusedLinear {
            weight: layer.base().weight(),
            bias: layer.base().bias(),
            low_rank: Some(LowRankTerm {
                a: &a_eff,
                b: &b_eff,
                scale: 1.0,
            }),
            row_scale: None,
        }
        .forward_composed(&x)
        .unwrap();
        assert!(max_rel_diff(&layer.forward(&x).unwrap(), &composed) < 1e-12);
    }
}

#[test]
fn merge_equals_forward_and_unmerge_restores() {
    let (_, mut layers, mut g) = layers(DType::F64);
    for layer in layers.iter_mut() {
        let w0 = layer.base().weight().clone();
        let x = rand(&mut g, &[4, layer.base().d_in()], DType::F64);
        let y0 = layer.forward(&x).unwrap();
        layer.merge(true).unwrap();
        assert!(max_rel_diff(&layer.forward(&x).unwrap(), &y0) < 1e-12);
        layer.unmerge().unwrap();
        assert!(max_rel_diff(layer.base().weight(), &w0) < 1e-14);
        assert!(max_rel_diff(&layer.forward(&x).unwrap(), &y0) < 1e-12);
    }
}

#[test]
fn training_changes_only_the_lambdas() {
    let dev = Device::Cpu;
    let mut g = rng(22);
    let bases = [
        base(&mut g, 12, 10, DType::F32),
        base(&mut g, 8, 16, DType::F32),
    ];
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let shared = covering(4, &bases);
    let config = VeraConfig {
        dropout: 0.1,
        ..VeraConfig::new(shared.clone())
    };
    let layers: Vec<VeraLinear> = bases
        .iter()
        .enumerate()
        .map(|(i, b)| VeraLinear::new(b.clone(), &config, vb.pp(format!("l{i}"))).unwrap())
        .collect();
    let (a0, b0) = (shared.a().copy().unwrap(), shared.b().copy().unwrap());
    let before: Vec<Vec<Tensor>> = layers
        .iter()
        .map(|l| {
            l.trainable_vars()
                .iter()
                .map(|v| v.var.as_tensor().copy().unwrap())
                .collect()
        })
        .collect();
    let mut opt = candle_nn::AdamW::new_lr(varmap.all_vars(), 1e-2).unwrap();
    let xs: Vec<(Tensor, Tensor)> = bases
        .iter()
        .map(|b| {
            (
                rand(&mut g, &[8, b.d_in()], DType::F32),
                rand(&mut g, &[8, b.d_out()], DType::F32),
            )
        })
        .collect();
    for _ in 0..3 {
        let mut loss = Tensor::zeros((), DType::F32, &dev).unwrap();
        for (layer, (x, t)) in layers.iter().zip(&xs) {
            let y = layer.forward_t(x, true).unwrap();
            loss = (loss + (y - t).unwrap().sqr().unwrap().mean_all().unwrap()).unwrap();
        }
        opt.backward_step(&loss).unwrap();
    }
    for ((layer, old), b) in layers.iter().zip(&before).zip(&bases) {
        for (v, o) in layer.trainable_vars().iter().zip(old) {
            assert!(!bit_identical(v.var.as_tensor(), o), "{} unchanged", v.name);
        }
        assert!(bit_identical(layer.base().weight(), b.weight()));
    }
    assert!(bit_identical(shared.a(), &a0));
    assert!(bit_identical(shared.b(), &b0));
}

#[test]
fn gradients_match_finite_differences() {
    let (_, layers, mut g) = layers(DType::F64);
    let layer = &layers[1]; // smaller than the pair in d_in: exercises slicing
    let x = rand(&mut g, &[5, layer.base().d_in()], DType::F64);
    let rw = rand(&mut g, &[5, layer.base().d_out()], DType::F64);
    let loss = || {
        let y = layer.forward_t(&x, true).unwrap();
        (y * &rw).unwrap().sum_all().unwrap()
    };
    let grads = loss().backward().unwrap();
    for v in layer.trainable_vars() {
        let an = flat(grads.get(v.var.as_tensor()).unwrap());
        let fd = fd_grad_var(&v.var, 1e-5, || loss().to_scalar::<f64>().unwrap());
        let err = rel_err(&an, &fd);
        assert!(err <= 1e-6, "{}: relative error {err}", v.name);
    }
}

#[test]
fn pair_init_follows_pefts_kaiming_uniform() {
    let s = VeraShared::new(8, 50, 30, 3, DType::F64, &Device::Cpu).unwrap();
    assert_eq!(s.a().dims(), &[8, 50]);
    assert_eq!(s.b().dims(), &[30, 8]);
    let (ba, bb) = ((6.0f64 / 50.0).sqrt(), (6.0f64 / 8.0).sqrt());
    let a = flat(s.a());
    let b = flat(s.b());
    assert!(a.iter().all(|v| v.abs() <= ba));
    assert!(b.iter().all(|v| v.abs() <= bb));
    // Spread over the range, not concentrated: the max is near the bound.
    assert!(a.iter().fold(0f64, |m, v| m.max(v.abs())) > 0.9 * ba);
    let again = VeraShared::new(8, 50, 30, 3, DType::F64, &Device::Cpu).unwrap();
    assert!(bit_identical(again.a(), s.a()) && bit_identical(again.b(), s.b()));
    let other = VeraShared::new(8, 50, 30, 4, DType::F64, &Device::Cpu).unwrap();
    assert!(!bit_identical(other.a(), s.a()));
}

#[test]
fn layer_larger_than_the_pair_is_an_error() {
    let mut g = rng(23);
    let shared = VeraShared::new(4, 8, 8, 0, DType::F32, &Device::Cpu).unwrap();
    let big = base(&mut g, 9, 8, DType::F32);
    let ld = rand(&mut g, &[4], DType::F32);
    let lb = rand(&mut g, &[8], DType::F32);
    let err = from_vectors("enc.big", big.clone(), &shared, ld, lb).unwrap_err();
    assert!(err.to_string().contains("enc.big"), "{err}");
    // A fresh layer over a pair too small for it.
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let config = VeraConfig::new(shared.clone());
    let err = VeraLinear::new(big, &config, vb.pp("enc.big")).unwrap_err();
    assert!(err.to_string().contains("enc.big"), "{err}");
    // Loaded vectors whose λ_d length is not the pair's rank.
    let small = base(&mut g, 4, 4, DType::F32);
    let (ld3, lb4) = (
        rand(&mut g, &[3], DType::F32),
        rand(&mut g, &[4], DType::F32),
    );
    assert!(from_vectors("s", small, &shared, ld3, lb4).is_err());
}

#[test]
fn saved_tensors_use_peft_names() {
    let (shared, layers, _) = layers(DType::F32);
    let names: Vec<(String, Vec<usize>)> = layers[1]
        .tensors_to_save()
        .unwrap()
        .into_iter()
        .map(|(n, t)| (n, t.dims().to_vec()))
        .collect();
    assert_eq!(
        names,
        [
            ("vera_lambda_b".to_string(), vec![16]),
            ("vera_lambda_d".to_string(), vec![4])
        ]
    );
    let model: Vec<String> = shared
        .tensors_to_save()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(model, ["vera_A", "vera_B"]);
    // The layers name the pair as a model-level tensor (saved once, `base_model.`-prefixed).
    let from_layer: Vec<String> = layers[0]
        .model_tensors()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(from_layer, model);
}
