//! Delta-LoRA's moved base weights in a checkpoint: after its start step K, Delta-LoRA's
//! rule rewrites each adapted layer's `W`, which no trainable variable holds, so a
//! checkpoint keeps every Delta-LoRA layer's current `W` (`(d_out, d_in)`, its dtype) under
//! `<layer path>.base_layer.weight` and a resumed run puts them back.

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;

use crate::adapter::Adapter;
use crate::error::{Error, Result};
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

/// Puts the weights [`base_weights`] saved back into `set`'s Delta-LoRA layers. A layer
/// missing from `saved` or of another shape or dtype is an error naming it and `file`.
pub(super) fn restore(
    set: &AdaptedSet,
    saved: &HashMap<String, Tensor>,
    file: &Path,
) -> Result<()> {
    for (path, layer) in set.layers() {
        let key = key(&path);
        let value = saved.get(&key).ok_or_else(|| Error::MissingKey {
            key: key.clone(),
            file: file.display().to_string(),
        })?;
        let mut guard = layer.write();
        let layer = layer_as_mut::<DeltaLoraLinear>(&mut *guard, WHAT)?;
        super::checkpoint::check_like(value, layer.base().weight(), &key, file)?;
        layer.restore_base_weight(value.clone())?;
    }
    Ok(())
}

fn key(path: &str) -> String {
    format!("{path}.{BASE_WEIGHT_KEY}")
}
