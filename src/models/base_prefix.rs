//! Checkpoints saved from a base model alone (`GPT2Model`, `BertModel`) name their tensors
//! without the prefix the head model puts before them (transformers' `base_model_prefix`:
//! `transformer.`, `bert.`); transformers adds it when it loads them into the head model.
//! The Hub's `gpt2` and `distilgpt2`, and many BERT encoders, are such checkpoints.

use candle_nn::VarBuilder;

/// `vb` for a head model whose base model lives under `prefix` (no trailing dot). When the
/// checkpoint has `probe` (a tensor every such model has, named within the base model) only
/// without the prefix, lookups under `prefix.` drop it; module paths, and with them adapter
/// names, keep it. Otherwise `vb` unchanged.
pub(crate) fn with_base_prefix<'a>(
    vb: VarBuilder<'a>,
    prefix: &str,
    probe: &str,
) -> VarBuilder<'a> {
    let prefixed = format!("{prefix}.{probe}");
    if vb.contains_tensor(&prefixed) || !vb.contains_tensor(probe) {
        return vb;
    }
    let strip = format!("{prefix}.");
    vb.rename_f(move |name| name.strip_prefix(&strip).unwrap_or(name).to_string())
}
