//! Autoregressive generation for the decoders of [`crate::models`]: a
//! [`GenerationConfig`] (how many tokens, which stop them, how each is chosen) and the
//! decoding loop every model's `generate` runs: the prompt through a fresh
//! [`KvCache`], then one token at a time, each step running only the new token.
//!
//! Batched generation (`generate_batch`) left-pads prompts of different lengths into one
//! batch with an attention mask and per-row positions, so each row gives what it gives
//! alone.

use std::path::Path;

use candle_core::{Device, Tensor};
use serde_json::Value;

use crate::error::{Error, Result, Scope};

use super::llama::KvCache;
use super::sampling::{Sampler, Sampling};

/// What to generate: at most `max_new_tokens` tokens, stopping early after any token of
/// `eos` (which is then the last token returned), each token chosen by `sampling`.
///
/// ```
/// use lorakit::models::generation::GenerationConfig;
/// use lorakit::models::sampling::Sampling;
/// let config = GenerationConfig::greedy(16).with_eos([2]);
/// assert_eq!((config.max_new_tokens, config.eos.as_slice()), (16, &[2u32][..]));
/// let sampled = config.with_sampling(Sampling { top_p: Some(0.9), ..Sampling::with_temperature(0.7, 1) });
/// assert!(!sampled.sampling.is_greedy());
/// assert_eq!(GenerationConfig::default(), GenerationConfig::greedy(32));
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct GenerationConfig {
    /// The most tokens to generate (0: none).
    pub max_new_tokens: usize,
    /// Stop tokens: generation ends right after one of them (it is returned). Empty:
    /// always `max_new_tokens` tokens.
    pub eos: Vec<u32>,
    /// How each token is chosen.
    pub sampling: Sampling,
}

impl Default for GenerationConfig {
    /// Greedy, 32 tokens, no stop token.
    fn default() -> Self {
        Self::greedy(32)
    }
}

impl GenerationConfig {
    /// Greedy decoding of `max_new_tokens` tokens with no stop token.
    ///
    /// ```
    /// use lorakit::models::generation::GenerationConfig;
    /// let config = GenerationConfig::greedy(8);
    /// assert!(config.eos.is_empty() && config.sampling.is_greedy());
    /// ```
    pub fn greedy(max_new_tokens: usize) -> Self {
        Self {
            max_new_tokens,
            eos: Vec::new(),
            sampling: Sampling::greedy(),
        }
    }

    /// This config with `eos` as its stop tokens.
    ///
    /// ```
    /// use lorakit::models::generation::GenerationConfig;
    /// assert_eq!(GenerationConfig::greedy(8).with_eos([2, 7]).eos, [2, 7]);
    /// ```
    pub fn with_eos(mut self, eos: impl IntoIterator<Item = u32>) -> Self {
        self.eos = eos.into_iter().collect();
        self
    }

    /// This config with `sampling` choosing each token.
    ///
    /// ```
    /// use lorakit::models::generation::GenerationConfig;
    /// use lorakit::models::sampling::Sampling;
    /// let config = GenerationConfig::greedy(8).with_sampling(Sampling::with_temperature(1.0, 3));
    /// assert_eq!(config.sampling.seed, 3);
    /// ```
    pub fn with_sampling(mut self, sampling: Sampling) -> Self {
        self.sampling = sampling;
        self
    }
}

/// The stop tokens a model folder names, as transformers' `generate` takes them by
/// default: `eos_token_id` of `generation_config.json` (a number or a list), else of
/// `config.json`; empty when neither file names one. (A tokenizer's `eos_token` is not
/// consulted: see [`crate::tokenizer::TextTokenizer::eos_id`].)
///
/// Errors: malformed JSON, or an `eos_token_id` that is not a non-negative integer (or a
/// list of them) below 2³², naming the file.
///
/// ```
/// use lorakit::models::generation::stop_tokens;
/// # fn main() -> lorakit::Result<()> {
/// assert_eq!(stop_tokens("tests/fixtures/models/llama/mistral/base")?, [2]);
/// assert!(stop_tokens("tests/fixtures/models/llama/qwen2/base")?.is_empty()); // null in both
/// assert_eq!(stop_tokens("tests/fixtures/peft_options/gpt2_lora/base")?, [50256]);
/// assert!(stop_tokens("tests/fixtures/tokenizer")?.is_empty()); // no config files
/// # Ok(()) }
/// ```
pub fn stop_tokens(dir: impl AsRef<Path>) -> Result<Vec<u32>> {
    let dir = dir.as_ref();
    for file in ["generation_config.json", "config.json"] {
        let path = dir.join(file);
        if !path.is_file() {
            continue;
        }
        let text = crate::error::read_text(&path)?;
        let json: Value = serde_json::from_str(&text).map_err(|e| Error::json(&path, &e))?;
        let ids = match json.get("eos_token_id") {
            None | Some(Value::Null) => continue,
            Some(Value::Array(list)) => list.iter().map(token_id).collect::<Option<Vec<_>>>(),
            Some(one) => token_id(one).map(|id| vec![id]),
        };
        return ids.ok_or_else(|| {
            Error::file_config(
                &path,
                "eos_token_id",
                "must be a token id or a list of token ids (integers ≥ 0)",
            )
        });
    }
    Ok(Vec::new())
}

fn token_id(value: &Value) -> Option<u32> {
    value.as_u64().and_then(|id| u32::try_from(id).ok())
}

/// What the decoding loop needs of a model: a fresh cache, a cached forward, and the
/// limits the prompt is checked against before any work.
pub(crate) trait Decoder: Sync {
    /// An empty cache for this model.
    fn new_cache(&self) -> KvCache;
    /// Logits `(batch, seq, vocab)` of the new ids after the cached positions; `pads`: a
    /// left-padded batch's padding slots per row (`models::padding`).
    fn step(
        &self,
        input_ids: &Tensor,
        cache: &mut KvCache,
        pads: Option<&[usize]>,
    ) -> Result<Tensor>;
    /// The vocabulary size.
    fn vocab(&self) -> usize;
    /// The most positions the model takes, and the config field that says so.
    fn max_positions(&self) -> (usize, &'static str);
    /// The device the model lives on.
    fn on(&self) -> &Device;
    /// The model's name in errors (`"Llama generation"`).
    fn what(&self) -> &'static str;
    /// The sequence length at which generation re-runs the whole sequence once, without
    /// the cache (Phi-3 with LongRoPE: `original_max_position_embeddings + 1`, where its
    /// frequencies switch and transformers' `Phi3ForCausalLM` drops the cache); `None`
    /// for other models.
    fn rerun_at(&self) -> Option<usize> {
        None
    }
}

/// Generates after `prompt` by `config` (see the models' `generate`). Everything is
/// checked before the first forward: a non-empty prompt, its ids below the vocabulary
/// size, `prompt.len() + max_new_tokens - 1` positions within the model's limit (the last
/// token is never run), the sampling settings.
pub(crate) fn generate(
    model: &impl Decoder,
    prompt: &[u32],
    config: &GenerationConfig,
) -> Result<Vec<u32>> {
    crate::threads::on_worker(|| generate_here(model, prompt, config))
}

/// [`generate`] on the calling thread.
fn generate_here(
    model: &impl Decoder,
    prompt: &[u32],
    config: &GenerationConfig,
) -> Result<Vec<u32>> {
    check_prompt(model, prompt, config.max_new_tokens)?;
    let mut sampler = Sampler::new(config.sampling.clone())?;
    let mut out = Vec::with_capacity(config.max_new_tokens);
    if config.max_new_tokens == 0 {
        return Ok(out);
    }
    let mut cache = model.new_cache().for_inference();
    let mut input = Tensor::new(prompt, model.on())?.unsqueeze(0)?;
    while out.len() < config.max_new_tokens {
        let total = prompt.len() + out.len();
        if model
            .rerun_at()
            .is_some_and(|at| total >= at && !cache.is_empty() && cache.len() < at)
        {
            cache = model.new_cache().for_inference();
            let tokens: Vec<u32> = prompt.iter().chain(&out).copied().collect();
            input = Tensor::new(tokens.as_slice(), model.on())?.unsqueeze(0)?;
        }
        let logits = model.step(&input, &mut cache, None)?;
        let last = logits.dim(1)?.saturating_sub(1);
        let next = sampler.sample(&logits.narrow(1, last, 1)?)?;
        out.push(next);
        if config.eos.contains(&next) {
            break;
        }
        input = Tensor::new(&[[next]], model.on())?;
    }
    Ok(out)
}

/// A non-empty prompt of ids below the vocabulary size that fits, with
/// `max_new_tokens - 1` more positions, in the model's limit.
pub(crate) fn check_prompt(
    model: &impl Decoder,
    prompt: &[u32],
    max_new_tokens: usize,
) -> Result<()> {
    let scope = || Scope::Settings(model.what().to_string());
    if prompt.is_empty() {
        return Err(Error::usage(scope(), "the prompt is empty"));
    }
    let vocab = model.vocab();
    if let Some(bad) = prompt.iter().find(|&&id| id as usize >= vocab) {
        return Err(Error::usage(
            scope(),
            format!("prompt token id {bad} is out of range for vocab_size {vocab}"),
        ));
    }
    let (max, field) = model.max_positions();
    let needed = prompt
        .len()
        .saturating_add(max_new_tokens.saturating_sub(1));
    if needed > max {
        return Err(Error::usage(
            scope(),
            format!(
                "a prompt of {} tokens and max_new_tokens {max_new_tokens} need {needed} \
                 positions, more than {field} {max}",
                prompt.len()
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A decoder whose next token is always 1, recording whether each step ran on a rayon
    /// worker.
    struct OnWorkerProbe {
        device: Device,
        steps_on_worker: Mutex<Vec<bool>>,
    }

    impl Decoder for OnWorkerProbe {
        fn new_cache(&self) -> KvCache {
            KvCache::with_layers(1)
        }
        fn step(&self, ids: &Tensor, _: &mut KvCache, _: Option<&[usize]>) -> Result<Tensor> {
            if let Ok(mut seen) = self.steps_on_worker.lock() {
                seen.push(rayon::current_thread_index().is_some());
            }
            let (batch, seq) = ids.dims2()?;
            let row = Tensor::new(&[0f32, 1.0, 0.0], &self.device)?;
            Ok(row.broadcast_as((batch, seq, 3))?.contiguous()?)
        }
        fn vocab(&self) -> usize {
            3
        }
        fn max_positions(&self) -> (usize, &'static str) {
            (64, "max_positions")
        }
        fn on(&self) -> &Device {
            &self.device
        }
        fn what(&self) -> &'static str {
            "probe generation"
        }
    }

    /// Generation (one sequence and a batch) runs its forwards on rayon's workers when
    /// called from another thread (`threads::on_worker`).
    #[test]
    fn decoding_runs_on_a_rayon_worker() -> Result<()> {
        let probe = OnWorkerProbe {
            device: Device::Cpu,
            steps_on_worker: Mutex::new(Vec::new()),
        };
        assert_eq!(rayon::current_thread_index(), None);
        assert_eq!(
            generate(&probe, &[2, 0], &GenerationConfig::greedy(3))?,
            [1, 1, 1]
        );
        let rows = crate::models::batch_generation::generate_batch(
            &probe,
            &[vec![2], vec![0, 2]],
            &GenerationConfig::greedy(2),
        )?;
        assert_eq!(rows, [vec![1, 1], vec![1, 1]]);
        let seen = probe
            .steps_on_worker
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default();
        assert_eq!(seen.len(), 5);
        assert!(seen.iter().all(|&on| on), "{seen:?}");
        Ok(())
    }
}
