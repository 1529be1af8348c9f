//! Delta-LoRA: the effective weight's motion per step, W's status, dropout, saving.

use candle_core::{DType, Device, Tensor};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use lorakit::init::SeededRng;
use lorakit::train::{train_step, StepHook};
use lorakit::train::{DeltaLoraHook, DeltaLoraUpdate};
use lorakit::variants::delta_lora::BASE_WEIGHT_KEY;
use lorakit::{
    Adapter, DeltaLoraConfig, DeltaLoraLinear, Error, FrozenLinear, LoraConfig, LoraInit,
    LoraLinear, Shared, Variant,
};

const DEV: Device = Device::Cpu;

fn mat(t: &Tensor) -> Vec<Vec<f64>> {
    t.to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap()
}

/// `B A` on plain f64 vectors.
fn product(b: &[Vec<f64>], a: &[Vec<f64>]) -> Vec<Vec<f64>> {
    b.iter()
        .map(|brow| {
            (0..a[0].len())
                .map(|j| brow.iter().zip(a).map(|(bk, arow)| bk * arow[j]).sum())
                .collect()
        })
        .collect()
}

/// `(W, B A)` of the layer, in f64.
fn weight_and_ba(layer: &LoraLinear) -> (Vec<Vec<f64>>, Vec<Vec<f64>>) {
    let pair = layer.pair();
    (
        mat(layer.base().weight()),
        product(&mat(pair.b.tensor()), &mat(pair.a.tensor())),
    )
}

fn setup(seed: u64, dtype: DType) -> (VarMap, Shared<DeltaLoraLinear>) {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, dtype, &DEV);
    let w = SeededRng::new(seed)
        .normal((5, 7), 0.0, 0.5, dtype, &DEV)
        .unwrap();
    let config = DeltaLoraConfig {
        init: LoraInit::BothRandom,
        seed,
        ..DeltaLoraConfig::new(3, 6.0)
    };
    let layer =
        DeltaLoraLinear::new(FrozenLinear::new(w, None).unwrap(), &config, vb.pp("fc")).unwrap();
    (varmap, Shared::new(layer))
}

fn loss(layer: &Shared<DeltaLoraLinear>, x: &Tensor, t: &Tensor) -> Tensor {
    let y = layer.read().forward_t(x, true).unwrap();
    (y - t).unwrap().sqr().unwrap().mean_all().unwrap()
}

#[test]
fn effective_weight_moves_by_one_plus_lambda_after_k() {
    for lambda in [0.5, 2.0] {
        let k = 3;
        let (varmap, layer) = setup(1, DType::F64);
        assert_eq!(varmap.all_vars().len(), 2, "only A and B are variables");
        let s = layer.read().lora().scale();
        let mut opt = candle_nn::AdamW::new_lr(varmap.all_vars(), 2e-2).unwrap();
        let mut hook =
            DeltaLoraHook::new(&[layer.clone().erase()], DeltaLoraUpdate::new(lambda, k)).unwrap();
        let mut rng = SeededRng::new(2);
        let mut worst = 0f64;
        for step in 1..=7 {
            let x = rng.normal((9, 7), 0.0, 1.0, DType::F64, &DEV).unwrap();
            let t = rng.normal((9, 5), 0.0, 1.0, DType::F64, &DEV).unwrap();
            let (w0, ba0) = weight_and_ba(layer.read().lora());
            train_step(&loss(&layer, &x, &t), &mut opt, &mut [&mut hook], step).unwrap();
            let (w1, ba1) = weight_and_ba(layer.read().lora());
            let factor = if step > k { 1.0 + lambda } else { 1.0 };
            let (mut num, mut den) = (0f64, 0f64);
            for i in 0..w0.len() {
                for j in 0..w0[0].len() {
                    let moved = (w1[i][j] + s * ba1[i][j]) - (w0[i][j] + s * ba0[i][j]);
                    let expected = factor * s * (ba1[i][j] - ba0[i][j]);
                    num += (moved - expected).powi(2);
                    den += expected.powi(2);
                }
            }
            let rel = (num / den).sqrt();
            worst = worst.max(rel);
            assert!(
                den > 0.0 && rel <= 1e-6,
                "λ {lambda}, step {step}: relative error {rel:e}"
            );
            if step <= k {
                assert_eq!(w0, w1, "W is untouched up to K (step {step})");
            } else {
                assert_ne!(w0, w1, "W moves after K (step {step})");
            }
        }
        eprintln!("λ {lambda}, K {k}: worst relative error {worst:e}");
    }
}

#[test]
fn w_gets_no_gradient() {
    let (_varmap, layer) = setup(3, DType::F32);
    let x = Tensor::ones((2, 7), DType::F32, &DEV).unwrap();
    let t = Tensor::zeros((2, 5), DType::F32, &DEV).unwrap();
    let grads = loss(&layer, &x, &t).backward().unwrap();
    let guard = layer.read();
    assert!(grads.get(guard.base().weight()).is_none());
    assert!(grads.get(guard.lora().pair().b.tensor()).is_some());
}

#[test]
fn dropout_is_an_error() {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &DEV);
    let base = FrozenLinear::new(Tensor::zeros((4, 4), DType::F32, &DEV).unwrap(), None).unwrap();
    let config = DeltaLoraConfig {
        dropout: 0.1,
        ..DeltaLoraConfig::new(2, 2.0)
    };
    let err = DeltaLoraLinear::new(base.clone(), &config, vb.pp("attn.q")).unwrap_err();
    assert!(
        err.to_string().contains("attn.q") && err.to_string().contains("dropout"),
        "{err}"
    );
    // Built from an existing pair (e.g. a LoRA layer's), dropout is refused too.
    let lora = LoraLinear::new(base.clone(), &config, vb.pp("attn.k")).unwrap();
    let err =
        DeltaLoraLinear::from_weights("attn.k", base, &config, lora.pair().clone()).unwrap_err();
    assert!(
        err.to_string().contains("attn.k") && err.to_string().contains("dropout"),
        "{err}"
    );
}

#[test]
fn hook_selects_delta_lora_layers_and_rejects_merged_updates() {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &DEV);
    let base = FrozenLinear::new(Tensor::zeros((4, 4), DType::F32, &DEV).unwrap(), None).unwrap();
    let plain =
        Shared::new(LoraLinear::new(base, &LoraConfig::new(2, 2.0), vb.pp("plain")).unwrap());
    let update = DeltaLoraUpdate::new(0.5, 0);
    // A slice without Delta-LoRA layers is a usage error.
    let err = DeltaLoraHook::new(&[plain.clone().erase()], update).unwrap_err();
    assert!(matches!(err, Error::Usage { .. }), "{err:?}");
    assert!(err.to_string().contains("Delta-LoRA"), "{err}");
    // Among other layers, only the Delta-LoRA ones are picked.
    let (_vm, layer) = setup(4, DType::F32);
    let hook = DeltaLoraHook::new(&[plain.erase(), layer.clone().erase()], update).unwrap();
    let debug = format!("{hook:?}");
    assert!(
        debug.contains("\"fc\"") && !debug.contains("plain"),
        "{debug}"
    );
    drop(hook);

    let mut hook = DeltaLoraHook::new(&[layer.clone().erase()], update).unwrap();
    let x = Tensor::ones((2, 7), DType::F32, &DEV).unwrap();
    let mut grads = layer
        .read()
        .forward_t(&x, true)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    hook.before_step(1, &mut grads).unwrap();
    layer.write().merge(true).unwrap();
    let err = hook.after_step(1, &grads).unwrap_err();
    assert!(err.to_string().contains("merged"), "{err}");
}

#[test]
fn saving_includes_the_updated_weight() {
    let (varmap, layer) = setup(5, DType::F32);
    let mut opt = candle_nn::AdamW::new_lr(varmap.all_vars(), 1e-2).unwrap();
    let mut hook =
        DeltaLoraHook::new(&[layer.clone().erase()], DeltaLoraUpdate::new(2.0, 0)).unwrap();
    let x = Tensor::ones((3, 7), DType::F32, &DEV).unwrap();
    let t = Tensor::zeros((3, 5), DType::F32, &DEV).unwrap();
    let w_init = layer.read().base().weight().copy().unwrap();
    for step in 1..=3 {
        train_step(&loss(&layer, &x, &t), &mut opt, &mut [&mut hook], step).unwrap();
    }
    assert_eq!(opt.learning_rate(), 1e-2);
    let w = layer.read().base().weight().copy().unwrap();
    assert_ne!(mat(&w), mat(&w_init));
    assert_eq!(layer.read().kind(), Variant::DeltaLora);

    let find = |saved: &[(String, Tensor)]| {
        saved
            .iter()
            .find(|(k, _)| k == BASE_WEIGHT_KEY)
            .map(|(_, t)| mat(t))
            .expect("weight saved")
    };
    let saved = layer.read().tensors_to_save().unwrap();
    assert_eq!(saved.len(), 3);
    assert_eq!(find(&saved), mat(&w));

    // While merged, the saved weight is still the unmerged W.
    layer.write().merge(true).unwrap();
    let merged_saved = find(&layer.read().tensors_to_save().unwrap());
    let diff = merged_saved
        .iter()
        .flatten()
        .zip(mat(&w).iter().flatten())
        .map(|(a, b)| (a - b).abs())
        .fold(0f64, f64::max);
    assert!(diff < 1e-6, "{diff}");
    layer.write().unmerge().unwrap();

    // Loading: a fresh layer with the init weight gets the trained W back.
    let (_vm, fresh) = setup(5, DType::F32);
    assert_eq!(mat(fresh.read().base().weight()), mat(&w_init));
    fresh.write().restore_base_weight(w.clone()).unwrap();
    assert_eq!(mat(fresh.read().base().weight()), mat(&w));
}
