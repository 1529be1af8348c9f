//! A LoRA training step through the fused kernel allocates no `d_out × d_in` buffer: a
//! counting global allocator watches for allocations of exactly that many bytes while a
//! step runs (forward, backward, optimizer), and the composed reference path — whose
//! matmul backward forms a gradient for the frozen `W` — shows that the counter sees them.
//!
//! The counting allocator is the binary's (`main.rs`); the test holds its `serial` lock, so
//! no other test of the binary allocates concurrently.

use candle_core::{DType, Device, Var};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use lorakit::init::SeededRng;
use lorakit::kernels::{FusedLinear, LowRankTerm};
use lorakit::{Adapter, FrozenLinear, LoraConfig, LoraInit, LoraLinear};

use crate::counting::{exact_size_allocations as count, serial};

#[test]
fn lora_training_step_allocates_no_weight_sized_buffer() {
    let _serial = serial();
    // Sizes chosen so no other buffer of the step has d_out * d_in elements.
    let (n, d_in, d_out, r) = (6, 72, 104, 4);
    let dev = Device::Cpu;
    let mut rng = SeededRng::new(1);
    let w = rng
        .uniform((d_out, d_in), -0.1, 0.1, DType::F32, &dev)
        .unwrap();
    let bias = rng.uniform(d_out, -0.1, 0.1, DType::F32, &dev).unwrap();
    let x =
        Var::from_tensor(&rng.uniform((n, d_in), -1.0, 1.0, DType::F32, &dev).unwrap()).unwrap();
    let target = rng
        .uniform((n, d_out), -1.0, 1.0, DType::F32, &dev)
        .unwrap();
    let bytes = d_out * d_in * std::mem::size_of::<f32>();

    for dropout in [0.0, 0.1] {
        let base = FrozenLinear::new(w.clone(), Some(bias.clone())).unwrap();
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
        let config = LoraConfig {
            dropout,
            init: LoraInit::BothRandom,
            ..LoraConfig::new(r, 8.0)
        };
        let layer = LoraLinear::new(base, &config, vb.pp("proj")).unwrap();
        let mut opt = candle_nn::AdamW::new_lr(varmap.all_vars(), 1e-3).unwrap();
        // One step outside the count (optimizer state, lazy inits).
        let step = |opt: &mut candle_nn::AdamW| {
            let y = layer.forward_t(x.as_tensor(), true).unwrap();
            let loss = (y - &target).unwrap().sqr().unwrap().mean_all().unwrap();
            opt.backward_step(&loss).unwrap();
        };
        step(&mut opt);
        let seen = count(bytes, || step(&mut opt));
        assert_eq!(
            seen, 0,
            "dropout {dropout}: {seen} weight-sized allocations"
        );
    }

    // The check can fail: the composed path's backward forms W's gradient.
    let a =
        Var::from_tensor(&rng.uniform((r, d_in), -0.1, 0.1, DType::F32, &dev).unwrap()).unwrap();
    let b = Var::from_tensor(
        &rng.uniform((d_out, r), -0.1, 0.1, DType::F32, &dev)
            .unwrap(),
    )
    .unwrap();
    let layer = FusedLinear {
        weight: &w,
        bias: Some(&bias),
        low_rank: Some(LowRankTerm {
            a: a.as_tensor(),
            b: b.as_tensor(),
            scale: 2.0,
        }),
        row_scale: None,
    };
    let grads_via = |fused: bool| {
        let y = if fused {
            layer.forward(x.as_tensor())
        } else {
            layer.forward_composed(x.as_tensor())
        };
        let loss = (y.unwrap() - &target)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap();
        drop(loss.backward().unwrap());
    };
    assert!(count(bytes, || grads_via(false)) > 0);
    assert_eq!(count(bytes, || grads_via(true)), 0);
}
