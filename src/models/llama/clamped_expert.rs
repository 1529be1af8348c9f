//! [`ClampedExpert`]: one gpt-oss expert (transformers' `GptOssExperts`, for one expert).

use candle_core::{Module, Tensor};

use crate::error::Result;
use crate::model::Linear;
use crate::models::ops::sigmoid;

use super::moe::ClampedSwiGlu;

/// One gpt-oss expert: `down((up + 1) · g · sigmoid(alpha · g))` with `[gate, up]`
/// de-interleaved from `gate_up(x)`'s columns (gate at the even ones), `g = min(gate,
/// limit)` and `up` clamped to `[−limit, limit]` (transformers' `GptOssExperts._apply_gate`).
#[derive(Clone, Debug)]
pub(crate) struct ClampedExpert {
    gate_up: Linear,
    down: Linear,
    swiglu: ClampedSwiGlu,
}

impl ClampedExpert {
    /// The expert whose layers are `gate_up` (`hidden → 2I`, interleaved columns) and
    /// `down` (`I → hidden`).
    pub(super) fn new(gate_up: Linear, down: Linear, swiglu: ClampedSwiGlu) -> Self {
        Self {
            gate_up,
            down,
            swiglu,
        }
    }

    /// The expert on its rows `x` `(n, hidden)`.
    pub(super) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gate_up = self.gate_up.forward(x)?;
        let (n, width) = gate_up.dims2()?;
        let pairs = gate_up.reshape((n, width / 2, 2))?;
        let gate = pairs.narrow(2, 0, 1)?.squeeze(2)?;
        let up = pairs.narrow(2, 1, 1)?.squeeze(2)?;
        let ClampedSwiGlu { limit, alpha } = self.swiglu;
        let gate = gate.minimum(limit)?;
        let up = up.clamp(-limit, limit)?;
        let glu = (&gate * sigmoid(&(&gate * alpha)?)?)?;
        let gated = ((up + 1.0)? * glu)?;
        Ok(self.down.forward(&gated)?)
    }
}
