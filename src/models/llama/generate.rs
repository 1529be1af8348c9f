//! Incremental decoding over a [`KvCache`], and generation ([`crate::models::generation`]).

use candle_core::{Device, Tensor};

use crate::error::Result;
use crate::models::generation::{self, Decoder, GenerationConfig};

use super::cache::KvCache;
use super::config::RopeScaling;
use super::family::LlamaFamily;
use super::LlamaForCausalLM;

impl LlamaForCausalLM {
    /// Logits `(batch, seq, vocab)` for the new token ids `(batch, seq)` that continue the
    /// sequences in `cache`: their positions start at `cache.len()`, they attend to the
    /// cached positions and to each other causally (within the sliding window on sliding
    /// layers), and their keys and values are appended to `cache`. The same logits as
    /// [`LlamaForCausalLM::forward`] on the whole sequence at those positions.
    ///
    /// Errors (the cache left as it was): bad token ids (as in `forward`), a batch size
    /// other than the cache's, a cache built for another layer count, or more than
    /// `max_position_embeddings` positions in all.
    ///
    /// The cache keeps keys and values without their autograd history ([`KvCache`]).
    ///
    /// ```
    /// use candle_core::{DType, Device, IndexOp, Tensor};
    /// use lorakit::models::llama::{KvCache, LlamaForCausalLM};
    /// use lorakit::peft::PeftAdapter;
    /// # fn main() -> lorakit::Result<()> {
    /// let dir = "tests/fixtures/models/llama/qwen2";
    /// let dev = Device::Cpu;
    /// let plan = PeftAdapter::load(format!("{dir}/lora"), &dev)?.plan()?;
    /// let model = LlamaForCausalLM::from_pretrained(format!("{dir}/base"), DType::F32, &dev, &plan)?;
    /// let ids = Tensor::new(&[[1u32, 17, 42, 5]], &dev)?;
    /// let full = model.forward(&ids)?;
    ///
    /// let mut cache = KvCache::new(model.config());
    /// let prefill = model.forward_cached(&ids.i((.., ..3))?, &mut cache)?; // positions 0..3
    /// let step = model.forward_cached(&ids.i((.., 3..))?, &mut cache)?; // position 3
    /// assert_eq!((prefill.dims(), step.dims(), cache.len()), (&[1, 3, 64][..], &[1, 1, 64][..], 4));
    /// let diff = (step - full.i((.., 3..))?)?.abs()?.max_all()?.to_scalar::<f32>()?;
    /// assert!(diff < 1e-5);
    /// // The cache holds one sequence: a batch of two is refused.
    /// assert!(model.forward_cached(&Tensor::new(&[[1u32], [2]], &dev)?, &mut cache).is_err());
    /// # Ok(()) }
    /// ```
    pub fn forward_cached(&self, input_ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        self.cached(input_ids, cache, None)
    }

    /// [`LlamaForCausalLM::forward_cached`] on a batch left-padded by `pads` (or none).
    fn cached(&self, ids: &Tensor, cache: &mut KvCache, pads: Option<&[usize]>) -> Result<Tensor> {
        let (batch, seq) = self.trunk.check_ids(ids)?;
        cache.check(batch, seq, self.trunk.layers.len(), self.position_limit())?;
        let inference = cache.is_for_inference();
        let (logits, entries) = self.run(ids, cache.len(), cache.entries(), pads, inference)?;
        cache.commit(entries, batch, seq);
        Ok(logits)
    }

    /// An empty [`KvCache`] for this model (one slot per decoder layer).
    ///
    /// ```
    /// use candle_core::{DType, Device};
    /// use lorakit::model::AdapterPlan;
    /// use lorakit::models::llama::LlamaForCausalLM;
    /// # fn main() -> lorakit::Result<()> {
    /// let dir = "tests/fixtures/models/llama/mistral/base";
    /// let model = LlamaForCausalLM::from_pretrained(dir, DType::F32, &Device::Cpu, &AdapterPlan::none())?;
    /// assert_eq!(model.new_cache().num_layers(), 2);
    /// # Ok(()) }
    /// ```
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.config())
    }

    /// Generates one sequence after `prompt` by `config`: the prompt runs through a fresh
    /// [`KvCache`], then each new token is chosen from the last position's logits
    /// ([`crate::models::sampling::Sampler`]: greedy or sampled) and run alone. Returns the
    /// generated tokens (not the prompt): `config.max_new_tokens` of them, or fewer when a
    /// token of `config.eos` comes (it is the last one returned). Batch 1: see
    /// [`crate::models::generation`].
    ///
    /// Errors, before any work: an empty prompt, a token id out of the vocabulary, a
    /// prompt plus `max_new_tokens - 1` longer than `max_position_embeddings`, invalid
    /// sampling settings.
    ///
    /// ```
    /// use candle_core::{DType, Device};
    /// use lorakit::models::generation::GenerationConfig;
    /// use lorakit::models::llama::LlamaForCausalLM;
    /// use lorakit::models::sampling::Sampling;
    /// use lorakit::peft::PeftAdapter;
    /// # fn main() -> lorakit::Result<()> {
    /// let dir = "tests/fixtures/models/llama/qwen2";
    /// let dev = Device::Cpu;
    /// let plan = PeftAdapter::load(format!("{dir}/lora"), &dev)?.plan()?;
    /// let model = LlamaForCausalLM::from_pretrained(format!("{dir}/base"), DType::F32, &dev, &plan)?;
    /// let prompt = [1u32, 17, 42, 5];
    /// // transformers + PEFT generate these (tests/fixtures/generate/expected.json).
    /// let greedy = model.generate(&prompt, &GenerationConfig::greedy(12))?;
    /// assert_eq!(greedy, [22, 9, 12, 27, 27, 11, 17, 9, 13, 14, 5, 12]);
    /// // Stop tokens end it early.
    /// assert_eq!(model.generate(&prompt, &GenerationConfig::greedy(12).with_eos([27]))?, [22, 9, 12, 27]);
    /// // Sampling: the same seed, the same tokens.
    /// let sampled = GenerationConfig::greedy(12)
    ///     .with_sampling(Sampling { top_k: Some(10), ..Sampling::with_temperature(0.8, 5) });
    /// assert_eq!(model.generate(&prompt, &sampled)?, model.generate(&prompt, &sampled)?);
    /// # Ok(()) }
    /// ```
    pub fn generate(&self, prompt: &[u32], config: &GenerationConfig) -> Result<Vec<u32>> {
        generation::generate(self, prompt, config)
    }

    /// Generates after each of `prompts` in one batch: the prompts are left-padded to the
    /// longest, with an attention mask and each row's own positions, and share one
    /// [`KvCache`]; row `r` of the result is what [`LlamaForCausalLM::generate`] gives for
    /// `prompts[r]` (the same tokens when greedy; sampled rows each draw from a sampler
    /// seeded with `config.sampling.seed`). Each row stops at its own stop token and then
    /// leaves the batch: the later steps run only the rows still going.
    ///
    /// Errors, before any work: as `generate`, for any prompt.
    ///
    /// ```
    /// use candle_core::{DType, Device};
    /// use lorakit::models::generation::GenerationConfig;
    /// use lorakit::models::llama::LlamaForCausalLM;
    /// use lorakit::peft::PeftAdapter;
    /// # fn main() -> lorakit::Result<()> {
    /// let dir = "tests/fixtures/models/llama/qwen2";
    /// let dev = Device::Cpu;
    /// let plan = PeftAdapter::load(format!("{dir}/lora"), &dev)?.plan()?;
    /// let model = LlamaForCausalLM::from_pretrained(format!("{dir}/base"), DType::F32, &dev, &plan)?;
    /// let prompts = vec![vec![1u32, 17, 42, 5], vec![11]];
    /// // transformers' batched greedy generate (tests/fixtures/generate/batch.json)
    /// let rows = model.generate_batch(&prompts, &GenerationConfig::greedy(12).with_eos([27]))?;
    /// assert_eq!(rows[0], [22, 9, 12, 27]); // stopped at 27
    /// assert_eq!(rows[1], [55, 25, 25, 18, 37, 63, 5, 22, 32, 26, 32, 21]);
    /// # Ok(()) }
    /// ```
    pub fn generate_batch(
        &self,
        prompts: &[Vec<u32>],
        config: &GenerationConfig,
    ) -> Result<Vec<Vec<u32>>> {
        crate::models::batch_generation::generate_batch(self, prompts, config)
    }

    /// Greedy decoding of one sequence: [`LlamaForCausalLM::generate`] with
    /// [`GenerationConfig::greedy`]`(max_new_tokens)` and `eos` as the stop token.
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor, D};
    /// use lorakit::models::llama::LlamaForCausalLM;
    /// use lorakit::peft::PeftAdapter;
    /// # fn main() -> lorakit::Result<()> {
    /// let dir = "tests/fixtures/models/llama/qwen2";
    /// let dev = Device::Cpu;
    /// let plan = PeftAdapter::load(format!("{dir}/lora"), &dev)?.plan()?;
    /// let model = LlamaForCausalLM::from_pretrained(format!("{dir}/base"), DType::F32, &dev, &plan)?;
    /// let prompt = [1u32, 17, 42];
    /// let tokens = model.generate_greedy(&prompt, 5, None)?;
    /// assert_eq!(tokens.len(), 5);
    /// // The first one is the argmax of the full forward's last position.
    /// let logits = model.forward(&Tensor::new(&prompt[..], &dev)?.unsqueeze(0)?)?;
    /// let first = logits.narrow(1, 2, 1)?.flatten_all()?.argmax(D::Minus1)?.to_scalar::<u32>()?;
    /// assert_eq!(tokens.first(), Some(&first));
    /// // Stopping at a token: the output ends with it.
    /// let stopped = model.generate_greedy(&prompt, 5, Some(first))?;
    /// assert_eq!(stopped, [first]);
    /// # Ok(()) }
    /// ```
    pub fn generate_greedy(
        &self,
        prompt: &[u32],
        max_new_tokens: usize,
        eos: Option<u32>,
    ) -> Result<Vec<u32>> {
        self.generate(
            prompt,
            &GenerationConfig::greedy(max_new_tokens).with_eos(eos),
        )
    }

    /// Phi-3 with LongRoPE: the sequence length where its frequencies switch to the long
    /// factors (`original_max_position_embeddings + 1`), at which generation re-runs the
    /// sequence without the cache, as transformers' `Phi3ForCausalLM` does.
    pub(crate) fn longrope_switch(&self) -> Option<usize> {
        match &self.config().rope_scaling {
            RopeScaling::LongRope(long) if self.config().family == LlamaFamily::Phi3 => {
                Some(long.original_max_position_embeddings + 1)
            }
            _ => None,
        }
    }

    /// `max_position_embeddings`, named.
    fn position_limit(&self) -> (usize, &'static str) {
        (
            self.config().max_position_embeddings,
            "max_position_embeddings",
        )
    }
}

impl Decoder for LlamaForCausalLM {
    fn new_cache(&self) -> KvCache {
        LlamaForCausalLM::new_cache(self)
    }

    fn step(&self, ids: &Tensor, cache: &mut KvCache, pads: Option<&[usize]>) -> Result<Tensor> {
        self.cached(ids, cache, pads)
    }

    fn vocab(&self) -> usize {
        self.config().vocab_size
    }

    fn max_positions(&self) -> (usize, &'static str) {
        self.position_limit()
    }

    fn on(&self) -> &Device {
        self.device()
    }

    fn what(&self) -> &'static str {
        "Llama generation"
    }

    fn rerun_at(&self) -> Option<usize> {
        self.longrope_switch()
    }
}
