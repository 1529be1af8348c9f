//! [`ClampedExpert`]: one gpt-oss expert (transformers' `GptOssExperts`, for one expert).

use candle_core::{Module, Tensor};

use crate::error::Result;
use crate::model::Linear;
use crate::models::clamped_swiglu::clamped_swiglu;

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
        let ClampedSwiGlu { limit, alpha } = self.swiglu;
        let gated = clamped_swiglu(&gate_up, limit, alpha)?;
        Ok(self.down.forward(&gated)?)
    }
}
