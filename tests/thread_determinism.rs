//! The fused CPU kernels give bit-identical outputs and gradients whatever the thread
//! count: every GEMM computes each output element over the whole inner dimension, and the
//! column sums behind DoRA's and VeRA's vector gradients add fixed 32-row blocks in block
//! order (`src/kernels/cpu/rowwise.rs`), not in the order rayon's work stealing happens to
//! finish them.
//!
//! Each variant runs one forward and backward inside a one-thread and a three-thread rayon
//! pool, on shapes that take every column-major route (chunked `x Wᵀ` at 100 rows, the
//! transposed route at 12 rows) and span several 32-row blocks.

mod common;
mod props_support;

use candle_core::Tensor;
use common::bit_identical;
use lorakit::Adapter;
use props_support::*;

/// The layer's output and the gradients of `Σ y ⊙ g` for the input and every trainable
/// variable, in the order of `trainable_vars`, computed on `threads` threads.
fn run(layer: &dyn Adapter, x: &Tensor, threads: usize) -> lorakit::Result<Vec<Tensor>> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(candle_core::Error::wrap)?;
    pool.install(|| {
        let x = candle_core::Var::from_tensor(x)?;
        let y = layer.forward_t(x.as_tensor(), true)?;
        let g = Tensor::ones_like(&y)?.cumsum(y.rank() - 1)?.sin()?;
        let grads = (&y * &g)?.sum_all()?.backward()?;
        let mut out = vec![
            y,
            grads.get(x.as_tensor()).cloned().unwrap_or(x.zeros_like()?),
        ];
        for v in layer.trainable_vars() {
            let grad = grads.get(v.var.as_tensor()).cloned();
            out.push(grad.ok_or_else(|| candle_core::Error::Msg(format!("no grad {}", v.name)))?);
        }
        Ok(out)
    })
}

#[test]
fn outputs_and_gradients_do_not_depend_on_the_thread_count() -> lorakit::Result<()> {
    for variant in [Variant::Lora, Variant::Dora, Variant::Vera] {
        for (rows, d_in, d_out) in [(100, 48, 150), (12, 130, 140)] {
            let case = Case {
                d_in,
                d_out,
                r: 8,
                lead: vec![rows],
                bias: true,
                rslora: false,
                alpha: 16.0,
                seed: 7,
            };
            let built = build(variant, &case)?;
            let layer = built.layer.read();
            randomize(&*layer, 11)?;
            let x = case.input()?;
            let one = run(&*layer, &x, 1)?;
            let three = run(&*layer, &x, 3)?;
            assert_eq!(one.len(), three.len());
            for (i, (a, b)) in one.iter().zip(&three).enumerate() {
                assert!(
                    bit_identical(a, b),
                    "{variant:?} {rows}x{d_in}->{d_out}: tensor {i} differs between 1 and 3 threads"
                );
            }
        }
    }
    Ok(())
}
