//! A PEFT adapter on any candle model built from a `VarBuilder`, with no file written: the
//! adapter is merged into each weight it targets when the model asks for that weight.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::checkpoint::{Checkpoint, CheckpointBackend};
use crate::error::{Error, Result};
use crate::peft::inspect::load_adapter;
use crate::peft::merge::check_adapter_fits;

/// A `VarBuilder` over the checkpoint `base` (a `.safetensors` file, a model folder or its
/// index) with the PEFT adapter in `adapter_dir` merged, lazily and per tensor, into every
/// weight it targets, as PEFT's `merge_and_unload()` computes it on the model loaded in
/// the checkpoint's dtype (in f32, then cast to `dtype`; see
/// [`AdapterPlan::merged_module`](crate::model::AdapterPlan::merged_module) for what is
/// rounded to a half-precision checkpoint's dtype first). Any model that loads from a
/// `VarBuilder` runs with the adapter, unmodified:
///
/// ```no_run
/// use candle_core::{DType, Device, Tensor};
/// use lorakit::peft::adapted_var_builder;
/// # fn main() -> lorakit::Result<()> {
/// let vb = adapted_var_builder("models/TinyLlama", "my-adapter", DType::F32, &Device::Cpu)?;
/// // e.g. candle_transformers::models::llama::Llama::load(vb, &config)?
/// # let _ = vb;
/// # Ok(()) }
/// ```
///
/// Checked up front: every module the adapter stores has a 2-D float weight in the
/// checkpoint (an adapter on a head tied to the input embedding is refused: a model reads
/// the table for such a head). Not checked: that the model asks for all of them (a model that never reads a
/// targeted weight silently runs without that part of the adapter).
pub fn adapted_var_builder(
    base: impl AsRef<Path>,
    adapter_dir: impl AsRef<Path>,
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>> {
    let ckpt = Checkpoint::open(base)?;
    let adapter = load_adapter(adapter_dir.as_ref())?;
    let fit = check_adapter_fits(&adapter, &ckpt)?;
    if let Some(parameter) = adapter.config().target_parameters.first() {
        return Err(Error::checkpoint(
            ckpt.path(),
            format!(
                "the adapter has LoRAs on parameters (target_parameters, e.g. `{parameter}`: a \
                 mixture of experts' stacked weights), which a VarBuilder cannot apply: merge \
                 it into the checkpoint first (`lorakit merge`), or build the model through \
                 the adapter's plan"
            ),
        ));
    }
    if let Some(added) = fit.added.first() {
        return Err(Error::checkpoint(
            ckpt.path(),
            format!(
                "the adapter adds `{}` ({} tensor(s) of a modules_to_save copy), which the \
                 checkpoint lacks: merge it into the checkpoint first (`lorakit merge`), or \
                 build the model through the adapter's plan",
                added.name,
                fit.added.len()
            ),
        ));
    }
    if let Some(untied) = fit.untied.first() {
        return Err(Error::checkpoint(
            ckpt.path(),
            format!(
                "the adapter changes `{}`, an output head tied to `{}` (the checkpoint has no \
                 head of its own): a model built from a VarBuilder reads the table for its \
                 head, so the head's adapter would be lost; merge it into the checkpoint \
                 first (`lorakit merge` writes the head untied), or build the model through \
                 the adapter's plan",
                untied.head, untied.table
            ),
        ));
    }
    let names = fit.names;
    let plan = adapter.plan()?;
    let ckpt = Arc::new(ckpt);
    let source = ckpt.clone();
    let transform = move |name: &str, t: Tensor| -> Result<Tensor> {
        let module = [("weight", ".weight"), ("bias", ".bias")]
            .into_iter()
            .find_map(|(own, suffix)| Some((name.strip_suffix(suffix)?, own)));
        let Some((stored_path, own)) = module.filter(|_| t.dtype().is_float()) else {
            return Ok(t);
        };
        let path = &names.in_adapter(stored_path);
        let kind = adapter.base_kind(path);
        if !plan.touches(path, kind) || (own == "bias" && !adapter.changes_bias(path)) {
            return Ok(t);
        }
        let partner = |n: &str| -> Result<Option<Tensor>> {
            match source.get(n) {
                Some(_) => Ok(Some(source.load(n, t.device())?)),
                None => Ok(None),
            }
        };
        let (weight, bias) = match own {
            "weight" => (t.clone(), partner(&format!("{stored_path}.bias"))?),
            _ => match partner(&format!("{stored_path}.weight"))? {
                Some(w) => (w, Some(t.clone())),
                None => return Ok(t),
            },
        };
        if weight.rank() != 2 {
            // A norm's tensors under bias = "all": the adapter's copy replaces them.
            return Ok(plan.stored_tensor(path, own)?.unwrap_or(t));
        }
        let Some(merged) = plan.merged_module(path, kind, &weight, bias.as_ref())? else {
            return Ok(t);
        };
        let value = match own {
            "weight" => Some(merged.weight),
            _ => merged.bias,
        };
        Ok(value.unwrap_or(t))
    };
    Ok(CheckpointBackend::new(ckpt, Some(Box::new(transform))).into_var_builder(dtype, device))
}
