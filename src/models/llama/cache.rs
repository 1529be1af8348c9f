//! The KV cache of [`super::LlamaForCausalLM::forward_cached`] and
//! [`crate::models::gpt2::Gpt2LmHeadModel::forward_cached`]: per layer, the keys and values
//! of every position seen so far.

use crate::error::{Error, Result, Scope};
use crate::models::kv_buffer::LayerKv;

use super::config::LlamaConfig;

/// Keys and values `(batch, kv_heads, len, head_dim)` of each decoder layer for the
/// positions a model has already processed, so that
/// [`super::LlamaForCausalLM::forward_cached`] (and GPT-2's
/// [`crate::models::gpt2::Gpt2LmHeadModel::forward_cached`]) runs only the new ones. Llama
/// keys are stored rotated for their positions; every layer holds every position
/// (sliding-window layers mask the old ones out rather than dropping them). A cache holds
/// the sequences of one model: make it with [`KvCache::new`] from the model's config or
/// with the model's `new_cache`.
///
/// Each layer's keys and values sit in buffers with room for more positions, which a
/// step fills in place (the room doubles when it runs out, up to the model's position
/// limit): a step costs its own positions, not a copy of the cached ones. Clones of a
/// cache continue independently (a shared buffer is copied before a write).
///
/// The cache holds keys and values as plain values, without their autograd history (as
/// transformers' cache does under `torch.no_grad()`, where `generate` runs): a gradient
/// through `forward_cached`'s logits reaches the step's own positions, not the cached
/// ones. Keeping the history would keep every earlier step's intermediate tensors alive,
/// memory quadratic in the sequence length whenever the model holds trainable variables
/// (an adapter does): `llama_speed --mode gen --gen-tokens 1024` (the 20M-parameter
/// model of `benches/llama_compare.py`) peaked at 4.4 GB with it, 105 MB without.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use lorakit::models::llama::{KvCache, LlamaForCausalLM};
/// use lorakit::peft::PeftAdapter;
/// # fn main() -> lorakit::Result<()> {
/// let dir = "tests/fixtures/models/llama/qwen2";
/// let dev = Device::Cpu;
/// let plan = PeftAdapter::load(format!("{dir}/lora"), &dev)?.plan()?;
/// let model = LlamaForCausalLM::from_pretrained(format!("{dir}/base"), DType::F32, &dev, &plan)?;
/// let mut cache = KvCache::new(model.config());
/// assert!(cache.is_empty());
/// model.forward_cached(&Tensor::new(&[[1u32, 17, 42]], &dev)?, &mut cache)?;
/// assert_eq!(cache.len(), 3);
/// cache.reset();
/// assert_eq!(cache.len(), 0);
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct KvCache {
    layers: Vec<Option<LayerKv>>,
    len: usize,
    batch: Option<usize>,
    values_only: bool,
}

impl KvCache {
    /// An empty cache for a model built with `config` (one slot per decoder layer).
    ///
    /// ```
    /// use lorakit::models::llama::{KvCache, LlamaConfig};
    /// # fn main() -> lorakit::Result<()> {
    /// let config = LlamaConfig::from_file("tests/fixtures/models/llama/mistral/base/config.json")?;
    /// let cache = KvCache::new(&config);
    /// assert_eq!((cache.len(), cache.num_layers()), (0, 2));
    /// # Ok(()) }
    /// ```
    pub fn new(config: &LlamaConfig) -> Self {
        Self::with_layers(config.num_hidden_layers)
    }

    /// An empty cache with `layers` slots, for any model of that many layers (GPT-2's
    /// [`crate::models::gpt2::Gpt2LmHeadModel::new_cache`] makes one with `n_layer`).
    ///
    /// ```
    /// use lorakit::models::llama::KvCache;
    /// let cache = KvCache::with_layers(3);
    /// assert_eq!((cache.len(), cache.num_layers(), cache.batch()), (0, 3, None));
    /// ```
    pub fn with_layers(layers: usize) -> Self {
        Self {
            layers: vec![None; layers],
            len: 0,
            batch: None,
            values_only: false,
        }
    }

    /// This cache, set for inference: a step's new keys and values are attended as the
    /// stored values too, so attention reads the cache's buffers as they stand and a
    /// step copies nothing already cached. A gradient through `forward_cached`'s logits
    /// then reaches no key or value projection (it still reaches the queries and the rest
    /// of the model). The models' `generate` and `generate_batch` use it.
    ///
    /// Without it (the default) attention joins the cached keys and values to the step's
    /// own, whose gradient flows, which copies the cached positions once per step when a
    /// gradient is tracked (the model holds trainable variables, as an adapter does).
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
    /// let mut cache = model.new_cache().for_inference();
    /// assert!(cache.is_for_inference());
    /// model.forward_cached(&ids.i((.., ..3))?, &mut cache)?;
    /// let step = model.forward_cached(&ids.i((.., 3..))?, &mut cache)?;
    /// // The same logits as the full forward.
    /// let full = model.forward(&ids)?.i((.., 3..))?;
    /// assert!((step - full)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-5);
    /// # Ok(()) }
    /// ```
    pub fn for_inference(mut self) -> Self {
        self.values_only = true;
        self
    }

    /// Whether the cache is set for inference ([`KvCache::for_inference`]).
    ///
    /// ```
    /// use lorakit::models::llama::KvCache;
    /// assert!(!KvCache::with_layers(2).is_for_inference());
    /// ```
    pub fn is_for_inference(&self) -> bool {
        self.values_only
    }

    /// How many positions the cache holds (where the next input's positions start).
    ///
    /// ```
    /// use lorakit::models::llama::{KvCache, LlamaConfig};
    /// # fn main() -> lorakit::Result<()> {
    /// let config = LlamaConfig::from_file("tests/fixtures/models/llama/qwen3/base/config.json")?;
    /// assert_eq!(KvCache::new(&config).len(), 0);
    /// # Ok(()) }
    /// ```
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the cache holds no position.
    ///
    /// ```
    /// use lorakit::models::llama::{KvCache, LlamaConfig};
    /// # fn main() -> lorakit::Result<()> {
    /// let config = LlamaConfig::from_file("tests/fixtures/models/llama/qwen3/base/config.json")?;
    /// assert!(KvCache::new(&config).is_empty());
    /// # Ok(()) }
    /// ```
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The number of decoder layers the cache has slots for.
    ///
    /// ```
    /// use lorakit::models::llama::{KvCache, LlamaConfig};
    /// # fn main() -> lorakit::Result<()> {
    /// let config = LlamaConfig::from_file("tests/fixtures/models/llama/qwen2/base/config.json")?;
    /// assert_eq!(KvCache::new(&config).num_layers(), config.num_hidden_layers);
    /// # Ok(()) }
    /// ```
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// The batch size of the cached sequences, `None` while empty.
    ///
    /// ```
    /// use lorakit::models::llama::{KvCache, LlamaConfig};
    /// # fn main() -> lorakit::Result<()> {
    /// let config = LlamaConfig::from_file("tests/fixtures/models/llama/qwen2/base/config.json")?;
    /// assert_eq!(KvCache::new(&config).batch(), None);
    /// # Ok(()) }
    /// ```
    pub fn batch(&self) -> Option<usize> {
        self.batch
    }

    /// Empties the cache (keeping its layer count), ready for a new sequence.
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use lorakit::models::llama::{KvCache, LlamaForCausalLM};
    /// use lorakit::peft::PeftAdapter;
    /// # fn main() -> lorakit::Result<()> {
    /// let dir = "tests/fixtures/models/llama/qwen2";
    /// let dev = Device::Cpu;
    /// let plan = PeftAdapter::load(format!("{dir}/lora"), &dev)?.plan()?;
    /// let model = LlamaForCausalLM::from_pretrained(format!("{dir}/base"), DType::F32, &dev, &plan)?;
    /// let mut cache = KvCache::new(model.config());
    /// model.forward_cached(&Tensor::new(&[[1u32, 2], [3, 4]], &dev)?, &mut cache)?;
    /// cache.reset();
    /// assert_eq!((cache.len(), cache.batch()), (0, None));
    /// // A new batch size is fine after a reset.
    /// model.forward_cached(&Tensor::new(&[[5u32]], &dev)?, &mut cache)?;
    /// assert_eq!((cache.len(), cache.batch()), (1, Some(1)));
    /// # Ok(()) }
    /// ```
    pub fn reset(&mut self) {
        self.layers.iter_mut().for_each(|slot| *slot = None);
        self.len = 0;
        self.batch = None;
    }

    /// Checks that `batch` new rows of `new` positions fit this cache and a model with
    /// `layers` decoder layers and `max_positions` positions (the config field `limit`).
    pub(crate) fn check(
        &self,
        batch: usize,
        new: usize,
        layers: usize,
        (max_positions, limit): (usize, &str),
    ) -> Result<()> {
        let scope = || Scope::Settings("KV cache".to_string());
        if self.layers.len() != layers {
            return Err(Error::usage(
                scope(),
                format!(
                    "the cache has {} layers, the model {layers}",
                    self.layers.len()
                ),
            ));
        }
        if let Some(cached) = self.batch {
            if cached != batch {
                return Err(Error::usage(
                    scope(),
                    format!(
                        "input_ids has batch size {batch}, the cache holds {cached} sequences \
                         (reset it for a new batch)"
                    ),
                ));
            }
        }
        let total = self.len.saturating_add(new);
        if total > max_positions {
            return Err(Error::usage(
                scope(),
                format!(
                    "{} cached + {new} new positions exceed {limit} {max_positions}",
                    self.len
                ),
            ));
        }
        Ok(())
    }

    /// The cached keys and values of each layer (`None` while empty).
    pub(crate) fn entries(&self) -> impl Iterator<Item = &Option<LayerKv>> {
        self.layers.iter()
    }

    /// Keeps only the batch rows `rows` (indices into the cached batch, in the order
    /// given), so that the next step runs those sequences alone; every layer's buffers are
    /// copied once. Errors name a row outside the batch; the cache is then unchanged.
    pub(crate) fn keep_rows(&mut self, rows: &[usize]) -> Result<()> {
        let batch = self.batch.unwrap_or(0);
        if let Some(&row) = rows.iter().find(|&&r| r >= batch) {
            return Err(Error::usage(
                Scope::Settings("KV cache".to_string()),
                format!("row {row} is outside the cached batch of {batch}"),
            ));
        }
        let index: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        let layers = self
            .layers
            .iter()
            .map(|slot| slot.as_ref().map(|kv| kv.keep_rows(&index)).transpose())
            .collect::<Result<Vec<_>>>()?;
        self.layers = layers;
        self.batch = Some(rows.len());
        Ok(())
    }

    /// Replaces every layer's keys and values with `entries` (the old ones with `new`
    /// positions of `batch` rows appended), all at once so that a failed forward leaves
    /// the cache as it was. The entries hold no autograd history (see the type's docs).
    pub(crate) fn commit(&mut self, entries: Vec<LayerKv>, batch: usize, new: usize) {
        self.layers = entries.into_iter().map(Some).collect();
        self.batch = Some(batch);
        self.len = self.len.saturating_add(new);
    }
}
