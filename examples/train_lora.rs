//! Trains a LoRA adapter on a small task and prints the loss falling.
//!
//! The task: a frozen random linear layer `W` must learn to act like `W + ΔW*`, where `ΔW*`
//! is a hidden rank-4 change. A rank-4 LoRA adapter can represent it exactly; only A and B
//! train.
//!
//! ```text
//! cargo run --release --example train_lora
//! ```

// clippy.toml keeps the library on `crate::matmul`; code outside it may call candle's own.
#![allow(clippy::disallowed_methods)]

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use lorakit::init::SeededRng;
use lorakit::{Adapter, FrozenLinear, LoraConfig, LoraLinear};

fn main() -> lorakit::Result<()> {
    let dev = Device::Cpu;
    let (d_in, d_out, rank, n) = (64, 48, 4, 256);
    let mut rng = SeededRng::new(42);
    let w = rng.normal((d_out, d_in), 0.0, 0.1, DType::F32, &dev)?;
    let base = FrozenLinear::new(w.clone(), None)?;

    // The hidden target change, rank 4.
    let u = rng.normal((d_out, rank), 0.0, 0.3, DType::F32, &dev)?;
    let v = rng.normal((rank, d_in), 0.0, 0.3, DType::F32, &dev)?;
    let teacher = FrozenLinear::new((w + u.matmul(&v)?)?, None)?;
    let x = rng.normal((n, d_in), 0.0, 1.0, DType::F32, &dev)?;
    let target = teacher.forward(&x)?;

    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let config = LoraConfig::new(rank, 2.0 * rank as f64);
    let layer = LoraLinear::new(base.clone(), &config, vb.pp("proj"))?;
    println!(
        "LoRA r={rank} on a {d_in}->{d_out} layer: {} trainable of {} base parameters",
        layer.num_trainable_params(),
        layer.num_base_params()
    );

    let mut opt = candle_nn::AdamW::new_lr(varmap.all_vars(), 2e-2)?;
    let mse = |y: &Tensor| -> lorakit::Result<Tensor> { Ok((y - &target)?.sqr()?.mean_all()?) };
    for step in 0..=300 {
        let loss = mse(&layer.forward_t(&x, true)?)?;
        if step % 30 == 0 {
            println!("step {step:4}  loss {:.3e}", loss.to_scalar::<f32>()?);
        }
        opt.backward_step(&loss)?;
    }
    let mut layer = layer;
    layer.merge(true)?;
    let merged_loss = mse(&layer.forward(&x)?)?.to_scalar::<f32>()?;
    println!("after merging the adapter into W: loss {merged_loss:.3e}");
    Ok(())
}
