//! The forward every low-rank variant without a row scale shares: the fused product when the
//! adapter input is `x` itself, or base plus a separate low-rank branch when training-time
//! dropout feeds the branch another input.

use candle_core::Tensor;

use crate::error::Result;
use crate::frozen::FrozenLinear;
use crate::kernels::{low_rank_only, FusedLinear, LowRankTerm};

/// `x Wᵀ + b + s · (drop(x) A_effᵀ) B_effᵀ`, with dropout (probability `dropout`) only when
/// `train` is set. Without dropout this is one [`FusedLinear`] call.
pub(crate) fn low_rank_forward(
    base: &FrozenLinear,
    term: LowRankTerm<'_>,
    dropout: f64,
    x: &Tensor,
    train: bool,
) -> Result<Tensor> {
    if train && dropout > 0.0 {
        let frozen = FusedLinear {
            weight: base.weight(),
            bias: base.bias(),
            low_rank: None,
            row_scale: None,
        };
        let dropped = candle_nn::ops::dropout(x, dropout as f32)?;
        return Ok((frozen.forward(x)? + low_rank_only(&dropped, &term)?)?);
    }
    FusedLinear {
        weight: base.weight(),
        bias: base.bias(),
        low_rank: Some(term),
        row_scale: None,
    }
    .forward(x)
}
