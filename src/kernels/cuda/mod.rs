//! The fused op on CUDA (feature `cuda`), f32, f64, bf16 and f16 (half types stored in 16
//! bits, every product accumulated in f32 by cuBLAS `GemmEx`, elementwise math in f32):
//!
//! - forward ([`forward`]): three cuBLAS GEMMs into one output buffer — `Y = X Wᵀ`,
//!   `XA = X Aᵀ`, `Y += s · XA Bᵀ` (β = 1) — then one epilogue kernel (row scale, bias);
//! - backward ([`backward`]): `dx = g' W + s (g' B) A` in one buffer, `dA`, `dB` from the
//!   forward's kept `X Aᵀ`, the row scale's gradient from its kept pre-scale output; no
//!   gradient for `W`;
//! - VeRA's product ([`scaled_forward`], [`scaled_backward`]) from the same GEMM and
//!   elementwise pieces, the vectors' gradients from its kept `x Aᵀ` and branch output.
//!
//! The elementwise kernels are compiled with NVRTC on first use. Inputs must be contiguous
//! (`Product::forward` makes them so).
//!
//! Compiled by `scripts/check-cuda.sh`. Tested by `tests/cuda.rs` (`cargo test --features
//! cuda --test cuda`, skipped without a device) — which, as of this writing, has not yet
//! run on a GPU: see `scripts/gpu-check.sh`.

mod backward;
mod blas;
mod dtype;
mod elementwise;
mod forward;
mod scaled;
mod storage;

pub(crate) use backward::{backward, Backward};
pub(crate) use forward::{forward, Forward};
pub(crate) use scaled::{scaled_backward, scaled_forward, Scaled};
pub(crate) use storage::plain_tensor;

/// Whether `t` can go through the CUDA op.
pub(crate) fn supported(t: &candle_core::Tensor) -> bool {
    use candle_core::DType;
    t.device().is_cuda()
        && matches!(
            t.dtype(),
            DType::F32 | DType::F64 | DType::BF16 | DType::F16
        )
}
