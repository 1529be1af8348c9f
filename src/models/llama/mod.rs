//! The Llama family of decoders — Llama 2 / 3 / 3.x, TinyLlama, SmolLM, Mistral,
//! Qwen2 / Qwen2.5, Qwen3, Granite 3.x, SmolLM3, Phi-3 / Phi-4 / Phi-4-mini, OLMo 2 and 3,
//! the mixtures of experts Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE and gpt-oss ([`MoeConfig`]), Gemma, Gemma 2,
//! Gemma 3 (text; and the text decoder of the image-and-text checkpoints, whose modules sit
//! under `model.language_model`: [`LlamaConfig::multimodal`]) — as one implementation with config switches ([`LlamaConfig`]), built on the model-level API so that PEFT's target names and every
//! variant apply: [`LlamaForCausalLM`].
//!
//! Every linear layer and the embedding are built with [`crate::model::linear_b`] /
//! [`crate::model::embedding`] at transformers' module paths (`model.embed_tokens`,
//! `model.layers.N.self_attn.{q,k,v,o}_proj`, `model.layers.N.mlp.{gate,up,down}_proj`,
//! `lm_head`), so an [`AdapterPlan`] — a PEFT adapter loaded with
//! [`crate::peft::PeftAdapter::plan`], or a fresh one of any variant — decides which of
//! them are adapted. Checked against transformers 5.24 and PEFT 0.21
//! (`tests/suite/models_llama.rs`, fixtures from `scripts/make_model_fixtures.py`).
//!
//! Incremental decoding: [`LlamaForCausalLM::forward_cached`] with a [`KvCache`], and
//! [`LlamaForCausalLM::generate_greedy`].
//!
//! Generation (greedy or sampled, one prompt at a time): [`LlamaForCausalLM::generate`].
//!
//! Sequence classification (transformers' `LlamaForSequenceClassification`, the `score`
//! head on each row's last token): [`LlamaForSequenceClassification`], which takes an
//! attention mask padding rows on the left or the right.
//!
//! Training mode: [`LlamaForCausalLM::forward_t`] and [`LlamaForCausalLM::loss_sum_t`]
//! with `train = true` drop attention probabilities at the config's `attention_dropout`
//! (0 in the Llama-family configs), as transformers' attention after `model.train()`
//! (checked on `tests/fixtures/models/llama_dropout_moments.safetensors`).
//!
//! Not here: a padding mask in [`LlamaForCausalLM::forward`] (right padding, as
//! [`crate::finetune`] batches, needs none under causal attention; batched generation
//! left-pads).

mod activation;
mod cache;
mod clamped_expert;
mod classifier;
mod config;
mod family;
mod gemma;
mod generate;
mod gpt_oss_moe;
mod layer_types;
mod layers;
mod longrope;
mod mlp;
mod moe;
mod multimodal;
mod multipliers;
mod norm;
mod norm_layout;
mod projections;
mod rope;
mod rope_keys;
mod routing;
mod sparse_moe;
mod trunk;
mod yarn;

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;

use crate::error::Result;
use crate::frozen::FrozenLinear;
use crate::model::quantize::checkpoint_and_plan;
use crate::model::{linear_b, AdapterPlan, Embedding, Linear};
use crate::models::decoder_trunk::{DecoderTrunk, Pass};
use crate::models::kv_buffer::LayerKv;
use crate::models::lm_loss::capped_head_loss_sum;
use crate::models::padding::PaddedPositions;

pub use activation::GateActivation;
pub use cache::KvCache;
pub use classifier::LlamaForSequenceClassification;
pub use config::{LayerAttention, LlamaConfig, RopeScaling};
pub use family::{LlamaFamily, GEMMA3_MULTIMODAL};
pub use longrope::LongRopeScaling;
pub use moe::{ClampedSwiGlu, MoeConfig};
pub use multipliers::Multipliers;
pub use norm_layout::{NormPlacement, QkNorm};
use trunk::LlamaTrunk;
pub use yarn::YarnScaling;

/// A Llama-family causal language model (transformers' `LlamaForCausalLM`,
/// `MistralForCausalLM`, `Qwen2ForCausalLM`, `Qwen3ForCausalLM`, `GraniteForCausalLM`,
/// `SmolLM3ForCausalLM`, `Phi3ForCausalLM`, `Olmo2ForCausalLM`, `Olmo3ForCausalLM`,
/// `MixtralForCausalLM`, `Qwen2MoeForCausalLM`, `Qwen3MoeForCausalLM`, `OlmoeForCausalLM`,
/// `GemmaForCausalLM`, `Gemma2ForCausalLM`,
/// `Gemma3ForCausalLM`; `Gemma3ForConditionalGeneration` on text, without its vision
/// tower) whose linear layers and embedding come from an [`AdapterPlan`].
///
/// [`LlamaForCausalLM::forward`] maps token ids `(batch, seq)` to logits
/// `(batch, seq, vocab)` over the whole sequence with a causal mask (sliding-window where
/// the config says so), in the dtype of the weights the `VarBuilder` gives. Adapted layers
/// run in the mode their [`crate::model::AdaptedSet`] is in (evaluation unless
/// `set_training(true)`). Gradients reach every adapter: candle-nn's fused RMSNorm, RoPE
/// and softmax kernels (which have no backward pass in candle 0.11) run only where no
/// gradient flows; where one does, lorakit's fused CPU ops with their own backward
/// (f32: RMSNorm, RoPE, the causal attention, `silu · up`) or the differentiable
/// compositions (other dtypes and devices).
///
/// With `tie_word_embeddings` and no `lm_head.weight` in the checkpoint, the output head
/// is a linear layer over the embedding table (as transformers 5 ties them), still built
/// through the plan at `lm_head` so PEFT's `lm_head` targets apply to it. The head holds
/// the table it was built with: merging an adapter into `model.embed_tokens` later does
/// not change the head (in PEFT's `merge_and_unload` the shared tensor changes both).
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use lorakit::models::llama::LlamaForCausalLM;
/// use lorakit::peft::PeftAdapter;
/// # fn main() -> lorakit::Result<()> {
/// // A tiny Qwen2 saved by transformers and a LoRA saved by PEFT
/// // (scripts/make_model_fixtures.py).
/// let dir = "tests/fixtures/models/llama/qwen2";
/// let dev = Device::Cpu;
/// let plan = PeftAdapter::load(format!("{dir}/lora"), &dev)?.plan()?;
/// let model = LlamaForCausalLM::from_pretrained(format!("{dir}/base"), DType::F32, &dev, &plan)?;
/// let layers = plan.finish()?; // every tensor of the adapter file was used
/// assert_eq!(layers.paths().len(), 10); // q/k/v/o/up_proj of 2 layers
///
/// let logits = model.forward(&Tensor::new(&[[1u32, 17, 42, 5]], &dev)?)?;
/// assert_eq!(logits.dims(), [1, 4, 64]);
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct LlamaForCausalLM {
    trunk: LlamaTrunk,
    lm_head: Linear,
    tied: bool,
    /// The folder `from_pretrained` read, as given (transformers' `_name_or_path`).
    name_or_path: Option<String>,
}

impl LlamaForCausalLM {
    /// Builds the model from `vb` (transformers' tensor names, e.g. from
    /// [`Checkpoint::var_builder`](crate::checkpoint::Checkpoint::var_builder)) with every linear layer and the embedding made by
    /// `plan`. Call `plan.finish()` afterwards to get the adapted layers (and, for a
    /// loaded adapter, to check that every tensor of its file was used).
    ///
    /// Errors: an invalid `config` ([`LlamaConfig::validate`]), a missing tensor or one
    /// whose shape disagrees with `config` (named), or an adapter that does not fit.
    ///
    /// A fresh DoRA on the attention of a tiny Mistral, ready to train:
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use candle_nn::{VarBuilder, VarMap};
    /// use lorakit::checkpoint::Checkpoint;
    /// use lorakit::model::{AdapterPlan, ModuleSelector, RankAlpha, TargetSpec};
    /// use lorakit::models::llama::{LlamaConfig, LlamaForCausalLM};
    /// use lorakit::DoraConfig;
    /// # fn main() -> lorakit::Result<()> {
    /// let dir = "tests/fixtures/models/llama/mistral/base";
    /// let dev = Device::Cpu;
    /// let config = LlamaConfig::from_file(dir)?;
    /// let vb = Checkpoint::open(dir)?.var_builder(DType::F32, &dev);
    /// let adapter_vars = VarMap::new(); // what an optimizer would train
    /// let plan = AdapterPlan::dora(
    ///     TargetSpec::new(ModuleSelector::list(["q_proj", "v_proj"])),
    ///     RankAlpha::new(4, 8.0),
    ///     DoraConfig::default(),
    ///     VarBuilder::from_varmap(&adapter_vars, DType::F32, &dev),
    /// );
    /// let model = LlamaForCausalLM::load(&config, vb, &plan)?;
    /// let layers = plan.finish()?;
    /// assert_eq!(layers.paths().len(), 4); // 2 layers × q_proj, v_proj
    /// layers.set_training(true);
    /// let loss = model.forward(&Tensor::new(&[[3u32, 1, 4, 1, 5]], &dev)?)?.sqr()?.mean_all()?;
    /// let grads = loss.backward()?;
    /// assert!(adapter_vars.all_vars().iter().all(|v| grads.get(v.as_tensor()).is_some()));
    /// # Ok(()) }
    /// ```
    pub fn load(config: &LlamaConfig, vb: VarBuilder, plan: &AdapterPlan) -> Result<Self> {
        let vb = multimodal::decoder_view(config.decoder_prefix(), vb);
        let trunk = LlamaTrunk::load(config, &vb, plan)?;
        let head_vb = vb.pp("lm_head");
        let tied = config.tie_word_embeddings && !head_vb.contains_tensor("weight");
        let lm_head = if tied {
            let table = trunk.embed_tokens.base_stored_weight()?;
            plan.adapt(&head_vb.prefix(), FrozenLinear::new(table, None)?)?
        } else {
            linear_b(config.hidden_size, config.vocab_size, false, head_vb, plan)?
        };
        Ok(Self {
            trunk,
            lm_head,
            tied,
            name_or_path: None,
        })
    }

    /// Reads `config.json` from the model folder `dir` (as `save_pretrained` writes it:
    /// one `model.safetensors` or shards with their index) and builds the model in `dtype`
    /// on `device` with [`LlamaForCausalLM::load`]; tensors are read one at a time
    /// ([`Checkpoint`](crate::checkpoint::Checkpoint)).
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use candle_nn::{VarBuilder, VarMap};
    /// use lorakit::model::{AdapterPlan, ModuleSelector, RankAlpha, TargetSpec};
    /// use lorakit::models::llama::LlamaForCausalLM;
    /// use lorakit::LoraConfig;
    /// # fn main() -> lorakit::Result<()> {
    /// let dev = Device::Cpu;
    /// // A plan that targets nothing: the plain model.
    /// let none = AdapterPlan::lora(
    ///     TargetSpec::new(ModuleSelector::list(Vec::<String>::new())),
    ///     RankAlpha::new(1, 1.0),
    ///     LoraConfig::default(),
    ///     VarBuilder::from_varmap(&VarMap::new(), DType::F32, &dev),
    /// );
    /// let dir = "tests/fixtures/checkpoints/llama_bf16_sharded"; // bf16, 4 shards
    /// let model = LlamaForCausalLM::from_pretrained(dir, DType::BF16, &dev, &none)?;
    /// let logits = model.forward(&Tensor::new(&[[1u32, 17, 42]], &dev)?)?;
    /// assert_eq!((logits.dims(), logits.dtype()), (&[1, 3, 64][..], DType::BF16));
    /// # Ok(()) }
    /// ```
    pub fn from_pretrained(
        dir: impl AsRef<Path>,
        dtype: DType,
        device: &Device,
        plan: &AdapterPlan,
    ) -> Result<Self> {
        let dir = dir.as_ref();
        let config = LlamaConfig::from_file(dir.join("config.json"))?;
        let (vb, plan) = checkpoint_and_plan(dir, dtype, device, plan)?;
        let mut model = Self::load(&config, vb, &plan)?;
        model.name_or_path = Some(dir.display().to_string());
        Ok(model)
    }

    /// The model folder [`from_pretrained`](Self::from_pretrained) read, as given
    /// (transformers' `config._name_or_path`); `None` for a model built with `load`. The
    /// training loop saves it as PEFT's `base_model_name_or_path`, which
    /// `AutoPeftModelForCausalLM` loads the base model from.
    ///
    /// ```
    /// use candle_core::{DType, Device};
    /// use lorakit::model::AdapterPlan;
    /// use lorakit::models::llama::LlamaForCausalLM;
    /// # fn main() -> lorakit::Result<()> {
    /// let dir = "tests/fixtures/models/llama/qwen2/base";
    /// let model = LlamaForCausalLM::from_pretrained(dir, DType::F32, &Device::Cpu, &AdapterPlan::none())?;
    /// assert_eq!(model.name_or_path(), Some(dir));
    /// # Ok(()) }
    /// ```
    pub fn name_or_path(&self) -> Option<&str> {
        self.name_or_path.as_deref()
    }

    /// Logits `(batch, seq, vocab)` for token ids `(batch, seq)` (u8, u32 or i64, each below
    /// `vocab_size`), every position attending to itself and the positions before it
    /// (within the sliding window on sliding layers).
    ///
    /// ```
    /// use candle_core::{DType, Device, IndexOp, Tensor};
    /// use lorakit::models::llama::LlamaForCausalLM;
    /// use lorakit::peft::PeftAdapter;
    /// # fn main() -> lorakit::Result<()> {
    /// let dir = "tests/fixtures/models/llama/qwen3";
    /// let dev = Device::Cpu;
    /// let plan = PeftAdapter::load(format!("{dir}/lora"), &dev)?.plan()?;
    /// let model = LlamaForCausalLM::from_pretrained(format!("{dir}/base"), DType::F32, &dev, &plan)?;
    /// let ids = Tensor::new(&[[5i64, 9, 2, 7], [1, 1, 2, 3]], &dev)?;
    /// let logits = model.forward(&ids)?;
    /// assert_eq!(logits.dims(), [2, 4, 64]);
    /// // Causal: a prefix gives the same logits at its positions.
    /// let prefix = model.forward(&ids.i((.., ..2))?)?;
    /// let diff = (prefix - logits.i((.., ..2))?)?.abs()?.max_all()?.to_scalar::<f32>()?;
    /// assert!(diff < 1e-5);
    /// assert!(model.forward(&Tensor::new(&[[64u32]], &dev)?).is_err()); // vocab is 64
    /// # Ok(()) }
    /// ```
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        self.forward_t(input_ids, false)
    }

    /// [`LlamaForCausalLM::forward`] in training mode when `train`: the config's
    /// `attention_dropout` (0 in the Llama-family configs; then the same as `forward`)
    /// drops attention probabilities, as transformers' attention after `model.train()`.
    /// The adapters' own dropout follows their training flag.
    pub fn forward_t(&self, input_ids: &Tensor, train: bool) -> Result<Tensor> {
        self.trunk.check_ids(input_ids)?;
        let numbering = PaddedPositions::AfterPadding;
        let hidden = self.trunk.hidden(input_ids, None, numbering, train)?;
        self.logits(&hidden)
    }

    /// The output head on the final hidden states, the logits soft-capped when the config
    /// says so (Gemma 2's `final_logit_softcapping`).
    fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let logits = self.lm_head.forward(hidden)?;
        match self.trunk.config.final_logit_softcapping {
            Some(cap) => crate::models::fused::soft_cap(&logits, cap),
            None => Ok(logits),
        }
    }

    /// The summed next-token loss of a batch, [`causal_lm_loss_sum`] of
    /// [`LlamaForCausalLM::forward`]'s logits (`loss_mask` `(batch, seq)`, 1 where a token is
    /// a prediction target; divide by the targets for the mean, as transformers'
    /// `model(input_ids, labels=…).loss`): what the training loop calls.
    ///
    /// With a frozen output head on the CPU in f32 the head and the loss run as one op over
    /// blocks of positions: the batch's logits (`batch · seq × vocab`) are never stored, and
    /// when a gradient flows the head's backward is computed in the same pass (so a loss
    /// whose backward never runs has paid for it: evaluate with
    /// [`CausalLm::eval_loss_sum`](crate::models::CausalLm::eval_loss_sum)). An adapted or
    /// trained head (PEFT's `lm_head` targets, `modules_to_save`), a quantized one, another
    /// device or dtype computes the logits and the loss (soft-capped first for Gemma 2, in
    /// the fused op too). The result is the same either way
    /// (to float rounding).
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use lorakit::finetune::loss::causal_lm_loss_sum;
    /// use lorakit::models::llama::LlamaForCausalLM;
    /// use lorakit::peft::PeftAdapter;
    /// # fn main() -> lorakit::Result<()> {
    /// let dir = "tests/fixtures/models/llama/qwen3";
    /// let dev = Device::Cpu;
    /// let plan = PeftAdapter::load(format!("{dir}/lora"), &dev)?.plan()?;
    /// let model = LlamaForCausalLM::from_pretrained(format!("{dir}/base"), DType::F32, &dev, &plan)?;
    /// let ids = Tensor::new(&[[5u32, 9, 2, 7], [1, 1, 2, 3]], &dev)?;
    /// let mask = Tensor::new(&[[0f32, 1., 1., 1.], [0., 0., 1., 1.]], &dev)?;
    /// let loss = model.loss_sum(&ids, &mask)?.to_scalar::<f32>()?;
    /// let reference = causal_lm_loss_sum(&model.forward(&ids)?, &ids, &mask)?.to_scalar::<f32>()?;
    /// assert!((loss - reference).abs() < 1e-5 * reference);
    /// # Ok(()) }
    /// ```
    ///
    /// [`causal_lm_loss_sum`]: crate::finetune::loss::causal_lm_loss_sum
    pub fn loss_sum(&self, input_ids: &Tensor, loss_mask: &Tensor) -> Result<Tensor> {
        self.loss_sum_t(input_ids, loss_mask, false)
    }

    /// [`LlamaForCausalLM::loss_sum`] in training mode when `train` (the attention
    /// dropout, as [`LlamaForCausalLM::forward_t`]): what a training step computes.
    pub fn loss_sum_t(
        &self,
        input_ids: &Tensor,
        loss_mask: &Tensor,
        train: bool,
    ) -> Result<Tensor> {
        self.loss_sum_tracked(input_ids, loss_mask, true, train)
    }

    /// [`LlamaForCausalLM::loss_sum_t`]; without `gradient`, the hidden states are detached
    /// before the head (evaluation: no head gradient computed).
    pub(crate) fn loss_sum_tracked(
        &self,
        input_ids: &Tensor,
        loss_mask: &Tensor,
        gradient: bool,
        train: bool,
    ) -> Result<Tensor> {
        if let Some(moe) = &self.trunk.config.moe {
            moe.check_loss()?;
        }
        let hidden = self.trunk.loss_hidden(input_ids, gradient, train)?;
        let head = (&self.lm_head, self.trunk.config.final_logit_softcapping);
        capped_head_loss_sum(&hidden, head, input_ids, loss_mask)
    }

    /// The model on `input_ids` at positions `offset..` after each layer's cached keys and
    /// values `past` (in layer order): the logits and every layer's grown cache entry.
    /// `pads`: a left-padded batch's padding per row (`models::padding`), each row's tokens
    /// numbered from 0 after its padding (transformers' `generate`); `values_only`:
    /// attention reads the new keys and values as stored values (`KvCache::for_inference`).
    /// The ids are checked by the caller.
    pub(crate) fn run<'a>(
        &self,
        input_ids: &Tensor,
        offset: usize,
        past: impl Iterator<Item = &'a Option<LayerKv>>,
        pads: Option<&[usize]>,
        values_only: bool,
    ) -> Result<(Tensor, Vec<LayerKv>)> {
        let pass = Pass::decoding(offset, pads, values_only);
        let (x, grown) = self.trunk.run_hidden(input_ids, past, pass)?;
        Ok((self.logits(&x)?, grown))
    }

    /// The configuration the model was built with.
    ///
    /// ```
    /// use candle_core::{DType, Device};
    /// use lorakit::models::llama::LlamaForCausalLM;
    /// use lorakit::peft::PeftAdapter;
    /// # fn main() -> lorakit::Result<()> {
    /// let dir = "tests/fixtures/models/llama/linear_rope"; // tied; LoRA on the MLP and lm_head
    /// let plan = PeftAdapter::load(format!("{dir}/lora"), &Device::Cpu)?.plan()?;
    /// let model = LlamaForCausalLM::from_pretrained(format!("{dir}/base"), DType::F32, &Device::Cpu, &plan)?;
    /// assert_eq!(model.config().num_hidden_layers, 2);
    /// # Ok(()) }
    /// ```
    pub fn config(&self) -> &LlamaConfig {
        &self.trunk.config
    }

    /// The token embedding (`model.embed_tokens`).
    ///
    /// ```
    /// use candle_core::{DType, Device};
    /// use lorakit::models::llama::LlamaForCausalLM;
    /// use lorakit::peft::PeftAdapter;
    /// # fn main() -> lorakit::Result<()> {
    /// let dir = "tests/fixtures/models/llama/linear_rope"; // tied; LoRA on the MLP and lm_head
    /// let plan = PeftAdapter::load(format!("{dir}/lora"), &Device::Cpu)?.plan()?;
    /// let model = LlamaForCausalLM::from_pretrained(format!("{dir}/base"), DType::F32, &Device::Cpu, &plan)?;
    /// assert!(model.embed_tokens().adapter().is_none()); // the adapter does not target it
    /// # Ok(()) }
    /// ```
    pub fn embed_tokens(&self) -> &Embedding {
        &self.trunk.embed_tokens
    }

    /// The output head (`lm_head`).
    ///
    /// ```
    /// use candle_core::{DType, Device};
    /// use lorakit::models::llama::LlamaForCausalLM;
    /// use lorakit::peft::PeftAdapter;
    /// # fn main() -> lorakit::Result<()> {
    /// let dir = "tests/fixtures/models/llama/linear_rope"; // tied; LoRA on the MLP and lm_head
    /// let plan = PeftAdapter::load(format!("{dir}/lora"), &Device::Cpu)?.plan()?;
    /// let model = LlamaForCausalLM::from_pretrained(format!("{dir}/base"), DType::F32, &Device::Cpu, &plan)?;
    /// assert!(model.lm_head().adapter().is_some());
    /// # Ok(()) }
    /// ```
    pub fn lm_head(&self) -> &Linear {
        &self.lm_head
    }

    /// Whether the output head was built over the embedding table (tied).
    ///
    /// ```
    /// use candle_core::{DType, Device};
    /// use lorakit::models::llama::LlamaForCausalLM;
    /// use lorakit::peft::PeftAdapter;
    /// # fn main() -> lorakit::Result<()> {
    /// let dir = "tests/fixtures/models/llama/linear_rope"; // tied; LoRA on the MLP and lm_head
    /// let plan = PeftAdapter::load(format!("{dir}/lora"), &Device::Cpu)?.plan()?;
    /// let model = LlamaForCausalLM::from_pretrained(format!("{dir}/base"), DType::F32, &Device::Cpu, &plan)?;
    /// assert!(model.is_tied()); // tie_word_embeddings, no lm_head.weight in the file
    /// # Ok(()) }
    /// ```
    pub fn is_tied(&self) -> bool {
        self.tied
    }

    /// The dtype the model computes in (its weights').
    ///
    /// ```
    /// use candle_core::{DType, Device};
    /// use lorakit::models::llama::LlamaForCausalLM;
    /// use lorakit::peft::PeftAdapter;
    /// # fn main() -> lorakit::Result<()> {
    /// let dir = "tests/fixtures/models/llama/linear_rope"; // tied; LoRA on the MLP and lm_head
    /// let plan = PeftAdapter::load(format!("{dir}/lora"), &Device::Cpu)?.plan()?;
    /// let model = LlamaForCausalLM::from_pretrained(format!("{dir}/base"), DType::F32, &Device::Cpu, &plan)?;
    /// assert_eq!(model.dtype(), DType::F32);
    /// # Ok(()) }
    /// ```
    pub fn dtype(&self) -> DType {
        self.trunk.dtype
    }

    /// The device the model lives on.
    ///
    /// ```
    /// use candle_core::{DType, Device};
    /// use lorakit::models::llama::LlamaForCausalLM;
    /// use lorakit::peft::PeftAdapter;
    /// # fn main() -> lorakit::Result<()> {
    /// let dir = "tests/fixtures/models/llama/linear_rope"; // tied; LoRA on the MLP and lm_head
    /// let plan = PeftAdapter::load(format!("{dir}/lora"), &Device::Cpu)?.plan()?;
    /// let model = LlamaForCausalLM::from_pretrained(format!("{dir}/base"), DType::F32, &Device::Cpu, &plan)?;
    /// assert!(model.device().is_cpu());
    /// # Ok(()) }
    /// ```
    pub fn device(&self) -> &Device {
        &self.trunk.device
    }
}
