//! DoRA: identity at init, PEFT's math by hand in f64, factored norms, gradients against
//! finite differences (norm held constant), merge/unmerge, training, zero rows, caching.

use crate::common::*;
use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use lorakit::kernels::{FusedLinear, LowRankTerm};
use lorakit::low_rank::{Factor, LowRankPair};
use lorakit::variants::dora::norm::{factored_row_norms, row_sq_norms};
use lorakit::{Adapter, DoraLinear, DoraWeights, FrozenLinear, LoraConfig, LoraInit, Variant};

/// Parameters of one DoRA layer as plain f64.
struct Ref {
    w: M,
    bias: Option<Vec<f64>>,
    a: M,
    b: M,
    m: Vec<f64>,
    s: f64,
}

impl Ref {
    fn adapted(&self) -> M {
        add(&self.w, &scale(&matmul(&self.b, &self.a), self.s))
    }

    fn norms(&self) -> Vec<f64> {
        row_norms(&self.adapted())
    }

    /// PEFT's eval forward, `b + (m / n) ⊙ (x Wᵀ + s (x Aᵀ) Bᵀ)`, with `n` given or computed
    /// from the materialized matrix.
    fn forward(&self, x: &M, n: Option<&[f64]>) -> M {
        let own = self.norms();
        let n = n.unwrap_or(&own);
        let c: Vec<f64> = self.m.iter().zip(n).map(|(m, n)| m / n).collect();
        let pre = add(
            &linear(x, &self.w),
            &scale(&linear(&linear(x, &self.a), &self.b), self.s),
        );
        add_bias(&scale_cols(&pre, &c), self.bias.as_deref())
    }

    /// PEFT's training forward with dropout output `d`.
    fn forward_dropped(&self, x: &M, d: &M) -> M {
        let n = self.norms();
        let c: Vec<f64> = self.m.iter().zip(&n).map(|(m, n)| m / n).collect();
        let cm1: Vec<f64> = c.iter().map(|c| c - 1.0).collect();
        let base = add_bias(&linear(x, &self.w), self.bias.as_deref());
        let t1 = scale_cols(&linear(d, &self.w), &cm1);
        let t2 = scale_cols(&scale(&linear(&linear(d, &self.a), &self.b), self.s), &c);
        add(&add(&base, &t1), &t2)
    }
}

struct Setup {
    layer: DoraLinear,
    r: Ref,
    x: Tensor,
}

/// A DoRA layer with random (non-trivial) A, B, m and bias, built from tensors.
fn setup(dtype: DType, d_in: usize, d_out: usize, rank: usize, seed: u64) -> Setup {
    let mut g = rng(seed);
    let w = rand(&mut g, &[d_out, d_in], dtype);
    let bias = rand(&mut g, &[d_out], dtype);
    let a = rand(&mut g, &[rank, d_in], dtype);
    let b = (rand(&mut g, &[d_out, rank], dtype) * 0.5).unwrap();
    let m = (rand(&mut g, &[d_out], dtype) + 2.0).unwrap();
    let x = rand(&mut g, &[5, d_in], dtype);
    let s = 1.5;
    let r = Ref {
        w: mat(&w),
        bias: Some(vec1(&bias)),
        a: mat(&a),
        b: mat(&b),
        m: vec1(&m),
        s,
    };
    let base = FrozenLinear::new(w, Some(bias)).unwrap();
    let pair = LowRankPair {
        a: Factor::Trainable(Var::from_tensor(&a).unwrap()),
        b: Factor::Trainable(Var::from_tensor(&b).unwrap()),
    };
    let layer = dora_from("layers.0.q", base, pair, m, s, 0.0).unwrap();
    Setup { layer, r, x }
}

/// A DoRA layer from given tensors with scale `s`.
fn dora_from(
    name: &str,
    base: FrozenLinear,
    pair: LowRankPair,
    magnitude: Tensor,
    s: f64,
    dropout: f64,
) -> lorakit::Result<DoraLinear> {
    let config = LoraConfig {
        dropout,
        ..lora_config_with_scale(pair.rank(), s)
    };
    DoraLinear::from_weights(name, base, &config, DoraWeights { pair, magnitude })
}

fn var_of(f: &Factor) -> &Var {
    f.var().expect("trainable factor")
}

#[test]
fn identity_at_init() {
    let dev = Device::Cpu;
    let mut g = rng(1);
    let w = rand(&mut g, &[10, 12], DType::F32);
    let bias = rand(&mut g, &[10], DType::F32);
    let base = FrozenLinear::new(w, Some(bias)).unwrap();
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let layer = DoraLinear::new(base.clone(), &LoraConfig::new(4, 8.0), vb.pp("q")).unwrap();
    assert_eq!(layer.kind(), Variant::Dora);
    let x = rand(&mut g, &[6, 12], DType::F32);
    let want = base.forward(&x).unwrap();
    for train in [false, true] {
        let got = layer.forward_t(&x, train).unwrap();
        assert!(max_rel_diff(&got, &want) < 1e-6, "train = {train}");
    }
    // m starts at ‖W‖_row.
    let m = vec1(layer.magnitude().as_tensor());
    let norms = row_norms(&mat(base.weight()));
    for (a, b) in m.iter().zip(&norms) {
        assert!((a - b).abs() <= 1e-6 * b);
    }
    assert_eq!(varmap.all_vars().len(), 3);
    assert_eq!(layer.num_trainable_params(), 4 * 12 + 10 * 4 + 10);
}

#[test]
fn forward_matches_peft_math_and_composed_reference() {
    let st = setup(DType::F64, 9, 7, 3, 2);
    let x = mat(&st.x);
    let want = st.r.forward(&x, None);
    for train in [false, true] {
        let got = mat(&st.layer.forward_t(&st.x, train).unwrap());
        assert!(max_rel_diff_m(&got, &want) < 1e-12, "train = {train}");
    }
    // The composed fused-op reference with the row scale from the materialized norm.
    let c: Vec<f64> =
        st.r.m
            .iter()
            .zip(st.r.norms())
            .map(|(m, n)| m / n)
            .collect();
    let c = Tensor::new(c, &Device::Cpu).unwrap();
    let base = st.layer.base();
    let pair = st.layer.lora().pair();
    let composed = FusedLinear {
        weight: base.weight(),
        bias: base.bias(),
        low_rank: Some(LowRankTerm {
            a: pair.a.tensor(),
            b: pair.b.tensor(),
            scale: st.r.s,
        }),
        row_scale: Some(&c),
    }
    .forward_composed(&st.x)
    .unwrap();
    let got = st.layer.forward(&st.x).unwrap();
    assert!(max_rel_diff(&got, &composed) < 1e-12);
    // Leading batch dimensions.
    let x3 = st.x.reshape((1, 5, 9)).unwrap();
    let y3 = st.layer.forward(&x3).unwrap();
    assert_eq!(y3.dims(), &[1, 5, 7]);
    assert!(max_rel_diff(&y3.reshape((5, 7)).unwrap(), &got) == 0.0);
}

#[test]
fn factored_norms_equal_materialized_norms() {
    let mut g = rng(3);
    for (case, &(d_out, d_in, rank)) in [(7, 5, 1), (16, 33, 4), (40, 24, 8), (3, 64, 16)]
        .iter()
        .enumerate()
    {
        let mut w = mat(&rand(&mut g, &[d_out, d_in], DType::F32));
        let mut b = mat(&rand(&mut g, &[d_out, rank], DType::F32));
        let a = mat(&rand(&mut g, &[rank, d_in], DType::F32));
        // Zero rows: W and B both zero (n = 0), W alone, B alone.
        w[0].iter_mut().for_each(|v| *v = 0.0);
        b[0].iter_mut().for_each(|v| *v = 0.0);
        w[1].iter_mut().for_each(|v| *v = 0.0);
        b[2].iter_mut().for_each(|v| *v = 0.0);
        let s = 0.5 + case as f64;
        let want = row_norms(&add(&w, &scale(&matmul(&b, &a), s)));
        let (wt, at, bt) = (
            tensor(&w, DType::F32),
            tensor(&a, DType::F32),
            tensor(&b, DType::F32),
        );
        let w_sq = row_sq_norms(&wt).unwrap();
        let got = vec1(&factored_row_norms(&w_sq, &wt, &at, &bt, s).unwrap());
        assert_eq!(got[0], 0.0);
        for (i, (x, y)) in got.iter().zip(&want).enumerate() {
            assert!(
                (x - y).abs() <= 1e-5 * y,
                "case {case} row {i}: factored {x} vs materialized {y}"
            );
        }
    }
}

#[test]
fn gradients_match_finite_differences_with_norm_held_constant() {
    let st = setup(DType::F64, 6, 5, 2, 4);
    let mut g = rng(44);
    let rw = rand(&mut g, &[5, 5], DType::F64);
    let y = st.layer.forward_t(&st.x, true).unwrap();
    let grads = (y * &rw).unwrap().sum_all().unwrap().backward().unwrap();
    let pair = st.layer.lora().pair();
    let (va, vb, vm) = (var_of(&pair.a), var_of(&pair.b), st.layer.magnitude());
    let x = mat(&st.x);
    let rw = mat(&rw);
    let n0 = st.r.norms();
    let loss = |r: &Ref| dot(&r.forward(&x, Some(&n0)), &rw);
    let h = 1e-5;
    let cols = st.r.a[0].len();
    let fd_a = fd_grad(&st.r.a.concat(), h, |v| {
        let mut r = clone_ref(&st.r);
        r.a = v.chunks(cols).map(|c| c.to_vec()).collect();
        loss(&r)
    });
    let rank = st.r.b[0].len();
    let fd_b = fd_grad(&st.r.b.concat(), h, |v| {
        let mut r = clone_ref(&st.r);
        r.b = v.chunks(rank).map(|c| c.to_vec()).collect();
        loss(&r)
    });
    let fd_m = fd_grad(&st.r.m, h, |v| {
        let mut r = clone_ref(&st.r);
        r.m = v.to_vec();
        loss(&r)
    });
    for (name, var, fd) in [("A", va, fd_a), ("B", vb, fd_b), ("m", vm, fd_m)] {
        let an = flat(grads.get(var.as_tensor()).expect("gradient"));
        let err = rel_err(&an, &fd);
        assert!(err <= 1e-6, "{name}: relative error {err}");
    }
    // The detach matters: differentiating through the norm gives another gradient for B.
    let fd_b_full = fd_grad(&st.r.b.concat(), h, |v| {
        let mut r = clone_ref(&st.r);
        r.b = v.chunks(rank).map(|c| c.to_vec()).collect();
        dot(&r.forward(&x, None), &rw)
    });
    let an_b = flat(grads.get(vb.as_tensor()).unwrap());
    assert!(rel_err(&an_b, &fd_b_full) > 1e-3);
}

fn clone_ref(r: &Ref) -> Ref {
    Ref {
        w: r.w.clone(),
        bias: r.bias.clone(),
        a: r.a.clone(),
        b: r.b.clone(),
        m: r.m.clone(),
        s: r.s,
    }
}

#[test]
fn dropout_forward_is_pefts_formula() {
    let st = setup(DType::F64, 8, 6, 3, 5);
    let mut g = rng(55);
    let dropped = rand(&mut g, &[5, 8], DType::F64);
    let got = mat(&st
        .layer
        .forward_with_dropped_input(&st.x, &dropped)
        .unwrap());
    let want = st.r.forward_dropped(&mat(&st.x), &mat(&dropped));
    assert!(max_rel_diff_m(&got, &want) < 1e-12);
    // Without dropout (dropped = x) it is the plain forward.
    let same = st.layer.forward_with_dropped_input(&st.x, &st.x).unwrap();
    let plain = st.layer.forward(&st.x).unwrap();
    assert!(max_rel_diff(&same, &plain) < 1e-12);
}

#[test]
fn merge_equals_forward_and_unmerge_restores() {
    for (dtype, tol_y, tol_w) in [(DType::F32, 2e-5, 1e-6), (DType::F64, 1e-12, 1e-13)] {
        let mut st = setup(dtype, 12, 10, 4, 6);
        let w0 = st.layer.base().weight().clone();
        let y0 = st.layer.forward(&st.x).unwrap();
        st.layer.merge(true).unwrap();
        assert!(st.layer.is_merged());
        // The merged weight is (m / n) ⊙ (W + s·BA), by hand.
        let c: Vec<f64> =
            st.r.m
                .iter()
                .zip(st.r.norms())
                .map(|(m, n)| m / n)
                .collect();
        let want_w = scale_rows(&st.r.adapted(), &c);
        assert!(max_rel_diff_m(&mat(st.layer.base().weight()), &want_w) < tol_w * 10.0);
        let y1 = st.layer.forward(&st.x).unwrap();
        assert!(max_rel_diff(&y1, &y0) < tol_y, "{dtype:?} merged forward");
        assert!(st.layer.merge(false).is_err());
        st.layer.unmerge().unwrap();
        let w1 = st.layer.base().weight();
        assert!(max_rel_diff(w1, &w0) < tol_w, "{dtype:?} unmerge");
        let y2 = st.layer.forward(&st.x).unwrap();
        assert!(max_rel_diff(&y2, &y0) < tol_y);
        assert!(st.layer.unmerge().is_err());
    }
}

#[test]
fn unmerge_restores_rows_with_zero_magnitude_exactly() {
    let st = setup(DType::F32, 6, 4, 2, 7);
    let base = st.layer.base().clone();
    let pair = st.layer.lora().pair().clone();
    let m = Tensor::new(&[0f32, 1.0, 2.0, 0.5], &Device::Cpu).unwrap();
    let mut layer = dora_from("z", base.clone(), pair, m, 1.0, 0.0).unwrap();
    layer.merge(false).unwrap();
    layer.unmerge().unwrap();
    assert!(bit_identical(layer.base().weight(), base.weight()));
}

#[test]
fn training_changes_only_trainable_tensors() {
    let dev = Device::Cpu;
    let mut g = rng(8);
    let w = rand(&mut g, &[10, 12], DType::F32);
    let bias = rand(&mut g, &[10], DType::F32);
    let base = FrozenLinear::new(w.clone(), Some(bias.clone())).unwrap();
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let config = LoraConfig {
        dropout: 0.1,
        ..LoraConfig::new(4, 8.0)
    };
    let layer = DoraLinear::new(base, &config, vb.pp("q")).unwrap();
    let before: Vec<Tensor> = layer
        .trainable_vars()
        .iter()
        .map(|v| v.var.as_tensor().copy().unwrap())
        .collect();
    let mut opt = candle_nn::AdamW::new_lr(varmap.all_vars(), 1e-2).unwrap();
    let x = rand(&mut g, &[16, 12], DType::F32);
    let target = rand(&mut g, &[16, 10], DType::F32);
    for _ in 0..3 {
        let y = layer.forward_t(&x, true).unwrap();
        let loss = (y - &target).unwrap().sqr().unwrap().mean_all().unwrap();
        opt.backward_step(&loss).unwrap();
    }
    for (v, old) in layer.trainable_vars().iter().zip(&before) {
        assert!(
            !bit_identical(v.var.as_tensor(), old),
            "{} unchanged",
            v.name
        );
    }
    assert!(bit_identical(layer.base().weight(), &w));
    assert!(bit_identical(layer.base().bias().unwrap(), &bias));
    let names: Vec<String> = layer.trainable_vars().into_iter().map(|v| v.name).collect();
    assert_eq!(names, ["lora_A", "lora_B", "lora_magnitude_vector"]);
}

#[test]
fn zero_norm_rows_give_finite_outputs_and_gradients() {
    let mut g = rng(9);
    let mut w = mat(&rand(&mut g, &[5, 6], DType::F32));
    w[1].iter_mut().for_each(|v| *v = 0.0);
    w[3].iter_mut().for_each(|v| *v = 0.0);
    let w = tensor(&w, DType::F32);
    let bias = rand(&mut g, &[5], DType::F32);
    let base = FrozenLinear::new(w, Some(bias)).unwrap();
    let x = rand(&mut g, &[4, 6], DType::F32);
    // Default init: m = 0 on the zero rows, where PEFT computes 0 / 0.
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let layer = DoraLinear::new(base.clone(), &LoraConfig::new(2, 2.0), vb).unwrap();
    let y = layer.forward_t(&x, true).unwrap();
    assert!(max_rel_diff(&y, &base.forward(&x).unwrap()) < 1e-6);
    let grads = y.sum_all().unwrap().backward().unwrap();
    for v in layer.trainable_vars() {
        let g = flat(grads.get(v.var.as_tensor()).unwrap());
        assert!(g.iter().all(|v| v.is_finite()), "{}", v.name);
    }
    // A loaded magnitude that is non-zero on a zero row (PEFT: inf · 0 = NaN).
    let pair = layer.lora().pair().clone();
    let m = Tensor::ones(5, DType::F32, &Device::Cpu).unwrap();
    let loaded = dora_from("z", base, pair, m, 1.0, 0.0).unwrap();
    let y = flat(&loaded.forward(&x).unwrap());
    assert!(y.iter().all(|v| v.is_finite()));
}

#[test]
fn evaluation_cache_follows_changes_to_the_pair() {
    let mut st = setup(DType::F64, 7, 6, 2, 10);
    st.layer.prepare_for_inference().unwrap();
    let x = mat(&st.x);
    let y = mat(&st.layer.forward(&st.x).unwrap());
    assert!(max_rel_diff_m(&y, &st.r.forward(&x, None)) < 1e-12);
    // Change B in place (as an optimizer does) while in evaluation mode.
    let mut g = rng(100);
    let new_b = rand(&mut g, &[6, 2], DType::F64);
    var_of(&st.layer.lora().pair().b).set(&new_b).unwrap();
    st.r.b = mat(&new_b);
    let y = mat(&st.layer.forward(&st.x).unwrap());
    assert!(max_rel_diff_m(&y, &st.r.forward(&x, None)) < 1e-12);
    // m changes are picked up without touching the cached norms.
    let new_m = (st.layer.magnitude().as_tensor() * 3.0).unwrap();
    st.layer.magnitude().set(&new_m).unwrap();
    st.r.m = vec1(&new_m);
    let y = mat(&st.layer.forward(&st.x).unwrap());
    assert!(max_rel_diff_m(&y, &st.r.forward(&x, None)) < 1e-12);
    // And A.
    let new_a = rand(&mut g, &[2, 7], DType::F64);
    var_of(&st.layer.lora().pair().a).set(&new_a).unwrap();
    st.r.a = mat(&new_a);
    let y = mat(&st.layer.forward(&st.x).unwrap());
    assert!(max_rel_diff_m(&y, &st.r.forward(&x, None)) < 1e-12);
    let norms = vec1(&st.layer.weight_norms(false).unwrap());
    assert!(rel_err(&norms, &st.r.norms()) < 1e-12);
}

#[test]
fn saved_tensors_use_peft_names_and_shapes() {
    let st = setup(DType::F32, 6, 4, 2, 11);
    let saved = st.layer.tensors_to_save().unwrap();
    let names: Vec<(&str, Vec<usize>)> = saved
        .iter()
        .map(|(n, t)| (n.as_str(), t.dims().to_vec()))
        .collect();
    assert_eq!(
        names,
        [
            ("lora_A.weight", vec![2, 6]),
            ("lora_B.weight", vec![4, 2]),
            ("lora_magnitude_vector", vec![4]),
        ]
    );
}

#[test]
fn bad_magnitude_and_config_are_errors_naming_the_layer() {
    let st = setup(DType::F32, 6, 4, 2, 12);
    let base = st.layer.base().clone();
    let pair = st.layer.lora().pair().clone();
    let m = Tensor::ones(5, DType::F32, &Device::Cpu).unwrap();
    let err = dora_from("enc.k", base.clone(), pair, m, 1.0, 0.0).unwrap_err();
    assert!(err.to_string().contains("enc.k"), "{err}");
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let bad = LoraConfig {
        init: LoraInit::Default,
        ..LoraConfig::new(0, 1.0)
    };
    assert!(DoraLinear::new(base, &bad, vb.pp("enc.v")).is_err());
}

#[test]
fn half_precision_matches_f32_and_stays_finite_on_zero_rows() {
    let st = setup(DType::F32, 8, 6, 2, 13);
    let y32 = st.layer.forward(&st.x).unwrap();
    for dtype in [DType::F16, DType::BF16] {
        let cast = |t: &Tensor| t.to_dtype(dtype).unwrap();
        let base = st.layer.base();
        let mut w = mat(base.weight());
        w[0].iter_mut().for_each(|v| *v = 0.0);
        let pair = st.layer.lora().pair();
        let mut b = mat(pair.b.tensor());
        b[0].iter_mut().for_each(|v| *v = 0.0);
        let half = dora_from(
            "h",
            FrozenLinear::new(
                cast(&tensor(&w, DType::F32)),
                Some(cast(base.bias().unwrap())),
            )
            .unwrap(),
            LowRankPair {
                a: Factor::Frozen(cast(pair.a.tensor())),
                b: Factor::Frozen(cast(&tensor(&b, DType::F32))),
            },
            cast(st.layer.magnitude().as_tensor()),
            st.r.s,
            0.0,
        )
        .unwrap();
        let y = half.forward(&cast(&st.x)).unwrap();
        assert_eq!(y.dtype(), dtype);
        // The second evaluation reads the cache (compared with tensor ops for half dtypes).
        assert!(bit_identical(&half.forward(&cast(&st.x)).unwrap(), &y));
        let y = flat(&y);
        assert!(y.iter().all(|v| v.is_finite()), "{dtype:?}");
        // Rows other than the zeroed one agree with f32 to half precision.
        let y32 = mat(&y32);
        for (i, row) in y.chunks(6).enumerate() {
            for j in 1..6 {
                let tol = 0.02 * y32[i][j].abs().max(1.0);
                assert!((row[j] - y32[i][j]).abs() < tol, "{dtype:?} [{i}][{j}]");
            }
        }
    }
}
