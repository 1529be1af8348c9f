//! The one hot path every variant shares:
//!
//! ```text
//! y = row_scale ⊙ ( x Wᵀ + s · (x A_effᵀ) B_effᵀ ) + b
//! ```
//!
//! [`FusedLinear`] describes one such product; [`FusedLinear::forward`] runs it through the
//! fastest path the device has, [`FusedLinear::forward_composed`] through plain candle ops
//! (the reference the fused kernels are tested against, and the fallback on devices without
//! a fused kernel).

use candle_core::{DType, Device, Tensor};

use crate::error::Result;
use crate::frozen::{flatten_rows, unflatten_rows};

/// The low-rank term `s · (x Aᵀ) Bᵀ`.
#[derive(Clone, Copy, Debug)]
pub struct LowRankTerm<'a> {
    /// `A_eff`, `(r, d_in)`.
    pub a: &'a Tensor,
    /// `B_eff`, `(d_out, r)`.
    pub b: &'a Tensor,
    /// The scale `s`.
    pub scale: f64,
}

/// One adapted linear product. `weight` and `bias` are frozen (they never receive a
/// gradient from the fused kernel); `a`, `b` and `row_scale` may be trainable.
#[derive(Clone, Copy, Debug)]
pub struct FusedLinear<'a> {
    /// Frozen `W`, `(d_out, d_in)`.
    pub weight: &'a Tensor,
    /// Frozen bias, `(d_out,)`, added after the row scale.
    pub bias: Option<&'a Tensor>,
    /// The low-rank term, if any.
    pub low_rank: Option<LowRankTerm<'a>>,
    /// Per-output scale `(d_out,)` applied to base plus low-rank term (DoRA's `m / ‖W'‖`).
    pub row_scale: Option<&'a Tensor>,
}

impl FusedLinear<'_> {
    /// Runs the product on the fastest path available for `x`'s device.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_composed(x)
    }

    /// The reference: the same product composed from candle ops. Half-precision inputs are
    /// computed in f32 on the CPU and cast back.
    pub fn forward_composed(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let compute = compute_dtype(dtype, x.device());
        let cast = |t: &Tensor| t.to_dtype(compute);
        let (x2, lead) = flatten_rows(x)?;
        let x2 = cast(&x2)?;
        let mut y = x2.matmul(&cast(self.weight)?.t()?)?;
        if let Some(term) = &self.low_rank {
            let xa = x2.matmul(&cast(term.a)?.t()?)?;
            let low = (xa.matmul(&cast(term.b)?.t()?)? * term.scale)?;
            y = (y + low)?;
        }
        if let Some(c) = self.row_scale {
            y = y.broadcast_mul(&cast(c)?)?;
        }
        if let Some(b) = self.bias {
            y = y.broadcast_add(&cast(b)?)?;
        }
        Ok(unflatten_rows(&y.to_dtype(dtype)?, &lead)?)
    }
}

/// `s · (x Aᵀ) Bᵀ` alone, composed (the adapter branch when dropout feeds it another input
/// than the base).
pub fn low_rank_only(x: &Tensor, term: &LowRankTerm) -> Result<Tensor> {
    let dtype = x.dtype();
    let compute = compute_dtype(dtype, x.device());
    let (x2, lead) = flatten_rows(x)?;
    let xa = x2
        .to_dtype(compute)?
        .matmul(&term.a.to_dtype(compute)?.t()?)?;
    let low = (xa.matmul(&term.b.to_dtype(compute)?.t()?)? * term.scale)?;
    Ok(unflatten_rows(&low.to_dtype(dtype)?, &lead)?)
}

/// The dtype arithmetic runs in: f32 for f16/bf16 on the CPU (candle's CPU matmul has no
/// half-precision kernel), the tensor's own dtype otherwise.
pub fn compute_dtype(dtype: DType, device: &Device) -> DType {
    match dtype {
        DType::F16 | DType::BF16 if device.is_cpu() => DType::F32,
        d => d,
    }
}
