//! PiSSA's and OLoRA's base residuals (`lorakit::peft::BaseResidual`) computed on the CUDA
//! device, against the same computed on the CPU: both PiSSA routes (the Gram matrix for a
//! side within the iteration's block, the subspace iteration beyond), both orientations,
//! in f32 and bf16.

use candle_core::{DType, Device, Tensor};
use lorakit::frozen::FrozenLinear;
use lorakit::peft::BaseResidual;

use super::{gpu, rel_err};

/// A seeded `(rows, cols)` weight with a decaying spectrum (a product of two random
/// factors), in `dtype` on `dev`.
#[allow(clippy::disallowed_methods)] // contiguous CPU operands: candle's matmul takes them
fn weight(rows: usize, cols: usize, dtype: DType, dev: &Device) -> Tensor {
    let cpu = Device::Cpu;
    let mut state = 7u64 + rows as u64 * 31 + cols as u64;
    let mut next = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 11) as f32 / (1u64 << 53) as f32 - 0.5
    };
    let inner = rows.min(cols);
    let left: Vec<f32> = (0..rows * inner).map(|_| next()).collect();
    let right: Vec<f32> = (0..inner * cols).map(|_| next()).collect();
    let left = Tensor::from_vec(left, (rows, inner), &cpu).unwrap();
    let right = Tensor::from_vec(right, (inner, cols), &cpu).unwrap();
    // Columns of `left` scaled by a decaying profile: distinct singular values.
    let profile: Vec<f32> = (0..inner).map(|i| (i as f32 + 1.0).powf(-0.7)).collect();
    let profile = Tensor::from_vec(profile, (1, inner), &cpu).unwrap();
    let w = left
        .broadcast_mul(&profile)
        .unwrap()
        .matmul(&right)
        .unwrap();
    w.to_dtype(dtype).unwrap().to_device(dev).unwrap()
}

fn residual(init: BaseResidual, w: &Tensor, r: usize) -> Tensor {
    let base = FrozenLinear::new(w.clone(), None).unwrap();
    init.apply("layer", base, r, 0.5).unwrap().weight().clone()
}

#[test]
fn residuals_on_the_gpu_match_the_cpu() {
    let Some(dev) = gpu() else { return };
    // (rows, cols, r): Gram route (block 2r + 8 covers the smaller side) and iteration,
    // each in both orientations.
    for (rows, cols, r) in [(48, 40, 16), (40, 48, 16), (300, 200, 8), (200, 300, 8)] {
        for dtype in [DType::F32, DType::BF16] {
            let on_gpu = weight(rows, cols, dtype, &dev);
            let on_cpu = on_gpu.to_device(&Device::Cpu).unwrap();
            for init in [BaseResidual::Pissa, BaseResidual::Olora] {
                let got = residual(init, &on_gpu, r);
                assert!(got.device().is_cuda(), "the residual left the GPU");
                assert_eq!(got.dtype(), dtype);
                let want = residual(init, &on_cpu, r).to_dtype(DType::F64).unwrap();
                let e = rel_err(&got.to_dtype(DType::F32).unwrap(), &want);
                // The same f64 computation on both: only the products' summation order
                // differs, then one rounding to the stored dtype (one ulp apart at most).
                let bound = if dtype == DType::BF16 {
                    2f64.powi(-7)
                } else {
                    1e-6
                };
                assert!(
                    e <= bound,
                    "{init:?} {rows}x{cols} r {r} {dtype:?}: relative error {e:.3e}"
                );
            }
        }
    }
}
