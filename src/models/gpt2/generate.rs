//! GPT-2's incremental decoding over a [`KvCache`], and generation
//! ([`crate::models::generation`]).

use candle_core::{Device, Tensor};

use crate::error::Result;
use crate::models::generation::{self, Decoder, GenerationConfig};

use super::{Gpt2LmHeadModel, KvCache};

impl Gpt2LmHeadModel {
    /// An empty [`KvCache`] for this model (one slot per block).
    ///
    /// ```
    /// use candle_core::{DType, Device};
    /// use lorakit::model::AdapterPlan;
    /// use lorakit::models::gpt2::Gpt2LmHeadModel;
    /// # fn main() -> lorakit::Result<()> {
    /// let dir = "tests/fixtures/peft_options/gpt2_dora/base";
    /// let model = Gpt2LmHeadModel::from_pretrained(dir, DType::F32, &Device::Cpu, &AdapterPlan::none())?;
    /// let cache = model.new_cache();
    /// assert_eq!((cache.num_layers(), cache.len()), (2, 0));
    /// # Ok(()) }
    /// ```
    pub fn new_cache(&self) -> KvCache {
        KvCache::with_layers(self.trunk.blocks.len())
    }

    /// Logits `(batch, seq, vocab)` for the new token ids `(batch, seq)` that continue the
    /// sequences in `cache`: their positions (`wpe` rows) start at `cache.len()`, they
    /// attend to the cached positions and to each other causally, and their keys and
    /// values are appended to `cache`. The same logits as [`Gpt2LmHeadModel::forward`] on
    /// the whole sequence at those positions.
    ///
    /// Errors (the cache left as it was): bad token ids (as in `forward`), a batch size
    /// other than the cache's, a cache with another layer count, or more than
    /// `n_positions` positions in all.
    ///
    /// The cache keeps keys and values without their autograd history ([`KvCache`]).
    ///
    /// ```
    /// use candle_core::{DType, Device, IndexOp, Tensor};
    /// use lorakit::models::gpt2::Gpt2LmHeadModel;
    /// use lorakit::peft::PeftAdapter;
    /// # fn main() -> lorakit::Result<()> {
    /// let dir = "tests/fixtures/peft_options/gpt2_lora";
    /// let dev = Device::Cpu;
    /// let plan = PeftAdapter::load(format!("{dir}/adapter"), &dev)?.plan()?;
    /// let model = Gpt2LmHeadModel::from_pretrained(format!("{dir}/base"), DType::F32, &dev, &plan)?;
    /// let ids = Tensor::new(&[[59u32, 13, 15, 57, 63]], &dev)?;
    /// let full = model.forward(&ids)?;
    ///
    /// let mut cache = model.new_cache();
    /// model.forward_cached(&ids.i((.., ..3))?, &mut cache)?; // positions 0..3
    /// let step = model.forward_cached(&ids.i((.., 3..4))?, &mut cache)?; // position 3
    /// let diff = (step - full.i((.., 3..4))?)?.abs()?.max_all()?.to_scalar::<f32>()?;
    /// assert!(diff < 1e-5 && cache.len() == 4);
    /// // n_positions is 16: 4 cached + 13 new do not fit, and the cache is unchanged.
    /// assert!(model.forward_cached(&Tensor::zeros((1, 13), DType::U32, &dev)?, &mut cache).is_err());
    /// assert_eq!(cache.len(), 4);
    /// # Ok(()) }
    /// ```
    pub fn forward_cached(&self, input_ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        self.cached(input_ids, cache, None)
    }

    /// [`Gpt2LmHeadModel::forward_cached`] on a batch left-padded by `pads` (or none).
    fn cached(&self, ids: &Tensor, cache: &mut KvCache, pads: Option<&[usize]>) -> Result<Tensor> {
        let (batch, seq) = self.trunk.check_ids(ids)?;
        cache.check(batch, seq, self.trunk.blocks.len(), self.position_limit())?;
        let inference = cache.is_for_inference();
        let (logits, entries) = self.run(ids, cache.len(), cache.entries(), pads, inference)?;
        cache.commit(entries, batch, seq);
        Ok(logits)
    }

    /// Generates one sequence after `prompt` by `config`, as
    /// [`crate::models::llama::LlamaForCausalLM::generate`] does: the prompt through a fresh
    /// [`KvCache`], then one token at a time (greedy or sampled), stopping after
    /// `config.max_new_tokens` tokens or a token of `config.eos` (returned). Returns the
    /// new tokens only.
    ///
    /// Errors, before any work: an empty prompt, a token id out of the vocabulary, a
    /// prompt plus `max_new_tokens - 1` longer than `n_positions`, invalid sampling
    /// settings.
    ///
    /// ```
    /// use candle_core::{DType, Device};
    /// use lorakit::models::generation::GenerationConfig;
    /// use lorakit::models::gpt2::Gpt2LmHeadModel;
    /// use lorakit::peft::PeftAdapter;
    /// # fn main() -> lorakit::Result<()> {
    /// let dir = "tests/fixtures/peft_options/gpt2_dora";
    /// let dev = Device::Cpu;
    /// let plan = PeftAdapter::load(format!("{dir}/adapter"), &dev)?.plan()?;
    /// let model = Gpt2LmHeadModel::from_pretrained(format!("{dir}/base"), DType::F32, &dev, &plan)?;
    /// let tokens = model.generate(&[59, 13, 15, 57], &GenerationConfig::greedy(12))?;
    /// assert_eq!(tokens.len(), 12);
    /// // n_positions is 16: a prompt of 4 and 13 new tokens run 16 positions (the last
    /// // token is never run); 14 new tokens are too many.
    /// assert_eq!(model.generate(&[59, 13, 15, 57], &GenerationConfig::greedy(13))?.len(), 13);
    /// let err = model.generate(&[59, 13, 15, 57], &GenerationConfig::greedy(14)).unwrap_err();
    /// assert!(err.to_string().contains("n_positions 16"));
    /// # Ok(()) }
    /// ```
    pub fn generate(&self, prompt: &[u32], config: &GenerationConfig) -> Result<Vec<u32>> {
        generation::generate(self, prompt, config)
    }

    /// Generates after each of `prompts` in one batch, left-padded, sharing one
    /// [`KvCache`]: row `r` is what [`Gpt2LmHeadModel::generate`] gives for `prompts[r]`
    /// (see [`crate::models::llama::LlamaForCausalLM::generate_batch`]).
    ///
    /// ```
    /// use candle_core::{DType, Device};
    /// use lorakit::models::generation::GenerationConfig;
    /// use lorakit::models::gpt2::Gpt2LmHeadModel;
    /// use lorakit::peft::PeftAdapter;
    /// # fn main() -> lorakit::Result<()> {
    /// let dir = "tests/fixtures/peft_options/gpt2_lora";
    /// let plan = PeftAdapter::load(format!("{dir}/adapter"), &Device::Cpu)?.plan()?;
    /// let model = Gpt2LmHeadModel::from_pretrained(format!("{dir}/base"), DType::F32, &Device::Cpu, &plan)?;
    /// let rows = model.generate_batch(&[vec![59, 13, 15, 57], vec![32, 13]], &GenerationConfig::greedy(3))?;
    /// // transformers' batched greedy generate (tests/fixtures/generate/batch.json)
    /// assert_eq!(rows, [[10, 47, 8], [17, 49, 8]]);
    /// # Ok(()) }
    /// ```
    pub fn generate_batch(
        &self,
        prompts: &[Vec<u32>],
        config: &GenerationConfig,
    ) -> Result<Vec<Vec<u32>>> {
        crate::models::batch_generation::generate_batch(self, prompts, config)
    }

    /// `n_positions`, named.
    fn position_limit(&self) -> (usize, &'static str) {
        (self.config().n_positions, "n_positions")
    }
}

impl Decoder for Gpt2LmHeadModel {
    fn new_cache(&self) -> KvCache {
        Gpt2LmHeadModel::new_cache(self)
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
        "GPT-2 generation"
    }
}
