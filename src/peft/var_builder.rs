//! A PEFT adapter on any candle model built from a `VarBuilder`, with no file written: the
//! adapter is merged into each weight it targets when the model asks for that weight.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use crate::checkpoint::{Checkpoint, CheckpointBackend};
use crate::error::Result;
use crate::peft::inspect::load_adapter;
use crate::peft::merge::check_adapter_fits;

/// A `VarBuilder` over the checkpoint `base` (a `.safetensors` file, a model folder or its
/// index) with the PEFT adapter in `adapter_dir` merged, lazily and per tensor, into every
/// weight it targets, as PEFT's `merge_and_unload()` computes it (in f32, then cast to
/// `dtype`). Any model that loads from a `VarBuilder` runs with the adapter, unmodified:
///
/// ```no_run
/// use candle_core::{DType, Device};
/// use lorakit::peft::adapted_var_builder;
/// # fn main() -> lorakit::Result<()> {
/// let vb = adapted_var_builder("models/TinyLlama", "my-adapter", DType::F32, &Device::Cpu)?;
/// // e.g. candle_transformers::models::llama::Llama::load(vb, &config)?
/// # let _ = vb;
/// # Ok(()) }
/// ```
///
/// Checked up front: every module the adapter stores has a 2-D float weight in the
/// checkpoint. Not checked: that the model asks for all of them (a model that never reads a
/// targeted weight silently runs without that part of the adapter).
pub fn adapted_var_builder(
    base: impl AsRef<Path>,
    adapter_dir: impl AsRef<Path>,
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>> {
    let ckpt = Checkpoint::open(base)?;
    let adapter = load_adapter(adapter_dir.as_ref())?;
    check_adapter_fits(&adapter, &ckpt)?;
    let plan = adapter.plan()?;
    let transform = move |name: &str, t: candle_core::Tensor| -> Result<candle_core::Tensor> {
        let target = name
            .strip_suffix(".weight")
            .filter(|_| t.rank() == 2 && t.dtype().is_float());
        match target {
            Some(path) => Ok(plan.merged_weight(path, &t)?.unwrap_or(t)),
            None => Ok(t),
        }
    };
    Ok(
        CheckpointBackend::new(Arc::new(ckpt), Some(Box::new(transform)))
            .into_var_builder(dtype, device),
    )
}
