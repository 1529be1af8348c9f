//! Delta-LoRA's moved base weights in a checkpoint: after its start step K, Delta-LoRA's
//! rule rewrites each adapted layer's `W`, which no trainable variable holds, so a
//! checkpoint keeps every Delta-LoRA layer's current `W` (`(d_out, d_in)`, its dtype) under
//! `<layer path>.base_layer.weight` and a resumed run puts them back.

use candle_core::Tensor;

use crate::adapter::Adapter;
use crate::error::Result;
use crate::model::AdaptedSet;
use crate::train::hooks::{layer_as, layer_as_mut};
use crate::variants::delta_lora::{DeltaLoraLinear, BASE_WEIGHT_KEY};

/// How this module names itself in errors.
const WHAT: &str = "the Delta-LoRA checkpoint";

/// Every Delta-LoRA layer's current base weight by `<path>.base_layer.weight` (unmerged,
/// `(d_out, d_in)`).
pub(super) fn base_weights(set: &AdaptedSet) -> Result<Vec<(String, Tensor)>> {
    set.layers()
        .into_iter()
        .map(|(path, layer)| {
            let guard = layer.read();
            let layer = layer_as::<DeltaLoraLinear>(&*guard, WHAT)?;
            layer.core().ensure_unmerged()?;
            Ok((key(&path), layer.base().weight().copy()?))
        })
        .collect()
}

/// Puts the weights [`base_weights`] saved back into `set`'s Delta-LoRA layers, each found
/// by `saved(key, current weight)` (which checks it and names what is missing or wrong).
pub(super) fn restore(
    set: &AdaptedSet,
    saved: impl Fn(&str, &Tensor) -> Result<Tensor>,
) -> Result<()> {
    for (path, layer) in set.layers() {
        let mut guard = layer.write();
        let layer = layer_as_mut::<DeltaLoraLinear>(&mut *guard, WHAT)?;
        let value = saved(&key(&path), layer.base().weight())?;
        layer.restore_base_weight(value)?;
    }
    Ok(())
}

fn key(path: &str) -> String {
    format!("{path}.{BASE_WEIGHT_KEY}")
}
