//! Batched generation: prompts of different lengths left-padded into one batch that shares
//! one [`KvCache`](super::llama::KvCache), with an attention mask and per-row positions
//! (`models::padding`) so that each row gives what generating it alone gives.

use candle_core::Tensor;

use crate::error::Result;

use super::generation::{check_prompt, Decoder, GenerationConfig};
use super::sampling::Sampler;

/// The id in padding slots (never attended to, so any id in the vocabulary does).
const PAD: u32 = 0;

/// Generates after each of `prompts` by `config` in one batch (see the models'
/// `generate_batch`): row `r` of the result holds the new tokens of `prompts[r]`. Each row
/// has its own sampler seeded with `config.sampling.seed` and stops at its own stop token;
/// it then leaves the batch, so the later steps run the rows still going alone.
/// Every prompt is checked before the first forward, as in `generate`.
pub(crate) fn generate_batch(
    model: &impl Decoder,
    prompts: &[Vec<u32>],
    config: &GenerationConfig,
) -> Result<Vec<Vec<u32>>> {
    crate::threads::on_worker(|| generate_batch_here(model, prompts, config))
}

/// [`generate_batch`] on the calling thread.
fn generate_batch_here(
    model: &impl Decoder,
    prompts: &[Vec<u32>],
    config: &GenerationConfig,
) -> Result<Vec<Vec<u32>>> {
    for prompt in prompts {
        check_prompt(model, prompt, config.max_new_tokens)?;
    }
    let mut samplers = prompts
        .iter()
        .map(|_| Sampler::new(config.sampling.clone()))
        .collect::<Result<Vec<_>>>()?;
    let rows = prompts.len();
    let mut out = vec![Vec::with_capacity(config.max_new_tokens); rows];
    if rows == 0 || config.max_new_tokens == 0 {
        return Ok(out);
    }
    let width = prompts.iter().map(Vec::len).max().unwrap_or(0);
    // A model that re-runs its sequence at a length (Phi-3's LongRoPE switch) picks its
    // frequencies by the batch's longest row: the rows would not each give what they give
    // alone once the batch reaches that length.
    if let Some(at) = model.rerun_at() {
        if width + config.max_new_tokens > at {
            return Err(crate::error::Error::usage(
                crate::error::Scope::Settings(model.what().to_string()),
                format!(
                    "batched generation up to {} positions crosses the LongRoPE switch at \
                     {at} (original_max_position_embeddings + 1), where each row alone \
                     re-runs its sequence with the long factors: generate these prompts \
                     one at a time",
                    width + config.max_new_tokens - 1
                ),
            ));
        }
    }
    let pads: Vec<usize> = prompts.iter().map(|p| width - p.len()).collect();
    let ids: Vec<u32> = prompts
        .iter()
        .flat_map(|p| std::iter::repeat_n(PAD, width - p.len()).chain(p.iter().copied()))
        .collect();
    let mut input = Tensor::from_vec(ids, (rows, width), model.on())?;
    let mut cache = model.new_cache().for_inference();
    // The rows still generating, as indices into `prompts`, in batch order; and their
    // padding. A row that stops leaves the batch (and the cache) before the next step.
    let mut active: Vec<usize> = (0..rows).collect();
    let mut active_pads = pads;
    for step in 1..=config.max_new_tokens {
        let logits = model.step(&input, &mut cache, Some(&active_pads))?;
        let last = logits.narrow(1, logits.dim(1)?.saturating_sub(1), 1)?;
        let mut next = Vec::with_capacity(active.len());
        let mut going = Vec::with_capacity(active.len());
        for (slot, &row) in active.iter().enumerate() {
            let (Some(sampler), Some(tokens)) = (samplers.get_mut(row), out.get_mut(row)) else {
                continue;
            };
            let token = sampler.sample(&last.narrow(0, slot, 1)?)?;
            tokens.push(token);
            if !config.eos.contains(&token) {
                going.push(slot);
                next.push(token);
            }
        }
        if going.is_empty() || step == config.max_new_tokens {
            break;
        }
        if going.len() < active.len() {
            cache.keep_rows(&going)?;
            active = going
                .iter()
                .filter_map(|&s| active.get(s).copied())
                .collect();
            active_pads = going
                .iter()
                .filter_map(|&s| active_pads.get(s).copied())
                .collect();
        }
        input = Tensor::from_vec(next, (active.len(), 1), model.on())?;
    }
    Ok(out)
}
