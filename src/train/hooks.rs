//! Per-step hooks: code that runs around the optimizer step with access to the gradients
//! (LoRA-FA's gradient projection, Delta-LoRA's weight update, AdaLoRA's rank allocation,
//! LoRA-drop's calibration).

use candle_core::backprop::GradStore;
use candle_core::Tensor;
use candle_nn::Optimizer;

use crate::adapter::{Adapter, Variant};
use crate::error::{Error, Result, Scope};
use crate::shared::Shared;

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

/// The layers of `variant` among `layers`, in order: how every training rule picks its
/// layers from a model's whole set. An error naming `rule` if there are none.
pub(crate) fn select_kind(
    layers: &[Shared<dyn Adapter>],
    variant: Variant,
    rule: &'static str,
) -> Result<Vec<Shared<dyn Adapter>>> {
    let picked: Vec<_> = layers
        .iter()
        .filter(|l| l.read().kind() == variant)
        .cloned()
        .collect();
    if picked.is_empty() {
        let given: Vec<String> = layers
            .iter()
            .take(3)
            .map(|l| {
                let l = l.read();
                format!("`{}` ({})", l.name(), l.kind())
            })
            .collect();
        let more = if layers.len() > 3 { ", …" } else { "" };
        return Err(Error::usage(
            Scope::Settings(rule.to_string()),
            format!(
                "none of the {} layer(s) given is {} {variant} layer: {}{more}",
                layers.len(),
                if variant.name().starts_with('A') {
                    "an"
                } else {
                    "a"
                },
                given.join(", ")
            ),
        ));
    }
    Ok(picked)
}

/// `layer` as the concrete layer type a rule works on, or an error naming the layer and
/// `rule`. Rules select their layers by [`Variant`], so this fails only on a layer type
/// that reports another type's variant.
pub(crate) fn layer_as<'a, L: Adapter + 'static>(
    layer: &'a dyn Adapter,
    rule: &'static str,
) -> Result<&'a L> {
    match layer.as_any().downcast_ref::<L>() {
        Some(l) => Ok(l),
        None => Err(wrong_layer::<L>(layer.name(), rule)),
    }
}

/// [`layer_as`], mutably.
pub(crate) fn layer_as_mut<'a, L: Adapter + 'static>(
    layer: &'a mut dyn Adapter,
    rule: &'static str,
) -> Result<&'a mut L> {
    let name = layer.name().to_string();
    match layer.as_any_mut().downcast_mut::<L>() {
        Some(l) => Ok(l),
        None => Err(wrong_layer::<L>(&name, rule)),
    }
}

fn wrong_layer<L>(name: &str, rule: &'static str) -> Error {
    let type_name = std::any::type_name::<L>();
    let short = type_name.rsplit("::").next().unwrap_or(type_name);
    Error::usage(
        Scope::Layer(name.to_string()),
        format!("{rule} needs a {short} layer"),
    )
}
