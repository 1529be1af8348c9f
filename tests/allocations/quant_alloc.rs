//! A training step over a quantized base never allocates a float copy of the whole `W`:
//! the largest single allocation of a LoRA and a DoRA step (forward, backward, optimizer)
//! stays below `d_out × d_in` f32s, while dequantizing the weight — what a step that held
//! a float `W` would do — allocates at least that (the check can fail).

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Var};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use lorakit::init::SeededRng;
use lorakit::{Adapter, DoraLinear, FrozenLinear, LoraConfig, LoraInit, LoraLinear};

use crate::counting::{largest_during, serial};

#[test]
fn a_step_over_a_quantized_base_allocates_no_float_weight() {
    let _serial = serial();
    // 768 × 1024 f32 = 3 MiB; the dequantized tile is 1 MiB (256 rows).
    let (n, d_in, d_out, r) = (4, 1024, 768, 8);
    let dev = Device::Cpu;
    let mut rng = SeededRng::new(3);
    let w = rng
        .uniform((d_out, d_in), -0.1, 0.1, DType::F32, &dev)
        .unwrap();
    let base = FrozenLinear::new(w, None)
        .unwrap()
        .quantize("proj", GgmlDType::Q4K)
        .unwrap();
    let x =
        Var::from_tensor(&rng.uniform((n, d_in), -1.0, 1.0, DType::F32, &dev).unwrap()).unwrap();
    let target = rng
        .uniform((n, d_out), -1.0, 1.0, DType::F32, &dev)
        .unwrap();
    let w_bytes = d_out * d_in * std::mem::size_of::<f32>();
    let config = LoraConfig {
        init: LoraInit::BothRandom,
        ..LoraConfig::new(r, 16.0)
    };

    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let layers: Vec<Box<dyn Adapter>> = vec![
        Box::new(LoraLinear::new(base.clone(), &config, vb.pp("lora")).unwrap()),
        Box::new(DoraLinear::new(base.clone(), &config, vb.pp("dora")).unwrap()),
    ];
    for layer in &layers {
        let mut opt = candle_nn::AdamW::new_lr(
            layer
                .trainable_vars()
                .iter()
                .map(|v| v.var.clone())
                .collect(),
            1e-3,
        )
        .unwrap();
        let step = |opt: &mut candle_nn::AdamW| {
            let y = layer.forward_t(x.as_tensor(), true).unwrap();
            let loss = (y - &target).unwrap().sqr().unwrap().mean_all().unwrap();
            opt.backward_step(&loss).unwrap();
        };
        step(&mut opt);
        let largest = largest_during(|| step(&mut opt));
        assert!(
            largest < w_bytes,
            "{}: a {largest}-byte allocation in a step (a float W is {w_bytes})",
            layer.kind()
        );
    }
    // The check can fail: a float copy of W is an allocation of that size.
    let largest = largest_during(|| drop(base.dequantized_weight().unwrap()));
    assert!(largest >= w_bytes);
}
