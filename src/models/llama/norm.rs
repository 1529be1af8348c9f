//! The Llama family's RMSNorm, and Gemma's, which multiplies by `1 + weight`.

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;

use crate::error::Result;
use crate::models::fused;

use super::config::LlamaConfig;

/// RMSNorm as transformers computes it: `w ⊙ x / sqrt(mean(x²) + ε)`, in f32 for half
/// precision inputs. Gemma's checkpoints store `w − 1` (its RMSNorm multiplies by
/// `1 + weight`): with the config's `unit_offset_norms` the 1 is added at load, in f32 (a
/// half-precision model then holds `1 + weight` rounded once to its dtype, where
/// transformers keeps it in f32).
#[derive(Clone, Debug)]
pub(crate) struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    /// Loads `weight` `(dim,)` at `vb`'s path, with the config's ε and weight offset.
    pub(crate) fn load(c: &LlamaConfig, dim: usize, vb: VarBuilder) -> Result<Self> {
        let stored = vb.get(dim, "weight")?;
        let weight = if c.unit_offset_norms {
            (stored.to_dtype(DType::F32)? + 1.0)?.to_dtype(stored.dtype())?
        } else {
            stored
        };
        Ok(Self {
            weight,
            eps: c.rms_norm_eps as f32,
        })
    }

    /// Normalizes over the last dimension ([`crate::models::fused::rms_norm`]).
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        fused::rms_norm(x, &self.weight, self.eps)
    }
}
