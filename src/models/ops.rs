//! Pieces the models share. candle-nn's fused kernels (`softmax_last_dim`, `layer_norm`,
//! `rms_norm`, `rotary_emb::rope`) have no backward in candle 0.11: used where a gradient
//! flows they would silently stop it before the adapters. So each op here takes the fused
//! kernel only when nothing it reads tracks a gradient, and the same math in
//! differentiable candle ops otherwise.

use candle_core::{Tensor, D};
use candle_nn::{Init, VarBuilder};

use crate::error::{Error, Result};
use crate::model::AdapterPlan;

/// Whether any of `tensors` is, or is computed from, a trainable variable.
pub(crate) fn tracks_gradient(tensors: &[&Tensor]) -> bool {
    tensors.iter().any(|t| t.track_op())
}

/// `x` under dropout with probability `p` when `train` (a model's own dropouts, as
/// transformers applies them in `model.train()`), `x` itself otherwise.
pub(crate) fn dropout_t(x: Tensor, p: f64, train: bool) -> Result<Tensor> {
    if train && p > 0.0 {
        Ok(crate::kernels::dropout::dropout(&x, p)?)
    } else {
        Ok(x)
    }
}

/// `1 / (1 + e^(−x))`, composed so that a gradient flows through it.
pub(crate) fn sigmoid(x: &Tensor) -> Result<Tensor> {
    Ok((x.neg()?.exp()? + 1.0)?.recip()?)
}

/// Softmax over the last dimension.
pub(crate) fn softmax_last(x: &Tensor) -> Result<Tensor> {
    if tracks_gradient(&[x]) {
        if super::softmax::supports(x) {
            return Ok(super::softmax::softmax_last_trainable(x)?);
        }
        Ok(candle_nn::ops::softmax(x, D::Minus1)?)
    } else {
        Ok(candle_nn::ops::softmax_last_dim(&x.contiguous()?)?)
    }
}

/// A LayerNorm whose bias comes through [`AdapterPlan::bias`] (`bias = "all"` trains it,
/// a loaded adapter's trained bias replaces it); its weight is never trained.
#[derive(Clone, Debug)]
pub(crate) struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    /// `weight` and `bias` (`size`) at `vb`'s path (old checkpoints' `gamma` / `beta`
    /// too). A `modules_to_save` entry naming the norm is refused: the plan copies linear
    /// layers and embeddings only.
    pub(crate) fn load(size: usize, eps: f64, vb: VarBuilder, plan: &AdapterPlan) -> Result<Self> {
        let path = vb.prefix();
        if plan.targets().is_module_to_save(&path) {
            return Err(Error::Unsupported {
                what: "modules_to_save entry",
                got: format!("{path} (a LayerNorm)"),
                supported: "linear layers, Conv1D and embeddings; a LayerNorm's bias trains \
                            under bias = \"all\""
                    .to_string(),
            });
        }
        let (w, b) = if !vb.contains_tensor("weight") && vb.contains_tensor("gamma") {
            ("gamma", "beta")
        } else {
            ("weight", "bias")
        };
        let weight = vb.get_with_hints(size, w, Init::Const(1.0))?;
        let base_bias = vb.get_with_hints(size, b, Init::Const(0.0))?;
        let bias = plan
            .bias(&path, base_bias)?
            .to_dtype(weight.dtype())?
            .to_device(weight.device())?;
        crate::validate::shape(&path, "bias", &bias, &[size])?;
        Ok(Self { weight, bias, eps })
    }

    /// The norm over the last dimension (`models::layer_norm`'s paths, as
    /// [`crate::models::fused::layer_norm`]).
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let eps = self.eps as f32;
        Ok(super::layer_norm::layer_norm(
            x,
            &self.weight,
            &self.bias,
            eps,
        )?)
    }
}
