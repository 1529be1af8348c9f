//! Per-step hooks: code that runs around the optimizer step with access to the gradients
//! (LoRA-FA's gradient projection, Delta-LoRA's weight update, AdaLoRA's rank allocation,
//! LoRA-drop's calibration).

use candle_core::backprop::GradStore;
use candle_core::Tensor;
use candle_nn::Optimizer;

use crate::error::Result;

/// A training rule that runs around each optimizer step. `step` counts from 1.
pub trait StepHook {
    /// Before the optimizer step; may rewrite gradients (e.g. LoRA-FA's projection) or
    /// record the parameters' values before the update (Delta-LoRA).
    fn before_step(&mut self, _step: usize, _grads: &mut GradStore) -> Result<()> {
        Ok(())
    }

    /// After the optimizer step, with the gradients that were used (AdaLoRA's scores and
    /// masking, Delta-LoRA's weight update).
    fn after_step(&mut self, _step: usize, _grads: &GradStore) -> Result<()> {
        Ok(())
    }
}

/// One training step in the right order: backward, hooks' `before_step`, optimizer step,
/// hooks' `after_step`. Gradients are dropped at the end (candle builds a fresh store per
/// backward).
pub fn train_step<O: Optimizer>(
    loss: &Tensor,
    optimizer: &mut O,
    hooks: &mut [&mut dyn StepHook],
    step: usize,
) -> Result<()> {
    let mut grads = loss.backward()?;
    for hook in hooks.iter_mut() {
        hook.before_step(step, &mut grads)?;
    }
    optimizer.step(&grads)?;
    for hook in hooks.iter_mut() {
        hook.after_step(step, &grads)?;
    }
    Ok(())
}
