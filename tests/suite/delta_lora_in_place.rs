//! Delta-LoRA's weight updates after the first one are written in place (no new tensor per
//! step), never into a tensor the caller handed in: the caller's weight stays untouched,
//! a weight restored by the caller gets a private copy before the next update, and the
//! in-place result equals the allocating one (checked against f64 on copies).

use crate::common::flat as values;
use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use lorakit::init::SeededRng;
use lorakit::train::{train_step, DeltaLoraHook, DeltaLoraUpdate};
use lorakit::{Adapter, DeltaLoraConfig, DeltaLoraLinear, FrozenLinear, LoraInit, Shared};

const DEV: Device = Device::Cpu;

fn step(
    layer: &Shared<DeltaLoraLinear>,
    opt: &mut candle_nn::AdamW,
    hook: &mut DeltaLoraHook,
    n: usize,
) {
    let mut rng = SeededRng::new(100 + n as u64);
    let x = rng.normal((6, 7), 0.0, 1.0, DType::F32, &DEV).unwrap();
    let loss = layer
        .read()
        .forward_t(&x, true)
        .unwrap()
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap();
    train_step(&loss, opt, &mut [hook], n).unwrap();
}

/// `W + λ s (B'A' − BA)` in f64 from value copies.
fn expected(w: &[f64], before: (&[f64], &[f64]), after: (&[f64], &[f64]), ls: f64) -> Vec<f64> {
    let (d_in, r) = (7, 3);
    let prod = |a: &[f64], b: &[f64], i: usize, j: usize| -> f64 {
        (0..r).map(|k| b[i * r + k] * a[k * d_in + j]).sum()
    };
    (0..w.len())
        .map(|idx| {
            let (i, j) = (idx / d_in, idx % d_in);
            w[idx] + ls * (prod(after.0, after.1, i, j) - prod(before.0, before.1, i, j))
        })
        .collect()
}

#[test]
fn updates_go_in_place_after_the_first_and_never_into_the_callers_tensor() {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &DEV);
    let callers_w = SeededRng::new(1)
        .normal((5, 7), 0.0, 0.5, DType::F32, &DEV)
        .unwrap();
    let callers_values = values(&callers_w);
    let config = DeltaLoraConfig {
        init: LoraInit::BothRandom,
        ..DeltaLoraConfig::new(3, 6.0)
    };
    let base = FrozenLinear::new(callers_w.clone(), None).unwrap();
    let layer = Shared::new(DeltaLoraLinear::new(base, &config, vb.pp("fc")).unwrap());
    let lambda = 0.5;
    let ls = lambda * layer.read().lora().scale();
    let mut hook =
        DeltaLoraHook::new(&[layer.clone().erase()], DeltaLoraUpdate::new(lambda, 0)).unwrap();
    let mut opt = candle_nn::AdamW::new_lr(varmap.all_vars(), 1e-2).unwrap();

    let mut ids = Vec::new();
    for n in 1..=4 {
        let guard = layer.read();
        let w0 = values(guard.base().weight());
        let (a0, b0) = (
            values(guard.lora().pair().a.tensor()),
            values(guard.lora().pair().b.tensor()),
        );
        drop(guard);
        step(&layer, &mut opt, &mut hook, n);
        let guard = layer.read();
        let (a1, b1) = (
            values(guard.lora().pair().a.tensor()),
            values(guard.lora().pair().b.tensor()),
        );
        let want = expected(&w0, (&a0, &b0), (&a1, &b1), ls);
        let got = values(guard.base().weight());
        let err = got
            .iter()
            .zip(&want)
            .map(|(g, w)| (g - w).abs())
            .fold(0.0, f64::max);
        assert!(err < 1e-5, "step {n}: |W − reference| = {err}");
        ids.push(guard.base().weight().id());
    }
    // The caller's tensor was never written.
    assert_eq!(values(&callers_w), callers_values);
    // Step 1 made a private weight; steps 2.. updated that same tensor in place.
    assert_ne!(ids[0], callers_w.id());
    assert!(ids.windows(2).all(|w| w[0] == w[1]), "{ids:?}");

    // A weight restored by the caller is copied before the next update, not written.
    let restored = SeededRng::new(7)
        .normal((5, 7), 0.0, 0.5, DType::F32, &DEV)
        .unwrap();
    let restored_values = values(&restored);
    layer.write().restore_base_weight(restored.clone()).unwrap();
    step(&layer, &mut opt, &mut hook, 5);
    assert_eq!(values(&restored), restored_values);
    assert_ne!(layer.read().base().weight().id(), restored.id());
}
