//! Incremental decoding over a [`KvCache`] and greedy generation.

use candle_core::{DType, Tensor, D};

use crate::error::{Error, Result, Scope};

use super::cache::KvCache;
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
        let (batch, seq) = self.check_ids(input_ids)?;
        cache.check(
            batch,
            seq,
            self.layers.len(),
            self.config.max_position_embeddings,
        )?;
        let (logits, entries) = self.run(input_ids, cache.len(), cache.entries())?;
        cache.commit(entries, batch, seq);
        Ok(logits)
    }

    /// Greedy decoding of one sequence: runs `prompt` through a fresh [`KvCache`], then
    /// appends the most likely next token (the first on ties) one at a time, each step
    /// running only the new token. Returns the generated tokens (not the prompt): at most
    /// `max_new_tokens`, ending early with `eos` once it is generated (`eos` included).
    ///
    /// Errors: an empty prompt, a token id out of range, or a prompt plus generated tokens
    /// longer than `max_position_embeddings`.
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
        if prompt.is_empty() {
            return Err(Error::usage(
                Scope::Settings("Llama generation".to_string()),
                "the prompt is empty",
            ));
        }
        let mut cache = KvCache::new(&self.config);
        let mut out = Vec::with_capacity(max_new_tokens);
        let mut input = Tensor::new(prompt, &self.device)?.unsqueeze(0)?;
        while out.len() < max_new_tokens {
            let logits = self.forward_cached(&input, &mut cache)?;
            let last = logits.dim(1)?.saturating_sub(1);
            let next = logits
                .narrow(1, last, 1)?
                .flatten_all()?
                .to_dtype(DType::F32)?
                .argmax(D::Minus1)?
                .to_scalar::<u32>()?;
            out.push(next);
            if Some(next) == eos {
                break;
            }
            input = Tensor::new(&[[next]], &self.device)?;
        }
        Ok(out)
    }
}
